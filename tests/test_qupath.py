"""`gapless qupath`: a sample's tile scores as GeoJSON tile objects in QuPath's documented form.

QuPath's form is its reader's (qupath-core ``PathObjectTypeAdapters``, v0.4 and later): a
FeatureCollection of Features, geometry in level-0 px, ``properties.objectType`` one of QuPath's object
types and ``properties.measurements`` an object of name → number (a null there fails the whole import:
``MeasurementList.putAll`` unboxes every value). Every feature of a written file is checked against that
form as a JSON Schema and against the tile it stands for.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from pipeline.cli import main
from pipeline.errors import GaplessError
from pipeline.head_info import registered_heads
from pipeline.heatmap.document import HeatmapDocument, document_text
from pipeline.qupath import write_qupath_geojson

W, H, EXT = 640, 384, 128

# QuPath's GeoJSON object, as its reader takes it (optional keys typed as it writes them)
QUPATH_FEATURE = {
    "type": "object",
    "required": ["type", "geometry", "properties"],
    "properties": {
        "type": {"const": "Feature"},
        "id": {"type": "string", "format": "uuid"},
        "geometry": {
            "type": "object",
            "required": ["type", "coordinates"],
            "properties": {
                "type": {"const": "Polygon"},
                "coordinates": {"type": "array", "minItems": 1, "items": {
                    "type": "array", "minItems": 4,
                    "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}}},
            },
        },
        "properties": {
            "type": "object",
            "required": ["objectType"],
            "properties": {
                "objectType": {"enum": ["annotation", "detection", "tile", "cell", "tmaCore"]},
                "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                "classification": {"type": "object", "required": ["name"]},
                "name": {"type": "string"},
                "isLocked": {"type": "boolean"},
            },
        },
    },
}
QUPATH_COLLECTION = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {"type": {"const": "FeatureCollection"}, "features": {"type": "array", "items": QUPATH_FEATURE}},
}


def heatmap(folder, head: str, tiles, sample="S1", extent=EXT):
    """A heatmap JSON (and its overlay) as pipeline.heatmap writes it."""
    out = folder / head
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((H // 16, W // 16, 4), np.uint8), "RGBA").save(out / f"{sample}.png")
    doc = HeatmapDocument(sample=sample, head=registered_heads()[head], run_id=f"run-{head}", normalisation="rank",
                          colormap="viridis", range=(0.0, 1.0), width=W, height=H, mpp=0.5, overlay=f"{sample}.png",
                          tile_extent=extent, tiles=tiles, classes=["negative", "positive"], scores={})
    path = out / f"{sample}.json"
    path.write_text(document_text(doc), encoding="utf-8")
    return path


def grid(p, skip=()):
    """Every tile of the W × H slide with probability p(x, y), but those in ``skip``."""
    return [[x, y, p(x, y)] for y in range(0, H, EXT) for x in range(0, W, EXT) if (x, y) not in skip]


@pytest.fixture
def three_heads(tmp_path):
    """gap on every tile but (512, 256); saol on every tile, null (a NaN map) at (0, 0); max on every tile but (0, 128)."""
    gap = {(x, y): round((x + y) / (W + H), 4) for y in range(0, H, EXT) for x in range(0, W, EXT)}
    saol = {k: round(1 - v, 4) for k, v in gap.items()}
    maxp = {k: 0.5 for k in gap}
    paths = [
        heatmap(tmp_path, "gap", grid(lambda x, y: gap[x, y], skip={(512, 256)})),
        heatmap(tmp_path, "saol", grid(lambda x, y: None if (x, y) == (0, 0) else saol[x, y])),
        heatmap(tmp_path, "max", grid(lambda x, y: maxp[x, y], skip={(0, 128)})),
    ]
    expected = {k: {"gap": gap[k], "saol": saol[k], "max": maxp[k]} for k in gap}
    del expected[512, 256]["gap"], expected[0, 0]["saol"], expected[0, 128]["max"]
    return paths, expected


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_every_feature_is_a_qupath_tile_with_a_measurement_per_head(three_heads, tmp_path):
    paths, expected = three_heads
    out = tmp_path / "out" / "S1.geojson"
    result = write_qupath_geojson(paths, out)
    assert result == {"sample": "S1", "heads": ["gap", "saol", "max"], "tiles": len(expected), "path": out}
    doc = _strict_json(out.read_text(encoding="utf-8"))  # standard JSON: no NaN, no Infinity
    jsonschema.validate(doc, QUPATH_COLLECTION)
    heads = set(result["heads"])
    seen = set()
    for feature in doc["features"]:
        ring = feature["geometry"]["coordinates"]
        assert len(ring) == 1 and len(ring[0]) == 5 and ring[0][0] == ring[0][-1]  # one closed ring, a square
        (x, y), corners = ring[0][0], {tuple(pt) for pt in ring[0]}
        assert corners == {(x, y), (x + EXT, y), (x + EXT, y + EXT), (x, y + EXT)}  # the tile, level-0 px
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and polygon.area == EXT * EXT
        props = feature["properties"]
        assert props["objectType"] == "tile"
        m = props["measurements"]
        assert set(m) <= heads and all(0 <= v <= 1 for v in m.values())
        assert m == expected[x, y]  # each head's p at this tile; a head without one has no entry
        assert (x, y) not in seen
        seen.add((x, y))
    assert seen == set(expected)  # the heads' tiles line up: one feature per position, all heads on it
    assert [tuple(f["geometry"]["coordinates"][0][0]) for f in doc["features"]] == sorted(seen, key=lambda k: (k[1], k[0]))
    assert not list(out.parent.glob("*.partial*")) and not list(out.parent.glob(".*"))


def test_heads_must_be_of_one_sample_with_tiles_that_line_up(tmp_path):
    gap = heatmap(tmp_path / "a", "gap", grid(lambda x, y: 0.5))
    cases = [
        ([], "no heatmap JSON"),
        ([gap, heatmap(tmp_path / "b", "saol", grid(lambda x, y: 0.5), sample="S2")], "of sample 'S2'"),
        ([gap, gap], "given twice"),
        ([gap, heatmap(tmp_path / "c", "saol", grid(lambda x, y: 0.5), extent=64)], "do not line up"),
        ([gap, heatmap(tmp_path / "d", "saol", grid(lambda x, y: 1.5))], "outside \\[0, 1\\]"),
        ([tmp_path / "missing.json"], "not found"),
    ]
    for paths, message in cases:
        with pytest.raises(GaplessError, match=message) as err:
            write_qupath_geojson(paths, tmp_path / "x.geojson")
        assert err.value.fix
    assert not (tmp_path / "x.geojson").exists()


def test_qupath_command(three_heads, tmp_path, capsys):
    paths, expected = three_heads
    out = tmp_path / "S1.geojson"
    assert main(["qupath", *map(str, paths), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"S1: {len(expected)} tiles" in line and "(gap, saol, max)" in line and str(out) in line
    jsonschema.validate(_strict_json(out.read_text()), QUPATH_COLLECTION)
    assert main(["qupath", str(paths[0]), str(paths[0]), "--out", str(tmp_path / "y.geojson")]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "y.geojson").exists()
    features = _strict_json(out.read_text())["features"]
    assert sum(len(f["properties"]["measurements"]) for f in features) == sum(len(v) for v in expected.values())
