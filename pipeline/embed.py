"""Tile embeddings: each tile's feature vector, a backbone's final feature map averaged over its positions,
written to a zarr store beside the tile store (``results/embeddings/{sample}.zarr``), on the tile grid.

The store (schema ``gapless.embeddings/1``) is one zarr v3 group:

    features   (N, D) float16   the backbone's ``forward_features`` (B×D×h×w) averaged over h×w, one row
                                per tile in the tile store's order; chunks of up to 4096 rows × D
    coords     (N, 2) int64     the tile's top-left (x, y) in level-0 px, copied from the tile store
    grid       (N, 2) int32     (row, col) of the tile on the tile grid: round(y / tile_step), round(x / tile_step)
    labels     (N,)   int8      the tile store's annotation labels (1/0, −1 unknown): for scoring only

and attrs: ``schema``, ``sample_id``, ``tile_store`` (absolute), ``source`` (the slide), ``kind``, ``encoder``
(``model``: a gapless training run's backbone; ``timm``: a timm backbone, random or with local weights),
``backbone``, ``backbone_kwargs``, ``head`` (the run's head, or null), ``model_dir`` (absolute, or null),
``weights`` (the file's absolute path, ``gapless-run`` or ``random-init``; with ``random-init``, ``seed``:
the initialisation's), ``weights_sha256`` (of the
run's ``weights.safetensors`` or the weights file; null for random init), ``dim``, ``normalisation``
(``mean``/``std`` per channel in raw units, ``image_size``, ``modality``: the input the backbone saw),
``mpp``, ``tile_size``, ``tile_extent``, ``tile_step``, ``grid_shape`` [rows, cols] (the tile store's
``grid`` is [columns, rows]), ``width``, ``height``, ``n_tiles``, ``tile_store_rows`` [start, stop] (the
sample's rows in its tile store: a batch store holds several samples), ``device``, ``seconds`` (the
whole run), ``embed_seconds`` (the batches alone), ``tool_version``.

Input. With a trained run (``model_dir``) every tile is prepared as heatmaps prepare it for that model
(``pipeline.augment.build_transform`` in evaluation mode with model.json's mean/std, modality and
image_size); with a timm backbone, as training prepares a store's tiles: normalised by the store's own
``channel_stats`` (``pipeline.data.channel_normalisation``), at the tile size. Tiles are streamed batch by
batch (the next batch is read while this one runs: at most two batches of tiles in memory); features
are held as float16 N×D. On CUDA the backbone runs under bf16 autocast with channels-last input, as
inference does. A batch store of cell images embeds one sample, named by ``sample_id`` (a batch of one
sample needs none).

The store is written into ``<out>.partial`` and renamed when complete: a failed or interrupted run
leaves nothing at ``out`` (an older complete store there stays as it was). ``read_embeddings`` reads it
back, checked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import GaplessError

SCHEMA = "gapless.embeddings/1"
CHUNK_ROWS = 4096  # rows of ``features`` per chunk
_EMBED_AGAIN = "run `gapless embed` again for this sample"
_ARRAYS = {"features": np.float32, "coords": np.int64, "grid": np.int32, "labels": np.int8}  # as read back


@dataclass
class Embeddings:
    """An embeddings store read back: N tiles, D features (float32), their grid places and labels."""

    features: np.ndarray  # (N, D) float32
    grid: np.ndarray  # (N, 2) int32 (row, col)
    coords: np.ndarray  # (N, 2) int64 top-left (x, y), level-0 px
    labels: np.ndarray  # (N,) int8, −1 unknown
    attrs: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        rows, cols = self.attrs["grid_shape"]
        return int(rows), int(cols)


def embed_store(store, out: str | Path, *, model_dir: str | Path | None = None, backbone: str | None = None,
                weights: str | Path | None = None, backbone_kwargs: dict | None = None, sample_id: str | None = None,
                batch_size: int = 64, device=None, seed: int = 0, progress: bool = True) -> dict:
    """Embed every tile of ``store`` (a tile store path, or a ``SampleTiles`` view) into the store ``out``.

    Exactly one of ``model_dir`` (a ``gapless train`` run folder: its backbone, its input preparation)
    and ``backbone`` (a timm name; ``weights``: a local .safetensors/.pth file, else random init;
    ``backbone_kwargs``: more ``timm.create_model`` arguments; ``seed``: the random initialisation's, so a
    random-init embedding is reproducible; the global RNG is left as it was). ``sample_id`` picks a sample of a batch
    store. Returns ``{"out", "n_tiles", "dim", "seconds", "tiles_per_second", "attrs"}`` (``seconds``: the whole
    call; ``tiles_per_second``: over the batches alone, reading included, not opening or building). Every input
    problem (no such store or run, an empty store, channels the model does not take, a missing weights
    file, an output that would replace something else) is a ``GaplessError`` raised before anything is
    written.
    """

    from pipeline import __version__
    from pipeline.augment import build_transform
    from pipeline.device import autocast_for, resolve_device
    from pipeline.files import atomic_directory

    t0 = time.perf_counter()
    _check_arguments(model_dir, backbone, weights, backbone_kwargs, batch_size)
    view = _open(store, sample_id)
    out = _check_out(out, view.path)
    n, channels = int(view.n), int(view.tiles.shape[3])
    if n == 0:
        flag = f" (QC flag: {view.attrs.qc_flag})" if view.attrs.qc_flag else ""
        raise GaplessError(view.path, f"sample {view.sample_id} has no tiles to embed{flag}",
                           "embed samples with tiles (gapless info shows a store's tile count)")
    coords, labels = view.coords(), np.asarray(view.labels(), np.int8)
    grid, grid_shape = tile_grid(view, coords)  # tiles off the recorded grid: refused before any work
    device = resolve_device(device)

    net, mean, std, modality, image_size, weights_file, described = _encoder(
        view, channels, model_dir, backbone, weights, backbone_kwargs, seed, device)
    transform = build_transform(modality, False, mean, std, image_size=image_size)
    t_embed = time.perf_counter()
    features = _embed(net, transform, view, int(batch_size), device, autocast_for(device), progress)
    embed_seconds = time.perf_counter() - t_embed
    seconds = time.perf_counter() - t0
    a = view.attrs
    attrs = {
        "schema": SCHEMA, "sample_id": view.sample_id, "tile_store": str(Path(view.path).resolve()),
        "source": a.source, "kind": a.kind, **described,
        "weights_sha256": None if weights_file is None else _weights_sha256(str(Path(weights_file).resolve()),
                                                                             _stamp(Path(weights_file))),
        "dim": int(features.shape[1]),
        "normalisation": {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                          "image_size": image_size, "modality": modality},
        "mpp": float(a.mpp), "tile_size": int(a.tile_size), "tile_extent": float(a.tile_extent),
        "tile_step": float(a.tile_step), "grid_shape": grid_shape, "width": int(a.width), "height": int(a.height),
        "n_tiles": n, "tile_store_rows": [int(view.start), int(view.start) + n], "device": device.type,
        "seconds": round(seconds, 3), "embed_seconds": round(embed_seconds, 3), "tool_version": __version__,
    }
    with atomic_directory(out, holds="zarr.json") as partial:
        write_embeddings(partial, features, coords, grid, labels, attrs)
    return {"out": out, "n_tiles": n, "dim": attrs["dim"], "seconds": seconds,
            "tiles_per_second": n / embed_seconds if embed_seconds > 0 else float("nan"), "attrs": attrs}


def _check_arguments(model_dir, backbone, weights, backbone_kwargs, batch_size) -> None:
    """The encoder's arguments agree: one of a run folder and a timm name, weights and kwargs with the latter."""
    if (model_dir is None) == (backbone is None):
        raise GaplessError(None, "give either a trained run folder (--model) or a timm backbone name (--backbone)",
                           "exactly one of them, not both, not neither")
    if weights is not None and model_dir is not None:
        raise GaplessError(weights, "a weights file goes with a timm backbone (--backbone), not with a trained run "
                                    "(--model), whose weights are its own", "leave --weights out, or use --backbone")
    if backbone_kwargs and model_dir is not None:
        raise GaplessError(model_dir, "backbone arguments go with a timm backbone (--backbone), not with a trained run "
                                      "(--model), whose model.json holds its own", "leave --backbone-kwargs out")
    if weights is not None and not Path(weights).is_file():
        from pipeline.models.backbone import WEIGHTS_FIX

        raise GaplessError(weights, "weights file not found", WEIGHTS_FIX.replace("NAME", repr(backbone)))
    if int(batch_size) < 1:
        raise GaplessError(None, f"batch size {batch_size} is not a positive number", "pass --batch-size 1 or more")


