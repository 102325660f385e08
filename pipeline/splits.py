"""Splitting a cohort into train, validation and test by group, and saying when a split is useless.

Kept apart from :mod:`pipeline.data` (torch, albumentations) so that the workflow can check every
cohort's split when it is parsed, before any job runs: a training split without a class cannot learn
it, and a class in neither validation nor test is never measured (both refused); a validation or test
split without a class gives no AUROC there (said on the console).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import GaplessError
from pipeline.samples import SPLITS, Sample

log = logging.getLogger("gapless.splits")

SPLIT_FIX = ("give the samples more groups (one patient or plate per group), fix the split with a `split` column "
             "in the sample sheet, or change the split fractions (train.split / --split)")

def split_samples(samples: Sequence[Sample], seed: int, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> dict[str, str]:
    """Assign every sample to ``train``, ``val`` or ``test``; return ``{sample_id: split}`` in sheet order.

    A sample's fixed ``split`` (sample sheet column) is kept, and its whole group follows it. The
    other groups (``group`` column; a sample without one is its own group) are placed whole, so no
    group is on two sides: first each split receives one group of every label while enough groups
    carry that label (``train``, then ``val``, then ``test``), then the remaining groups, largest
    first, go where they bring the per-label counts closest to ``fractions``. Same seed, same split.

    A split whose fraction is 0 stays empty. Raises ``GaplessError`` when a split with a non-zero
    fraction would be empty (too few groups) or a group is fixed to two splits; whether each split
    holds every class is for :func:`check_split` to say.
    """
    fr = _check_fractions(fractions)
    wanted = [s for s, f in zip(SPLITS, fr) if f > 0]
    if not samples:
        raise GaplessError(None, "no samples to split", "check the sample sheet")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        twice = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise GaplessError(None, f"sample ids given twice: {', '.join(twice)}", "make every sample_id unique")
    plan = _Groups(samples, wanted)
    plan.place_fixed()
    rng = np.random.default_rng(seed)
    free = [k for k in plan.members if k not in plan.assigned]
    plan.free = [free[i] for i in rng.permutation(len(free))]
    if len(plan.members) < len(wanted):
        n = len(plan.members)
        raise GaplessError(
            None,
            f"{n} group{'s' if n != 1 else ''} (patients/plates, or samples without a group) "
            f"cannot fill {len(wanted)} splits ({', '.join(wanted)}): no group may be on two sides",
            "add samples, set fractions to 0 for a split you do not need, or fix `split` in the sample sheet",
        )
    plan.one_of_each_label()
    plan.balance_the_rest(fr)
    empty = [split for split in wanted if plan.size[split] == 0]
    if empty:
        raise GaplessError(
            None,
            f"split {', '.join(empty)} would be empty: every group is fixed to another split",
            "leave `split` blank for some samples, or set the fraction of that split to 0",
        )
    result = {s.sample_id: plan.assigned[key] for key, group in plan.members.items() for s in group}
    return {i: result[i] for i in ids}


class _Groups:
    """The groups of a cohort and where each has been placed so far (``split_samples``'s working state)."""

    def __init__(self, samples: Sequence[Sample], wanted: list[str]):
        # group key: ("g", name) for a named group, ("s", id) for a sample on its own, so the two never clash
        self.members: dict[tuple[str, str], list[Sample]] = {}
        for s in samples:
            self.members.setdefault(("g", s.group) if s.group else ("s", s.sample_id), []).append(s)
        self.wanted = wanted
        self.labels = sorted({s.label for s in samples})
        self.total = Counter(s.label for s in samples)
        self.counts = {split: Counter() for split in SPLITS}
        self.size = {split: 0 for split in SPLITS}
        self.assigned: dict[tuple[str, str], str] = {}
        self.composition = {key: Counter(s.label for s in group) for key, group in self.members.items()}
        self.free: list[tuple[str, str]] = []  # the groups not fixed by the sheet, in the seed's order

    def assign(self, key, split) -> None:
        self.assigned[key] = split
        for s in self.members[key]:
            self.counts[split][s.label] += 1
        self.size[split] += len(self.members[key])

    def place_fixed(self) -> None:
        """Groups with a fixed ``split`` go there; a group fixed to two splits is an error."""
        for key, group in self.members.items():
            fixed = sorted({s.split for s in group if s.split})
            if len(fixed) > 1:
                raise GaplessError(
                    None, f"group {key[1]!r} is fixed to more than one split ({', '.join(fixed)})",
                    "give every sample of a group the same `split`, or none",
                )
            if fixed:
                self.assign(key, fixed[0])

    def unplaced(self) -> list:
        return [k for k in self.free if k not in self.assigned]

    def one_of_each_label(self) -> None:
        """Phase 1: one group of each label per split, scarcest label first, while enough groups carry it;
        then a split still empty takes the smallest free group."""

        def carriers(label):
            return [k for k in self.unplaced() if label in self.composition[k]]

        def can_spare(split) -> bool:  # giving `split` one more group still leaves one for every empty split
            left = len(self.unplaced()) - 1
            return left >= sum(1 for other in self.wanted if other != split and self.size[other] == 0)

        for label in sorted(self.labels, key=lambda lab: (len(carriers(lab)), lab)):
            for split in self.wanted:
                if self.counts[split][label] > 0 or not can_spare(split):
                    continue
                candidates = carriers(label)
                if not candidates:
                    break
                # a pure, small group leaves the most freedom for phase 2
                self.assign(min(candidates, key=lambda k: (len(self.composition[k]) > 1, len(self.members[k]))), split)
        for split in self.wanted:
            if self.size[split] == 0:
                rest = self.unplaced()
                if rest:
                    self.assign(min(rest, key=lambda k: len(self.members[k])), split)

    def balance_the_rest(self, fractions: list[float]) -> None:
        """Phase 2: the rest, largest groups first, each where it brings the counts closest to the targets."""
        target = {split: {lab: f * self.total[lab] for lab in self.labels} for split, f in zip(SPLITS, fractions)}
        rest = sorted(self.unplaced(), key=lambda k: -len(self.members[k]))  # stable: keeps the seed's order
        for key in rest:
            comp = self.composition[key]

            def cost(split):
                counts, goal = self.counts[split], target[split]
                change = sum(((counts[lab] + comp[lab] - goal[lab]) ** 2 - (counts[lab] - goal[lab]) ** 2) / self.total[lab]
                             for lab in comp)
                deficit = sum(goal[lab] - counts[lab] for lab in self.labels)
                return (change, -deficit)

            self.assign(key, min(self.wanted, key=cost))


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    values = [float(f) for f in fractions]
    if len(values) != len(SPLITS) or any(not math.isfinite(f) or f < 0 for f in values) or sum(values) <= 0:
        raise GaplessError(
            None, f"split fractions must be three non-negative numbers for {', '.join(SPLITS)}, got {list(fractions)}",
            "e.g. [0.6, 0.2, 0.2]",
        )
    return [f / sum(values) for f in values]


@dataclass(frozen=True)
class SplitCheck:
    """A cohort's split for one seed and what is wrong with it.

    ``errors``: the training split lacks a class (the model cannot learn it), or validation and test
    both lack one (nothing would measure it): training is refused. ``warnings``: validation or test
    alone lacks a class (its AUROC is undefined; the checkpoint is then chosen by balanced accuracy,
    or the run has no test AUROC): training goes on, and the workflow says so on the console.
    """

    assignment: dict[str, str]  # sample_id → train | val | test
    description: str  # "train 4 (negative 2, positive 2); val 2 (...); test 2 (...)"
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def check_split(samples: Sequence[Sample], seed: int, fractions: Sequence[float], classes: Sequence[str]) -> SplitCheck:
    """Split ``samples`` (:func:`split_samples`) and check that each split holds what it is used for."""
    assignment = split_samples(samples, seed, fractions)
    label = {s.sample_id: s.label for s in samples}
    counts = {name: Counter(label[i] for i, split in assignment.items() if split == name) for name in SPLITS}
    description = "; ".join(
        f"{name} {sum(counts[name].values())} (" + ", ".join(f"{c} {counts[name][c]}" for c in classes) + ")"
        for name in SPLITS
    )
    wanted = [name for name, f in zip(SPLITS, _check_fractions(fractions)) if f > 0]
    present = [c for c in classes if any(label[i] == c for i in label)]
    missing = {name: [c for c in present if counts[name][c] == 0] for name in wanted}
    errors, gaps = [], []

    def names(labels):
        return " or ".join(repr(c) for c in labels)

    if missing.get("train"):
        errors.append(f"seed {seed}: the training split has no {names(missing['train'])} sample, so the model cannot "
                      f"learn {'that class' if len(missing['train']) == 1 else 'those classes'} (split: {description})")
    evaluation = [name for name in ("val", "test") if name in wanted]
    unseen = [c for c in present if evaluation and all(c in missing[name] for name in evaluation)]
    if unseen:
        errors.append(f"seed {seed}: neither validation nor test has a {names(unseen)} sample, so nothing measures "
                      f"how the model finds {'it' if len(unseen) == 1 else 'them'} (split: {description})")
    if not errors:
        if missing.get("val"):
            gaps.append(f"validation has no {names(missing['val'])} sample (no validation AUROC: the checkpoint is "
                        "chosen by balanced accuracy)")
        if missing.get("test"):
            gaps.append(f"test has no {names(missing['test'])} sample (no test AUROC)")
    warnings = [f"seed {seed}: " + "; ".join(gaps) + f" (split: {description})"] if gaps else []
    log.info("split %d samples (seed %d): %s", len(samples), seed, description)
    return SplitCheck(assignment, description, tuple(errors), tuple(warnings))
