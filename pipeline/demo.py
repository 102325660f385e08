"""Synthetic many-instance demo data: H&E-like whole slides and two-channel fluorescence fields.

The question the demo exercises: when the evidence for a label sits in a *few* cells among
*many*, does global average pooling still find it, or do attention heads do better?  So every
sample holds thousands of ordinary cells, and a *positive* sample additionally holds a small
number of **witness cells** that differ subtly (size, stain density, outline, nucleolus / marker
ring), never by an obviously different colour.  Negative slides have the same lesion-like
hypercellular regions as positive ones, only without witnesses, so the lesion shape alone does
not give the label away.

Everything is deterministic for a seed: the same :class:`DemoSettings` give byte-identical
TIFFs, GeoJSON and CSV.  Each sample draws from its own random stream
(``SeedSequence([seed, kind, index])``), so adding slides does not change the existing ones.

Units used throughout:

* lengths in the scene are µm; positions in images are **level-0 pixels** with pixel ``(i, j)``
  covering ``[j, j+1) x [i, i+1)``, so pixel centres sit at ``+0.5`` (the QuPath convention);
* optical density (OD) is decadic: ``RGB = 255 * 10**(-OD)``;
* fluorescence intensities are camera counts (uint16) including a camera offset of ~100.

Layout written by :func:`generate` into ``out``::

    slides/slide-00.tiff          pyramidal tiled JPEG TIFF, OpenSlide 'generic-tiff'
    images/field-00.ome.tif       2-channel (DNA, Marker) uint16 OME-TIFF, zlib
    annotations/<sample_id>.geojson  witness-cell outlines, QuPath-style FeatureCollection
    samples.csv                   sample_id,path,label,group,kind,annotations (written last)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

# scipy and Pillow are imported by the functions that render: Snakemake imports this module for
# plan() when it parses the workflow, and they would more than double that import's time.
from pipeline.errors import GaplessError
from pipeline.files import atomic_write, atomic_write_text

__all__ = ["DemoSettings", "DemoSample", "plan", "generate"]

# Ruifrok & Johnston stain vectors (RGB optical density per unit concentration), normalised.
_H_VEC = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E_VEC = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])

_TILE = 256  # TIFF tile edge, px
_SLIDE_KIND, _FIELD_KIND = 1, 2  # stream ids for the per-sample random generators
_LESION_DENSITY_BOOST = 1.5  # lesion regions are hypercellular (positive and negative slides)
_WITNESS_CLASS = {"name": "Witness", "color": [220, 40, 40]}
_CSV_COLUMNS = ("sample_id", "path", "label", "group", "kind", "annotations")
_MAX_SLIDE_PX = 16384
_MAX_IMAGE_PX = 8192


@dataclass(frozen=True)
class DemoSettings:
    """What to synthesise.

    slides, images: how many whole slides (H&E-like, pyramidal TIFF) and fluorescence fields
        (two-channel uint16 OME-TIFF) to write; labels alternate positive/negative, starting
        with positive.
    slide_width, slide_height: slide size in level-0 px.
    slide_mpp, image_mpp: pixel size in µm/px (slides at level 0).
    image_size: edge of the square fluorescence fields, px.
    cell_density: cells per 10,000 µm² of tissue (slides) or of field (images); lesion regions
        of slides carry 1.5x this density.  Capped in practice by packing (~65 per 10,000 µm²
        at the 7 µm minimum nucleus spacing), so very high values saturate.
    witness_fraction: fraction of the cells in each lesion (positive slides) or of all cells
        (positive fields) that are witness cells; at least one witness per lesion / field.
    lesions: lesion regions per slide (positive and negative slides alike).
    seed: non-negative integer; same seed, same bytes.
    """

    slides: int = 8
    images: int = 8
    slide_width: int = 3072
    slide_height: int = 2304
    slide_mpp: float = 0.5
    image_size: int = 1024
    image_mpp: float = 0.5
    cell_density: float = 40.0
    witness_fraction: float = 0.05
    lesions: int = 2
    seed: int = 0


@dataclass(frozen=True)
class DemoSample:
    """One row of ``samples.csv``; ``path`` and ``annotations`` are relative to the output dir."""

    sample_id: str
    path: str
    label: str
    group: str
    kind: str
    annotations: str


# --------------------------------------------------------------------------------------------
# settings and plan


def _validate(s: DemoSettings) -> None:
    def fail(cause: str, fix: str) -> None:
        raise GaplessError(None, f"demo settings: {cause}", fix)

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    for name in ("slides", "images", "lesions", "seed"):
        v = getattr(s, name)
        if not is_int(v) or v < 0:
            fail(f"{name} must be a non-negative integer, got {v!r}", f"set {name} to 0 or more")
    if s.slides + s.images == 0:
        fail("slides and images are both 0, nothing to generate", "ask for at least one slide or image")
    if s.slides and s.lesions < 1:
        fail(f"lesions must be at least 1 when slides are requested, got {s.lesions!r}",
             "set lesions to 1 or more")
    for name, lo, hi in (("slide_width", 256, _MAX_SLIDE_PX), ("slide_height", 256, _MAX_SLIDE_PX),
                         ("image_size", 64, _MAX_IMAGE_PX)):
        v = getattr(s, name)
        if not is_int(v) or not lo <= v <= hi:
            fail(f"{name} must be an integer between {lo} and {hi} px, got {v!r}",
                 f"set {name} within {lo}..{hi}")
    for name in ("slide_mpp", "image_mpp"):
        v = getattr(s, name)
        if not is_num(v) or not math.isfinite(v) or not 0.05 <= v <= 10.0:
            fail(f"{name} must be a pixel size between 0.05 and 10 µm/px, got {v!r}",
                 f"set {name} to e.g. 0.5")
    v = s.cell_density
    if not is_num(v) or not math.isfinite(v) or not 0 < v <= 200:
        fail(f"cell_density must be above 0 and at most 200 cells per 10,000 µm², got {v!r}",
             "set cell_density to e.g. 40")
    v = s.witness_fraction
    if not is_num(v) or not math.isfinite(v) or not 0 < v <= 1:
        fail(f"witness_fraction must be above 0 and at most 1, got {v!r}",
             "set witness_fraction to e.g. 0.05")


def _ids(prefix: str, n: int) -> list[str]:
    width = max(2, len(str(max(n - 1, 0))))
    return [f"{prefix}-{i:0{width}d}" for i in range(n)]


def plan(settings: DemoSettings) -> list[DemoSample]:
    """The samples `generate` will write, without rendering anything (cheap; Snakemake calls it at parse time).

    Slides come first (``slide-00`` ...), then fluorescence fields (``field-00`` ...).  Labels
    alternate ``positive``/``negative`` starting with positive, so they are balanced.  Each slide
    is its own patient (``patient-00`` ...), each field its own plate group (``plate-00`` ...).
    """
    _validate(settings)
    out: list[DemoSample] = []
    for i, sid in enumerate(_ids("slide", settings.slides)):
        out.append(DemoSample(
            sample_id=sid, path=f"slides/{sid}.tiff", label="positive" if i % 2 == 0 else "negative",
            group=sid.replace("slide", "patient"), kind="slide", annotations=f"annotations/{sid}.geojson"))
    for i, sid in enumerate(_ids("field", settings.images)):
        out.append(DemoSample(
            sample_id=sid, path=f"images/{sid}.ome.tif", label="positive" if i % 2 == 0 else "negative",
            group=sid.replace("field", "plate"), kind="image", annotations=f"annotations/{sid}.geojson"))
    return out


def _index(sample: DemoSample) -> int:
    return int(sample.sample_id.rsplit("-", 1)[1])


def _seeds(settings: DemoSettings, sample: DemoSample) -> tuple[np.random.Generator, np.random.Generator]:
    """Two independent generators for a sample: one for the scene layout, one for textures/noise."""
    kind = _SLIDE_KIND if sample.kind == "slide" else _FIELD_KIND
    layout, render = np.random.SeedSequence([int(settings.seed), kind, _index(sample)]).spawn(2)
    return np.random.default_rng(layout), np.random.default_rng(render)


# --------------------------------------------------------------------------------------------
# small numeric helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field (zero mean, unit std, float32) with correlation length ``sigma`` px."""
    from scipy import ndimage

    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    n -= n.mean()
    n /= max(float(n.std()), 1e-12)
    return n


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a float32 map to ``shape`` (rows, cols); pixel areas are aligned."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), dtype=np.float32)


