"""Training data: the table of every tile, datasets and loaders (splits: :mod:`pipeline.splits`; augmentation:
:mod:`pipeline.augment`).

Pixels stay in the tile stores (``results/tiles/{sample}.zarr``, see :mod:`pipeline.tiling`); what is
held in memory is a :class:`TileTable` of small arrays (store, tile index, label, coords per tile).
A :class:`TileDataset` opens the stores lazily in each DataLoader worker process and reads one tile
(one chunk, :class:`pipeline.tile_reader.TileReader`) per item. The workers only read and decode: a
batch leaves them as raw tiles (B×T×T×C, the store's dtype), and :class:`DeviceBatches` moves it to
the training device, where a :class:`pipeline.augment.TileTransform` augments and normalises it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from pipeline.errors import GaplessError
from pipeline.io import same_mpp
from pipeline.samples import Sample

log = logging.getLogger("gapless.data")

__all__ = [
    "TileTable",
    "build_tile_table",
    "channel_normalisation",
    "TileDataset",
    "balanced_sampler",
    "make_loader",
    "DeviceBatches",
    "data_fingerprint",
]



# ---------------------------------------------------------------------------------------------
# The tile table


@dataclass
class TileTable:
    """Every tile of a set of stores, as parallel (N,) arrays; the pixels stay in the stores.

    ``stores[k]`` holds the tiles of ``sample_ids[k]``; ``store_index`` (N,) int64 indexes both lists,
    ``tile_index`` (N,) int64 is the tile's row in that store's ``tiles``. ``tile_label`` (N,) int64
    is the store's annotation label where known (≥ 0), else the sample's label index (into
    ``classes``); ``sample_label`` (N,) int64 is always the sample's. ``coords`` (N, 2) int64 are
    the tiles' top-left corners (x, y) in level-0 px of their source.
    """

    stores: list[str]
    sample_ids: list[str]
    store_index: np.ndarray
    tile_index: np.ndarray
    tile_label: np.ndarray
    sample_label: np.ndarray
    coords: np.ndarray
    channels: int
    tile_size: int
    dtype: np.dtype
    modality: str = "unknown"
    mpp: float = float("nan")
    classes: list[str] = field(default_factory=list)
    store_attrs: list = field(default_factory=list, repr=False)  # TileStoreAttrs of each store

    def __len__(self) -> int:
        return len(self.tile_index)

    def subset(self, mask) -> "TileTable":
        """The tiles where ``mask`` (boolean (N,) or integer indices) selects; stores stay indexed as before."""
        sel = np.asarray(mask)
        if sel.dtype != bool:
            sel = np.asarray(sel, dtype=np.int64)
        return TileTable(
            list(self.stores), list(self.sample_ids), self.store_index[sel], self.tile_index[sel],
            self.tile_label[sel], self.sample_label[sel], self.coords[sel], self.channels, self.tile_size,
            self.dtype, self.modality, self.mpp, list(self.classes), self.store_attrs,
        )

    def for_samples(self, sample_ids) -> "TileTable":
        """The tiles of the given samples (e.g. one split)."""
        wanted = set(sample_ids)
        keep = [k for k, sample_id in enumerate(self.sample_ids) if sample_id in wanted]
        return self.subset(np.isin(self.store_index, keep))

    def class_counts(self) -> np.ndarray:
        """(K,) int64 number of tiles per class (by ``tile_label``)."""
        return np.bincount(self.tile_label, minlength=len(self.classes)).astype(np.int64)


def build_tile_table(
    samples: Sequence[Sample],
    store_for: Callable[[str], Path] | Mapping[str, str | Path],
    classes: Sequence[str],
    accept_flagged: bool = False,
) -> TileTable:
    """Read the small arrays (coords, labels) of each sample's store into one :class:`TileTable`.

    ``store_for``: sample id → store path (a function or a mapping). All stores must share channel
    count, tile size, dtype and modality: a model sees one kind of input. Stores flagged empty
    (0 tiles) are skipped with a warning. A store with tiles and a QC flag (e.g. its annotations are
    off the tissue, so its tile labels are likely wrong) is refused, every such store listed, unless
    ``accept_flagged``. Annotation labels (0/1: not touching / touching a positive object) index
    ``classes``, so ``classes[0]`` is the negative class.
    """
    classes = list(classes)
    lookup = store_for.__getitem__ if isinstance(store_for, Mapping) else store_for
    read = [_read_store(sample, Path(lookup(sample.sample_id)), classes) for sample in samples]
    kept = [r for r in read if r is not None]
    skipped = len(read) - len(kept)
    if not kept:
        raise GaplessError(None, f"none of the {len(samples)} samples has any tiles", "check the QC report of the tiling stage")
    flagged = [f"{r.path} ({r.attrs.qc_flag})" for r in kept if r.attrs.qc_flag]
    if flagged and not accept_flagged:
        raise GaplessError(
            None, f"{len(flagged)} tile store{'s are' if len(flagged) > 1 else ' is'} flagged by QC: {'; '.join(flagged)}",
            "fix the annotations and re-tile, or accept the flagged stores (gapless train --accept-flagged; "
            "config train.accept_flagged: true)",
        )
    for store in flagged:
        log.warning("training on a flagged store, as asked: %s", store)
    first = kept[0]
    for r in kept[1:]:
        if r.kind != first.kind:
            raise GaplessError(
                r.path, f"holds {_describe(*r.kind)} but {first.path} holds {_describe(*first.kind)}: one model takes one "
                "kind of input", "train slides and fluorescence images as separate cohorts (one sample sheet each), "
                "and tile every store of a cohort with the same --tile-size",
            )
    mpps = [float(r.attrs.mpp) for r in kept]
    mpp = float(np.median(mpps))
    odd = [str(r.path) for r, m in zip(kept, mpps) if not same_mpp(m, mpp)]  # mixed scales: said, not refused
    if odd:
        log.warning("%d store(s) are not at %.3g µm/px like the others, e.g. %s: tile every sample at one --mpp", len(odd), mpp, odd[0])
    n = [len(r.labels) for r in kept]
    table = TileTable(
        [str(r.path) for r in kept], [r.sample_id for r in kept],
        np.concatenate([np.full(m, k, np.int64) for k, m in enumerate(n)]),
        np.concatenate([r.start + np.arange(m, dtype=np.int64) for r, m in zip(kept, n)]),
        np.concatenate([np.where(r.labels >= 0, r.labels, r.label_index) for r in kept]).astype(np.int64),
        np.concatenate([np.full(m, r.label_index, np.int64) for r, m in zip(kept, n)]),
        np.concatenate([r.coords for r in kept]), *first.kind, mpp, classes, [r.attrs for r in kept],
    )
    counts = ", ".join(f"{c} {n}" for c, n in zip(classes, table.class_counts()))
    log.info("tile table: %d tiles from %d stores (%d empty, skipped): %s", len(table), len(kept), skipped, counts)
    return table


@dataclass
class _StoreTiles:
    """One store's part of a ``TileTable``: its labels and coords, and what kind of input it holds."""

    sample_id: str
    path: Path
    attrs: object  # TileStoreAttrs
    start: int  # the sample's first row in the store's tiles (a batch store holds several samples)
    kind: tuple  # (channels, tile size, dtype, modality)
    label_index: int
    labels: np.ndarray  # (n,) int64 annotation labels, −1 unknown
    coords: np.ndarray  # (n, 2) int64


