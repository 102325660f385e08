"""The page of one sample: the slide at deep zoom with each head's heatmap over it.

The page's data (pyramid, heads, tiles, scores, outlines) is embedded as ``window.GAPLESS_SAMPLE``
in a ``<script>`` (Chromium blocks ``fetch()`` of local files); ``viewer_assets/viewer.js`` draws it.
A head whose heatmap JSON has a Grad-CAM map (``gradcam``) gets a second layer right after its own,
named ``{head}:gradcam`` and labelled "{label} · Grad-CAM": selectable like a head (buttons, side by
side), with its own overlay, range and scores.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from pipeline.errors import GaplessError
from pipeline.files import atomic_write_text
from pipeline.viewer.deepzoom import read_pyramid, thumbnail_tile
from pipeline.viewer.inputs import colormap_stops, load_annotation_outlines, load_sample_heatmaps
from pipeline.viewer.summary import page_summary
from pipeline.viewer.templating import ASSETS_DIR, copy_assets, page_head, rel_url, script_json


def write_sample_page(
    out_html: str | Path,
    sample_id: str,
    pyramid_dir: str | Path,
    heatmap_jsons: Sequence[str | Path],
    *,
    annotations: str | Path | None = None,
    info: dict | None = None,
    index_html: str | Path | None = None,
) -> dict:
    """Write the static page of one sample; return its summary for :func:`write_index`.

    The page shows the slide pyramid (``pyramid_dir``, from :func:`write_slide_pyramid`) at deep
    zoom with each head's overlay on top (opacity slider, head buttons, side-by-side views kept in
    sync), a legend (colour bar, range, normalisation, scores) and, on click, the tile under the
    pointer and its probability for every head. Heads are shown in their heatmaps' words and order
    (``head_label``, ``head_description``, ``head_order``). ``annotations`` (QuPath GeoJSON, level-0 px)
    are drawn as outlines (e.g. the witness cells); ``info`` (e.g. label, group) is listed on the
    page; ``index_html`` is where the "all samples" link points (default: ``index.html`` beside it).

    The summary (:mod:`pipeline.viewer.summary`) is ``{"heads": {head: scores}, "head_info": {head:
    {label, description, order}}, "info": info, "thumbnail": path or None}``.
    """
    out_html = Path(out_html)
    page_dir = out_html.parent
    if not isinstance(sample_id, str) or not sample_id:
        raise GaplessError(out_html, f"sample id must be a non-empty string, got {sample_id!r}", "pass the sample's id")
    pyr = read_pyramid(pyramid_dir)
    heads = load_sample_heatmaps(out_html, sample_id, pyr, pyramid_dir, heatmap_jsons)
    thumb = thumbnail_tile(pyr)
    outlines = load_annotation_outlines(Path(annotations)) if annotations is not None else []
    info = {str(k): v for k, v in (info or {}).items()}
    index_url = rel_url(Path(index_html), page_dir) if index_html is not None else "index.html"
    data = sample_page_data(sample_id, pyr, heads, page_dir, outlines, info, index_url)
    page = sample_page_html(data)
    copy_assets(page_dir)
    atomic_write_text(out_html, page)
    return page_summary(heads, info, thumb)


def sample_page_data(sample_id: str, pyr: dict, heads: list[dict], page_dir: Path, outlines: list[dict],
                     info: dict, index_url: str) -> dict:
    """``window.GAPLESS_SAMPLE``: what viewer.js draws. Every path in it is relative to ``page_dir``."""
    return {
        "sample": sample_id,
        "mpp": next((h["mpp"] for h in heads if h["mpp"] is not None), pyr.get("mpp")),
        "info": {k: ("" if v is None else str(v)) for k, v in info.items()},
        "index": index_url,
        "pyramid": {
            "url": rel_url(pyr["files"], page_dir) + "/",
            "width": pyr["width"],
            "height": pyr["height"],
            "tileSize": pyr["tile_size"],
            "overlap": pyr["overlap"],
            "format": pyr["format"],
            "maxLevel": pyr["max_level"],  # the finest level on disk; `gapless view` serves finer ones
        },
        "heads": [layer for h in heads for layer in _head_layers(h, page_dir)],
        "annotations": outlines,
    }


def _head_layers(h: dict, page_dir: Path) -> list[dict]:
    """The head's own layer, and its Grad-CAM layer where the heatmap has one (the module docstring)."""
    own = _head_data(h, page_dir)
    g = h.get("gradcam")
    if not g:
        return [own]
    return [own, {**own, "name": f"{own['name']}:gradcam", "label": f"{own['label']} · Grad-CAM",
                  "description": f"Grad-CAM (Selvaraju et al. 2017) of the positive class for the {own['label']} "
                                 "model: a post-hoc map computed the same way for every head",
                  "range": g["range"], "overlay": rel_url(g["overlay_path"], page_dir),
                  "overlaySize": g["overlay_size"], "scores": g["scores"]}]


