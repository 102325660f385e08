"""The ``saol`` head: the Spatially Attentive Output Layer (Kim, Baek & Kim, CVPR 2020). See ``SaolHead``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .heads import Head, HeadOutput, init_classifier, position_mask, register_head, resize_mask
from .layers import fill_holes

__all__ = ["SaolHead"]


@register_head("saol")
class SaolHead(Head):
    """Spatially Attentive Output Layer (Kim, Baek & Kim, CVPR 2020).

    A = softmax over positions of a 1×1 conv on the final features (B×1×h×w, sums to 1);
    Y = softmax over classes of a 1×1 conv on the spatial features (B×K×h×w); p_k = Σ_ij A_ij·Y_k,ij.
    ``logits`` are log p_k, computed in float32 as logsumexp_ij(log A_ij + log Y_k,ij) — exact, no
    clamping — so ``scores_are_log_probs`` is True: train with NLL, never a second softmax.
    Y fuses earlier stages as the paper does: with ``fuse_stages`` = 2 (default) the deepest earlier
    stage (e.g. ResNet layer3, at 2× the resolution) is average-pooled to h×w and concatenated with
    the final features before the conv; ``fuse_stages=1`` (or no ``stage_channels``, e.g. a bare
    ``create_head``) computes Y from the final map only. The paper's A and Y branches are small conv
    stacks and it adds self-supervised and self-distillation losses; here both are single 1×1 convs
    and the extra losses are left to the trainer.

    attention: A. contribution: A_ij·Y_k,ij, which sums over positions to p_k = exp(logits) exactly.
    With a mask A's logits are −∞ at holes (A = 0 there, Σ over the valid positions = 1), so the
    contribution is 0 at holes and the identity holds as it is; fused earlier stages are filled with 0
    at the holes of the resized mask (``resize_mask``) before they are pooled onto the grid.
    Init: the A conv is zero (uniform attention), the Y conv small with log-prior bias, so p ≈ prior.
    How well it works: the paper reports modest top-1 gains over GAP-FC on CIFAR and ImageNet (larger
    with its extra losses) and better weakly supervised localisation; the product A·Y lets a few
    positions carry the prediction. Because p is a mixture of per-position softmaxes, it is never
    more confident than its most confident position.
    """

    label = "SAOL"
    description = "spatially attentive output layer (Kim et al. 2020): attention-weighted spatial class scores"
    order = 40

    accepts_stage_channels: ClassVar[bool] = True
    scores_are_log_probs: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        stage_channels: Sequence[int] = (),
        fuse_stages: int = 2,
        class_prior: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, num_classes)
        if fuse_stages < 1:
            raise ValueError(f"fuse_stages must be ≥ 1, got {fuse_stages}")
        fused = list(stage_channels)[-(fuse_stages - 1) :] if fuse_stages > 1 else []  # the deepest ones
        self.feature_stages = 1 + len(fused)
        self.attention_logits = nn.Conv2d(in_channels, 1, kernel_size=1)
        nn.init.zeros_(self.attention_logits.weight)
        nn.init.zeros_(self.attention_logits.bias)
        self.spatial_logits = nn.Conv2d(in_channels + sum(fused), num_classes, kernel_size=1)
        init_classifier(self.spatial_logits, class_prior)

    def _spatial_input(
        self, features: torch.Tensor, extra: dict[str, Any] | None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.feature_stages == 1:
            return features
        stages = self.earlier_stages(extra, "fuse_stages=1")
        stages = [fill_holes(s, resize_mask(mask, s.shape[-2:])) for s in stages]
        size = features.shape[-2:]
        pooled = [F.adaptive_avg_pool2d(s, size).to(features.dtype) for s in stages]
        return torch.cat([*pooled, features], dim=1)

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        b, _, h, w = features.shape
        mask = position_mask(extra, features)
        features = fill_holes(features, mask)
        attention_logits = fill_holes(self.attention_logits(features), mask, float("-inf"))
        class_logits = self.spatial_logits(self._spatial_input(features, extra, mask))
        with torch.autocast(device_type=features.device.type, enabled=False):
            log_a = F.log_softmax(attention_logits.float().flatten(2), dim=2)  # B×1×N, over positions
            log_y = F.log_softmax(class_logits.float().flatten(2), dim=1)  # B×K×N, over classes
            log_contribution = log_a + log_y
            log_p = torch.logsumexp(log_contribution, dim=2)  # B×K
            contribution = log_contribution.exp().view(b, -1, h, w)
            attention = log_a.exp().view(b, 1, h, w)
        return HeadOutput(log_p, contribution, attention, True)
