"""The sample sheet contract: what loads, and every problem reported together in one error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import GaplessError, SampleSheetError
from pipeline.samples import Sample, load_sample_sheet, write_sample_sheet

CLASSES = ["negative", "positive"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip(), encoding="utf-8")
    return path


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """A folder with two slides, one image and one annotation file (contents do not matter here)."""
    folder = tmp_path / "data"
    for name in ("slide-01.svs", "slide-02.svs", "cells/field-01.tif", "slide-01.geojson"):
        write(folder / name, "x")
    return folder


def test_good_sheet_loads_with_every_column(data: Path) -> None:
    sheet = write(
        data / "samples.csv",
        """
sample_id,path,label,group,kind,annotations,mpp,split
slide-01,slide-01.svs,positive,patient-1,slide,slide-01.geojson,0.25,train
slide-02,slide-02.svs,negative,patient-2,,,,
field_01,cells/field-01.tif,negative,,image,,,test
""",
    )
    samples = load_sample_sheet(sheet, CLASSES)
    assert [s.sample_id for s in samples] == ["slide-01", "slide-02", "field_01"]
    first = samples[0]
    assert first == Sample(
        sample_id="slide-01",
        path=data / "slide-01.svs",
        label="positive",
        group="patient-1",
        kind="slide",
        annotations=data / "slide-01.geojson",
        mpp=0.25,
        split="train",
    )
    # blank optional cells are None, not ""
    assert samples[1] == Sample("slide-02", data / "slide-02.svs", "negative", group="patient-2")
    assert samples[2].kind == "image" and samples[2].split == "test" and samples[2].group is None


def test_relative_paths_are_resolved_against_the_sheet_folder(data: Path, tmp_path: Path, monkeypatch) -> None:
    sheets = data / "sheets"
    sheet = write(sheets / "samples.csv", "sample_id,path,label,annotations\ns1,../slide-01.svs,positive,../slide-01.geojson\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    (sample,) = load_sample_sheet(sheet, CLASSES)
    assert sample.path == data / "slide-01.svs"
    assert sample.path.is_absolute()
    assert sample.annotations == data / "slide-01.geojson"


def test_absolute_paths_stay_as_given(data: Path, tmp_path: Path) -> None:
    slide = data / "slide-02.svs"
    sheet = write(tmp_path / "other" / "samples.csv", f"sample_id,path,label\ns2,{slide},negative\n")
    assert load_sample_sheet(sheet, CLASSES)[0].path == slide


def test_only_required_columns_and_any_label_without_classes(data: Path) -> None:
    sheet = write(data / "samples.csv", "sample_id,path,label\n007,slide-01.svs,tumour\n")
    (sample,) = load_sample_sheet(sheet)
    # read as text: the id stays 007, not the number 7
    assert sample.sample_id == "007"
    assert sample.label == "tumour"
    assert (sample.group, sample.kind, sample.annotations, sample.mpp, sample.split) == (None,) * 5


def test_spreadsheet_quirks_are_tolerated(data: Path) -> None:
    # byte-order mark, spaces around cells, upper-case kind/split, trailing empty rows
    sheet = data / "samples.csv"
    sheet.write_text("\ufeffsample_id, path ,label,kind,split\n s1 , slide-01.svs ,positive,Slide,TRAIN\n,,,,\n\n", encoding="utf-8")
    (sample,) = load_sample_sheet(sheet, CLASSES)
    assert (sample.sample_id, sample.path, sample.kind, sample.split) == ("s1", data / "slide-01.svs", "slide", "train")


def test_missing_files_are_allowed_when_not_checked(tmp_path: Path) -> None:
    sheet = write(tmp_path / "samples.csv", "sample_id,path,label,annotations\ns1,nowhere.svs,positive,nowhere.geojson\n")
    (sample,) = load_sample_sheet(sheet, CLASSES, check_files=False)
    assert sample.path == tmp_path / "nowhere.svs"


def test_every_row_problem_is_reported_together(data: Path) -> None:
    sheet = write(
        data / "samples.csv",
        """
