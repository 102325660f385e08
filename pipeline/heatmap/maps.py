"""Inference over a tile store, one batch at a time: each tile's class probabilities and maps.

``iter_tile_maps`` yields ``TileMaps`` per batch (reading and transforming the next batch overlaps the
model's work on this one); ``infer_store`` holds them all; ``tile_batches`` gives a store without
tiles (flagged "no tissue") one empty batch of the right shape. With ``gradcam=True`` each batch also
carries the positive class's Grad-CAM (:mod:`pipeline.heatmap.gradcam`) from the same forward pass.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from pipeline.device import autocast_for, resolve_device
from pipeline.errors import GaplessError
from pipeline.heatmap.gradcam import check_grad_cam, forward_grad_cam
from pipeline.inference import forward, probabilities, to_device

@dataclass
class TileMaps:
    """Per-tile inference over a store: N tiles, K classes, h×w maps (all float32, on the CPU)."""

    coords: np.ndarray  # (N, 2) int64 top-left (x, y), level-0 px
    probs: np.ndarray  # (N, K) class probabilities
    contribution: np.ndarray  # (N, K, h, w) the head's contribution maps
    attention: np.ndarray | None  # (N, 1, h, w) or None where the head has no attention
    spread: np.ndarray  # (N, 1, h, w) p_positive · w / max(w) (the ``attention`` normalisation)
    spread_weights: str  # share | attention | softmax: which w the spread used
    gradcam: np.ndarray | None = None  # (N, 1, h, w) positive-class Grad-CAM (≥ 0), or None when not asked for
    gradcam_spread: np.ndarray | None = None  # (N, 1, h, w) p_positive · g / max(g), g the Grad-CAM, or None


def sample_view(store, sample_id: str | None = None):
    """The ``SampleTiles`` of a store path (opened and checked; ``sample_id`` picks a sample of a batch
    store), or the view itself when given one."""
    from pipeline.store import SampleTiles, open_sample

    return store if isinstance(store, SampleTiles) else open_sample(store, sample_id)


def iter_tile_maps(model, config: Mapping, store, batch_size: int = 64, device=None,
                   progress: bool = True, gradcam: bool = False) -> Iterator[tuple[int, TileMaps]]:
    """Yield ``(start, TileMaps of tiles start … start + B)`` batch by batch, never more than one batch held.

    ``model``: any ``nn.Module`` whose forward returns a ``HeadOutput`` (a trained head from
    ``load_trained``, or a synthetic module in a test). ``config``: ``mean`` and ``std`` per channel
    in the tiles' raw units (required), ``modality``, ``image_size`` (optional): the evaluation
    transform of training (``augment.build_transform(train=False)``), run on the device. Reading
    the next batch overlaps the model's work on this one. CUDA: bf16 autocast and channels-last, as in
    training; maps come back as float32. ``gradcam``: each batch also carries its tiles' Grad-CAM
    (:func:`pipeline.heatmap.gradcam.forward_grad_cam`: the model must expose ``forward_features`` and
    ``head``, as ``InstanceModel`` does), from the same forward pass.
    """
    import torch

    from pipeline.augment import build_transform

    view = sample_view(store)
    path, tiles, coords, n = view.path, view.tiles, view.coords(), view.n
    if "mean" not in config or "std" not in config:
        raise GaplessError(path, "the model config has no channel mean/std", "pass the config load_trained returns")
    channels = int(tiles.shape[3])
    if len(config["mean"]) != channels:
        raise GaplessError(path, f"the model was trained on {len(config['mean'])}-channel tiles, this store has {channels}",
                           "use a head trained on samples of this kind (slide or image)")
    transform = build_transform(config.get("modality") or view.attrs.modality, False,
                                config["mean"], config["std"], image_size=config.get("image_size"))
    device = resolve_device(device)
    model = model.to(device).eval()
    autocast = autocast_for(device)
    if gradcam:
        check_grad_cam(model)

    on_cpu = device.type == "cpu"

    def load(start: int) -> torch.Tensor:
        block = torch.from_numpy(view.read(start, start + batch_size))  # a bad tile: one line naming the store
        if on_cpu:  # this thread transforms too, beside the model
            return transform(block)
        return block.pin_memory() if device.type == "cuda" else block  # pinned: the copy below is asynchronous

    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"heatmap {view.sample_id}", unit="tile", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    starts = list(range(0, n, batch_size))
    try:
        with ThreadPoolExecutor(1) as reader, torch.no_grad():
            pending = reader.submit(load, starts[0]) if starts else None
            for i, start in enumerate(starts):
                x = pending.result()
                x = x if on_cpu else transform(x.to(device, non_blocking=True))
                pending = reader.submit(load, starts[i + 1]) if i + 1 < len(starts) else None
                out, cam = _infer(model, x, device, autocast, gradcam)
                yield start, _tile_maps(out, coords[start : start + len(x)], cam)
                bar.update(len(x))
    finally:
        bar.close()


def _infer(model, x, device, autocast, gradcam: bool):
    """``(HeadOutput, Grad-CAM or None)`` of one batch: the plain forward, or the Grad-CAM pass (which
    gives the same ``HeadOutput``) when ``gradcam``."""
    if not gradcam:
        return forward(model, x, device, autocast), None
    return forward_grad_cam(model, to_device(x, device), autocast)


def _spread(p, weights):
    """(B, 1, h, w): ``p`` (B,) times ``weights`` (B, h, w) over their per-tile maximum (1 where that is 0)."""
    peak = weights.amax(dim=(1, 2), keepdim=True)
    share = (weights / peak.clamp_min(1e-30)).where(peak > 0, weights.new_ones(()))
    return (p[:, None, None] * share).unsqueeze(1)


def spread_map(out, probs, mask=None):
    """``(B×1×h×w, kind)``: each sample's positive probability spread over its map by the head's own
    weights — the contribution's share for a head that scores log-probabilities, its attention where it
    has one, a softmax of the positive contribution otherwise — relative to the sample's largest weight.
    A sample is a tile here and a slide at the slide level (:mod:`pipeline.slide_level.heatmap`), whose holes
    (``mask`` B×1×h×w, False there) get no weight."""
    positive = out.contribution.float()[:, -1]
    if out.scores_are_log_probs:
        weights, kind = positive.clamp_min(0), "share"
    elif out.attention is not None:
        weights, kind = out.attention.float()[:, 0].clamp_min(0), "attention"
    else:
        if mask is not None:
            positive = positive.masked_fill(~mask[:, 0], float("-inf"))
        weights, kind = (positive - positive.amax(dim=(1, 2), keepdim=True)).exp(), "softmax"
    return _spread(probs[:, -1], weights), kind


def _tile_maps(out, coords: np.ndarray, cam=None) -> TileMaps:
    """HeadOutput (and Grad-CAM) → TileMaps (float32 numpy), with the ``attention`` normalisation's spread."""
    probs = probabilities(out)
    contribution = out.contribution.float()
    attention = None if out.attention is None else out.attention.float()
    if contribution.ndim != 4 or contribution.shape[2] != contribution.shape[3]:
        raise GaplessError(None, f"the model's contribution map has shape {tuple(contribution.shape)}, not B×K×h×h",
                           "heatmaps need square maps: use square tiles and a convolutional backbone")
    spread, kind = spread_map(out, probs)
    numpy = lambda t: t.detach().cpu().numpy().astype(np.float32, copy=False)  # noqa: E731
    gradcam = gradcam_spread = None
    if cam is not None:
        cam = cam.float()
        gradcam, gradcam_spread = numpy(cam), numpy(_spread(probs[:, -1], cam[:, 0]))
    return TileMaps(np.asarray(coords, np.int64), numpy(probs), numpy(contribution),
                    None if attention is None else numpy(attention), numpy(spread), kind, gradcam, gradcam_spread)


