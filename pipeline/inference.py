"""One way to run a model on a batch, for training's evaluation, heatmaps and benchmarks alike.

A batch goes to the device (channels-last on CUDA, as the model is), the model runs under the
device's autocast (bf16 on CUDA, none on the CPU: :func:`pipeline.device.autocast_for`), and class
probabilities come from the ``HeadOutput`` in float32 whatever the head scores (log-probabilities
for saol, logits for the others).
"""

from __future__ import annotations

from collections.abc import Callable


def to_device(x, device):
    """``x`` (B×C×H×W) on ``device``, channels-last on CUDA."""
    import torch

    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def forward(model, x, device, autocast: Callable):
    """The ``HeadOutput`` of ``model`` on batch ``x`` (moved to ``device``) under ``autocast``."""
    x = to_device(x, device)
    with autocast():
        return model(x)


def probabilities(out):
    """B×K float32 class probabilities of a ``HeadOutput``."""
    logits = out.logits.float()
    return logits.exp() if out.scores_are_log_probs else logits.softmax(1)
