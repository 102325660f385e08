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
    samples.csv                   sample_id,path,label,group,kind,annotations (written last; with
                                  sheet_annotations false the annotations column is empty and
                                  annotations.csv lists sample_id,annotations apart, for scoring only)
"""


from __future__ import annotations

import csv
import hashlib
import io
import json
import uuid
from pathlib import Path

import numpy as np

from pipeline.demo.cells import _Cells
from pipeline.demo.dataset import (
    _CSV_COLUMNS,
    _WITNESS_CLASS,
    DemoSample,
    DemoSettings,
    _seeds,
    plan,
)
from pipeline.demo.fields import (
    _field_scene,
    _render_brightfield_field,
    _render_field,
    _write_brightfield_field,
    _write_field,
)
from pipeline.demo.slides import _render_slide, _slide_scene, _write_slide
from pipeline.files import atomic_write_text

__all__ = ["DemoSettings", "DemoSample", "plan", "generate"]

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
    elif settings.image_modality == "brightfield":
        rgb = _render_brightfield_field(settings, scene, rng)
        _write_brightfield_field(out / sample.path, rgb, settings.image_mpp)
        cells, w, h = scene, rgb.shape[1], rgb.shape[0]
    else:
        data = _render_field(settings, scene, rng)
        _write_field(out / sample.path, data, settings.image_mpp, sample.sample_id, settings.seed)
        cells, w, h = scene, data.shape[2], data.shape[1]
    atomic_write_text(out / sample.annotations, _geojson(cells, sample.sample_id, settings.seed, w, h), newline="")


SCORING_ANNOTATIONS = "annotations.csv"  # with sheet_annotations false: sample_id, annotations (scoring only)


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
        writer.writerow([id_prefix + getattr(s, c) if c in ("sample_id", "group")
                         else "" if c == "annotations" and not settings.sheet_annotations else getattr(s, c)
                         for c in _CSV_COLUMNS])
    if not settings.sheet_annotations:  # the outlines listed apart, for scoring only (slide_level.annotations)
        listed = io.StringIO()
        lister = csv.writer(listed, lineterminator="\n")
        lister.writerow(("sample_id", "annotations"))
        for s in samples:
            lister.writerow((id_prefix + s.sample_id, s.annotations))
        atomic_write_text(out / SCORING_ANNOTATIONS, listed.getvalue(), newline="")
    sheet = out / "samples.csv"
    atomic_write_text(sheet, buf.getvalue(), newline="")
    return sheet
