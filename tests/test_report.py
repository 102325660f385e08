"""The comparison report: runs read back from a real SQLite MLflow store, statistics checked against
scipy computed here, verdicts on constructed cases, skipped runs, outputs and what lands on the parent."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import stats

from pipeline import cli, mlflow_names, report
from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo
from pipeline.models import head_catalog
from pipeline.tracking import RunLogger, setup_comparison

SEEDS = (0, 1, 2)
HEADS = head_catalog()  # what each head declares, and training logs as its run's tags
# tile AUROC per setting × head × seed; saol beats gap by 0.04-0.06 at wf 0.01 and loses by as much at
# 0.05; cbam is noisy around gap
GAP = {"0.01": [0.70, 0.74, 0.72], "0.05": [0.80, 0.83, 0.78]}
DELTA = {
    ("0.01", "saol"): [0.05, 0.06, 0.04],
    ("0.01", "cbam"): [0.10, -0.08, 0.01],
    ("0.05", "saol"): [-0.05, -0.04, -0.06],
    ("0.05", "cbam"): [0.03, -0.09, 0.02],
}


def tile_auroc(wf: str, head: str, seed: int) -> float:
    return GAP.get(wf, GAP["0.05"])[seed] + DELTA.get((wf, head), [0.0] * len(SEEDS))[seed]


def localisation(wf: str, head: str, seed: int) -> tuple[float, float]:
    """Two positive samples' localisation AUROCs; the run's score is their mean."""
    base = {"gap": 0.60, "cbam": 0.62, "saol": 0.75}.get(head, 0.5) + 0.01 * seed + (0.05 if wf == "0.05" else 0.0)
    return base - 0.02, base + 0.02


def gradcam(wf: str, head: str, seed: int) -> tuple[float, float]:
    """Two positive samples' Grad-CAM localisation AUROCs: saol 0.1 above gap on every seed."""
    base = {"gap": 0.55, "cbam": 0.58, "saol": 0.65}.get(head, 0.5) + 0.02 * seed + (0.03 if wf == "0.05" else 0.0)
    return base - 0.03, base + 0.03


