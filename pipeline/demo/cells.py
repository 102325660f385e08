"""Cells of the demo: layout, outlines and rendering of small patches, and the noise fields they sit in."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from pipeline.demo.dataset import _LESION_DENSITY_BOOST

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
    return np.array(img.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), dtype=np.float32)


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


