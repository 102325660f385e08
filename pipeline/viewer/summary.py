"""A sample page's summary: what :func:`write_sample_page` returns and :func:`write_index` reads back
(``gapless page --summary`` writes it as JSON with ``sample`` and ``page`` added; ``gapless index``
reads those files).

``{"heads": {head: {score: value}}, "head_info": {head: {"label", "description", "order"}},
"info": {key: value}, "thumbnail": path or None}``: the scores of each head, the words and display
order of each head as its heatmap carried them, the sample's details (e.g. label, group) and the
pyramid tile that serves as its thumbnail.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo


def page_summary(heads: list[dict], info: dict, thumbnail: Path | None) -> dict:
    """The summary of a page showing ``heads`` (loaded heatmaps, with ``head_info``)."""
    return {
        "heads": {h["head"]: dict(h["scores"]) for h in heads},
        "head_info": {h["head"]: {"label": h["head_info"].shown, "description": h["head_info"].description,
                                  "order": h["head_info"].order} for h in heads},
        "info": info,
        "thumbnail": str(thumbnail) if thumbnail is not None else None,
    }


def read_page_summary(summary) -> tuple[dict[str, dict], dict[str, HeadInfo], dict, str | None]:
    """(scores per head, ``HeadInfo`` per head, info, thumbnail) of a summary, copied (the caller's dicts
    are left alone). A bare ``{head: {metric: value}}`` mapping (other keys: info) and a summary without
    ``head_info`` are accepted; their heads get ``HeadInfo(name)`` defaults (the name, sorted by name)."""
    if summary is None:
        return {}, {}, {}, None
    if not isinstance(summary, dict):
        raise GaplessError(None, f"an index summary must be a dict, got {type(summary).__name__}",
                           "pass the dict write_sample_page returned")
    if "heads" in summary and isinstance(summary["heads"], dict):
        heads = summary["heads"]
        declared = summary.get("head_info") or {}
        info = summary.get("info") or {}
        thumb = summary.get("thumbnail")
    else:  # a bare {head: {metric: value}} mapping
        heads = {k: v for k, v in summary.items() if isinstance(v, dict)}
        declared, thumb = {}, None
        info = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    scores = {str(h): dict(s or {}) for h, s in heads.items()}
    infos = {h: HeadInfo.from_dict(declared.get(h) if isinstance(declared.get(h), dict) else None, name=h) for h in scores}
    return scores, infos, dict(info), thumb
