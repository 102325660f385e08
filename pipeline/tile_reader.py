"""One tile at a time from a tile store, fast enough for a training loader's random reads.

A training loader reads tiles in random order, one chunk each. Through zarr-python each such read
costs ~3–4 ms, almost all of it zarr's event-loop round trip, where decoding a 224-px JPEG tile costs
~0.2 ms: zarr alone caps a loader worker near 250 tiles/s. :class:`TileReader` reads the layouts
``gapless tile`` writes (:mod:`pipeline.codecs`: a sharded ``tiles`` array, index at the end of each
shard, one tile per chunk, JPEG or Blosc, each chunk and each index ending with a CRC32C) straight
from the shard file: the shard's index once (cached per process), then per tile one read, the
checksum, one decode. Anything else — another layout, an empty chunk, a checksum that does not
match, bytes that do not decode — is read through zarr (:func:`pipeline.store.read_tiles`), which
returns the same pixels or raises the one-line error naming the store, the tile and its shard.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["TileReader"]

_EMPTY = 2**64 - 1  # a chunk the shard does not hold (zarr's sharding codec: offset and length all ones)


class TileReader:
    """Tiles of one store's ``tiles`` array (N×T×T×C), read one at a time: ``read(i)`` → T×T×C array.

    The zarr array is opened on first use (its metadata says whether the fast path applies). Not
    shared across processes: each DataLoader worker makes its own (``TileDataset`` does).
    """

    def __init__(self, store: str | Path):
        self.store = str(store)
        self._array = None
        self._layout: str | None = None  # "jpeg" or "blosc" where the shard files are read directly

    @property
    def array(self):
        if self._array is None:
            import zarr

            import pipeline.codecs  # noqa: F401 (registers gapless.jpeg with zarr)

            array = zarr.open_array(Path(self.store) / "tiles", mode="r")
            self._layout = _direct_layout(array)
            self._n, self._shape, self._dtype = int(array.shape[0]), tuple(array.shape[1:]), np.dtype(array.dtype)
            self._per_shard = int((array.shards or array.chunks)[0])
            self._encode_key = array.metadata.chunk_key_encoding.encode_chunk_key  # (shard, 0, 0, 0) → "c/…"
            self._array = array
        return self._array

    def read(self, index: int) -> np.ndarray:
        """Tile ``index`` (T×T×C, the store's dtype, writable); a tile that cannot be read is a ``GaplessError``."""
        from pipeline.store import read_tiles

        tiles = self.array
        if self._layout is not None and 0 <= index < self._n:
            try:
                tile = self._read_direct(index)
            except (OSError, ValueError, RuntimeError):  # zarr reads it, or says what is wrong with it
                tile = None
            if tile is not None:
                return tile
        return read_tiles(tiles, index, index + 1, self.store)[0]

    def _read_direct(self, index: int) -> np.ndarray | None:
        import google_crc32c
        import imagecodecs

        shard = os.path.join(self.store, "tiles", self._encode_key((index // self._per_shard, 0, 0, 0)))
        stat = os.stat(shard)
        offset, length = _shard_index(shard, stat.st_mtime_ns, stat.st_size, self._per_shard)[index % self._per_shard]
        if offset == _EMPTY or length < 4:
            return None  # zarr gives the fill value
        with open(shard, "rb") as f:
            f.seek(int(offset))
            data = f.read(int(length))
        body = data[:-4]
        if len(data) != length or google_crc32c.value(body) != int.from_bytes(data[-4:], "little"):
            return None
        if self._layout == "jpeg":
            image = imagecodecs.jpeg8_decode(body)
            return image.reshape(self._shape) if image.size == self._shape[0] * self._shape[1] * self._shape[2] else None
        out = np.empty(self._shape, self._dtype)
        imagecodecs.blosc_decode(body, numthreads=1, out=out.reshape(-1).view(np.uint8))
        return out


def _direct_layout(tiles) -> str | None:
    """``"jpeg"`` or ``"blosc"`` where ``tiles`` has a layout :meth:`TileReader.read` reads itself, else None."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec

    from pipeline.codecs import JpegCodec

    codecs = tiles.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or tiles.ndim != 4 or sys.byteorder != "little":
        return None
    sharding = codecs[0]
    index = sharding.index_codecs
    if (getattr(sharding.index_location, "value", None) != "end" or len(index) != 2 or not _little_endian(index[0])
            or not isinstance(index[1], Crc32cCodec) or tuple(sharding.chunk_shape) != (1, *tiles.shape[1:])):
        return None
    inner = sharding.codecs
    if len(inner) == 2 and isinstance(inner[0], JpegCodec) and isinstance(inner[1], Crc32cCodec):
        return "jpeg"
    if (len(inner) == 3 and _little_endian(inner[0]) and isinstance(inner[1], BloscCodec)
            and isinstance(inner[2], Crc32cCodec)):
        return "blosc"
    return None


def _little_endian(codec) -> bool:
    from zarr.codecs import BytesCodec

    return isinstance(codec, BytesCodec) and getattr(codec.endian, "value", codec.endian) in (None, "little")


@functools.lru_cache(maxsize=4096)
def _shard_index(path: str, mtime_ns: int, size: int, chunks: int) -> np.ndarray:
    """(chunks, 2) uint64 offset and length of each chunk in the shard file ``path`` (checksum verified).

    Keyed by the file's time and size too: a store written again in this process is read afresh.
    """
    import google_crc32c

    nbytes = chunks * 16 + 4
    if size < nbytes:
        raise ValueError(f"{path}: {size} bytes, shorter than its index")
    with open(path, "rb") as f:
        f.seek(size - nbytes)
        data = f.read(nbytes)
    if google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{path}: the shard index does not match its checksum")
    return np.frombuffer(data[:-4], "<u8").reshape(chunks, 2)
