# The samples, known at parse time, and the input functions the rules use.
# Everything that turns config into paths or command-line options lives here, so the rules stay thin.
# A stage's settings travel as one JSON argument (`--settings`): the keys of its config section that are
# fields of its settings dataclass (pipeline.settings), so a new setting needs no edit here.

import functools
import itertools
import json
import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline.demo import DemoSettings
from pipeline.errors import SampleSheetError
from pipeline.samples import SAMPLE_ID_PATTERN, Sample, check_sources, load_sample_sheet
from pipeline.settings import HeatmapSettings, settings_json
from pipeline.tiling import TileSettings
from pipeline.slide_level.settings import SlideTrainSettings
from pipeline.train_settings import TrainSettings


RESULTS = config["results"]
TILES = f"{RESULTS}/tiles"
LOGS = f"{RESULTS}/logs"
MODELS = f"{RESULTS}/models"
HEATMAPS = f"{RESULTS}/heatmaps"
REPORT = f"{RESULTS}/report"
COMPARISON = f"{RESULTS}/mlflow/comparison.json"
EMBEDDINGS = f"{RESULTS}/embeddings"
SLIDE_MODELS = f"{RESULTS}/slide_models"
DEMO_MODE = not config["samples"]


def demo_datasets():
    """name → demo settings: one unnamed dataset, or one per `sweep` entry (its keys over `demo`)."""
    base = {key: value for key, value in config["demo"].items() if key != "out"}
    if not config["sweep"]:
        return {"": base}
    return {entry["name"]: {**base, **{k: v for k, v in entry.items() if k != "name"}} for entry in config["sweep"]}


DATASETS = demo_datasets() if DEMO_MODE else {"": None}


def dataset_folder(name):
    return config["demo"]["out"] if not name else f"{config['demo']['out']}/{name}"


def dataset_prefix(name):
    """What a sweep dataset's name puts before its sample ids and groups (`w01-`); nothing otherwise."""
    return f"{name}-" if name else ""


def dataset_sheet(name):
    """The sample sheet a dataset's samples are read from: the user's, or the demo's."""
    return f"{dataset_folder(name)}/samples.csv" if DEMO_MODE else config["samples"]


# Jobs with --sdm conda install this checkout into their environment from here (envs/gapless.yaml).
os.environ.setdefault("GAPLESS_SOURCE", str(workflow.basedir))

# A sample id names its files, so the wildcard only ever matches a sample id (the sheet's rule).
wildcard_constraints:
    sample=SAMPLE_ID_PATTERN,
    batch=r"(?:[A-Za-z0-9]+-)?image-\d+",
    kind=r"slide|image",
    cohort=r"(?:[A-Za-z0-9]+-)?(?:slide|image)",
    head=r"[a-z0-9_]+",
    seed=r"\d+",


def demo_samples():
    """The demo's samples as the demo will write them; plan() renders nothing, so this is cheap.

    In a sweep each dataset's sample ids (and groups) carry its name, e.g. `w01-slide-00`.
    """
    from pipeline.demo import plan

    samples = {}
    for name, settings in DATASETS.items():
        out = Path(dataset_folder(name))
        prefix = dataset_prefix(name)
        for s in plan(DemoSettings(**settings)):
            sample = Sample(
                sample_id=prefix + s.sample_id,
                path=out / s.path,
                label=s.label,
                group=prefix + s.group,
                kind=s.kind,
                annotations=None if s.annotations is None or not settings.get("sheet_annotations", True)
                else out / s.annotations,
            )
            samples[sample.sample_id] = (name, sample)
    return samples


def sheet_samples():
    """The user's samples; every problem of the sheet (and of its files: each opened cheaply, header and
    µm/px, remembered in .snakemake/ once it passed) is listed before any job runs."""
    try:
        samples = load_sample_sheet(config["samples"], config["classes"])
        return check_sources(samples, config["samples"], cache=".snakemake/gapless/source-checks.json")
    except SampleSheetError as error:
        raise WorkflowError(str(error)) from None