def _head_data(h: dict, page_dir: Path) -> dict:
    return {
        "name": h["head"],
        "label": h["head_info"].shown,
        "description": h["head_info"].description,
        "runId": h["run_id"],
        "normalisation": h["normalisation"],
        "colormap": h["colormap"],
        "stops": colormap_stops(h["colormap"], h["path"]),
        "range": h["range"],
        "overlay": rel_url(h["overlay_path"], page_dir),
        "overlaySize": h["overlay_size"],
        "tileExtent": h["tile_extent"],
        "tiles": h["tiles"],
        "classes": h["classes"],
        "scores": h["scores"],
    }


def sample_page_html(data: dict) -> str:
    """The page's HTML around ``data`` (:func:`sample_page_data`); viewer.js fills in the rest."""
    sample_id = data["sample"]
    title = f"{sample_id} — gapless heatmaps"
    keys_heads = f"1&#8211;{len(data['heads'])} pick a head, " if len(data["heads"]) > 1 else ""
    return page_head(title, "sample-page") + f"""
<header class="bar">
  <a class="back" href="{html.escape(data['index'])}" title="All samples">&#8592; all samples</a>
  <h1 id="sample-title">{html.escape(sample_id)}</h1>
  <div id="head-switch" class="heads" role="group" aria-label="Head"></div>
  <label class="ctl">View
    <select id="layout">
      <option value="single">one head</option>
      <option value="pair">two side by side</option>
      <option value="all">all heads</option>
    </select>
  </label>
  <label class="ctl">Heatmap opacity
    <input id="opacity" type="range" min="0" max="100" step="1" value="60" aria-label="Heatmap opacity">
    <output id="opacity-value" for="opacity">60%</output>
  </label>
  <span class="ctl zoom" role="group" aria-label="Zoom">
    <button id="zoom-out" type="button" title="Zoom out (-)">&#8722;</button>
    <button id="zoom-in" type="button" title="Zoom in (+)">+</button>
    <button id="zoom-fit" type="button" title="Whole slide (0)">fit</button>
  </span>
  <label class="ctl" id="annotations-ctl" hidden><input id="show-annotations" type="checkbox" checked> annotations</label>
</header>
<main class="viewer-main">
  <div id="panes" class="panes"></div>
  <aside id="side" class="side">
    <section id="legend" aria-live="polite"></section>
    <section id="tile-info" aria-live="polite"><h2>Tile</h2><p class="muted">Click on the slide to see the tile under the pointer and each head's probability.</p></section>
    <section id="scores"></section>
    <section id="sample-info"></section>
    <section class="help muted"><h2>Keys</h2><p>Drag to pan, wheel or +/&#8722; to zoom, 0 fits the slide,
      {keys_heads}o toggles the heatmap.</p><p id="status" class="status"></p></section>
  </aside>
</main>
<noscript><p class="noscript">This viewer needs JavaScript.</p></noscript>
<script>window.GAPLESS_SAMPLE = {script_json(data)};</script>
<script src="{ASSETS_DIR}/viewer.js"></script>
</body>
</html>
"""
