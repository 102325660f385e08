"""Heatmaps: each head's spatial map stitched back onto the slide, normalised, written, scored.

    result = heatmap_sample("results/tiles/S1.zarr", "results/train/saol-seed0", "results/heatmaps/saol", "S1")

For one sample × trained head: inference over every tile of the store (batched; CUDA with bf16
autocast when present, as in training), each tile's map put at the tile's place on a grid over the
whole slide, normalised on a scale shared by every head, written as OME-Zarr, PNGs and a JSON for a
viewer, scored against witness annotations and logged to the head's MLflow run.

Geometry. A head's map is h×w (the backbone's grid, square for square tiles) over a tile whose side
is ``tile_extent`` level-0 px, so one map cell covers ``cell = tile_extent / h`` level-0 px. The
canvas is ``rows × cols = ⌈height / cell⌉ × ⌈width / cell⌉`` cells; canvas cell (i, j) covers
level-0 ``[j·cell, (j+1)·cell) × [i·cell, (i+1)·cell)`` (x, y). A tile at level-0 (x, y) lies at
``(x / cell, y / cell)`` canvas cells, generally not a whole number (``tile_step`` need not be a
multiple of the cell, and coordinates are rounded to whole level-0 px): each map cell is spread over
the 2×2 canvas cells it overlaps, weighted by the overlapping area (bilinear splatting, the exact
area-weighted resampling of a piecewise-constant map; when aligned it is plain placement). Canvas
value = Σ area·value / Σ area over all tiles, so overlapping tiles average. A cell keeps a value
only where tile maps cover at least half of it (``MIN_COVERAGE``) and the store's tissue mask covers
at least half of it (``MIN_CELL_TISSUE``); every other cell is NaN, never 0.

Memory bound. Peak memory is at most ``BYTES_PER_CELL`` = 48 bytes per canvas cell
+ ``BYTES_PER_TILE`` = 256 bytes per tile (coordinates, probabilities, the JSON's tile list)
+ ``FIXED_BYTES`` = 128 MiB, whatever the slide's pixel count. Per cell: stitching holds C + 1
float32 accumulators of (rows + 1) × (cols + 1) (C = 2 or 3 map channels + the covered area:
≤ 16 B), then C float32 maps and a tissue flag (≤ 13 B); normalising, scoring and writing work on
those per channel or in blocks of rows (≤ ~16 B more). Fixed: one batch of tiles and maps, the
thumbnail (≤ 1024 px), the tissue mask (uint8, ≤ 4096 px a side) and the figure (drawn at
``PNG_WIDTH_PX`` px from the map halved to at most that size; matplotlib's buffers are most of the
128 MiB). A 100,000 × 100,000 px slide at 0.25 µm/px tiled at 224 px, 0.5 µm/px (extent 448 px,
7×7 maps, cell 64 px) has 1,563 × 1,563 cells: ≤ 117 MB + 128 MiB, where one float32 channel at
full resolution would be 40 GB. Tested with tracemalloc (numpy and Python allocations; torch holds
one batch) on a store claiming that size and on a dense map of that size. No full-resolution array
is ever allocated.

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

Outputs in ``out_dir`` per sample (``heatmap_model`` / ``heatmap_sample``):
  ``{sample}.ome.zarr``: NGFF 0.5 multiscale image (zarr v3), axes c, y, x (µm), channels
    ``positive`` (the normalised map), ``positive_raw`` (raw contribution) and ``attention`` (the
    head's attention map, where it has one); level l has scale ``cell · 2^l · source_mpp`` µm and
    translation ``(cell · 2^l − 1) / 2 · source_mpp`` µm, so cell centres land where a level-0 image
    of the slide at scale ``source_mpp`` (pixel centres at index × mpp) puts the same place; levels
    halve (NaN-aware 2×2 mean) down to ≤ 256 cells or 5 levels. Attributes ``gapless`` hold the
    normalisation, range, weights, cell size, scores.
  ``{sample}.png``: the thumbnail with the heatmap overlaid, a colour bar, and a caption naming the
    sample, the head, the normalisation and the scores.
  ``{sample}.overlay.png``: RGBA, cols × rows px covering exactly the slide's full extent
    [0, width] × [0, height] (pixel centre (j + 0.5) · width / cols samples the canvas there): the
    colour-mapped heatmap, opaque where there is a value and alpha 0 where NaN; the viewer sets the
    opacity.
  ``{sample}.json``: exactly the keys ``JSON_KEYS``, for a web viewer: ``tiles`` is
    [[x, y, p_positive], …] (level-0 top-left corners, probability rounded to 4 decimals),
    ``range`` the values at the colormap's ends, ``overlay`` the RGBA PNG's file name, ``mpp`` the
    source's µm per level-0 px, ``scores`` as below (empty without ground truth).

Scores (``score_heatmap``), where witness outlines exist: ``localisation_auroc``, the AUROC of the
map at tissue cells touching a witness against all other tissue cells, and ``pointing_game_top{k}``
for k in (1, 5): the fraction of the k highest tissue cells that touch a witness, k = 1 being the
classic pointing game (ties at the k-th value are counted at their expected hit rate under random
order, so a flat map scores the witness base rate, not a lucky hit; k is capped at the number of
tissue cells), plus the counts ``witness_cells`` and ``tissue_cells``. The AUROC is None where a
sample has no witness cell or no other tissue cell, the pointing game where it has no witness cell
(negative samples). Logged to the head's MLflow run as ``heatmap/{sample}/{score}``, the PNG as an
artifact under ``heatmaps/``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.device import autocast_for, resolve_device
from pipeline.errors import GaplessError
from pipeline.files import outputs

log = logging.getLogger("gapless.heatmap")

__all__ = [
    "BYTES_PER_CELL",
    "BYTES_PER_TILE",
    "FIXED_BYTES",
    "JSON_KEYS",
    "NORMALISATIONS",
    "SlideCanvas",
    "StitchedMaps",
    "TileMaps",
    "canvas_shape",
    "cell_tissue_fraction",
    "heatmap_model",
    "heatmap_sample",
    "infer_store",
    "iter_tile_maps",
    "load_trained",
    "normalise",
    "overlay_image",
    "score_heatmap",
    "stitch",
    "stitch_store",
    "write_heatmap",
]

NORMALISATIONS = ("raw", "rank", "attention")
NORMALISATION_LABELS = {
    "raw": "raw contribution of the positive class",
    "rank": "per-slide percentile of the positive contribution",
    "attention": "P(positive) spread by the head's spatial weights",
}
JSON_KEYS = ("sample", "head", "run_id", "normalisation", "colormap", "range", "width", "height", "mpp",
             "overlay", "tile_extent", "tiles", "classes", "scores")
COLORMAP = "viridis"
MIN_COVERAGE = 0.5  # a cell keeps a value where tile maps cover at least this fraction of it
MIN_CELL_TISSUE = 0.5  # ... and the store's tissue mask covers at least this fraction of it
BYTES_PER_CELL = 48  # stated peak memory per canvas cell (accumulators, outputs, temporaries)
BYTES_PER_TILE = 256  # ... plus this per tile
FIXED_BYTES = 128 * 2**20  # ... plus this, whatever the canvas (a batch, the thumbnail, the figure)
POINTING_K = (1, 5)
PYRAMID_MIN_SIDE = 256
PYRAMID_MAX_LEVELS = 5
PNG_WIDTH_PX = 1000
_DPI = 100
_WEIGHTS = {"share": "the head's share of p (contribution / p)", "attention": "the head's attention map",
            "softmax": "softmax over positions of the positive contribution"}


# ---------------------------------------------------------------------------------------------
# Loading a trained head


def load_trained(run_dir: str | Path, device=None):
    """``(model, config)`` from a training run directory (``weights.safetensors`` + ``model.json``).

    The model is rebuilt with ``create_model(backbone, head, num_classes, in_chans, pretrained=False,
    **head_kwargs)``, loaded strictly, put in eval mode on ``device`` (default: CUDA when present).
    ``config`` is model.json plus ``run_dir`` and ``run_id`` (from ``run_id.txt``, else None).
    """
    from safetensors.torch import load_file

    from pipeline.models import create_model

    run_dir = Path(run_dir)
    fix = "pass the directory `train` wrote (it holds model.json, weights.safetensors and run_id.txt)"
    if not run_dir.is_dir():
        raise GaplessError(run_dir, "no such training run directory", fix)
    config_path, weights_path = run_dir / "model.json", run_dir / "weights.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise GaplessError(path, "missing from the training run directory", "re-run training for this head; " + fix)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GaplessError(config_path, f"not valid JSON ({exc})", "re-run training for this head") from None
    required = ("backbone", "head", "num_classes", "in_chans", "classes", "mean", "std")
    missing = [k for k in required if k not in (config if isinstance(config, dict) else {})]
    if missing:
        raise GaplessError(config_path, f"lacks {', '.join(missing)}", "re-run training for this head")
    try:
        model = create_model(config["backbone"], config["head"], int(config["num_classes"]),
                             in_chans=int(config["in_chans"]), pretrained=False, **(config.get("head_kwargs") or {}))
    except GaplessError as exc:
        raise GaplessError(config_path, exc.cause, exc.fix) from None
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise GaplessError(weights_path, f"not a readable safetensors file ({exc})", "re-run training for this head") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise GaplessError(
            weights_path,
            f"weights do not match model.json ({config['backbone']}/{config['head']}, {config['num_classes']} classes): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. {example!r}",
            "model.json and weights.safetensors must come from the same training run",
        )
    model.load_state_dict(state, strict=True)
    device = resolve_device(device)
    model = model.to(device).eval()
    run_id_path = run_dir / "run_id.txt"
    run_id = run_id_path.read_text(encoding="utf-8").strip() if run_id_path.is_file() else ""
    return model, dict(config, run_dir=str(run_dir), run_id=run_id or None)


def _check_normalisation(method: str) -> None:
    if method not in NORMALISATIONS:
        raise GaplessError(None, f"unknown normalisation {method!r}", f"choose one of {', '.join(NORMALISATIONS)}")


# ---------------------------------------------------------------------------------------------
# Inference


@dataclass
class TileMaps:
    """Per-tile inference over a store: N tiles, K classes, h×w maps (all float32, on the CPU)."""

    coords: np.ndarray  # (N, 2) int64 top-left (x, y), level-0 px
    probs: np.ndarray  # (N, K) class probabilities
    contribution: np.ndarray  # (N, K, h, w) the head's contribution maps
    attention: np.ndarray | None  # (N, 1, h, w) or None where the head has no attention
    spread: np.ndarray  # (N, 1, h, w) p_positive · w / max(w) (the ``attention`` normalisation)
    spread_weights: str  # share | attention | softmax: which w the spread used


def _open(store):
    """(zarr group, path or None) for a store path or an opened group."""
    from pipeline.tiling import open_store

    if isinstance(store, (str, Path)):
        return open_store(store), Path(store)
    return store, Path(str(store.store.root)) if hasattr(store.store, "root") else None


def iter_tile_maps(model, config: Mapping, store, batch_size: int = 64, device=None,
                   progress: bool = True) -> Iterator[tuple[int, TileMaps]]:
    """Yield ``(start, TileMaps of tiles start … start + B)`` batch by batch, never more than one batch held.

    ``model``: any ``nn.Module`` whose forward returns a ``HeadOutput`` (a trained head from
    ``load_trained``, or a synthetic module in a test). ``config``: ``mean`` and ``std`` per channel
    in the tiles' raw units (required), ``modality``, ``image_size`` (optional): the evaluation
    transform of training (``data.build_transforms(train=False)``). Reading and transforming the
    next batch overlaps the model's work on this one. CUDA: bf16 autocast and channels-last, as in
    training; maps come back as float32.
    """
    import torch

    from pipeline.data import build_transforms
    from pipeline.tiling import read_tiles

    root, path = _open(store)
    tiles = root["tiles"]
    coords = np.asarray(root["coords"][:], dtype=np.int64)
    n = int(tiles.shape[0])
    if "mean" not in config or "std" not in config:
        raise GaplessError(path, "the model config has no channel mean/std", "pass the config load_trained returns")
    channels = int(tiles.shape[3])
    if len(config["mean"]) != channels:
        raise GaplessError(path, f"the model was trained on {len(config['mean'])}-channel tiles, this store has {channels}",
                           "use a head trained on samples of this kind (slide or image)")
    transform = build_transforms(config.get("modality") or root.attrs.get("modality", "brightfield"), False,
                                 config["mean"], config["std"], image_size=config.get("image_size"),
                                 tile_size=int(tiles.shape[1]))
    device = resolve_device(device)
    model = model.to(device).eval()
    autocast = autocast_for(device)

    def load(start: int) -> torch.Tensor:
        block = read_tiles(tiles, start, start + batch_size, path)  # a bad tile: one line naming the store
        images = []
        for tile in block:
            image = transform(image=tile)["image"]
            images.append(image[..., None] if image.ndim == 2 else image)
        return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32))

    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"heatmap {path.name if path else 'store'}", unit="tile", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    starts = list(range(0, n, batch_size))
    try:
        with ThreadPoolExecutor(1) as reader, torch.no_grad():
            pending = reader.submit(load, starts[0]) if starts else None
            for i, start in enumerate(starts):
                x = pending.result()
                pending = reader.submit(load, starts[i + 1]) if i + 1 < len(starts) else None
                x = x.to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.to(memory_format=torch.channels_last)
                with autocast():
                    out = model(x)
                yield start, _tile_maps(out, coords[start : start + len(x)])
                bar.update(len(x))
    finally:
        bar.close()


def _tile_maps(out, coords: np.ndarray) -> TileMaps:
    """HeadOutput → TileMaps (float32 numpy), with the ``attention`` normalisation's spread."""
    logits = out.logits.float()
    probs = logits.exp() if out.scores_are_log_probs else logits.softmax(1)
    contribution = out.contribution.float()
    attention = None if out.attention is None else out.attention.float()
    if contribution.ndim != 4 or contribution.shape[2] != contribution.shape[3]:
        raise GaplessError(None, f"the model's contribution map has shape {tuple(contribution.shape)}, not B×K×h×h",
                           "heatmaps need square maps: use square tiles and a convolutional backbone")
    positive = contribution[:, -1]
    if out.scores_are_log_probs:
        weights, kind = positive.clamp_min(0), "share"
    elif attention is not None:
        weights, kind = attention[:, 0].clamp_min(0), "attention"
    else:
        weights, kind = (positive - positive.amax(dim=(1, 2), keepdim=True)).exp(), "softmax"
    peak = weights.amax(dim=(1, 2), keepdim=True)
    share = (weights / peak.clamp_min(1e-30)).where(peak > 0, weights.new_ones(()))
    spread = (probs[:, -1, None, None] * share).unsqueeze(1)
    numpy = lambda t: t.detach().cpu().numpy().astype(np.float32, copy=False)  # noqa: E731
    return TileMaps(np.asarray(coords, np.int64), numpy(probs), numpy(contribution),
                    None if attention is None else numpy(attention), numpy(spread), kind)


