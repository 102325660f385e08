"""The comparison report: every head × seed run of a comparison, from MLflow, summarised per setting.

    result = write_report("sqlite:///results/mlflow.db", parent_run_id, "results/report")

Source. The child runs of the comparison's parent run (tag ``mlflow.parentRunId``), read from the
tracking store, never from files beside the runs. A child run that is not ``FINISHED`` (failed,
killed, still running) is listed as skipped with its status; of several finished runs of the same
setting × head × seed (a job run again under the same parent) the latest counts and the others are
listed as skipped, superseded.

Per run. head and seed (tags, else params), the setting (``setting_keys``, params; a missing one is
"n/a"; ``config.demo.*`` keys are "n/a" too when ``config.samples`` names a sample sheet, since the
demo settings did not make that data), the final test metrics, and the localisation scores: the mean
over the run's samples with witness cells of ``heatmap/{sample}/localisation_auroc`` and
``heatmap/{sample}/pointing_game_top{1,5}`` (pipeline/heatmap.py logs them to the run).

Statistics. Per setting × head over seeds: n, mean, standard deviation and the 95 % t-interval
mean ± t(0.975, n − 1) · sd / √n of each metric (a run without the metric, e.g. a one-class test
split without sample AUROC, does not count in its n). With n = 1 the interval is undefined: NaN in
the tables, "undefined" in the text, never a made-up width. Paired comparison of each head against
``gap`` per setting: over the seeds where both have the metric, the per-seed difference head − gap,
its mean and 95 % t-interval; the verdict is "better" when the interval lies above 0, "worse" below,
"no evidence of a difference" when it contains 0, "n too small" with fewer than 2 pairs. No
correction for the number of comparisons is applied (the report says how many there are).

Outputs in ``out_dir`` (all plain files a Snakemake rule can mark with ``report(...)``):
  ``summary.tsv``: one row per setting × head with n, mean, sd and interval of every metric
    (``summary_columns``).
  ``paired.tsv``: one row per setting × head ≠ gap × compared metric (``paired_columns``).
  ``runs.tsv``: every child run, counted or skipped (``skip_reason``).
  ``report.md``: the tables per setting, the paired verdicts and what the numbers do and do not show.
  ``metric_vs_witness_fraction.png``: mean ± interval against witness fraction, a line per head, one
    panel per metric (a row per other setting, e.g. kind).
  ``heatmaps_side_by_side.png``: given ``heatmap_pngs`` ({head: PNG of one slide}), the heads side by side.
The same files are logged to the parent run under ``report/``, with summary metrics
``report/{setting}/{head}/{metric}_mean`` (and ``_ci_low``, ``_ci_high``, ``_n``) and
``report/{setting}/{head}/vs_gap/{metric}_diff`` (and ``_ci_low``, ``_ci_high``, ``_n``).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.errors import GaplessError
from pipeline.files import atomic_write, atomic_write_text, outputs
from pipeline.tracking import PARAM_LIMIT, sqlite_path
from pipeline.viewer import head_sort_key

log = logging.getLogger("gapless.report")

DEFAULT_SETTING_KEYS = ("train.kind", "config.demo.witness_fraction", "config.demo.cell_density")
WITNESS_KEY = "config.demo.witness_fraction"
BASELINE = "gap"
CONFIDENCE = 0.95
NA = "n/a"

# (column stem, label) of the metrics summarised with mean and interval, in table order
INTERVAL_METRICS = (
    ("test_auroc", "tile AUROC"),
    ("test_sample_auroc_mean", "sample AUROC (mean)"),
    ("test_sample_auroc_max", "sample AUROC (max)"),
    ("localisation_auroc", "localisation AUROC"),
    ("pointing_game_top1", "pointing game top-1"),
    ("pointing_game_top5", "pointing game top-5"),
)
METRIC_RANGE = (0.0, 1.0)  # every interval metric is an AUROC or a rate
# costs, summarised by their mean over seeds
COST_METRICS = (
    ("parameters", "parameters"),
    ("train_images_per_s", "train images/s"),
    ("inference_images_per_s", "inference images/s"),
    ("peak_memory_mb", "peak memory (MB)"),
)
# compared against the baseline head, paired by seed
PAIRED_METRICS = ("test_auroc", "test_sample_auroc_mean", "test_sample_auroc_max", "localisation_auroc")
LOCALISATION_KEYS = ("localisation_auroc", "pointing_game_top1", "pointing_game_top5")
FINAL_METRICS = tuple(m for m, _ in INTERVAL_METRICS if m not in LOCALISATION_KEYS) + tuple(m for m, _ in COST_METRICS)
LABELS = dict(INTERVAL_METRICS + COST_METRICS)
VERDICTS = ("better", "worse", "no evidence of a difference", "n too small")


def short_name(key: str) -> str:
    """``config.demo.witness_fraction`` → ``witness_fraction``: a setting key's column name."""
    return key.rsplit(".", 1)[-1]