def slide_seeds():
    """The slide level's seeds: slide_level.seeds, or train.seeds."""
    return config["slide_level"]["seeds"] or config["train"]["seeds"]


def config_problems():
    """What the schema cannot say about the config: settings that must agree with each other."""
    problems = []
    seed, seeds = config["heatmaps"]["seed"], config["train"]["seeds"]
    if seed is not None and seed not in seeds:
        problems.append(f"heatmaps.seed {seed} is not one of train.seeds {seeds}: the viewer shows a trained seed's "
                        f"maps; set heatmaps.seed to one of {seeds}, or to null for the first")
    from pipeline.head_info import registered_heads

    known = registered_heads()
    unknown = [head for head in config["train"]["heads"] if head not in known]
    if unknown:
        problems.append(f"train.heads: unknown head{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"the registered heads are {', '.join(known)}")
    slide_level = config["slide_level"]
    if slide_level["enabled"]:
        unknown = [head for head in slide_level["heads"] if head not in known]
        if unknown:
            problems.append(f"slide_level.heads: unknown head{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; the registered heads are {', '.join(known)}")
        encoder, encoder_dataset = slide_level["encoder"], slide_level["encoder_dataset"]
        for name in [n for n in (encoder_dataset, *slide_level["datasets"]) if n]:
            if name not in DATASETS:
                problems.append(f"slide_level names the dataset {name!r}, which is not a sweep entry "
                                f"({', '.join(map(repr, DATASETS)) or 'no sweep'}): name one of the sweep's datasets")
        if not encoder.startswith("timm:"):
            if encoder not in config["train"]["heads"] or "slide" not in config["train"]["kinds"]:
                problems.append(f"slide_level.encoder {encoder!r} is a tile-level model of the slides, so it must be one of "
                                f"train.heads {config['train']['heads']} with slide in train.kinds; or name a timm backbone "
                                "as timm:NAME (e.g. timm:resnet50, with slide_level.weights for its weights)")
            extra = [seed for seed in slide_seeds() if seed not in config["train"]["seeds"]]
            if extra:
                problems.append(f"slide_level.seeds {extra} are not in train.seeds {config['train']['seeds']}: each "
                                "slide-level seed is embedded by the tile-level model of the same seed")
    names = [entry["name"] for entry in config["sweep"]]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"sweep names given twice: {', '.join(repeated)}; give every sweep entry its own name")
    if config["sweep"] and config["samples"]:
        problems.append("sweep is set together with samples: a sweep varies the synthetic demo; "
                        "set samples to \"\" to run the sweep, or sweep to [] to run your sheet")
    if problems:
        raise WorkflowError("config: " + "; ".join(problems) if len(problems) == 1 else
                            "config problems:\n" + "\n".join(f"  {p}" for p in problems))


config_problems()


_DATASET_SAMPLES = demo_samples() if DEMO_MODE else {s.sample_id: ("", s) for s in sheet_samples()}
SAMPLES = {sample_id: sample for sample_id, (_, sample) in _DATASET_SAMPLES.items()}
SAMPLE_DATASET = {sample_id: name for sample_id, (name, _) in _DATASET_SAMPLES.items()}


def final_outputs():
    """What `snakemake` with no target makes."""
    outputs = [f"{TILES}/qc.tsv", *trained_models(), *slide_models(), *slide_manifests()]
    if mapped_samples() or slide_models():
        outputs += [f"{REPORT}/report.md", f"{HEATMAPS}/index.html"]  # the index lists every mapped sample
        outputs += [f"{HEATMAPS}/qupath/{sample_id}.geojson" for sample_id in paged_samples()]
    return outputs


# demo ---------------------------------------------------------------------------------------------