def infer_store(model, config: Mapping, store, batch_size: int = 64, device=None, progress: bool = True) -> TileMaps:
    """Inference over every tile of ``store``: per-tile probabilities (N×K), contribution maps
    (N×K×h×w float32) and attention (N×1×h×w or None), all at once (see ``iter_tile_maps``).

    Holds N×K×h×w floats; ``stitch_store`` streams instead and holds one batch.
    """
    parts = list(_batches(model, config, store, batch_size, device, progress))
    attention = None if parts[0].attention is None else np.concatenate([p.attention for p in parts])
    return TileMaps(np.concatenate([p.coords for p in parts]), np.concatenate([p.probs for p in parts]),
                    np.concatenate([p.contribution for p in parts]), attention,
                    np.concatenate([p.spread for p in parts]), parts[0].spread_weights)


def _batches(model, config: Mapping, store, batch_size: int, device, progress: bool) -> Iterator[TileMaps]:
    """The batches of ``iter_tile_maps``, or for a store without tiles (flagged "no tissue") one batch
    of no tiles, its maps' shape and channels from the model's output on one blank input."""
    import torch

    root, _ = _open(store)
    empty = True
    for _, maps in iter_tile_maps(model, config, root, batch_size, device, progress):
        empty = False
        yield maps
    if empty:
        device = resolve_device(device)
        t = int(root.attrs.get("tile_size") or root["tiles"].shape[1])
        size = int(config.get("image_size") or t)
        x = torch.zeros(1, len(config["mean"]), size, size, device=device)
        with torch.no_grad():
            probe = _tile_maps(model.to(device).eval()(x), np.zeros((0, 2), np.int64))
        yield TileMaps(probe.coords, probe.probs[:0], probe.contribution[:0],
                       None if probe.attention is None else probe.attention[:0], probe.spread[:0], probe.spread_weights)


