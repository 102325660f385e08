"""Annotations as QuPath exports them: GeoJSON features in level-0 pixel coordinates.

A feature's class is ``properties.classification.name`` (older QuPath: a plain string). A tile's
label is 1 when its footprint touches a positive object, else 0.
"""

from __future__ import annotations

import json
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
) -> np.ndarray:
    """(N,) int8: 1 where the tile [x, x+extent) × [y, y+extent) (level-0 px) touches a positive object.

    Check the annotations' frame first (:func:`check_frame`): objects off the image label nothing.
    """
    from shapely import STRtree, box

    labels = np.zeros(len(coords), dtype=np.int8)
    positives = annotations.positive(positive_classes)
    if not positives or len(coords) == 0:
        return labels
    tree = STRtree(positives)
    x = coords[:, 0].astype(float)
    y = coords[:, 1].astype(float)
    tiles = box(x, y, x + extent, y + extent)
    tile_idx, _ = tree.query(tiles, predicate="intersects")
    labels[np.unique(tile_idx)] = 1
    return labels


# At least this share of the positive objects must touch tissue; below it, the coordinates are
# likely in another frame. Measured on a demo slide: 100 % in the right frame; 64 % halved, 23 %
# quartered (a downsampled level's frame), 82 % flipped vertically, 67 % shifted by 500 px.
MIN_ON_TISSUE = 0.9
FRAME_FIX = ("the coordinates must be level-0 pixels of this very image: export from QuPath in pixel units on the "
             "full-resolution image, and check that the sheet pairs each image with its own annotations")


def check_frame(annotations: Annotations, size: tuple[int, int], mask: np.ndarray, mask_downsample: Sequence[float],
                positive_classes: Sequence[str] = ()) -> str | None:
    """Check that the positive objects are in the image's level-0 frame; return a QC flag, or None.

    ``size``: the image's (width, height) in level-0 px; ``mask``: its tissue mask, each pixel
    ``mask_downsample`` (x, y) level-0 px. An object entirely outside the image cannot be right:
    ``GaplessError``. When fewer than ``MIN_ON_TISSUE`` of the objects inside touch tissue (any tissue
    within the object's bounding box, one mask pixel around), the annotations are likely in another
    frame (a downsampled level, a flipped or shifted image): the flag ``annotations off tissue``,
    which training refuses unless told to accept it.
    """
    from shapely import box

    positives = annotations.positive(positive_classes)
    if not positives:
        return None
    width, height = size
    image = box(0, 0, width, height)
    inside = [g for g in positives if g.intersects(image)]
    outside = len(positives) - len(inside)
    if outside:
        x0, y0, x1, y1 = np.array([g.bounds for g in positives]).T
        raise GaplessError(
            annotations.path,
            f"{outside} of {len(positives)} positive objects are entirely outside the {width}×{height}-px image "
            f"(the objects span x {x0.min():.0f} to {x1.max():.0f}, y {y0.min():.0f} to {y1.max():.0f})",
            FRAME_FIX,
        )
    dx, dy = float(mask_downsample[0]), float(mask_downsample[1])
    rows, cols = mask.shape
    on_tissue = 0
    for g in inside:
        x0, y0, x1, y1 = g.bounds
        i0, i1 = max(0, int(y0 / dy) - 1), min(rows, int(y1 / dy) + 2)
        j0, j1 = max(0, int(x0 / dx) - 1), min(cols, int(x1 / dx) + 2)
        on_tissue += bool(mask[i0:i1, j0:j1].any())
    if on_tissue >= MIN_ON_TISSUE * len(inside):
        return None
    return (f"annotations off tissue: {on_tissue} of {len(inside)} positive objects ({on_tissue / len(inside):.0%}) "
            f"touch tissue")
