"""A timm backbone and a head as one module: image batch in, ``HeadOutput`` out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import GaplessError
from .backbone import create_backbone, earlier_stage_indices
from .heads import Head, HeadOutput, get_head_class

__all__ = ["InstanceModel", "create_model"]


class InstanceModel(nn.Module):
    """timm backbone (``forward_features`` → B×C×h×w) + head; ``forward(x) -> HeadOutput``.

    x is B×in_chans×H×W; h×w is the backbone's grid (H/32 × W/32 for ResNets, rounded up), the grid
    every ``contribution`` and ``attention`` map is on. A head with ``feature_stages`` = n > 1 gets the
    n − 1 deepest earlier stages in ``extra["stages"]`` from one ``forward_intermediates`` pass; a head
    that records inside the backbone (cbam) gets its recording through ``head.read_backbone``.
    """

    def __init__(self, backbone: nn.Module, head: Head, backbone_name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_name = backbone_name or type(backbone).__name__
        self.stage_indices: list[int] = []
        if head.feature_stages > 1:
            earlier = earlier_stage_indices(backbone)
            wanted = head.feature_stages - 1
            if len(earlier) < wanted or not hasattr(backbone, "forward_intermediates"):
                raise GaplessError(
                    None,
                    f"head {head.name!r} fuses {wanted} earlier stage(s) but backbone "
                    f"{self.backbone_name!r} exposes {len(earlier)} through forward_intermediates",
                    "build the head on the final stage only (saol: fuse_stages=1, ltpa: attention_stages=1, "
                    "in train.head_kwargs), or use a backbone with feature_info (resnet, efficientnet, …)",
                )
            self.stage_indices = earlier[-wanted:]
        head.prepare_backbone(backbone, self.backbone_name)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The final feature map B×C×h×w and the ``extra`` dict the head asked for."""
        extra: dict[str, Any] = {}
        if self.stage_indices:
            features, stages = self.backbone.forward_intermediates(x, indices=self.stage_indices)
            extra["stages"] = list(stages)
        else:
            features = self.backbone.forward_features(x)
        if features.ndim != 4:
            raise GaplessError(
                None,
                f"backbone {self.backbone_name!r} gives features of shape {tuple(features.shape)}, "
                "not B×C×h×w",
                "use a convolutional timm backbone (resnet*, convnext*, efficientnet*, …)",
            )
        extra.update(self.head.read_backbone(self.backbone))
        return features, extra

    def forward(self, x: torch.Tensor) -> HeadOutput:
        features, extra = self.forward_features(x)
        return self.head(features, extra or None)


def create_model(
    backbone: str,
    head: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool | str | Path = False,
    backbone_kwargs: dict[str, Any] | None = None,
    **head_kw: Any,
) -> InstanceModel:
    """Build ``InstanceModel(timm backbone, registered head)``.

    backbone: a timm model name (``resnet18``, ``resnet10t``, ``convnext_tiny``, …); the head's
    ``backbone_kwargs`` go to ``timm.create_model``. pretrained: False, True (timm hub), or a local
    .safetensors/.pth/.pt weights file for the backbone (GaplessError if missing or not matching).
    in_chans: image channels (2 for two-channel fluorescence; timm adapts the stem). head_kw: the
    head's own keyword arguments (``class_prior``, ``num_heads``, ``fuse_stages``, …).
    backbone_kwargs: more ``timm.create_model`` arguments (e.g. a narrower ResNet's ``channels``); the
    head's own ``backbone_kwargs`` take precedence.
    """
    head_cls = get_head_class(head)
    net = create_backbone(
        backbone,
        in_chans=in_chans,
        pretrained=pretrained,
        requirement=head_cls.backbone_requirement,
        **{**(backbone_kwargs or {}), **head_cls.backbone_kwargs},
    )
    if head_cls.accepts_stage_channels and "stage_channels" not in head_kw:
        info = getattr(net, "feature_info", None) or []
        head_kw["stage_channels"] = tuple(info[i]["num_chs"] for i in earlier_stage_indices(net))
    return InstanceModel(net, head_cls(net.num_features, num_classes, **head_kw), backbone_name=backbone)
