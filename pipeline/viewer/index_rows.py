"""What the index lists: every mapped sample, each head's probability and scores, the sample's details
and its page where it has one — as columns (an :class:`IndexTable`), which 10⁵ samples need.

Three sources, each optional:

- **heatmap manifests** (``gapless.heatmaps/1``, one per trained model: head × cohort, written by
  :func:`pipeline.heatmap.run.heatmap_cohort`): the rows, in the manifests' order. Each gives its head's
  ``p_max``, ``p_mean`` (of the sample's tile probabilities) and scores, and the sample's tile count.
- **page summaries** (:mod:`pipeline.viewer.summary`): the links. Given by name (``pages``:
  ``(sample, page, summary)``; the page must exist) or found in a folder (``summaries_dir``:
  ``{sample}.json`` as ``gapless page --summary`` writes them; looked up for the manifests' samples, or
  every one without manifests). A folder's summary older than a manifest that lists its sample belongs to
  a page made from older heatmaps (a page is rebuilt after its cohort's manifests, so a current one is
  newer): it is not linked. A summary's scores count for a head only where no manifest gave the
  sample's; a named summary of a sample no manifest lists is a row of its own (an index of pages
  alone, as ``gapless index SUMMARY...`` has always made).
- **sample details** (``{sample: {key: value}}``; :func:`sheet_info` reads label, group and kind from
  sample sheets, without opening a slide, so a blank ``kind`` stays blank unless a page says it).

Heads' words and order (``HeadInfo``): the summaries' ``head_info``; for a head no summary names, the
``head_label``/``head_description``/``head_order`` of its heatmap JSON for the first sample its manifest
lists (the path as the manifest holds it: relative to where the heatmaps were made); else the name.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo
from pipeline.viewer.summary import read_page_summary

log = logging.getLogger("gapless.viewer")

MANIFEST_SCHEMA = "gapless.heatmaps/1"  # pipeline.heatmap.run.MANIFEST_SCHEMA, without importing torch
_MANIFEST_FIX = "pass the --manifest files `gapless heatmap --samples ... --manifest` wrote"
PROBABILITY_METRICS = ("p_max", "p_mean")  # first among a head's columns
SHEET_DETAILS = ("label", "group", "kind")  # the first details shown

Column = dict  # row number -> value; a row without a value is missing


@dataclass
class IndexTable:
    """The index by columns: row ``i`` is ``samples[i]``; ``scores[head][metric]`` and ``info[key]`` map a row
    to its value; ``pages`` a row to its page and thumbnail."""

    samples: list[str] = field(default_factory=list)
    heads: list[HeadInfo] = field(default_factory=list)  # display order, once :func:`index_table` is done
    scores: dict[str, dict[str, Column]] = field(default_factory=dict)
    info: dict[str, Column] = field(default_factory=dict)
    pages: dict[int, tuple[Path, str | None]] = field(default_factory=dict)
    row_of: dict[str, int] = field(default_factory=dict)

    def row(self, sample_id: str) -> int:
        """The row of ``sample_id``, added when new."""
        i = self.row_of.get(sample_id)
        if i is None:
            i = self.row_of[sample_id] = len(self.samples)
            self.samples.append(sample_id)
        return i

    def metrics(self, head: str) -> list[str]:
        """The head's columns: p_max, p_mean, then its scores sorted."""
        return metric_order(self.scores.get(head, {}))

    @property
    def all_metrics(self) -> list[str]:
        return metric_order({m for cols in self.scores.values() for m in cols})

    @property
    def paged(self) -> int:
        return len(self.pages)


def metric_order(names) -> list[str]:
    return [m for m in PROBABILITY_METRICS if m in names] + sorted(m for m in names if m not in PROBABILITY_METRICS)


def index_table(out_html: str | Path, pages: Iterable = (), *, manifests: Iterable[str | Path] = (),
                summaries_dir: str | Path | None = None, sample_info: Mapping[str, dict] | None = None) -> IndexTable:
    """The index's table from its sources (see the module docstring)."""
    table = IndexTable()
    infos: dict[str, HeadInfo] = {}
    newest: dict[int, float] = {}  # row -> the newest mtime of the manifests that list it
    first_json: dict[str, str] = {}  # head -> one of its heatmap JSONs, for its words
    for path in manifests:
        _add_manifest(table, Path(path), newest, first_json)
    manifest_rows = {head: set(cols.get("p_max", {})) for head, cols in table.scores.items()}
    named = set()
    for entry in pages:
        sample_id, page, summary = _named_page(Path(out_html), entry)
        if sample_id in named:
            raise GaplessError(page, f"sample {sample_id!r} listed twice", "list each sample once")
        named.add(sample_id)
        _add_summary(table, table.row(sample_id), page, summary, infos, manifest_rows)
    if summaries_dir is not None:
        _add_folder(table, Path(summaries_dir), named, newest, infos, manifest_rows)
    for head, heatmap_json in first_json.items():
        if head not in infos:
            infos[head] = _head_info_of_heatmap(head, heatmap_json)
    _add_details(table, sample_info or {})
    move_shared_counts(table)
    table.heads = sorted((infos.get(h) or HeadInfo(h) for h in table.scores), key=HeadInfo.sort_key)
    first = [k for k in SHEET_DETAILS if k in table.info]
    table.info = {k: table.info[k] for k in first + [k for k in table.info if k not in first] if table.info[k]}
    return table