def demo_files(name):
    """Every file a demo dataset writes, so that tiling a demo sample waits for its dataset."""
    samples = [s for sid, s in SAMPLES.items() if SAMPLE_DATASET[sid] == name]
    files = {str(s.path) for s in samples}
    files |= {str(s.annotations) for s in samples if s.annotations is not None}
    return sorted(files)


def demo_folder(wildcards, output):
    """The dataset's folder, from its sheet's path (a function, so the linter sees no path in params)."""
    return os.path.dirname(output.sheet)


def demo_settings(name):
    """A dataset's demo settings (`demo`, with a sweep entry's keys over it) as `gapless demo --settings` JSON."""
    return settings_json(DemoSettings, DATASETS[name])


# tiling -------------------------------------------------------------------------------------------


def tile_source(wildcards):
    return str(SAMPLES[wildcards.sample].path)


def tile_annotations(wildcards):
    annotations = SAMPLES[wildcards.sample].annotations
    return [] if annotations is None else [str(annotations)]


def sample_kind(wildcards):
    return SAMPLES[wildcards.sample].kind


def tile_settings(wildcards):
    """The `tiling` section as `gapless tile --settings` JSON: the grid of the sample's kind
    (tiling.slide or tiling.image) over the keys shared by both kinds."""
    tiling = config["tiling"]
    return settings_json(TileSettings, {**tiling, **tiling[sample_kind(wildcards)]})


def tile_options(wildcards):
    """What the sample sheet says about a sample, as `gapless tile` flags, shell-quoted: µm/px, annotations."""
    sample = SAMPLES[wildcards.sample]
    options = []
    if sample.mpp is not None:
        options += ["--slide-mpp", str(sample.mpp)]
    if sample.annotations is not None:
        options += ["--annotations", str(sample.annotations)]
    return shlex.join(options)


# Cell images are tiled many per job into a batch store (tiling.batch of them, in sheet order per
# cohort): planning and start-up scale with batches, not with fields; slides are one job each.


def make_batches():
    """batch id (`image-00001`, `w01-image-00001` in a sweep) → the sample ids it tiles."""
    members = {}
    for sample_id, sample in SAMPLES.items():
        if sample.kind == "image":
            members.setdefault(cohort_of(sample_id), []).append(sample_id)
    size = config["tiling"]["batch"]
    return {f"{cohort}-{k // size + 1:05d}": ids[k : k + size] for cohort, ids in members.items()
            for k in range(0, len(ids), size)}


def sample_tiles(sample_id):
    """What a sample's tiles are known by: its store (a slide), or its batch's manifest (a cell image)."""
    if SAMPLES[sample_id].kind == "image":
        return f"{TILES}/batches/{SAMPLE_BATCH[sample_id]}.json"
    return f"{TILES}/{sample_id}.zarr"


def tile_stores(wildcards):
    return sorted({sample_tiles(sample_id) for sample_id in SAMPLES})


def batch_sources(wildcards):
    return [str(SAMPLES[sample_id].path) for sample_id in BATCHES[wildcards.batch]]


def batch_annotations(wildcards):
    return [str(SAMPLES[s].annotations) for s in BATCHES[wildcards.batch] if SAMPLES[s].annotations is not None]


def batch_sheet(wildcards):
    return dataset_sheet(SAMPLE_DATASET[BATCHES[wildcards.batch][0]])


def batch_ids(wildcards):
    return shlex.join(BATCHES[wildcards.batch])


def image_settings(wildcards):
    """The `tiling` section with the cell images' grid, as `gapless tile-batch --settings` JSON."""
    tiling = config["tiling"]
    return settings_json(TileSettings, {**tiling, **tiling["image"]})


# training -----------------------------------------------------------------------------------------


def cohort_name(dataset, kind):
    """A model is trained per cohort: a kind, prefixed by its dataset in a sweep (w01-slide)."""
    return f"{dataset}-{kind}" if dataset else kind


def cohort_of(sample_id):
    return cohort_name(SAMPLE_DATASET[sample_id], SAMPLES[sample_id].kind)


