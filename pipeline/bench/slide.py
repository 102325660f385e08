"""``gapless bench slide``: a real-size synthetic slide through tiling, a heatmap, a pyramid and the viewer.

For each size asked (by default 50,000 × 40,000 px at 0.25 µm/px, a 40× scan, and one of half its
area), :func:`pipeline.demo.bigslide.write_big_slide` writes the slide once (kept under ``--out``), then,
each step in its own process with its peak memory sampled over the process and its children:

- tiling: ``tile_source`` over every tile of the grid (``min_tissue`` 0, so it covers exactly the grid
  a bare read covers) with 1 and 2 workers, against a bare read-only loop over the same grid with as
  many processes: tiles/s, the ratio, the speed-up from the second worker;
- heatmap: an untrained ``resnet10t``/``gap`` model (its weights do not change the work) over every tile
  of that store, on the CPU;
- pyramid: ``write_slide_pyramid`` capped at ``--pyramid-mpp`` (files and bytes printed);
- view: ``gapless view`` serving that pyramid, asked for random full-resolution tiles (cut from the
  slide on demand) by 4 client threads: tiles/s and the server's memory.

Times are measured inside each process (imports excluded), and divided by the step's tile count, so
the two sizes show whether time is linear in tiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline.errors import GaplessError

_TILE_STEP = """
import json, sys, time
from pipeline.tiling import TileSettings, tile_source
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
tile_source(a["slide"], a["store"], TileSettings(**a["settings"]), workers=a["workers"], overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""
_HEATMAP_STEP = """
import json, sys, time
from pipeline.heatmap import heatmap_sample
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
heatmap_sample(a["store"], a["model"], a["out"], progress=False, device="cpu")
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""
_PYRAMID_STEP = """
import json, sys, time
from pipeline.viewer import write_slide_pyramid
from pipeline.viewer.deepzoom import disk_usage
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
write_slide_pyramid(a["slide"], a["out"], progress=False, max_mpp=a["max_mpp"])
files, size = disk_usage(a["out"])
print(json.dumps({"seconds": time.perf_counter() - t0, "files": files, "bytes": size}))
"""


class PeakMemory:
    """Samples the summed RSS of a process and all its descendants every ``every`` seconds, in a thread."""

    def __init__(self, pid: int, every: float = 0.25):
        import psutil

        self._proc = psutil.Process(pid)
        self._every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop.wait(self._every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_step(code: str, args: dict, what: str) -> dict:
    """Run a step's ``code`` in a fresh Python with ``args`` (JSON); its last stdout line (JSON) plus ``peak_mb``."""
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(proc.pid)
    out, err = proc.communicate()
    peak = memory.stop()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise GaplessError(args.get("slide") or args.get("store"), f"bench step {what} failed: {last}",
                           "run the step's gapless command by hand to see why")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = peak / 2**20
    return result


def _bench_model(folder: Path, tile_size: int, mpp: float) -> Path:
    """A training run folder of an untrained resnet10t with the gap head (96-px input), for the heatmap step."""
    from safetensors.torch import save_file

    from pipeline.models import create_model
    from pipeline.run_folder import WEIGHTS, ModelConfig, write_json, write_model_config, write_run_folder

    model = create_model("resnet10t", "gap", 2, in_chans=3, pretrained=False)

    def fill(work: Path) -> str:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / WEIGHTS)
        write_model_config(work, ModelConfig(backbone="resnet10t", head="gap", num_classes=2, in_chans=3,
                                             classes=["negative", "positive"], mean=[180.0] * 3, std=[50.0] * 3,
                                             tile_size=tile_size, image_size=96, mpp=mpp))
        write_json(work, "split.json", {"train": [], "val": [], "test": []})
        return "bench"

    return write_run_folder(folder, fill)


