"""The comparison report: every head × seed run of a comparison, from MLflow, summarised per setting.

    result = write_report("sqlite:///results/mlflow.db", parent_run_id, "results/report")

Source. The child runs of the comparison's parent run, read from the tracking store, never from files
beside the runs (``runs``). A child run that is not ``FINISHED`` (failed, killed, still running) is
listed as skipped with its status; of several finished runs of the same level × setting × head × seed
(a job run again under the same parent) the latest counts and the others are listed as skipped,
superseded. Every MLflow name is built and parsed by :mod:`pipeline.mlflow_names`.

Levels. A run's level is its tag ``gapless.level`` (``mlflow_names.TAG_LEVEL``; no tag: ``tile``).
Everything below up to "Slide level" is the tile level's and counts tile-level runs only (``gapless
train``: a head over the cells of each tile or field); slide-level runs (``gapless train-slides``: a head
over each slide's tile embeddings, from slide labels alone) never enter those tables, that figure or
those verdicts. With no counted tile-level run (only slide-level runs) the tile tables are empty, the
tile figure says so, and the report's substance is the slide level's block.

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

Slide level (``slide``), only when the comparison has slide-level runs. Settings: the setting keys that
the slide-level runs carry (``train.kind`` is not logged by slide-level training, so it is left out; so
are the demo keys of a sample sheet's data; none left: one setting, "all runs"). Per setting × head over
seeds, with the same statistics, baseline rule and verdicts as above (``tables`` with
``level="slide"``): the slide AUROC (the run's ``test_auroc``: one prediction per test slide), the
balanced accuracy, and the localisation scores of the head's map over the tile grid (``heatmap/…``
logged by ``gapless heatmap-slides``; the mean over the run's test slides with witnesses, as above),
mean and 95 % t-interval, n; the slide AUROC, balanced accuracy and localisation AUROC paired against
the baseline (GAP) by seed. The block (at the end of ``report.md``) says the models were trained from
slide labels alone over each slide's tile embeddings, names the encoder where the runs' params
``encoder_{encoder,backbone,weights}`` record it, and gives a fixed line of published Camelyon16 slide
AUROCs (TransMIL paper, Table 1: mean pooling ≈ 0.47, max pooling ≈ 0.86, ABMIL ≈ 0.87), for
reference, not as a claim of equivalence. Its files:
  ``slide_summary.tsv`` (``summary_columns(keys, SLIDE_INTERVAL_METRICS, SLIDE_COST_METRICS)``),
  ``slide_paired.tsv`` (``paired_columns(keys)``), ``slide_runs.tsv`` (every slide-level run, counted or
  skipped), ``slide_level.png`` (the slide metrics per head, against the tile level's x axis where the
  slide level has that setting, else chosen the same way; one point per head with a single setting).

The same files are logged to the parent run, with summary metrics per setting × head and per paired
comparison (``parent.report_metrics``, named by ``mlflow_names.report_metric``; the slide level's
under ``report/slide_level/``).

Modules: ``columns`` (metrics, columns, setting names), ``runs`` (MLflow queries, head infos, levels),
``statistics``, ``tables`` (the TSVs), ``slide`` (the slide level's block), ``markdown``, ``plots``,
``parent`` (logging back).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.files import atomic_write, outputs
from pipeline.mlflow_names import LEVEL_SLIDE, LEVEL_TILE
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
    PUBLISHED_SLIDE_AUROCS,
    SLIDE_COST_METRICS,
    SLIDE_INTERVAL_METRICS,
    SLIDE_LABELS,
    SLIDE_PAIRED_METRICS,
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
from pipeline.report.markdown import (
    baseline_notes,
    interval_text,
    published_reference,
    slide_section,
    write_markdown,
)
from pipeline.report.parent import log_to_parent, report_metrics
from pipeline.report.plots import metric_layout, plot_heatmaps, plot_metrics
from pipeline.report.runs import (
    _search_all as _search_all,  # re-exported: tests page through it
)
from pipeline.report.runs import (
    at_level,
    collect_runs,
    counted,
    head_infos,
    head_order,
    localisation_scores,
)
from pipeline.report.slide import (
    SLIDE_PLOT,
    SLIDE_TABLES,
    SlideBlock,
    encoder_text,
    slide_block,
)
from pipeline.report.statistics import t_interval, verdict
from pipeline.report.tables import (
    paired_comparison,
    runs_table,
    setting_baselines,
    summarise,
)

__all__ = [
    "CONFIDENCE",
    "COST_METRICS",
    "DEFAULT_SETTING_KEYS",
    "FINAL_METRICS",
    "INTERVAL_METRICS",
    "LABELS",
    "LOCALISATION_KEYS",
    "METRIC_RANGE",
    "NA",
    "PAIRED_COLUMNS_TAIL",
    "PAIRED_METRICS",
    "PUBLISHED_SLIDE_AUROCS",
    "SLIDE_COST_METRICS",
    "SLIDE_INTERVAL_METRICS",
    "SLIDE_LABELS",
    "SLIDE_PAIRED_METRICS",
    "SLIDE_PLOT",
    "SLIDE_TABLES",
    "VERDICTS",
    "WITNESS_KEY",
    "X_AUTO",
    "SlideBlock",
    "at_level",
    "baseline_notes",
    "choose_x",
    "collect_runs",
    "encoder_text",
    "head_infos",
    "head_order",
    "interval_text",
    "localisation_scores",
    "log_to_parent",
    "metric_layout",
    "paired_columns",
    "paired_comparison",
    "plot_file",
    "plot_heatmaps",
    "plot_metrics",
    "published_reference",
    "report_metrics",
    "resolve_x",
    "runs_table",
    "setting_baselines",
    "setting_label",
    "setting_text",
    "short_name",
    "slide_block",
    "slide_section",
    "summarise",
    "summary_columns",
    "sweep_settings",
    "t_interval",
    "verdict",
    "write_markdown",
    "write_report",
]

log = logging.getLogger("gapless.report")


def _write_tsv(path: Path, frame) -> Path:
    """``frame`` as a TSV (NaN written as such, 6 significant digits), atomically."""
    atomic_write(path, lambda tmp: frame.to_csv(tmp, sep="\t", index=False, na_rep="NaN", float_format="%.6g"))
    return path


def write_report(tracking_uri: str, parent_run_id: str, out_dir: str | Path = "results/report",
                 heatmap_pngs: Mapping[str, str | Path] | None = None,
                 setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS, experiment_id: str | None = None,
                 baseline: str | None = None, log_mlflow: bool = True, x_key: str = X_AUTO) -> dict:
    """Collect the comparison's runs from MLflow, write ``out_dir`` (package docstring) and log it to the parent.

    baseline: None to take each setting's baseline from the runs' head tags; a head name to pair every
    setting against that head instead. x_key: the setting on the metric plot's x axis (one of
    ``setting_keys``, or its short name), or "auto" (``columns.resolve_x``: from the runs' values).
    Returns ``{"paths": {name: Path}, "summary": DataFrame, "paired": DataFrame, "runs": DataFrame,
    "skipped": [run dicts], "x_key": the x axis, "slide": SlideBlock or None}``: the tables, ``skipped``
    and the x axis of the tile level; ``slide`` the slide level's block (None without slide-level runs;
    its files under paths ``slide_summary``, ``slide_paired``, ``slide_runs``, ``slide_plot``).
    """
    setting_keys = tuple(setting_keys)
    out = Path(out_dir)
    if x_key not in (X_AUTO, "", None):  # a wrong x fails before the store is read
        try:
            x_key = resolve_x(x_key, setting_keys, {})
        except ValueError as exc:
            raise GaplessError(None, str(exc), "pass one of the setting keys (--setting-key) as --x, or auto") from None
    every = collect_runs(tracking_uri, parent_run_id, setting_keys, experiment_id)
    runs = at_level(every, LEVEL_TILE)  # the tile level's tables, plot and verdicts count these alone
    if x_key in (X_AUTO, "", None):
        x_key = resolve_x(X_AUTO, setting_keys, {k: [r["setting"][i] for r in counted(runs)]
                                                 for i, k in enumerate(setting_keys)})
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to report
    infos = head_infos(runs)
    summary = summarise(runs, setting_keys)
    paired = paired_comparison(runs, setting_keys, baseline)
    table = runs_table(runs, setting_keys)
    baselines = head_order({c[0] for c in setting_baselines(runs, baseline).values() if len(c) == 1}, infos)
    slide = slide_block(every, setting_keys, x_key, baseline)
    paths = {}
    with outputs():  # the tables, plots and markdown appear together, or none of them
        for name, frame in (("summary", summary), ("paired", paired), ("runs", table)):
            paths[name] = _write_tsv(out / f"{name}.tsv", frame)
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
        slide_plot = None
        if slide is not None:
            meta["levels"] = f"tile ({len(runs)} runs), slide ({len(slide.runs)} runs: see Slide level)"
            for name, frame in (("slide_summary", slide.summary), ("slide_paired", slide.paired),
                                ("slide_runs", slide.table)):
                paths[name] = _write_tsv(out / SLIDE_TABLES[name], frame)
            if len(slide.summary):
                slide_plot = paths["slide_plot"] = plot_metrics(
                    slide.summary, out / SLIDE_PLOT, slide.setting_keys, slide.x_key,
                    heads=head_order(slide.summary["head"], head_infos(slide.runs)), metrics=SLIDE_INTERVAL_METRICS,
                    title="slide level (trained from slide labels)")
        paths["markdown"] = write_markdown(out / "report.md", runs, summary, paired, setting_keys, meta, plots,
                                           baselines, baseline_notes(runs, setting_keys, baseline), x_key,
                                           slide, slide_plot)
    if log_mlflow:
        metrics = report_metrics(summary, paired)
        if slide is not None:
            metrics.update(report_metrics(slide.summary, slide.paired, LEVEL_SLIDE, SLIDE_INTERVAL_METRICS, SLIDE_COST_METRICS))
        log_to_parent(tracking_uri, parent_run_id, list(paths.values()), metrics)
    skipped = [r for r in runs if r["skip_reason"] is not None]
    for r in skipped:
        log.warning("report: skipped run %s (%s seed %s): %s", r["run_id"], r["head"], r["seed"], r["skip_reason"])
    for r in slide.skipped if slide is not None else ():
        log.warning("report: skipped slide-level run %s (%s seed %s): %s", r["run_id"], r["head"], r["seed"],
                    r["skip_reason"])
    return {"paths": paths, "summary": summary, "paired": paired, "runs": table, "skipped": skipped, "x_key": x_key,
            "slide": slide}
