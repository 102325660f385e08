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

A heatmap JSON (one per head and sample) holds ``sample``, ``head``, ``run_id``, ``normalisation``,
``colormap`` (a matplotlib name), ``range`` [lo, hi], ``width``/``height`` (level-0 px), ``mpp``,
``overlay`` (an RGBA PNG, relative to the JSON, spanning exactly [0, width] × [0, height]),
``tile_extent`` (level-0 px), ``tiles`` [[x, y, p_positive], ...], ``classes`` and ``scores``.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import shutil
import sys
import threading
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

from pipeline.errors import GaplessError
from pipeline.files import atomic_directory, atomic_write, atomic_write_text

__all__ = [
    "write_slide_pyramid",
    "write_sample_page",
    "write_index",
    "load_heatmap_json",
    "read_pyramid",
    "HEAD_LABELS",
]

ASSETS = Path(__file__).with_name("viewer_assets")
ASSET_FILES = ("viewer.js", "viewer.css")
ASSETS_DIR = "viewer_assets"
DZI_NAME = "slide"  # <pyramid_dir>/slide.dzi and <pyramid_dir>/slide_files/
PYRAMID_SCHEMA = "gapless.pyramid/1"
COARSE_MAX_SIDE = 4096  # levels at most this big are resized from one picture, not read again

# Display order and names of the heads; any other head name is shown as is, after these.
HEAD_LABELS = {
    "gap": "GAP",
    "cbam": "CBAM",
    "attnpool": "Attention pooling",
    "saol": "SAOL",
    "max": "Max (baseline)",
}
HEAD_DESCRIPTIONS = {
    "gap": "global average pooling + linear: every position counts the same",
    "cbam": "GAP + linear on a backbone with CBAM attention in every residual block",
    "attnpool": "attention-based pooling (PatchConvNet class attention over the positions)",
    "saol": "spatially attentive output layer (Kim et al. 2020): attention-weighted spatial class scores",
    "max": "global max pooling + linear: the strongest position decides (baseline)",
}
_ANNOTATION_COLOURS = ("#00e5ff", "#ffe600", "#76ff03", "#ff40ff", "#ff9100", "#ffffff")
_MAX_ANNOTATION_OBJECTS = 50_000

_HEATMAP_FIX = "write the heatmaps again with pipeline.heatmap (one JSON and one overlay PNG per head and sample)"
_PYRAMID_FIX = "write the pyramid first: gapless pyramid SLIDE --out DIR"


# ---------------------------------------------------------------------------------------------
# The slide pyramid


