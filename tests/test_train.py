"""A short real training on tiny demo tiles learns, and its MLflow run holds params, metrics, artifacts."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.demo import DemoSettings, generate
from pipeline.samples import load_sample_sheet
from pipeline.tiling import TileSettings, tile_source
from pipeline.tracking import RunLogger, artifact_root, prepare_tracking
from pipeline.train import TrainSettings, cosine_with_warmup, train

CLASSES = ["negative", "positive"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    # an easy setting: many witnesses per lesion, so a few epochs from scratch must learn
    sheet = generate(root / "demo", DemoSettings(slides=8, images=0, slide_width=1536, slide_height=1152,
                                                  witness_fraction=0.2, lesions=3), progress=False)
    samples = load_sample_sheet(sheet, CLASSES)
    stores = {}
    for s in samples:
        stores[s.sample_id] = tile_source(s.path, root / "tiles" / f"{s.sample_id}.zarr",
                                          TileSettings(mpp=1.0, tile_size=64, annotations=str(s.annotations)),
                                          progress=False).out
    uri = f"sqlite:///{root}/results/mlflow.db"
    experiment = prepare_tracking(uri, "gapless-test", artifact_root(root / "results"))
    return root, sheet, samples, stores, uri, experiment


def test_gap_learns_and_the_run_is_in_mlflow(cohort):
    root, sheet, samples, stores, uri, experiment = cohort
    parent = RunLogger.start(uri, experiment, "comparison")
    settings = TrainSettings(head="gap", seed=0, epochs=3, batch_size=32, lr=2e-3, workers=0)
    metrics = train(samples, stores, CLASSES, settings, root / "gap", uri, experiment, parent.run_id,
                    sheet_path=sheet, progress=False)
    parent.finish()
    assert metrics["test_auroc"] > 0.8  # chance is 0.5
    for name in ("weights.safetensors", "model.json", "metrics.json", "run_id.txt", "roc.png", "confusion.png"):
        assert (root / "gap" / name).is_file()
    assert json.loads((root / "gap" / "metrics.json").read_text())["test_auroc"] == metrics["test_auroc"]

    client = MlflowClient(uri)
    run = client.get_run(metrics["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.run_id
    p = run.data.params
    assert p["head"] == "gap" and p["backbone"] == "resnet10t" and p["seed"] == "0"
    assert len(p["data_fingerprint"]) == 16 and p["code_version"] and int(p["tiles_train"]) > 0
    assert len(client.get_metric_history(run.info.run_id, "val_auroc")) == 3
    for key in ("test_auroc", "test_balanced_accuracy", "test_f1", "test_ece", "test_sample_auroc_mean",
                "train_images_per_s", "inference_images_per_s", "peak_memory_mb", "parameters"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")} | {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"model/weights.safetensors", "model/model.json", "plots/roc.png", "plots/confusion.png"} <= artifacts


def test_saol_trains_through_the_same_path(cohort):
    root, sheet, samples, stores, uri, experiment = cohort
    settings = TrainSettings(head="saol", seed=1, epochs=1, batch_size=32, workers=0, steps_per_epoch=4)
    metrics = train(samples, stores, CLASSES, settings, root / "saol", uri, experiment, progress=False)
    assert 0.0 <= metrics["test_ece"] <= 1.0 and MlflowClient(uri).get_run(metrics["run_id"]).data.params["head"] == "saol"


def test_warmup_then_cosine():
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 10, 100) == pytest.approx(0.0)


def test_device_cpu_trains_and_a_missing_gpu_is_refused_before_any_output(cohort, tmp_path):
    import torch

    from pipeline.device import resolve_device
    from pipeline.errors import GaplessError

    root, sheet, samples, stores, uri, experiment = cohort
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(GaplessError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    settings = TrainSettings(head="gap", seed=0, epochs=1, batch_size=32, workers=0, steps_per_epoch=2, device="cpu")
    metrics = train(samples, stores, CLASSES, settings, tmp_path / "cpu", uri, experiment, progress=False)
    assert MlflowClient(uri).get_run(metrics["run_id"]).data.params["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(GaplessError, match="torch sees no CUDA GPU"):
            train(samples, stores, CLASSES, TrainSettings(device="cuda", workers=0), tmp_path / "cuda", uri, experiment,
                  progress=False)
        assert not (tmp_path / "cuda").exists() and not (tmp_path / "cuda.partial").exists()


def test_the_command_refuses_a_missing_gpu_in_one_line_before_touching_mlflow(cohort, tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    root, sheet, *_ = cohort
    db = tmp_path / "mlflow.db"
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "--samples", str(sheet), "--tiles", str(root / "tiles"),
                             "--out", str(tmp_path / "run"), "--device", "cuda", "--tracking-uri", f"sqlite:///{db}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gapless train: error: device cuda asked for, but torch sees no CUDA GPU; run on a GPU node, "
        "or choose auto or cpu (--device, or train.device in the config)"]
    assert not db.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train", "--samples", "s.csv", "--tiles", "t", "--out", "o"],
                                     ["heatmap", "s.zarr", "--model", "m", "--out", "o"]])
def test_threads_below_one_are_refused(command, capsys):
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--threads", "0"])
    assert info.value.code == 2
    assert "argument --threads: must be 1 or more, got 0" in capsys.readouterr().err


def test_two_gloo_processes_train_one_model_with_the_steps_of_one_and_log_one_run(cohort, tmp_path):
    """train.devices 2 on the CPU: torchrun starts two gloo processes; each takes half of every batch, the
    gradients are averaged, so the optimiser steps are those of one process, and rank 0 alone logs."""
    import subprocess
    import sys

    root, sheet, *_ = cohort
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    steps = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        done = subprocess.run([sys.executable, "-m", "pipeline", "-q", "train", "--samples", str(sheet), "--tiles",
                               str(root / "tiles"), "--out", str(out), "--head", "gap", "--seed", "1", "--epochs", "2",
                               "--batch-size", "8", "--steps-per-epoch", "3", "--threads", "1", "--device", "cpu",
                               "--devices", str(devices), "--tracking-uri", uri, "--experiment", "ddp"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        steps[devices] = json.loads((out / "metrics.json").read_text())["train_steps"]
        assert (out / "run_id.txt").is_file() and not (tmp_path / f"devices{devices}.partial").exists()
    assert steps == {1: 6, 2: 6}
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # one run per model, not one per process
    two = [r for r in runs if r.info.run_id == (tmp_path / "devices2" / "run_id.txt").read_text().strip()]
    assert len(two) == 1 and two[0].data.metrics["train_steps"] == 6
    assert len(client.get_metric_history(two[0].info.run_id, "train_loss")) == 2  # once per epoch, by rank 0


def test_devices_must_divide_the_batch(capsys):
    from pipeline.errors import GaplessError

    with pytest.raises(GaplessError, match="a multiple of --devices"):
        TrainSettings(batch_size=9, devices=2).validate()
