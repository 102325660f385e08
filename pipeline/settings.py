"""One declaration per setting: a settings dataclass's fields give the CLI flags and read the config.

A stage's settings are a dataclass (``TrainSettings``, ``TileSettings``, ``DemoSettings``,
``HeatmapSettings``) whose fields carry their help text (:func:`setting`). From the fields:

- :func:`add_setting_flags` adds one ``gapless`` flag per field (``--batch-size`` for ``batch_size``),
  plus ``--settings JSON``; every flag defaults to "not given", so only what is typed overrides.
- :func:`settings_from_args` builds the dataclass: its defaults, then the ``--settings`` JSON (a config
  section, keyed as in the config), then the flags given.
- :func:`settings_json` is what a Snakemake rule passes as ``--settings``: the keys of a config section
  that are settings of the dataclass.

So a new setting is a field here and its entry in ``config/schema.yaml`` (whose defaults a test holds
equal to the fields'); the rules and the argument parser pick it up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import GaplessError

SETTINGS_FLAG = "--settings"


def setting(default=dataclasses.MISSING, *, help: str, default_factory=dataclasses.MISSING, **cli):
    """A settings field with its help text. ``cli`` refines its flag (all optional):

    key: the name in the config and in ``--settings`` when it is not the field's (``split`` for
        ``split_fractions``); the flag is ``--`` + key with ``-`` for ``_``.
    flag: the flag's name when it is not that (``--positive-class``, repeatable, for ``positive_classes``).
    parse: str → value, for a flag whose type the annotation does not say (``bool | str``, JSON).
    choices, metavar: as in argparse.
    """
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


def config_key(f: dataclasses.Field) -> str:
    """The name a field has in the config and in ``--settings``."""
    return f.metadata.get("key", f.name)


def setting_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are settings (carry help text); others are for library callers only."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def setting_defaults(cls) -> dict:
    """``{config key: default}`` of every setting of ``cls`` (tuples as lists, as in YAML)."""
    defaults = {}
    for f in setting_fields(cls):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        defaults[config_key(f)] = list(value) if isinstance(value, tuple) else value
    return defaults


def _hint(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = kept[0] if len(kept) == 1 else str
    return hint


def _is_tuple(cls, f: dataclasses.Field) -> bool:
    return typing.get_origin(_hint(cls, f)) is tuple


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value).lower() if isinstance(value, bool) else str(value)


def add_setting_flags(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None,
                      settings_flag: bool = True) -> None:
    """One flag per setting of ``cls`` (or of the fields named in ``only``), and ``--settings``.

    A flag left out keeps the value from ``--settings``, else the field's default (shown in the help).
    """
    if settings_flag:
        parser.add_argument(SETTINGS_FLAG, type=json_object, default=None, metavar="JSON",
                            help=f"{cls.__name__} as a JSON object keyed as in the config (a config section); "
                                 "the flags override it")
    for f in setting_fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + config_key(f).replace("_", "-")
        help_text = meta["help"].replace("%", "%%")  # argparse formats help with %: a "13 %" would break --help
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if default is not None and default != {} and default != ():
            help_text += f" (default {_shown(default)})"
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        for option in ("choices", "metavar"):
            if option in meta:
                kwargs[option] = meta[option]
        hint = _hint(cls, f)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            items = typing.get_args(hint)
            kwargs["type"] = meta.get("parse", items[0])
            if len(items) == 2 and items[1] is Ellipsis:
                kwargs["action"] = "append"  # repeat the flag, one value each
            else:
                kwargs["nargs"] = len(items)
        else:
            kwargs["type"] = meta.get("parse", hint if hint in (int, float, str) else str)
        parser.add_argument(flag, **kwargs)


def settings_from_mapping(cls, values: Mapping, source: str = SETTINGS_FLAG) -> dict:
    """``{field name: value}`` from ``values`` keyed as in the config; an unknown key is an error naming ``source``."""
    by_key = {config_key(f): f for f in setting_fields(cls)}
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise GaplessError(None, f"{source}: {', '.join(map(repr, unknown))} is not a setting of {cls.__name__}",
                           f"use only {', '.join(sorted(by_key))}")
    return {by_key[k].name: tuple(v) if isinstance(v, list) and _is_tuple(cls, by_key[k]) else v
            for k, v in values.items()}


def settings_from_args(cls, args: argparse.Namespace, **given):
    """``cls`` from its defaults, then ``args.settings`` (JSON, keyed as in the config), then the flags
    given on the command line, then ``given`` (values the command decides itself)."""
    values = settings_from_mapping(cls, getattr(args, "settings", None) or {})
    for f in setting_fields(cls):
        if f.name in vars(args):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(given)
    return cls(**values)


def settings_json(cls, section: Mapping) -> str:
    """The keys of a config ``section`` that are settings of ``cls``, as the JSON a rule passes to ``--settings``.

    Keys that only the workflow reads (``train.seeds``, ``heatmaps.threads``, …) stay out; the test of
    ``config/schema.yaml`` names each of them, so that no setting is dropped here unnoticed.
    """
    keys = {config_key(f) for f in setting_fields(cls)}
    return json.dumps({k: v for k, v in section.items() if k in keys}, sort_keys=True)


def json_object(text: str) -> dict:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text[:80]!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


@dataclass(frozen=True)
class HeatmapSettings:
    """How a trained head's map is stitched (``gapless heatmap``; the ``heatmaps`` section of the config)."""

    normalisation: str = setting(
        "rank", choices=("rank", "raw", "attention"),
        help="rank: per-slide percentile, the same [0, 1] scale for every head; raw: the positive class's "
             "contribution; attention: the tile probability spread by the head's attention")
    batch_size: int = setting(64, help="tiles per inference batch")
    gradcam: bool = setting(
        True, help="also the positive class's Grad-CAM (Selvaraju et al. 2017) from the same forward pass, for every "
                   "head: a second map written, scored (gradcam_* scores) and shown beside the head's own")
