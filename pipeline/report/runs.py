"""The comparison's runs, read from MLflow: one dict per child run of the comparison (parent) run, with
its level (tile or slide, ``at_level``), head (and the head's ``HeadInfo`` from the run's tags), seed,
setting, final test metrics and localisation scores, counted or skipped with the reason.

Every MLflow name read here (tags, params, metrics, the search filter) comes from
:mod:`pipeline.mlflow_names`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from pipeline import mlflow_names as names
from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo
from pipeline.report.columns import (
    DEFAULT_SETTING_KEYS,
    FINAL_METRICS,
    LOCALISATION_KEYS,
    NA,
    SLIDE_FINAL_METRICS,
    WITNESS_CELLS,
    short_name,
    value_sort_key,
)

ENCODER_KEYS = ("encoder", "backbone", "weights")  # what a slide-level run records of its embeddings' encoder
from pipeline.tracking import PARAM_LIMIT, sqlite_path


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def mlflow_error(tracking_uri: str, what: str, exc) -> GaplessError:
    """An MLflow failure as one line that names the store and what to check."""
    message = getattr(exc, "message", None) or str(exc)
    return GaplessError(tracking_uri, f"{what}: {message.splitlines()[0] if message else type(exc).__name__}",
                        "check mlflow.tracking_uri / MLFLOW_TRACKING_URI and the comparison run id")


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    """Every run matching ``filter_string``, page by page (MLflow returns at most ``max_results`` a call)."""
    from pipeline.tracking import retry_locked

    runs, token = [], None
    while True:
        page = retry_locked(client.search_runs)(experiment_ids, filter_string=filter_string, max_results=1000,
                                                order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _demo_applies(params: Mapping[str, str]) -> bool:
    """Whether the run's data came from the demo generator (config ``samples`` empty or not logged)."""
    samples = params.get(names.config_key("samples"))
    return samples is None or samples.strip() in ("", '""', "None", "null")


def _demo_setting(key: str) -> bool:
    """Whether the setting key is one of the demo generator's (``config_key("demo", …)``)."""
    path = names.parse_config_key(key)
    return bool(path) and path[0] == "demo"


def localisation_scores(metrics: Mapping[str, float], samples: set[str] | None = None) -> dict:
    """Mean over samples with witness cells of each heatmap score in LOCALISATION_KEYS
    (``mlflow_names.heatmap_metric``: one metric per sample and score).

    A sample counts when its ``witness_cells`` score is above 0 (or, without that score, when it
    has the score at all: heatmap.py logs the scores only where witnesses exist) and, when
    ``samples`` is given (the run's test split), when it is one of them: a head is scored on slides
    it did not train on. Returns the means (None where no sample has the score) and
    ``heatmap_samples`` (samples with witnesses that count).
    """
    # metric names carry the sample id made MLflow-safe; compare like with like
    wanted = None if samples is None else {names.mlflow_safe(s, slash=False) for s in samples}
    per_sample: dict[str, dict[str, float]] = defaultdict(dict)
    for name, value in metrics.items():
        parsed = names.parse_heatmap_metric(name)
        if parsed is not None and (wanted is None or parsed[0] in wanted):
            per_sample[parsed[0]][parsed[1]] = value
    positive = {s: m for s, m in per_sample.items()
                if (m[WITNESS_CELLS] > 0 if WITNESS_CELLS in m else any(k in m for k in LOCALISATION_KEYS))}
    out: dict = {"heatmap_samples": len(positive)}
    for key in LOCALISATION_KEYS:
        values = [m[key] for m in positive.values() if key in m and math.isfinite(m[key])]
        out[key] = float(np.mean(values)) if values else None
    return out


def _test_samples(params: Mapping[str, str]) -> set[str] | None:
    """The run's test-split sample ids (logged by training), or None when absent."""
    value = params.get(names.split_key("test"))
    if not value or len(value) >= PARAM_LIMIT:  # absent, or cut at MLflow's param limit: not trustworthy
        return None
    return set(names.split_from_params(params, "test") or ())


