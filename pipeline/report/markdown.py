"""``report.md``: the sources, notes on the runs' head tags, what the numbers do and do not show (each
sentence computed from the tables), the table per setting, the paired verdicts, the skipped runs; then,
where the comparison has slide-level runs, the "Slide level" block (``slide_section``) with the same
parts for them, what trained them and published slide AUROCs for reference."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.files import atomic_write_text
from pipeline.mlflow_names import LEVEL_TILE
from pipeline.report.columns import (
    COST_METRICS,
    INTERVAL_METRICS,
    LABELS,
    METRIC_RANGE,
    PUBLISHED_SLIDE_AUROCS,
    PUBLISHED_SOURCE,
    SLIDE_COST_METRICS,
    SLIDE_INTERVAL_METRICS,
    SLIDE_LABELS,
    VERDICTS,
    as_number,
    axis_words,
    setting_text,
    short_name,
    value_sort_key,
)
from pipeline.report.runs import counted, head_tag_conflicts
from pipeline.report.statistics import t_quantile
from pipeline.report.tables import setting_baselines


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
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def _row_setting(row, setting_keys: Sequence[str]) -> str:
    """The setting of a summary or paired row, for people (``kind slide, witness_fraction 0.05, …``)."""
    return setting_text([row[short_name(k)] for k in setting_keys], setting_keys)


def _against(baselines: Sequence[str]) -> str:
    """The baseline(s) the paired rows compare with, for a sentence: ``gap``, ``gap / max``."""
    return " / ".join(baselines) or "the baseline"


UNTAGGED = "runs trained before gapless logged each head's tags carry none"  # why no head may claim the baseline


def baseline_notes(runs, setting_keys: Sequence[str], baseline: str | None = None,
                   level: str | None = LEVEL_TILE, untagged: str = UNTAGGED) -> list[str]:
    """Sentences on how each setting's baseline was decided where it is not simply the one tagged head:
    heads whose runs disagree on their tags, an override, settings with no or several tagged baselines
    (of the runs at ``level``; ``untagged``: why a setting may have no tagged baseline, in brackets)."""
    from pipeline.report.runs import at_level

    runs = at_level(runs, level)
    out = []
    for head, versions in head_tag_conflicts(runs).items():
        shown = "; ".join(f"label {v.shown!r}, order {v.order}, baseline {v.baseline}" for v in versions)
        out.append(f"The runs of {head} carry different head tags ({shown}); the latest run's are used.")
    if baseline is not None:
        return out + [f"The baseline {baseline} was given by hand, for every setting, instead of the runs' head tags."]
    for setting, claims in setting_baselines(runs, level=None).items():
        where = setting_text(setting, setting_keys) if setting_keys else "any run"
        if not claims:
            out.append(f"No head at {where} is tagged as the baseline ({untagged}), so that setting has no "
                       f"paired comparison.")
        elif len(claims) > 1:
            heads = f"{', '.join(claims[:-1])} and {claims[-1]}"
            out.append(f"{heads} are each tagged as the baseline at {where}, so that setting has "
                       f"no paired comparison (give write_report one baseline to choose).")
    return out


def _seed_findings(runs, summary, setting_keys: Sequence[str], metrics: Sequence[tuple[str, str]] = INTERVAL_METRICS,
                   labels: Mapping[str, str] = LABELS) -> list[str]:
    """How many runs and seeds there are and what that means for the intervals (``metrics``, ``labels``:
    the level's, e.g. the slide level's ``SLIDE_INTERVAL_METRICS`` where ``test_auroc`` is the slide AUROC)."""
    out = []
    n = summary["n_seeds"]
    seeds = f"{n.min()} to {n.max()}" if n.min() != n.max() else f"{n.min()}"
    out.append(f"{len(counted(runs))} finished runs in {summary['setting'].nunique()} setting(s) and "
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
        text = (f"The widest {labels['test_auroc']} interval is {widths[i]:.3f} wide ({summary.loc[i, 'head']} at "
                f"{_row_setting(summary.loc[i], setting_keys)}, {k} seeds). With {most} seeds an interval's "
                f"half-width is t(0.975, {most - 1}) = {t_quantile(most):.2f} standard errors")
        if most <= 5:
            text += "; with so few seeds the intervals are wide and only large, consistent differences are resolved"
        out.append(text + ".")
    aurocs = [m for m, _ in metrics if "auroc" in m]
    past = sum(int(((summary[f"{m}_ci_high"] > 1) | (summary[f"{m}_ci_low"] < 0)).sum()) for m in aurocs)
    if past:
        out.append(f"{past} AUROC interval(s) reach past 0 or 1: the t-interval does not know that AUROC is bounded, "
                   f"another sign that there are too few seeds for a precise estimate (the tables and plots show "
                   f"them cut at 0 and 1).")
    return out


def _paired_findings(paired, baselines: Sequence[str], setting_keys: Sequence[str],
                     labels: Mapping[str, str] = LABELS) -> list[str]:
    """The paired verdicts counted, the decided ones spelled out, and what the undecided ones mean."""
    if not len(paired):
        if baselines:
            return [f"There is no paired comparison: no head other than {_against(baselines)} shares a setting with it."]
        return ["There is no paired comparison: no setting has exactly one head tagged as the baseline."]
    against = _against(baselines)
    out = []
    flat = paired[(paired["n_pairs"] >= 2) & (paired["sd_diff"].abs() <= 1e-12)]
    if len(flat):
        out.append(f"{len(flat)} paired difference(s) are identical on every seed (zero spread), so their interval "
                   f"has zero width; with so few seeds this says the seeds agreed, not that the difference is exact.")
    counts = Counter(paired["verdict"])
    parts = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    out.append(f"Paired against {against} by seed: {len(paired)} comparisons ({parts}).")
    for _, r in paired[paired["verdict"].isin(["better", "worse"])].iterrows():
        diff = interval_text(r["n_pairs"], r["mean_diff"], r["ci_low"], r["ci_high"], signed=True)
        out.append(f"Backed by the numbers: {r['head']} is {r['verdict']} than {r['baseline']} on {labels[r['metric']]} "
                   f"at {_row_setting(r, setting_keys)} (difference {diff}, {r['n_pairs']} seeds).")
    undecided = int(counts["no evidence of a difference"])
    if undecided:
        out.append(f"{undecided} comparison(s) show no evidence of a difference: their interval contains 0, so a "
                   f"claim that one head beats the other there is refused — and neither is it shown that they are "
                   f"equal; more seeds narrow the interval.")
    if counts["n too small"]:
        out.append(f"{counts['n too small']} comparison(s) have fewer than 2 seeds shared with {against} "
                   f"(or lack {against} or the metric) and decide nothing.")
    tested = int(sum(counts[v] for v in VERDICTS[:3]))
    if tested:
        out.append(f"No correction for multiple comparisons is applied: of {tested} comparisons at 95 %, about "
                   f"{0.05 * tested:.1f} would come out 'better' or 'worse' by chance alone if no head differed.")
    return out


def _axis_findings(summary, setting_keys: Sequence[str], x_key: str | None) -> list[str]:
    """What the metric plot puts on its x axis, and what else varies (its rows of panels)."""
    if x_key is None or x_key not in setting_keys:
        return []
    column = short_name(x_key)
    values = sorted(summary[column].astype(str).unique(), key=value_sort_key)
    numbers = [as_number(v) for v in values]
    scale = ""
    if all(n is not None for n in numbers) and min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
        scale = ", on a log scale"
    others = [short_name(k) for k in setting_keys if k != x_key and summary[short_name(k)].astype(str).nunique() > 1]
    text = (f"The figure puts {axis_words(x_key)} on its x axis ({', '.join(values)}{scale}): each metric's mean "
            f"and 95 % interval over seeds, a line per head")
    if others:
        text += f"; {', '.join(others)} vary too, so it has a row of panels per combination of their values"
    return [text + "."]


def _localisation_findings(runs) -> list[str]:
    """Which runs have localisation scores (the head's maps', Grad-CAM's), and over which samples."""
    loc = [r for r in counted(runs) if r["localisation_auroc"] is not None]
    if not loc:
        out = [("No run has localisation scores (no heatmaps with witness annotations were logged), so the "
                "localisation and pointing-game columns (the heads' maps' and Grad-CAM's) are empty (NaN in "
                "summary.tsv, left out of the tables here).")]
    else:
        samples = [r["heatmap_samples"] for r in loc]
        out = [f"Localisation scores exist for {len(loc)} of {len(counted(runs))} runs, each the mean over "
               f"{min(samples) if min(samples) == max(samples) else f'{min(samples)}–{max(samples)}'} "
               f"sample(s) with witness cells"
               + (" in the run's test split (slides the head did not train on)."
                  if all(r.get("localisation_on") == "test split" for r in loc)
                  else ", over every sample its heatmaps were scored on (some runs logged no test split, "
                       "so training slides count there too).")]
    gradcam = [r for r in counted(runs) if r.get("gradcam_localisation_auroc") is not None]
    if loc and not gradcam:
        out.append("No run has Grad-CAM localisation scores (heatmaps logged before Grad-CAM was scored): n/a "
                   "(NaN in summary.tsv, left out of the tables, the figure and the paired comparison).")
    elif gradcam and len(gradcam) < len(counted(runs)):
        out.append(f"Grad-CAM localisation scores exist for {len(gradcam)} of {len(counted(runs))} runs; the others "
                   f"are n/a (not counted in the Grad-CAM columns' n).")
    return out


def _summary_tables(summary, setting_keys: Sequence[str], metrics: Sequence[tuple[str, str]] = INTERVAL_METRICS,
                    costs: Sequence[tuple[str, str]] = COST_METRICS, depth: int = 2,
                    table: str = "summary.tsv") -> list[str]:
    """A table per setting: each head's mean [interval] of every metric and its costs (``depth``: the
    heading level, 3 inside the slide-level block)."""
    note = ("Every metric here lies in [0, 1]; an interval that reaches past that is shown cut at 0 or 1 "
            f"(`{table}` keeps the t-interval as computed).")
    lines = [f"{'#' * depth} Per setting (mean [95 % t-interval] over seeds)", "", note, ""]
    # a metric no row has (e.g. Grad-CAM scores of older runs) is left out here; summary.tsv keeps it, NaN
    metrics = [(m, label) for m, label in metrics if (summary[f"{m}_n"] > 0).any()]
    header = ["head", "seeds"] + [label for _, label in metrics] + [label for _, label in costs]
    for setting in summary["setting"].unique():
        part = summary[summary["setting"] == setting]
        lines += [f"{'#' * (depth + 1)} {_row_setting(part.iloc[0], setting_keys)}", ""]
        rows = []
        for _, r in part.iterrows():
            cells = [r["head"], f"{r['n_seeds']} ({r['seeds']})"]
            cells += [interval_text(int(r[f"{m}_n"]), r[f"{m}_mean"], r[f"{m}_ci_low"], r[f"{m}_ci_high"], int(r["n_seeds"]),
                                    bounds=METRIC_RANGE) for m, _ in metrics]
            cells += [_cost(r[f"{c}_mean"]) for c, _ in costs]
            rows.append(cells)
        lines += _md_table(header, rows) + [""]
    return lines


def _paired_tables(paired, baselines: Sequence[str], setting_keys: Sequence[str], labels: Mapping[str, str] = LABELS,
                   depth: int = 2) -> list[str]:
    """A table per paired setting: each head's difference from the setting's baseline, with the verdict."""
    h = "#" * depth
    if len(baselines) == 1:
        lines = [f"{h} Paired against {baselines[0]} (difference head − {baselines[0]}, paired by seed)", ""]
    else:
        lines = [f"{h} Paired against each setting's baseline (difference head − baseline, paired by seed)", ""]
    if not len(paired):
        if baselines:
            return lines + [f"No head shares a setting with {_against(baselines)}.", ""]
        return lines + ["No setting has exactly one head tagged as the baseline (see the notes above).", ""]
    for setting in paired["setting"].unique():
        part = paired[paired["setting"] == setting]
        lines += [f"{h}# {_row_setting(part.iloc[0], setting_keys)}", ""]
        rows = [[r["head"], labels[r["metric"]], f"{r['n_pairs']} ({r['seeds'] or '–'})",
                 _num(r["head_mean"]), _num(r["baseline_mean"]),
                 interval_text(int(r["n_pairs"]), r["mean_diff"], r["ci_low"], r["ci_high"], signed=True), r["verdict"]]
                for _, r in part.iterrows()]
        lines += _md_table(["head", "metric", "seeds paired", "head mean", f"{part['baseline'].iloc[0]} mean",
                            "difference [95 % CI]", "verdict"], rows) + [""]
    return lines


def _skipped_table(runs, setting_keys: Sequence[str], title: str = "## Skipped runs") -> list[str]:
    skipped = [r for r in runs if r["skip_reason"] is not None]
    lines = [title, ""]
    if skipped:
        lines += _md_table(["run", "name", "head", "seed", "setting", "reason"],
                           [[r["run_id"], r["run_name"], r["head"], r["seed"], setting_text(r["setting"], setting_keys),
                             r["skip_reason"]] for r in skipped])
    else:
        lines.append("None: every child run finished and counts.")
    return lines + [""]


def _slide_localisation_findings(runs) -> list[str]:
    """Which slide-level runs have localisation scores (their maps over the tile grid), over which slides."""
    rows = counted(runs)
    loc = [r for r in rows if r["localisation_auroc"] is not None]
    if not loc:
        return [("No slide-level run has localisation scores (no slide-level heatmaps with witness annotations were "
                 "logged to them, `gapless heatmap-slides`), so the localisation and pointing-game columns are empty "
                 "(NaN in slide_summary.tsv, left out of the tables here).")]
    samples = [r["heatmap_samples"] for r in loc]
    where = (" in the run's test split (slides the head did not train on)"
             if all(r.get("localisation_on") == "test split" for r in loc)
             else ", over every slide its maps were scored on (some runs logged no test split)")
    counts = f"{min(samples)}" if min(samples) == max(samples) else f"{min(samples)}–{max(samples)}"
    text = (f"Localisation scores exist for {len(loc)} of {len(rows)} slide-level runs, each the mean over {counts} "
            f"slide(s) with witness annotations{where}, of the head's map over the tile grid; training never saw "
            f"the annotations.")
    return [text]


def published_reference() -> str:
    """The fixed line of published slide AUROCs, for reference only."""
    values = ", ".join(f"{name} ≈ {auroc:.2f}" for name, auroc in PUBLISHED_SLIDE_AUROCS)
    return (f"For reference, not a claim of equivalence: published slide AUROCs on {PUBLISHED_SOURCE}: {values}. "
            f"Those are other slides, another encoder, other splits and training; the runs here are not "
            f"evaluated on Camelyon16.")


def slide_section(block, plot: Path | None = None) -> list[str]:
    """The "Slide level" block of ``report.md`` for a ``slide.SlideBlock``: what trained the models (the
    encoder where the runs record it), published slide AUROCs for reference, findings, the table per
    setting, the paired verdicts against the baseline, skipped slide-level runs and the figure."""
    runs, keys = block.runs, block.setting_keys
    encoder = f" (encoder: {block.encoder})" if block.encoder else ""
    trained = (f"These models were trained from slide labels alone, over each slide's tile embeddings{encoder}: a "
               f"registered head pools the embeddings laid on the slide's tile grid; no tile label and no annotation "
               f"reaches training. Their slide AUROC is the AUROC of one prediction per slide over each run's test "
               f"slides, not the tile level's tile AUROC.")
    lines = ["## Slide level", "", trained, "", published_reference(), ""]
    if not counted(runs):
        lines += [f"None of the {len(runs)} slide-level runs finished, so there is nothing to summarise.", ""]
        return lines + _skipped_table(runs, keys, "### Skipped slide-level runs")
    findings = []
    if block.left_out:
        words = ", ".join(short_name(k) for k in block.left_out)
        findings.append(f"No slide-level run records {words}, so the slide level's settings leave "
                        f"{'it' if len(block.left_out) == 1 else 'them'} out"
                        + ("; all slide-level runs are one setting." if not keys else "."))
    findings += baseline_notes(runs, keys, block.baseline, level=None,
                               untagged="no slide-level run of the baseline head counts there")
    findings += _seed_findings(runs, block.summary, keys, SLIDE_INTERVAL_METRICS, SLIDE_LABELS)
    findings += _paired_findings(block.paired, block.baselines, keys, SLIDE_LABELS)
    findings += _slide_localisation_findings(runs)
    lines += [f"- {s}" for s in findings] + [""]
    lines += _summary_tables(block.summary, keys, SLIDE_INTERVAL_METRICS, SLIDE_COST_METRICS, depth=3,
                             table="slide_summary.tsv")
    lines += _paired_tables(block.paired, block.baselines, keys, SLIDE_LABELS, depth=3)
    if block.skipped:
        lines += _skipped_table(runs, keys, "### Skipped slide-level runs")
    if plot is not None:
        lines += [f"![slide level]({Path(plot).name})", ""]
    return lines


def write_markdown(path: Path, runs, summary, paired, setting_keys: Sequence[str], meta: Mapping[str, str],
                   plots: Mapping[str, Path], baselines: Sequence[str] = (), notes: Sequence[str] = (),
                   x_key: str | None = None, slide=None, slide_plot: Path | None = None) -> Path:
    """``report.md``: sources, notes and findings, the table per setting, the paired verdicts, skipped runs.

    runs: the tile-level runs (the slide level's are in ``slide``); baselines: the heads the paired rows
    compare with (one per paired setting, each once, in head order); notes: sentences put before the
    findings (``baseline_notes``); x_key: the setting on the metric plot's x axis (a finding names it);
    slide: the ``slide.SlideBlock`` (None: no slide-level runs, no block), with its figure ``slide_plot``.
    """
    lines = ["# Head comparison", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()] + [""]
    if len(summary):
        findings = (list(notes) + _seed_findings(runs, summary, setting_keys)
                    + _paired_findings(paired, baselines, setting_keys) + _localisation_findings(runs)
                    + _axis_findings(summary, setting_keys, x_key))
    else:  # only slide-level runs count
        which = f"none of its {len(runs)} tile-level run(s) finished" if runs else "it has no tile-level runs"
        findings = [(f"No tile-level run counts in this comparison ({which}), so the tile-level tables (summary.tsv, "
                     f"paired.tsv) are empty; the slide level is below.")]
    lines += ["## What the numbers show and do not show", ""] + [f"- {s}" for s in findings] + [""]
    if len(summary):
        lines += _summary_tables(summary, setting_keys)
        lines += _paired_tables(paired, baselines, setting_keys)
    lines += _skipped_table(runs, setting_keys)
    if plots:
        lines += ["## Figures", ""] + [f"![{name}]({p.name})" for name, p in plots.items()] + [""]
    if slide is not None:
        lines += slide_section(slide, slide_plot)
    atomic_write_text(path, "\n".join(lines))
    return path
