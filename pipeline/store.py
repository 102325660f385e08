"""The tile store (schema ``gapless.tiles/1``): its layout, its attributes as a typed object, how it is
written (codecs, integrity record) and read back (``open_store``, checked; ``read_tiles``).

A store is one zarr v3 group per sample: ``tiles`` (N, T, T, C) in the source dtype, one tile per
chunk, many tiles per shard, JPEG (8-bit RGB brightfield) or Blosc-LZ4 (:mod:`pipeline.codecs`) and a
CRC32C checksum per tile; ``coords`` (N, 2) int64 top-left (x, y) in level-0 px; ``tissue`` (N,)
float32; ``labels`` (N,) int8 (−1 unknown); ``thumbnail`` (h, w, 3) uint8; ``tissue_mask`` (h', w') uint8;
and attrs (:class:`TileStoreAttrs`) describing the geometry, so every tile can be found again on the
source, the tiles' codec (``tile_codec``) and ``integrity``.

Integrity. A store records, when it is written, every data file it holds and its size (attr
``integrity``); opening a store checks that record (one stat per file, no reading), so a deleted or
truncated shard is refused before any work instead of reading as blank tiles (zarr reads a missing
chunk as its fill value). Every chunk also carries a CRC32C checksum (``tile_codecs``), verified on
every read: a changed byte is an error naming the store and the tile, and ``gapless info --verify``
reads every tile to find one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pipeline.errors import GaplessError

SCHEMA = "gapless.tiles/1"
BATCH_SCHEMA = "gapless.tilebatch/1"  # many cell images in one store (``pipeline.tiling.batch``)


@dataclass(frozen=True)
class TileStoreAttrs:
    """A tile store's attributes (level-0 px unless said otherwise); ``from_attrs`` checks the schema."""

    source: str  # the slide or image, absolute
    format: str  # aperio, generic-tiff, ome-tiff, png, ...
    kind: str  # slide | image
    channel_names: list[str]
    modality: str  # brightfield | fluorescence
    tissue_method: str
    mpp: float  # µm/px of the tiles
    source_mpp: float  # µm/px of the source's level 0
    mpp_source: str  # metadata | override
    target_mpp: float
    level: int  # the pyramid level read
    downsample: float  # that level's downsample
    read_size: int  # px read at that level per tile (then resized to tile_size)
    tile_size: int  # px of a stored tile
    stride: int  # px between tiles at the tile scale
    tile_extent: float  # a tile's side in level-0 px
    tile_step: float  # the stride in level-0 px
    grid: list[int]  # [columns, rows] of the full grid before the tissue filter
    width: int
    height: int
    channels: int
    dtype: str
    channel_stats: dict  # names, mean, std, min, max, p01, p99 per channel, in raw units
    min_tissue: float
    tissue_area_fraction: float
    n_tiles: int
    tiles_per_shard: int
    workers: int
    annotations: str | None = None  # the GeoJSON the labels came from, absolute
    positive_classes: list[str] = field(default_factory=list)
    n_positive: int = 0
    thumbnail_downsample: list[float] = field(default_factory=list)  # level-0 px per thumbnail px (x, y)
    tissue_mask_downsample: list[float] = field(default_factory=list)
    qc_flag: str | None = None  # no tissue | annotations off tissue: ... | None
    seconds: float = 0.0
    tool_version: str = ""
    integrity: dict = field(default_factory=dict)  # see integrity_record
    tile_codec: dict = field(default_factory=lambda: {"name": "blosc-lz4", "lossless": True})  # pipeline.codecs
    schema: str = SCHEMA

    def to_attrs(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs, path: str | Path | None = None) -> "TileStoreAttrs":
        """The typed attributes of a store's ``attrs``; a store of another schema or lacking a field is
        one ``GaplessError`` naming it."""
        attrs = dict(attrs)
        if attrs.get("schema") != SCHEMA:
            raise GaplessError(path, f"not a gapless tile store (schema {attrs.get('schema')!r})",
                               "pass a store written by `gapless tile`")
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if _required(f) and f.name not in attrs]
        if required:
            raise GaplessError(path, f"the tile store's attributes lack {', '.join(required)} (written by another "
                                     "version of gapless)", RETILE_FIX)
        return cls(**{k: v for k, v in attrs.items() if k in names})


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def tile_codecs(dtype: np.dtype, codec: dict | None = None) -> dict:
    """The tiles array's ``create_array`` keywords (``serializer``, ``compressors``) for ``codec`` (the attrs'
    ``tile_codec``; None: lossless): JPEG or Blosc-LZ4, then a CRC32C checksum of each encoded tile, so every
    read verifies it and a changed byte is an error instead of a wrong tile. See :mod:`pipeline.codecs`."""
    from pipeline.codecs import tile_array_codecs

    return tile_array_codecs(dtype, codec)


