"""A synthetic whole slide of real size (e.g. 50,000 × 40,000 px at 0.25 µm/px), written with bounded memory.

Rendering a demo slide costs memory in proportion to its area (a 12,288 × 9,216 demo slide holds a few
GB of float fields), so a 40×-sized slide is made another way: one demo slide of 3,072² px is rendered
at the requested µm/px and cut into 256-px blocks — blocks that are all tissue, and blocks that are all
glass — each in its eight flips and rotations. The big slide is a mosaic of those blocks: a
block-resolution tissue map (a few irregular fragments covering ~45 % of the slide, off its border)
picks a random tissue block where there is tissue and a random glass block elsewhere. Every pyramid
level is the same mosaic of the blocks box-downsampled by 2^k, so levels agree as a scanner's do, and
the TIFF is written tile by tile from that map: memory is the block bank (~60 MB) plus a few tiles,
whatever the slide's size. Pixels are H&E-like demo tissue (nuclei, stroma, glass), enough for a
tiler, a tissue mask, a heatmap and a viewer to do their real work; it is not a dataset (no lesions,
no labels).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from pipeline.demo.dataset import _TILE, DemoSettings, plan
from pipeline.files import atomic_write

BLOCK = _TILE  # mosaic block edge at level 0, px: one TIFF tile
_BANK_SIDE = 3072  # the rendered demo slide the blocks come from, px
_MAX_LEVEL = 8  # 2^8 = BLOCK: a block is one pixel at the coarsest level kept


def _bank(mpp: float, seed: int) -> tuple[np.ndarray, int]:
    """(blocks, tissue count): uint8 (n, BLOCK, BLOCK, 3), tissue blocks first, then glass; all 8 D4 variants."""
    from pipeline.demo import _scene
    from pipeline.demo.slides import _render_slide

    settings = DemoSettings(slides=1, images=0, slide_width=_BANK_SIDE, slide_height=_BANK_SIDE, slide_mpp=mpp,
                            seed=seed)
    scene, rng = _scene(settings, plan(settings)[0])
    rgb = _render_slide(settings, scene, rng)
    n = _BANK_SIDE // BLOCK
    cover = scene.tissue[: n * BLOCK, : n * BLOCK].reshape(n, BLOCK, n, BLOCK)
    low, high = cover.min(axis=(1, 3)), cover.max(axis=(1, 3))
    blocks = rgb[: n * BLOCK, : n * BLOCK].reshape(n, BLOCK, n, BLOCK, 3).transpose(0, 2, 1, 3, 4)
    tissue, glass = blocks[low > 0.5], blocks[high < 0.01]
    if not len(tissue) or not len(glass):
        raise RuntimeError(f"the {_BANK_SIDE}² demo render for seed {seed} has no all-tissue or no all-glass block")

    def d4(b: np.ndarray) -> list[np.ndarray]:
        return [np.rot90(v, r, axes=(1, 2)) for v in (b, b[:, :, ::-1]) for r in range(4)]

    bank = np.concatenate(d4(tissue) + d4(glass)).copy()
    return bank, 8 * len(tissue)


def _tissue_map(rows: int, cols: int, rng: np.random.Generator, coverage: float = 0.45) -> np.ndarray:
    """bool (rows, cols): a few distorted elliptical fragments with a noisy edge, kept off the border."""
    from pipeline.demo.cells import _smooth_noise
    from pipeline.demo.slides import tissue_fragments

    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    size = math.sqrt(rows * cols)
    field = tissue_fragments(xx, yy, cols, rows, rng, centre=(0.25, 0.75), major=(0.14, 0.24))
    field += 0.2 * _smooth_noise(rng, (rows, cols), max(1.0, 0.04 * size))
    margin = max(1.0, 0.06 * min(rows, cols))
    edge = np.minimum(np.minimum(xx + 0.5, cols - xx - 0.5), np.minimum(yy + 0.5, rows - yy - 0.5))
    field -= 2.0 * np.clip(1.0 - edge / margin, 0.0, 1.0)
    return field > np.quantile(field, 1.0 - coverage)


def level_count(width: int, height: int) -> int:
    """Levels 1, 1/2, 1/4, … while the next level's long side is at least two TIFF tiles (at least 3, at most 9)."""
    levels = 1
    while levels < 3 or (max(width, height) >> levels >= 2 * _TILE and levels <= _MAX_LEVEL):
        levels += 1
    return min(levels, _MAX_LEVEL + 1)


def _level_tiles(ids: np.ndarray, bank: np.ndarray, k: int, progress):
    """Level ``k``'s TIFF tiles, row by row: each the mosaic of its 2^k × 2^k blocks, box-downsampled."""
    from pipeline.opencv import cv2

    n = 1 << k
    b = BLOCK // n
    small = bank if k == 0 else np.stack([cv2.resize(x, (b, b), interpolation=cv2.INTER_AREA) for x in bank])
    rows, cols = math.ceil(ids.shape[0] / n), math.ceil(ids.shape[1] / n)
    padded = np.zeros((rows * n, cols * n), ids.dtype)  # past the slide's edge: glass, cropped by the TIFF
    padded[: ids.shape[0], : ids.shape[1]] = ids
    for r in range(rows):
        band = small[padded[r * n:(r + 1) * n]]  # (n, cols*n, b, b, 3)
        band = band.reshape(n, cols, n, b, b, 3).transpose(1, 0, 3, 2, 4, 5).reshape(cols, _TILE, _TILE, 3)
        yield from band
        progress(cols)


def write_big_slide(path: str | Path, width: int = 50_000, height: int = 40_000, mpp: float = 0.25, seed: int = 0,
                    quality: int = 90, progress: bool = True) -> Path:
    """Write a pyramidal tiled JPEG TIFF of ``width`` × ``height`` px at ``mpp`` µm/px (BigTIFF) that
    OpenSlide reads as a generic TIFF with its µm/px; returns ``path``. Same arguments, same pixels."""
    import tifffile
    from tqdm import tqdm

    path = Path(path)
    rng = np.random.default_rng([seed, width, height])
    bank, n_tissue = _bank(mpp, seed)
    rows, cols = math.ceil(height / BLOCK), math.ceil(width / BLOCK)
    tissue = _tissue_map(rows, cols, rng)
    ids = np.where(tissue, rng.integers(0, n_tissue, tissue.shape),
                   rng.integers(n_tissue, len(bank), tissue.shape)).astype(np.int32)
    levels = level_count(width, height)
    total = sum(math.ceil(math.ceil(height / 2**k) / _TILE) * math.ceil(math.ceil(width / 2**k) / _TILE)
                for k in range(levels))

    def write(tmp: Path) -> None:
        with tqdm(total=total, desc=f"slide {width}x{height}", unit="tile", disable=not progress, leave=False) as bar, \
                tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for k in range(levels):
                res = 1e4 / (mpp * 2**k)  # px per cm
                shape = (math.ceil(height / 2**k), math.ceil(width / 2**k), 3)
                tif.write(_level_tiles(ids, bank, k, bar.update), shape=shape, dtype=np.uint8, tile=(_TILE, _TILE),
                          photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                          resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if k else 0,
                          metadata=None, maxworkers=os.cpu_count(),
                          description=f"gapless synthetic slide; level {k}; {mpp} um/px at level 0")

    atomic_write(path, write)
    return path
