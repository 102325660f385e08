"""A damaged tile store never reads as blank tiles: a missing or truncated shard is refused on opening
(the store's integrity record), a changed byte on reading (each chunk's checksum); every refusal is
one line naming the store and the fix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import SNAKEMAKE_MARKER_WARNING, data
from pipeline.errors import GaplessError
from pipeline.models import HeadOutput
from pipeline.samples import Sample
from pipeline.store import open_store, store_info
from pipeline.tiling import TileSettings, tile_source

DATA = Path(__file__).parent / "data"
CMU = DATA / "CMU-1-Small-Region.svs"
CLASSES = ["negative", "positive"]
SHARD = "tiles/c/1/0/0/0"  # the second of three shards: tiles 16–31


def gapless(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *map(str, args)], capture_output=True, text=True)


def one_error_line(proc, store) -> str:
    """The single line on stderr of a refused command, which must name ``store``."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(store) in lines[0] and "damaged tile store" in lines[0] and "re-tile it" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    """46 tiles of 32 px at 4 µm/px from the CMU fixture, 16 tiles a shard: three shard files."""
    out = tmp_path_factory.mktemp("store") / "cmu.zarr"
    tile_source(CMU, out, TileSettings(mpp=4.0, tile_size=32), progress=False)
    return out


def copy_of(intact: Path, tmp_path: Path) -> Path:
    store = tmp_path / "cmu.zarr"
    shutil.copytree(intact, store)
    return store


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def table_of(store: Path) -> data.TileTable:
    return data.build_tile_table([Sample("cmu", CMU, "positive")], {"cmu": store}, CLASSES)


@pytest.mark.filterwarnings(f"ignore:{SNAKEMAKE_MARKER_WARNING}")
def test_an_intact_store_records_its_files_and_passes_verify(intact, tmp_path):
    store = copy_of(intact, tmp_path)
    root = zarr.open_group(store, mode="r")
    record = root.attrs["integrity"]
    on_disk = {p.relative_to(store).as_posix(): p.stat().st_size for p in store.rglob("*") if p.is_file()}
    assert record["files"] == {k: v for k, v in on_disk.items() if k != "zarr.json"}  # all but the record's own file
    assert record["tiles_shards"] == 3 and root["tiles"].shape[0] == 46 and root["tiles"].shards[0] == 16
    assert {"coords/c/0/0", "labels/c/0", "thumbnail/zarr.json", SHARD} <= set(record["files"])
    assert [c["name"] for c in json.loads((store / "tiles" / "zarr.json").read_text())["codecs"][0]["configuration"]
            ["codecs"]] == ["gapless.jpeg", "crc32c"]  # an 8-bit RGB slide: JPEG, each tile's checksum after it
    (store / ".snakemake_timestamp").write_text("")  # Snakemake marks directory outputs: not part of the store
    proc = gapless("info", "--verify", store)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["integrity"] == {"status": "ok", "files": len(record["files"]), "bytes": sum(record["files"].values()),
                                 "tiles_shards": 3, "verified": 46}
    assert store_info(store)["integrity"]["status"] == "ok"
    # the record describes storage, not data: the fingerprint ignores it
    before = data.data_fingerprint(None, [store])
    group = zarr.open_group(store, mode="r+")
    group.attrs["integrity"] = dict(record, bytes=record["bytes"] + 1)
    assert data.data_fingerprint(None, [store]) == before


@pytest.mark.parametrize("damage, expected", [
    ("delete", f"1 of 3 shard files missing: {SHARD}"),
    ("truncate", f"1 file changed in size: {SHARD} (1000 bytes, "),
])
def test_a_missing_or_truncated_shard_is_refused_on_opening(intact, tmp_path, damage, expected):
    store = copy_of(intact, tmp_path)
    shard = store / SHARD
    if damage == "delete":
        shard.unlink()
    else:
        with open(shard, "r+b") as fh:
            fh.truncate(1000)
    line = one_error_line(gapless("info", store), store)
    assert expected in line
    with pytest.raises(GaplessError, match="damaged tile store") as err:
        open_store(store)
    assert err.value.path == str(store) and expected in err.value.cause
    # the data path refuses it before reading any tile (training would otherwise see 16 black tiles)
    with pytest.raises(GaplessError, match=expected.replace("(", r"\(")):
        table_of(store)
    with pytest.raises(GaplessError, match="damaged tile store"):
        data.data_fingerprint(None, [store])


def test_a_store_without_an_integrity_record_is_refused(intact, tmp_path):
    store = copy_of(intact, tmp_path)
    group = zarr.open_group(store, mode="r+")
    del group.attrs["integrity"]  # as written before the record existed
    with pytest.raises(GaplessError, match="no integrity record .*re-tile it"):
        open_store(store)


class Blank(torch.nn.Module):
    def forward(self, x):
        maps = torch.zeros(len(x), 2, 2, 2)
        return HeadOutput(maps.mean(dim=(2, 3)), maps, None, False)


def test_a_changed_byte_is_one_line_naming_the_store_and_tile(intact, tmp_path):
    store = copy_of(intact, tmp_path)
    shard = store / SHARD
    flip_byte(shard, shard.stat().st_size // 3)  # inside one tile's compressed bytes; the size is unchanged
    assert gapless("info", store).returncode == 0  # the cheap check (file sizes) cannot see it ...
    line = one_error_line(gapless("info", "--verify", store), store)  # ... reading every tile does
    assert "checksum mismatch" in line and SHARD in line
    bad = int(re.search(r"tile (\d+) \(", line).group(1))
    assert 16 <= bad < 32

    dataset = data.TileDataset(table_of(store))
    dataset.read_tile(0)  # the other shards read as before
    with pytest.raises(GaplessError) as err:
        dataset[bad]
    assert err.value.path == str(store) and f"tile {bad} ({SHARD}) cannot be read (checksum mismatch)" in err.value.cause
    expected = err.value.message
    for workers in (0, 1):  # a DataLoader worker's error reaches the main process as the same one line
        loader = data.make_loader(dataset, batch_size=8, workers=workers)
        with pytest.raises(GaplessError) as err:
            for _ in loader:
                pass
        assert err.value.message == expected
        del loader

    from pipeline.heatmap import iter_tile_maps

    config = {"mean": [0.0] * 3, "std": [1.0] * 3, "modality": "brightfield"}
    with pytest.raises(GaplessError) as err:
        for _ in iter_tile_maps(Blank(), config, store, batch_size=8, device="cpu", progress=False):
            pass
    assert err.value.message == expected


def test_a_gapless_error_is_rebuilt_from_a_worker_traceback():
    try:
        raise GaplessError("s.zarr", "damaged tile store: tile 3", "re-tile it")
    except GaplessError:
        text = "Caught GaplessError in DataLoader worker process 0.\nOriginal " + traceback.format_exc()
    rebuilt = GaplessError(message=text)  # as torch's ExceptionWrapper.reraise builds it
    assert rebuilt.message == str(rebuilt) == "s.zarr: damaged tile store: tile 3; re-tile it"
    plain = GaplessError("a.zarr", "cause", "fix")
    assert (plain.path, plain.cause, plain.fix, plain.message) == ("a.zarr", "cause", "fix", "a.zarr: cause; fix")


def test_heatmap_refuses_a_store_with_a_missing_shard_before_any_output(intact, tmp_path):
    from safetensors.torch import save_file

    from pipeline.models import create_model

    store = copy_of(intact, tmp_path)
    (store / SHARD).unlink()
    run = tmp_path / "run"
    run.mkdir()
    model = create_model("resnet10t", "gap", 2, in_chans=3, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "weights.safetensors")
    stats = zarr.open_group(store, mode="r").attrs["channel_stats"]
    (run / "model.json").write_text(json.dumps({
        "backbone": "resnet10t", "head": "gap", "num_classes": 2, "in_chans": 3, "classes": CLASSES, "head_kwargs": {},
        "mean": stats["mean"], "std": stats["std"], "tile_size": 32, "image_size": None, "modality": "brightfield",
        "mpp": 4.0}))
    out = tmp_path / "heatmap"
    line = one_error_line(gapless("heatmap", store, "--model", run, "--out", out, "--device", "cpu"), store)
    assert f"1 of 3 shard files missing: {SHARD}" in line
    assert not out.exists() and not list(tmp_path.glob("heatmap*"))


def test_a_shard_of_blank_tiles_that_is_not_written_is_not_missing(tmp_path):
    """zarrs leaves out a shard whose tiles are all the fill value; it reads back as the zeros it holds."""
    import tifffile

    image = np.zeros((64, 64), np.uint16)
    image[16:] = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)  # tiles 0–15 (rows 0–15) all zero
    source = tmp_path / "field.tiff"
    tifffile.imwrite(source, image)
    store = tmp_path / "field.zarr"
    tile_source(source, store, TileSettings(mpp=1.0, tile_size=8, min_tissue=0.0, tissue="none", slide_mpp=1.0,
                                            kind="image"), progress=False)
    info = store_info(store, verify=True)
    assert info["n"] == 64 and info["tiles_per_shard"] == 16 and info["integrity"]["verified"] == 64
    assert (store / "tiles/c/1/0/0/0").exists() and info["integrity"]["tiles_shards"] in (3, 4)
    tiles = open_store(store)["tiles"]
    assert not tiles[:16].any() and (tiles[16:].reshape(48, -1).any(axis=1)[8:]).all()
