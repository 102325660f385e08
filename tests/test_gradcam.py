"""Grad-CAM for every head: its exact form for GAP and max, agreement with plain per-tile backprop through
the whole network, no gradient state left behind, the memory bound, and a heatmap end to end with MLflow."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from test_heatmap import CLASSES, RAW, PositionModel, fake_store, save_run, traced_peak

from pipeline import heatmap as hm
from pipeline.errors import GaplessError
from pipeline.heatmap.gradcam import forward_grad_cam, grad_cam
from pipeline.models import HEADS, GapHead, InstanceModel, create_model

SIDE = 64  # px: resnet10t gives 2×2 maps


def model_for(head: str, seed: int = 0, scramble: bool = True):
    """resnet10t + ``head`` in eval mode; ``scramble``: the head's parameters drawn at random (N(0, 0.3²)),
    so that a fresh head's zero attention and tiny classifier do not make every map trivially flat."""
    torch.manual_seed(seed)
    model = create_model("resnet10t", head, 2, in_chans=3, pretrained=False).eval()
    if scramble:
        with torch.no_grad():
            for p in model.head.parameters():
                p.normal_(0.0, 0.3)
    return model


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def reference_grad_cam(model, x, score=lambda out: out.logits[:, -1]):
    """Grad-CAM as the paper computes it: one tile at a time, the whole network differentiated (on a copy,
    whose parameters' .grad fill up), α_c = mean over positions of ∂score/∂A_c, ReLU(Σ_c α_c A_c)."""
    model = copy.deepcopy(model)
    maps = []
    with torch.enable_grad():
        for i in range(len(x)):
            features, extra = model.forward_features(x[i : i + 1])
            features.retain_grad()
            score(model.head(features, extra or None)).sum().backward()
            alpha = features.grad.mean(dim=(2, 3))
            maps.append(F.relu(torch.einsum("bc,bchw->bhw", alpha, features.detach())).unsqueeze(1))
    return torch.cat(maps)


def mixed_sign(model, x) -> None:
    """Shift the positive class's weights by a constant so that W_pos·A_ij changes sign across the batch's
    positions: half the positions then pass the ReLU, half do not (the property below is not vacuous)."""
    with torch.no_grad():
        a, _ = model.forward_features(x)
        w = model.head.fc.weight
        cam = torch.einsum("c,bchw->bhw", w[-1], a)
        total = a.sum(dim=1)
        w[-1] -= (cam / total).median()


@pytest.mark.parametrize("head", ["gap", "cbam"])
def test_gap_gradcam_is_the_bias_free_cam_through_a_relu_over_hw(head):
    """GAP: y = (1/hw) Σ_ij W_pos·A_ij + b_pos, so ∂y/∂A_c,ij = W_pos,c/(hw) at every position, α_c = W_pos,c/(hw),
    and Grad-CAM = ReLU(Σ_c W_pos,c A_c,ij)/(hw) = ReLU(CAM_pos,ij − b_pos)/(hw), with CAM_pos the head's own
    positive contribution map (which includes the bias). cbam's classifier is GAP's (on a CBAM backbone)."""
    model, x = model_for(head), images()
    mixed_sign(model, x)
    with torch.no_grad():
        out, cam = forward_grad_cam(model, x)
    h, w = cam.shape[2:]
    expected = F.relu(out.contribution[:, -1:] - model.head.fc.bias[-1]) / (h * w)
    assert (expected > 0).any() and (expected == 0).any()  # both sides of the ReLU are exercised
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-7)


