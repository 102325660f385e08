"""Train one head × seed at the slide level, from slide labels alone, and track it as an MLflow run.

Each slide is its tile embeddings on its tile grid (:mod:`pipeline.slide_level.bags`), holes masked;
the model is a 1×1-conv grid encoder and a registered head (:func:`pipeline.models.create_slide_model`),
the same heads and ``HeadOutput`` as within a tile. The split is group-aware as at the tile level
(:func:`pipeline.splits.check_split`, with ``split_seed``), training slides are drawn class-balanced,
the optimiser (AdamW, warm-up then cosine), the loss (chosen by the output, not the head's name), the
checkpoint choice (best validation AUROC after the warm-up) and the MLflow logging are the tile
level's. Only the slide labels of the sample sheet are read: annotations, where the sheet has them,
never reach training.

Run folder (:func:`pipeline.run_folder.write_run_folder`, so a failed run leaves nothing):
``weights.safetensors``, ``slide_model.json`` (what rebuilds the model, the classes, the encoder the
embeddings came from), ``metrics.json``, ``split.json``, ``predictions.json`` (every slide's
probability and split), ``roc.png``, ``confusion.png``, ``run_id.txt`` (last).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import GaplessError
from pipeline.slide_level.settings import SlideTrainSettings

log = logging.getLogger("gapless.slide_level")

SLIDE_MODEL_SCHEMA = "gapless.slidemodel/1"
SLIDE_MODEL_JSON = "slide_model.json"
PREDICTIONS_JSON = "predictions.json"
LEVEL = "slide"  # the MLflow tag gapless.level of these runs (pipeline.mlflow_names.LEVEL_SLIDE; tile runs: "tile")
_FIX = "pass the folder `gapless train-slides` wrote (it holds slide_model.json, weights.safetensors and run_id.txt)"


def embedding_stores(samples, embeddings_dir: str | Path) -> dict[str, Path]:
    """sample id → ``embeddings_dir/{sample_id}.zarr`` for every slide of ``samples``; a missing one is
    an error naming it and the command that makes it."""
    stores = {s.sample_id: Path(embeddings_dir) / f"{s.sample_id}.zarr" for s in samples}
    missing = [path for path in stores.values() if not path.is_dir()]
    if missing:
        raise GaplessError(missing[0], f"no embedding store for {len(missing)} slide(s) of the sheet"
                                       + (f" (also {missing[1].name}, …)" if len(missing) > 1 else ""),
                           "embed each slide's tile store first: gapless embed results/tiles/SAMPLE.zarr "
                           f"--out {Path(embeddings_dir)}/SAMPLE.zarr --model RUN_DIR (or --backbone NAME)")
    return stores


def _predict(model, bags, ids, device) -> np.ndarray:
    """(len(ids), K) class probabilities, one slide at a time."""
    import torch

    from pipeline.inference import probabilities
    from pipeline.slide_level.bags import collate

    model.eval()
    out = []
    with torch.no_grad():
        for sample_id in ids:
            x, mask = collate([bags.bag(sample_id)])
            out.append(probabilities(model(x.to(device), mask.to(device))).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def _metrics(probs: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
    from pipeline.metrics import classification_metrics

    return classification_metrics(probs, labels, prefix) if len(labels) else {}


@dataclass
class SlideCohort:
    """The slides a run trains on: their labels, the split, their embeddings and the encoder they came from."""

    samples: list
    label: dict  # sample id → class index
    split: object  # pipeline.splits.SplitCheck
    split_seed: int
    split_ids: dict  # train | val | test → sorted sample ids
    bags: object  # SlideBags
    encoder: dict  # the embeddings' encoder attrs, logged and written into slide_model.json


def prepare_slides(sheet, embeddings_dir, classes, settings: SlideTrainSettings) -> SlideCohort:
    """The sheet's slides, their embedding stores and the group-aware split of ``settings.split_seed`` (default
    the seed), checked: no slide, a missing store, embeddings of two widths, a split that cannot work — one
    ``GaplessError`` each, before any training or tracking."""
    from pipeline.samples import load_sample_sheet, with_kinds
    from pipeline.slide_level.bags import SlideBags
    from pipeline.splits import SPLIT_FIX, check_split

    samples = [s for s in with_kinds(load_sample_sheet(sheet, classes), sheet) if s.kind == "slide"]
    if not samples:
        raise GaplessError(sheet, "no slides in the sample sheet", "slide-level training needs samples of kind slide")
    bags = SlideBags(embedding_stores(samples, embeddings_dir))  # missing stores: before anything else
    split_seed = settings.seed if settings.split_seed is None else settings.split_seed
    split = check_split(samples, split_seed, settings.split_fractions, classes)
    if split.errors:
        raise GaplessError(sheet, "; ".join(split.errors), SPLIT_FIX)
    for warning in split.warnings:
        log.warning("%s", warning)
    split_ids = {name: sorted(s for s, v in split.assignment.items() if v == name) for name in ("train", "val", "test")}
    encoder = {k: bags.attrs[samples[0].sample_id].get(k) for k in
               ("encoder", "backbone", "model_dir", "weights", "weights_sha256", "dim", "mpp", "tile_size")}
    return SlideCohort(samples, {s.sample_id: classes.index(s.label) for s in samples}, split, split_seed, split_ids,
                       bags, encoder)


def fit_slides(model, cohort: SlideCohort, settings: SlideTrainSettings, device, run, progress: bool = True) -> dict:
    """The epochs: class-balanced draws of training slides (``batch_size`` per step, padded), AdamW with warm-up
    and cosine decay, gradient clipping; validation slide AUROC logged per epoch; the model left in the state of
    the best validation score after the warm-up. Returns the best score, its epoch and the training throughput."""
    import torch
    from tqdm import tqdm

    from pipeline.slide_level.bags import collate
    from pipeline.train import cosine_with_warmup, loss_fn

    train_ids, label = cohort.split_ids["train"], cohort.label
    y_train = np.array([label[s] for s in train_ids])
    counts = np.bincount(y_train, minlength=int(y_train.max()) + 1)
    weights = torch.as_tensor(1.0 / counts[y_train], dtype=torch.double)  # class-balanced draws
    generator = torch.Generator().manual_seed(int(settings.seed))
    steps = settings.steps_per_epoch or max(1, len(train_ids) // settings.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total, warmup = steps * settings.epochs, round(settings.warmup_epochs * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_with_warmup(s, warmup, total))
    y_val = np.array([label[s] for s in cohort.split_ids["val"]])
    best, best_epoch, best_state, seconds, seen = -1.0, 0, None, 0.0, 0
    for epoch in range(settings.epochs):
        model.train()
        draws = torch.multinomial(weights, steps * settings.batch_size, replacement=True, generator=generator).tolist()
        losses, t0 = [], time.perf_counter()
        for step in tqdm(range(steps), desc=f"slide {settings.head} seed {settings.seed} epoch {epoch + 1}/{settings.epochs}",
                         disable=not progress, file=sys.stderr, dynamic_ncols=True):
            ids = [train_ids[i] for i in draws[step * settings.batch_size:(step + 1) * settings.batch_size]]
            x, mask = collate([cohort.bags.bag(s) for s in ids])
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(device), mask.to(device)), torch.as_tensor([label[s] for s in ids], device=device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            seen += len(ids)
        seconds += time.perf_counter() - t0
        val = _metrics(_predict(model, cohort.bags, cohort.split_ids["val"], device), y_val, "val")
        score = val.get("val_auroc", val.get("val_balanced_accuracy", 0.0))
        run.metrics({"train_loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0], **val}, step=epoch)
        eligible = epoch + 1 > settings.warmup_epochs or epoch == settings.epochs - 1
        if eligible and score > best:
            best, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"best_val_score": best, "best_epoch": best_epoch, "train_slides_per_s": seen / max(seconds, 1e-9)}


def _run_params(settings: SlideTrainSettings, classes, cohort: SlideCohort, n_parameters: int, device,
                config: dict | None) -> dict:
    """What the MLflow run records as params: settings, split, encoder, code and the pipeline's config."""
    from pipeline.device import device_name
    from pipeline.mlflow_names import config_params, encoder_param, split_params, train_params
    from pipeline.train import code_version

    ids = cohort.split_ids
    counts = np.bincount([cohort.label[s] for s in ids["train"]], minlength=len(classes))
    params = train_params(asdict(settings))
    params.update({"head": settings.head, "seed": settings.seed, "split_seed": cohort.split_seed, "level": LEVEL,
                   "classes": ",".join(classes), "code_version": code_version(), "parameters": n_parameters,
                   "slides_train": len(ids["train"]), "slides_val": len(ids["val"]), "slides_test": len(ids["test"]),
                   "class_prior": json.dumps([round(float(c / counts.sum()), 4) for c in counts]),
                   "device": device.type, "device_name": device_name(device),
                   **{encoder_param(k): v for k, v in cohort.encoder.items()}})
    params.update(split_params(ids))
    if config:
        params.update(config_params(config))
    return params


