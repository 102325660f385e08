"""Heatmaps: stitching geometry, the memory bound, normalisations, scores, outputs, and a real run."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
import zarr
from PIL import Image
from shapely.geometry import box

from pipeline import heatmap as hm
from pipeline.heatmap import maps as hm_maps
from pipeline.heatmap import scores as hm_scores
from pipeline.errors import GaplessError
from pipeline.models import HeadOutput, create_model
from pipeline.store import TileStoreAttrs, seal_store
from pipeline.tiling import TileSettings, tile_source

CLASSES = ["negative", "positive"]
RAW = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "classes": CLASSES, "modality": "brightfield"}


class PositionModel(torch.nn.Module):
    """A 'head' whose maps are known functions of the input: the positive contribution is the tile's
    red channel averaged over each of side×side cells, the attention the green channel likewise."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        red = F.adaptive_avg_pool2d(x[:, :1], self.side)
        green = F.adaptive_avg_pool2d(x[:, 1:2], self.side)
        contribution = torch.cat([-red, red], dim=1)
        return HeadOutput(contribution.mean(dim=(2, 3)) / 100, contribution, green, False)


# ---------------------------------------------------------------------------------------------
# Geometry on a real slide: level 1, stride < tile, non-square; intensity encodes position.

W, H, MPP = 768, 512, 0.5


def red(x):  # level-0 continuous x → red value; pixel p holds red(p + 0.5)
    return 20 + 200 * x / W


def green(y):
    return 20 + 200 * y / H


