"""The synthetic demo dataset: determinism, file formats, and that the witness signal is rendered."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.draw import polygon as fill_polygon

from pipeline import demo
from pipeline.demo import dataset as demo_plan
from pipeline.demo import DemoSample, DemoSettings, generate, plan
from pipeline.errors import GaplessError

openslide = pytest.importorskip("openslide")

TINY = DemoSettings(slides=2, images=2, slide_width=768, slide_height=640, image_size=256,
                    witness_fraction=0.2, seed=7)
COLUMNS = ["sample_id", "path", "label", "group", "kind", "annotations"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "a"
    sheet = generate(out, TINY, progress=False)
    assert sheet == out / "samples.csv"
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "samples.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _features(root: Path, sample: DemoSample) -> list[dict]:
    fc = json.loads((root / sample.annotations).read_text())
    assert fc["type"] == "FeatureCollection"
    return fc["features"]


def _mask(shape: tuple[int, int], ring: np.ndarray) -> np.ndarray:
    """Pixels whose centres (i + 0.5) lie inside a polygon given in level-0 (x, y) px."""
    rr, cc = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)
    m = np.zeros(shape, bool)
    m[rr, cc] = True
    return m


def _hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Decadic optical density projected on the hematoxylin direction."""
    od = -np.log10(np.clip(rgb.astype(float), 1, 255) / 255.0)
    return od @ demo_plan._H_VEC


# ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_pixels(tiny, tmp_path):
    again = generate(tmp_path / "b", TINY, progress=False).parent
    first, second = _files(tiny), _files(again)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs with the same seed"

    other = generate(tmp_path / "c", dataclasses.replace(TINY, seed=8), progress=False).parent
    for sample in plan(TINY):
        a = tifffile.imread(tiny / sample.path)
        b = tifffile.imread(other / sample.path)
        assert a.shape == b.shape and not np.array_equal(a, b), sample.sample_id


def test_samples_do_not_depend_on_how_many_are_asked_for(tiny, tmp_path):
    one = generate(tmp_path / "one", dataclasses.replace(TINY, slides=1, images=1), progress=False).parent
    for rel in ("slides/slide-00.tiff", "images/field-00.ome.tif", "annotations/slide-00.geojson"):
        assert (one / rel).read_bytes() == (tiny / rel).read_bytes(), rel


def test_plan_matches_what_generate_wrote(tiny):
    samples = plan(TINY)
    with open(tiny / "samples.csv", newline="") as fh:
        assert next(csv.reader(fh)) == COLUMNS
    rows = _rows(tiny)
    assert [dataclasses.asdict(s) for s in samples] == rows
    assert [s.sample_id for s in samples] == ["slide-00", "slide-01", "field-00", "field-01"]
    assert [s.label for s in samples] == ["positive", "negative", "positive", "negative"]
    assert [s.kind for s in samples] == ["slide", "slide", "image", "image"]
    assert [s.group for s in samples] == ["patient-00", "patient-01", "plate-00", "plate-01"]
    for s in samples:
        assert (tiny / s.path).is_file() and (tiny / s.annotations).is_file()
        assert not Path(s.path).is_absolute()
    assert not [p for p in tiny.rglob("*") if "partial" in p.name]


def test_plan_is_cheap_and_wide_ids():
    samples = plan(dataclasses.replace(DemoSettings(), slides=120, images=3))
    assert samples[0].sample_id == "slide-000" and samples[119].sample_id == "slide-119"
    assert samples[120].path == "images/field-00.ome.tif"
    labels = [s.label for s in samples if s.kind == "slide"]
    assert labels.count("positive") == labels.count("negative") == 60


