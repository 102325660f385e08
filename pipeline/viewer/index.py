"""The index page: every mapped sample in one table, each head's probability and scores, a link to the
sample's page where it has one.

What it lists is :mod:`pipeline.viewer.index_rows`'s (the heatmap manifests, the page summaries, the
sample sheets). The table's data is embedded once, as compact JSON in a ``<script
type="application/json">`` (the page also works opened from disk, where ``fetch()`` is blocked), by
columns: sample ids, each detail dictionary-coded (``values`` + ``codes``, -1 missing) or as numbers,
each head × metric as integers over its ``scale`` (10⁴: four decimals; counts as they are; null
missing). ``viewer_assets/index.js`` shows it a page of rows at a time, with a search box, sorting by
any column and paging: 10⁵ samples stay fast (the figures are in the README). Heads are columns in
their declared order and words (``HeadInfo``); the best head per metric and sample is in bold; the
last row is the mean over the samples found.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.files import atomic_write_text
from pipeline.head_info import HeadInfo
from pipeline.viewer.index_rows import IndexTable, index_table
from pipeline.viewer.templating import (
    ASSETS_DIR,
    copy_assets,
    page_head,
    rel_url,
    script_json,
)

INDEX_SCHEMA = "gapless.index/1"
SCORE_SCALE = 10_000  # scores kept to 4 decimals (the table shows 3, sorting sees 4)
METRIC_TITLES = {"p_max": "the highest tile probability of the positive class",
                 "p_mean": "the mean tile probability of the positive class"}


def write_index(
    out_html: str | Path,
    pages: Iterable[tuple[str, str | Path, dict | None]] = (),
    title: str = "gapless heatmaps",
    *,
    manifests: Iterable[str | Path] = (),
    summaries_dir: str | Path | None = None,
    sample_info: Mapping[str, dict] | None = None,
    pages_note: str | None = None,
) -> Path:
    """Write the index page: every sample of the heatmap ``manifests`` (and of ``pages``), each head's
    probability and scores, the sample's details, a link to its page where it has one.

    ``pages``: (sample_id, page_path, summary) with the summary :func:`write_sample_page` returned (or a
    bare ``{head: {metric: value}}``); ``summaries_dir``: a folder of page summaries
    (``gapless page --summary``), for cohorts whose pages are too many to name; ``sample_info``:
    ``{sample: {label, group, kind}}`` (:func:`pipeline.viewer.index_rows.sheet_info`); ``pages_note``:
    how the paged samples were chosen, said on the page. What each source gives:
    :mod:`pipeline.viewer.index_rows`.
    """
    table = index_table(out_html, pages, manifests=manifests, summaries_dir=summaries_dir, sample_info=sample_info)
    return write_index_table(out_html, table, title, pages_note)


def write_index_table(out_html: str | Path, table: IndexTable, title: str = "gapless heatmaps",
                      pages_note: str | None = None) -> Path:
    """Write ``table`` (:func:`pipeline.viewer.index_rows.index_table`) as the index page, with the viewer's
    assets beside it."""
    out_html = Path(out_html)
    page = index_html(title, table, index_data(table, out_html.parent), pages_note)
    copy_assets(out_html.parent)
    atomic_write_text(out_html, page)
    return out_html


def index_data(table: IndexTable, index_dir: Path) -> dict:
    """The embedded JSON ``index.js`` reads (see the module docstring); paths relative to ``index_dir``."""
    n = len(table.samples)
    metrics = table.all_metrics
    columns = []
    for i, head in enumerate(table.heads):
        for metric in table.metrics(head.name):
            column = table.scores[head.name][metric]
            columns.append({"head": i, "metric": metrics.index(metric),
                            **_encoded_numbers(list(map(column.get, range(n))), SCORE_SCALE)})
    pages = []
    for r, (page, thumb) in sorted(table.pages.items()):
        thumb_url = rel_url(Path(thumb), index_dir) if thumb and Path(thumb).is_file() else None
        pages.append([r, rel_url(page, index_dir), thumb_url])
    return {
        "schema": INDEX_SCHEMA,
        "samples": table.samples,
        "info": [{"key": k, **_encoded_details(list(map(column.get, range(n))))} for k, column in table.info.items()],
        "heads": [{"name": h.name, "label": h.shown, "description": h.description} for h in table.heads],
        "metrics": [{"name": m, "label": m.replace("_", " "), "title": METRIC_TITLES.get(m, "")} for m in metrics],
        "columns": columns,
        "pages": pages,
    }


def _number(v):
    """``v`` if a finite number (not a bool), else None; fast, as 10⁶ values pass here."""
    t = type(v)
    if t is int or (t is float and v - v == 0):  # v - v is NaN for inf and NaN
        return v
    return None


def _encoded_numbers(values: list, scale: int) -> dict:
    """Counts as they are (scale 1), other numbers as integers over ``scale``; null where missing."""
    values = list(map(_number, values))
    if float not in set(map(type, values)):
        return {"scale": 1, "values": values}
    return {"scale": scale, "values": [None if v is None else round(v * scale) for v in values]}


def _encoded_details(values: list) -> dict:
    """A detail column: numbers as they are, anything else as text coded by a list of its distinct values."""
    if all(v is None or type(v) in (int, float) for v in values):
        return {"numbers": [_number(v) for v in values]}
    distinct: dict[str, int] = {}
    codes = [-1 if v is None else distinct.setdefault(str(v), len(distinct)) for v in values]
    return {"values": list(distinct), "codes": codes}


def heads_legend(heads: list[HeadInfo]) -> str:
    """The ``<li>`` items of the heads' list: label, name and description of each."""
    return "".join(f"<li><b>{html.escape(h.shown)}</b> ({html.escape(h.name)}): {html.escape(h.description)}</li>"
                   for h in heads)


