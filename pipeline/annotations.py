"""Annotations as QuPath exports them: GeoJSON features in level-0 pixel coordinates.

A feature's class is ``properties.classification.name`` (older QuPath: a plain string). A tile's
label is 1 when its footprint touches a positive object, else 0.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import GaplessError

_FIX = "export the annotations from QuPath as GeoJSON (File > Export objects as GeoJSON, pixel units)"


@dataclass(frozen=True)
class Annotations:
    """Geometries (shapely) in level-0 px with their class names."""

    path: Path
    geometries: list
    classes: list[str]

    def positive(self, positive_classes: Sequence[str] = ()) -> list:
        """Geometries whose class is in ``positive_classes``; every geometry when that is empty."""
        if not positive_classes:
            return list(self.geometries)
        wanted = set(positive_classes)
        return [g for g, c in zip(self.geometries, self.classes) if c in wanted]


def load_annotations(path: str | Path) -> Annotations:
    """Read a GeoJSON FeatureCollection (or a bare feature list, as QuPath also writes)."""
    from shapely.geometry import shape

    path = Path(path)
    if not path.is_file():
        raise GaplessError(path, "annotation file not found", "check the `annotations` path in the sample sheet")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GaplessError(path, f"not valid JSON ({exc})", _FIX) from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise GaplessError(path, "not a GeoJSON FeatureCollection", _FIX)
    geometries, classes = [], []
    for i, feature in enumerate(features):
        try:
            geom = shape(feature["geometry"])
        except Exception as exc:  # shapely raises several types for malformed geometry
            raise GaplessError(path, f"feature {i} has no valid geometry ({exc})", _FIX) from None
        if geom.is_empty:
            continue
        if not geom.is_valid:
            geom = geom.buffer(0)
        props = feature.get("properties") or {}
        cls = props.get("classification")
        if isinstance(cls, dict):
            cls = cls.get("name")
        geometries.append(geom)
        classes.append(str(cls) if cls is not None else "")
    return Annotations(path, geometries, classes)


def tile_labels(
    annotations: Annotations,
    coords: np.ndarray,
    extent: float,
    positive_classes: Sequence[str] = (),
    bounds: tuple[int, int] | None = None,
) -> np.ndarray:
    """(N,) int8: 1 where the tile [x, x+extent) × [y, y+extent) (level-0 px) touches a positive object."""
    from shapely import STRtree, box

    labels = np.zeros(len(coords), dtype=np.int8)
    positives = annotations.positive(positive_classes)
    if not positives or len(coords) == 0:
        return labels
    tree = STRtree(positives)
    if bounds is not None and not len(tree.query(box(0, 0, bounds[0], bounds[1]), predicate="intersects")):
        warnings.warn(
            f"{annotations.path}: no positive object lies inside the image ({bounds[0]}×{bounds[1]} px); "
            "are the coordinates in level-0 pixels?",
            stacklevel=2,
        )
    x = coords[:, 0].astype(float)
    y = coords[:, 1].astype(float)
    tiles = box(x, y, x + extent, y + extent)
    tile_idx, _ = tree.query(tiles, predicate="intersects")
    labels[np.unique(tile_idx)] = 1
    return labels
