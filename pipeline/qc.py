"""The QC table of a tiling run: one row per sample, from the stores' own attributes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.files import atomic_write
from pipeline.store import BATCH_SCHEMA, SampleTiles, open_sample, open_store

QC_COLUMNS = (
    "sample", "format", "kind", "modality", "level", "downsample", "mpp", "source_mpp", "mpp_source",
    "tiles", "positive_tiles", "tissue_area_fraction", "mean_tile_tissue", "seconds", "qc_flag", "source",
)


def qc_rows(path: str | Path) -> list[dict]:
    """The QC rows of a tile store (one; a batch store: one per sample) or of a batch manifest's store."""
    import json

    path = Path(path)
    if path.suffix == ".json":  # a batch manifest: its store is beside it
        path = path.parent / json.loads(path.read_text(encoding="utf-8"))["store"]
    root = open_store(path)
    if root.attrs.get("schema") == BATCH_SCHEMA:
        return [qc_row(open_sample(path, entry["sample_id"])) for entry in root.attrs["samples"]]
    return [qc_row(open_sample(path))]


def qc_row(view: SampleTiles) -> dict:
    a = view.attrs
    tissue = view.tissue()
    return {
        "sample": view.sample_id,
        "format": a.format,
        "kind": a.kind,
        "modality": a.modality,
        "level": a.level,
        "downsample": round(a.downsample, 4),
        "mpp": round(a.mpp, 4),
        "source_mpp": round(a.source_mpp, 4),
        "mpp_source": a.mpp_source,
        "tiles": int(a.n_tiles),
        "positive_tiles": int(a.n_positive) if a.annotations else "",
        "tissue_area_fraction": a.tissue_area_fraction,
        "mean_tile_tissue": round(float(np.mean(tissue)), 4) if len(tissue) else 0.0,
        "seconds": a.seconds,
        "qc_flag": a.qc_flag or "",
        "source": a.source,
    }


def write_qc_table(stores: Iterable[str | Path], out: str | Path) -> list[dict]:
    """Write ``out`` (TSV, one row per sample of the stores or batch manifests given, sorted by sample)
    atomically; return the rows."""
    rows = sorted((row for s in stores for row in qc_rows(s)), key=lambda r: r["sample"])

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=QC_COLUMNS, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out, write)
    return rows
