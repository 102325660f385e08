"""The ``gapless`` argument parser: one ``_add_<command>`` per sub-command; settings flags come from the
stages' settings dataclasses (``pipeline.settings``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import __version__
from pipeline.settings import (
    HeatmapSettings,
    add_setting_flags,
    json_object,
    positive_int,
)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 3072x2304, got {text!r}") from None
    return w, h


_TILE_GEOMETRY = ("mpp", "tile_size", "stride", "slide_mpp", "kind")


def build_parser() -> argparse.ArgumentParser:
    """The ``gapless`` parser. A stage's settings flags (and ``--settings JSON``) come from its settings
    dataclass's fields (``pipeline.settings``): a new field is a new flag, with no edit here."""
    parser = argparse.ArgumentParser(
        prog="gapless",
        description="Many-instance histology and microscopy: tiles, heads, heatmaps, comparison.",
    )
    parser.add_argument("--version", action="version", version=f"gapless {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_tile, _add_tile_batch, _add_info, _add_qc, _add_mlflow_setup, _add_tracking_server, _add_train, _add_heatmap, _add_embed, _add_train_slides, _add_heatmap_slides, _add_pyramid,
                _add_page, _add_index, _add_view, _add_qupath, _add_report, _add_bench):
        add(sub)
    return parser


def _add_demo(sub) -> None:
    from pipeline.demo import DemoSettings

    p = sub.add_parser("demo", help="generate the synthetic many-instance demo dataset")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_setting_flags(p, DemoSettings)
    p.add_argument("--id-prefix", default="", help="put before every sample id and group in the sheet (several datasets in one run)")


def _add_tile(sub) -> None:
    from pipeline.tiling import TileSettings

    p = sub.add_parser("tile", help="tile a slide or cell image into a zarr store")
    p.add_argument("input", type=Path, help="slide (any OpenSlide format) or cell image (TIFF, OME-TIFF, PNG, JPEG)")
    p.add_argument("--out", required=True, type=Path, help="output store, e.g. results/tiles/S1.zarr")
    add_setting_flags(p, TileSettings)
    p.add_argument("--allow-empty", dest="on_empty", action="store_const", const="flag", default=argparse.SUPPRESS,
                   help="write an empty store flagged 'no tissue' instead of failing (= --on-empty flag)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (only once the new one is complete)")


def _add_tile_batch(sub) -> None:
    from pipeline.tiling import TileSettings

    p = sub.add_parser("tile-batch", help="tile many cell images of a sample sheet into one batch store, in one process")
    p.add_argument("--samples", type=Path, required=True, help="sample sheet (CSV): each sample's file, µm/px, annotations")
    p.add_argument("--ids", nargs="+", required=True, metavar="SAMPLE_ID", help="the sheet's samples to tile, in order")
    p.add_argument("--out", required=True, type=Path, help="the batch store, e.g. results/tiles/batches/image-00001.zarr")
    p.add_argument("--manifest", required=True, type=Path, help="the JSON naming the store and its samples (written last)")
    add_setting_flags(p, TileSettings)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a tile store's attributes and tile count as JSON, after checking it is complete")
    p.add_argument("store", type=Path)
    p.add_argument("--sample", default=None, help="in a batch store, show this sample's attributes")
    p.add_argument("--verify", action="store_true",
                   help="also read every tile and check its checksum (finds a changed byte; reads the whole store)")


def _add_qc(sub) -> None:
    p = sub.add_parser("qc", help="one QC row per tile store, as TSV")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="output TSV")


def _add_mlflow_setup(sub) -> None:
    p = sub.add_parser("mlflow-setup", help="create the MLflow backend, experiment and comparison (parent) run once")
    p.add_argument("--experiment", required=True, help="experiment name")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///RESULTS/mlflow.db)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results)")
    p.add_argument("--run-name", default="comparison", help="name of the parent run (default comparison)")
    p.add_argument("--config", type=json_object, default=None, help="the resolved config as JSON text, logged as the parent run's params")
    p.add_argument("--out", type=Path, required=True, help="JSON written with tracking_uri, experiment_id, parent_run_id")


def _add_tracking_server(sub) -> None:
    p = sub.add_parser("tracking-server", help="serve the project's MLflow backend to jobs on other nodes (a cluster)",
                       description="Runs `mlflow server` on <results>/mlflow.db with artifacts under <results>/mlartifacts "
                                   "(uploaded through the server), after creating the database's schema once; prints "
                                   "the URI every job must have (export MLFLOW_TRACKING_URI=...).")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default 0.0.0.0: every node can reach it; "
                                                     "127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=5000, help="port (default 5000)")
    p.add_argument("--workers", type=positive_int, default=4, help="server worker processes (default 4)")


