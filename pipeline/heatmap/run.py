"""Heatmaps of trained heads: the entry points ``heatmap_model`` (one model, one store) and
``heatmap_sample`` (one store, one or several trained run folders), and their MLflow logging.

For one sample × trained head: inference over every tile of the store (batched; CUDA with bf16
autocast when present, as in training), each tile's map put at the tile's place on a grid over the
whole slide, normalised on a scale shared by every head, written as OME-Zarr, PNGs and a JSON for a
viewer, scored against witness annotations and logged to the head's MLflow run as
``heatmap/{sample}/{score}`` (names: :mod:`pipeline.mlflow_names`), the PNG as an artifact under
``heatmaps/``. With ``gradcam=True`` the positive class's Grad-CAM (:mod:`pipeline.heatmap.gradcam`)
comes from the same forward pass and goes the same way: stitched, normalised, written beside the
head's map (:mod:`pipeline.heatmap.outputs`), scored, and logged as ``heatmap/{sample}/gradcam_{score}``
(``gradcam_localisation_auroc``, ``gradcam_pointing_game_top1``, ``gradcam_pointing_game_top5``), its
PNG as an artifact beside the head's.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.device import resolve_device
from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo
from pipeline.heatmap.canvas import stitch_store
from pipeline.heatmap.maps import sample_view
from pipeline.heatmap.outputs import write_heatmap
from pipeline.heatmap.scores import check_normalisation, gradcam_scores, normalise, score_heatmap
from pipeline.io import same_mpp
from pipeline.mlflow_names import heatmap_metric
from pipeline.run_folder import load_trained

log = logging.getLogger("gapless.heatmap")


def heatmap_model(model, config: Mapping, store, out_dir: str | Path, sample_id: str | None = None,
                  head: str | None = None, normalisation: str = "rank", annotations=None,
                  positive_classes: Sequence[str] = (), batch_size: int = 64, device=None,
                  run_id: str | None = None, tracking_uri: str | None = None, progress: bool = True,
                  gradcam: bool = False, write: bool = True) -> dict:
    """One model on one store: stitch, normalise, score, write into ``out_dir``, log to MLflow.

    ``annotations``: an ``Annotations``, a GeoJSON path, or None for the one recorded in the store
    at tiling time (attr ``annotations``, with its ``positive_classes`` unless given), when it
    exists. MLflow: with ``tracking_uri`` and ``run_id`` (default: ``config["run_id"]``) the scores
    go to that run as ``heatmap/{sample}/{score}`` and the PNG under ``heatmaps/``. ``gradcam``: the
    Grad-CAM map too (the model must expose ``forward_features`` and ``head``, as ``InstanceModel``
    does); its scores join the returned ``scores`` (and MLflow) as ``gradcam_{score}``, its files the
    paths as ``gradcam_png`` and ``gradcam_overlay``. ``write=False``: the maps are made and scored
    but no file is written (no paths returned).
    """
    check_normalisation(normalisation)
    view = sample_view(store, sample_id)
    path, sample_id = view.path, sample_id or view.sample_id
    info = HeadInfo.from_dict(config.get("head_info"), name=head or config.get("head") or type(model).__name__)
    run_id = run_id if run_id is not None else config.get("run_id")
    classes = list(config.get("classes") or [])
    attrs = view.attrs
    if config.get("mpp") and attrs.mpp and not same_mpp(attrs.mpp, config["mpp"]):
        log.warning("%s: tiles at %.3g µm/px, the model was trained at %.3g µm/px", path, attrs.mpp, config["mpp"])

    annotations, positive_classes = resolve_annotations(view, annotations, positive_classes)
    maps = stitch_store(model, config, view, batch_size, device, progress, gradcam)
    return map_outputs(maps, view, sample_id, info, classes, out_dir, normalisation, annotations, positive_classes,
                       run_id, tracking_uri, gradcam, write)


def resolve_annotations(view, annotations=None, positive_classes: Sequence[str] = ()):
    """``(Annotations or None, positive classes)`` for scoring a sample's map: ``annotations`` as given (an
    ``Annotations`` or a GeoJSON path), else the one recorded in the store at tiling time (attr
    ``annotations``, with its ``positive_classes`` unless given) when it still exists. A bad file fails
    here, before any inference."""
    attrs = view.attrs
    if annotations is None and attrs.annotations:
        recorded = Path(attrs.annotations)
        if recorded.is_file():
            annotations = recorded
            positive_classes = positive_classes or tuple(attrs.positive_classes or ())
        else:
            log.warning("%s: the annotations recorded at tiling (%s) are gone; no scores", view.path, recorded)
    if isinstance(annotations, (str, Path)):
        from pipeline.annotations import load_annotations

        annotations = load_annotations(annotations)
    return annotations, positive_classes


def map_outputs(maps, view, sample_id: str, info: HeadInfo, classes: Sequence[str], out_dir: str | Path,
                normalisation: str = "rank", annotations=None, positive_classes: Sequence[str] = (),
                run_id: str | None = None, tracking_uri: str | None = None, gradcam: bool = False,
                write: bool = True) -> dict:
    """A sample's stitched maps (``StitchedMaps``) normalised, scored against ``annotations`` (an
    ``Annotations`` or None), written into ``out_dir`` (unless ``write`` is False) and logged to MLflow
    (with ``tracking_uri`` and ``run_id``): what :func:`heatmap_model` returns. Shared by the tile-level
    heatmaps and the slide level's (:mod:`pipeline.slide_level.heatmap`)."""
    if not classes:
        classes = [str(i) for i in range(maps.probs.shape[1])]
    values, value_range = normalise(maps, normalisation)
    scores = score_heatmap(values, maps.cell, annotations, positive_classes) if annotations is not None else {}
    g_layer, logged = None, dict(scores)
    if gradcam:
        g_values, g_range = normalise(maps, normalisation, "gradcam")
        g_scores = score_heatmap(g_values, maps.cell, annotations, positive_classes) if annotations is not None else {}
        g_layer = (g_values, g_range, g_scores)
        if g_scores:
            logged.update(gradcam_scores(g_scores))

    paths = {}
    if write:
        paths = write_heatmap(out_dir, sample_id, info, maps, values, value_range, normalisation, classes,
                              view.thumbnail(), scores, run_id, gradcam=g_layer)
    del g_layer
    if tracking_uri and run_id:
        log_scores(tracking_uri, run_id, {sample_id: logged}, [paths[k] for k in ("png", "gradcam_png") if k in paths])
    p = maps.probs[:, -1] if len(maps.probs) else np.zeros(0)
    return {**paths, "scores": logged, "range": list(value_range), "normalisation": normalisation,
            "run_id": run_id, "head": info.name, "tiles": int(len(maps.coords)), "cell_size": maps.cell,
            "canvas": [int(values.shape[0]), int(values.shape[1])],
            "p_mean": float(p.mean()) if len(p) else None, "p_max": float(p.max()) if len(p) else None}


