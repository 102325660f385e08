"""``bench_heads`` runs every head and the training loader on CPU at tiny settings (no timing claims)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.demo import DemoSettings, generate
from pipeline.errors import GaplessError
from pipeline.models import HEADS
from pipeline.bench.heads import bench_heads
from pipeline.samples import load_sample_sheet
from pipeline.tiling import TileSettings, tile_source

TINY = dict(backbone="resnet10t", image_size=64, batch_size=4, steps=2, warmup=1, device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    sheet = generate(root / "demo", DemoSettings(slides=1, images=0, slide_width=768, slide_height=768), progress=False)
    (sample,) = load_sample_sheet(sheet)
    return tile_source(sample.path, root / f"{sample.sample_id}.zarr",
                       TileSettings(mpp=1.0, tile_size=64, annotations=str(sample.annotations)), progress=False).out


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_head_runs_and_gap_is_the_reference():
    lines = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    result = bench_heads(**TINY, print_fn=lines.append)
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # switched on for the run only
    rows = result["rows"]
    assert [r["head"] for r in rows] == ["gap", *[h for h in HEADS if h != "gap"]]
    assert rows[0]["ratio_to_baseline"] == 1.0
    for r in rows:
        for key in ("ms_per_batch", "train_images_per_s", "inference_images_per_s", "ratio_to_baseline"):
            assert _positive(r[key]), (r["head"], key, r[key])
        assert r["parameters"] > 0 and r["loader_margin"] is None
        assert r["peak_memory_mb"] is None or r["peak_memory_mb"] > 0
    assert result["loader"] is None and result["dtype"] == "float32" and result["device"] == "cpu"
    assert "resnet10t" in lines[0] and "64 px" in lines[0] and "batch 4" in lines[0] and "cpu" in lines[0]
    assert any(line.startswith("attnpool") for line in lines)


def test_loader_on_a_real_store_and_gap_added_as_reference(store):
    lines = []
    # channels=2 is overridden by the store's 3 (RGB brightfield)
    settings = {**TINY, "warmup": 0}  # the warm-up path is covered above; keep the file short
    result = bench_heads(**settings, heads=["saol"], channels=2, store=[store], loader_workers=1, loader_batches=3,
                         print_fn=lines.append)
    loader = result["loader"]
    assert _positive(loader["images_per_s"]) and loader["images"] == 3 * 4 and loader["tiles"] > 0
    assert loader["channels"] == result["channels"] == 3 and loader["modality"] == "brightfield"
    assert any(line.startswith("loader:") for line in lines) and "loader/model" in "".join(lines)
    assert [r["head"] for r in result["rows"]] == ["gap", "saol"]
    for r in result["rows"]:
        assert _positive(r["loader_margin"])
        assert r["loader_margin"] == pytest.approx(loader["images_per_s"] / r["train_images_per_s"])


def test_unknown_head_and_missing_store_are_clear_errors(tmp_path):
    with pytest.raises(GaplessError, match="unknown head 'nope'.*choose one of"):
        bench_heads(**TINY, heads=["gap", "nope"])
    missing = tmp_path / "absent.zarr"
    with pytest.raises(GaplessError, match="no such tile store") as info:
        bench_heads(**TINY, store=missing)
    assert info.value.path == str(missing)
