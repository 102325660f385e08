"""The tissue mask's fast paths (OpenCV, lookup tables) against their definitions written out pixelwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline.io import open_source
from pipeline.tiling.grid import tissue_fractions
from pipeline.tissue import PERCENTILE_PIXELS, _brightfield_mask, _fill_holes, read_overview, tissue_mask

CMU = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


def brightfield_by_definition(rgb: np.ndarray) -> np.ndarray:
    """Optical density above the white background's, or saturation: per pixel in floats, means by scipy."""
    x = rgb.astype(np.float32)
    sample = x.reshape(-1, 3)[:: -(-(x.size // 3) // PERCENTILE_PIXELS)]  # every k-th pixel, as the mask samples
    white = np.clip(np.percentile(sample, 99, axis=0), 200.0, 255.0)
    od = -np.log10(np.clip(x, 1.0, None) / white)
    od_max = ndimage.uniform_filter(od.max(axis=-1), size=3)
    saturation = ndimage.uniform_filter(x.max(axis=-1) - x.min(axis=-1), size=3)
    return (od_max > 0.06) | (saturation > 18.0)


def test_brightfield_mask_of_8_bit_rgb_is_the_pixelwise_mask():
    rng = np.random.default_rng(0)
    for i in range(60):
        h, w = rng.integers(3, 90, 2)
        rgb = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        if i % 3 == 0:  # pale: near the thresholds
            rgb = np.clip(rgb.astype(int) // 8 + 225, 0, 255).astype(np.uint8)
        if i % 4 == 0:
            rgb[rng.random((h, w)) < 0.5] = 255
        np.testing.assert_array_equal(_brightfield_mask(rgb), brightfield_by_definition(rgb))
    with open_source(CMU) as source:  # a real slide's overview
        overview, _ = read_overview(source, 4)
    expected = brightfield_by_definition(overview)
    assert 0.2 < expected.mean() < 0.9
    np.testing.assert_array_equal(_brightfield_mask(overview), expected)


def test_fill_holes_is_scipys():
    rng = np.random.default_rng(1)
    for shape, p in [((1, 1), 0.5), ((5, 7), 0.3), ((64, 48), 0.55), ((300, 200), 0.6), ((40, 40), 0.9)]:
        mask = rng.random(shape) < p
        np.testing.assert_array_equal(_fill_holes(mask.astype(np.uint8)), ndimage.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a hole
    assert _fill_holes(ring.astype(np.uint8))[4, 4]
    ring[4, 2] = False  # still a hole: 4-connected to the border only through the diagonal
    ring[4, 3] = False
    assert _fill_holes(ring.astype(np.uint8)).sum() == ndimage.binary_fill_holes(ring).sum()


@pytest.mark.parametrize("modality", ["brightfield", "fluorescence", "none"])
def test_tissue_mask_shape_and_type(modality):
    rgb = np.full((20, 30, 3), 255, np.uint8)
    rgb[5:15, 5:20] = (120, 60, 150)
    mask = tissue_mask(rgb, modality, px_size_um=8.0)
    assert mask.shape == (20, 30) and mask.dtype == bool
    if modality == "brightfield":
        assert mask[10, 10] and not mask[0, 0]


def test_tissue_fractions_are_the_mean_of_each_footprint():
    rng = np.random.default_rng(2)
    mask = rng.random((37, 51)) < 0.4
    ds, extent = (3.0, 3.0), 12.0
    coords = np.array([(x, y) for y in range(0, 37 * 3 - 11, 7) for x in range(0, 51 * 3 - 11, 5)])
    fractions = tissue_fractions(mask, ds, coords, extent)
    for (x, y), f in zip(coords, fractions):
        x0, y0 = round(x / 3), round(y / 3)
        x1, y1 = min(round((x + extent) / 3), 51), min(round((y + extent) / 3), 37)
        assert f == pytest.approx(mask[y0:y1, x0:x1].mean(), abs=1e-6)


def test_overview_pieces_start_on_level_pixels(tmp_path, monkeypatch):
    """A level whose downsample is not a whole number (3535 × 2828 px: level 2 is 884 × 707, downsample
    3.9994) is read in pieces that start on its pixels, so OpenSlide resamples none of them: the same
    pixels as the level read in one piece from its origin. Pieces of 300 px would start between pixels."""
    import pipeline.tissue as tissue
    from pipeline.demo.bigslide import write_big_slide
    from pipeline.tissue import _aligned_step

    assert _aligned_step(35355 / 4420, 2048) == 1768 and _aligned_step(8.0, 2048) == 2048
    assert _aligned_step(3.9970046591238297, 2048) == 2048  # no whole multiple up to 4096 px: as before
    slide = write_big_slide(tmp_path / "odd.tiff", 3535, 2828, progress=False)
    with open_source(slide) as source:
        level = 2
        downsample = source.level_downsamples[level]
        assert downsample != round(downsample) and _aligned_step(downsample, 300) == 1768
        whole = source.read_region((0, 0), level, source.level_dimensions[level])
        pieces, _ = read_overview(source, downsample, chunk=300)
        np.testing.assert_array_equal(pieces, whole)
        monkeypatch.setattr(tissue, "_aligned_step", lambda downsample, chunk: chunk)  # pieces of 300 px
        resampled, _ = read_overview(source, downsample, chunk=300)
    assert not np.array_equal(resampled, whole)
