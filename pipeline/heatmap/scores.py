"""Normalising a stitched map onto a scale shared by every head, and scoring it against witnesses.

Normalisations (``NORMALISATIONS``), of the positive class = the last class:
  ``raw``: the stitched contribution map (units and meaning per head, see pipeline/models/heads.py;
    not comparable across heads). Range: [min, max] over tissue cells.
  ``rank`` (default): each tissue cell's per-slide percentile of the raw map,
    (rank − 1) / (n − 1) with ties given their average rank, in [0, 1]. Range [0, 1] for every head,
    so heads compare side by side; monotone in ``raw``, so the localisation scores are the same.
  ``attention``: the tile's probability of the positive class, p, spread over the tile by the head's
    spatial weights w: value_ij = p · w_ij / max(w), in [0, p] ⊂ [0, 1] (the most weighted position
    shows p; uniform weights give p everywhere). w is the head's exact share of p where its
    contribution sums to p (saol: A_ij·Y_ij), else its attention map (attnpool, cbam), else the
    softmax over positions of the positive contribution (gap, max). Range [0, 1] for every head.
The normalisation, the weights used and the range are recorded in every output.

Map kinds (``MAP_KINDS``): ``head``, the head's own contribution map (above), and ``gradcam``, the
positive class's Grad-CAM (:mod:`pipeline.heatmap.gradcam`), one post-hoc map computed the same way
for every head. A Grad-CAM map is normalised as the head's is: ``raw`` is the map itself (≥ 0),
``rank`` its per-slide percentile, ``attention`` p · g_ij / max(g) with g the tile's Grad-CAM.

Scores (``score_heatmap``), where witness outlines exist: ``localisation_auroc``, the AUROC of the
map at tissue cells touching a witness against all other tissue cells, and ``pointing_game_top{k}``
for k in (1, 5): the fraction of the k highest tissue cells that touch a witness, k = 1 being the
classic pointing game (ties at the k-th value are counted at their expected hit rate under random
order, so a flat map scores the witness base rate, not a lucky hit; k is capped at the number of
tissue cells), plus the counts ``witness_cells`` and ``tissue_cells``. The AUROC is None where a
sample has no witness cell or no other tissue cell, the pointing game where it has no witness cell
(negative samples). Logged to the head's MLflow run as ``heatmap/{sample}/{score}``, the PNG as an
artifact under ``heatmaps/``; the Grad-CAM map's localisation scores (``GRADCAM_SCORES``) as
``heatmap/{sample}/gradcam_{score}`` (``GRADCAM_PREFIX``) beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import GaplessError
from pipeline.heatmap.canvas import StitchedMaps

NORMALISATIONS = ("raw", "rank", "attention")
NORMALISATION_LABELS = {
    "raw": "raw contribution of the positive class",
    "rank": "per-slide percentile of the positive contribution",
    "attention": "P(positive) spread by the head's spatial weights",
}
GRADCAM_LABEL = "Grad-CAM"
GRADCAM_NORMALISATION_LABELS = {
    "raw": "Grad-CAM of the positive class",
    "rank": "per-slide percentile of the positive class's Grad-CAM",
    "attention": "P(positive) spread by the tile's Grad-CAM",
}
SPREAD_WEIGHTS = {"share": "the head's share of p (contribution / p)", "attention": "the head's attention map",
                  "softmax": "softmax over positions of the positive contribution"}
POINTING_K = (1, 5)
MAP_KINDS = ("head", "gradcam")
GRADCAM_PREFIX = "gradcam_"  # the Grad-CAM map's scores: gradcam_localisation_auroc, gradcam_pointing_game_top1, …
GRADCAM_SCORES = ("localisation_auroc", *(f"pointing_game_top{k}" for k in POINTING_K))  # prefixed when logged


def check_normalisation(method: str) -> None:
    if method not in NORMALISATIONS:
        raise GaplessError(None, f"unknown normalisation {method!r}", f"choose one of {', '.join(NORMALISATIONS)}")


def normalise(maps: StitchedMaps, method: str = "rank", kind: str = "head") -> tuple[np.ndarray, tuple[float, float]]:
    """(rows, cols) float32 map on the chosen scale (NaN outside tissue) and its colour range (lo, hi).

    ``kind``: ``head`` (the head's own map) or ``gradcam`` (its Grad-CAM map; ``maps`` must hold one)."""
    check_normalisation(method)
    if kind == "head":
        raw_map, spread_map = maps.raw, maps.spread
    elif kind == "gradcam":
        if maps.gradcam is None:
            raise GaplessError(None, "these stitched maps have no Grad-CAM map", "stitch with gradcam=True")
        raw_map, spread_map = maps.gradcam, maps.gradcam_spread
    else:
        raise GaplessError(None, f"unknown map kind {kind!r}", f"choose one of {', '.join(MAP_KINDS)}")
    valid = maps.valid & np.isfinite(raw_map)
    out = np.full(raw_map.shape, np.nan, np.float32)
    if method == "attention":
        out[valid] = spread_map[valid]
        return out, (0.0, 1.0)
    raw = raw_map[valid]
    if method == "rank":
        if raw.size:
            out[valid] = _percentile_ranks(raw) if raw.size > 1 else 0.5
        return out, (0.0, 1.0)
    out[valid] = raw
    if not raw.size:
        return out, (0.0, 1.0)
    lo, hi = float(raw.min()), float(raw.max())
    return out, (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _percentile_ranks(values: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """(rank − 1) / (n − 1) of each value among ``values`` (1-D, n > 1), ties at their average rank.

    The average rank of x is (#{< x} + #{≤ x} + 1) / 2; both counts come from one sorted copy, in
    blocks, so the work space is the sorted copy plus a block.
    """
    ordered = np.sort(values)
    out = np.empty(values.size, np.float32)
    for i in range(0, values.size, block):
        part = values[i : i + block]
        below = np.searchsorted(ordered, part, "left")
        at_most = np.searchsorted(ordered, part, "right")
        out[i : i + block] = (below + at_most - 1) / (2.0 * (values.size - 1))
    return out


def _witness_cells(shape: tuple[int, int], cell: float, geometries: Sequence) -> np.ndarray:
    """(rows, cols) bool: cells whose square touches (intersects) one of ``geometries`` (level-0 px)."""
    import shapely

    rows, cols = shape
    hit = np.zeros(shape, bool)
    for g in geometries:
        if g is None or g.is_empty:
            continue
        x0, y0, x1, y1 = g.bounds
        c0, c1 = max(0, math.floor(x0 / cell)), min(cols - 1, math.floor(x1 / cell))
        r0, r1 = max(0, math.floor(y0 / cell)), min(rows - 1, math.floor(y1 / cell))
        if c1 < c0 or r1 < r0:
            continue
        shapely.prepare(g)
        for top in range(r0, r1 + 1, 64):  # 64 rows of cell squares at a time, for a large outline
            bottom = min(r1 + 1, top + 64)
            rr, cc = np.mgrid[top:bottom, c0 : c1 + 1]
            boxes = shapely.box(cc * cell, rr * cell, (cc + 1) * cell, (rr + 1) * cell)
            hit[top:bottom, c0 : c1 + 1] |= shapely.intersects(g, boxes)
    return hit


def score_heatmap(values: np.ndarray, cell_size: float, annotations, positive_classes: Sequence[str] = (),
                  k: Sequence[int] = POINTING_K) -> dict:
    """Localisation scores of a map against witness outlines (see the module docstring).

    values: (rows, cols), NaN where there is no tissue; canvas cell (i, j) covers level-0
    [j·cell, (j+1)·cell) × [i·cell, (i+1)·cell). annotations: an ``Annotations``, a GeoJSON path, or
    shapely geometries in level-0 px; ``positive_classes`` picks the witnesses (all when empty).
    Returns ``localisation_auroc``, ``pointing_game_top{k}`` (None when undefined), ``witness_cells``
    and ``tissue_cells``.
    """
    from pipeline.annotations import Annotations, load_annotations

    if isinstance(annotations, (str, Path)):
        annotations = load_annotations(annotations)
    geometries = annotations.positive(positive_classes) if isinstance(annotations, Annotations) else list(annotations or [])
    values = np.asarray(values)
    valid = np.isfinite(values)
    witness = _witness_cells(values.shape, float(cell_size), geometries) & valid
    positives, n_w, n = values[witness], int(witness.sum()), int(valid.sum())
    scores: dict[str, Any] = {"localisation_auroc": None, **{f"pointing_game_top{q}": None for q in k},
                              "witness_cells": n_w, "tissue_cells": n}
    if n_w == 0:
        return scores
    if n_w < n:
        # Mann–Whitney: AUROC = P(witness cell > other cell) + ½ P(tie), from one sorted copy of the others
        negatives = np.sort(values[valid & ~witness])
        below = np.searchsorted(negatives, positives, "left").astype(np.float64)
        at_most = np.searchsorted(negatives, positives, "right")
        scores["localisation_auroc"] = float((below + at_most).sum() / (2.0 * n_w * negatives.size))
        del negatives
    tissue = values[valid]
    for q in k:
        q_eff = min(int(q), n)
        threshold = np.partition(tissue, n - q_eff)[n - q_eff]  # the q-th highest value
        above = int((tissue > threshold).sum())
        hits_above = int((positives > threshold).sum())
        tied, hits_tied = int((tissue == threshold).sum()), int((positives == threshold).sum())
        hits = hits_above + (q_eff - above) * hits_tied / tied
        scores[f"pointing_game_top{q}"] = float(hits / q_eff)
    return scores



def gradcam_scores(scores: dict) -> dict:
    """The localisation scores of a Grad-CAM map (``score_heatmap``'s) as logged beside the head's:
    ``gradcam_localisation_auroc``, ``gradcam_pointing_game_top1``, ``gradcam_pointing_game_top5``
    (the witness and tissue cell counts are the head map's: the same cells)."""
    return {GRADCAM_PREFIX + k: scores.get(k) for k in GRADCAM_SCORES}
