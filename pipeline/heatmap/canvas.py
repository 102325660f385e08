"""The canvas: each tile's map placed at the tile's place on a grid over the whole slide.

Geometry. A head's map is h×w (the backbone's grid, square for square tiles) over a tile whose side
is ``tile_extent`` level-0 px, so one map cell covers ``cell = tile_extent / h`` level-0 px. The
canvas is ``rows × cols = ⌈height / cell⌉ × ⌈width / cell⌉`` cells; canvas cell (i, j) covers
level-0 ``[j·cell, (j+1)·cell) × [i·cell, (i+1)·cell)`` (x, y). A tile at level-0 (x, y) lies at
``(x / cell, y / cell)`` canvas cells, generally not a whole number (``tile_step`` need not be a
multiple of the cell, and coordinates are rounded to whole level-0 px): each map cell is spread over
the 2×2 canvas cells it overlaps, weighted by the overlapping area (bilinear splatting, the exact
area-weighted resampling of a piecewise-constant map; when aligned it is plain placement). Canvas
value = Σ area·value / Σ area over all tiles, so overlapping tiles average. A cell keeps a value
only where tile maps cover at least half of it (``MIN_COVERAGE``) and the store's tissue mask covers
at least half of it (``MIN_CELL_TISSUE``); every other cell is NaN, never 0.

Memory bound. Peak memory is at most ``BYTES_PER_CELL`` = 48 bytes per canvas cell
+ ``BYTES_PER_TILE`` = 256 bytes per tile (coordinates, probabilities, the JSON's tile list)
+ ``FIXED_BYTES`` = 128 MiB, whatever the slide's pixel count. Per cell: stitching holds C + 1
float32 accumulators of (rows + 1) × (cols + 1) (C = 2 or 3 map channels + the covered area:
≤ 16 B), then C float32 maps and a tissue flag (≤ 13 B); normalising, scoring and writing work on
those per channel or in blocks of rows (≤ ~16 B more). Fixed: one batch of tiles and maps, the
thumbnail (≤ 1024 px), the tissue mask (uint8, ≤ 4096 px a side) and the figure (drawn at
``PNG_WIDTH_PX`` px from the map halved to at most that size; matplotlib's buffers are most of the
128 MiB). A 100,000 × 100,000 px slide at 0.25 µm/px tiled at 224 px, 0.5 µm/px (extent 448 px,
7×7 maps, cell 64 px) has 1,563 × 1,563 cells: ≤ 117 MB + 128 MiB, where one float32 channel at
full resolution would be 40 GB. Tested with tracemalloc (numpy and Python allocations; torch holds
one batch) on a store claiming that size and on a dense map of that size. No full-resolution array
is ever allocated. With Grad-CAM (``gradcam=True``) two more channels are stitched (its raw map
and its spread), and normalising and writing handle its map beside the head's:
``GRADCAM_BYTES_PER_CELL`` = 24 bytes more per cell (two accumulators, two maps, the normalised map,
a temporary), tested likewise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.heatmap.maps import sample_view, tile_batches

log = logging.getLogger("gapless.heatmap")

MIN_COVERAGE = 0.5  # a cell keeps a value where tile maps cover at least this fraction of it
MIN_CELL_TISSUE = 0.5  # ... and the store's tissue mask covers at least this fraction of it
BYTES_PER_CELL = 48  # stated peak memory per canvas cell (accumulators, outputs, temporaries)
BYTES_PER_TILE = 256  # ... plus this per tile
FIXED_BYTES = 128 * 2**20  # ... plus this, whatever the canvas (a batch, the thumbnail, the figure)
GRADCAM_BYTES_PER_CELL = 24  # ... plus this per canvas cell with the Grad-CAM map too


def canvas_shape(width: float, height: float, tile_extent: float, map_side: int) -> tuple[int, int, float]:
    """``(rows, cols, cell)``: the canvas over a width × height (level-0 px) slide for h×h maps of
    tiles ``tile_extent`` level-0 px wide; ``cell = tile_extent / map_side`` level-0 px."""
    if not (tile_extent > 0 and map_side >= 1):
        raise ValueError(f"tile_extent {tile_extent} and map side {map_side} must be positive")
    cell = float(tile_extent) / int(map_side)
    return max(1, math.ceil(height / cell - 1e-9)), max(1, math.ceil(width / cell - 1e-9)), cell


class SlideCanvas:
    """Accumulates tile maps on the canvas (see the module docstring: geometry and memory bound).

    ``add(coords, maps)`` takes (B, 2) level-0 top-left corners and (B, C, h, h) maps and splats
    each map cell onto the canvas cells it overlaps, weighted by area; ``mean()`` gives (C, rows,
    cols) float32, NaN where tile maps cover less than ``min_coverage`` of a cell.
    """

    def __init__(self, width: float, height: float, tile_extent: float, map_side: int, channels: int):
        self.rows, self.cols, self.cell = canvas_shape(width, height, tile_extent, map_side)
        self.map_side, self.channels = int(map_side), int(channels)
        # one spare row and column: a map cell spreads into the next canvas cell when not aligned.
        # float32: a cell sums (extent/step)² tiles at most, far from float32's 7 significant digits.
        self.sums = np.zeros((self.channels, self.rows + 1, self.cols + 1), np.float32)
        self.area = np.zeros((self.rows + 1, self.cols + 1), np.float32)

    def add(self, coords: np.ndarray, maps: np.ndarray) -> None:
        coords, maps = np.asarray(coords), np.asarray(maps)
        h = self.map_side
        if maps.ndim != 4 or maps.shape[1] != self.channels or maps.shape[2:] != (h, h):
            raise ValueError(f"maps of shape {maps.shape}, expected (B, {self.channels}, {h}, {h})")
        pos = np.asarray(coords, np.float64) / self.cell  # (B, 2) canvas position of each tile's corner, (x, y)
        base = np.floor(pos + 1e-6)
        frac = np.clip(pos - base, 0.0, 1.0)
        frac[frac < 1e-6] = 0.0
        base = base.astype(np.int64)
        for (c0, r0), (fx, fy), values in zip(base, frac, maps):
            if r0 < 0 or c0 < 0 or r0 + h + (fy > 0) > self.rows + 1 or c0 + h + (fx > 0) > self.cols + 1:
                raise ValueError(f"a tile at canvas cell ({r0}, {c0}) lies outside the {self.rows}×{self.cols} canvas")
            for dr, wy in ((0, 1.0 - fy), (1, fy)):
                if wy == 0.0:
                    continue
                for dc, wx in ((0, 1.0 - fx), (1, fx)):
                    if wx == 0.0:
                        continue
                    w = wy * wx
                    self.sums[:, r0 + dr : r0 + dr + h, c0 + dc : c0 + dc + h] += w * values
                    self.area[r0 + dr : r0 + dr + h, c0 + dc : c0 + dc + h] += w

    def coverage(self) -> np.ndarray:
        """(rows, cols) summed covered area in cell units (overlapping tiles add up)."""
        return self.area[: self.rows, : self.cols]

    def mean(self, channel: int | None = None, min_coverage: float = MIN_COVERAGE) -> np.ndarray:
        """Mean map(s): (C, rows, cols), or (rows, cols) for one ``channel``; float32, NaN where uncovered."""
        area = self.coverage()
        keep = area >= min_coverage
        channels = range(self.channels) if channel is None else [channel]
        out = np.full((len(channels), self.rows, self.cols), np.nan, np.float32)
        for i, c in enumerate(channels):
            np.divide(self.sums[c, : self.rows, : self.cols], area, out=out[i], where=keep)
        return out if channel is None else out[0]


def stitch(coords: np.ndarray, maps: np.ndarray, width: float, height: float, tile_extent: float,
           min_coverage: float = MIN_COVERAGE) -> tuple[np.ndarray, float]:
    """One-shot stitching: ``(C, rows, cols)`` float32 (NaN where uncovered) and the cell size (level-0 px)."""
    maps = np.asarray(maps)
    canvas = SlideCanvas(width, height, tile_extent, maps.shape[-1], maps.shape[1])
    canvas.add(coords, maps)
    return canvas.mean(min_coverage=min_coverage), canvas.cell


def _overlap_matrix(n_out: int, cell: float, n_in: int, step: float):
    """Sparse (n_out × n_in): fraction of output cell i ([i·cell, (i+1)·cell)) covered by input px m
    ([m·step, (m+1)·step)). Rows sum to 1 inside the image, less for a cell past its edge."""
    from scipy import sparse

    a = np.arange(n_out) * cell
    b = a + cell
    lo = np.clip(np.floor(a / step).astype(np.int64), 0, n_in)
    hi = np.clip(np.ceil(b / step).astype(np.int64), 0, n_in)
    counts = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(n_out), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.repeat(lo, counts) + offsets
    overlap = np.minimum(np.repeat(b, counts), (cols + 1) * step) - np.maximum(np.repeat(a, counts), cols * step)
    return sparse.csr_matrix((np.clip(overlap / cell, 0, 1).astype(np.float32), (rows, cols)), shape=(n_out, n_in))


def cell_tissue_fraction(mask: np.ndarray, mask_downsample: Sequence[float], rows: int, cols: int,
                         cell: float, block: int = 256) -> np.ndarray:
    """(rows, cols) float32: the fraction of each canvas cell the tissue mask covers (exact areas).

    Works in blocks of ``block`` canvas rows, each on the mask rows it covers: memory O(mask + canvas)
    with the mask as it is stored (uint8).
    """
    mask = np.asarray(mask)
    dx, dy = float(mask_downsample[0]), float(mask_downsample[1])
    ry = _overlap_matrix(rows, cell, mask.shape[0], dy)  # canvas rows × mask rows
    rx = _overlap_matrix(cols, cell, mask.shape[1], dx)  # canvas columns × mask columns
    out = np.zeros((rows, cols), np.float32)
    for r in range(0, rows, block):
        part = ry[r : r + block]
        used = np.flatnonzero(part.getnnz(axis=0))
        if used.size == 0:  # canvas rows past the image
            continue
        lo, hi = int(used[0]), int(used[-1]) + 1
        covered = part[:, lo:hi] @ mask[lo:hi].astype(np.float32)  # block × mask columns
        out[r : r + block] = (rx @ covered.T).T
    return out


@dataclass
class StitchedMaps:
    """One head's maps of one sample on the canvas; NaN outside ``valid`` (tissue cells covered by tiles)."""

    raw: np.ndarray  # (rows, cols) positive-class contribution
    spread: np.ndarray  # (rows, cols) p_positive spread by the head's weights
    attention: np.ndarray | None  # (rows, cols) the head's attention map, or None
    valid: np.ndarray  # (rows, cols) bool
    cell: float  # level-0 px per canvas cell
    coords: np.ndarray  # (N, 2) int64
    probs: np.ndarray  # (N, K) float32
    spread_weights: str
    width: int
    height: int
    tile_extent: float
    source_mpp: float | None
    map_side: int
    gradcam: np.ndarray | None = None  # (rows, cols) positive-class Grad-CAM, or None when not computed
    gradcam_spread: np.ndarray | None = None  # (rows, cols) p_positive spread by the Grad-CAM map, or None


