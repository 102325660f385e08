"""One declaration per setting: the settings dataclasses are the source of the CLI flags and of the
schema's defaults, and a config section reaches its command as one JSON argument (--settings)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.cli import build_parser
from pipeline.demo import DemoSettings
from pipeline.settings import (HeatmapSettings, add_setting_flags, setting, setting_defaults, setting_fields,
                               settings_from_args, settings_json)
from pipeline.tiling import TileSettings
from pipeline.slide_level.settings import SlideTrainSettings
from pipeline.train_settings import TrainSettings

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "schema.yaml").read_text(encoding="utf-8"))

# Keys of a config section that only the workflow reads: which jobs to make, and their resources.
WORKFLOW_ONLY = {
    "demo": {"out"},  # where the rule writes the dataset (gapless demo --out)
    "tiling": {"batch"},  # cell images per tile_batch job
    "train": {"kinds", "heads", "seeds"},  # the jobs: one per cohort × head × seed
    "heatmaps": {"seed", "threads", "pages", "max_pages"},  # the viewer's seed and pages; the rule's threads
    "slide_level": set(),  # (its train section; the rest of slide_level is the workflow's)
}
# Settings that each job gets from elsewhere than its config section (wildcards, the sample sheet), or
# that only library callers set.
JOB_ONLY = {
    DemoSettings: set(),
    TileSettings: {"slide_mpp", "kind", "annotations"},  # the sample sheet's mpp, kind and annotations
    TrainSettings: {"head", "seed", "kind"},  # the job's wildcards
    HeatmapSettings: set(),
    # the job's wildcards (split_seed: the seed), the rule's threads and train.device, and train.split
    SlideTrainSettings: {"head", "seed", "split_seed", "threads", "device", "split"},
}
KINDS = ("slide", "image")
KIND_ONLY = {"slide": {"whole"}}  # settings the config does not offer for a kind (no whole-slide tile)


def schema_defaults(section: dict) -> dict:
    return {key: spec.get("default") for key, spec in section["properties"].items()}


def dataclass_side(cls) -> dict:
    return {k: v for k, v in setting_defaults(cls).items() if k not in JOB_ONLY[cls]}


def sections() -> list[tuple[str, type, dict, dict]]:
    """(name, dataclass, the schema's defaults, the dataclass's defaults) for every settings section."""
    props = SCHEMA["properties"]
    found = [
        ("demo", DemoSettings, schema_defaults(props["demo"]), dataclass_side(DemoSettings)),
        ("train", TrainSettings, schema_defaults(props["train"]), dataclass_side(TrainSettings)),
        ("heatmaps", HeatmapSettings, schema_defaults(props["heatmaps"]), dataclass_side(HeatmapSettings)),
        ("slide_level.train", SlideTrainSettings, schema_defaults(props["slide_level"]["properties"]["train"]),
         dataclass_side(SlideTrainSettings)),
    ]
    tiling = props["tiling"]
    shared = {k: v for k, v in schema_defaults(tiling).items() if k not in KINDS}
    for kind in KINDS:  # a kind's grid over the shared keys, as the tile rule passes them
        ours = {**dataclass_side(TileSettings), **TileSettings.KIND_DEFAULTS[kind]}
        ours = {k: v for k, v in ours.items() if k not in KIND_ONLY.get(kind, set())}
        found.append((f"tiling.{kind}", TileSettings, {**shared, **schema_defaults(tiling["properties"][kind])}, ours))
    return found


@pytest.mark.parametrize("name, cls, schema, ours", sections(), ids=[s[0] for s in sections()])
def test_the_schema_declares_every_setting_with_the_dataclass_default(name, cls, schema, ours):
    workflow_only = WORKFLOW_ONLY[name.split(".")[0]]
    assert not workflow_only & set(ours), f"{name}: listed as workflow-only but a setting of {cls.__name__}"
    assert not JOB_ONLY[cls] & set(schema), f"{name}: listed as job-only but in the schema"
    assert set(schema) - workflow_only == set(ours), (
        f"{name}: the schema's keys and {cls.__name__}'s settings differ: only in the schema "
        f"{sorted(set(schema) - workflow_only - set(ours))}, only in the dataclass {sorted(set(ours) - set(schema))}")
    differing = {k: (schema[k], ours[k]) for k in ours
                 if schema[k] != ours[k] or isinstance(schema[k], bool) != isinstance(ours[k], bool)}
    assert not differing, f"{name}: schema default != {cls.__name__} default: {differing}"


def test_a_sweep_entry_takes_exactly_the_demo_settings():
    demo = SCHEMA["properties"]["demo"]["properties"]
    entry = SCHEMA["properties"]["sweep"]["items"]["properties"]
    assert set(entry) == set(demo) - WORKFLOW_ONLY["demo"] | {"name"}
    for key in set(entry) - {"name"}:  # the same rules, without the defaults (they would override `demo`)
        assert entry[key] == {k: v for k, v in demo[key].items() if k not in ("default", "description")}, key


@pytest.mark.parametrize("command, cls", [("demo", DemoSettings), ("tile", TileSettings), ("train", TrainSettings),
                                          ("heatmap", HeatmapSettings)])
def test_every_setting_is_a_flag_of_its_command(command, cls):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    dests = {action.dest for action in sub._actions}
    assert {f.name for f in setting_fields(cls)} <= dests
    assert "settings" in dests


def test_flags_override_the_settings_json_which_overrides_the_defaults():
    base = ["train", "--samples", "s.csv", "--tiles", "t", "--out", "o"]
    section = {"epochs": 7, "lr": 0.002, "split": [0.6, 0.2, 0.2], "pretrained": "w.safetensors",
               "head_kwargs": {"num_heads": 2}, "accept_flagged": True}
    args = build_parser().parse_args([*base, "--settings", json.dumps(section), "--epochs", "9", "--no-accept-flagged"])
    settings = settings_from_args(TrainSettings, args)
    assert settings.epochs == 9 and settings.accept_flagged is False  # the flags
    assert settings.lr == 0.002 and settings.split_fractions == (0.6, 0.2, 0.2)  # the JSON
    assert settings.pretrained == "w.safetensors" and settings.head_kwargs == {"num_heads": 2}
    assert settings.batch_size == TrainSettings().batch_size == 64  # the dataclass
    flags = settings_from_args(TrainSettings, build_parser().parse_args([*base, "--pretrained", "true", "--split", "1", "0", "0"]))
    assert flags.pretrained is True and flags.split_fractions == (1.0, 0.0, 0.0)


def test_the_tile_flags_keep_their_meaning():
    args = build_parser().parse_args(["tile", "s.svs", "--out", "s.zarr", "--settings", '{"min_tissue": 0.1, "tissue": "none"}',
                                      "--tile-size", "64", "--positive-class", "Tumor", "--positive-class", "DCIS",
                                      "--allow-empty", "--annotations", "a.geojson"])
    settings = settings_from_args(TileSettings, args)
    assert (settings.mpp, settings.tile_size, settings.stride, settings.min_tissue, settings.tissue) == (0.5, 64, None, 0.1, "none")
    assert settings.positive_classes == ("Tumor", "DCIS") and settings.allow_empty and settings.annotations == "a.geojson"
    plain = settings_from_args(TileSettings, build_parser().parse_args(["tile", "s.svs", "--out", "s.zarr"]))
    assert plain == TileSettings() and (plain.mpp, plain.tile_size, plain.min_tissue) == (0.5, 224, 0.25)


def test_an_unknown_setting_is_one_line_naming_it(tmp_path, capsys):
    code = cli.main(["demo", "--out", str(tmp_path / "demo"), "--settings", '{"slides": 1, "witness_fractions": 0.2}'])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gapless demo: error: --settings: 'witness_fractions' is not a setting of DemoSettings")
    assert "\n" not in err and "witness_fraction" in err
    assert not (tmp_path / "demo").exists()


def test_settings_json_passes_a_sections_settings_and_leaves_the_workflows_keys():
    train = {"epochs": 2, "seeds": [0, 1], "heads": ["gap"], "kinds": ["slide"], "split": [0.5, 0.25, 0.25]}
    assert json.loads(settings_json(TrainSettings, train)) == {"epochs": 2, "split": [0.5, 0.25, 0.25]}


def test_a_new_field_is_a_flag_and_read_from_the_config_section():
    """The two edits of a new option, here the first: a field (the schema entry is the second, which
    test_the_schema_declares_every_setting_with_the_dataclass_default asks for)."""
    Extended = dataclasses.make_dataclass(
        "Extended", [("label_smoothing", float, setting(0.0, help="cross-entropy label smoothing"))], bases=(TrainSettings,))
    parser = argparse.ArgumentParser()
    add_setting_flags(parser, Extended)
    section = {"epochs": 3, "label_smoothing": 0.1, "seeds": [0]}
    from_config = settings_from_args(Extended, parser.parse_args(["--settings", settings_json(Extended, section)]))
    assert from_config.label_smoothing == 0.1 and from_config.epochs == 3
    from_flag = settings_from_args(Extended, parser.parse_args(["--settings", settings_json(Extended, section),
                                                                "--label-smoothing", "0.2"]))
    assert from_flag.label_smoothing == 0.2
    assert "--label-smoothing" in parser.format_help() and "cross-entropy label smoothing" in parser.format_help()


def test_every_command_prints_its_help(capsys):
    """argparse formats help text with %: a setting's help that says "13 %" must not break `--help`."""
    from pipeline.cli.commands import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, "--help"])
        assert exit_.value.code == 0, command
        assert "usage: gapless " + command in capsys.readouterr().out