def _read_store(sample: Sample, path: Path, classes: list[str]) -> _StoreTiles | None:
    """The small arrays of one sample's store (opened and checked first); None for a store without tiles."""
    from pipeline.store import open_sample

    if sample.label not in classes:
        raise GaplessError(None, f"sample {sample.sample_id}: label {sample.label!r} is not one of the classes {classes}",
                           "add it to config `classes` or fix the sample sheet")
    view = open_sample(path, sample.sample_id)  # checks the store holds every file it was written with
    attrs, tiles = view.attrs, view.tiles  # opening an array reads its metadata: once
    if view.n == 0:
        log.warning("%s: no tiles (%s); sample %s is left out", path, attrs.qc_flag or "empty store", sample.sample_id)
        return None
    labels = np.asarray(view.labels(), dtype=np.int64)
    if labels.size and labels.max() >= len(classes):
        raise GaplessError(path, f"tile label {labels.max()} but only {len(classes)} classes", "check config `classes`")
    kind = (int(tiles.shape[3]), int(tiles.shape[1]), np.dtype(tiles.dtype), str(attrs.modality))
    return _StoreTiles(sample.sample_id, path, attrs, view.start, kind, classes.index(sample.label), labels,
                       view.coords())


def _describe(channels, tile_size, dtype, modality) -> str:
    return f"{channels} channel{'s' if channels != 1 else ''} of {dtype.name} at {tile_size} px ({modality})"