def read_manifest(path: str | Path) -> dict:
    """A heatmap manifest, checked: ``{"head": name, "samples": {sample: {"json", "tiles", "p_mean", "p_max",
    "scores"}}, ...}``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GaplessError(path, "heatmap manifest not found", _MANIFEST_FIX) from None
    except (UnicodeDecodeError, ValueError) as error:
        raise GaplessError(path, f"not valid JSON ({error})", _MANIFEST_FIX) from None
    if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise GaplessError(path, f"not a heatmap manifest (schema {found!r}, expected {MANIFEST_SCHEMA!r})", _MANIFEST_FIX)
    if not isinstance(doc.get("head"), str) or not isinstance(doc.get("samples"), dict):
        raise GaplessError(path, "a heatmap manifest needs 'head' (a name) and 'samples' (an object)", _MANIFEST_FIX)
    for sample, entry in doc["samples"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("scores", {}), dict):
            raise GaplessError(path, f"sample {sample!r}: expected an object with 'scores'", _MANIFEST_FIX)
    return doc


def _add_manifest(table: IndexTable, path: Path, newest: dict[int, float], first_json: dict[str, str]) -> None:
    doc = read_manifest(path)
    head, mtime = doc["head"], path.stat().st_mtime
    cols = table.scores.setdefault(head, {})
    p_max, p_mean, tiles = cols.setdefault("p_max", {}), cols.setdefault("p_mean", {}), table.info.setdefault("tiles", {})
    row_of, samples = table.row_of, table.samples
    for sample_id, entry in doc["samples"].items():
        i = row_of.get(sample_id)
        if i is None:
            i = row_of[sample_id] = len(samples)
            samples.append(sample_id)
        elif i in p_max:
            raise GaplessError(path, f"sample {sample_id!r} of head {head!r} is in two of the manifests given",
                               "pass one seed's manifests, one per head and cohort")
        p_max[i], p_mean[i] = entry.get("p_max"), entry.get("p_mean")
        for metric, value in entry.get("scores", {}).items():
            col = cols.get(metric)
            if col is None:
                col = cols[metric] = {}
            col[i] = value
        if entry.get("tiles") is not None and i not in tiles:
            tiles[i] = entry["tiles"]
        if newest.get(i, 0.0) < mtime:
            newest[i] = mtime
    if head not in first_json:  # the first sample whose files were written (a large cohort's few)
        written = (e["json"] for e in doc["samples"].values() if isinstance(e.get("json"), str))
        first = next(written, None)
        if first is not None:
            first_json[head] = first


def _named_page(out_html: Path, entry) -> tuple[str, Path, object]:
    try:
        sample_id, page, summary = entry
    except (TypeError, ValueError):
        raise GaplessError(out_html, f"an index entry must be (sample_id, page_path, summary), got {entry!r}",
                           "pass the triples of the written sample pages") from None
    page = Path(page)
    if not page.is_file():
        raise GaplessError(page, f"the page of sample {sample_id!r} does not exist",
                           "write the sample pages (gapless page) before the index")
    return str(sample_id), page, summary


def _add_summary(table: IndexTable, i: int, page: Path, summary, infos: dict[str, HeadInfo],
                 manifest_rows: dict[str, set]) -> None:
    """A page's summary on row ``i``: the link, thumbnail and details; its scores for heads no manifest gave."""
    heads, head_infos, info, thumbnail = read_page_summary(summary)
    for name, head_info in head_infos.items():
        infos.setdefault(name, head_info)
    for name, scores in heads.items():
        if i not in manifest_rows.get(name, ()):
            cols = table.scores.setdefault(name, {})
            for metric, value in scores.items():
                cols.setdefault(metric, {})[i] = value
    for key, value in info.items():
        table.info.setdefault(str(key), {}).setdefault(i, value)
    table.pages[i] = (page, thumbnail)