def _encoder(view, channels: int, model_dir, backbone, weights, backbone_kwargs, seed: int, device):
    """``(net, mean, std, modality, image_size, weights file or None, attrs describing the encoder)``: a trained
    run's backbone and input preparation, or a timm backbone with the store's normalisation."""
    if model_dir is not None:
        from pipeline.run_folder import WEIGHTS, read_model_config

        if not Path(model_dir).is_dir():
            raise GaplessError(model_dir, "no such training run folder",
                               "pass the folder `gapless train` wrote (it holds model.json and weights.safetensors)")
        config = read_model_config(model_dir).as_mapping()  # its channels checked before the weights are read
        _check_channels(view, channels, int(config["in_chans"]), f"the model of {model_dir}")
        net, config = _trained_encoder(str(Path(model_dir).resolve()), _stamp(Path(model_dir) / WEIGHTS), device)
        mean, std = config["mean"], config["std"]
        modality, image_size = config.get("modality") or view.attrs.modality, config.get("image_size")
        weights_file = Path(model_dir) / WEIGHTS
        described = {"encoder": "model", "backbone": config["backbone"],
                     "backbone_kwargs": dict(config.get("backbone_kwargs") or {}), "head": config["head"],
                     "model_dir": str(Path(model_dir).resolve()), "weights": "gapless-run"}
    else:
        net = _timm_encoder(backbone, None if weights is None else str(Path(weights).resolve()),
                            json.dumps(backbone_kwargs or {}, sort_keys=True), int(seed), channels, device,
                            None if weights is None else _stamp(Path(weights)))
        mean, std = store_normalisation(view)
        modality, image_size = view.attrs.modality, None
        weights_file = None if weights is None else Path(weights)
        described = {"encoder": "timm", "backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}),
                     "head": None, "model_dir": None,
                     "weights": "random-init" if weights is None else str(Path(weights).resolve()),
                     **({"seed": int(seed)} if weights is None else {})}
    return net, mean, std, modality, image_size, weights_file, described


