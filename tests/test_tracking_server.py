"""`gapless tracking-server`: a job logging to it survives a server restart, and SIGTERM leaves nothing behind.

MLflow's client retries a refused connection with back-off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` /
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``), so a training job on a cluster node carries on across a restart
of the server. Here a separate process logs a metric every 0.5 s for ~15 s while the server is stopped
(SIGTERM) and started again on the same port; every step must be there and the run FINISHED.

``TrackingServer`` is also used by ``tests/test_slurm.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
GAPLESS = Path(sys.executable).parent / "gapless"  # the console script installed beside this interpreter


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TrackingServer:
    """One `gapless tracking-server --host 127.0.0.1` on ``results``, its output in ``<log>``."""

    def __init__(self, results: Path, port: int | None = None, workers: int = 2, log: Path | None = None):
        self.results = Path(results)
        self.port = port or free_port()
        self.workers = workers
        self.log = Path(log or self.results.parent / f"tracking-server-{self.port}.log")
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.tree: list[psutil.Process] = []  # the server's processes, as seen once it answered

    def start(self) -> TrackingServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [str(GAPLESS), "tracking-server", "--results", str(self.results), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.results.parent, start_new_session=True)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 240) -> float:
        """Seconds until /health answers (it takes 18-40 s on a loaded 2-core machine); records the process tree."""
        start = time.monotonic()
        while not self.healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"tracking server exited ({self.proc.returncode}):\n{self.output()}")
            if time.monotonic() - start > timeout:
                raise AssertionError(f"tracking server not healthy after {timeout} s:\n{self.output()}")
            time.sleep(0.5)
        root = psutil.Process(self.proc.pid)
        self.tree = [root, *root.children(recursive=True)]
        return time.monotonic() - start

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM to the `gapless tracking-server` process (it stops its server's process group); seconds
        until it and every process of its tree are gone (AssertionError after ``timeout``)."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`gapless tracking-server` still running {timeout} s after SIGTERM") from None
        while any(live(p) for p in self.tree):
            if time.monotonic() - start > timeout:
                left = [f"{p.pid} {p.cmdline()}" for p in self.tree if live(p)]
                raise AssertionError(f"processes of the tracking server left after SIGTERM: {left}")
            time.sleep(0.2)
        return time.monotonic() - start

    def kill(self) -> None:
        """Cleanup after a failure: every process of the tree, at once, by pid."""
        for p in self.tree + ([psutil.Process(self.proc.pid)] if self.proc and self.proc.poll() is None else []):
            with contextlib.suppress(psutil.Error):
                p.kill()
        if self.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def server_processes_by_command(results: Path, port: int) -> list[str]:
    """Processes whose command line names this server's results folder or port (mlflow server, uvicorn)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        text = " ".join(p.info["cmdline"] or [])
        if live(p) and ("mlflow" in text or "uvicorn" in text or "huey" in text) and (
                str(results) in text or f"--port {port}" in text):
            found.append(f"{p.pid} {text}")
    return found


STEPS = 30  # one metric every 0.5 s: ~15 s of logging
LOGGER = textwrap.dedent("""
    import json, os, sys, time
    from pipeline.tracking import RunLogger

    comparison = json.load(open(sys.argv[1]))
    run = RunLogger.start(os.environ["MLFLOW_TRACKING_URI"], comparison["experiment_id"], "restart-survivor",
                          comparison["parent_run_id"])
    print("run", run.run_id, flush=True)
    for step in range(int(sys.argv[2])):
        run.metrics({"loss": 1.0 / (step + 1)}, step=step)
        print("step", step, time.time(), flush=True)
        time.sleep(0.5)
    run.finish()
    print("done", flush=True)
""")


@pytest.mark.slow
def test_a_logging_job_survives_a_server_restart_and_sigterm_leaves_no_process(tmp_path: Path) -> None:
    results = tmp_path / "results"
    server = TrackingServer(results, log=tmp_path / "server.log").start()
    logger = None
    try:
        server.wait_healthy()
        assert {p.name() for p in server.tree} >= {"gapless"} and len(server.tree) >= 3, server.tree
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri,
               "PATH": f"{GAPLESS.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        setup = subprocess.run([str(GAPLESS), "mlflow-setup", "--experiment", "restart", "--results", str(results),
                                "--out", str(tmp_path / "comparison.json")],
                               env=env, check=False, capture_output=True, text=True, timeout=180)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert json.loads((tmp_path / "comparison.json").read_text())["tracking_uri"] == server.uri

        logger = subprocess.Popen([sys.executable, "-c", LOGGER, str(tmp_path / "comparison.json"), str(STEPS)],
                                  env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in logger.stdout:  # a few steps logged, then the restart
            lines.append(line)
            if line.startswith("step 5 "):
                break
        assert lines and lines[-1].startswith("step 5 "), "".join(lines)

        down_at = time.time()
        stopped = server.stop()
        assert not server_processes_by_command(results, server.port)  # mlflow, uvicorn workers: all gone
        assert logger.poll() is None, "the logger should still be running while the server is down"
        server = TrackingServer(results, port=server.port, log=tmp_path / "server.log").start()
        server.wait_healthy()
        up_at = time.time()

        rest, _ = logger.communicate(timeout=300)
        lines.append(rest)
        text = "".join(lines)
        assert logger.returncode == 0, text
        assert text.rstrip().endswith("done"), text
        run_id = text.split("run ", 1)[1].split()[0]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(STEPS)), "a metric step was lost or doubled"
        assert all(m.value == pytest.approx(1.0 / (m.step + 1)) for m in history)
        # the job really waited across the restart: a step logged before the server went down, one after it
        # came back, and a gap in between as long as the downtime (less the last step's 0.5 s sleep)
        times = sorted(m.timestamp / 1000 for m in history)
        assert times[0] < down_at and times[-1] > up_at
        assert max(b - a for a, b in itertools.pairwise(times)) > (up_at - down_at) - 1.0, (stopped, up_at - down_at)

        assert server.stop() < 60
        assert not server_processes_by_command(results, server.port)
    finally:
        if logger is not None and logger.poll() is None:
            logger.kill()
        server.kill()