def _add_run_tracking(p) -> None:
    """Where a training command's MLflow run goes (``gapless train`` and ``train-slides``)."""
    p.add_argument("--comparison", type=Path, default=None, help="JSON from `gapless mlflow-setup`: log as a child of its parent run")
    p.add_argument("--tracking-uri", default=None, help="without --comparison: MLflow URI (default sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", default="gapless", help="without --comparison: experiment name (default gapless)")
    p.add_argument("--config", type=json_object, default=None, help="the pipeline's resolved config as JSON text, logged as config.* params")


def _add_train(sub) -> None:
    from pipeline.train_settings import TrainSettings

    p = sub.add_parser("train", help="train one head × seed on the tile stores of a sample sheet, tracked in MLflow")
    p.add_argument("--samples", type=Path, required=True, help="sample sheet (CSV)")
    p.add_argument("--tiles", type=Path, required=True, help="folder of the tile stores, TILES/{sample_id}.zarr")
    p.add_argument("--out", type=Path, required=True, help="run folder: weights.safetensors, model.json, metrics.json, run_id.txt, plots")
    p.add_argument("--classes", nargs="+", default=["negative", "positive"], help="labels in output order (default negative positive)")
    add_setting_flags(p, TrainSettings)
    _add_run_tracking(p)


def _add_heatmap(sub) -> None:
    p = sub.add_parser("heatmap", help="stitch trained heads' spatial maps onto a slide: OME-Zarr, PNG, overlay, scores")
    p.add_argument("store", type=Path, nargs="?", default=None,
                   help="tile store of the sample (results/tiles/{sample}.zarr); or a cohort with --samples")
    p.add_argument("--samples", type=Path, default=None,
                   help="instead of a store: every sample of this sheet of --kind, one --model loaded once (a cohort)")
    p.add_argument("--tiles", type=Path, default=None, help="with --samples: the folder of the tile stores")
    p.add_argument("--kind", choices=["slide", "image"], default=None, help="with --samples: which samples (default all)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="with --samples: JSON listing each sample's files and scores (written last)")
    p.add_argument("--outputs-for", type=Path, default=None, metavar="FILE",
                   help="with --samples: write files only for the sample ids in FILE (one per line; may be empty); "
                        "every sample is still mapped and scored (default: files for all)")
    p.add_argument("--model", type=Path, action="append", required=True, metavar="RUN_DIR",
                   help="training run folder (weights.safetensors, model.json); repeat for several, each with its --out")
    p.add_argument("--out", type=Path, action="append", required=True, metavar="DIR",
                   help="output folder, one per --model, in the same order")
    p.add_argument("--sample", default=None, help="sample id (default: the store's name)")
    add_setting_flags(p, HeatmapSettings)
    p.add_argument("--annotations", type=Path, default=None, help="GeoJSON of the positive objects for scoring (default: the one recorded at tiling)")
    p.add_argument("--positive-class", action="append", default=[], metavar="NAME", help="annotation class that counts as positive (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, default) | cuda | cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--comparison", type=Path, default=None, help="JSON from `gapless mlflow-setup`: log scores and the PNG to each model's run")
    p.add_argument("--tracking-uri", default=None, help="without --comparison: MLflow URI of the models' runs (default: no logging)")


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed", help="each tile's feature vector (a backbone's pooled final feature map) into a zarr store beside the tile store",
        description="Runs a backbone over every tile of a tile store and writes each tile's feature vector (its final "
                    "feature map averaged over positions, float16) with the tile's place on the tile grid, its "
                    "coordinates and label (schema gapless.embeddings/1). The backbone is a trained run's (--model: its "
                    "input preparation too) or a timm model (--backbone: random init, or --weights; tiles normalised by "
                    "the store's channel statistics, as training does).",
        epilog="e.g. gapless embed results/tiles/slide-00.zarr --out results/embeddings/slide-00.zarr "
               "--model results/models/slide/gap/seed0")
    p.add_argument("store", type=Path, nargs="?", default=None,
                   help="tile store (results/tiles/{sample}.zarr, or a batch store with --sample); or a cohort with --samples")
    p.add_argument("--out", type=Path, required=True,
                   help="the embeddings store, e.g. results/embeddings/{sample}.zarr; with --samples the folder of "
                        "OUT/{sample_id}.zarr")
    p.add_argument("--samples", type=Path, default=None,
                   help="instead of a store: every sample of this sheet of --kind, the encoder loaded once (a cohort)")
    p.add_argument("--tiles", type=Path, default=None, help="with --samples: the folder of the tile stores")
    p.add_argument("--kind", choices=["slide", "image"], default="slide", help="with --samples: which samples (default slide)")
    p.add_argument("--model", type=Path, default=None, metavar="RUN_DIR",
                   help="a training run folder (weights.safetensors, model.json): its backbone and input preparation")
    p.add_argument("--backbone", default=None, metavar="NAME", help="instead of --model: a timm backbone (e.g. resnet10t)")
    p.add_argument("--weights", type=Path, default=None, metavar="FILE",
                   help="with --backbone: a local .safetensors/.pth state dict (default: random init)")
    p.add_argument("--backbone-kwargs", type=json_object, default=None, metavar="JSON",
                   help="with --backbone: more timm.create_model arguments, e.g. '{\"channels\": [32, 64, 128, 256]}'")
    p.add_argument("--seed", type=int, default=0, help="with --backbone and no --weights: the random initialisation's seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="tiles per batch (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, default) | cuda | cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--sample", default=None, help="in a batch store, the sample to embed (default: the store's only one)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")


def _add_train_slides(sub) -> None:
    from pipeline.slide_level.settings import SlideTrainSettings

    p = sub.add_parser("train-slides", help="train one head × seed at the slide level (tile embeddings on the tile grid) "
                                            "from slide labels alone, tracked in MLflow",
                       description="Each slide of the sheet is its tile embeddings (gapless embed) laid on its tile grid, "
                                   "holes masked; a 1×1-conv encoder and the registered head score the slide. Only the "
                                   "sheet's slide labels are read, never its annotations.")
    p.add_argument("--samples", type=Path, required=True, help="sample sheet (CSV); its slides are the cohort")
    p.add_argument("--embeddings", type=Path, required=True, help="folder of the embedding stores, EMBEDDINGS/{sample_id}.zarr")
    p.add_argument("--out", type=Path, required=True, help="run folder: weights.safetensors, slide_model.json, metrics.json, "
                                                           "predictions.json, run_id.txt, plots")
    p.add_argument("--classes", nargs="+", default=["negative", "positive"], help="labels in output order (default negative positive)")
    add_setting_flags(p, SlideTrainSettings)
    _add_run_tracking(p)


def _add_heatmap_slides(sub) -> None:
    p = sub.add_parser("heatmap-slides", help="slide heatmaps of a slide-level model: its head's map over each slide's "
                                              "tile grid, on the slide (the tile level's files and scores)")
    p.add_argument("--model", type=Path, required=True, metavar="RUN_DIR", help="a folder `gapless train-slides` wrote")
    p.add_argument("--samples", type=Path, required=True, help="sample sheet (CSV): its slides are mapped")
    p.add_argument("--embeddings", type=Path, required=True, help="folder of the embedding stores, EMBEDDINGS/{sample_id}.zarr")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder of the slides' heatmap files")
    p.add_argument("--manifest", type=Path, default=None, help="JSON listing each slide's files, probability and scores (written last)")
    p.add_argument("--annotations", type=Path, default=None, metavar="DIR|CSV",
                   help="outlines for scoring only: a folder of {sample_id}.geojson, or a CSV with sample_id and "
                        "annotations columns (default: the sheet's annotations column, else the ones recorded at tiling)")
    p.add_argument("--outputs-for", type=Path, default=None, metavar="FILE",
                   help="write files only for the sample ids in FILE (one per line); every slide is still scored")
    add_setting_flags(p, HeatmapSettings, only=("normalisation",))
    p.add_argument("--positive-class", action="append", default=[], metavar="NAME", help="annotation class that counts as positive (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, default) | cuda | cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--comparison", type=Path, default=None, help="JSON from `gapless mlflow-setup`: log the scores to the model's run")
    p.add_argument("--tracking-uri", default=None, help="without --comparison: MLflow URI of the model's run (default: no logging)")


def _add_pyramid(sub) -> None:
    p = sub.add_parser("pyramid", help="Deep Zoom pyramid of a slide or cell image for the viewer")
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder (slide.dzi, slide_files/)")
    p.add_argument("--kind", choices=["slide", "image"], default=None)
    p.add_argument("--workers", type=int, default=1, help="threads (default 1)")
    p.add_argument("--max-mpp", type=_max_mpp, default=None, metavar="UM_PER_PX|full",
                   help="finest level written, in µm/px; finer levels are served from the slide by `gapless view` "
                        "(default: the tiles' µm/px with --store, else 1; `full` writes every level)")
    p.add_argument("--store", type=Path, default=None, help="the sample's tile store: its tiles' µm/px is the default "
                   "--max-mpp, its source µm/px the slide's")
    p.add_argument("--slide-mpp", type=float, default=None, help="µm/px of the source's level 0, when its metadata lacks it")


def _add_page(sub) -> None:
    p = sub.add_parser("page", help="the static viewer page of one sample: slide, heads' overlays, scores")
    p.add_argument("sample", help="sample id")
    p.add_argument("--pyramid", type=Path, required=True, help="folder written by `gapless pyramid`")
    p.add_argument("--heatmap", type=Path, action="append", required=True, metavar="JSON", help="a head's heatmap JSON (repeat per head)")
    p.add_argument("--out", type=Path, required=True, help="the page (results/heatmaps/{sample}.html)")
    p.add_argument("--summary", type=Path, required=True, help="JSON written for `gapless index`")
    p.add_argument("--annotations", type=Path, default=None, help="GeoJSON outlines to draw (e.g. the witness cells)")
    p.add_argument("--info", action="append", default=[], metavar="KEY=VALUE", help="shown on the page and the index (repeatable)")


def _add_index(sub) -> None:
    p = sub.add_parser(
        "index", help="the index page: every mapped sample with each head's scores, linked to its page where it has one",
        description="Every sample of the heatmap manifests (--manifest, one per head and cohort, of one seed) is a "
                    "row with each head's p max, p mean and scores; a sample with a page (a summary given by name "
                    "or found in --pages) links to it. Without --manifest, the rows are the pages' samples.",
        epilog="e.g. gapless index --manifest results/heatmaps/manifests/gap/seed0/slide.json --manifest ... "
               "--pages results/heatmaps/pages --samples samples.csv --out results/heatmaps/index.html")
    p.add_argument("summaries", type=Path, nargs="*", metavar="SUMMARY",
                   help="page summaries written by `gapless page --summary` (each page must exist)")
    p.add_argument("--manifest", type=Path, action="append", default=[], metavar="JSON",
                   help="a heatmap manifest written by `gapless heatmap --samples ... --manifest` (repeat: one per "
                        "head and cohort, of one seed); its samples are the rows")
    p.add_argument("--pages", type=Path, default=None, metavar="DIR",
                   help="a folder of page summaries ({sample}.json), instead of naming each: a manifest's sample whose "
                        "summary is there, and not older than the manifest, is linked")
    p.add_argument("--samples", type=Path, action="append", default=[], metavar="SHEET",
                   help="a sample sheet (repeat): each sample's label, group and kind (no file is opened)")
    p.add_argument("--pages-note", default=None, metavar="TEXT",
                   help="how the paged samples were chosen, said on the page (e.g. 'the test split of seed 0')")
    p.add_argument("--title", default="gapless heatmaps", help="the page's title")
    p.add_argument("--out", type=Path, required=True, help="results/heatmaps/index.html")


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="serve the viewer on 127.0.0.1, with full-resolution tiles cut from the slides on demand")
    p.add_argument("root", type=Path, nargs="?", default=Path("results/heatmaps"),
                   help="the viewer's folder, or one of its pages (default results/heatmaps)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one, printed)")
    p.add_argument("--verbose", action="store_true", help="log every request, not only failed ones")


def _add_qupath(sub) -> None:
    p = sub.add_parser("qupath", help="one sample's tile scores as GeoJSON tile objects for QuPath, a measurement per head")
    p.add_argument("heatmaps", type=Path, nargs="+", metavar="JSON", help="the sample's heatmap JSONs, one per head")
    p.add_argument("--out", type=Path, required=True, help="the GeoJSON written, e.g. results/qupath/{sample}.geojson")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="the comparison from MLflow: means and intervals over seeds, each head against gap")
    p.add_argument("--comparison", type=Path, default=None, help="JSON from `gapless mlflow-setup` (tracking URI, parent run)")
    p.add_argument("--tracking-uri", default=None, help="instead of --comparison: the MLflow URI")
    p.add_argument("--parent-run-id", default=None, help="instead of --comparison: the comparison (parent) run id")
    p.add_argument("--out", type=Path, default=Path("results/report"), help="output folder (default results/report)")
    p.add_argument("--heatmap", action="append", default=[], metavar="HEAD=PNG",
                   help="one slide's heatmap PNG per head, for the side-by-side figure (repeat)")
    p.add_argument("--setting-key", action="append", default=None, metavar="PARAM",
                   help="run param that defines a setting (repeat; default train.kind config.demo.witness_fraction "
                        "config.demo.cell_density; the workflow passes train.kind and the demo keys its sweep varies)")
    p.add_argument("--x", default="auto", metavar="PARAM",
                   help="the setting on the metric plot's x axis (metric_vs_<x>.png): a setting key or its short name "
                        "(cells_per_image); auto (default): the numeric setting with the most distinct values")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the comparison run")


