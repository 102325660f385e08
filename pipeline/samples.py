"""The sample sheet: one CSV row per slide or cell image, with its label.

Columns (**contract**): ``sample_id, path, label`` are required; ``group`` (patient or plate: a split
never puts one group on both sides), ``kind`` (``slide`` | ``image``; inferred from the file when
absent), ``annotations`` (GeoJSON path), ``mpp`` (µm/px for files without it in their metadata) and
``split`` (``train`` | ``val`` | ``test``: a fixed split) are optional. Relative paths are resolved
against the folder of the CSV, so a sheet travels with its data.

The sheet is read with the standard ``csv`` module rather than pandas so that nothing is guessed:
``007`` stays the sample id ``007``, not the number 7.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SampleSheetError

REQUIRED_COLUMNS = ("sample_id", "path", "label")
OPTIONAL_COLUMNS = ("group", "kind", "annotations", "mpp", "split")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
KINDS = ("slide", "image")
SPLITS = ("train", "val", "test")

# A sample id names files (results/tiles/{sample_id}.zarr), so it must be safe on every filesystem.
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Sample:
    """One row of the sample sheet; paths are absolute, optional fields ``None`` when blank."""

    sample_id: str
    path: Path
    label: str
    group: str | None = None
    kind: str | None = None
    annotations: Path | None = None
    mpp: float | None = None
    split: str | None = None


def load_sample_sheet(
    path: str | Path,
    classes: Sequence[str] | None = None,
    check_files: bool = True,
) -> list[Sample]:
    """Read and check a sample sheet; return its samples in file order.

    ``classes``: the allowed labels (config ``classes``); ``None`` accepts any non-empty label.
    ``check_files``: also require that every ``path`` and ``annotations`` file exists.

    Raises ``SampleSheetError`` listing every problem found, not just the first, so a user fixes the
    sheet in one pass. Rows are numbered as a spreadsheet shows them: the header is row 1.
    """
    sheet = Path(path)
    base = Path(os.path.abspath(sheet)).parent
    header, rows = _read_rows(sheet)
    problems: list[str] = []

    columns = [c.strip() for c in header]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        names = ", ".join(repr(c) for c in unknown)
        problems.append(
            f"unknown column{'s' if len(unknown) > 1 else ''} {names}: "
            f"the allowed columns are {', '.join(COLUMNS)}"
        )
    repeated = sorted({c for c in columns if columns.count(c) > 1 and c})
    if repeated:
        problems.append(f"column{'s' if len(repeated) > 1 else ''} given twice: {', '.join(repeated)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(
            f"missing required column{'s' if len(missing) > 1 else ''}: {', '.join(missing)} "
            f"(the header must name at least {', '.join(REQUIRED_COLUMNS)})"
        )
        raise SampleSheetError(sheet, problems)
    if not rows:
        problems.append("no samples: the sheet has a header but no rows")
        raise SampleSheetError(sheet, problems)

    samples: list[Sample] = []
    first_row_of: dict[str, int] = {}
    splits_of_group: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for number, cells in rows:
        row_problems: list[str] = []
        if len(cells) > len(columns):
            row_problems.append(f"{len(cells)} cells but the header has {len(columns)} columns")
        # the first occurrence of a column wins; a repeated column is already reported above
        record: dict[str, str] = {}
        for name, cell in zip(columns, cells):
            record.setdefault(name, cell.strip())
        value = {name: record.get(name, "") for name in COLUMNS}

        sample_id = value["sample_id"]
        where = f"row {number} ({sample_id})" if sample_id else f"row {number}"
        if not sample_id:
            row_problems.append("empty sample_id")
        elif not _SAFE_ID.fullmatch(sample_id):
            row_problems.append(
                f"sample_id {sample_id!r} is not safe as a file name: "
                "use only letters, digits, '.', '_' and '-'"
            )
        elif sample_id in first_row_of:
            row_problems.append(f"duplicate sample_id {sample_id!r} (first in row {first_row_of[sample_id]})")
        else:
            first_row_of[sample_id] = number

        file_path = _resolve(value["path"], base)
        if file_path is None:
            row_problems.append("empty path")
        elif check_files and not file_path.exists():
            row_problems.append(f"file not found: {file_path}")

        label = value["label"]
        if not label:
            row_problems.append("empty label")
        elif classes is not None and label not in classes:
            row_problems.append(f"unknown label {label!r}: the classes are {', '.join(classes)} (config `classes`)")

        kind = value["kind"].lower() or None
        if kind is not None and kind not in KINDS:
            row_problems.append(f"bad kind {value['kind']!r}: use {' or '.join(KINDS)}, or leave it blank to infer it")

        annotations = _resolve(value["annotations"], base)
        if annotations is not None and check_files and not annotations.exists():
            row_problems.append(f"annotations file not found: {annotations}")

        mpp = None
        if value["mpp"]:
            try:
                mpp = float(value["mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                row_problems.append(f"mpp {value['mpp']!r} is not a positive number of µm per pixel")
                mpp = None

        split = value["split"].lower() or None
        if split is not None and split not in SPLITS:
            row_problems.append(f"bad split {value['split']!r}: use {', '.join(SPLITS)}, or leave it blank")
            split = None

        group = value["group"] or None
        if group is not None and split is not None:
            splits_of_group[group][split].append(number)

        problems.extend(f"{where}: {p}" for p in row_problems)
        if not row_problems:
            samples.append(Sample(sample_id, file_path, label, group, kind, annotations, mpp, split))

    for group, by_split in splits_of_group.items():
        if len(by_split) > 1:
            sides = ", ".join(
                f"{split} (row{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))})"
                for split, numbers in by_split.items()
            )
            problems.append(f"group {group!r} is fixed to more than one split: {sides}; a group must stay on one side")

    if problems:
        raise SampleSheetError(sheet, problems)
    return samples


def write_sample_sheet(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write ``samples`` as a sample sheet that ``load_sample_sheet`` reads back unchanged.

    Paths inside the sheet's folder are written relative to it (the folder can move); others stay
    absolute. Optional columns are written only when some sample uses them.
    """
    sheet = Path(path)
    base = Path(os.path.abspath(sheet)).parent
    samples = list(samples)
    optional = [c for c in OPTIONAL_COLUMNS if any(getattr(s, c) is not None for s in samples)]
    sheet.parent.mkdir(parents=True, exist_ok=True)
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*REQUIRED_COLUMNS, *optional])
        for s in samples:
            row = [s.sample_id, _relative(s.path, base), s.label]
            for column in optional:
                cell = getattr(s, column)
                if cell is None:
                    row.append("")
                elif isinstance(cell, Path):
                    row.append(_relative(cell, base))
                else:
                    row.append(str(cell))
            writer.writerow(row)
    return sheet


