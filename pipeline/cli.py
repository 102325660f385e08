"""``gapless <stage>``: each sub-command is one library call (the same code serves notebooks and tests)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

from pipeline import SNAKEMAKE_MARKER_WARNING, __version__
from pipeline.errors import GaplessError, one_line, os_error_message
from pipeline.files import atomic_write_text, outputs
from pipeline.settings import HeatmapSettings, add_setting_flags, json_object, positive_int, settings_from_args

log = logging.getLogger("gapless")


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
    for add in (_add_demo, _add_tile, _add_info, _add_qc, _add_mlflow_setup, _add_train, _add_heatmap, _add_pyramid,
                _add_page, _add_index, _add_report, _add_bench):
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


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a tile store's attributes and tile count as JSON, after checking it is complete")
    p.add_argument("store", type=Path)
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


def _add_train(sub) -> None:
    from pipeline.train_settings import TrainSettings

    p = sub.add_parser("train", help="train one head × seed on the tile stores of a sample sheet, tracked in MLflow")
    p.add_argument("--samples", type=Path, required=True, help="sample sheet (CSV)")
    p.add_argument("--tiles", type=Path, required=True, help="folder of the tile stores, TILES/{sample_id}.zarr")
    p.add_argument("--out", type=Path, required=True, help="run folder: weights.safetensors, model.json, metrics.json, run_id.txt, plots")
    p.add_argument("--classes", nargs="+", default=["negative", "positive"], help="labels in output order (default negative positive)")
    add_setting_flags(p, TrainSettings)
    p.add_argument("--comparison", type=Path, default=None, help="JSON from `gapless mlflow-setup`: log as a child of its parent run")
    p.add_argument("--tracking-uri", default=None, help="without --comparison: MLflow URI (default sqlite:///results/mlflow.db)")
    p.add_argument("--experiment", default="gapless", help="without --comparison: experiment name (default gapless)")
    p.add_argument("--config", type=json_object, default=None, help="the pipeline's resolved config as JSON text, logged as config.* params")


def _add_heatmap(sub) -> None:
    p = sub.add_parser("heatmap", help="stitch trained heads' spatial maps onto a slide: OME-Zarr, PNG, overlay, scores")
    p.add_argument("store", type=Path, help="tile store of the sample (results/tiles/{sample}.zarr)")
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


def _add_pyramid(sub) -> None:
    p = sub.add_parser("pyramid", help="Deep Zoom pyramid of a slide or cell image for the viewer")
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder (slide.dzi, slide_files/)")
    p.add_argument("--kind", choices=["slide", "image"], default=None)
    p.add_argument("--workers", type=int, default=1, help="threads (default 1)")


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
    p = sub.add_parser("index", help="the index page linking every sample page, with each head's scores")
    p.add_argument("summaries", type=Path, nargs="+", help="summary JSONs written by `gapless page`")
    p.add_argument("--out", type=Path, required=True, help="results/heatmaps/index.html")


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
                        "config.demo.cell_density)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the comparison run")


def _add_bench(sub) -> None:
    from pipeline.tiling import TileSettings

    p = sub.add_parser("bench", help="measured speed ratios")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bench.add_parser("tiling", help="the tiler against a bare read-only loop over the same tile grid")
    b.add_argument("slide", type=Path)
    add_setting_flags(b, TileSettings, only=_TILE_GEOMETRY, settings_flag=False)
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


def _run_demo(args) -> None:
    from pipeline.demo import DemoSettings, generate

    settings = settings_from_args(DemoSettings, args)
    t0 = time.perf_counter()
    sheet = generate(args.out, settings, progress=not args.quiet, id_prefix=args.id_prefix)
    n = settings.slides + settings.images
    print(f"demo: {n} samples ({settings.slides} slides, {settings.images} fields) in {time.perf_counter() - t0:.1f} s; sample sheet {sheet}")


def _run_tile(args) -> None:
    from pipeline.tiling import TileSettings, tile_source

    settings = settings_from_args(TileSettings, args)
    result = tile_source(args.input, args.out, settings, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    print(result.summary())


def _run_info(args) -> None:
    from pipeline.store import store_info

    print(json.dumps(store_info(args.store, verify=args.verify), indent=2, ensure_ascii=False))


def _run_qc(args) -> None:
    from pipeline.qc import write_qc_table

    rows = write_qc_table(args.stores, args.out)
    flagged = [r for r in rows if r["qc_flag"]]
    for r in flagged:
        print(f"qc: flagged: {r['sample']}: {r['qc_flag']}")
    print(f"qc: {len(rows)} samples, {sum(r['tiles'] for r in rows)} tiles, {len(flagged)} flagged -> {args.out}"
          + ("; training refuses flagged stores with tiles unless train.accept_flagged is true" if flagged else ""))


def _run_bench(args) -> None:
    if args.bench == "heads":
        from pipeline.bench.heads import bench_heads

        bench_heads(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size, heads=args.heads,
                    steps=args.steps, warmup=args.warmup, device=args.device, channels=args.channels, store=args.store,
                    loader_workers=args.loader_workers, loader_batches=args.loader_batches)
    else:
        from pipeline.bench.tiling import bench_tiling
        from pipeline.tiling import TileSettings

        grid = settings_from_args(TileSettings, args)
        bench_tiling(
            args.slide, mpp=grid.mpp, tile_size=grid.tile_size, stride=grid.stride, slide_mpp=grid.slide_mpp,
            kind=grid.kind, workers=args.workers, repeat=args.repeat,
        )


def _run_mlflow_setup(args) -> None:
    from pipeline.tracking import setup_comparison

    info = setup_comparison(args.experiment, args.tracking_uri, args.results, args.run_name, args.config)
    atomic_write_text(args.out, json.dumps(info, indent=2) + "\n")
    print(f"mlflow: experiment {args.experiment!r} ({info['experiment_id']}) at {info['tracking_uri']}, "
          f"comparison run {info['parent_run_id']} -> {args.out}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GaplessError(path, "file not found", "check the path") from None
    except json.JSONDecodeError as exc:
        raise GaplessError(path, f"not valid JSON ({exc})", "pass the JSON file written by the pipeline") from None


def _comparison(path: Path) -> dict:
    """The file `gapless mlflow-setup` wrote: tracking_uri, experiment_id, parent_run_id."""
    info = _read_json(path)
    missing = [k for k in ("tracking_uri", "experiment_id", "parent_run_id") if not info.get(k)]
    if missing:
        raise GaplessError(path, f"not a comparison file (no {', '.join(missing)})", "pass the JSON written by `gapless mlflow-setup`")
    return info


def _key_values(items: list[str], flag: str, example: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` → ``{"a": "1", "b": "2"}``; a malformed item is an error naming ``flag``."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise GaplessError(None, f"{flag} {item!r} is not KEY=VALUE", f"write e.g. {flag} {example}")
        pairs[key] = value
    return pairs


def _run_train(args) -> None:
    from pipeline.device import resolve_device
    from pipeline.train import train_cohort
    from pipeline.train_settings import TrainSettings

    settings = settings_from_args(TrainSettings, args)
    resolve_device(settings.device)  # a missing GPU stops here, before the MLflow store is touched
    settings.validate()  # a bad value stops here, before the MLflow store is touched
    comparison = _comparison(args.comparison) if args.comparison else None

    def connect() -> tuple[str, str, str | None]:
        """The tracking store, opened only once the data has passed its checks."""
        if comparison:
            return comparison["tracking_uri"], comparison["experiment_id"], comparison["parent_run_id"]
        from pipeline.tracking import artifact_root, prepare_tracking, tracking_uri

        uri = tracking_uri(args.tracking_uri)
        return uri, prepare_tracking(uri, args.experiment, artifact_root()), None

    t0 = time.perf_counter()
    metrics = train_cohort(args.samples, args.tiles, args.classes, settings, args.out, config=args.config,
                           progress=not args.quiet, connect=connect)
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("test_auroc", "test_balanced_accuracy", "test_sample_auroc_max")
                      if k in metrics)
    print(f"train: {settings.head} seed {settings.seed} on {settings.kind}s: {shown} in {time.perf_counter() - t0:.0f} s; "
          f"MLflow run {metrics['run_id']} -> {args.out}")


def _sample_id(sample_id: str | None) -> str | None:
    """``sample_id`` once it passes the sample sheet's rule (it names output files)."""
    from pipeline.samples import check_sample_id

    problem = None if sample_id is None else check_sample_id(sample_id)
    if problem:
        raise GaplessError(None, problem, "use the sample's id from the sample sheet")
    return sample_id


