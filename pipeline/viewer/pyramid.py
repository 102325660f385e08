"""Writing a Deep Zoom pyramid of any source gapless reads, through ``pipeline.io.open_source``.

The tiles are cut from the source's own reads (``Source.read_region``), so every format the readers
know (OpenSlide's slides, TIFF / OME-TIFF / PNG cell images, ...) gets a pyramid, in the layout of
:mod:`pipeline.viewer.deepzoom`. Pixels that are not RGB uint8 (multi-channel, 16-bit fluorescence)
are shown as :func:`pipeline.tissue.to_display_rgb` colours them.

The static export stops at a µm/px (``max_mpp``, 1 µm/px unless told): a full-resolution copy of a 40×
slide is about the slide's size again in ~10⁵ files. :class:`SourceTiles` cuts any tile of a pyramid
folder from its source on demand, through the same reads, for ``gapless view``
(:mod:`pipeline.viewer.server`).
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    finest_level,
    read_pyramid,
)

COARSE_MAX_SIDE = 4096  # levels at most this big are resized from one picture, not read again
BLOCK_SIDE = 1024  # about this many px a side of a level are read at once and cut into tiles
DEFAULT_MAX_MPP = 1.0  # µm/px of the finest level a static export writes when not told (None: every level)


def write_slide_pyramid(
    source_path: str | Path,
    out_dir: str | Path,
    kind: str | None = None,
    tile_size: int = 254,
    overlap: int = 1,
    progress: bool = True,
    quality: int = 85,
    workers: int = 1,
    max_mpp: float | None = DEFAULT_MAX_MPP,
    slide_mpp: float | None = None,
) -> Path:
    """Write a Deep Zoom (DZI) pyramid of a slide or cell image into ``out_dir``; return ``out_dir``.

    ``out_dir/slide.dzi`` describes it, ``out_dir/slide_files/{level}/{col}_{row}.jpeg`` are the
    tiles (level 0 is 1×1 px, the last level is full resolution; the tiles are those OpenSlide's
    ``DeepZoomGenerator`` cuts) and ``out_dir/pyramid.json`` records the size, kind, µm/px, the source
    and the finest level written. The pyramid covers exactly the level-0 extent [0, width] × [0, height],
    the frame heatmaps use.

    Levels finer than ``max_mpp`` µm/px are not written (``None``: every level, a full-resolution
    copy); the page shows the finest written level magnified, and ``gapless view`` serves the finer
    ones from the slide. The source's µm/px is its metadata's, or ``slide_mpp``; a source with neither
    gets every level (it cannot be capped in µm).

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
    _check_options(source_path, tile_size, overlap, quality, max_mpp)
    with open_source(source_path, kind) as source:  # clear errors for missing/unreadable files
        pixels = DisplayPixels(source)
        mpp = source.resolve_mpp(slide_mpp)[0] if (slide_mpp is not None or source.metadata_mpp is not None) else None
        plan = PyramidPlan(source.dimensions, tile_size, overlap, mpp, max_mpp)
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
                "mpp": mpp,
                "tile_size": tile_size,
                "overlap": overlap,
                "format": "jpeg",
                "quality": quality,
                "levels": len(plan.dims),
                "max_level": plan.max_level,
                "max_mpp": max_mpp,
                "finest_mpp": None if mpp is None else mpp * plan.downsample(plan.max_level),
                "tiles": plan.tile_count,
            }
            (partial / "pyramid.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out_dir


def pyramid_cap(max_mpp: float | str | None, store: str | Path | None = None,
                slide_mpp: float | None = None) -> tuple[float | None, float | None]:
    """``(max_mpp, slide_mpp)`` for :func:`write_slide_pyramid` from ``gapless pyramid``'s options.

    ``max_mpp``: µm/px, ``"full"`` (every level: None) or None (not given: the tiles' µm/px of the
    sample's tile ``store`` when given, else ``DEFAULT_MAX_MPP``). The store's source µm/px calibrates
    the slide unless ``slide_mpp`` is given.
    """
    if store is not None:
        from pipeline.store import open_store, store_attrs

        attrs = store_attrs(open_store(store), store)
        max_mpp = attrs.mpp if max_mpp is None else max_mpp
        slide_mpp = attrs.source_mpp if slide_mpp is None else slide_mpp
    if max_mpp == "full":
        return None, slide_mpp
    return (DEFAULT_MAX_MPP if max_mpp is None else max_mpp), slide_mpp


def _check_options(source_path: Path, tile_size, overlap, quality, max_mpp) -> None:
    if not (isinstance(tile_size, int) and tile_size >= 16):
        raise GaplessError(source_path, f"pyramid tile size must be an integer of at least 16 px, got {tile_size!r}",
                           "use the default 254 (254 + 2 × 1 overlap = 256)")
    if not (isinstance(overlap, int) and 0 <= overlap < tile_size // 2):
        raise GaplessError(source_path, f"pyramid tile overlap must be an integer in 0..{tile_size // 2 - 1}, got {overlap!r}",
                           "use the default 1")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise GaplessError(source_path, f"JPEG quality must be 1..100, got {quality!r}", "use the default 85")
    if max_mpp is not None and not (isinstance(max_mpp, (int, float)) and math.isfinite(max_mpp) and max_mpp > 0):
        raise GaplessError(source_path, f"the pyramid's finest µm/px must be a positive number, got {max_mpp!r}",
                           f"use e.g. {DEFAULT_MAX_MPP} (or none for every level, a full-resolution copy)")


class PyramidPlan:
    """The Deep Zoom levels of a ``size`` (w, h) level-0 px image: sizes, tile grids, the finest level
    written (``max_level``: not finer than ``max_mpp`` given ``mpp`` of level 0), the coarse level."""

    def __init__(self, size: tuple[int, int], tile_size: int, overlap: int, mpp: float | None = None,
                 max_mpp: float | None = None):
        self.tile_size, self.overlap = tile_size, overlap
        self.dims = dz_level_dimensions(*size)
        self.tiles = [dz_level_tiles(d, tile_size) for d in self.dims]
        self.max_level = finest_level(len(self.dims), mpp, max_mpp, tile_size, size)
        self.coarse = min(self.max_level, max(lv for lv, d in enumerate(self.dims) if max(d) <= COARSE_MAX_SIDE))
        self.tile_count = sum(c * r for c, r in self.tiles[: self.max_level + 1])

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
        for level in range(plan.max_level + 1):
            (files / str(level)).mkdir(parents=True, exist_ok=True)

    def cut(self, pixels: np.ndarray, origin: tuple[int, int], level: int, cols: Sequence[int], rows: Sequence[int]) -> None:
        """Save tiles (cols × rows) of ``level`` from ``pixels`` (h×w×3 uint8), the level's pixels from
        ``origin`` (x, y) on."""
        ox, oy = origin
        for r in rows:
            for c in cols:
                x0, y0, x1, y1 = self.plan.tile_box(level, c, r)
                data = encode_tile(pixels[y0 - oy : y1 - oy, x0 - ox : x1 - ox], "jpeg", self.quality)
                (self.files / str(level) / f"{c}_{r}.jpeg").write_bytes(data)
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

    jobs = [(level, cols, rows) for level in range(plan.max_level, plan.coarse, -1)
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


def encode_tile(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    """A tile's file bytes: h×w×3 uint8 ``pixels`` as JPEG (``quality``) or PNG."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    if fmt.lower() in ("jpeg", "jpg"):
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buffer, fmt.upper())
    return buffer.getvalue()


class SourceTiles:
    """Any Deep Zoom tile of a pyramid folder, cut from the source it was written from (``pyramid.json``)
    through the same reads as :func:`write_slide_pyramid` (:meth:`DisplayPixels.read_box`), so every
    format the readers know is served. Safe to share between threads: OpenSlide handles are, and other
    sources are held in memory. Closed by :meth:`close`, or when no longer referenced.
    """

    def __init__(self, pyramid_dir: str | Path):
        from pipeline.io import open_source

        pyr = read_pyramid(pyramid_dir)
        self.pyramid_dir = Path(pyramid_dir)
        if not pyr.get("source"):
            raise GaplessError(pyramid_dir, "the pyramid does not record its source (no pyramid.json)",
                               "write it again with `gapless pyramid SLIDE --out DIR`")
        self.source = open_source(pyr["source"], pyr.get("kind"))
        if tuple(self.source.dimensions) != (pyr["width"], pyr["height"]):
            self.source.close()
            raise GaplessError(pyr["source"], f"is {self.source.dimensions[0]}×{self.source.dimensions[1]} px, not the "
                               f"{pyr['width']}×{pyr['height']} px the pyramid {pyramid_dir} was written from",
                               "write the pyramid again from this slide")
        self.pixels = DisplayPixels(self.source)
        self.plan = PyramidPlan((pyr["width"], pyr["height"]), pyr["tile_size"], pyr["overlap"])
        self.format, self.quality = pyr["format"], pyr.get("quality") or 85

    def tile(self, level: int, col: int, row: int) -> bytes:
        """Tile (``col``, ``row``) of Deep Zoom ``level``, encoded; ``KeyError`` outside the pyramid."""
        if not (0 <= level < len(self.plan.dims)):
            raise KeyError(f"no Deep Zoom level {level}")
        cols, rows = self.plan.tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise KeyError(f"no tile {col}_{row} at level {level}")
        box = self.plan.tile_box(level, col, row)
        return encode_tile(self.pixels.read_box(level, self.plan.downsample(level), box), self.format, self.quality)

    def close(self) -> None:
        self.source.close()
