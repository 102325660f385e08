# The samples, known at parse time, and the input functions the rules use.
# Everything that turns config into paths or command-line options lives here, so the rules stay thin.

import json
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
MODELS = f"{RESULTS}/models"
HEATMAPS = f"{RESULTS}/heatmaps"
REPORT = f"{RESULTS}/report"
COMPARISON = f"{RESULTS}/mlflow/comparison.json"
DEMO_MODE = not config["samples"]
DEMO_SHEET = f"{config['demo']['out']}/samples.csv"
SHEET = DEMO_SHEET if DEMO_MODE else config["samples"]

# Jobs with --sdm conda install this checkout into their environment from here (envs/gapless.yaml).
os.environ.setdefault("GAPLESS_SOURCE", str(workflow.basedir))

# A sample id names its files, so the wildcard only ever matches a sample id.
wildcard_constraints:
    sample=r"[A-Za-z0-9._-]+",
    kind=r"slide|image",
    head=r"[a-z0-9_]+",
    seed=r"\d+",


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
    outputs = [f"{TILES}/qc.tsv", *trained_models()]
    if mapped_samples():
        outputs += [f"{HEATMAPS}/index.html", f"{REPORT}/report.md"]
    return outputs


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


# training -----------------------------------------------------------------------------------------


def cohorts():
    """The kinds to train on: those listed in config that have samples."""
    present = {s.kind for s in SAMPLES.values()}
    return [kind for kind in config["train"]["kinds"] if kind in present]


def trained_models():
    """Every run's metrics file: kind × head × seed."""
    return [
        f"{MODELS}/{kind}/{head}/seed{seed}/metrics.json"
        for kind in cohorts()
        for head in config["train"]["heads"]
        for seed in config["train"]["seeds"]
    ]


def cohort_stores(wildcards):
    return [f"{TILES}/{s.sample_id}.zarr" for s in SAMPLES.values() if s.kind == wildcards.kind]


def run_folder(wildcards, output):
    return os.path.dirname(output.metrics)


def logged_config():
    """The resolved config that decides what a model is (as JSON, logged as MLflow params).

    Only the sections that shape training, so that changing e.g. heatmap settings reruns no training.
    """
    keys = ("samples", "classes", "demo", "tiling", "train")
    return json.dumps({k: config[k] for k in keys if k in config}, sort_keys=True)


def results_folder(wildcards, output):
    """The results folder, from the comparison file's path (results/mlflow/comparison.json)."""
    return os.path.dirname(os.path.dirname(output[0]))


def mlflow_options(wildcards):
    uri = config["mlflow"]["tracking_uri"]
    return shlex.join(["--tracking-uri", uri]) if uri else ""


def train_options(wildcards):
    """The training settings from config as `gapless train` flags, shell-quoted."""
    t = config["train"]
    options = [
        "--backbone", t["backbone"], "--pretrained", str(t["pretrained"]).lower() if isinstance(t["pretrained"], bool) else t["pretrained"],
        "--epochs", t["epochs"], "--batch-size", t["batch_size"], "--lr", t["lr"], "--weight-decay", t["weight_decay"],
        "--warmup-epochs", t["warmup_epochs"], "--grad-clip", t["grad_clip"], "--split", *t["split"],
    ]
    for key in ("image_size", "steps_per_epoch"):
        if t.get(key):
            options += [f"--{key.replace('_', '-')}", t[key]]
    head_kwargs = t["head_kwargs"].get(wildcards.head)
    if head_kwargs:
        options += ["--head-kwargs", json.dumps(head_kwargs)]
    return shlex.join(str(o) for o in options)


# heatmaps -----------------------------------------------------------------------------------------


def mapped_samples():
    """Samples whose kind has trained models: each gets heatmaps and a viewer page."""
    kinds = set(cohorts())
    return [s.sample_id for s in SAMPLES.values() if s.kind in kinds]


def heatmap_weights(wildcards):
    kind = sample_kind(wildcards)
    return [f"{MODELS}/{kind}/{wildcards.head}/seed{seed}/weights.safetensors" for seed in config["train"]["seeds"]]


def heatmap_model_options(wildcards):
    """`--model RUN --out DIR` per seed: every seed's map is scored; the viewer shows one."""
    options = []
    for weights in heatmap_weights(wildcards):
        seed_folder = os.path.basename(os.path.dirname(weights))
        options += ["--model", os.path.dirname(weights), "--out", f"{HEATMAPS}/{wildcards.head}/{seed_folder}"]
    return shlex.join(options)


def heatmap_options(wildcards):
    options = []
    for name in config["tiling"]["positive_classes"]:
        options += ["--positive-class", name]
    return shlex.join(options)


def viewer_seed():
    seed = config["heatmaps"]["seed"]
    return config["train"]["seeds"][0] if seed is None else seed


def page_heatmaps(wildcards):
    return [f"{HEATMAPS}/{head}/seed{viewer_seed()}/{wildcards.sample}.json" for head in config["train"]["heads"]]


def page_options(wildcards):
    sample = SAMPLES[wildcards.sample]
    options = []
    for path in page_heatmaps(wildcards):
        options += ["--heatmap", path]
    if sample.annotations is not None:
        options += ["--annotations", str(sample.annotations)]
    options += ["--info", f"label={sample.label}", "--info", f"kind={sample.kind}"]
    if sample.group:
        options += ["--info", f"group={sample.group}"]
    return shlex.join(options)


def page_summaries(wildcards):
    return [f"{HEATMAPS}/pages/{sample_id}.json" for sample_id in mapped_samples()]


# report -------------------------------------------------------------------------------------------


def scored_heatmaps():
    """Every heatmap of every seed: their scores are in MLflow before the report reads it."""
    return [
        f"{HEATMAPS}/{head}/seed{seed}/{sample_id}.json"
        for head in config["train"]["heads"]
        for seed in config["train"]["seeds"]
        for sample_id in mapped_samples()
    ]


def report_folder(wildcards, output):
    return os.path.dirname(output.summary)


def report_heatmap_options(wildcards):
    """One slide's PNG per head for the side-by-side figure: the first positive mapped sample."""
    mapped = mapped_samples()
    positives = [s for s in mapped if SAMPLES[s].label == config["classes"][-1]]
    sample_id = (positives or mapped)[0]
    options = []
    for head in config["train"]["heads"]:
        options += ["--heatmap", f"{head}={HEATMAPS}/{head}/seed{viewer_seed()}/{sample_id}.png"]
    return shlex.join(options)
