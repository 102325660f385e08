"""The heatmap JSON (``{sample}.json``, schema ``gapless.heatmap/1``): written by heatmaps, read by the viewer.

Keys (``JSON_KEYS``): ``schema``; ``sample``, ``head`` and the head's ``head_label``,
``head_description``, ``head_order`` (its ``HeadInfo``, so the viewer shows any head in its own words);
``run_id`` (the MLflow run of the model); ``normalisation``, ``colormap`` and ``range`` (the values at
the colormap's ends); ``width``, ``height`` (level-0 px) and ``mpp`` (µm per level-0 px, or null);
``overlay`` (the RGBA PNG's file name, beside the JSON); ``tile_extent`` (level-0 px); ``tiles``
([[x, y, p_positive], …]: level-0 top-left corners, probability rounded to 4 decimals); ``classes``;
``scores`` (name: number or null; empty without ground truth). Where the positive class's Grad-CAM
map was written too (``gapless heatmap --gradcam``), one more key after those, ``gradcam``: an object
with exactly ``GRADCAM_JSON_KEYS``, ``overlay`` (its RGBA PNG, beside the JSON), ``range`` and
``scores`` (its localisation scores, keyed as ``scores``), on the same canvas and normalisation; a
reader treats a JSON without the key as a heatmap without Grad-CAM.

:func:`document_text` writes one, :func:`load_heatmap_json` reads and checks one (with its overlay).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo

SCHEMA = "gapless.heatmap/1"
JSON_KEYS = ("schema", "sample", "head", "head_label", "head_description", "head_order", "run_id", "normalisation",
             "colormap", "range", "width", "height", "mpp", "overlay", "tile_extent", "tiles", "classes", "scores")
GRADCAM_JSON_KEYS = ("overlay", "range", "scores")
_HEATMAP_FIX = "write the heatmaps again with `gapless heatmap` (one JSON and one overlay PNG per head and sample)"


@dataclass(frozen=True)
class HeatmapDocument:
    """One head's heatmap of one sample, as the JSON holds it (see the module docstring)."""

    sample: str
    head: HeadInfo
    run_id: str | None
    normalisation: str
    colormap: str
    range: tuple[float, float]
    width: int
    height: int
    mpp: float | None
    overlay: str
    tile_extent: float
    tiles: list = field(default_factory=list)  # [[x, y, p_positive], ...]
    classes: list = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    gradcam: dict | None = None  # {overlay, range, scores} of the Grad-CAM map, or None

    def to_json(self) -> dict:
        doc = {"schema": SCHEMA, "sample": self.sample, "head": self.head.name, "head_label": self.head.shown,
               "head_description": self.head.description, "head_order": self.head.order, "run_id": self.run_id,
               "normalisation": self.normalisation, "colormap": self.colormap,
               "range": [float(f"{self.range[0]:.7g}"), float(f"{self.range[1]:.7g}")], "width": int(self.width),
               "height": int(self.height), "mpp": None if self.mpp is None else float(self.mpp),
               "overlay": self.overlay, "tile_extent": float(self.tile_extent), "tiles": self.tiles,
               "classes": list(self.classes), "scores": self.scores}
        assert tuple(doc) == JSON_KEYS
        if self.gradcam is not None:
            g = self.gradcam
            doc["gradcam"] = {"overlay": g["overlay"], "range": [float(f"{g['range'][0]:.7g}"), float(f"{g['range'][1]:.7g}")],
                              "scores": dict(g.get("scores") or {})}
            assert tuple(doc["gradcam"]) == GRADCAM_JSON_KEYS
        return doc


def document_text(document: HeatmapDocument) -> str:
    """The JSON text of ``document`` (compact, no NaN: a missing value is null)."""
    return json.dumps(document.to_json(), allow_nan=False, separators=(",", ":")) + "\n"


def write_document(path: Path, document: HeatmapDocument) -> None:
    Path(path).write_text(document_text(document), encoding="utf-8")


def is_number(v) -> bool:
    """A JSON number: int or float, not bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_heatmap_json(path: str | Path) -> dict:
    """Read and check one head's heatmap JSON; return it with ``overlay_path`` (absolute) and ``head_info`` added,
    and ``gradcam``: None, or its Grad-CAM map's ``overlay_path``, ``overlay_size``, ``range`` and ``scores``."""
    path = Path(path)
    if not path.is_file():
        raise GaplessError(path, "heatmap JSON not found", _HEATMAP_FIX)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GaplessError(path, f"not valid JSON ({exc})", _HEATMAP_FIX) from None
    if not isinstance(doc, dict):
        raise GaplessError(path, "a heatmap JSON must be an object", _HEATMAP_FIX)
    rng, mpp = _check_fields(path, doc)
    tiles = _checked_tiles(path, doc["tiles"])
    clean_scores = _checked_scores(path, doc.get("scores") or {})
    classes = doc.get("classes") or []
    if not isinstance(classes, list):
        raise GaplessError(path, f"`classes` must be a list, got {classes!r}", _HEATMAP_FIX)
    run_id = doc.get("run_id")

    overlay, ow, oh = _checked_overlay(path, doc)
    W, H = doc["width"], doc["height"]
    return {
        "path": path,
        "sample": doc["sample"],
        "head": doc["head"],
        "head_info": HeadInfo.from_dict({"label": doc.get("head_label") or doc["head"],
                                         "description": doc.get("head_description") or "",
                                         "order": doc.get("head_order", 1000)}, name=doc["head"]),
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
        "gradcam": _checked_gradcam(path, doc),
    }