sample_id,path,label,group,kind,annotations,mpp,split
slide-01,slide-01.svs,positive,p1,slide,,,train
slide-01,slide-02.svs,negative,p2,,,,
,slide-02.svs,negative,,,,,
bad id/1,slide-02.svs,negative,,,,,
slide-03,missing.svs,negative,,,,,
slide-04,slide-02.svs,postive,,,,,
slide-05,slide-02.svs,negative,,tissue,,,
slide-06,slide-02.svs,negative,,,missing.geojson,,
slide-07,slide-02.svs,negative,,,,-0.5,
slide-08,slide-02.svs,negative,,,,abc,
slide-09,slide-02.svs,negative,,,,,training
slide-10,slide-02.svs,positive,p1,,,,test
slide-11,,,,,,,
""",
    )
    with pytest.raises(SampleSheetError) as caught:
        load_sample_sheet(sheet, CLASSES)
    error = caught.value
    problems = error.problems
    text = str(error)
    expected = [
        ("row 3 (slide-01)", "duplicate sample_id 'slide-01' (first in row 2)"),
        ("row 4", "empty sample_id"),
        ("row 5 (bad id/1)", "not safe as a file name"),
        ("row 6 (slide-03)", f"file not found: {data / 'missing.svs'}"),
        ("row 7 (slide-04)", "unknown label 'postive': the classes are negative, positive"),
        ("row 8 (slide-05)", "bad kind 'tissue'"),
        ("row 9 (slide-06)", f"annotations file not found: {data / 'missing.geojson'}"),
        ("row 10 (slide-07)", "mpp '-0.5' is not a positive number"),
        ("row 11 (slide-08)", "mpp 'abc' is not a positive number"),
        ("row 12 (slide-09)", "bad split 'training'"),
        ("row 14 (slide-11)", "empty path"),
        ("row 14 (slide-11)", "empty label"),
        ("group 'p1'", "train (row 2), test (row 13)"),
    ]
    for where, what in expected:
        assert any(p.startswith(where) and what in p for p in problems), (where, what, problems)
    assert len(problems) == len(expected)
    # the message names the file and lists every problem, one per line
    assert str(sheet) in text
    assert text.count("\n") >= len(expected)
    assert isinstance(error, GaplessError)


def test_column_problems_are_reported_together(data: Path) -> None:
    sheet = write(data / "samples.csv", "sample_id,file,label,colour\ns1,slide-01.svs,positive,red\n")
    with pytest.raises(SampleSheetError) as caught:
        load_sample_sheet(sheet, CLASSES)
    problems = caught.value.problems
    assert len(problems) == 2
    unknown = next(p for p in problems if p.startswith("unknown columns"))
    assert "'file'" in unknown and "'colour'" in unknown
    # the error names the allowed columns so the fix is obvious
    assert "sample_id, path, label, group, kind, annotations, mpp, split" in unknown
    assert any(p.startswith("missing required column: path") for p in problems)


def test_unknown_column_alone_is_an_error(data: Path) -> None:
    sheet = write(data / "samples.csv", "sample_id,path,label,patient\ns1,slide-01.svs,positive,p1\n")
    with pytest.raises(SampleSheetError, match="unknown column 'patient'"):
        load_sample_sheet(sheet, CLASSES)


def test_extra_cells_in_a_row_are_an_error(data: Path) -> None:
    sheet = write(data / "samples.csv", "sample_id,path,label\ns1,slide-01.svs,positive,oops\n")
    with pytest.raises(SampleSheetError, match="row 2 \\(s1\\): 4 cells but the header has 3 columns"):
        load_sample_sheet(sheet, CLASSES)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("\n,,\n", "empty file"),
        ("sample_id,path,label\n", "no samples"),
        ("sample_id,path,label\n,,\n", "no samples"),
    ],
)
def test_empty_sheet_is_an_error(tmp_path: Path, text: str, message: str) -> None:
    sheet = tmp_path / "samples.csv"
    sheet.write_text(text)
    with pytest.raises(SampleSheetError, match=message):
        load_sample_sheet(sheet, CLASSES)


def test_missing_or_unreadable_sheet_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SampleSheetError, match="file not found") as caught:
        load_sample_sheet(tmp_path / "nope.csv", CLASSES)
    assert str(tmp_path / "nope.csv") in str(caught.value)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81\x00")
    with pytest.raises(SampleSheetError, match="cannot read the CSV"):
        load_sample_sheet(binary, CLASSES)
    with pytest.raises(SampleSheetError, match="folder"):
        load_sample_sheet(tmp_path, CLASSES)


def test_same_group_in_one_split_or_unsplit_is_fine(data: Path) -> None:
    sheet = write(
        data / "samples.csv",
        """
sample_id,path,label,group,split
a,slide-01.svs,positive,p1,val
b,slide-02.svs,negative,p1,val
c,slide-02.svs,negative,p1,
d,slide-02.svs,negative,p2,test
""",
    )
    assert [s.split for s in load_sample_sheet(sheet, CLASSES)] == ["val", "val", None, "test"]


def test_written_sheet_reads_back_the_same(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.svs"
    outside.write_text("x")
    samples = [
        Sample("slide-01", data / "slide-01.svs", "positive", group="p1", kind="slide",
               annotations=data / "slide-01.geojson", mpp=0.2525, split="train"),
        Sample("field-01", data / "cells" / "field-01.tif", "negative", kind="image"),
        Sample("outside", outside, "negative"),
    ]
    sheet = write_sample_sheet(samples, data / "samples.csv")
    assert load_sample_sheet(sheet, CLASSES) == samples
    lines = sheet.read_text().splitlines()
    assert lines[0] == "sample_id,path,label,group,kind,annotations,mpp,split"
    # inside the sheet's folder paths are relative, so the folder can move; outside they stay absolute
    assert lines[1].startswith("slide-01,slide-01.svs,positive,")
    assert f",{outside}," in lines[3]


def test_written_sheet_has_only_the_columns_used(tmp_path: Path) -> None:
    sheet = write_sample_sheet([Sample("a", tmp_path / "a.tif", "negative")], tmp_path / "s.csv")
    assert sheet.read_text().splitlines() == ["sample_id,path,label", "a,a.tif,negative"]
