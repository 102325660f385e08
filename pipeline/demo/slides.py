"""Demo slides: tissue, lesions and cells of an H&E-like slide, rendered and written as a pyramidal TIFF."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.demo.cells import (
    _Cells,
    _make_witnesses,
    _new_cells,
    _noise_field,
    _place,
    _resize,
    _smooth_noise,
    _stamp,
)
from pipeline.demo.dataset import (
    _E_VEC,
    _H_VEC,
    _LESION_DENSITY_BOOST,
    _TILE,
    DemoSample,
    DemoSettings,
)
from pipeline.files import atomic_write

# --------------------------------------------------------------------------------------------
# slides


@dataclass
class _SlideScene:
    """Geometry of one slide: tissue field and threshold, lesions, cells (all in level-0 px)."""

    tissue: np.ndarray  # float32 (H, W) soft tissue mask 0..1
    lesion: np.ndarray  # float32 (H, W) soft lesion mask 0..1
    lesions: list[tuple[float, float, float, np.ndarray, np.ndarray]]  # cx, cy, radius px, amp, phase
    cells: _Cells


def _lesion_member(les, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed normalised depth inside one lesion outline (> 0 inside) for points (px)."""
    cx, cy, r, amp, phase = les
    dx, dy = x - cx, y - cy
    t = np.arctan2(dy, dx)
    k = np.arange(2, 2 + len(amp))
    rad = r * (1.0 + (amp[None, :] * np.cos(k[None, :] * t[..., None] + phase[None, :])).sum(-1))
    return 1.0 - np.sqrt(dx * dx + dy * dy) / rad


def _slide_scene(settings: DemoSettings, sample: DemoSample, rng: np.random.Generator) -> _SlideScene:
    """Tissue, lesions and cells of one slide (level-0 px), drawn from the sample's layout stream.

    Tissue covers ~44-56 % of the slide in a few irregular fragments with holes; ``lesions``
    hypercellular blobs of radius ~min(110 µm, 13 % of the short side) sit deep inside tissue on
    every slide.  Ordinary nuclei have a mean radius of 3-4.5 µm; on positive slides
    ``witness_fraction`` of each lesion's cells (at least one) become witnesses: 1.4-1.6x the
    radius, 1.25x the hematoxylin, about twice as irregular an outline, a thicker nuclear envelope
    and a nucleolus. The steps draw from ``rng`` in a fixed order: same seed, same slide.
    """
    coarse = _coarse_grid(settings)
    tissue, tissue_low = _tissue(settings, coarse, rng)
    lesions = _lesions(settings, coarse, tissue_low, rng)
    lesion = _lesion_mask(lesions, tissue, settings.slide_width, settings.slide_height)
    cells = _slide_cells(settings, sample, tissue, lesion, lesions, rng)
    return _SlideScene(tissue=tissue, lesion=lesion, lesions=lesions, cells=cells)


@dataclass
class _Coarse:
    """The 8×-coarser grid the tissue field and the lesions are drawn on: cell centres in level-0 px."""

    step: int
    h: int
    w: int
    yy: np.ndarray
    xx: np.ndarray


def _coarse_grid(settings: DemoSettings) -> _Coarse:
    H, W = settings.slide_height, settings.slide_width
    step = 8
    h, w = math.ceil(H / step), math.ceil(W / step)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return _Coarse(step, h, w, (yy + 0.5) * (H / h), (xx + 0.5) * (W / w))


def tissue_fragments(xx: np.ndarray, yy: np.ndarray, width: float, height: float, rng: np.random.Generator,
                     centre: tuple[float, float], major: tuple[float, float]) -> np.ndarray:
    """The union (max) of 3-5 Gaussian ellipses evaluated at the points (``xx``, ``yy``) of a ``width`` ×
    ``height`` frame: centres within ``centre`` of each side, major axes ``major`` of sqrt(width·height),
    minor axes 0.45-0.9 of the major, any angle; -1 where none reaches. Draws from ``rng`` in a fixed order."""
    size = math.sqrt(width * height)
    field = np.full(xx.shape, -1.0, np.float32)
    for _ in range(int(rng.integers(3, 6))):
        cx, cy = rng.uniform(*centre) * width, rng.uniform(*centre) * height
        sa = rng.uniform(*major) * size
        sb = sa * rng.uniform(0.45, 0.9)
        ang = rng.uniform(0.0, np.pi)
        u = ((xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)) / sa
        v = (-(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)) / sb
        field = np.maximum(field, np.exp(-0.5 * (u * u + v * v)))
    return field


