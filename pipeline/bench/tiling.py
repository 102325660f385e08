"""``gapless bench``: speed measured as ratios within one run, our code against the bare limit."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.io import open_source
from pipeline.tiling import MIN_TILES_PER_WORKER, TileSettings, effective_workers, plan_grid, tile_source

_bare: dict = {}


def _bare_init(path: str, kind: str | None) -> None:
    _bare["source"] = open_source(path, kind)


def _bare_read(coords: np.ndarray, level: int, read_size: int) -> int:
    source = _bare["source"]
    for x, y in coords:
        source.read_region((int(x), int(y)), level, (read_size, read_size))
    return len(coords)


def bare_read(path: Path, kind: str | None, coords: np.ndarray, level: int, read_size: int, workers: int) -> float:
    """Seconds for a read-only loop over ``coords`` (OpenSlide/tifffile reads, nothing else)."""
    if workers == 1:
        _bare_init(str(path), kind)
        t0 = time.perf_counter()
        _bare_read(coords, level, read_size)
        seconds = time.perf_counter() - t0
        _bare.pop("source").close()
        return seconds
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_bare_init, initargs=(str(path), kind)) as pool:
        list(pool.map(int, range(workers)))  # start the workers before the clock
        t0 = time.perf_counter()
        parts = np.array_split(coords, workers * 4)
        sum(pool.map(_bare_read, parts, [level] * len(parts), [read_size] * len(parts)))
        return time.perf_counter() - t0


def _file_bytes(path: Path) -> int:
    """The source's bytes: the file, or every file of a slide that is a folder (DICOM)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _level_bytes(path: Path, dimensions: tuple[int, int]) -> int | None:
    """The compressed bytes of the TIFF pyramid level of ``dimensions`` (width, height); None if not a TIFF."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            for level in tif.series[0].levels:
                page = level.keyframe
                if (page.imagewidth, page.imagelength) == tuple(dimensions):
                    return int(sum(sum(p.databytecounts) for p in level.pages))
    except Exception:  # not a TIFF, or one tifffile reads otherwise: the file's bytes stand alone
        return None
    return None


def bench_tiling(slide, mpp=0.5, tile_size=224, stride=None, slide_mpp=None, kind=None, workers=None, repeat=1,
                 codec="jpeg", quality=90) -> list[dict]:
    """Tiles/s of ``gapless tile`` and of a bare read loop over the same grid, at 1 and N workers.

    The tiler runs with ``--min-tissue 0`` so both loops cover exactly the same tiles; the tiler's
    time includes the overview and tissue mask, starting its processes, resizing, statistics,
    compression and writing. The size of the store it wrote is printed too, and its ratio to the
    source's bytes over the same tiles: the file's bytes times the fraction of its level-0 area the
    grid covers (the file holds every pyramid level; the compressed bytes of the level read are
    printed too, for TIFF-based slides).
    """
    slide = Path(slide)
    with open_source(slide, kind) as source:
        source_mpp, _ = source.resolve_mpp(slide_mpp)
        grid = plan_grid(source, source_mpp, mpp, tile_size, stride)
        kind = source.kind
        fmt = source.format
        (W, H), read_dims = source.dimensions, source.level_dimensions[grid.level]
    covered = min(1.0, ((grid.columns - 1) * grid.step + grid.extent) * ((grid.rows - 1) * grid.step + grid.extent) / (W * H))
    source_bytes = _file_bytes(slide) * covered
    level_bytes = _level_bytes(slide, read_dims) if slide.is_file() else None
    coords = grid.coords()
    n = len(coords)
    counts = sorted({1, effective_workers(workers or (os.cpu_count() or 1), n)})
    print(
        f"bench tiling: {slide.name} ({fmt}), {n} tiles of {tile_size} px at {grid.tile_mpp:.3g} µm/px "
        f"from level {grid.level} (read {grid.read_size} px), cores {os.cpu_count()}"
    )
    level = f"; level {grid.level}'s own tiles {level_bytes * covered / 2**20:.1f} MiB" if level_bytes else ""
    print(f"source: {_file_bytes(slide) / 2**20:.1f} MiB, the grid covers {covered:.1%} of level 0: "
          f"{source_bytes / 2**20:.1f} MiB over the same tiles{level}; tiles stored as {codec}"
          f"{f' {quality}' if codec == 'jpeg' else ''}")
    if workers and counts[-1] < workers:
        print(f"({n} tiles: {counts[-1]} worker(s) at most, one per {MIN_TILES_PER_WORKER} tiles and core)")
    print(f"{'workers':>7} {'bare tiles/s':>13} {'tiler tiles/s':>14} {'tiler/bare':>10} {'tiler speed-up':>15} "
          f"{'store MiB':>10} {'/ source':>9}")
    rows = []
    settings = TileSettings(mpp=mpp, tile_size=tile_size, stride=stride, min_tissue=0.0, slide_mpp=slide_mpp, kind=kind,
                            codec=codec, quality=quality)
    with tempfile.TemporaryDirectory(prefix="gapless-bench-") as tmp:
        for w in counts:
            bare = min(bare_read(slide, kind, coords, grid.level, grid.read_size, w) for _ in range(repeat))
            tiler = float("inf")
            store = Path(tmp) / f"w{w}.zarr"
            for _ in range(repeat):
                t0 = time.perf_counter()
                tile_source(slide, store, settings, workers=w, overwrite=True, progress=False)
                tiler = min(tiler, time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())  # compression shows here
            rows.append({"workers": w, "bare": n / bare, "tiler": n / tiler, "store_bytes": size,
                         "source_bytes": source_bytes, "store_ratio": size / source_bytes})
            speedup = rows[-1]["tiler"] / rows[0]["tiler"]
            print(f"{w:>7} {n / bare:>13.1f} {n / tiler:>14.1f} {bare / tiler:>10.2f} {speedup:>14.2f}x "
                  f"{size / 2**20:>10.1f} {size / source_bytes:>8.2f}x")
    return rows
