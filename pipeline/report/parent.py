"""The report logged back to the comparison (parent) run: its files as artifacts, its summary as metrics
(``mlflow_names.report_metric``) and the tag that says it was written."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline import mlflow_names as names
from pipeline.report.columns import COST_METRICS, INTERVAL_METRICS
from pipeline.report.runs import mlflow_error


def report_metrics(summary, paired, level: str = names.LEVEL_TILE,
                   metrics: Sequence[tuple[str, str]] = INTERVAL_METRICS,
                   costs: Sequence[tuple[str, str]] = COST_METRICS) -> dict[str, float]:
    """The summary as MLflow metrics on the parent run (finite values only): per setting × head each
    interval metric's ``_n``, ``_mean``, ``_ci_low``, ``_ci_high`` and each cost's ``_mean``; per paired
    row (against the baseline) ``<metric>_n``, ``_diff``, ``_diff_ci_low``, ``_diff_ci_high``. The slide
    level's tables (``level="slide"``, its metrics and costs) under ``report/slide_level/``
    (``mlflow_names.report_metric``)."""
    out = {}
    for _, r in summary.iterrows():
        for m, _ in metrics:
            for s in ("n", "mean", "ci_low", "ci_high"):
                out[names.report_metric(r["setting"], r["head"], f"{m}_{s}", level=level)] = r[f"{m}_{s}"]
        for c, _ in costs:
            out[names.report_metric(r["setting"], r["head"], f"{c}_mean", level=level)] = r[f"{c}_mean"]
    for _, r in paired.iterrows():
        for suffix, column in (("_n", "n_pairs"), ("_diff", "mean_diff"), ("_diff_ci_low", "ci_low"),
                               ("_diff_ci_high", "ci_high")):
            out[names.report_metric(r["setting"], r["head"], r["metric"] + suffix, r["baseline"], level)] = r[column]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def log_to_parent(tracking_uri: str, parent_run_id: str, paths: Sequence[Path], metrics: Mapping[str, float],
                  folder: str = names.REPORT_ARTIFACTS) -> None:
    """The report's files as artifacts under ``folder`` and its metrics, on the parent run (retried)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import RunLogger

    try:
        run = RunLogger(tracking_uri, parent_run_id)
        run.metrics(dict(metrics))
        for p in paths:
            run.artifact(p, folder)
        run.tag(names.TAG_REPORT, names.REPORT_WRITTEN)
    except MlflowException as exc:
        raise mlflow_error(tracking_uri, f"cannot log the report to run {parent_run_id}", exc) from None