def _tissue(settings: DemoSettings, coarse: _Coarse, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A union of a few distorted elliptical fragments, thresholded at ~40-60 % cover, with a wobbly margin,
    a ragged soft edge and holes: (H, W) float32 soft tissue mask, and the coarse boolean tissue."""
    H, W, mpp = settings.slide_height, settings.slide_width, settings.slide_mpp
    step, h, w, yy, xx = coarse.step, coarse.h, coarse.w, coarse.yy, coarse.xx
    size = math.sqrt(H * W)
    field = tissue_fragments(xx, yy, W, H, rng, centre=(0.22, 0.78), major=(0.12, 0.22))
    field += 0.22 * _smooth_noise(rng, (h, w), 0.05 * size / step)
    field += 0.06 * _smooth_noise(rng, (h, w), 0.012 * size / step)
    # keep tissue off the slide border with a wobbly margin (no straight cut edges)
    margin = 0.12 * min(H, W)
    edge = np.minimum(np.minimum(xx, W - xx), np.minimum(yy, H - yy))
    edge = edge + 0.35 * margin * _smooth_noise(rng, (h, w), 0.03 * size / step)
    win = np.clip(edge / margin, 0.0, 1.0)
    field = field * win - 1.5 * (1.0 - win) ** 2
    coverage = rng.uniform(0.44, 0.56)
    thr = float(np.quantile(field, 1.0 - coverage))
    # fine ragged edge at full resolution; soft edge of ~1.5 px
    full = _resize(field - thr, (H, W)) + 0.012 * _noise_field(rng, (H, W), 6.0 / mpp)
    gy, gx = np.gradient(field)
    near = np.abs(field - thr) < 0.05
    mag = np.hypot(gy, gx)[near] if near.any() else np.hypot(gy, gx).ravel()
    grad = float(np.median(mag)) / (H / h)  # field units per level-0 px at the tissue edge
    tissue = np.clip(full / (1.5 * max(grad, 1e-4)) + 0.5, 0.0, 1.0).astype(np.float32)
    # holes: vessels / tears, where a mid-scale noise peaks
    holes = _noise_field(rng, (H, W), 30.0 / mpp)
    tissue *= np.clip((2.3 - holes) * 4.0, 0.0, 1.0)
    return tissue, field > thr


def _lesions(settings: DemoSettings, coarse: _Coarse, tissue_low: np.ndarray, rng: np.random.Generator) -> list:
    """Irregular blobs deep inside tissue (the same on positive and negative slides): (cx, cy, r, amp, phase)."""
    from scipy import ndimage

    H, mpp = settings.slide_height, settings.slide_mpp
    h, w, yy, xx = coarse.h, coarse.w, coarse.yy, coarse.xx
    r_base = (settings.lesion_radius or min(110.0, 0.13 * min(H, settings.slide_width) * mpp)) / mpp
    depth = ndimage.distance_transform_edt(tissue_low) * (H / h)
    taken = np.zeros((h, w), bool)
    lesions = []
    for _ in range(settings.lesions):
        r = r_base * rng.uniform(0.8, 1.2)
        ok = (depth >= 0.8 * r) & ~taken
        if not ok.any():
            ok = ~taken & (depth > 0)
            if not ok.any():
                ok = tissue_low
            if not ok.any():
                ok = np.ones_like(tissue_low)
            cand = np.flatnonzero(ok)
            best = cand[np.argsort(-depth.ravel()[cand], kind="stable")[: max(1, len(cand) // 20)]]
            pick = int(rng.choice(best))
            r = max(min(r, 0.9 * float(depth.ravel()[pick])), 10.0 / mpp)
        else:
            pick = int(rng.choice(np.flatnonzero(ok)))
        cy, cx = yy.ravel()[pick], xx.ravel()[pick]
        amp = rng.normal(0.0, 1.0, 4) * np.array([0.12, 0.08, 0.05, 0.03])
        les = (float(cx), float(cy), float(r), amp, rng.uniform(0.0, 2 * np.pi, 4))
        lesions.append(les)
        taken |= np.hypot(xx - cx, yy - cy) < 2.4 * r
    return lesions


def _lesion_mask(lesions: list, tissue: np.ndarray, W: int, H: int) -> np.ndarray:
    """(H, W) float32 soft mask of the lesions, within tissue."""
    lesion = np.zeros((H, W), np.float32)
    for les in lesions:
        cx, cy, r = les[:3]
        x0, x1 = max(int(cx - 1.5 * r), 0), min(int(cx + 1.5 * r) + 1, W)
        y0, y1 = max(int(cy - 1.5 * r), 0), min(int(cy + 1.5 * r) + 1, H)
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        m = np.clip(_lesion_member(les, gx, gy) * les[2] / 4.0 + 0.5, 0.0, 1.0)
        lesion[y0:y1, x0:x1] = np.maximum(lesion[y0:y1, x0:x1], m)
    return lesion * tissue


def _slide_cells(settings: DemoSettings, sample: DemoSample, tissue: np.ndarray, lesion: np.ndarray, lesions: list,
                 rng: np.random.Generator) -> _Cells:
    """Nuclei over the tissue, denser in lesions; on a positive slide, witnesses among each lesion's cells."""
    H, W, mpp = settings.slide_height, settings.slide_width, settings.slide_mpp

    def target(x, y):
        iy = np.clip(y.astype(int), 0, H - 1)
        ix = np.clip(x.astype(int), 0, W - 1)
        inside = tissue[iy, ix] > 0.99
        boost = 1.0 + (_LESION_DENSITY_BOOST - 1.0) * (lesion[iy, ix] > 0.5)
        return inside * boost * settings.cell_density / 1e4

    xy = _place(rng, W, H, mpp, settings.cell_density, target)
    cells = _new_cells(rng, xy, mpp, (3.0, 4.5), (6.5, 9.0), 1.0)
    in_lesion = np.zeros((len(cells), len(lesions)), bool)
    for j, les in enumerate(lesions):
        in_lesion[:, j] = _lesion_member(les, cells.x, cells.y) > 0
    cells.lesion[:] = in_lesion.any(1)
    if sample.label != "positive":
        return cells
    idx = []
    for j in range(len(lesions)):
        members = np.flatnonzero(in_lesion[:, j] & ~np.isin(np.arange(len(cells)), idx))
        # Witnesses sit well inside the slide so their whole outline is on it.
        members = members[(cells.x[members] > 12 / mpp) & (cells.x[members] < W - 12 / mpp)
                          & (cells.y[members] > 12 / mpp) & (cells.y[members] < H - 12 / mpp)]
        nw = min(len(members), settings.witnesses or max(1, round(settings.witness_fraction * len(members))))
        idx.extend(rng.choice(members, nw, replace=False).tolist() if nw else [])
    return _make_witnesses(rng, cells, np.sort(np.array(idx, int)), mpp, grow=(1.4, 1.6),
                           stain=1.25, irregular=2.2, nucleolus=0.6)


def _fibre_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Wavy fibre ridges (0..1, float32): zero crossings of elongated noise at two orientations."""
    from scipy import ndimage

    step = max(1.0, scale_px / 2.0)
    small = (max(8, math.ceil(shape[0] / step)), max(8, math.ceil(shape[1] / step)))
    angle = rng.uniform(0.0, 180.0)
    fields_ = []
    for extra in (0.0, rng.uniform(50.0, 80.0)):
        n = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), (0.9, 3.5), mode="wrap")
        n = ndimage.rotate(n, angle + extra, reshape=False, order=1, mode="grid-wrap")
        fields_.append(n / max(float(n.std()), 1e-12))
    w = 1.0 / (1.0 + np.exp(-3.0 * _smooth_noise(rng, small, 12.0)))
    f = w * fields_[0] + (1.0 - w) * fields_[1]
    f /= np.sqrt(w * w + (1.0 - w) ** 2)
    ridges = np.exp(-np.square(f / 0.45))
    return _resize(ridges, shape)


def _render_slide(settings: DemoSettings, scene: _SlideScene, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 (H, W, 3) level-0 image by Beer–Lambert: OD = c_H v_H + c_E v_E, RGB = 255·10^-OD.

    Hematoxylin: nuclei (chromatin texture, darker envelope, nucleoli) plus a faint wash in
    tissue.  Eosin: stroma fibres and patchy texture, slightly denser cytoplasm around each
    nucleus.  A small blue-only absorbance in tissue stands in for mounting medium and unstained
    tissue so that eosin reads pink rather than magenta.  Glass is ~244 in every channel.
    """
    H, W, mpp = settings.slide_height, settings.slide_width, settings.slide_mpp
    tissue, lesion = scene.tissue, scene.lesion
    f32 = np.float32
    # eosin: wavy stroma fibres plus patchy texture; lesions are a little less fibrous
    fibres = _fibre_field(rng, (H, W), 2.5 / mpp)
    patchy = _noise_field(rng, (H, W), 25.0 / mpp)
    eosin = fibres * f32(0.11)
    eosin += f32(0.13)
    eosin += patchy * f32(0.03)
    eosin *= 1.0 - f32(0.25) * lesion
    # cells: nuclei (hematoxylin) and cytoplasm (eosin)
    nuclei = np.zeros((H, W), f32)
    cyto = np.zeros((H, W), f32)
    nucleoli = np.zeros((H, W), f32)
    _stamp(scene.cells, (H, W), nuclei, cyto, nucleolus=nucleoli)
    chromatin = _noise_field(rng, (H, W), 1.0 / mpp)
    np.maximum(chromatin, -2.0, out=chromatin)
    chromatin *= f32(0.22)
    chromatin += f32(0.8)
    hema = nuclei * chromatin
    hema *= f32(0.6)
    hema += f32(0.02) + f32(0.012) * lesion
    hema *= tissue
    np.minimum(nuclei, 1.0, out=nuclei)
    eosin += cyto * f32(0.07)
    eosin += nuclei * f32(0.05)
    eosin += nucleoli * f32(0.35)
    eosin *= tissue
    base = rng.standard_normal((H, W), dtype=f32)
    base *= f32(0.004)
    base += f32(0.019)
    rgb = np.empty((H, W, 3), np.uint8)
    od = np.empty((H, W), f32)
    for ch in range(3):
        np.multiply(hema, f32(_H_VEC[ch]), out=od)
        od += eosin * f32(_E_VEC[ch])
        od += base
        if ch == 2:
            od += tissue * f32(0.045)
        od *= f32(-math.log(10.0))
        np.exp(od, out=od)
        od *= f32(255.0)
        od += f32(0.5)
        np.minimum(od, 255.0, out=od)
        rgb[..., ch] = od  # values are in [0, 255.5): the cast truncates, i.e. rounds
    return rgb


def _pyramid(rgb: np.ndarray) -> list[np.ndarray]:
    """Levels 1, 1/2, 1/4, ... (2x2 box filter) until the long side drops below one tile; >= 3 levels."""
    levels = [rgb]
    while len(levels) < 3 or max(levels[-1].shape[:2]) // 2 >= _TILE:
        a = levels[-1]
        h, w = a.shape[:2]
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
        a = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4
        levels.append(a.astype(np.uint8))
    return levels


def _write_slide(path: Path, rgb: np.ndarray, mpp: float) -> None:
    import tifffile

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 3_500_000_000) as tif:
            for i, level in enumerate(_pyramid(rgb)):
                down = rgb.shape[1] / level.shape[1]
                res = 1e4 / (mpp * down)  # px per cm
                tif.write(level, tile=(_TILE, _TILE), photometric="rgb", compression="jpeg",
                          compressionargs={"level": 90}, resolution=(res, res),
                          resolutionunit="CENTIMETER", subfiletype=1 if i else 0,
                          metadata=None, description=f"gapless demo slide; level {i}; {mpp} um/px at level 0")
    atomic_write(path, write)