def channel_normalisation(table: TileTable) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in raw units (0–255 for 8 bit, counts for 16 bit) over ``table``'s tiles.

    Pooled from each store's ``channel_stats`` (exact, from every 8th pixel in y and x), each store
    weighted by its number of tiles in ``table``: no pixel is read again. For a subset of a store's
    tiles that store's statistics stand for the subset. A constant channel (std 0) gets std 1.
    """
    weights = np.bincount(table.store_index, minlength=len(table.stores)).astype(np.float64)
    mean_acc = np.zeros(table.channels)
    square_acc = np.zeros(table.channels)
    total = 0.0
    for k, w in enumerate(weights):
        if w == 0:
            continue
        stats = table.store_attrs[k].channel_stats if table.store_attrs else {}
        if "mean" not in stats or "std" not in stats:
            raise GaplessError(table.stores[k], "no channel statistics in the store's attrs", "re-tile it with this version of `gapless tile`")
        m, s = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        mean_acc += w * m
        square_acc += w * (s**2 + m**2)
        total += w
    if total == 0:
        raise GaplessError(None, "no tiles to compute the channel normalisation from", "check the training split")
    mean = mean_acc / total
    std = np.sqrt(np.maximum(square_acc / total - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]


# ---------------------------------------------------------------------------------------------
# Dataset and loaders


class TileDataset(torch.utils.data.Dataset):
    """Item i: (tile, tile label int64, sample index int64) of tile i of ``table``.

    The tile is the raw T×T×C tensor in the store's dtype (what the loader's workers hand on; a
    ``TileTransform`` makes the model's input of a batch of them), or with ``transform`` that
    transform's output for it alone, C×S×S float32 (e.g. the evaluation transform, for a few tiles
    outside a loader). The sample index indexes ``table.sample_ids``. Stores are opened on first use
    in each process (never shared across processes: a fork is detected by pid).
    """

    def __init__(self, table: TileTable, transform=None):
        self.table = table
        self.transform = transform
        self._readers: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = {}
        return state

    def _reader(self, k: int):
        if self._pid != os.getpid():  # a forked worker: handles from the parent are not used
            self._readers, self._pid = {}, os.getpid()
        reader = self._readers.get(k)
        if reader is None:
            from pipeline.tile_reader import TileReader

            reader = self._readers[k] = TileReader(self.table.stores[k])
        return reader

    def read_tile(self, i: int) -> np.ndarray:
        """The raw tile (T×T×C, the store's dtype) of table row ``i``.

        A tile that cannot be read (its checksum does not match, it does not decode) raises a
        ``GaplessError`` naming the store and the tile; from a DataLoader worker it reaches the main
        process as the same one line (see ``GaplessError``).
        """
        return self._reader(int(self.table.store_index[i])).read(int(self.table.tile_index[i]))

    def __getitem__(self, i: int):
        tile = torch.from_numpy(self.read_tile(i))
        if self.transform is not None:
            tile = self.transform(tile[None])[0]
        return (
            tile,
            torch.tensor(int(self.table.tile_label[i]), dtype=torch.int64),
            torch.tensor(int(self.table.store_index[i]), dtype=torch.int64),
        )


def balanced_sampler(table: TileTable, seed: int, num_samples: int | None = None):
    """A ``WeightedRandomSampler`` (with replacement) drawing every class of ``tile_label`` equally often.

    Each tile's weight is 1 / (tiles of its class); ``num_samples`` defaults to the table's length.
    The sampler's generator is seeded, so the draws repeat for a seed.
    """
    if len(table) == 0:
        raise GaplessError(None, "no tiles to sample from", "check the split and the tile stores")
    counts = np.bincount(table.tile_label)
    weights = 1.0 / counts[table.tile_label]
    generator = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples or len(table), replacement=True, generator=generator
    )


def make_loader(dataset, batch_size: int, workers: int, sampler=None, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, pin_memory: bool | None = None):
    """A DataLoader of raw tile batches that repeats for a seed: seeded shuffling (the sampler has its own seed).

    ``workers`` > 0 keeps the worker processes alive between epochs. ``pin_memory`` (default: when
    CUDA is present) puts batches in page-locked memory, so their copy to the GPU can overlap work.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=generator,
        drop_last=drop_last,
    )


