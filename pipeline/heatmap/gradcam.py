"""Grad-CAM (Selvaraju et al., ICCV 2017): one post-hoc map for every head, beside the head's own map.

For a tile, A is the backbone's final feature map (B×C×h×w, the map the head receives) and y the
positive class's score (the last class, as every heatmap uses). The weight of channel c is the
gradient of y averaged over positions, α_c = (1/hw) Σ_ij ∂y/∂A_c,ij, and the map is
ReLU(Σ_c α_c A_c): B×1×h×w on the same grid as the head's ``contribution``, so it is stitched,
normalised and scored exactly as the head's own map is.

The score y is ``logits[:, -1]`` of the head's ``HeadOutput``, whatever the head: the raw
positive-class logit (before the softmax, as in the paper) for heads that give logits, and log p of
the positive class for a head whose ``logits`` are log-probabilities (saol). ∂log p/∂A = (1/p)·∂p/∂A,
so for such a head the map is the map of p scaled by 1/p per tile: the same shape within a tile, the
tiles' scales differing by their probabilities. No head is special-cased: any registered head works.

Cost: the gradient is taken with respect to A only, so only the head runs with autograd; the
backbone runs once, under ``torch.no_grad`` as in plain inference, and A (and any earlier stages a
head fuses, which lie upstream of A) enter the head as constants. ∂y/∂A is the same as with the
whole network differentiated, because nothing upstream of A depends on A. The head's forward
with its graph and one backward per batch are the extra cost. The per-tile scores are summed
before the backward: tiles are independent (the model is in eval mode, so BatchNorm uses its
running statistics, and no head mixes tiles), so the gradient of the sum with respect to tile b's A
is tile b's own gradient. ``torch.autograd.grad`` with respect to A alone leaves every parameter's
``.grad`` untouched; the graph is freed by the backward, the outputs are detached, and the grad
mode is restored on return.
"""

from __future__ import annotations

from contextlib import nullcontext

from pipeline.errors import GaplessError


def supports_grad_cam(model) -> bool:
    """Whether ``model`` exposes the feature map its head receives: ``forward_features(x) → (A, extra)``
    and ``head(A, extra) → HeadOutput`` (``pipeline.models.InstanceModel``)."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "head", None))


def check_grad_cam(model) -> None:
    """GaplessError unless Grad-CAM can run on ``model`` (see :func:`supports_grad_cam`); the model must be in eval mode."""
    if not supports_grad_cam(model):
        raise GaplessError(None, f"Grad-CAM needs the feature map the head receives; {type(model).__name__} has no "
                                 "forward_features and head", "use a model from load_trained / create_model, or turn "
                                                              "gradcam off")
    if model.training:
        raise GaplessError(None, "Grad-CAM on a model in training mode (BatchNorm would mix the tiles of a batch)",
                           "call model.eval() first")


def detached(out):
    """The ``HeadOutput`` ``out`` with every tensor detached from its graph."""
    from dataclasses import replace

    return replace(out, logits=out.logits.detach(), contribution=out.contribution.detach(),
                   attention=None if out.attention is None else out.attention.detach())


def forward_grad_cam(model, x, autocast=nullcontext):
    """``(HeadOutput, Grad-CAM)`` of ``model`` on the batch ``x`` (on the model's device): the head's
    output as ``model(x)`` gives it (detached) and the positive-class Grad-CAM, B×1×h×w float32 ≥ 0.

    One forward of the backbone without autograd, one of the head with it, one backward. Works
    inside ``torch.no_grad()`` (grad is enabled for the head alone and the mode restored after).
    """
    import torch

    check_grad_cam(model)
    with autocast():
        with torch.no_grad():
            features, extra = model.forward_features(x)
        with torch.enable_grad():
            leaf = features.detach().requires_grad_(True)
            out = model.head(leaf, extra or None)
            score = out.logits[:, -1].float().sum()
            grad = None
            if score.requires_grad:
                (grad,) = torch.autograd.grad(score, leaf, allow_unused=True)
    out = detached(out)
    del score, leaf
    with torch.no_grad():
        a = features.float()
        if grad is None:  # the score does not depend on A: no evidence anywhere
            cam = a.new_zeros(a.shape[0], 1, *a.shape[2:])
        else:
            alpha = grad.float().mean(dim=(2, 3))  # B×C
            cam = torch.einsum("bc,bchw->bhw", alpha, a).clamp_min(0).unsqueeze(1)
    return out, cam


def grad_cam(model, x, autocast=nullcontext):
    """The positive-class Grad-CAM of ``model`` on ``x``: B×1×h×w float32 ≥ 0 (see :func:`forward_grad_cam`)."""
    return forward_grad_cam(model, x, autocast)[1]
