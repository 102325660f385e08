"""Cell images many per job: a batch store holds several fields, each read back as a store of its own
would be (tiles, coords, labels, pictures), by training, heatmaps, QC and `gapless info`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.data import build_tile_table
from pipeline.demo import DemoSettings, generate
from pipeline.errors import GaplessError
from pipeline.qc import qc_rows
from pipeline.samples import load_sample_sheet
from pipeline.store import BATCH_SCHEMA, find_sample_store, open_sample, sample_stores, store_info
from pipeline.tiling import TileSettings, tile_source
from pipeline.tiling.batch import tile_batch

BIN = Path(sys.executable).parent
CLASSES = ["negative", "positive"]
GRID = TileSettings(mpp=0.5, tile_size=32, stride=32, min_tissue=0.1)


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    sheet = generate(root / "demo", DemoSettings(slides=0, images=4, image_size=192, witness_fraction=0.3),
                     progress=False)
    samples = load_sample_sheet(sheet, CLASSES)
    tiles = root / "tiles"
    result = tile_batch(samples, tiles / "batches" / "image-00001.zarr", tiles / "batches" / "image-00001.json", GRID,
                        progress=False)
    return root, sheet, samples, tiles, result


def test_each_field_of_a_batch_reads_back_as_its_own_store_would(fields, tmp_path):
    root, sheet, samples, tiles, result = fields
    assert result.samples == 4 and result.n_tiles > 4 * 8
    store = tiles / "batches" / "image-00001.zarr"
    assert zarr.open_group(store, mode="r").attrs["schema"] == BATCH_SCHEMA
    assert sample_stores(tiles) == {s.sample_id: store for s in samples}
    for s in samples[:2]:
        own = tile_source(s.path, tmp_path / f"{s.sample_id}.zarr",
                          TileSettings(**{**GRID.__dict__, "annotations": str(s.annotations)}), progress=False)
        alone, in_batch = open_sample(own.out), open_sample(store, s.sample_id)
        assert in_batch.n == alone.n and in_batch.attrs.width == alone.attrs.width
        np.testing.assert_array_equal(in_batch.read(0, in_batch.n), alone.read(0, alone.n))
        np.testing.assert_array_equal(in_batch.coords(), alone.coords())
        np.testing.assert_array_equal(in_batch.labels(), alone.labels())
        assert in_batch.attrs.channel_stats == alone.attrs.channel_stats
        assert in_batch.tissue_mask().shape == alone.tissue_mask().shape
        assert max(in_batch.thumbnail().shape[:2]) <= 256  # a field's thumbnail is kept small in a batch
    assert find_sample_store(tiles, samples[3].sample_id) == store


def test_the_data_path_qc_and_info_see_each_sample(fields):
    root, sheet, samples, tiles, result = fields
    store = tiles / "batches" / "image-00001.zarr"
    table = build_tile_table(samples, {s.sample_id: store for s in samples}, CLASSES)
    assert table.sample_ids == [s.sample_id for s in samples] and len(table) == result.n_tiles
    positives = [k for k, s in enumerate(samples) if s.label == "positive"]
    assert table.tile_label[np.isin(table.store_index, positives)].max() == 1
    rows = qc_rows(tiles / "batches" / "image-00001.json")
    assert [r["sample"] for r in rows] == [s.sample_id for s in samples] and all(r["kind"] == "image" for r in rows)
    info = store_info(store)
    assert [e["sample_id"] for e in info["samples"]] == [s.sample_id for s in samples]
    one = store_info(store, sample_id=samples[1].sample_id)
    assert one["sample_id"] == samples[1].sample_id and one["n"] == open_sample(store, samples[1].sample_id).n
    with pytest.raises(GaplessError, match="holds no sample 'nope'"):
        open_sample(store, "nope")


def test_a_bad_field_fails_its_batch_naming_every_bad_one_and_writes_nothing(fields, tmp_path):
    root, sheet, samples, tiles, result = fields
    broken = tmp_path / "broken.ome.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    bad = [s.__class__(**{**s.__dict__, "sample_id": f"bad-{i}", "path": broken}) for i, s in enumerate(samples[:2])]
    out = tmp_path / "b.zarr"
    with pytest.raises(GaplessError) as caught:
        tile_batch([samples[0], *bad, samples[1]], out, tmp_path / "b.json", GRID, progress=False)
    assert "2 problems" in str(caught.value) and "bad-0:" in str(caught.value) and "bad-1:" in str(caught.value)
    assert not out.exists() and not (tmp_path / "b.json").exists() and not (tmp_path / "b.zarr.partial").exists()


def test_the_command_tiles_the_sheet_samples_it_is_given(fields, tmp_path):
    root, sheet, samples, tiles, result = fields
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    ids = [s.sample_id for s in samples[1:3]]
    done = subprocess.run([str(BIN / "gapless"), "-q", "tile-batch", "--samples", str(sheet), "--ids", *ids,
                           "--out", str(tmp_path / "x.zarr"), "--manifest", str(tmp_path / "x.json"),
                           "--mpp", "0.5", "--tile-size", "32", "--min-tissue", "0.1"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "x.json").read_text())["samples"] == ids
    assert "2 samples" in done.stdout
    shutil.rmtree(tmp_path / "x.zarr")
    wrong = subprocess.run([str(BIN / "gapless"), "-q", "tile-batch", "--samples", str(sheet), "--ids", "nope",
                            "--out", str(tmp_path / "y.zarr"), "--manifest", str(tmp_path / "y.json")],
                           capture_output=True, text=True, env=env)
    assert wrong.returncode == 2 and "no sample 'nope' in the sheet" in wrong.stderr


def test_a_heatmap_of_a_field_in_a_batch(fields, tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipeline.heatmap import heatmap_sample
    from pipeline.models import create_model, get_head_class
    from pipeline.run_folder import ModelConfig, write_model_config

    root, sheet, samples, tiles, result = fields
    store = tiles / "batches" / "image-00001.zarr"
    view = open_sample(store, samples[0].sample_id)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    save_file(create_model("resnet10t", "gap", 2, in_chans=2, pretrained=False).state_dict(), run / "weights.safetensors")
    stats = view.attrs.channel_stats
    write_model_config(run, ModelConfig(backbone="resnet10t", head="gap", num_classes=2, in_chans=2, classes=CLASSES,
                                        mean=stats["mean"], std=stats["std"], tile_size=32, modality="fluorescence",
                                        mpp=0.5, head_info=get_head_class("gap").info().to_dict()))
    out = heatmap_sample(store, run, tmp_path / "maps", sample_id=samples[0].sample_id, progress=False, device="cpu")
    doc = json.loads(Path(out["gap"]["json"]).read_text())
    assert doc["sample"] == samples[0].sample_id and len(doc["tiles"]) == view.n
    assert (doc["width"], doc["height"]) == (view.attrs.width, view.attrs.height)
