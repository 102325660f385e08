"""Cutting tiles into a store's shards, spread over processes.

Workers: one reader and one zarr handle per process; each writes whole shards, and writing one
shard overlaps reading the next (OpenSlide's reads run in C without the GIL). With several
workers, this process cuts too, alongside spawned helpers; every process claims the next shard
from a shared counter, so the work balances to within a shard however late a helper gets going.

Channel statistics are accumulated per shard and merged: exact histograms for integer data.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io import Source, open_source

log = logging.getLogger("gapless.tiling")

SHARD_BYTES = 32 * 2**20


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


def _shard_writer(tiles_path: str):
    """This process's writer of whole shards of the tile array (:func:`shard_writer`), made on first use
    (helpers start before the array exists)."""
    import zarr

    from pipeline.codecs import rust_can_write  # and registers the tile codecs in this process

    if "write" not in _worker:
        # the codec pipeline and write_empty_chunks are bound when an array is opened: this handle
        # gets the fast writer, and the rest of the process keeps zarr's defaults
        config = dict(_worker["write_config"])
        if not rust_can_write(tiles_path):  # JPEG: zarrs has no such codec (pipeline.shards writes the shards)
            config.pop("codec_pipeline.path", None)
        with zarr.config.set(config):
            _worker["write"] = shard_writer(zarr.open_array(tiles_path, mode="r+"))
    return _worker["write"]


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
    write = _shard_writer(tiles_path)
    report = _worker["report"]
    stats = ChannelStats(source.channels, _histogram_bins(source.dtype))
    pending = None
    # two shard buffers in turn: one being written while the other fills (the writer of a buffer is done
    # before it is filled again), so no shard pays for fresh pages (a third of the copying time)
    buffers = [np.empty((per_shard, tile_size, tile_size, source.channels), dtype=source.dtype) for _ in range(2)]
    with ThreadPoolExecutor(1) as writer:
        for n, start in enumerate(starts):
            block_coords = coords[start : start + per_shard]
            block = buffers[n % 2][: len(block_coords)]
            for i, (x, y) in enumerate(block_coords):
                region = source.read_region((int(x), int(y)), level, (read_size, read_size))
                block[i] = resize(region, (tile_size, tile_size)) if read_size != tile_size else region
            stats.add(block[:, ::STATS_STEP, ::STATS_STEP])
            if pending is not None:
                pending.result()
            pending = writer.submit(write, start, block)
            if report is not None:
                report(len(block))
        if pending is not None:
            pending.result()
    return stats


def shard_writer(tiles):
    """``write(start, block)`` for whole shards of the array ``tiles``: JPEG shards by
    :mod:`pipeline.shards` (a third of zarr's CPU per tile), anything else by zarr (zarrs where set)."""
    from pipeline.shards import jpeg_shard_writer

    return jpeg_shard_writer(tiles) or (lambda start, block: _write_shard(tiles, start, block))


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
