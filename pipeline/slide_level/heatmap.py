"""Slide heatmaps from a slide-level model: the head's map over the tile grid, on the slide.

At the slide level a head's map has one cell per tile (its contribution and attention at the tile's
grid position), so each tile's values are placed on the same canvas the tile-level heatmaps use
(:class:`pipeline.heatmap.canvas.SlideCanvas`, one cell per tile extent) and go through the same
normalisation, scores and files (:func:`pipeline.heatmap.run.map_outputs`): OME-Zarr, PNG, overlay and
JSON per slide (the head named ``{head}_slide`` there, labelled "… · slide level": a second set of layers
beside the tile level's on a viewer page, :meth:`pipeline.head_info.HeadInfo.at_slide_level`), scored against the witness annotations where they exist — annotations the model never
saw (only slide labels train it). Channels: ``raw`` = the positive class's contribution of each tile
(its meaning per head as documented on the head), ``spread`` = the slide's positive probability spread
by the head's weights over its tiles (attention where the head has one; the contribution's share for a
head that scores log-probabilities; a softmax of the contribution otherwise), ``attention`` where the
head has one. The JSON's tile probabilities are the slide's probability at every tile: a slide-level
head scores the slide, not its tiles.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from pipeline.errors import GaplessError

log = logging.getLogger("gapless.slide_level")


def scoring_annotations(path: str | Path, sample_ids) -> dict[str, Path]:
    """sample id → GeoJSON for scoring only, from ``path``: a folder of ``{sample_id}.geojson``, or a CSV with
    columns ``sample_id`` and ``annotations`` (paths relative to the CSV; e.g. the demo's ``annotations.csv``).
    Samples without one are left out (their maps are not scored); a listed file that is missing is an error."""
    import csv

    path = Path(path)
    ids = set(sample_ids)
    if path.is_dir():
        return {i: path / f"{i}.geojson" for i in ids if (path / f"{i}.geojson").is_file()}
    if not path.is_file():
        raise GaplessError(path, "no such folder or CSV of annotations",
                           "pass a folder of {sample_id}.geojson files or a CSV with sample_id and annotations columns")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise GaplessError(path, f"cannot read the annotations CSV ({exc})", "pass a UTF-8 CSV") from None
    if rows and not {"sample_id", "annotations"} <= set(rows[0]):
        raise GaplessError(path, f"has columns {sorted(rows[0])}, not sample_id and annotations",
                           "name the columns sample_id and annotations")
    found = {}
    for row in rows:
        sample_id, value = (row.get("sample_id") or "").strip(), (row.get("annotations") or "").strip()
        if sample_id in ids and value:
            file = (path.parent / value).resolve()
            if not file.is_file():
                raise GaplessError(path, f"lists {value} for {sample_id}, which does not exist",
                                   "fix the path (relative to the CSV) or leave the cell empty")
            found[sample_id] = file
    return found


def slide_maps(model, bag, view, device=None):
    """``(StitchedMaps, p_positive)`` of one slide (``bag``: its ``SlideBag``; ``view``: its tile store's
    sample view, for the geometry, tissue mask and thumbnail)."""
    import torch

    from pipeline.heatmap.canvas import SlideCanvas, canvas_maps
    from pipeline.heatmap.maps import spread_map
    from pipeline.inference import probabilities
    from pipeline.slide_level.bags import collate

    x, mask = collate([bag])
    device = device or next(model.parameters()).device
    with torch.no_grad():
        out = model(x.to(device), mask.to(device))
    probs = probabilities(out).float()
    spread, kind = spread_map(out, probs, mask.to(device))  # the slide's probability spread over its tiles, as over a tile's map
    at = (bag.rows, bag.cols)
    tiles = lambda t: t[0, 0].float().cpu().numpy()[at]  # noqa: E731  (B×1×h×w → one value per tile)
    raw, spread = tiles(out.contribution[:, -1:]), tiles(spread)
    attention = None if out.attention is None else tiles(out.attention)
    probs = probs.cpu().numpy()[0]
    named = {"raw": raw, "spread": spread}
    if attention is not None:
        named["attention"] = attention
    a = view.attrs
    canvas = SlideCanvas(int(a.width), int(a.height), float(a.tile_extent), 1, len(named))
    canvas.add(bag.coords, np.stack(list(named.values()), axis=1)[:, :, None, None].astype(np.float32))
    tile_probs = np.repeat(probs[None].astype(np.float32), len(bag.coords), axis=0)
    return canvas_maps(canvas, list(named), view, bag.coords, tile_probs, kind), float(probs[-1])


def slide_heatmap_cohort(run_dir: str | Path, embeddings: Mapping[str, str | Path], out_dir: str | Path,
                         manifest: str | Path | None = None, normalisation: str = "rank",
                         annotations: Mapping[str, str | Path] | None = None, positive_classes=(),
                         tile_stores: Mapping[str, str | Path] | None = None, tracking_uri: str | None = None,
                         outputs: Collection[str] | None = None, pngs_to_mlflow: int = 16, progress: bool = True,
                         device=None) -> dict:
    """One trained slide-level model (``run_dir``) over the slides ``embeddings`` (sample id → embedding
    store): each slide's heatmap written into ``out_dir`` as the tile-level heatmaps are, scored against
    ``annotations`` (sample id → GeoJSON; default: the one recorded in the slide's tile store, if any),
    the scores logged to the model's MLflow run, and ``manifest`` (the tile level's schema, with
    ``"level": "slide"`` and each slide's probability) written last. ``tile_stores``: sample id → tile
    store (default: the one each embedding store records). ``outputs``: the slides whose files are
    written (None: all); the others are scored only. Returns the manifest's content."""
    from tqdm import tqdm

    from pipeline.device import resolve_device
    from pipeline.embed import read_embeddings
    from pipeline.files import atomic_write_text
    from pipeline.head_info import HeadInfo
    from pipeline.heatmap.maps import sample_view
    from pipeline.heatmap.run import MANIFEST_SCHEMA, log_scores, map_outputs, resolve_annotations
    from pipeline.heatmap.scores import check_normalisation
    from pipeline.slide_level.bags import bag_from_embeddings
    from pipeline.slide_level.train import LEVEL, load_slide_model

    check_normalisation(normalisation)
    device = resolve_device(device)
    model, doc = load_slide_model(run_dir, device)
    info = HeadInfo.from_dict(doc.get("head_info"), name=doc["model"]["head"])
    classes, run_id = list(doc["classes"]), doc.get("run_id")
    results = {}
    for sample_id, path in tqdm(embeddings.items(), desc=f"slide heatmaps {info.name}", unit="slide",
                                disable=not progress, file=sys.stderr, dynamic_ncols=True):
        emb = read_embeddings(path)
        if int(emb.attrs["dim"]) != int(doc["model"]["in_dim"]):
            raise GaplessError(path, f"embeddings of width {emb.attrs['dim']}, the model takes {doc['model']['in_dim']}",
                               "map the slides embedded with the encoder the model was trained on")
        store = (tile_stores or {}).get(sample_id) or emb.attrs.get("tile_store")
        if not store or not Path(store).exists():
            raise GaplessError(path, f"the tile store of {sample_id} ({store}) is gone",
                               "tile the slide again, or pass its tile store")
        view = sample_view(store, sample_id)
        given = (annotations or {}).get(sample_id)
        ann, positive = resolve_annotations(view, given, positive_classes)
        maps, p = slide_maps(model, bag_from_embeddings(emb, sample_id), view, device)
        write = outputs is None or sample_id in outputs
        r = map_outputs(maps, view, sample_id, info.at_slide_level(), classes, out_dir, normalisation, ann, positive, run_id, None,
                        False, write)
        results[sample_id] = {"tiles": r["tiles"], "p_mean": r["p_mean"], "p_max": r["p_max"], "p_slide": p,
                              "scores": r["scores"]}
        for key in ("json", "png"):
            if key in r:
                results[sample_id][key] = str(r[key])
    if tracking_uri and run_id:
        log_scores(tracking_uri, run_id, {s: r["scores"] for s, r in results.items()},
                   [Path(r["png"]) for r in list(results.values())[:pngs_to_mlflow] if "png" in r])
    out = {"schema": MANIFEST_SCHEMA, "level": LEVEL, "head": info.name, "run_id": run_id, "model": str(run_dir),
           "normalisation": normalisation, "samples": results}
    if manifest is not None:
        atomic_write_text(manifest, json.dumps(out, allow_nan=False, separators=(",", ":")) + "\n")
    return out