def split_cohort(cohort):
    """'w01-slide' → ('w01', 'slide'); 'slide' → ('', 'slide')."""
    name, _, kind = cohort.rpartition("-")
    return name, kind


BATCHES = make_batches()
SAMPLE_BATCH = {sample_id: batch for batch, ids in BATCHES.items() for sample_id in ids}


@functools.cache
def cohorts():
    """The cohorts to train: every dataset × the kinds listed in config that have samples."""
    present = {cohort_of(sample_id) for sample_id in SAMPLES}
    wanted = [cohort_name(name, kind) for name in DATASETS for kind in config["train"]["kinds"]]
    return [cohort for cohort in wanted if cohort in present]


# Training and heatmap jobs on a GPU take one unit of the `gpu` resource (--resources gpu=N);
# on the CPU (train.device: cpu) they take none, and --cores alone decides how many run at once.
GPU_UNITS = 0 if config["train"]["device"] == "cpu" else 1
TRAIN_GPU_UNITS = GPU_UNITS * config["train"]["devices"]  # one model on train.devices GPUs (torchrun, one job)


def trained_models():
    """Every run's metrics file: cohort × head × seed."""
    return [
        f"{MODELS}/{cohort}/{head}/seed{seed}/metrics.json"
        for cohort in cohorts()
        for head in config["train"]["heads"]
        for seed in config["train"]["seeds"]
    ]


def cohort_sheet(wildcards):
    return dataset_sheet(split_cohort(wildcards.cohort)[0])


def cohort_kind(wildcards):
    return split_cohort(wildcards.cohort)[1]


def cohort_stores(wildcards):
    return sorted({sample_tiles(s) for s in SAMPLES if cohort_of(s) == wildcards.cohort})


def run_folder(wildcards, output):
    return os.path.dirname(output.metrics)


def logged_config(wildcards=None):
    """The resolved config that decides what a model is (as JSON, logged as MLflow params).

    Only the sections that shape training, so that changing e.g. heatmap settings reruns no training.
    For a cohort of a sweep, `demo` holds that dataset's settings and `dataset` its name.
    """
    keys = ("samples", "classes", "demo", "tiling", "train")
    logged = {k: config[k] for k in keys if k in config}
    if wildcards is not None and DEMO_MODE:
        name = split_cohort(wildcards.cohort)[0]
        logged["demo"] = {**DATASETS[name], "out": dataset_folder(name)}
        if name:
            logged["dataset"] = name
    return json.dumps(logged, sort_keys=True)


def results_folder(wildcards, output):
    """The results folder, from the comparison file's path (results/mlflow/comparison.json)."""
    return os.path.dirname(os.path.dirname(output[0]))


def mlflow_options(wildcards):
    uri = config["mlflow"]["tracking_uri"]
    return shlex.join(["--tracking-uri", uri]) if uri else ""


def train_settings(wildcards):
    """The `train` section as `gapless train --settings` JSON, with the job's head's own options from
    train.head_kwargs. The rule's --threads (what Snakemake gives the job) overrides train.threads."""
    train = config["train"]
    return settings_json(TrainSettings, {**train, "head_kwargs": train["head_kwargs"].get(wildcards.head, {})})


# heatmaps -----------------------------------------------------------------------------------------


@functools.cache
def mapped_samples():
    """Samples whose cohort has trained models: each gets heatmaps."""
    trained = set(cohorts())
    return [sample_id for sample_id in SAMPLES if cohort_of(sample_id) in trained]


def heatmap_manifest(cohort, head, seed):
    """A model's heatmaps over its cohort are listed (files, scores) by one manifest."""
    return f"{HEATMAPS}/manifests/{head}/seed{seed}/{cohort}.json"


def heatmap_manifests():
    return [heatmap_manifest(c, h, s) for c in cohorts() for h in config["train"]["heads"] for s in config["train"]["seeds"]]


