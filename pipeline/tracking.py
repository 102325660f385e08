"""MLflow tracking: where runs go, and creating the store once before parallel jobs log into it.

Default backend ``sqlite:///results/mlflow.db`` with artifacts under ``results/mlartifacts``, so that
``mlflow ui --backend-store-uri sqlite:///results/mlflow.db`` shows every run; ``MLFLOW_TRACKING_URI``
or the config's ``mlflow.tracking_uri`` (e.g. a team's tracking server) take precedence.

Several processes opening a *fresh* SQLite database at once race on creating its schema and lose
runs, so ``prepare_tracking`` creates the database and the experiment once (the Snakemake rule
``mlflow_setup`` runs it before any training job); later writers only add rows, retried when SQLite
reports the database locked.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
from pathlib import Path

from pipeline.errors import GaplessError

PARAM_LIMIT = 6000  # characters MLflow keeps of a param value; longer values are cut

log = logging.getLogger("gapless.tracking")


def tracking_uri(configured: str | None = None, results: str | Path = "results") -> str:
    """The tracking URI: ``MLFLOW_TRACKING_URI``, else ``configured``, else SQLite under ``results``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{Path(results).as_posix()}/mlflow.db"


def artifact_root(results: str | Path = "results") -> str:
    """Where a new experiment's artifacts go (a file URI under ``results/mlartifacts``)."""
    return (Path(results).resolve() / "mlartifacts").as_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other URI."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def prepare_tracking(uri: str, experiment: str, artifacts: str | None = None) -> str:
    """Create the backend (schema) and the experiment if missing; return the experiment id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MlflowClient(tracking_uri=uri)  # an unsupported URI fails here
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return found.experiment_id
        return client.create_experiment(experiment, artifact_location=artifacts)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" in str(exc.error_code):  # another process created it first
            return client.get_experiment_by_name(experiment).experiment_id
        cause = exc.message.strip().split(". ")[0]  # MLflow's first sentence; the rest is a docs link
        raise GaplessError(uri, f"MLflow backend unusable: {cause}", "check mlflow.tracking_uri / MLFLOW_TRACKING_URI") from None


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}: a nested config as MLflow params (lists and dicts as JSON)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def retry_locked(fn, attempts: int = 30):
    """Call ``fn`` again (with jittered back-off) while SQLite says the database is locked."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # MlflowException wraps sqlalchemy's OperationalError
                if "locked" not in str(exc).lower() or attempt == attempts - 1:
                    raise
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper


class RunLogger:
    """A thin, retrying wrapper over one MLflow run (params, metrics per step, artifacts, tags)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    @classmethod
    def start(cls, uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: dict | None = None) -> "RunLogger":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = retry_locked(client.create_run)(experiment_id, run_name=name, tags=tags)
        return cls(uri, run.info.run_id)

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            retry_locked(self.client.log_batch)(self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in sorted(metrics.items()) if v is not None]
        for i in range(0, len(items), 500):  # MLflow takes at most 1000 metrics per batch
            retry_locked(self.client.log_batch)(self.run_id, metrics=items[i : i + 500])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        retry_locked(self.client.log_artifact)(self.run_id, str(path), folder)

    def tag(self, key: str, value: str) -> None:
        retry_locked(self.client.set_tag)(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        retry_locked(self.client.set_terminated)(self.run_id, status)


def setup_comparison(experiment: str, configured_uri: str | None = None, results: str | Path = "results",
                     run_name: str = "comparison", config: dict | None = None) -> dict:
    """Create the backend, the experiment and a parent run for one comparison; return their ids.

    The parent run is marked finished at once (its children are linked by tag, and the report logs
    to it later); its params are the resolved ``config``, flattened.
    """
    uri = tracking_uri(configured_uri, results)
    experiment_id = prepare_tracking(uri, experiment, artifact_root(results))
    parent = RunLogger.start(uri, experiment_id, run_name, tags={"gapless.role": "comparison"})
    if config:
        parent.params(flatten(config))
    parent.finish()
    return {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id,
            "parent_run_id": parent.run_id}
