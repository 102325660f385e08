"""A training run's folder: what ``gapless train`` writes and every reader of a trained model reads.

    <run>/weights.safetensors   the model's state dict
    <run>/model.json            ModelConfig: what rebuilds the model and prepares its input (schema gapless.model/1)
    <run>/metrics.json          the final metrics
    <run>/split.json            {"train": [sample ids], "val": [...], "test": [...]}
    <run>/run_id.txt            the MLflow run id; written last, it marks a finished run
    <run>/roc.png, confusion.png, test_maps.png

:func:`write_run_folder` makes them in ``<run>.partial`` and moves them in when the run has finished;
:func:`read_model_config` and :func:`load_trained` read them back, with one clear error per problem.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo

SCHEMA = "gapless.model/1"
WEIGHTS = "weights.safetensors"
MODEL_JSON = "model.json"
METRICS_JSON = "metrics.json"
SPLIT_JSON = "split.json"
RUN_ID = "run_id.txt"
_FIX = "pass the folder `gapless train` wrote (it holds model.json, weights.safetensors and run_id.txt)"
_RETRAIN = "re-run training for this head"


@dataclass(frozen=True)
class ModelConfig:
    """What rebuilds a trained model and prepares its input (``model.json``).

    ``mean``/``std``: per channel, in the tiles' raw units; ``tile_size``: px of the tiles it was
    trained on, ``image_size``: px fed to the model (None: the tile size); ``mpp``: µm/px of the
    tiles; ``head_info``: the head's label, description, order and baseline flag (:class:`HeadInfo`).
    """

    backbone: str
    head: str
    num_classes: int
    in_chans: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    head_kwargs: dict = field(default_factory=dict)
    backbone_kwargs: dict = field(default_factory=dict)
    tile_size: int | None = None
    image_size: int | None = None
    modality: str = "brightfield"
    mpp: float | None = None
    head_info: dict = field(default_factory=dict)
    schema: str = SCHEMA

    def info(self) -> HeadInfo:
        return HeadInfo.from_dict(self.head_info, name=self.head)

    def as_mapping(self) -> dict:
        """The plain dict heatmaps and tests pass around (``config["mean"]``, ``config.get("image_size")``)."""
        return asdict(self)


def read_model_config(run_dir: str | Path) -> ModelConfig:
    """``<run_dir>/model.json`` as a :class:`ModelConfig`; a ``GaplessError`` naming what is wrong."""
    path = Path(run_dir) / MODEL_JSON
    if not path.is_file():
        raise GaplessError(path, "missing from the training run folder", f"{_RETRAIN}; {_FIX}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GaplessError(path, f"not valid JSON ({exc})", _RETRAIN) from None
    if not isinstance(doc, dict):
        raise GaplessError(path, "not a JSON object", _RETRAIN)
    if doc.get("schema") != SCHEMA:
        found = doc.get("schema")
        raise GaplessError(path, f"schema {found!r}, not {SCHEMA!r}" + (" (written before model.json had one)" if found is None else ""),
                           _RETRAIN + " with this version of gapless")
    names = {f.name for f in fields(ModelConfig)}
    missing = [f.name for f in fields(ModelConfig) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in doc]
    if missing:
        raise GaplessError(path, f"lacks {', '.join(missing)}", _RETRAIN)
    return ModelConfig(**{k: v for k, v in doc.items() if k in names})


def read_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id of a finished run; None when ``run_id.txt`` is missing or empty."""
    path = Path(run_dir) / RUN_ID
    text = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    return text or None


def load_trained(run_dir: str | Path, device=None):
    """``(model, config)`` from a training run folder (``weights.safetensors`` + ``model.json``).

    The model is rebuilt with ``create_model(backbone, head, num_classes, in_chans, pretrained=False,
    backbone_kwargs=backbone_kwargs, **head_kwargs)``, loaded strictly, put in eval mode on ``device`` (default: CUDA when present).
    ``config`` is :meth:`ModelConfig.as_mapping` plus ``run_dir`` and ``run_id`` (None when unfinished).
    """
    from safetensors.torch import load_file

    from pipeline.device import resolve_device
    from pipeline.models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GaplessError(run_dir, "no such training run folder", _FIX)
    weights_path = run_dir / WEIGHTS
    config = read_model_config(run_dir)
    if not weights_path.is_file():
        raise GaplessError(weights_path, "missing from the training run folder", f"{_RETRAIN}; {_FIX}")
    try:
        model = create_model(config.backbone, config.head, int(config.num_classes), in_chans=int(config.in_chans),
                             pretrained=False, backbone_kwargs=config.backbone_kwargs or {},
                             **(config.head_kwargs or {}))
    except GaplessError as exc:
        raise GaplessError(run_dir / MODEL_JSON, exc.cause, exc.fix) from None
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise GaplessError(weights_path, f"not a readable safetensors file ({exc})", _RETRAIN) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise GaplessError(
            weights_path,
            f"weights do not match model.json ({config.backbone}/{config.head}, {config.num_classes} classes): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. {example!r}",
            "model.json and weights.safetensors must come from the same training run",
        )
    model.load_state_dict(state, strict=True)
    model = model.to(resolve_device(device)).eval()
    return model, dict(config.as_mapping(), run_dir=str(run_dir), run_id=read_run_id(run_dir))


def write_run_folder(out_dir: str | Path, fill: Callable[[Path], str]) -> Path:
    """Make a run folder: ``fill(work)`` writes every file but ``run_id.txt`` into ``<out_dir>.partial``
    and returns the run id; the files then move into ``out_dir``, ``run_id.txt`` last (a finished run).

    A leftover ``.partial`` of a killed run is removed first; on failure the partial folder is removed
    and ``out_dir`` keeps what it had.
    """
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)  # left by a run that was killed
    try:
        work.mkdir(parents=True)
        run_id = fill(work)
        (work / RUN_ID).write_text(run_id + "\n", encoding="utf-8")
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in work.iterdir():  # into place only now: run_id.txt last, it marks a finished run
            if path.name != RUN_ID:
                os.replace(path, out_dir / path.name)
        os.replace(work / RUN_ID, out_dir / RUN_ID)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def write_model_config(folder: str | Path, config: ModelConfig) -> Path:
    path = Path(folder) / MODEL_JSON
    path.write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    return path


def write_json(folder: str | Path, name: str, data) -> Path:
    """``metrics.json`` / ``split.json`` into a run folder being made."""
    path = Path(folder) / name
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