def stitch_store(model, config: Mapping, store, batch_size: int = 64, device=None, progress: bool = True,
                 gradcam: bool = False) -> StitchedMaps:
    """Streamed inference over ``store`` into a ``SlideCanvas`` (one batch in memory at a time), then the
    tissue cells: covered by tile maps and by the store's tissue mask (module docstring). ``gradcam``:
    the tiles' Grad-CAM maps are stitched too (:mod:`pipeline.heatmap.gradcam`)."""
    view = sample_view(store)
    a = view.attrs
    width, height, extent = int(a.width), int(a.height), float(a.tile_extent)
    canvas = None
    coords, probs = [], []
    for batch in tile_batches(model, config, view, batch_size, device, progress, gradcam):
        named = {"raw": batch.contribution[:, -1:], "spread": batch.spread, "attention": batch.attention,
                 "gradcam": batch.gradcam, "gradcam_spread": batch.gradcam_spread}
        named = {k: v for k, v in named.items() if v is not None}
        if canvas is None:
            names = list(named)
            canvas = SlideCanvas(width, height, extent, batch.contribution.shape[-1], len(names))
        canvas.add(batch.coords, np.concatenate([named[k] for k in names], axis=1))
        coords.append(batch.coords)
        probs.append(batch.probs)
    return canvas_maps(canvas, names, view, np.concatenate(coords), np.concatenate(probs), batch.spread_weights)