# The encoder of the latest calls, kept: a cohort's slides (``gapless embed --samples``) are embedded by one
# loaded model; the key holds the weights file's size and mtime, so a retrained model is read again.


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _trained_encoder(model_dir: str, stamp, device):
    """(backbone in eval mode on ``device``, model config) of a training run folder."""
    from pipeline.run_folder import load_trained

    model, config = load_trained(model_dir, device=device)
    return model.backbone.eval(), config


@functools.lru_cache(maxsize=2)
def _timm_encoder(backbone: str, weights: str | None, kwargs_json: str, seed: int, channels: int, device, stamp):
    """A timm backbone (local ``weights`` or a random init seeded by ``seed``, the caller's RNG untouched),
    in eval mode on ``device``."""
    import torch

    from pipeline.models.backbone import create_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_backbone(backbone, in_chans=channels, pretrained=Path(weights) if weights is not None else False,
                              **json.loads(kwargs_json))
    return net.to(device).eval()


def embed_cohort(stores, out_dir: str | Path, progress: bool = True, **encoder) -> list[dict]:
    """``embed_store`` for every sample of ``stores`` (sample id → tile store, or (store, sample id) for a sample of
    a batch store) into ``out_dir/{sample_id}.zarr``, the encoder built once (``encoder``: ``embed_store``'s
    keyword arguments). Returns each sample's result, in order."""
    from tqdm import tqdm

    results = []
    for sample_id, store in tqdm(list(stores.items()), desc="embed", unit="sample", disable=not progress,
                                 file=sys.stderr, dynamic_ncols=True):
        results.append(embed_store(store, Path(out_dir) / f"{sample_id}.zarr", sample_id=sample_id, progress=False,
                                   **encoder))
    return results


def _open(store, sample_id: str | None):
    """The ``SampleTiles`` to embed; a batch store of several samples needs ``sample_id``."""
    from pipeline.heatmap.maps import sample_view
    from pipeline.store import BATCH_SCHEMA, SampleTiles, open_store

    if isinstance(store, SampleTiles):
        return store
    root = open_store(store)  # no such store, not a tile store, damaged: one line each
    if root.attrs.get("schema") == BATCH_SCHEMA and sample_id is None and len(root.attrs["samples"]) != 1:
        raise GaplessError(store, f"a batch store of {len(root.attrs['samples'])} cell images: which one to embed?",
                           "name it with --sample (gapless info lists them)")
    return sample_view(store, sample_id)


