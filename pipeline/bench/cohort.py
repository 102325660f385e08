"""``gapless bench cohort``: a screening campaign simulated on this machine, and what it costs gapless.

A few demo fluorescence fields (1024² px, two 16-bit channels by default) are rendered once and linked
many times into a sample sheet of N fields in plates of 384, so a cohort of 10⁴–10⁵ fields costs seconds
and no disk. On it, in one run:

- planning: ``snakemake -n`` of the workflow on that sheet (cell images trained, pages for at most 100
  test samples): seconds, peak memory and the number of jobs, once with the sheet's files not yet
  checked and once with the check cached (``.snakemake/gapless``);
- tiling throughput: ``tile_batch`` over some of the fields (one process, as a tile_batch job runs),
  against a bare read of the same fields (each opened and decoded, nothing else): fields/s and the ratio.
"""

from __future__ import annotations

import csv
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import GaplessError

PLATE = 384  # fields per plate (a 384-well plate, one field per well): the sheet's groups


def simulate_cohort(out: str | Path, fields: int, unique: int = 8, image_size: int = 1024, seed: int = 0) -> Path:
    """A sample sheet of ``fields`` cell images (links to ``unique`` rendered demo fields), labels and plates
    as the demo draws them; returns the sheet. Rendering happens once per ``out``."""
    from pipeline.demo import DemoSettings, generate

    out = Path(out)
    source = out / "rendered"
    if not (source / "samples.csv").is_file():
        generate(source, DemoSettings(slides=0, images=unique, image_size=image_size, seed=seed), progress=False)
    with open(source / "samples.csv", newline="", encoding="utf-8") as f:
        rendered = list(csv.DictReader(f))
    links = out / "fields"
    links.mkdir(parents=True, exist_ok=True)
    sheet = out / f"samples-{fields}.csv"
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sample_id", "path", "label", "group", "kind"])
        for i in range(fields):
            row = rendered[i % len(rendered)]
            link = links / f"f{i:06d}.ome.tif"
            if not link.is_symlink():
                os.symlink((source / row["path"]).resolve(), link)
            writer.writerow([f"f{i:06d}", f"fields/{link.name}", row["label"], f"plate-{i // PLATE:04d}", "image"])
    return sheet


def plan_workflow(sheet: Path, snakefile: Path, workdir: Path) -> dict:
    """Seconds, peak memory (MB) and jobs of ``snakemake -n`` on ``sheet`` (cell images trained)."""
    config = snakefile.parent / "config" / "config.yaml"
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
               "--configfile", str(config), "-n", "--cores", "2", "--config", f"samples={sheet}",
               "train={kinds: [image]}", "heatmaps={pages: test, max_pages: 100}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    if done.returncode != 0:
        raise GaplessError(sheet, f"snakemake -n failed: {(done.stdout + done.stderr).strip().splitlines()[-1:]}",
                           "run it by hand to see why")
    total = re.search(r"^total\s+(\d+)$", done.stdout, re.M)
    return {"seconds": seconds, "peak_mb": max(peak_kb, before) / 1024, "jobs": int(total.group(1)) if total else None}


def tiling_throughput(sheet: Path, fields: int, out: Path) -> dict:
    """Fields/s of ``tile_batch`` and of a bare read (open and decode) over the sheet's first ``fields``."""
    from pipeline.io import open_source
    from pipeline.samples import load_sample_sheet
    from pipeline.tiling import TileSettings
    from pipeline.tiling.batch import tile_batch

    samples = load_sample_sheet(sheet)[: fields + 4]
    settings = TileSettings(mpp=0.5, tile_size=96, stride=96, min_tissue=0.1)
    tile_batch(samples[:4], out / "warm.zarr", out / "warm.json", settings, progress=False)  # imports, caches
    timed = samples[4:]
    t0 = time.perf_counter()
    for s in timed:
        with open_source(s.path, "image") as source:
            source.read_region((0, 0), 0, (1, 1))
    bare = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = tile_batch(timed, out / "batch.zarr", out / "batch.json", settings, progress=False)
    ours, cpu = time.perf_counter() - t0, time.process_time() - cpu0  # CPU: every thread of the process
    return {"fields": len(timed), "tiles": result.n_tiles, "bare_fields_per_s": len(timed) / bare,
            "fields_per_s": len(timed) / ours, "fields_per_cpu_s": len(timed) / cpu, "ratio": bare / ours}


def bench_cohort(fields: int = 20000, timed_fields: int = 100, out: str | Path | None = None,
                 snakefile: str | Path | None = None, plan: bool = True, print_fn=print) -> dict:
    """Simulate a cohort of ``fields`` fields and measure planning and tiling throughput (module docstring)."""
    snakefile = Path(snakefile) if snakefile else Path(__file__).resolve().parents[2] / "Snakefile"
    if plan and not snakefile.is_file():
        raise GaplessError(snakefile, "the workflow's Snakefile is not here", "pass --snakefile, or run from a checkout")
    with tempfile.TemporaryDirectory(prefix="gapless-cohort-") as scratch:
        root = Path(out) if out else Path(scratch)
        t0 = time.perf_counter()
        sheet = simulate_cohort(root, fields)
        print_fn(f"bench cohort: {fields} fields (1024² px, 2 channels, 16 bit) in plates of {PLATE}, "
                 f"simulated in {time.perf_counter() - t0:.1f} s: {sheet}")
        result = {"fields": fields, "sheet": str(sheet)}
        if plan:
            work = root / "workflow"
            work.mkdir(exist_ok=True)
            for name in ("first", "cached"):
                p = result[f"plan_{name}"] = plan_workflow(sheet, snakefile, work)
                print_fn(f"planning ({'sheet files checked' if name == 'first' else 'check cached'}): "
                         f"{p['seconds']:.1f} s, {p['jobs']} jobs, peak {p['peak_mb']:.0f} MB")
        tiles = root / "tiles"
        tiles.mkdir(exist_ok=True)
        t = result["tiling"] = tiling_throughput(sheet, min(timed_fields, fields - 4), tiles)
        print_fn(f"tiling: {t['fields']} fields, {t['tiles']} tiles: tile_batch {t['fields_per_s']:.1f} fields/s "
                 f"({t['fields_per_cpu_s']:.1f} per CPU-second), bare read {t['bare_fields_per_s']:.1f} fields/s, "
                 f"ratio {t['ratio']:.2f} (one process)")
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1) / 2:
            print_fn(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes competed")
        return result
