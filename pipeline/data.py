"""Training data: the table of every tile, augmentation, datasets and loaders (splits: :mod:`pipeline.splits`).

Pixels stay in the tile stores (``results/tiles/{sample}.zarr``, see :mod:`pipeline.tiling`); what is
held in memory is a :class:`TileTable` of small arrays (store, tile index, label, coords per tile).
A :class:`TileDataset` opens the stores lazily in each DataLoader worker process and reads one tile
(one zarr chunk) per item.

Augmentation (albumentations, :func:`build_transforms`):

* D4 symmetry (the 8 rotations/flips): a tissue section has no preferred orientation.
* Brightfield RGB: a stain jitter in HED space (:class:`HEDJitter`, after Tellez et al. 2019,
  "Quantifying the effects of data augmentation and stain color normalization in convolutional
  neural networks for computational pathology"). ``A.HEStain`` (albumentations 2.0.8) runs on uint8
  but is not used: with its preset matrices it projects every pixel onto a two-stain basis and
  rebuilds it with a foreign matrix, so even at scale 1 and shift 0 it recolours a tile (on
  ``tests/data/he-target.png`` the mean blue goes from 139 to 175–185 of 255, a systematic
  train/eval shift); its ``vahadane`` method is close to the identity but costs ~16 ms per 96-px tile.
* Fluorescence, or any other channel count: :class:`ChannelIntensityJitter`, an independent
  gamma/contrast/brightness per channel in float32 raw units. albumentations' own intensity
  transforms clip float32 images to [0, 1] and apply one factor to all channels, which suits
  neither 16-bit counts nor channels imaged with separate exposures.
* Then ``A.Normalize`` with per-channel mean/std in raw units (:func:`channel_normalisation`) to
  float32, and ``A.Resize`` when the model wants another size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.utils.data

from pipeline.errors import GaplessError
from pipeline.samples import Sample
from pipeline.splits import split_samples  # noqa: F401  (re-exported: the loaders' callers split first)

log = logging.getLogger("gapless.data")

__all__ = [
    "split_samples",
    "TileTable",
    "build_tile_table",
    "channel_normalisation",
    "HEDJitter",
    "ChannelIntensityJitter",
    "build_transforms",
    "seed_transform",
    "TileDataset",
    "balanced_sampler",
    "make_loader",
    "data_fingerprint",
]

MPP_TOLERANCE = 0.05  # stores whose µm/px differ by more than this (relative) are mixed with a warning


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
    store_attrs: list[dict] = field(default_factory=list, repr=False)

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
    from pipeline.tiling import open_store

    classes = list(classes)
    lookup = store_for.__getitem__ if isinstance(store_for, Mapping) else store_for
    stores, ids, attrs_list = [], [], []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("store", "tile", "tile_label", "sample_label", "coords")}
    first = None  # (path, channels, tile_size, dtype, modality) of the first store
    skipped, flagged = [], []
    for sample in samples:
        if sample.label not in classes:
            raise GaplessError(
                None, f"sample {sample.sample_id}: label {sample.label!r} is not one of the classes {classes}",
                "add it to config `classes` or fix the sample sheet",
            )
        path = Path(lookup(sample.sample_id))
        root = open_store(path)  # checks the store holds every file it was written with, before any reading
        attrs = {k: v for k, v in root.attrs.items() if k != "integrity"}  # the file list: storage, not data
        tiles = root["tiles"]  # opening an array reads its metadata: once
        n = int(tiles.shape[0])
        if n == 0:
            log.warning("%s: no tiles (%s); sample %s is left out", path, attrs.get("qc_flag") or "empty store", sample.sample_id)
            skipped.append(sample.sample_id)
            continue
        if attrs.get("qc_flag"):
            flagged.append(f"{path} ({attrs['qc_flag']})")
        shape = (int(tiles.shape[3]), int(tiles.shape[1]), np.dtype(tiles.dtype), str(attrs.get("modality", "unknown")))
        if first is None:
            first = (path, *shape)
        elif shape != first[1:]:
            def describe(c, t, d, m):
                return f"{c} channel{'s' if c != 1 else ''} of {d.name} at {t} px ({m})"

            raise GaplessError(
                path,
                f"holds {describe(*shape)} but {first[0]} holds {describe(*first[1:])}: one model takes one kind of input",
                "train slides and fluorescence images as separate cohorts (one sample sheet each), "
                "and tile every store of a cohort with the same --tile-size",
            )
        label_index = classes.index(sample.label)
        labels = np.asarray(root["labels"][:], dtype=np.int64)
        if labels.size and labels.max() >= len(classes):
            raise GaplessError(path, f"tile label {labels.max()} but only {len(classes)} classes", "check config `classes`")
        stores.append(str(path))
        ids.append(sample.sample_id)
        attrs_list.append(attrs)
        k = len(stores) - 1
        parts["store"].append(np.full(n, k, np.int64))
        parts["tile"].append(np.arange(n, dtype=np.int64))
        parts["tile_label"].append(np.where(labels >= 0, labels, label_index))
        parts["sample_label"].append(np.full(n, label_index, np.int64))
        parts["coords"].append(np.asarray(root["coords"][:], dtype=np.int64).reshape(n, 2))
    if flagged and not accept_flagged:
        raise GaplessError(
            None, f"{len(flagged)} tile store{'s are' if len(flagged) > 1 else ' is'} flagged by QC: {'; '.join(flagged)}",
            "fix the annotations and re-tile, or accept the flagged stores (gapless train --accept-flagged; "
            "config train.accept_flagged: true)",
        )
    for store in flagged:
        log.warning("training on a flagged store, as asked: %s", store)
    if first is None:
        raise GaplessError(None, f"none of the {len(samples)} samples has any tiles", "check the QC report of the tiling stage")
    mpps = [float(a.get("mpp", float("nan"))) for a in attrs_list]
    mpp = float(np.median(mpps))
    odd = [s for s, m in zip(stores, mpps) if abs(m - mpp) > MPP_TOLERANCE * mpp]
    if odd:
        log.warning("%d store(s) are not at %.3g µm/px like the others, e.g. %s: tile every sample at one --mpp", len(odd), mpp, odd[0])
    table = TileTable(
        stores, ids,
        np.concatenate(parts["store"]), np.concatenate(parts["tile"]),
        np.concatenate(parts["tile_label"]).astype(np.int64), np.concatenate(parts["sample_label"]),
        np.concatenate(parts["coords"]), first[1], first[2], first[3], first[4], mpp, classes, attrs_list,
    )
    counts = ", ".join(f"{c} {n}" for c, n in zip(classes, table.class_counts()))
    log.info("tile table: %d tiles from %d stores (%d empty, skipped): %s", len(table), len(stores), len(skipped), counts)
    return table


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
        stats = table.store_attrs[k].get("channel_stats", {}) if table.store_attrs else {}
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
# Transforms


class HEDJitter(A.ImageOnlyTransform):
    """Stain jitter of brightfield RGB in HED space (Tellez et al. 2019): per stain k ∈ {H, E},
    concentration' = concentration·α_k + β_k, α_k ~ U(1 ± alpha), β_k ~ U(± beta) in optical density
    (natural log) units; the residual (non-H&E) channel is left alone.

    Colour deconvolution uses Ruifrok & Johnston's H and E vectors and their orthogonal complement,
    a full-rank basis, so α = 1, β = 0 returns the tile unchanged (up to rounding) — unlike a
    two-stain projection. Works on uint8 or uint16 RGB (white = the dtype's maximum) and keeps the dtype.
    """

    def __init__(self, alpha: float = 0.15, beta: float = 0.05, p: float = 0.8):
        super().__init__(p=p)
        self.alpha = float(alpha)
        self.beta = float(beta)
        h = np.array([0.65, 0.70, 0.29])
        e = np.array([0.07, 0.99, 0.11])
        h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
        r = np.cross(h, e)
        self._stains = np.stack([h, e, r / np.linalg.norm(r)])  # rows: OD of one unit of each stain
        self._unmix = np.linalg.inv(self._stains)

    def get_params(self):
        rng = self.random_generator
        scale = np.ones(3)
        shift = np.zeros(3)
        scale[:2] = rng.uniform(1 - self.alpha, 1 + self.alpha, 2)
        shift[:2] = rng.uniform(-self.beta, self.beta, 2)
        return {"scale": scale, "shift": shift}

    def apply(self, img, scale, shift, **params):
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"HEDJitter needs RGB (H×W×3), got shape {img.shape}")
        white = float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else 1.0
        od = -np.log(np.maximum(img.astype(np.float32), 1.0 if white > 1 else 1e-4) / white)
        # the whole jitter is one linear map in OD space: od · unmix · diag(scale) · stains + shift · stains
        mix = (self._unmix * scale[None, :]) @ self._stains
        od = od @ mix.astype(np.float32) + (shift @ self._stains).astype(np.float32)
        out = white * np.exp(-np.maximum(od, 0.0))
        if img.dtype.kind in "ui":
            return np.rint(out).astype(img.dtype)
        return out.astype(img.dtype)

    def get_transform_init_args_names(self):
        return ("alpha", "beta")


class ChannelIntensityJitter(A.ImageOnlyTransform):
    """Independent gamma, contrast and brightness per channel, in float32 raw units (never clipped above).

    For channel c with mean m_c and std s_c (raw units): x ← r·(x/r)^γ with r = m_c + 2·s_c and
    γ ~ logU(gamma); then x ← m_c + a·(x − m_c), a ~ U(contrast); then x ← x + b·s_c, b ~ U(brightness);
    finally x ≥ 0. Output float32 in raw units, so a 16-bit channel keeps its full range.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], gamma=(0.8, 1.25), contrast=(0.8, 1.2),
                 brightness=(-0.2, 0.2), p: float = 0.8):
        super().__init__(p=p)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.gamma = tuple(gamma)
        self.contrast = tuple(contrast)
        self.brightness = tuple(brightness)

    def get_params(self):
        rng, n = self.random_generator, len(self.mean)
        return {
            "gamma": np.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1]), n)).astype(np.float32),
            "contrast": rng.uniform(*self.contrast, n).astype(np.float32),
            "brightness": rng.uniform(*self.brightness, n).astype(np.float32),
        }

    def apply(self, img, gamma, contrast, brightness, **params):
        x = img.astype(np.float32)
        if x.ndim == 2:
            x = x[..., None]
        if x.shape[-1] != len(self.mean):
            raise ValueError(f"ChannelIntensityJitter was built for {len(self.mean)} channels, got {x.shape[-1]}")
        ref = np.maximum(self.mean + 2 * self.std, 1e-6)
        x = ref * np.power(np.maximum(x, 0.0) / ref, gamma)
        x = self.mean + contrast * (x - self.mean) + brightness * self.std
        return np.maximum(x, 0.0, out=x).reshape(img.shape) if img.ndim == 2 else np.maximum(x, 0.0, out=x)

    def get_transform_init_args_names(self):
        return ("mean", "std", "gamma", "contrast", "brightness")


