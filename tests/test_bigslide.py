"""The real-size synthetic slide (bounded-memory generator) and `gapless bench slide` on a small one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.demo.bigslide import level_count, write_big_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_big_slide(tmp_path_factory.mktemp("big") / "s.tiff", 3000, 2000, mpp=0.25, progress=False)


def test_openslide_reads_it_with_its_levels_and_mpp(slide):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(slide)) as s:
        assert s.dimensions == (3000, 2000)
        assert s.level_dimensions == ((3000, 2000), (1500, 1000), (750, 500))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        thumb = np.asarray(s.get_thumbnail((300, 200)).convert("RGB")).astype(float)
        # tissue (pink/purple, darker) and glass (near white) both present
        dark = thumb.mean(axis=2) < 215
        assert 0.15 < dark.mean() < 0.8
        # a level is its finer level box-downsampled (JPEG noise aside)
        fine = np.asarray(s.read_region((1024, 512), 0, (512, 512)).convert("RGB")).astype(np.float32)
        coarse = np.asarray(s.read_region((1024, 512), 1, (256, 256)).convert("RGB")).astype(np.float32)
    import cv2

    assert np.abs(cv2.resize(fine, (256, 256), interpolation=cv2.INTER_AREA) - coarse).mean() < 6


def test_same_arguments_same_pixels_and_levels_stop_at_a_tile(slide, tmp_path):
    import tifffile

    again = write_big_slide(tmp_path / "t.tiff", 3000, 2000, mpp=0.25, progress=False)
    with tifffile.TiffFile(slide) as a, tifffile.TiffFile(again) as b:
        assert np.array_equal(a.series[0].levels[0].asarray(), b.series[0].levels[0].asarray())
    assert level_count(50_000, 40_000) == 7  # the last, 2^6 down, is 781 px: the next would be under two 256-px tiles
    assert level_count(1000, 800) == 3


def test_bench_slide_measures_every_step(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "bench", "slide", "--sizes", "2048x1536", "--tile-size",
                           "128", "--view-requests", "5", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for what in ("tiling, 1 worker(s):", "tiling, 2 worker(s):", "heatmap (resnet10t/gap", "pyramid capped at 1.0",
                 "view: 5 random full-resolution tiles", "largest peak memory of any step"):
        assert what in out, out
    assert (tmp_path / "synthetic-2048x1536.tiff").is_file()
    assert (tmp_path / "heatmap-2048x1536" / "tiles-2048x1536.json").is_file()
