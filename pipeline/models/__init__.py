"""Models: a timm backbone and one of several heads that score many-instance images and map them.

    model = create_model("resnet18", "saol", num_classes=2, in_chans=3, pretrained=False)
    out = model(images)            # HeadOutput: logits B×K, contribution B×K×h×w, attention, …
    loss = F.nll_loss(out.logits, y) if out.scores_are_log_probs else F.cross_entropy(out.logits, y)

Heads (``HEADS``): gap, max, cbam, attnpool, gated, ltpa, saol. Add one with ``@register_head("name")``
on a ``Head`` subclass (in heads.py, or in a module of its own imported here, as ltpa.py); nothing else
changes.

The same heads serve the slide level, where a slide's tile embeddings lie on its tile grid with holes
where there is no tissue (``extra["mask"]``, see ``Head``):

    model = create_slide_model("gated", num_classes=2, in_dim=512)   # grid encoder + head
    out = model(grid, mask)        # grid B×512×h×w, mask B×1×h×w bool (True at tissue tiles)
"""

from .backbone import create_backbone, earlier_stage_indices, load_backbone_weights
from .heads import (
    HEADS,
    AttnPoolHead,
    CbamHead,
    GapHead,
    Head,
    HeadOutput,
    MaxHead,
    create_head,
    get_head_class,
    head_catalog,
    register_head,
)
from .layers import ClassAttention, ClassAttentionBlock, GateRecordingCbam
from .gated import GatedAttentionHead
from .ltpa import LtpaHead
from .model import InstanceModel, create_model
from .saol import SaolHead
from .slide import SlideEncoder, SlideModel, create_slide_model

__all__ = [
    "HEADS",
    "AttnPoolHead",
    "CbamHead",
    "ClassAttention",
    "ClassAttentionBlock",
    "GapHead",
    "GateRecordingCbam",
    "GatedAttentionHead",
    "Head",
    "HeadOutput",
    "InstanceModel",
    "LtpaHead",
    "MaxHead",
    "SaolHead",
    "SlideEncoder",
    "SlideModel",
    "create_backbone",
    "create_head",
    "create_model",
    "create_slide_model",
    "earlier_stage_indices",
    "get_head_class",
    "head_catalog",
    "load_backbone_weights",
    "register_head",
]
