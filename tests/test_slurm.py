"""The SLURM profile (``config/slurm``) for real: the tiny demo workflow through a single-node SLURM cluster.

``tests/slurm/up.sh`` stands the cluster up on this machine (installs Debian's SLURM and MariaDB when missing,
idempotent, ~1-2 s when already up): cluster and account ``gapless``, partition ``debug``, the machine's CPUs and
memory and one fake GPU. The module is skipped only where that cannot work (not root and no passwordless sudo,
or no apt-get); a failing ``up.sh`` otherwise fails it.

One workflow run goes through a copy of the real profile whose resource sizes are shrunk to the 2-core node (the
executor, retries, GPU requests and latency are the profile's own), logging to a `gapless tracking-server`. While
it runs, its training job is cancelled (``scancel``) once its MLflow run is RUNNING: the run must end KILLED and
the profile's ``retries`` resubmit the job. Where Snakemake's SLURM plugin misses the cancel (it waits for the
job forever: see ``test_the_profiles_retries_resubmit_a_cancelled_job``) the test stops Snakemake and runs it
again, as a user would, so the rest is still checked. The same config runs locally (``--cores 2``, SQLite) at
the same time in another folder, and the two must agree: the same tile stores, as many finished MLflow runs, the
same report rows.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from test_tracking_server import TrackingServer
from test_workflow import TINY_DEMO, job_counts, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"
PROFILE = REPO / "config" / "slurm" / "config.yaml"
UP = REPO / "tests" / "slurm" / "up.sh"
PARTITION = "debug"  # up.sh's
ACCOUNT = os.environ.get("SLURM_TEST_ACCOUNT", "gapless")
GPU_RULES = ("train", "heatmap")
RUN_TIMEOUT = 900  # seconds for both workflow runs, side by side on 2 cores (4-8 min, with the restart)


def tiny_config(folder: Path) -> dict:
    """test_workflow's tiny demo, one head and one seed: a single training job. train.device auto: the jobs ask
    for a GPU (the fake gres), and run on the CPU, as the node has no CUDA."""
    return {
        "results": str(folder / "results"),
        "demo": {"out": str(folder / "demo"), **TINY_DEMO},
        "tiling": {"slide": {"mpp": 1.0, "tile_size": 64, "stride": 64},
                   "image": {"mpp": 0.5, "tile_size": 64, "stride": 64}},
        "train": {"kinds": ["slide"], "heads": ["gap"], "seeds": [3], "epochs": 1, "batch_size": 8,
                  "steps_per_epoch": 2, "threads": 1, "device": "auto"},
        "heatmaps": {"batch_size": 16},
        "mlflow": {"experiment": "tiny"},
    }


def shrunk_profile(real: dict) -> dict:
    """The real profile with only its sizes made to fit a 2-core, 24 GB node: every mem_mb 1000, runtime 30,
    cpus_per_gpu 1, every set-threads 1, and the first status check after 1 s (not 20)."""
    profile = copy.deepcopy(real)
    sizes = {"mem_mb": 1000, "runtime": 30, "cpus_per_gpu": 1}
    profile["default-resources"] = {k: sizes.get(k, v) for k, v in profile["default-resources"].items()}
    profile["set-resources"] = {rule: {k: sizes.get(k, v) for k, v in resources.items()}
                                for rule, resources in profile["set-resources"].items()}
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    profile["slurm-init-seconds-before-status-checks"] = 1
    return profile


def run_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # the rules call the `gapless` console script installed beside this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def start_snakemake(workdir: Path, out: Path, env: dict, *args: str) -> subprocess.Popen:
    with open(out, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
             "--configfile", str(DEFAULT_CONFIG), str(workdir / "tiny.yaml"), *args],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # SIGINT stops it (stop_snakemake): a test run started in the background (`pytest … &`) has SIGINT
            # ignored, which its children inherit, and Snakemake would then never stop
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop_snakemake(proc: subprocess.Popen, wait: float = 0) -> None:
    """SIGINT, as Ctrl-C: Snakemake cancels its SLURM jobs and exits (~30 s). SIGTERM would not do: Snakemake then
    waits for the jobs it thinks run, forever for one it missed. ``wait`` > 0: wait that long, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    if wait:
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} missing)"


