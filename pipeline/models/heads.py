"""Heads: class scores and a per-class spatial map from a B×C×h×w feature map.

Every head returns a ``HeadOutput`` so training, evaluation and heatmaps never branch on the head's
name. A head is one class registered by name (``@register_head("name")``); ``create_head`` and
``pipeline.models.create_model`` find it there, so adding a head touches nothing else. A head that
needs the backbone built differently says so in ``backbone_kwargs`` (passed to ``timm.create_model``),
checks and adjusts the built backbone in ``prepare_backbone``, and reads what it recorded during the
forward pass in ``read_backbone``; a head that fuses earlier stages sets ``feature_stages`` > 1 and
receives them in ``extra["stages"]``.

Two scales, one set of heads: a tile's feature map from a backbone (``InstanceModel``), and a slide's
tile embeddings laid on its tile grid (``pipeline.models.slide.SlideModel``), where positions without
tissue are holes given by ``extra["mask"]`` (B×1×h×w bool, True at instances; the contract is in
``Head``'s docstring). Heads read the mask with ``position_mask`` and never ask which scale they serve.

Initialisation, for every head: the final classifier is small (σ = 0.1/√fan_in) with its bias at
log(class prior) (uniform when no prior is given), and attention logits start at exactly zero, so a
fresh head predicts ≈ the prior and its attention is uniform — training from scratch starts stable,
and gradients still reach the backbone on the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..errors import GaplessError
from ..head_info import HeadInfo
from .layers import ClassAttentionBlock, GateRecordingCbam, fill_holes, masked_mean

__all__ = [
    "HEADS",
    "AttnPoolHead",
    "CbamHead",
    "GapHead",
    "Head",
    "HeadOutput",
    "MaxHead",
    "create_head",
    "fill_holes",
    "get_head_class",
    "head_catalog",
    "masked_mean",
    "position_mask",
    "register_head",
    "resize_mask",
]


@dataclass
class HeadOutput:
    """What every head returns.

    logits: B×K class scores; log-probabilities log p_k where ``scores_are_log_probs`` (saol), raw
        logits otherwise.
    contribution: B×K×h×w per-class spatial contribution map on the feature grid; its meaning and its
        identity with ``logits`` are documented on each head.
    attention: B×1×h×w where the head has an attention or gate map, else None.
    scores_are_log_probs: True → train with NLL on ``logits``; False → cross-entropy.
    """

    logits: torch.Tensor
    contribution: torch.Tensor
    attention: torch.Tensor | None
    scores_are_log_probs: bool


class Head(nn.Module):
    """Base class: ``forward(features B×C×h×w, extra: dict | None) -> HeadOutput``.

    Class attributes a subclass may set:
      ``backbone_kwargs``: extra ``timm.create_model`` keyword arguments the head needs.
      ``backbone_requirement``: the fix to print when a backbone cannot take those arguments.
      ``accepts_stage_channels``: ``create_model`` passes ``stage_channels`` (channels of the
        backbone's earlier, finer stages, shallow → deep) to the constructor.
    Instance attribute ``feature_stages``: how many backbone stages the head reads (1 = the final
    feature map only; n > 1 → the n − 1 deepest earlier stages arrive in ``extra["stages"]``).

    ``extra`` keys filled by ``InstanceModel``: ``"stages"`` (list of B×C_s×h_s×w_s, shallow → deep)
    and whatever ``read_backbone`` returns (cbam: ``"spatial_gate"``, B×1×h×w). A bare head called
    on a feature map gets ``extra=None`` and must still work (fusing or gate-reading heads degrade or
    say why). ``SlideModel`` fills ``"mask"`` and what ``read_backbone`` returns for its grid encoder.

    The mask contract. ``extra["mask"]`` is an optional B×1×h×w bool tensor, True where a position holds
    an instance (at the slide level: a tissue tile on the slide's tile grid), False at a hole; absent or
    None → every position is valid. Every head honours it, read through ``position_mask(extra,
    features)`` (shape and dtype checked; each sample needs ≥ 1 valid position, else GaplessError):
      - what a hole holds never reaches the output: the head fills holes (``fill_holes``) before
        anything else, so garbage, inf or NaN there changes nothing, and no gradient reaches a hole;
      - no pooling over holes: means are over the valid positions (``masked_mean``), maxima skip holes,
        softmaxes over positions put −inf at holes;
      - ``attention`` is exactly 0 at holes (a distribution over positions sums to 1 over the valid
        ones; cbam's sigmoid gate is set to 0 there), and ``contribution`` is exactly 0 at holes;
      - each head's identity between ``contribution`` and ``logits`` holds over the valid positions
        (gap: the mean over the VALID positions; the sums are unchanged since holes add 0).
    So a head's output on a grid with holes equals, up to rounding, its output on a 1×n grid holding
    only the valid positions in row-major order (no registered head mixes neighbouring positions;
    cbam's gate comes from the backbone, whose convolutions do). A head reading earlier, finer stages
    (``feature_stages`` > 1) applies the mask resized to each stage's grid (``resize_mask``: nearest,
    each fine cell taking the coarse cell that ``ltpa.sum_pool_to`` adds it to). Without a mask every
    head runs exactly the code it ran before masks existed (``fill_holes``/``masked_mean`` with None).
    """

    name: ClassVar[str] = ""
    # what the viewer and the report show (pipeline.head_info.HeadInfo): written into model.json,
    # the run's MLflow tags and the heatmap JSON by training and heatmaps
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    order: ClassVar[int] = 1000
    baseline: ClassVar[bool] = False
    backbone_kwargs: ClassVar[dict[str, Any]] = {}
    backbone_requirement: ClassVar[str] = ""
    accepts_stage_channels: ClassVar[bool] = False
    scores_are_log_probs: ClassVar[bool] = False

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise GaplessError(
                None,
                f"num_classes is {num_classes}; heads score K ≥ 2 classes with a softmax",
                "a binary label is num_classes=2",
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_stages = 1

    @classmethod
    def info(cls) -> HeadInfo:
        """The head's label, description, display order and baseline flag."""
        return HeadInfo(cls.name, cls.label or cls.name, cls.description, cls.order, cls.baseline)

    def prepare_backbone(self, backbone: nn.Module, backbone_name: str) -> None:
        """Check (and adjust) the backbone built with ``backbone_kwargs``; raise GaplessError if unfit."""

    def read_backbone(self, backbone: nn.Module) -> dict[str, Any]:
        """Whatever the backbone recorded for this head during the latest forward (into ``extra``)."""
        return {}

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        raise NotImplementedError

    def earlier_stages(self, extra: dict[str, Any] | None, single: str) -> list[torch.Tensor]:
        """The ``feature_stages`` − 1 deepest earlier stages from ``extra["stages"]`` (shallow → deep);
        ValueError naming ``single`` (the option that builds the head on the final map) when they are missing."""
        wanted = self.feature_stages - 1
        stages = list((extra or {}).get("stages", ()))[-wanted:] if wanted else []
        if len(stages) != wanted:
            raise ValueError(
                f"{self.name} was built to use {wanted} earlier stage(s) but extra['stages'] has {len(stages)}; "
                f"call it through InstanceModel or build it with {single}"
            )
        return stages


HEADS: dict[str, type[Head]] = {}
H = TypeVar("H", bound=type[Head])


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: make a Head available to ``create_head`` / ``create_model`` as ``name``."""

    def register(cls: H) -> H:
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise TypeError(f"{cls!r} is not a Head subclass")
        if HEADS.get(name, cls) is not cls:
            raise ValueError(f"head {name!r} is already registered by {HEADS[name].__qualname__}")
        cls.name = name
        HEADS[name] = cls
        return cls

    return register


def get_head_class(name: str) -> type[Head]:
    """The registered Head class called ``name``; GaplessError listing the choices if there is none."""
    try:
        return HEADS[name]
    except KeyError:
        choices = ", ".join(sorted(HEADS))
        raise GaplessError(None, f"unknown head {name!r}", f"choose one of {choices}") from None


def head_catalog() -> dict[str, HeadInfo]:
    """Every registered head's ``HeadInfo``, in display order."""
    infos = sorted((cls.info() for cls in HEADS.values()), key=HeadInfo.sort_key)
    return {info.name: info for info in infos}


def create_head(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> Head:
    """Build the head registered as ``name`` for ``in_channels`` feature channels and K classes."""
    return get_head_class(name)(in_channels, num_classes, **kwargs)


def position_mask(extra: dict[str, Any] | None, features: torch.Tensor) -> torch.Tensor | None:
    """``extra["mask"]`` checked against ``features`` (B×C×h×w): a B×1×h×w bool tensor on the features'
    device, or None when there is none (every position valid; see ``Head``'s mask contract).

    ValueError for a mask of another shape or dtype (a caller's bug); GaplessError for a sample
    without any valid position (nothing to pool: its softmaxes and means would be undefined).
    """
    mask = (extra or {}).get("mask")
    if mask is None:
        return None
    b, _, h, w = features.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, 1, h, w):
        got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"extra['mask'] must be a bool tensor of shape {(b, 1, h, w)} (True at instances), got {got}")
    mask = mask.to(features.device)
    if not bool(mask.flatten(1).any(dim=1).all()):
        raise GaplessError(
            None,
            "a sample's mask has no valid position (no instance to pool)",
            "leave samples without instances (e.g. a slide without tissue tiles) out of the batch",
        )
    return mask


def resize_mask(mask: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor | None:
    """The mask on another grid (h', w'), nearest: cell (i, j) takes cell (⌊i·h/h'⌋, ⌊j·w/w'⌋) — in
    integers, so on a finer grid each fine cell is valid exactly when the coarse cell that
    ``ltpa.sum_pool_to`` adds it to is. None stays None."""
    if mask is None or tuple(mask.shape[-2:]) == tuple(size):
        return mask
    (h, w), (rows, cols) = mask.shape[-2:], size
    r = torch.arange(rows, device=mask.device) * h // rows
    c = torch.arange(cols, device=mask.device) * w // cols
    return mask[:, :, r][:, :, :, c]


def prior_log_bias(num_classes: int, class_prior: Sequence[float] | None) -> torch.Tensor:
    """log(prior) as a K-vector (zeros when None): a bias that makes a zero-input head predict the prior."""
    if class_prior is None:
        return torch.zeros(num_classes)
    prior = torch.as_tensor(class_prior, dtype=torch.float64)
    if prior.shape != (num_classes,) or not bool((prior > 0).all()):
        raise GaplessError(
            None,
            f"class_prior {list(class_prior)} is not {num_classes} positive class frequencies",
            "pass one positive frequency per class, or leave class_prior unset for a uniform start",
        )
    return (prior / prior.sum()).log().float()


def init_classifier(
    layer: nn.Linear | nn.Conv2d, class_prior: Sequence[float] | None, gain: float = 0.1
) -> None:
    """Small weights and a log-prior bias: the head starts near the prior yet passes gradient back.

    σ = gain/√fan_in: unit-variance inputs give logits within ~±gain of log(prior), whatever C is.
    """
    fan_in = layer.weight[0].numel()
    trunc_normal_(layer.weight, std=gain / fan_in**0.5)
    with torch.no_grad():
        layer.bias.copy_(prior_log_bias(layer.weight.shape[0], class_prior))


def class_activation_map(features: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """CAM (Zhou et al., CVPR 2016) with the bias: W_k·f_ij + b_k, B×K×h×w (per-position logits)."""
    return F.conv2d(features, fc.weight[:, :, None, None].to(features.dtype), fc.bias.to(features.dtype))


@register_head("gap")
class GapHead(Head):
    """Global average pooling + linear: the standard CNN classifier (Lin et al. 2014, "Network in Network").

    contribution: the class activation map with bias, W_k·f_ij + b_k, i.e. the logit each position
    would give alone; its **mean** over the h×w positions equals ``logits`` exactly (linearity). With a
    mask: logits = W·(mean over the valid positions) + b, the CAM is 0 at holes, and its mean over the
    VALID positions equals ``logits``. attention: None. How well it works: strong when evidence covers
    much of the image; when the label rests on a few instances among many, their signal is diluted by
    1/(hw) — a few positive cells must outweigh every negative one — which is the question this
    pipeline measures.
    """

    label = "GAP"
    description = "global average pooling + linear: every position counts the same"
    order = 10
    baseline = True  # the report pairs every other head with this one

    def __init__(self, in_channels: int, num_classes: int, *, class_prior: Sequence[float] | None = None):
        super().__init__(in_channels, num_classes)
        self.fc = nn.Linear(in_channels, num_classes)
        init_classifier(self.fc, class_prior)

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        mask = position_mask(extra, features)
        features = fill_holes(features, mask)
        logits = self.fc(masked_mean(features, mask))
        return HeadOutput(logits, fill_holes(class_activation_map(features, self.fc), mask), None, False)


@register_head("max")
class MaxHead(Head):
    """Global max pooling + linear: each channel reports its strongest position (Oquab et al., CVPR 2015).

    contribution: for each channel c, W_kc · max_ij f_c,ij placed at the position where channel c
    peaks (summed where several channels peak at one position); zero elsewhere. Its **sum** over
    positions plus b_k equals ``logits`` exactly; the bias is left out because it belongs to no
    position. With a mask the maximum is over the valid positions (holes read as −∞), so every peak,
    and all of the contribution, lies on a valid position. attention: None. How well it works: the
    baseline a sparse witness favours (one strong cell decides), but it sees one position per channel,
    so one bright artefact can decide alone, and gradient reaches only the peak positions.
    """

    label = "Max (baseline)"
    description = "global max pooling + linear: the strongest position decides (baseline)"
    order = 50

    def __init__(self, in_channels: int, num_classes: int, *, class_prior: Sequence[float] | None = None):
        super().__init__(in_channels, num_classes)
        self.fc = nn.Linear(in_channels, num_classes)
        init_classifier(self.fc, class_prior)

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        b, _, h, w = features.shape
        mask = position_mask(extra, features)
        # B×C values and flat positions of each channel's peak (over the valid positions)
        peak, where = fill_holes(features, mask, float("-inf")).flatten(2).max(dim=2)
        logits = self.fc(peak)
        per_channel = peak.unsqueeze(1) * self.fc.weight  # B×K×C
        k = per_channel.shape[1]
        contribution = per_channel.new_zeros(b, k, h * w)
        contribution = contribution.scatter_add(2, where.unsqueeze(1).expand(-1, k, -1), per_channel)
        return HeadOutput(logits, contribution.view(b, k, h, w), None, False)


@register_head("cbam")
class CbamHead(GapHead):
    """GAP + linear on a backbone with CBAM (Woo et al., ECCV 2018) in every residual block.

    The backbone is built with ``block_args=dict(attn_layer=GateRecordingCbam)`` (timm's ResNet
    family: resnet*, resnext*, wide_resnet*, …; anything else → GaplessError). contribution: the CAM,
    exactly as ``gap`` (mean over positions = logits). attention: the last block's CBAM spatial gate,
    B×1×h×w, a sigmoid per position in (0, 1) — not a distribution, it does not sum to 1. It is None
    when the head is called without its backbone (no ``extra["spatial_gate"]``); with a mask it is 0 at
    holes (at the slide level the gate comes from the mask-aware CBAM block that ``SlideModel``'s grid
    encoder appends when it is asked for ``attn_layer``). How well it works:
    the paper reports about 2 points lower ImageNet top-1 error for ResNet-50; timm's own note says
    results are mixed and can hurt fine-grained tasks. The gate re-weights features inside the
    network but the classifier still averages, so sparse evidence is helped only as far as the
    gates suppress the background.
    """

    label = "CBAM"
    description = "GAP + linear on a backbone with CBAM attention in every residual block"
    order = 20
    baseline = False  # (GapHead's subclass: not the baseline itself)

    backbone_kwargs: ClassVar[dict[str, Any]] = {"block_args": {"attn_layer": GateRecordingCbam}}
    backbone_requirement: ClassVar[str] = (
        "the cbam head needs a timm ResNet-family backbone whose blocks take attn_layer "
        "(resnet10t, resnet18, resnet50, resnext50_32x4d, wide_resnet50_2, …)"
    )

    def __init__(self, in_channels: int, num_classes: int, *, class_prior: Sequence[float] | None = None):
        super().__init__(in_channels, num_classes, class_prior=class_prior)
        self._gate_module = ""

    def prepare_backbone(self, backbone: nn.Module, backbone_name: str) -> None:
        names = [n for n, m in backbone.named_modules() if isinstance(m, GateRecordingCbam)]
        if not names:
            raise GaplessError(
                None, f"backbone {backbone_name!r} built without CBAM blocks", self.backbone_requirement
            )
        for n in names:  # only the last block keeps its gate: no activations held for the others
            backbone.get_submodule(n).record = False
        backbone.get_submodule(names[-1]).record = True
        self._gate_module = names[-1]

    def read_backbone(self, backbone: nn.Module) -> dict[str, Any]:
        if not self._gate_module:
            return {}
        gate = backbone.get_submodule(self._gate_module).pop_gate()
        return {} if gate is None else {"spatial_gate": gate}

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        out = super().forward(features, extra)
        gate = (extra or {}).get("spatial_gate")
        out.attention = None if gate is None else fill_holes(gate, position_mask(extra, features))
        return out


@register_head("attnpool")
class AttnPoolHead(Head):
    """Attention-based pooling of PatchConvNet (Touvron et al. 2021, "Augmenting convolutional networks
    with attention-based aggregation"): the positions' features are projected C → ``dim`` (a linear
    map per position), a learned class token attends over the h×w positions through one
    class-attention block (LayerNorm, attention, LayerScale, MLP), then LayerNorm + linear.

    Differences from the paper: the block works at ``dim`` = 128, not at the backbone's width C
    (``dim=None``: at C, without the projection, with the parameter names of the head before the
    change), and LayerScale starts at ``init_values`` = 1 — both from the ablation below; the class
    token attends to the positions only (not to itself), so the weights are a distribution over the
    image; one head by default (``num_heads``) so the map is one map. The query projection starts at
    zero: the initial attention is uniform, so a fresh head is an MLP on the average-pooled (projected)
    features, and with the small classifier it still predicts ≈ the prior.

    Why (CPU benchmark, resnet10t C = 512, 40 AdamW steps at lr 2e-3): with the former defaults (width C,
    LayerScale 1e-4) 4 of 12 runs stalled at tile AUROC 0.63-0.74. Two causes, each seen in the logs:
    (1) attention collapse. The query is W_q·LN(cls), the same for every image, so W_q's gradient is
    rank one and Adam's ≈ ±lr per-element steps all push q the same way: ‖q‖ grows ≈ lr·‖LN(cls)‖₁·√d
    ∝ d^1.5 per step (keys likewise). At d = 512 ‖q‖ reached 60-73 and the attention entropy fell from
    uniform to ≤ 0.11 (of log N) within 20 steps in all 8 runs, before the features meant anything;
    at d = 128 ‖q‖ stayed at 2-10 and the attention stays spread until a position earns it. LayerScale
    0.1 at d = 512 collapsed the same way (one seed); a 10× lower head lr also avoided it (one seed) but keeps the
    3.2 M parameters. (2) LayerScale 1e-4 throttles the image path: γ moves ≤ lr per Adam step (≈ 0.01
    after the whole run), so the prediction stays ≈ constant for the first 6-9 steps (gap: 3-4) and,
    at d = 128 alone, the runs trained slowest of all (final loss 0.45 vs gap 0.26 on witness 0.01).
    Ablation (same splits and budget, seeds 0-3 × demo witness fractions 0.05 and 0.01; stall = test tile
    AUROC below gap's median − 0.1): gap 1/8 stalls, former defaults 3/8, d = 128 alone 3/8, d = 128
    with LayerScale 1 (now the default) 1/8 — mean tile AUROC 0.910 / 0.849 (gap 0.916 / 0.923) at
    witness 0.05 / 0.01, where each test split holds 3 positive tiles, so the 0.01 means are coarse.
    Weight decay plays no part (lr·wd·steps ≤ 0.4 % shrink over the run). On a larger budget or
    pretrained features the former defaults may well train; ``dim=None, init_values=1e-4`` restores them.

    attention: the class token's weights over positions, B×1×h×w, sum 1 (mean over heads); with a mask
    the keys at holes are masked (−∞ before the softmax), so the weights are 0 there and sum to 1 over
    the valid positions, and the contribution is 0 at holes.
    contribution: attention_ij × ℓ_k,ij, where ℓ_ij are per-position logits: the logits the head
    would output had all attention been on position ij (same projection, block, norm and classifier;
    the projection acts on each position alone, so ℓ_ij depends on position ij only). It is zero
    where attention is zero, Σ_ij contribution equals ``logits`` exactly when all positions are alike
    or every head puts all its weight on one position, and approximately otherwise (the block after the
    attention is non-linear; the gap is second order in LayerScale γ: < 1e-4 at γ = 1e-4, ≈ 0.04
    in logit units at the default γ = 1 on random features at init). How well it works: the
    paper reports that replacing a ResNet-50's average pooling with this block helps a little on
    ImageNet and gives readable single-head maps; on many-instance images the softmax lets a few
    positions dominate, which is the point, but it can also lock onto one artefact. Cost: C·d + ~12·d²
    parameters (d = 128: 0.27 M at C = 512, 0.46 M at C = 2048; ``dim=None``: ~12·C², 3.2 M for
    resnet10t/resnet18, 50 M for resnet50), and the per-position MLP for the contribution costs
    ~10·d² multiply-adds per position.
    """

    label = "Attention pooling"
    description = "attention-based pooling (PatchConvNet class attention over the positions)"
    order = 30

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        dim: int | None = 128,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        init_values: float = 1.0,
        drop: float = 0.0,
        class_prior: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, num_classes)
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be a positive width or None (the backbone's {in_channels}), got {dim}")
        width = in_channels if dim is None else dim
        # C → width per position (a linear map: the per-position counterfactual stays exact); None: no
        # projection, the block at the backbone's width (the parameter names of the original head)
        self.in_proj = nn.Identity() if dim is None else nn.Linear(in_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        trunc_normal_(self.cls_token, std=0.02)
        self.block = ClassAttentionBlock(
            width, num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=init_values, drop=drop
        )
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)
        init_classifier(self.fc, class_prior)

    def forward(self, features: torch.Tensor, extra: dict[str, Any] | None = None) -> HeadOutput:
        b, c, h, w = features.shape
        mask = position_mask(extra, features)
        # B×N×width, N = h·w in row-major order
        tokens = self.in_proj(fill_holes(features, mask).flatten(2).transpose(1, 2))
        cls_token = self.cls_token.expand(b, -1, -1).to(tokens.dtype)
        pooled, weights = self.block(cls_token, tokens, None if mask is None else mask.flatten(1))
        logits = self.fc(self.norm(pooled)).squeeze(1)  # B×K
        per_position = self.fc(self.norm(self.block.per_position(cls_token, tokens)))  # B×N×K
        attention = weights.mean(dim=1)  # B×N, mean over heads
        contribution = (attention.unsqueeze(2) * per_position).transpose(1, 2).reshape(b, -1, h, w)
        return HeadOutput(logits, contribution, attention.view(b, 1, h, w), False)
