"""What a heatmap is written as: an OME-Zarr, a PNG figure, an RGBA overlay and a JSON for the viewer.

Outputs in ``out_dir`` per sample (``heatmap_model`` / ``heatmap_sample``):
  ``{sample}.ome.zarr``: NGFF 0.5 multiscale image (zarr v3), axes c, y, x (µm), channels
    ``positive`` (the normalised map), ``positive_raw`` (raw contribution) and ``attention`` (the
    head's attention map, where it has one); level l has scale ``cell · 2^l · source_mpp`` µm and
    translation ``(cell · 2^l − 1) / 2 · source_mpp`` µm, so cell centres land where a level-0 image
    of the slide at scale ``source_mpp`` (pixel centres at index × mpp) puts the same place; levels
    halve (NaN-aware 2×2 mean) down to ≤ 256 cells or 5 levels. Attributes ``gapless`` hold the
    normalisation, range, weights, cell size, scores.
  ``{sample}.png``: the thumbnail with the heatmap overlaid, a colour bar, and a caption naming the
    sample, the head, the normalisation and the scores.
  ``{sample}.overlay.png``: RGBA, cols × rows px covering exactly the slide's full extent
    [0, width] × [0, height] (pixel centre (j + 0.5) · width / cols samples the canvas there): the
    colour-mapped heatmap, opaque where there is a value and alpha 0 where NaN; the viewer sets the
    opacity.
  ``{sample}.json``: exactly the keys ``JSON_KEYS``, for a web viewer: ``tiles`` is
    [[x, y, p_positive], …] (level-0 top-left corners, probability rounded to 4 decimals),
    ``range`` the values at the colormap's ends, ``overlay`` the RGBA PNG's file name, ``mpp`` the
    source's µm per level-0 px, ``scores`` as below (empty without ground truth).

With the Grad-CAM map (``gradcam`` given; :mod:`pipeline.heatmap.gradcam`), on the same canvas and
normalisation: the OME-Zarr gets two more channels after the others, ``gradcam`` (normalised) and
``gradcam_raw``; ``{sample}.gradcam.png`` and ``{sample}.gradcam.overlay.png`` are its figure and
overlay; the JSON gets the key ``gradcam`` ({overlay, range, scores}: ``GRADCAM_JSON_KEYS``). Without
it every output is exactly as before.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.files import outputs
from pipeline.head_info import HeadInfo
from pipeline.heatmap.canvas import MIN_CELL_TISSUE, MIN_COVERAGE, StitchedMaps
from pipeline.heatmap.document import HeatmapDocument, write_document
from pipeline.heatmap.scores import GRADCAM_LABEL, GRADCAM_NORMALISATION_LABELS, NORMALISATION_LABELS, SPREAD_WEIGHTS

COLORMAP = "viridis"
PYRAMID_MIN_SIDE = 256
PYRAMID_MAX_LEVELS = 5
PNG_WIDTH_PX = 1000
_DPI = 100


def _halve(values: np.ndarray) -> np.ndarray:
    """(r, c) → (⌈r/2⌉, ⌈c/2⌉) float32: the mean of the finite values of each 2×2 block (NaN when none)."""
    r, c = values.shape
    total = np.zeros(((r + 1) // 2, (c + 1) // 2), np.float32)
    count = np.zeros(total.shape, np.uint8)
    for dy in (0, 1):
        for dx in (0, 1):
            part = values[dy::2, dx::2]
            finite = np.isfinite(part)
            total[: part.shape[0], : part.shape[1]] += np.where(finite, part, 0)
            count[: part.shape[0], : part.shape[1]] += finite
    out = np.full(total.shape, np.nan, np.float32)
    np.divide(total, count, out=out, where=count > 0)
    return out


def _finite_range(a: np.ndarray | None, default=(0.0, 1.0)) -> tuple[float, float]:
    if a is None or not np.isfinite(a).any():
        return default
    return float(np.nanmin(a)), float(np.nanmax(a))


def _write_ome_zarr(folder: Path, layers: list[tuple[str, np.ndarray, tuple[float, float]]], cell: float,
                    mpp: float | None, name: str, extra: dict) -> None:
    """NGFF 0.5 multiscale image (c, y, x; µm) written into the empty ``folder``."""
    import zarr

    unit_mpp = float(mpp) if mpp else 1.0
    planes = [layer for _, layer, _ in layers]  # one channel at a time: no stacked copy
    root = zarr.open_group(folder, mode="w", zarr_format=3)
    datasets, level = [], 0
    while True:
        rows, cols = planes[0].shape
        array = root.create_array(str(level), shape=(len(planes), rows, cols), dtype=np.float32,
                                  chunks=(1, min(512, rows), min(512, cols)), fill_value=np.nan,
                                  dimension_names=["c", "y", "x"])
        for c, plane in enumerate(planes):
            array[c] = plane
        size = cell * 2**level  # level-0 px per cell at this level
        scale, shift = size * unit_mpp, (size - 1) / 2 * unit_mpp
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, scale, scale]},
            {"type": "translation", "translation": [0.0, shift, shift]}]})
        if max(rows, cols) <= PYRAMID_MIN_SIDE or level + 1 >= PYRAMID_MAX_LEVELS:
            break
        planes, level = [_halve(plane) for plane in planes], level + 1
    unit = "micrometer" if mpp else None
    space = lambda axis: {"name": axis, "type": "space", **({"unit": unit} if unit else {})}  # noqa: E731
    colours = {"positive": "FFFFFF", "positive_raw": "FF00FF", "attention": "00FFFF", "gradcam": "FFFF00",
               "gradcam_raw": "FF8000"}
    channels = []
    for label, _, (lo, hi) in layers:
        channels.append({"label": label, "color": colours.get(label, "FFFFFF"), "active": label == "positive",
                         "window": {"min": lo, "max": hi, "start": lo, "end": hi}})
    root.attrs.update({
        "ome": {
            "version": "0.5",
            "multiscales": [{
                "name": name,
                "axes": [{"name": "c", "type": "channel"}, space("y"), space("x")],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"description": "2×2 mean of the finite values (NaN = no tissue)",
                             "method": "pipeline.heatmap._halve"},
            }],
            "omero": {"channels": channels, "rdefs": {"model": "color"}},
        },
        "gapless": extra,
    })


def _colour(values: np.ndarray, value_range: tuple[float, float], colormap: str) -> np.ndarray:
    """(…) float with NaN → (…, 4) uint8 RGBA: the colormap between ``value_range``, alpha 0 at NaN."""
    import matplotlib

    lo, hi = value_range
    scaled = (values - lo) / (hi - lo if hi > lo else 1.0)
    rgba = matplotlib.colormaps[colormap](np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1), bytes=True)
    rgba[..., 3] = np.where(np.isfinite(values), 255, 0)
    return rgba


def overlay_image(values: np.ndarray, cell: float, width: int, height: int, value_range: tuple[float, float],
                  colormap: str = COLORMAP) -> np.ndarray:
    """(rows, cols, 4) uint8 RGBA spanning exactly [0, width] × [0, height]: pixel (i, j) shows the
    canvas cell under its centre ((j + 0.5)·width/cols, (i + 0.5)·height/rows)."""
    rows, cols = values.shape
    ys = np.minimum(((np.arange(rows) + 0.5) * height / rows / cell).astype(np.int64), rows - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * width / cols / cell).astype(np.int64), cols - 1)
    rgba = np.empty((rows, cols, 4), np.uint8)
    for r in range(0, rows, 256):  # in blocks of rows: the colormap's float temporaries stay small
        rgba[r : r + 256] = _colour(values[np.ix_(ys[r : r + 256], xs)], value_range, colormap)
    return rgba


def _score_text(scores: dict) -> str:
    if not scores or scores.get("witness_cells") in (None, 0):
        return "no witness annotations on this sample" if scores else "no ground truth"
    parts = [f"{scores['witness_cells']} of {scores['tissue_cells']} tissue cells touch a witness"]
    if scores.get("localisation_auroc") is not None:
        parts.append(f"localisation AUROC {scores['localisation_auroc']:.3f}")
    pointing = [f"top-{k[len('pointing_game_top'):]} {v:.2f}" for k, v in scores.items()
                if k.startswith("pointing_game_top") and v is not None]
    if pointing:
        parts.append("pointing game " + ", ".join(pointing))
    return " · ".join(parts)


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """DejaVu Sans (shipped with matplotlib) at ``size`` px; Pillow's own scalable default otherwise
    (read once per size and process: a cohort's job draws two figures per sample)."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def _figure(path: Path, thumbnail: np.ndarray | None, values: np.ndarray, cell: float, width: int, height: int,
            value_range: tuple[float, float], colormap: str, caption: list[str], bar_label: str) -> None:
    """PNG ``PNG_WIDTH_PX`` wide at ``path``: thumbnail, heatmap over it (alpha 0.55, none where NaN), colour bar, caption.

    Drawn with Pillow (tens of ms; matplotlib took ~0.5 s a figure, the bulk of a heatmap job over a
    cohort of many small fields)."""
    from PIL import Image, ImageDraw

    box_w, box_h = 800, 900  # px for the slide picture; the rest: colour bar, caption
    aspect = height / width
    img_w, img_h = (box_w, round(box_w * aspect)) if box_w * aspect <= box_h else (round(box_h / aspect), box_h)
    img_w, img_h = max(img_w, 1), max(img_h, 1)
    caption_h = 25 * len(caption) + 30
    fig = Image.new("RGB", (PNG_WIDTH_PX, img_h + caption_h + 20), "white")
    left, top = 15 + (box_w - img_w) // 2, 20
    if thumbnail is not None:
        fig.paste(Image.fromarray(np.ascontiguousarray(thumbnail[..., :3])).resize((img_w, img_h), Image.BILINEAR),
                  (left, top))
    while max(values.shape) > PNG_WIDTH_PX:  # no finer than the figure can show
        values, cell = _halve(values), cell * 2
    rgba = overlay_image(values, cell, width, height, value_range, colormap)
    rgba[..., 3] = (rgba[..., 3].astype(np.uint16) * 55 // 100).astype(np.uint8)  # alpha 0.55, 0 where NaN
    heat = Image.fromarray(rgba, "RGBA").resize((img_w, img_h), Image.NEAREST)
    base = fig.crop((left, top, left + img_w, top + img_h)).convert("RGBA")
    fig.paste(Image.alpha_composite(base, heat).convert("RGB"), (left, top))
    draw = ImageDraw.Draw(fig)
    # the colour bar: the colormap from value_range[1] (top) to value_range[0] (bottom), ticks at both ends
    bar_x, bar_w = 15 + box_w + 35, 20
    ramp = np.linspace(value_range[1], value_range[0], img_h)[:, None].repeat(bar_w, 1)
    fig.paste(Image.fromarray(_colour(ramp, value_range, colormap)[..., :3]), (bar_x, top))
    draw.rectangle((bar_x, top, bar_x + bar_w - 1, top + img_h - 1), outline="black")
    small = _font(12)
    for value, y in ((value_range[1], top), (value_range[0], top + img_h - 12)):
        draw.text((bar_x + bar_w + 4, y), f"{value:.3g}", fill="black", font=small)
    label = Image.new("RGBA", (img_h, 16), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((img_h // 2, 8), bar_label, fill="black", font=small, anchor="mm")
    label = label.rotate(90, expand=True)
    fig.paste(label, (bar_x + bar_w + 48, top), label)
    for i, line in enumerate(caption):
        font = _font(15 if i == 0 else 12)
        draw.text((PNG_WIDTH_PX // 2, top + img_h + 20 + 25 * i), line, fill="black", font=font, anchor="ma")
    fig.save(path, format="png", compress_level=1)  # zlib level 6 took 0.4 s a figure, a third of the job


def write_heatmap(out_dir: str | Path, sample_id: str, head: str | HeadInfo, maps: StitchedMaps, values: np.ndarray,
                  value_range: tuple[float, float], normalisation: str, classes: Sequence[str],
                  thumbnail: np.ndarray | None = None, scores: dict | None = None, run_id: str | None = None,
                  colormap: str = COLORMAP, gradcam: tuple | None = None) -> dict[str, Path]:
    """Write ``{sample}.ome.zarr``, ``{sample}.png``, ``{sample}.overlay.png`` and ``{sample}.json``
    into ``out_dir`` (module docstring): all four appear complete, or none of them (a failure, e.g. a
    full disk, leaves an older set as it was). ``head``: its name, or its ``HeadInfo`` (label and
    description for the viewer). ``gradcam``: ``(values, value_range, scores)`` of the Grad-CAM map
    (``normalise(maps, normalisation, "gradcam")``; ``maps.gradcam`` is its raw map), written beside
    the head's (``gradcam_png``, ``gradcam_overlay``). Returns their paths."""
    from PIL import Image

    info = head if isinstance(head, HeadInfo) else HeadInfo(str(head))
    head = info.name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = dict(scores or {})
    paths = {"zarr": out_dir / f"{sample_id}.ome.zarr", "png": out_dir / f"{sample_id}.png",
             "overlay": out_dir / f"{sample_id}.overlay.png", "json": out_dir / f"{sample_id}.json"}
    value_range = (float(value_range[0]), float(value_range[1]))
    layers = [("positive", values, value_range), ("positive_raw", maps.raw, _finite_range(maps.raw))]
    if maps.attention is not None:
        layers.append(("attention", maps.attention, _finite_range(maps.attention)))
    if gradcam is not None:
        if maps.gradcam is None:
            raise ValueError("a Grad-CAM map to write, but the stitched maps have no raw Grad-CAM (maps.gradcam)")
        g_values, g_range, g_scores = gradcam
        g_range, g_scores = (float(g_range[0]), float(g_range[1])), dict(g_scores or {})
        paths.update(gradcam_png=out_dir / f"{sample_id}.gradcam.png",
                     gradcam_overlay=out_dir / f"{sample_id}.gradcam.overlay.png")
        layers += [("gradcam", g_values, g_range), ("gradcam_raw", maps.gradcam, _finite_range(maps.gradcam))]
    extra = {"sample": sample_id, "head": head, "run_id": run_id, "normalisation": normalisation,
             "normalisation_label": NORMALISATION_LABELS[normalisation], "range": list(value_range),
             "colormap": colormap, "spread_weights": maps.spread_weights, "cell_size": maps.cell,
             "map_side": maps.map_side, "tile_extent": maps.tile_extent, "width": maps.width,
             "height": maps.height, "source_mpp": maps.source_mpp, "channels": [n for n, _, _ in layers],
             "min_coverage": MIN_COVERAGE, "min_cell_tissue": MIN_CELL_TISSUE, "scores": scores}
    if gradcam is not None:
        extra["gradcam"] = {"range": list(g_range), "scores": g_scores}
    with outputs() as staged:  # the four files appear together, the JSON (the workflow's output) last
        _write_ome_zarr(staged.directory(paths["zarr"], holds="zarr.json"), layers, maps.cell, maps.source_mpp,
                        f"{sample_id} {head}", extra)

        rgba = overlay_image(values, maps.cell, maps.width, maps.height, value_range, colormap)
        staged.file(paths["overlay"], lambda tmp: Image.fromarray(rgba, "RGBA").save(tmp, format="png"))

        label = NORMALISATION_LABELS[normalisation]
        if normalisation == "attention":
            label += f", w = {SPREAD_WEIGHTS[maps.spread_weights]}"
        caption = [f"{sample_id} · {info.shown} · normalisation: {normalisation}", label, _score_text(scores)]
        staged.file(paths["png"], lambda tmp: _figure(tmp, thumbnail, values, maps.cell, maps.width, maps.height,
                                                      value_range, colormap, caption,
                                                      f"{normalisation} ({value_range[0]:.3g} to {value_range[1]:.3g})"))
        gradcam_doc = None
        if gradcam is not None:
            g_rgba = overlay_image(g_values, maps.cell, maps.width, maps.height, g_range, colormap)
            staged.file(paths["gradcam_overlay"], lambda tmp: Image.fromarray(g_rgba, "RGBA").save(tmp, format="png"))
            del g_rgba
            g_caption = [f"{sample_id} · {info.shown} · {GRADCAM_LABEL} · normalisation: {normalisation}",
                         GRADCAM_NORMALISATION_LABELS[normalisation], _score_text(g_scores)]
            staged.file(paths["gradcam_png"],
                        lambda tmp: _figure(tmp, thumbnail, g_values, maps.cell, maps.width, maps.height, g_range,
                                            colormap, g_caption,
                                            f"{GRADCAM_LABEL} {normalisation} ({g_range[0]:.3g} to {g_range[1]:.3g})"))
            gradcam_doc = {"overlay": paths["gradcam_overlay"].name, "range": g_range, "scores": g_scores}

        p_pos = maps.probs[:, -1] if len(maps.probs) else np.zeros(0, np.float32)
        document = HeatmapDocument(
            sample=sample_id, head=info, run_id=run_id, normalisation=normalisation, colormap=colormap,
            range=value_range, width=int(maps.width), height=int(maps.height), mpp=maps.source_mpp,
            overlay=paths["overlay"].name, tile_extent=float(maps.tile_extent),
            tiles=[[int(x), int(y), round(float(p), 4)] for (x, y), p in zip(maps.coords, p_pos)],
            classes=list(classes), scores=scores, gradcam=gradcam_doc,
        )
        staged.file(paths["json"], lambda tmp: write_document(tmp, document))
    return paths

