"""The ``ltpa`` head: "Learn to Pay Attention" (Jetley, Lord, Lee & Torr, ICLR 2018).

A global vector g of the image is the query; at each of one or more backbone stages s the local
features l_i^s (one per position i) are scored against it, a softmax over the positions gives the
stage's attention a^s, and the classifier reads only the attention-weighted local features
g_a^s = Σ_i a_i^s l_i^s, concatenated over the stages. See ``LtpaHead`` for the formulas, the
contribution↔logit identity and the differences from the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..errors import GaplessError
from .heads import (
    Head,
    HeadOutput,
    fill_holes,
    init_classifier,
    masked_mean,
    position_mask,
    register_head,
    resize_mask,
)

__all__ = ["COMPATIBILITIES", "LtpaHead", "sum_pool_to"]

# the compatibility functions, by the names a config may use (the paper's "pc" and "dp" included)
COMPATIBILITIES = {"parametrised": "parametrised", "parametrized": "parametrised", "pc": "parametrised",
                   "dot": "dot", "dp": "dot"}


def _assignment(fine: int, coarse: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """coarse×fine 0/1 matrix sending fine cell j to coarse cell ⌊j·coarse/fine⌋ — each to exactly one."""
    target = torch.arange(fine, device=device) * coarse // fine
    return (torch.arange(coarse, device=device).unsqueeze(1) == target.unsqueeze(0)).to(dtype)


def sum_pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive **sum** pooling of B×K×H×W onto ``size`` (h, w): every input cell is added to exactly one
    output cell (row j → ⌊j·h/H⌋, likewise columns), so the total over positions is preserved exactly.

    For H = 2h this is 2×2 sum pooling. Unlike ``adaptive_avg_pool2d`` × area, whose windows overlap
    when H is not a multiple of h (5 → 3), no cell is counted twice. A product of 0/1 matrices: no
    atomics, deterministic on every device.
    """
    h, w = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    rows = _assignment(x.shape[-2], h, x.device, x.dtype)
    cols = _assignment(x.shape[-1], w, x.device, x.dtype)
    return torch.einsum("iy,bkyx,jx->bkij", rows, x, cols)


def _bad(cause: str, fix: str) -> GaplessError:
    return GaplessError(None, f"ltpa head: {cause}", fix)


