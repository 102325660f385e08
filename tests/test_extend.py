"""A head is one class: a throwaway head registered here, and nowhere else, goes through training,
heatmaps, the viewer's page and the comparison report, shown in its own words and order."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.demo import DemoSettings, generate
from pipeline.heatmap import heatmap_sample
from pipeline.models.heads import HEADS, Head, HeadOutput, class_activation_map, init_classifier, register_head
from pipeline.report import write_report
from pipeline.samples import load_sample_sheet
from pipeline.tiling import TileSettings, tile_source
from pipeline.tracking import setup_comparison
from pipeline.train import TrainSettings, train
from pipeline.viewer import write_sample_page, write_slide_pyramid

CLASSES = ["negative", "positive"]
NAME = "softpool_test"


@pytest.fixture()
def throwaway_head():
    """A log-sum-exp pooling head (between mean and max), registered for this test only."""

    @register_head(NAME)
    class SoftPoolHead(Head):
        """Log-sum-exp pooling over positions, then linear: a throwaway head of a test."""

        label = "Soft pool (test)"
        description = "log-sum-exp pooling over positions + linear, registered by a test module"
        order = 15

        def __init__(self, in_channels: int, num_classes: int, *, class_prior=None):
            super().__init__(in_channels, num_classes)
            self.fc = nn.Linear(in_channels, num_classes)
            init_classifier(self.fc, class_prior)

        def forward(self, features, extra=None):
            pooled = torch.logsumexp(features.flatten(2), dim=2) - torch.log(torch.tensor(float(features[0, 0].numel())))
            return HeadOutput(self.fc(pooled), class_activation_map(features, self.fc), None, False)

    yield SoftPoolHead
    HEADS.pop(NAME, None)


def test_a_head_registered_in_one_class_goes_through_train_heatmap_page_and_report(throwaway_head, tmp_path):
    sheet = generate(tmp_path / "demo", DemoSettings(slides=4, images=0, slide_width=768, slide_height=640,
                                                      witness_fraction=0.3, lesions=2), progress=False)
    samples = load_sample_sheet(sheet, CLASSES)
    stores = {s.sample_id: tile_source(s.path, tmp_path / "tiles" / f"{s.sample_id}.zarr",
                                       TileSettings(mpp=1.0, tile_size=64, annotations=str(s.annotations)),
                                       progress=False).out for s in samples}
    comparison = setup_comparison("extend", results=tmp_path / "results")
    uri, experiment, parent = comparison["tracking_uri"], comparison["experiment_id"], comparison["parent_run_id"]
    runs = {}
    for head in ("gap", NAME):
        settings = TrainSettings(head=head, seed=0, epochs=1, batch_size=8, steps_per_epoch=2, workers=0, device="cpu")
        runs[head] = tmp_path / "models" / head
        metrics = train(samples, stores, CLASSES, settings, runs[head], uri, experiment, parent, sheet_path=sheet,
                        progress=False)
        assert metrics["run_id"] and (runs[head] / "run_id.txt").is_file()

    positive = next(s for s in samples if s.label == "positive")
    jsons = []
    for head, run_dir in runs.items():
        result = heatmap_sample(stores[positive.sample_id], run_dir, tmp_path / "heatmaps" / head, positive.sample_id,
                                tracking_uri=uri, progress=False, device="cpu")
        jsons.append(result[head]["json"])
    pyramid = write_slide_pyramid(positive.path, tmp_path / "heatmaps" / "slides" / positive.sample_id, progress=False)
    page = tmp_path / "heatmaps" / f"{positive.sample_id}.html"
    summary = write_sample_page(page, positive.sample_id, pyramid, jsons)
    html = page.read_text()
    assert "Soft pool (test)" in html and "log-sum-exp pooling over positions" in html
    assert html.index("GAP") < html.index("Soft pool (test)")  # order 10 before 15
    assert set(summary["heads"]) == {"gap", NAME}

    report = write_report(uri, parent, tmp_path / "report", log_mlflow=False)
    with open(report["paths"]["summary"], newline="") as f:
        heads = [row["head"] for row in csv.DictReader(f, delimiter="\t")]
    assert heads == ["gap", NAME]  # the declared order
    with open(report["paths"]["paired"], newline="") as f:
        paired = list(csv.DictReader(f, delimiter="\t"))
    assert paired and {(row["head"], row["baseline"]) for row in paired} == {(NAME, "gap")}
    assert Path(report["paths"]["markdown"]).is_file()