def _bad(path: Path, cause: str):
    raise GaplessError(path, cause, _HEATMAP_FIX)


def _check_fields(path: Path, doc: dict) -> tuple[list, float | None]:
    """The schema and the scalar keys; returns the checked ``range`` and ``mpp``."""
    if doc.get("schema") != SCHEMA:
        found = doc.get("schema")
        _bad(path, f"schema {found!r}, not {SCHEMA!r}" + (" (written before heatmap JSONs had one)" if found is None else ""))
    required = ("sample", "head", "normalisation", "colormap", "range", "width", "height", "overlay", "tile_extent", "tiles")
    missing = [k for k in required if k not in doc]
    if missing:
        _bad(path, f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for key in ("sample", "head", "colormap", "overlay"):
        if not isinstance(doc[key], str) or not doc[key]:
            _bad(path, f"`{key}` must be a non-empty string, got {doc[key]!r}")
    if not isinstance(doc["normalisation"], str):
        _bad(path, f"`normalisation` must be a string, got {doc['normalisation']!r}")
    for key in ("width", "height"):
        if not (isinstance(doc[key], int) and not isinstance(doc[key], bool) and doc[key] > 0):
            _bad(path, f"`{key}` must be a positive integer (level-0 px), got {doc[key]!r}")
    rng = doc["range"]
    if not (isinstance(rng, list) and len(rng) == 2 and all(is_number(v) and math.isfinite(v) for v in rng) and rng[0] <= rng[1]):
        _bad(path, f"`range` must be [lo, hi] with lo <= hi, got {rng!r}")
    if not (is_number(doc["tile_extent"]) and math.isfinite(doc["tile_extent"]) and doc["tile_extent"] > 0):
        _bad(path, f"`tile_extent` must be a positive number of level-0 px, got {doc['tile_extent']!r}")
    mpp = doc.get("mpp")
    if mpp is not None and not (is_number(mpp) and math.isfinite(mpp) and mpp > 0):
        _bad(path, f"`mpp` must be a positive number (µm per level-0 px) or null, got {mpp!r}")
    return rng, mpp


def _checked_tiles(path: Path, raw) -> list:
    """``tiles`` as [[x, y, p_positive or None], ...], rounded as the viewer shows them."""
    if not isinstance(raw, list):
        _bad(path, "`tiles` must be a list of [x, y, p_positive]")
    tiles = []
    for i, t in enumerate(raw):
        if not (isinstance(t, list) and len(t) == 3 and is_number(t[0]) and is_number(t[1]) and math.isfinite(t[0])
                and math.isfinite(t[1]) and (t[2] is None or is_number(t[2]))):
            _bad(path, f"tiles[{i}] must be [x, y, p_positive], got {t!r}")
        p = t[2] if t[2] is not None and math.isfinite(t[2]) else None
        tiles.append([round(t[0], 2) if isinstance(t[0], float) else t[0],
                      round(t[1], 2) if isinstance(t[1], float) else t[1],
                      None if p is None else round(float(p), 5)])
    return tiles


def _checked_scores(path: Path, scores) -> dict:
    """``scores`` as name → number or None (NaN and infinities as None; counts stay integers)."""
    if not isinstance(scores, dict):
        _bad(path, f"`scores` must be an object of name: number, got {scores!r}")
    clean_scores = {}
    for k, v in scores.items():
        if v is not None and not is_number(v):
            _bad(path, f"score {k!r} must be a number or null, got {v!r}")
        if v is None or not math.isfinite(v):
            clean_scores[str(k)] = None
        else:  # counts (e.g. witness_cells) stay integers
            clean_scores[str(k)] = v if isinstance(v, int) else float(v)
    return clean_scores


def _checked_gradcam(path: Path, doc: dict) -> dict | None:
    """The ``gradcam`` object checked (its overlay as the head's is), or None where there is none."""
    g = doc.get("gradcam")
    if g is None:
        return None
    if not isinstance(g, dict) or not isinstance(g.get("overlay"), str) or not g["overlay"]:
        _bad(path, f"`gradcam` must be an object with a non-empty `overlay`, got {g!r}")
    rng = g.get("range")
    if not (isinstance(rng, list) and len(rng) == 2 and all(is_number(v) and math.isfinite(v) for v in rng) and rng[0] <= rng[1]):
        _bad(path, f"`gradcam.range` must be [lo, hi] with lo <= hi, got {rng!r}")
    overlay, ow, oh = _checked_overlay(path, {**doc, "overlay": g["overlay"]})
    return {"overlay_path": overlay, "overlay_size": [ow, oh], "range": [float(rng[0]), float(rng[1])],
            "scores": _checked_scores(path, g.get("scores") or {})}


def _checked_overlay(path: Path, doc: dict) -> tuple[Path, int, int]:
    """The overlay PNG beside the JSON: it exists, is a PNG, and has the slide's shape; (path, width, height)."""
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
    return overlay, ow, oh
