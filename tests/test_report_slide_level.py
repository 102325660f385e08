"""The comparison report's slide-level block: slide-level runs (tag ``gapless.level = slide``) read back from a
real SQLite MLflow store beside tile-level runs of the same comparison; the tile-level tables unchanged by
them; the block's numbers checked against scipy computed here, its verdicts on constructed cases; and the
real `gapless train-slides` under a comparison, then `gapless report`."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import stats
from test_report import _child  # a tile-level run as training logs it

from pipeline import cli, mlflow_names, report
from pipeline.models import head_catalog
from pipeline.tracking import RunLogger, setup_comparison

SEEDS = (0, 1, 2)
HEADS = head_catalog()
SLIDE_HEADS = ("gap", "gated", "max")
WF = "0.05"
KEYS = ("config.demo.witness_fraction", "config.demo.cell_density")  # the slide level's: no train.kind
TEST_SPLIT = ("S1", "S2", "N1", "N2")
# slide AUROC per head and seed: gated 0.18-0.22 above gap on every seed, max noisy around gap
SLIDE_AUROC = {"gap": [0.60, 0.66, 0.63], "gated": [0.80, 0.88, 0.81], "max": [0.65, 0.60, 0.65]}
# balanced accuracy: gated below gap on every seed
BALANCED = {"gap": [0.60, 0.64, 0.62], "gated": [0.50, 0.52, 0.54], "max": [0.61, 0.62, 0.63]}


def slide_localisation(head: str, seed: int) -> tuple[float, float]:
    """Two test slides' localisation AUROCs: gated 0.15 above gap on every seed."""
    base = {"gap": 0.55, "gated": 0.70, "max": 0.58}[head] + 0.02 * seed
    return base - 0.05, base + 0.05


def _slide_child(info: dict, head: str, seed: int, status: str = "FINISHED", auroc: float | None = None,
                 params: dict | None = None) -> str:
    """A slide-level run as `gapless train-slides` logs it (tags, params, final metrics), with the scores
    `gapless heatmap-slides` logs: two positive test slides, a negative one, and a training slide whose
    scores must not count (not in the test split)."""
    tags = {**mlflow_names.training_tags(HEADS[head], seed, "resnet10t"), **mlflow_names.level_tags(mlflow_names.LEVEL_SLIDE)}
    run = RunLogger.start(info["tracking_uri"], info["experiment_id"], f"slide-{head}-seed{seed}", info["parent_run_id"],
                          tags=tags)
    run.params({"head": head, "seed": seed, "split_seed": seed, "level": "slide", "train.head": head, "train.epochs": 30,
                "config.demo.witness_fraction": WF, "config.demo.cell_density": 40.0, "config.samples": "",
                "encoder_encoder": "timm", "encoder_backbone": "resnet10t", "encoder_weights": "random-init",
                "encoder_dim": 512, **mlflow_names.split_params({"train": ["TR1", "TR2"], "val": ["V1"], "test": list(TEST_SPLIT)}),
                **(params or {})})
    run.metrics({"val_auroc": 0.5, "train_loss": 1.0}, step=0)
    run.metrics({"test_auroc": SLIDE_AUROC[head][seed] if auroc is None else auroc,
                 "test_balanced_accuracy": BALANCED[head][seed], "test_accuracy": 0.6, "test_f1": 0.5, "test_ece": 0.1,
                 "test_slides": len(TEST_SPLIT), "best_epoch": 3 + seed, "parameters": 2000 + len(head)}, step=30)
    a, b = slide_localisation(head, seed)
    score = mlflow_names.heatmap_metric
    run.metrics({score("S1", "localisation_auroc"): a, score("S1", "pointing_game_top1"): 1.0,
                 score("S1", "pointing_game_top5"): 1.0, score("S1", "witness_cells"): 9,
                 score("S2", "localisation_auroc"): b, score("S2", "pointing_game_top1"): 0.0,
                 score("S2", "pointing_game_top5"): 0.5, score("S2", "witness_cells"): 4,
                 score("N1", "localisation_auroc"): 0.02, score("N1", "witness_cells"): 0,  # no witnesses
                 score("TR1", "localisation_auroc"): 0.99, score("TR1", "witness_cells"): 5})  # a training slide
    run.finish(status)
    return run.run_id