# ---------------------------------------------------------------------------------------------
# The canvas


def canvas_shape(width: float, height: float, tile_extent: float, map_side: int) -> tuple[int, int, float]:
    """``(rows, cols, cell)``: the canvas over a width × height (level-0 px) slide for h×h maps of
    tiles ``tile_extent`` level-0 px wide; ``cell = tile_extent / map_side`` level-0 px."""
    if not (tile_extent > 0 and map_side >= 1):
        raise ValueError(f"tile_extent {tile_extent} and map side {map_side} must be positive")
    cell = float(tile_extent) / int(map_side)
    return max(1, math.ceil(height / cell - 1e-9)), max(1, math.ceil(width / cell - 1e-9)), cell


class SlideCanvas:
    """Accumulates tile maps on the canvas (see the module docstring: geometry and memory bound).

    ``add(coords, maps)`` takes (B, 2) level-0 top-left corners and (B, C, h, h) maps and splats
    each map cell onto the canvas cells it overlaps, weighted by area; ``mean()`` gives (C, rows,
    cols) float32, NaN where tile maps cover less than ``min_coverage`` of a cell.
    """

    def __init__(self, width: float, height: float, tile_extent: float, map_side: int, channels: int):
        self.rows, self.cols, self.cell = canvas_shape(width, height, tile_extent, map_side)
        self.map_side, self.channels = int(map_side), int(channels)
        # one spare row and column: a map cell spreads into the next canvas cell when not aligned.
        # float32: a cell sums (extent/step)² tiles at most, far from float32's 7 significant digits.
        self.sums = np.zeros((self.channels, self.rows + 1, self.cols + 1), np.float32)
        self.area = np.zeros((self.rows + 1, self.cols + 1), np.float32)

    def add(self, coords: np.ndarray, maps: np.ndarray) -> None:
        coords, maps = np.asarray(coords), np.asarray(maps)
        h = self.map_side
        if maps.ndim != 4 or maps.shape[1] != self.channels or maps.shape[2:] != (h, h):
            raise ValueError(f"maps of shape {maps.shape}, expected (B, {self.channels}, {h}, {h})")
        pos = np.asarray(coords, np.float64) / self.cell  # (B, 2) canvas position of each tile's corner, (x, y)
        base = np.floor(pos + 1e-6)
        frac = np.clip(pos - base, 0.0, 1.0)
        frac[frac < 1e-6] = 0.0
        base = base.astype(np.int64)
        for (c0, r0), (fx, fy), values in zip(base, frac, maps):
            if r0 < 0 or c0 < 0 or r0 + h + (fy > 0) > self.rows + 1 or c0 + h + (fx > 0) > self.cols + 1:
                raise ValueError(f"a tile at canvas cell ({r0}, {c0}) lies outside the {self.rows}×{self.cols} canvas")
            for dr, wy in ((0, 1.0 - fy), (1, fy)):
                if wy == 0.0:
                    continue
                for dc, wx in ((0, 1.0 - fx), (1, fx)):
                    if wx == 0.0:
                        continue
                    w = wy * wx
                    self.sums[:, r0 + dr : r0 + dr + h, c0 + dc : c0 + dc + h] += w * values
                    self.area[r0 + dr : r0 + dr + h, c0 + dc : c0 + dc + h] += w

    def coverage(self) -> np.ndarray:
        """(rows, cols) summed covered area in cell units (overlapping tiles add up)."""
        return self.area[: self.rows, : self.cols]

    def mean(self, channel: int | None = None, min_coverage: float = MIN_COVERAGE) -> np.ndarray:
        """Mean map(s): (C, rows, cols), or (rows, cols) for one ``channel``; float32, NaN where uncovered."""
        area = self.coverage()
        keep = area >= min_coverage
        channels = range(self.channels) if channel is None else [channel]
        out = np.full((len(channels), self.rows, self.cols), np.nan, np.float32)
        for i, c in enumerate(channels):
            np.divide(self.sums[c, : self.rows, : self.cols], area, out=out[i], where=keep)
        return out if channel is None else out[0]


