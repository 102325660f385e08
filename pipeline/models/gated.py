"""The ``gated`` head: gated attention MIL pooling (Ilse, Tomczak & Welling, ICML 2018; ABMIL), the
multiple-instance field's reference aggregator, at both scales (a tile's feature map, a slide's tile grid).
See ``GatedAttentionHead`` for the formulas and the contribution↔logit identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GaplessError
from .heads import Head, HeadOutput, init_classifier, position_mask, register_head
from .layers import fill_holes

__all__ = ["GatedAttentionHead"]


@register_head("gated")
class GatedAttentionHead(Head):
    """Gated attention MIL pooling (Ilse, Tomczak & Welling, ICML 2018, "Attention-based Deep Multiple
    Instance Learning"; ABMIL), the multiple-instance field's reference aggregator.

    Each position's feature h_i (C channels) is an instance. Attention a_i = softmax_i(wᵀ(tanh(V h_i) ⊙
    σ(U h_i))) over the positions, with V, U: C → L (``hidden``, default 128 as in the paper's code) and
    w: L → 1; z = Σ_i a_i h_i; logits = W z + b (raw logits: train with cross-entropy). The sigmoid gate
    lets the score escape tanh's near-linearity for small inputs, the paper's reason for the gated form.
    As in the paper's code, V, U and w have biases (w's bias cancels in the softmax). The softmax and
    the pooling are computed in float32 (under autocast too).

    attention: a, B×1×h×w, sums to 1 (over the valid positions with a mask, exactly 0 at holes).
    contribution: a_i · W h_i, B×K×h×w; its **sum** over positions plus b equals ``logits`` exactly
    (linearity: Σ_i a_i W h_i = W z); the bias is left out because it belongs to no position. It is 0
    where the attention is 0 (at holes). Works on a tile's feature map and on a slide's tile grid alike.

    Init: w = 0 (weight and bias), so every score is exactly zero and the attention uniform — the head
    starts as mean pooling + linear; V and U keep PyTorch's default init; the classifier small with a
    log-prior bias (``init_classifier``), so p ≈ prior. How well it works: the paper reports that
    attention and gated attention beat the max- and mean-pooling MIL operators (at instance and at
    embedding level) on MNIST-bags — most clearly with few training bags — and on the breast cancer
    (UCSB) and colon cancer histology bags, are on par with the best methods on the classical MIL
    benchmarks (Musk, Fox, Tiger, Elephant), and that the attention weights point at the key instances
    (e.g. the epithelial nuclei in the colon cancer images); gated and plain attention were close. Like
    any softmax over positions it can lock onto one artefact. Cost: 2·(C·L + L) + L + 1 + C·K + K
    parameters (0.13 M at C = 512, L = 128) and ≈ 2·C·L + L multiply-adds per position for the
    attention, K·C more for the contribution.
    """

    label = "Gated attention (ABMIL)"
    description = "gated attention MIL pooling (Ilse et al. 2018): a learned softmax over positions, linear on the weighted mean"
    order = 37

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden: int = 128,
        class_prior: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, num_classes)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise GaplessError(None, f"gated head: hidden is {hidden!r}",
                               "pass a positive width L for the attention network (the paper uses 128)")
        self.hidden = hidden
        self.attention_v = nn.Linear(in_channels, hidden)  # tanh branch, V
        self.attention_u = nn.Linear(in_channels, hidden)  # sigmoid gate, U
        self.attention_w = nn.Linear(hidden, 1)  # w
        nn.init.zeros_(self.attention_w.weight)  # zero scores: uniform attention at init
        nn.init.zeros_(self.attention_w.bias)
        self.fc = nn.Linear(in_channels, num_classes)
        init_classifier(self.fc, class_prior)

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        b, _, h, w = features.shape
        mask = position_mask(extra, features)
        instances = fill_holes(features, mask).flatten(2).transpose(1, 2)  # B×N×C, row-major positions
        gated = torch.tanh(self.attention_v(instances)) * torch.sigmoid(self.attention_u(instances))
        scores = self.attention_w(gated).squeeze(2)  # B×N
        with torch.autocast(device_type=features.device.type, enabled=False):
            dtype = torch.promote_types(features.dtype, torch.float32)  # float32 under bf16, float64 stays
            scores = scores.to(dtype)
            if mask is not None:
                scores = scores.masked_fill(~mask.flatten(1), float("-inf"))
            attention = scores.softmax(dim=1)  # B×N, sums to 1 (over the valid positions)
            instances = instances.to(dtype)
            weight, bias = self.fc.weight.to(dtype), self.fc.bias.to(dtype)
            logits = F.linear(torch.einsum("bn,bnc->bc", attention, instances), weight, bias)  # W z + b
            per_position = F.linear(instances, weight)  # W h_i: B×N×K
            contribution = (attention.unsqueeze(2) * per_position).transpose(1, 2).reshape(b, -1, h, w)
        return HeadOutput(logits, contribution, attention.view(b, 1, h, w), False)