def build_transforms(
    modality: str,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
    tile_size: int | None = None,
):
    """An ``albumentations.Compose`` taking an H×W×C tile (uint8/uint16) to H'×W'×C float32, normalised.

    ``train``: D4 symmetry, then a stain jitter (brightfield RGB: :class:`HEDJitter` and a mild
    brightness/contrast change) or a per-channel intensity jitter (fluorescence, or any channel
    count other than 3: :class:`ChannelIntensityJitter`), then normalisation. Eval: normalisation
    only (deterministic). ``mean``/``std`` are per channel in raw units (:func:`channel_normalisation`).
    ``image_size``: resize to this edge (px) when it differs from the tile; ``tile_size`` (optional)
    picks area interpolation for shrinking, bilinear for enlarging.
    """
    import cv2

    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
    steps = []
    if train:
        steps.append(A.D4(p=1.0))
        if modality == "brightfield" and len(mean) == 3:
            steps.append(HEDJitter(p=0.8))
            # on uint8 this is a lookup table, so it stays exact and cheap
            steps.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5))
        else:
            steps.append(ChannelIntensityJitter(mean, std, p=0.8))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=1.0))  # (x − mean) / std in raw units
    if image_size is not None and image_size != tile_size:
        shrink = tile_size is not None and image_size < tile_size
        steps.append(A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
    return A.Compose(steps)


def seed_transform(transform, seed: int) -> None:
    """Seed an albumentations pipeline: each transform gets its own stream derived from ``seed``.

    ``Compose.set_random_seed`` gives every transform the same seed, so two transforms with p = 0.5
    would always fire together; here each child gets a distinct seed.
    """
    if transform is None or not hasattr(transform, "set_random_seed"):
        return
    transform.set_random_seed(int(seed) % 2**32)
    children = getattr(transform, "transforms", None) or []
    for child, child_seed in zip(children, np.random.SeedSequence(int(seed) % 2**32).generate_state(max(len(children), 1))):
        seed_transform(child, int(child_seed))


# ---------------------------------------------------------------------------------------------
# Dataset and loaders


class TileDataset(torch.utils.data.Dataset):
    """Item i: (C×H×W float32 tensor, tile label int64, sample index int64) of tile i of ``table``.

    The sample index indexes ``table.sample_ids``. Zarr stores are opened on first use in each
    process (never shared across processes: a fork is detected by pid), and reading one tile reads
    one chunk of its shard. ``transform``: an albumentations pipeline (:func:`build_transforms`)
    returning H×W×C float32; ``None`` returns the raw values as float32.
    """

    def __init__(self, table: TileTable, transform=None):
        self.table = table
        self.transform = transform
        self._arrays: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def _tiles(self, k: int):
        if self._pid != os.getpid():  # a forked worker: handles from the parent are not used
            self._arrays, self._pid = {}, os.getpid()
        arr = self._arrays.get(k)
        if arr is None:
            import zarr

            arr = self._arrays[k] = zarr.open_array(Path(self.table.stores[k]) / "tiles", mode="r")
        return arr

    def read_tile(self, i: int) -> np.ndarray:
        """The raw tile (T×T×C, the store's dtype) of table row ``i``.

        A tile that cannot be read (its checksum does not match, it does not decode) raises a
        ``GaplessError`` naming the store and the tile; from a DataLoader worker it reaches the main
        process as the same one line (see ``GaplessError``).
        """
        from pipeline.tiling import read_tiles

        k, index = int(self.table.store_index[i]), int(self.table.tile_index[i])
        return read_tiles(self._tiles(k), index, index + 1, self.table.stores[k])[0]

    def __getitem__(self, i: int):
        tile = self.read_tile(i)
        image = self.transform(image=tile)["image"] if self.transform is not None else tile.astype(np.float32)
        if image.ndim == 2:
            image = image[..., None]
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        return (
            x,
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


def _seed_worker(worker_id: int) -> None:
    """Seed numpy, random and the dataset's augmentation from the worker's torch seed (set by the loader's generator)."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    try:
        import cv2

        cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    except ImportError:
        pass
    seed_transform(getattr(info.dataset, "transform", None), seed)


def make_loader(dataset, batch_size: int, workers: int, sampler=None, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False):
    """A DataLoader that repeats for a seed on CPU: seeded shuffling, worker seeds and augmentation.

    ``workers`` > 0 keeps the worker processes alive between epochs; memory is pinned when CUDA is
    present. With ``workers`` = 0 the dataset's transform is seeded here (in this process).
    """
    generator = torch.Generator().manual_seed(int(seed))
    if workers == 0:
        seed_transform(getattr(dataset, "transform", None), seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
    )


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
    from pipeline.tiling import open_store

    digest = hashlib.sha256()
    if sample_sheet_path is not None:
        digest.update(b"sheet\0")
        digest.update(Path(sample_sheet_path).read_bytes())
    for path in sorted((Path(s) for s in stores), key=lambda p: (p.name, str(p))):
        root = open_store(path)
        attrs = {k: v for k, v in dict(root.attrs).items() if k not in _VOLATILE_ATTRS}
        digest.update(b"store\0" + path.name.encode() + b"\0")
        digest.update(json.dumps(attrs, sort_keys=True, default=str).encode())
        for name in ("coords", "labels"):
            arr = np.ascontiguousarray(root[name][:])
            digest.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()[:16]
