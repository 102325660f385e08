"""What the report measures and how its tables name things: the setting keys, the metrics with their
labels, the columns of ``summary.tsv`` and ``paired.tsv``, the verdicts, and settings as names and text."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.mlflow_names import config_key, mlflow_safe, train_key

# the run params that define a setting (its values group the seeds of one setting × head)
DEFAULT_SETTING_KEYS = (train_key("kind"), config_key("demo", "witness_fraction"), config_key("demo", "cell_density"))
WITNESS_KEY = config_key("demo", "witness_fraction")  # the x axis of the metric plot
CONFIDENCE = 0.95
NA = "n/a"

# (column stem, label) of the metrics summarised with mean and interval, in table order
INTERVAL_METRICS = (
    ("test_auroc", "tile AUROC"),
    ("test_sample_auroc_mean", "sample AUROC (mean)"),
    ("test_sample_auroc_max", "sample AUROC (max)"),
    ("localisation_auroc", "localisation AUROC"),
    ("pointing_game_top1", "pointing game top-1"),
    ("pointing_game_top5", "pointing game top-5"),
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
PAIRED_METRICS = ("test_auroc", "test_sample_auroc_mean", "test_sample_auroc_max", "localisation_auroc")
# the heatmap scores (pipeline/heatmap.py) averaged over a run's samples with witness cells
LOCALISATION_KEYS = ("localisation_auroc", "pointing_game_top1", "pointing_game_top5")
WITNESS_CELLS = "witness_cells"  # the heatmap score that says whether a sample has witnesses
# the metrics a training run logs at its end that the report reads
FINAL_METRICS = tuple(m for m, _ in INTERVAL_METRICS if m not in LOCALISATION_KEYS) + tuple(m for m, _ in COST_METRICS)
LABELS = dict(INTERVAL_METRICS + COST_METRICS)
VERDICTS = ("better", "worse", "no evidence of a difference", "n too small")

PAIRED_COLUMNS_TAIL = ["setting", "head", "baseline", "metric", "n_pairs", "seeds", "head_mean", "baseline_mean",
                       "mean_diff", "sd_diff", "ci_low", "ci_high", "verdict"]


def short_name(key: str) -> str:
    """A setting key's column name, its last dotted part: ``….witness_fraction`` → ``witness_fraction``."""
    return key.rsplit(".", 1)[-1]


def summary_columns(setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> list[str]:
    """The columns of ``summary.tsv``, in order.

    The settings' short names, ``setting``, ``head``, ``n_seeds``, ``seeds``; per interval metric m:
    ``m_n`` (seeds with the metric), ``m_mean``, ``m_sd``, ``m_ci_low``, ``m_ci_high`` (NaN when
    n < 2); per cost metric c: ``c_mean``.
    """
    cols = [short_name(k) for k in setting_keys] + ["setting", "head", "n_seeds", "seeds"]
    for m, _ in INTERVAL_METRICS:
        cols += [f"{m}_n", f"{m}_mean", f"{m}_sd", f"{m}_ci_low", f"{m}_ci_high"]
    cols += [f"{c}_mean" for c, _ in COST_METRICS]
    return cols


def paired_columns(setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> list[str]:
    """The columns of ``paired.tsv``: the settings' short names, then ``PAIRED_COLUMNS_TAIL``."""
    return [short_name(k) for k in setting_keys] + PAIRED_COLUMNS_TAIL


def setting_label(setting: Sequence[str], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> str:
    """``kind-slide_witness_fraction-0.05_cell_density-40.0``: a setting as one name MLflow accepts."""
    return mlflow_safe("_".join(f"{short_name(k)}-{v}" for k, v in zip(setting_keys, setting)), slash=False)


def setting_text(setting: Sequence[str], setting_keys: Sequence[str] = DEFAULT_SETTING_KEYS) -> str:
    """``kind slide, witness_fraction 0.05, cell_density 40.0``: a setting for people."""
    return ", ".join(f"{short_name(k)} {v}" for k, v in zip(setting_keys, setting))


def value_sort_key(value) -> tuple:
    """Numbers first, in numeric order, then any other value as text (seeds, setting values)."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))