def stitch(coords: np.ndarray, maps: np.ndarray, width: float, height: float, tile_extent: float,
           min_coverage: float = MIN_COVERAGE) -> tuple[np.ndarray, float]:
    """One-shot stitching: ``(C, rows, cols)`` float32 (NaN where uncovered) and the cell size (level-0 px)."""
    maps = np.asarray(maps)
    canvas = SlideCanvas(width, height, tile_extent, maps.shape[-1], maps.shape[1])
    canvas.add(coords, maps)
    return canvas.mean(min_coverage=min_coverage), canvas.cell


def _overlap_matrix(n_out: int, cell: float, n_in: int, step: float):
    """Sparse (n_out × n_in): fraction of output cell i ([i·cell, (i+1)·cell)) covered by input px m
    ([m·step, (m+1)·step)). Rows sum to 1 inside the image, less for a cell past its edge."""
    from scipy import sparse

    a = np.arange(n_out) * cell
    b = a + cell
    lo = np.clip(np.floor(a / step).astype(np.int64), 0, n_in)
    hi = np.clip(np.ceil(b / step).astype(np.int64), 0, n_in)
    counts = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(n_out), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.repeat(lo, counts) + offsets
    overlap = np.minimum(np.repeat(b, counts), (cols + 1) * step) - np.maximum(np.repeat(a, counts), cols * step)
    return sparse.csr_matrix((np.clip(overlap / cell, 0, 1).astype(np.float32), (rows, cols)), shape=(n_out, n_in))


