"""A sample's tile scores as GeoJSON that QuPath imports as tile objects, one measurement per head.

QuPath's GeoJSON form (``PathObjectTypeAdapters`` in qupath-core, v0.4 and later): a
``FeatureCollection`` of ``Feature``\\ s whose ``geometry`` is in level-0 pixels of the image (origin
top-left) and whose ``properties`` hold ``objectType`` (``annotation``, ``detection``, ``tile``,
``cell``, ``tmaCore``) and ``measurements``, an object of name → number. ``id`` (a UUID),
``classification``, ``name``, ``color`` and ``isLocked`` are optional: QuPath gives imported objects
new ids and leaves them unclassified and unlocked, as tiles of scores should be.

A head without a value for a tile (a NaN probability, or a tile another head lacks) has no entry in
that tile's ``measurements``, which QuPath shows as a missing value (NaN). It is not written as
``null``: QuPath reads measurements with ``MeasurementList.putAll(Map<String, Number>)``, which fails on
a null value, and the file would not import at all.

In QuPath: File > Import objects from file (or drag the file onto the open slide), then Measure > Show
measurement maps and pick a head.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.files import atomic_write_text
from pipeline.heatmap.document import load_heatmap_json

_FIX = "pass the heatmap JSONs of one sample, one per head (results/heatmaps/{head}/seed{seed}/{sample}.json)"


def sample_heatmaps(heatmap_jsons: Sequence[str | Path]) -> list[dict]:
    """The heatmaps of one sample (:func:`load_heatmap_json`), one per head, in the heads' display order;
    checked: the same sample, slide size and tile extent for all."""
    if not heatmap_jsons:
        raise GaplessError(None, "no heatmap JSON given", _FIX)
    heads = [load_heatmap_json(p) for p in heatmap_jsons]
    first = heads[0]
    seen: dict[str, Path] = {}
    for h in heads:
        if h["sample"] != first["sample"]:
            raise GaplessError(h["path"], f"is the heatmap of sample {h['sample']!r}, but {first['path']} is of "
                               f"{first['sample']!r}", _FIX)
        if h["head"] in seen:
            raise GaplessError(h["path"], f"head {h['head']!r} given twice (also {seen[h['head']]})", _FIX)
        seen[h["head"]] = h["path"]
        if (h["width"], h["height"]) != (first["width"], first["height"]):
            raise GaplessError(h["path"], f"is for a {h['width']}×{h['height']} px slide, {first['path']} for "
                               f"{first['width']}×{first['height']} px", _FIX)
        if not math.isclose(h["tile_extent"], first["tile_extent"], rel_tol=1e-9):
            raise GaplessError(h["path"], f"has tiles of {h['tile_extent']:g} px, {first['path']} of "
                               f"{first['tile_extent']:g} px: their tiles do not line up",
                               "map every head from the same tile store")
        for x, y, p in h["tiles"]:
            if p is not None and not 0 <= p <= 1:
                raise GaplessError(h["path"], f"tile ({x}, {y}) has probability {p}, outside [0, 1]", _FIX)
    return sorted(heads, key=lambda h: h["head_info"].sort_key())


def tile_features(heads: list[dict]) -> list[dict]:
    """One GeoJSON tile feature per tile position of any head (sorted by y, then x): its square in level-0
    px and each head's probability of the positive class as a measurement named after the head."""
    extent = heads[0]["tile_extent"]
    measurements: dict[tuple, dict] = {}
    for h in heads:
        for x, y, p in h["tiles"]:
            values = measurements.setdefault((x, y), {})
            if p is not None:
                values[h["head"]] = p
    e = int(extent) if float(extent).is_integer() else extent
    return [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + e, y], [x + e, y + e], [x, y + e], [x, y]]]},
            "properties": {"objectType": "tile", "measurements": values},
        }
        for (x, y), values in sorted(measurements.items(), key=lambda item: (item[0][1], item[0][0]))
    ]


def qupath_geojson_text(features: list[dict]) -> str:
    """A FeatureCollection, one feature per line (compact, yet a diff or grep shows single tiles)."""
    lines = ",\n".join(json.dumps(f, separators=(",", ":"), allow_nan=False) for f in features)
    return '{"type":"FeatureCollection","features":[\n' + lines + "\n]}\n"


def write_qupath_geojson(heatmap_jsons: Sequence[str | Path], out: str | Path) -> dict:
    """Write the GeoJSON of one sample's tiles (every head's heatmap JSON in ``heatmap_jsons``) to ``out``,
    atomically. Returns ``sample``, ``heads`` (names, in display order), ``tiles`` (features) and ``path``."""
    heads = sample_heatmaps(heatmap_jsons)
    features = tile_features(heads)
    path = atomic_write_text(out, qupath_geojson_text(features))
    return {"sample": heads[0]["sample"], "heads": [h["head"] for h in heads], "tiles": len(features), "path": path}