def heatmap_run(wildcards, input):
    """The model's run folder, from its weights (a function, so the linter sees no path in params)."""
    return os.path.dirname(input.weights)


def heatmap_folder(wildcards, output):
    """results/heatmaps/{head}/seed{seed}: where the model's per-sample heatmaps go."""
    return f"{HEATMAPS}/{wildcards.head}/seed{wildcards.seed}"


HEATMAP_SETTINGS = settings_json(HeatmapSettings, config["heatmaps"])


def every_heatmap_written():
    """heatmaps.pages: all without max_pages: every model writes every sample's files (the demo)."""
    return config["heatmaps"]["pages"] == "all" and config["heatmaps"]["max_pages"] is None


def written_samples(cohort, seed):
    """The cohort's samples whose heatmap files a model of ``seed`` writes, when not all
    (every_heatmap_written): the viewer seed's models write the paged samples and the report's figure
    sample; other seeds' models map and score every sample but write no files (nothing shows them)."""
    if int(seed) != viewer_seed():
        return []
    wanted = set(paged_samples()) | {report_sample()}
    return [s for s in mapped_samples() if cohort_of(s) == cohort and s in wanted]


def write_written_list(wildcards, path, log):
    """The heatmap_written rule: the list for a cohort and seed, and its count in the log."""
    ids = written_samples(wildcards.cohort, wildcards.seed)
    Path(path).write_text("".join(f"{s}\n" for s in ids), encoding="utf-8")
    Path(log).write_text(f"{len(ids)} sample(s) get heatmap files\n", encoding="utf-8")


def written_list(wildcards):
    """The heatmap job's list of samples to write files for (none when it writes all)."""
    if every_heatmap_written():
        return []
    return [f"{HEATMAPS}/manifests/written/seed{wildcards.seed}/{wildcards.cohort}.txt"]


def written_options(wildcards, input):
    return shlex.join(["--outputs-for", input.written[0]]) if input.written else ""


def heatmap_options(wildcards):
    options = []
    for name in config["tiling"]["positive_classes"]:
        options += ["--positive-class", name]
    return shlex.join(options)


def viewer_seed():
    seed = config["heatmaps"]["seed"]
    return config["train"]["seeds"][0] if seed is None else seed


@functools.cache
def paged_samples():
    """The samples with a viewer page: every mapped sample (heatmaps.pages: all), or those of the
    viewer seed's test split (test); at most heatmaps.max_pages of them, taken from the cohorts in turn
    (in sheet order within each), so every cohort of a sweep gets its share."""
    mapped = mapped_samples()
    if config["heatmaps"]["pages"] == "test":
        from pipeline.splits import check_split

        test = set()
        for cohort in cohorts():
            members = [SAMPLES[s] for s in mapped if cohort_of(s) == cohort]
            assignment = check_split(members, viewer_seed(), config["train"]["split"], config["classes"]).assignment
            test |= {s for s, split in assignment.items() if split == "test"}
        mapped = [s for s in mapped if s in test]
    limit = config["heatmaps"]["max_pages"]
    if limit is None or len(mapped) <= limit:
        return mapped
    # shared among the cohorts (each sweep dataset gets its pages): their samples in turn, in sheet order
    by_cohort = {}
    for s in mapped:
        by_cohort.setdefault(cohort_of(s), []).append(s)
    turns = itertools.chain.from_iterable(itertools.zip_longest(*by_cohort.values()))
    chosen = set(itertools.islice((s for s in turns if s is not None), limit))
    return [s for s in mapped if s in chosen]


def page_manifests(wildcards):
    cohort = cohort_of(wildcards.sample)
    manifests = [heatmap_manifest(cohort, head, viewer_seed()) for head in config["train"]["heads"]]
    if cohort in slide_cohorts():
        manifests += [slide_manifest(cohort, head, viewer_seed()) for head in config["slide_level"]["heads"]]
    return manifests