def test_openslide_reads_every_slide(tiny):
    for sample in plan(TINY):
        if sample.kind != "slide":
            continue
        path = str(tiny / sample.path)
        assert openslide.OpenSlide.detect_format(path) == "generic-tiff"
        with openslide.OpenSlide(path) as slide:
            assert slide.level_count >= 3
            assert slide.dimensions == (TINY.slide_width, TINY.slide_height)
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(TINY.slide_mpp, rel=1e-6)
            assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(TINY.slide_mpp, rel=1e-6)
            assert slide.level_downsamples[1] == pytest.approx(2.0)

            # tissue fraction of the thumbnail
            thumb = np.asarray(slide.get_thumbnail((256, 256)).convert("RGB")).astype(int)
            tissue = thumb.min(axis=2) < 215
            assert 0.3 <= tissue.mean() <= 0.7

            # a level-1 read inside tissue is stained, with pink/purple (not YCbCr-garbled) colours
            scene, _ = demo._scene(TINY, sample)
            ys, xs = np.nonzero(scene.tissue > 0.99)
            k = len(ys) // 2
            x, y = int(xs[k]), int(ys[k])
            region = np.asarray(slide.read_region((x - 32, y - 32), 1, (32, 32)).convert("RGB")).astype(float)
            assert region.mean() < 225
            r, g, b = region.reshape(-1, 3).mean(0)
            assert g < r and g < b, "H&E tissue absorbs green most"

            # background is near-white glass
            bg = thumb[~tissue]
            assert bg.mean() > 235


def test_fields_are_two_channel_ome_tiff(tiny):
    for sample in plan(TINY):
        if sample.kind != "image":
            continue
        with tifffile.TiffFile(tiny / sample.path) as tif:
            assert tif.is_ome
            series = tif.series[0]
            data = series.asarray()
            assert data.shape == (2, TINY.image_size, TINY.image_size)
            assert data.dtype == np.uint16
            assert series.axes == "CYX"
            ome = tif.ome_metadata
        size_x = float(re.search(r'PhysicalSizeX="([^"]+)"', ome).group(1))
        size_y = float(re.search(r'PhysicalSizeY="([^"]+)"', ome).group(1))
        assert size_x == pytest.approx(TINY.image_mpp) and size_y == pytest.approx(TINY.image_mpp)
        assert 'Name="DNA"' in ome and 'Name="Marker"' in ome
        # dark background with a camera offset, bright nuclei, nothing saturated
        assert 80 <= np.median(data[1]) < 1000
        assert data[0].max() > 5 * np.median(data[0]) and data.max() < 65535


def test_annotations_are_qupath_geojson(tiny):
    seen: set[str] = set()
    for sample in plan(TINY):
        feats = _features(tiny, sample)
        if sample.label == "negative":
            assert feats == []
            continue
        assert feats
        width = TINY.slide_width if sample.kind == "slide" else TINY.image_size
        height = TINY.slide_height if sample.kind == "slide" else TINY.image_size
        for f in feats:
            assert set(f) == {"type", "id", "geometry", "properties"} and f["type"] == "Feature"
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", f["id"])
            assert f["id"] not in seen
            seen.add(f["id"])
            assert f["properties"] == {
                "objectType": "annotation",
                "classification": {"name": "Witness", "color": [220, 40, 40]},
            }
            assert f["geometry"]["type"] == "Polygon"
            (ring,) = f["geometry"]["coordinates"]
            ring = np.asarray(ring, float)
            assert 17 <= len(ring) <= 25 and np.array_equal(ring[0], ring[-1])
            assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= width).all()
            assert (ring[:, 1] >= 0).all() and (ring[:, 1] <= height).all()
            assert np.allclose(ring, np.round(ring, 2))
            area = 0.5 * abs(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[1:, 0], ring[:-1, 1]))
            mpp = TINY.slide_mpp if sample.kind == "slide" else TINY.image_mpp
            assert 10 < area * mpp**2 < 400, "a nucleus is some 10-400 µm²"


def test_witness_counts_follow_the_fraction(tiny):
    for sample in plan(TINY):
        scene, _ = demo._scene(TINY, sample)
        cells = scene.cells if sample.kind == "slide" else scene
        n_feats = len(_features(tiny, sample))
        assert n_feats == int(cells.witness.sum())
        if sample.label == "negative":
            assert n_feats == 0
            continue
        pool = int(cells.lesion.sum())  # lesion cells (slides), all cells (fields)
        expected = TINY.witness_fraction * pool
        assert n_feats > 0
        assert abs(n_feats - expected) <= max(2 * TINY.lesions, 0.35 * expected), (n_feats, pool)
        assert cells.witness.sum() < 0.5 * len(cells), "witnesses are a minority of all cells"
        if sample.kind == "slide":
            assert not (cells.witness & ~cells.lesion).any(), "slide witnesses sit in lesions"