def _save(work: Path, run, model, info, classes, cohort: SlideCohort, settings: SlideTrainSettings, device,
          fitted: dict, n_parameters: int) -> dict:
    """Every slide's prediction, the test metrics, and the run folder's files (each logged to MLflow)."""
    from safetensors.torch import save_file

    from pipeline.run_folder import WEIGHTS, write_json
    from pipeline.train_plots import roc_and_confusion

    every = [s for part in ("train", "val", "test") for s in cohort.split_ids[part]]
    t0 = time.perf_counter()
    by_id = dict(zip(every, _predict(model, cohort.bags, every, device)))
    seconds = time.perf_counter() - t0
    test_ids = cohort.split_ids["test"]
    test = {"probs": np.array([by_id[s] for s in test_ids]).reshape(-1, len(classes)),
            "labels": np.array([cohort.label[s] for s in test_ids], int)}
    metrics = {**_metrics(test["probs"], test["labels"], "test"), "test_slides": len(test_ids), **fitted,
               "inference_slides_per_s": len(every) / max(seconds, 1e-9), "parameters": n_parameters}
    run.metrics(metrics, step=settings.epochs)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, work / WEIGHTS)
    write_json(work, SLIDE_MODEL_JSON, {
        "schema": SLIDE_MODEL_SCHEMA, "model": model.config(), "classes": list(classes), "level": LEVEL,
        "head_info": info.to_dict(), "encoder": cohort.encoder,
        "settings": {**asdict(settings), "split_seed": cohort.split_seed}})
    write_json(work, "metrics.json", metrics)
    names = {s.sample_id: s.label for s in cohort.samples}
    write_json(work, PREDICTIONS_JSON, {s: {"split": cohort.split.assignment[s], "label": names[s],
                                            "probs": [round(float(p), 6) for p in by_id[s]]} for s in every})
    for name in (WEIGHTS, SLIDE_MODEL_JSON, "metrics.json", PREDICTIONS_JSON):
        run.artifact(work / name, "model" if name in (WEIGHTS, SLIDE_MODEL_JSON) else None)
    for path in roc_and_confusion(test, list(classes), work, LEVEL):
        run.artifact(path, "plots")
    return metrics


