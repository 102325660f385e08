"""MLflow: a real SQLite backend, prepared once, then many processes logging at once lose nothing."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from mlflow.tracking import MlflowClient

from pipeline.tracking import RunLogger, artifact_root, prepare_tracking, tracking_uri


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
