"""Augmentation and normalisation of tiles (albumentations), the same for training, evaluation and heatmaps.

Augmentation (albumentations, :func:`build_transforms`):

* D4 symmetry (the 8 rotations/flips): a tissue section has no preferred orientation.
* Brightfield RGB: a stain jitter in HED space (:class:`HEDJitter`, after Tellez et al. 2019,
  "Quantifying the effects of data augmentation and stain color normalization in convolutional
  neural networks for computational pathology"). ``A.HEStain`` (albumentations 2.0.8) runs on uint8
  but is not used: with its preset matrices it projects every pixel onto a two-stain basis and
  rebuilds it with a foreign matrix, so even at scale 1 and shift 0 it recolours a tile (on
  ``tests/data/he-target.png`` the mean blue goes from 139 to 175–185 of 255, a systematic
  train/eval shift); its ``vahadane`` method is close to the identity but costs ~16 ms per 96-px tile.
* Fluorescence, or any other channel count: :class:`ChannelIntensityJitter`, an independent
  gamma/contrast/brightness per channel in float32 raw units. albumentations' own intensity
  transforms clip float32 images to [0, 1] and apply one factor to all channels, which suits
  neither 16-bit counts nor channels imaged with separate exposures.
* Then ``A.Normalize`` with per-channel mean/std in raw units (:func:`channel_normalisation`) to
  float32, and ``A.Resize`` when the model wants another size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import albumentations as A
import numpy as np


class HEDJitter(A.ImageOnlyTransform):
    """Stain jitter of brightfield RGB in HED space (Tellez et al. 2019): per stain k ∈ {H, E},
    concentration' = concentration·α_k + β_k, α_k ~ U(1 ± alpha), β_k ~ U(± beta) in optical density
    (natural log) units; the residual (non-H&E) channel is left alone.

    Colour deconvolution uses Ruifrok & Johnston's H and E vectors and their orthogonal complement,
    a full-rank basis, so α = 1, β = 0 returns the tile unchanged (up to rounding) — unlike a
    two-stain projection. Works on uint8 or uint16 RGB (white = the dtype's maximum) and keeps the dtype.
    """

    def __init__(self, alpha: float = 0.15, beta: float = 0.05, p: float = 0.8):
        super().__init__(p=p)
        self.alpha = float(alpha)
        self.beta = float(beta)
        h = np.array([0.65, 0.70, 0.29])
        e = np.array([0.07, 0.99, 0.11])
        h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
        r = np.cross(h, e)
        self._stains = np.stack([h, e, r / np.linalg.norm(r)])  # rows: OD of one unit of each stain
        self._unmix = np.linalg.inv(self._stains)

    def get_params(self):
        rng = self.random_generator
        scale = np.ones(3)
        shift = np.zeros(3)
        scale[:2] = rng.uniform(1 - self.alpha, 1 + self.alpha, 2)
        shift[:2] = rng.uniform(-self.beta, self.beta, 2)
        return {"scale": scale, "shift": shift}

    def apply(self, img, scale, shift, **params):
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"HEDJitter needs RGB (H×W×3), got shape {img.shape}")
        white = float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else 1.0
        od = -np.log(np.maximum(img.astype(np.float32), 1.0 if white > 1 else 1e-4) / white)
        # the whole jitter is one linear map in OD space: od · unmix · diag(scale) · stains + shift · stains
        mix = (self._unmix * scale[None, :]) @ self._stains
        od = od @ mix.astype(np.float32) + (shift @ self._stains).astype(np.float32)
        out = white * np.exp(-np.maximum(od, 0.0))
        if img.dtype.kind in "ui":
            return np.rint(out).astype(img.dtype)
        return out.astype(img.dtype)

    def get_transform_init_args_names(self):
        return ("alpha", "beta")


class ChannelIntensityJitter(A.ImageOnlyTransform):
    """Independent gamma, contrast and brightness per channel, in float32 raw units (never clipped above).

    For channel c with mean m_c and std s_c (raw units): x ← r·(x/r)^γ with r = m_c + 2·s_c and
    γ ~ logU(gamma); then x ← m_c + a·(x − m_c), a ~ U(contrast); then x ← x + b·s_c, b ~ U(brightness);
    finally x ≥ 0. Output float32 in raw units, so a 16-bit channel keeps its full range.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], gamma=(0.8, 1.25), contrast=(0.8, 1.2),
                 brightness=(-0.2, 0.2), p: float = 0.8):
        super().__init__(p=p)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.gamma = tuple(gamma)
        self.contrast = tuple(contrast)
        self.brightness = tuple(brightness)

    def get_params(self):
        rng, n = self.random_generator, len(self.mean)
        return {
            "gamma": np.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1]), n)).astype(np.float32),
            "contrast": rng.uniform(*self.contrast, n).astype(np.float32),
            "brightness": rng.uniform(*self.brightness, n).astype(np.float32),
        }

    def apply(self, img, gamma, contrast, brightness, **params):
        x = img.astype(np.float32)
        if x.ndim == 2:
            x = x[..., None]
        if x.shape[-1] != len(self.mean):
            raise ValueError(f"ChannelIntensityJitter was built for {len(self.mean)} channels, got {x.shape[-1]}")
        ref = np.maximum(self.mean + 2 * self.std, 1e-6)
        x = ref * np.power(np.maximum(x, 0.0) / ref, gamma)
        x = self.mean + contrast * (x - self.mean) + brightness * self.std
        return np.maximum(x, 0.0, out=x).reshape(img.shape) if img.ndim == 2 else np.maximum(x, 0.0, out=x)

    def get_transform_init_args_names(self):
        return ("mean", "std", "gamma", "contrast", "brightness")


def build_transforms(
    modality: str,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
    tile_size: int | None = None,
):
    """An ``albumentations.Compose`` taking an H×W×C tile (uint8/uint16) to H'×W'×C float32, normalised.

    ``train``: D4 symmetry, then a stain jitter (brightfield RGB: :class:`HEDJitter` and a mild
    brightness/contrast change) or a per-channel intensity jitter (fluorescence, or any channel
    count other than 3: :class:`ChannelIntensityJitter`), then normalisation. Eval: normalisation
    only (deterministic). ``mean``/``std`` are per channel in raw units (:func:`channel_normalisation`).
    ``image_size``: resize to this edge (px) when it differs from the tile; ``tile_size`` (optional)
    picks area interpolation for shrinking, bilinear for enlarging.
    """
    import cv2

    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
    steps = []
    if train:
        steps.append(A.D4(p=1.0))
        if modality == "brightfield" and len(mean) == 3:
            steps.append(HEDJitter(p=0.8))
            # on uint8 this is a lookup table, so it stays exact and cheap
            steps.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5))
        else:
            steps.append(ChannelIntensityJitter(mean, std, p=0.8))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=1.0))  # (x − mean) / std in raw units
    if image_size is not None and image_size != tile_size:
        shrink = tile_size is not None and image_size < tile_size
        steps.append(A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
    return A.Compose(steps)


def seed_transform(transform, seed: int) -> None:
    """Seed an albumentations pipeline: each transform gets its own stream derived from ``seed``.

    ``Compose.set_random_seed`` gives every transform the same seed, so two transforms with p = 0.5
    would always fire together; here each child gets a distinct seed.
    """
    if transform is None or not hasattr(transform, "set_random_seed"):
        return
    transform.set_random_seed(int(seed) % 2**32)
    children = getattr(transform, "transforms", None) or []
    for child, child_seed in zip(children, np.random.SeedSequence(int(seed) % 2**32).generate_state(max(len(children), 1))):
        seed_transform(child, int(child_seed))
