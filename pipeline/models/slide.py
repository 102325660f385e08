"""The slide level: a slide's tile embeddings on its tile grid, a grid encoder, and one registered head.

A slide whose tiles a backbone has embedded (one D-vector per tile) is a B×D×h×w grid — the slide's
tile grid — with a B×1×h×w bool mask, True where a position holds a tissue tile; the other positions
are holes. ``SlideModel`` is the slide-level counterpart of ``InstanceModel``: a grid encoder in place
of the timm backbone, and the same registered heads (``pipeline.models.heads.HEADS``), which receive
the mask in ``extra["mask"]`` and honour it as ``Head``'s mask contract says. Nothing here or in the
heads asks which head or which scale it is:

    model = create_slide_model("gated", num_classes=2, in_dim=512)
    out = model(grid, mask)        # HeadOutput on the tile grid: logits B×K, contribution B×K×h×w, …
    SlideModel.from_config(json.loads(json.dumps(model.config())))   # the same architecture again
"""

from __future__ import annotations

import copy
import inspect
import numbers
from typing import Any

import torch
from torch import nn

from ..errors import GaplessError
from .heads import Head, HeadOutput, fill_holes, get_head_class, position_mask

__all__ = ["SlideEncoder", "SlideModel", "create_slide_model"]

SUPPORTED = (
    "the slide encoder takes no backbone_kwargs but block_args={'attn_layer': A}, A a mask-aware module "
    "class (A(channels), forward(x, mask), e.g. GateRecordingCbam as the cbam head asks); "
    "use another head at the slide level"
)


def _attn_layer(head_cls: type[Head]) -> type[nn.Module] | None:
    """The module class the head asks for in ``backbone_kwargs`` (``block_args={"attn_layer": A}``), or
    None when it asks for nothing; GaplessError naming the head for anything the encoder cannot build."""
    kwargs = dict(head_cls.backbone_kwargs)
    if not kwargs:
        return None
    block_args = kwargs.pop("block_args", None)
    layer = block_args.get("attn_layer") if isinstance(block_args, dict) else None
    mask_aware = (isinstance(layer, type) and issubclass(layer, nn.Module)
                  and "mask" in inspect.signature(layer.forward).parameters)
    if kwargs or not isinstance(block_args, dict) or set(block_args) != {"attn_layer"} or not mask_aware:
        raise GaplessError(
            None,
            f"head {head_cls.name!r} asks its backbone for {head_cls.backbone_kwargs!r}, which the slide-level "
            "grid encoder cannot build",
            SUPPORTED,
        )
    return layer


