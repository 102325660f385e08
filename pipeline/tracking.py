"""MLflow tracking: where runs go, and creating the store once before parallel jobs log into it.

Default backend ``sqlite:///results/mlflow.db`` with artifacts under ``results/mlartifacts``, so that
``mlflow ui --backend-store-uri sqlite:///results/mlflow.db`` shows every run; ``MLFLOW_TRACKING_URI``
or the config's ``mlflow.tracking_uri`` (e.g. a team's tracking server) take precedence.

Several processes opening a *fresh* SQLite database at once race on creating its schema (MLflow
runs its migrations on first use, and two of them at once fail: "table ... already exists"), so
every process opens a SQLite store through ``open_client``, which creates the store, and with it the
schema, under an exclusive lock on ``<database>.lock`` beside the file: the first one migrates, the
others wait and then find the tables. ``prepare_tracking`` creates the experiment under the same
lock (the Snakemake rule ``mlflow_setup`` runs it once before any training job; ``gapless train``
by hand runs it itself). Later writers only add rows, retried when SQLite reports the database locked.

A training run killed without a chance to clean up (``kill -9``, a lost node) stays RUNNING in the
store. Each training run is tagged with its output folder, host and pid (``run_tags``); the next run
into that folder finds such runs (``stale_runs``) and marks them KILLED (``RunLogger.supersede``),
or refuses to start while the process that owns one is still alive on this host.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import time
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.mlflow_names import (
    ROLE_COMPARISON,
    TAG_HOST,
    TAG_PARENT,
    TAG_PID,
    TAG_ROLE,
    TAG_RUN_DIR,
    TAG_SUPERSEDED_BY,
    flatten,
)

PARAM_LIMIT = 6000  # characters MLflow keeps of a param value; longer values are cut

log = logging.getLogger("gapless.tracking")


def tracking_uri(configured: str | None = None, results: str | Path = "results") -> str:
    """The tracking URI: ``MLFLOW_TRACKING_URI``, else ``configured``, else SQLite under ``results``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return local_uri(results)


def local_uri(results: str | Path = "results") -> str:
    """The project's own backend: the SQLite file ``<results>/mlflow.db``."""
    return f"sqlite:///{Path(results).as_posix()}/mlflow.db"