def _tile_runs(info: dict) -> None:
    for head in SLIDE_HEADS:
        for seed in SEEDS:
            _child(info, head, seed, WF)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Two comparisons with the same tile-level runs, one with slide-level runs beside them (gap, gated,
    max × 3 seeds, a failed one and one run again), and their reports."""
    root = tmp_path_factory.mktemp("slide_report")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{root}/results/mlflow.db"
    both = setup_comparison("gapless-slide-report-test", uri, root / "results", run_name="both")
    tile_only = setup_comparison("gapless-slide-report-test", uri, root / "results", run_name="tile only")
    _tile_runs(both)
    _tile_runs(tile_only)
    ids = {}
    for head in SLIDE_HEADS:
        for seed in SEEDS:
            # max seed 2 is run again below: this first run's 0.01 must not count
            ids[(head, seed)] = _slide_child(both, head, seed, auroc=0.01 if (head, seed) == ("max", 2) else None)
    ids["failed"] = _slide_child(both, "gated", 0, status="FAILED")
    time.sleep(0.01)
    ids["stale"] = ids[("max", 2)]
    ids[("max", 2)] = _slide_child(both, "max", 2)
    with_slides = report.write_report(uri, both["parent_run_id"], root / "both")
    without = report.write_report(uri, tile_only["parent_run_id"], root / "tile_only", log_mlflow=False)
    yield root, both, ids, with_slides, without
    mp.undo()


def _scipy_interval(values) -> tuple[float, float, float]:
    v = np.asarray(values, float)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return float(v.mean()), float(lo), float(hi)


def _tile_part(md: str) -> list[str]:
    """The report's lines before the slide-level block, without the lines naming the parent run and the levels."""
    lines = md.split("## Slide level")[0].rstrip("\n").splitlines()
    return [line for line in lines if not line.startswith(("- comparison (parent) run:", "- levels:"))]


def test_the_level_tag():
    assert mlflow_names.TAG_LEVEL == "gapless.level"
    assert mlflow_names.run_level({}) == "tile"  # tile-level training writes no tag
    assert mlflow_names.run_level({"gapless.level": "slide"}) == "slide"
    assert mlflow_names.level_tags("slide") == {"gapless.level": "slide"}
    assert mlflow_names.report_metric("wf-0.05", "gated", "test_auroc_mean", level="slide") == \
        "report/slide_level/wf-0.05/gated/test_auroc_mean"
    assert mlflow_names.report_metric("wf-0.05", "gated", "x") == "report/wf-0.05/gated/x"


def test_tile_tables_are_unchanged_by_slide_runs(reports):
    root, _, ids, with_slides, without = reports
    for name in ("summary.tsv", "paired.tsv"):
        assert (root / "both" / name).read_bytes() == (root / "tile_only" / name).read_bytes(), name
    a = pd.read_csv(root / "both" / "runs.tsv", sep="\t").drop(columns="run_id")
    b = pd.read_csv(root / "tile_only" / "runs.tsv", sep="\t").drop(columns="run_id")
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 9 and not set(pd.read_csv(root / "both" / "runs.tsv", sep="\t")["run_id"]) & set(ids.values())
    assert with_slides["skipped"] == [] and without["skipped"] == []  # the slide level's skipped runs are its own
    pd.testing.assert_frame_equal(with_slides["summary"], without["summary"])
    pd.testing.assert_frame_equal(with_slides["paired"], without["paired"])
    md_with = (root / "both" / "report.md").read_text()
    md_without = (root / "tile_only" / "report.md").read_text()
    assert _tile_part(md_with) == _tile_part(md_without)
    assert "9 finished runs in 1 setting(s) and 3 head(s)" in md_without  # the tile level's count, not 9 + 9
    assert (root / "both" / "metric_vs_witness_fraction.png").is_file()


def test_no_slide_runs_no_slide_block(reports):
    root, _, _, _, without = reports
    assert without["slide"] is None
    assert not {"slide_summary", "slide_paired", "slide_runs", "slide_plot"} & set(without["paths"])
    assert not list((root / "tile_only").glob("slide_*"))
    text = (root / "tile_only" / "report.md").read_text()
    assert "Slide level" not in text and "slide labels" not in text and "Camelyon16" not in text