def _read_rows(sheet: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows, each with its spreadsheet row number (header = 1)."""
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark that would stick to the first column name
        with open(sheet, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, cells) for cells in reader]
    except FileNotFoundError:
        raise SampleSheetError(sheet, ["file not found: check the path given as `samples` in the config"]) from None
    except IsADirectoryError:
        raise SampleSheetError(sheet, ["is a folder, not a CSV file"]) from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SampleSheetError(sheet, [f"cannot read the CSV: {error}"]) from None
    # rows of only empty cells (",,,") are what spreadsheets leave after the last sample
    lines = [(n, cells) for n, cells in lines if any(c.strip() for c in cells)]
    if not lines:
        raise SampleSheetError(sheet, [f"empty file: expected a header line {','.join(REQUIRED_COLUMNS)}"])
    return lines[0][1], lines[1:]


def _resolve(cell: str, base: Path) -> Path | None:
    """A path cell made absolute against the sheet's folder; ``None`` when blank."""
    if not cell:
        return None
    p = Path(cell).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _relative(p: Path, base: Path) -> str:
    absolute = Path(os.path.abspath(p))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)


def with_kinds(samples: Sequence[Sample], sheet: str | Path) -> list[Sample]:
    """The samples with every blank ``kind`` inferred from the file (slide or image).

    Raises ``SampleSheetError`` listing every sample whose kind cannot be told, before any work.
    """
    if all(s.kind is not None for s in samples):
        return list(samples)  # nothing to infer: the readers are not even imported
    from dataclasses import replace

    from pipeline.errors import GaplessError
    from pipeline.io import infer_kind

    out, problems = [], []
    for s in samples:
        try:
            out.append(s if s.kind is not None else replace(s, kind=infer_kind(s.path)))
        except GaplessError as error:
            problems.append(f"{s.sample_id}: {error} (or set `kind` in the sheet)")
    if problems:
        raise SampleSheetError(sheet, problems)
    return out
