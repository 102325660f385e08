"""The inputs of a sample page: each head's heatmap (checked against the sample and its pyramid), the
colours of its colormap, and the annotation outlines drawn over the slide.

A heatmap is the JSON :mod:`pipeline.heatmap.document` defines (one per head and sample) with its
overlay PNG; the head's label, description and display order come from it (``head_info``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.errors import GaplessError
from pipeline.heatmap.document import load_heatmap_json

_ANNOTATION_COLOURS = ("#00e5ff", "#ffe600", "#76ff03", "#ff40ff", "#ff9100", "#ffffff")
_MAX_ANNOTATION_OBJECTS = 50_000


def load_sample_heatmaps(out_html: Path, sample_id: str, pyr: dict, pyramid_dir, heatmap_jsons) -> list[dict]:
    """Each head's heatmap of ``sample_id`` (:func:`load_heatmap_json`), in display order (``head_info``).

    Checked: at least one, all of this sample, one per head, and each for the slide size of the
    pyramid ``pyr`` (:func:`pipeline.viewer.deepzoom.read_pyramid` of ``pyramid_dir``).
    """
    jsons: Sequence = [heatmap_jsons] if isinstance(heatmap_jsons, (str, Path)) else list(heatmap_jsons)
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
    return sorted(heads, key=lambda h: h["head_info"].sort_key())


def colormap_stops(name: str, path: Path, n: int = 17) -> list[str]:
    """``n`` evenly spaced colours (``#rrggbb``) of matplotlib colormap ``name``, for the legend's bar."""
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


def load_annotation_outlines(path: Path) -> list[dict]:
    """Outlines (exterior rings, level-0 px, flattened x, y, ...) per class, for drawing:
    ``[{"name": class, "colour": "#rrggbb", "rings": [[x, y, ...], ...]}, ...]``."""
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
