"""The instances-per-image axis: demo fields with exactly N cells and k witnesses (fluorescence and
brightfield), whole-field tiles (the tile is the field), and a backbone narrowed through backbone_kwargs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.demo import DemoSettings, generate, plan
from pipeline.demo.dataset import field_size
from pipeline.demo.fields import _field_scene
from pipeline.errors import GaplessError, SampleSheetError
from pipeline.samples import load_sample_sheet
from pipeline.store import open_sample
from pipeline.tiling import TileSettings
from pipeline.tiling.batch import tile_batch

BIN = Path(sys.executable).parent
CLASSES = ["negative", "positive"]
WHOLE = TileSettings(mpp=1.0, whole=True, min_tissue=0.0)


def _scene(settings: DemoSettings, index: int):
    from pipeline.demo.dataset import _seeds

    sample = plan(settings)[index]
    return sample, _field_scene(settings, sample, _seeds(settings, sample)[0])


@pytest.mark.parametrize("modality", ["fluorescence", "brightfield"])
@pytest.mark.parametrize("n, k", [(16, 1), (256, 1), (256, 3)])
def test_a_field_holds_n_cells_and_a_positive_one_exactly_k_witnesses(modality, n, k):
    settings = DemoSettings(slides=0, images=4, cells_per_image=n, witnesses=k, image_modality=modality,
                            image_mpp=1.0, cell_density=40.0)
    edge = field_size(settings)
    assert edge == max(32, round(np.sqrt(n * 1e4 / 40.0)))  # px at 1 µm/px: the density asked for
    for index in range(4):
        sample, cells = _scene(settings, index)
        assert cells.witness.sum() == (k if sample.label == "positive" else 0)
        if sample.label == "negative":
            assert len(cells) == n
        else:  # an enlarged brightfield witness may push out an ordinary neighbour
            assert n - 2 * k <= len(cells) <= n
        inside = (cells.x >= 0) & (cells.x < edge) & (cells.y >= 0) & (cells.y < edge)
        assert inside.all()


def test_the_field_grows_with_n_and_its_cells_keep_their_size():
    sizes = [field_size(DemoSettings(cells_per_image=n, image_mpp=1.0, cell_density=40.0)) for n in (16, 64, 256, 1024)]
    assert sizes == [63, 126, 253, 506]
    radii = []
    for n in (64, 1024):
        _, cells = _scene(DemoSettings(slides=0, images=2, cells_per_image=n, image_mpp=1.0), 1)
        radii.append(np.median(np.sqrt(cells.a * cells.b)))
    assert abs(radii[0] - radii[1]) < 0.3  # px: the same cells, more of them


def test_without_cells_per_image_the_fields_are_unchanged():
    settings = DemoSettings(slides=0, images=2, image_size=192)
    assert field_size(settings) == 192
    assert plan(settings)[0].path == "images/field-00.ome.tif"


@pytest.mark.parametrize("change, words", [
    ({"cells_per_image": 300000}, "cells_per_image"),
    ({"cells_per_image": 16, "witnesses": 9}, "witnesses"),
    ({"image_modality": "phase"}, "image_modality"),
    ({"cells_per_image": -1}, "cells_per_image"),
])
def test_bad_instance_settings_are_one_clear_line(tmp_path, change, words):
    out = tmp_path / "demo"
    done = subprocess.run([str(BIN / "gapless"), "demo", "--out", str(out), "--settings",
                           json.dumps({"slides": 0, "images": 2, **change})], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (out / "samples.csv").exists()


@pytest.fixture(scope="module")
def sheets(tmp_path_factory):
    root = tmp_path_factory.mktemp("instances")
    made = {}
    for modality in ("fluorescence", "brightfield"):
        settings = DemoSettings(slides=0, images=4, cells_per_image=64, witnesses=1, image_modality=modality,
                                image_mpp=1.0)
        made[modality] = generate(root / modality, settings, progress=False)
    return root, made


@pytest.mark.parametrize("modality", ["fluorescence", "brightfield"])
def test_whole_field_tiles_are_the_fields_and_carry_the_field_label(sheets, modality):
    root, made = sheets
    samples = load_sample_sheet(made[modality], CLASSES)
    out = root / f"{modality}-tiles"
    result = tile_batch(samples, out / "b.zarr", out / "b.json", WHOLE, progress=False)
    assert result.samples == 4 and result.n_tiles == 4
    for s in samples:
        view = open_sample(out / "b.zarr", s.sample_id)
        assert view.n == 1 and view.attrs.tile_size == 126
        tile = view.read(0, 1)[0]
        source = tifffile.imread(s.path)
        pixels = source if source.ndim == 3 and source.shape[-1] == 3 else np.moveaxis(source, 0, -1)
        if modality == "fluorescence":  # lossless: the tile is the field, pixel for pixel
            np.testing.assert_array_equal(tile, pixels)
        else:  # JPEG-coded 8-bit RGB
            assert tile.shape == pixels.shape and np.abs(tile.astype(int) - pixels).mean() < 4
        assert int(view.labels()[0]) == (1 if s.label == "positive" else 0)


def test_one_field_tiled_whole_by_the_cli(sheets, tmp_path):
    root, made = sheets
    s = load_sample_sheet(made["fluorescence"], CLASSES)[0]
    out = tmp_path / "one.zarr"
    done = subprocess.run([str(BIN / "gapless"), "-q", "tile", str(s.path), "--out", str(out), "--mpp", "1.0",
                           "--whole", "--min-tissue", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    view = open_sample(out)
    assert view.n == 1 and view.attrs.tile_size == 126 and view.attrs.grid == [1, 1]


def test_fields_of_two_sizes_in_one_whole_field_batch_are_refused_with_no_store(sheets, tmp_path):
    root, made = sheets
    small = generate(tmp_path / "small", DemoSettings(slides=0, images=2, cells_per_image=16, image_mpp=1.0),
                     progress=False)
    samples = load_sample_sheet(made["fluorescence"], CLASSES)[:1] + load_sample_sheet(small, CLASSES)[:1]
    with pytest.raises(SampleSheetError) as caught:
        tile_batch(samples, tmp_path / "b.zarr", tmp_path / "b.json", WHOLE, progress=False)
    assert "63 px" in str(caught.value) and "126 px" in str(caught.value)
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "b.json").exists()


def test_a_narrower_backbone_through_backbone_kwargs_keeps_the_heads_own_arguments():
    from pipeline.models import create_model
    from pipeline.models.layers import GateRecordingCbam

    narrow = {"channels": [16, 32, 64, 128], "stem_width": 8}
    model = create_model("resnet10t", "cbam", 2, in_chans=2, backbone_kwargs=narrow)
    assert model.backbone.num_features == 128
    assert any(isinstance(m, GateRecordingCbam) for m in model.modules())  # cbam's block_args kept
    import torch

    out = model(torch.zeros(2, 2, 64, 64))
    assert out.logits.shape == (2, 2) and out.contribution.shape == (2, 2, 2, 2)
    with pytest.raises(GaplessError):
        create_model("resnet10t", "gap", 2, backbone_kwargs={"no_such_argument": 1})


def test_a_batch_in_chunks_takes_the_same_step_as_the_whole_batch():
    """max_batch_pixels splits a batch into chunks whose gradients add up: the same loss and the same
    parameters after the step as the whole batch at once (BatchNorm in eval mode, so nothing else differs)."""
    import contextlib

    import torch

    from pipeline.models import create_model
    from pipeline.train import micro_batch, train_step

    assert micro_batch(8, 64, None) == 8 and micro_batch(8, 64, 3 * 64 * 64) == 3 and micro_batch(8, 1024, 10) == 1
    torch.manual_seed(0)
    x, y = torch.randn(7, 3, 64, 64), torch.tensor([0, 1, 1, 0, 1, 0, 1])
    results = []
    for micro in (None, 3):
        torch.manual_seed(1)
        model = create_model("resnet10t", "attnpool", 2, in_chans=3).eval()
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = train_step(model, x, y, optimiser, contextlib.nullcontext, grad_clip=1e9, micro=micro)
        results.append((float(loss), torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
