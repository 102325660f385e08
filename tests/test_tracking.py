"""MLflow: a real SQLite backend, prepared once, then many processes logging at once lose nothing."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.errors import GaplessError
from pipeline.tracking import (RunLogger, artifact_root, prepare_tracking, run_tags, stale_runs, tracking_uri,
                               training_alive)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["negative", "positive"]


def _child(uri: str, experiment_id: str, parent: str, i: int, folder: str) -> str:
    run = RunLogger.start(uri, experiment_id, f"child-{i}", parent_run_id=parent)
    run.params({"head": f"h{i}", "seed": i, **{f"p{k}": k for k in range(20)}})
    for step in range(5):
        run.metrics({"loss": 1.0 / (step + 1), "val_auroc": 0.5 + 0.01 * step}, step=step)
    path = f"{folder}/note-{i}.txt"
    with open(path, "w") as fh:
        fh.write(str(i))
    run.artifact(path, "notes")
    run.finish()
    return run.run_id


def test_parallel_runs_into_one_sqlite_store_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    experiment = prepare_tracking(uri, "gapless-test", artifact_root(tmp_path / "results"))
    assert prepare_tracking(uri, "gapless-test") == experiment  # idempotent
    parent = RunLogger.start(uri, experiment, "comparison")
    with ProcessPoolExecutor(8) as pool:
        ids = list(pool.map(_child, [uri] * 8, [experiment] * 8, [parent.run_id] * 8, range(8), [str(tmp_path)] * 8))
    parent.finish()
    client = MlflowClient(uri)
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    for r in runs:
        assert r.info.status == "FINISHED" and len(r.data.params) == 22
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 5
        assert [a.path for a in client.list_artifacts(r.info.run_id, "notes")] == [f"notes/note-{r.data.params['seed']}.txt"]
    assert (tmp_path / "results" / "mlartifacts").is_dir()


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, "results") == "sqlite:///results/mlflow.db"
    assert tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert tracking_uri("http://mlflow:5000") == "http://team:5000"


# ---------------------------------------------------------------------------------------------
# `gapless train` by hand: a fresh database, parallel commands, a killed run


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Four small demo slides tiled into 64-px stores: the least a training needs (train/val/test)."""
    from pipeline.demo import DemoSettings, generate
    from pipeline.samples import load_sample_sheet
    from pipeline.tiling import TileSettings, tile_source

    root = tmp_path_factory.mktemp("tiny")
    sheet = generate(root / "demo", DemoSettings(slides=4, images=0, slide_width=768, slide_height=768,
                                                  witness_fraction=0.2, lesions=2), progress=False)
    samples = load_sample_sheet(sheet, CLASSES)
    stores = {s.sample_id: tile_source(s.path, root / "tiles" / f"{s.sample_id}.zarr",
                                       TileSettings(mpp=1.0, tile_size=64, annotations=str(s.annotations)),
                                       progress=False).out for s in samples}
    return root, sheet, samples, stores


def _train_command(sheet, tiles, out, uri, seed=0, epochs=1, steps=2) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--quiet", "train", "--samples", str(sheet), "--tiles", str(tiles),
            "--out", str(out), "--tracking-uri", uri, "--seed", str(seed), "--epochs", str(epochs),
            "--steps-per-epoch", str(steps), "--batch-size", "8", "--threads", "1", "--device", "cpu"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.slow
def test_parallel_train_commands_on_a_fresh_database_keep_every_run(tiny_cohort, tmp_path):
    root, sheet, *_ = tiny_cohort
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"  # not created yet: each command creates what is missing
    jobs = [subprocess.Popen(_train_command(sheet, root / "tiles", tmp_path / f"run{i}", uri, seed=i), cwd=tmp_path,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [(job, *job.communicate(timeout=600)) for job in jobs]
    for job, out, err in results:
        assert job.returncode == 0, err[-2000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gapless")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert {r.data.tags["gapless.run_dir"] for r in runs} == {str((tmp_path / f"run{i}").resolve()) for i in range(3)}


def test_a_killed_training_is_marked_killed_by_the_next_run_into_its_folder(tiny_cohort, tmp_path, caplog):
    from pipeline.train import TrainSettings, train

    root, sheet, samples, stores = tiny_cohort
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = prepare_tracking(uri, "gapless", artifact_root(tmp_path))  # as the command does it
    out = tmp_path / "gap0"
    job = subprocess.Popen(_train_command(sheet, root / "tiles", out, uri, epochs=100, steps=100), cwd=tmp_path,
                           env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out.with_name("gap0.partial") / "split.json").exists():  # made after its run exists
            assert job.poll() is None, job.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the training never started"
            time.sleep(0.2)
    finally:
        job.kill()  # SIGKILL: no chance to mark its run
        job.wait()
    client = MlflowClient(uri)
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING" and killed.data.tags["gapless.pid"] == str(job.pid)

    settings = TrainSettings(head="gap", seed=0, epochs=1, batch_size=8, workers=0, steps_per_epoch=2, device="cpu")
    with caplog.at_level(logging.WARNING, logger="gapless.tracking"):
        metrics = train(samples, stores, CLASSES, settings, out, uri, experiment, progress=False)
    assert f"marked stale run {killed.info.run_id} (pid {job.pid} on host {socket.gethostname()}) as KILLED" in caplog.text

    killed = client.get_run(killed.info.run_id)
    assert killed.info.status == "KILLED" and killed.info.end_time
    assert killed.data.tags["gapless.superseded_by"] == metrics["run_id"]
    runs = client.search_runs([experiment], filter_string="attributes.status = 'FINISHED'")
    assert [r.info.run_id for r in runs] == [metrics["run_id"]]
    assert runs[0].data.tags["gapless.run_dir"] == str(out.resolve())
    for name in ("weights.safetensors", "model.json", "metrics.json", "split.json", "run_id.txt"):
        assert (out / name).is_file(), name
    assert (out / "run_id.txt").read_text().strip() == metrics["run_id"]
    assert not out.with_name("gap0.partial").exists()


def test_a_live_training_in_the_folder_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = prepare_tracking(uri, "gapless")
    out = tmp_path / "gap0"
    # a process that looks like `gapless train` writing to the folder (started before its run)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "gapless", "train"])
    try:
        tags = run_tags(out)
        run = RunLogger.start(uri, experiment, "gap-seed0", tags={**tags, "gapless.pid": str(live.pid)})
        with pytest.raises(GaplessError, match=rf"another training is writing to this folder \(pid {live.pid}, "):
            stale_runs(uri, experiment, out)
        assert stale_runs(uri, experiment, tmp_path / "other") == []  # another folder is not its business
    finally:
        live.kill()
        live.wait()
    assert [r.info.run_id for r in stale_runs(uri, experiment, out)] == [run.run_id]  # now gone: stale
    assert not training_alive(os.getpid()) and not training_alive(live.pid)


def test_a_process_creates_the_store_once_under_the_lock(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/db/mlflow.db"
    experiment = prepare_tracking(uri, "gapless")
    assert (tmp_path / "db" / "mlflow.db.lock").is_file()

    def no_lock(uri):
        raise AssertionError("the store of this process was made already")

    monkeypatch.setattr(tracking, "schema_lock", no_lock)
    run = RunLogger.start(uri, experiment, "again")  # MLflow's cached store: no lock, no migration
    run.finish()
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