def cell_tissue_fraction(mask: np.ndarray, mask_downsample: Sequence[float], rows: int, cols: int,
                         cell: float, block: int = 256) -> np.ndarray:
    """(rows, cols) float32: the fraction of each canvas cell the tissue mask covers (exact areas).

    Works in blocks of ``block`` canvas rows, each on the mask rows it covers: memory O(mask + canvas)
    with the mask as it is stored (uint8).
    """
    mask = np.asarray(mask)
    dx, dy = float(mask_downsample[0]), float(mask_downsample[1])
    ry = _overlap_matrix(rows, cell, mask.shape[0], dy)  # canvas rows × mask rows
    rx = _overlap_matrix(cols, cell, mask.shape[1], dx)  # canvas columns × mask columns
    out = np.zeros((rows, cols), np.float32)
    for r in range(0, rows, block):
        part = ry[r : r + block]
        used = np.flatnonzero(part.getnnz(axis=0))
        if used.size == 0:  # canvas rows past the image
            continue
        lo, hi = int(used[0]), int(used[-1]) + 1
        covered = part[:, lo:hi] @ mask[lo:hi].astype(np.float32)  # block × mask columns
        out[r : r + block] = (rx @ covered.T).T
    return out


@dataclass
class StitchedMaps:
    """One head's maps of one sample on the canvas; NaN outside ``valid`` (tissue cells covered by tiles)."""

    raw: np.ndarray  # (rows, cols) positive-class contribution
    spread: np.ndarray  # (rows, cols) p_positive spread by the head's weights
    attention: np.ndarray | None  # (rows, cols) the head's attention map, or None
    valid: np.ndarray  # (rows, cols) bool
    cell: float  # level-0 px per canvas cell
    coords: np.ndarray  # (N, 2) int64
    probs: np.ndarray  # (N, K) float32
    spread_weights: str
    width: int
    height: int
    tile_extent: float
    source_mpp: float | None
    map_side: int


def stitch_store(model, config: Mapping, store, batch_size: int = 64, device=None, progress: bool = True) -> StitchedMaps:
    """Streamed inference over ``store`` into a ``SlideCanvas`` (one batch in memory at a time), then the
    tissue cells: covered by tile maps and by the store's tissue mask (module docstring)."""
    root, path = _open(store)
    a = root.attrs
    width, height, extent = int(a["width"]), int(a["height"]), float(a["tile_extent"])
    canvas = None
    coords, probs = [], []
    for batch in _batches(model, config, root, batch_size, device, progress):
        has_attention = batch.attention is not None
        if canvas is None:
            canvas = SlideCanvas(width, height, extent, batch.contribution.shape[-1], 3 if has_attention else 2)
        layers = [batch.contribution[:, -1:], batch.spread] + ([batch.attention] if has_attention else [])
        canvas.add(batch.coords, np.concatenate(layers, axis=1))
        coords.append(batch.coords)
        probs.append(batch.probs)
    coords = np.concatenate(coords)
    if not len(coords):
        log.warning("%s: no tiles; the heatmap is empty", path)
    valid = canvas.coverage() >= MIN_COVERAGE
    mask = root.get("tissue_mask")  # opened once: each lookup reads the array's metadata
    if mask is not None:
        mask = mask[:]
        mask_ds = a.get("tissue_mask_downsample") or [width / mask.shape[1], height / mask.shape[0]]
        valid &= cell_tissue_fraction(mask, mask_ds, canvas.rows, canvas.cols, canvas.cell) >= MIN_CELL_TISSUE
        del mask
    maps = []
    for c in range(canvas.channels):
        m = canvas.mean(c)
        np.copyto(m, np.nan, where=~valid)
        maps.append(m)
    cell, side = canvas.cell, canvas.map_side
    del canvas
    return StitchedMaps(maps[0], maps[1], maps[2] if has_attention else None, valid, cell, coords,
                        np.concatenate(probs), batch.spread_weights, width, height, extent, a.get("source_mpp"), side)


# ---------------------------------------------------------------------------------------------
# Normalisation and scores


def normalise(maps: StitchedMaps, method: str = "rank") -> tuple[np.ndarray, tuple[float, float]]:
    """(rows, cols) float32 map on the chosen scale (NaN outside tissue) and its colour range (lo, hi)."""
    _check_normalisation(method)
    valid = maps.valid & np.isfinite(maps.raw)
    out = np.full(maps.raw.shape, np.nan, np.float32)
    if method == "attention":
        out[valid] = maps.spread[valid]
        return out, (0.0, 1.0)
    raw = maps.raw[valid]
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


# ---------------------------------------------------------------------------------------------
# Outputs