def _run_heatmap(args) -> None:
    from pipeline.heatmap import heatmap_sample

    _sample_id(args.sample)
    if len(args.model) != len(args.out):
        raise GaplessError(None, f"{len(args.model)} --model but {len(args.out)} --out", "give one --out per --model")
    uri = _comparison(args.comparison)["tracking_uri"] if args.comparison else args.tracking_uri
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = settings_from_args(HeatmapSettings, args)
    for run_dir, out in zip(args.model, args.out):
        t0 = time.perf_counter()
        result = heatmap_sample(args.store, run_dir, out, sample_id=args.sample, normalisation=settings.normalisation,
                                annotations=args.annotations, positive_classes=tuple(args.positive_class),
                                batch_size=settings.batch_size, tracking_uri=uri, progress=not args.quiet, device=args.device)
        for head, r in result.items():
            scores = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items() if isinstance(v, float))
            print(f"heatmap: {head} ({run_dir}) on {args.store.name}: {r['tiles']} tiles, {r['canvas'][1]}×{r['canvas'][0]} "
                  f"cells of {r['cell_size']:.0f} px{'; ' + scores if scores else ''} in {time.perf_counter() - t0:.1f} s -> {r['json']}")


def _run_report(args) -> None:
    from pipeline.report import DEFAULT_SETTING_KEYS, write_report

    uri, parent = args.tracking_uri, args.parent_run_id
    if args.comparison:
        info = _comparison(args.comparison)
        uri, parent = uri or info["tracking_uri"], parent or info["parent_run_id"]
    if not uri or not parent:
        raise GaplessError(None, "no tracking URI or comparison run", "pass --comparison, or --tracking-uri and --parent-run-id")
    pngs = _key_values(args.heatmap, "--heatmap", "gap=results/heatmaps/gap/seed0/S1.png")
    result = write_report(uri, parent, args.out, pngs or None, tuple(args.setting_key or DEFAULT_SETTING_KEYS),
                          log_mlflow=not args.no_mlflow)
    print(f"report: {len(result['summary'])} setting × head rows, {len(result['paired'])} paired comparisons, "
          f"{len(result['skipped'])} skipped runs -> {args.out}")