def canvas_maps(canvas: SlideCanvas, names: Sequence[str], view, coords: np.ndarray, probs: np.ndarray,
                spread_weights: str) -> StitchedMaps:
    """``StitchedMaps`` of a filled canvas whose channels are ``names`` (``raw`` and ``spread`` at least;
    ``attention``, ``gradcam``, ``gradcam_spread`` where present): NaN outside the tissue cells, which
    are the cells covered by tile maps and by the store's tissue mask (``view``: the sample's
    :func:`pipeline.heatmap.maps.sample_view`). Shared by the tile-level maps and the slide level's."""
    a = view.attrs
    width, height = int(a.width), int(a.height)
    if not len(coords):
        log.warning("%s: no tiles; the heatmap is empty", view.path)
    valid = canvas.coverage() >= MIN_COVERAGE
    mask = view.tissue_mask()
    if mask is not None:
        mask_ds = a.tissue_mask_downsample or [width / mask.shape[1], height / mask.shape[0]]
        valid &= cell_tissue_fraction(mask, mask_ds, canvas.rows, canvas.cols, canvas.cell) >= MIN_CELL_TISSUE
        del mask
    maps = {}
    for c, name in enumerate(names):
        m = canvas.mean(c)
        np.copyto(m, np.nan, where=~valid)
        maps[name] = m
    return StitchedMaps(maps["raw"], maps["spread"], maps.get("attention"), valid, canvas.cell, coords, probs,
                        spread_weights, width, height, float(a.tile_extent), a.source_mpp, canvas.map_side,
                        maps.get("gradcam"), maps.get("gradcam_spread"))