def _fetch_tiles(url: str, paths: list[str], threads: int = 4) -> float:
    """Seconds to GET every path from the server with ``threads`` clients; a failed request is an error."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def get(path: str) -> int:
        with urllib.request.urlopen(url.rstrip("/") + "/" + path, timeout=60) as response:
            return len(response.read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, paths))
    return time.perf_counter() - t0


def view_step(root: Path, pyramid: Path, requests: int, seed: int = 0) -> dict:
    """``gapless view root`` asked for ``requests`` random full-resolution tiles of ``pyramid``: tiles/s, peak MB."""
    import numpy as np

    from pipeline.viewer.deepzoom import dz_level_dimensions, dz_level_tiles, read_pyramid

    pyr = read_pyramid(pyramid)
    level = pyr["levels"] - 1
    cols, rows = dz_level_tiles(dz_level_dimensions(pyr["width"], pyr["height"])[level], pyr["tile_size"])
    rng = np.random.default_rng(seed)
    picks = rng.choice(cols * rows, size=min(requests, cols * rows), replace=False)
    rel = pyramid.relative_to(root).as_posix()
    paths = [f"{rel}/{pyr['files'].name}/{level}/{i % cols}_{i // cols}.{pyr['format']}" for i in picks]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "view", str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if " at http" not in line:
            raise GaplessError(root, f"gapless view did not start: {line.strip() or proc.stderr.read().strip()}",
                               "run `gapless view` by hand to see why")
        url = line.split(" at ", 1)[1].split()[0]
        memory = PeakMemory(proc.pid)
        seconds = _fetch_tiles(url, paths)
        return {"seconds": seconds, "tiles": len(paths), "level": level, "peak_mb": memory.stop() / 2**20}
    finally:
        proc.terminate()
        proc.communicate(timeout=30)  # reads and closes its pipes


STEPS = ("tiling", "heatmap", "pyramid", "view")


def _tiling_step(row: dict, slide: Path, store: Path, grid, settings: dict, print_fn) -> None:
    """The tiler with 1 and 2 workers against a bare read of the same grid with as many processes."""
    from pipeline.bench.tiling import bare_read

    coords = grid.coords()
    n = len(coords)
    for workers in (1, 2):
        bare = bare_read(slide, None, coords, grid.level, grid.read_size, workers)
        tiled = run_step(_TILE_STEP, {"slide": str(slide), "store": str(store), "settings": settings,
                                      "workers": workers}, f"tiling ({workers} workers)")
        row[f"tile_{workers}"] = dict(tiled, bare_seconds=bare)
        print_fn(f"  tiling, {workers} worker(s): {n / tiled['seconds']:.0f} tiles/s, bare read "
                 f"{n / bare:.0f} tiles/s, tiler/bare {bare / tiled['seconds']:.2f}, peak "
                 f"{tiled['peak_mb']:.0f} MB, {tiled['seconds'] / n * 1e3:.2f} ms per tile")
    row["tile_speedup"] = row["tile_1"]["seconds"] / row["tile_2"]["seconds"]
    print_fn(f"  tiler speed-up with 2 workers: {row['tile_speedup']:.2f}×")


def _view_steps(row: dict, slide: Path, folder: Path, steps, pyramid_mpp: float, view_requests: int, print_fn) -> None:
    pyramid = folder / "pyramid"
    if "pyramid" in steps or not pyramid.is_dir():
        pyr = row["pyramid"] = run_step(_PYRAMID_STEP, {"slide": str(slide), "out": str(pyramid),
                                                        "max_mpp": pyramid_mpp}, "pyramid")
        print_fn(f"  pyramid capped at {pyramid_mpp} µm/px: {pyr['seconds']:.0f} s, {pyr['files']} files, "
                 f"{pyr['bytes'] / 2**20:.0f} MiB, peak {pyr['peak_mb']:.0f} MB, "
                 f"{pyr['seconds'] / pyr['files'] * 1e3:.2f} ms per file")
    if "view" in steps:
        view = row["view"] = view_step(folder, pyramid, view_requests)
        print_fn(f"  view: {view['tiles']} random full-resolution tiles (level {view['level']}) cut on demand, "
                 f"{view['tiles'] / view['seconds']:.0f} tiles/s, server peak {view['peak_mb']:.0f} MB")


def _summary(results: list[dict], print_fn) -> None:
    """Time per tile at the first and last size (linear in tiles: a ratio near 1), and the largest peak."""
    a, b = results[0], results[-1]
    if len(results) > 1:
        for key, label in (("tile_1", "tiling, 1 worker"), ("tile_2", "tiling, 2 workers"), ("heatmap", "heatmap")):
            if key in a and key in b:
                per = [r[key]["seconds"] / r["tiles"] for r in (a, b)]
                print_fn(f"linearity, {label}: {per[0] * 1e3:.2f} vs {per[1] * 1e3:.2f} ms per tile "
                         f"({a['tiles']} vs {b['tiles']} tiles): ratio {per[0] / per[1]:.2f}")
        if "pyramid" in a and "pyramid" in b:
            per = [r["pyramid"]["seconds"] / r["pyramid"]["files"] for r in (a, b)]
            print_fn(f"linearity, pyramid: {per[0] * 1e3:.2f} vs {per[1] * 1e3:.2f} ms per file: ratio "
                     f"{per[0] / per[1]:.2f}")
    peaks = [r[k]["peak_mb"] for r in results for k in ("tile_1", "tile_2", "heatmap", "pyramid", "view") if k in r]
    if peaks:
        print_fn(f"largest peak memory of any step: {max(peaks):.0f} MB")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) / 2:
        print_fn(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes competed")


def bench_slide(sizes=((50_000, 40_000), (35_355, 28_284)), mpp: float = 0.25, tile_mpp: float | None = None,
                tile_size: int = 224, pyramid_mpp: float = 1.0, view_requests: int = 400, out: str | Path | None = None,
                steps=STEPS, print_fn=print) -> list[dict]:
    """Measure ``steps`` on each synthetic slide size (module docstring); returns one dict per size. A step
    left out reuses what an earlier run left under ``out`` (the store, the pyramid) when another needs it."""
    from pipeline.demo.bigslide import write_big_slide
    from pipeline.io import open_source
    from pipeline.tiling import plan_grid

    tile_mpp = tile_mpp or mpp
    results = []
    with tempfile.TemporaryDirectory(prefix="gapless-slide-") as scratch:
        root = Path(out) if out else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for width, height in sizes:
            slide = root / f"synthetic-{width}x{height}.tiff"
            t0 = time.perf_counter()
            if not slide.is_file():
                write_big_slide(slide, width, height, mpp=mpp)
            row = {"width": width, "height": height, "slide_bytes": slide.stat().st_size,
                   "write_seconds": time.perf_counter() - t0}
            with open_source(slide) as source:
                grid = plan_grid(source, mpp, tile_mpp, tile_size, None)
            n = row["tiles"] = grid.rows * grid.columns
            print_fn(f"slide {width}×{height} px at {mpp} µm/px ({row['slide_bytes'] / 2**30:.2f} GiB, "
                     f"{'written' if row['write_seconds'] > 1 else 'kept'} in {row['write_seconds']:.0f} s): "
                     f"{n} tiles of {tile_size} px at {tile_mpp} µm/px from level {grid.level}")
            store = root / f"tiles-{width}x{height}.zarr"
            settings = {"mpp": tile_mpp, "tile_size": tile_size, "min_tissue": 0.0, "codec": "jpeg"}
            if "tiling" in steps or ("heatmap" in steps and not store.is_dir()):
                _tiling_step(row, slide, store, grid, settings, print_fn)
            if "heatmap" in steps:
                model = root / "model"
                if not (model / "run_id.txt").is_file():
                    _bench_model(model, tile_size, tile_mpp)
                heat = row["heatmap"] = run_step(_HEATMAP_STEP, {"store": str(store), "model": str(model),
                                                                 "out": str(root / f"heatmap-{width}x{height}")}, "heatmap")
                print_fn(f"  heatmap (resnet10t/gap, 96 px, CPU): {heat['seconds']:.0f} s, {n / heat['seconds']:.0f} "
                         f"tiles/s, peak {heat['peak_mb']:.0f} MB, {heat['seconds'] / n * 1e3:.2f} ms per tile")
            if "pyramid" in steps or "view" in steps:
                _view_steps(row, slide, root / f"view-{width}x{height}", steps, pyramid_mpp, view_requests, print_fn)
            results.append(row)
        _summary(results, print_fn)
    return results