@pytest.fixture(scope="module")
def position_slide(tmp_path_factory):
    """A pyramidal zlib TIFF (OpenSlide generic-tiff), 768 × 512 px at 0.5 µm/px, levels 1, 1/2, 1/4."""
    path = tmp_path_factory.mktemp("slide") / "position.tiff"
    f = np.empty((H, W, 3), np.float64)
    f[..., 0] = red(np.arange(W) + 0.5)[None, :]
    f[..., 1] = green(np.arange(H) + 0.5)[:, None]
    f[..., 2] = 128
    levels = [f]
    for _ in range(2):
        a = levels[-1]
        levels.append((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            res = 1e4 / (MPP * 2**i)
            tif.write(np.rint(level).astype(np.uint8), tile=(128, 128), photometric="rgb", compression="zlib",
                      resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if i else 0, metadata=None)
    return path


@pytest.fixture(scope="module", params=[16, 20], ids=["stride16-aligned", "stride20-offset"])
def position_run(request, position_slide, tmp_path_factory):
    """Tiles of 32 px at 1 µm/px (level 1: extent 64 level-0 px), 4×4 maps: cells of 16 level-0 px.
    Stride 16 → step 32 level-0 px = 2 cells; stride 20 → step 40 = 2.5 cells (maps straddle cells)."""
    root = tmp_path_factory.mktemp("position")
    store = tile_source(position_slide, root / "position.zarr",
                        TileSettings(mpp=1.0, tile_size=32, stride=request.param, tissue="none", min_tissue=0.0),
                        progress=False).out
    result = hm.heatmap_model(PositionModel(4), RAW, store, root / "out", "position", head="synthetic",
                              normalisation="raw", progress=False, batch_size=16)
    return request.param, store, result


def test_stitched_maps_reproduce_the_position_function(position_run):
    stride, store, result = position_run
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs["level"] == 1 and attrs["stride"] < attrs["tile_size"] and (attrs["width"], attrs["height"]) == (W, H)
    assert attrs["tile_extent"] == 64 and attrs["tile_step"] == 2 * stride
    cell = result["cell_size"]
    assert cell == 16 and result["canvas"] == [math.ceil(H / cell), math.ceil(W / cell)] == [32, 48]

    level0 = zarr.open_group(result["zarr"], mode="r")["0"]
    positive, raw, attention = level0[0], level0[1], level0[2]
    np.testing.assert_array_equal(positive, raw)  # normalisation "raw"
    centres_x = (np.arange(48) + 0.5) * cell
    centres_y = (np.arange(32) + 0.5) * cell
    expected_x = np.broadcast_to(red(centres_x)[None, :], raw.shape)
    expected_y = np.broadcast_to(green(centres_y)[:, None], raw.shape)
    valid = np.isfinite(raw)
    one_cell_x, one_cell_y = 200 * cell / W, 200 * cell / H  # what a shift by one cell would cost
    for got, want, one_cell in ((raw, expected_x, one_cell_x), (attention, expected_y, one_cell_y)):
        err = np.abs(got[valid] - want[valid])
        if stride == 16:  # maps fall on whole cells: exact up to 8-bit rounding
            assert err.max() < 1.0
        else:  # area-weighted resampling: unbiased in the interior, within half a cell at tile edges
            assert np.median(err) < 0.1 * one_cell and err.max() < 0.5 * one_cell + 1.0

    last_tile_end = (math.floor((W - 64) / (2 * stride)) * 2 * stride + 64) / cell  # in cells
    covered = np.arange(48) + 0.5 <= last_tile_end  # a cell needs at least half of it covered
    assert valid.any(axis=0).tolist() == covered.tolist()  # NaN past the last tile, not 0
    assert valid[1:-1].all(axis=0).tolist() == covered.tolist()  # (corner cells: half × half < half)
    assert valid.all() if stride == 16 else valid.any(axis=1).all()

    doc = json.loads(result["json"].read_text())
    coords = zarr.open_group(store, mode="r")["coords"][:]
    assert [t[:2] for t in doc["tiles"]] == coords.tolist()


def test_infer_store_gives_per_tile_maps(position_run):
    _, store, _ = position_run
    group = zarr.open_group(store, mode="r")
    out = hm.infer_store(PositionModel(4), RAW, store, batch_size=7, progress=False)
    n = group["tiles"].shape[0]
    assert out.probs.shape == (n, 2) and out.contribution.shape == (n, 2, 4, 4) and out.attention.shape == (n, 1, 4, 4)
    assert out.contribution.dtype == np.float32 and np.allclose(out.probs.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(out.coords, group["coords"][:])
    tiles = group["tiles"][:].astype(np.float32)  # (n, 32, 32, 3): red averaged over 8×8 blocks
    expected = tiles[..., 0].reshape(n, 4, 8, 4, 8).mean(axis=(2, 4))
    np.testing.assert_allclose(out.contribution[:, 1], expected, rtol=1e-5)
    np.testing.assert_allclose(out.contribution[:, 0], -expected, rtol=1e-5)


def test_ome_zarr_reads_back_with_its_scale(position_run):
    _, store, result = position_run
    group = zarr.open_group(result["zarr"], mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer"]
    scale, shift = ms["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == [1.0, 16 * MPP, 16 * MPP]  # a cell is 16 level-0 px of 0.5 µm
    assert shift["translation"] == [0.0, 7.5 * MPP, 7.5 * MPP]  # cell centre vs level-0 pixel centre
    assert [c["label"] for c in ome["omero"]["channels"]] == ["positive", "positive_raw", "attention"]
    assert group.attrs["gapless"]["normalisation"] == "raw"

    ome_zarr = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    nodes = list(ome_zarr.Reader(parse_url(str(result["zarr"])))())
    image = nodes[0]
    assert image.metadata["channel_names"] == ["positive", "positive_raw", "attention"]
    assert image.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 8.0, 8.0]
    assert image.metadata["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    np.testing.assert_array_equal(np.asarray(image.data[0]), group["0"][:])
    models = pytest.importorskip("ome_zarr_models")  # comes with ome-zarr: the NGFF 0.5 schema as models
    assert type(models.open_ome_zarr(group)).__module__ == "ome_zarr_models.v05.image"


def test_png_and_overlay(position_run):
    _, _, result = position_run
    figure = Image.open(result["png"])
    assert figure.width == hm.PNG_WIDTH_PX and 600 < figure.height < 800  # 3:2 slide + caption
    overlay = np.asarray(Image.open(result["overlay"]))
    assert overlay.shape == (32, 48, 4)  # rows × cols, spanning the slide exactly
    values = zarr.open_group(result["zarr"], mode="r")["0"][0]
    np.testing.assert_array_equal(overlay[..., 3] == 0, np.isnan(values))
    doc = json.loads(result["json"].read_text())
    assert tuple(doc) == hm.JSON_KEYS and doc["overlay"] == result["overlay"].name
    lo, hi = doc["range"]
    j = int(np.nanargmax(values[0]))
    import matplotlib

    assert overlay[0, j, :3].tolist() == list(matplotlib.colormaps[doc["colormap"]](1.0, bytes=True)[:3])
    assert lo == pytest.approx(np.nanmin(values), abs=1e-4) and hi == pytest.approx(np.nanmax(values), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The memory bound: a store claiming a 100,000 × 100,000 px slide


def fake_store(path, width, height, extent, coords, tile_size=16, mpp=0.25):
    root = zarr.open_group(path, mode="w", zarr_format=3)
    n = len(coords)
    rng = np.random.default_rng(0)
    root.create_array("tiles", data=rng.integers(0, 255, (n, tile_size, tile_size, 3), dtype=np.uint8),
                      chunks=(1, tile_size, tile_size, 3))
    root.create_array("coords", data=np.asarray(coords, np.int64).reshape(n, 2), chunks=(max(n, 1), 2))
    mask = np.ones((256, 256), np.uint8)
    root.create_array("tissue_mask", data=mask, chunks=mask.shape)
    root.create_array("thumbnail", data=np.full((64, 64, 3), 240, np.uint8), chunks=(64, 64, 3))
    root.attrs.update(TileStoreAttrs(
        source="synthetic", format="synthetic", kind="slide", channel_names=["R", "G", "B"], modality="brightfield",
        tissue_method="none", mpp=mpp * extent / tile_size, source_mpp=mpp, mpp_source="override",
        target_mpp=mpp * extent / tile_size, level=0, downsample=1.0, read_size=tile_size, tile_size=tile_size,
        stride=tile_size, tile_extent=float(extent), tile_step=float(extent), grid=[0, 0], width=width, height=height,
        channels=3, dtype="uint8", channel_stats={}, min_tissue=0.0, tissue_area_fraction=1.0, n_tiles=n,
        tiles_per_shard=max(n, 1), workers=1, tissue_mask_downsample=[width / 256, height / 256],
        thumbnail_downsample=[width / 64, height / 64]).to_attrs())
    seal_store(path)  # record its files, as `gapless tile` does: stores are checked on opening
    return path


def traced_peak(fn):
    """(result, peak bytes above the start) of ``fn()`` under tracemalloc (numpy registers its buffers)."""
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - start


def test_memory_is_bounded_by_the_canvas_not_the_slide(tmp_path):
    side, extent = 100_000, 448.0  # 0.25 µm/px slide, 224-px tiles at 0.5 µm/px, 7×7 maps: cells of 64 px
    x0, y0 = 313 * 64, 781 * 64  # on whole cells, so that the count of cells with a value is exact
    coords = [(x, y) for x in range(x0, x0 + 8 * 448, 448) for y in range(y0, y0 + 8 * 448, 448)]
    store = fake_store(tmp_path / "huge.zarr", side, side, extent, coords)
    rows, cols, cell = hm.canvas_shape(side, side, extent, 7)
    assert (rows, cols, cell) == (1563, 1563, 64.0)
    bound = hm.BYTES_PER_CELL * rows * cols + hm.BYTES_PER_TILE * len(coords) + hm.FIXED_BYTES
    assert bound < side * side * 4 / 100  # under 1% of one float32 channel at full resolution (40 GB)
    small = fake_store(tmp_path / "small.zarr", 3000, 2000, extent, [(0, 0), (448, 0), (0, 448), (448, 448)])
    hm.heatmap_model(PositionModel(7), RAW, small, tmp_path / "warm", head="synthetic", progress=False)  # imports

    result, peak = traced_peak(lambda: hm.heatmap_model(PositionModel(7), RAW, store, tmp_path / "out", "huge",
                                                        head="synthetic", progress=False))
    assert peak < bound, f"{peak / 2**20:.0f} MiB"
    assert result["canvas"] == [rows, cols] and result["tiles"] == 64
    group = zarr.open_group(result["zarr"], mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    shapes = [group[d["path"]].shape for d in datasets]
    assert [s for s in shapes] == [(3, 1563, 1563), (3, 782, 782), (3, 391, 391), (3, 196, 196)]  # halved to ≤ 256
    assert [d["coordinateTransformations"][0]["scale"][1] for d in datasets] == [64 * 0.25 * 2**i for i in range(4)]
    values = group["0"][0]
    assert np.isfinite(values).sum() == (8 * 7) ** 2  # 8×8 tiles of 7×7 cells; the rest stays NaN
    assert Image.open(result["overlay"]).size == (cols, rows)

    # the same canvas, all tissue: normalising, scoring and writing stay within the bound too
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    dense = hm.StitchedMaps(np.sin(x / 50) + np.cos(y / 70), x / cols, y / rows, np.ones((rows, cols), bool), cell,
                            np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32), "attention", side, side,
                            extent, 0.25, 7)
    del x, y

    def normalise_score_write():
        values, value_range = hm.normalise(dense, "rank")
        scores = hm.score_heatmap(values, cell, [box(30_000, 30_000, 40_000, 32_000)])
        hm.write_heatmap(tmp_path / "dense", "dense", "synthetic", dense, values, value_range, "rank", CLASSES,
                         scores=scores)
        return scores

    scores, peak = traced_peak(normalise_score_write)
    assert peak < bound - 13 * rows * cols, f"{peak / 2**20:.0f} MiB"  # the maps themselves were already there
    assert scores["witness_cells"] == 158 * 33 and scores["tissue_cells"] == rows * cols  # touching: edges count


def test_a_store_without_tiles_gives_empty_maps(tmp_path):
    store = fake_store(tmp_path / "empty.zarr", 3000, 2000, 448.0, np.zeros((0, 2)))
    result = hm.heatmap_model(PositionModel(7), RAW, store, tmp_path / "out", head="synthetic", progress=False)
    values = zarr.open_group(result["zarr"], mode="r")["0"][:]
    assert np.isnan(values).all() and result["tiles"] == 0
    assert json.loads(result["json"].read_text())["tiles"] == []


# ---------------------------------------------------------------------------------------------
# Units: canvas, normalisations, spread, scores


def test_canvas_averages_overlaps_and_splats_offsets():
    maps = np.array([[[[1, 1], [1, 1]]], [[[3, 3], [3, 3]]]], np.float32)
    m, cell = hm.stitch([(0, 0), (10, 0)], maps, width=40, height=20, tile_extent=20)  # cells of 10 px
    assert cell == 10 and m.shape == (1, 2, 4)
    np.testing.assert_allclose(m[0, 0], [1, 2, 3, np.nan])  # overlap averages; nothing past the last tile
    offset = hm.SlideCanvas(width=40, height=10, tile_extent=10, map_side=1, channels=1)
    offset.add([(5, 0)], np.array([[[[4.0]]]], np.float32))  # half a cell to the right
    np.testing.assert_allclose(offset.coverage()[0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(offset.mean(0)[0], [4, 4, np.nan, np.nan])
    np.testing.assert_allclose(offset.mean(0, min_coverage=0.6)[0], [np.nan] * 4)


def test_cell_tissue_fraction_is_exact_area():
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 1  # left half tissue; mask px = 5 level-0 px
    frac = hm.cell_tissue_fraction(mask, (5.0, 5.0), rows=2, cols=3, cell=7.5)
    np.testing.assert_allclose(frac, [[1, 1 / 3, 0], [1, 1 / 3, 0]], atol=1e-6)


def stitched(raw, spread=None):
    raw = np.asarray(raw, np.float32)
    return hm.StitchedMaps(raw, raw if spread is None else np.asarray(spread, np.float32), None, np.isfinite(raw),
                           10.0, np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32), "softmax", 30, 10, 20.0,
                           0.5, 2)


def test_normalisations():
    maps = stitched([[np.nan, -2.0, 5.0], [5.0, 1.0, np.nan]], spread=[[np.nan, 0.1, 0.9], [0.4, 0.2, np.nan]])
    rank, rank_range = hm.normalise(maps, "rank")
    np.testing.assert_allclose(rank, [[np.nan, 0, 5 / 6], [5 / 6, 1 / 3, np.nan]])  # ties share their mean rank
    assert rank_range == (0.0, 1.0)
    raw, raw_range = hm.normalise(maps, "raw")
    assert raw_range == (-2.0, 5.0) and np.isnan(raw[0, 0])
    spread, spread_range = hm.normalise(maps, "attention")
    assert spread_range == (0.0, 1.0) and spread[0, 2] == pytest.approx(0.9)
    with pytest.raises(GaplessError, match="unknown normalisation"):
        hm.normalise(maps, "zscore")


def test_attention_spread_is_probability_times_relative_weight():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p(positive) = 0.75
    attention = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])
    contribution = torch.zeros(1, 2, 2, 2)
    maps = hm_maps._tile_maps(HeadOutput(logits, contribution, attention, False), np.zeros((1, 2), np.int64))
    assert maps.spread_weights == "attention"
    np.testing.assert_allclose(maps.spread[0, 0], 0.75 * np.array([[0.25, 0.5], [0.75, 1.0]]), rtol=1e-6)
    # saol-like: log-probabilities, contribution sums to p: the weights are the contribution itself
    share = torch.tensor([[[[0.1, 0.1], [0.1, 0.1]], [[0.0, 0.1], [0.2, 0.3]]]])
    maps = hm_maps._tile_maps(HeadOutput(share.sum((2, 3)).log(), share, attention, True), np.zeros((1, 2), np.int64))
    assert maps.spread_weights == "share"
    np.testing.assert_allclose(maps.spread[0, 0], 0.6 * np.array([[0, 1 / 3], [2 / 3, 1]]), rtol=1e-5, atol=1e-7)


def test_scores_on_a_known_answer(tmp_path):
    values = np.zeros((10, 10))
    values[2:4, 4:6] = 1.0  # the four cells under the witness
    values[9, 9] = np.nan  # no tissue
    witness = [box(41, 21, 59, 39)]  # level-0 px; cells of 10 px: rows 2-3, columns 4-5
    s = hm.score_heatmap(values + np.linspace(0, 0.1, 100).reshape(10, 10), 10.0, witness)
    assert s["localisation_auroc"] == 1.0 and s["pointing_game_top1"] == 1.0 and s["pointing_game_top5"] == 0.8
    assert s["witness_cells"] == 4 and s["tissue_cells"] == 99
    s = hm.score_heatmap(-values, 10.0, witness)
    assert s["localisation_auroc"] == 0.0 and s["pointing_game_top1"] == 0.0
    flat = hm.score_heatmap(np.where(np.isnan(values), np.nan, 0.5), 10.0, witness)
    assert flat["localisation_auroc"] == 0.5 and flat["pointing_game_top1"] == pytest.approx(4 / 99)
    none = hm.score_heatmap(values, 10.0, [box(500, 500, 510, 510)])
    assert none["localisation_auroc"] is None and none["pointing_game_top1"] is None and none["witness_cells"] == 0
    geojson = tmp_path / "w.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": box(41, 21, 59, 39).__geo_interface__,
         "properties": {"classification": {"name": "Witness"}}},
        {"type": "Feature", "geometry": box(1, 1, 9, 9).__geo_interface__,
         "properties": {"classification": {"name": "Other"}}}]}))
    assert hm.score_heatmap(values, 10.0, geojson, positive_classes=["Witness"])["witness_cells"] == 4
    assert hm.score_heatmap(values, 10.0, geojson)["witness_cells"] == 5


