"""Whole shards of JPEG tiles written in one pass, byte for byte what zarr writes.

A tile store's shards are written whole by one writer (:mod:`pipeline.tiling.cutting`). For lossless
tiles zarrs (Rust) encodes a shard in one call; it has no JPEG codec, and zarr's default pipeline spends
0.14 ms of CPU per 224-px tile around the 0.21 ms of JPEG encoding itself (an asyncio task per tile
for each codec, a fill-value buffer and a copy per tile, the shard assembled in Python), on the cores
the tiler reads with. :func:`jpeg_shard_writer` writes such a shard directly instead: each tile
encoded by the store's own codec (:class:`pipeline.codecs.JpegCodec`), its CRC32C appended, the
chunks in order, then the shard index — the layout of the zarr v3 sharding codec
(``sharding_indexed``: per inner chunk a little-endian uint64 offset and length, 2⁶⁴−1 for a chunk
not stored, the index at the end with its own CRC32C). It writes only arrays whose metadata is exactly
that layout (the codecs :func:`pipeline.codecs.tile_array_codecs` gives JPEG tiles, in a local
store); any other array is written by zarr. Stores read back through zarr as before; a test compares
the bytes with zarr's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

_EMPTY = np.uint64(2**64 - 1)  # offset and length of a chunk the shard does not hold


def _checksum(data: bytes) -> bytes:
    import google_crc32c  # what zarr's crc32c codec computes: the same 4 little-endian bytes

    return int(google_crc32c.value(data)).to_bytes(4, "little")


def jpeg_shard_writer(array) -> Callable[[int, np.ndarray], None] | None:
    """``write(start, block)`` writing the whole shard of ``array`` that begins at tile ``start`` (``block``
    holds its tiles, fewer only in the last shard), or None when ``array`` is not a JPEG tile array
    in the layout described above (zarr writes it then)."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.storage import LocalStore

    from pipeline.codecs import JpegCodec

    meta = array.metadata
    try:  # zarr's metadata objects: a zarr that names them otherwise gets its own writer
        codecs = meta.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or not isinstance(array.store_path.store, LocalStore):
            return None
        sharding = codecs[0]
        inner, index_codecs = sharding.codecs, sharding.index_codecs
        if not (len(inner) == 2 and isinstance(inner[0], JpegCodec) and isinstance(inner[1], Crc32cCodec)
                and len(index_codecs) == 2 and isinstance(index_codecs[0], BytesCodec)
                and index_codecs[0].endian.value == "little" and isinstance(index_codecs[1], Crc32cCodec)
                and sharding.index_location.value == "end" and tuple(sharding.chunk_shape) == (1, *array.shape[1:])
                and tuple(meta.chunk_grid.chunk_shape[1:]) == tuple(array.shape[1:])):
            return None
        per_shard = meta.chunk_grid.chunk_shape[0]
        folder = Path(array.store_path.store.root) / array.store_path.path
        key = meta.chunk_key_encoding.encode_chunk_key
    except AttributeError:
        return None
    codec: JpegCodec = inner[0]

    def write(start: int, block: np.ndarray) -> None:
        if start % per_shard or not 0 < len(block) <= per_shard or start + len(block) > array.shape[0]:
            raise ValueError(f"{folder}: tiles {start}…{start + len(block)} are not one whole shard of {per_shard}")
        parts, index = [], np.full((per_shard, 2), _EMPTY, dtype="<u8")
        offset = 0
        for i, tile in enumerate(block):
            encoded = codec.encode_tile(tile)
            parts += (encoded, _checksum(encoded))
            index[i] = offset, len(encoded) + 4
            offset += len(encoded) + 4
        index_bytes = index.tobytes()
        parts += (index_bytes, _checksum(index_bytes))
        path = folder / key((start // per_shard, *(0,) * (array.ndim - 1)))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as f:
            f.writelines(parts)
        os.replace(partial, path)

    return write