def _child(info: dict, head: str, seed: int, wf: str, status: str = "FINISHED", samples: str = "",
           metrics: dict | None = None, head_info: HeadInfo | None = None, head_tags: bool = True,
           params: dict | None = None, with_gradcam: bool = True) -> str:
    """A training run as training logs it; ``head_info``: other head tags than the catalog's; ``head_tags``
    False: a run logged before training wrote head tags (only ``head`` and ``seed``); ``params``: more
    (or other) params, e.g. another sweep's demo keys; ``with_gradcam`` False: heatmaps scored before
    Grad-CAM (no ``gradcam_*`` scores)."""
    tags = mlflow_names.training_tags(head_info or HEADS[head], seed, "resnet10t")
    if not head_tags:
        tags = {"head": head, "seed": str(seed), "backbone": "resnet10t"}
    run = RunLogger.start(info["tracking_uri"], info["experiment_id"], f"{head}-seed{seed}", info["parent_run_id"],
                          tags=tags)
    run.params({"head": head, "seed": seed, "backbone": "resnet10t", "train.kind": "slide",
                "config.demo.witness_fraction": wf, "config.demo.cell_density": 40.0, "config.samples": samples,
                **(params or {})})
    run.metrics({"val_auroc": 0.5, "train_loss": 1.0}, step=0)
    final = {"test_auroc": tile_auroc(wf, head, seed), "test_sample_auroc_mean": tile_auroc(wf, head, seed) + 0.1,
             "test_sample_auroc_max": tile_auroc(wf, head, seed) + 0.05, "parameters": 1000 + len(head),
             "train_images_per_s": 100.0 + seed, "inference_images_per_s": 300.0, "peak_memory_mb": 500.0 + 10 * seed}
    final.update(metrics or {})
    run.metrics({k: v for k, v in final.items() if v is not None}, step=4)
    a, b = localisation(wf, head, seed)
    run.metrics({"heatmap/S1/localisation_auroc": a, "heatmap/S1/pointing_game_top1": 1.0,
                 "heatmap/S1/pointing_game_top5": 0.8, "heatmap/S1/witness_cells": 12,
                 "heatmap/S2/localisation_auroc": b, "heatmap/S2/pointing_game_top1": 0.0,
                 "heatmap/S2/pointing_game_top5": 0.4, "heatmap/S2/witness_cells": 7,
                 # a negative sample: no witnesses, so it must not count (a stray score included)
                 "heatmap/N1/localisation_auroc": 0.01, "heatmap/N1/witness_cells": 0, "heatmap/N1/tissue_cells": 99})
    if with_gradcam:  # the Grad-CAM map's scores, logged beside the head map's (a stray one on N1 again)
        a, b = gradcam(wf, head, seed)
        run.metrics({"heatmap/S1/gradcam_localisation_auroc": a, "heatmap/S1/gradcam_pointing_game_top1": 0.0,
                     "heatmap/S1/gradcam_pointing_game_top5": 0.6, "heatmap/S2/gradcam_localisation_auroc": b,
                     "heatmap/S2/gradcam_pointing_game_top1": 1.0, "heatmap/S2/gradcam_pointing_game_top5": 0.2,
                     "heatmap/N1/gradcam_localisation_auroc": 0.99})
    run.finish(status)
    return run.run_id


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    info = setup_comparison("gapless-report-test", f"sqlite:///{root}/results/mlflow.db", root / "results")
    ids = {}
    for wf in GAP:
        for head in ("gap", "cbam", "saol"):
            for seed in SEEDS:
                # gap seed 1 at 0.01 has a one-class test split: no sample AUROC
                extra = {"test_sample_auroc_mean": None, "test_sample_auroc_max": None} if (
                    wf, head, seed) == ("0.01", "gap", 1) else None
                # cbam seed 2 at 0.05 is run again below: this first run's numbers must not count
                extra = {"test_auroc": 0.1} if (wf, head, seed) == ("0.05", "cbam", 2) else extra
                ids[(wf, head, seed)] = _child(info, head, seed, wf, metrics=extra)
    ids["failed"] = _child(info, "saol", 0, "0.01", status="FAILED")  # a failed attempt beside a finished one
    ids["single"] = _child(info, "max", 0, "0.01")
    time.sleep(0.01)
    ids["stale"] = ids[("0.05", "cbam", 2)]
    ids[("0.05", "cbam", 2)] = _child(info, "cbam", 2, "0.05")  # the rerun supersedes it
    pngs = {}
    for i, head in enumerate(("saol", "gap", "cbam")):
        pngs[head] = root / "heatmaps" / head / "S1.png"
        pngs[head].parent.mkdir(parents=True)
        Image.fromarray(np.full((40, 60, 3), 60 * i, np.uint8)).save(pngs[head])
    result = report.write_report(info["tracking_uri"], info["parent_run_id"], root / "results" / "report", pngs)
    yield root, info, ids, result
    mp.undo()


def _row(summary: pd.DataFrame, wf: str, head: str) -> pd.Series:
    rows = summary[(summary["witness_fraction"] == wf) & (summary["head"] == head)]
    assert len(rows) == 1
    return rows.iloc[0]


def _scipy_interval(values) -> tuple[float, float, float]:
    v = np.asarray(values, float)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return float(v.mean()), float(lo), float(hi)