def test_max_gradcam_is_gaps_formula_not_the_heads_own_map():
    """max: y = W_pos·(max_ij A_ij) + b_pos: ∂y/∂A_c,ij = W_pos,c at channel c's peak and 0 elsewhere, so α_c =
    W_pos,c/(hw) again and Grad-CAM = ReLU(Σ_c W_pos,c A_c,ij)/(hw) at every position, where the head's own
    map has values only at the peaks."""
    model, x = model_for("max"), images()
    mixed_sign(model, x)
    with torch.no_grad():
        a, _ = model.forward_features(x)
        cam = grad_cam(model, x)
    h, w = cam.shape[2:]
    expected = F.relu(torch.einsum("c,bchw->bhw", model.head.fc.weight[-1], a)).unsqueeze(1) / (h * w)
    assert (expected > 0).any() and (expected == 0).any()
    torch.testing.assert_close(cam, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_gives_a_finite_map_equal_to_per_tile_backprop(head):
    """Every registered head (whatever its name): B×1×h×w on the grid of its own map, finite, ≥ 0; its output
    as model(x) gives it; and the batched map (only the head differentiated, one backward for the batch's
    summed scores) equals the paper's computation tile by tile through the whole network."""
    x = images()
    for seed in range(10):  # the first draw of the head's parameters whose map is not zero everywhere
        model = model_for(head, seed)
        if grad_cam(model, x).max() > 0:
            break
    reference = reference_grad_cam(model, x)
    assert reference.abs().max() > 0, "a vacuous comparison: every map is zero"
    with torch.no_grad():
        out, cam = forward_grad_cam(model, x)
        plain = model(x)
    assert cam.shape == (len(x), 1, *plain.contribution.shape[2:]) and cam.dtype == torch.float32
    assert torch.isfinite(cam).all() and (cam >= 0).all()
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.contribution, plain.contribution, rtol=0, atol=0)
    torch.testing.assert_close(cam, reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


def test_saol_scores_log_p_so_its_map_is_the_map_of_p_over_p():
    """saol's logits are log p; Grad-CAM uses them as they are: ∂log p/∂A = (1/p) ∂p/∂A, so the map is the
    map of p divided by the tile's p (the choice documented in pipeline.heatmap.gradcam)."""
    model, x = model_for("saol"), images()
    with torch.no_grad():
        out, cam = forward_grad_cam(model, x)
    p = out.logits[:, -1].exp()
    of_p = reference_grad_cam(model, x, score=lambda o: o.logits[:, -1].exp())
    torch.testing.assert_close(cam * p[:, None, None, None], of_p, rtol=1e-4, atol=1e-6 * float(of_p.abs().max()))


@pytest.mark.parametrize("grad_mode", [False, True])
def test_no_gradient_state_is_left_behind(grad_mode):
    model, x = model_for("saol"), images()
    with torch.set_grad_enabled(grad_mode):
        out, cam = forward_grad_cam(model, x)
        assert torch.is_grad_enabled() == grad_mode
    assert all(p.grad is None for p in model.parameters())
    for t in (out.logits, out.contribution, out.attention, cam):
        assert not t.requires_grad and t.grad_fn is None
    model.train()
    with pytest.raises(GaplessError, match="training mode"):
        grad_cam(model, x)
    with pytest.raises(GaplessError, match="forward_features and head"):
        grad_cam(PositionModel(2), x)


def test_gradcam_through_the_stitching_and_the_memory_bound(tmp_path):
    """A model whose backbone makes 7×7 maps of 16-px tiles, on a store claiming a 100,000 × 100,000 px slide:
    the head's outputs are unchanged, the Grad-CAM map is stitched beside them, and the peak memory stays
    within the bound with GRADCAM_BYTES_PER_CELL added."""

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward_features(self, x):
            return F.relu(F.adaptive_avg_pool2d(self.conv(x), 7))

    torch.manual_seed(0)
    model = InstanceModel(Backbone(), GapHead(4, 2)).eval()
    side, extent = 100_000, 448.0
    x0, y0 = 313 * 64, 781 * 64
    coords = [(x, y) for x in range(x0, x0 + 8 * 448, 448) for y in range(y0, y0 + 8 * 448, 448)]
    store = fake_store(tmp_path / "huge.zarr", side, side, extent, coords)
    small = fake_store(tmp_path / "small.zarr", 3000, 2000, extent, [(0, 0), (448, 0)])
    hm.heatmap_model(model, RAW, small, tmp_path / "warm", head="gap", progress=False, gradcam=True)  # imports
    rows, cols, _ = hm.canvas_shape(side, side, extent, 7)
    bound = (hm.BYTES_PER_CELL + hm.GRADCAM_BYTES_PER_CELL) * rows * cols + hm.BYTES_PER_TILE * len(coords) + hm.FIXED_BYTES
    result, peak = traced_peak(lambda: hm.heatmap_model(model, RAW, store, tmp_path / "out", "huge", head="gap",
                                                        progress=False, gradcam=True))
    assert peak < bound, f"{peak / 2**20:.0f} MiB"
    group = zarr.open_group(result["zarr"], mode="r")
    assert group.attrs["gapless"]["channels"] == ["positive", "positive_raw", "gradcam", "gradcam_raw"]
    level0 = group["0"]
    assert np.isfinite(level0[2]).sum() == (8 * 7) ** 2 and (level0[3][np.isfinite(level0[3])] >= 0).all()
    plain = hm.heatmap_model(model, RAW, store, tmp_path / "plain", "huge", head="gap", progress=False)
    np.testing.assert_array_equal(zarr.open_group(plain["zarr"], mode="r")["0"][:2], level0[:2])
    assert "gradcam_png" not in plain and not (tmp_path / "plain" / "huge.gradcam.png").exists()
    assert "gradcam" not in json.loads(plain["json"].read_text())  # without Grad-CAM the JSON is as before


def test_gradcam_needs_a_model_with_its_feature_map(tmp_path):
    store = fake_store(tmp_path / "s.zarr", 3000, 2000, 448.0, [(0, 0)])
    with pytest.raises(GaplessError, match="forward_features and head"):
        hm.heatmap_model(PositionModel(7), RAW, store, tmp_path / "out", head="synthetic", progress=False, gradcam=True)


def test_empty_store_gives_an_empty_gradcam_map(tmp_path):
    store = fake_store(tmp_path / "empty.zarr", 3000, 2000, 448.0, np.zeros((0, 2)))
    model = model_for("gap", scramble=False)
    maps = hm.infer_store(model, RAW, store, progress=False, gradcam=True)
    assert maps.gradcam.shape[0] == 0 and maps.gradcam.shape[1] == 1 and maps.gradcam_spread.shape == maps.gradcam.shape


def test_the_setting_is_a_flag_and_a_config_key():
    from pipeline.cli import build_parser
    from pipeline.settings import HeatmapSettings, settings_from_args, settings_json

    parser = build_parser()
    base = ["heatmap", "s.zarr", "--model", "m", "--out", "o"]
    assert settings_from_args(HeatmapSettings, parser.parse_args(base)).gradcam is True
    assert settings_from_args(HeatmapSettings, parser.parse_args(base + ["--no-gradcam"])).gradcam is False
    off = parser.parse_args(base + ["--settings", settings_json(HeatmapSettings, {"gradcam": False, "threads": 2})])
    assert settings_from_args(HeatmapSettings, off).gradcam is False


# ---------------------------------------------------------------------------------------------
# End to end: a trained run folder, a cohort of two demo slides, MLflow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from pipeline.demo import DemoSettings, generate
    from pipeline.samples import load_sample_sheet
    from pipeline.tiling import TileSettings, tile_source
    from pipeline.tracking import artifact_root, prepare_tracking

    root = tmp_path_factory.mktemp("gradcam")
    sheet = generate(root / "demo", DemoSettings(slides=2, images=0, slide_width=1024, slide_height=768,
                                                  witness_fraction=0.2, lesions=2), progress=False)
    stores = {s.sample_id: tile_source(s.path, root / "tiles" / f"{s.sample_id}.zarr",
                                       TileSettings(mpp=1.0, tile_size=SIDE, stride=32, annotations=str(s.annotations)),
                                       progress=False).out
              for s in load_sample_sheet(sheet, CLASSES)}
    uri = f"sqlite:///{root}/mlflow.db"
    experiment = prepare_tracking(uri, "gapless-gradcam-test", artifact_root(root))
    attrs = dict(zarr.open_group(stores["slide-00"], mode="r").attrs)
    run = save_run(root / "runs" / "saol", "saol", attrs, uri, experiment)
    return root, stores, uri, run


def test_heatmap_cohort_writes_scores_and_logs_the_gradcam_map(cohort):
    from mlflow.tracking import MlflowClient

    root, stores, uri, run = cohort
    out = root / "heatmaps" / "saol"
    doc = hm.run.heatmap_cohort(run, stores, out, root / "manifest.json", tracking_uri=uri, progress=False,
                                device="cpu", gradcam=True)
    run_id = doc["run_id"]
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    entry = doc["samples"]["slide-00"]
    scores = entry["scores"]
    assert scores["witness_cells"] > 0
    for name in ("localisation_auroc", "pointing_game_top1", "pointing_game_top5"):
        value = scores[f"gradcam_{name}"]
        assert 0.0 <= value <= 1.0
        # mirrored on the head's own names: heatmap/<sample>/<score> and heatmap/<sample>/gradcam_<score>
        assert metrics[f"heatmap/slide-00/gradcam_{name}"] == pytest.approx(value)
        assert metrics[f"heatmap/slide-00/{name}"] == pytest.approx(scores[name])
    negative = doc["samples"]["slide-01"]["scores"]
    assert negative["witness_cells"] == 0 and negative["gradcam_localisation_auroc"] is None
    assert not any(k.startswith("heatmap/slide-01/gradcam_") for k in metrics)  # None is not logged, as for the head's
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "heatmaps")}
    assert {"heatmaps/slide-00.png", "heatmaps/slide-00.gradcam.png"} <= artifacts
    assert json.loads((root / "manifest.json").read_text())["samples"]["slide-00"]["scores"] == scores

    # the JSON: the head's keys as before, then `gradcam`; the viewer's reader checks and returns it
    raw = json.loads((out / "slide-00.json").read_text())
    assert tuple(raw)[: len(hm.JSON_KEYS)] == hm.JSON_KEYS and tuple(raw["gradcam"]) == hm.GRADCAM_JSON_KEYS
    assert "gradcam_localisation_auroc" not in raw["scores"]  # the head map's own scores stay unprefixed there
    assert raw["gradcam"]["scores"]["localisation_auroc"] == pytest.approx(scores["gradcam_localisation_auroc"])
    loaded = hm.load_heatmap_json(out / "slide-00.json")
    assert loaded["gradcam"]["overlay_path"] == (out / "slide-00.gradcam.overlay.png").resolve()
    channels = zarr.open_group(out / "slide-00.ome.zarr", mode="r").attrs["gapless"]["channels"]
    assert channels == ["positive", "positive_raw", "attention", "gradcam", "gradcam_raw"]

    # the sample page: a Grad-CAM layer right after the head's own, selectable like a head
    from pipeline.viewer.sample_page import sample_page_data

    pyr = {"files": root / "slide_files", "width": raw["width"], "height": raw["height"], "tile_size": 254,
           "overlap": 1, "format": "jpeg", "max_level": 12}
    data = sample_page_data("slide-00", pyr, [loaded], out, [], {}, "index.html")
    assert [h["name"] for h in data["heads"]] == ["saol", "saol:gradcam"]
    layer = data["heads"][1]
    assert layer["label"] == f"{loaded['head_info'].shown} · Grad-CAM" and layer["overlay"] == "slide-00.gradcam.overlay.png"
    assert layer["scores"] == loaded["gradcam"]["scores"] and layer["tiles"] == data["heads"][0]["tiles"]