def test_localisation_auroc_agrees_with_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    values = rng.integers(0, 5, (40, 60)).astype(np.float32)  # many ties
    values[rng.random(values.shape) < 0.2] = np.nan
    witness = [box(100, 100, 260, 180), box(400, 10, 420, 300)]
    s = hm.score_heatmap(values, 10.0, witness)
    labels = hm_scores._witness_cells(values.shape, 10.0, witness)
    valid = np.isfinite(values)
    assert s["localisation_auroc"] == pytest.approx(roc_auc_score(labels[valid], values[valid]), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Loading trained runs, and one real run end to end with MLflow


def save_run(run_dir, head, store_attrs, uri=None, experiment=None):
    from safetensors.torch import save_file

    from pipeline.run_folder import ModelConfig, write_model_config
    from pipeline.tracking import RunLogger

    torch.manual_seed(0)
    model = create_model("resnet10t", head, 2, in_chans=3, pretrained=False)
    run_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / "weights.safetensors")
    stats = store_attrs["channel_stats"]
    write_model_config(run_dir, ModelConfig(
        backbone="resnet10t", head=head, num_classes=2, in_chans=3, classes=CLASSES, mean=stats["mean"],
        std=stats["std"], tile_size=store_attrs["tile_size"], image_size=None, modality="brightfield",
        mpp=store_attrs["mpp"]))
    if uri:
        run = RunLogger.start(uri, experiment, f"{head}-seed0", tags={"head": head})
        run.finish()
        (run_dir / "run_id.txt").write_text(run.run_id + "\n")
    return run_dir


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from pipeline.demo import DemoSettings, generate
    from pipeline.samples import load_sample_sheet
    from pipeline.tracking import artifact_root, prepare_tracking

    root = tmp_path_factory.mktemp("demo")
    sheet = generate(root / "demo", DemoSettings(slides=2, images=0, slide_width=1024, slide_height=768,
                                                  witness_fraction=0.2, lesions=2), progress=False)
    stores = {}
    for s in load_sample_sheet(sheet, CLASSES):
        stores[s.sample_id] = tile_source(s.path, root / "tiles" / f"{s.sample_id}.zarr",
                                          TileSettings(mpp=1.0, tile_size=64, stride=32, annotations=str(s.annotations)),
                                          progress=False).out
    uri = f"sqlite:///{root}/mlflow.db"
    experiment = prepare_tracking(uri, "gapless-heatmap-test", artifact_root(root))
    attrs = dict(zarr.open_group(stores["slide-00"], mode="r").attrs)
    runs = {head: save_run(root / "runs" / head, head, attrs, uri, experiment) for head in ("gap", "saol")}
    return root, stores, uri, runs


