"""`gapless embed`: each tile's pooled backbone features on the tile grid, from a timm backbone or a trained
run, written atomically, read back checked; bad input is one line and leaves nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
import zarr

from pipeline import cli
from pipeline import embed as embed_module
from pipeline.embed import SCHEMA, embed_store, read_embeddings
from pipeline.errors import GaplessError
from pipeline.store import open_sample
from pipeline.tiling import TileSettings, tile_source

DATA = Path(__file__).parent / "data"
CLASSES = ["negative", "positive"]
RUN_MEAN, RUN_STD = [200.0, 150.0, 180.0], [40.0, 60.0, 50.0]  # not the store's: the run's own must be used


def gapless(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "-q", *map(str, args)], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A real H&E slide cut into 64-px tiles at 4 µm/px with stride 32 (tiles overlap, step 256.5 level-0
    px), tissue-filtered: a grid with holes."""
    root = tmp_path_factory.mktemp("embed")
    store = tile_source(DATA / "CMU-1-Small-Region.svs", root / "slide.zarr",
                        TileSettings(mpp=4.0, tile_size=64, stride=32), progress=False).out
    return root, store


@pytest.fixture(scope="module")
def run_dir(slide):
    """A run folder as `gapless train` leaves it, of an untrained resnet10t + gap, fed 32-px inputs."""
    from safetensors.torch import save_file

    from pipeline.models import create_model
    from pipeline.run_folder import ModelConfig, write_model_config

    root, _ = slide
    run = root / "run"
    run.mkdir()
    torch.manual_seed(3)
    model = create_model("resnet10t", "gap", 2, in_chans=3, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "weights.safetensors")
    write_model_config(run, ModelConfig(backbone="resnet10t", head="gap", num_classes=2, in_chans=3, classes=CLASSES,
                                        mean=RUN_MEAN, std=RUN_STD, tile_size=64, image_size=32, modality="brightfield",
                                        mpp=4.0))
    (run / "run_id.txt").write_text("test\n")
    return run


