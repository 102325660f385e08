"""The report's tables as DataFrames: ``summary.tsv`` (per setting × head over seeds), ``paired.tsv``
(each head against the setting's baseline, paired by seed) and ``runs.tsv`` (every child run).

Each table is of one level's runs (``level``: ``tile`` by default, a run's ``gapless.level`` tag): the
tile level's tables never count a slide-level run. The slide level's (``slide_summary.tsv``, …) are the
same tables of the slide-level runs with the slide level's metrics (``columns.SLIDE_*``).

The baseline of a setting is the head whose runs are tagged as the baseline (``HeadInfo.baseline``,
``setting_baselines``); a setting where no head or several heads claim it has no paired rows (the
report's notes say so). ``baseline=`` overrides the tags with one head for every setting.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from pipeline.mlflow_names import LEVEL_SLIDE, LEVEL_TILE
from pipeline.report.columns import (
    COST_METRICS,
    DEFAULT_SETTING_KEYS,
    FINAL_METRICS,
    INTERVAL_METRICS,
    LOCALISATION_KEYS,
    PAIRED_METRICS,
    SLIDE_FINAL_METRICS,
    SLIDE_LOCALISATION_KEYS,
    paired_columns,
    setting_label,
    short_name,
    summary_columns,
    value_sort_key,
)
from pipeline.report.runs import at_level, counted, head_infos, head_order
from pipeline.report.statistics import finite_mean, t_interval, verdict


def _has(value) -> bool:
    return value is not None and math.isfinite(value)


def present_metrics(runs: Sequence[dict], metrics: Sequence[str], level: str | None = LEVEL_TILE) -> list[str]:
    """Of ``metrics``, those that at least one counted run at ``level`` has (a finite value), in the given order."""
    rows = counted(at_level(runs, level))
    return [m for m in metrics if any(_has(r.get(m)) for r in rows)]


def by_setting(runs: Sequence[dict]) -> list[tuple[tuple, list[dict]]]:
    """The counted runs grouped by setting (run order kept), settings in value order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in counted(runs):
        groups[r["setting"]].append(r)
    return sorted(groups.items(), key=lambda item: tuple(value_sort_key(v) for v in item[0]))


def _setting_columns(setting: tuple, setting_keys: Sequence[str]) -> dict:
    """The setting's values by short name, and ``setting`` (its label): the first columns of a table row."""
    return {**{short_name(k): v for k, v in zip(setting_keys, setting)}, "setting": setting_label(setting, setting_keys)}


def setting_baselines(runs: Sequence[dict], baseline: str | None = None,
                      level: str | None = LEVEL_TILE) -> dict[tuple, list[str]]:
    """Per setting (of the counted runs at ``level``), the heads that claim to be its baseline, in head order.

    ``baseline`` given: ``[baseline]`` in every setting, whether or not the setting has that head (an
    override of the tags). Else the setting's heads whose runs are tagged as the baseline
    (``runs.head_infos``). A setting is paired only when exactly one head claims it.
    """
    runs = at_level(runs, level)
    infos = head_infos(runs)
    out = {}
    for setting, in_setting in by_setting(runs):
        heads = head_order((r["head"] for r in in_setting), infos)
        out[setting] = [baseline] if baseline is not None else [h for h in heads if infos[h].baseline]
    return out


def summarise(runs: Sequence[dict], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
              level: str | None = LEVEL_TILE, metrics: Sequence[tuple[str, str]] = INTERVAL_METRICS,
              costs: Sequence[tuple[str, str]] = COST_METRICS):
    """``summary.tsv`` as a DataFrame: one row per setting × head over the seeds of the counted runs at
    ``level`` (the slide level: ``level="slide"`` with ``SLIDE_INTERVAL_METRICS``, ``SLIDE_COST_METRICS``)."""
    import pandas as pd

    runs = at_level(runs, level)
    infos = head_infos(runs)
    rows = []
    for setting, in_setting in by_setting(runs):
        for head in head_order((r["head"] for r in in_setting), infos):
            group = sorted((r for r in in_setting if r["head"] == head), key=lambda r: value_sort_key(r["seed"]))
            row = _setting_columns(setting, setting_keys)
            row.update(head=head, n_seeds=len(group), seeds=",".join(str(r["seed"]) for r in group))
            for m, _ in metrics:
                stats = t_interval([r.get(m) for r in group])
                row.update({f"{m}_{k}": v for k, v in stats.items()})
            for c, _ in costs:
                row[f"{c}_mean"] = finite_mean(r.get(c) for r in group)
            rows.append(row)
    return pd.DataFrame(rows, columns=summary_columns(setting_keys, metrics, costs))


