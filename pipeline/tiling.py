"""Tile a slide or cell image into a zarr v3 store at a target µm/px.

The store (schema ``gapless.tiles/1``): ``tiles`` (N, T, T, C) in the source dtype, one tile per
chunk, many tiles per shard; ``coords`` (N, 2) int64 top-left (x, y) in level-0 px; ``tissue`` (N,)
float32; ``labels`` (N,) int8 (−1 unknown); ``thumbnail`` (h, w, 3) uint8; ``tissue_mask`` (h', w')
uint8; and attrs describing the geometry so every tile can be found again on the source, and
``integrity``, the size of every file the store was written with, checked by ``open_store``.

Work is spread over processes, each with its own reader (OpenSlide handles are not shared), each
writing whole shards (partial-shard writes from several writers lose data in zarr 3), through zarrs
(zarr-python's codec pipeline in Rust) when it is installed. The store is written under
``<out>.partial`` and renamed to ``<out>`` only when complete.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.errors import GaplessError
from pipeline.files import atomic_directory
from pipeline.io import Source, open_source

log = logging.getLogger("gapless.tiling")

SCHEMA = "gapless.tiles/1"
MPP_TOLERANCE = 0.05  # a level within 5% of the target µm/px is used as is, without resampling
MASK_PX_PER_TILE = 16  # tissue mask resolution: about this many mask pixels across a tile
MASK_MAX_SIDE = 4096
THUMBNAIL_MAX_SIDE = 1024
SHARD_BYTES = 32 * 2**20


@dataclass(frozen=True)
class TileSettings:
    """What to cut: target µm/px, tile size and stride in output pixels, minimum tissue fraction."""

    mpp: float = 0.5
    tile_size: int = 224
    stride: int | None = None  # None: = tile_size (no overlap)
    min_tissue: float = 0.25
    tissue: str = "auto"  # auto | brightfield | fluorescence | none
    slide_mpp: float | None = None  # override of the source's level-0 µm/px
    kind: str | None = None  # slide | image | None (inferred)
    annotations: str | None = None
    positive_classes: tuple[str, ...] = ()
    allow_empty: bool = False  # write an empty store flagged "no tissue" instead of failing

    def validate(self, path) -> None:
        from pipeline.tissue import TISSUE_METHODS

        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise GaplessError(path, f"--mpp must be a positive number, got {self.mpp}", "e.g. --mpp 0.5")
        if self.tile_size < 8:
            raise GaplessError(path, f"--tile-size must be at least 8 px, got {self.tile_size}", "e.g. --tile-size 224")
        if self.stride is not None and self.stride < 1:
            raise GaplessError(path, f"--stride must be at least 1 px, got {self.stride}", "e.g. --stride 224")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise GaplessError(path, f"--min-tissue must be in [0, 1], got {self.min_tissue}", "e.g. --min-tissue 0.25")
        if self.tissue not in TISSUE_METHODS:
            raise GaplessError(path, f"--tissue must be one of {', '.join(TISSUE_METHODS)}, got {self.tissue!r}", "use auto")


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


def tissue_fractions(mask: np.ndarray, mask_downsample: tuple[float, float], coords: np.ndarray, extent: float) -> np.ndarray:
    """(N,) float32 fraction of each tile's footprint that the mask marks as tissue (summed-area table)."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    dx, dy = mask_downsample
    x0 = np.clip(np.rint(coords[:, 0] / dx), 0, w).astype(np.int64)
    y0 = np.clip(np.rint(coords[:, 1] / dy), 0, h).astype(np.int64)
    x1 = np.clip(np.rint((coords[:, 0] + extent) / dx), 0, w).astype(np.int64)
    y1 = np.clip(np.rint((coords[:, 1] + extent) / dy), 0, h).astype(np.int64)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / area).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Channel statistics, accumulated per shard and merged: exact histograms for integer data.


