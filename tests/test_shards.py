"""JPEG shards written by pipeline.shards: the same bytes as zarr's own writer, read back by zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.codecs import tile_array_codecs, tile_codec
from pipeline.io import open_source
from pipeline.shards import jpeg_shard_writer
from pipeline.tiling.cutting import _write_shard, shard_writer

CMU = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


def real_tiles(n: int, size: int = 64) -> np.ndarray:
    with open_source(CMU) as source:
        W, H = source.dimensions
        coords = [(x, y) for y in range(0, H - size, size) for x in range(0, W - size, size)][:n]
        return np.stack([source.read_region(c, 0, (size, size)) for c in coords])


def tile_array(folder: Path, n: int, per_shard: int, codec: str = "jpeg", channels: int = 3, size: int = 64):
    spec = tile_codec(codec, 90, np.uint8, channels, "brightfield")
    root = zarr.open_group(folder, mode="w", zarr_format=3)
    root.create_array("tiles", shape=(n, size, size, channels), chunks=(1, size, size, channels),
                      shards=(per_shard, size, size, channels), dtype=np.uint8, fill_value=0,
                      **tile_array_codecs(np.uint8, spec))
    with zarr.config.set({"array.write_empty_chunks": True}):
        return zarr.open_array(folder / "tiles", mode="r+")


def shard_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder / "tiles")): p.read_bytes() for p in sorted((folder / "tiles" / "c").rglob("*")) if p.is_file()}


def test_jpeg_shards_are_the_bytes_zarr_writes(tmp_path):
    tiles = real_tiles(37)
    tiles[5] = 0  # a tile of the fill value is stored too
    ours, theirs = tile_array(tmp_path / "ours", 37, 16), tile_array(tmp_path / "zarr", 37, 16)
    write = jpeg_shard_writer(ours)
    assert write is not None
    for start in range(0, 37, 16):  # two whole shards and a last one of 5 tiles
        write(start, tiles[start : start + 16])
        _write_shard(theirs, start, tiles[start : start + 16])
    mine, reference = shard_files(tmp_path / "ours"), shard_files(tmp_path / "zarr")
    assert list(mine) == ["c/0/0/0/0", "c/1/0/0/0", "c/2/0/0/0"] == list(reference)
    assert mine == reference
    back = zarr.open_array(tmp_path / "ours" / "tiles", mode="r")[:]
    assert back.shape == tiles.shape and np.abs(back.astype(int) - tiles).mean() < 3  # JPEG 90 of real tiles
    assert not list((tmp_path / "ours" / "tiles").rglob("*.partial"))


def test_other_arrays_are_left_to_zarr(tmp_path):
    lossless = tile_array(tmp_path / "l", 8, 4, codec="lossless")
    assert jpeg_shard_writer(lossless) is None
    tiles = real_tiles(8)
    shard_writer(lossless)(0, tiles[:4])  # zarr's pipeline
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "l" / "tiles")[:4], tiles[:4])


def test_only_whole_shards(tmp_path):
    write = jpeg_shard_writer(tile_array(tmp_path / "a", 20, 8))
    tiles = real_tiles(9)
    with pytest.raises(ValueError, match="not one whole shard"):
        write(3, tiles[:8])
    with pytest.raises(ValueError, match="not one whole shard"):
        write(0, tiles[:9])
    with pytest.raises(ValueError, match="not one whole shard"):
        write(16, tiles[:8])  # past the array's 20 tiles


def test_a_batch_of_brightfield_fields_over_several_jpeg_shards(tmp_path, monkeypatch):
    """tile_batch grows its array shard by shard (JPEG shards by pipeline.shards, the last one short): every
    field's tiles read back through zarr as the field's pixels, JPEG-close."""
    import tifffile

    import pipeline.tiling.batch as batch
    from pipeline.demo import DemoSettings, generate
    from pipeline.samples import load_sample_sheet
    from pipeline.store import open_sample
    from pipeline.tiling import TileSettings

    sheet = generate(tmp_path / "demo", DemoSettings(slides=0, images=5, cells_per_image=64, image_modality="brightfield",
                                                     image_mpp=1.0), progress=False)
    samples = load_sample_sheet(sheet, ["negative", "positive"])
    monkeypatch.setattr(batch, "SHARD_BYTES", 16 * 32 * 32 * 3)  # 16 tiles of 32 px per shard
    result = batch.tile_batch(samples, tmp_path / "b.zarr", tmp_path / "b.json",
                              TileSettings(mpp=1.0, tile_size=32, min_tissue=0.0), progress=False)
    assert result.n_tiles > 32 and result.n_tiles % 16  # two or more whole shards and a short last one
    for s in samples:
        view = open_sample(tmp_path / "b.zarr", s.sample_id)
        assert view.attrs.tile_codec["name"] == "jpeg"
        field = tifffile.imread(s.path)
        tiles, coords = view.read(0, view.n), view.coords()
        for tile, (x, y) in zip(tiles, coords):
            assert np.abs(tile.astype(int) - field[y : y + 32, x : x + 32]).mean() < 8  # JPEG 90 of sharp-edged cells
    assert len(shard_files(tmp_path / "b.zarr")) == -(-result.n_tiles // 16)