def _check_out(out: str | Path, store: Path) -> Path:
    """``out`` once it may be written: not the tile store, not inside it or around it, and not an existing
    zarr store of another kind (a tile store given as --out by mistake is never replaced)."""
    from pipeline.files import check_output_target

    out = check_output_target(out)
    target, source = Path(out).resolve(), Path(store).resolve()
    if target == source or source in target.parents or target in source.parents:
        raise GaplessError(out, f"the output would replace or sit inside the tile store {store}",
                           "write the embeddings beside it, e.g. results/embeddings/{sample}.zarr")
    meta = Path(out) / "zarr.json"
    if meta.is_file():
        try:
            found = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {}).get("schema")
        except (OSError, ValueError, AttributeError):
            found = "unreadable"
        if found != SCHEMA:
            raise GaplessError(out, f"exists and is not an embeddings store (schema {found!r}), so it is not replaced",
                               "choose another --out, or remove it by hand if it is an old output")
    return Path(out)


def _check_channels(view, channels: int, in_chans: int, what: str) -> None:
    if channels != in_chans:
        raise GaplessError(view.path, f"the store's tiles have {channels} channel{'s' if channels != 1 else ''}, "
                                      f"{what} takes {in_chans}",
                           "embed samples of the kind the model was trained on (slides or cell images), or use "
                           "--backbone, which takes the store's channels")