class SlideEncoder(nn.Module):
    """The grid encoder: a 1×1 conv D → ``dim`` + ReLU + Dropout on every position (CLAM's first fully
    connected layer, applied per tile), its output 0 at holes; then, when a head asks for it
    (``attn_layer``, cbam's ``GateRecordingCbam``), one mask-aware attention block at ``dim`` —
    the CBAM block's channel gate from the mean and max over the valid positions, its spatial gate a
    7×7 conv over the grid, gate × features, holes still 0 — where the head's ``prepare_backbone`` and
    ``read_backbone`` find it exactly as in a ResNet.

    ``forward(grid B×D×h×w, mask B×1×h×w bool or None) -> B×dim×h×w``. Holes are filled with 0 on the
    way in, so what they held never matters (the projection's bias and the ReLU would otherwise give
    them a value: they are filled again on the way out).
    """

    def __init__(self, in_dim: int, dim: int = 128, dropout: float = 0.25, attn_layer: type[nn.Module] | None = None):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.attn = None if attn_layer is None else attn_layer(dim)

    def forward(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = fill_holes(self.drop(self.act(self.proj(fill_holes(grid, mask)))), mask)
        if self.attn is not None:
            x = self.attn(x, mask=mask)
        return x


class SlideModel(nn.Module):
    """Grid encoder + registered head; ``forward(grid B×D×h×w, mask B×1×h×w bool) -> HeadOutput``.

    The slide-level counterpart of ``InstanceModel``: ``contribution`` and ``attention`` are on the
    slide's tile grid (one cell per tile), 0 at holes. ``forward_features(grid, mask)`` gives the
    encoder's B×dim×h×w output (the features the head receives) and ``extra`` (``"mask"`` and what
    ``head.read_backbone`` reads from the encoder), so Grad-CAM (``pipeline.heatmap.gradcam``) runs as on
    a tile. The head's class attributes are honoured as for a timm backbone: ``backbone_kwargs`` build
    the encoder (see ``SlideEncoder``; anything else it cannot build is a GaplessError naming the head),
    ``prepare_backbone`` checks it; a head that ``accepts_stage_channels`` gets ``stage_channels=()``
    (one stage at the slide level). ``config()`` / ``from_config`` record and rebuild the architecture.
    """

    def __init__(
        self,
        head: str,
        num_classes: int,
        in_dim: int,
        dim: int = 128,
        dropout: float = 0.25,
        head_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        for what, value in (("in_dim", in_dim), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise GaplessError(None, f"slide model: {what} is {value!r}", f"pass a positive integer {what}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise GaplessError(None, f"slide model: dropout is {dropout!r}", "pass a dropout in [0, 1)")
        in_dim, dim, dropout = int(in_dim), int(dim), float(dropout)  # (numpy scalars: JSON-able config)
        num_classes = int(num_classes) if isinstance(num_classes, numbers.Integral) else num_classes
        head_cls = get_head_class(head)
        head_kw = dict(head_kwargs or {})
        self._config = {"head": head, "num_classes": num_classes, "in_dim": in_dim, "dim": dim,
                        "dropout": dropout, "head_kwargs": copy.deepcopy(head_kw)}
        if head_cls.accepts_stage_channels:
            if tuple(head_kw.get("stage_channels", ())):
                raise GaplessError(None, f"head {head!r} given stage_channels {head_kw['stage_channels']!r} at the "
                                         "slide level", "leave stage_channels out: a slide grid has one stage")
            head_kw["stage_channels"] = ()
        self.in_dim = in_dim
        self.encoder = SlideEncoder(in_dim, dim, dropout, attn_layer=_attn_layer(head_cls))
        self.head = head_cls(dim, num_classes, **head_kw)
        if self.head.feature_stages > 1:  # (a head reading earlier stages without stage_channels)
            raise GaplessError(None, f"head {head!r} reads {self.head.feature_stages - 1} earlier stage(s); a slide "
                                     "grid has one stage", "build the head on its final map only (head_kwargs)")
        self.head.prepare_backbone(self.encoder, "slide encoder")

    def config(self) -> dict[str, Any]:
        """What rebuilds this architecture: {head, num_classes, in_dim, dim, dropout, head_kwargs} (JSON-able
        as far as the head's keyword arguments are; ``class_prior`` as a list)."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SlideModel:
        """The model ``config()`` describes, freshly initialised (load its state dict for the weights)."""
        keys = {"head", "num_classes", "in_dim", "dim", "dropout", "head_kwargs"}
        needed = {"head", "num_classes", "in_dim"}
        if not isinstance(config, dict) or not needed <= set(config) <= keys:
            got = sorted(config) if isinstance(config, dict) else type(config).__name__
            raise GaplessError(None, f"slide model config has keys {got}",
                               f"give head, num_classes and in_dim, and optionally {sorted(keys - needed)} "
                               "(SlideModel.config() writes them)")
        return cls(**config)

    def forward_features(
        self, grid: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The encoder's output B×dim×h×w (0 at holes) and ``extra``: ``"mask"`` and what the head reads."""
        if grid.ndim != 4 or grid.shape[1] != self.in_dim:
            width = grid.shape[1] if grid.ndim == 4 else "D"
            raise GaplessError(
                None,
                f"slide grid of shape {tuple(grid.shape)}, the model takes B×{self.in_dim}×h×w",
                f"embed the tiles with the backbone the model was built for, or build it with in_dim={width}",
            )
        mask = position_mask({"mask": mask}, grid)
        features = self.encoder(grid, mask)
        extra: dict[str, Any] = {"mask": mask}
        extra.update(self.head.read_backbone(self.encoder))
        return features, extra

    def forward(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> HeadOutput:
        features, extra = self.forward_features(grid, mask)
        return self.head(features, extra)


def create_slide_model(
    head: str, num_classes: int, in_dim: int, dim: int = 128, dropout: float = 0.25, **head_kw: Any
) -> SlideModel:
    """Build ``SlideModel(grid encoder D=in_dim → dim, registered head)``.

    in_dim: the tile embeddings' width D (the tile backbone's ``num_features``). dim: the encoder's
    width, the channels the head receives. dropout: after the encoder's ReLU (CLAM uses 0.25).
    head_kw: the head's own keyword arguments (``class_prior``, ``hidden``, ``num_heads``, …).
    """
    return SlideModel(head, num_classes, in_dim, dim=dim, dropout=dropout, head_kwargs=head_kw)