def test_the_slide_block_means_intervals_and_verdicts(reports):
    root, _, _, result, _ = reports
    block = result["slide"]
    assert block.setting_keys == KEYS and block.left_out == ("train.kind",) and block.x_key == "config.demo.witness_fraction"
    summary = block.summary
    assert list(summary.columns) == report.summary_columns(KEYS, report.SLIDE_INTERVAL_METRICS, report.SLIDE_COST_METRICS)
    assert list(summary["head"]) == ["gap", "gated", "max"]  # the heads' declared order, gap first
    tsv = pd.read_csv(root / "both" / "slide_summary.tsv", sep="\t")
    assert list(tsv.columns) == list(summary.columns) and len(tsv) == 3
    for head in SLIDE_HEADS:
        r = summary[summary["head"] == head].iloc[0]
        assert (r["witness_fraction"], r["cell_density"], r["n_seeds"], r["seeds"]) == (WF, "40.0", 3, "0,1,2")
        for column, values in (("test_auroc", SLIDE_AUROC[head]), ("test_balanced_accuracy", BALANCED[head]),
                               ("localisation_auroc", [np.mean(slide_localisation(head, s)) for s in SEEDS])):
            mean, lo, hi = _scipy_interval(values)  # localisation: S1 and S2 (N1 has no witnesses, TR1 trained on)
            assert r[f"{column}_n"] == 3
            assert (r[f"{column}_mean"], r[f"{column}_ci_low"], r[f"{column}_ci_high"]) == (
                pytest.approx(mean), pytest.approx(lo), pytest.approx(hi)), (head, column)
        assert r["pointing_game_top1_mean"] == pytest.approx(0.5) and r["pointing_game_top5_mean"] == pytest.approx(0.75)
        assert r["test_slides_mean"] == len(TEST_SPLIT) and r["parameters_mean"] == 2000 + len(head)
    paired = block.paired
    assert list(paired.columns) == report.paired_columns(KEYS)
    assert set(paired["baseline"]) == {"gap"} and set(paired["metric"]) == set(report.SLIDE_PAIRED_METRICS)

    def row(head, metric):
        rows = paired[(paired["head"] == head) & (paired["metric"] == metric)]
        assert len(rows) == 1
        return rows.iloc[0]

    for head, metric, table in (("gated", "test_auroc", SLIDE_AUROC), ("max", "test_auroc", SLIDE_AUROC),
                                ("gated", "test_balanced_accuracy", BALANCED)):
        r = row(head, metric)
        mean, lo, hi = _scipy_interval(np.subtract(table[head], table["gap"]))
        assert (r["n_pairs"], r["seeds"]) == (3, "0,1,2")
        assert (r["mean_diff"], r["ci_low"], r["ci_high"]) == (pytest.approx(mean), pytest.approx(lo), pytest.approx(hi))
    assert row("gated", "test_auroc")["verdict"] == "better"
    assert row("max", "test_auroc")["verdict"] == "no evidence of a difference"
    assert row("gated", "test_balanced_accuracy")["verdict"] == "worse"
    assert row("gated", "localisation_auroc")["verdict"] == "better"
    assert row("gated", "localisation_auroc")["mean_diff"] == pytest.approx(0.15)
    assert set(pd.read_csv(root / "both" / "slide_paired.tsv", sep="\t")["verdict"]) <= set(report.VERDICTS)


def test_slide_level_skipped_runs_stay_in_the_slide_block(reports):
    root, _, ids, result, _ = reports
    block = result["slide"]
    skipped = {r["run_id"]: r["skip_reason"] for r in block.skipped}
    assert skipped == {ids["failed"]: "status FAILED", ids["stale"]: f"superseded by the later run {ids[('max', 2)]}"}
    runs = pd.read_csv(root / "both" / "slide_runs.tsv", sep="\t")
    assert len(runs) == 11 and set(runs["run_id"]) == set(ids.values())
    assert "test_balanced_accuracy" in runs.columns and "test_sample_auroc_mean" not in runs.columns
    gap0 = runs.set_index("run_id").loc[ids[("gap", 0)]]
    assert gap0["heatmap_samples"] == 2 and gap0["localisation_auroc"] == pytest.approx(0.55)  # S1 0.50, S2 0.60