def write_slide_pyramid(
    source_path: str | Path,
    out_dir: str | Path,
    kind: str | None = None,
    tile_size: int = 254,
    overlap: int = 1,
    progress: bool = True,
    quality: int = 85,
    workers: int = 1,
) -> Path:
    """Write a Deep Zoom (DZI) pyramid of a slide or cell image into ``out_dir``; return ``out_dir``.

    ``out_dir/slide.dzi`` describes it, ``out_dir/slide_files/{level}/{col}_{row}.jpeg`` are the
    tiles (level 0 is 1×1 px, the last level is full resolution) and ``out_dir/pyramid.json``
    records the size, kind and µm/px. Slides go through ``openslide.deepzoom.DeepZoomGenerator``
    directly; cell images (e.g. 16-bit multi-channel fluorescence) are read with gapless's reader,
    made into a display RGB with :func:`pipeline.tissue.to_display_rgb` and wrapped in an
    ``openslide.ImageSlide``, so the same generator serves both. The pyramid covers exactly the
    level-0 extent [0, width] × [0, height] (``limit_bounds=False``), the frame heatmaps use.

    Levels down to the finest one of at most 4096 px a side come from the generator tile by tile;
    that level is also stitched into one picture and each coarser level is a 2× Lanczos reduction
    of the one above (the generator would read the whole source again for every coarse level).
    ``workers`` threads render tiles (OpenSlide and Pillow release the GIL); JPEG ``quality``.
    It is written under ``<out_dir>.partial`` and renamed when complete (replacing an older one).
    """
    import openslide
    from openslide.deepzoom import DeepZoomGenerator
    from PIL import Image

    from pipeline.io import open_source

    source_path, out_dir = Path(source_path), Path(out_dir)
    if not (isinstance(tile_size, int) and tile_size >= 16):
        raise GaplessError(source_path, f"pyramid tile size must be an integer of at least 16 px, got {tile_size!r}",
                           "use the default 254 (254 + 2 × 1 overlap = 256)")
    if not (isinstance(overlap, int) and 0 <= overlap < tile_size // 2):
        raise GaplessError(source_path, f"pyramid tile overlap must be an integer in 0..{tile_size // 2 - 1}, got {overlap!r}",
                           "use the default 1")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise GaplessError(source_path, f"JPEG quality must be 1..100, got {quality!r}", "use the default 85")

    with open_source(source_path, kind) as source:  # clear errors for missing/unreadable files
        W, H = source.dimensions
        real_path = source.path
        source_kind = source.kind
        mpp = source.metadata_mpp
        if source_kind == "slide":
            osr = _open_openslide(real_path)
            modality = "brightfield"
        else:
            rgb, modality = _display_rgb(source)
            osr = openslide.ImageSlide(Image.fromarray(rgb))

    try:
        dz = DeepZoomGenerator(osr, tile_size=tile_size, overlap=overlap, limit_bounds=False)
        with atomic_directory(out_dir, holds=f"{DZI_NAME}.dzi") as partial:
            files = partial / f"{DZI_NAME}_files"
            # Levels finer than `coarse` come tile by tile from the generator. `coarse` (the finest level
            # at most COARSE_MAX_SIDE px) comes from it too and is stitched into one picture, from which
            # every coarser level is resized and cut: the generator would read the source's nearest
            # level again for each of those (the whole image, for a single-level source).
            coarse = max(lv for lv in range(dz.level_count) if max(dz.level_dimensions[lv]) <= COARSE_MAX_SIDE)
            jobs = []
            for level in range(dz.level_count - 1, coarse - 1, -1):
                cols, rows = dz.level_tiles[level]
                jobs.extend((level, c, r) for r in range(rows) for c in range(cols))
            n_coarser = sum(cols * rows for cols, rows in dz.level_tiles[:coarse])
            for level in range(dz.level_count):
                (files / str(level)).mkdir(parents=True, exist_ok=True)

            coarse_image = Image.new("RGB", dz.level_dimensions[coarse], (255, 255, 255))
            paste_lock = threading.Lock()

            def save(tile, level, c, r):
                if tile.mode != "RGB":
                    tile = tile.convert("RGB")
                tile.save(files / str(level) / f"{c}_{r}.jpeg", "JPEG", quality=quality)
                return tile

            def render(job):
                level, c, r = job
                try:
                    tile = dz.get_tile(level, (c, r))
                except openslide.OpenSlideError as exc:
                    raise GaplessError(
                        real_path, f"cannot read the pixels of Deep Zoom level {level}, tile ({c}, {r}): {exc}",
                        "the file is damaged or truncated: copy it again or re-export it from the scanner software",
                    ) from None
                tile = save(tile, level, c, r)
                if level == coarse:
                    left, top = (overlap if c > 0 else 0), (overlap if r > 0 else 0)
                    w, h = dz.level_dimensions[level]
                    core = tile.crop((left, top, left + min(tile_size, w - c * tile_size), top + min(tile_size, h - r * tile_size)))
                    with paste_lock:
                        coarse_image.paste(core, (c * tile_size, r * tile_size))

            from tqdm import tqdm

            bar = tqdm(total=len(jobs) + n_coarser, desc=f"pyramid {source_path.name}", unit="tile",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False)
            try:
                if workers <= 1:
                    for job in jobs:
                        render(job)
                        bar.update()
                else:
                    with ThreadPoolExecutor(max_workers=workers) as pool:
                        try:
                            for i in range(0, len(jobs), 1024):  # in batches: few pending futures at a time
                                for _ in pool.map(render, jobs[i : i + 1024]):
                                    bar.update()
                        except BaseException:  # stop at the first error, not after every queued tile
                            pool.shutdown(wait=True, cancel_futures=True)
                            raise
                image = coarse_image
                for level in range(coarse - 1, -1, -1):  # each level halves the one above it
                    w, h = dz.level_dimensions[level]
                    image = image.resize((w, h), Image.Resampling.LANCZOS)
                    cols, rows = dz.level_tiles[level]
                    for r in range(rows):
                        for c in range(cols):
                            x0 = c * tile_size - (overlap if c > 0 else 0)
                            y0 = r * tile_size - (overlap if r > 0 else 0)
                            x1 = min(w, (c + 1) * tile_size + (overlap if c < cols - 1 else 0))
                            y1 = min(h, (r + 1) * tile_size + (overlap if r < rows - 1 else 0))
                            save(image.crop((x0, y0, x1, y1)), level, c, r)
                            bar.update()
            finally:
                bar.close()
            (partial / f"{DZI_NAME}.dzi").write_text(dz.get_dzi("jpeg"), encoding="utf-8")
            meta = {
                "schema": PYRAMID_SCHEMA,
                "source": str(real_path.resolve()),
                "kind": source_kind,
                "modality": modality,
                "width": int(W),
                "height": int(H),
                "mpp": mpp,
                "tile_size": tile_size,
                "overlap": overlap,
                "format": "jpeg",
                "levels": dz.level_count,
                "tiles": len(jobs) + n_coarser,
            }
            (partial / "pyramid.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    finally:
        osr.close()
    return out_dir


def _open_openslide(path: Path):
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:  # open_source succeeded, so this is rare
        raise GaplessError(path, f"OpenSlide cannot open it: {exc}", "convert it to a tiled pyramidal TIFF") from None


def _display_rgb(source):
    """An RGB uint8 picture of a whole cell image and the modality it was shown as."""
    import numpy as np

    from pipeline.tissue import detect_modality, read_overview, to_display_rgb

    pixels = source.read_region((0, 0), 0, source.dimensions)
    if pixels.dtype == np.uint8 and pixels.shape[-1] == 3:  # already a picture: show it as is
        return np.ascontiguousarray(pixels), "brightfield"
    W, H = source.dimensions
    overview, _ = read_overview(source, max(1.0, max(W, H) / 1024))
    modality = detect_modality(overview)
    rgb = to_display_rgb(pixels, modality)
    return np.ascontiguousarray(rgb), modality


def read_pyramid(pyramid_dir: str | Path) -> dict:
    """The geometry of a DZI pyramid folder (``slide.dzi`` + ``slide_files/``), checked."""
    pyramid_dir = Path(pyramid_dir)
    if not pyramid_dir.is_dir():
        raise GaplessError(pyramid_dir, "no such slide pyramid folder", _PYRAMID_FIX)
    dzi = pyramid_dir / f"{DZI_NAME}.dzi"
    if not dzi.is_file():
        found = sorted(pyramid_dir.glob("*.dzi"))
        if len(found) != 1:
            raise GaplessError(pyramid_dir, "no slide.dzi (Deep Zoom descriptor) in the pyramid folder", _PYRAMID_FIX)
        dzi = found[0]
    try:
        root = ET.fromstring(dzi.read_text(encoding="utf-8"))
        size = next(el for el in root.iter() if el.tag.endswith("Size"))
        info = {
            "tile_size": int(root.get("TileSize")),
            "overlap": int(root.get("Overlap")),
            "format": str(root.get("Format")),
            "width": int(size.get("Width")),
            "height": int(size.get("Height")),
        }
    except (ET.ParseError, StopIteration, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise GaplessError(dzi, f"not a Deep Zoom descriptor ({exc.__class__.__name__}: {exc})", _PYRAMID_FIX) from None
    if info["width"] < 1 or info["height"] < 1 or info["tile_size"] < 1 or info["overlap"] < 0:
        raise GaplessError(dzi, f"impossible Deep Zoom geometry {info}", _PYRAMID_FIX)
    if info["format"].lower() not in ("jpeg", "jpg", "png", "webp"):
        raise GaplessError(dzi, f"tile format {info['format']!r} is not one a browser shows", _PYRAMID_FIX)
    files = dzi.with_name(dzi.stem + "_files")
    levels = _dz_level_dimensions(info["width"], info["height"])
    top = files / str(len(levels) - 1)
    if not top.is_dir() or not (top / f"0_0.{info['format']}").is_file():
        raise GaplessError(files, "the pyramid's tiles are missing (no full-resolution level)", _PYRAMID_FIX)
    info.update(dzi=dzi, files=files, levels=len(levels))
    meta_path = pyramid_dir / "pyramid.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            info["mpp"] = meta.get("mpp")
            info["kind"] = meta.get("kind")
            info["modality"] = meta.get("modality")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    return info


def _dz_level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """Deep Zoom level sizes, 1×1 first, full resolution last (as OpenSlide's DeepZoomGenerator)."""
    size = (width, height)
    dims = [size]
    while size[0] > 1 or size[1] > 1:
        size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
        dims.append(size)
    return dims[::-1]


def _thumbnail_tile(pyr: dict) -> Path | None:
    """The single tile of the finest level that still fits in one tile: the slide's thumbnail."""
    dims = _dz_level_dimensions(pyr["width"], pyr["height"])
    best = None
    for level, (w, h) in enumerate(dims):
        if w <= pyr["tile_size"] and h <= pyr["tile_size"]:
            best = level
    if best is None:
        return None
    path = pyr["files"] / str(best) / f"0_0.{pyr['format']}"
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Heatmap inputs


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_heatmap_json(path: str | Path) -> dict:
    """Read and check one head's heatmap JSON; return it with ``overlay_path`` (absolute) added."""
    path = Path(path)
    if not path.is_file():
        raise GaplessError(path, "heatmap JSON not found", _HEATMAP_FIX)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GaplessError(path, f"not valid JSON ({exc})", _HEATMAP_FIX) from None
    if not isinstance(doc, dict):
        raise GaplessError(path, "a heatmap JSON must be an object", _HEATMAP_FIX)

    def bad(cause: str):
        raise GaplessError(path, cause, _HEATMAP_FIX)

    required = ("sample", "head", "normalisation", "colormap", "range", "width", "height", "overlay", "tile_extent", "tiles")
    missing = [k for k in required if k not in doc]
    if missing:
        bad(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for key in ("sample", "head", "colormap", "overlay"):
        if not isinstance(doc[key], str) or not doc[key]:
            bad(f"`{key}` must be a non-empty string, got {doc[key]!r}")
    if not isinstance(doc["normalisation"], str):
        bad(f"`normalisation` must be a string, got {doc['normalisation']!r}")
    for key in ("width", "height"):
        if not (isinstance(doc[key], int) and not isinstance(doc[key], bool) and doc[key] > 0):
            bad(f"`{key}` must be a positive integer (level-0 px), got {doc[key]!r}")
    rng = doc["range"]
    if not (isinstance(rng, list) and len(rng) == 2 and all(_is_num(v) and math.isfinite(v) for v in rng) and rng[0] <= rng[1]):
        bad(f"`range` must be [lo, hi] with lo <= hi, got {rng!r}")
    if not (_is_num(doc["tile_extent"]) and math.isfinite(doc["tile_extent"]) and doc["tile_extent"] > 0):
        bad(f"`tile_extent` must be a positive number of level-0 px, got {doc['tile_extent']!r}")
    mpp = doc.get("mpp")
    if mpp is not None and not (_is_num(mpp) and math.isfinite(mpp) and mpp > 0):
        bad(f"`mpp` must be a positive number (µm per level-0 px) or null, got {mpp!r}")
    if not isinstance(doc["tiles"], list):
        bad("`tiles` must be a list of [x, y, p_positive]")
    tiles = []
    for i, t in enumerate(doc["tiles"]):
        if not (isinstance(t, list) and len(t) == 3 and _is_num(t[0]) and _is_num(t[1]) and math.isfinite(t[0])
                and math.isfinite(t[1]) and (t[2] is None or _is_num(t[2]))):
            bad(f"tiles[{i}] must be [x, y, p_positive], got {t!r}")
        p = t[2] if t[2] is not None and math.isfinite(t[2]) else None
        tiles.append([round(t[0], 2) if isinstance(t[0], float) else t[0],
                      round(t[1], 2) if isinstance(t[1], float) else t[1],
                      None if p is None else round(float(p), 5)])
    scores = doc.get("scores") or {}
    if not isinstance(scores, dict):
        bad(f"`scores` must be an object of name: number, got {scores!r}")
    clean_scores = {}
    for k, v in scores.items():
        if v is not None and not _is_num(v):
            bad(f"score {k!r} must be a number or null, got {v!r}")
        if v is None or not math.isfinite(v):
            clean_scores[str(k)] = None
        else:  # counts (e.g. witness_cells) stay integers
            clean_scores[str(k)] = v if isinstance(v, int) else float(v)
    classes = doc.get("classes") or []
    if not isinstance(classes, list):
        bad(f"`classes` must be a list, got {classes!r}")
    run_id = doc.get("run_id")

    overlay = (path.parent / doc["overlay"]).resolve()
    if not overlay.is_file():
        raise GaplessError(overlay, f"the overlay PNG named in {path} is missing", _HEATMAP_FIX)
    try:
        from PIL import Image

        with Image.open(overlay) as im:
            ow, oh = im.size
            fmt = im.format
    except Exception as exc:  # Pillow raises several types for non-images
        raise GaplessError(overlay, f"the overlay is not an image ({exc})", _HEATMAP_FIX) from None
    if fmt != "PNG":
        raise GaplessError(overlay, f"the overlay must be a PNG, got {fmt}", _HEATMAP_FIX)
    W, H = doc["width"], doc["height"]
    if abs(ow * H - oh * W) > 2 * (W + H):  # more than ~2 px of rounding away from the slide's shape
        raise GaplessError(
            overlay,
            f"the overlay is {ow}×{oh} px, not the shape of the {W}×{H} slide it must cover",
            _HEATMAP_FIX,
        )
    return {
        "path": path,
        "sample": doc["sample"],
        "head": doc["head"],
        "run_id": None if run_id is None else str(run_id),
        "normalisation": doc["normalisation"],
        "colormap": doc["colormap"],
        "range": [float(rng[0]), float(rng[1])],
        "width": W,
        "height": H,
        "mpp": None if mpp is None else float(mpp),
        "overlay_path": overlay,
        "overlay_size": [ow, oh],
        "tile_extent": float(doc["tile_extent"]),
        "tiles": tiles,
        "classes": [str(c) for c in classes],
        "scores": clean_scores,
    }


def _colormap_stops(name: str, path: Path, n: int = 17) -> list[str]:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except (KeyError, ValueError):
        raise GaplessError(path, f"unknown matplotlib colormap {name!r}",
                           "use a matplotlib colormap name such as viridis, magma, inferno or turbo") from None
    out = []
    for i in range(n):
        r, g, b, _ = cmap(i / (n - 1))
        out.append("#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255)))
    return out


def head_sort_key(name: str) -> tuple:
    """The known heads in their usual order (HEAD_LABELS, gap first), then any other by name."""
    order = list(HEAD_LABELS)
    return (order.index(name) if name in order else len(order), name)


def _load_annotations(path: Path) -> list[dict]:
    """Outlines (exterior rings, level-0 px, flattened x, y, ...) per class, for drawing."""
    from pipeline.annotations import load_annotations

    ann = load_annotations(path)
    if len(ann.geometries) > _MAX_ANNOTATION_OBJECTS:
        raise GaplessError(path, f"{len(ann.geometries)} annotation objects; the viewer draws at most "
                           f"{_MAX_ANNOTATION_OBJECTS}", "pass only the objects worth showing (e.g. the positive class)")
    by_class: dict[str, list] = {}
    for geom, cls in zip(ann.geometries, ann.classes):
        polys = getattr(geom, "geoms", [geom])
        for g in polys:
            if g.geom_type == "Polygon":
                coords = g.exterior.coords
            elif g.geom_type == "LineString":
                coords = g.coords
            elif g.geom_type == "Point":
                coords = [(g.x, g.y)]
            else:
                continue
            flat = [round(v, 1) for xy in coords for v in xy[:2]]
            by_class.setdefault(cls or "unclassified", []).append(flat)
    out = []
    for i, (cls, rings) in enumerate(sorted(by_class.items())):
        out.append({"name": cls, "colour": _ANNOTATION_COLOURS[i % len(_ANNOTATION_COLOURS)], "rings": rings})
    return out


# ---------------------------------------------------------------------------------------------
# Pages


def _rel_url(target: Path, start_dir: Path) -> str:
    rel = os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())
    return quote(Path(rel).as_posix())


def _script_json(obj) -> str:
    """JSON safe inside a <script> element (no `</script>`, no `<!--`)."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _copy_assets(page_dir: Path) -> None:
    dest = page_dir / ASSETS_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        src = ASSETS / name
        if not src.is_file():
            raise GaplessError(src, "a viewer asset is missing from the installed package", "reinstall gapless (pip install -e .)")
        target = dest / name
        if not target.is_file() or target.read_bytes() != src.read_bytes():
            atomic_write(target, functools.partial(shutil.copyfile, src))




def _page_head(title: str, body_class: str) -> str:
    """The start of a page, up to and including ``<body>``: charset, viewport, title, the stylesheet."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{ASSETS_DIR}/viewer.css">
</head>
<body class="{body_class}">"""


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
    pointer and its probability for every head. ``annotations`` (QuPath GeoJSON, level-0 px) are
    drawn as outlines (e.g. the witness cells); ``info`` (e.g. label, group) is listed on the page;
    ``index_html`` is where the "all samples" link points (default: ``index.html`` beside the page).

    The summary is ``{"heads": {head: scores}, "info": info, "thumbnail": path or None}``.
    """
    out_html = Path(out_html)
    page_dir = out_html.parent
    if not isinstance(sample_id, str) or not sample_id:
        raise GaplessError(out_html, f"sample id must be a non-empty string, got {sample_id!r}", "pass the sample's id")
    pyr = read_pyramid(pyramid_dir)
    jsons = [heatmap_jsons] if isinstance(heatmap_jsons, (str, Path)) else list(heatmap_jsons)
    if not jsons:
        raise GaplessError(out_html, f"no heatmaps given for sample {sample_id!r}",
                           "pass at least one heatmap JSON (results/heatmaps/{head}/{sample}.json)")
    heads = [load_heatmap_json(p) for p in jsons]
    seen: dict[str, Path] = {}
    for h in heads:
        if h["sample"] != sample_id:
            raise GaplessError(h["path"], f"is the heatmap of sample {h['sample']!r}, not {sample_id!r}",
                               "pass the heatmaps of this sample only")
        if h["head"] in seen:
            raise GaplessError(h["path"], f"head {h['head']!r} given twice (also {seen[h['head']]})",
                               "pass one heatmap per head")
        seen[h["head"]] = h["path"]
        if (h["width"], h["height"]) != (pyr["width"], pyr["height"]):
            raise GaplessError(
                h["path"],
                f"the heatmap is for a {h['width']}×{h['height']} px slide but the pyramid in {pyramid_dir} is "
                f"{pyr['width']}×{pyr['height']} px",
                "build the pyramid from the same slide (level 0) the heatmap was computed on",
            )
    heads.sort(key=lambda h: head_sort_key(h["head"]))
    mpp = next((h["mpp"] for h in heads if h["mpp"] is not None), pyr.get("mpp"))
    thumb = _thumbnail_tile(pyr)
    ann = _load_annotations(Path(annotations)) if annotations is not None else []
    info = {str(k): v for k, v in (info or {}).items()}

    data = {
        "sample": sample_id,
        "mpp": mpp,
        "info": {k: ("" if v is None else str(v)) for k, v in info.items()},
        "index": _rel_url(Path(index_html), page_dir) if index_html is not None else "index.html",
        "pyramid": {
            "url": _rel_url(pyr["files"], page_dir) + "/",
            "width": pyr["width"],
            "height": pyr["height"],
            "tileSize": pyr["tile_size"],
            "overlap": pyr["overlap"],
            "format": pyr["format"],
        },
        "heads": [
            {
                "name": h["head"],
                "label": HEAD_LABELS.get(h["head"], h["head"]),
                "description": HEAD_DESCRIPTIONS.get(h["head"], ""),
                "runId": h["run_id"],
                "normalisation": h["normalisation"],
                "colormap": h["colormap"],
                "stops": _colormap_stops(h["colormap"], h["path"]),
                "range": h["range"],
                "overlay": _rel_url(h["overlay_path"], page_dir),
                "overlaySize": h["overlay_size"],
                "tileExtent": h["tile_extent"],
                "tiles": h["tiles"],
                "classes": h["classes"],
                "scores": h["scores"],
            }
            for h in heads
        ],
        "annotations": ann,
    }
    title = f"{sample_id} — gapless heatmaps"
    keys_heads = f"1&#8211;{len(heads)} pick a head, " if len(heads) > 1 else ""
    page = _page_head(title, "sample-page") + f"""
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
<script>window.GAPLESS_SAMPLE = {_script_json(data)};</script>
<script src="{ASSETS_DIR}/viewer.js"></script>
</body>
</html>
"""
    _copy_assets(page_dir)
    atomic_write_text(out_html, page)
    return {
        "heads": {h["head"]: dict(h["scores"]) for h in heads},
        "info": info,
        "thumbnail": str(thumb) if thumb is not None else None,
    }


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&#8211;"
    if _is_num(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    return html.escape(str(v))


def _split_summary(summary) -> tuple[dict, dict, str | None]:
    if summary is None:
        return {}, {}, None
    if not isinstance(summary, dict):
        raise GaplessError(None, f"an index summary must be a dict, got {type(summary).__name__}",
                           "pass the dict write_sample_page returned")
    if "heads" in summary and isinstance(summary["heads"], dict):
        heads = summary["heads"]
        info = summary.get("info") or {}
        thumb = summary.get("thumbnail")
    else:  # a bare {head: {metric: value}} mapping
        heads = {k: v for k, v in summary.items() if isinstance(v, dict)}
        info = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        thumb = None
    return {str(h): dict(s or {}) for h, s in heads.items()}, dict(info), thumb


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
    rows = []
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
        heads, info, thumb = _split_summary(summary)
        rows.append((str(sample_id), page_path, heads, info, thumb))

    # A count every head of a sample reports alike (e.g. witness_cells) is the sample's, shown once.
    candidates = {m for r in rows for h in r[2].values() for m, v in h.items() if isinstance(v, int) and not isinstance(v, bool)}
    shared = set()
    for m in sorted(candidates):
        if all(len({h[m] for h in r[2].values() if m in h}) <= 1 and all(isinstance(h[m], int) for h in r[2].values() if m in h)
               for r in rows):
            shared.add(m)
    for r in rows:
        for m in sorted(shared):
            value = next((h[m] for h in r[2].values() if m in h), None)
            if value is not None:
                r[3].setdefault(m.replace("_", " "), value)
            for h in r[2].values():
                h.pop(m, None)

    head_names = sorted({h for r in rows for h in r[2]}, key=head_sort_key)
    metrics = {h: sorted({m for r in rows for m in r[2].get(h, {})}) for h in head_names}
    all_metrics = sorted({m for h in head_names for m in metrics[h]})
    info_cols = []
    for r in rows:
        for k in r[3]:
            if k not in info_cols:
                info_cols.append(k)

    def metric_label(m: str) -> str:
        return html.escape(m.replace("_", " "))

    head_row = ["<th rowspan=2>sample</th>"] + [f"<th rowspan=2>{html.escape(k)}</th>" for k in info_cols]
    sub_row = []
    for h in head_names:
        n = max(1, len(metrics[h]))
        label = html.escape(HEAD_LABELS.get(h, h))
        head_row.append(f'<th colspan={n} class="head-col" title="{html.escape(HEAD_DESCRIPTIONS.get(h, h))}">{label}</th>')
        if metrics[h]:
            sub_row.extend(f"<th>{metric_label(m)}</th>" for m in metrics[h])
        else:
            sub_row.append("<th></th>")

    body = []
    for sample_id, page_path, heads, info, thumb in rows:
        best = {}
        for m in all_metrics:
            vals = [heads.get(h, {}).get(m) for h in head_names]
            vals = [v for v in vals if _is_num(v) and math.isfinite(v)]
            if len(vals) > 1 and len(set(vals)) > 1:  # a tie everywhere marks nothing
                best[m] = max(vals)
        href = html.escape(_rel_url(page_path, index_dir))
        thumb_html = ""
        if thumb and Path(thumb).is_file():
            thumb_html = f'<img class="thumb" src="{html.escape(_rel_url(Path(thumb), index_dir))}" alt="" loading="lazy">'
        cells = [f'<td class="sample"><a href="{href}">{thumb_html}<span>{html.escape(sample_id)}</span></a></td>']
        cells += [f"<td>{_fmt(info.get(k))}</td>" for k in info_cols]
        for h in head_names:
            if not metrics[h]:
                cells.append("<td></td>")
            for m in metrics[h]:
                v = heads.get(h, {}).get(m)
                is_best = m in best and _is_num(v) and v == best[m]
                cells.append(f'<td class="num{" best" if is_best else ""}">{_fmt(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")

    mean_cells = ['<th scope="row" title="over the samples that have the score">mean</th>'] + ["<td></td>" for _ in info_cols]
    for h in head_names:
        if not metrics[h]:
            mean_cells.append("<td></td>")
        for m in metrics[h]:
            vals = [r[2].get(h, {}).get(m) for r in rows]
            vals = [v for v in vals if _is_num(v) and math.isfinite(v)]
            mean_cells.append(f'<td class="num">{_fmt(sum(vals) / len(vals)) if vals else _fmt(None)}</td>')

    legend = "".join(
        f"<li><b>{html.escape(HEAD_LABELS.get(h, h))}</b> ({html.escape(h)}): {html.escape(HEAD_DESCRIPTIONS.get(h, ''))}</li>"
        for h in head_names
    )
    table = (
        '<table class="index-table"><thead><tr>' + "".join(head_row) + "</tr><tr>" + "".join(sub_row)
        + "</tr></thead><tbody>" + "".join(body) + "</tbody>"
        + ("<tfoot><tr>" + "".join(mean_cells) + "</tr></tfoot>" if rows and all_metrics else "")
        + "</table>"
    )
    if not rows:
        table = '<p class="muted">No samples yet.</p>'
    page = _page_head(title, "index-page") + f"""
<header class="bar"><h1>{html.escape(title)}</h1><span class="muted">{len(rows)} sample{'s' if len(rows) != 1 else ''}</span></header>
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
    _copy_assets(index_dir)
    atomic_write_text(out_html, page)
    return out_html