def test_means_and_intervals_match_scipy(comparison):
    _, _, _, result = comparison
    summary = result["summary"]
    assert list(summary.columns) == report.summary_columns()
    assert len(summary) == 2 * 3 + 1  # 2 settings × 3 heads, and max with one seed at 0.01
    for wf in GAP:
        for head in ("gap", "cbam", "saol"):
            r = _row(summary, wf, head)
            assert (r["kind"], r["cell_density"], r["n_seeds"], r["seeds"]) == ("slide", "40.0", 3, "0,1,2")
            mean, lo, hi = _scipy_interval([tile_auroc(wf, head, s) for s in SEEDS])
            assert r["test_auroc_n"] == 3
            assert r["test_auroc_mean"] == pytest.approx(mean)
            assert (r["test_auroc_ci_low"], r["test_auroc_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
            loc = [np.mean(localisation(wf, head, s)) for s in SEEDS]  # N1 (no witnesses) left out
            mean, lo, hi = _scipy_interval(loc)
            assert r["localisation_auroc_mean"] == pytest.approx(mean)
            assert (r["localisation_auroc_ci_low"], r["localisation_auroc_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
            assert r["pointing_game_top1_mean"] == pytest.approx(0.5)
            assert r["pointing_game_top5_mean"] == pytest.approx(0.6)
            assert r["pointing_game_top5_ci_low"] == pytest.approx(0.6)  # the same on every seed: zero width
            # the Grad-CAM map's scores, averaged over the same samples (N1's stray 0.99 left out)
            mean, lo, hi = _scipy_interval([np.mean(gradcam(wf, head, s)) for s in SEEDS])
            assert r["gradcam_localisation_auroc_n"] == 3
            assert r["gradcam_localisation_auroc_mean"] == pytest.approx(mean)
            assert (r["gradcam_localisation_auroc_ci_low"], r["gradcam_localisation_auroc_ci_high"]) == (
                pytest.approx(lo), pytest.approx(hi))
            assert r["gradcam_pointing_game_top1_mean"] == pytest.approx(0.5)
            assert r["gradcam_pointing_game_top5_mean"] == pytest.approx(0.4)
            assert r["parameters_mean"] == 1000 + len(head)
            assert r["train_images_per_s_mean"] == pytest.approx(101.0)
            assert r["peak_memory_mb_mean"] == pytest.approx(510.0)
    gap = _row(summary, "0.01", "gap")  # seed 1 had no sample AUROC: n = 2 for it, not a made-up value
    mean, lo, hi = _scipy_interval([tile_auroc("0.01", "gap", s) + 0.1 for s in (0, 2)])
    assert gap["test_sample_auroc_mean_n"] == 2
    assert (gap["test_sample_auroc_mean_mean"], gap["test_sample_auroc_mean_ci_low"]) == (pytest.approx(mean), pytest.approx(lo))


def test_one_seed_has_an_undefined_interval(comparison):
    _, _, _, result = comparison
    r = _row(result["summary"], "0.01", "max")
    assert r["n_seeds"] == 1 and r["test_auroc_mean"] == pytest.approx(tile_auroc("0.01", "gap", 0) + 0.0)
    assert math.isnan(r["test_auroc_ci_low"]) and math.isnan(r["test_auroc_ci_high"]) and math.isnan(r["test_auroc_sd"])
    paired = result["paired"]
    assert set(paired[paired["head"] == "max"]["verdict"]) == {"n too small"}
    text = result["paths"]["markdown"].read_text()
    assert "(n = 1, interval undefined)" in text
    assert report.t_interval([0.7])["n"] == 1 and math.isnan(report.t_interval([0.7])["ci_low"])
    assert report.t_interval([])["n"] == 0


def test_paired_differences_and_verdicts(comparison):
    _, _, _, result = comparison
    paired = result["paired"]
    assert list(paired.columns) == report.paired_columns()
    assert set(paired["metric"]) == set(report.PAIRED_METRICS) and "gap" not in set(paired["head"])

    def row(wf, head, metric="test_auroc"):
        rows = paired[(paired["witness_fraction"] == wf) & (paired["head"] == head) & (paired["metric"] == metric)]
        assert len(rows) == 1
        return rows.iloc[0]

    for (wf, head), delta in DELTA.items():
        r = row(wf, head)
        mean, lo, hi = _scipy_interval(delta)
        assert r["n_pairs"] == 3 and r["seeds"] == "0,1,2" and r["baseline"] == "gap"
        assert (r["mean_diff"], r["ci_low"], r["ci_high"]) == (pytest.approx(mean), pytest.approx(lo), pytest.approx(hi))
    assert row("0.01", "saol")["verdict"] == "better"
    assert row("0.05", "saol")["verdict"] == "worse"
    assert row("0.01", "cbam")["verdict"] == "no evidence of a difference"
    assert row("0.05", "cbam")["verdict"] == "no evidence of a difference"
    # sample AUROC: gap seed 1 lacks it at 0.01, so the pairs are seeds 0 and 2 only
    r = row("0.01", "saol", "test_sample_auroc_mean")
    mean, lo, hi = _scipy_interval([DELTA[("0.01", "saol")][s] for s in (0, 2)])
    assert (r["n_pairs"], r["seeds"]) == (2, "0,2")
    assert (r["mean_diff"], r["ci_low"], r["ci_high"]) == (pytest.approx(mean), pytest.approx(lo), pytest.approx(hi))
    # localisation: saol is 0.15 above gap on every seed
    assert row("0.01", "saol", "localisation_auroc")["verdict"] == "better"
    assert row("0.01", "saol", "localisation_auroc")["mean_diff"] == pytest.approx(0.15)
    # Grad-CAM localisation: saol is 0.1 above gap on every seed
    assert row("0.05", "saol", "gradcam_localisation_auroc")["verdict"] == "better"
    assert row("0.05", "saol", "gradcam_localisation_auroc")["mean_diff"] == pytest.approx(0.1)
    assert report.verdict(1, float("nan"), float("nan")) == "n too small"
    assert report.verdict(3, -0.01, 0.02) == "no evidence of a difference"


def test_skipped_runs_are_reported_not_dropped(comparison):
    _, _, ids, result = comparison
    skipped = {r["run_id"]: r["skip_reason"] for r in result["skipped"]}
    assert skipped == {ids["failed"]: "status FAILED",
                       ids["stale"]: f"superseded by the later run {ids[('0.05', 'cbam', 2)]}"}
    runs = pd.read_csv(result["paths"]["runs"], sep="\t", dtype=str)
    assert len(runs) == 18 + 3 and set(runs["run_id"]) == {v for v in ids.values()}
    assert runs.set_index("run_id").loc[ids["failed"], "status"] == "FAILED"
    text = result["paths"]["markdown"].read_text()
    assert ids["failed"] in text and "status FAILED" in text and ids["stale"] in text
    # the stale run's 0.1 does not count
    assert _row(result["summary"], "0.05", "cbam")["test_auroc_mean"] == pytest.approx(
        np.mean([tile_auroc("0.05", "cbam", s) for s in SEEDS]))


def test_files_and_the_markdown(comparison):
    root, info, _, result = comparison
    out = root / "results" / "report"
    for name in ("summary.tsv", "paired.tsv", "runs.tsv", "report.md", "metric_vs_witness_fraction.png",
                 "heatmaps_side_by_side.png"):
        assert (out / name).is_file(), name
    for name in ("metric_vs_witness_fraction.png", "heatmaps_side_by_side.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.width > 300 and im.height > 100
    summary = pd.read_csv(out / "summary.tsv", sep="\t")
    assert list(summary.columns) == report.summary_columns() and len(summary) == 7
    assert summary["test_auroc_ci_low"].isna().sum() == 1  # only max, with one seed
    paired = pd.read_csv(out / "paired.tsv", sep="\t")
    assert set(paired["verdict"]) <= set(report.VERDICTS)
    text = (out / "report.md").read_text()
    assert text.count("### kind slide, witness_fraction") == 2 + 2  # per-setting tables, then paired tables
    assert "Backed by the numbers: saol is better than gap on tile AUROC" in text
    assert "Backed by the numbers: saol is worse than gap on tile AUROC" in text
    assert "no evidence of a difference" in text and "No correction for multiple comparisons" in text
    assert "single seed" in text
    assert "![metrics vs witness fraction](metric_vs_witness_fraction.png)" in text
    assert "The figure puts witness fraction on its x axis (0.01, 0.05)" in text  # not on a log scale: 5×
    assert "- x axis: `config.demo.witness_fraction`" in text
    assert "| Grad-CAM localisation AUROC |" in text and "No run has Grad-CAM" not in text


def test_the_parent_run_holds_the_report(comparison):
    _, info, _, result = comparison
    client = MlflowClient(info["tracking_uri"])
    parent = info["parent_run_id"]
    names = {a.path for a in client.list_artifacts(parent, "report")}
    assert names == {f"report/{n}" for n in ("summary.tsv", "paired.tsv", "runs.tsv", "report.md",
                                             "metric_vs_witness_fraction.png", "heatmaps_side_by_side.png")}
    metrics = client.get_run(parent).data.metrics
    setting = "kind-slide_witness_fraction-0.01_cell_density-40.0"
    r = _row(result["summary"], "0.01", "saol")
    assert metrics[f"report/{setting}/saol/test_auroc_mean"] == pytest.approx(r["test_auroc_mean"])
    assert metrics[f"report/{setting}/saol/test_auroc_ci_low"] == pytest.approx(r["test_auroc_ci_low"])
    assert metrics[f"report/{setting}/saol/vs_gap/test_auroc_diff"] == pytest.approx(0.05)
    assert f"report/{setting}/max/test_auroc_ci_low" not in metrics  # undefined, not logged as a number
    assert metrics[f"report/{setting}/max/test_auroc_n"] == 1
    assert client.get_run(parent).data.tags["gapless.report"] == "written"


def test_no_runs_and_no_finished_runs_are_clear_errors(comparison, tmp_path):
    root, info, _, _ = comparison
    uri = info["tracking_uri"]
    empty = setup_comparison("gapless-report-test", uri, root / "results", run_name="empty")
    with pytest.raises(GaplessError, match=f"no runs under comparison run {empty['parent_run_id']}") as err:
        report.write_report(uri, empty["parent_run_id"], tmp_path / "out")
    assert "\n" not in str(err.value)
    failed = setup_comparison("gapless-report-test", uri, root / "results", run_name="failed")
    _child(failed, "gap", 0, "0.01", status="FAILED")
    with pytest.raises(GaplessError, match=r"none of the 1 runs .* finished \(1 FAILED\)"):
        report.collect_runs(uri, parent_run_id=failed["parent_run_id"])


def test_own_data_has_no_demo_setting_and_the_command_line(comparison, tmp_path):
    root, info, _, _ = comparison
    uri = info["tracking_uri"]
    own = setup_comparison("gapless-report-test", uri, root / "results", run_name="own")
    for seed in (0, 1):
        _child(own, "gap", seed, "0.05", samples="cohort.csv")
        _child(own, "saol", seed, "0.05", samples="cohort.csv")
    runs = report.collect_runs(uri, parent_run_id=own["parent_run_id"])
    assert {r["setting"] for r in runs} == {("slide", "n/a", "n/a")}  # demo settings did not make this data
    comparison_file = tmp_path / "comparison.json"
    comparison_file.write_text(json.dumps(own))
    assert cli.main(["report", "--comparison", str(comparison_file), "--out", str(tmp_path / "out"), "--no-mlflow",
                     "--setting-key", "train.kind"]) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.tsv", sep="\t")
    assert list(summary["head"]) == ["gap", "saol"] and list(summary["kind"]) == ["slide", "slide"]
    # kind alone is the setting: it is the x axis (one category, a dot per head), and names the plot
    assert (tmp_path / "out" / "metric_vs_kind.png").is_file()
    assert not (tmp_path / "out" / "metric_vs_witness_fraction.png").exists()
    assert not MlflowClient(uri).list_artifacts(own["parent_run_id"], "report")
    assert cli.main(["report", "--comparison", str(tmp_path / "missing.json")]) == 2


def test_collecting_pages_through_every_result():
    from mlflow.store.entities.paged_list import PagedList

    class Client:  # three pages: the search must follow the tokens to the end
        def __init__(self):
            self.tokens = []

        def search_runs(self, experiment_ids, filter_string, max_results, order_by, page_token):
            self.tokens.append(page_token)
            pages = {None: ([1, 2], "a"), "a": ([3], "b"), "b": ([4], None)}
            items, token = pages[page_token]
            return PagedList(items, token)

    client = Client()
    assert report._search_all(client, ["0"], "") == [1, 2, 3, 4]
    assert client.tokens == [None, "a", "b"]


def test_a_wrong_store_or_run_is_a_clear_error(comparison, tmp_path):
    _, info, _, _ = comparison
    with pytest.raises(GaplessError, match="no MLflow database there"):
        report.collect_runs(f"sqlite:///{tmp_path}/none/mlflow.db", parent_run_id="abc")
    assert not (tmp_path / "none").exists()  # not created on the way
    with pytest.raises(GaplessError, match="cannot read the comparison's runs"):
        report.collect_runs(info["tracking_uri"], parent_run_id="0" * 32)


def test_an_interval_past_the_metric_range_is_shown_cut_at_it():
    from pipeline.report import interval_text

    assert interval_text(3, 0.9, 0.7, 1.1, bounds=(0.0, 1.0)) == "0.900 [0.700, 1.000]"
    assert interval_text(3, 0.1, -0.4, 0.6, bounds=(0.0, 1.0)) == "0.100 [0.000, 0.600]"
    assert interval_text(3, 0.9, 0.7, 1.1) == "0.900 [0.700, 1.100]"  # differences are not cut


def test_the_baseline_and_the_head_order_come_from_the_runs_tags(comparison, tmp_path):
    root, info, _, _ = comparison
    uri = info["tracking_uri"]
    tagged = setup_comparison("gapless-report-test", uri, root / "results", run_name="tagged")
    zeta = HeadInfo("zeta", "Zeta", "a new head that declares itself first and the baseline", order=5, baseline=True)
    for seed in (0, 1):
        _child(tagged, "gap", seed, "0.1")  # gap, tagged as the baseline, against saol
        _child(tagged, "saol", seed, "0.1")
        _child(tagged, "gap", seed, "0.2")  # two heads claim the baseline
        _child(tagged, "zeta", seed, "0.2", head_info=zeta)
        _child(tagged, "max", seed, "0.3")  # none does
        _child(tagged, "saol", seed, "0.3")
    result = report.write_report(uri, tagged["parent_run_id"], tmp_path / "out", log_mlflow=False)
    summary, paired = result["summary"], result["paired"]
    heads = {wf: list(summary[summary["witness_fraction"] == wf]["head"]) for wf in ("0.1", "0.2", "0.3")}
    assert heads == {"0.1": ["gap", "saol"], "0.2": ["zeta", "gap"], "0.3": ["saol", "max"]}  # HeadInfo.order
    assert set(zip(paired["witness_fraction"], paired["head"], paired["baseline"])) == {("0.1", "saol", "gap")}
    text = result["paths"]["markdown"].read_text()
    assert "zeta and gap are each tagged as the baseline at kind slide, witness_fraction 0.2" in text
    assert "No head at kind slide, witness_fraction 0.3, cell_density 40.0 is tagged as the baseline" in text
    assert "## Paired against gap (difference head − gap, paired by seed)" in text

    runs = report.collect_runs(uri, tagged["parent_run_id"])  # baseline= overrides the tags in every setting
    by_hand = report.paired_comparison(runs, baseline="saol")
    assert set(zip(by_hand["witness_fraction"], by_hand["head"], by_hand["baseline"])) == {
        ("0.1", "gap", "saol"), ("0.2", "zeta", "saol"), ("0.2", "gap", "saol"), ("0.3", "max", "saol")}
    assert set(by_hand[by_hand["witness_fraction"] == "0.2"]["verdict"]) == {"n too small"}  # no saol there
    assert set(by_hand[by_hand["witness_fraction"] != "0.2"]["n_pairs"]) == {2}


def test_runs_without_head_tags_have_no_baseline(comparison):
    root, info, _, _ = comparison
    uri = info["tracking_uri"]
    old = setup_comparison("gapless-report-test", uri, root / "results", run_name="before head tags")
    for seed in (0, 1):
        _child(old, "saol", seed, "0.1", head_tags=False)
        _child(old, "gap", seed, "0.1", head_tags=False)
    runs = report.collect_runs(uri, old["parent_run_id"])
    assert all(r["head_info"] == HeadInfo(r["head"]) and not r["head_tagged"] for r in runs)
    assert list(report.summarise(runs)["head"]) == ["gap", "saol"]  # default order: by name
    assert report.paired_comparison(runs).empty
    assert any("is tagged as the baseline" in note for note in report.baseline_notes(runs, report.DEFAULT_SETTING_KEYS))
    assert len(report.paired_comparison(runs, baseline="gap")) == len(report.PAIRED_METRICS)


def test_heads_whose_runs_disagree_on_their_tags_take_the_latest():
    def run(label: str, start: int) -> dict:
        return {"head": "gap", "head_info": HeadInfo("gap", label, order=10, baseline=True), "head_tagged": True,
                "setting": ("slide",), "skip_reason": None, "start_time": start}

    runs = [run("GAP v2", 2), run("GAP", 1)]
    assert report.head_infos(runs)["gap"].label == "GAP v2"
    notes = report.baseline_notes(runs, ("train.kind",))
    assert len(notes) == 1 and notes[0].startswith("The runs of gap carry different head tags")


def test_the_report_needs_neither_torch_nor_the_viewer():
    import subprocess
    import sys

    code = ("import sys, pipeline.report; "
            "print(sorted({'torch', 'timm', 'pipeline.models', 'pipeline.viewer'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Settings and the x axis from the sweep: instances per image, image modality (config/instances.yaml)

INSTANCES = (16, 1024)
MODALITIES = ("fluorescence", "brightfield")
DEMO = {"slides": 0, "images": 48, "cell_density": 40.0, "witness_fraction": 0.05, "cells_per_image": 0,
        "witnesses": 1, "image_modality": "fluorescence", "image_mpp": 1.0}


def _datasets(sweep: list[dict]) -> dict:
    """name → demo settings as the workflow makes them (common.smk: the entry's keys over ``demo``)."""
    return {e["name"]: {**DEMO, **{k: v for k, v in e.items() if k != "name"}} for e in sweep}


def _instance_sweep(instances=INSTANCES, modalities=MODALITIES) -> list[dict]:
    return [{"name": f"{m[0]}{n}", "cells_per_image": n, "image_modality": m} for m in modalities for n in instances]


def test_the_settings_and_the_x_axis_come_from_the_sweep():
    cpi, modality = "config.demo.cells_per_image", "config.demo.image_modality"
    sweep = _instance_sweep((16, 64, 256, 1024))
    keys, x = report.sweep_settings(sweep, _datasets(sweep), ["image"], "auto", DEMO)
    assert keys == ("train.kind", cpi, modality) and x == cpi  # 4 numbers beat 2 modalities
    assert report.plot_file(x) == "metric_vs_cells_per_image.png"
    # report.x names the axis: a swept key, kind, or a demo key the sweep keeps (added to the settings)
    assert report.sweep_settings(sweep, _datasets(sweep), ["image"], "image_modality", DEMO) == (keys, modality)
    assert report.sweep_settings(sweep, _datasets(sweep), ["image"], "kind", DEMO) == (keys, "train.kind")
    assert report.sweep_settings(sweep, _datasets(sweep), ["image"], "witnesses", DEMO) == (
        (*keys, "config.demo.witnesses"), "config.demo.witnesses")
    with pytest.raises(ValueError, match="report.x 'instances' is neither kind nor a demo key"):
        report.sweep_settings(sweep, _datasets(sweep), ["image"], "instances", DEMO)
    # no sweep: today's settings and axis
    assert report.sweep_settings([], {"": DEMO}, ["slide"]) == (report.DEFAULT_SETTING_KEYS, report.WITNESS_KEY)
    assert report.sweep_settings([], {"": DEMO}, ["slide"], "cell_density", DEMO) == (
        report.DEFAULT_SETTING_KEYS, "config.demo.cell_density")
    # the benchmark's sweep: witness fraction takes 3 values, cell density 2 (the entries without it: demo's)
    bench = [{"name": "w20", "witness_fraction": 0.2}, {"name": "w05", "witness_fraction": 0.05},
             {"name": "w01", "witness_fraction": 0.01}, {"name": "w05dense", "witness_fraction": 0.05, "cell_density": 60.0}]
    assert report.sweep_settings(bench, _datasets(bench), ["slide"]) == (report.DEFAULT_SETTING_KEYS, report.WITNESS_KEY)
    # ties go to the first key in sweep order
    tie = [{"name": "a", "cell_density": 30.0, "witness_fraction": 0.1}, {"name": "b", "cell_density": 60.0, "witness_fraction": 0.2}]
    assert report.sweep_settings(tie, _datasets(tie), ["slide"])[1] == "config.demo.cell_density"
    # no numeric key: the modality is a categorical axis; a numeric key that does not vary loses to it
    only = [{"name": "f", "image_modality": "fluorescence"}, {"name": "b", "image_modality": "brightfield"}]
    assert report.sweep_settings(only, _datasets(only), ["image"]) == (("train.kind", modality), modality)
    fixed = [{**e, "witnesses": 2} for e in only]
    assert report.sweep_settings(fixed, _datasets(fixed), ["image"])[1] == modality
    # nothing varies but the kind: kind
    same = [{"name": "f", "image_modality": "fluorescence"}]
    assert report.sweep_settings(same, _datasets(same), ["slide", "image"])[1] == "train.kind"


@pytest.fixture(scope="module")
def instances(comparison, tmp_path_factory):
    """A comparison over a sweep of instances per image in two modalities, run before heatmaps logged
    Grad-CAM scores: gap and saol, two seeds; saol gains on gap as the fields get more cells (+0.10 at 1024)."""
    root, info, _, _ = comparison
    uri = info["tracking_uri"]
    sweep = _instance_sweep()
    keys, x = report.sweep_settings(sweep, _datasets(sweep), ["image"], "auto", DEMO)
    run = setup_comparison("gapless-report-test", uri, root / "results", run_name="instances")
    for m, modality in enumerate(MODALITIES):
        for i, n in enumerate(INSTANCES):
            for head in ("gap", "saol"):
                for seed in (0, 1):
                    auroc = 0.9 - 0.1 * i - 0.05 * m + 0.01 * seed + (0.1 * i if head == "saol" else 0.0)
                    _child(run, head, seed, "0.05", with_gradcam=False, metrics={"test_auroc": auroc},
                           params={"train.kind": "image", "config.demo.cells_per_image": n,
                                   "config.demo.image_modality": modality})
    out = tmp_path_factory.mktemp("instances") / "report"
    result = report.write_report(uri, run["parent_run_id"], out, setting_keys=keys, x_key=x, log_mlflow=False)
    return run, keys, x, out, result


def test_instances_per_image_on_x_a_row_per_modality_and_no_grad_cam(instances):
    _, keys, x, out, result = instances
    assert result["x_key"] == x == "config.demo.cells_per_image"
    assert (out / "metric_vs_cells_per_image.png").is_file() and not (out / "metric_vs_witness_fraction.png").exists()
    with Image.open(out / "metric_vs_cells_per_image.png") as im:
        im.verify()
    summary = result["summary"]
    assert list(summary.columns) == report.summary_columns(keys)
    assert list(summary.columns[:3]) == ["kind", "cells_per_image", "image_modality"]
    assert len(summary) == len(INSTANCES) * len(MODALITIES) * 2
    layout = report.metric_layout(summary, keys, x)
    # two numbers beat two modalities; 16 … 1024 span 64×: a log axis
    assert layout.axis.column == "cells_per_image" and layout.axis.numeric and layout.axis.log
    assert layout.axis.categories == [str(n) for n in INSTANCES]
    assert layout.others == ["image_modality"]  # kind (image only) is the same everywhere: no row of its own
    assert sorted(layout.titles) == ["image_modality brightfield", "image_modality fluorescence"]
    # the runs have no Grad-CAM scores: n/a (n 0, NaN), left out of the figure and the paired comparison
    gradcam = [m for m, _ in report.INTERVAL_METRICS if m.startswith("gradcam_")]
    assert len(gradcam) == 3 and not set(gradcam) & {m for m, _ in layout.metrics}
    assert [m for m, _ in layout.metrics] == [m for m, _ in report.INTERVAL_METRICS if not m.startswith("gradcam_")]
    for m in gradcam:
        assert (summary[f"{m}_n"] == 0).all() and summary[f"{m}_mean"].isna().all()
    assert result["runs"]["gradcam_localisation_auroc"].isna().all()
    tsv = pd.read_csv(out / "summary.tsv", sep="\t")
    assert tsv["gradcam_localisation_auroc_mean"].isna().all()
    paired = result["paired"]
    assert "gradcam_localisation_auroc" not in set(paired["metric"])
    assert set(paired["metric"]) == set(report.PAIRED_METRICS) - {"gradcam_localisation_auroc"}
    # saol against gap per instances × modality; at 1024 cells it is 0.10 better on every seed
    big = paired[(paired["cells_per_image"] == "1024") & (paired["metric"] == "test_auroc")]
    assert len(big) == 2 and set(big["verdict"]) == {"better"} and big["mean_diff"].tolist() == pytest.approx([0.1, 0.1])
    text = (out / "report.md").read_text()
    assert "The figure puts cells per image on its x axis (16, 1024, on a log scale)" in text
    assert "image_modality vary too, so it has a row of panels per combination" in text
    assert "witness fraction" not in text
    assert "No run has Grad-CAM localisation scores" in text and "Grad-CAM localisation AUROC" not in text
    assert "![metrics vs cells per image](metric_vs_cells_per_image.png)" in text
    assert "### kind image, cells_per_image 1024, image_modality brightfield" in text


def test_the_command_line_chooses_the_x_axis_from_the_runs(instances, tmp_path):
    run, keys, _, _, _ = instances
    comparison_file = tmp_path / "comparison.json"
    comparison_file.write_text(json.dumps(run))
    flags = [a for k in keys for a in ("--setting-key", k)]
    base = ["report", "--comparison", str(comparison_file), "--no-mlflow"] + flags
    assert cli.main(base + ["--out", str(tmp_path / "auto")]) == 0  # --x auto: the numeric setting that varies most
    assert [p.name for p in (tmp_path / "auto").glob("metric_vs_*.png")] == ["metric_vs_cells_per_image.png"]
    assert cli.main(base + ["--out", str(tmp_path / "bad"), "--x", "witnesses"]) == 2  # not a setting key
    assert not (tmp_path / "bad").exists()
    runs = report.collect_runs(run["tracking_uri"], run["parent_run_id"], keys)
    values = {k: [r["setting"][i] for r in runs] for i, k in enumerate(keys)}
    assert report.resolve_x("auto", keys, values) == "config.demo.cells_per_image"
    assert report.resolve_x("image_modality", keys, values) == "config.demo.image_modality"


def test_a_categorical_x_axis_when_the_sweep_varies_no_number(instances, tmp_path):
    _, keys, _, _, result = instances
    modality = "config.demo.image_modality"
    layout = report.metric_layout(result["summary"], keys, modality)
    assert not layout.axis.numeric and not layout.axis.log
    assert layout.axis.categories == ["brightfield", "fluorescence"]
    assert layout.others == ["cells_per_image"] and len(layout.groups) == len(INSTANCES)
    few = result["summary"][result["summary"]["cells_per_image"] == "16"]  # one row of groups: quick to draw
    assert report.metric_layout(few, keys, modality).others == []
    path = report.plot_metrics(few, tmp_path / report.plot_file(modality), keys, modality)
    assert path.name == "metric_vs_image_modality.png"
    with Image.open(path) as im:
        im.verify()