def _paired_row(setting_row: dict, head: str, baseline: str, metric: str, mine: dict, base: dict) -> dict:
    """One row of ``paired.tsv``: ``head`` − ``baseline`` on ``metric`` over the seeds both have it
    (``mine`` and ``base``: run by seed)."""
    seeds = sorted((s for s in mine if s in base and _has(mine[s].get(metric)) and _has(base[s].get(metric))),
                   key=value_sort_key)
    stats = t_interval([mine[s][metric] - base[s][metric] for s in seeds])
    return {**setting_row, "head": head, "baseline": baseline, "metric": metric, "n_pairs": len(seeds),
            "seeds": ",".join(str(s) for s in seeds), "head_mean": finite_mean(mine[s][metric] for s in seeds),
            "baseline_mean": finite_mean(base[s][metric] for s in seeds), "mean_diff": stats["mean"],
            "sd_diff": stats["sd"], "ci_low": stats["ci_low"], "ci_high": stats["ci_high"],
            "verdict": verdict(len(seeds), stats["ci_low"], stats["ci_high"])}


def paired_comparison(runs: Sequence[dict], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
                      baseline: str | None = None, metrics: Sequence[str] = PAIRED_METRICS,
                      level: str | None = LEVEL_TILE):
    """``paired.tsv`` as a DataFrame: each head against its setting's baseline per setting and metric,
    paired by seed (the per-seed difference head − baseline, its mean, t-interval and verdict), over
    the runs at ``level`` (the slide level: ``level="slide"`` with ``SLIDE_PAIRED_METRICS``).

    The baseline per setting: ``setting_baselines`` (the runs' tags, or ``baseline`` for every setting).
    A setting with no or several claimed baselines has no rows; a setting without the given
    ``baseline`` head gets rows with n_pairs 0 and the verdict "n too small". A metric that no counted
    run has (e.g. the Grad-CAM scores of runs mapped before heatmaps logged them) has no rows.
    """
    import pandas as pd

    runs = at_level(runs, level)
    infos = head_infos(runs)
    claims = setting_baselines(runs, baseline, None)
    metrics = present_metrics(runs, metrics, None)
    rows = []
    for setting, in_setting in by_setting(runs):
        if len(claims[setting]) != 1:
            continue
        base_head = claims[setting][0]
        base = {r["seed"]: r for r in in_setting if r["head"] == base_head}
        for head in head_order((r["head"] for r in in_setting), infos):
            if head == base_head:
                continue
            mine = {r["seed"]: r for r in in_setting if r["head"] == head}
            rows += [_paired_row(_setting_columns(setting, setting_keys), head, base_head, m, mine, base) for m in metrics]
    return pd.DataFrame(rows, columns=paired_columns(setting_keys))


def runs_table(runs: Sequence[dict], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS, level: str | None = LEVEL_TILE):
    """``runs.tsv`` as a DataFrame: every child run at ``level``, counted or skipped (``skip_reason``);
    the slide level's (``slide_runs.tsv``) with its final metrics and scores (``SLIDE_FINAL_METRICS``,
    ``SLIDE_LOCALISATION_KEYS``)."""
    import pandas as pd

    final, scores = (SLIDE_FINAL_METRICS, SLIDE_LOCALISATION_KEYS) if level == LEVEL_SLIDE else (FINAL_METRICS, LOCALISATION_KEYS)
    cols = (["run_id", "run_name", "status", "head", "seed"] + [short_name(k) for k in setting_keys]
            + list(final) + list(scores) + ["heatmap_samples", "skip_reason"])
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in at_level(runs, level)], columns=cols)