def pooled(backbone, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return backbone.forward_features(x).mean(dim=(2, 3)).numpy()


def raw_tiles(store) -> torch.Tensor:
    view = open_sample(store)
    return torch.from_numpy(view.read(0, view.n)).permute(0, 3, 1, 2).float()


def test_a_timm_backbone_through_the_command(slide):
    root, store = slide
    out = root / "embeddings" / "slide.zarr"
    done = gapless("embed", store, "--out", out, "--backbone", "resnet10t", "--batch-size", 16, "--threads", 1)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("embed: slide: ") and "D 512" in done.stdout and str(out) in done.stdout
    assert not out.with_name("slide.zarr.partial").exists()

    e = read_embeddings(out)
    tiles = zarr.open_group(store, mode="r")
    t = dict(tiles.attrs)
    n = t["n_tiles"]
    assert n > 20 and e.n == n and e.dim == 512
    raw = zarr.open_group(out, mode="r")
    assert raw["features"].dtype == np.float16 and raw["features"].shape == (n, 512)
    assert raw["coords"].dtype == np.int64 and raw["grid"].dtype == np.int32 and raw["labels"].dtype == np.int8
    np.testing.assert_array_equal(e.coords, tiles["coords"][:])
    np.testing.assert_array_equal(e.labels, tiles["labels"][:])

    # the grid: (row, col) times the step is the tile's corner; inside [rows, cols]; no two tiles on one place
    columns, rows = t["grid"]
    assert e.grid_shape == (rows, columns) and e.attrs["grid_shape"] == [rows, columns]
    assert t["tile_step"] == pytest.approx(256.5) and t["tile_step"] < t["tile_extent"]
    np.testing.assert_allclose(e.grid[:, ::-1] * t["tile_step"], e.coords, atol=0.5)
    assert e.grid.min() >= 0 and e.grid[:, 0].max() < rows and e.grid[:, 1].max() < columns
    assert len({tuple(g) for g in e.grid}) == n < rows * columns  # tissue-filtered: holes in the grid

    a = e.attrs
    assert a["schema"] == SCHEMA and a["sample_id"] == "slide" and a["tile_store"] == str(store.resolve())
    assert a["source"] == t["source"] and a["kind"] == "slide" and a["encoder"] == "timm"
    assert a["backbone"] == "resnet10t" and a["weights"] == "random-init" and a["weights_sha256"] is None
    assert a["model_dir"] is None and a["dim"] == 512 and a["n_tiles"] == n and a["seed"] == 0
    for key in ("mpp", "tile_size", "tile_extent", "tile_step", "width", "height"):
        assert a[key] == t[key], key
    assert a["seconds"] > 0 and a["tool_version"]

    # the features: the seeded random backbone's pooled final map of the tiles normalised by the store's stats
    from pipeline.models import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", in_chans=3).eval()
    stats = t["channel_stats"]
    mean, std = (torch.tensor(stats[k], dtype=torch.float32)[None, :, None, None] for k in ("mean", "std"))
    expected = pooled(backbone, (raw_tiles(store) - mean) / std)
    np.testing.assert_allclose(e.features, expected, rtol=1e-2, atol=2e-3)
    assert np.abs(expected).max() > 0.05  # not trivially zero


def test_a_trained_run_embeds_with_its_backbone_and_its_input_preparation(slide, run_dir, tmp_path):
    from pipeline.embed import sha256
    from pipeline.run_folder import load_trained

    _, store = slide
    result = embed_store(store, tmp_path / "e.zarr", model_dir=run_dir, batch_size=7, device="cpu", progress=False)
    e = read_embeddings(result["out"])
    model, _ = load_trained(run_dir, device="cpu")
    mean, std = (torch.tensor(v)[None, :, None, None] for v in (RUN_MEAN, RUN_STD))
    x = F.avg_pool2d((raw_tiles(store) - mean) / std, 2)  # model.json: image_size 32 from 64-px tiles (area average)
    expected = pooled(model.backbone, x)
    np.testing.assert_allclose(e.features, expected, rtol=1e-2, atol=2e-3)
    other = pooled(model.backbone, F.avg_pool2d(raw_tiles(store) / 255.0, 2))  # another preparation differs
    assert np.abs(other - expected).max() > 0.05
    a = e.attrs
    assert a["encoder"] == "model" and a["model_dir"] == str(run_dir.resolve()) and a["weights"] == "gapless-run"
    assert a["weights_sha256"] == sha256(run_dir / "weights.safetensors") and a["head"] == "gap"
    assert a["normalisation"] == {"mean": RUN_MEAN, "std": RUN_STD, "image_size": 32, "modality": "brightfield"}
    assert "seed" not in a


def test_the_same_input_gives_the_same_bytes(slide, tmp_path):
    _, store = slide
    outs = [embed_store(store, tmp_path / f"{i}.zarr", backbone="resnet10t", batch_size=16, device="cpu",
                        progress=False)["out"] for i in range(2)]
    first, second = (sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "zarr.json")
                     for out in outs)
    assert first == second and any(str(p).startswith("features/c/") for p in first)
    for rel in first:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    reseeded = embed_store(store, tmp_path / "seed1.zarr", backbone="resnet10t", seed=1, batch_size=16, device="cpu",
                           progress=False)["out"]
    assert not np.array_equal(read_embeddings(reseeded).features, read_embeddings(outs[0]).features)


def test_local_weights_are_loaded_and_hashed(slide, tmp_path):
    from safetensors.torch import save_file

    from pipeline.embed import sha256
    from pipeline.models import create_backbone

    _, store = slide
    torch.manual_seed(7)
    backbone = create_backbone("resnet10t", in_chans=3).eval()
    weights = tmp_path / "w.safetensors"
    save_file(backbone.state_dict(), weights)
    e = read_embeddings(embed_store(store, tmp_path / "e.zarr", backbone="resnet10t", weights=weights, device="cpu",
                                    progress=False)["out"])
    assert e.attrs["weights"] == str(weights.resolve()) and e.attrs["weights_sha256"] == sha256(weights)
    assert "seed" not in e.attrs
    stats = zarr.open_group(store, mode="r").attrs["channel_stats"]
    mean, std = (torch.tensor(stats[k], dtype=torch.float32)[None, :, None, None] for k in ("mean", "std"))
    np.testing.assert_allclose(e.features, pooled(backbone, (raw_tiles(store) - mean) / std), rtol=1e-2, atol=2e-3)