class DeviceBatches:
    """The batches of ``loader`` (raw tiles, labels, sample indices) with the tiles on ``device`` and
    through ``transform``: (B×C×S×S float32 on ``device``, labels, sample indices on the CPU).

    On CUDA the next batch's copy runs on a side stream while this batch is being used (from pinned
    memory, ``non_blocking``), and the transform runs on the device. ``len()`` is the loader's.
    """

    def __init__(self, loader, transform, device):
        self.loader, self.transform, self.device = loader, transform, torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def upload(batch):
            x, *rest = batch
            if stream is None:
                return (x.to(self.device), *rest)
            with torch.cuda.stream(stream):
                return (x.to(self.device, non_blocking=True), *rest)

        def finish(batch):
            x, *rest = batch
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)
                x.record_stream(torch.cuda.current_stream(self.device))  # its memory is used on this stream now
            return (self.transform(x), *rest)

        pending = None
        for batch in self.loader:
            following = upload(batch)  # in flight while the consumer works on ``pending``
            if pending is not None:
                yield finish(pending)
            pending = following
        if pending is not None:
            yield finish(pending)


# ---------------------------------------------------------------------------------------------
# Fingerprint

# attrs that say where or how fast a store was made, not what it holds
_VOLATILE_ATTRS = ("seconds", "source", "annotations", "integrity")  # integrity: the files' sizes, i.e. storage


def data_fingerprint(sample_sheet_path: str | Path | None, stores: Sequence[str | Path]) -> str:
    """A short hex digest (16 characters) of the data a run trains on.

    sha256 over the sample sheet's bytes (when given) and, for each store in name order, its name,
    its attrs (JSON with sorted keys, without ``seconds``, ``source``, ``annotations`` and ``integrity``,
    which are timings, absolute paths and the stored files' sizes) and the bytes of ``coords`` and ``labels``. Pixels are not read.
    """
    from pipeline.store import open_store

    digest = hashlib.sha256()
    if sample_sheet_path is not None:
        digest.update(b"sheet\0")
        digest.update(Path(sample_sheet_path).read_bytes())
    for path in sorted({Path(s) for s in stores}, key=lambda p: (p.name, str(p))):  # a batch store once
        root = open_store(path)
        attrs = {k: v for k, v in dict(root.attrs).items() if k not in _VOLATILE_ATTRS}
        if "samples" in attrs:  # a batch store: each sample's attrs, without their volatile ones either
            attrs["samples"] = [{k: v for k, v in e.items() if k not in _VOLATILE_ATTRS} for e in attrs["samples"]]
        digest.update(b"store\0" + path.name.encode() + b"\0")
        digest.update(json.dumps(attrs, sort_keys=True, default=str).encode())
        for name in ("coords", "labels"):
            arr = np.ascontiguousarray(root[name][:])
            digest.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()[:16]