@dataclass
class ChannelStats:
    """Exact per-channel histograms of integer pixels; every statistic is derived from them."""

    channels: int
    bins: int
    histogram: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.histogram is None:
            self.histogram = np.zeros((self.channels, self.bins), np.int64)

    def add(self, block: np.ndarray) -> None:
        flat = block.reshape(-1, self.channels)
        # one bincount for all channels: channel c's values are offset by c·bins
        offsets = (np.arange(self.channels, dtype=np.int64) * self.bins)[None, :]
        counts = np.bincount((flat + offsets).ravel(), minlength=self.channels * self.bins)
        self.histogram += counts.reshape(self.channels, self.bins)

    def merge(self, other: "ChannelStats") -> None:
        self.histogram += other.histogram

    def summary(self, names: Sequence[str]) -> dict:
        """Per-channel mean, std, min, max and 1st/99th percentiles, in the tiles' raw units."""
        count = int(self.histogram[0].sum()) if self.channels else 0
        if count == 0:
            return {"names": list(names)}
        values = np.arange(self.bins, dtype=np.float64)
        mean = self.histogram @ values / count
        std = np.sqrt(np.maximum(self.histogram @ values**2 / count - mean**2, 0))
        cdf = self.histogram.cumsum(1) / count

        def pct(q):
            return [int(np.searchsorted(cdf[c], q)) for c in range(self.channels)]

        nz = [np.flatnonzero(self.histogram[c]) for c in range(self.channels)]
        return {
            "names": list(names),
            "mean": [round(float(v), 4) for v in mean],
            "std": [round(float(v), 4) for v in std],
            "min": [int(v[0]) for v in nz],
            "max": [int(v[-1]) for v in nz],
            "p01": pct(0.01),
            "p99": pct(0.99),
        }


# ---------------------------------------------------------------------------------------------
# Workers: one reader and one zarr handle per process; each writes whole shards, and writing one
# shard overlaps reading the next (OpenSlide's reads run in C without the GIL). With several
# workers, this process cuts too, alongside spawned helpers; every process claims the next shard
# from a shared counter, so the work balances to within a shard however late a helper gets going.

STATS_STEP = 8  # channel statistics from every 8th pixel in y and x: exact histograms of 1/64 of the pixels
_worker: dict = {}


def _init_worker(path: str, kind: str, progress_queue, next_shard) -> None:
    """A helper's initializer: its own reader; progress goes back by ``progress_queue``."""
    import zarr  # noqa: F401  (here, like zarrs below: a helper imports while it waits for work)

    _serve(open_source(path, kind), progress_queue.put, next_shard)


def _serve(source: Source, report=None, next_shard=None) -> None:
    """Make this process a cutter reading ``source`` (this process's own reader is the one it opened
    for the overview; a helper's is opened by ``_init_worker``); ``_worker.clear()`` undoes it."""
    _worker["source"] = source
    _worker["report"] = report
    _worker["next_shard"] = next_shard
    _worker["write_config"] = tile_write_config()


def _cut_here(source: Source, report, next_shard, cut, *args) -> ChannelStats:
    """Cut in this process: ``cut(*args)`` reading ``source``, with ``_worker`` set up only meanwhile."""
    _serve(source, report, next_shard)
    try:
        return cut(*args)
    finally:
        _worker.clear()


def _tiles(tiles_path: str):
    """This process's writer handle on the tile array, opened on first use (helpers start before it exists)."""
    import zarr

    if "tiles" not in _worker:
        # the codec pipeline and write_empty_chunks are bound when an array is opened: this handle
        # gets the fast writer, and the rest of the process keeps zarr's defaults
        with zarr.config.set(_worker["write_config"]):
            _worker["tiles"] = zarr.open_array(tiles_path, mode="r+")
    return _worker["tiles"]


def _claimed(n_shards: int, per_shard: int) -> Iterator[int]:
    """Starts of the shards this process claims, one at a time, from the counter all processes share."""
    counter = _worker["next_shard"]
    while True:
        with counter.get_lock():
            shard = counter.value
            counter.value = shard + 1
        if shard >= n_shards:
            return
        yield shard * per_shard


