"""Static HTML viewer: one page per sample (deep-zoom slide + each head's heatmap), and an index.

Everything is a plain file opened straight from disk (``file://``), with no server and no network:
the heatmap data is embedded in the page as a ``<script>`` (Chromium blocks ``fetch()`` of local
files), images are loaded by relative URLs, and the JavaScript and CSS (``pipeline/viewer_assets``,
vanilla, written for this project) are copied next to each page as ``viewer_assets/``.

Layout (as the pipeline writes it; every path in a page is relative, so the folder can be moved)::

    results/heatmaps/index.html                 write_index: every sample, scores per head
    results/heatmaps/{sample}.html              write_sample_page
    results/heatmaps/viewer_assets/viewer.js    copied by both writers
    results/heatmaps/viewer_assets/viewer.css
    results/heatmaps/slides/{sample}/slide.dzi  write_slide_pyramid: Deep Zoom descriptor
    results/heatmaps/slides/{sample}/slide_files/{level}/{col}_{row}.jpeg
    results/heatmaps/slides/{sample}/pyramid.json   size, tile size, kind, µm/px of the pyramid
    results/heatmaps/{head}/{sample}.json + overlay PNG   (pipeline.heatmap, the page's input)

Modules: ``deepzoom`` (the pyramid folder's layout, reading it back), ``pyramid`` (writing it from any
source through ``pipeline.io.open_source``), ``inputs`` (a page's heatmaps, colormaps, annotation
outlines), ``templating`` (assets, page head, URLs, embedded JSON), ``sample_page``, ``index`` and
``summary`` (what a sample page hands the index). The heatmap JSON is :mod:`pipeline.heatmap.document`'s;
each head's label, description and display order come from it, not from a list kept here.
"""

from __future__ import annotations

from pipeline.heatmap.document import load_heatmap_json
from pipeline.viewer.deepzoom import DZI_NAME, PYRAMID_SCHEMA, read_pyramid
from pipeline.viewer.index import write_index
from pipeline.viewer.pyramid import write_slide_pyramid
from pipeline.viewer.sample_page import write_sample_page

__all__ = [
    "DZI_NAME",
    "PYRAMID_SCHEMA",
    "load_heatmap_json",
    "read_pyramid",
    "write_index",
    "write_sample_page",
    "write_slide_pyramid",
]
