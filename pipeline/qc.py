"""The QC table of a tiling run: one row per sample, from the stores' own attributes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.files import atomic_write
from pipeline.store import open_store, store_attrs

QC_COLUMNS = (
    "sample", "format", "kind", "modality", "level", "downsample", "mpp", "source_mpp", "mpp_source",
    "tiles", "positive_tiles", "tissue_area_fraction", "mean_tile_tissue", "seconds", "qc_flag", "source",
)


def sample_name(store: str | Path) -> str:
    name = Path(store).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def qc_row(store: str | Path) -> dict:
    root = open_store(store)
    a = store_attrs(root, store)
    tissue = root["tissue"][:]
    return {
        "sample": sample_name(store),
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
    """Write ``out`` (TSV, one row per store, sorted by sample) atomically; return the rows."""
    rows = sorted((qc_row(s) for s in stores), key=lambda r: r["sample"])

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=QC_COLUMNS, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out, write)
    return rows
