"""What a training run is: ``TrainSettings``, one field per setting (``gapless train`` flag and key of
the config's ``train`` section).

Kept apart from ``pipeline.train`` (which imports torch and albumentations) so that the command line and
the workflow, which read the fields to build flags and ``--settings`` JSON, start in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import GaplessError
from pipeline.settings import json_object, positive_int, setting


def _pretrained(text: str) -> bool | str:
    return {"false": False, "true": True}.get(text.lower(), text)


@dataclass
class TrainSettings:
    """What a training run is: model, optimisation and data choices (units: epochs, px, samples).

    Each field is a ``gapless train`` flag and a key of the config's ``train`` section (see
    ``pipeline.settings``); a new setting is a field here and its entry in ``config/schema.yaml``.
    """

    backbone: str = setting("resnet10t", help="timm model name")
    head: str = setting("gap", help="a registered head: gap | max | cbam | attnpool | ltpa | saol, or one you add")
    seed: int = setting(0, help="fixes the split, the initialisation and the data order")
    pretrained: bool | str = setting(False, parse=_pretrained, metavar="false|true|FILE",
                                     help="false (from scratch) | true (timm hub) | a local weights file")
    kind: str = setting("slide", choices=("slide", "image"),
                        help="which samples form the cohort (slides and images have different channels)")
    epochs: int = setting(4, help="training epochs")
    batch_size: int = setting(64, help="tiles per batch")
    lr: float = setting(1e-3, help="peak AdamW learning rate (after warm-up; then cosine decay)")
    weight_decay: float = setting(0.05, help="AdamW weight decay")
    warmup_epochs: float = setting(1.0, help="linear warm-up length in epochs")
    grad_clip: float = setting(1.0, help="gradient norm clip")
    image_size: int | None = setting(None, help="px fed to the model (default: the tile size)")
    max_batch_pixels: int | None = setting(None, help="at most this many pixels (images × side²) per forward pass: "
                                                      "a larger batch goes through in chunks whose gradients add up "
                                                      "(the same optimiser step), so whole fields fit in memory "
                                                      "(default: the whole batch at once)")
    steps_per_epoch: int | None = setting(None, help="batches per epoch, drawn class-balanced (default: one pass over "
                                                     "the training tiles)")
    split_fractions: tuple[float, float, float] = setting(
        (0.5, 0.25, 0.25), key="split", metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of groups per split when the sheet has no split column")
    threads: int | None = setting(2, parse=positive_int, help="CPU threads: torch threads and data-loader workers")
    device: str = setting("auto", help="auto (CUDA when present) | cuda | cpu")
    devices: int = setting(1, help="devices training one model (DistributedDataParallel, one process each, started "
                                   "with torchrun): GPUs on CUDA, gloo processes on the CPU; batch-size is split among them")
    workers: int | None = None  # data-loader processes; None: from ``threads`` (see loader_workers); no flag
    head_kwargs: dict = setting(default_factory=dict, parse=json_object,
                                help='the head\'s own options as JSON, e.g. \'{"num_heads": 2}\'')
    backbone_kwargs: dict = setting(default_factory=dict, parse=json_object,
                                    help='extra timm.create_model arguments for the backbone as JSON, e.g. a narrower '
                                         'ResNet \'{"channels": [32, 64, 128, 256], "stem_width": 16}\' '
                                         '(a head\'s own, e.g. cbam\'s block_args, take precedence)')
    accept_flagged: bool = setting(False, help="train on tile stores that QC flagged (e.g. annotations off the tissue) "
                                               "instead of refusing them")

    def validate(self) -> "TrainSettings":
        """``self`` when every value is usable; one ``GaplessError`` naming each bad one otherwise."""
        problems = []

        def need(ok: bool, flag: str, value, rule: str) -> None:
            if not ok:
                problems.append(f"--{flag} must be {rule}, got {value!r}")

        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "a whole number of 1 or more")
        need(isinstance(self.batch_size, int) and self.batch_size >= 2, "batch-size", self.batch_size,
             "a whole number of 2 or more (batch norm needs two)")
        need(finite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        need(self.max_batch_pixels is None or (isinstance(self.max_batch_pixels, int) and self.max_batch_pixels >= 1),
             "max-batch-pixels", self.max_batch_pixels, "a whole number of pixels, e.g. 4000000, or null")
        need(finite(self.weight_decay) and self.weight_decay >= 0, "weight-decay", self.weight_decay, "0 or more")
        need(finite(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup-epochs", self.warmup_epochs, "0 or more")
        need(finite(self.grad_clip) and self.grad_clip > 0, "grad-clip", self.grad_clip, "a positive number")
        need(self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 16), "image-size",
             self.image_size, "at least 16 px")
        need(self.steps_per_epoch is None or (isinstance(self.steps_per_epoch, int) and self.steps_per_epoch >= 1),
             "steps-per-epoch", self.steps_per_epoch, "1 or more")
        need(self.device in ("auto", "cuda", "cpu"), "device", self.device, "auto, cuda or cpu")
        need(isinstance(self.devices, int) and self.devices >= 1, "devices", self.devices, "a whole number of 1 or more")
        if isinstance(self.devices, int) and self.devices > 1 and isinstance(self.batch_size, int):
            need(self.batch_size % self.devices == 0 and self.batch_size // self.devices >= 2, "batch-size",
                 self.batch_size, f"a multiple of --devices ({self.devices}) with at least 2 tiles per device")
        need(self.kind in ("slide", "image"), "kind", self.kind, "slide or image")
        fractions = list(self.split_fractions)
        need(len(fractions) == 3 and all(finite(f) and f >= 0 for f in fractions) and sum(fractions) > 0, "split",
             fractions, "three numbers of 0 or more for train, val and test, not all 0")
        need(isinstance(self.head_kwargs, dict), "head-kwargs", self.head_kwargs, "a JSON object")
        need(isinstance(self.backbone_kwargs, dict), "backbone-kwargs", self.backbone_kwargs, "a JSON object")
        if problems:
            raise GaplessError(None, "; ".join(problems), "fix the value (in the workflow: the `train` section of the config)")
        return self