def logs_of(workdir: Path) -> str:
    """The run's output and every job log (SLURM's and gapless's), for a failure message."""
    parts = [f"--- {p}\n{tail(p)}" for p in sorted(workdir.glob("snakemake*.out"))]
    for folder in (workdir / ".snakemake" / "slurm_logs", workdir / "results" / "logs"):
        parts += [f"--- {p}\n{tail(p, 2000)}" for p in sorted(folder.rglob("*.log"))] if folder.is_dir() else []
    return "\n".join(parts)[-20000:]


def squeue(workdir: Path) -> list[dict]:
    """This run's queued and running jobs (squeue lists every user's: filtered by working directory)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k|%Z"], check=False, capture_output=True, text=True,
                         timeout=30).stdout
    jobs = [dict(zip(("id", "state", "comment", "workdir"), line.split("|", 3))) for line in out.splitlines()]
    return [j for j in jobs if j["workdir"] == str(workdir)]


def sacct(workdir: Path, since: datetime) -> list[dict]:
    """This run's jobs in SLURM's accounting (one row per job allocation)."""
    fields = ("JobID", "JobName", "WorkDir", "Comment", "State", "AllocTRES")
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", since.strftime("%Y-%m-%dT%H:%M:%S"),
                          "--format=" + ",".join(fields)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [dict(zip(fields, line.split("|"))) for line in out.stdout.splitlines()]
    return [r for r in rows if r["WorkDir"] == str(workdir)]


def of_rule(comment: str, rule: str) -> bool:
    """Whether a job's Comment (the plugin's ``rule_<rule>`` or ``rule_<rule>_wildcards_<values>``) names ``rule``."""
    return comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_")


def can_run_up() -> str | None:
    """Why up.sh cannot run here, or None."""
    if shutil.which("apt-get") is None:
        return "no apt-get: tests/slurm/up.sh installs SLURM from Debian packages"
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], check=False, capture_output=True).returncode != 0:
        return "not root and no passwordless sudo: tests/slurm/up.sh starts SLURM's daemons as root"
    return None


@dataclass
class Cancelled:
    """The training job the watcher cancelled, the MLflow run it was writing, and what Snakemake made of it."""
    job_id: str = ""
    run_id: str = ""
    ran_s: float = 0.0  # seconds the job had been RUNNING when cancelled
    sacct_state: str = ""  # the job's State in sacct once cancelled ("CANCELLED by <uid>")
    verdict: str = ""  # "retried": Snakemake reported the failure (and retried); "missed": it kept waiting
    note: str = ""


@dataclass
class Runs:
    slurm: Path
    local: Path
    since: datetime
    uri: str  # the tracking server's
    slurm_outputs: list[str]  # one per Snakemake invocation (a second one only when the cancel was missed)
    local_output: str
    cancelled: Cancelled
    timings: dict = field(default_factory=dict)


CHECK_LINE = "Checking the status of"  # the SLURM plugin's debug line at each status check (--verbose)


def cancel_training_when_logging(workdir: Path, uri: str, state: dict, cancelled: Cancelled) -> None:
    """One step of the watcher: once the train job is RUNNING for ≥ 2 s and its MLflow run exists (RUNNING),
    scancel it. ``state`` keeps what was seen between calls."""
    train = [j for j in squeue(workdir) if of_rule(j["comment"], "train") and j["state"] == "RUNNING"]
    if not train:
        return
    job = train[0]
    seen = state.setdefault(job["id"], time.monotonic())
    if time.monotonic() - seen < 2:
        return
    comparison = workdir / "results" / "mlflow" / "comparison.json"
    if not comparison.is_file():
        return
    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_names import TAG_RUN_DIR

    if "client" not in state:
        state["client"] = MlflowClient(uri)
    experiment = json.loads(comparison.read_text())["experiment_id"]
    folder = str((workdir / "results" / "models" / "slide" / "gap" / "seed3").resolve())
    running = [r for r in state["client"].search_runs([experiment], "attributes.status = 'RUNNING'")
               if r.data.tags.get(TAG_RUN_DIR) == folder]
    if running:
        subprocess.run(["scancel", job["id"]], check=True, timeout=30)
        cancelled.job_id, cancelled.run_id = job["id"], running[0].info.run_id
        cancelled.ran_s = time.monotonic() - seen


def judge_the_cancel(output: Path, state: dict, cancelled: Cancelled) -> None:
    """Whether Snakemake saw the cancelled job fail: ``verdict`` "retried" when it reported the failure,
    "missed" when a status check that started after sacct said CANCELLED (and 10 s more) did not."""
    text = output.read_text(errors="replace")
    if f"SLURM-job '{cancelled.job_id}' failed" in text:
        cancelled.verdict = "retried"
        return
    now = time.monotonic()
    if "cancelled_at" not in state:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", cancelled.job_id, "-o", "State"],
                             check=False, capture_output=True, text=True, timeout=60).stdout.strip()
        if out.startswith("CANCELLED"):
            cancelled.sacct_state = out
            state["cancelled_at"], state["checks"] = now, text.count(CHECK_LINE)  # read after sacct answered
        return
    if text.count(CHECK_LINE) > state["checks"]:
        state.setdefault("checked_at", now)
    if now - state.get("checked_at", now) > 10 or now - state["cancelled_at"] > 300:
        cancelled.verdict = "missed"
        checks = "status check after that" if "checked_at" in state else "status checks for 300 s"
        cancelled.note = (f"SLURM job {cancelled.job_id} is '{cancelled.sacct_state}' in sacct, but Snakemake's "
                          f"{checks} did not report it failed: it would wait for it forever (the profile's retries "
                          f"never start). Restarted Snakemake instead.")


ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED")


def only_the_missed_job_left(workdir: Path, output: Path) -> bool:
    """Whether stopping Snakemake now cancels nothing but the job it missed: no job of the run queued or running,
    and Snakemake has taken in every other job's end (one "Finished" per "submitted", the missed job aside)."""
    if any(j["state"] in ACTIVE for j in squeue(workdir)):
        return False
    text = output.read_text(errors="replace")
    return text.count("Finished jobid: ") + 1 == text.count(" has been submitted with SLURM jobid ")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    pytest.importorskip("snakemake_executor_plugin_slurm",
                        reason="the SLURM executor plugin: pip install -e '.[slurm]'")
    reason = can_run_up()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    up = subprocess.run(([] if os.geteuid() == 0 else ["sudo", "-n", "-E"]) + [str(UP)],
                        check=False, capture_output=True, text=True, timeout=1200)
    if up.returncode != 0:
        pytest.fail(f"tests/slurm/up.sh failed ({up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-6000:]}")
    timings = {"up.sh": time.monotonic() - t0}

    base = tmp_path_factory.mktemp("slurm")
    slurm, local = base / "slurm", base / "local"
    for folder in (slurm, local):
        folder.mkdir()
        write_config(folder / "tiny.yaml", tiny_config(folder))
    real = yaml.safe_load(PROFILE.read_text())
    assert real["executor"] == "slurm" and real["retries"] >= 1, real
    # the GPU count comes from the rules (train.devices; none with train.device: cpu), not from the profile
    assert all("gpu" not in real["set-resources"].get(rule, {}) for rule in GPU_RULES), real["set-resources"]
    (base / "profile").mkdir()
    (base / "profile" / "config.yaml").write_text(yaml.safe_dump(shrunk_profile(real), sort_keys=False))

    server = TrackingServer(slurm / "results", workers=2, log=base / "tracking-server.log").start()
    slurm_env = run_env(GAPLESS_SLURM_PARTITION=PARTITION, GAPLESS_SLURM_ACCOUNT=ACCOUNT,
                        MLFLOW_TRACKING_URI=server.uri)
    procs: dict[str, subprocess.Popen] = {}
    outputs = [slurm / "snakemake.out"]
    cancelled, watch, judge = Cancelled(), {}, {}
    since = datetime.now() - timedelta(seconds=5)
    try:
        # both runs side by side (half the wall time), started while the server comes up (18-45 s here): the first
        # job to log, mlflow_setup, starts ~30 s later and MLflow's client retries until the server answers
        start, deadline = time.monotonic(), time.monotonic() + RUN_TIMEOUT
        procs["local"] = start_snakemake(local, local / "snakemake.out", run_env(), "--cores", "2")
        # --verbose: the SLURM plugin's status checks are logged (judge_the_cancel counts them)
        procs["slurm"] = start_snakemake(slurm, outputs[0], slurm_env, "--profile", str(base / "profile"), "--verbose")
        timings["tracking server up"] = server.wait_healthy()
        restart = lambda: cancelled.verdict == "missed" and len(outputs) == 1
        while any(p.poll() is None for p in procs.values()) or restart():
            if time.monotonic() > deadline:
                pytest.fail(f"the runs took over {RUN_TIMEOUT} s:\n{logs_of(slurm)}\n{logs_of(local)}")
            if procs["slurm"].poll() is None:
                if not cancelled.job_id:
                    cancel_training_when_logging(slurm, server.uri, watch, cancelled)
                elif not cancelled.verdict:
                    judge_the_cancel(outputs[-1], judge, cancelled)
                    if cancelled.verdict == "missed":
                        timings["cancel missed after"] = time.monotonic() - start
                elif restart() and only_the_missed_job_left(slurm, outputs[0]):
                    stop_snakemake(procs["slurm"])  # it stops, scancelling the job it thinks runs
            elif restart():
                outputs.append(slurm / "snakemake-restart.out")  # what a user would do: run it again
                procs["slurm"] = start_snakemake(slurm, outputs[-1], slurm_env, "--profile", str(base / "profile"))
            if procs["local"].poll() is not None:
                timings.setdefault("local run", time.monotonic() - start)
            time.sleep(0.3)
        timings["slurm run"] = time.monotonic() - start
        for name, folder in (("local", local), ("slurm", slurm)):
            assert procs[name].returncode == 0, f"the {name} run failed:\n{logs_of(folder)}"
        assert cancelled.job_id, ("the training job was never seen RUNNING with its MLflow run RUNNING, so it was "
                                  f"not cancelled:\n{logs_of(slurm)}")
        yield Runs(slurm, local, since, server.uri, [p.read_text() for p in outputs],
                   (local / "snakemake.out").read_text(), cancelled, timings)
    finally:
        for p in procs.values():
            stop_snakemake(p, wait=120)
        left = [j["id"] for j in squeue(slurm)]
        if left:
            subprocess.run(["scancel", *left], check=False, timeout=30)
        with contextlib.suppress(AssertionError):
            server.stop()
        server.kill()
        timings["module"] = time.monotonic() - t0
        print(f"\ntest_slurm timings (s): { {k: round(v, 1) for k, v in timings.items()} }; cancel: {cancelled}")


