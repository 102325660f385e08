"""How a tile store's tiles are compressed: the choice per store, and the zarr v3 codec that stores JPEG.

- 8-bit RGB brightfield tiles: **JPEG** (libjpeg-turbo through ``imagecodecs``), quality from the tiling
  settings (``codec``, ``quality``; 90 by default), chroma at full resolution (4:4:4). The zarr v3
  array→bytes codec ``gapless.jpeg`` (:class:`JpegCodec`) encodes one tile (one chunk) as one JPEG; a
  JPEG store's thumbnail is one JPEG too.
- everything else — 16 bit, fluorescence, channels other than 3, or ``codec: lossless`` — stays
  lossless: bytes, then Blosc-LZ4 (byte-shuffled above 8 bit).

Why JPEG 4:4:4 at 90 (measured on 224-px tiles, README "Benchmarks"): stores of 0.9–1.2× the slide's
bytes over the same tiles instead of 5.4–8.2×, and 0.4–0.5 ms to encode or decode a tile. JPEG XL,
AVIF and WebP are 35–45 % smaller but 10–16× slower to encode and 2–6× slower to decode, which every
training read would pay. 4:2:0 chroma is 20–35 % smaller still but loses the colour edges of slides
that store RGB JPEG (Aperio): 32.7 dB on the CMU fixture against 43.1 dB at 4:4:4. Above 90 the bytes
go on the source's own JPEG artefacts (the demo's slides are JPEG 90: 49.2 dB at 90, 49.5 at 95, for
34 % more bytes); below it the CMU fixture loses 3.7 dB at 85 for 14 % fewer bytes.

Either way each chunk's bytes end with a CRC32C checksum (zarr's ``crc32c`` codec), verified on every
read: a changed byte in a JPEG tile is the same one-line error naming the store and the tile as in a
lossless one (:mod:`pipeline.store`). The choice is recorded in the store's attrs (``tile_codec``).

zarr finds ``gapless.jpeg`` in its codec registry when it opens a store: importing this module
registers it (``pipeline.store`` and the cutting processes import it), and the package's entry point
(``zarr.codecs`` in ``pyproject.toml``) lets any zarr-python reader of a store find it without gapless
imported. zarrs (the Rust codec pipeline that writes lossless tiles) cannot run a Python codec, so
JPEG shards are written whole by :mod:`pipeline.shards` (the bytes zarr's default pipeline writes, at
half its CPU per tile), and anything else of a JPEG store by zarr's default pipeline (:func:`rust_can_write`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

JPEG_NAME = "gapless.jpeg"  # the codec's name in a store's zarr.json
DEFAULT_QUALITY = 90
SUBSAMPLING = "444"  # full-resolution chroma: an RGB source's colour edges survive (see above)
LOSSLESS = {"name": "blosc-lz4", "lossless": True}  # the attrs of a lossless store (and of stores made before codecs)
_OURS = frozenset({JPEG_NAME})  # codec names zarrs does not know


def tile_codec(codec: str, quality: int, dtype: np.dtype, channels: int, modality: str) -> dict:
    """The codec a store's tiles get, as recorded in its attrs (``tile_codec``): JPEG for 8-bit RGB
    brightfield when ``codec`` is ``jpeg``, else lossless."""
    if codec == "jpeg" and np.dtype(dtype) == np.uint8 and channels == 3 and modality == "brightfield":
        return {"name": "jpeg", "quality": int(quality), "subsampling": SUBSAMPLING, "lossless": False}
    return dict(LOSSLESS)


def tile_array_codecs(dtype: np.dtype, codec: dict | None = None) -> dict:
    """``create_array`` keywords (``serializer``, ``compressors``) for the tiles array under ``codec``
    (:func:`tile_codec`; ``None``: lossless). Blosc-LZ4 is lossless and several times faster to write and
    read back than zstd; the CRC32C checksum of each encoded tile costs 4 bytes, computed in C."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    dtype = np.dtype(dtype)
    if codec is not None and codec.get("name") == "jpeg":
        return {"serializer": JpegCodec(quality=codec["quality"], subsampling=codec.get("subsampling", SUBSAMPLING)),
                "compressors": [Crc32cCodec()]}
    shuffle = "shuffle" if dtype.itemsize > 1 else "noshuffle"
    return {"serializer": BytesCodec(), "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle=shuffle), Crc32cCodec()]}


def _codec_names(codecs: list) -> set[str]:
    names = set()
    for c in codecs:
        names.add(c.get("name"))
        names |= _codec_names((c.get("configuration") or {}).get("codecs", []))  # a sharding codec's inner chain
    return names


def rust_can_write(array_path: str | Path) -> bool:
    """Whether zarrs can encode the array at ``array_path`` (it has no JPEG codec: zarr's default pipeline
    writes JPEG stores). Reads the array's ``zarr.json`` only."""
    meta = json.loads((Path(array_path) / "zarr.json").read_text(encoding="utf-8"))
    return not (_codec_names(meta.get("codecs", [])) & _OURS)


def _tile_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(H, W, C) of a chunk of one tile: (…, H, W, C) with every leading dimension 1."""
    if len(shape) < 3 or any(n != 1 for n in shape[:-3]):
        raise ValueError(f"{JPEG_NAME}: a chunk must hold one H×W×C image, got chunk shape {shape}")
    return shape[-3], shape[-2], shape[-1]


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """One chunk (one 8-bit RGB or grey tile: shape (…, H, W, C), leading sizes 1) as one baseline JPEG.

    Configuration: ``quality`` (1–100, libjpeg's scale) and ``subsampling`` of the chroma (``420``,
    ``422`` or ``444``). Decoding checks the image's shape against the chunk's.
    """

    is_fixed_size = False

    quality: int = DEFAULT_QUALITY
    subsampling: str = SUBSAMPLING

    def __post_init__(self):
        if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
            raise ValueError(f"{JPEG_NAME}: quality must be a whole number from 1 to 100, got {self.quality!r}")
        if self.subsampling not in ("420", "422", "444"):
            raise ValueError(f"{JPEG_NAME}: subsampling must be 420, 422 or 444, got {self.subsampling!r}")

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> "JpegCodec":
        _, configuration = parse_named_configuration(data, JPEG_NAME, require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self) -> dict[str, JSON]:
        return {"name": JPEG_NAME, "configuration": {"quality": self.quality, "subsampling": self.subsampling}}

    def validate(self, *, shape, dtype, chunk_grid) -> None:
        if dtype.to_native_dtype() != np.uint8:
            raise ValueError(f"{JPEG_NAME}: 8-bit data only, got {dtype.to_native_dtype()}")
        chunk_shape = getattr(chunk_grid, "chunk_shape", None)
        if chunk_shape is not None and _tile_shape(tuple(chunk_shape))[2] not in (1, 3):
            raise ValueError(f"{JPEG_NAME}: 1 or 3 channels only, got chunk shape {tuple(chunk_shape)}")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: "ArraySpec") -> int:
        raise NotImplementedError  # variable: a compressed image

    def encode_tile(self, tile: np.ndarray) -> bytes:
        """One H×W×C tile (C 1 or 3) as this codec's JPEG: what a chunk of it is stored as."""
        import imagecodecs

        image = np.ascontiguousarray(tile if tile.shape[-1] == 3 else tile.reshape(tile.shape[:2]))
        return imagecodecs.jpeg8_encode(image, level=self.quality, subsampling=self.subsampling)

    def _encode_sync(self, chunk_array: "NDBuffer", chunk_spec: "ArraySpec") -> "Buffer":
        h, w, c = _tile_shape(chunk_spec.shape)
        encoded = self.encode_tile(chunk_array.as_numpy_array().reshape(h, w, c))
        return chunk_spec.prototype.buffer.from_bytes(encoded)

    def _decode_sync(self, chunk_bytes: "Buffer", chunk_spec: "ArraySpec") -> "NDBuffer":
        import imagecodecs

        h, w, c = _tile_shape(chunk_spec.shape)
        try:
            image = imagecodecs.jpeg8_decode(chunk_bytes.as_numpy_array())
        except Exception as exc:  # the checksum matched but the bytes are no JPEG: written wrong, not damaged
            raise ValueError(f"the JPEG does not decode ({type(exc).__name__}: {exc})") from None
        if image.size != h * w * c:
            raise ValueError(f"the JPEG is {'×'.join(map(str, image.shape))}, not the chunk's {h}×{w}×{c}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(image.reshape(chunk_spec.shape))

    # libjpeg-turbo releases the GIL: tiles are encoded off the event loop, and decoded on its threads
    async def _encode_single(self, chunk_array: "NDBuffer", chunk_spec: "ArraySpec") -> "Buffer":
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def encode(self, chunks_and_specs) -> list:
        """A batch of chunks encoded in one thread call, not one asyncio task and thread hand-off per tile
        (zarr's event loop holds the GIL meanwhile, which a reading thread waits for). The tiler writes
        whole shards by :mod:`pipeline.shards`; this serves what zarr still writes."""
        items = list(chunks_and_specs)

        def encode_all() -> list:
            return [None if chunk is None else self._encode_sync(chunk, spec) for chunk, spec in items]

        return await asyncio.to_thread(encode_all)

    async def _decode_single(self, chunk_bytes: "Buffer", chunk_spec: "ArraySpec") -> "NDBuffer":
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)


register_codec(JPEG_NAME, JpegCodec)