def test_backbone_arguments_reach_timm(slide, tmp_path, capsys):
    _, store = slide
    out = tmp_path / "narrow.zarr"
    assert cli.main(["-q", "embed", str(store), "--out", str(out), "--backbone", "resnet10t", "--backbone-kwargs",
                     '{"channels": [16, 32, 64, 128]}', "--device", "cpu"]) == 0
    e = read_embeddings(out)
    assert e.dim == 128 and e.attrs["backbone_kwargs"] == {"channels": [16, 32, 64, 128]}
    assert "D 128" in capsys.readouterr().out


def _one_error_line(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("gapless embed: error: "), err
    return err


def test_bad_input_is_one_line_and_leaves_nothing(slide, run_dir, tmp_path, capsys):
    _, store = slide
    out = tmp_path / "e.zarr"
    cases = {
        "no such tile store": ["embed", str(tmp_path / "missing.zarr"), "--out", str(out), "--backbone", "resnet10t"],
        "exactly one of them": ["embed", str(store), "--out", str(out), "--backbone", "resnet10t", "--model", str(run_dir)],
        "either a trained run": ["embed", str(store), "--out", str(out)],
        "weights file not found": ["embed", str(store), "--out", str(out), "--backbone", "resnet10t", "--weights",
                                   str(tmp_path / "nope.safetensors")],
        "not with a trained run": ["embed", str(store), "--out", str(out), "--model", str(run_dir), "--weights",
                                   str(run_dir / "weights.safetensors")],
        "no such training run folder": ["embed", str(store), "--out", str(out), "--model", str(tmp_path / "norun")],
        "unknown timm backbone": ["embed", str(store), "--out", str(out), "--backbone", "no-such-net"],
        "backbone arguments go with": ["embed", str(store), "--out", str(out), "--model", str(run_dir),
                                       "--backbone-kwargs", '{"channels": [16, 32, 64, 128]}'],
        "replace or sit inside the tile store": ["embed", str(store), "--out", str(store), "--backbone", "resnet10t"],
    }
    for expected, argv in cases.items():
        assert expected in _one_error_line(capsys, ["-q", *argv]), expected
        assert sorted(tmp_path.iterdir()) == [], expected
    assert (store / "zarr.json").is_file()  # the tile store given as --out is untouched

    # through the real command too: one line on stderr, status 2, nothing written
    done = gapless("embed", store, "--out", out, "--backbone", "resnet10t", "--weights", tmp_path / "nope.pth")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "weights file not found" in done.stderr and not out.exists()


def test_an_existing_store_of_another_kind_is_never_replaced(slide, tmp_path):
    _, store = slide
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    with pytest.raises(GaplessError, match="is not an embeddings store"):
        embed_store(store, other, backbone="resnet10t", device="cpu", progress=False)
    assert zarr.open_group(other, mode="r").attrs["schema"] == "gapless.tiles/1"
    out = tmp_path / "e.zarr"
    embed_store(store, out, backbone="resnet10t", device="cpu", progress=False)
    embed_store(store, out, backbone="resnet10t", seed=2, device="cpu", progress=False)  # an older embedding: replaced
    assert read_embeddings(out).attrs["seed"] == 2


def test_a_failure_while_writing_leaves_no_store_and_no_partial(slide, tmp_path, monkeypatch):
    _, store = slide
    real = embed_module.write_embeddings

    def write_then_fail(partial, *args):
        real(partial, *args)
        assert (partial / "features").is_dir()
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "write_embeddings", write_then_fail)
    out = tmp_path / "e.zarr"
    with pytest.raises(KeyboardInterrupt):
        embed_store(store, out, backbone="resnet10t", device="cpu", progress=False)
    assert sorted(tmp_path.iterdir()) == []


def _white_image(path: Path) -> Path:
    tifffile.imwrite(path, np.full((256, 256, 3), 255, np.uint8), photometric="rgb")
    return path