def _add_folder(table: IndexTable, folder: Path, named: set, newest: dict[int, float], infos: dict[str, HeadInfo],
                manifest_rows: dict[str, set]) -> None:
    """The current summaries in ``folder``: of the manifests' samples (every one without manifests)."""
    if not folder.exists():
        log.warning("%s: no page summaries (the folder does not exist): no sample is linked", folder)
        return
    if not folder.is_dir():
        raise GaplessError(folder, "is not a folder", "pass the folder of the page summaries (results/heatmaps/pages)")
    if newest:
        found = [(s, folder / f"{s}.json") for s in table.samples]
    else:
        found = [(p.stem, p) for p in sorted(folder.glob("*.json"))]
    outdated = 0
    for sample_id, path in found:
        if sample_id in named or not os.path.isfile(path):
            continue
        i = table.row(sample_id)
        if path.stat().st_mtime < newest.get(i, 0.0):
            outdated += 1
            continue
        summary = _read_summary_file(path)
        page = Path(summary.get("page") or "")
        if page.is_file():
            _add_summary(table, i, page, summary, infos, manifest_rows)
    if outdated:
        log.info("%s: %d page summaries older than their heatmap manifests (pages of older heatmaps) not linked",
                 folder, outdated)


def _read_summary_file(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise GaplessError(path, f"not valid JSON ({error})", "write the page again (gapless page --summary)") from None
    if not isinstance(summary, dict) or "page" not in summary:
        raise GaplessError(path, "not a page summary (no 'page')", "pass the --summary files of `gapless page`")
    return summary


def _head_info_of_heatmap(head: str, path: str) -> HeadInfo:
    """A head's words from one of its heatmap JSONs (written with its ``HeadInfo``); the name alone if unreadable."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return HeadInfo.from_dict({"label": doc.get("head_label") or "", "description": doc.get("head_description") or "",
                                   "order": doc.get("head_order", 1000)}, name=head)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        log.warning("head %s: no label read from its heatmap %s (%s); shown by its name", head, path, error)
        return HeadInfo(head)


def sheet_info(sheets: Iterable[str | Path]) -> dict[str, dict]:
    """``{sample: {"label", "group", "kind"}}`` from sample sheets, blank cells left out.

    Only these four columns are read (the workflow checked the sheet with
    :func:`pipeline.samples.load_sample_sheet` before any job; that check, which resolves every path,
    takes 40× longer at 10⁵ rows); the first sheet that lists a sample decides."""
    info: dict[str, dict] = {}
    for sheet in sheets:
        try:
            with open(sheet, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                columns = [c.strip() for c in reader.fieldnames or []]
                if "sample_id" not in columns:
                    raise GaplessError(sheet, "no sample_id column", "pass the sample sheet the heatmaps were made from")
                reader.fieldnames = columns
                for record in reader:
                    sample_id = (record.get("sample_id") or "").strip()
                    if sample_id and sample_id not in info:
                        details = {k: (record.get(k) or "").strip() for k in SHEET_DETAILS}
                        details["kind"] = details["kind"].lower()
                        info[sample_id] = {k: v for k, v in details.items() if v}
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise GaplessError(sheet, f"cannot read the sample sheet ({error})", "pass a readable CSV sample sheet") from None
    return info


def _add_details(table: IndexTable, sample_info: Mapping[str, dict]) -> None:
    """The sheet's details of each row, before what its page said."""
    if not sample_info:
        return
    sheet: dict[str, Column] = {}
    for sample_id, i in table.row_of.items():
        for key, value in (sample_info.get(sample_id) or {}).items():
            if value is not None:
                sheet.setdefault(str(key), {})[i] = value
    for key, column in table.info.items():
        merged = sheet.setdefault(key, {})
        for i, value in column.items():
            merged.setdefault(i, value)
    table.info = sheet


def move_shared_counts(table: IndexTable) -> None:
    """A count every head of a sample reports alike (e.g. witness_cells) is the sample's: moved from the
    heads' scores to the details, shown once."""
    for metric in sorted({m for cols in table.scores.values() for m in cols} - set(PROBABILITY_METRICS)):
        columns = [cols[metric] for cols in table.scores.values() if metric in cols]
        if not all(type(v) is int for col in columns for v in col.values()):
            continue
        merged: Column = {}
        if any(merged.setdefault(i, v) != v for col in columns for i, v in col.items()):
            continue
        shown = table.info.setdefault(metric.replace("_", " "), {})
        for i, v in merged.items():
            shown.setdefault(i, v)
        for cols in table.scores.values():
            cols.pop(metric, None)
