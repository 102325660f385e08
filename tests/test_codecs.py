"""Tile codecs: 8-bit RGB brightfield tiles are JPEG (quality from the settings, recorded in the store),
everything else stays lossless, and a damaged JPEG tile is the same one line as a damaged lossless one."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.codecs import JPEG_NAME, JpegCodec, rust_can_write, tile_codec
from pipeline.errors import GaplessError
from pipeline.store import read_tiles
from pipeline.tiling import TileSettings, tile_source

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"


def gapless(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *map(str, args)], capture_output=True, text=True)


def chunk_codecs(store: Path) -> list[dict]:
    """The codecs of one tile (inside the shard) as the store's tiles/zarr.json names them."""
    return json.loads((store / "tiles" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


@pytest.fixture(scope="module")
def cmu_stores(tmp_path_factory) -> dict[str, Path]:
    """The CMU fixture at 224 px, 0.5 µm/px: the default (JPEG 90) and lossless."""
    root = tmp_path_factory.mktemp("codecs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarrs must not be asked to write JPEG (it would warn and fall back)
        jpeg = tile_source(CMU, root / "jpeg.zarr", TileSettings(mpp=0.5, tile_size=224), progress=False).out
    lossless = tile_source(CMU, root / "lossless.zarr", TileSettings(mpp=0.5, tile_size=224, codec="lossless"),
                           progress=False).out
    return {"jpeg": jpeg, "lossless": lossless}


def test_a_jpeg_store_round_trips_within_jpeg_error_and_records_its_codec(cmu_stores):
    jpeg, lossless = (zarr.open_group(cmu_stores[k], mode="r") for k in ("jpeg", "lossless"))
    assert jpeg.attrs["tile_codec"] == {"name": "jpeg", "quality": 90, "subsampling": "444", "lossless": False}
    assert lossless.attrs["tile_codec"] == {"name": "blosc-lz4", "lossless": True}
    assert chunk_codecs(cmu_stores["jpeg"]) == [{"name": JPEG_NAME, "configuration": {"quality": 90, "subsampling": "444"}},
                                               {"name": "crc32c"}]
    assert [c["name"] for c in chunk_codecs(cmu_stores["lossless"])] == ["bytes", "blosc", "crc32c"]
    a, b = jpeg["tiles"][:], lossless["tiles"][:]  # the same tiles: lossless holds the slide's own pixels
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert psnr(a, b) > 35 and min(psnr(x, y) for x, y in zip(a, b)) > 33
    assert np.abs(a.mean((0, 1, 2)) - b.mean((0, 1, 2))).max() < 0.5  # no colour shift (float64 means)
    assert not rust_can_write(cmu_stores["jpeg"] / "tiles") and rust_can_write(cmu_stores["lossless"] / "tiles")
    tiles_bytes = {k: sum(f.stat().st_size for f in (s / "tiles").rglob("*") if f.is_file()) for k, s in cmu_stores.items()}
    assert tiles_bytes["jpeg"] * 4 < tiles_bytes["lossless"]


def test_gapless_info_shows_the_codec(cmu_stores):
    proc = gapless("info", "--verify", cmu_stores["jpeg"])  # a new process reads every JPEG tile
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["tile_codec"]["name"] == "jpeg" and info["tile_codec"]["quality"] == 90
    assert info["integrity"]["verified"] == info["n"] > 0


def test_quality_is_a_setting(tmp_path):
    low = tile_source(CMU, tmp_path / "q50.zarr", TileSettings(mpp=4.0, tile_size=32, quality=50), progress=False)
    assert low.attrs["tile_codec"]["quality"] == 50 and chunk_codecs(low.out)[0]["configuration"]["quality"] == 50
    for bad in (0, 101):
        with pytest.raises(GaplessError, match="--quality must be a whole number from 1 to 100"):
            TileSettings(quality=bad).validate(CMU)
    with pytest.raises(ValueError, match="quality"):
        JpegCodec(quality=0)


def test_16_bit_fluorescence_stays_bit_exact_lossless(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65535, size=(2, 64, 96)).astype(np.uint16)
    path = tmp_path / "field.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    result = tile_source(path, tmp_path / "field.zarr", TileSettings(mpp=0.5, tile_size=32, min_tissue=0.0,
                                                                     tissue="none", codec="jpeg"), progress=False)
    assert result.attrs["tile_codec"] == {"name": "blosc-lz4", "lossless": True}
    assert [c["name"] for c in chunk_codecs(result.out)] == ["bytes", "blosc", "crc32c"]
    root = zarr.open_group(result.out, mode="r")
    for i, (x, y) in enumerate(root["coords"][:]):
        np.testing.assert_array_equal(np.moveaxis(root["tiles"][i], -1, 0), data[:, y : y + 32, x : x + 32])


@pytest.mark.parametrize("dtype, channels, modality, expected", [
    (np.uint8, 3, "brightfield", "jpeg"),
    (np.uint8, 3, "fluorescence", "blosc-lz4"),  # 8-bit RGB fluorescence: dim signal on black, kept exact
    (np.uint16, 3, "brightfield", "blosc-lz4"),
    (np.uint8, 1, "brightfield", "blosc-lz4"),
    (np.uint8, 4, "brightfield", "blosc-lz4"),
])
def test_only_8_bit_rgb_brightfield_is_jpeg(dtype, channels, modality, expected):
    assert tile_codec("jpeg", 90, np.dtype(dtype), channels, modality)["name"] == expected
    assert tile_codec("lossless", 90, np.dtype(dtype), channels, modality)["name"] == "blosc-lz4"


def test_a_corrupted_jpeg_tile_is_one_line_naming_the_store_and_tile(cmu_stores, tmp_path):
    import shutil

    store = tmp_path / "cmu.zarr"
    shutil.copytree(cmu_stores["jpeg"], store)
    shard = store / "tiles" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside one tile's JPEG; the file's size is unchanged
    shard.write_bytes(bytes(raw))
    proc = gapless("info", "--verify", store)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(store) in lines[0] and "damaged tile store" in lines[0]
    assert "checksum mismatch" in lines[0] and "tiles/c/1/0/0/0" in lines[0]


def test_a_jpeg_that_does_not_decode_is_one_line(tmp_path):
    """Bytes whose checksum matches but that are no JPEG (written wrong, not damaged) name the tile too."""
    import google_crc32c

    tiles = zarr.create_array(tmp_path / "tiles", shape=(2, 16, 16, 3), chunks=(1, 16, 16, 3), dtype="uint8",
                              fill_value=0, serializer=JpegCodec(quality=90), compressors=[zarr.codecs.Crc32cCodec()])
    tiles[:] = 128
    garbage = b"not a jpeg at all"
    (tmp_path / "tiles" / "c" / "1" / "0" / "0" / "0").write_bytes(garbage + np.uint32(google_crc32c.value(garbage)).tobytes())
    assert read_tiles(tiles, 0, 1, tmp_path).max() == 128
    with pytest.raises(GaplessError) as err:
        read_tiles(tiles, 0, 2, tmp_path)
    assert "tile 1 (tiles/c/1/0/0/0) cannot be read (ValueError: the JPEG does not decode" in err.value.cause
    assert "\n" not in err.value.message
