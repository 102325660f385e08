"""Tiling of the real fixtures: geometry, pixels, tissue, labels, stores, and every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from pipeline.errors import GaplessError
from pipeline.io import composite_on_white, infer_kind, open_source
from pipeline.store import SCHEMA, store_info
from pipeline.tiling import TileSettings, tile_source

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"
BOXES = DATA / "boxes.tiff"


def gapless(*args, check=False, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-q", *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def slide_pixels(path, coords, level, size):
    with openslide.OpenSlide(str(path)) as s:
        return composite_on_white(np.asarray(s.read_region((int(coords[0]), int(coords[1])), level, (size, size))))


def test_aperio_tiles_are_the_slides_pixels(tmp_path):
    out = tmp_path / "cmu.zarr"
    result = tile_source(CMU, out, TileSettings(mpp=0.5, tile_size=224, codec="lossless"), progress=False)
    root = zarr.open_group(out, mode="r")
    a = root.attrs
    assert a["schema"] == SCHEMA and a["format"] == "aperio" and a["kind"] == "slide"
    assert a["mpp"] == pytest.approx(0.499) and a["mpp_source"] == "metadata" and a["level"] == 0
    assert a["modality"] == "brightfield"
    tiles, coords = root["tiles"], root["coords"][:]
    assert tiles.shape == (result.n_tiles, 224, 224, 3) and tiles.dtype == np.uint8
    assert tiles.chunks == (1, 224, 224, 3) and tiles.shards[0] > 1
    assert coords.dtype == np.int64 and coords.shape == (result.n_tiles, 2)
    # tissue only: CMU's region has white margins, so some grid positions must be dropped
    assert 20 < result.n_tiles < a["grid"][0] * a["grid"][1]
    assert (root["tissue"][:] >= 0.25).all()
    assert (root["labels"][:] == -1).all()
    # the thumbnail (heatmap background) is 1024 px on the long side; the mask ~16 px per tile
    assert root["thumbnail"].shape == (1024, round(2220 / 2967 * 1024), 3)
    assert root["tissue_mask"].shape[0] == round(2967 / (224 / 16))
    for i in (0, result.n_tiles // 2, result.n_tiles - 1):
        np.testing.assert_array_equal(tiles[i], slide_pixels(CMU, coords[i], 0, 224))
    stats = a["channel_stats"]
    flat = tiles[:, ::8, ::8].reshape(-1, 3).astype(np.float64)  # statistics come from every 8th pixel
    np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-4)
    np.testing.assert_allclose(stats["std"], flat.std(0), rtol=1e-3)


@pytest.mark.parametrize("mpp, level", [(2.0, 1), (4.0, 2)])
def test_tiles_at_a_pyramid_level_match_that_level(tmp_path, mpp, level):
    """boxes.tiff has 4 levels (downsamples 1, 2, 4.016, 8.09): tiles come from the level itself."""
    out = tmp_path / "boxes.zarr"
    tile_source(BOXES, out, TileSettings(mpp=mpp, tile_size=16, slide_mpp=1.0, min_tissue=0.0, codec="lossless"),
                progress=False)
    root = zarr.open_group(out, mode="r")
    assert root.attrs["level"] == level and root.attrs["read_size"] == 16
    assert root.attrs["mpp_source"] == "override"
    with openslide.OpenSlide(str(BOXES)) as s:
        assert root.attrs["downsample"] == pytest.approx(s.level_downsamples[level])
    coords = root["coords"][:]
    assert len(coords) > 4
    for i in range(len(coords)):
        np.testing.assert_array_equal(root["tiles"][i], slide_pixels(BOXES, coords[i], level, 16))
    # the grid steps in level-0 px by stride × downsample and stays inside the slide
    extent = root.attrs["tile_extent"]
    assert coords[:, 0].max() + extent <= 300 + 0.5 and coords[:, 1].max() + extent <= 250 + 0.5


def test_resampled_tiles_have_the_target_scale(tmp_path):
    out = tmp_path / "cmu.zarr"
    tile_source(CMU, out, TileSettings(mpp=1.0, tile_size=96, stride=48), progress=False)
    a = zarr.open_group(out, mode="r").attrs
    assert a["level"] == 0 and a["read_size"] == round(96 * 1.0 / 0.499)
    assert a["mpp"] == pytest.approx(1.0, rel=0.01)
    assert a["tile_extent"] == a["read_size"] and a["tile_step"] == pytest.approx(a["read_size"] / 2)
    tile = zarr.open_group(out, mode="r")["tiles"][0]
    coords = zarr.open_group(out, mode="r")["coords"][0]
    region = slide_pixels(CMU, coords, 0, a["read_size"]).astype(np.float32)
    # a shrunken tile keeps the region's colour on average
    assert np.abs(tile.astype(np.float32).mean((0, 1)) - region.mean((0, 1))).max() < 3


def test_parallel_workers_write_the_same_store(tmp_path, monkeypatch):
    from pipeline.tiling import cutting as tiling  # where the cutting processes look them up

    monkeypatch.setattr(tiling, "MIN_TILES_PER_WORKER", 64)  # CMU is small: let two processes share it
    settings = TileSettings(mpp=1.0, tile_size=64, min_tissue=0.1)
    one = tile_source(CMU, tmp_path / "one.zarr", settings, workers=1, progress=False)
    two = tile_source(CMU, tmp_path / "two.zarr", settings, workers=2, progress=False)
    assert one.n_tiles == two.n_tiles > 128 and two.attrs["workers"] == 2
    a, b = zarr.open_group(one.out, mode="r"), zarr.open_group(two.out, mode="r")
    np.testing.assert_array_equal(a["tiles"][:], b["tiles"][:])
    np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
    assert a.attrs["channel_stats"] == b.attrs["channel_stats"]


def test_fast_tile_writer_matches_zarrs_default_writer(tmp_path, monkeypatch):
    """Tiles are written through zarrs (when installed), every chunk stored; zarr's default pipeline reads
    them back exactly as its own writer would have stored them, all-zero tiles included."""
    from pipeline.tiling import cutting as tiling  # where the cutting processes look them up

    rng = np.random.default_rng(1)
    data = rng.integers(0, 60000, size=(2, 96, 160)).astype(np.uint16)
    data[:, :, :64] = 0  # whole tiles equal to the fill value
    path = tmp_path / "half.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    settings = TileSettings(mpp=0.5, tile_size=16, min_tissue=0.0, tissue="none")
    config_before = zarr.config.get("codec_pipeline.path"), zarr.config.get("array.write_empty_chunks")
    fast = tile_source(path, tmp_path / "fast.zarr", settings, progress=False)
    assert (zarr.config.get("codec_pipeline.path"), zarr.config.get("array.write_empty_chunks")) == config_before
    monkeypatch.setattr(tiling, "tile_write_config", lambda: {})  # zarr's defaults for the writer too
    plain = tile_source(path, tmp_path / "plain.zarr", settings, progress=False)

    a, b = zarr.open_array(fast.out / "tiles", mode="r"), zarr.open_array(plain.out / "tiles", mode="r")
    assert a.metadata == b.metadata and a.shards == b.shards and a.shards[0] > 1
    tiles, coords = a[:], zarr.open_array(fast.out / "coords", mode="r")[:]
    np.testing.assert_array_equal(tiles, b[:])
    assert (tiles.reshape(len(tiles), -1) == 0).all(1).sum() == 6 * 4  # the zero columns: 4 tiles × 6 rows
    for i in range(len(tiles)):
        x, y = coords[i]
        np.testing.assert_array_equal(np.moveaxis(tiles[i], -1, 0), data[:, y : y + 16, x : x + 16])


def test_a_failure_in_one_process_stops_the_others_and_leaves_nothing(tmp_path, monkeypatch):
    from pipeline.tiling import cutting as tiling  # where the cutting processes look them up

    monkeypatch.setattr(tiling, "MIN_TILES_PER_WORKER", 64)
    calls = {"n": 0}
    real = tiling.resize

    def failing(*a, **kw):  # patched here only: this process cuts shards alongside a spawned helper
        calls["n"] += 1
        if calls["n"] == 100:
            raise GaplessError(CMU, "simulated read failure")
        return real(*a, **kw)

    monkeypatch.setattr(tiling, "resize", failing)
    with pytest.raises(GaplessError, match="simulated"):
        tile_source(CMU, tmp_path / "c.zarr", TileSettings(mpp=1.0, tile_size=32, min_tissue=0.0), workers=2, progress=False)
    assert calls["n"] == 100 and list(tmp_path.iterdir()) == []


def test_small_jobs_do_not_start_more_processes_than_they_pay_for():
    from pipeline.tiling import MIN_TILES_PER_WORKER, effective_workers

    assert effective_workers(8, 100) == 1
    assert effective_workers(8, 10 * MIN_TILES_PER_WORKER) == min(8, os.cpu_count())
    assert effective_workers(1, 10**6) == 1


def test_cell_images_keep_channels_and_bit_depth(tmp_path):
    dsb = tile_source(DATA / "dsb2018-nuclei.tif", tmp_path / "dsb.zarr",
                      TileSettings(mpp=0.5, tile_size=64, slide_mpp=0.5, min_tissue=0.1), progress=False)
    root = zarr.open_group(dsb.out, mode="r")
    assert root["tiles"].dtype == np.uint16 and root["tiles"].shape[1:] == (64, 64, 1)
    assert root.attrs["kind"] == "image" and root.attrs["modality"] == "fluorescence"
    src = tifffile.imread(DATA / "dsb2018-nuclei.tif")
    x, y = root["coords"][3]
    np.testing.assert_array_equal(root["tiles"][3][..., 0], src[y : y + 64, x : x + 64])

    he = tile_source(DATA / "he-target.png", tmp_path / "he.zarr", TileSettings(mpp=0.5, tile_size=128, slide_mpp=0.25), progress=False)
    a = zarr.open_group(he.out, mode="r").attrs
    assert a["modality"] == "brightfield" and a["format"] == "png" and a["read_size"] == 256
    assert he.n_tiles >= 9  # a field full of tissue keeps (almost) every tile


def test_multichannel_16bit_ome_tiff(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.integers(100, 200, size=(2, 256, 320))).astype(np.uint16)
    yy, xx = np.mgrid[:256, :320]
    for cx, cy in rng.integers(20, 230, size=(40, 2)):
        blob = ((xx - cx - 40) ** 2 + (yy - cy) ** 2) < 64
        data[0][blob] += 3000
        data[1][blob] += 800
    path = tmp_path / "field.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65,
                                                      "Channel": {"Name": ["DNA", "Marker"]}})
    assert infer_kind(path) == "image"
    result = tile_source(path, tmp_path / "f.zarr", TileSettings(mpp=0.65, tile_size=32, min_tissue=0.0), progress=False)
    root = zarr.open_group(result.out, mode="r")
    assert root["tiles"].shape[1:] == (32, 32, 2) and root["tiles"].dtype == np.uint16
    assert root.attrs["source_mpp"] == pytest.approx(0.65) and root.attrs["format"] == "ome-tiff"
    assert root.attrs["channel_names"] == ["DNA", "Marker"]
    x, y = root["coords"][5]
    np.testing.assert_array_equal(np.moveaxis(root["tiles"][5], -1, 0), data[:, y : y + 32, x : x + 32])
    assert root.attrs["channel_stats"]["max"][0] > 3000


def test_tile_labels_from_annotations(tmp_path):
    # a positive polygon around (1000, 1500) and a point at (300, 2500); one 'Other' object elsewhere
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[990, 1490], [1010, 1490], [1010, 1510], [990, 1510], [990, 1490]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Witness", "color": [255, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [700, 2300]},
         "properties": {"classification": {"name": "Witness"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1500, 500], [1600, 500], [1600, 600], [1500, 500]]]},
         "properties": {"classification": {"name": "Other"}}},
    ]
    geo = tmp_path / "a.geojson"
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    settings = TileSettings(mpp=0.5, tile_size=224, min_tissue=0.0, annotations=str(geo), positive_classes=("Witness",))
    root = zarr.open_group(tile_source(CMU, tmp_path / "l.zarr", settings, progress=False).out, mode="r")
    coords, labels = root["coords"][:], root["labels"][:]
    ext = root.attrs["tile_extent"]

    def touches(x0, y0, x1, y1):
        return (coords[:, 0] <= x1) & (coords[:, 0] + ext >= x0) & (coords[:, 1] <= y1) & (coords[:, 1] + ext >= y0)

    expected = (touches(990, 1490, 1010, 1510) | touches(700, 2300, 700, 2300)).astype(np.int8)
    np.testing.assert_array_equal(labels, expected)
    assert 1 <= labels.sum() <= 6 and root.attrs["n_positive"] == labels.sum()


@pytest.mark.parametrize(
    "path, extra, words",
    [
        (BOXES, [], ["no µm/px", "72 dpi", "--slide-mpp", "`mpp`"]),
        (DATA / "he-target.png", [], ["no µm/px", "--slide-mpp"]),
        (DATA / "unopenable.tiff", [], ["unopenable.tiff", "OpenSlide cannot open", "convert"]),
        (DATA / "unreadable.svs", ["--tile-size", "8"], ["unreadable.svs", "cannot read pixels", "Bogus marker"]),
        (DATA / "small.svs", [], ["smaller than one tile", "--tile-size"]),
        (DATA / "SOURCES.md", [], ["SOURCES.md", "not an image"]),
        (DATA / "missing.svs", [], ["missing.svs", "file not found"]),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, path, extra, words):
    out = tmp_path / "new" / "out.zarr"  # not even its folder may be left behind
    proc = gapless("tile", path, "--out", out, *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_mpp_override_tiles_what_metadata_cannot(tmp_path):
    out = tmp_path / "b.zarr"
    proc = gapless("tile", BOXES, "--out", out, "--slide-mpp", "1.0", "--mpp", "2", "--tile-size", "32", check=True)
    assert "tiles of 32 px" in proc.stdout and "tiles/s" in proc.stdout
    info = json.loads(gapless("info", out, check=True).stdout)
    assert info["mpp_source"] == "override" and info["source_mpp"] == 1.0 and info["n"] == info["n_tiles"] > 0


def test_no_tissue_is_an_error_or_a_flag(tmp_path):
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((300, 300, 3), 247, np.uint8)).save(blank)
    out = tmp_path / "blank.zarr"
    proc = gapless("tile", blank, "--out", out, "--slide-mpp", "0.5", "--tile-size", "64")
    assert proc.returncode == 2 and "no tissue found" in proc.stderr and "--min-tissue" in proc.stderr
    assert not out.exists()
    proc = gapless("tile", blank, "--out", out, "--slide-mpp", "0.5", "--tile-size", "64", "--allow-empty", check=True)
    info = json.loads(gapless("info", out, check=True).stdout)
    assert info["n"] == 0 and info["qc_flag"] == "no tissue"
    proc = gapless("qc", out, "--out", tmp_path / "qc.tsv", check=True)
    row = (tmp_path / "qc.tsv").read_text().splitlines()[1].split("\t")
    assert "no tissue" in row


def test_existing_store_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "s.zarr"
    args = ("tile", DATA / "dsb2018-nuclei.tif", "--out", out, "--slide-mpp", "0.5", "--tile-size", "64")
    gapless(*args, check=True)
    proc = gapless(*args)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    gapless(*args, "--overwrite", "--mpp", "1.0", check=True)
    assert store_info(out)["mpp"] == pytest.approx(1.0)


def test_failure_mid_run_leaves_nothing(tmp_path, monkeypatch):
    from pipeline.tiling import cutting as tiling  # where the cutting processes look them up

    calls = {"n": 0}
    real = tiling.resize

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 200:  # well after the first shards were written
            raise GaplessError(CMU, "simulated read failure")
        return real(*a, **kw)

    monkeypatch.setattr(tiling, "resize", failing)
    out = tmp_path / "c.zarr"
    with pytest.raises(GaplessError, match="simulated"):
        tile_source(CMU, out, TileSettings(mpp=1.0, tile_size=32, min_tissue=0.0), progress=False)
    assert calls["n"] == 200 and list(tmp_path.iterdir()) == []


def test_killed_run_leaves_no_store_and_a_rerun_completes(tmp_path):
    out = tmp_path / "k.zarr"
    partial = tmp_path / "k.zarr.partial"
    args = ["tile", CMU, "--out", out, "--mpp", "0.5", "--tile-size", "32", "--stride", "8", "--min-tissue", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", *map(str, args)], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (partial / "tiles").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = gapless(*args[:-6], "--mpp", "1.0", "--tile-size", "64", "--min-tissue", "0", check=True)
    assert out.exists() and not partial.exists() and "tiles" in done.stdout


def test_qc_table_and_info(tmp_path):
    s1 = tile_source(CMU, tmp_path / "cmu.zarr", TileSettings(mpp=1.0, tile_size=96), progress=False)
    s2 = tile_source(DATA / "ExampleHuman-D03f00d0.tif", tmp_path / "eh.zarr",
                     TileSettings(mpp=0.5, tile_size=64, slide_mpp=0.5), progress=False)
    gapless("qc", s1.out, s2.out, "--out", tmp_path / "qc.tsv", check=True)
    lines = (tmp_path / "qc.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert [r["sample"] for r in rows] == ["cmu", "eh"]
    assert rows[0]["format"] == "aperio" and rows[0]["mpp_source"] == "metadata" and int(rows[0]["tiles"]) == s1.n_tiles
    assert rows[1]["modality"] == "fluorescence" and rows[1]["mpp_source"] == "override"
    assert float(rows[0]["seconds"]) > 0 and 0 < float(rows[0]["tissue_area_fraction"]) < 1
    proc = gapless("info", tmp_path / "nothing.zarr")
    assert proc.returncode == 2 and "no such tile store" in proc.stderr


def test_bench_tiling_reports_ratio():
    # 32-px tiles at 0.5 µm/px: CMU gives > 1024 tiles, enough for two worker processes
    proc = gapless("bench", "tiling", CMU, "--tile-size", "32", "--workers", "2", check=True)
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if "bare tiles/s" in line)
    assert "tiler/bare" in lines[header]
    rows = [line.split() for line in lines[header + 1 :]]
    assert [r[0] for r in rows] == (["1", "2"] if os.cpu_count() >= 2 else ["1"])
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_open_source_reads_every_format_through_one_interface():
    for path, kind, channels in [(CMU, "slide", 3), (BOXES, "slide", 3), (DATA / "he-target.png", "image", 3),
                                 (DATA / "dsb2018-nuclei.tif", "image", 1), (DATA / "ExampleHuman-D03f00d0.tif", "image", 1)]:
        with open_source(path) as src:
            assert src.kind == kind and src.channels == channels
            region = src.read_region((5, 7), 0, (11, 13))
            assert region.shape == (13, 11, channels) and region.dtype == src.dtype


def test_a_folder_without_a_dicom_slide_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slide")
    proc = gapless("tile", tmp_path, "--out", tmp_path / "x.zarr")
    assert proc.returncode == 2 and "no DICOM" in proc.stderr and not (tmp_path / "x.zarr").exists()