def test_the_markdown_the_figure_and_the_parent_run(reports):
    root, info, ids, result, _ = reports
    out = root / "both"
    text = (out / "report.md").read_text()
    block = text.split("## Slide level", 1)[1]
    assert text.count("## Slide level") == 1 and "- levels: `tile (9 runs), slide (11 runs: see Slide level)`" in text
    assert "trained from slide labels alone, over each slide's tile embeddings (encoder: resnet10t (timm, weights " \
           "random-init))" in block
    assert "For reference, not a claim of equivalence" in block
    assert "Camelyon16, TransMIL paper (Shao et al., NeurIPS 2021), Table 1: mean pooling ≈ 0.47, max pooling ≈ 0.86, " \
           "attention MIL (ABMIL) ≈ 0.87" in block
    assert "No slide-level run records kind, so the slide level's settings leave it out." in block
    assert "9 finished runs in 1 setting(s) and 3 head(s)" in block
    assert "Backed by the numbers: gated is better than gap on slide AUROC" in block
    assert "Backed by the numbers: gated is worse than gap on balanced accuracy" in block
    assert "Backed by the numbers: gated is better than gap on localisation AUROC" in block
    assert "#### witness_fraction 0.05, cell_density 40.0" in block and "| slide AUROC | balanced accuracy |" in block
    assert "### Paired against gap (difference head − gap, paired by seed)" in block
    assert "### Skipped slide-level runs" in block and ids["failed"] in block and ids["stale"] in block
    assert "Localisation scores exist for 9 of 9 slide-level runs, each the mean over 2 slide(s)" in block
    assert "![slide level](slide_level.png)" in block
    png = out / "slide_level.png"
    assert result["paths"]["slide_plot"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    client = MlflowClient(info["tracking_uri"])
    parent = info["parent_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {f"report/{n}" for n in ("slide_summary.tsv", "slide_paired.tsv", "slide_runs.tsv", "slide_level.png")} <= artifacts
    metrics = client.get_run(parent).data.metrics
    setting = "witness_fraction-0.05_cell_density-40.0"
    gated = block_row = result["slide"].summary.set_index("head").loc["gated"]
    assert metrics[f"report/slide_level/{setting}/gated/test_auroc_mean"] == pytest.approx(block_row["test_auroc_mean"])
    assert metrics[f"report/slide_level/{setting}/gated/vs_gap/test_auroc_diff"] == pytest.approx(
        np.mean(np.subtract(SLIDE_AUROC["gated"], SLIDE_AUROC["gap"])))
    assert gated["test_auroc_n"] == 3
    tile_setting = "kind-slide_witness_fraction-0.05_cell_density-40.0"  # the tile level's stay where they were
    assert f"report/{tile_setting}/gated/test_auroc_mean" in metrics


def test_a_tile_and_a_slide_run_of_one_head_and_seed_both_count(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    info = setup_comparison("gapless-slide-report-test", f"sqlite:///{tmp_path}/mlflow.db", tmp_path, run_name="same")
    tile = _child(info, "gap", 0, WF)
    slide = _slide_child(info, "gap", 0, params={"train.kind": "slide"})  # the same setting, head and seed
    runs = report.collect_runs(info["tracking_uri"], info["parent_run_id"])
    assert {(r["run_id"], r["level"], r["skip_reason"]) for r in runs} == {(tile, "tile", None), (slide, "slide", None)}
    assert report.summarise(runs)["test_auroc_mean"].tolist() == pytest.approx([0.80])  # the tile run alone
    assert report.summarise(runs, level="slide", metrics=report.SLIDE_INTERVAL_METRICS,
                            costs=report.SLIDE_COST_METRICS)["test_auroc_mean"].tolist() == pytest.approx([0.60])


def test_train_slides_under_a_comparison_then_the_report(tmp_path, monkeypatch):
    """The real `gapless train-slides --comparison` (a small synthetic cohort), then `gapless report`: only
    slide-level runs, so the tile tables are empty and the slide block lists the head."""
    from test_slide_level import gapless, synthetic_cohort

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sheet, emb_dir = synthetic_cohort(tmp_path, n=16, side=6, dim=8)
    comparison = tmp_path / "comparison.json"
    assert cli.main(["mlflow-setup", "--experiment", "slides", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                     "--results", str(tmp_path / "results"), "--out", str(comparison)]) == 0
    r = gapless("train-slides", "--samples", sheet, "--embeddings", emb_dir, "--out", tmp_path / "run", "--head", "gated",
                "--epochs", 2, "--dim", 8, "--device", "cpu", "--threads", 1, "--comparison", comparison, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "report"
    assert cli.main(["report", "--comparison", str(comparison), "--out", str(out), "--no-mlflow"]) == 0
    slide = pd.read_csv(out / "slide_summary.tsv", sep="\t")
    assert list(slide["head"]) == ["gated"] and slide["n_seeds"].tolist() == [1]
    assert (out / "slide_level.png").is_file() and (out / "metric_vs_witness_fraction.png").is_file()
    assert pd.read_csv(out / "summary.tsv", sep="\t").empty
    text = (out / "report.md").read_text()
    assert "it has no tile-level runs" in text and "## Slide level" in text
    assert "(encoder: synthetic (timm))" in text
    block = text.split("## Slide level", 1)[1]
    assert "| gated | 1 (0) |" in block and "(n = 1, interval undefined)" in block
    run_id = (tmp_path / "run" / "run_id.txt").read_text().strip()
    assert pd.read_csv(out / "slide_runs.tsv", sep="\t")["run_id"].tolist() == [run_id]
    assert json.loads(comparison.read_text())["parent_run_id"] == MlflowClient(
        json.loads(comparison.read_text())["tracking_uri"]).get_run(run_id).data.tags["mlflow.parentRunId"]