def _cut_claimed(tiles_path: str, n_shards: int, per_shard: int, *job) -> ChannelStats:
    return _cut_shards(tiles_path, _claimed(n_shards, per_shard), per_shard, *job)


def _cut_shards(tiles_path: str, starts: Iterable[int], per_shard: int, coords: np.ndarray, level: int,
                read_size: int, tile_size: int) -> ChannelStats:
    """Read, resize and store the whole shards beginning at ``starts`` (indices into ``coords``)."""
    from concurrent.futures import ThreadPoolExecutor

    source: Source = _worker["source"]
    tiles = _tiles(tiles_path)
    report = _worker["report"]
    stats = ChannelStats(source.channels, _histogram_bins(source.dtype))
    pending = None
    with ThreadPoolExecutor(1) as writer:
        for start in starts:
            block_coords = coords[start : start + per_shard]
            block = np.empty((len(block_coords), tile_size, tile_size, source.channels), dtype=source.dtype)
            for i, (x, y) in enumerate(block_coords):
                region = source.read_region((int(x), int(y)), level, (read_size, read_size))
                block[i] = resize(region, (tile_size, tile_size)) if read_size != tile_size else region
            stats.add(block[:, ::STATS_STEP, ::STATS_STEP])
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_shard, tiles, start, block)
            if report is not None:
                report(len(block))
        if pending is not None:
            pending.result()
    return stats


def _write_shard(tiles, start: int, block: np.ndarray) -> None:
    import zarr

    # encoding a shard's tiles as one batch halves the default pipeline's per-chunk overhead
    with zarr.config.set({"codec_pipeline.batch_size": len(block)}):
        tiles[start : start + len(block)] = block


class _Helpers:
    """Spawned processes that cut shards alongside this one, each with its own reader.

    They are started as soon as the grid bounds the number of tiles, before the overview and
    tissue mask, so that their start-up (imports, opening the reader: about half a second each)
    overlaps that work instead of the cutting.
    """

    def __init__(self):
        self.pool = None
        self.closing = None

    def start(self, path: Path, kind: str, count: int) -> None:
        if count < 1:
            return
        ctx = multiprocessing.get_context("spawn")  # fresh readers: no OpenSlide handle crosses a fork
        self.progress = ctx.Queue()
        self.next_shard = ctx.Value("q", 0)
        self.pool = ProcessPoolExecutor(count, mp_context=ctx, initializer=_init_worker,
                                        initargs=(str(path), kind, self.progress, self.next_shard))
        for _ in range(count):  # a process is spawned per task submitted while none is idle
            self.pool.submit(int)

    def cut(self, source: Source, helpers: int, tiles_path: str, n_shards: int, job: tuple, bar) -> ChannelStats:
        """Cut all ``n_shards`` shards here (from ``source``) and in ``helpers`` of the helpers; progress comes back by queue."""
        import queue
        import threading

        stop = threading.Event()

        def relay():  # the only thread that touches the bar
            while not stop.is_set():
                try:
                    bar.update(self.progress.get(timeout=0.1))
                except queue.Empty:
                    continue

        relay_thread = threading.Thread(target=relay, daemon=True)
        relay_thread.start()
        try:
            futures = [self.pool.submit(_cut_claimed, tiles_path, n_shards, *job) for _ in range(helpers)]
            stats = _cut_here(source, self.progress.put, self.next_shard, _cut_claimed, tiles_path, n_shards, *job)
            for future in futures:
                stats.merge(future.result())
            # their work is done: they exit while this process writes the attrs
            self.closing = threading.Thread(target=self.pool.shutdown, daemon=True)
            self.closing.start()
        except BaseException:
            with self.next_shard.get_lock():  # helpers stop after the shard in hand
                self.next_shard.value = n_shards
            raise
        finally:
            stop.set()
            relay_thread.join()
            while not self.progress.empty():
                bar.update(self.progress.get())
        return stats

    def close(self) -> None:
        if self.closing is not None:
            self.closing.join()
        elif self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self.closing = None