def infer_store(model, config: Mapping, store, batch_size: int = 64, device=None, progress: bool = True,
                gradcam: bool = False) -> TileMaps:
    """Inference over every tile of ``store``: per-tile probabilities (N×K), contribution maps
    (N×K×h×w float32), attention (N×1×h×w or None) and, with ``gradcam``, the Grad-CAM maps
    (N×1×h×w), all at once (see ``iter_tile_maps``).

    Holds N×K×h×w floats; ``stitch_store`` streams instead and holds one batch.
    """
    parts = list(tile_batches(model, config, store, batch_size, device, progress, gradcam))
    joined = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return TileMaps(joined("coords"), joined("probs"), joined("contribution"), joined("attention"), joined("spread"),
                    parts[0].spread_weights, joined("gradcam"), joined("gradcam_spread"))


def tile_batches(model, config: Mapping, store, batch_size: int, device, progress: bool,
                 gradcam: bool = False) -> Iterator[TileMaps]:
    """The batches of ``iter_tile_maps``, or for a store without tiles (flagged "no tissue") one batch
    of no tiles, its maps' shape and channels from the model's output on one blank input."""
    import torch

    view = sample_view(store)
    empty = True
    for _, maps in iter_tile_maps(model, config, view, batch_size, device, progress, gradcam):
        empty = False
        yield maps
    if empty:
        device = resolve_device(device)
        t = int(view.attrs.tile_size or view.tiles.shape[1])
        size = int(config.get("image_size") or t)
        x = torch.zeros(1, len(config["mean"]), size, size, device=device)
        model = model.to(device).eval()
        with torch.no_grad():
            out, cam = _infer(model, x, device, nullcontext, gradcam)
            probe = _tile_maps(out, np.zeros((0, 2), np.int64), cam)
        none_or_empty = lambda a: None if a is None else a[:0]  # noqa: E731
        yield TileMaps(probe.coords, probe.probs[:0], probe.contribution[:0], none_or_empty(probe.attention),
                       probe.spread[:0], probe.spread_weights, none_or_empty(probe.gradcam),
                       none_or_empty(probe.gradcam_spread))

