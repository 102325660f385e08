"""What a slide-level training run is: ``SlideTrainSettings``, one field per setting (``gapless
train-slides`` flag and key of the config's ``slide_level.train`` section).

Kept apart from the training code (which imports torch) so the command line and the workflow start fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import GaplessError
from pipeline.settings import json_object, positive_int, setting


@dataclass
class SlideTrainSettings:
    """A slide-level run: one registered head over each slide's tile embeddings laid on its tile grid,
    trained from slide labels alone (units: epochs, slides)."""

    head: str = setting("gap", help="a registered head (gap | max | cbam | attnpool | saol | ltpa | gated | …)")
    seed: int = setting(0, help="fixes the split (unless --split-seed), the initialisation and the slide order")
    split_seed: int | None = setting(None, help="the seed of the group-aware split (default: --seed); the workflow "
                                                "passes the seed whose tile-level model encoded the embeddings")
    epochs: int = setting(30, help="training epochs")
    steps_per_epoch: int | None = setting(None, help="optimiser steps per epoch, slides drawn class-balanced "
                                                     "(default: as many as the training slides / batch size)")
    batch_size: int = setting(1, help="slides per step (several: their grids padded to the largest, holes masked)")
    lr: float = setting(2e-4, help="peak AdamW learning rate (after warm-up; then cosine decay)")
    weight_decay: float = setting(1e-4, help="AdamW weight decay")
    warmup_epochs: float = setting(1.0, help="linear warm-up length in epochs")
    grad_clip: float = setting(1.0, help="gradient norm clip")
    dim: int = setting(128, help="width of the grid encoder (a 1×1 conv from the embedding width, then ReLU)")
    dropout: float = setting(0.25, help="dropout after the grid encoder")
    split_fractions: tuple[float, float, float] = setting(
        (0.5, 0.25, 0.25), key="split", metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of groups per split when the sheet has no split column")
    threads: int | None = setting(2, parse=positive_int, help="CPU threads (torch)")
    device: str = setting("auto", help="auto (CUDA when present) | cuda | cpu")
    head_kwargs: dict = setting(default_factory=dict, parse=json_object,
                                help='the head\'s own options as JSON, e.g. \'{"hidden": 64}\'')

    def validate(self) -> "SlideTrainSettings":
        """``self`` when every value is usable; one ``GaplessError`` naming each bad one otherwise."""
        problems = []

        def need(ok: bool, flag: str, value, rule: str) -> None:
            if not ok:
                problems.append(f"--{flag} must be {rule}, got {value!r}")

        finite = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        whole = lambda v, lo: isinstance(v, int) and not isinstance(v, bool) and v >= lo  # noqa: E731
        need(whole(self.epochs, 1), "epochs", self.epochs, "a whole number of 1 or more")
        need(whole(self.batch_size, 1), "batch-size", self.batch_size, "a whole number of 1 or more")
        need(self.steps_per_epoch is None or whole(self.steps_per_epoch, 1), "steps-per-epoch", self.steps_per_epoch,
             "1 or more")
        need(self.split_seed is None or whole(self.split_seed, 0), "split-seed", self.split_seed, "0 or more")
        need(finite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        need(finite(self.weight_decay) and self.weight_decay >= 0, "weight-decay", self.weight_decay, "0 or more")
        need(finite(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup-epochs", self.warmup_epochs, "0 or more")
        need(finite(self.grad_clip) and self.grad_clip > 0, "grad-clip", self.grad_clip, "a positive number")
        need(whole(self.dim, 1), "dim", self.dim, "a whole number of 1 or more")
        need(finite(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        need(self.device in ("auto", "cuda", "cpu"), "device", self.device, "auto, cuda or cpu")
        fractions = list(self.split_fractions)
        need(len(fractions) == 3 and all(finite(f) and f >= 0 for f in fractions) and sum(fractions) > 0, "split",
             fractions, "three numbers of 0 or more for train, val and test, not all 0")
        need(isinstance(self.head_kwargs, dict), "head-kwargs", self.head_kwargs, "a JSON object")
        if problems:
            raise GaplessError(None, "; ".join(problems),
                               "fix the value (in the workflow: the `slide_level.train` section of the config)")
        return self