def _run_pyramid(args) -> None:
    from pipeline.viewer import write_slide_pyramid

    t0 = time.perf_counter()
    out = write_slide_pyramid(args.source, args.out, kind=args.kind, progress=not args.quiet, workers=args.workers)
    print(f"pyramid: {args.source} -> {out} in {time.perf_counter() - t0:.1f} s")


def _run_page(args) -> None:
    from pipeline.viewer import write_sample_page

    _sample_id(args.sample)
    info = _key_values(args.info, "--info", "label=positive")
    with outputs():  # the page and its summary appear together
        summary = write_sample_page(args.out, args.sample, args.pyramid, args.heatmap, annotations=args.annotations,
                                    info=info or None)
        atomic_write_text(args.summary, json.dumps({"sample": args.sample, "page": str(args.out), **summary}, indent=2) + "\n")
    print(f"page: {args.sample} with {len(args.heatmap)} head(s) -> {args.out}")


def _run_index(args) -> None:
    from pipeline.viewer import write_index

    pages = []
    for path in args.summaries:
        summary = _read_json(path)
        if "sample" not in summary or "page" not in summary:
            raise GaplessError(path, "not a page summary (no 'sample' or 'page')", "pass the --summary files of `gapless page`")
        pages.append((summary.pop("sample"), summary.pop("page"), summary))
    out = write_index(args.out, pages)
    print(f"index: {len(pages)} samples -> {out}")


COMMANDS = {"demo": _run_demo, "tile": _run_tile, "info": _run_info, "qc": _run_qc, "mlflow-setup": _run_mlflow_setup,
            "train": _run_train, "heatmap": _run_heatmap, "pyramid": _run_pyramid, "page": _run_page,
            "index": _run_index, "report": _run_report, "bench": _run_bench}


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (Snakemake, a scheduler) cleans up like Ctrl-C: no partial output


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="gapless: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    warnings.filterwarnings("ignore", message=SNAKEMAKE_MARKER_WARNING)
    try:
        COMMANDS[args.command](args)
    except GaplessError as exc:
        return _fail(args, exc.message)
    except OSError as exc:  # a full disk, a read-only folder, a file where a folder should be: one line, not a traceback
        return _fail(args, os_error_message(exc, _output_of(args)))
    except KeyboardInterrupt:
        print(f"gapless {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ != "MlflowException":
            raise  # a bug: the traceback is kept
        cause = one_line(getattr(exc, "message", str(exc)))
        return _fail(args, f"MLflow: {cause}; check the tracking store (mlflow.tracking_uri / MLFLOW_TRACKING_URI), "
                           "its disk space and permissions, then re-run")
    return 0


def _output_of(args) -> Path | None:
    """What a command writes (its --out, else its store), to name in an error that names no file."""
    out = getattr(args, "out", None)
    if isinstance(out, list):
        out = out[0] if out else None
    return out if out is not None else getattr(args, "store", None)


def _fail(args, message: str) -> int:
    print(f"gapless {args.command}: error: {message}", file=sys.stderr)
    return 2