def _noise_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Smooth noise at full size ``shape`` with feature size ~``scale_px`` px, made on a coarse grid."""
    step = max(1.0, scale_px / 2.0)
    small = (max(4, math.ceil(shape[0] / step)), max(4, math.ceil(shape[1] / step)))
    n = _smooth_noise(rng, small, 1.0)
    return n if small == shape else _resize(n, shape)


# --------------------------------------------------------------------------------------------
# cells: layout, outlines and rendering of small patches


@dataclass
class _Cells:
    """Per-cell parameters (arrays of length N). Positions in level-0 px, sizes in px.

    x, y: nucleus centre; a, b: nucleus semi-axes; phi: rotation (rad); amp, phase: (N, 4)
    radial harmonics k = 2..5 of the nucleus outline; stain: stain amount (OD for slides,
    counts for fields); rim: nuclear-envelope emphasis; nuc_*: nucleolus offset (px),
    width (px) and strength; cyto_r: cytoplasm radius; cyto_amp, cyto_phase: its harmonics;
    cyto_stain: cytoplasm stain; witness / lesion: flags.
    """

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    phi: np.ndarray
    amp: np.ndarray
    phase: np.ndarray
    stain: np.ndarray
    rim: np.ndarray
    nuc_dx: np.ndarray
    nuc_dy: np.ndarray
    nuc_w: np.ndarray
    nuc_s: np.ndarray
    cyto_r: np.ndarray
    cyto_amp: np.ndarray
    cyto_phase: np.ndarray
    cyto_stain: np.ndarray
    witness: np.ndarray
    lesion: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def take(self, keep: np.ndarray) -> "_Cells":
        return _Cells(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def outline(self, i: int, n: int = 20) -> np.ndarray:
        """Closed outline of nucleus ``i``: (n + 1, 2) array of (x, y) level-0 px, first == last."""
        t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        k = np.arange(2, 2 + self.amp.shape[1])
        r = 1.0 + (self.amp[i][None, :] * np.cos(k[None, :] * t[:, None] + self.phase[i][None, :])).sum(1)
        u, v = self.a[i] * r * np.cos(t), self.b[i] * r * np.sin(t)
        c, s = math.cos(self.phi[i]), math.sin(self.phi[i])
        pts = np.stack([self.x[i] + u * c - v * s, self.y[i] + u * s + v * c], axis=1)
        return np.concatenate([pts, pts[:1]])


def _scatter(rng: np.random.Generator, width_um: float, height_um: float, density_max: float,
             dmin_um: float) -> tuple[np.ndarray, float]:
    """Hard-core (Matérn II) point pattern: (points (N, 2) as (x, y) µm, their intensity per µm²).

    Candidates are Poisson at 4x ``density_max`` (per µm²); of two candidates closer than
    ``dmin_um`` the one with the larger random mark is removed.  The survivors' intensity is
    ``(1 - exp(-λ0 π d²)) / (π d²)``; callers thin further to their target density.
    """
    from scipy.spatial import cKDTree

    lam0 = 4.0 * density_max
    n = int(rng.poisson(lam0 * width_um * height_um))
    pts = rng.uniform((0.0, 0.0), (width_um, height_um), size=(n, 2))
    marks = rng.random(n)
    if n > 1:
        pairs = cKDTree(pts).query_pairs(dmin_um, output_type="ndarray")
        if len(pairs):
            loser = np.where(marks[pairs[:, 0]] > marks[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
            keep = np.ones(n, bool)
            keep[loser] = False
            pts = pts[keep]
    area = math.pi * dmin_um ** 2
    return pts, (1.0 - math.exp(-lam0 * area)) / area


def _place(rng: np.random.Generator, width_px: int, height_px: int, mpp: float, density: float,
           target) -> np.ndarray:
    """Cell centres in px for a target-density function ``target(x_px, y_px) -> cells per µm²``."""
    density_max = density * _LESION_DENSITY_BOOST / 1e4
    dmin = min(7.0, 0.8 / math.sqrt(density_max))
    pts, lam = _scatter(rng, width_px * mpp, height_px * mpp, density_max, dmin)
    xy = pts / mpp
    p = target(xy[:, 0], xy[:, 1]) / lam
    keep = rng.random(len(xy)) < p
    return xy[keep]


def _new_cells(rng: np.random.Generator, xy: np.ndarray, mpp: float, r_um: tuple[float, float],
               cyto_um: tuple[float, float], irregular: float) -> _Cells:
    """Ordinary cells at ``xy`` (px): nucleus mean radius uniform in ``r_um`` µm, cytoplasm radius in ``cyto_um``."""
    n = len(xy)
    r = rng.uniform(*r_um, n) / mpp
    aspect = np.clip(1.0 + np.abs(rng.normal(0.0, 0.22, n)), 1.0, 1.8)
    amp = rng.normal(0.0, 1.0, (n, 4)) * (np.array([0.05, 0.035, 0.025, 0.018]) * irregular)
    amp = np.clip(amp, -0.15, 0.15)
    t = rng.uniform(0.0, 2 * np.pi, n)
    has_nucleolus = rng.random(n) < 0.3
    return _Cells(
        x=xy[:, 0].astype(float), y=xy[:, 1].astype(float),
        a=r * np.sqrt(aspect), b=r / np.sqrt(aspect), phi=rng.uniform(0.0, np.pi, n),
        amp=amp, phase=rng.uniform(0.0, 2 * np.pi, (n, 4)),
        stain=rng.lognormal(0.0, 0.12, n), rim=rng.uniform(0.15, 0.3, n),
        nuc_dx=np.cos(t) * r * rng.uniform(0.0, 0.35, n), nuc_dy=np.sin(t) * r * rng.uniform(0.0, 0.35, n),
        nuc_w=0.09 * r, nuc_s=np.where(has_nucleolus, rng.uniform(0.15, 0.35, n), 0.0),
        cyto_r=rng.uniform(*cyto_um, n) / mpp,
        cyto_amp=np.clip(rng.normal(0.0, 0.07, (n, 4)), -0.15, 0.15),
        cyto_phase=rng.uniform(0.0, 2 * np.pi, (n, 4)),
        cyto_stain=rng.lognormal(0.0, 0.2, n),
        witness=np.zeros(n, bool), lesion=np.zeros(n, bool),
    )


def _make_witnesses(rng: np.random.Generator, cells: _Cells, idx: np.ndarray, mpp: float,
                    grow: tuple[float, float], stain: float, irregular: float,
                    nucleolus: float) -> _Cells:
    """Turn cells ``idx`` into witnesses and drop ordinary neighbours that would overlap them."""
    from scipy.spatial import cKDTree

    n = len(idx)
    if n == 0:
        return cells
    g = rng.uniform(*grow, n)
    cells.a[idx] *= g
    cells.b[idx] *= g
    cells.amp[idx] = np.clip(cells.amp[idx] * irregular, -0.25, 0.25)
    cells.stain[idx] = stain * rng.lognormal(0.0, 0.08, n)
    cells.rim[idx] = rng.uniform(0.35, 0.5, n)
    r = np.sqrt(cells.a[idx] * cells.b[idx])
    t = rng.uniform(0.0, 2 * np.pi, n)
    cells.nuc_dx[idx] = np.cos(t) * r * rng.uniform(0.1, 0.3, n)
    cells.nuc_dy[idx] = np.sin(t) * r * rng.uniform(0.1, 0.3, n)
    cells.nuc_w[idx] = 0.13 * r
    cells.nuc_s[idx] = nucleolus * rng.uniform(0.8, 1.2, n)
    cells.witness[idx] = True
    # An enlarged witness would overlap its neighbours more than ordinary nuclei overlap each
    # other: ordinary nuclei closer than 0.85x the sum of the two mean radii are removed.
    radius = np.sqrt(cells.a * cells.b)
    tree = cKDTree(np.stack([cells.x, cells.y], 1))
    drop = np.zeros(len(cells), bool)
    for j in idx:
        near = np.asarray(tree.query_ball_point((cells.x[j], cells.y[j]), 0.85 * (radius[j] + radius.max())), int)
        d = np.hypot(cells.x[near] - cells.x[j], cells.y[near] - cells.y[j])
        drop[near[d < 0.85 * (radius[j] + radius[near])]] = True
    drop &= ~cells.witness
    return cells.take(~drop)


def _radial(c: np.ndarray, s: np.ndarray, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """``1 + sum_k amp_k cos(k θ + phase_k)``, k = 2, 3, ..., from ``c = cos θ``, ``s = sin θ``.

    ``c``, ``s``: (n, P, P); ``amp``, ``phase``: (n, K).  Uses the angle-addition recurrence
    instead of trigonometric calls per harmonic.
    """
    ca = (amp * np.cos(phase)).astype(np.float32)[:, :, None, None]
    sa = (amp * np.sin(phase)).astype(np.float32)[:, :, None, None]
    ck, sk = c * c - s * s, 2.0 * c * s  # k = 2
    out = 1.0 + ca[:, 0] * ck - sa[:, 0] * sk
    for k in range(1, amp.shape[1]):
        ck, sk = ck * c - sk * s, sk * c + ck * s
        out += ca[:, k] * ck - sa[:, k] * sk
    return out


def _paste(canvas: np.ndarray, patches: np.ndarray, x0: np.ndarray, y0: np.ndarray,
           weight: np.ndarray | None = None) -> None:
    """Add (n, P, P) ``patches`` (optionally times per-patch ``weight``) at corners (x0, y0), clipped."""
    H, W = canvas.shape
    P = patches.shape[-1]
    for i in range(len(patches)):
        if weight is not None and weight[i] == 0:
            continue
        ya, xa = max(int(y0[i]), 0), max(int(x0[i]), 0)
        yb, xb = min(int(y0[i]) + P, H), min(int(x0[i]) + P, W)
        if ya >= yb or xa >= xb:
            continue
        patch = patches[i, ya - y0[i]:yb - y0[i], xa - x0[i]:xb - x0[i]]
        canvas[ya:yb, xa:xb] += patch if weight is None else weight[i] * patch


def _patch_grid(x: np.ndarray, y: np.ndarray, half: int):
    """Corners and pixel-centre offsets (dx, dy, float32 (n, P, P)) of patches around (x, y) px."""
    P = 2 * half + 1
    grid = np.arange(P, dtype=np.float32) + 0.5
    x0 = np.floor(x).astype(int) - half
    y0 = np.floor(y).astype(int) - half
    dx = (x0 - x).astype(np.float32)[:, None, None] + grid[None, None, :]
    dy = (y0 - y).astype(np.float32)[:, None, None] + grid[None, :, None]
    return x0, y0, dx, dy


def _stamp(cells: _Cells, shape: tuple[int, int], nucleus: np.ndarray, cyto: np.ndarray | None = None,
           nucleolus: np.ndarray | None = None, ring: tuple[np.ndarray, float, float] | None = None,
           budget: int = 1_200_000) -> None:
    """Add every cell's nucleus and cytoplasm, as small patches, onto full-size maps (in place).

    ``nucleus`` receives ``stain * (coverage * (1 + rim * envelope) + nucleolus)`` (coverage is
    anti-aliased over ~1 px); ``cyto`` receives ``cyto_stain * cytoplasm coverage`` (soft edge);
    ``nucleolus`` receives the nucleolus term alone; ``ring = (map, gain, width)`` adds, for
    witnesses only, a perinuclear ring ``gain * cyto_stain`` peaking ``width * radius`` outside the
    nucleus.  Maps are float32 (rows, cols) of ``shape``.  Cells are processed in chunks of about
    ``budget`` patch pixels; nothing is computed per pixel in Python.
    """
    n_all = len(cells)
    if n_all == 0:
        return
    extent = np.maximum(cells.a, cells.b) * (1.0 + np.abs(cells.amp).sum(1))
    ring_w = ring[2] if ring is not None else 0.0
    extent = extent * (1.0 + 3.0 * ring_w) + 2.0  # px from the centre that a patch must cover
    chunks = []
    # witnesses are larger: they get their own chunks so ordinary cells keep small patches
    for group in (np.flatnonzero(~cells.witness), np.flatnonzero(cells.witness)):
        if len(group):
            half = int(math.ceil(extent[group].max()))
            step = max(1, budget // (2 * half + 1) ** 2)
            chunks += [(group[i:i + step], half) for i in range(0, len(group), step)]
    for members, half in chunks:
        c = cells.take(members)
        x0, y0, dx, dy = _patch_grid(c.x, c.y, half)
        cos = np.cos(c.phi).astype(np.float32)[:, None, None]
        sin = np.sin(c.phi).astype(np.float32)[:, None, None]
        u = (dx * cos + dy * sin) / c.a.astype(np.float32)[:, None, None]
        v = (dy * cos - dx * sin) / c.b.astype(np.float32)[:, None, None]
        rho = np.sqrt(u * u + v * v)
        inv = 1.0 / np.maximum(rho, 1e-6)
        rad = _radial(u * inv, v * inv, c.amp, c.phase)
        rmean = np.sqrt(c.a * c.b).astype(np.float32)[:, None, None]
        dist = (rad - rho) * rmean  # ~px inside the nucleus outline (negative outside)
        cover = np.clip(dist + 0.5, 0.0, 1.0)
        envelope = np.exp(-np.square((dist - 0.8) / 0.9))
        nx = dx - c.nuc_dx.astype(np.float32)[:, None, None]
        ny = dy - c.nuc_dy.astype(np.float32)[:, None, None]
        w2 = (2 * c.nuc_w ** 2).astype(np.float32)[:, None, None]
        nucl = np.exp(-(nx * nx + ny * ny) / w2) * cover
        stain = c.stain.astype(np.float32)
        nuc = cover * (1.0 + c.rim.astype(np.float32)[:, None, None] * envelope)
        nuc += c.nuc_s.astype(np.float32)[:, None, None] * nucl
        _paste(nucleus, nuc, x0, y0, stain)
        if nucleolus is not None:
            _paste(nucleolus, nucl, x0, y0, stain * c.nuc_s.astype(np.float32))
        if ring is not None and c.witness.any():
            width = ring[2] * rmean
            rr = np.exp(-np.square((dist + width) / width))
            _paste(ring[0], rr, x0, y0, (ring[1] * c.cyto_stain * c.witness).astype(np.float32))
    if cyto is None:
        return
    # cytoplasm: a softer, rounder body around the nucleus with its own outline harmonics
    cextent = cells.cyto_r * (1.0 + np.abs(cells.cyto_amp).sum(1)) + 1.0
    chalf = int(math.ceil(min(cextent.max(), 1.6 * cells.cyto_r.max() + 1.0)))
    step = max(1, budget // (2 * chalf + 1) ** 2)
    for s0 in range(0, n_all, step):
        c = cells.take(slice(s0, s0 + step))
        x0, y0, dx, dy = _patch_grid(c.x, c.y, chalf)
        r = np.sqrt(dx * dx + dy * dy)
        inv = 1.0 / np.maximum(r, 1e-6)
        radc = c.cyto_r.astype(np.float32)[:, None, None] * _radial(dx * inv, dy * inv, c.cyto_amp, c.cyto_phase)
        cyt = np.clip((radc - r) / (0.35 * c.cyto_r.astype(np.float32)[:, None, None]), 0.0, 1.0)
        _paste(cyto, np.sqrt(cyt), x0, y0, c.cyto_stain.astype(np.float32))


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
    and a nucleolus.
    """
    from scipy import ndimage

    H, W, mpp = settings.slide_height, settings.slide_width, settings.slide_mpp
    # ---- tissue: a union of a few distorted elliptical fragments, thresholded at ~40-60 % cover
    step = 8
    h, w = math.ceil(H / step), math.ceil(W / step)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = (yy + 0.5) * (H / h)
    xx = (xx + 0.5) * (W / w)
    size = math.sqrt(H * W)
    field = np.full((h, w), -1.0, np.float32)
    for _ in range(int(rng.integers(3, 6))):
        cx, cy = rng.uniform(0.22, 0.78) * W, rng.uniform(0.22, 0.78) * H
        sa = rng.uniform(0.12, 0.22) * size
        sb = sa * rng.uniform(0.45, 0.9)
        ang = rng.uniform(0.0, np.pi)
        u = ((xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)) / sa
        v = (-(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)) / sb
        field = np.maximum(field, np.exp(-0.5 * (u * u + v * v)))
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
    tissue_low = field > thr

    # ---- lesions: irregular blobs deep inside tissue (same on positive and negative slides)
    r_base = min(110.0, 0.13 * min(H, W) * mpp) / mpp
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
    lesion = np.zeros((H, W), np.float32)
    for les in lesions:
        cx, cy, r = les[:3]
        x0, x1 = max(int(cx - 1.5 * r), 0), min(int(cx + 1.5 * r) + 1, W)
        y0, y1 = max(int(cy - 1.5 * r), 0), min(int(cy + 1.5 * r) + 1, H)
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        m = np.clip(_lesion_member(les, gx, gy) * les[2] / 4.0 + 0.5, 0.0, 1.0)
        lesion[y0:y1, x0:x1] = np.maximum(lesion[y0:y1, x0:x1], m)
    lesion *= tissue

    # ---- cells
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
    if sample.label == "positive":
        idx = []
        for j in range(len(lesions)):
            members = np.flatnonzero(in_lesion[:, j] & ~np.isin(np.arange(len(cells)), idx))
            # Witnesses sit well inside the slide so their whole outline is on it.
            members = members[(cells.x[members] > 12 / mpp) & (cells.x[members] < W - 12 / mpp)
                              & (cells.y[members] > 12 / mpp) & (cells.y[members] < H - 12 / mpp)]
            nw = min(len(members), max(1, round(settings.witness_fraction * len(members))))
            idx.extend(rng.choice(members, nw, replace=False).tolist() if nw else [])
        cells = _make_witnesses(rng, cells, np.sort(np.array(idx, int)), mpp, grow=(1.4, 1.6),
                                stain=1.25, irregular=2.2, nucleolus=0.6)
    return _SlideScene(tissue=tissue, lesion=lesion, lesions=lesions, cells=cells)


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


