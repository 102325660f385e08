"""Train one head × seed on tile stores and track it as an MLflow run.

The same code path for every head: the model returns a ``HeadOutput`` and the loss is NLL on
log-probabilities (saol) or cross-entropy on logits (the others) — chosen by the output, not the name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.errors import GaplessError

log = logging.getLogger("gapless.train")


@dataclass
class TrainSettings:
    """What a training run is: model, optimisation and data choices (units: epochs, px, samples)."""

    backbone: str = "resnet10t"
    head: str = "gap"
    seed: int = 0
    pretrained: bool | str = False
    kind: str = "slide"  # which samples form the cohort: slide | image (different channels)
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    image_size: int | None = None
    steps_per_epoch: int | None = None  # None: one pass over the training tiles
    split_fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
    threads: int | None = None  # CPU threads for torch; None: torch's default
    device: str = "auto"  # auto (CUDA when present) | cuda | cpu
    workers: int | None = None  # data-loader processes; None: from ``threads`` (see loader_workers)
    head_kwargs: dict = field(default_factory=dict)
    accept_flagged: bool = False  # train on stores that QC flagged (e.g. annotations off the tissue)

    def validate(self) -> "TrainSettings":
        """``self`` when every value is usable; one ``GaplessError`` naming each bad one otherwise."""
        problems = []

        def need(ok: bool, flag: str, value, rule: str) -> None:
            if not ok:
                problems.append(f"--{flag} must be {rule}, got {value!r}")

        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "a whole number of 1 or more")
        need(isinstance(self.batch_size, int) and self.batch_size >= 2, "batch-size", self.batch_size,
             "a whole number of 2 or more (batch norm needs two)")
        need(finite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        need(finite(self.weight_decay) and self.weight_decay >= 0, "weight-decay", self.weight_decay, "0 or more")
        need(finite(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup-epochs", self.warmup_epochs, "0 or more")
        need(finite(self.grad_clip) and self.grad_clip > 0, "grad-clip", self.grad_clip, "a positive number")
        need(self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 16), "image-size",
             self.image_size, "at least 16 px")
        need(self.steps_per_epoch is None or (isinstance(self.steps_per_epoch, int) and self.steps_per_epoch >= 1),
             "steps-per-epoch", self.steps_per_epoch, "1 or more")
        need(self.device in ("auto", "cuda", "cpu"), "device", self.device, "auto, cuda or cpu")
        need(self.kind in ("slide", "image"), "kind", self.kind, "slide or image")
        fractions = list(self.split_fractions)
        need(len(fractions) == 3 and all(finite(f) and f >= 0 for f in fractions) and sum(fractions) > 0, "split",
             fractions, "three numbers of 0 or more for train, val and test, not all 0")
        need(isinstance(self.head_kwargs, dict), "head-kwargs", self.head_kwargs, "a JSON object")
        if problems:
            raise GaplessError(None, "; ".join(problems), "fix the value (in the workflow: the `train` section of the config)")
        return self


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


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE over ``bins`` equal-width confidence bins (top-class confidence vs accuracy)."""
    conf = probs.max(1)
    pred = probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
    """AUROC (positive = last class; macro one-vs-rest for K > 2), accuracy, balanced accuracy, F1, ECE."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    out = {}
    if len(np.unique(labels)) > 1:
        if probs.shape[1] == 2:
            out[f"{prefix}_auroc"] = float(roc_auc_score(labels, probs[:, 1]))
        else:
            out[f"{prefix}_auroc"] = float(roc_auc_score(labels, probs, multi_class="ovr"))
    pred = probs.argmax(1)
    out[f"{prefix}_accuracy"] = float(accuracy_score(labels, pred))
    out[f"{prefix}_balanced_accuracy"] = float(balanced_accuracy_score(labels, pred))
    out[f"{prefix}_f1"] = float(f1_score(labels, pred, average="binary" if probs.shape[1] == 2 else "macro", zero_division=0))
    out[f"{prefix}_ece"] = expected_calibration_error(probs, labels)
    return out


def sample_metrics(probs: np.ndarray, sample_index: np.ndarray, sample_labels: np.ndarray) -> dict:
    """Sample-level AUROC from tile probabilities of the last class, aggregated by mean and by max.

    ``sample_index`` (N,) gives each tile's sample; ``sample_labels[i]`` is sample i's label.
    """
    from sklearn.metrics import roc_auc_score

    ids = np.unique(sample_index)
    labels = sample_labels[ids]
    out = {"test_samples": int(len(ids))}
    if len(np.unique(labels)) < 2:
        return out
    for name, agg in (("mean", np.mean), ("max", np.max)):
        scores = np.array([agg(probs[sample_index == i, -1]) for i in ids])
        out[f"test_sample_auroc_{name}"] = float(roc_auc_score(labels, scores))
    return out


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
    with torch.no_grad(), autocast():
        for x, y, s in loader:
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.to(memory_format=torch.channels_last)
            out = model(x)
            logits = out.logits.float()
            p = logits.exp() if out.scores_are_log_probs else logits.softmax(1)
            probs.append(p.cpu().numpy())
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


def train_step(model, x, y, optimiser, autocast, grad_clip: float):
    """One optimisation step: forward under ``autocast``, the loss in float32, backward, clip, step."""
    import torch

    with autocast():
        out = model(x)
    loss = loss_fn(out, y)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimiser.step()
    return loss


def _plots(test: dict, classes: list[str], out: Path) -> list[Path]:
    """ROC curve and confusion matrix of the test split, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    paths = []
    probs, labels = test["probs"], test["labels"]
    if len(np.unique(labels)) > 1 and probs.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        RocCurveDisplay.from_predictions(labels, probs[:, 1], ax=ax, name="tiles")
        ax.set_title("test ROC (tile level)")
        paths.append(out / "roc.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay.from_predictions(labels, probs.argmax(1), labels=list(range(len(classes))),
                                            display_labels=classes, ax=ax, colorbar=False)
    ax.set_title("test confusion (tile level)")
    paths.append(out / "confusion.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def train_cohort(sheet, tiles_dir, classes, settings: "TrainSettings", out_dir, uri: str | None = None,
                 experiment_id: str | None = None, parent_run_id: str | None = None, config: dict | None = None,
                 progress: bool = True, connect=None) -> dict:
    """``train`` on the samples of a sheet whose stores are ``tiles_dir/{sample_id}.zarr``.

    Samples without a ``kind`` get it from their file; a cohort sample without a store is an error
    naming the store (tile it first). ``connect``: see :func:`train`.
    """
    from pipeline.models import get_head_class
    from pipeline.samples import load_sample_sheet, with_kinds

    get_head_class(settings.head)  # an unknown head fails before any data is read
    samples = with_kinds(load_sample_sheet(sheet, classes), sheet)
    stores = {}
    for s in samples:
        if s.kind != settings.kind:
            continue
        store = Path(tiles_dir) / f"{s.sample_id}.zarr"
        if not store.is_dir():
            raise GaplessError(store, f"no tile store for sample {s.sample_id}", f"tile it first: gapless tile {s.path} --out {store}")
        stores[s.sample_id] = store
    return train(samples, stores, classes, settings, out_dir, uri, experiment_id, parent_run_id,
                 sheet_path=sheet, progress=progress, config=config, connect=connect)