def summary_columns(setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> list[str]:
    """The columns of ``summary.tsv``, in order.

    The settings' short names, ``setting``, ``head``, ``n_seeds``, ``seeds``; per interval metric m:
    ``m_n`` (seeds with the metric), ``m_mean``, ``m_sd``, ``m_ci_low``, ``m_ci_high`` (NaN when
    n < 2); per cost metric c: ``c_mean``.
    """
    cols = [short_name(k) for k in setting_keys] + ["setting", "head", "n_seeds", "seeds"]
    for m, _ in INTERVAL_METRICS:
        cols += [f"{m}_n", f"{m}_mean", f"{m}_sd", f"{m}_ci_low", f"{m}_ci_high"]
    cols += [f"{c}_mean" for c, _ in COST_METRICS]
    return cols


PAIRED_COLUMNS_TAIL = ["setting", "head", "baseline", "metric", "n_pairs", "seeds", "head_mean", "baseline_mean",
                       "mean_diff", "sd_diff", "ci_low", "ci_high", "verdict"]


def paired_columns(setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> list[str]:
    """The columns of ``paired.tsv``: the settings' short names, then ``PAIRED_COLUMNS_TAIL``."""
    return [short_name(k) for k in setting_keys] + PAIRED_COLUMNS_TAIL


# ---------------------------------------------------------------------------------------------
# Statistics


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """n, mean, sd (ddof 1) and the two-sided t-interval of the mean of the finite ``values``.

    n = 0: everything NaN; n = 1: the mean, sd and interval NaN (undefined, not zero width).
    """
    v = _finite(values)
    n = int(v.size)
    out = {"n": n, "mean": float("nan"), "sd": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    if n == 0:
        return out
    out["mean"] = float(v.mean())
    if n < 2:
        return out
    sd = float(v.std(ddof=1))
    half = _t_quantile(n, confidence) * sd / math.sqrt(n)
    out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def _finite(values) -> np.ndarray:
    """The finite values (None and NaN/inf left out) as float64."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return v[np.isfinite(v)]


def _mean(values) -> float:
    """The mean of the finite values, NaN when there are none (``t_interval``'s mean, without the interval)."""
    v = _finite(values)
    return float(v.mean()) if v.size else float("nan")


def _t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """t(0.5 + confidence / 2, n − 1): the half-width of the interval in standard errors."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, max(1, n - 1)))


def verdict(n_pairs: int, ci_low: float, ci_high: float) -> str:
    """"better" / "worse" when the interval of the difference excludes 0, else no evidence; n < 2: too small."""
    if n_pairs < 2 or not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "n too small"
    if ci_low > 0:
        return "better"
    if ci_high < 0:
        return "worse"
    return "no evidence of a difference"


# ---------------------------------------------------------------------------------------------
# Collecting runs


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _mlflow_error(tracking_uri: str, what: str, exc) -> GaplessError:
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


def _value_sort_key(value) -> tuple:
    """Numbers first, in numeric order, then any other value as text (seeds, setting values)."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def head_order(heads) -> list[str]:
    """The baseline first, then the known heads in their usual order, then any other alphabetically."""
    return sorted(set(heads), key=head_sort_key)


def _demo_applies(params: Mapping[str, str]) -> bool:
    """Whether the run's data came from the demo generator (``config.samples`` empty or not logged)."""
    samples = params.get("config.samples")
    return samples is None or samples.strip() in ("", '""', "None", "null")


def localisation_scores(metrics: Mapping[str, float], samples: set[str] | None = None) -> dict:
    """Mean over samples with witness cells of each ``heatmap/{sample}/{key}`` (LOCALISATION_KEYS).

    A sample counts when its ``witness_cells`` metric is above 0 (or, without that metric, when it
    has the score at all: heatmap.py logs the scores only where witnesses exist) and, when
    ``samples`` is given (the run's test split), when it is one of them: a head is scored on slides
    it did not train on. Returns the means (None where no sample has the score) and
    ``heatmap_samples`` (samples with witnesses that count).
    """
    per_sample: dict[str, dict[str, float]] = defaultdict(dict)
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "heatmap" and (samples is None or parts[1] in samples):
            per_sample[parts[1]][parts[2]] = value
    positive = {s: m for s, m in per_sample.items()
                if (m["witness_cells"] > 0 if "witness_cells" in m else any(k in m for k in LOCALISATION_KEYS))}
    out: dict = {"heatmap_samples": len(positive)}
    for key in LOCALISATION_KEYS:
        values = [m[key] for m in positive.values() if key in m and math.isfinite(m[key])]
        out[key] = float(np.mean(values)) if values else None
    return out


def _test_samples(params: Mapping[str, str]) -> set[str] | None:
    """The run's test-split sample ids (param ``split.test``, logged by training), or None when absent."""
    value = params.get("split.test")
    if not value or len(value) >= PARAM_LIMIT:  # absent, or cut at MLflow's param limit: not trustworthy
        return None
    return set(value.split(","))


def collect_runs(tracking_uri: str, parent_run_id: str, setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
                 experiment_id: str | None = None) -> list[dict]:
    """Every child run of the comparison run ``parent_run_id``, one dict each, counted or skipped.

    ``experiment_id``: the parent's experiment when known (saves looking it up). Each dict:
    ``run_id``, ``run_name``, ``status``, ``parent_run_id``,
    ``head``, ``seed``, ``setting`` (tuple of values of ``setting_keys``), the settings by short name,
    the final metrics (FINAL_METRICS, None when absent), the localisation means
    (``localisation_scores``), ``start_time`` and ``skip_reason`` (None for a run that counts).
    Raises GaplessError when the store has no such runs, or when none of them finished.
    """
    from mlflow.exceptions import MlflowException

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise GaplessError(tracking_uri, "no MLflow database there",  # MLflow would create an empty one
                           "pass the tracking URI the heads were trained with (mlflow.tracking_uri or MLFLOW_TRACKING_URI)")
    client = _client(tracking_uri)
    try:
        experiment_id = experiment_id or client.get_run(parent_run_id).info.experiment_id
        found = _search_all(client, [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    except MlflowException as exc:
        raise _mlflow_error(tracking_uri, "cannot read the comparison's runs", exc) from None
    where = f"comparison run {parent_run_id}"
    if not found:
        raise GaplessError(tracking_uri, f"no runs under {where}",
                           "train the heads first (snakemake / gapless train --comparison), or pass the right parent run id")

    runs = []
    for r in found:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        demo = _demo_applies(params)
        test_samples = _test_samples(params)
        setting = tuple(
            NA if (k.startswith("config.demo.") and not demo) else params.get(k, NA) for k in setting_keys)
        row = {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name or tags.get("mlflow.runName", ""),
            "status": r.info.status,
            "parent_run_id": tags.get("mlflow.parentRunId"),
            "head": tags.get("head") or params.get("head") or NA,
            "seed": tags.get("seed") or params.get("seed") or NA,
            "setting": setting,
            **{short_name(k): v for k, v in zip(setting_keys, setting)},
            **{m: metrics.get(m) for m in FINAL_METRICS},
            **localisation_scores(metrics, test_samples),
            "localisation_on": "test split" if test_samples is not None else "all samples",
            "start_time": r.info.start_time or 0,
            "skip_reason": None,
        }
        if r.info.status != "FINISHED":
            row["skip_reason"] = f"status {r.info.status}"
        elif row["head"] == NA:
            row["skip_reason"] = "no head tag or param"
        runs.append(row)

    latest: dict[tuple, dict] = {}
    for row in runs:  # of repeated finished runs of one setting × head × seed, the latest counts
        if row["skip_reason"] is None:
            key = (row["setting"], row["head"], row["seed"])
            if key in latest:
                older, newer = sorted((latest[key], row), key=lambda x: x["start_time"])
                older["skip_reason"] = f"superseded by the later run {newer['run_id']}"
                latest[key] = newer
            else:
                latest[key] = row
    if not latest:
        statuses = Counter(r["status"] for r in runs)
        listed = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        raise GaplessError(tracking_uri, f"none of the {len(runs)} runs under {where} finished ({listed})",
                           "see the training logs (results/logs/train) and rerun the failed jobs")
    runs.sort(key=lambda x: (x["setting"], head_sort_key(x["head"]), _value_sort_key(x["seed"]), x["start_time"]))
    return runs


# ---------------------------------------------------------------------------------------------
# Tables


def setting_label(setting: Sequence[str], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> str:
    """``kind-slide_witness_fraction-0.05_cell_density-40.0``: a setting as one name MLflow accepts."""
    text = "_".join(f"{short_name(k)}-{v}" for k, v in zip(setting_keys, setting))
    return re.sub(r"[^0-9A-Za-z_.\- ]", "_", text)


def setting_text(setting: Sequence[str], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> str:
    """``kind slide, witness_fraction 0.05, cell_density 40.0``: a setting for people."""
    return ", ".join(f"{short_name(k)} {v}" for k, v in zip(setting_keys, setting))


def _counted(runs: Sequence[dict]) -> list[dict]:
    return [r for r in runs if r["skip_reason"] is None]


def _by_setting(runs: Sequence[dict]) -> list[tuple[tuple, list[dict]]]:
    """The counted runs grouped by setting (run order kept), settings in value order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in _counted(runs):
        groups[r["setting"]].append(r)
    return sorted(groups.items(), key=lambda item: tuple(_value_sort_key(v) for v in item[0]))


def _setting_columns(setting: tuple, setting_keys: Sequence[str]) -> dict:
    """The setting's values by short name, and ``setting`` (its label): the first columns of a table row."""
    return {**{short_name(k): v for k, v in zip(setting_keys, setting)}, "setting": setting_label(setting, setting_keys)}


def summarise(runs: Sequence[dict], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS):
    """``summary.tsv`` as a DataFrame: one row per setting × head over the counted runs' seeds."""
    import pandas as pd

    rows = []
    for setting, in_setting in _by_setting(runs):
        for head in head_order(r["head"] for r in in_setting):
            group = sorted((r for r in in_setting if r["head"] == head), key=lambda r: _value_sort_key(r["seed"]))
            row = _setting_columns(setting, setting_keys)
            row.update(head=head, n_seeds=len(group), seeds=",".join(str(r["seed"]) for r in group))
            for m, _ in INTERVAL_METRICS:
                stats = t_interval([r[m] for r in group])
                row.update({f"{m}_{k}": v for k, v in stats.items()})
            for c, _ in COST_METRICS:
                row[f"{c}_mean"] = _mean(r[c] for r in group)
            rows.append(row)
    return pd.DataFrame(rows, columns=summary_columns(setting_keys))


def paired_comparison(runs: Sequence[dict], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
                      baseline: str = BASELINE, metrics: Sequence[str] = PAIRED_METRICS):
    """``paired.tsv`` as a DataFrame: each head against ``baseline`` per setting and metric, paired by seed.

    Settings without the baseline get rows with n_pairs 0 and the verdict "n too small".
    """
    import pandas as pd

    rows = []
    for setting, in_setting in _by_setting(runs):
        base = {r["seed"]: r for r in in_setting if r["head"] == baseline}
        for head in head_order(r["head"] for r in in_setting):
            if head == baseline:
                continue
            mine = {r["seed"]: r for r in in_setting if r["head"] == head}
            for m in metrics:
                seeds = sorted((s for s in mine if s in base and mine[s][m] is not None and base[s][m] is not None
                                and math.isfinite(mine[s][m]) and math.isfinite(base[s][m])), key=_value_sort_key)
                diffs = [mine[s][m] - base[s][m] for s in seeds]
                stats = t_interval(diffs)
                row = _setting_columns(setting, setting_keys)
                row.update(head=head, baseline=baseline, metric=m, n_pairs=len(seeds), seeds=",".join(str(s) for s in seeds),
                           head_mean=_mean(mine[s][m] for s in seeds), baseline_mean=_mean(base[s][m] for s in seeds),
                           mean_diff=stats["mean"], sd_diff=stats["sd"], ci_low=stats["ci_low"],
                           ci_high=stats["ci_high"], verdict=verdict(len(seeds), stats["ci_low"], stats["ci_high"]))
                rows.append(row)
    return pd.DataFrame(rows, columns=paired_columns(setting_keys))


def runs_table(runs: Sequence[dict], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS):
    """``runs.tsv`` as a DataFrame: every child run, counted or skipped (``skip_reason``)."""
    import pandas as pd

    cols = (["run_id", "run_name", "status", "head", "seed"] + [short_name(k) for k in setting_keys]
            + list(FINAL_METRICS) + list(LOCALISATION_KEYS) + ["heatmap_samples", "skip_reason"])
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in runs], columns=cols)


# ---------------------------------------------------------------------------------------------
# Text


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _cost(x) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f} M"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"


def interval_text(n: int, mean: float, lo: float, hi: float, n_seeds: int | None = None, signed: bool = False,
                  bounds: tuple[float, float] | None = None) -> str:
    """``0.812 [0.790, 0.834]``; one value: ``0.812 (n = 1, interval undefined)``; none: ``–``.

    bounds: the metric's range (e.g. 0–1 for an AUROC); the interval is shown cut to it.
    """
    if n == 0 or not math.isfinite(mean):
        return "–"
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    fmt = (lambda v: f"{v:+.3f}") if signed else _num
    if n < 2:
        return f"{fmt(mean)} (n = 1, interval undefined)"
    text = f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"
    return text + (f" (n = {n})" if n_seeds is not None and n != n_seeds else "")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def _row_setting(row, setting_keys: Sequence[str]) -> str:
    """The setting of a summary or paired row, for people (``kind slide, witness_fraction 0.05, …``)."""
    return setting_text([row[short_name(k)] for k in setting_keys], setting_keys)


def _findings(runs, summary, paired, baseline: str, setting_keys: Sequence[str]) -> list[str]:
    """Sentences on what the numbers do and do not show, each computed from the tables."""
    counted = _counted(runs)
    out = []
    n = summary["n_seeds"]
    seeds = f"{n.min()} to {n.max()}" if n.min() != n.max() else f"{n.min()}"
    out.append(f"{len(counted)} finished runs in {summary['setting'].nunique()} setting(s) and "
               f"{summary['head'].nunique()} head(s), with {seeds} seed(s) per setting × head; the intervals are "
               f"95 % t-intervals over seeds, so they describe how much a result moves between training seeds "
               f"(the split and the initialisation change with the seed) on this data, not between data sets.")
    ones = summary[summary["n_seeds"] < 2]
    if len(ones):
        which = "; ".join(f"{r['head']} at {_row_setting(r, setting_keys)}" for _, r in ones.iterrows())
        out.append(f"{len(ones)} setting × head group(s) have a single seed, so their interval is undefined "
                   f"(not zero) and they enter no paired comparison: {which}.")
    widths = summary["test_auroc_ci_high"] - summary["test_auroc_ci_low"]
    if widths.notna().any():
        i = widths.idxmax()
        k = int(summary.loc[i, "test_auroc_n"])
        most = int(n.max())
        text = (f"The widest tile AUROC interval is {widths[i]:.3f} wide ({summary.loc[i, 'head']} at "
                f"{_row_setting(summary.loc[i], setting_keys)}, {k} seeds). With {most} seeds an interval's "
                f"half-width is t(0.975, {most - 1}) = {_t_quantile(most):.2f} standard errors")
        if most <= 5:
            text += "; with so few seeds the intervals are wide and only large, consistent differences are resolved"
        out.append(text + ".")
    aurocs = [m for m, _ in INTERVAL_METRICS if "auroc" in m]
    past = sum(int(((summary[f"{m}_ci_high"] > 1) | (summary[f"{m}_ci_low"] < 0)).sum()) for m in aurocs)
    if past:
        out.append(f"{past} AUROC interval(s) reach past 0 or 1: the t-interval does not know that AUROC is bounded, "
                   f"another sign that there are too few seeds for a precise estimate (the tables and plots show "
                   f"them cut at 0 and 1).")
    if len(paired):
        flat = paired[(paired["n_pairs"] >= 2) & (paired["sd_diff"].abs() <= 1e-12)]
        if len(flat):
            out.append(f"{len(flat)} paired difference(s) are identical on every seed (zero spread), so their interval "
                       f"has zero width; with so few seeds this says the seeds agreed, not that the difference is exact.")
        counts = Counter(paired["verdict"])
        parts = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
        out.append(f"Paired against {baseline} by seed: {len(paired)} comparisons ({parts}).")
        decided = paired[paired["verdict"].isin(["better", "worse"])]
        for _, r in decided.iterrows():
            diff = interval_text(r["n_pairs"], r["mean_diff"], r["ci_low"], r["ci_high"], signed=True)
            out.append(f"Backed by the numbers: {r['head']} is {r['verdict']} than {baseline} on {LABELS[r['metric']]} "
                       f"at {_row_setting(r, setting_keys)} (difference {diff}, {r['n_pairs']} seeds).")
        undecided = int(counts["no evidence of a difference"])
        if undecided:
            out.append(f"{undecided} comparison(s) show no evidence of a difference: their interval contains 0, so a "
                       f"claim that one head beats the other there is refused — and neither is it shown that they are "
                       f"equal; more seeds narrow the interval.")
        if counts["n too small"]:
            out.append(f"{counts['n too small']} comparison(s) have fewer than 2 seeds shared with {baseline} "
                       f"(or lack {baseline} or the metric) and decide nothing.")
        tested = int(sum(counts[v] for v in VERDICTS[:3]))
        if tested:
            out.append(f"No correction for multiple comparisons is applied: of {tested} comparisons at 95 %, about "
                       f"{0.05 * tested:.1f} would come out 'better' or 'worse' by chance alone if no head differed.")
    else:
        out.append(f"There is no paired comparison: no head other than {baseline} shares a setting with it.")
    loc = [r for r in counted if r["localisation_auroc"] is not None]
    if loc:
        samples = [r["heatmap_samples"] for r in loc]
        out.append(f"Localisation scores exist for {len(loc)} of {len(counted)} runs, each the mean over "
                   f"{min(samples) if min(samples) == max(samples) else f'{min(samples)}–{max(samples)}'} "
                   f"sample(s) with witness cells"
                   + (" in the run's test split (slides the head did not train on)."
                      if all(r.get("localisation_on") == "test split" for r in loc)
                      else ", over every sample its heatmaps were scored on (some runs logged no test split, "
                           "so training slides count there too)."))
    else:
        out.append("No run has localisation scores (no heatmaps with witness annotations were logged), so the "
                   "localisation and pointing-game columns are empty.")
    return out


def write_markdown(path: Path, runs, summary, paired, setting_keys: Sequence[str], meta: Mapping[str, str],
                   plots: Mapping[str, Path], baseline: str = BASELINE) -> Path:
    """``report.md``: sources, the table per setting, the paired verdicts, the findings, skipped runs."""
    lines = ["# Head comparison", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()] + [""]
    lines += ["## What the numbers show and do not show", ""]
    lines += [f"- {s}" for s in _findings(runs, summary, paired, baseline, setting_keys)] + [""]
    lines += ["## Per setting (mean [95 % t-interval] over seeds)", "",
              "Every metric here lies in [0, 1]; an interval that reaches past that is shown cut at 0 or 1 "
              "(`summary.tsv` keeps the t-interval as computed).", ""]
    header = ["head", "seeds"] + [label for _, label in INTERVAL_METRICS] + [label for _, label in COST_METRICS]
    for setting in summary["setting"].unique():
        part = summary[summary["setting"] == setting]
        lines += [f"### {_row_setting(part.iloc[0], setting_keys)}", ""]
        rows = []
        for _, r in part.iterrows():
            cells = [r["head"], f"{r['n_seeds']} ({r['seeds']})"]
            cells += [interval_text(int(r[f"{m}_n"]), r[f"{m}_mean"], r[f"{m}_ci_low"], r[f"{m}_ci_high"], int(r["n_seeds"]),
                                    bounds=METRIC_RANGE) for m, _ in INTERVAL_METRICS]
            cells += [_cost(r[f"{c}_mean"]) for c, _ in COST_METRICS]
            rows.append(cells)
        lines += _md_table(header, rows) + [""]
    lines += [f"## Paired against {baseline} (difference head − {baseline}, paired by seed)", ""]
    if len(paired):
        for setting in paired["setting"].unique():
            part = paired[paired["setting"] == setting]
            lines += [f"### {_row_setting(part.iloc[0], setting_keys)}", ""]
            rows = [[r["head"], LABELS[r["metric"]], f"{r['n_pairs']} ({r['seeds'] or '–'})",
                     _num(r["head_mean"]), _num(r["baseline_mean"]),
                     interval_text(int(r["n_pairs"]), r["mean_diff"], r["ci_low"], r["ci_high"], signed=True), r["verdict"]]
                    for _, r in part.iterrows()]
            lines += _md_table(["head", "metric", "seeds paired", "head mean", f"{baseline} mean",
                                "difference [95 % CI]", "verdict"], rows) + [""]
    else:
        lines += [f"No head shares a setting with {baseline}.", ""]
    skipped = [r for r in runs if r["skip_reason"] is not None]
    lines += ["## Skipped runs", ""]
    if skipped:
        lines += _md_table(["run", "name", "head", "seed", "setting", "reason"],
                           [[r["run_id"], r["run_name"], r["head"], r["seed"], setting_text(r["setting"], setting_keys),
                             r["skip_reason"]] for r in skipped])
    else:
        lines.append("None: every child run finished and counts.")
    lines.append("")
    if plots:
        lines += ["## Figures", ""] + [f"![{name}]({p.name})" for name, p in plots.items()] + [""]
    atomic_write_text(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------
# Plots


def _as_float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _tick_label(value: float, name: str) -> str:
    """A fraction as a percentage (0.05 → ``5 %``); any other value as written."""
    if "fraction" in name and 0 <= value <= 1:
        return f"{value * 100:g} %"
    return f"{value:g}"


def plot_metrics(summary, path: Path, setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
                 x_key: str = WITNESS_KEY) -> Path:
    """Each interval metric against ``x_key`` (witness fraction): mean ± 95 % interval, a line per head.

    One column per metric, one row per combination of the other settings (e.g. kind). A head with one
    seed at a point shows the mean without a bar (its interval is undefined). With one x value each
    head is a dot (with its bar), side by side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_col = short_name(x_key) if x_key in setting_keys else None
    others = [short_name(k) for k in setting_keys if k != x_key]
    groups = (summary.groupby(others, sort=False, dropna=False) if others else [((), summary)])
    groups = [(g if isinstance(g, tuple) else (g,), part) for g, part in groups]
    heads = head_order(summary["head"])
    colours = {h: plt.get_cmap("tab10")(i % 10) for i, h in enumerate(heads)}
    xs_all = summary[x_col].tolist() if x_col else ["all"]
    numeric = x_col is not None and all(_as_float(v) is not None for v in xs_all)
    categories = sorted(set(xs_all), key=_value_sort_key)
    cols = 3  # metrics wrap onto rows of three panels, per group of the other settings
    per_group = math.ceil(len(INTERVAL_METRICS) / cols)
    fig, axes = plt.subplots(len(groups) * per_group, cols, figsize=(3.6 * cols, 2.8 * len(groups) * per_group + 0.7),
                             squeeze=False, layout="constrained")
    values = [float(v) for v in xs_all] if numeric else []
    log_x = numeric and min(values) > 0 and max(values) / min(values) >= 10  # e.g. 0.001, 0.01, 0.1
    span = (np.log10(max(values) / min(values)) if log_x else max(values) - min(values)) if numeric else 0.0
    dodge = (span or (abs(values[0]) if values else 0.0) or 1.0) * 0.015 if numeric else 0.06
    for g, (key, part) in enumerate(groups):
        title = ", ".join(f"{k} {v}" for k, v in zip(others, key))
        for j, (m, label) in enumerate(INTERVAL_METRICS):
            ax = axes[g * per_group + j // cols, j % cols]
            drawn = False
            for i, head in enumerate(heads):
                h = part[(part["head"] == head) & (part[f"{m}_n"] > 0)]
                if h.empty:
                    continue
                if x_col:
                    h = h.assign(_x=[float(v) if numeric else categories.index(v) for v in h[x_col]]).sort_values("_x")
                    x = h["_x"].to_numpy(float)
                else:
                    x = np.zeros(len(h))
                shift = (i - (len(heads) - 1) / 2) * dodge  # heads side by side, not on top of each other
                x = x * 10**shift if log_x else x + shift
                y = h[f"{m}_mean"].to_numpy(float)
                lo = (y - np.maximum(h[f"{m}_ci_low"].to_numpy(float), METRIC_RANGE[0]))
                hi = (np.minimum(h[f"{m}_ci_high"].to_numpy(float), METRIC_RANGE[1]) - y)
                err = np.vstack([np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=0.0)])
                ax.errorbar(x, y, yerr=err, color=colours[head], marker="o", ms=4, capsize=3, lw=1.2,
                            ls="-" if len(x) > 1 else "none", label=head)
                undefined = ~np.isfinite(lo)
                if undefined.any():  # one seed: no interval, drawn hollow
                    ax.plot(x[undefined], y[undefined], "o", ms=7, mfc="white", mec=colours[head], zorder=3)
                drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
            ax.set_title(f"{label}" + (f"\n{title}" if title else ""), fontsize=9)
            if x_col:
                ax.set_xlabel(x_col.replace("_", " "), fontsize=8)
                if not numeric:
                    ax.set_xticks(range(len(categories)), categories)
                    ax.set_xlim(-0.5, len(categories) - 0.5)
                else:  # the same axis in every panel, ticked at the values the settings have
                    if log_x:
                        ax.set_xscale("log")
                        ax.minorticks_off()
                        ax.set_xlim(min(values) / 10 ** (span * 0.12), max(values) * 10 ** (span * 0.12))
                    else:
                        pad = 0.12 * (span or abs(values[0]) or 1.0)
                        ax.set_xlim(min(values) - pad, max(values) + pad)
                    ax.set_xticks([float(c) for c in categories], [_tick_label(float(c), x_col) for c in categories])
            else:
                ax.set_xticks([])
                ax.set_xlim(-0.5, 0.5)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for j in range(len(INTERVAL_METRICS), per_group * cols):
            axes[g * per_group + j // cols, j % cols].set_axis_off()
    handles = [plt.Line2D([], [], color=colours[h], marker="o", label=h) for h in heads]
    handles.append(plt.Line2D([], [], color="0.3", marker="o", mfc="white", ls="none", label="one seed: no interval"))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8, frameon=False,
               title="mean ± 95 % t-interval over seeds", title_fontsize=8)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_heatmaps(heatmap_pngs: Mapping[str, str | Path], path: Path, title: str | None = None) -> Path:
    """The heatmap PNGs of one slide, one per head, side by side with the head names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    items = [(h, Path(heatmap_pngs[h])) for h in head_order(heatmap_pngs)]
    images = []
    for head, p in items:
        if not p.is_file():
            raise GaplessError(p, f"no heatmap PNG for head {head}", "make the heatmaps first, or leave the head out")
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError as exc:
            raise GaplessError(p, f"not a readable image ({exc})", "remake the heatmap") from None
    aspect = max(im.shape[0] / im.shape[1] for im in images)
    width = 4.0
    fig, axes = plt.subplots(1, len(images), figsize=(width * len(images), width * aspect + 0.6), squeeze=False)
    for ax, (head, _), im in zip(axes[0], items, images):
        ax.imshow(im)
        ax.set_title(head, fontsize=12, fontweight="bold")
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# MLflow


def report_metrics(summary, paired) -> dict[str, float]:
    """The summary as MLflow metrics on the parent run (finite values only)."""
    safe = lambda text: re.sub(r"[^0-9A-Za-z_.\-/ ]", "_", str(text))  # noqa: E731 (what MLflow allows)
    out = {}
    for _, r in summary.iterrows():
        stem = f"report/{r['setting']}/{safe(r['head'])}"
        for m, _ in INTERVAL_METRICS:
            out[f"{stem}/{m}_n"] = r[f"{m}_n"]
            for s in ("mean", "ci_low", "ci_high"):
                out[f"{stem}/{m}_{s}"] = r[f"{m}_{s}"]
        for c, _ in COST_METRICS:
            out[f"{stem}/{c}_mean"] = r[f"{c}_mean"]
    for _, r in paired.iterrows():
        stem = f"report/{r['setting']}/{safe(r['head'])}/vs_{safe(r['baseline'])}/{r['metric']}"
        out[f"{stem}_n"] = r["n_pairs"]
        out[f"{stem}_diff"] = r["mean_diff"]
        out[f"{stem}_diff_ci_low"] = r["ci_low"]
        out[f"{stem}_diff_ci_high"] = r["ci_high"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def log_to_parent(tracking_uri: str, parent_run_id: str, paths: Sequence[Path], metrics: Mapping[str, float],
                  folder: str = "report") -> None:
    """The report's files as artifacts under ``folder`` and its metrics, on the parent run (retried)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import RunLogger

    try:
        run = RunLogger(tracking_uri, parent_run_id)
        run.metrics(dict(metrics))
        for p in paths:
            run.artifact(p, folder)
        run.tag("gapless.report", "written")
    except MlflowException as exc:
        raise _mlflow_error(tracking_uri, f"cannot log the report to run {parent_run_id}", exc) from None


# ---------------------------------------------------------------------------------------------
# Entry point


def write_report(tracking_uri: str, parent_run_id: str, out_dir: str | Path = "results/report",
                 heatmap_pngs: Mapping[str, str | Path] | None = None,
                 setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS, experiment_id: str | None = None,
                 baseline: str = BASELINE, log_mlflow: bool = True) -> dict:
    """Collect the comparison's runs from MLflow, write ``out_dir`` (module docstring) and log it to the parent.

    Returns ``{"paths": {name: Path}, "summary": DataFrame, "paired": DataFrame, "runs": DataFrame,
    "skipped": [run dicts]}``.
    """
    setting_keys = tuple(setting_keys)
    out = Path(out_dir)
    runs = collect_runs(tracking_uri, parent_run_id, setting_keys, experiment_id)
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to report
    summary = summarise(runs, setting_keys)
    paired = paired_comparison(runs, setting_keys, baseline)
    table = runs_table(runs, setting_keys)
    paths = {}
    with outputs():  # the tables, plots and markdown appear together, or none of them
        for name, frame in (("summary", summary), ("paired", paired), ("runs", table)):
            paths[name] = out / f"{name}.tsv"
            atomic_write(paths[name], lambda tmp: frame.to_csv(tmp, sep="\t", index=False, na_rep="NaN", float_format="%.6g"))  # noqa: B023
        plots = {"metrics vs witness fraction": plot_metrics(summary, out / "metric_vs_witness_fraction.png", setting_keys)}
        paths["metric_plot"] = plots["metrics vs witness fraction"]
        if heatmap_pngs:
            samples = {Path(p).stem for p in heatmap_pngs.values()}
            title = f"sample {samples.pop()}" if len(samples) == 1 else None
            paths["heatmaps"] = plots["heatmaps side by side"] = plot_heatmaps(heatmap_pngs, out / "heatmaps_side_by_side.png", title)
        meta = {"tracking URI": tracking_uri, "comparison (parent) run": parent_run_id,
                "setting keys": ", ".join(setting_keys), "baseline": baseline}
        paths["markdown"] = write_markdown(out / "report.md", runs, summary, paired, setting_keys, meta, plots, baseline)
    if log_mlflow:
        log_to_parent(tracking_uri, parent_run_id, list(paths.values()), report_metrics(summary, paired))
    skipped = [r for r in runs if r["skip_reason"] is not None]
    for r in skipped:
        log.warning("report: skipped run %s (%s seed %s): %s", r["run_id"], r["head"], r["seed"], r["skip_reason"])
    return {"paths": paths, "summary": summary, "paired": paired, "runs": table, "skipped": skipped}
