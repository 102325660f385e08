"""Demo fluorescence fields: cells in two channels (DNA, marker), written as a 16-bit OME-TIFF."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.demo.cells import (
    _Cells,
    _make_witnesses,
    _new_cells,
    _noise_field,
    _place,
    _stamp,
)
from pipeline.demo.dataset import _TILE, DemoSample, DemoSettings, field_size
from pipeline.demo.slides import _render_slide, _SlideScene
from pipeline.errors import GaplessError
from pipeline.files import atomic_write

# --------------------------------------------------------------------------------------------
# fluorescence fields


def _field_scene(settings: DemoSettings, sample: DemoSample, rng: np.random.Generator) -> _Cells:
    """Cells of one field (px), fluorescence or brightfield (``image_modality``).

    Fluorescence: nuclei of mean radius 3.5-5 µm, cytoplasm 8-11 µm; a witness has a 0.8-0.9x smaller,
    1.3x brighter (condensed) nucleus and a perinuclear marker ring of ~1.5x the ordinary cytoplasmic
    marker level. Brightfield: the slides' cells (nuclei 3-4.5 µm, cytoplasm 6.5-9 µm) and witnesses
    (1.4-1.6x larger, darker, irregular nucleus with a nucleolus). On positive fields ``witnesses`` cells
    (or ``witness_fraction`` of all, at least one), at least 12 µm from the border, become witnesses.
    With ``cells_per_image`` the field holds exactly that many cells at ``cell_density``.
    """
    n, mpp = field_size(settings), settings.image_mpp
    if settings.cells_per_image:
        xy = _place_exactly(rng, settings.cells_per_image, n, mpp, settings.cell_density)
    else:
        xy = _place(rng, n, n, mpp, settings.cell_density, lambda x, y: np.full(len(x), settings.cell_density / 1e4))
    brightfield = settings.image_modality == "brightfield"
    if brightfield:
        cells = _new_cells(rng, xy, mpp, (3.0, 4.5), (6.5, 9.0), 1.0)
    else:
        cells = _new_cells(rng, xy, mpp, (3.5, 5.0), (8.0, 11.0), 0.8)
        cells.stain[:] = 1.0 + 0.2 * rng.standard_normal(len(cells)).clip(-2, 2)
        cells.nuc_s[:] *= -1.5  # nucleoli are DNA-poor: darker spots in the DNA channel
    cells.lesion[:] = True
    if sample.label == "positive":
        margin = 12 / mpp
        inner = np.flatnonzero((cells.x > margin) & (cells.x < n - margin)
                               & (cells.y > margin) & (cells.y < n - margin))
        wanted = settings.witnesses or max(1, round(settings.witness_fraction * len(cells)))
        nw = min(len(inner), wanted)
        idx = np.sort(rng.choice(inner, nw, replace=False)) if nw else np.zeros(0, int)
        if brightfield:
            cells = _make_witnesses(rng, cells, idx, mpp, grow=(1.4, 1.6), stain=1.25, irregular=2.2, nucleolus=0.6)
        else:
            cells = _make_witnesses(rng, cells, idx, mpp, grow=(0.8, 0.9), stain=1.3, irregular=1.0, nucleolus=0.0)
    return cells


def _place_exactly(rng: np.random.Generator, count: int, edge_px: int, mpp: float, density: float) -> np.ndarray:
    """``count`` cell centres (px) in a square field: the demo's hard-core pattern, drawn dense enough to
    hold them, then thinned at random to exactly ``count`` (so spread like ``_place``'s, not on a grid)."""
    for boost in (1.3, 1.6, 2.0, 3.0, 5.0):
        xy = _place(rng, edge_px, edge_px, mpp, density * boost, lambda x, y: np.full(len(x), 1.0))
        if len(xy) >= count:
            return xy[np.sort(rng.choice(len(xy), count, replace=False))]
    raise GaplessError(None, f"demo settings: {count} cells do not fit a {edge_px}-px field at {mpp} µm/px",
                       "lower cells_per_image or raise cell_density")


def _render_brightfield_field(settings: DemoSettings, cells: _Cells, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: the slides' H&E rendering of a field covered by tissue (no glass, no lesion)."""
    n = field_size(settings)
    as_slide = replace(settings, slide_width=n, slide_height=n, slide_mpp=settings.image_mpp)
    ones, zeros = np.ones((n, n), np.float32), np.zeros((n, n), np.float32)
    return _render_slide(as_slide, _SlideScene(tissue=ones, lesion=zeros, lesions=[], cells=cells), rng)


def _write_brightfield_field(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """A plain RGB TIFF (zlib, lossless) with its µm/px in the resolution tags."""
    import tifffile

    res = 1e4 / mpp  # px per cm

    def write(tmp: Path) -> None:
        tifffile.imwrite(tmp, rgb, photometric="rgb", compression="zlib", resolution=(res, res),
                         resolutionunit="CENTIMETER", tile=(_TILE, _TILE) if rgb.shape[0] >= _TILE else None,
                         metadata=None, description=f"gapless demo field; {mpp} um/px")
    atomic_write(path, write)


def _render_field(settings: DemoSettings, cells: _Cells, rng: np.random.Generator) -> np.ndarray:
    """(2, H, W) uint16: channel 0 DNA stain, channel 1 marker, camera counts with offset ~100."""
    from scipy import ndimage

    n, mpp = field_size(settings), settings.image_mpp
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


