"""The demo's settings and plan: which samples, with which labels and random streams (cheap: the workflow
plans the demo when it is parsed, so nothing here imports scipy or Pillow)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# scipy and Pillow are imported by the functions that render: Snakemake imports this module for
# plan() when it parses the workflow, and they would more than double that import's time.
from pipeline.errors import GaplessError
from pipeline.settings import setting

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

    Labels alternate positive/negative, starting with positive. Lesion regions of slides carry 1.5x
    ``cell_density``, which packing caps in practice (~65 per 10,000 µm² at the 7 µm minimum nucleus
    spacing), so very high values saturate. At least one witness per lesion / field.

    Each field is a ``gapless demo`` flag and a key of the config's ``demo`` section (and of a
    ``sweep`` entry); a new knob is a field here and its entry in ``config/schema.yaml``.
    """

    slides: int = setting(8, help="number of whole slides (H&E-like pyramidal TIFF)")
    images: int = setting(8, help="number of fluorescence fields (two-channel uint16 OME-TIFF)")
    slide_width: int = setting(3072, help="slide width, level-0 px")
    slide_height: int = setting(2304, help="slide height, level-0 px")
    slide_mpp: float = setting(0.5, help="slide µm/px at level 0")
    image_size: int = setting(1024, help="edge of the square fluorescence fields, px")
    image_mpp: float = setting(0.5, help="fluorescence field µm/px")
    cell_density: float = setting(40.0, help="cells per 10,000 µm² of tissue (slides) or of field (images)")
    witness_fraction: float = setting(0.05, help="fraction of the cells in each lesion (positive slides) or of all "
                                                 "cells (positive fields) that are witnesses")
    lesions: int = setting(2, help="lesion regions per slide (positive and negative slides alike)")
    lesion_radius: float = setting(0.0, help="lesion radius in µm (each lesion 0.8-1.2x this; small lesions, e.g. 40, "
                                             "cover a few % of the tissue); 0: min(110 µm, 13 % of the slide's "
                                             "shorter side)")
    cells_per_image: int = setting(0, help="cells per field, exactly (witnesses included; an enlarged brightfield "
                                           "witness may push out a neighbour); the field's edge follows from this "
                                           "and cell_density, and image_size is not used. "
                                           "0: cell_density over an image_size field")
    witnesses: int = setting(0, help="witness cells per positive field (and per lesion of a positive slide), "
                                     "exactly; 0: witness_fraction of the cells (at least one)")
    sheet_annotations: bool = setting(True, help="name each sample's annotations in samples.csv; false: the GeoJSONs "
                                                 "are written but the sheet names none, a cohort with labels alone "
                                                 "(score maps with slide_level.annotations)")
    image_modality: str = setting("fluorescence", choices=("fluorescence", "brightfield"),
                                  help="fields: fluorescence (two-channel uint16 OME-TIFF: DNA, marker) or "
                                       "brightfield (H&E-like RGB TIFF with the slides' cells and witnesses)")
    seed: int = setting(0, help="non-negative integer; same seed, same bytes")


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

    for name in ("slides", "images", "lesions", "seed", "cells_per_image", "witnesses"):
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
    v = s.lesion_radius
    if not is_num(v) or not math.isfinite(v) or not (v == 0 or 10 <= v <= 2000):
        fail(f"lesion_radius must be 0 (automatic) or between 10 and 2000 µm, got {v!r}",
             "set lesion_radius to e.g. 40 for small lesions, or 0")
    if s.image_modality not in ("fluorescence", "brightfield"):
        fail(f"image_modality must be fluorescence or brightfield, got {s.image_modality!r}",
             "set image_modality to fluorescence or brightfield")
    if s.cells_per_image:
        edge = _field_edge_um(s.cells_per_image, s.cell_density) / s.image_mpp
        if edge > _MAX_IMAGE_PX:
            fail(f"cells_per_image {s.cells_per_image} at cell_density {s.cell_density} needs a {edge:.0f}-px field at "
                 f"{s.image_mpp} µm/px, above {_MAX_IMAGE_PX}", "ask for fewer cells, a higher cell_density or a coarser image_mpp")
        if s.witnesses > s.cells_per_image // 2:
            fail(f"witnesses ({s.witnesses}) must be at most half of cells_per_image ({s.cells_per_image})",
                 "ask for fewer witnesses or more cells")


def _field_edge_um(cells: int, density: float) -> float:
    """The edge (µm) of a square field that holds ``cells`` at ``density`` per 10,000 µm²."""
    return math.sqrt(cells * 1e4 / density)


def field_size(settings: DemoSettings) -> int:
    """The fields' edge in px: ``image_size``, or with ``cells_per_image`` the square that holds them at
    ``cell_density`` (rounded to a whole px, at least 32 px, so the density is the one asked for)."""
    if not settings.cells_per_image:
        return settings.image_size
    edge = _field_edge_um(settings.cells_per_image, settings.cell_density) / settings.image_mpp
    return max(32, round(edge))


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
    suffix = ".ome.tif" if settings.image_modality == "fluorescence" else ".tif"
    for i, sid in enumerate(_ids("field", settings.images)):
        out.append(DemoSample(
            sample_id=sid, path=f"images/{sid}{suffix}", label="positive" if i % 2 == 0 else "negative",
            group=sid.replace("field", "plate"), kind="image", annotations=f"annotations/{sid}.geojson"))
    return out


def _index(sample: DemoSample) -> int:
    return int(sample.sample_id.rsplit("-", 1)[1])


def _seeds(settings: DemoSettings, sample: DemoSample) -> tuple[np.random.Generator, np.random.Generator]:
    """Two independent generators for a sample: one for the scene layout, one for textures/noise."""
    kind = _SLIDE_KIND if sample.kind == "slide" else _FIELD_KIND
    layout, render = np.random.SeedSequence([int(settings.seed), kind, _index(sample)]).spawn(2)
    return np.random.default_rng(layout), np.random.default_rng(render)


