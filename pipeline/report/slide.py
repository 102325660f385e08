"""The report's slide-level block: the comparison's slide-level runs (tag ``gapless.level = slide``, from
``gapless train-slides``: a registered head over each slide's tile embeddings on its tile grid, trained
from slide labels alone) summarised in their own tables and figure, apart from the tile level's.

Settings. The report's setting keys that the slide-level runs carry: a key that no counted slide-level
run has (``train.kind``, which slide-level training does not log; the demo keys where a sample sheet
made the data) is left out instead of making every row "n/a"; with no key left, all slide-level runs
are one setting ("all runs"). The x axis of ``slide_level.png``: the tile level's when the slide level
has that key, else chosen the same way (``columns.resolve_x``) from the slide-level runs' values; none
when no key is left (each head one point with its interval).

Metrics (``columns.SLIDE_*``). Per run: the slide AUROC (``test_auroc``: one prediction per test
slide), the balanced accuracy, and the localisation scores of the head's map over the tile grid
(``heatmap/<sample>/…``, logged to the run by ``gapless heatmap-slides``), each the mean over the run's
test slides with witnesses, as at the tile level (``runs.localisation_scores``). Per setting × head
over seeds: n, mean, sd and 95 % t-interval; each head against the setting's baseline (the head its
runs' tags call the baseline, GAP), paired by seed: the same ``tables`` functions, statistics and
verdicts as the tile level.

Encoder. What made the embeddings, from the runs' ``encoder_{encoder,backbone,weights}`` params
(``encoder_text``): named in the block when the runs carry it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.mlflow_names import LEVEL_SLIDE
from pipeline.report.columns import (
    NA,
    SLIDE_COST_METRICS,
    SLIDE_INTERVAL_METRICS,
    SLIDE_PAIRED_METRICS,
    X_AUTO,
    resolve_x,
    short_name,
)
from pipeline.report.runs import at_level, counted, head_infos, head_order
from pipeline.report.tables import (
    paired_comparison,
    runs_table,
    setting_baselines,
    summarise,
)

SLIDE_PLOT = "slide_level.png"
SLIDE_TABLES = {"slide_summary": "slide_summary.tsv", "slide_paired": "slide_paired.tsv", "slide_runs": "slide_runs.tsv"}


@dataclass
class SlideBlock:
    """The slide level of one report: its runs and settings, the tables, the baselines and the encoder."""

    runs: list[dict]  # the slide-level runs, counted or skipped, their settings cut to ``setting_keys``
    setting_keys: tuple[str, ...]  # the report's keys that the slide-level runs carry
    left_out: tuple[str, ...]  # the report's keys that none of them carries
    x_key: str | None  # the figure's x axis; None: each head one point
    summary: object  # DataFrame, ``slide_summary.tsv``
    paired: object  # DataFrame, ``slide_paired.tsv``
    table: object  # DataFrame, ``slide_runs.tsv``
    baselines: list[str] = field(default_factory=list)  # the heads the paired rows compare with, in head order
    encoder: str | None = None  # ``encoder_text`` of the counted runs
    baseline: str | None = None  # the baseline given by hand (``write_report(baseline=…)``), else None: the tags

    @property
    def skipped(self) -> list[dict]:
        return [r for r in self.runs if r["skip_reason"] is not None]


def _cut(run: dict, setting_keys: Sequence[str], keys: Sequence[str]) -> dict:
    """``run`` with its setting (and the settings by short name) cut to ``keys``."""
    value = dict(zip(setting_keys, run["setting"]))
    out = {k: v for k, v in run.items() if k not in {short_name(s) for s in setting_keys}}
    out["setting"] = tuple(value[k] for k in keys)
    out.update({short_name(k): value[k] for k in keys})
    return out


def slide_settings(runs: Sequence[dict], setting_keys: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(kept, left_out)``: the setting keys some counted slide-level run has a value of, and the others."""
    rows = counted(at_level(runs, LEVEL_SLIDE))
    kept = tuple(k for i, k in enumerate(setting_keys) if any(r["setting"][i] != NA for r in rows))
    return kept, tuple(k for k in setting_keys if k not in kept)


def slide_x(runs: Sequence[dict], setting_keys: Sequence[str], x_key: str | None) -> str | None:
    """The slide-level figure's x axis: ``x_key`` when the slide level has it, else ``resolve_x`` (auto)
    over ``setting_keys`` with the counted runs' values; None without setting keys."""
    if not setting_keys:
        return None
    if x_key in setting_keys:
        return x_key
    values = {k: [r["setting"][i] for r in counted(runs)] for i, k in enumerate(setting_keys)}
    return resolve_x(X_AUTO, setting_keys, values)


def _clean(value) -> str | None:
    return None if value in (None, "", "None", "null") else str(value)


def encoder_text(runs: Sequence[dict]) -> str | None:
    """What encoded the counted runs' embeddings, for a sentence (``resnet10t (timm, weights random-init)``;
    a weights file by its name; a trained gapless run's backbone: ``resnet10t (the backbone of a
    tile-level gapless run)``), several joined with "; "; None when no run records it."""
    seen = []
    for r in counted(runs):
        enc = r.get("encoder") or {}
        kind, backbone, weights = (_clean(enc.get(k)) for k in ("encoder", "backbone", "weights"))
        if not (kind or backbone):
            continue
        if kind == "model":
            text = f"{backbone or 'a backbone'} (the backbone of a tile-level gapless run)"
        else:
            detail = ", ".join(x for x in (kind, f"weights {Path(weights).name}" if weights else None) if x)
            text = f"{backbone or 'an encoder'}" + (f" ({detail})" if detail else "")
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) or None


def slide_block(runs: Sequence[dict], setting_keys: Sequence[str], x_key: str | None = None,
                baseline: str | None = None) -> SlideBlock | None:
    """The slide level of the comparison's runs (``collect_runs``), or None when it has no slide-level run.

    ``setting_keys``, ``x_key``: the report's (the tile level's); ``baseline``: as ``write_report``'s
    (None: each setting's baseline from the runs' head tags).
    """
    slide = at_level(runs, LEVEL_SLIDE)
    if not slide:
        return None
    keys, left_out = slide_settings(runs, setting_keys)
    cut = [_cut(r, setting_keys, keys) for r in slide]
    summary = summarise(cut, keys, LEVEL_SLIDE, SLIDE_INTERVAL_METRICS, SLIDE_COST_METRICS)
    paired = paired_comparison(cut, keys, baseline, SLIDE_PAIRED_METRICS, LEVEL_SLIDE)
    claims = setting_baselines(cut, baseline, LEVEL_SLIDE).values()
    baselines = head_order({c[0] for c in claims if len(c) == 1}, head_infos(cut))
    return SlideBlock(cut, keys, left_out, slide_x(cut, keys, x_key) if counted(cut) else None, summary, paired,
                      runs_table(cut, keys, LEVEL_SLIDE), baselines, encoder_text(cut), baseline)
