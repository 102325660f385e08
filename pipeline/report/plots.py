"""The report's figures: each interval metric against the swept setting on the x axis (a line per head,
a row of panels per combination of the other settings that vary; the slide level's metrics the same
way in ``slide_level.png``), and one slide's heatmaps side by side (a panel per head). Heads appear in
the order they are given."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import GaplessError
from pipeline.files import atomic_write
from pipeline.report.columns import (
    DEFAULT_SETTING_KEYS,
    INTERVAL_METRICS,
    METRIC_RANGE,
    WITNESS_KEY,
    short_name,
    value_sort_key,
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


@dataclass
class _XAxis:
    """The x axis shared by every panel: a setting's values, numeric (linear or log) or categories."""

    column: str | None  # the summary column on x; None: no such setting, every head a dot at 0
    numeric: bool
    categories: list  # the distinct values, in value order
    values: list[float]  # every row's value when numeric
    log: bool
    span: float  # of the values (in decades when log)
    dodge: float  # how far apart heads are drawn at one x

    @classmethod
    def of(cls, summary, column: str | None) -> _XAxis:
        xs_all = summary[column].tolist() if column else ["all"]
        numeric = column is not None and all(_as_float(v) is not None for v in xs_all)
        values = [float(v) for v in xs_all] if numeric else []
        log = numeric and min(values) > 0 and max(values) / min(values) >= 10  # e.g. 0.001, 0.01, 0.1
        span = (np.log10(max(values) / min(values)) if log else max(values) - min(values)) if numeric else 0.0
        dodge = (span or (abs(values[0]) if values else 0.0) or 1.0) * 0.015 if numeric else 0.06
        return cls(column, numeric, sorted(set(xs_all), key=value_sort_key), values, log, span, dodge)

    def positions(self, rows) -> tuple:
        """The rows sorted along x, and their x positions."""
        if not self.column:
            return rows, np.zeros(len(rows))
        rows = rows.assign(_x=[float(v) if self.numeric else self.categories.index(v) for v in rows[self.column]])
        rows = rows.sort_values("_x")
        return rows, rows["_x"].to_numpy(float)

    def shifted(self, x: np.ndarray, i: int, n_heads: int) -> np.ndarray:
        """``x`` moved for the ``i``-th of ``n_heads`` heads: side by side, not on top of each other."""
        shift = (i - (n_heads - 1) / 2) * self.dodge
        return x * 10**shift if self.log else x + shift

    def format(self, ax) -> None:
        if not self.column:
            ax.set_xticks([])
            ax.set_xlim(-0.5, 0.5)
            return
        ax.set_xlabel(self.column.replace("_", " "), fontsize=8)
        if not self.numeric:
            ax.set_xticks(range(len(self.categories)), self.categories)
            ax.set_xlim(-0.5, len(self.categories) - 0.5)
            return
        if self.log:  # the same axis in every panel, ticked at the values the settings have
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xlim(min(self.values) / 10 ** (self.span * 0.12), max(self.values) * 10 ** (self.span * 0.12))
        else:
            pad = 0.12 * (self.span or abs(self.values[0]) or 1.0)
            ax.set_xlim(min(self.values) - pad, max(self.values) + pad)
        ax.set_xticks([float(c) for c in self.categories], [_tick_label(float(c), self.column) for c in self.categories])


def _draw_metric(ax, part, metric: str, heads: Sequence[str], colours: Mapping, axis: _XAxis) -> bool:
    """One panel: ``metric``'s mean ± interval per head along x. Returns whether anything was drawn."""
    drawn = False
    for i, head in enumerate(heads):
        h = part[(part["head"] == head) & (part[f"{metric}_n"] > 0)]
        if h.empty:
            continue
        h, x = axis.positions(h)
        x = axis.shifted(x, i, len(heads))
        y = h[f"{metric}_mean"].to_numpy(float)
        lo = (y - np.maximum(h[f"{metric}_ci_low"].to_numpy(float), METRIC_RANGE[0]))
        hi = (np.minimum(h[f"{metric}_ci_high"].to_numpy(float), METRIC_RANGE[1]) - y)
        err = np.vstack([np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=0.0)])
        ax.errorbar(x, y, yerr=err, color=colours[head], marker="o", ms=4, capsize=3, lw=1.2,
                    ls="-" if len(x) > 1 else "none", label=head)
        undefined = ~np.isfinite(lo)
        if undefined.any():  # one seed: no interval, drawn hollow
            ax.plot(x[undefined], y[undefined], "o", ms=7, mfc="white", mec=colours[head], zorder=3)
        drawn = True
    return drawn


