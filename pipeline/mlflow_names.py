"""Every name gapless gives things in MLflow, built and parsed in this one place.

A training run (child of a comparison run) carries:

- tags ``head``, ``seed``, ``backbone``, ``mlflow.parentRunId``, the head's ``HeadInfo`` as
  ``gapless.head.{label,description,order,baseline}`` (what the report shows and pairs against),
  ``gapless.run_dir`` / ``gapless.host`` / ``gapless.pid`` (which folder and process own it), and
  ``gapless.level = slide`` for a slide-level run (``gapless train-slides``: a head over each slide's
  tile embeddings, from slide labels); a run without the tag is a tile-level run (:func:`run_level`);
- params ``train.<setting>``, ``split.<train|val|test>`` (comma-separated sample ids), the
  pipeline's resolved config flattened under ``config.`` (``config.demo.witness_fraction``) and, at the
  slide level, ``encoder_<attribute>`` (what encoded the embeddings: ``encoder_backbone``, …);
- metrics per epoch and ``test_*`` at the end, and ``heatmap/<sample>/<score>`` from the heatmaps.

The comparison (parent) run has the tag ``gapless.role = comparison`` and the config flattened
without a prefix; once the report is written, the tag ``gapless.report = written``, the report's files
under the artifact folder ``report`` and its metrics ``report/<setting>/<head>/<name>`` (against the
baseline: ``report/<setting>/<head>/vs_<baseline>/<name>``; the slide level's under ``report/slide_level/``).
Readers (the report) use the parsers here, so a renamed key changes one module.
"""

from __future__ import annotations

import json
import re

from pipeline.head_info import HeadInfo

# tags
TAG_HEAD = "head"
TAG_SEED = "seed"
TAG_BACKBONE = "backbone"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_ROLE = "gapless.role"
ROLE_COMPARISON = "comparison"
TAG_RUN_DIR = "gapless.run_dir"
TAG_HOST = "gapless.host"
TAG_PID = "gapless.pid"
TAG_SUPERSEDED_BY = "gapless.superseded_by"
TAG_REPORT = "gapless.report"
REPORT_WRITTEN = "written"
TAG_LEVEL = "gapless.level"  # what a training run's head pools over: "tile" (no tag) or "slide"
LEVEL_TILE = "tile"
LEVEL_SLIDE = "slide"
_HEAD_TAG = "gapless.head."

# params
TRAIN_PREFIX = "train."
CONFIG_PREFIX = "config."
SPLIT_PREFIX = "split."
ENCODER_PREFIX = "encoder_"  # a slide-level run's encoder of its embeddings: encoder_{encoder,backbone,weights,…}

# metrics
HEATMAP_PREFIX = "heatmap/"
REPORT_PREFIX = "report/"

# artifacts
REPORT_ARTIFACTS = "report"  # the comparison run's folder of report files

_UNSAFE = re.compile(r"[^0-9A-Za-z_.\-/ ]")  # MLflow names allow letters, digits, _ - . space and /


def mlflow_safe(text, slash: bool = True) -> str:
    """``text`` with every character MLflow refuses in a name (and ``/`` unless ``slash``) made ``_``."""
    safe = _UNSAFE.sub("_", str(text))
    return safe if slash else safe.replace("/", "_")


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}: a nested config as MLflow params (lists and dicts as JSON)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def config_params(config: dict) -> dict:
    """The pipeline's resolved config as a training run's ``config.*`` params."""
    return flatten(config, CONFIG_PREFIX)


def config_key(*path: str) -> str:
    """``config_key("demo", "witness_fraction")`` → ``config.demo.witness_fraction``."""
    return CONFIG_PREFIX + ".".join(path)


def train_params(settings: dict) -> dict:
    """A run's own training settings as ``train.*`` params."""
    return {f"{TRAIN_PREFIX}{k}": v for k, v in settings.items()}


def parse_config_key(name: str) -> tuple[str, ...] | None:
    """``config.demo.witness_fraction`` → ``("demo", "witness_fraction")``; None for a param outside ``config.``."""
    if not name.startswith(CONFIG_PREFIX):
        return None
    return tuple(name[len(CONFIG_PREFIX):].split("."))


def train_key(setting: str) -> str:
    return TRAIN_PREFIX + setting


def encoder_param(key: str) -> str:
    """``encoder_param("backbone")`` → ``encoder_backbone``: a slide-level run's param naming what encoded
    its embeddings (the embedding store's attribute ``key``)."""
    return ENCODER_PREFIX + key