def train_slides(sheet, embeddings_dir, classes, settings: SlideTrainSettings, out_dir, connect=None,
                 config: dict | None = None, progress: bool = True) -> dict:
    """Train ``settings.head`` at the slide level on the slides of ``sheet`` whose embeddings are
    ``embeddings_dir/{sample_id}.zarr``; write the run folder ``out_dir``; return the final metrics.

    ``connect``: a function returning ``(tracking uri, experiment id, parent run id or None)``, called
    once the data has passed its checks (sheet, split, stores), so bad input touches no tracking store.
    ``config``: the pipeline's resolved config, logged as ``config.*`` params.
    """
    import torch

    from pipeline.device import resolve_device
    from pipeline.files import check_output_target
    from pipeline.mlflow_names import LEVEL_SLIDE, level_tags, training_tags
    from pipeline.models import create_slide_model, get_head_class
    from pipeline.run_folder import SPLIT_JSON, write_json, write_run_folder
    from pipeline.tracking import RunLogger, run_tags, stale_runs
    from pipeline.train import set_determinism

    settings.validate()
    info = get_head_class(settings.head).info()  # an unknown head fails before any data is read
    check_output_target(out_dir)
    cohort = prepare_slides(sheet, embeddings_dir, classes, settings)
    set_determinism(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    model = create_slide_model(settings.head, len(classes), cohort.bags.dim, dim=settings.dim,
                               dropout=settings.dropout, **settings.head_kwargs).to(device)
    n_parameters = sum(p.numel() for p in model.parameters())

    uri, experiment_id, parent_run_id = connect()
    stale = stale_runs(uri, experiment_id, out_dir)
    run = RunLogger.start(uri, experiment_id, f"slide-{settings.head}-seed{settings.seed}", parent_run_id,
                          tags={**training_tags(info, settings.seed, str(cohort.encoder.get("backbone"))),
                                **level_tags(LEVEL_SLIDE), **run_tags(out_dir)})
    final: dict = {}

    def fill(work: Path) -> str:
        run.supersede(stale)
        run.params(_run_params(settings, classes, cohort, n_parameters, device, config))
        run.artifact(write_json(work, SPLIT_JSON, cohort.split_ids))
        fitted = fit_slides(model, cohort, settings, device, run, progress)
        final.update(_save(work, run, model, info, classes, cohort, settings, device, fitted, n_parameters))
        run.finish()
        return run.run_id

    try:
        write_run_folder(out_dir, fill)
    except BaseException as exc:
        run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return {"run_id": run.run_id, **final}


def read_slide_model(run_dir: str | Path) -> dict:
    """``<run_dir>/slide_model.json``, checked; one GaplessError per problem."""
    path = Path(run_dir) / SLIDE_MODEL_JSON
    if not path.is_file():
        raise GaplessError(path, "missing: not a slide-level training run folder", _FIX)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GaplessError(path, f"not valid JSON ({exc})", "train the slide-level head again") from None
    if not isinstance(doc, dict) or doc.get("schema") != SLIDE_MODEL_SCHEMA:
        raise GaplessError(path, f"not a {SLIDE_MODEL_SCHEMA} document", _FIX)
    return doc


def load_slide_model(run_dir: str | Path, device=None):
    """``(model, doc)``: the trained slide-level model (eval mode, on ``device``) and its slide_model.json,
    with ``run_dir`` and ``run_id`` added."""
    from safetensors.torch import load_file

    from pipeline.device import resolve_device
    from pipeline.models import SlideModel
    from pipeline.run_folder import WEIGHTS, read_run_id

    run_dir = Path(run_dir)
    doc = read_slide_model(run_dir)
    device = resolve_device(device)
    model = SlideModel.from_config(doc["model"])
    try:
        model.load_state_dict(load_file(run_dir / WEIGHTS))
    except Exception as exc:  # missing file, foreign keys or shapes
        raise GaplessError(run_dir / WEIGHTS, f"does not load into the slide model ({exc})",
                           "train the slide-level head again") from None
    doc.update(run_dir=str(run_dir), run_id=read_run_id(run_dir))
    return model.to(device).eval(), doc