def test_a_cohort_job_writes_files_only_for_the_listed_samples_and_scores_all(cohort, tmp_path):
    """`--outputs-for`: a large cohort's job writes the few paged samples' files, maps and scores the rest."""
    import subprocess
    import sys
    from pathlib import Path

    root, stores, uri, run = cohort
    out = tmp_path / "saol"
    doc = hm.run.heatmap_cohort(run, stores, out, tmp_path / "m.json", progress=False, device="cpu", gradcam=True,
                                outputs={"slide-01"})
    assert set(doc["samples"]) == {"slide-00", "slide-01"}
    assert "json" not in doc["samples"]["slide-00"] and doc["samples"]["slide-00"]["scores"]["witness_cells"] > 0
    assert doc["samples"]["slide-00"]["scores"]["localisation_auroc"] is not None  # scored without files
    assert Path(doc["samples"]["slide-01"]["json"]).is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("slide-00")) == []
    # the CLI: a sheet of the cohort and a list naming a sample outside it is one clear line, no manifest
    sheet = root / "demo" / "samples.csv"
    listed = tmp_path / "written.txt"
    listed.write_text("slide-07\n")
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / "gapless"), "heatmap", "--samples", str(sheet), "--tiles", str(root / "tiles"),
                           "--model", str(run), "--out", str(tmp_path / "cli"), "--manifest", str(tmp_path / "c.json"),
                           "--device", "cpu", "--outputs-for", str(listed)], capture_output=True, text=True)
    assert done.returncode == 2 and "slide-07" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "c.json").exists()
