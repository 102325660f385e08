"""``gapless bench heads``: training and inference speed of every head on one backbone, and the loader.

Each head is timed the way ``pipeline.train`` runs it on the device: CUDA → bf16 autocast and
channels_last; anything else → float32. One timed training step is ``train.train_step``: forward + ``train.loss_fn`` +
backward + gradient clipping + AdamW step on one fixed random batch, after untimed warm-up steps; the
figure is the median over the timed steps. Deterministic algorithms are switched on for the run (as
``train.set_determinism`` does) and restored afterwards.

With a tile store the training loader is built as ``pipeline.train`` builds it (tile table,
balanced sampler, ``make_loader``: workers that read and decode) and timed alone, without the model;
its images/s against each head's training images/s is the margin: above 1 the loader can keep that
head fed. The training augmentation (normalisation from the store's channel statistics), which runs
on the training device, is timed there on the same batches and reported beside it. The parts are
measured one after the other, so on a machine where the loader's workers and the model share the
CPU cores the margin is an upper bound.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.device import autocast_for, device_name, resolve_device
from pipeline.inference import forward, to_device
from pipeline.errors import GaplessError

__all__ = ["bench_heads"]

_CLASSES = ["negative", "positive"]


def bench_heads(backbone="resnet50", image_size=224, batch_size=64, heads=None, steps=10, warmup=3,
                device=None, channels=3, store=None, loader_workers=None, loader_batches=20,
                print_fn=print) -> dict:
    """Time training steps and inference of each head on ``backbone``; with ``store``, time the loader too.

    heads: head names (default every registered head); the baseline head (``gap``) is always measured, first, as the
    reference of the time ratio. device: torch device or its name (default CUDA when available,
    else CPU). channels: input channels, replaced by the store's when a store is given. store: a tile
    store path (``*.zarr``) or a list of them. loader_workers: DataLoader workers (default
    ``os.cpu_count()``). loader_batches: batches timed after the first one (worker start-up excluded).

    Returns a dict: the settings (``backbone``, ``image_size``, ``batch_size``, ``device``,
    ``device_name``, ``dtype``, ``channels_last``, ``channels``, ``steps``, ``warmup``), ``load_average`` and
    ``load_average_after`` (1-minute load averages around the run, to judge the figures), ``memory``
    (what ``peak_memory_mb`` measures), ``loader`` (None without a store, else a dict with
    ``images_per_s``, the workers' reading and decoding, and ``augment_images_per_s``, the training
    augmentation on the device) and ``rows``, one dict per head: ``head``, ``ms_per_batch``,
    ``train_images_per_s``, ``ratio_to_baseline`` (time per batch / the baseline's), ``inference_images_per_s``,
    ``parameters``, ``peak_memory_mb`` (None where not measured) and ``loader_margin`` (loader
    images/s / training images/s; None without a store).
    """
    import torch

    from pipeline.models.heads import HEADS, get_head_class, head_catalog

    names = list(HEADS) if heads is None else ([heads] if isinstance(heads, str) else list(heads))
    for name in names:
        get_head_class(name)  # GaplessError naming the choices
    baseline = next(info.name for info in head_catalog().values() if info.baseline)
    names = [baseline, *dict.fromkeys(n for n in names if n != baseline)]
    _check_settings(backbone, image_size, batch_size, steps, warmup, channels, loader_batches, loader_workers)
    stores = _store_list(store)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cuda = dev.type == "cuda"
    memory, measure_peak = _memory_kind(dev)

    load_before = _load_average()
    loader, requested_channels = None, channels
    if stores:
        workers = (os.cpu_count() or 1) if loader_workers is None else int(loader_workers)
        loader = _bench_loader(stores, image_size, batch_size, workers, loader_batches, dev)
        channels = loader["channels"]  # the model takes what the store holds

    result = {
        "backbone": backbone, "image_size": image_size, "batch_size": batch_size, "device": str(dev),
        "device_name": device_name(dev), "dtype": "bfloat16 autocast" if cuda else "float32",
        "channels_last": cuda, "channels": channels, "steps": steps, "warmup": warmup,
        "memory": memory, "loader": loader, "rows": [],
    }
    _print_header(result, requested_channels, baseline, print_fn)
    result["rows"] = _measure_heads(names, result, measure_peak, print_fn)
    print_fn(f"peak MB: {result['memory']}")
    # 1-minute load averages: before the run (the others' load) and after it, less our own torch threads
    cores, load_after = os.cpu_count() or 1, _load_average()
    result["load_average"] = load_before
    result["load_average_after"] = load_after
    others = max(load_before, load_after - torch.get_num_threads())
    if others >= max(1.0, cores / 2):
        print_fn(f"warning: load average {load_before:.1f} before and {load_after:.1f} after the run on {cores} cores: "
                 "other processes competed for the CPU, so these times are unreliable")
    if loader is not None:
        print_fn("loader/model > 1: the loader keeps up with that head (measured apart; cores shared in training lower it)")
    return result


def _print_header(result: dict, requested_channels: int, baseline: str, print_fn) -> None:
    loader, channels, image_size = result["loader"], result["channels"], result["image_size"]
    print_fn(
        f"bench heads: {result['backbone']}, {image_size} px, batch {result['batch_size']}, {channels} channel(s)"
        f"{f' (the store holds {channels}, not {requested_channels})' if channels != requested_channels else ''}, "
        f"{result['device_name']}, {result['dtype']}{' + channels_last' if result['channels_last'] else ''}, "
        f"median of {result['steps']} step(s) after {result['warmup']} warm-up"
    )
    if loader is not None:
        print_fn(
            f"loader: {loader['tiles']} tiles from {len(loader['stores'])} store(s) ({loader['modality']}, "
            f"{loader['tile_size']} px tiles → {image_size} px), {loader['workers']} worker(s), "
            f"{loader['batches']} batches after the first: {loader['images_per_s']:.1f} images/s (read and decode); "
            f"augmentation on {result['device']}: {loader['augment_images_per_s']:.1f} images/s"
        )
    header = (f"{'head':<9} {'ms/batch':>9} {'train img/s':>12} {'time/' + baseline:>9} {'infer img/s':>12} "
              f"{'params':>9} {'peak MB':>8}")
    print_fn(header + (f" {'loader/model':>13}" if loader is not None else ""))


def _measure_heads(names: list[str], result: dict, measure_peak: bool, print_fn) -> list[dict]:
    """One row per head (the baseline first), each printed as it is measured; determinism as in training."""
    import torch

    loader, dev, rows = result["loader"], torch.device(result["device"]), []
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as train.set_determinism
    try:
        with warnings.catch_warnings():
            # warn_only: ops without a deterministic kernel (and cuBLAS without its workspace setting) warn per call
            warnings.filterwarnings("ignore", message=".*determinis.*")
            for name in names:
                row = _bench_one(result["backbone"], name, dev, result["channels"], result["image_size"],
                                 result["batch_size"], result["steps"], result["warmup"], measure_peak)
                baseline_ms = rows[0]["ms_per_batch"] if rows else row["ms_per_batch"]  # the baseline comes first
                row["ratio_to_baseline"] = row["ms_per_batch"] / baseline_ms
                row["loader_margin"] = loader["images_per_s"] / row["train_images_per_s"] if loader is not None else None
                rows.append(row)
                peak = f"{row['peak_memory_mb']:.0f}" if row["peak_memory_mb"] is not None else "n/a"
                line = (f"{name:<9} {row['ms_per_batch']:>9.1f} {row['train_images_per_s']:>12.1f} "
                        f"{row['ratio_to_baseline']:>8.2f}x {row['inference_images_per_s']:>12.1f} "
                        f"{row['parameters'] / 1e6:>8.2f}M {peak:>8}")
                print_fn(line + (f" {row['loader_margin']:>12.2f}x" if loader is not None else ""))
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    return rows


# ---------------------------------------------------------------------------------------------
# Checks


def _check_settings(backbone, image_size, batch_size, steps, warmup, channels, loader_batches, loader_workers) -> None:
    import timm

    if not timm.is_model(backbone):
        raise GaplessError(None, f"unknown timm backbone {backbone!r}", "pick a name from timm.list_models()")
    for name, value, least in (("image_size", image_size, 32), ("batch_size", batch_size, 1), ("steps", steps, 1),
                               ("warmup", warmup, 0), ("channels", channels, 1), ("loader_batches", loader_batches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise GaplessError(None, f"{name} must be an integer of at least {least}, got {value!r}", f"set {name} to {least} or more")
    if loader_workers is not None and (isinstance(loader_workers, bool) or not isinstance(loader_workers, int) or loader_workers < 0):
        raise GaplessError(None, f"loader_workers must be 0 or more, got {loader_workers!r}", "e.g. the number of CPU cores")


def _store_list(store) -> list[Path]:
    """The store(s) as paths; ``data.build_tile_table`` (in ``_bench_loader``) opens and checks each one."""
    if store is None:
        return []
    paths = [Path(store)] if isinstance(store, (str, os.PathLike)) else [Path(s) for s in store]
    if not paths:
        raise GaplessError(None, "an empty list of tile stores", "pass one or more *.zarr stores, or none")
    return paths


# ---------------------------------------------------------------------------------------------
# The loader


def _bench_loader(stores: Sequence[Path], image_size: int, batch_size: int, workers: int, batches: int, dev) -> dict:
    """Images/s of the training loader over ``batches`` batches after the first one, and of the training
    augmentation on ``dev`` over (up to 5 of) the same batches."""
    from pipeline import data
    from pipeline.augment import build_transform
    from pipeline.samples import Sample

    # Only tile labels matter to the sampler: annotated tiles keep theirs, the others count as negative.
    samples = [Sample(f"{k:03d}-{p.stem}", p, _CLASSES[0]) for k, p in enumerate(stores)]
    table = data.build_tile_table(samples, {s.sample_id: s.path for s in samples}, _CLASSES)
    sampler = data.balanced_sampler(table, seed=0, num_samples=(batches + 1) * batch_size)
    loader = data.make_loader(data.TileDataset(table), batch_size, workers, sampler=sampler, seed=0, drop_last=True,
                              pin_memory=dev.type == "cuda")
    kept = []
    it = iter(loader)
    try:
        next(it)  # worker start-up and the first batch are not timed
        n, t0 = 0, time.perf_counter()
        for x, _, _ in it:
            n += len(x)
            if len(kept) < 5:
                kept.append(x)
        seconds = time.perf_counter() - t0
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # persistent workers: stop them before the models run
        if shutdown is not None:
            shutdown()
        del it, loader
        gc.collect()
    transform = build_transform(table.modality, True, *data.channel_normalisation(table), image_size=image_size)
    on_device = [x.to(dev) for x in kept]  # the copy is not timed: training overlaps it with the model's work
    augment_s = _median_seconds(lambda: [transform(x) for x in on_device], 3, 1, dev.type == "cuda")
    augmented = sum(len(x) for x in on_device)
    return {
        "stores": [str(p) for p in stores], "tiles": len(table), "modality": table.modality,
        "channels": table.channels, "tile_size": table.tile_size, "dtype": table.dtype.name, "workers": workers,
        "batches": batches, "images": n, "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "augment_images_per_s": augmented / augment_s if augment_s > 0 else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# One head


def _bench_one(backbone: str, head: str, dev, channels: int, image_size: int, batch_size: int, steps: int,
               warmup: int, measure_peak: bool) -> dict:
    import torch

    from pipeline.models import create_model
    from pipeline.train import TrainSettings, peak_memory_mb, train_step

    cuda = dev.type == "cuda"
    defaults = TrainSettings()
    _free(dev)
    if measure_peak:
        _reset_peak(dev)
    torch.manual_seed(0)
    model = create_model(backbone, head, num_classes=len(_CLASSES), in_chans=channels, pretrained=False).to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=defaults.lr, weight_decay=defaults.weight_decay)
    autocast = autocast_for(dev)
    generator = torch.Generator().manual_seed(0)
    x = to_device(torch.randn(batch_size, channels, image_size, image_size, generator=generator), dev)
    y = torch.randint(0, len(_CLASSES), (batch_size,), generator=generator).to(dev)

    def step():
        train_step(model, x, y, optimiser, autocast, defaults.grad_clip)

    def infer_step():
        with torch.no_grad():
            forward(model, x, dev, autocast)

    model.train()
    train_s = _median_seconds(step, steps, warmup, cuda)
    peak = (peak_memory_mb(dev) if cuda else _vm_hwm_mb()) if measure_peak else None  # the CUDA figure as training logs it
    model.eval()
    infer_s = _median_seconds(infer_step, steps, warmup, cuda)
    row = {
        "head": head, "ms_per_batch": train_s * 1e3, "train_images_per_s": batch_size / train_s,
        "inference_ms_per_batch": infer_s * 1e3, "inference_images_per_s": batch_size / infer_s,
        "parameters": sum(p.numel() for p in model.parameters()), "peak_memory_mb": peak,
    }
    model = optimiser = x = y = None  # free them before the next head (the closures hold the cells)
    _free(dev)
    return row


def _median_seconds(step: Callable[[], None], steps: int, warmup: int, cuda: bool) -> float:
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Device name and memory


def _load_average() -> float:
    """The 1-minute load average (0 where the OS has none): above the core count, someone else is busy too."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _rss_peak_resettable() -> bool:
    """Linux ≥ 4.0: writing 5 to /proc/self/clear_refs resets the RSS high-water mark (VmHWM)."""
    try:
        _CLEAR_REFS.write_text("5")
        return _vm_hwm_mb() is not None
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return None


def _memory_kind(dev) -> tuple[str, bool]:
    """What ``peak_memory_mb`` means on ``dev``, and whether it is measured there at all."""
    if dev.type == "cuda":
        return "torch.cuda.max_memory_allocated over the training steps (model, AdamW state, activations)", True
    if dev.type == "cpu" and _rss_peak_resettable():
        return ("this process's RSS high-water mark (VmHWM, reset before each head) over the training steps; "
                "it includes the Python process and its libraries, not only the model"), True
    return "n/a (no per-head peak-memory counter on this device)", False


def _reset_peak(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    elif dev.type == "cpu":
        with contextlib.suppress(OSError):
            _CLEAR_REFS.write_text("5")


def _free(dev) -> None:
    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