def test_an_empty_store_and_a_store_of_other_channels(run_dir, tmp_path):
    empty = tile_source(_white_image(tmp_path / "white.tif"), tmp_path / "white.zarr",
                        TileSettings(mpp=1.0, tile_size=64, slide_mpp=0.5, tissue="brightfield", on_empty="flag"),
                        progress=False).out
    with pytest.raises(GaplessError, match="has no tiles to embed .QC flag: no tissue"):
        embed_store(empty, tmp_path / "e.zarr", backbone="resnet10t", device="cpu", progress=False)
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "e.zarr.partial").exists()

    nuclei = tile_source(DATA / "dsb2018-nuclei.tif", tmp_path / "nuclei.zarr",
                         TileSettings(mpp=1.0, tile_size=64, slide_mpp=0.5, tissue="none", min_tissue=0.0),
                         progress=False).out
    with pytest.raises(GaplessError, match=r"tiles have 1 channel, the model of .* takes 3"):
        embed_store(nuclei, tmp_path / "n.zarr", model_dir=run_dir, device="cpu", progress=False)
    assert not (tmp_path / "n.zarr").exists()
    e = read_embeddings(embed_store(nuclei, tmp_path / "n.zarr", backbone="resnet10t", device="cpu",
                                    progress=False)["out"])  # a timm backbone takes the store's channels
    assert e.n == 16 and e.dim == 512 and e.attrs["kind"] == "image" and e.grid_shape == (4, 4)
    assert sorted(map(tuple, e.grid)) == [(r, c) for r in range(4) for c in range(4)]


def test_one_sample_of_a_batch_store(tmp_path):
    from pipeline.demo import DemoSettings, generate
    from pipeline.samples import load_sample_sheet
    from pipeline.tiling.batch import tile_batch

    sheet = generate(tmp_path / "demo", DemoSettings(slides=0, images=2, image_size=128), progress=False)
    samples = load_sample_sheet(sheet, CLASSES)
    store = tmp_path / "batch.zarr"
    tile_batch(samples, store, tmp_path / "batch.json", TileSettings(mpp=0.5, tile_size=32, min_tissue=0.1),
               progress=False)
    with pytest.raises(GaplessError, match="a batch store of 2 cell images: which one"):
        embed_store(store, tmp_path / "e.zarr", backbone="resnet10t", device="cpu", progress=False)
    second = samples[1].sample_id
    view = open_sample(store, second)
    e = read_embeddings(embed_store(store, tmp_path / "e.zarr", backbone="resnet10t", sample_id=second, device="cpu",
                                    progress=False)["out"])
    assert e.attrs["sample_id"] == second and e.n == view.n and e.attrs["tile_store_rows"] == [view.start, view.start + view.n]
    np.testing.assert_array_equal(e.coords, view.coords())
    assert e.attrs["normalisation"]["mean"] == pytest.approx(view.attrs.channel_stats["mean"])
    assert e.attrs["kind"] == "image" and e.features.shape == (view.n, 512)


def test_read_embeddings_refuses_what_is_not_a_whole_embeddings_store(slide, tmp_path):
    _, store = slide
    with pytest.raises(GaplessError, match="no such embeddings store"):
        read_embeddings(tmp_path / "missing.zarr")
    with pytest.raises(GaplessError, match="not an embeddings store .schema 'gapless.tiles/1'"):
        read_embeddings(store)
    out = embed_store(store, tmp_path / "e.zarr", backbone="resnet10t", device="cpu", progress=False)["out"]
    group = zarr.open_group(out, mode="r+")
    head = read_embeddings(out, arrays=False)
    assert head.attrs["dim"] == 512 and head.features.shape == (0, 512)
    group.create_array("grid", data=np.zeros((3, 2), np.int32), overwrite=True)
    for only_attrs in (False, True):
        with pytest.raises(GaplessError, match=r"inconsistent shape: .*grid \(3, 2\)"):
            read_embeddings(out, arrays=not only_attrs)
    shutil.rmtree(out / "labels")
    with pytest.raises(GaplessError, match="has no labels array"):
        read_embeddings(out)
    meta = json.loads((out / "zarr.json").read_text())
    assert meta["attributes"]["schema"] == SCHEMA