def test_witness_nuclei_are_rendered_darker_or_brighter(tiny):
    for sample in plan(TINY):
        if sample.label != "positive":
            continue
        scene, _ = demo._scene(TINY, sample)
        cells = scene.cells if sample.kind == "slide" else scene
        if sample.kind == "slide":
            with openslide.OpenSlide(str(tiny / sample.path)) as slide:
                rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
            signal = _hematoxylin_od(rgb)
        else:
            signal = tifffile.imread(tiny / sample.path)[0].astype(float)
        shape = signal.shape
        witness = np.zeros(shape, bool)
        for f in _features(tiny, sample):
            witness |= _mask(shape, np.asarray(f["geometry"]["coordinates"][0]))
        ordinary = np.zeros(shape, bool)
        for i in np.flatnonzero(~cells.witness):
            ordinary |= _mask(shape, cells.outline(int(i)))
        ordinary &= ~witness
        assert witness.sum() > 50 and ordinary.sum() > 500
        w, o = signal[witness].mean(), signal[ordinary].mean()
        # subtle but real: denser hematoxylin (slides), brighter condensed DNA (fields)
        assert 1.1 * o < w < 2.0 * o, (sample.sample_id, w, o)


def test_witness_marker_ring_in_fields(tiny):
    sample = next(s for s in plan(TINY) if s.kind == "image" and s.label == "positive")
    cells = demo._scene(TINY, sample)[0]
    marker = tifffile.imread(tiny / sample.path)[1].astype(float) - 100.0
    shape = marker.shape

    def ring_mean(idx) -> float:
        """Mean marker between the nucleus outline and the same outline grown 1.6x."""
        vals = []
        for i in idx:
            ring = cells.outline(int(i))
            centre = np.array([cells.x[i], cells.y[i]])
            band = _mask(shape, centre + 1.6 * (ring - centre)) & ~_mask(shape, ring)
            vals.append(marker[band].mean())
        return float(np.mean(vals))

    inner = 6 / TINY.image_mpp
    ok = (cells.x > inner) & (cells.x < shape[1] - inner) & (cells.y > inner) & (cells.y < shape[0] - inner)
    w = ring_mean(np.flatnonzero(cells.witness & ok))
    o = ring_mean(np.flatnonzero(~cells.witness & ok))
    assert 1.2 * o < w < 3.0 * o, (w, o)


def test_interrupted_run_leaves_no_sheet(tmp_path, monkeypatch):
    calls = []
    real = demo._generate_one

    def flaky(out, settings, sample):
        calls.append(sample.sample_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(out, settings, sample)

    monkeypatch.setattr(demo, "_generate_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, dataclasses.replace(TINY, slides=1), progress=False)
    assert not (tmp_path / "samples.csv").exists()
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_quiet_without_progress(tmp_path, capsys):
    generate(tmp_path, dataclasses.replace(TINY, slides=0, images=1), progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize(
    "change",
    [
        {"slides": -1},
        {"images": 1.5},
        {"slides": 0, "images": 0},
        {"slide_width": 0},
        {"slide_height": 100},
        {"image_size": True},
        {"slide_mpp": 0.0},
        {"image_mpp": math.nan},
        {"cell_density": -5.0},
        {"witness_fraction": 0.0},
        {"witness_fraction": 1.5},
        {"lesions": 0},
        {"seed": -3},
    ],
)
def test_bad_settings_raise(change, tmp_path):
    bad = dataclasses.replace(DemoSettings(), **change)
    with pytest.raises(GaplessError) as err:
        plan(bad)
    assert err.value.path is None and err.value.fix
    assert next(iter(change)) in str(err.value) or "nothing to generate" in str(err.value)
    with pytest.raises(GaplessError):
        generate(tmp_path / "x", bad, progress=False)
    assert not (tmp_path / "x").exists()


def test_an_id_prefix_names_the_samples_and_groups_not_the_files(tmp_path):
    sheet = generate(tmp_path, DemoSettings(slides=1, images=1, slide_width=512, slide_height=384, image_size=128),
                     progress=False, id_prefix="w01-")
    with open(sheet, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["sample_id"] for r in rows] == ["w01-slide-00", "w01-field-00"]
    assert [r["group"] for r in rows] == ["w01-patient-00", "w01-plate-00"]
    assert all((tmp_path / r["path"]).is_file() and "w01" not in r["path"] for r in rows)
