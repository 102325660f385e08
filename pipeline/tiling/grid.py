"""What to cut and where: the settings of ``gapless tile``, the pyramid level and read size for a target
µm/px, the tile grid, and each tile's tissue fraction."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from pipeline.errors import GaplessError
from pipeline.io import MPP_TOLERANCE, Source
from pipeline.settings import setting

log = logging.getLogger("gapless.tiling")


@dataclass(frozen=True)
class TileSettings:
    """What to cut: target µm/px, tile size and stride in output pixels, minimum tissue fraction.

    Each field is a ``gapless tile`` flag and a key of the config's ``tiling`` section: the grid
    (mpp, tile_size, stride, min_tissue) per kind in ``tiling.slide`` / ``tiling.image``, the rest
    shared; ``slide_mpp``, ``kind`` and ``annotations`` come from the sample sheet. A new setting is a
    field here and its entry in ``config/schema.yaml`` (see ``pipeline.settings``).
    """

    mpp: float = setting(0.5, help="µm/px of the tiles")
    tile_size: int = setting(224, help="tile width and height in px")
    stride: int | None = setting(None, help="px between tiles at the tile scale (default: the tile size, no overlap)")
    min_tissue: float = setting(0.25, help="keep tiles with at least this tissue fraction")
    tissue: str = setting("auto", choices=("auto", "brightfield", "fluorescence", "none"),
                          help="tissue mask: brightfield (stain on white), fluorescence (signal on black), "
                               "auto (detect), none (keep every tile)")
    slide_mpp: float | None = setting(None, help="µm/px of the source at full resolution, overriding its metadata")
    kind: str | None = setting(None, choices=("slide", "image"),
                               help="reader: slide (OpenSlide) or image (tifffile/Pillow); inferred when absent")
    annotations: str | None = setting(None, help="GeoJSON (QuPath export) for tile labels")
    positive_classes: tuple[str, ...] = setting((), flag="--positive-class", metavar="NAME",
                                                help="annotation class that makes a tile positive (repeatable; "
                                                     "default: any)")
    codec: str = setting("jpeg", choices=("jpeg", "lossless"),
                         help="8-bit RGB brightfield tiles: jpeg (at --quality) or lossless (Blosc-LZ4); 16-bit and "
                              "fluorescence tiles are always lossless")
    quality: int = setting(90, help="JPEG quality (1-100) of 8-bit RGB brightfield tiles")
    on_empty: str = setting("error", choices=("error", "flag"),
                            help="a sample without tissue: error stops, flag writes an empty store flagged "
                                 "'no tissue' (also --allow-empty)")
    whole: bool = setting(False, help="one tile per image: the whole field at --mpp (a square of the shorter side; "
                                      "--tile-size and --stride are ignored); for training on whole fields of cells")

    # The grid a cell image gets in the workflow (`tiling.image`) where it differs from the fields':
    # nuclei on black cover less of a tile than tissue on a slide. `gapless tile` keeps the fields'.
    KIND_DEFAULTS: ClassVar[dict[str, dict]] = {"slide": {}, "image": {"min_tissue": 0.1}}

    @property
    def allow_empty(self) -> bool:
        """Write an empty store flagged "no tissue" instead of failing."""
        return self.on_empty == "flag"

    def validate(self, path) -> None:
        from pipeline.tissue import TISSUE_METHODS

        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise GaplessError(path, f"--mpp must be a positive number, got {self.mpp}", "e.g. --mpp 0.5")
        if not isinstance(self.whole, bool):
            raise GaplessError(path, f"whole must be true or false, got {self.whole!r}", "e.g. whole: true")
        if self.tile_size < 8 and not self.whole:
            raise GaplessError(path, f"--tile-size must be at least 8 px, got {self.tile_size}", "e.g. --tile-size 224")
        if self.stride is not None and self.stride < 1:
            raise GaplessError(path, f"--stride must be at least 1 px, got {self.stride}", "e.g. --stride 224")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise GaplessError(path, f"--min-tissue must be in [0, 1], got {self.min_tissue}", "e.g. --min-tissue 0.25")
        if self.tissue not in TISSUE_METHODS:
            raise GaplessError(path, f"--tissue must be one of {', '.join(TISSUE_METHODS)}, got {self.tissue!r}", "use auto")
        if self.codec not in ("jpeg", "lossless"):
            raise GaplessError(path, f"--codec must be jpeg or lossless, got {self.codec!r}", "use jpeg")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise GaplessError(path, f"--quality must be a whole number from 1 to 100, got {self.quality!r}", "e.g. --quality 90")
        if self.on_empty not in ("error", "flag"):
            raise GaplessError(path, f"--on-empty must be error or flag, got {self.on_empty!r}", "use error")


@dataclass(frozen=True)
class TileGrid:
    """Where tiles come from. A tile is ``read_size`` px at ``level``, resized to ``tile_size``.

    ``extent`` and ``step`` are the tile's width and the stride in level-0 px (floats: a level's
    downsample need not be an integer); ``coords`` are rounded level-0 px.
    """

    level: int
    downsample: float
    read_size: int
    tile_size: int
    stride: int
    tile_mpp: float
    extent: float
    step: float
    columns: int
    rows: int

    def coords(self) -> np.ndarray:
        """(columns·rows, 2) int64 top-left corners (x, y) in level-0 px, row by row."""
        xs = np.rint(np.arange(self.columns) * self.step).astype(np.int64)
        ys = np.rint(np.arange(self.rows) * self.step).astype(np.int64)
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx.ravel(), gy.ravel()], axis=1)


def plan_grid(source: Source, source_mpp: float, mpp: float, tile_size: int, stride: int | None = None) -> TileGrid:
    """Choose the pyramid level and read size for tiles of ``tile_size`` px at ``mpp`` µm/px.

    The coarsest level at least as fine as the target (within ``MPP_TOLERANCE``) is read, then
    resized; a level within tolerance of the target is used as is, so its tiles are the slide's own
    pixels. Only whole tiles inside the image are kept.
    """
    stride = tile_size if stride is None else stride
    level_mpps = [source_mpp * d for d in source.level_downsamples]
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= mpp * (1 + MPP_TOLERANCE)]
    level = max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0
    if not fine_enough:
        log.warning(
            "%s: target %.3g µm/px is finer than the source (%.3g µm/px): tiles are upsampled",
            source.path, mpp, level_mpps[0],
        )
    scale = mpp / level_mpps[level]
    read_size = tile_size if abs(scale - 1) <= MPP_TOLERANCE else max(1, round(tile_size * scale))
    downsample = source.level_downsamples[level]
    tile_mpp = level_mpps[level] * read_size / tile_size
    extent = read_size * downsample
    step = stride * read_size / tile_size * downsample
    W, H = source.dimensions
    columns = int((W - extent) // step) + 1 if W >= extent else 0
    rows = int((H - extent) // step) + 1 if H >= extent else 0
    # rounding of step·i must not push the last tile past the edge
    while columns and round((columns - 1) * step) + extent > W + 0.5:
        columns -= 1
    while rows and round((rows - 1) * step) + extent > H + 0.5:
        rows -= 1
    return TileGrid(level, downsample, read_size, tile_size, stride, tile_mpp, extent, step, columns, rows)


def fit_whole(settings: TileSettings, source: Source, source_mpp: float, path) -> TileSettings:
    """``settings`` with the tile and stride set to the whole field for ``whole`` (else as they are).

    The tile is the image's shorter side at the target µm/px, so a square field is one tile; of a
    non-square field the top-left square is kept (a warning says how much is left out).
    """
    if not settings.whole:
        return settings
    W, H = source.dimensions
    scale = source_mpp / settings.mpp  # as plan_grid: a source within tolerance of the target is read as is
    side = min(W, H) if abs(scale - 1) <= MPP_TOLERANCE else math.floor(min(W, H) * scale)
    if side < 8:
        raise GaplessError(path, f"a {W}×{H}-px image at {source_mpp:.3g} µm/px is under 8 px at {settings.mpp:.3g} µm/px",
                           "use a finer mpp for whole-field tiles")
    if W != H:
        log.warning("%s: whole-field tiles are square: the top-left %d×%d of a %d×%d image is kept",
                    path, min(W, H), min(W, H), W, H)
    return replace(settings, tile_size=side, stride=side)


def tissue_fractions(mask: np.ndarray, mask_downsample: tuple[float, float], coords: np.ndarray, extent: float) -> np.ndarray:
    """(N,) float32 fraction of each tile's footprint that the mask marks as tissue (summed-area table,
    OpenCV's: 25× faster than two numpy cumsums on the 10⁷-px mask of a 40× slide)."""
    from pipeline.opencv import cv2

    h, w = mask.shape
    sat = cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=cv2.CV_64F if h * w >= 2**31 else cv2.CV_32S)
    sat = sat.astype(np.int64, copy=False)
    dx, dy = mask_downsample
    x0 = np.clip(np.rint(coords[:, 0] / dx), 0, w).astype(np.int64)
    y0 = np.clip(np.rint(coords[:, 1] / dy), 0, h).astype(np.int64)
    x1 = np.clip(np.rint((coords[:, 0] + extent) / dx), 0, w).astype(np.int64)
    y1 = np.clip(np.rint((coords[:, 1] + extent) / dy), 0, h).astype(np.int64)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / area).astype(np.float32)