# --------------------------------------------------------------------------------------------
# fluorescence fields


def _field_scene(settings: DemoSettings, sample: DemoSample, rng: np.random.Generator) -> _Cells:
    """Cells of one fluorescence field (px).  Nuclei have a mean radius of 3.5-5 µm, cytoplasm
    8-11 µm.  On positive fields ``witness_fraction`` of all cells (at least one, at least 12 µm
    from the border) become witnesses: a 0.8-0.9x smaller, 1.3x brighter (condensed) nucleus and a
    perinuclear marker ring of ~1.5x the ordinary cytoplasmic marker level.
    """
    n, mpp = settings.image_size, settings.image_mpp

    def target(x, y):
        return np.full(len(x), settings.cell_density / 1e4)

    xy = _place(rng, n, n, mpp, settings.cell_density, target)
    cells = _new_cells(rng, xy, mpp, (3.5, 5.0), (8.0, 11.0), 0.8)
    cells.stain[:] = 1.0 + 0.2 * rng.standard_normal(len(cells)).clip(-2, 2)
    cells.nuc_s[:] *= -1.5  # nucleoli are DNA-poor: darker spots in the DNA channel
    cells.lesion[:] = True
    if sample.label == "positive":
        margin = 12 / mpp
        inner = np.flatnonzero((cells.x > margin) & (cells.x < n - margin)
                               & (cells.y > margin) & (cells.y < n - margin))
        nw = min(len(inner), max(1, round(settings.witness_fraction * len(cells))))
        idx = np.sort(rng.choice(inner, nw, replace=False)) if nw else np.zeros(0, int)
        cells = _make_witnesses(rng, cells, idx, mpp, grow=(0.8, 0.9), stain=1.3,
                                irregular=1.0, nucleolus=0.0)
    return cells


