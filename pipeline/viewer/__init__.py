"""HTML viewer: one page per sample (deep-zoom slide + each head's heatmap), and an index.

Every page is a plain file that works opened straight from disk (``file://``), with no server and no
network, and served by ``gapless view`` (:mod:`pipeline.viewer.server`), which adds the slide's
full-resolution tiles, cut on demand, to a static export capped at a µm/px. On disk:
the heatmap data is embedded in the page as a ``<script>`` (Chromium blocks ``fetch()`` of local
files), images are loaded by relative URLs, and the JavaScript and CSS (``pipeline/viewer_assets``,
vanilla, written for this project) are copied next to each page as ``viewer_assets/``.

Layout (as the pipeline writes it; every path in a page is relative, so the folder can be moved)::

    results/heatmaps/index.html                 write_index: every mapped sample, scores per head, linked pages
    results/heatmaps/{sample}.html              write_sample_page (the paged samples)
    results/heatmaps/pages/{sample}.json        the page's summary, read by the index
    results/heatmaps/viewer_assets/viewer.js    copied by both writers (the sample page's script)
    results/heatmaps/viewer_assets/index.js     (the index's table: search, sort, a page of rows at a time)
    results/heatmaps/viewer_assets/viewer.css
    results/heatmaps/slides/{sample}/slide.dzi  write_slide_pyramid: Deep Zoom descriptor
    results/heatmaps/slides/{sample}/slide_files/{level}/{col}_{row}.jpeg   levels up to the cap's µm/px
    results/heatmaps/slides/{sample}/pyramid.json   size, tile size, kind, µm/px, source, finest level
    results/heatmaps/{head}/{sample}.json + overlay PNG   (pipeline.heatmap, the page's input)

Modules: ``deepzoom`` (the pyramid folder's layout, reading it back), ``pyramid`` (writing it from any
source through ``pipeline.io.open_source``, and cutting one tile on demand), ``server`` (``gapless
view``), ``inputs`` (a page's heatmaps, colormaps, annotation outlines), ``templating`` (assets, page
head, URLs, embedded JSON), ``sample_page``, ``summary`` (what a sample page hands the index),
``index_rows`` (what the index lists: the heatmap manifests' samples, the pages, the sheets' details)
and ``index`` (the page, its data embedded once as compact JSON). The heatmap JSON is
:mod:`pipeline.heatmap.document`'s; each head's label, description and display order come from it, not
from a list kept here.
"""

from __future__ import annotations

from pipeline.heatmap.document import load_heatmap_json
from pipeline.viewer.deepzoom import DZI_NAME, PYRAMID_SCHEMA, read_pyramid
from pipeline.viewer.index import write_index, write_index_table
from pipeline.viewer.index_rows import index_table, read_manifest, sheet_info
from pipeline.viewer.pyramid import DEFAULT_MAX_MPP, SourceTiles, write_slide_pyramid
from pipeline.viewer.sample_page import write_sample_page
from pipeline.viewer.server import serve, start_server

__all__ = [
    "DEFAULT_MAX_MPP",
    "DZI_NAME",
    "PYRAMID_SCHEMA",
    "SourceTiles",
    "index_table",
    "load_heatmap_json",
    "read_manifest",
    "read_pyramid",
    "serve",
    "sheet_info",
    "start_server",
    "write_index",
    "write_index_table",
    "write_sample_page",
    "write_slide_pyramid",
]
