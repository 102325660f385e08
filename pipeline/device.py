"""Which device a job computes on: ``auto`` (CUDA when a GPU is visible, else CPU), ``cuda`` or ``cpu``."""

from __future__ import annotations

from pipeline.errors import GaplessError

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name: str | None = "auto"):
    """A ``torch.device`` for ``name``; ``cuda`` without a visible GPU is an error, not a silent CPU run."""
    import torch

    name = (name or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise GaplessError(None, f"unknown device {name!r}", f"choose one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GaplessError(None, f"device {name} asked for, but torch sees no CUDA GPU",
                           "run on a GPU node, or choose auto or cpu (--device, or train.device in the config)")
    return torch.device(name)
