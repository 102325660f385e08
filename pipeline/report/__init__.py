"""The comparison report: every head × seed run of a comparison, from MLflow, summarised per setting.

    result = write_report("sqlite:///results/mlflow.db", parent_run_id, "results/report")

Source. The child runs of the comparison's parent run, read from the tracking store, never from files
beside the runs (``runs``). A child run that is not ``FINISHED`` (failed, killed, still running) is
listed as skipped with its status; of several finished runs of the same setting × head × seed (a job
run again under the same parent) the latest counts and the others are listed as skipped, superseded.
Every MLflow name is built and parsed by :mod:`pipeline.mlflow_names`.

Per run. head and seed (tags, else params), the head's ``HeadInfo`` (its tags: label, order, whether it
is the baseline), the setting (``setting_keys``, params; a missing one is "n/a"; the demo generator's
keys are "n/a" too when the config's ``samples`` names a sample sheet, since the demo settings did not
make that data), the final test metrics, and the localisation scores: the mean over the run's test
samples with witness cells of each sample's heatmap ``localisation_auroc`` and
``pointing_game_top{1,5}``, and of the same scores of the Grad-CAM map (``gradcam_localisation_auroc``,
``gradcam_pointing_game_top{1,5}``) (pipeline/heatmap logs them to the run; a run without them has
n/a there: NaN in the tables, not counted in n).

Settings and the x axis. The workflow passes the setting keys and the x axis from the config
(``columns.sweep_settings``: ``train.kind`` and every demo key a ``sweep`` entry sets; x ``report.x``,
or the numeric swept key with the most distinct values). By hand (``x_key="auto"``) the x axis is
chosen the same way (``columns.choose_x``) from the runs' values of ``setting_keys``.

Heads. Ordered by ``HeadInfo.sort_key()`` (declared order, then name) as the runs' tags record it; a
run logged before head tags existed has ``HeadInfo(name)`` defaults: it sorts after the declared heads
and is no baseline.

Baseline. Per setting, the head whose runs are tagged as the baseline (``HeadInfo.baseline``). Where
no head or several heads claim it, the report's notes say so and that setting has no paired rows.
``write_report(baseline=name)`` overrides the tags with one head for every setting (a setting without
that head then gets rows with n_pairs 0, "n too small").

Statistics (``statistics``). Per setting × head over seeds: n, mean, standard deviation and the 95 %
t-interval mean ± t(0.975, n − 1) · sd / √n of each metric (a run without the metric, e.g. a one-class
test split without sample AUROC, does not count in its n). With n = 1 the interval is undefined: NaN in
the tables, "undefined" in the text, never a made-up width. Paired comparison of each head against the
setting's baseline: over the seeds where both have the metric, the per-seed difference head − baseline,
its mean and 95 % t-interval; the verdict is "better" when the interval lies above 0, "worse" below,
"no evidence of a difference" when it contains 0, "n too small" with fewer than 2 pairs. No correction
for the number of comparisons is applied (the report says how many there are).

Outputs in ``out_dir`` (all plain files a Snakemake rule can mark with ``report(...)``):
  ``summary.tsv``: one row per setting × head with n, mean, sd and interval of every metric
    (``summary_columns``).
  ``paired.tsv``: one row per paired setting × head ≠ baseline × compared metric (``paired_columns``).
  ``runs.tsv``: every child run, counted or skipped (``skip_reason``).
  ``report.md``: the tables per setting, the paired verdicts and what the numbers do and do not show.
  ``metric_vs_<x>.png`` (``columns.plot_file``; ``metric_vs_witness_fraction.png``,
    ``metric_vs_cells_per_image.png``): mean ± interval against the x setting, a line per head, one
    panel per metric (a row of panels per combination of the other settings that vary, e.g. image
    modality or kind; log x when the values are positive and span 10× or more).
  ``heatmaps_side_by_side.png``: given ``heatmap_pngs`` ({head: PNG of one slide}), the heads side by side.
The same files are logged to the parent run, with summary metrics per setting × head and per paired
comparison (``parent.report_metrics``, named by ``mlflow_names.report_metric``).

Modules: ``columns`` (metrics, columns, setting names), ``runs`` (MLflow queries, head infos),
``statistics``, ``tables`` (the TSVs), ``markdown``, ``plots``, ``parent`` (logging back).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.files import atomic_write, outputs
from pipeline.report.columns import (
    CONFIDENCE,
    COST_METRICS,
    DEFAULT_SETTING_KEYS,
    FINAL_METRICS,
    INTERVAL_METRICS,
    LABELS,
    LOCALISATION_KEYS,
    METRIC_RANGE,
    NA,
    PAIRED_COLUMNS_TAIL,
    PAIRED_METRICS,
    VERDICTS,
    WITNESS_KEY,
    X_AUTO,
    axis_words,
    choose_x,
    paired_columns,
    plot_file,
    resolve_x,
    setting_label,
    setting_text,
    short_name,
    summary_columns,
    sweep_settings,
)
from pipeline.report.markdown import baseline_notes, interval_text, write_markdown
from pipeline.report.parent import log_to_parent, report_metrics
from pipeline.report.plots import metric_layout, plot_heatmaps, plot_metrics
from pipeline.report.runs import (
    _search_all as _search_all,  # re-exported: tests page through it
)
from pipeline.report.runs import (
    collect_runs,
    counted,
    head_infos,
    head_order,
    localisation_scores,
)
from pipeline.report.statistics import t_interval, verdict
from pipeline.report.tables import (
    paired_comparison,
    runs_table,
    setting_baselines,
    summarise,
)

__all__ = [
    "CONFIDENCE", "COST_METRICS", "DEFAULT_SETTING_KEYS", "FINAL_METRICS", "INTERVAL_METRICS", "LABELS",
    "LOCALISATION_KEYS", "METRIC_RANGE", "NA", "PAIRED_COLUMNS_TAIL", "PAIRED_METRICS", "VERDICTS", "WITNESS_KEY",
    "X_AUTO", "baseline_notes", "choose_x", "collect_runs", "head_infos", "head_order", "interval_text",
    "localisation_scores", "log_to_parent", "metric_layout", "paired_columns", "paired_comparison", "plot_file",
    "plot_heatmaps", "plot_metrics", "report_metrics", "resolve_x", "runs_table", "setting_baselines",
    "setting_label", "setting_text", "short_name", "summarise", "summary_columns", "sweep_settings", "t_interval",
    "verdict", "write_markdown", "write_report",
]

log = logging.getLogger("gapless.report")


def write_report(tracking_uri: str, parent_run_id: str, out_dir: str | Path = "results/report",
                 heatmap_pngs: Mapping[str, str | Path] | None = None,
                 setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS, experiment_id: str | None = None,
                 baseline: str | None = None, log_mlflow: bool = True, x_key: str = X_AUTO) -> dict:
    """Collect the comparison's runs from MLflow, write ``out_dir`` (package docstring) and log it to the parent.

    baseline: None to take each setting's baseline from the runs' head tags; a head name to pair every
    setting against that head instead. x_key: the setting on the metric plot's x axis (one of
    ``setting_keys``, or its short name), or "auto" (``columns.resolve_x``: from the runs' values).
    Returns ``{"paths": {name: Path}, "summary": DataFrame, "paired": DataFrame, "runs": DataFrame,
    "skipped": [run dicts], "x_key": the x axis}``.
    """
    setting_keys = tuple(setting_keys)
    out = Path(out_dir)
    if x_key not in (X_AUTO, "", None):  # a wrong x fails before the store is read
        try:
            x_key = resolve_x(x_key, setting_keys, {})
        except ValueError as exc:
            raise GaplessError(None, str(exc), "pass one of the setting keys (--setting-key) as --x, or auto") from None
    runs = collect_runs(tracking_uri, parent_run_id, setting_keys, experiment_id)
    if x_key in (X_AUTO, "", None):
        x_key = resolve_x(X_AUTO, setting_keys, {k: [r["setting"][i] for r in counted(runs)]
                                                 for i, k in enumerate(setting_keys)})
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to report
    infos = head_infos(runs)
    summary = summarise(runs, setting_keys)
    paired = paired_comparison(runs, setting_keys, baseline)
    table = runs_table(runs, setting_keys)
    baselines = head_order({c[0] for c in setting_baselines(runs, baseline).values() if len(c) == 1}, infos)
    paths = {}
    with outputs():  # the tables, plots and markdown appear together, or none of them
        for name, frame in (("summary", summary), ("paired", paired), ("runs", table)):
            paths[name] = out / f"{name}.tsv"
            atomic_write(paths[name], lambda tmp: frame.to_csv(tmp, sep="\t", index=False, na_rep="NaN", float_format="%.6g"))  # noqa: B023
        plot_name = f"metrics vs {axis_words(x_key)}"
        plots = {plot_name: plot_metrics(summary, out / plot_file(x_key), setting_keys, x_key,
                                         heads=head_order(summary["head"], infos))}
        paths["metric_plot"] = plots[plot_name]
        if heatmap_pngs:
            samples = {Path(p).stem for p in heatmap_pngs.values()}
            title = f"sample {samples.pop()}" if len(samples) == 1 else None
            paths["heatmaps"] = plots["heatmaps side by side"] = plot_heatmaps(
                heatmap_pngs, out / "heatmaps_side_by_side.png", title, heads=head_order(heatmap_pngs, infos))
        meta = {"tracking URI": tracking_uri, "comparison (parent) run": parent_run_id,
                "setting keys": ", ".join(setting_keys), "x axis": x_key, "baseline": ", ".join(baselines) or "none"}
        paths["markdown"] = write_markdown(out / "report.md", runs, summary, paired, setting_keys, meta, plots,
                                           baselines, baseline_notes(runs, setting_keys, baseline), x_key)
    if log_mlflow:
        log_to_parent(tracking_uri, parent_run_id, list(paths.values()), report_metrics(summary, paired))
    skipped = [r for r in runs if r["skip_reason"] is not None]
    for r in skipped:
        log.warning("report: skipped run %s (%s seed %s): %s", r["run_id"], r["head"], r["seed"], r["skip_reason"])
    return {"paths": paths, "summary": summary, "paired": paired, "runs": table, "skipped": skipped, "x_key": x_key}
