"""What every viewer page shares: the assets copied beside it, its ``<head>``, relative URLs, safe
embedded JSON and number formatting.

Pages are opened straight from disk (``file://``): the JavaScript and CSS (``pipeline/viewer_assets``,
vanilla, written for this project) are copied next to each page as ``viewer_assets/``, and every URL in
a page is relative to the page, so the folder can be moved.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import shutil
from pathlib import Path
from urllib.parse import quote

from pipeline.errors import GaplessError
from pipeline.files import atomic_write
from pipeline.heatmap.document import is_number

ASSETS = Path(__file__).resolve().parent.parent / "viewer_assets"  # package data: pipeline/viewer_assets/*
ASSET_FILES = ("viewer.js", "index.js", "viewer.css")  # index.js: the index page's table
ASSETS_DIR = "viewer_assets"


def rel_url(target: Path, start_dir: Path) -> str:
    """``target`` as a URL relative to the folder ``start_dir`` (percent-encoded, ``/`` separated)."""
    rel = os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())
    return quote(Path(rel).as_posix())


def script_json(obj) -> str:
    """JSON safe inside a <script> element (no `</script>`, no `<!--`)."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def copy_assets(page_dir: Path) -> None:
    """Copy the viewer's JavaScript and CSS into ``page_dir/viewer_assets`` (unchanged files are left)."""
    dest = page_dir / ASSETS_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        src = ASSETS / name
        if not src.is_file():
            raise GaplessError(src, "a viewer asset is missing from the installed package", "reinstall gapless (pip install -e .)")
        target = dest / name
        if not target.is_file() or target.read_bytes() != src.read_bytes():
            atomic_write(target, functools.partial(shutil.copyfile, src))


def page_head(title: str, body_class: str) -> str:
    """The start of a page, up to and including ``<body>``: charset, viewport, title, the stylesheet, and an
    empty icon (served, a browser would otherwise ask for /favicon.ico)."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{ASSETS_DIR}/viewer.css">
</head>
<body class="{body_class}">"""


def format_value(v) -> str:
    """A table cell's text: 3 decimals for floats, a dash for missing or non-finite, escaped otherwise."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&#8211;"
    if is_number(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    return html.escape(str(v))