def _render_field(settings: DemoSettings, cells: _Cells, rng: np.random.Generator) -> np.ndarray:
    """(2, H, W) uint16: channel 0 DNA stain, channel 1 marker, camera counts with offset ~100."""
    from scipy import ndimage

    n, mpp = settings.image_size, settings.image_mpp
    shape = (n, n)
    dna = np.zeros(shape, np.float32)
    cyto = np.zeros(shape, np.float32)
    ring = np.zeros(shape, np.float32)
    _stamp(cells, shape, dna, cyto, ring=(ring, 1.1, 0.25))
    chromatin = _noise_field(rng, shape, 0.9 / mpp)
    speckle = np.clip(_noise_field(rng, shape, 0.6 / mpp) - 1.2, 0, None)
    nuclear = np.clip(dna, 0, None)
    dna_sig = 1500.0 * nuclear * (0.85 + 0.12 * chromatin + 0.35 * speckle)
    inside = np.clip(nuclear, 0.0, 1.0)
    cyto_tex = _noise_field(rng, shape, 2.0 / mpp)
    marker_sig = 180.0 * cyto * (0.8 + 0.2 * cyto_tex) * (1.0 - 0.55 * inside) + 180.0 * ring
    # optics: a slight blur (PSF) and vignetting; background autofluorescence
    sigma = max(0.4 / mpp, 0.5)
    dna_sig = ndimage.gaussian_filter(dna_sig, sigma)
    marker_sig = ndimage.gaussian_filter(marker_sig, sigma)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r2 = ((xx - n / 2) ** 2 + (yy - n / 2) ** 2) / (n * n / 2)
    vignette = 1.0 - 0.18 * r2
    auto = 1.0 + 0.3 * _noise_field(rng, shape, 40.0 / mpp)
    out = np.empty((2,) + shape, np.uint16)
    for c, (sig, bg) in enumerate(((dna_sig, 12.0), (marker_sig, 30.0))):
        photons = np.clip((sig + bg * auto) * vignette, 0, None) / 2.0  # gain 2 counts / photon
        counts = 2.0 * rng.poisson(photons).astype(np.float32) + 100.0  # camera offset
        counts += 3.0 * rng.standard_normal(shape, dtype=np.float32)  # read noise
        out[c] = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    return out