def _halve(values: np.ndarray) -> np.ndarray:
    """(r, c) → (⌈r/2⌉, ⌈c/2⌉) float32: the mean of the finite values of each 2×2 block (NaN when none)."""
    r, c = values.shape
    total = np.zeros(((r + 1) // 2, (c + 1) // 2), np.float32)
    count = np.zeros(total.shape, np.uint8)
    for dy in (0, 1):
        for dx in (0, 1):
            part = values[dy::2, dx::2]
            finite = np.isfinite(part)
            total[: part.shape[0], : part.shape[1]] += np.where(finite, part, 0)
            count[: part.shape[0], : part.shape[1]] += finite
    out = np.full(total.shape, np.nan, np.float32)
    np.divide(total, count, out=out, where=count > 0)
    return out


def _finite_range(a: np.ndarray | None, default=(0.0, 1.0)) -> tuple[float, float]:
    if a is None or not np.isfinite(a).any():
        return default
    return float(np.nanmin(a)), float(np.nanmax(a))


def _write_ome_zarr(folder: Path, layers: list[tuple[str, np.ndarray, tuple[float, float]]], cell: float,
                    mpp: float | None, name: str, extra: dict) -> None:
    """NGFF 0.5 multiscale image (c, y, x; µm) written into the empty ``folder``."""
    import zarr

    unit_mpp = float(mpp) if mpp else 1.0
    planes = [layer for _, layer, _ in layers]  # one channel at a time: no stacked copy
    root = zarr.open_group(folder, mode="w", zarr_format=3)
    datasets, level = [], 0
    while True:
        rows, cols = planes[0].shape
        array = root.create_array(str(level), shape=(len(planes), rows, cols), dtype=np.float32,
                                  chunks=(1, min(512, rows), min(512, cols)), fill_value=np.nan,
                                  dimension_names=["c", "y", "x"])
        for c, plane in enumerate(planes):
            array[c] = plane
        size = cell * 2**level  # level-0 px per cell at this level
        scale, shift = size * unit_mpp, (size - 1) / 2 * unit_mpp
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, scale, scale]},
            {"type": "translation", "translation": [0.0, shift, shift]}]})
        if max(rows, cols) <= PYRAMID_MIN_SIDE or level + 1 >= PYRAMID_MAX_LEVELS:
            break
        planes, level = [_halve(plane) for plane in planes], level + 1
    unit = "micrometer" if mpp else None
    space = lambda axis: {"name": axis, "type": "space", **({"unit": unit} if unit else {})}  # noqa: E731
    colours = {"positive": "FFFFFF", "positive_raw": "FF00FF", "attention": "00FFFF"}
    channels = []
    for label, _, (lo, hi) in layers:
        channels.append({"label": label, "color": colours.get(label, "FFFFFF"), "active": label == "positive",
                         "window": {"min": lo, "max": hi, "start": lo, "end": hi}})
    root.attrs.update({
        "ome": {
            "version": "0.5",
            "multiscales": [{
                "name": name,
                "axes": [{"name": "c", "type": "channel"}, space("y"), space("x")],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"description": "2×2 mean of the finite values (NaN = no tissue)",
                             "method": "pipeline.heatmap._halve"},
            }],
            "omero": {"channels": channels, "rdefs": {"model": "color"}},
        },
        "gapless": extra,
    })


def _colour(values: np.ndarray, value_range: tuple[float, float], colormap: str) -> np.ndarray:
    """(…) float with NaN → (…, 4) uint8 RGBA: the colormap between ``value_range``, alpha 0 at NaN."""
    import matplotlib

    lo, hi = value_range
    scaled = (values - lo) / (hi - lo if hi > lo else 1.0)
    rgba = matplotlib.colormaps[colormap](np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1), bytes=True)
    rgba[..., 3] = np.where(np.isfinite(values), 255, 0)
    return rgba


def overlay_image(values: np.ndarray, cell: float, width: int, height: int, value_range: tuple[float, float],
                  colormap: str = COLORMAP) -> np.ndarray:
    """(rows, cols, 4) uint8 RGBA spanning exactly [0, width] × [0, height]: pixel (i, j) shows the
    canvas cell under its centre ((j + 0.5)·width/cols, (i + 0.5)·height/rows)."""
    rows, cols = values.shape
    ys = np.minimum(((np.arange(rows) + 0.5) * height / rows / cell).astype(np.int64), rows - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * width / cols / cell).astype(np.int64), cols - 1)
    rgba = np.empty((rows, cols, 4), np.uint8)
    for r in range(0, rows, 256):  # in blocks of rows: the colormap's float temporaries stay small
        rgba[r : r + 256] = _colour(values[np.ix_(ys[r : r + 256], xs)], value_range, colormap)
    return rgba


def _score_text(scores: dict) -> str:
    if not scores or scores.get("witness_cells") in (None, 0):
        return "no witness annotations on this sample" if scores else "no ground truth"
    parts = [f"{scores['witness_cells']} of {scores['tissue_cells']} tissue cells touch a witness"]
    if scores.get("localisation_auroc") is not None:
        parts.append(f"localisation AUROC {scores['localisation_auroc']:.3f}")
    pointing = [f"top-{k[len('pointing_game_top'):]} {v:.2f}" for k, v in scores.items()
                if k.startswith("pointing_game_top") and v is not None]
    if pointing:
        parts.append("pointing game " + ", ".join(pointing))
    return " · ".join(parts)