def small_codecs() -> list:
    """The small arrays (coords, tissue, labels, thumbnail, mask): zarr's default Zstd, and a checksum."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]



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
    from tqdm import tqdm

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
    bar = tqdm(total=n, desc=f"verifying {Path(path).name}", unit="tile", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
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

    import pipeline.codecs  # noqa: F401  (registers the tile codecs, e.g. JPEG, with zarr)

    path = Path(path)
    if not path.exists():
        raise GaplessError(path, "no such tile store", "run `gapless tile` first")
    # Training and heatmap jobs open a batch store once per sample: the group (its zarr.json holds every
    # sample's attributes, ~1 MB for 400 fields) is read and its entries parsed once per process while
    # that zarr.json is unchanged (reading it per sample made opening a cohort quadratic).
    key = _attrs_key(path)
    root = _OPENED.get(key) if key is not None else None
    if root is None:
        try:
            root = zarr.open_group(path, mode="r")
        except Exception as exc:
            raise GaplessError(path, f"not a zarr store ({exc.__class__.__name__})", "pass a store written by `gapless tile`") from None
    if root.attrs.get("schema") == BATCH_SCHEMA:
        if key is None or key not in _OPENED:
            batch_samples(root, path)  # every sample's attributes
            if key is not None:
                if len(_OPENED) >= 64:
                    _OPENED.pop(next(iter(_OPENED)))
                _OPENED[key] = root
    else:
        TileStoreAttrs.from_attrs(root.attrs, path)  # the schema, and every attribute a reader relies on
    if check:
        check_integrity(path, root.attrs)
    return root


_OPENED: dict = {}  # (path, zarr.json size, mtime) → the opened batch store's group


def _attrs_key(path: Path):
    """(path, zarr.json's size and mtime): what a batch store's parsed entries depend on; None when
    zarr.json cannot be read."""
    try:
        stat = (path / "zarr.json").stat()
    except OSError:
        return None
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def store_info(path: str | Path, verify: bool = False, sample_id: str | None = None) -> dict:
    """The store's attrs plus N and the array shapes, as ``gapless info`` prints them; ``integrity`` is
    the check's summary (with ``verify``: every tile decoded), not the recorded file list. For a batch
    store, ``sample_id`` shows that sample's attributes (and its N); without it the samples are listed
    by id, each with its number of tiles and QC flag."""
    root = open_store(path)
    info = dict(root.attrs)
    if root.attrs.get("schema") == BATCH_SCHEMA:
        info["samples"] = [{"sample_id": e["sample_id"], "n_tiles": e["n_tiles"], "qc_flag": e.get("qc_flag")}
                           for e in root.attrs["samples"]]
    n = int(root["tiles"].shape[0])
    if root.attrs.get("schema") == BATCH_SCHEMA and sample_id is not None:
        view = open_sample(path, sample_id)
        info = {**view.attrs.to_attrs(), "sample_id": sample_id, "batch_store": True, "start": view.start}
        n = view.n
    elif sample_id is not None and sample_id != Path(path).name.removesuffix(".zarr"):
        raise GaplessError(path, f"holds one sample; --sample {sample_id!r} is not its name", "leave --sample out")
    info["integrity"] = verify_store(path) if verify else check_integrity(path, root.attrs)
    info["n"] = n
    info["arrays"] = {name: {"shape": list(arr.shape), "dtype": str(arr.dtype)} for name, arr in root.arrays()}
    info["path"] = str(Path(path))
    return info


def store_attrs(root, path: str | Path | None = None) -> TileStoreAttrs:
    """The typed attributes of an opened single-sample store (:func:`open_store`)."""
    return TileStoreAttrs.from_attrs(root.attrs, path)


# ---------------------------------------------------------------------------------------------
# One sample's tiles, in a store of its own or in a batch store. A batch store (schema
# gapless.tilebatch/1) holds many cell images, tiled by one job: ``tiles``, ``coords``, ``tissue`` and
# ``labels`` hold every sample's rows, sample after sample; ``thumbnail`` (S, h, w, 3) and
# ``tissue_mask`` (S, h', w') one picture per sample, padded to the largest (each sample's own shape is
# in its attributes); attr ``samples`` lists each sample's ``TileStoreAttrs`` with ``sample_id``,
# ``start`` (its first row), ``thumbnail_shape`` and ``tissue_mask_shape``. A manifest beside it
# (``<batch>.json``) names the store and its samples, so a sample's store is found by its id.


def batch_samples(root, path: str | Path | None = None) -> list[tuple[dict, TileStoreAttrs]]:
    """Each sample entry of a batch store with its typed attributes."""
    entries = root.attrs.get("samples")
    if not isinstance(entries, list):
        raise GaplessError(path, "a batch tile store without its list of samples", RETILE_FIX)
    return [(e, TileStoreAttrs.from_attrs({**e, "schema": SCHEMA}, path)) for e in entries]


@dataclass
class SampleTiles:
    """One sample's tiles: rows ``start`` to ``start + n`` of the store at ``path`` (all of a store of
    its own; its slice of a batch store). ``index``: its position in a batch store, else None."""

    path: Path
    sample_id: str
    attrs: TileStoreAttrs
    root: object  # the zarr group
    start: int
    n: int
    index: int | None = None
    shapes: dict = field(default_factory=dict)  # thumbnail / tissue_mask shapes in a batch store

    @property
    def tiles(self):
        """The store's whole ``tiles`` array (rows of other samples too: use ``start``, or ``read``)."""
        if "_tiles" not in self.__dict__:
            self.__dict__["_tiles"] = self.root["tiles"]
        return self.__dict__["_tiles"]

    def read(self, i: int, j: int) -> np.ndarray:
        """The sample's tiles ``i`` to ``j`` (its own numbering), one line naming the store if one is damaged."""
        return read_tiles(self.tiles, self.start + i, self.start + min(j, self.n), self.path)

    def _rows(self, name: str) -> np.ndarray:
        return np.asarray(self.root[name][self.start : self.start + self.n])

    def coords(self) -> np.ndarray:
        return self._rows("coords").astype(np.int64).reshape(self.n, 2)

    def labels(self) -> np.ndarray:
        return self._rows("labels")

    def tissue(self) -> np.ndarray:
        return self._rows("tissue")

    def _picture(self, name: str) -> np.ndarray | None:
        array = self.root.get(name)
        if array is None:
            return None
        if self.index is None:
            return array[:]
        h, w = self.shapes[name][:2]
        return array[self.index, :h, :w]

    def thumbnail(self) -> np.ndarray | None:
        return self._picture("thumbnail")

    def tissue_mask(self) -> np.ndarray | None:
        return self._picture("tissue_mask")