def test_load_trained_rebuilds_the_model_and_refuses_mismatches(demo, tmp_path):
    root, stores, uri, runs = demo
    model, config = hm.load_trained(runs["saol"], device="cpu")
    assert config["head"] == "saol" and len(config["run_id"]) == 32 and not model.training
    with pytest.raises(GaplessError, match="no such training run"):
        hm.load_trained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((runs["gap"] / "model.json").read_text().replace('"gap"', '"saol"'))
    with pytest.raises(GaplessError, match="weights.safetensors: missing"):
        hm.load_trained(broken)
    (broken / "weights.safetensors").write_bytes((runs["gap"] / "weights.safetensors").read_bytes())
    with pytest.raises(GaplessError, match="weights do not match model.json .*unexpected"):
        hm.load_trained(broken)
    config = json.loads((runs["gap"] / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps(dict(config, num_classes=3)))
    with pytest.raises(GaplessError, match="2 of another shape"):  # the classifier's weight and bias
        hm.load_trained(broken)
    (broken / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(GaplessError, match="not a readable safetensors file"):
        hm.load_trained(broken)


def test_heatmap_sample_end_to_end_with_mlflow(demo):
    from mlflow.tracking import MlflowClient

    root, stores, uri, runs = demo
    out = root / "heatmaps"
    results = hm.heatmap_sample(stores["slide-00"], runs, out, tracking_uri=uri, progress=False)
    assert set(results) == {"gap", "saol"}
    n_tiles = zarr.open_group(stores["slide-00"], mode="r")["tiles"].shape[0]
    client = MlflowClient(uri)
    for head, result in results.items():
        for suffix in (".ome.zarr", ".png", ".overlay.png", ".json"):
            assert (out / head / f"slide-00{suffix}").exists()
        doc = json.loads((out / head / "slide-00.json").read_text())
        assert list(doc) == list(hm.JSON_KEYS)
        assert doc["sample"] == "slide-00" and doc["head"] == head and doc["normalisation"] == "rank"
        assert doc["run_id"] == (runs[head] / "run_id.txt").read_text().strip()
        assert doc["range"] == [0.0, 1.0] and doc["width"] == 1024 and doc["height"] == 768 and doc["mpp"] == 0.5
        assert doc["tile_extent"] == 128.0 and len(doc["tiles"]) == n_tiles and doc["classes"] == CLASSES
        assert all(0.0 <= t[2] <= 1.0 for t in doc["tiles"])
        scores = doc["scores"]  # the store recorded the demo's witness outlines
        assert scores["witness_cells"] > 0 and 0.0 <= scores["localisation_auroc"] <= 1.0
        assert 0.0 <= scores["pointing_game_top1"] <= 1.0 and 0.0 <= scores["pointing_game_top5"] <= 1.0
        channels = [c["label"] for c in zarr.open_group(result["zarr"], mode="r").attrs["ome"]["omero"]["channels"]]
        assert channels == (["positive", "positive_raw", "attention"] if head == "saol" else ["positive", "positive_raw"])

        run = client.get_run(doc["run_id"])
        assert run.data.metrics["heatmap/slide-00/localisation_auroc"] == pytest.approx(scores["localisation_auroc"])
        assert run.data.metrics["heatmap/slide-00/pointing_game_top5"] == pytest.approx(scores["pointing_game_top5"])
        assert "heatmaps/slide-00.png" in {a.path for a in client.list_artifacts(doc["run_id"], "heatmaps")}

    # one head per call (as Snakemake runs it) writes straight into out_dir; a negative slide has no witness
    single = hm.heatmap_sample(stores["slide-01"], runs["gap"], out / "single", normalisation="attention",
                               progress=False)
    assert single["gap"]["json"] == out / "single" / "slide-01.json"
    doc = json.loads(single["gap"]["json"].read_text())
    assert doc["normalisation"] == "attention" and doc["scores"]["witness_cells"] == 0
    assert doc["scores"]["localisation_auroc"] is None
