"""Which device a job computes on: ``auto`` (CUDA when a GPU is visible, else CPU), ``cuda`` or ``cpu``."""

from __future__ import annotations

from pipeline.errors import GaplessError

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name=None):
    """A ``torch.device`` for ``name`` (None: auto; a ``torch.device`` is returned as it is); ``cuda``
    without a visible GPU is an error, not a silent CPU run."""
    import torch

    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise GaplessError(None, f"unknown device {name!r}", f"choose one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GaplessError(None, f"device {name} asked for, but torch sees no CUDA GPU",
                           "run on a GPU node, or choose auto or cpu (--device, or train.device in the config)")
    return torch.device(name)


def autocast_for(device):
    """A zero-argument context factory for the forward pass on ``device``, the same in training,
    inference and the benchmarks: bf16 autocast on CUDA, plain float32 elsewhere."""
    import torch

    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast(device.type, enabled=False)


def device_name(device) -> str:
    """What ``device`` is, for logs, run params and benchmark reports: ``cuda:0 (NVIDIA H200)``, or
    ``cpu (<model>, N cores, T torch threads)``."""
    import os
    from pathlib import Path

    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        model = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip() + ", "
                    break
        except OSError:
            pass
        return f"cpu ({model}{os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return str(device)