def sample_heatmaps(wildcards):
    """The heatmap JSON of each head for a sample (written by its model's heatmap job), shell-quoted."""
    return shlex.join(f"{HEATMAPS}/{head}/seed{viewer_seed()}/{wildcards.sample}.json" for head in config["train"]["heads"])


def page_options(wildcards):
    sample = SAMPLES[wildcards.sample]
    options = []
    for head in config["train"]["heads"]:
        options += ["--heatmap", f"{HEATMAPS}/{head}/seed{viewer_seed()}/{wildcards.sample}.json"]
    if cohort_of(wildcards.sample) in slide_cohorts():
        for head in config["slide_level"]["heads"]:
            options += ["--heatmap", f"{slide_heatmap_dir(head, viewer_seed())}/{wildcards.sample}.json"]
    if sample.annotations is not None:
        options += ["--annotations", str(sample.annotations)]
    options += ["--info", f"label={sample.label}", "--info", f"kind={sample.kind}"]
    if sample.group:
        options += ["--info", f"group={sample.group}"]
    return shlex.join(options)


def pyramid_options(wildcards):
    """The static pyramid stops at the tiles' µm/px (`gapless view` serves the slide's full resolution)."""
    kind = SAMPLES[wildcards.sample].kind
    return shlex.join(["--kind", kind, "--max-mpp", str(config["tiling"][kind]["mpp"])])


def page_summaries(wildcards):
    return [f"{HEATMAPS}/pages/{sample_id}.json" for sample_id in paged_samples()]


# The index lists every mapped sample (the viewer seed's manifests: one per head and cohort) and links
# the paged ones. It finds their summaries in their folder: naming 10^5 of them would overflow the
# command line (a shell command is one argument, at most 128 KiB on Linux).


def index_manifests(wildcards):
    return [heatmap_manifest(cohort, head, viewer_seed()) for cohort in cohorts() for head in config["train"]["heads"]]


def index_sheets(wildcards):
    """The sample sheets of the mapped cohorts: each sample's label, group and kind in the index."""
    return sorted({dataset_sheet(split_cohort(cohort)[0]) for cohort in cohorts()})


def pages_note():
    """How the paged samples were chosen, in words, for the index."""
    pages, limit = config["heatmaps"]["pages"], config["heatmaps"]["max_pages"]
    if pages == "test":
        note = f"the samples of seed {viewer_seed()}'s test split (heatmaps.pages: test)"
    else:
        note = "every mapped sample (heatmaps.pages: all)"
    if limit is not None:
        note += f", at most {limit}, taken from the cohorts in turn (heatmaps.max_pages: {limit})"
    return note


def index_options(wildcards, input):
    """`gapless index` flags: the manifests and sheets (from the rule's input), the summaries' folder, the note."""
    options = ["--pages", f"{HEATMAPS}/pages", "--pages-note", pages_note()]
    for manifest in input.manifests:
        options += ["--manifest", manifest]
    for sheet in input.sheets:
        options += ["--samples", sheet]
    return shlex.join(options)


# slide level (slide_level.smk) -------------------------------------------------------------------------------


@functools.cache
def slide_cohorts():
    """The cohorts trained at the slide level (slide_level.enabled): the slides of every dataset, or of the
    sweep datasets slide_level.datasets names."""
    if not config["slide_level"]["enabled"]:
        return []
    present = {cohort_of(sample_id) for sample_id, sample in SAMPLES.items() if sample.kind == "slide"}
    wanted = config["slide_level"]["datasets"] or list(DATASETS)
    return [cohort_name(name, "slide") for name in wanted if cohort_name(name, "slide") in present]


def slide_models():
    """Every slide-level run's metrics file: slide cohort × slide_level.heads × seed."""
    return [f"{SLIDE_MODELS}/{cohort}/{head}/seed{seed}/metrics.json"
            for cohort in slide_cohorts() for head in config["slide_level"]["heads"] for seed in slide_seeds()]