def _figure(path: Path, thumbnail: np.ndarray | None, values: np.ndarray, cell: float, width: int, height: int,
            value_range: tuple[float, float], colormap: str, caption: list[str], bar_label: str) -> None:
    """PNG ``PNG_WIDTH_PX`` wide at ``path``: thumbnail, heatmap over it (alpha 0.55, none where NaN), colour bar, caption."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig_w = PNG_WIDTH_PX / _DPI
    box_w, box_h = 8.0, 9.0  # inches for the slide picture; the rest: colour bar, caption
    aspect = height / width
    img_w, img_h = (box_w, box_w * aspect) if box_w * aspect <= box_h else (box_h / aspect, box_h)
    caption_h = 0.25 * len(caption) + 0.3
    fig_h = img_h + caption_h + 0.2
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    FigureCanvasAgg(fig)
    left = 0.15 + (box_w - img_w) / 2
    ax = fig.add_axes((left / fig_w, caption_h / fig_h, img_w / fig_w, img_h / fig_h))
    if thumbnail is not None:
        ax.imshow(thumbnail, extent=(0, width, height, 0), interpolation="antialiased")
    cmap = matplotlib.colormaps[colormap].with_extremes(bad=(0, 0, 0, 0))
    while max(values.shape) > PNG_WIDTH_PX:  # no finer than the figure can show
        values, cell = _halve(values), cell * 2
    rows, cols = values.shape
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=value_range[0], vmax=value_range[1], alpha=0.55,
              extent=(0, cols * cell, rows * cell, 0), interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    cax = fig.add_axes(((0.15 + box_w + 0.35) / fig_w, caption_h / fig_h, 0.2 / fig_w, img_h / fig_h))
    fig.colorbar(ScalarMappable(Normalize(*value_range), matplotlib.colormaps[colormap]), cax=cax, label=bar_label)
    for i, line in enumerate(caption):
        fig.text(0.5, (caption_h - 0.3 - 0.25 * i) / fig_h, line, ha="center", va="bottom",
                 fontsize=11 if i == 0 else 9, fontweight="bold" if i == 0 else "normal")
    fig.savefig(path, dpi=_DPI, format="png")


def write_heatmap(out_dir: str | Path, sample_id: str, head: str, maps: StitchedMaps, values: np.ndarray,
                  value_range: tuple[float, float], normalisation: str, classes: Sequence[str],
                  thumbnail: np.ndarray | None = None, scores: dict | None = None, run_id: str | None = None,
                  colormap: str = COLORMAP) -> dict[str, Path]:
    """Write ``{sample}.ome.zarr``, ``{sample}.png``, ``{sample}.overlay.png`` and ``{sample}.json``
    into ``out_dir`` (module docstring): all four appear complete, or none of them (a failure, e.g. a
    full disk, leaves an older set as it was). Returns their paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = dict(scores or {})
    paths = {"zarr": out_dir / f"{sample_id}.ome.zarr", "png": out_dir / f"{sample_id}.png",
             "overlay": out_dir / f"{sample_id}.overlay.png", "json": out_dir / f"{sample_id}.json"}
    value_range = (float(value_range[0]), float(value_range[1]))
    layers = [("positive", values, value_range), ("positive_raw", maps.raw, _finite_range(maps.raw))]
    if maps.attention is not None:
        layers.append(("attention", maps.attention, _finite_range(maps.attention)))
    extra = {"sample": sample_id, "head": head, "run_id": run_id, "normalisation": normalisation,
             "normalisation_label": NORMALISATION_LABELS[normalisation], "range": list(value_range),
             "colormap": colormap, "spread_weights": maps.spread_weights, "cell_size": maps.cell,
             "map_side": maps.map_side, "tile_extent": maps.tile_extent, "width": maps.width,
             "height": maps.height, "source_mpp": maps.source_mpp, "channels": [n for n, _, _ in layers],
             "min_coverage": MIN_COVERAGE, "min_cell_tissue": MIN_CELL_TISSUE, "scores": scores}
    with outputs() as staged:  # the four files appear together, the JSON (the workflow's output) last
        _write_ome_zarr(staged.directory(paths["zarr"], holds="zarr.json"), layers, maps.cell, maps.source_mpp,
                        f"{sample_id} {head}", extra)

        rgba = overlay_image(values, maps.cell, maps.width, maps.height, value_range, colormap)
        staged.file(paths["overlay"], lambda tmp: Image.fromarray(rgba, "RGBA").save(tmp, format="png"))

        label = NORMALISATION_LABELS[normalisation]
        if normalisation == "attention":
            label += f", w = {_WEIGHTS[maps.spread_weights]}"
        caption = [f"{sample_id} · {head} head · normalisation: {normalisation}", label, _score_text(scores)]
        staged.file(paths["png"], lambda tmp: _figure(tmp, thumbnail, values, maps.cell, maps.width, maps.height,
                                                      value_range, colormap, caption,
                                                      f"{normalisation} ({value_range[0]:.3g} to {value_range[1]:.3g})"))

        p_pos = maps.probs[:, -1] if len(maps.probs) else np.zeros(0, np.float32)
        doc = {
            "sample": sample_id,
            "head": head,
            "run_id": run_id,
            "normalisation": normalisation,
            "colormap": colormap,
            "range": [float(f"{value_range[0]:.7g}"), float(f"{value_range[1]:.7g}")],
            "width": int(maps.width),
            "height": int(maps.height),
            "mpp": None if maps.source_mpp is None else float(maps.source_mpp),
            "overlay": paths["overlay"].name,
            "tile_extent": float(maps.tile_extent),
            "tiles": [[int(x), int(y), round(float(p), 4)] for (x, y), p in zip(maps.coords, p_pos)],
            "classes": list(classes),
            "scores": scores,
        }
        assert tuple(doc) == JSON_KEYS
        text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
        staged.file(paths["json"], lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return paths


# ---------------------------------------------------------------------------------------------
# Entry points


def _metric_name(sample_id: str, key: str) -> str:
    safe = re.sub(r"[^0-9A-Za-z_.\- ]", "_", sample_id)  # the characters MLflow allows in a metric name
    return f"heatmap/{safe}/{key}"


def heatmap_model(model, config: Mapping, store, out_dir: str | Path, sample_id: str | None = None,
                  head: str | None = None, normalisation: str = "rank", annotations=None,
                  positive_classes: Sequence[str] = (), batch_size: int = 64, device=None,
                  run_id: str | None = None, tracking_uri: str | None = None, progress: bool = True) -> dict:
    """One model on one store: stitch, normalise, score, write into ``out_dir``, log to MLflow.

    ``annotations``: an ``Annotations``, a GeoJSON path, or None for the one recorded in the store
    at tiling time (attr ``annotations``, with its ``positive_classes`` unless given), when it
    exists. MLflow: with ``tracking_uri`` and ``run_id`` (default: ``config["run_id"]``) the scores
    go to that run as ``heatmap/{sample}/{score}`` and the PNG under ``heatmaps/``.
    """
    _check_normalisation(normalisation)
    root, path = _open(store)
    sample_id = sample_id or (path.name.removesuffix(".zarr") if path else "sample")
    head = head or config.get("head") or type(model).__name__
    run_id = run_id if run_id is not None else config.get("run_id")
    classes = list(config.get("classes") or [])
    if config.get("mpp") and root.attrs.get("mpp") and abs(float(root.attrs["mpp"]) / float(config["mpp"]) - 1) > 0.05:
        log.warning("%s: tiles at %.3g µm/px, the model was trained at %.3g µm/px", path, root.attrs["mpp"], config["mpp"])

    if annotations is None and root.attrs.get("annotations"):
        recorded = Path(root.attrs["annotations"])
        if recorded.is_file():
            annotations = recorded
            positive_classes = positive_classes or tuple(root.attrs.get("positive_classes") or ())
        else:
            log.warning("%s: the annotations recorded at tiling (%s) are gone; no scores", path, recorded)
    if isinstance(annotations, (str, Path)):
        from pipeline.annotations import load_annotations

        annotations = load_annotations(annotations)  # a bad file fails before any inference

    maps = stitch_store(model, config, root, batch_size, device, progress)
    if not classes:
        classes = [str(i) for i in range(maps.probs.shape[1])]
    values, value_range = normalise(maps, normalisation)
    scores = score_heatmap(values, maps.cell, annotations, positive_classes) if annotations is not None else {}

    thumbnail = root.get("thumbnail")
    thumbnail = None if thumbnail is None else thumbnail[:]
    paths = write_heatmap(out_dir, sample_id, head, maps, values, value_range, normalisation, classes,
                          thumbnail, scores, run_id)
    if tracking_uri and run_id:
        from mlflow.exceptions import MlflowException

        from pipeline.tracking import RunLogger

        numeric = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            run = RunLogger(tracking_uri, run_id)
            run.metrics({_metric_name(sample_id, k): v for k, v in numeric.items()})
            run.artifact(paths["png"], "heatmaps")
        except MlflowException as exc:
            raise GaplessError(tracking_uri, f"cannot log to MLflow run {run_id}: {exc.message}",
                               "pass the tracking URI the head was trained with (mlflow.tracking_uri or "
                               "MLFLOW_TRACKING_URI)") from None
    return {**paths, "scores": scores, "range": list(value_range), "normalisation": normalisation,
            "run_id": run_id, "head": head, "tiles": int(len(maps.coords)), "cell_size": maps.cell,
            "canvas": [int(values.shape[0]), int(values.shape[1])]}


def heatmap_sample(store, run_dirs, out_dir: str | Path, sample_id: str | None = None, normalisation: str = "rank",
                   annotations=None, positive_classes: Sequence[str] = (), batch_size: int = 64,
                   tracking_uri: str | None = None, progress: bool = True, device=None) -> dict:
    """Heatmaps of one sample for one or several trained heads; returns ``{head: {paths, scores, …}}``.

    run_dirs: one training run directory (outputs go straight into ``out_dir``, e.g.
    ``results/heatmaps/{head}``) or ``{head: run_dir}`` (outputs into ``out_dir/{head}/``).
    Heads are comparable because the normalisation puts each on the same scale, not because they
    run together: one call per head × sample gives the same files as one call for all heads.
    sample_id: default the store's name without ``.zarr``. annotations, positive_classes,
    tracking_uri: see ``heatmap_model`` (the run id comes from each run directory's run_id.txt).
    """
    _check_normalisation(normalisation)
    device = resolve_device(device)  # once for every model
    root, _ = _open(store)
    if isinstance(run_dirs, Mapping):
        jobs = [(str(head), Path(d), Path(out_dir) / str(head)) for head, d in run_dirs.items()]
    else:
        jobs = [(None, Path(run_dirs), Path(out_dir))]
    results = {}
    for head, run_dir, target in jobs:
        model, config = load_trained(run_dir, device)
        head = head or config["head"]
        results[head] = heatmap_model(model, config, root, target,
                                      sample_id, head, normalisation, annotations, positive_classes, batch_size,
                                      device, config.get("run_id"), tracking_uri, progress)
        del model
    return results