def _write_field(path: Path, data: np.ndarray, mpp: float, sample_id: str, seed: int) -> None:
    import tifffile

    digest = hashlib.sha256(f"gapless-demo:{seed}:{sample_id}:ome".encode()).digest()
    meta = {
        "axes": "CYX",
        "UUID": f"urn:uuid:{uuid.UUID(bytes=digest[:16], version=4)}",
        "Name": sample_id,
        "PhysicalSizeX": float(mpp), "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(mpp), "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": ["DNA", "Marker"]},
    }

    def write(tmp: Path) -> None:
        tifffile.imwrite(tmp, data, ome=True, photometric="minisblack", compression="zlib",
                         tile=(_TILE, _TILE) if data.shape[1] >= _TILE else None, metadata=meta)
    atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# annotations, files, driver


def _geojson(cells: _Cells, sample_id: str, seed: int, width: int, height: int) -> str:
    """QuPath-style FeatureCollection of witness outlines, level-0 px (x, y), rounded to 0.01 px."""
    feats = []
    for k, i in enumerate(np.flatnonzero(cells.witness)):
        ring = cells.outline(int(i))
        ring[:, 0] = np.clip(ring[:, 0], 0.0, width)
        ring[:, 1] = np.clip(ring[:, 1], 0.0, height)
        coords = [[round(float(x), 2), round(float(y), 2)] for x, y in ring]
        coords[-1] = coords[0]
        digest = hashlib.sha256(f"gapless-demo:{seed}:{sample_id}:{k}".encode()).digest()
        feats.append({
            "type": "Feature",
            "id": str(uuid.UUID(bytes=digest[:16], version=4)),
            "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": {"objectType": "annotation", "classification": dict(_WITNESS_CLASS)},
        })
    body = ",\n".join(json.dumps(f, separators=(",", ":")) for f in feats)
    return '{"type":"FeatureCollection","features":[' + (f"\n{body}\n" if feats else "") + "]}\n"