def train(samples, stores, classes, settings: TrainSettings, out_dir, uri: str | None = None,
          experiment_id: str | None = None, parent_run_id: str | None = None, sheet_path=None, progress: bool = True,
          config: dict | None = None, connect=None) -> dict:
    """Train ``settings.head`` on the tiles of ``samples`` (kind ``settings.kind``); return final metrics.

    ``stores``: sample_id → tile store path. Writes ``out_dir/weights.safetensors``, ``model.json``,
    ``metrics.json``, ``split.json``, ``run_id.txt`` and the plots (``roc.png``, ``confusion.png``,
    ``test_maps.png``), and logs the same to a child run of ``parent_run_id``; ``config`` (the
    pipeline's resolved config) is logged as ``config.*`` params beside the run's own settings.
    The files are made in ``<out_dir>.partial`` and moved into ``out_dir`` only when the run has
    finished, so a failed or interrupted run leaves none of them behind. ``connect``: instead of
    ``uri``, ``experiment_id`` and ``parent_run_id``, a function returning them, called once the
    data has passed its checks (split, QC flags, tiles per class), so bad input touches no tracking store.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from pipeline import data
    from pipeline.device import autocast_for, resolve_device
    from pipeline.models import create_model
    from pipeline.splits import SPLIT_FIX, check_split
    from pipeline.files import check_output_target
    from pipeline.tracking import RunLogger, flatten, run_tags, stale_runs

    check_output_target(out_dir)  # a name of its own, not a folder above it: only <out_dir>.partial is ever removed
    set_determinism(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    cuda = device.type == "cuda"
    workers = settings.workers if settings.workers is not None else loader_workers(settings.threads, cuda)
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
    mean, std = data.channel_normalisation(parts["train"])
    size = settings.image_size
    make = lambda part, is_train: data.TileDataset(part, data.build_transforms(  # noqa: E731
        table.modality, is_train, mean, std, image_size=size, tile_size=table.tile_size))
    sampler = data.balanced_sampler(parts["train"], settings.seed,
                                    num_samples=(settings.steps_per_epoch or 0) * settings.batch_size or None)
    train_loader = data.make_loader(make(parts["train"], True), settings.batch_size, workers,
                                    sampler=sampler, seed=settings.seed, drop_last=True)
    val_loader = data.make_loader(make(parts["val"], False), settings.batch_size * 2, workers)
    test_loader = data.make_loader(make(parts["test"], False), settings.batch_size * 2, workers)

    prior = (parts["train"].class_counts() / max(1, len(parts["train"]))).tolist()
    model = create_model(settings.backbone, settings.head, len(classes), in_chans=table.channels,
                         pretrained=settings.pretrained, **settings.head_kwargs).to(device)
    n_parameters = sum(p.numel() for p in model.parameters())
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    autocast = autocast_for(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = len(train_loader)
    total = steps * settings.epochs
    warmup = round(settings.warmup_epochs * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: cosine_with_warmup(s, warmup, total))

    if connect is not None:
        uri, experiment_id, parent_run_id = connect()
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    stale = stale_runs(uri, experiment_id, out_dir)  # refuses while another training writes to out_dir
    shutil.rmtree(work, ignore_errors=True)  # left by a run that was killed
    run = RunLogger.start(uri, experiment_id, f"{settings.head}-seed{settings.seed}", parent_run_id,
                          tags={"head": settings.head, "seed": str(settings.seed), "backbone": settings.backbone,
                                **run_tags(out_dir)})
    try:
        run.supersede(stale)  # KILLED, with an end time: one finished run per folder in the MLflow UI
        work.mkdir(parents=True)
        fingerprint = data.data_fingerprint(sheet_path, [stores[s] for s in table.sample_ids])
        params = {f"train.{k}": v for k, v in asdict(settings).items()}
        params.update({"head": settings.head, "backbone": settings.backbone, "seed": settings.seed,
                       "classes": ",".join(classes), "data_fingerprint": fingerprint, "code_version": code_version(),
                       "tiles_train": len(parts["train"]), "tiles_val": len(parts["val"]), "tiles_test": len(parts["test"]),
                       "class_prior": json.dumps([round(p, 4) for p in prior]), "modality": table.modality,
                       "parameters": n_parameters, "device": _device_name(device), "loader_workers": workers})
        params.update({f"split.{name}": ",".join(ids) for name, ids in split_ids.items()})
        if config:
            params.update(flatten(config, "config."))
        run.params(params)
        (work / "split.json").write_text(json.dumps(split_ids, indent=2))
        run.artifact(work / "split.json")
        best, best_epoch, best_state, train_images, train_seconds = -1.0, 0, None, 0, 0.0
        for epoch in range(settings.epochs):
            model.train()
            losses = []
            bar = tqdm(train_loader, desc=f"{settings.head} seed {settings.seed} epoch {epoch + 1}/{settings.epochs}",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            t0 = time.perf_counter()
            for x, y, _ in bar:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cuda:
                    x = x.to(memory_format=torch.channels_last)
                loss = train_step(model, x, y, optimiser, autocast, settings.grad_clip)
                schedule.step()
                losses.append(loss.item())
                train_images += len(x)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            train_seconds += time.perf_counter() - t0
            val = predict(model, val_loader, device, autocast)
            val_metrics = classification_metrics(val["probs"], val["labels"], "val")
            score = val_metrics.get("val_auroc", val_metrics["val_balanced_accuracy"])
            run.metrics({"train_loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0], **val_metrics}, step=epoch)
            log.info("%s seed %d epoch %d: loss %.4f, val AUROC %s", settings.head, settings.seed, epoch + 1,
                     np.mean(losses), f"{val_metrics.get('val_auroc', float('nan')):.3f}")
            # a checkpoint from inside the warm-up is a barely trained model whose validation AUROC on a
            # few slides can still be high by chance: it is chosen only when no later epoch exists
            eligible = epoch + 1 > settings.warmup_epochs or epoch == settings.epochs - 1
            if eligible and score > best:
                best, best_epoch = score, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        test = predict(model, test_loader, device, autocast)
        final = classification_metrics(test["probs"], test["labels"], "test")
        final.update(sample_metrics(test["probs"], test["samples"], _sample_labels(parts["test"])))
        final.update({"best_val_score": best, "best_epoch": best_epoch, "train_images_per_s": train_images / max(train_seconds, 1e-9),
                      "inference_images_per_s": test["images_per_s"], "peak_memory_mb": peak_memory_mb(device),
                      "parameters": n_parameters})
        run.metrics(final, step=settings.epochs)

        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, work / "weights.safetensors")
        model_config = {"backbone": settings.backbone, "head": settings.head, "num_classes": len(classes),
                        "in_chans": table.channels, "classes": classes, "head_kwargs": settings.head_kwargs,
                        "mean": mean, "std": std, "tile_size": table.tile_size, "image_size": size,
                        "modality": table.modality, "mpp": table.mpp}
        (work / "model.json").write_text(json.dumps(model_config, indent=2))
        (work / "metrics.json").write_text(json.dumps(final, indent=2))
        for path in [work / "weights.safetensors", work / "model.json", work / "metrics.json"]:
            run.artifact(path, "model" if path.name != "metrics.json" else None)
        plots = _plots(test, list(classes), work)
        plots.append(_test_map_grid(model, test, table.modality, make(parts["test"], False), device,
                                    autocast, settings, work / "test_maps.png"))
        for path in plots:
            run.artifact(path, "plots")
        (work / "run_id.txt").write_text(run.run_id + "\n")
        run.finish()
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in work.iterdir():  # into place only now: run_id.txt last, it marks a finished run
            if path.name != "run_id.txt":
                os.replace(path, out_dir / path.name)
        os.replace(work / "run_id.txt", out_dir / "run_id.txt")
    except BaseException as exc:  # Ctrl-C and SIGTERM (raised as KeyboardInterrupt by the CLI): KILLED
        run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"run_id": run.run_id, **final}


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _test_map_grid(model, test: dict, modality: str, dataset, device, autocast, settings, path: Path,
                   per_class: int = 6) -> Path:
    """A PNG grid of test tiles, each beside its positive-class contribution map overlaid.

    The tiles shown: the ``per_class`` most confident of each true class (by the positive
    probability), so a reader sees what the head scores highest among positives and lowest among
    negatives; each map is stretched over its own tile (the scale is per tile, as the caption says).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from pipeline.tissue import resize, to_display_rgb

    labels, positive = test["labels"], test["probs"][:, -1]
    rows = []
    for cls in np.unique(labels)[::-1]:
        idx = np.flatnonzero(labels == cls)
        rows.extend(idx[np.argsort(-positive[idx] if cls > 0 else positive[idx])[:per_class]].tolist())
    model.eval()
    with torch.no_grad(), autocast():
        x = torch.stack([dataset[i][0] for i in rows]).to(device)
        maps = model(x).contribution[:, -1].float().cpu().numpy()
    cols = 4  # two tiles per row of the figure, each as (tile, tile + map)
    n_rows = math.ceil(len(rows) / (cols // 2))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.8, n_rows * 1.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, i in enumerate(rows):
        tile = to_display_rgb(dataset.read_tile(i), modality)
        m = maps[k]
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        # nearest: each feature-grid cell shown as the block of the tile it covers
        big = resize(m.astype(np.float32)[..., None], tile.shape[:2][::-1], Image.Resampling.NEAREST)[..., 0]
        a, b = axes.ravel()[2 * k], axes.ravel()[2 * k + 1]
        a.imshow(tile)
        a.set_title(f"label {labels[i]}, p={positive[i]:.2f}", fontsize=7)
        b.imshow(tile)
        b.imshow(big, cmap="inferno", alpha=0.5, vmin=0, vmax=1)
        b.set_title("contribution", fontsize=7)
    fig.suptitle(f"{settings.head}: test tiles, positive-class map (per-tile scale)", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _sample_labels(table) -> np.ndarray:
    """(len(table.sample_ids),) label of each store's sample, indexed like ``TileDataset``'s sample index."""
    labels = np.full(len(table.sample_ids), -1, dtype=np.int64)
    labels[table.store_index] = table.sample_label
    return labels
