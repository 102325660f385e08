"""What the report measures and how its tables name things: the setting keys and the x axis of the
metric plot (``sweep_settings``, ``choose_x``), the metrics with their labels (the tile level's, and the
slide level's: ``SLIDE_*``), the columns of ``summary.tsv`` and ``paired.tsv`` (and of the slide level's
``slide_summary.tsv`` and ``slide_paired.tsv``), the verdicts, and settings as names and text."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from pipeline.mlflow_names import config_key, mlflow_safe, train_key

KIND_KEY = train_key("kind")
# the run params that define a setting (its values group the seeds of one setting × head) without a sweep
DEFAULT_SETTING_KEYS = (KIND_KEY, config_key("demo", "witness_fraction"), config_key("demo", "cell_density"))
WITNESS_KEY = config_key("demo", "witness_fraction")  # the x axis of the metric plot without a sweep
X_AUTO = "auto"  # choose the x axis from the settings' values (``choose_x``)
CONFIDENCE = 0.95
NA = "n/a"
ALL = "all"  # the one setting when there are no setting keys

# (column stem, label) of the metrics summarised with mean and interval, in table order
INTERVAL_METRICS = (
    ("test_auroc", "tile AUROC"),
    ("test_sample_auroc_mean", "sample AUROC (mean)"),
    ("test_sample_auroc_max", "sample AUROC (max)"),
    ("localisation_auroc", "localisation AUROC"),
    ("pointing_game_top1", "pointing game top-1"),
    ("pointing_game_top5", "pointing game top-5"),
    ("gradcam_localisation_auroc", "Grad-CAM localisation AUROC"),
    ("gradcam_pointing_game_top1", "Grad-CAM pointing game top-1"),
    ("gradcam_pointing_game_top5", "Grad-CAM pointing game top-5"),
)
METRIC_RANGE = (0.0, 1.0)  # every interval metric is an AUROC or a rate
# costs, summarised by their mean over seeds
COST_METRICS = (
    ("parameters", "parameters"),
    ("train_images_per_s", "train images/s"),
    ("inference_images_per_s", "inference images/s"),
    ("peak_memory_mb", "peak memory (MB)"),
)
# compared against the baseline head, paired by seed
PAIRED_METRICS = ("test_auroc", "test_sample_auroc_mean", "test_sample_auroc_max", "localisation_auroc",
                  "gradcam_localisation_auroc")
# the heatmap scores (pipeline/heatmap) averaged over a run's samples with witness cells: the head's own
# map's, and the Grad-CAM map's (``gradcam_`` prefix; runs scored before Grad-CAM have none: n/a, NaN)
LOCALISATION_KEYS = ("localisation_auroc", "pointing_game_top1", "pointing_game_top5",
                     "gradcam_localisation_auroc", "gradcam_pointing_game_top1", "gradcam_pointing_game_top5")
WITNESS_CELLS = "witness_cells"  # the heatmap score that says whether a sample has witnesses
# the metrics a training run logs at its end that the report reads
FINAL_METRICS = tuple(m for m, _ in INTERVAL_METRICS if m not in LOCALISATION_KEYS) + tuple(m for m, _ in COST_METRICS)
LABELS = dict(INTERVAL_METRICS + COST_METRICS)
VERDICTS = ("better", "worse", "no evidence of a difference", "n too small")

# The slide level (runs tagged ``gapless.level = slide``: a head over each slide's tile embeddings, trained
# from slide labels alone): one prediction per slide, so ``test_auroc`` is the slide AUROC there
SLIDE_INTERVAL_METRICS = (
    ("test_auroc", "slide AUROC"),
    ("test_balanced_accuracy", "balanced accuracy"),
    ("localisation_auroc", "localisation AUROC"),
    ("pointing_game_top1", "pointing game top-1"),
    ("pointing_game_top5", "pointing game top-5"),
)
SLIDE_COST_METRICS = (("test_slides", "test slides"), ("parameters", "parameters"))
SLIDE_PAIRED_METRICS = ("test_auroc", "test_balanced_accuracy", "localisation_auroc")
# the slide level's final metrics the report reads (``slide_runs.tsv`` shows them all)
SLIDE_FINAL_METRICS = ("test_auroc", "test_balanced_accuracy", "test_accuracy", "test_f1", "test_ece", "test_slides",
                       "best_epoch", "parameters")
SLIDE_LOCALISATION_KEYS = ("localisation_auroc", "pointing_game_top1", "pointing_game_top5")
SLIDE_LABELS = dict(SLIDE_INTERVAL_METRICS + SLIDE_COST_METRICS)
# published slide AUROCs on Camelyon16, for reference only (other data, encoder and protocol than these runs):
# the TransMIL paper's Table 1 (Shao et al., NeurIPS 2021), as the project's issue quotes it
PUBLISHED_SLIDE_AUROCS = (("mean pooling", 0.47), ("max pooling", 0.86), ("attention MIL (ABMIL)", 0.87))
PUBLISHED_SOURCE = "Camelyon16, TransMIL paper (Shao et al., NeurIPS 2021), Table 1"

PAIRED_COLUMNS_TAIL = ["setting", "head", "baseline", "metric", "n_pairs", "seeds", "head_mean", "baseline_mean",
                       "mean_diff", "sd_diff", "ci_low", "ci_high", "verdict"]


def short_name(key: str) -> str:
    """A setting key's column name, its last dotted part: ``….witness_fraction`` → ``witness_fraction``."""
    return key.rsplit(".", 1)[-1]


