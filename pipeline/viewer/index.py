"""The index page: every sample page linked, with a table of each head's scores per sample.

Heads are columns in their declared order and words (``head_info`` of the page summaries,
:mod:`pipeline.viewer.summary`); the best head per metric and sample is in bold; the last row is the
mean over the samples that have the score.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.errors import GaplessError
from pipeline.files import atomic_write_text
from pipeline.head_info import HeadInfo
from pipeline.heatmap.document import is_number
from pipeline.viewer.summary import read_page_summary
from pipeline.viewer.templating import copy_assets, format_value, page_head, rel_url


@dataclass
class IndexRow:
    """One sample of the index: its page, scores per head, details (info) and thumbnail."""

    sample: str
    page: Path
    heads: dict[str, dict]
    info: dict
    thumbnail: str | None


@dataclass
class IndexColumns:
    """The table's columns: info keys, then each head (in display order) with its metrics."""

    info: list[str]
    heads: list[HeadInfo]
    metrics: dict[str, list[str]]  # head name -> its metrics, sorted

    @property
    def all_metrics(self) -> list[str]:
        return sorted({m for ms in self.metrics.values() for m in ms})


def write_index(
    out_html: str | Path,
    pages: Iterable[tuple[str, str | Path, dict | None]],
    title: str = "gapless heatmaps",
) -> Path:
    """Write the index page linking every sample page, with a table of each head's scores.

    ``pages``: (sample_id, page_path, summary) with the summary :func:`write_sample_page` returned
    (or a bare ``{head: {metric: value}}``). The best head per metric and sample is in bold; the last
    row is the mean over samples.
    """
    out_html = Path(out_html)
    index_dir = out_html.parent
    rows, infos = index_rows(out_html, pages)
    move_shared_counts(rows)
    columns = index_columns(rows, infos)
    page = index_html(title, len(rows), scores_table(rows, columns, index_dir), heads_legend(columns.heads))
    copy_assets(index_dir)
    atomic_write_text(out_html, page)
    return out_html


def index_rows(out_html: Path, pages) -> tuple[list[IndexRow], dict[str, HeadInfo]]:
    """The checked rows (each page exists, each sample once) and each head's ``HeadInfo`` (the first
    summary that names the head decides)."""
    rows: list[IndexRow] = []
    infos: dict[str, HeadInfo] = {}
    seen = set()
    for entry in pages:
        try:
            sample_id, page_path, summary = entry
        except (TypeError, ValueError):
            raise GaplessError(out_html, f"an index entry must be (sample_id, page_path, summary), got {entry!r}",
                               "pass the triples of the written sample pages") from None
        page_path = Path(page_path)
        if not page_path.is_file():
            raise GaplessError(page_path, f"the page of sample {sample_id!r} does not exist",
                               "write the sample pages (gapless page) before the index")
        if sample_id in seen:
            raise GaplessError(page_path, f"sample {sample_id!r} listed twice", "list each sample once")
        seen.add(sample_id)
        heads, head_infos, info, thumb = read_page_summary(summary)
        for name, head_info in head_infos.items():
            infos.setdefault(name, head_info)
        rows.append(IndexRow(str(sample_id), page_path, heads, info, thumb))
    return rows, infos


def move_shared_counts(rows: list[IndexRow]) -> None:
    """A count every head of a sample reports alike (e.g. witness_cells) is the sample's: moved from the
    heads' scores to the row's info, shown once."""
    candidates = {m for r in rows for h in r.heads.values() for m, v in h.items() if isinstance(v, int) and not isinstance(v, bool)}
    shared = set()
    for m in sorted(candidates):
        if all(len({h[m] for h in r.heads.values() if m in h}) <= 1 and all(isinstance(h[m], int) for h in r.heads.values() if m in h)
               for r in rows):
            shared.add(m)
    for r in rows:
        for m in sorted(shared):
            value = next((h[m] for h in r.heads.values() if m in h), None)
            if value is not None:
                r.info.setdefault(m.replace("_", " "), value)
            for h in r.heads.values():
                h.pop(m, None)


def index_columns(rows: list[IndexRow], infos: dict[str, HeadInfo]) -> IndexColumns:
    heads = sorted((infos.get(h) or HeadInfo(h) for h in {h for r in rows for h in r.heads}), key=HeadInfo.sort_key)
    metrics = {h.name: sorted({m for r in rows for m in r.heads.get(h.name, {})}) for h in heads}
    info_cols: list[str] = []
    for r in rows:
        for k in r.info:
            if k not in info_cols:
                info_cols.append(k)
    return IndexColumns(info_cols, heads, metrics)