def slide_manifest(cohort, head, seed):
    return f"{HEATMAPS}/manifests/slide_level/{head}/seed{seed}/{cohort}.json"


def slide_manifests():
    return [slide_manifest(c, h, s) for c in slide_cohorts() for h in config["slide_level"]["heads"] for s in slide_seeds()]


def encoder_tag(seed):
    """The embeddings' encoder for a slide-level seed: `{head}-seed{seed}` (that seed's tile-level model of the
    cohort itself), `{dataset}.{head}-seed{seed}` (of the sweep dataset slide_level.encoder_dataset), or
    `timm-{name}` (slide_level.encoder: timm:NAME)."""
    encoder, dataset = config["slide_level"]["encoder"], config["slide_level"]["encoder_dataset"]
    if encoder.startswith("timm:"):
        return f"timm-{encoder[5:]}"
    return f"{dataset}.{encoder}-seed{seed}" if dataset else f"{encoder}-seed{seed}"


def encoder_weights(wildcards):
    """What the embed job's encoder is read from: the tile-level model's weights, or slide_level.weights."""
    if wildcards.encoder.startswith("timm-"):
        weights = config["slide_level"]["weights"]
        return [weights] if weights else []
    model, _, seed = wildcards.encoder.rpartition("-seed")
    dataset, _, head = model.rpartition(".")
    cohort = cohort_name(dataset, "slide") if dataset else wildcards.cohort
    return [f"{MODELS}/{cohort}/{head}/seed{seed}/weights.safetensors"]


def embed_options(wildcards, input):
    """`gapless embed` flags: --model RUN (a tile-level model) or --backbone NAME [--weights FILE]."""
    if wildcards.encoder.startswith("timm-"):
        options = ["--backbone", wildcards.encoder[len("timm-"):]]
        if input.weights:
            options += ["--weights", input.weights[0]]
        return shlex.join(options)
    return shlex.join(["--model", os.path.dirname(input.weights[0])])


def embeddings_folder(wildcards):
    """The embedding stores of a slide cohort's slides (one embed job's folder), by the encoder of the job's seed."""
    return f"{EMBEDDINGS}/{wildcards.cohort}/{encoder_tag(wildcards.seed)}"


def slide_train_settings(wildcards):
    """slide_level.train as `gapless train-slides --settings` JSON, with train.split and the head's own
    options from slide_level.train.head_kwargs."""
    train = config["slide_level"]["train"]
    return settings_json(SlideTrainSettings, {**train, "split": config["train"]["split"],
                                              "head_kwargs": train["head_kwargs"].get(wildcards.head, {})})


def slide_heatmap_dir(head, seed):
    """results/heatmaps/slide_level/{head}/seed{seed}: a slide-level model's heatmap files."""
    return f"{HEATMAPS}/slide_level/{head}/seed{seed}"


def slide_heatmap_folder(wildcards, output):
    return slide_heatmap_dir(wildcards.head, wildcards.seed)


def scoring_annotations(cohort):
    """Outlines that score a slide cohort's maps and nothing else: slide_level.annotations, or a demo dataset's
    annotations.csv when its sheet names none (demo.sheet_annotations: false); None: the sheet's own."""
    if config["slide_level"]["annotations"]:
        return config["slide_level"]["annotations"]
    dataset = split_cohort(cohort)[0]
    if DEMO_MODE and not DATASETS[dataset].get("sheet_annotations", True):
        from pipeline.demo import SCORING_ANNOTATIONS

        return f"{dataset_folder(dataset)}/{SCORING_ANNOTATIONS}"
    return None


def slide_heatmap_options(wildcards):
    options = ["--normalisation", config["heatmaps"]["normalisation"]]
    annotations = scoring_annotations(wildcards.cohort)
    if annotations:
        options += ["--annotations", annotations]
    for name in config["tiling"]["positive_classes"]:
        options += ["--positive-class", name]
    return shlex.join(options)