def summary_columns(setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS,
                    metrics: Sequence[tuple[str, str]] = INTERVAL_METRICS,
                    costs: Sequence[tuple[str, str]] = COST_METRICS) -> list[str]:
    """The columns of ``summary.tsv`` (``metrics``, ``costs``: the slide level's for ``slide_summary.tsv``), in order.

    The settings' short names, ``setting``, ``head``, ``n_seeds``, ``seeds``; per interval metric m:
    ``m_n`` (seeds with the metric), ``m_mean``, ``m_sd``, ``m_ci_low``, ``m_ci_high`` (NaN when
    n < 2); per cost metric c: ``c_mean``.
    """
    cols = [short_name(k) for k in setting_keys] + ["setting", "head", "n_seeds", "seeds"]
    for m, _ in metrics:
        cols += [f"{m}_n", f"{m}_mean", f"{m}_sd", f"{m}_ci_low", f"{m}_ci_high"]
    cols += [f"{c}_mean" for c, _ in costs]
    return cols


def paired_columns(setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> list[str]:
    """The columns of ``paired.tsv``: the settings' short names, then ``PAIRED_COLUMNS_TAIL``."""
    return [short_name(k) for k in setting_keys] + PAIRED_COLUMNS_TAIL


def setting_label(setting: Sequence[str], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> str:
    """``kind-slide_witness_fraction-0.05_cell_density-40.0``: a setting as one name MLflow accepts
    (``all`` when there are no setting keys)."""
    return mlflow_safe("_".join(f"{short_name(k)}-{v}" for k, v in zip(setting_keys, setting)), slash=False) or ALL


def setting_text(setting: Sequence[str], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> str:
    """``kind slide, witness_fraction 0.05, cell_density 40.0``: a setting for people (``all runs``
    when there are no setting keys)."""
    return ", ".join(f"{short_name(k)} {v}" for k, v in zip(setting_keys, setting)) or f"{ALL} runs"


def value_sort_key(value) -> tuple:
    """Numbers first, in numeric order, then any other value as text (seeds, setting values)."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


# ---------------------------------------------------------------------------------------------
# The settings and the x axis: from the sweep (the workflow, at parse time) or from the runs (by hand)


def as_number(value) -> float | None:
    """``value`` as a finite float (a number, or text that reads as one: MLflow params are text); None
    for anything else (a bool, ``n/a``, ``fluorescence``, NaN)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _x_rank(values: Iterable) -> tuple:
    """How well a key's values make an x axis: numeric and varying first, then varying, then numeric,
    then by the number of distinct values."""
    values = list(values)
    numeric = bool(values) and all(as_number(v) is not None for v in values)
    distinct = len({as_number(v) for v in values} if numeric else {str(v) for v in values})
    return (numeric and distinct > 1, distinct > 1, numeric, distinct)


def choose_x(candidates: Sequence[str], values: Mapping[str, Iterable]) -> str:
    """The x axis of the metric plot among ``candidates`` (setting keys, in order of preference).

    The numeric key (every value a number) with the most distinct values; where no numeric key takes
    more than one value, the key with the most distinct values (a categorical axis, e.g. the image
    modality); where nothing varies, the first numeric key, else the first. Ties go to the earlier
    candidate. ``values``: each key's values (one per dataset, or per run).
    """
    if not candidates:
        raise ValueError("no setting key to put on the x axis")
    ranks = [_x_rank(values.get(k, ())) for k in candidates]
    return candidates[ranks.index(max(ranks))]


def swept_keys(sweep: Sequence[Mapping]) -> list[str]:
    """The demo keys the sweep's entries set (every key but ``name``), in the order they first appear."""
    return list(dict.fromkeys(k for entry in sweep for k in entry if k != "name"))


def setting_key_of(name: str) -> str:
    """A config's name for a setting as the run param: ``kind`` → ``train.kind``, a demo key
    ``cells_per_image`` → ``config.demo.cells_per_image``; a param name (``train.…``, ``config.…``) as is."""
    if name == "kind":
        return KIND_KEY
    if name.startswith(("train.", "config.")):
        return name
    return config_key("demo", name)


def sweep_settings(sweep: Sequence[Mapping], datasets: Mapping[str, Mapping] | None = None,
                   kinds: Sequence[str] = ("slide",), x: str = X_AUTO,
                   known: Iterable[str] | None = None) -> tuple[tuple[str, ...], str]:
    """The report's setting keys and x axis from the config: ``(setting_keys, x_key)``, run param names.

    With a sweep: ``train.kind`` and every demo key that some sweep entry sets, in sweep order; the x
    axis (``x`` "auto") is ``choose_x`` over the swept keys (then kind), each key's values taken from
    ``datasets`` (name → the dataset's demo settings, the sweep entry over ``demo``). Without a sweep:
    ``DEFAULT_SETTING_KEYS`` and the witness fraction. ``x`` given (``kind`` or a demo key, e.g.
    ``cells_per_image``): that key, added to the settings when they lack it. ``known``: the demo keys
    ``x`` may name (besides the swept ones and ``kind``); None accepts any. ``kinds``: train.kinds.
    Raises ValueError for an ``x`` that is not known.
    """
    swept = swept_keys(sweep)
    if sweep:
        keys = [KIND_KEY] + [config_key("demo", k) for k in swept]
    else:
        keys = list(DEFAULT_SETTING_KEYS)
    if x in (X_AUTO, "", None):
        if not sweep:
            return tuple(keys), WITNESS_KEY
        values = {config_key("demo", k): [d.get(k) for d in (datasets or {}).values()] for k in swept}
        values[KIND_KEY] = list(kinds)
        return tuple(keys), choose_x([config_key("demo", k) for k in swept] + [KIND_KEY], values)
    allowed = None if known is None else {"kind", *swept, *known}
    short = short_name(x) if x.startswith(("train.", "config.")) else x
    if allowed is not None and short not in allowed:
        raise ValueError(f"report.x {x!r} is neither kind nor a demo key "
                         f"(auto, kind, or one of: {', '.join(sorted(allowed - {'kind'}))})")
    key = setting_key_of(x)
    if key not in keys:
        keys.append(key)
    return tuple(keys), key


def resolve_x(x: str | None, setting_keys: Sequence[str], runs_values: Mapping[str, Iterable]) -> str:
    """The x key of a report: ``x`` (a setting key, or its short name) when given, else (``auto``)
    ``choose_x`` over the setting keys (kind last) with the runs' values. Raises ValueError when ``x``
    names no setting key."""
    keys = list(setting_keys)
    if x in (X_AUTO, "", None):
        return choose_x([k for k in keys if k != KIND_KEY] + [k for k in keys if k == KIND_KEY], runs_values)
    if x in keys:
        return x
    by_short = [k for k in keys if short_name(k) == x]
    if len(by_short) == 1:
        return by_short[0]
    raise ValueError(f"the x axis {x!r} is not one of the setting keys ({', '.join(keys)})")


def plot_file(x_key: str) -> str:
    """The metric plot's file name: ``metric_vs_<x>.png`` (``metric_vs_witness_fraction.png``)."""
    return f"metric_vs_{mlflow_safe(short_name(x_key), slash=False).replace(' ', '_')}.png"


def axis_words(x_key: str) -> str:
    """The x axis for a sentence: ``config.demo.cells_per_image`` → ``cells per image``."""
    return short_name(x_key).replace("_", " ")
