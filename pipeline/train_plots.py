"""The plots a training run leaves in its folder and MLflow: the test split's ROC curve and confusion
matrix, and a grid of test tiles beside the head's positive-class map."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.inference import forward


def roc_and_confusion(test: dict, classes: list[str], out: Path, level: str = "tile") -> list[Path]:
    """ROC curve and confusion matrix of the test split (``level``: tile or slide, for the titles), as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    paths = []
    probs, labels = test["probs"], test["labels"]
    if len(np.unique(labels)) > 1 and probs.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        RocCurveDisplay.from_predictions(labels, probs[:, 1], ax=ax, name=f"{level}s")
        ax.set_title(f"test ROC ({level} level)")
        paths.append(out / "roc.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay.from_predictions(labels, probs.argmax(1), labels=list(range(len(classes))),
                                            display_labels=classes, ax=ax, colorbar=False)
    ax.set_title(f"test confusion ({level} level)")
    paths.append(out / "confusion.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def map_grid(model, test: dict, modality: str, dataset, device, autocast, head: str, path: Path,
             per_class: int = 6) -> Path:
    """A PNG grid of test tiles, each beside its positive-class contribution map overlaid.

    The tiles shown: the ``per_class`` most confident of each true class (by the positive
    probability), so a reader sees what the head scores highest among positives and lowest among
    negatives; each map is stretched over its own tile (the scale is per tile, as the caption says).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from pipeline.tissue import resize, to_display_rgb

    labels, positive = test["labels"], test["probs"][:, -1]
    rows = []
    for cls in np.unique(labels)[::-1]:
        idx = np.flatnonzero(labels == cls)
        rows.extend(idx[np.argsort(-positive[idx] if cls > 0 else positive[idx])[:per_class]].tolist())
    model.eval()
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in rows])
        maps = forward(model, x, device, autocast).contribution[:, -1].float().cpu().numpy()
    cols = 4  # two tiles per row of the figure, each as (tile, tile + map)
    n_rows = math.ceil(len(rows) / (cols // 2))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.8, n_rows * 1.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, i in enumerate(rows):
        tile = to_display_rgb(dataset.read_tile(i), modality)
        m = maps[k]
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        # nearest: each feature-grid cell shown as the block of the tile it covers
        big = resize(m.astype(np.float32)[..., None], tile.shape[:2][::-1], Image.Resampling.NEAREST)[..., 0]
        a, b = axes.ravel()[2 * k], axes.ravel()[2 * k + 1]
        a.imshow(tile)
        a.set_title(f"label {labels[i]}, p={positive[i]:.2f}", fontsize=7)
        b.imshow(tile)
        b.imshow(big, cmap="inferno", alpha=0.5, vmin=0, vmax=1)
        b.set_title("contribution", fontsize=7)
    fig.suptitle(f"{head}: test tiles, positive-class map (per-tile scale)", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