def _run_row(r, setting_keys: Sequence[str]) -> dict:
    """One child run as the report's dict (``collect_runs``)."""
    tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
    demo = _demo_applies(params)
    test_samples = _test_samples(params)
    setting = tuple(NA if (_demo_setting(k) and not demo) else params.get(k, NA) for k in setting_keys)
    head, seed = names.head_and_seed(tags, params)
    row = {
        "run_id": r.info.run_id,
        "run_name": r.info.run_name or tags.get(names.TAG_RUN_NAME, ""),
        "status": r.info.status,
        "parent_run_id": tags.get(names.TAG_PARENT),
        "level": names.run_level(tags),
        "head": head or NA,
        "head_info": names.head_from_tags(tags, head) if head else None,
        "head_tagged": names.head_tagged(tags),
        "seed": seed or NA,
        "setting": setting,
        **{short_name(k): v for k, v in zip(setting_keys, setting)},
        **{m: metrics.get(m) for m in dict.fromkeys(FINAL_METRICS + SLIDE_FINAL_METRICS)},
        **localisation_scores(metrics, test_samples),
        "encoder": {k: params[names.encoder_param(k)] for k in ENCODER_KEYS if names.encoder_param(k) in params},
        "localisation_on": "test split" if test_samples is not None else "all samples",
        "start_time": r.info.start_time or 0,
        "skip_reason": None,
    }
    if r.info.status != "FINISHED":
        row["skip_reason"] = f"status {r.info.status}"
    elif head is None:
        row["skip_reason"] = "no head tag or param"
    return row


def _mark_superseded(runs: list[dict]) -> int:
    """Of repeated finished runs of one level × setting × head × seed, the latest counts; the others get
    a skip reason (a tile-level and a slide-level run of one head and seed are two runs, not a repeat).
    Returns the number of runs that count."""
    latest: dict[tuple, dict] = {}
    for row in runs:
        if row["skip_reason"] is None:
            key = (row.get("level", names.LEVEL_TILE), row["setting"], row["head"], row["seed"])
            if key in latest:
                older, newer = sorted((latest[key], row), key=lambda x: x["start_time"])
                older["skip_reason"] = f"superseded by the later run {newer['run_id']}"
                latest[key] = newer
            else:
                latest[key] = row
    return len(latest)


def collect_runs(tracking_uri: str, parent_run_id: str, setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
                 experiment_id: str | None = None) -> list[dict]:
    """Every child run of the comparison run ``parent_run_id``, one dict each, counted or skipped.

    A child run that is not ``FINISHED`` (failed, killed, still running) is skipped with its status; of
    several finished runs of the same level × setting × head × seed (a job run again under the same
    parent) the latest counts and the others are skipped, superseded. ``experiment_id``: the parent's
    experiment when known (saves looking it up). Each dict: ``run_id``, ``run_name``, ``status``,
    ``parent_run_id``, ``level`` (``mlflow_names.run_level``: its ``gapless.level`` tag, ``tile``
    without one; the report's tile-level tables take ``at_level(runs, "tile")`` only), ``head``,
    ``head_info`` (the ``HeadInfo`` its tags record; defaults for a run
    logged before head tags existed), ``head_tagged``, ``seed``, ``setting`` (tuple of values of
    ``setting_keys``; "n/a" when missing, and for the demo's keys when config ``samples`` names a
    sample sheet), the settings by short name, the final metrics (FINAL_METRICS, None when absent),
    the slide level's (SLIDE_FINAL_METRICS; None where a run lacks one), the localisation means
    (``localisation_scores``, on the run's test split when it logged one), ``encoder`` (a slide-level
    run's ``encoder_{encoder,backbone,weights}`` params that it has), ``start_time`` and
    ``skip_reason`` (None for a run that counts). Sorted by level (tile first), setting, head order, seed. Raises
    GaplessError when the store has no such runs, or when none of them (at any level) finished.
    """
    from mlflow.exceptions import MlflowException

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise GaplessError(tracking_uri, "no MLflow database there",  # MLflow would create an empty one
                           "pass the tracking URI the heads were trained with (mlflow.tracking_uri or MLFLOW_TRACKING_URI)")
    client = _client(tracking_uri)
    try:
        experiment_id = experiment_id or client.get_run(parent_run_id).info.experiment_id
        found = _search_all(client, [experiment_id], names.child_runs_filter(parent_run_id))
    except MlflowException as exc:
        raise mlflow_error(tracking_uri, "cannot read the comparison's runs", exc) from None
    where = f"comparison run {parent_run_id}"
    if not found:
        raise GaplessError(tracking_uri, f"no runs under {where}",
                           "train the heads first (snakemake / gapless train --comparison), or pass the right parent run id")
    runs = [_run_row(r, setting_keys) for r in found]
    if not _mark_superseded(runs):
        statuses = Counter(r["status"] for r in runs)
        listed = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        raise GaplessError(tracking_uri, f"none of the {len(runs)} runs under {where} finished ({listed})",
                           "see the training logs (results/logs/train) and rerun the failed jobs")
    infos = head_infos(runs)
    runs.sort(key=lambda x: (x["level"] != names.LEVEL_TILE, x["level"], x["setting"], _info(infos, x["head"]).sort_key(),
                             value_sort_key(x["seed"]), x["start_time"]))
    return runs