def tile_write_config() -> dict:
    """zarr settings for the handle that writes tiles: 3× to 7× less CPU per tile than the defaults.

    ``write_empty_chunks``: zarr otherwise compares every chunk with the fill value before encoding
    it (more costly than Blosc itself); a tile that is all zeros is then stored as a few bytes
    instead of being left out, and reads back the same. zarrs (zarr-python's codec pipeline in
    Rust) encodes a whole shard in one call instead of one Python task per tile; its shards are
    plain zarr v3, read back by the default pipeline. Without it the default pipeline is used.
    """
    settings: dict = {"array.write_empty_chunks": True}
    try:
        import zarrs  # noqa: F401
    except ImportError:  # optional: the default pipeline writes the same stores, only slower
        log.debug("zarrs is not installed: tiles are written by zarr's default codec pipeline")
    else:
        settings["codec_pipeline.path"] = "zarrs.ZarrsCodecPipeline"
    return settings


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`pipeline.tissue.resize`, imported on first use: pipeline.tissue loads scipy, a third of a
    helper's start-up, which a helper that never resamples (nor a reader of stores) need not pay."""
    from pipeline.tissue import resize as tissue_resize

    return tissue_resize(pixels, size)


def _histogram_bins(dtype: np.dtype) -> int:
    return 256 if dtype.itemsize == 1 else 65536


