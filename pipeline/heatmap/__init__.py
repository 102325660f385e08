"""Heatmaps: each head's spatial map stitched back onto the slide, normalised, written, scored.

    result = heatmap_sample("results/tiles/S1.zarr", "results/models/slide/saol/seed0", "results/heatmaps/saol/seed0", "S1")

The stages, one module each:

- :mod:`~pipeline.heatmap.maps`: inference over a store, batch by batch (``TileMaps``);
- :mod:`~pipeline.heatmap.gradcam`: the positive class's Grad-CAM, one post-hoc map for every head,
  from the same forward pass (``gradcam=True`` everywhere below; ``gapless heatmap --gradcam``);
- :mod:`~pipeline.heatmap.canvas`: each tile's map placed on a grid over the slide, overlaps averaged,
  memory bounded by the grid (``SlideCanvas``, ``stitch_store``, ``StitchedMaps``);
- :mod:`~pipeline.heatmap.scores`: normalisations shared by every head, localisation scores;
- :mod:`~pipeline.heatmap.outputs`: OME-Zarr, PNG, RGBA overlay, written together;
- :mod:`~pipeline.heatmap.document`: the JSON the viewer reads (its one writer and reader);
- :mod:`~pipeline.heatmap.run`: the entry points and MLflow logging.

A trained model is read from its run folder by :func:`pipeline.run_folder.load_trained`.
"""

from pipeline.heatmap.canvas import (
    BYTES_PER_CELL,
    BYTES_PER_TILE,
    FIXED_BYTES,
    GRADCAM_BYTES_PER_CELL,
    MIN_CELL_TISSUE,
    MIN_COVERAGE,
    SlideCanvas,
    StitchedMaps,
    canvas_shape,
    cell_tissue_fraction,
    stitch,
    stitch_store,
)
from pipeline.heatmap.document import GRADCAM_JSON_KEYS, JSON_KEYS, HeatmapDocument, load_heatmap_json
from pipeline.heatmap.gradcam import forward_grad_cam, grad_cam, supports_grad_cam
from pipeline.heatmap.maps import TileMaps, infer_store, iter_tile_maps
from pipeline.heatmap.outputs import COLORMAP, PNG_WIDTH_PX, overlay_image, write_heatmap
from pipeline.heatmap.run import heatmap_model, heatmap_sample
from pipeline.heatmap.scores import GRADCAM_PREFIX, MAP_KINDS, NORMALISATIONS, normalise, score_heatmap
from pipeline.run_folder import load_trained

__all__ = [
    "BYTES_PER_CELL",
    "BYTES_PER_TILE",
    "COLORMAP",
    "FIXED_BYTES",
    "GRADCAM_BYTES_PER_CELL",
    "GRADCAM_JSON_KEYS",
    "GRADCAM_PREFIX",
    "JSON_KEYS",
    "MAP_KINDS",
    "MIN_CELL_TISSUE",
    "MIN_COVERAGE",
    "NORMALISATIONS",
    "PNG_WIDTH_PX",
    "HeatmapDocument",
    "SlideCanvas",
    "StitchedMaps",
    "TileMaps",
    "canvas_shape",
    "cell_tissue_fraction",
    "forward_grad_cam",
    "grad_cam",
    "heatmap_model",
    "heatmap_sample",
    "infer_store",
    "iter_tile_maps",
    "load_heatmap_json",
    "load_trained",
    "normalise",
    "overlay_image",
    "score_heatmap",
    "stitch",
    "stitch_store",
    "supports_grad_cam",
    "write_heatmap",
]