def store_normalisation(view) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in raw units from the sample's ``channel_stats``, as training computes them
    (:func:`pipeline.data.channel_normalisation` over this one sample's tiles; a constant channel gets std 1)."""
    from pipeline.data import TileTable, channel_normalisation

    n, a = int(view.n), view.attrs
    zeros = np.zeros(n, np.int64)
    table = TileTable(stores=[str(view.path)], sample_ids=[view.sample_id], store_index=zeros,
                      tile_index=np.arange(n, dtype=np.int64), tile_label=zeros, sample_label=zeros,
                      coords=np.zeros((n, 2), np.int64), channels=int(view.tiles.shape[3]), tile_size=int(a.tile_size),
                      dtype=np.dtype(view.tiles.dtype), modality=a.modality, mpp=float(a.mpp), store_attrs=[a])
    return channel_normalisation(table)


def tile_grid(view, coords: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """((N, 2) int32 (row, col) of each tile, [rows, cols]) on the tile store's grid (attr ``grid`` is
    [columns, rows]; a tile at (x, y) is at column round(x / tile_step), row round(y / tile_step))."""
    columns, rows = (int(v) for v in view.attrs.grid)
    step = float(view.attrs.tile_step)
    if len(coords) and step > 0:
        grid = np.stack([np.rint(coords[:, 1] / step), np.rint(coords[:, 0] / step)], axis=1).astype(np.int32)
    else:
        grid = np.zeros((len(coords), 2), np.int32)
    if len(grid) and (grid.min() < 0 or grid[:, 0].max() >= rows or grid[:, 1].max() >= columns):
        from pipeline.store import RETILE_FIX

        raise GaplessError(view.path, f"tile coordinates fall outside the recorded {columns}×{rows} grid", RETILE_FIX)
    return grid, [rows, columns]


def _embed(net, transform, view, batch_size: int, device, autocast, progress: bool) -> np.ndarray:
    """(N, D) float16: ``net.forward_features`` of every tile of ``view``, averaged over positions."""
    import torch
    from tqdm import tqdm

    from pipeline.inference import to_device

    n = int(view.n)
    on_cpu = device.type == "cpu"

    def load(start: int):
        block = torch.from_numpy(view.read(start, start + batch_size))  # a bad tile: one line naming the store
        if on_cpu:  # this thread prepares the next batch beside the model
            return transform(block)
        return block.pin_memory() if device.type == "cuda" else block  # pinned: the copy below is asynchronous

    features: np.ndarray | None = None
    bar = tqdm(total=n, desc=f"embed {view.sample_id}", unit="tile", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    starts = list(range(0, n, batch_size))
    try:
        with ThreadPoolExecutor(1) as reader, torch.inference_mode():
            pending = reader.submit(load, starts[0])
            for i, start in enumerate(starts):
                x = pending.result()
                x = x if on_cpu else transform(x.to(device, non_blocking=True))
                pending = reader.submit(load, starts[i + 1]) if i + 1 < len(starts) else None
                with autocast():
                    maps = net.forward_features(to_device(x, device))
                if maps.ndim != 4:
                    raise GaplessError(None, f"the backbone gives features of shape {tuple(maps.shape)}, not B×C×h×w",
                                       "use a convolutional timm backbone (resnet*, convnext*, efficientnet*, …)")
                pooled = maps.float().mean(dim=(2, 3)).cpu().numpy()
                if features is None:
                    features = np.empty((n, pooled.shape[1]), np.float16)
                features[start : start + len(pooled)] = pooled
                bar.update(len(pooled))
    finally:
        bar.close()
    assert features is not None  # n > 0
    bad = int((~np.isfinite(features)).any(axis=1).sum())
    if bad:
        raise GaplessError(view.path, f"{bad} of {n} tiles' features are not finite in float16 (beyond ±65504, or NaN)",
                           "check the weights and the input's normalisation")
    return features


def write_embeddings(path: Path, features, coords, grid, labels, attrs: dict) -> None:
    """Write an embeddings store at ``path`` (the layout above; ``attrs`` as ``embed_store`` fills them), replacing
    what is there: ``embed_store`` writes into ``<out>.partial`` with it and renames."""
    import zarr

    from pipeline.store import small_codecs

    n = len(features)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    for name, data, chunks, dims in (
        ("features", features, (min(CHUNK_ROWS, max(n, 1)), features.shape[1]), ["tile", "feature"]),
        ("coords", np.asarray(coords, np.int64), (max(n, 1), 2), ["tile", "xy"]),
        ("grid", np.asarray(grid, np.int32), (max(n, 1), 2), ["tile", "row_col"]),
        ("labels", np.asarray(labels, np.int8), (max(n, 1),), ["tile"]),
    ):
        root.create_array(name, data=data, chunks=chunks, dimension_names=dims, compressors=small_codecs())
    root.update_attributes(attrs)  # one write of zarr.json, last


@functools.lru_cache(maxsize=4)
def _weights_sha256(path: str, stamp) -> str:
    """``sha256`` of a weights file, once per file version (``stamp``): a cohort's slides share the encoder's."""
    return sha256(path)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_embeddings(path: str | Path, arrays: bool = True) -> Embeddings:
    """The embeddings store at ``path`` (features as float32); a ``GaplessError`` for a missing path, a store
    of another schema, a missing array or arrays of inconsistent shape (checked from the arrays' metadata).
    ``arrays=False``: the attributes only (no chunk is read; the arrays come back with 0 rows)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise GaplessError(path, "no such embeddings store", "run `gapless embed` first")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as exc:  # noqa: BLE001  (zarr raises several types for a folder that is not a group)
        raise GaplessError(path, f"not a zarr store ({exc.__class__.__name__})",
                           "pass a store written by `gapless embed`") from None
    attrs = dict(root.attrs)
    if attrs.get("schema") != SCHEMA:
        raise GaplessError(path, f"not an embeddings store (schema {attrs.get('schema')!r})",
                           "pass a store written by `gapless embed`")
    found = {}
    for name in _ARRAYS:
        try:
            found[name] = root[name]
        except KeyError:
            raise GaplessError(path, f"the embeddings store has no {name} array", _EMBED_AGAIN) from None
    shapes = {name: tuple(int(v) for v in a.shape) for name, a in found.items()}
    lengths = {shape[0] if shape else -1 for shape in shapes.values()}
    shapes_ok = (len(shapes["features"]) == 2 and shapes["coords"][1:] == (2,) and shapes["grid"][1:] == (2,)
                 and len(shapes["labels"]) == 1)
    if len(lengths) != 1 or not shapes_ok:
        shown = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise GaplessError(path, f"arrays of inconsistent shape: {shown}", _EMBED_AGAIN)
    dim = shapes["features"][1]
    if "dim" in attrs and int(attrs["dim"]) != dim:
        raise GaplessError(path, f"features have {dim} columns, attrs say dim {attrs['dim']}", _EMBED_AGAIN)
    if not arrays:
        return Embeddings(np.zeros((0, dim), np.float32), np.zeros((0, 2), np.int32), np.zeros((0, 2), np.int64),
                          np.zeros(0, np.int8), attrs, path)
    data = {}
    for name, array in found.items():
        try:
            data[name] = np.asarray(array[...], _ARRAYS[name])
        except Exception as exc:  # noqa: BLE001  (a checksum mismatch, a truncated chunk: codec errors of any type)
            raise GaplessError(path, f"array {name} cannot be read ({exc.__class__.__name__}: "
                                     f"{' '.join(str(exc).split())[:160]})", _EMBED_AGAIN) from None
    return Embeddings(data["features"], data["grid"], data["coords"], data["labels"], attrs, path)