# compare (the report) -------------------------------------------------------------------------------------------


def report_folder(wildcards, output):
    """results/report, from an output's path (a function, so the linter sees no path in params)."""
    return os.path.dirname(output.summary)


def report_settings():
    """(setting keys, x axis) of the report, as run params: train.kind and every demo key a sweep entry
    sets (without a sweep: kind, witness fraction, cell density); x is report.x, or (auto) the numeric
    swept key with the most distinct values across the datasets (pipeline.report.columns.sweep_settings)."""
    from pipeline.report.columns import sweep_settings

    x = config.get("report", {}).get("x", "auto")
    sweep = config["sweep"] if DEMO_MODE else []
    known = [key for key in config["demo"] if key != "out"]
    try:
        return sweep_settings(sweep, DATASETS if DEMO_MODE else {}, config["train"]["kinds"], x, known)
    except ValueError as error:
        raise WorkflowError(f"config: {error}") from None


REPORT_SETTINGS = report_settings()


def report_plot():
    """The metric plot's path, named after its x axis (results/report/metric_vs_witness_fraction.png)."""
    from pipeline.report.columns import plot_file

    return f"{REPORT}/{plot_file(REPORT_SETTINGS[1])}"


def report_setting_options(wildcards):
    """`gapless report` flags: each setting key (--setting-key) and the x axis (--x)."""
    keys, x = REPORT_SETTINGS
    return shlex.join([*(part for key in keys for part in ("--setting-key", key)), "--x", x])


def report_sample():
    """The sample of the report's side-by-side figure: the first positive mapped sample."""
    mapped = mapped_samples()
    positives = [s for s in mapped if SAMPLES[s].label == config["classes"][-1]]
    return (positives or mapped)[0]


def report_heatmap_options(wildcards):
    """One slide's PNG per head for the side-by-side figure (report_sample)."""
    sample_id = report_sample()
    options = []
    for head in config["train"]["heads"]:
        options += ["--heatmap", f"{head}={HEATMAPS}/{head}/seed{viewer_seed()}/{sample_id}.png"]
    return shlex.join(options)


# splits: checked for every cohort and seed before any job runs ----------------------------------------


def check_splits():
    """Refuse a cohort whose training split would lack a class, or whose validation and test splits
    would both lack one; say on the console when one of them would (the split `gapless train` makes:
    by group, fixed by the seed)."""
    import sys

    from pipeline.errors import GaplessError
    from pipeline.splits import SPLIT_FIX, check_split

    errors, warnings = [], []
    for cohort in cohorts():
        members = [sample for sample_id, sample in SAMPLES.items() if cohort_of(sample_id) == cohort]
        for seed in config["train"]["seeds"]:
            try:
                check = check_split(members, seed, config["train"]["split"], config["classes"])
            except GaplessError as error:
                errors.append(f"{cohort}: {error.message}")
                break
            errors += [f"{cohort}: {e}" for e in check.errors]
            warnings += [f"{cohort}: {w}" for w in check.warnings]
    for warning in warnings:
        print(f"gapless: warning: {warning}", file=sys.stderr)
    if errors:
        raise WorkflowError("the split cannot work:\n" + "\n".join(f"  {e}" for e in errors) + f"\nfix: {SPLIT_FIX}")


check_splits()


# start ----------------------------------------------------------------------------------------------


onstart:
    # jobs on other nodes (the SLURM profile): a tracking server, not a SQLite file; the profile's variables set
    from pipeline.cluster import check_cluster_run, default_resource_args
    from pipeline.errors import GaplessError

    try:
        check_cluster_run(workflow.non_local_exec, config, RESULTS, COMPARISON, default_resource_args(workflow))
    except GaplessError as exc:
        raise WorkflowError(f"gapless: {exc.message}") from None


# failure --------------------------------------------------------------------------------------------


onerror:
    from pipeline.joblogs import print_failed_job_errors

    print_failed_job_errors(log)