def shard_tiles(n_tiles: int, tile_bytes: int, workers: int) -> int:
    """Tiles per shard: at most ~32 MiB, at least 16 tiles, and about eight shards per worker."""
    by_bytes = max(1, SHARD_BYTES // tile_bytes)
    by_workers = max(16, math.ceil(n_tiles / (8 * max(1, workers))))
    return max(1, min(by_bytes, by_workers))


MIN_TILES_PER_WORKER = 512  # starting a reader process costs about a second: small jobs use fewer


def effective_workers(requested: int, n_tiles: int) -> int:
    """Processes worth cutting with, this one included: no more than the cores, nor than ``n_tiles / MIN_TILES_PER_WORKER``."""
    return max(1, min(requested, os.cpu_count() or 1, n_tiles // MIN_TILES_PER_WORKER))


def tile_codecs(dtype: np.dtype) -> list:
    """Blosc-LZ4: lossless, and several times faster to write and read back than zstd for tiles; then a
    CRC32C checksum of each compressed tile, so every read verifies it and a changed byte is an error
    instead of a wrong tile (4 bytes a tile; both zarrs and zarr's default pipeline compute it in C)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle" if dtype.itemsize > 1 else "noshuffle"), Crc32cCodec()]


def small_codecs() -> list:
    """The small arrays (coords, tissue, labels, thumbnail, mask): zarr's default Zstd, and a checksum."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]


@dataclass
class TileResult:
    out: Path
    n_tiles: int
    seconds: float
    attrs: dict

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        a = self.attrs
        flag = f", QC flag: {a['qc_flag']}" if a.get("qc_flag") else ""
        return (
            f"{self.out}: {self.n_tiles} tiles of {a['tile_size']} px at {a['mpp']:.3g} µm/px "
            f"(level {a['level']}, {a['modality']}) in {self.seconds:.1f} s, {self.tiles_per_second:.1f} tiles/s{flag}"
        )


def tile_source(
    path: str | Path,
    out: str | Path,
    settings: TileSettings = TileSettings(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> TileResult:
    """Tile ``path`` into the zarr store ``out``; see the module docstring for the layout."""
    import zarr

    from pipeline.tissue import detect_modality, read_overview, tissue_mask, to_display_rgb

    start_time = time.perf_counter()
    path, out = Path(path), Path(out)
    settings.validate(path)
    if out.exists() and not overwrite:
        raise GaplessError(out, "the output store already exists", "remove it or pass --overwrite")

    annotations = None
    if settings.annotations:
        from pipeline.annotations import load_annotations

        annotations = load_annotations(settings.annotations)  # fail on bad annotations before any work

    helpers = _Helpers()  # none unless the grid has work for more than one process
    source = open_source(path, settings.kind)  # for the overview, then this process cuts from it too
    try:
        source_mpp, mpp_source = source.resolve_mpp(settings.slide_mpp)
        grid = plan_grid(source, source_mpp, settings.mpp, settings.tile_size, settings.stride)
        if grid.columns == 0 or grid.rows == 0:
            raise GaplessError(
                path,
                f"smaller than one tile: {source.dimensions[0]}×{source.dimensions[1]} px at {source_mpp:.3g} µm/px "
                f"cannot hold a {settings.tile_size}-px tile at {settings.mpp:.3g} µm/px",
                "use a smaller --tile-size or a coarser --mpp",
            )
        # helpers start now: their start-up overlaps the overview and tissue mask below
        helpers.start(path, source.kind, effective_workers(workers, grid.columns * grid.rows) - 1)
        W, H = source.dimensions
        # One overview read serves both the tissue mask (~16 px per tile) and the thumbnail (≤ 1024 px).
        mask_ds = max(1.0, grid.extent / MASK_PX_PER_TILE, max(W, H) / MASK_MAX_SIDE)
        thumb_ds = max(1.0, max(W, H) / THUMBNAIL_MAX_SIDE)
        overview, overview_ds = read_overview(source, min(mask_ds, thumb_ds))
        modality = detect_modality(overview) if settings.tissue in ("auto", "none") else settings.tissue
        method = modality if settings.tissue == "auto" else settings.tissue
        mask_src, mask_px = _shrink(overview, overview_ds, mask_ds, (W, H))
        mask = tissue_mask(mask_src, method, px_size_um=source_mpp * mask_px[0])
        all_coords = grid.coords()
        all_fractions = tissue_fractions(mask, mask_px, all_coords, grid.extent)
        keep = all_fractions >= settings.min_tissue
        coords, fractions = all_coords[keep], all_fractions[keep]
        n = len(coords)
        qc_flag = None
        if n == 0:
            cause = (
                f"no tissue found: 0 of {len(all_coords)} tiles have at least {settings.min_tissue:.0%} tissue "
                f"({method} mask covers {mask.mean():.1%} of the image)"
            )
            if not settings.allow_empty:
                raise GaplessError(
                    path, cause,
                    "check the image, lower --min-tissue, set --tissue brightfield|fluorescence|none, "
                    "or pass --allow-empty to keep a flagged empty store",
                )
            log.warning("%s: %s; writing an empty store flagged 'no tissue'", path, cause)
            qc_flag = "no tissue"

        labels = np.full(n, -1, dtype=np.int8)
        if annotations is not None:
            from pipeline.annotations import check_frame, tile_labels

            # objects outside the image stop here; objects off the tissue flag the store
            frame_flag = check_frame(annotations, (W, H), mask, mask_px, settings.positive_classes)
            if frame_flag and n:
                log.warning("%s: %s; are the coordinates level-0 px of this image? (training refuses this store "
                            "unless told to accept flagged stores)", settings.annotations, frame_flag)
                qc_flag = frame_flag
            labels = tile_labels(annotations, coords, grid.extent, settings.positive_classes)

        thumb_src, thumb_px = _shrink(overview, overview_ds, thumb_ds, (W, H))
        thumbnail = to_display_rgb(thumb_src, modality)
        channels, dtype = source.channels, source.dtype

        T = settings.tile_size
        tile_bytes = T * T * channels * dtype.itemsize
        workers = effective_workers(workers, n)
        per_shard = shard_tiles(n, tile_bytes, workers)

        # the store is built in <out>.partial and replaces out (with --overwrite) only once complete
        with atomic_directory(out, holds="zarr.json") as partial:
            try:
                root = zarr.open_group(partial, mode="w", zarr_format=3)
                root.create_array(  # filled shard by shard by the cutting processes, each with its own handle
                    "tiles", shape=(n, T, T, channels), chunks=(1, T, T, channels), shards=(per_shard, T, T, channels),
                    dtype=dtype, fill_value=0, compressors=tile_codecs(dtype), dimension_names=["tile", "y", "x", "c"],
                )
                small = small_codecs()
                root.create_array("coords", data=coords.astype(np.int64), chunks=(max(n, 1), 2), dimension_names=["tile", "xy"],
                                  compressors=small)
                root.create_array("tissue", data=fractions.astype(np.float32), chunks=(max(n, 1),), dimension_names=["tile"],
                                  compressors=small)
                root.create_array("labels", data=labels, chunks=(max(n, 1),), dimension_names=["tile"], compressors=small)
                root.create_array("thumbnail", data=thumbnail, chunks=thumbnail.shape, dimension_names=["y", "x", "rgb"],
                                  compressors=small)
                root.create_array("tissue_mask", data=mask.astype(np.uint8), chunks=mask.shape, dimension_names=["y", "x"],
                                  compressors=small)

                n_shards = math.ceil(n / per_shard)
                bar = _progress(n, f"tiling {path.name}", progress)
                job = (per_shard, coords, grid.level, grid.read_size, T)
                tiles_path = str(partial / "tiles")
                if workers == 1 or n_shards == 1:
                    stats = _cut_here(source, bar.update, None, _cut_shards, tiles_path, range(0, n, per_shard), *job)
                else:
                    stats = helpers.cut(source, workers - 1, tiles_path, n_shards, job, bar)
                bar.close()

                seconds = time.perf_counter() - start_time
                attrs = {
                    "schema": SCHEMA,
                    "source": str(path.resolve()),
                    "format": source.format,
                    "kind": source.kind,
                    "channel_names": list(source.channel_names),
                    "modality": modality,
                    "tissue_method": method,
                    "mpp": grid.tile_mpp,
                    "source_mpp": source_mpp,
                    "mpp_source": mpp_source,
                    "target_mpp": settings.mpp,
                    "level": grid.level,
                    "downsample": grid.downsample,
                    "read_size": grid.read_size,
                    "tile_size": T,
                    "stride": grid.stride,
                    "tile_extent": grid.extent,
                    "tile_step": grid.step,
                    "grid": [grid.columns, grid.rows],
                    "width": W,
                    "height": H,
                    "channels": channels,
                    "dtype": dtype.name,
                    "channel_stats": stats.summary(source.channel_names),
                    "min_tissue": settings.min_tissue,
                    "tissue_area_fraction": round(float(mask.mean()), 4),
                    "n_tiles": n,
                    "tiles_per_shard": per_shard,
                    "workers": workers,
                    "annotations": str(Path(settings.annotations).resolve()) if settings.annotations else None,
                    "positive_classes": list(settings.positive_classes),
                    "n_positive": int((labels == 1).sum()),
                    "thumbnail_downsample": list(thumb_px),
                    "tissue_mask_downsample": list(mask_px),
                    "qc_flag": qc_flag,
                    "seconds": round(seconds, 3),
                    "tool_version": __version__,
                }
                # every data file is written: record what the store holds, checked on every open
                attrs["integrity"] = integrity_record(partial)
                root.attrs.update(attrs)
            except BaseException:
                helpers.close()  # before the partial store is removed: no helper may still be writing
                raise
    finally:
        helpers.close()
        source.close()
    return TileResult(out, n, seconds, attrs)


def _shrink(image: np.ndarray, image_ds: tuple[float, float], ds: float, size: tuple[int, int]):
    """``image`` (at ``image_ds`` level-0 px per pixel) at ~``ds`` instead, and its exact (x, y) downsample."""
    if ds <= image_ds[0] * 1.01:
        return image, image_ds
    W, H = size
    w, h = max(1, round(W / ds)), max(1, round(H / ds))
    return resize(image, (w, h)), (W / w, H / h)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# Reading stores back, and their integrity. A store records when it is written every data file it
# holds and its size (attr ``integrity``); opening a store checks that record (one stat per file, no
# reading), so a deleted or truncated shard is refused before any work instead of reading as blank
# tiles (zarr reads a missing chunk as its fill value). Every chunk also carries a CRC32C checksum
# (``tile_codecs``), verified on every read: a changed byte is an error naming the store and the tile,
# and ``gapless info --verify`` reads every tile to find one.

INTEGRITY_VERSION = 1
RETILE_FIX = ("re-tile it: delete the store and re-run the workflow (Snakemake tiles it again; or `snakemake "
              "--forcerun tile`), or run `gapless tile` again with --overwrite")
_SHOWN = 3  # file names quoted in one error line


def integrity_record(folder: str | Path) -> dict:
    """``{"version", "files": {relative path: bytes}, "bytes", "tiles_shards"}`` of every file under ``folder``
    except the root ``zarr.json`` (it holds this record). A shard whose tiles are all the fill value (0)
    may not be written at all (zarrs leaves it out): it reads back as zeros, which is what it holds, so
    ``tiles_shards`` counts the shard files there are, not ⌈N / tiles per shard⌉."""
    folder = Path(folder)
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            key = (rel / name).as_posix()
            if key != "zarr.json":
                files[key] = os.stat(os.path.join(dirpath, name)).st_size
    shards = sum(1 for key in files if key.startswith("tiles/c/"))
    return {"version": INTEGRITY_VERSION, "files": files, "bytes": int(sum(files.values())), "tiles_shards": shards}


def seal_store(path: str | Path) -> dict:
    """Record the integrity of a store as it is now (for a store written or changed by other means than
    ``gapless tile``); returns the record."""
    import zarr

    record = integrity_record(path)
    zarr.open_group(path, mode="r+").attrs["integrity"] = record
    return record


def damaged(path: str | Path, what: str) -> GaplessError:
    """The one-line error for a tile store that is not what was written."""
    return GaplessError(path, f"damaged tile store: {what}", RETILE_FIX)


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_integrity(path: str | Path, attrs) -> dict:
    """Check the store at ``path`` against its integrity record (in ``attrs``): every recorded file is
    there with its recorded size. Files not in the record (e.g. Snakemake's ``.snakemake_timestamp``)
    are ignored. Returns ``{"status": "ok", "files", "bytes", "tiles_shards"}``; raises ``GaplessError``."""
    path = Path(path)
    record = attrs.get("integrity")
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise GaplessError(path, "the tile store has no integrity record (written by an older `gapless tile`), so it "
                                 "cannot be checked", RETILE_FIX)
    files: dict = record["files"]
    missing, resized = [], []
    for key, size in files.items():
        try:
            actual = os.stat(path / key).st_size
        except FileNotFoundError:
            missing.append(key)
            continue
        if actual != size:
            resized.append(f"{key} ({actual} bytes, {size} written)")
    if missing or resized:
        problems = []
        if missing:
            shards = [k for k in missing if k.startswith("tiles/c/")]
            kind = "shard files" if len(shards) == len(missing) else "files"
            total = record.get("tiles_shards", len(files)) if kind == "shard files" else len(files)
            problems.append(f"{len(missing)} of {total} {kind} missing: {_names(missing)}")
        if resized:
            problems.append(f"{len(resized)} file{'s' if len(resized) != 1 else ''} changed in size: {_names(resized)}")
        raise damaged(path, "; ".join(problems))
    return {"status": "ok", "files": len(files), "bytes": int(record.get("bytes", sum(files.values()))),
            "tiles_shards": int(record.get("tiles_shards", 0))}


def shard_key(tiles, index: int) -> str:
    """The file, relative to the store, that holds tile ``index`` of ``tiles``."""
    per_shard = (tiles.shards or tiles.chunks)[0]
    return "/".join(["tiles", "c", str(index // per_shard), *["0"] * (tiles.ndim - 1)])


_NOT_DAMAGE = (IndexError, MemoryError, TypeError)  # a wrong index or no memory: not the store's fault


def _read_cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "checksum" in text.lower():
        return "checksum mismatch"
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def tile_read_error(store: str | Path | None, tiles, index: int, exc: BaseException) -> GaplessError:
    """One line naming the store, the tile and its shard file for an error reading ``tiles[index]``."""
    return damaged(store, f"tile {index} ({shard_key(tiles, index)}) cannot be read ({_read_cause(exc)})")


def read_tiles(tiles, start: int, stop: int, store: str | Path | None) -> np.ndarray:
    """``tiles[start:stop]``; a tile that cannot be read (checksum mismatch, decoding error) is a
    ``GaplessError`` naming ``store``, the first bad tile and its shard, not a traceback from zarr."""
    try:
        return tiles[start:stop]
    except _NOT_DAMAGE:
        raise
    except Exception as exc:
        bad, cause = start, exc
        for i in range(start, min(stop, tiles.shape[0])):  # which tile: the rest of the batch may be fine
            try:
                tiles[i]
            except _NOT_DAMAGE:
                raise
            except Exception as tile_exc:
                bad, cause = i, tile_exc
                break
        raise tile_read_error(store, tiles, bad, cause) from None


def verify_store(path: str | Path, progress: bool = False) -> dict:
    """``check_integrity``, then decode every chunk of every array (each checksum verified): a changed
    byte that kept a file's size is found too. Returns the integrity summary with ``"verified"``
    (tiles decoded); raises ``GaplessError`` naming the first bad tile or array."""
    root = open_store(path)
    summary = check_integrity(path, root.attrs)
    for name, array in root.arrays():
        if name == "tiles":
            continue
        try:
            array[...]
        except _NOT_DAMAGE:
            raise
        except Exception as exc:
            raise damaged(path, f"array {name} cannot be read ({_read_cause(exc)})") from None
    tiles = root["tiles"]
    n = int(tiles.shape[0])
    per_shard = int((tiles.shards or tiles.chunks)[0])
    bar = _progress(n, f"verifying {Path(path).name}", progress)
    try:
        for start in range(0, n, per_shard):
            read_tiles(tiles, start, start + per_shard, path)
            bar.update(min(per_shard, n - start))
    finally:
        bar.close()
    return {**summary, "verified": n}


def open_store(path: str | Path, check: bool = True):
    """Open a tile store read-only, checking it is one and that it holds every file it was written with
    (``check_integrity``; ``check=False`` skips that, for tests of damage). A clear error otherwise."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise GaplessError(path, "no such tile store", "run `gapless tile` first")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise GaplessError(path, f"not a zarr store ({exc.__class__.__name__})", "pass a store written by `gapless tile`") from None
    if root.attrs.get("schema") != SCHEMA:
        raise GaplessError(path, f"not a gapless tile store (schema {root.attrs.get('schema')!r})", "pass a store written by `gapless tile`")
    if check:
        check_integrity(path, root.attrs)
    return root


def store_info(path: str | Path, verify: bool = False) -> dict:
    """The store's attrs plus N and the array shapes, as ``gapless info`` prints them; ``integrity`` is
    the check's summary (with ``verify``: every tile decoded), not the recorded file list."""
    root = open_store(path)
    info = dict(root.attrs)
    info["integrity"] = verify_store(path) if verify else check_integrity(path, root.attrs)
    info["n"] = int(root["tiles"].shape[0])
    info["arrays"] = {name: {"shape": list(arr.shape), "dtype": str(arr.dtype)} for name, arr in root.arrays()}
    info["path"] = str(Path(path))
    return info