def open_sample(path: str | Path, sample_id: str | None = None, check: bool = True) -> SampleTiles:
    """The tiles of ``sample_id`` in the store at ``path`` (checked as :func:`open_store` checks it);
    a store of one sample needs no id."""
    path = Path(path)
    root = open_store(path, check)
    if root.attrs.get("schema") != BATCH_SCHEMA:
        n = int(root["tiles"].shape[0])
        name = sample_id or path.name.removesuffix(".zarr")
        return SampleTiles(path, name, store_attrs(root, path), root, 0, n)
    entries = root.attrs["samples"]  # open_store checked every entry
    if sample_id is None and len(entries) == 1:
        sample_id = entries[0]["sample_id"]
    for index, entry in enumerate(entries):
        if entry["sample_id"] == sample_id:  # only this one parsed: a cohort's job opens every sample
            attrs = TileStoreAttrs.from_attrs({**entry, "schema": SCHEMA}, path)
            shapes = {"thumbnail": entry.get("thumbnail_shape"), "tissue_mask": entry.get("tissue_mask_shape")}
            return SampleTiles(path, sample_id, attrs, root, int(entry["start"]), int(attrs.n_tiles), index, shapes)
    raise GaplessError(path, f"the batch store holds no sample {sample_id!r} ({len(entries)} samples)",
                       "name a sample of this store (gapless info lists them)")


MANIFEST_SCHEMA = "gapless.tilebatch-manifest/1"


def write_manifest(path: str | Path, store: str | Path, sample_ids: Sequence[str]) -> Path:
    """The JSON beside a batch store naming it and its samples (written last: the batch is complete)."""
    import json

    from pipeline.files import atomic_write_text

    doc = {"schema": MANIFEST_SCHEMA, "store": Path(store).name, "samples": list(sample_ids)}
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def sample_stores(tiles_dir: str | Path) -> dict[str, Path]:
    """sample id → store, for every store in ``tiles_dir``: ``{id}.zarr`` of a sample of its own, and
    the samples of each batch (``batches/*.json`` manifests)."""
    import json

    tiles_dir = Path(tiles_dir)
    found: dict[str, Path] = {}
    for manifest in sorted((tiles_dir / "batches").glob("*.json")):
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise GaplessError(manifest, "not a readable batch manifest", RETILE_FIX) from None
        if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA:
            raise GaplessError(manifest, f"not a batch manifest (schema {doc.get('schema') if isinstance(doc, dict) else None!r})",
                               RETILE_FIX)
        for sample_id in doc["samples"]:
            found[sample_id] = manifest.parent / doc["store"]
    return found


def find_sample_store(tiles_dir: str | Path, sample_id: str, index: dict[str, Path] | None = None) -> Path | None:
    """The store holding ``sample_id`` under ``tiles_dir`` (its own ``{id}.zarr``, else a batch's), or None."""
    own = Path(tiles_dir) / f"{sample_id}.zarr"
    if own.is_dir():
        return own
    index = sample_stores(tiles_dir) if index is None else index
    return index.get(sample_id)