def _metric_label(m: str) -> str:
    return html.escape(m.replace("_", " "))


def _finite(values) -> list:
    return [v for v in values if is_number(v) and math.isfinite(v)]


def scores_table(rows: list[IndexRow], columns: IndexColumns, index_dir: Path) -> str:
    """The ``<table>`` (two header rows, a row per sample, the mean row), or a note when there are no samples."""
    if not rows:
        return '<p class="muted">No samples yet.</p>'
    body = "".join(_sample_row(r, columns, index_dir) for r in rows)
    foot = "<tfoot><tr>" + "".join(_mean_cells(rows, columns)) + "</tr></tfoot>" if columns.all_metrics else ""
    return ('<table class="index-table"><thead>' + _header_rows(columns) + "</thead><tbody>" + body + "</tbody>"
            + foot + "</table>")


def _header_rows(columns: IndexColumns) -> str:
    head_row = ["<th rowspan=2>sample</th>"] + [f"<th rowspan=2>{html.escape(k)}</th>" for k in columns.info]
    sub_row = []
    for h in columns.heads:
        metrics = columns.metrics[h.name]
        head_row.append(f'<th colspan={max(1, len(metrics))} class="head-col" '
                        f'title="{html.escape(h.description or h.name)}">{html.escape(h.shown)}</th>')
        sub_row.extend([f"<th>{_metric_label(m)}</th>" for m in metrics] or ["<th></th>"])
    return "<tr>" + "".join(head_row) + "</tr><tr>" + "".join(sub_row) + "</tr>"


def _sample_row(row: IndexRow, columns: IndexColumns, index_dir: Path) -> str:
    best = {}  # metric -> the best value over the heads; a tie everywhere marks nothing
    for m in columns.all_metrics:
        vals = _finite(row.heads.get(h.name, {}).get(m) for h in columns.heads)
        if len(vals) > 1 and len(set(vals)) > 1:
            best[m] = max(vals)
    href = html.escape(rel_url(row.page, index_dir))
    thumb_html = ""
    if row.thumbnail and Path(row.thumbnail).is_file():
        thumb_html = f'<img class="thumb" src="{html.escape(rel_url(Path(row.thumbnail), index_dir))}" alt="" loading="lazy">'
    cells = [f'<td class="sample"><a href="{href}">{thumb_html}<span>{html.escape(row.sample)}</span></a></td>']
    cells += [f"<td>{format_value(row.info.get(k))}</td>" for k in columns.info]
    for h in columns.heads:
        if not columns.metrics[h.name]:
            cells.append("<td></td>")
        for m in columns.metrics[h.name]:
            v = row.heads.get(h.name, {}).get(m)
            is_best = m in best and is_number(v) and v == best[m]
            cells.append(f'<td class="num{" best" if is_best else ""}">{format_value(v)}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _mean_cells(rows: list[IndexRow], columns: IndexColumns) -> list[str]:
    cells = ['<th scope="row" title="over the samples that have the score">mean</th>'] + ["<td></td>" for _ in columns.info]
    for h in columns.heads:
        if not columns.metrics[h.name]:
            cells.append("<td></td>")
        for m in columns.metrics[h.name]:
            vals = _finite(r.heads.get(h.name, {}).get(m) for r in rows)
            cells.append(f'<td class="num">{format_value(sum(vals) / len(vals)) if vals else format_value(None)}</td>')
    return cells


def heads_legend(heads: list[HeadInfo]) -> str:
    """The ``<li>`` items of the heads' list: label, name and description of each."""
    return "".join(f"<li><b>{html.escape(h.shown)}</b> ({html.escape(h.name)}): {html.escape(h.description)}</li>"
                   for h in heads)


def index_html(title: str, n_samples: int, table: str, legend: str) -> str:
    return page_head(title, "index-page") + f"""
<header class="bar"><h1>{html.escape(title)}</h1><span class="muted">{n_samples} sample{'s' if n_samples != 1 else ''}</span></header>
<main class="index-main">
<p>Pick a sample to see where each head looked: the slide at deep zoom with every head's heatmap over it,
side by side if you like, and each tile's probability on click. Scores are per sample; the best head per
metric is in bold; the last row is the mean over the samples that have the score.</p>
{table}
<h2>Heads</h2>
<ul class="head-list">{legend}</ul>
</main>
</body>
</html>
"""
