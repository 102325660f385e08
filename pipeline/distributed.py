"""One model on several GPUs (``train.devices: N``): DistributedDataParallel, one process per device.

``gapless train --devices N`` starts itself again under ``torchrun --standalone --nproc-per-node N`` (one
job, one node); each process trains on its share of every batch (``batch_size / N`` tiles, drawn by its
own class-balanced sampler), gradients are averaged across processes at every step, so the run takes
the same optimiser steps on the same global batch size as on one device. Rank 0 alone validates, tests,
writes the run folder and logs to MLflow: one run, not N. On CUDA the backend is NCCL, one GPU per
process (``LOCAL_RANK``); on the CPU it is gloo (how the tests run it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from pipeline.errors import GaplessError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """From torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def relaunch_under_torchrun(devices: int) -> int | None:
    """In a plain process asked for ``devices`` > 1: run this same command under torchrun, one process per
    device, and return its exit status; None when there is nothing to do (one device, or already a rank)."""
    if devices <= 1 or "WORLD_SIZE" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
               "-m", "pipeline", *sys.argv[1:]]
    return subprocess.call(command)


def init(world: World, device_type: str):
    """Join the process group (NCCL on CUDA, gloo on the CPU); the torch device of this rank."""
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        if torch.cuda.device_count() < world.size:
            raise GaplessError(None, f"train.devices is {world.size} but this job sees {torch.cuda.device_count()} GPU(s)",
                               "ask the scheduler for as many GPUs (the profile's train gpu) or lower train.devices")
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return device


def wrap(model, world: World, device):
    """``model`` in DistributedDataParallel when there are several processes; as it is otherwise."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (its state dict has no ``module.`` prefix)."""
    return getattr(model, "module", model)


def mean_across(value: float, world: World) -> float:
    """The mean of ``value`` over the processes (every rank must call it)."""
    if not world.distributed:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def finish(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class NoRun:
    """The MLflow run as a rank other than 0 sees it: nothing is logged."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
