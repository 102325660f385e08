"""timm backbones as feature extractors: build one, load local weights into it, find its stages.

``create_backbone`` calls ``timm.create_model(name, pretrained=…, num_classes=0, global_pool='',
in_chans=…)``: no classifier, no pooling, so ``forward_features`` gives B×C×h×w. ``in_chans`` ≠ 3
(e.g. 2-channel fluorescence) is timm's stem adaptation: a fresh stem, or with timm hub weights the
RGB stem filters repeated/scaled by ``timm.models.adapt_input_conv``; local files get the same.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import nn

from ..errors import GaplessError

__all__ = ["create_backbone", "earlier_stage_indices", "load_backbone_weights"]

log = logging.getLogger(__name__)

WEIGHTS_FIX = (
    "pass a state dict saved from the same timm backbone "
    "(safetensors.torch.save_file(timm.create_model(NAME, num_classes=0).state_dict(), PATH)), "
    "a gapless model checkpoint, or pretrained=True for timm's hub weights"
)


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    pretrained: bool | str | Path = False,
    requirement: str = "",
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model without classifier or pooling.

    pretrained: False (random init), True (timm hub, downloads), or the path of a local weights file
    (.safetensors, .pth, .pt, .bin) loaded with ``load_backbone_weights``. timm_kwargs go to
    ``timm.create_model`` (a head's ``backbone_kwargs``); ``requirement`` is the fix printed when the
    backbone does not accept them.
    """
    local = pretrained if isinstance(pretrained, (str, Path)) else None
    hub = pretrained is True
    if local is not None and not Path(local).is_file():
        raise GaplessError(local, "weights file not found", WEIGHTS_FIX.replace("NAME", repr(name)))
    # With extra timm kwargs the hub weights lack the added modules: load them through our checked path.
    backbone = _timm_create(name, in_chans, hub and not timm_kwargs, requirement, timm_kwargs)
    fresh_ok = _keys_added(backbone, name, in_chans) if timm_kwargs and (hub or local) else set()
    if hub and timm_kwargs:
        plain = _timm_create(name, in_chans, True, requirement, {})
        _load_checked(backbone, plain.state_dict(), f"timm hub weights of {name}", name, in_chans, fresh_ok)
    elif local is not None:
        load_backbone_weights(backbone, local, name=name, in_chans=in_chans, fresh_ok=fresh_ok)
    return backbone


def _timm_create(
    name: str, in_chans: int, pretrained: bool, requirement: str, kwargs: dict[str, Any]
) -> nn.Module:
    if not timm.is_model(name):
        raise GaplessError(None, f"unknown timm backbone {name!r}", "pick a name from timm.list_models()")
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=0, global_pool="", in_chans=in_chans, **kwargs
        )
    except TypeError as err:  # the architecture's constructor does not take the head's kwargs
        if not kwargs:
            raise
        raise GaplessError(
            None, f"backbone {name!r} cannot be built with {sorted(kwargs)} ({err})", requirement or None
        ) from err


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    *,
    name: str = "",
    in_chans: int = 3,
    fresh_ok: Collection[str] = (),
) -> None:
    """Load a local weights file into ``backbone``, or raise GaplessError naming the file, cause and fix.

    Accepted: a backbone state dict; a full timm checkpoint (its classifier is dropped, EMA weights
    preferred, DDP/compile prefixes removed); a gapless ``InstanceModel`` state dict (the
    ``backbone.`` part is used). An RGB stem is adapted to ``in_chans``. Keys in ``fresh_ok`` (what a
    head added to the backbone, e.g. CBAM) may be absent from the file and keep their initialisation;
    any other missing, unexpected or mis-shaped tensor is an error.
    """
    path = Path(path)
    fix = WEIGHTS_FIX.replace("NAME", repr(name or "…"))
    if not path.is_file():
        raise GaplessError(path, "weights file not found", fix)
    try:
        state = _read_state_dict(path)
    except Exception as err:  # corrupt, not a checkpoint, pickled objects refused by weights_only, …
        raise GaplessError(path, f"cannot read weights ({type(err).__name__}: {err})", fix) from err
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GaplessError(path, "file holds no state dict of tensors", fix)
    if any(k.startswith("backbone.") for k in state):  # a whole InstanceModel: keep its backbone
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    _load_checked(backbone, state, str(path), name, in_chans, set(fresh_ok))


def _read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors by name from .safetensors, or from a torch file (tensors only: ``weights_only``)."""
    if path.suffix == ".safetensors":
        checkpoint: Any = load_file(str(path), device="cpu")
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict):  # training checkpoints as timm writes them; EMA weights first
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        return {}
    return {_strip_wrappers(k): v for k, v in checkpoint.items()}


def _strip_wrappers(key: str) -> str:
    """Remove DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes, nested either way."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
    return key


def _load_checked(
    backbone: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    name: str,
    in_chans: int,
    fresh_ok: set[str],
) -> None:
    expected = backbone.state_dict()
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    classifiers = cfg.get("classifier") or ()
    for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
        for key in [k for k in state if k.startswith(prefix + ".") and k not in expected]:
            del state[key]  # num_classes=0 backbone: the checkpoint's classifier has nowhere to go
    first_conv = cfg.get("first_conv")
    for prefix in (first_conv,) if isinstance(first_conv, str) else (first_conv or ()):
        key = prefix + ".weight"
        if key in state and key in expected and state[key].shape != expected[key].shape:
            rgb_stem = state[key].ndim == 4 and state[key].shape[1] == 3
            if rgb_stem and state[key].shape[0] == expected[key].shape[0]:
                state[key] = adapt_input_conv(in_chans, state[key])  # timm's own rule: repeat and rescale

    # BatchNorm step counters are not weights; some exporters drop them
    optional = fresh_ok | {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)}≠{tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise GaplessError(
            source,
            f"weights do not fit backbone {name or type(backbone).__name__!r}: " + "; ".join(problems),
            WEIGHTS_FIX.replace("NAME", repr(name or "…")),
        )
    fresh = [k for k in expected if k not in state]
    backbone.load_state_dict(state, strict=False)
    log.info("loaded %d backbone tensors from %s (%d kept fresh)", len(state), source, len(fresh))


def _keys_added(backbone: nn.Module, name: str, in_chans: int) -> set[str]:
    """State-dict keys ``backbone`` has that the plain timm ``name`` lacks (built on the meta device)."""
    with torch.device("meta"):
        plain = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans)
    return set(backbone.state_dict()) - set(plain.state_dict())


def earlier_stage_indices(backbone: nn.Module) -> list[int]:
    """Indices into ``backbone.feature_info`` of the stages finer than the final map, shallow → deep.

    ResNet: stem, layer1, layer2, layer3 (layer4 is the final map); EfficientNet: the blocks at
    reduction 2-16 (its reduction-32 block feeds conv_head, which is the final map).
    """
    info = list(getattr(backbone, "feature_info", None) or [])
    if not info:
        return []
    final = info[-1]["reduction"]
    return [i for i, stage in enumerate(info) if stage["reduction"] < final]