@register_head("ltpa")
class LtpaHead(Head):
    """Learn to Pay Attention (Jetley, Lord, Lee & Torr, ICLR 2018), the paper's "concat" variant.

    Stages: the final feature map and, with ``attention_stages`` = n > 1, the n − 1 deepest earlier
    stages (``stage_channels`` from ``create_model``; e.g. ResNet layer3 at 2× the resolution for
    n = 2, the default; the paper's VGG uses three). A bare ``create_head`` has no ``stage_channels``
    and uses the final map only; a backbone with fewer earlier stages uses all it has. Each stage's
    local features are brought to a common width D (``dim``, default C = the final map's channels) by
    a 1×1 conv without bias where their channels differ: l̂_i^s = P_s l_i^s (P_s = identity where
    C_s = D). The query is the global average of the (projected) final map, g = mean_i l̂_i^final.

    Compatibility, per stage and position: ``"parametrised"`` (default, the paper's "pc"):
    c_i^s = <u_s, l̂_i^s + g> with a learned u_s per stage; ``"dot"`` (the paper's "dp"):
    c_i^s = γ_s <l̂_i^s, g> / √D with a learned scalar γ_s (not in the paper; it lets the attention
    start uniform). a^s = softmax over the positions of c^s (float32, sums to 1 per stage);
    g_a^s = Σ_i a_i^s l̂_i^s; logits = b + W [g_a^1; …; g_a^S] = b + Σ_s W_s g_a^s (raw logits, train
    with cross-entropy). As in the paper, the query's term <u_s, g> is the same at every position
    and cancels in the softmax: the parametrised attention is a learned linear score of each local
    feature, and only the dot form makes it depend on the image's global vector.

    attention: a^final, the final stage's attention, B×1×h×w, sums to 1 (the earlier stages' maps
    are finer and enter only the contribution). contribution: Σ_s SumPool_{h×w}(a_i^s · W_s l̂_i^s),
    B×K×h×w — each position's attention-weighted class scores at every stage, the finer stages'
    added onto the h×w cell their cell falls in (``sum_pool_to``: each cell to exactly one). Its
    **sum** over positions plus b equals ``logits`` exactly (linearity; Σ_i a_i^s W_s l̂_i^s =
    W_s g_a^s); the bias is left out because it belongs to no position.

    With a mask (``extra["mask"]``, see ``Head``): holes are filled with 0, the query is the mean over
    the VALID positions, g = masked mean_i l̂_i^final, and the compatibility is −∞ at holes before each
    softmax, so a^s is 0 at holes and sums to 1 over the valid positions. An earlier, finer stage takes
    the mask nearest-resized to its grid (``resize_mask``): each fine cell is valid exactly when the
    coarse cell ``sum_pool_to`` adds it to is, so the contribution stays 0 at holes and the identity
    holds as it is.

    Init: u_s = 0 (γ_s = 0 for dot), so every c_i^s is exactly zero and the attention uniform — the
    head starts as GAP + linear on the concatenated stage means; the classifier small with a
    log-prior bias (``init_classifier``), so p ≈ prior; P_s truncated normal with σ = 1/√C_s (unit-
    variance features stay unit-variance). How well it works: the paper reports lower top-1 error
    than the same VGG and ResNet without attention on CIFAR-10 and CIFAR-100 (several points for
    VGG on CIFAR-100), much better weakly supervised segmentation from the attention maps on the
    Object Discovery dataset, better transfer of the learned features to other datasets and more
    robustness to adversarial perturbations; its best models use the parametrised form and the
    concatenation. On many-instance images each stage's softmax lets a few positions carry the
    prediction without GAP's 1/(hw) dilution, and the finer stage sees smaller instances; like any
    softmax over positions it can also lock onto one artefact. Cost: Σ_{s: C_s ≠ D} C_s·D (the
    projections: 0.13 M for resnet18 with layer3 — 256·512 —, 2.1 M for resnet50) + S·D (u; S for
    dot's γ) + S·D·K + K parameters; the per-position class scores for the contribution cost
    K·D multiply-adds per position of every stage.
    """

    label = "LTPA"
    description = "learn to pay attention (Jetley et al. 2018): softmax attention at several stages, attended features concatenated"
    order = 35

    accepts_stage_channels: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        stage_channels: Sequence[int] = (),
        attention_stages: int = 2,
        compatibility: str = "parametrised",
        dim: int | None = None,
        class_prior: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, num_classes)
        if isinstance(attention_stages, bool) or not isinstance(attention_stages, int) or attention_stages < 1:
            raise _bad(f"attention_stages is {attention_stages!r}",
                       "pass an integer ≥ 1: 1 = the final map only, n = it and the n − 1 deepest earlier stages")
        if compatibility not in COMPATIBILITIES:
            raise _bad(f"unknown compatibility {compatibility!r}", "choose parametrised (the paper's pc) or dot (dp)")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise _bad(f"dim is {dim!r}", "pass a positive width, or leave dim unset for the final map's channels")
        channels = list(stage_channels)
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise _bad(f"stage_channels {channels} are not positive channel counts",
                       "leave stage_channels to create_model (it reads them from the backbone's feature_info)")
        earlier = channels[-(attention_stages - 1) :] if attention_stages > 1 else []  # the deepest ones
        self.feature_stages = 1 + len(earlier)
        self.stage_channels = tuple(earlier)
        self.compatibility = COMPATIBILITIES[compatibility]
        self.dim = in_channels if dim is None else dim
        widths = [*earlier, in_channels]  # shallow → deep, the final map last
        self.project = nn.ModuleList(self._projection(c, self.dim) for c in widths)
        n = len(widths)
        if self.compatibility == "parametrised":
            self.u = nn.Parameter(torch.zeros(n, self.dim))  # zero: uniform attention at init
        else:
            self.gamma = nn.Parameter(torch.zeros(n))
        self.fc = nn.Linear(n * self.dim, num_classes)
        init_classifier(self.fc, class_prior)

    @staticmethod
    def _projection(channels: int, dim: int) -> nn.Module:
        if channels == dim:
            return nn.Identity()
        conv = nn.Conv2d(channels, dim, kernel_size=1, bias=False)
        trunc_normal_(conv.weight, std=1.0 / channels**0.5)
        return conv

    def _stage_maps(self, features: torch.Tensor, extra: dict[str, Any] | None) -> list[torch.Tensor]:
        """The feature maps the head attends over, shallow → deep, the final map last."""
        if self.feature_stages == 1:
            return [features]
        stages = self.earlier_stages(extra, "attention_stages=1")
        got = tuple(s.shape[1] for s in stages)
        if got != self.stage_channels:
            raise ValueError(f"ltpa was built for earlier stages of {self.stage_channels} channels, got {got}")
        return [*stages, features]

    def _scores(self, s: int, local: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Compatibility c^s, B×N_s, of local features B×D×N_s with the query g (B×D)."""
        if self.compatibility == "parametrised":
            u = self.u[s].to(local.dtype)
            return torch.einsum("d,bdn->bn", u, local) + (g @ u).unsqueeze(1)  # <u, l_i + g>
        gamma = self.gamma[s].to(local.dtype)
        return gamma * torch.einsum("bd,bdn->bn", g, local) / math.sqrt(self.dim)

    @staticmethod
    def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Scores B×N_s with −∞ at the holes of the stage's mask (B×1×h_s×w_s), unchanged without one."""
        return scores if mask is None else scores.masked_fill(~mask.flatten(1), float("-inf"))

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        b, _, h, w = features.shape
        mask = position_mask(extra, features)
        maps = self._stage_maps(features, extra)
        masks = [resize_mask(mask, m.shape[-2:]) for m in maps]  # per stage; None without a mask
        projected = [p(fill_holes(m, k)) for p, m, k in zip(self.project, maps, masks)]
        with torch.autocast(device_type=features.device.type, enabled=False):
            dtype = torch.promote_types(features.dtype, torch.float32)  # float32 under bf16, float64 stays
            grids = [tuple(m.shape[-2:]) for m in projected]
            local = [m.to(dtype).flatten(2) for m in projected]  # B×D×N_s
            # B×D, the query: the global average of the final map (over its valid positions)
            g = local[-1].mean(dim=2) if mask is None else masked_mean(projected[-1].to(dtype), mask)
            attention = [F.softmax(self._masked(self._scores(s, m, g), k), dim=1)
                         for s, (m, k) in enumerate(zip(local, masks))]  # B×N_s
            attended = [torch.einsum("bn,bdn->bd", a, m) for a, m in zip(attention, local)]  # g_a^s
            weight, bias = self.fc.weight.to(dtype), self.fc.bias.to(dtype)
            logits = F.linear(torch.cat(attended, dim=1), weight, bias)
            contribution = features.new_zeros(b, self.num_classes, h, w, dtype=dtype)
            for s, (a, m, grid) in enumerate(zip(attention, local, grids)):
                w_s = weight[:, s * self.dim : (s + 1) * self.dim]
                per_position = torch.einsum("kd,bdn->bkn", w_s, m)  # W_s l̂_i^s: B×K×N_s
                term = (a.unsqueeze(1) * per_position).view(b, self.num_classes, *grid)
                contribution = contribution + sum_pool_to(term, (h, w))
            final_attention = attention[-1].view(b, 1, h, w)
        return HeadOutput(logits, contribution, final_attention, False)