def log_scores(tracking_uri: str, run_id: str, scores: Mapping[str, dict], pngs: Sequence[Path] = ()) -> None:
    """Each sample's numeric scores as ``heatmap/<sample>/<score>`` metrics of the model's run (in batches),
    and ``pngs`` as artifacts under ``heatmaps/``."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import RunLogger

    metrics = {heatmap_metric(sample_id, k): v for sample_id, sample_scores in scores.items()
               for k, v in sample_scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:
        run = RunLogger(tracking_uri, run_id)
        run.metrics(metrics)
        for png in pngs:
            run.artifact(png, "heatmaps")
    except MlflowException as exc:
        raise GaplessError(tracking_uri, f"cannot log to MLflow run {run_id}: {exc.message}",
                           "pass the tracking URI the head was trained with (mlflow.tracking_uri or "
                           "MLFLOW_TRACKING_URI)") from None


MANIFEST_SCHEMA = "gapless.heatmaps/1"


def heatmap_cohort(run_dir: str | Path, stores: Mapping[str, str | Path], out_dir: str | Path,
                   manifest: str | Path | None = None, normalisation: str = "rank", positive_classes: Sequence[str] = (),
                   batch_size: int = 64, tracking_uri: str | None = None, pngs_to_mlflow: int = 16,
                   progress: bool = True, device=None, gradcam: bool = False,
                   outputs: Collection[str] | None = None) -> dict:
    """One trained model over every sample of a cohort (``stores``: sample id → its store, which may be a
    batch store): the model is loaded once, each sample's heatmap written into ``out_dir`` as
    :func:`heatmap_model` writes it, the scores logged to the model's run in one go (and the first
    ``pngs_to_mlflow`` PNGs as artifacts, with their Grad-CAM PNGs), and ``manifest`` (JSON: each
    sample's files, scores and tile probabilities' mean and max) written last. ``gradcam``: the
    Grad-CAM map too (see :func:`heatmap_model`). ``outputs``: the samples whose files are written
    (None: all); the others are mapped and scored only (their manifest entries name no files), which
    is what a large cohort needs: pages for a few samples, scores for all. Returns the manifest's
    content."""
    from tqdm import tqdm

    from pipeline.files import atomic_write_text

    check_normalisation(normalisation)
    device = resolve_device(device)
    model, config = load_trained(run_dir, device)
    head = config["head"]
    results = {}
    for sample_id, store in tqdm(stores.items(), desc=f"heatmaps {head}", unit="sample", disable=not progress,
                                 file=sys.stderr, dynamic_ncols=True):
        write = outputs is None or sample_id in outputs
        r = heatmap_model(model, config, sample_view(store, sample_id), out_dir, sample_id, head, normalisation,
                          None, positive_classes, batch_size, device, config.get("run_id"), None, False, gradcam,
                          write)
        results[sample_id] = {"tiles": r["tiles"], "p_mean": r["p_mean"], "p_max": r["p_max"], "scores": r["scores"]}
        for key in ("json", "png", "gradcam_png"):
            if key in r:
                results[sample_id][key] = str(r[key])
    if tracking_uri and config.get("run_id"):
        log_scores(tracking_uri, config["run_id"], {s: r["scores"] for s, r in results.items()},
                   [Path(r[k]) for r in list(results.values())[:pngs_to_mlflow] for k in ("png", "gradcam_png") if k in r])
    doc = {"schema": MANIFEST_SCHEMA, "head": head, "run_id": config.get("run_id"), "model": str(run_dir),
           "normalisation": normalisation, "samples": results}
    if manifest is not None:
        atomic_write_text(manifest, json.dumps(doc, allow_nan=False, separators=(",", ":")) + "\n")  # compact: 10⁵ samples
    return doc


def heatmap_sample(store, run_dirs, out_dir: str | Path, sample_id: str | None = None, normalisation: str = "rank",
                   annotations=None, positive_classes: Sequence[str] = (), batch_size: int = 64,
                   tracking_uri: str | None = None, progress: bool = True, device=None, gradcam: bool = False) -> dict:
    """Heatmaps of one sample for one or several trained heads; returns ``{head: {paths, scores, …}}``.

    run_dirs: one training run directory (outputs go straight into ``out_dir``, e.g.
    ``results/heatmaps/{head}``) or ``{head: run_dir}`` (outputs into ``out_dir/{head}/``).
    Heads are comparable because the normalisation puts each on the same scale, not because they
    run together: one call per head × sample gives the same files as one call for all heads.
    sample_id: default the store's name without ``.zarr``. annotations, positive_classes,
    tracking_uri, gradcam: see ``heatmap_model`` (the run id comes from each run directory's run_id.txt).
    """
    check_normalisation(normalisation)
    device = resolve_device(device)  # once for every model
    view = sample_view(store, sample_id)  # opened and checked once for every model
    if isinstance(run_dirs, Mapping):
        jobs = [(str(head), Path(d), Path(out_dir) / str(head)) for head, d in run_dirs.items()]
    else:
        jobs = [(None, Path(run_dirs), Path(out_dir))]
    results = {}
    for head, run_dir, target in jobs:
        model, config = load_trained(run_dir, device)
        head = head or config["head"]
        results[head] = heatmap_model(model, config, view, target,
                                      sample_id, head, normalisation, annotations, positive_classes, batch_size,
                                      device, config.get("run_id"), tracking_uri, progress, gradcam)
        del model
    return results
