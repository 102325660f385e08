# The samples, known at parse time, and the input functions the rules use.
# Everything that turns config into paths or command-line options lives here, so the rules stay thin.

import os
import shlex
from dataclasses import replace
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline.errors import GaplessError, SampleSheetError
from pipeline.samples import Sample, load_sample_sheet


RESULTS = config["results"]
TILES = f"{RESULTS}/tiles"
LOGS = f"{RESULTS}/logs"
DEMO_MODE = not config["samples"]
DEMO_SHEET = f"{config['demo']['out']}/samples.csv"

# Jobs with --sdm conda install this checkout into their environment from here (envs/gapless.yaml).
os.environ.setdefault("GAPLESS_SOURCE", str(workflow.basedir))

# A sample id names its files, so the wildcard only ever matches a sample id.
wildcard_constraints:
    sample=r"[A-Za-z0-9._-]+",


def demo_samples():
    """The demo's samples as the demo will write them; plan() renders nothing, so this is cheap."""
    from pipeline.demo import DemoSettings, plan

    settings = {key: value for key, value in config["demo"].items() if key != "out"}
    out = Path(config["demo"]["out"])
    return [
        Sample(
            sample_id=s.sample_id,
            path=out / s.path,
            label=s.label,
            group=s.group,
            kind=s.kind,
            annotations=None if s.annotations is None else out / s.annotations,
        )
        for s in plan(DemoSettings(**settings))
    ]


def sheet_samples():
    """The user's samples; every problem of the sheet is listed before any job runs."""
    try:
        samples = load_sample_sheet(config["samples"], config["classes"])
    except SampleSheetError as error:
        raise WorkflowError(str(error)) from None
    if all(s.kind is not None for s in samples):
        return samples
    from pipeline.io import infer_kind

    with_kind, problems = [], []
    for s in samples:
        try:
            with_kind.append(s if s.kind is not None else replace(s, kind=infer_kind(s.path)))
        except GaplessError as error:
            problems.append(f"{s.sample_id}: {error} (or set `kind` in the sheet)")
    if problems:
        raise WorkflowError(str(SampleSheetError(config["samples"], problems)))
    return with_kind


SAMPLES = {s.sample_id: s for s in (demo_samples() if DEMO_MODE else sheet_samples())}


def final_outputs():
    """What `snakemake` with no target makes."""
    return [f"{TILES}/qc.tsv"]


# demo ---------------------------------------------------------------------------------------------


def demo_files():
    """Every file the demo writes, so that tiling a demo sample waits for the demo."""
    files = {str(s.path) for s in SAMPLES.values()}
    files |= {str(s.annotations) for s in SAMPLES.values() if s.annotations is not None}
    return sorted(files)


def demo_folder(wildcards, output):
    return os.path.dirname(output.sheet)


# tiling -------------------------------------------------------------------------------------------


def tile_source(wildcards):
    return str(SAMPLES[wildcards.sample].path)


def tile_annotations(wildcards):
    annotations = SAMPLES[wildcards.sample].annotations
    return [] if annotations is None else [str(annotations)]


def sample_kind(wildcards):
    return SAMPLES[wildcards.sample].kind


def tile_grid(setting):
    """An input function giving one tiling setting (mpp, tile_size, ...) for the sample's kind."""

    def setting_for_sample(wildcards):
        return config["tiling"][sample_kind(wildcards)][setting]

    return setting_for_sample


def tile_options(wildcards):
    """The optional flags of `gapless tile`, shell-quoted: slide µm/px, annotations, empty policy."""
    sample = SAMPLES[wildcards.sample]
    options = []
    if sample.mpp is not None:
        options += ["--slide-mpp", str(sample.mpp)]
    if sample.annotations is not None:
        options += ["--annotations", str(sample.annotations)]
        for name in config["tiling"]["positive_classes"]:
            options += ["--positive-class", name]
    if config["tiling"]["on_empty"] == "flag":
        options.append("--allow-empty")
    return shlex.join(options)


def tile_stores(wildcards):
    return [f"{TILES}/{sample_id}.zarr" for sample_id in SAMPLES]