# ---------------------------------------------------------------------------------------------
# Heads: what each is called, where it sorts and whether it is the baseline, as its runs record it


def counted(runs: Iterable[dict]) -> list[dict]:
    """The runs that count (no skip reason)."""
    return [r for r in runs if r["skip_reason"] is None]


def at_level(runs: Iterable[dict], level: str | None = names.LEVEL_TILE) -> list[dict]:
    """The runs at ``level`` (``tile`` or ``slide``; a dict without ``level`` is a tile-level run), in
    order, counted or skipped; ``level`` None: every run."""
    return [r for r in runs if level is None or r.get("level", names.LEVEL_TILE) == level]


def head_infos(runs: Sequence[dict]) -> dict[str, HeadInfo]:
    """Each head's ``HeadInfo`` as its counted runs' tags record it: the latest tagged run's (should
    they differ, ``head_tag_conflicts``), or ``HeadInfo(name)`` defaults when none of its runs is
    tagged (logged before training wrote head tags: default order, no baseline)."""
    infos: dict[str, HeadInfo] = {}
    for r in sorted(counted(runs), key=lambda x: x["start_time"]):
        if r["head_tagged"] or r["head"] not in infos:
            infos[r["head"]] = r["head_info"]
    return infos


def head_tag_conflicts(runs: Sequence[dict]) -> dict[str, list[HeadInfo]]:
    """The heads whose counted, tagged runs record different ``HeadInfo`` (e.g. a label changed between
    trainings), with the versions in the order they were first logged."""
    versions: dict[str, list[HeadInfo]] = defaultdict(list)
    for r in sorted(counted(runs), key=lambda x: x["start_time"]):
        if r["head_tagged"] and r["head_info"] not in versions[r["head"]]:
            versions[r["head"]].append(r["head_info"])
    return {head: v for head, v in versions.items() if len(v) > 1}


def _info(infos: Mapping[str, HeadInfo], head: str) -> HeadInfo:
    return infos.get(head) or HeadInfo(head)


def head_order(heads: Iterable[str], infos: Mapping[str, HeadInfo] | None = None) -> list[str]:
    """The distinct ``heads`` by ``HeadInfo.sort_key`` (declared order, then name); a head without an
    entry in ``infos`` sorts as ``HeadInfo(name)`` (after the declared ones, by name)."""
    infos = infos or {}
    return sorted(set(heads), key=lambda h: _info(infos, h).sort_key())