def _add_bench(sub) -> None:
    from pipeline.tiling import TileSettings

    p = sub.add_parser("bench", help="measured speed ratios")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench.add_parser("tiling", help="the tiler against a bare read-only loop over the same tile grid")
    b.add_argument("slide", type=Path)
    add_setting_flags(b, TileSettings, only=(*_TILE_GEOMETRY, "codec", "quality"), settings_flag=False)
    b.add_argument("--workers", type=int, default=None, help="also measure with this many processes (default: all cores)")
    b.add_argument("--repeat", type=int, default=1, help="repeat each measurement and keep the fastest")
    b = bench.add_parser("heads", help="forward+backward time of each head relative to gap, and the data loader against the model")
    b.add_argument("--backbone", default="resnet50", help="timm backbone (default resnet50)")
    b.add_argument("--image-size", type=int, default=224, help="input side in px (default 224)")
    b.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    b.add_argument("--heads", nargs="+", default=None, help="heads to measure (default: all; gap always first)")
    b.add_argument("--steps", type=int, default=10, help="timed training steps per head (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    b.add_argument("--channels", type=int, default=3, help="input channels without --store (default 3)")
    b.add_argument("--store", type=Path, nargs="+", default=None, help="tile store(s): also measure the training data loader on them")
    b.add_argument("--loader-workers", type=int, default=None, help="data-loader processes (default: all cores)")
    b.add_argument("--loader-batches", type=int, default=20, help="batches the loader is timed over (default 20)")
    b.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    b = bench.add_parser("cohort", help="a simulated screening cohort: planning time and memory, tiling fields/s")
    b.add_argument("--fields", type=positive_int, default=20000, help="fields in the sheet (default 20000)")
    b.add_argument("--timed-fields", type=positive_int, default=100, help="fields tiled for the throughput (default 100)")
    b.add_argument("--out", type=Path, default=None, help="keep the simulated cohort here (default: a temporary folder)")
    b.add_argument("--snakefile", type=Path, default=None, help="the workflow (default: this checkout's Snakefile)")
    b.add_argument("--no-plan", action="store_true", help="skip planning (snakemake -n)")
    b = bench.add_parser("slide", help="a real-size synthetic slide (50,000 × 40,000 px): tiling, heatmap, pyramid "
                                       "and viewer time and peak memory, at two sizes")
    b.add_argument("--sizes", type=_size, nargs="+", default=[(50_000, 40_000), (35_355, 28_284)], metavar="WxH",
                   help="slide sizes in level-0 px (default 50000x40000 35355x28284: half the area)")
    b.add_argument("--mpp", type=float, default=0.25, help="the slides' µm/px at level 0 (default 0.25, a 40× scan)")
    b.add_argument("--tile-mpp", type=float, default=None, help="the tiles' µm/px (default: --mpp, level 0)")
    b.add_argument("--tile-size", type=positive_int, default=224, help="tile edge, px (default 224)")
    b.add_argument("--pyramid-mpp", type=float, default=1.0, help="the static pyramid's finest µm/px (default 1)")
    b.add_argument("--view-requests", type=positive_int, default=400,
                   help="full-resolution tiles asked of `gapless view` (default 400)")
    b.add_argument("--out", type=Path, default=None, help="keep the slides and outputs here (default: a temporary folder)")
    b.add_argument("--steps", nargs="+", choices=["tiling", "heatmap", "pyramid", "view"],
                   default=["tiling", "heatmap", "pyramid", "view"], help="what to measure (default: all)")


def _max_mpp(text: str) -> float | str:
    """argparse type: a positive µm/px, or ``full`` (every level)."""
    if text.strip().lower() in ("full", "none"):
        return "full"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected µm/px (e.g. 1) or full, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"µm/px must be a positive number, got {text!r}")
    return value
