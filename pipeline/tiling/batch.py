"""``tile_batch``: many cell images into one batch store, by one process (schema ``gapless.tilebatch/1``,
see :mod:`pipeline.store`).

A screening campaign has 10⁴–10⁵ fields of a few hundred cells each: a job and a store per field would
cost a second of start-up and a dozen files each. A batch job opens its readers and zarr once, and
for each field reads it, surveys it (tissue mask, tiles kept, labels, a small thumbnail) and appends
its tiles to the batch's ``tiles`` array in whole shards (one writer: no partial-shard writes). The
store is built under ``<out>.partial`` and renamed when complete; the manifest beside it
(``<batch>.json``), which the workflow waits for, is written last. A field that cannot be tiled is
reported with every other such field of the batch, and no store is written.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.codecs import tile_codec
from pipeline.errors import GaplessError, SampleSheetError
from pipeline.files import atomic_directory
from pipeline.io import ArraySource, open_source
from pipeline.samples import Sample
from pipeline.store import (
    BATCH_SCHEMA,
    integrity_record,
    small_codecs,
    tile_codecs,
    write_manifest,
)
from pipeline.tiling import cutting
from pipeline.tiling.cutting import (
    SHARD_BYTES,
    STATS_STEP,
    ChannelStats,
    _histogram_bins,
    tile_write_config,
)
from pipeline.tiling.grid import TileSettings, fit_whole
from pipeline.tiling.tiler import _attrs, _plan, _survey

log = logging.getLogger("gapless.tiling")

BATCH_THUMBNAIL_SIDE = 256  # a field's thumbnail in a batch store (a slide's is up to 1024 px)


@dataclass
class BatchResult:
    out: Path
    manifest: Path
    samples: int
    n_tiles: int
    seconds: float
    flagged: list[str]

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else float("nan")
        flags = f"; {len(self.flagged)} flagged: {', '.join(self.flagged[:5])}" if self.flagged else ""
        return (f"{self.out}: {self.samples} samples, {self.n_tiles} tiles in {self.seconds:.1f} s "
                f"({rate:.1f} samples/s){flags}")


class _Appender:
    """Appends tiles to a batch store's ``tiles`` array in whole shards (the last one when closed)."""

    def __init__(self, root, folder: Path, tile_size: int, channels: int, dtype: np.dtype, codec: dict):
        import zarr

        from pipeline.codecs import rust_can_write

        self.per_shard = max(16, SHARD_BYTES // (tile_size * tile_size * channels * dtype.itemsize))
        shape = (tile_size, tile_size, channels)
        root.create_array("tiles", shape=(0, *shape), chunks=(1, *shape), shards=(self.per_shard, *shape), dtype=dtype,
                          fill_value=0, **tile_codecs(dtype, codec), dimension_names=["tile", "y", "x", "c"])
        config = tile_write_config() if rust_can_write(folder / "tiles") else {"array.write_empty_chunks": True}
        with zarr.config.set(config):  # the fast writer (zarrs, when it has the codec), bound to this handle
            self.tiles = zarr.open_array(folder / "tiles", mode="r+")
        self.write = cutting.shard_writer(self.tiles)  # it follows the array's resizes (zarr resizes in place)
        self.buffer = np.empty((self.per_shard, *shape), dtype)
        self.spare = np.empty_like(self.buffer)
        self.filled = 0  # tiles in the buffer
        self.written = 0  # tiles in the store (or being written)
        self.dtype, self.shape, self.codec = dtype, shape, codec
        self.writer = ThreadPoolExecutor(1)  # a shard is encoded while the next fields are read
        self.pending = None

    def add(self, block: np.ndarray) -> None:
        while len(block):
            take = min(len(block), self.per_shard - self.filled)
            self.buffer[self.filled : self.filled + take] = block[:take]
            self.filled, block = self.filled + take, block[take:]
            if self.filled == self.per_shard:
                self._flush()

    def _flush(self) -> None:
        if not self.filled:
            return
        self._wait()
        self.tiles.resize((self.written + self.filled, *self.shape))
        self.pending = self.writer.submit(self.write, self.written, self.buffer[: self.filled])
        self.written, self.filled = self.written + self.filled, 0
        # the full buffer is the writer's until it is done: the other one fills meanwhile
        self.buffer, self.spare = self.spare, self.buffer

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> int:
        """Write the last shard and wait for every write; the number of tiles written."""
        try:
            self._flush()
            self._wait()
        finally:
            self.writer.shutdown(wait=True)
        return self.written


def tile_batch(samples: Sequence[Sample], out: str | Path, manifest: str | Path, settings: TileSettings = TileSettings(),
               progress: bool = True) -> BatchResult:
    """Tile ``samples`` (cell images; each its own ``mpp`` and ``annotations`` from the sheet) with the grid
    of ``settings`` into the batch store ``out``, then write ``manifest``. Returns what was done."""
    import zarr
    from tqdm import tqdm

    start_time = time.perf_counter()
    out, manifest = Path(out), Path(manifest)
    settings.validate(out)
    if not samples:
        raise GaplessError(out, "a batch without samples", "give the batch at least one sample")
    problems, entries, parts = [], [], {"coords": [], "tissue": [], "labels": [], "thumbnail": [], "tissue_mask": []}
    with atomic_directory(out, holds="zarr.json") as partial:
        root = zarr.open_group(partial, mode="w", zarr_format=3)
        appender = None
        for sample in tqdm(samples, desc=f"tiling {out.name}", unit="sample", disable=not progress, file=sys.stderr,
                           dynamic_ncols=True):
            try:
                entry, tiles, arrays = _tile_one(sample, settings, appender.written + appender.filled if appender else 0)
            except GaplessError as error:
                problems.append(f"{sample.sample_id}: {error.message}")
                continue
            if appender is None:  # the first sample decides the codec: JPEG for 8-bit RGB brightfield, else lossless
                codec = tile_codec(settings.codec, settings.quality, tiles.dtype, tiles.shape[-1], entry["modality"])
                appender = _Appender(root, partial, entry["tile_size"], tiles.shape[-1], tiles.dtype, codec)
            elif tiles.dtype != appender.dtype or tiles.shape[-1] != appender.shape[-1]:
                problems.append(f"{sample.sample_id}: {sample.path}: holds {tiles.shape[-1]} channel(s) of "
                                f"{tiles.dtype.name}, unlike the batch's first sample; give each kind of image a cohort of its own")
                continue
            elif tiles.shape[1:] != appender.shape:  # whole-field tiles of fields of another size
                problems.append(f"{sample.sample_id}: {sample.path}: its whole-field tile is {tiles.shape[1]} px, the "
                                f"batch's first field's {appender.shape[0]} px; whole-field tiling needs fields of one "
                                "size per cohort: resize them, or give each field size a cohort (sample sheet) of its own")
                continue
            if not problems:
                appender.add(tiles)
            entries.append({**entry, "tile_codec": appender.codec})
            for name, value in arrays.items():
                parts[name].append(value)
        if problems:
            raise SampleSheetError(out, problems)  # every bad sample of the batch, and no store
        n = appender.close()
        _write_small_arrays(root, parts)
        attrs = {"schema": BATCH_SCHEMA, "samples": entries, "tile_size": int(appender.shape[0]),
                 "channels": int(appender.shape[-1]), "dtype": appender.dtype.name, "n_tiles": n,
                 "tiles_per_shard": appender.per_shard, "tool_version": __version__,
                 "seconds": round(time.perf_counter() - start_time, 3)}
        attrs["integrity"] = integrity_record(partial)
        root.update_attributes(attrs)
    write_manifest(manifest, out, [e["sample_id"] for e in entries])
    flagged = [e["sample_id"] for e in entries if e.get("qc_flag")]
    return BatchResult(out, manifest, len(entries), n, time.perf_counter() - start_time, flagged)


def _tile_one(sample: Sample, settings: TileSettings, start: int) -> tuple[dict, np.ndarray, dict]:
    """One field: its attributes (a ``TileStoreAttrs`` entry with ``sample_id`` and ``start``), its tiles
    (N, T, T, C) and its rows of the small arrays."""
    from pipeline.annotations import load_annotations

    t0 = time.perf_counter()
    own = replace(settings, slide_mpp=sample.mpp, kind=sample.kind or "image",
                  annotations=str(sample.annotations) if sample.annotations else None)
    annotations = load_annotations(own.annotations) if own.annotations else None
    with open_source(sample.path, own.kind) as source:
        source_mpp, mpp_source = source.resolve_mpp(own.slide_mpp)
        own = fit_whole(own, source, source_mpp, sample.path)
        grid = _plan(source, sample.path, source_mpp, own)
        survey = _survey(source, sample.path, own, annotations, grid, source_mpp, mpp_source, BATCH_THUMBNAIL_SIDE)
        tiles = _cut(source, survey.coords, grid, own.tile_size)
        stats = ChannelStats(source.channels, _histogram_bins(source.dtype))
        stats.add(tiles[:, ::STATS_STEP, ::STATS_STEP])
        entry = _attrs(source, sample.path, own, survey, stats, 0, 1, time.perf_counter() - t0)
    entry.pop("integrity", None)
    entry.update(sample_id=sample.sample_id, start=start, thumbnail_shape=list(survey.thumbnail.shape),
                 tissue_mask_shape=list(survey.mask.shape))
    arrays = {"coords": survey.coords.astype(np.int64), "tissue": survey.fractions.astype(np.float32),
              "labels": survey.labels, "thumbnail": survey.thumbnail, "tissue_mask": survey.mask.astype(np.uint8)}
    return entry, tiles, arrays


def _cut(source, coords: np.ndarray, grid, T: int) -> np.ndarray:
    """(N, T, T, C) tiles at ``coords``. A cell image held in memory, tiled at its own scale without
    overlap, is cut with one reshape of its pixels (a view) and one gather; anything else tile by tile."""
    if (isinstance(source, ArraySource) and grid.level == 0 and grid.read_size == T and grid.step == T
            and len(coords) and not (coords % T).any()):
        rows, cols = grid.rows, grid.columns
        r, c = coords[:, 1] // T, coords[:, 0] // T
        tiles = np.empty((len(coords), T, T, source.channels), source.dtype)
        for ch in range(source.channels):  # plane by plane: a planar image's planes are contiguous (6× faster)
            plane = source.pixels[: rows * T, : cols * T, ch]  # a view: the reshape below splits its axes
            tiles[..., ch] = plane.reshape(rows, T, cols, T).swapaxes(1, 2)[r, c]
        return tiles
    tiles = np.empty((len(coords), T, T, source.channels), source.dtype)
    for i, (x, y) in enumerate(coords):
        region = source.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size))
        tiles[i] = cutting.resize(region, (T, T)) if grid.read_size != T else region
    return tiles


def _write_small_arrays(root, parts: dict) -> None:
    """The per-tile rows concatenated; the per-sample pictures stacked, padded to the largest."""
    small = small_codecs()
    for name, dims in (("coords", ["tile", "xy"]), ("tissue", ["tile"]), ("labels", ["tile"])):
        data = np.concatenate(parts[name])
        root.create_array(name, data=data, chunks=(max(len(data), 1), *data.shape[1:]), dimension_names=dims,
                          compressors=small)
    for name, dims in (("thumbnail", ["sample", "y", "x", "rgb"]), ("tissue_mask", ["sample", "y", "x"])):
        pictures = parts[name]
        shape = tuple(max(p.shape[d] for p in pictures) for d in range(pictures[0].ndim))
        stack = np.zeros((len(pictures), *shape), pictures[0].dtype)
        for i, p in enumerate(pictures):
            stack[(i, *(slice(0, s) for s in p.shape))] = p
        root.create_array(name, data=stack, chunks=stack.shape, dimension_names=dims, compressors=small)