def test_every_job_ran_as_a_slurm_job_with_a_gpu_for_training_and_heatmaps(runs: Runs) -> None:
    counts = job_counts(runs.slurm_outputs[0])  # the whole run's jobs (a restart lists only what was left)
    expected = {rule: n for rule, n in counts.items() if rule not in ("all", "total")}  # `all` runs no command
    assert expected.keys() >= {"demo", "tile", "train", "heatmap", "compare"}
    assert counts["total"] == sum(expected.values()) + 1
    jobs = sacct(runs.slurm, runs.since)
    completed = [j for j in jobs if j["State"] == "COMPLETED"]
    for rule, n in expected.items():
        ran = [j for j in completed if of_rule(j["Comment"], rule)]
        assert len(ran) == n, (rule, n, [j["Comment"] for j in ran])
        for j in ran:
            assert ("gres/gpu=1" in j["AllocTRES"]) == (rule in GPU_RULES), (rule, j["AllocTRES"])
    assert len(completed) == sum(expected.values()), [j["Comment"] for j in completed]
    others = [j for j in jobs if j["State"] != "COMPLETED"]
    assert [(j["JobID"], j["State"].split()[0]) for j in others] == [(runs.cancelled.job_id, "CANCELLED")], others


def test_a_cancelled_training_is_run_again_and_its_mlflow_run_marked_killed(runs: Runs) -> None:
    trains = [j for j in sacct(runs.slurm, runs.since) if of_rule(j["Comment"], "train")]
    assert [j["State"].split()[0] for j in trains] == ["CANCELLED", "COMPLETED"], trains
    assert trains[0]["JobID"] == runs.cancelled.job_id and "gres/gpu=1" in trains[1]["AllocTRES"]

    from mlflow.tracking import MlflowClient

    from pipeline.mlflow_names import TAG_SUPERSEDED_BY

    client = MlflowClient(runs.uri)
    stale = client.get_run(runs.cancelled.run_id)
    final = (runs.slurm / "results" / "models" / "slide" / "gap" / "seed3" / "run_id.txt").read_text().strip()
    assert final != stale.info.run_id
    # KILLED either by the cancelled job itself (SIGTERM → KeyboardInterrupt → finish("KILLED")) or, had it
    # died without a word, by the next attempt's stale-run check (then tagged as superseded by the final run)
    assert stale.info.status == "KILLED" and stale.info.end_time, (stale.info, stale.data.tags)
    assert stale.data.tags.get(TAG_SUPERSEDED_BY) in (None, final), stale.data.tags
    assert client.get_run(final).info.status == "FINISHED"


