"""Classification metrics of a trained model: tile level (AUROC, accuracy, balanced accuracy, F1,
calibration) and sample level (AUROC of the mean and of the max of each sample's tile probabilities)."""

from __future__ import annotations

import numpy as np


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE over ``bins`` equal-width confidence bins (top-class confidence vs accuracy)."""
    conf = probs.max(1)
    pred = probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, prefix: str) -> dict:
    """AUROC (positive = last class; macro one-vs-rest for K > 2), accuracy, balanced accuracy, F1, ECE."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    out = {}
    if len(np.unique(labels)) > 1:
        if probs.shape[1] == 2:
            out[f"{prefix}_auroc"] = float(roc_auc_score(labels, probs[:, 1]))
        else:
            out[f"{prefix}_auroc"] = float(roc_auc_score(labels, probs, multi_class="ovr"))
    pred = probs.argmax(1)
    out[f"{prefix}_accuracy"] = float(accuracy_score(labels, pred))
    out[f"{prefix}_balanced_accuracy"] = float(balanced_accuracy_score(labels, pred))
    out[f"{prefix}_f1"] = float(f1_score(labels, pred, average="binary" if probs.shape[1] == 2 else "macro", zero_division=0))
    out[f"{prefix}_ece"] = expected_calibration_error(probs, labels)
    return out


def sample_metrics(probs: np.ndarray, sample_index: np.ndarray, sample_labels: np.ndarray) -> dict:
    """Sample-level AUROC from tile probabilities of the last class, aggregated by mean and by max.

    ``sample_index`` (N,) gives each tile's sample; ``sample_labels[i]`` is sample i's label.
    """
    from sklearn.metrics import roc_auc_score

    ids = np.unique(sample_index)
    labels = sample_labels[ids]
    out = {"test_samples": int(len(ids))}
    if len(np.unique(labels)) < 2:
        return out
    for name, agg in (("mean", np.mean), ("max", np.max)):
        scores = np.array([agg(probs[sample_index == i, -1]) for i in ids])
        out[f"test_sample_auroc_{name}"] = float(roc_auc_score(labels, scores))
    return out
