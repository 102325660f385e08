"""Demo fluorescence fields: cells in two channels (DNA, marker), written as a 16-bit OME-TIFF."""

from __future__ import annotations

import hashlib
import uuid
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
from pipeline.demo.dataset import _TILE, DemoSample, DemoSettings
from pipeline.files import atomic_write

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