def split_params(split_ids: dict) -> dict:
    """``{"train": [ids], ...}`` → ``{"split.train": "a,b", ...}``."""
    return {f"{SPLIT_PREFIX}{name}": ",".join(ids) for name, ids in split_ids.items()}


def split_key(name: str) -> str:
    """``split_key("test")`` → ``split.test``: the param holding split ``name``'s sample ids."""
    return SPLIT_PREFIX + name


def split_from_params(params: dict, name: str) -> list[str] | None:
    """The sample ids of split ``name`` from a run's params; None when the run did not record it."""
    value = params.get(f"{SPLIT_PREFIX}{name}")
    if value is None:
        return None
    return [s for s in value.split(",") if s]


def heatmap_metric(sample_id: str, key: str) -> str:
    """The metric a heatmap score is logged as: ``heatmap/<sample>/<key>``."""
    return f"{HEATMAP_PREFIX}{mlflow_safe(sample_id, slash=False)}/{key}"


def parse_heatmap_metric(name: str) -> tuple[str, str] | None:
    """``heatmap/<sample>/<key>`` → ``(sample, key)``; None for any other metric."""
    if not name.startswith(HEATMAP_PREFIX):
        return None
    sample, sep, key = name[len(HEATMAP_PREFIX):].rpartition("/")
    return (sample, key) if sep and sample and key else None


def report_metric(setting: str, head: str, name: str, baseline: str | None = None, level: str = LEVEL_TILE) -> str:
    """A report metric on the comparison run: ``report/<setting>/<head>/<name>``, or with ``baseline``
    (a paired difference) ``report/<setting>/<head>/vs_<baseline>/<name>``; a level other than the tile
    level under ``report/<level>_level/`` (``report/slide_level/<setting>/<head>/<name>``)."""
    where = "" if level == LEVEL_TILE else f"{mlflow_safe(level, slash=False)}_level/"
    stem = f"{REPORT_PREFIX}{where}{mlflow_safe(setting)}/{mlflow_safe(head)}"
    if baseline is not None:
        stem += f"/vs_{mlflow_safe(baseline)}"
    return f"{stem}/{name}"


def child_runs_filter(parent_run_id: str) -> str:
    """The MLflow search filter for the child (training) runs of the comparison run ``parent_run_id``."""
    return f"tags.{TAG_PARENT} = '{parent_run_id}'"


def head_and_seed(tags: dict, params: dict) -> tuple[str | None, str | None]:
    """A training run's head name and seed: its tags, else the params of the same names training also logs."""
    head = tags.get(TAG_HEAD) or params.get(TAG_HEAD) or None
    seed = tags.get(TAG_SEED) or params.get(TAG_SEED) or None
    return head, seed


def run_level(tags: dict) -> str:
    """A training run's level: its ``gapless.level`` tag, ``tile`` when it has none (tile-level training
    does not write the tag; runs logged before slide-level training existed are tile-level)."""
    return tags.get(TAG_LEVEL) or LEVEL_TILE


def level_tags(level: str) -> dict:
    """The tag a training run at ``level`` starts with (slide-level training: ``{"gapless.level": "slide"}``)."""
    return {TAG_LEVEL: level}


def head_tagged(tags: dict) -> bool:
    """Whether a run carries its head's ``HeadInfo`` tags (runs logged before they existed do not)."""
    return any(key.startswith(_HEAD_TAG) for key in tags)


def head_tags(info: HeadInfo) -> dict:
    """A head's ``HeadInfo`` as tags of its training run (strings, as MLflow keeps them)."""
    return {TAG_HEAD: info.name, f"{_HEAD_TAG}label": info.label, f"{_HEAD_TAG}description": info.description,
            f"{_HEAD_TAG}order": str(info.order), f"{_HEAD_TAG}baseline": "true" if info.baseline else "false"}


def head_from_tags(tags: dict, name: str | None = None) -> HeadInfo:
    """The ``HeadInfo`` a run's tags record (:func:`head_tags`); a run logged before they existed gets
    its head name with default label and order, and is no baseline."""
    fields = {key[len(_HEAD_TAG):]: value for key, value in tags.items() if key.startswith(_HEAD_TAG)}
    fields["baseline"] = fields.get("baseline") == "true"
    try:
        fields["order"] = int(fields.get("order", 1000))
    except ValueError:
        fields["order"] = 1000
    return HeadInfo.from_dict(fields, name=tags.get(TAG_HEAD) or name or "")


def training_tags(info: HeadInfo, seed: int, backbone: str) -> dict:
    """The tags a training run starts with (the parent and process tags are added by tracking)."""
    return {**head_tags(info), TAG_SEED: str(seed), TAG_BACKBONE: backbone}