def _scene(settings: DemoSettings, sample: DemoSample):
    """(scene, render rng) for a sample: a _SlideScene for slides, a _Cells for fields."""
    layout_rng, render_rng = _seeds(settings, sample)
    if sample.kind == "slide":
        return _slide_scene(settings, sample, layout_rng), render_rng
    return _field_scene(settings, sample, layout_rng), render_rng


def _generate_one(out: Path, settings: DemoSettings, sample: DemoSample) -> None:
    scene, rng = _scene(settings, sample)
    if sample.kind == "slide":
        rgb = _render_slide(settings, scene, rng)
        _write_slide(out / sample.path, rgb, settings.slide_mpp)
        cells, w, h = scene.cells, settings.slide_width, settings.slide_height
    else:
        data = _render_field(settings, scene, rng)
        _write_field(out / sample.path, data, settings.image_mpp, sample.sample_id, settings.seed)
        cells, w, h = scene, settings.image_size, settings.image_size
    atomic_write_text(out / sample.annotations, _geojson(cells, sample.sample_id, settings.seed, w, h), newline="")


def generate(out: str | Path, settings: DemoSettings = DemoSettings(), progress: bool = True,
             id_prefix: str = "") -> Path:
    """Render everything into `out`, return the path of `out/samples.csv`.

    Files are written under temporary names and renamed into place; ``samples.csv`` is written
    last, so an interrupted run never leaves a sheet that points at missing files.  With
    ``progress`` a tqdm bar over samples goes to stderr; nothing else is printed. ``id_prefix``
    goes before every sample id and group in the sheet (not the file names), so that several demo
    datasets can share one tile folder and one comparison.
    """
    samples = plan(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for sample in tqdm(samples, desc="demo", unit="sample", disable=not progress, leave=False):
        _generate_one(out, settings, sample)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for s in samples:
        writer.writerow([id_prefix + getattr(s, c) if c in ("sample_id", "group") else getattr(s, c)
                         for c in _CSV_COLUMNS])
    sheet = out / "samples.csv"
    atomic_write_text(sheet, buf.getvalue(), newline="")
    return sheet
