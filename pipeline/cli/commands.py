"""What each ``gapless`` sub-command does: one ``_run_<command>(args)`` each, a thin call into the library."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.files import atomic_write_text, outputs
from pipeline.settings import HeatmapSettings, settings_from_args

log = logging.getLogger("gapless")


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


def _run_tile_batch(args) -> None:
    from pipeline.samples import load_sample_sheet
    from pipeline.tiling import TileSettings
    from pipeline.tiling.batch import tile_batch

    settings = settings_from_args(TileSettings, args)
    by_id = {s.sample_id: s for s in load_sample_sheet(args.samples)}
    missing = [i for i in args.ids if i not in by_id]
    if missing:
        raise GaplessError(args.samples, f"no sample {', '.join(map(repr, missing[:5]))} in the sheet",
                           "pass ids of the sheet's samples")
    result = tile_batch([by_id[i] for i in args.ids], args.out, args.manifest, settings, progress=not args.quiet)
    print(result.summary())


def _run_info(args) -> None:
    from pipeline.store import store_info

    print(json.dumps(store_info(args.store, verify=args.verify, sample_id=args.sample), indent=2, ensure_ascii=False))


def _run_qc(args) -> None:
    from pipeline.qc import write_qc_table

    rows = write_qc_table(args.stores, args.out)
    flagged = [r for r in rows if r["qc_flag"]]
    for r in flagged:
        print(f"qc: flagged: {r['sample']}: {r['qc_flag']}")
    print(f"qc: {len(rows)} samples, {sum(r['tiles'] for r in rows)} tiles, {len(flagged)} flagged -> {args.out}"
          + ("; training refuses flagged stores with tiles unless train.accept_flagged is true" if flagged else ""))


def _run_bench(args) -> None:
    if args.bench == "cohort":
        from pipeline.bench.cohort import bench_cohort

        bench_cohort(args.fields, args.timed_fields, args.out, args.snakefile, plan=not args.no_plan)
    elif args.bench == "heads":
        from pipeline.bench.heads import bench_heads

        bench_heads(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size, heads=args.heads,
                    steps=args.steps, warmup=args.warmup, device=args.device, channels=args.channels, store=args.store,
                    loader_workers=args.loader_workers, loader_batches=args.loader_batches)
    elif args.bench == "slide":
        from pipeline.bench.slide import bench_slide

        bench_slide(args.sizes, mpp=args.mpp, tile_mpp=args.tile_mpp, tile_size=args.tile_size,
                    pyramid_mpp=args.pyramid_mpp, view_requests=args.view_requests, out=args.out,
                    steps=args.steps)
    else:
        from pipeline.bench.tiling import bench_tiling
        from pipeline.tiling import TileSettings

        grid = settings_from_args(TileSettings, args)
        bench_tiling(
            args.slide, mpp=grid.mpp, tile_size=grid.tile_size, stride=grid.stride, slide_mpp=grid.slide_mpp,
            kind=grid.kind, workers=args.workers, repeat=args.repeat, codec=grid.codec, quality=grid.quality,
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
    from pipeline.distributed import current_world, relaunch_under_torchrun

    code = relaunch_under_torchrun(settings.devices)  # --devices N: this command again, one process per device
    if code is not None:
        if code:
            raise GaplessError(args.out, f"distributed training (torchrun, {settings.devices} processes) failed "
                                         f"with status {code}", "read the ranks' messages above")
        return
    t0 = time.perf_counter()
    metrics = train_cohort(args.samples, args.tiles, args.classes, settings, args.out, config=args.config,
                           progress=not args.quiet, connect=_connect(args))
    if not current_world().main:
        return
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
    if (args.store is None) == (args.samples is None):
        raise GaplessError(None, "give a tile store, or --samples (and --tiles) for a cohort", "not both, not neither")
    uri = _comparison(args.comparison)["tracking_uri"] if args.comparison else args.tracking_uri
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = settings_from_args(HeatmapSettings, args)
    if args.samples is not None:
        return _run_heatmap_cohort(args, settings, uri)
    for run_dir, out in zip(args.model, args.out):
        t0 = time.perf_counter()
        result = heatmap_sample(args.store, run_dir, out, sample_id=args.sample, normalisation=settings.normalisation,
                                annotations=args.annotations, positive_classes=tuple(args.positive_class),
                                batch_size=settings.batch_size, tracking_uri=uri, progress=not args.quiet, device=args.device,
                                gradcam=settings.gradcam)
        for head, r in result.items():
            scores = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items() if isinstance(v, float))
            print(f"heatmap: {head} ({run_dir}) on {args.store.name}: {r['tiles']} tiles, {r['canvas'][1]}×{r['canvas'][0]} "
                  f"cells of {r['cell_size']:.0f} px{'; ' + scores if scores else ''} in {time.perf_counter() - t0:.1f} s -> {r['json']}")


def _run_embed(args) -> None:
    from pipeline.embed import embed_cohort, embed_store

    _sample_id(args.sample)
    if (args.store is None) == (args.samples is None):
        raise GaplessError(None, "give a tile store, or --samples (and --tiles) for a cohort", "not both, not neither")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    encoder = dict(model_dir=args.model, backbone=args.backbone, weights=args.weights,
                   backbone_kwargs=args.backbone_kwargs, batch_size=args.batch_size, device=args.device, seed=args.seed)
    if args.samples is not None:
        if args.tiles is None:
            raise GaplessError(args.samples, "a cohort takes --tiles", "e.g. --samples S.csv --tiles results/tiles --out DIR")
        stores = _cohort_stores(args.samples, args.tiles, args.kind)
        t0 = time.perf_counter()
        results = embed_cohort(stores, args.out, progress=not args.quiet, **encoder)
        seconds, tiles = time.perf_counter() - t0, sum(r["n_tiles"] for r in results)
        print(f"embed: {len(results)} {args.kind}s, {tiles} tiles, D {results[0]['dim']} in {seconds:.1f} s "
              f"({tiles / max(seconds, 1e-9):.1f} tiles/s) -> {args.out}")
        return
    result = embed_store(args.store, args.out, sample_id=args.sample, progress=not args.quiet, **encoder)
    a = result["attrs"]
    print(f"embed: {a['sample_id']}: {result['n_tiles']} tiles, D {result['dim']} ({a['backbone']}, {a['encoder']}) in "
          f"{result['seconds']:.1f} s ({result['tiles_per_second']:.1f} tiles/s over the batches) -> {result['out']}")


def _cohort_stores(sheet: Path, tiles: Path, kind: str | None) -> dict:
    """sample id → its tile store (its own, or the batch store listing it) for the samples of ``sheet`` of ``kind``;
    a sample without one is an error naming how many and which."""
    from pipeline.samples import load_sample_sheet, with_kinds
    from pipeline.store import find_sample_store, sample_stores

    samples = with_kinds(load_sample_sheet(sheet), sheet)
    index, stores, missing = sample_stores(tiles), {}, []
    for s in samples:
        if kind is None or s.kind == kind:
            store = find_sample_store(tiles, s.sample_id, index)
            stores[s.sample_id] = store
            missing += [s.sample_id] if store is None else []
    if missing:
        raise GaplessError(tiles, f"no tile store for {len(missing)} sample(s), e.g. {', '.join(missing[:3])}",
                           "tile them first (the workflow's tile and tile_batch jobs)")
    if not stores:
        raise GaplessError(sheet, f"no {kind} samples in the sheet", "pass a sheet with samples of that kind")
    return stores


def _run_heatmap_cohort(args, settings, uri) -> None:
    """``gapless heatmap --samples SHEET --tiles DIR``: one model over every sample of a cohort."""
    from pipeline.heatmap.run import heatmap_cohort

    if args.tiles is None or len(args.model) != 1:
        raise GaplessError(args.samples, "a cohort takes --tiles and exactly one --model and --out",
                           "e.g. --samples S.csv --tiles results/tiles --model RUN --out DIR")
    stores = _cohort_stores(args.samples, args.tiles, args.kind)
    outputs = _outputs_for(args.outputs_for, stores, "list sample ids of the --samples sheet (--kind)")
    t0 = time.perf_counter()
    doc = heatmap_cohort(args.model[0], stores, args.out[0], args.manifest, settings.normalisation,
                         tuple(args.positive_class), settings.batch_size, uri, progress=not args.quiet, device=args.device,
                         gradcam=settings.gradcam, outputs=outputs)
    seconds = time.perf_counter() - t0
    print(f"heatmap: {doc['head']} ({args.model[0]}) on {len(stores)} samples in {seconds:.1f} s "
          f"({len(stores) / max(seconds, 1e-9):.1f} samples/s) -> {args.out[0]}")


def _outputs_for(path: Path | None, known, fix: str) -> set[str] | None:
    """The sample ids listed in ``path`` (one per line; None: no list), each one of ``known``."""
    if path is None:
        return None
    try:
        outputs = {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except OSError as exc:
        raise GaplessError(path, f"cannot read the list of samples to write ({exc.strerror})",
                           "pass a text file with one sample id per line") from None
    unknown = sorted(outputs - set(known))
    if unknown:
        raise GaplessError(path, f"names {len(unknown)} sample(s) not in the cohort, e.g. {', '.join(unknown[:3])}", fix)
    return outputs


def _connect(args):
    """A function giving (tracking URI, experiment id, parent run id): the comparison's, or the URI and
    experiment of the flags (created when missing); called only once the data has passed its checks."""
    comparison = _comparison(args.comparison) if args.comparison else None

    def connect() -> tuple[str, str, str | None]:
        if comparison:
            return comparison["tracking_uri"], comparison["experiment_id"], comparison["parent_run_id"]
        from pipeline.tracking import artifact_root, prepare_tracking, tracking_uri

        uri = tracking_uri(args.tracking_uri)
        return uri, prepare_tracking(uri, args.experiment, artifact_root()), None

    return connect


def _run_train_slides(args) -> None:
    from pipeline.device import resolve_device
    from pipeline.slide_level.settings import SlideTrainSettings
    from pipeline.slide_level.train import train_slides

    settings = settings_from_args(SlideTrainSettings, args)
    resolve_device(settings.device)
    settings.validate()
    t0 = time.perf_counter()
    metrics = train_slides(args.samples, args.embeddings, args.classes, settings, args.out, connect=_connect(args),
                           config=args.config, progress=not args.quiet)
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("test_auroc", "test_balanced_accuracy") if k in metrics)
    print(f"train-slides: {settings.head} seed {settings.seed} on {metrics.get('test_slides', 0)} test slides: {shown} in "
          f"{time.perf_counter() - t0:.0f} s; MLflow run {metrics['run_id']} -> {args.out}")


def _run_heatmap_slides(args) -> None:
    from pipeline.samples import load_sample_sheet, with_kinds
    from pipeline.slide_level.heatmap import scoring_annotations, slide_heatmap_cohort
    from pipeline.slide_level.train import embedding_stores

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = settings_from_args(HeatmapSettings, args)
    uri = _comparison(args.comparison)["tracking_uri"] if args.comparison else args.tracking_uri
    slides = [s for s in with_kinds(load_sample_sheet(args.samples), args.samples) if s.kind == "slide"]
    if not slides:
        raise GaplessError(args.samples, "no slides in the sample sheet", "pass the sheet of the slide-level cohort")
    stores = embedding_stores(slides, args.embeddings)
    annotations = {s.sample_id: s.annotations for s in slides if s.annotations is not None}
    if args.annotations is not None:
        annotations.update(scoring_annotations(args.annotations, [s.sample_id for s in slides]))
    outputs = _outputs_for(args.outputs_for, stores, "list slide ids of the --samples sheet")
    t0 = time.perf_counter()
    doc = slide_heatmap_cohort(args.model, stores, args.out, args.manifest, settings.normalisation, annotations,
                               tuple(args.positive_class), tracking_uri=uri, outputs=outputs, progress=not args.quiet,
                               device=args.device)
    print(f"heatmap-slides: {doc['head']} ({args.model}) on {len(stores)} slides in {time.perf_counter() - t0:.1f} s "
          f"({sum(1 for r in doc['samples'].values() if r['scores'])} scored) -> {args.out}")


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
                          log_mlflow=not args.no_mlflow, x_key=args.x)
    slide = result["slide"]
    slide_text = "" if slide is None else (f"; slide level: {len(slide.summary)} setting × head rows, "
                                           f"{len(slide.paired)} paired comparisons, {len(slide.skipped)} skipped runs")
    print(f"report: {len(result['summary'])} setting × head rows, {len(result['paired'])} paired comparisons, "
          f"{len(result['skipped'])} skipped runs, x axis {result['x_key']}{slide_text} -> {args.out}")


def _run_pyramid(args) -> None:
    from pipeline.viewer import write_slide_pyramid
    from pipeline.viewer.deepzoom import pyramid_summary
    from pipeline.viewer.pyramid import pyramid_cap

    max_mpp, slide_mpp = pyramid_cap(args.max_mpp, args.store, args.slide_mpp)
    t0 = time.perf_counter()
    out = write_slide_pyramid(args.source, args.out, kind=args.kind, progress=not args.quiet, workers=args.workers,
                              max_mpp=max_mpp, slide_mpp=slide_mpp)
    print(f"pyramid: {args.source} -> {out}: {pyramid_summary(out, capped=max_mpp is not None)} in "
          f"{time.perf_counter() - t0:.1f} s")


def _run_page(args) -> None:
    from pipeline.viewer import write_sample_page

    _sample_id(args.sample)
    info = _key_values(args.info, "--info", "label=positive")
    with outputs():  # the page and its summary appear together
        summary = write_sample_page(args.out, args.sample, args.pyramid, args.heatmap, annotations=args.annotations,
                                    info=info or None)
        atomic_write_text(args.summary, json.dumps({"sample": args.sample, "page": str(args.out), **summary}, indent=2) + "\n")
    print(f"page: {args.sample} with {len(args.heatmap)} head(s) -> {args.out}")


def _run_view(args) -> None:
    from pipeline.viewer import serve

    def ready(url: str) -> None:
        print(f"view: serving {args.root} at {url} (127.0.0.1 only; slides' full resolution cut on demand); Ctrl-C stops",
              flush=True)

    try:
        serve(args.root, port=args.port, verbose=args.verbose, ready=ready)
    except KeyboardInterrupt:
        print("view: stopped", flush=True)


def _run_qupath(args) -> None:
    from pipeline.qupath import write_qupath_geojson

    result = write_qupath_geojson(args.heatmaps, args.out)
    print(f"qupath: {result['sample']}: {result['tiles']} tiles, a measurement per head ({', '.join(result['heads'])}) "
          f"-> {result['path']}")


def _run_index(args) -> None:
    from pipeline.viewer import index_table, sheet_info, write_index_table

    if not args.summaries and not args.manifest and args.pages is None:
        raise GaplessError(args.out, "nothing to index", "pass heatmap manifests (--manifest), page summaries, or both")
    t0 = time.perf_counter()
    pages = []
    for path in args.summaries:
        summary = _read_json(path)
        if "sample" not in summary or "page" not in summary:
            raise GaplessError(path, "not a page summary (no 'sample' or 'page')", "pass the --summary files of `gapless page`")
        pages.append((summary.pop("sample"), summary.pop("page"), summary))
    table = index_table(args.out, pages, manifests=args.manifest, summaries_dir=args.pages,
                        sample_info=sheet_info(args.samples) if args.samples else None)
    out = write_index_table(args.out, table, args.title, args.pages_note)
    print(f"index: {len(table.samples):,} samples ({table.paged:,} with a page), {len(table.heads)} heads -> {out} "
          f"({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")


def _run_tracking_server(args) -> None:
    from pipeline.cluster import serve_tracking

    code = serve_tracking(args.results, args.host, args.port, args.workers)
    if code:
        raise GaplessError(args.results, f"mlflow server exited with status {code}",
                           "read its messages above (a port in use: pass another --port)")


COMMANDS = {"demo": _run_demo, "tile": _run_tile, "tile-batch": _run_tile_batch, "info": _run_info, "qc": _run_qc, "mlflow-setup": _run_mlflow_setup,
            "tracking-server": _run_tracking_server,
            "train": _run_train, "heatmap": _run_heatmap, "embed": _run_embed, "train-slides": _run_train_slides,
            "heatmap-slides": _run_heatmap_slides, "pyramid": _run_pyramid, "page": _run_page,
            "index": _run_index, "view": _run_view, "qupath": _run_qupath, "report": _run_report, "bench": _run_bench}
