"""Train one head × seed on tile stores and track it as an MLflow run.

The same code path for every head: the model returns a ``HeadOutput`` and the loss is NLL on
log-probabilities (saol) or cross-entropy on logits (the others) — chosen by the output, not the name.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.augment import build_transform
from pipeline.device import device_name
from pipeline.distributed import NoRun, World, current_world, mean_across, unwrap
from pipeline.errors import GaplessError
from pipeline.inference import forward, probabilities, to_device
from pipeline.metrics import classification_metrics, sample_metrics
from pipeline.mlflow_names import config_params, split_params, train_params, training_tags
from pipeline.run_folder import (
    METRICS_JSON,
    MODEL_JSON,
    SPLIT_JSON,
    WEIGHTS,
    ModelConfig,
    write_json,
    write_model_config,
    write_run_folder,
)
from pipeline.train_plots import map_grid, roc_and_confusion
from pipeline.train_settings import TrainSettings  # noqa: F401 (what a run is; imported from here too)

log = logging.getLogger("gapless.train")


def code_version() -> str:
    """The package version, plus the git commit (and ``-dirty`` with local changes) in a checkout."""
    import subprocess

    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=Path(__file__).parent,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{described.stdout.strip()}" if described.returncode == 0 and described.stdout.strip() else __version__


def loader_workers(threads: int | None, cuda: bool) -> int:
    """Data-loader processes for a job given ``threads`` cores.

    On CUDA the GPU computes, so every core but one (the main process) loads; on CPU the model
    needs the cores itself, so half of them load.
    """
    threads = threads or 1
    return max(0, threads - 1) if cuda else threads // 2


def set_determinism(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def predict(model, loader, device, autocast) -> dict:
    """Class probabilities, labels, sample indices and the images/s of inference over ``loader``."""
    import torch

    model.eval()
    probs, labels, samples = [], [], []
    n, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for x, y, s in loader:
            probs.append(probabilities(forward(model, x, device, autocast)).cpu().numpy())
            labels.append(y.numpy())
            samples.append(s.numpy())
            n += len(x)
    seconds = time.perf_counter() - t0
    return {
        "probs": np.concatenate(probs) if probs else np.zeros((0, 2)),
        "labels": np.concatenate(labels) if labels else np.zeros(0, int),
        "samples": np.concatenate(samples) if samples else np.zeros(0, int),
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
    }


def loss_fn(out, y):
    import torch.nn.functional as F

    logits = out.logits.float()  # the loss in float32, whatever the autocast dtype
    return F.nll_loss(logits, y) if out.scores_are_log_probs else F.cross_entropy(logits, y)


def micro_batch(batch_size: int, image_px: int, max_batch_pixels: int | None) -> int:
    """Images per forward pass: the whole batch, or as many as ``max_batch_pixels`` allows (at least one)."""
    if not max_batch_pixels:
        return batch_size
    return max(1, min(batch_size, max_batch_pixels // (image_px * image_px)))


def train_step(model, x, y, optimiser, autocast, grad_clip: float, micro: int | None = None):
    """One optimisation step: forward under ``autocast``, the loss in float32, backward, clip, step.

    ``micro`` < len(x): the batch goes through in chunks of ``micro`` images whose gradients add up
    (each chunk's mean loss weighted by its share of the batch), so large images fit in memory and the
    step is the whole batch's; only BatchNorm sees the smaller chunks. A DistributedDataParallel model
    synchronises its gradients on the last chunk only.
    """
    import contextlib

    import torch

    optimiser.zero_grad(set_to_none=True)
    n = len(x)
    micro = n if not micro or micro >= n else micro
    starts = range(0, n, micro)
    total = 0.0
    for i, start in enumerate(starts):
        last = i == len(starts) - 1
        quiet = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with quiet:
            with autocast():
                out = model(x[start:start + micro])
            loss = loss_fn(out, y[start:start + micro]) * (min(micro, n - start) / n)
            loss.backward()
        total = total + loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimiser.step()
    return total


# ---------------------------------------------------------------------------------------------
# A training run, step by step: the data and its checks, the loaders, the model and optimiser, the
# MLflow run, the epochs, the test, the run folder.


@dataclass
class Cohort:
    """The samples a run trains on, split, with their tiles (``table``) and each split's tiles (``parts``)."""

    samples: list
    split: object  # pipeline.splits.SplitCheck
    split_ids: dict[str, list[str]]
    table: object  # pipeline.data.TileTable
    parts: dict[str, object]


def prepare_cohort(samples, stores, classes, settings: TrainSettings, sheet_path=None) -> Cohort:
    """The cohort of ``settings.kind``, split by group and checked: a split that cannot work, a QC-flagged
    store (unless accepted), a training split without a tile of each class, an empty split: one
    ``GaplessError`` before anything is trained or tracked."""
    from pipeline import data
    from pipeline.splits import SPLIT_FIX, check_split

    cohort = [s for s in samples if s.kind == settings.kind]
    if not cohort:
        raise GaplessError(sheet_path, f"no samples of kind {settings.kind!r} to train on", "set train.kind to slide or image")
    split = check_split(cohort, settings.seed, settings.split_fractions, classes)
    if split.errors:
        raise GaplessError(sheet_path, "; ".join(split.errors), SPLIT_FIX)
    for warning in split.warnings:
        log.warning("%s", warning)
    split_ids = {name: sorted(s for s, v in split.assignment.items() if v == name) for name in ("train", "val", "test")}
    table = data.build_tile_table(cohort, stores, classes, accept_flagged=settings.accept_flagged)
    parts = {name: table.for_samples(ids) for name, ids in split_ids.items()}
    missing = [c for c, n in zip(classes, parts["train"].class_counts()) if n == 0]
    if missing:  # e.g. every positive sample's annotations touch no kept tile, or its store is empty
        raise GaplessError(sheet_path, f"the training split has no {' or '.join(repr(c) for c in missing)} tile "
                                       f"(split: {split.description})",
                           "check the QC table (results/tiles/qc.tsv) for empty stores and annotation flags; " + SPLIT_FIX)
    for name, part in parts.items():
        if len(part) == 0:
            raise GaplessError(sheet_path, f"the {name} split has no tiles", "add samples or change train.split_fractions")
    return Cohort(cohort, split, split_ids, table, parts)


@dataclass
class Loaders:
    train: object  # DeviceBatches: augmented batches on the device
    val: object
    test: object
    test_dataset: object  # the test tiles through the evaluation transform, one at a time (for the map grid)
    mean: list[float]
    std: list[float]


def make_loaders(cohort: Cohort, settings: TrainSettings, workers: int, device, world: World = World()) -> Loaders:
    """Class-balanced training batches, augmented on ``device``; validation and test through the evaluation
    transform there. The workers read and decode only. Normalisation: the training split's channel statistics.
    With several processes (``world``) each draws its own ``batch_size / world.size`` tiles per step, as many
    steps as one process would take."""
    from pipeline import data

    parts, table = cohort.parts, cohort.table
    mean, std = data.channel_normalisation(parts["train"])
    pin = device.type == "cuda"
    per_rank = settings.batch_size // world.size
    steps = settings.steps_per_epoch or len(parts["train"]) // settings.batch_size
    seed = settings.seed if not world.distributed else settings.seed * 1000 + world.rank

    def transform(is_train: bool):  # the augmentation's own stream, apart from the sampler's
        stream = [settings.seed, 1] if not world.distributed else [settings.seed, 1, world.rank]
        aug_seed = int(np.random.SeedSequence(stream).generate_state(1)[0])
        return build_transform(table.modality, is_train, mean, std, image_size=settings.image_size, seed=aug_seed)

    def batches(part, batch_size: int, is_train: bool):
        sampler = None
        if is_train:  # a fixed number of draws per process, or one pass over the tiles
            batch_size = per_rank
            draws = steps * per_rank if world.distributed or settings.steps_per_epoch else None
            sampler = data.balanced_sampler(part, seed, num_samples=draws or None)
        loader = data.make_loader(data.TileDataset(part), batch_size, workers, sampler=sampler, seed=seed,
                                  drop_last=is_train, pin_memory=pin)
        return data.DeviceBatches(loader, transform(is_train), device)

    return Loaders(
        batches(parts["train"], settings.batch_size, True),
        batches(parts["val"], settings.batch_size * 2, False),
        batches(parts["test"], settings.batch_size * 2, False),
        data.TileDataset(parts["test"], transform(False)), mean, std,
    )


def build_model(settings: TrainSettings, classes, cohort: Cohort, device):
    """The timm backbone with the head, on ``device`` (channels-last on CUDA), and its parameter count."""
    import torch

    from pipeline.models import create_model

    model = create_model(settings.backbone, settings.head, len(classes), in_chans=cohort.table.channels,
                         pretrained=settings.pretrained, backbone_kwargs=settings.backbone_kwargs,
                         **settings.head_kwargs).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, sum(p.numel() for p in model.parameters())


def make_optimiser(model, settings: TrainSettings, steps_per_epoch: int):
    """AdamW, and a linear warm-up then cosine decay over the run's steps."""
    import torch

    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    total = steps_per_epoch * settings.epochs
    warmup = round(settings.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_with_warmup(s, warmup, total))
    return optimiser, schedule


def run_params(settings: TrainSettings, classes, cohort: Cohort, n_parameters: int, device, workers: int,
               fingerprint: str, config: dict | None) -> dict:
    """What the MLflow run records as params: settings, data, split, code and, as ``config.*``, the pipeline's config."""
    parts = cohort.parts
    prior = parts["train"].class_counts() / max(1, len(parts["train"]))
    params = train_params(asdict(settings))
    params.update({"head": settings.head, "backbone": settings.backbone, "seed": settings.seed,
                   "classes": ",".join(classes), "data_fingerprint": fingerprint, "code_version": code_version(),
                   "tiles_train": len(parts["train"]), "tiles_val": len(parts["val"]), "tiles_test": len(parts["test"]),
                   "class_prior": json.dumps([round(float(p), 4) for p in prior]), "modality": cohort.table.modality,
                   "parameters": n_parameters, "device": device.type, "device_name": device_name(device),
                   "loader_workers": workers})
    params.update(split_params(cohort.split_ids))
    if config:
        params.update(config_params(config))
    return params


@dataclass
class Fit:
    best_state: dict
    best_score: float
    best_epoch: int
    train_images: int
    train_seconds: float
    train_steps: int = 0  # optimiser steps (the same on every process of a distributed run)


def fit(model, loaders: Loaders, optimiser, schedule, run, settings: TrainSettings, device, autocast,
        progress: bool = True, world: World = World()) -> Fit:
    """The epochs: train, validate, log; keep the state of the best validation AUROC after the warm-up.
    With several processes (``world``) every rank takes the training steps; rank 0 alone validates."""
    from tqdm import tqdm

    best, best_epoch, best_state, images, seconds, steps = -1.0, 0, None, 0, 0.0, 0
    for epoch in range(settings.epochs):
        model.train()
        losses = []
        bar = tqdm(loaders.train, desc=f"{settings.head} seed {settings.seed} epoch {epoch + 1}/{settings.epochs}",
                   disable=not (progress and world.main), file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        for x, y, _ in bar:
            loss = train_step(model, to_device(x, device), y.to(device, non_blocking=True), optimiser, autocast,
                              settings.grad_clip, micro_batch(len(x), x.shape[-1], settings.max_batch_pixels))
            schedule.step()
            losses.append(loss.item())
            images += len(x) * world.size
            steps += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        seconds += time.perf_counter() - t0
        train_loss = mean_across(float(np.mean(losses)), world)
        if not world.main:
            continue
        val = predict(unwrap(model), loaders.val, device, autocast)
        val_metrics = classification_metrics(val["probs"], val["labels"], "val")
        score = val_metrics.get("val_auroc", val_metrics["val_balanced_accuracy"])
        run.metrics({"train_loss": train_loss, "lr": schedule.get_last_lr()[0], **val_metrics}, step=epoch)
        log.info("%s seed %d epoch %d: loss %.4f, val AUROC %s", settings.head, settings.seed, epoch + 1,
                 train_loss, f"{val_metrics.get('val_auroc', float('nan')):.3f}")
        # a checkpoint from inside the warm-up is a barely trained model whose validation AUROC on a
        # few slides can still be high by chance: it is chosen only when no later epoch exists
        eligible = epoch + 1 > settings.warmup_epochs or epoch == settings.epochs - 1
        if eligible and score > best:
            best, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    return Fit(best_state, best, best_epoch, images, seconds, steps)


def evaluate(model, loaders: Loaders, cohort: Cohort, result: Fit, device, autocast, n_parameters: int):
    """The best state's predictions on the test split and the run's final metrics."""
    model.load_state_dict(result.best_state)
    test = predict(model, loaders.test, device, autocast)
    final = classification_metrics(test["probs"], test["labels"], "test")
    final.update(sample_metrics(test["probs"], test["samples"], _sample_labels(cohort.parts["test"])))
    final.update({"best_val_score": result.best_score, "best_epoch": result.best_epoch,
                  "train_images_per_s": result.train_images / max(result.train_seconds, 1e-9),
                  "train_steps": result.train_steps,
                  "inference_images_per_s": test["images_per_s"], "peak_memory_mb": peak_memory_mb(device),
                  "parameters": n_parameters})
    return test, final


def save_run(work: Path, run, model, settings: TrainSettings, classes, cohort: Cohort, loaders: Loaders,
             test: dict, final: dict, device, autocast) -> str:
    """Weights, model.json, metrics, plots into the run folder being made, each logged to MLflow; the run id."""
    from safetensors.torch import save_file

    table = cohort.table
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, work / WEIGHTS)
    write_model_config(work, ModelConfig(
        backbone=settings.backbone, head=settings.head, num_classes=len(classes), in_chans=table.channels,
        classes=list(classes), mean=loaders.mean, std=loaders.std, head_kwargs=settings.head_kwargs,
        backbone_kwargs=settings.backbone_kwargs, tile_size=table.tile_size, image_size=settings.image_size, modality=table.modality, mpp=table.mpp,
        head_info=head_info(settings.head).to_dict()))
    write_json(work, METRICS_JSON, final)
    for name in (WEIGHTS, MODEL_JSON, METRICS_JSON):
        run.artifact(work / name, "model" if name != METRICS_JSON else None)
    plots = roc_and_confusion(test, list(classes), work)
    plots.append(map_grid(model, test, table.modality, loaders.test_dataset, device, autocast, settings.head,
                               work / "test_maps.png"))
    for path in plots:
        run.artifact(path, "plots")
    run.finish()
    return run.run_id


def train_cohort(sheet, tiles_dir, classes, settings: "TrainSettings", out_dir, uri: str | None = None,
                 experiment_id: str | None = None, parent_run_id: str | None = None, config: dict | None = None,
                 progress: bool = True, connect=None) -> dict:
    """``train`` on the samples of a sheet whose stores are ``tiles_dir/{sample_id}.zarr``.

    Samples without a ``kind`` get it from their file; a cohort sample without a store is an error
    naming the store (tile it first). ``connect``: see :func:`train`.
    """
    from pipeline.models import get_head_class
    from pipeline.samples import load_sample_sheet, with_kinds
    from pipeline.store import find_sample_store, sample_stores

    get_head_class(settings.head)  # an unknown head fails before any data is read
    samples = with_kinds(load_sample_sheet(sheet, classes), sheet)
    stores, index = {}, sample_stores(tiles_dir)
    for s in samples:
        if s.kind != settings.kind:
            continue
        store = find_sample_store(tiles_dir, s.sample_id, index)
        if store is None:
            own = Path(tiles_dir) / f"{s.sample_id}.zarr"
            raise GaplessError(own, f"no tile store for sample {s.sample_id} (nor a batch store listing it)",
                               f"tile it first: gapless tile {s.path} --out {own}")
        stores[s.sample_id] = store
    return train(samples, stores, classes, settings, out_dir, uri, experiment_id, parent_run_id,
                 sheet_path=sheet, progress=progress, config=config, connect=connect)


def train(samples, stores, classes, settings: TrainSettings, out_dir, uri: str | None = None,
          experiment_id: str | None = None, parent_run_id: str | None = None, sheet_path=None, progress: bool = True,
          config: dict | None = None, connect=None) -> dict:
    """Train ``settings.head`` on the tiles of ``samples`` (kind ``settings.kind``); return final metrics.

    ``stores``: sample_id → tile store path. Writes the run folder ``out_dir`` (:mod:`pipeline.run_folder`:
    weights, model.json, metrics.json, split.json, run_id.txt, plots) and logs the same to a child run of
    ``parent_run_id``; ``config`` (the pipeline's resolved config) is logged as ``config.*`` params beside
    the run's own settings. The files are made in ``<out_dir>.partial`` and moved into ``out_dir`` only
    when the run has finished, so a failed or interrupted run leaves none of them behind. ``connect``:
    instead of ``uri``, ``experiment_id`` and ``parent_run_id``, a function returning them, called once
    the data has passed its checks (split, QC flags, tiles per class), so bad input touches no tracking store.
    """
    import torch

    from pipeline import data
    from pipeline.device import autocast_for, resolve_device
    from pipeline.files import check_output_target
    from pipeline.tracking import RunLogger, run_tags, stale_runs

    from pipeline import distributed

    check_output_target(out_dir)  # a name of its own, not a folder above it: only <out_dir>.partial is ever removed
    set_determinism(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    world = current_world()
    if world.distributed:  # started by torchrun (gapless train --devices N): one process per device
        device = distributed.init(world, device.type)
    workers = settings.workers if settings.workers is not None else loader_workers(settings.threads, device.type == "cuda")
    cohort = prepare_cohort(samples, stores, classes, settings, sheet_path)
    loaders = make_loaders(cohort, settings, workers, device, world)
    model, n_parameters = build_model(settings, classes, cohort, device)
    model = distributed.wrap(model, world, device)
    autocast = autocast_for(device)
    optimiser, schedule = make_optimiser(model, settings, len(loaders.train))
    if not world.main:  # the training steps only: rank 0 validates, tests, writes the folder and the one MLflow run
        try:
            fit(model, loaders, optimiser, schedule, NoRun(), settings, device, autocast, False, world)
            distributed.barrier(world)
        finally:
            distributed.finish(world)
        return {}

    if connect is not None:
        uri, experiment_id, parent_run_id = connect()
    stale = stale_runs(uri, experiment_id, out_dir)  # refuses while another training writes to out_dir
    run = RunLogger.start(uri, experiment_id, f"{settings.head}-seed{settings.seed}", parent_run_id,
                          tags={**training_tags(head_info(settings.head), settings.seed, settings.backbone),
                                **run_tags(out_dir)})
    final: dict = {}

    def fill(work: Path) -> str:
        run.supersede(stale)  # KILLED, with an end time: one finished run per folder in the MLflow UI
        fingerprint = data.data_fingerprint(sheet_path, [stores[s] for s in cohort.table.sample_ids])
        run.params(run_params(settings, classes, cohort, n_parameters, device, workers, fingerprint, config))
        run.artifact(write_json(work, SPLIT_JSON, cohort.split_ids))
        result = fit(model, loaders, optimiser, schedule, run, settings, device, autocast, progress, world)
        core = unwrap(model)
        test, metrics = evaluate(core, loaders, cohort, result, device, autocast, n_parameters)
        run.metrics(metrics, step=settings.epochs)
        final.update(metrics)
        return save_run(work, run, core, settings, classes, cohort, loaders, test, metrics, device, autocast)

    try:
        write_run_folder(out_dir, fill)
        distributed.barrier(world)
    except BaseException as exc:  # Ctrl-C and SIGTERM (raised as KeyboardInterrupt by the CLI): KILLED
        run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        distributed.finish(world)
    return {"run_id": run.run_id, **final}


def head_info(name: str):
    """The ``HeadInfo`` of the registered head ``name``."""
    from pipeline.models import get_head_class

    return get_head_class(name).info()


def _sample_labels(table) -> np.ndarray:
    """(len(table.sample_ids),) label of each store's sample, indexed like ``TileDataset``'s sample index."""
    labels = np.full(len(table.sample_ids), -1, dtype=np.int64)
    labels[table.store_index] = table.sample_label
    return labels
