"""Running on a cluster: the checks a SLURM run gets before any job is submitted, and the tracking server.

With Snakemake's SLURM executor (``snakemake --profile config/slurm``) jobs run on other nodes, so:

- MLflow must be a tracking server, not a SQLite file: every job would otherwise open the same database
  file on a shared filesystem, which SQLite's and MLflow's documentation warn against (locks that
  network filesystems do not honour, runs lost). :func:`check_cluster_run` refuses a ``sqlite:`` URI
  unless ``mlflow.allow_sqlite_on_cluster`` is set; :func:`serve_tracking` is ``gapless tracking-server``.
- the profile's partition and account come from ``$GAPLESS_SLURM_PARTITION`` / ``$GAPLESS_SLURM_ACCOUNT``
  (or are written into the profile): a variable left unset is refused with its fix, not submitted as
  a literal ``$NAME`` that sbatch would reject job by job.

Jobs reach the server over HTTP; MLflow's client retries a refused or dropped connection with back-off
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 by default: about 4 minutes), so a job survives a server restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.errors import GaplessError

SERVER_FIX = ("start `gapless tracking-server` on a node every job can reach and export the URI it prints "
              "(MLFLOW_TRACKING_URI=http://HOST:PORT), or set mlflow.tracking_uri; "
              "mlflow.allow_sqlite_on_cluster: true forces the SQLite file")
_UNSET = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def effective_tracking_uri(config: dict, results: str | Path, comparison: str | Path | None = None) -> str:
    """The URI the jobs will log to: an existing comparison file's (its runs are there), else the configured one."""
    from pipeline.tracking import tracking_uri

    if comparison and Path(comparison).is_file():
        try:
            recorded = json.loads(Path(comparison).read_text(encoding="utf-8")).get("tracking_uri")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded:
            return recorded
    return tracking_uri(config.get("mlflow", {}).get("tracking_uri") or None, results)


def check_cluster_run(remote: bool, config: dict, results: str | Path, comparison: str | Path,
                      default_resources: dict | None = None) -> None:
    """Before a run whose jobs execute elsewhere (``remote``): a ``GaplessError`` for a SQLite tracking URI
    (unless allowed) or for a default resource naming an unset environment variable."""
    if not remote:
        return
    for name, expression in (default_resources or {}).items():
        missing = [v for v in _UNSET.findall(str(expression)) if v not in os.environ]
        if missing:
            raise GaplessError("the profile's default-resources", f"{name} = {expression} but ${missing[0]} is not set",
                               f"export {missing[0]}=... (e.g. `export GAPLESS_SLURM_ACCOUNT=mylab GAPLESS_SLURM_PARTITION=gpu`), "
                               f"or write the value into the profile")
    uri = effective_tracking_uri(config, results, comparison)
    allowed = bool(config.get("mlflow", {}).get("allow_sqlite_on_cluster"))
    if uri.startswith("sqlite:") and not allowed:
        where = " (recorded in " + str(comparison) + ")" if Path(comparison).is_file() else ""
        raise GaplessError(uri, f"MLflow on a SQLite file{where} with jobs on other nodes: concurrent writers on a "
                                "shared filesystem lose runs", SERVER_FIX)


def default_resource_args(workflow) -> dict:
    """``{name: expression}`` of Snakemake's default resources (the profile's ``default-resources``)."""
    resources = getattr(getattr(workflow, "resource_settings", None), "default_resources", None)
    args = getattr(resources, "args", None) or []  # ["name=expression", ...]
    return dict(arg.split("=", 1) for arg in args if "=" in arg)


def server_command(results: str | Path, host: str, port: int, workers: int) -> tuple[list[str], str, str]:
    """(``mlflow server`` command line, backend URI, artifact folder) for the project's results folder."""
    from pipeline.tracking import local_uri

    results = Path(results).resolve()
    backend = local_uri(results)
    artifacts = (results / "mlartifacts").as_posix()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--artifacts-destination", artifacts, "--serve-artifacts", "--host", host, "--port", str(port),
               "--workers", str(workers)]
    if host not in ("127.0.0.1", "localhost"):
        command += ["--allowed-hosts", "*"]  # jobs on other nodes name this host as they know it
    return command, backend, artifacts


def advertised_host(host: str) -> str:
    """The name jobs should use for a server bound to ``host`` (0.0.0.0: this machine's fully qualified name)."""
    return socket.getfqdn() if host in ("0.0.0.0", "::", "") else host


def serve_tracking(results: str | Path = "results", host: str = "0.0.0.0", port: int = 5000, workers: int = 4) -> int:
    """``gapless tracking-server``: create the SQLite backend's schema once (before the server's workers could
    race on it), print the URI to export, then run ``mlflow server`` in the foreground; its exit status.
    Experiments made through the server keep their artifacts under ``<results>/mlartifacts``, uploaded by
    the server (jobs need no access to that folder)."""
    from pipeline.tracking import open_client

    command, backend, artifacts = server_command(results, host, port, workers)
    Path(artifacts).mkdir(parents=True, exist_ok=True)
    open_client(backend)  # the schema, under the schema lock
    uri = f"http://{advertised_host(host)}:{port}"
    print(f"tracking-server: {backend}, artifacts {artifacts}\n"
          f"tracking-server: serving at {uri}; for every job: export MLFLOW_TRACKING_URI={uri}\n"
          f"tracking-server: open {uri} for the MLflow UI; Ctrl-C stops", flush=True)
    # MLflow's job runner (huey consumers, ~240 MB each, for GenAI evaluation jobs) is not needed here
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, start_new_session=True)  # its own group: stopped as one

    def stop(signum=None, frame=None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(0)))
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