@dataclass
class MetricLayout:
    """What the metric plot shows: the x axis, the other settings that vary (a row of panels per
    combination of their values, ``groups``), and the metrics (a panel each, three to a row)."""

    axis: _XAxis
    others: list[str]  # the summary columns of the other settings that take several values
    groups: list[tuple[tuple, object]]  # (their values, the summary rows) per combination, in summary order
    metrics: list[tuple[str, str]]  # (column stem, label): the interval metrics some row has

    @property
    def titles(self) -> list[str]:
        """Each row of panels' combination as text (``image_modality brightfield``); "" with one row."""
        return [", ".join(f"{k} {v}" for k, v in zip(self.others, key)) for key, _ in self.groups]


def metric_layout(summary, setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS, x_key: str | None = WITNESS_KEY,
                  metrics: Sequence[tuple[str, str]] = INTERVAL_METRICS) -> MetricLayout:
    """The metric plot's layout for ``summary``: ``x_key`` on x (no axis when it is no setting key: each
    head a dot), a row of panels per combination of the other settings that take several values (those
    with one value, e.g. the only kind, are constant across the plot), a panel per interval metric of
    ``metrics`` (the slide level's: ``SLIDE_INTERVAL_METRICS``) that some row has (every metric when none
    has any: the Grad-CAM scores of older runs are left out)."""
    axis = _XAxis.of(summary, short_name(x_key) if x_key in setting_keys else None)
    others = [short_name(k) for k in setting_keys
              if k != x_key and summary[short_name(k)].astype(str).nunique() > 1]
    groups = summary.groupby(others, sort=False, dropna=False) if others else [((), summary)]
    groups = [(g if isinstance(g, tuple) else (g,), part) for g, part in groups]
    shown = [(m, label) for m, label in metrics if (summary[f"{m}_n"] > 0).any()] or list(metrics)
    return MetricLayout(axis, others, groups, shown)


def _no_data(path: Path, text: str) -> Path:
    """A small figure that says there is nothing to plot (the workflow's outputs exist all the same)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.0, 1.2))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_axis_off()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_metrics(summary, path: Path, setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
                 x_key: str | None = WITNESS_KEY, heads: Sequence[str] | None = None,
                 metrics: Sequence[tuple[str, str]] = INTERVAL_METRICS, title: str | None = None) -> Path:
    """Each interval metric against ``x_key`` (the swept setting): mean ± 95 % interval, a line per head.

    ``metric_layout``: a panel per metric (three to a row), a row of panels per combination of the
    other settings that vary (e.g. image modality, kind). The x axis is logarithmic when its values are
    positive and span 10× or more (cells per image 16 … 1024), categorical when they are not numbers. A
    head with one seed at a point shows the mean without a bar (its interval is undefined). With one x
    value each head is a dot (with its bar), side by side. ``heads``: the legend's order (default: as
    the summary lists them). ``metrics``: the panels (the slide level's: ``SLIDE_INTERVAL_METRICS``);
    ``title``: above the legend. An empty summary (no runs at this level) gives a figure that says so.
    """
    if not len(summary):
        return _no_data(path, "no runs to plot")
    plt = _pyplot()
    layout = metric_layout(summary, setting_keys, x_key, metrics)
    axis, metrics = layout.axis, layout.metrics
    heads = list(heads) if heads is not None else list(dict.fromkeys(summary["head"]))
    colours = {h: plt.get_cmap("tab10")(i % 10) for i, h in enumerate(heads)}
    cols = 3  # metrics wrap onto rows of three panels, per group of the other settings
    per_group = math.ceil(len(metrics) / cols)
    n_groups = len(layout.groups)
    fig, axes = plt.subplots(n_groups * per_group, cols, figsize=(3.6 * cols, 2.8 * n_groups * per_group + 0.7),
                             squeeze=False, layout="constrained")
    for g, ((_, part), row_title) in enumerate(zip(layout.groups, layout.titles)):
        for j, (m, label) in enumerate(metrics):
            ax = axes[g * per_group + j // cols, j % cols]
            if not _draw_metric(ax, part, m, heads, colours, axis):
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
            ax.set_title(f"{label}" + (f"\n{row_title}" if row_title else ""), fontsize=9)
            axis.format(ax)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for j in range(len(metrics), per_group * cols):
            axes[g * per_group + j // cols, j % cols].set_axis_off()
    handles = [plt.Line2D([], [], color=colours[h], marker="o", label=h) for h in heads]
    handles.append(plt.Line2D([], [], color="0.3", marker="o", mfc="white", ls="none", label="one seed: no interval"))
    legend_title = "mean ± 95 % t-interval over seeds"
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8, frameon=False,
               title=f"{title}: {legend_title}" if title else legend_title, title_fontsize=8)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_heatmaps(heatmap_pngs: Mapping[str, str | Path], path: Path, title: str | None = None,
                  heads: Sequence[str] | None = None) -> Path:
    """The heatmap PNGs of one slide, one per head, side by side with the head names.

    ``heads``: the panels' order (default: as ``heatmap_pngs`` lists them); each must have a PNG.
    """
    from PIL import Image

    plt = _pyplot()
    items = [(h, Path(heatmap_pngs[h])) for h in (heads if heads is not None else heatmap_pngs)]
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
