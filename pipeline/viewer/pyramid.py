"""Writing a Deep Zoom pyramid of any source gapless reads, through ``pipeline.io.open_source``.

The tiles are cut from the source's own reads (``Source.read_region``), so every format the readers
know (OpenSlide's slides, TIFF / OME-TIFF / PNG cell images, ...) gets a pyramid, in the layout of
:mod:`pipeline.viewer.deepzoom`. Pixels that are not RGB uint8 (multi-channel, 16-bit fluorescence)
are shown as :func:`pipeline.tissue.to_display_rgb` colours them.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import GaplessError
from pipeline.files import atomic_directory
from pipeline.viewer.deepzoom import (
    DZI_NAME,
    PYRAMID_SCHEMA,
    dz_level_dimensions,
    dz_level_tiles,
    dz_tile_box,
    dzi_text,
)

COARSE_MAX_SIDE = 4096  # levels at most this big are resized from one picture, not read again
BLOCK_SIDE = 1024  # about this many px a side of a level are read at once and cut into tiles


def write_slide_pyramid(
    source_path: str | Path,
    out_dir: str | Path,
    kind: str | None = None,
    tile_size: int = 254,
    overlap: int = 1,
    progress: bool = True,
    quality: int = 85,
    workers: int = 1,
) -> Path:
    """Write a Deep Zoom (DZI) pyramid of a slide or cell image into ``out_dir``; return ``out_dir``.

    ``out_dir/slide.dzi`` describes it, ``out_dir/slide_files/{level}/{col}_{row}.jpeg`` are the
    tiles (level 0 is 1×1 px, the last level is full resolution; the tiles are those OpenSlide's
    ``DeepZoomGenerator`` cuts) and ``out_dir/pyramid.json`` records the size, kind and µm/px. The
    pyramid covers exactly the level-0 extent [0, width] × [0, height], the frame heatmaps use.

    Every level finer than the finest one of at most 4096 px a side ("coarse") is read from the
    source in blocks of about 1024 px a side, each from the coarsest source level at least as fine
    (resized down with Lanczos where the source has no level at that scale), and cut into tiles.
    The coarse level is read the same way into one picture and each coarser level is a 2× Lanczos
    reduction of the one above: reading the source again for each would read its nearest level
    again (the whole image, for a single-level source). ``workers`` threads read and encode (the
    readers and Pillow release the GIL); JPEG ``quality``. It is written under ``<out_dir>.partial``
    and renamed when complete (replacing an older one).
    """
    from tqdm import tqdm

    from pipeline.io import open_source

    source_path, out_dir = Path(source_path), Path(out_dir)
    _check_options(source_path, tile_size, overlap, quality)
    with open_source(source_path, kind) as source:  # clear errors for missing/unreadable files
        pixels = DisplayPixels(source)
        plan = PyramidPlan(source.dimensions, tile_size, overlap)
        with atomic_directory(out_dir, holds=f"{DZI_NAME}.dzi") as partial:
            bar = tqdm(total=plan.tile_count, desc=f"pyramid {source_path.name}", unit="tile",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False)
            try:
                _write_levels(pixels, plan, TileWriter(partial / f"{DZI_NAME}_files", plan, quality, bar.update), workers)
            finally:
                bar.close()
            W, H = source.dimensions
            (partial / f"{DZI_NAME}.dzi").write_text(dzi_text(W, H, tile_size, overlap, "jpeg"), encoding="utf-8")
            meta = {
                "schema": PYRAMID_SCHEMA,
                "source": str(source.path.resolve()),
                "kind": source.kind,
                "modality": pixels.modality,
                "width": int(W),
                "height": int(H),
                "mpp": source.metadata_mpp,
                "tile_size": tile_size,
                "overlap": overlap,
                "format": "jpeg",
                "levels": len(plan.dims),
                "tiles": plan.tile_count,
            }
            (partial / "pyramid.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out_dir


def _check_options(source_path: Path, tile_size, overlap, quality) -> None:
    if not (isinstance(tile_size, int) and tile_size >= 16):
        raise GaplessError(source_path, f"pyramid tile size must be an integer of at least 16 px, got {tile_size!r}",
                           "use the default 254 (254 + 2 × 1 overlap = 256)")
    if not (isinstance(overlap, int) and 0 <= overlap < tile_size // 2):
        raise GaplessError(source_path, f"pyramid tile overlap must be an integer in 0..{tile_size // 2 - 1}, got {overlap!r}",
                           "use the default 1")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise GaplessError(source_path, f"JPEG quality must be 1..100, got {quality!r}", "use the default 85")


class PyramidPlan:
    """The Deep Zoom levels of a ``size`` (w, h) level-0 px image: sizes, tile grids, the coarse level."""

    def __init__(self, size: tuple[int, int], tile_size: int, overlap: int):
        self.tile_size, self.overlap = tile_size, overlap
        self.dims = dz_level_dimensions(*size)
        self.tiles = [dz_level_tiles(d, tile_size) for d in self.dims]
        self.coarse = max(lv for lv, d in enumerate(self.dims) if max(d) <= COARSE_MAX_SIDE)
        self.tile_count = sum(c * r for c, r in self.tiles)

    def downsample(self, level: int) -> int:
        """Level-0 px per px of Deep Zoom ``level`` (exact: each level halves the one above, rounding up)."""
        return 2 ** (len(self.dims) - 1 - level)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        return dz_tile_box(col, row, self.dims[level], self.tile_size, self.overlap)

    def blocks(self, level: int) -> list[tuple[range, range]]:
        """The level's tiles in blocks of about ``BLOCK_SIDE`` px a side: (columns, rows) ranges."""
        k = max(1, BLOCK_SIDE // self.tile_size)
        cols, rows = self.tiles[level]
        return [(range(c, min(c + k, cols)), range(r, min(r + k, rows)))
                for r in range(0, rows, k) for c in range(0, cols, k)]


class DisplayPixels:
    """A source's pixels as the viewer shows them (RGB uint8), read by Deep Zoom level and box.

    RGB uint8 sources (slides, RGB cell images) are read region by region. Any other source is
    coloured by :func:`pipeline.tissue.to_display_rgb` whole, once (its per-channel stretch is over
    the whole image, so per-region colouring would not match across tiles); cell images are held in
    memory by their reader anyway.
    """

    def __init__(self, source):
        self.path = source.path
        self.size = source.dimensions
        if source.channels == 3 and source.dtype == np.uint8:
            self.modality = "brightfield"
            self._read = source.read_region
            self.level_dimensions = tuple(source.level_dimensions)
            self.level_downsamples = tuple(source.level_downsamples)
        else:
            rgb, self.modality = _display_rgb(source)
            self._read = _array_reader(rgb)
            self.level_dimensions, self.level_downsamples = (self.size,), (1.0,)

    def read_box(self, level: int, downsample: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """Pixels ``box`` (x0, y0, x1, y1) of a Deep Zoom level (``downsample`` level-0 px per px), h×w×3
        uint8: from the coarsest source level at least as fine, resized down (Lanczos) if it is finer."""
        from PIL import Image

        s = max(i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001 or i == 0)
        ds, (lw, lh) = self.level_downsamples[s], self.level_dimensions[s]
        x0, y0 = box[0] * downsample, box[1] * downsample  # level-0 px
        out_size = (box[2] - box[0], box[3] - box[1])
        fx0, fy0 = x0 / ds, y0 / ds  # the box in source-level px
        fx1, fy1 = box[2] * downsample / ds, box[3] * downsample / ds
        exact = abs(ds - downsample) <= 1e-6 * downsample
        if exact and round(fx0) + out_size[0] <= lw and round(fy0) + out_size[1] <= lh:
            return self._read_level(level, (x0, y0), s, out_size)
        margin = math.ceil(3 * downsample / ds) + 1  # Lanczos's reach, so blocks meet without seams
        ix0, iy0 = max(0, math.floor(fx0) - margin), max(0, math.floor(fy0) - margin)
        ix1, iy1 = min(lw, math.ceil(fx1) + margin), min(lh, math.ceil(fy1) + margin)
        region = self._read_level(level, (round(ix0 * ds), round(iy0 * ds)), s, (ix1 - ix0, iy1 - iy0))
        # a level's last pixel may reach past the image (sizes round up): it repeats the edge
        pad_x, pad_y = max(0, math.ceil(fx1) - ix1), max(0, math.ceil(fy1) - iy1)
        if pad_x or pad_y:
            region = np.pad(region, ((0, pad_y), (0, pad_x), (0, 0)), mode="edge")
        resized = Image.fromarray(region).resize(out_size, Image.Resampling.LANCZOS,
                                                 box=(fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0))
        return np.asarray(resized)

    def _read_level(self, dz_level: int, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            return self._read((int(location[0]), int(location[1])), level, size)
        except GaplessError as exc:
            raise GaplessError(
                self.path, f"cannot read the pixels of Deep Zoom level {dz_level} near level-0 ({location[0]}, "
                f"{location[1]}): {exc.cause}", exc.fix or "the file is damaged or truncated: copy it again",
            ) from None


def _array_reader(rgb: np.ndarray) -> Callable:
    """``read_region`` of a one-level in-memory H×W×3 picture (white outside it)."""

    def read(location, level, size):
        (x, y), (w, h) = location, size
        H, W = rgb.shape[:2]
        if x >= 0 and y >= 0 and x + w <= W and y + h <= H:
            return rgb[y : y + h, x : x + w]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = rgb[y0:y1, x0:x1]
        return out

    return read


def _display_rgb(source) -> tuple[np.ndarray, str]:
    """An RGB uint8 picture of a whole (not RGB uint8) source and the modality it was shown as."""
    from pipeline.tissue import detect_modality, read_overview, to_display_rgb

    pixels = source.read_region((0, 0), 0, source.dimensions)
    W, H = source.dimensions
    overview, _ = read_overview(source, max(1.0, max(W, H) / 1024))
    modality = detect_modality(overview)
    return np.ascontiguousarray(to_display_rgb(pixels, modality)), modality


class TileWriter:
    """Saves the JPEG tiles of a pyramid under ``files/{level}/{col}_{row}.jpeg``; counts them for ``done``."""

    def __init__(self, files: Path, plan: PyramidPlan, quality: int, done: Callable[[int], object]):
        self.files, self.plan, self.quality = files, plan, quality
        self._done, self._lock = done, threading.Lock()  # tiles are saved from several threads
        for level in range(len(plan.dims)):
            (files / str(level)).mkdir(parents=True, exist_ok=True)

    def cut(self, pixels: np.ndarray, origin: tuple[int, int], level: int, cols: Sequence[int], rows: Sequence[int]) -> None:
        """Save tiles (cols × rows) of ``level`` from ``pixels`` (h×w×3 uint8), the level's pixels from
        ``origin`` (x, y) on."""
        from PIL import Image

        ox, oy = origin
        for r in rows:
            for c in cols:
                x0, y0, x1, y1 = self.plan.tile_box(level, c, r)
                tile = Image.fromarray(pixels[y0 - oy : y1 - oy, x0 - ox : x1 - ox])
                tile.save(self.files / str(level) / f"{c}_{r}.jpeg", "JPEG", quality=self.quality)
        with self._lock:
            self._done(len(cols) * len(rows))


def _run(pool: ThreadPoolExecutor | None, jobs: list, work: Callable) -> None:
    """``work(job)`` for every job, on ``pool``'s threads (in this one when None). The first error stops the
    rest: queued jobs are cancelled, not run."""
    if pool is None:
        for job in jobs:
            work(job)
        return
    try:
        for i in range(0, len(jobs), 256):  # in batches: few pending futures at a time
            for _ in pool.map(work, jobs[i : i + 256]):
                pass
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise


def _write_levels(pixels: DisplayPixels, plan: PyramidPlan, tiles: TileWriter, workers: int) -> None:
    """Every level: the coarse picture first, then its levels on one thread while the others write the
    finer levels (its 2× reductions are one long step each; they need not wait for the rest)."""
    if workers <= 1:
        picture = _read_level_picture(None, pixels, plan, plan.coarse)
        _write_fine_levels(None, pixels, plan, tiles)
        _write_coarse_levels(picture, plan, tiles)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        picture = _read_level_picture(pool, pixels, plan, plan.coarse)
        coarse = pool.submit(_write_coarse_levels, picture, plan, tiles)
        _write_fine_levels(pool, pixels, plan, tiles)
        coarse.result()


def _read_level_picture(pool, pixels: DisplayPixels, plan: PyramidPlan, level: int) -> np.ndarray:
    """The whole of Deep Zoom ``level`` (h×w×3 uint8), read from the source in blocks."""
    w, h = plan.dims[level]
    picture = np.empty((h, w, 3), np.uint8)

    def block(box):  # disjoint blocks: no lock needed
        x0, y0, x1, y1 = box
        picture[y0:y1, x0:x1] = pixels.read_box(level, plan.downsample(level), box)

    boxes = [(x, y, min(w, x + BLOCK_SIDE), min(h, y + BLOCK_SIDE)) for y in range(0, h, BLOCK_SIDE) for x in range(0, w, BLOCK_SIDE)]
    _run(pool, boxes, block)
    return picture


def _write_fine_levels(pool, pixels: DisplayPixels, plan: PyramidPlan, tiles: TileWriter) -> None:
    """The levels finer than ``plan.coarse``, finest first, block by block from the source."""

    def block(job):
        level, cols, rows = job
        x0, y0, _, _ = plan.tile_box(level, cols[0], rows[0])
        _, _, x1, y1 = plan.tile_box(level, cols[-1], rows[-1])
        tiles.cut(pixels.read_box(level, plan.downsample(level), (x0, y0, x1, y1)), (x0, y0), level, cols, rows)

    jobs = [(level, cols, rows) for level in range(len(plan.dims) - 1, plan.coarse, -1)
            for cols, rows in plan.blocks(level)]
    _run(pool, jobs, block)


def _write_coarse_levels(picture: np.ndarray, plan: PyramidPlan, tiles: TileWriter) -> None:
    """``plan.coarse`` from ``picture`` and every coarser level from a 2× Lanczos reduction of the one above."""
    from PIL import Image

    image = Image.fromarray(picture)
    for level in range(plan.coarse, -1, -1):
        if level != plan.coarse:
            image = image.resize(plan.dims[level], Image.Resampling.LANCZOS)
            picture = np.asarray(image)
        cols, rows = plan.tiles[level]
        tiles.cut(picture, (0, 0), level, range(cols), range(rows))
