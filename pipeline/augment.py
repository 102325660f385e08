"""Augmentation and normalisation of tile batches as tensor ops on the device that trains, the same
for training, evaluation and heatmaps.

The loader's workers only read and decode tiles (:mod:`pipeline.data`); a :class:`TileTransform` takes
the batch, B×T×T×C in the store's dtype, to the model's input, B×C×S×S float32, on the device it is
on. In a loader worker the per-pixel work cost ~3 ms per 224-px tile (albumentations), so that
workers gave ~220 images/s each; here it is a few memory-bound passes over the whole batch, which a
GPU does beside the model (not yet timed on one: no GPU in this project's sessions so far). On the
CPU, where it now runs in the training process, it costs about what albumentations did at 64 px
and about twice that at 224 px (one thread, in place, whole batches).

Training (``train=True``), each tile with its own parameters, drawn from the transform's
``torch.Generator`` on the CPU (one seed, the same draws on any device and for any number of workers):

* D4 symmetry (the 8 rotations/flips, uniform): a tissue section has no preferred orientation.
* Brightfield RGB: a stain jitter in HED space (:func:`hed_jitter`, after Tellez et al. 2019,
  "Quantifying the effects of data augmentation and stain color normalization in convolutional
  neural networks for computational pathology"), p = 0.8, rounded to the tile's integer levels; then
  with p = 0.5 a mild contrast and brightness change, ``x·a + b·white``, a ~ U(1 ± 0.1), b ~ U(± 0.1),
  clipped to [0, white] and truncated to an integer level (as albumentations' ``RandomBrightnessContrast``
  on uint8). A stain-basis projection (e.g. albumentations' ``HEStain``) recolours a tile even at zero
  jitter (mean blue of ``tests/data/he-target.png`` 139 → 175–185 of 255), a train/eval shift; the
  full-rank basis here is the identity at zero jitter.
* Fluorescence, or any other channel count: :func:`channel_jitter`, an independent gamma, contrast
  and brightness per channel in raw units (never clipped above: 16-bit counts keep their range;
  channels imaged with separate exposures get separate factors), p = 0.8.

Then, in training and evaluation alike: ``(x − mean) / std`` per channel in raw units
(:func:`pipeline.data.channel_normalisation`), and a resize to ``image_size`` when it differs from the
tile: the exact area average when shrinking, bilinear (half-pixel centres) when enlarging — OpenCV's
``INTER_AREA`` and ``INTER_LINEAR``, which the albumentations pipeline this replaces used.
``tests/test_augment_gpu.py`` holds that pipeline as the reference and compares the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["STAINS", "TileTransform", "apply_d4", "build_transform", "channel_jitter", "hed_jitter", "resize"]

# Ruifrok & Johnston's H and E optical-density vectors and their orthogonal complement (a full-rank
# basis, so zero jitter is the identity); rows: the OD of one unit of each stain.
_H, _E = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
_H, _E = _H / np.linalg.norm(_H), _E / np.linalg.norm(_E)
STAINS = np.stack([_H, _E, np.cross(_H, _E) / np.linalg.norm(np.cross(_H, _E))])

HED_P, HED_ALPHA, HED_BETA = 0.8, 0.15, 0.05  # p, concentration scale 1 ± alpha, shift ± beta (OD units)
BC_P, BC_CONTRAST, BC_BRIGHTNESS = 0.5, 0.1, 0.1  # p, a ~ 1 ± contrast, b ~ ± brightness · white
JITTER_P, GAMMA, CONTRAST, BRIGHTNESS = 0.8, (0.8, 1.25), (0.8, 1.2), (-0.2, 0.2)


class TileTransform:
    """B×T×T×C raw tiles (uint8/uint16, any device) → B×C×S×S float32 model input on the same device.

    ``modality``, ``mean``/``std`` (per channel, raw units) and ``image_size`` (S; None: the tile size)
    as the model was trained; ``train``: augment (see the module), else only normalise and resize
    (deterministic). ``seed`` seeds the parameters' generator; :meth:`reseed` restarts it. The
    result is channels-last in memory on CUDA (as the model is), contiguous elsewhere.
    """

    def __init__(self, modality: str, train: bool, mean: Sequence[float], std: Sequence[float],
                 image_size: int | None = None, seed: int = 0):
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per channel, got {len(self.mean)} and {len(self.std)}")
        self.modality, self.train, self.image_size = str(modality), bool(train), image_size
        self.stain_jitter = self.train and self.modality == "brightfield" and len(self.mean) == 3
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed) % 2**63)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.ndim != 4 or tiles.shape[-1] != len(self.mean):
            raise ValueError(f"expected B×T×T×{len(self.mean)} tiles, got shape {tuple(tiles.shape)}")
        integer = not tiles.dtype.is_floating_point
        white = float(torch.iinfo(tiles.dtype).max) if integer else 1.0
        x = tiles
        if self.train:  # every step below works in place on this batch's own float copy
            x = apply_d4(x, torch.randint(0, 8, (len(x),), generator=self.generator)).float()
            if self.stain_jitter:
                hed_jitter(x, white, integer, *self._hed_draws(len(x)))
                _contrast_brightness(x, white, integer, *self._bc_draws(len(x), white))
            else:
                channel_jitter(x, self.mean, self.std, *self._jitter_draws(len(x)))
        dev, (b, t, _, c) = x.device, x.shape
        mean = torch.tensor(self.mean, dtype=torch.float32).to(dev, non_blocking=True)[:, None, None]
        inv_std = torch.tensor(self.std, dtype=torch.float32).reciprocal().to(dev, non_blocking=True)[:, None, None]
        layout = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        out = torch.empty((b, c, t, t), dtype=torch.float32, device=dev, memory_format=layout)
        torch.sub(x.permute(0, 3, 1, 2), mean, out=out).mul_(inv_std)  # (x − mean) / std, B×C×T×T
        return resize(out, self.image_size).contiguous(memory_format=layout)

    # parameters: drawn in a fixed order for every tile, applied or not, so the stream depends only on the seed

    def _uniform(self, shape, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def _hed_draws(self, n: int):
        on = torch.rand(n, generator=self.generator) < HED_P
        scale = self._uniform((n, 2), 1 - HED_ALPHA, 1 + HED_ALPHA)
        shift = self._uniform((n, 2), -HED_BETA, HED_BETA)
        return on, scale, shift

    def _bc_draws(self, n: int, white: float):
        on = torch.rand(n, generator=self.generator) < BC_P
        contrast = self._uniform(n, 1 - BC_CONTRAST, 1 + BC_CONTRAST)
        brightness = self._uniform(n, -BC_BRIGHTNESS, BC_BRIGHTNESS) * white
        return torch.where(on, contrast, 1.0), torch.where(on, brightness, 0.0)

    def _jitter_draws(self, n: int):
        c = len(self.mean)
        on = torch.rand(n, generator=self.generator) < JITTER_P
        gamma = self._uniform((n, c), math.log(GAMMA[0]), math.log(GAMMA[1])).exp()
        return on, gamma, self._uniform((n, c), *CONTRAST), self._uniform((n, c), *BRIGHTNESS)


def build_transform(modality: str, train: bool, mean: Sequence[float], std: Sequence[float],
                    image_size: int | None = None, seed: int = 0) -> TileTransform:
    """The :class:`TileTransform` of a model: training (augmenting, seeded) or evaluation."""
    return TileTransform(modality, train, mean, std, image_size, seed)


def apply_d4(x: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    """Tile b of ``x`` (B×T×T×C) turned by ``element[b]`` ∈ 0…7 (CPU int64): rot90 k = e mod 4 times, then
    flipped left–right when e ≥ 4 — the 8 elements of the dihedral group D4."""
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"D4 needs square tiles, got {x.shape[1]}×{x.shape[2]}")
    if x.dtype in (torch.uint16, torch.uint32):  # few kernels for these: move the same bits as signed integers
        signed = torch.int16 if x.dtype == torch.uint16 else torch.int32
        return apply_d4(x.view(signed), element).view(x.dtype)
    out = torch.empty_like(x)
    for e in range(8):
        picked = torch.nonzero(element == e).flatten()
        if len(picked) == 0:
            continue
        picked = picked.to(x.device, non_blocking=True)
        part = torch.rot90(x.index_select(0, picked), e % 4, dims=(1, 2))
        out.index_copy_(0, picked, part.flip(2) if e >= 4 else part)
    return out


def _selected(on: torch.Tensor, device) -> torch.Tensor:
    """The indices where the CPU boolean ``on`` is true, on ``device`` (found on the CPU: no device sync)."""
    return torch.nonzero(on).flatten().to(device, non_blocking=True)


def hed_jitter(x: torch.Tensor, white: float, integer: bool, on: torch.Tensor, scale: torch.Tensor,
               shift: torch.Tensor) -> torch.Tensor:
    """Stain jitter of RGB tiles ``x`` (B×T×T×3 float32, raw levels, white = ``white``) in HED space, in place.

    Per tile b where ``on[b]``: concentration_k ← concentration_k·scale[b, k] + shift[b, k] for k ∈ {H, E}
    (``scale``, ``shift``: B×2, OD = natural-log units); the residual channel is kept. The whole
    jitter is one linear map in OD space, od·unmix·diag(scale)·stains + shift·stains; OD is floored at
    0 (nothing brighter than white) and ``integer`` rounds to the tile's levels. Returns ``x``.
    """
    n = int(on.sum())
    if n == 0:
        return x
    stains = torch.tensor(STAINS, dtype=torch.float64)
    full_scale = torch.cat([scale[on], torch.ones(n, 1, dtype=torch.float64)], 1)
    full_shift = torch.cat([shift[on], torch.zeros(n, 1, dtype=torch.float64)], 1)
    mix = (torch.linalg.inv(stains)[None] * full_scale[:, None, :]) @ stains  # n×3×3
    offset = full_shift @ stains  # n×3
    mix, offset = (t.float().to(x.device, non_blocking=True) for t in (mix, offset))
    picked = _selected(on, x.device)
    part = x.index_select(0, picked)
    od = part.clamp_min_(1.0 if white > 1 else 1e-4).log_().neg_().add_(math.log(white))  # −log(x / white)
    od = torch.baddbmm(offset[:, None, :], od.view(n, -1, 3), mix).view(part.shape)
    part = od.clamp_min_(0.0).neg_().exp_().mul_(white)
    if integer:
        part.round_()
    return x.index_copy_(0, picked, part)


def _contrast_brightness(x: torch.Tensor, white: float, integer: bool, contrast: torch.Tensor,
                         brightness: torch.Tensor) -> torch.Tensor:
    """x·contrast[b] + brightness[b], clipped to [0, white], truncated to an integer level for integer tiles; in place."""
    a, b = (t.float().to(x.device, non_blocking=True)[:, None, None, None] for t in (contrast, brightness))
    x.mul_(a).add_(b).clamp_(0.0, white)
    return x.floor_() if integer else x


def channel_jitter(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], on: torch.Tensor,
                   gamma: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
    """Independent gamma, contrast and brightness per channel of ``x`` (B×T×T×C float32, raw units), in place.

    Channel c of tile b where ``on[b]``, with m, s its mean and std: x ← r·(x/r)^γ with r = m + 2s, then
    x ← m + a·(x − m) + β·s, then x ≥ 0 (``gamma``, ``contrast`` a, ``brightness`` β: B×C). Never
    clipped above. Returns ``x``.
    """
    if not bool(on.any()):
        return x
    dev = x.device
    m = torch.tensor(mean, dtype=torch.float32).to(dev, non_blocking=True)
    s = torch.tensor(std, dtype=torch.float32).to(dev, non_blocking=True)
    ref = (m + 2 * s).clamp_min(1e-6)
    g, a, b = (t[on].float().to(dev, non_blocking=True)[:, None, None, :] for t in (gamma, contrast, brightness))
    picked = _selected(on, dev)
    part = x.index_select(0, picked).clamp_min_(0.0).div_(ref).pow_(g).mul_(ref)
    part.sub_(m).mul_(a).add_(m + b * s).clamp_min_(0.0)
    return x.index_copy_(0, picked, part)


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """B×C×T×T → B×C×S×S (S = ``size``; None or T: unchanged): area average when shrinking, bilinear
    with half-pixel centres when enlarging (OpenCV's ``INTER_AREA`` and ``INTER_LINEAR``)."""
    t = x.shape[-1]
    if size is None or size == t:
        return x
    if size > t:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    weights = torch.from_numpy(area_weights(t, size)).to(x.device, non_blocking=True)
    return weights @ x @ weights.T


@lru_cache(maxsize=16)
def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32: each output pixel the mean of the input pixels it covers, partial pixels
    by their covered fraction — OpenCV's ``INTER_AREA`` for a shrink by any factor."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for d in range(n_out):
        start, stop = d * scale, (d + 1) * scale
        first, last = math.ceil(start), min(math.floor(stop), n_in - 1)
        first = min(first, last)
        cell = min(scale, n_in - start)
        if first - start > 1e-3:
            w[d, first - 1] = (first - start) / cell
        w[d, first:last] = 1.0 / cell
        if stop - last > 1e-3:
            w[d, last] = min(stop - last, 1.0, cell) / cell
    return w.astype(np.float32)