def plugin_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version("snakemake-executor-plugin-slurm").split(".")[:3])
    except (PackageNotFoundError, ValueError):
        return (0,)


MISSED_CANCEL = ("snakemake-executor-plugin-slurm <= 2.8.0 compares sacct's State with its fail states verbatim, and "
                 "a job cancelled with scancel is 'CANCELLED by <uid>', not 'CANCELLED': the job is taken for still "
                 "running, forever, so the profile's retries never start")


def test_the_profiles_retries_resubmit_a_cancelled_job(runs: Runs) -> None:
    if runs.cancelled.verdict == "missed" and plugin_version() <= (2, 8, 0):
        pytest.xfail(f"{MISSED_CANCEL}. {runs.cancelled.note}")  # a later plugin that still misses it fails here
    assert runs.cancelled.verdict == "retried", runs.cancelled.note
    assert len(runs.slurm_outputs) == 1  # one Snakemake run: the retry is the profile's, not a restart
    assert f"SLURM-job '{runs.cancelled.job_id}' failed, SLURM status is: 'CANCELLED" in runs.slurm_outputs[0]


def all_runs(uri: str, experiment: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, (uri, experiment)
    return client.search_runs([found.experiment_id], run_view_type=ViewType.ALL, max_results=1000)


def test_mlflow_runs_finished_and_as_many_as_a_local_run(runs: Runs) -> None:
    comparison = json.loads((runs.slurm / "results" / "mlflow" / "comparison.json").read_text())
    assert comparison["tracking_uri"] == runs.uri  # through the server, not a SQLite file
    served = all_runs(runs.uri, "tiny")
    local = all_runs(f"sqlite:///{runs.local / 'results'}/mlflow.db", "tiny")
    assert {r.info.status for r in local} == {"FINISHED"} and len(local) == 2  # the comparison, one training
    states = sorted((r.info.status, r.info.run_id == runs.cancelled.run_id) for r in served)
    # every run FINISHED but the cancelled attempt's (KILLED); none left RUNNING, none FAILED
    assert states == [("FINISHED", False)] * len(local) + [("KILLED", True)], states
    # artifacts went up through the server into the served results folder
    final = (runs.slurm / "results" / "models" / "slide" / "gap" / "seed3" / "run_id.txt").read_text().strip()
    from mlflow.tracking import MlflowClient

    assert "model/weights.safetensors" in {a.path for a in MlflowClient(runs.uri).list_artifacts(final, "model")}
    assert list((runs.slurm / "results" / "mlartifacts").rglob("weights.safetensors"))


def store_contents(results: Path) -> dict[str, tuple[dict, dict]]:
    """Each tile store as (its integrity record, {file: sha256}); the shards hold each tile's CRC32C."""
    import zarr

    stores = {}
    for store in sorted([*(results / "tiles").glob("*.zarr"), *(results / "tiles" / "batches").glob("*.zarr")]):
        record = dict(zarr.open_group(store, mode="r").attrs["integrity"])
        digests = {p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in sorted(store.rglob("*")) if p.is_file() and p != store / "zarr.json"}
        stores[store.relative_to(results).as_posix()] = (record, digests)
    return stores


def test_tile_stores_and_report_rows_match_the_local_run(runs: Runs) -> None:
    slurm, local = store_contents(runs.slurm / "results"), store_contents(runs.local / "results")
    assert len(slurm) == TINY_DEMO["slides"] + 1  # a store per slide, one batch store of the cell images
    assert slurm.keys() == local.keys()
    for name in slurm:
        assert slurm[name][0] == local[name][0], name  # integrity: every file and its size
        assert slurm[name][1] == local[name][1], name  # and the same bytes

    def rows(folder: Path) -> list[tuple[str, str]]:
        with open(folder / "results" / "report" / "summary.tsv", newline="") as f:
            return sorted((row["head"], row["n_seeds"]) for row in csv.DictReader(f, delimiter="\t"))

    assert rows(runs.slurm) == rows(runs.local) == [("gap", "1")]