def pages_sentence(n_rows: int, n_paged: int, note: str | None) -> str:
    """How many samples have a page, and how they were chosen (``note``, e.g. from the workflow's config)."""
    chosen = f"Pages were made for {note}: " if note else ""
    if n_paged == n_rows:
        return f"{chosen}every sample has a page." if note else "Every sample has a page."
    if n_paged == 0:
        return f"No sample has a page (pages are made for {note})." if note else "No sample has a page."
    return (f"{chosen}{n_paged:,} of {n_rows:,} samples have a page (the slide at deep zoom under each head's map); "
            "the others are listed with their scores, without a link.")


def index_html(title: str, table: IndexTable, data: dict, pages_note: str | None = None) -> str:
    n, paged = len(table.samples), table.paged
    count = f"{n:,} sample{'s' if n != 1 else ''}" + (f", {paged:,} with a page" if paged != n else "")
    note = pages_sentence(n, paged, pages_note) if n else "No samples yet."
    return page_head(title, "index-page") + f"""
<header class="bar"><h1>{html.escape(title)}</h1><span class="muted" id="index-count">{count}</span></header>
<main class="index-main">
<p>Every mapped sample with each head's scores (<i>p max</i>, <i>p mean</i>: the highest and the mean tile
probability of the positive class; the localisation scores where the sample's annotations allow them). A linked
sample opens its page: the slide at deep zoom with every head's heatmap over it. The best head per metric is in
bold; the last row is the mean over the samples found. Click a column's name to sort by it.</p>
<p id="pages-note">{html.escape(note)}</p>
<div class="index-controls" role="search">
  <label class="ctl">Find <input id="index-search" type="search" size="28" placeholder="sample, group or label"
    aria-label="Find samples by id, group or label" autocomplete="off"></label>
  <label class="ctl"><input id="index-paged" type="checkbox"> with a page only</label>
  <label class="ctl">Scores <select id="index-metric" aria-label="Scores shown"></select></label>
  <label class="ctl">Rows <select id="index-size" aria-label="Rows per page">
    <option>25</option><option selected>100</option><option>500</option></select></label>
</div>
<nav class="pager" aria-label="Table pages">
  <button id="index-prev" type="button">&#8592; previous</button>
  <span id="index-status" aria-live="polite"></span>
  <button id="index-next" type="button">next &#8594;</button>
</nav>
<div class="index-scroll"><table class="index-table" id="index-table"></table></div>
<h2>Heads</h2>
<ul class="head-list">{heads_legend(table.heads)}</ul>
</main>
<noscript><p class="noscript">This table needs JavaScript.</p></noscript>
<script type="application/json" id="gapless-index">{script_json(data)}</script>
<script src="{ASSETS_DIR}/index.js"></script>
</body>
</html>
"""