def artifact_root(results: str | Path = "results") -> str:
    """Where a new experiment's artifacts go (a file URI under ``results/mlartifacts``)."""
    return (Path(results).resolve() / "mlartifacts").as_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other URI."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def schema_lock(uri: str):
    """Hold an exclusive lock on ``<database>.lock`` for a ``sqlite:///`` URI (no-op for others).

    A folder where the lock file cannot be made (read-only) is not locked: nothing is created there.
    """
    db = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(db.with_name(db.name + ".lock"), "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, or the process dies
        yield


_opened: set[str] = set()  # URIs whose store this process has created (MLflow caches it per URI)


def open_client(uri: str):
    """An ``MlflowClient`` for ``uri`` whose store exists: made under ``schema_lock`` once per process.

    MLflow makes the store, and on a fresh SQLite file runs the schema migrations, when a client is
    constructed (MLflow 3) or at its first call (older clients were lazy), so both happen here inside
    the lock. MLflow keeps the store per URI, so every later client of this process reuses it
    without migrating or locking again.
    """
    from mlflow.tracking import MlflowClient

    if uri in _opened:
        return MlflowClient(tracking_uri=uri)
    with schema_lock(uri):
        client = retry_locked(MlflowClient)(tracking_uri=uri)  # an unsupported URI fails here
        retry_locked(client.search_experiments)(max_results=1)
    _opened.add(uri)
    return client


def prepare_tracking(uri: str, experiment: str, artifacts: str | None = None) -> str:
    """Create the backend (schema) and the experiment if missing; return the experiment id.

    Safe for several processes at once on a fresh database (see ``open_client``); the experiment is
    looked up and created under the same lock, and a server that answers RESOURCE_ALREADY_EXISTS
    (another client made it first) is answered with the existing experiment.
    """
    from mlflow.exceptions import MlflowException

    try:
        client = open_client(uri)
        with schema_lock(uri):
            found = retry_locked(client.get_experiment_by_name)(experiment)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    retry_locked(client.restore_experiment)(found.experiment_id)
                return found.experiment_id
            try:
                return retry_locked(client.create_experiment)(experiment, artifact_location=artifacts)
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise
                return retry_locked(client.get_experiment_by_name)(experiment).experiment_id
    except MlflowException as exc:
        cause = exc.message.strip().split(". ")[0]  # MLflow's first sentence; the rest is a docs link
        raise GaplessError(uri, f"MLflow backend unusable: {cause}", "check mlflow.tracking_uri / MLFLOW_TRACKING_URI") from None


def run_tags(run_dir: str | Path) -> dict:
    """Tags that tie a training run to its output folder and its process (for ``stale_runs``)."""
    return {TAG_RUN_DIR: str(Path(run_dir).resolve()), TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = float(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, after the (command)
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def training_alive(pid: int, since: float | None = None) -> bool:
    """Whether ``pid`` is a live ``gapless train`` process of this host (started by ``since`` when given).

    Another process that reuses the pid is not: its command line is not a gapless training, or it
    started after the run it would own (``since``: the run's start, seconds since the epoch).
    """
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: whether the pid exists is all there is to know
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    gapless = any(Path(a).name == "gapless" for a in args) or any(
        a == "-m" and b in ("pipeline", "pipeline.cli") for a, b in zip(args, args[1:]))
    if not (gapless and "train" in args):
        return False  # gone (a zombie's command line is empty), or the pid now belongs to another program
    started = _process_started(pid) if since is not None else None
    return started is None or started <= since + 1.0  # /proc/stat's boot time has one-second resolution


def stale_runs(uri: str, experiment_id: str, run_dir: str | Path) -> list:
    """The RUNNING runs of ``experiment_id`` that wrote to ``run_dir`` and whose process is gone.

    Raises GaplessError when one of them belongs to a training still alive on this host: two
    processes must not write into one folder. A run on another host cannot be checked and counts as
    gone (the workflow never trains one folder twice at once).
    """
    folder = str(Path(run_dir).resolve())
    client = open_client(uri)
    found, token = [], None
    while True:
        page = retry_locked(client.search_runs)([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                                max_results=1000, page_token=token)
        found.extend(r for r in page if r.data.tags.get(TAG_RUN_DIR) == folder)
        token = page.token
        if not token:
            break
    host = socket.gethostname()
    for r in found:
        pid = r.data.tags.get(TAG_PID, "")
        if (r.data.tags.get(TAG_HOST) == host and pid.isdigit()
                and training_alive(int(pid), (r.info.start_time or 0) / 1000)):
            raise GaplessError(run_dir, f"another training is writing to this folder (pid {pid}, "
                                        f"MLflow run {r.info.run_id})",
                               f"wait for it to finish, or stop it (kill {pid}) and run again")
    return found


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
        self.client = open_client(uri)
        self.run_id = run_id

    @classmethod
    def start(cls, uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
              tags: dict | None = None) -> "RunLogger":
        client = open_client(uri)
        tags = dict(tags or {})
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
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

    def supersede(self, stale: list) -> None:
        """Mark ``stale`` runs (from ``stale_runs``) KILLED, now, and tag them superseded by this run.

        Their artifacts (what they logged before dying) stay with them.
        """
        for r in stale:
            retry_locked(self.client.set_tag)(r.info.run_id, TAG_SUPERSEDED_BY, self.run_id)
            retry_locked(self.client.set_terminated)(r.info.run_id, "KILLED")
            log.warning("marked stale run %s (pid %s on host %s) as KILLED", r.info.run_id,
                        r.data.tags.get(TAG_PID, "?"), r.data.tags.get(TAG_HOST, "?"))


def setup_comparison(experiment: str, configured_uri: str | None = None, results: str | Path = "results",
                     run_name: str = "comparison", config: dict | None = None) -> dict:
    """Create the backend, the experiment and a parent run for one comparison; return their ids.

    The parent run is marked finished at once (its children are linked by tag, and the report logs
    to it later); its params are the resolved ``config``, flattened.
    """
    uri = tracking_uri(configured_uri, results)
    # a server keeps a new experiment's artifacts itself (uploaded through it); a local file backend, here
    local = uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
    experiment_id = prepare_tracking(uri, experiment, artifact_root(results) if local else None)
    parent = RunLogger.start(uri, experiment_id, run_name, tags={TAG_ROLE: ROLE_COMPARISON})
    if config:
        parent.params(flatten(config))
    parent.finish()
    return {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id,
            "parent_run_id": parent.run_id}
