"""The Snakemake workflow: it parses, lints clean, stops on a bad sheet, and really runs demo → tile → qc.

Every run works in a temporary directory (``--directory``), so nothing is left in the repository.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.demo import DemoSettings
from pipeline.settings import HeatmapSettings, settings_from_args
from pipeline.tiling import TileSettings
from pipeline.train_settings import TrainSettings

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def snakemake(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the venv's Snakemake on the repository's Snakefile inside ``workdir``."""
    env = dict(os.environ)
    # the rules call the `gapless` console script installed beside this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = dry_run_output.splitlines()
    start = lines.index("Job stats:") + 3
    counts = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


SETTINGS = {"demo": DemoSettings, "tile": TileSettings, "tile-batch": TileSettings, "train": TrainSettings,
            "heatmap": HeatmapSettings}


def commands(shell: str, command: str) -> list[tuple[str, object]]:
    """Each `gapless <command>` line of a dry run's shell output, and the settings that command resolves
    (its --settings JSON and flags, read by the real parser): what reaches the stage, however it is spelled."""
    found = []
    for line in shell.splitlines():
        start = line.find(f"gapless {command} ")
        if start < 0:
            continue
        text = line[start:].split(" > ")[0]
        args = build_parser().parse_args(shlex.split(text)[1:])
        found.append((text, settings_from_args(SETTINGS[command], args)))
    return found


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


FIXTURES = REPO / "tests" / "data"


@pytest.fixture()
def sheet_workdir(tmp_path: Path) -> Path:
    """A working directory with four small real slides and a cell image, a sample sheet and a config
    using it (the sheet check opens every file, and a slide cohort needs a group for each split)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "c", "d", "e"):
        shutil.copyfile(FIXTURES / "small.svs", data / f"{name}.svs")
    shutil.copyfile(FIXTURES / "dsb2018-nuclei.tif", data / "b.tif")
    (data / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (data / "samples.csv").write_text(
        "sample_id,path,label,kind,annotations,mpp\n"
        "a,a.svs,positive,slide,a.geojson,0.25\n"
        "b,b.tif,negative,image,,0.5\n"
        "c,c.svs,positive,slide,,\n"
        "d,d.svs,negative,slide,,\n"
        "e,e.svs,negative,slide,,\n"
    )
    write_config(tmp_path / "config.yaml", {"samples": "data/samples.csv", "results": "out"})
    return tmp_path


def test_default_config_dry_run_plans_demo_tiles_and_qc(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), "-n", "--cores", "2")
    assert result.returncode == 0, output(result)
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    demo, train = default["demo"], default["train"]
    runs = len(train["kinds"]) * len(train["heads"]) * len(train["seeds"])  # one heatmap job per model, too
    batches = -(-demo["images"] // default["tiling"]["batch"])  # cell images are tiled many per job
    mapped = (demo["slides"] if "slide" in train["kinds"] else 0) + (demo["images"] if "image" in train["kinds"] else 0)
    assert job_counts(result.stdout) == {
        "all": 1,
        "demo": 1,
        "mlflow_setup": 1,
        "tile": demo["slides"],
        "tile_batch": batches,
        "tiles_qc": 1,
        "train": runs,
        "heatmap": runs,
        "slide_pyramid": mapped,
        "sample_page": mapped,
        "qupath": mapped,
        "heatmap_index": 1,
        "compare": 1,
        "total": demo["slides"] + batches + 2 * runs + 3 * mapped + 6,
    }
    assert not (tmp_path / "results").exists()  # a dry run makes nothing


def test_default_config_lints_clean(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), "--lint")
    assert result.returncode == 0, output(result)
    assert "Congratulations" in output(result)


def test_sample_sheet_config_lints_clean_and_plans_no_demo(sheet_workdir: Path) -> None:
    config = str(sheet_workdir / "config.yaml")
    lint = snakemake(sheet_workdir, "--configfile", config, "--lint")
    assert lint.returncode == 0, output(lint)
    assert "Congratulations" in output(lint)

    result = snakemake(sheet_workdir, "--configfile", config, "-n", "-p", "--cores", "2")
    assert result.returncode == 0, output(result)
    runs = 1 * 5 * 2  # kinds × heads × seeds of the default config: slides only
    slides = 4
    assert job_counts(result.stdout) == {"all": 1, "mlflow_setup": 1, "tile": slides, "tile_batch": 1, "tiles_qc": 1,
                                         "train": runs, "heatmap": runs, "slide_pyramid": slides, "sample_page": slides,
                                         "qupath": slides, "heatmap_index": 1, "compare": 1,
                                         "total": 2 * runs + 3 * slides + 10}
    shell = result.stdout
    # per-kind grids from the config defaults (the schema's, equal to TileSettings'), the sheet's mpp and
    # annotations as flags
    tiles = {text.split(" --out ")[1].split()[0]: settings for text, settings in commands(shell, "tile")}
    assert f"gapless tile {sheet_workdir / 'data' / 'a.svs'} --out out/tiles/a.zarr --kind slide --settings " in shell
    assert (tiles["out/tiles/a.zarr"].mpp, tiles["out/tiles/a.zarr"].tile_size, tiles["out/tiles/a.zarr"].min_tissue) == (0.5, 224, 0.25)
    assert f"--slide-mpp 0.25 --annotations {sheet_workdir / 'data' / 'a.geojson'}" in shell
    assert tiles["out/tiles/a.zarr"].slide_mpp == 0.25 and tiles["out/tiles/a.zarr"].annotations == str(sheet_workdir / "data" / "a.geojson")
    # the cell image is tiled by a batch job, with the image grid
    (batch_text, batch), = commands(shell, "tile-batch")
    assert "--ids b --out out/tiles/batches/image-00001.zarr --manifest out/tiles/batches/image-00001.json" in batch_text
    assert (batch.mpp, batch.min_tissue) == (0.5, 0.1)
    assert ("gapless qc out/tiles/a.zarr out/tiles/batches/image-00001.json out/tiles/c.zarr out/tiles/d.zarr"
            " out/tiles/e.zarr --out out/tiles/qc.tsv") in shell
    assert len(tiles) == 4 and not any(settings.allow_empty for settings in [*tiles.values(), batch])
    # a training job per kind × head × seed, on the stores of its kind, logged under one comparison
    assert "gapless mlflow-setup --experiment gapless --results out" in shell
    assert ("gapless train --samples data/samples.csv --tiles out/tiles --out out/models/slide/saol/seed1"
            " --kind slide --head saol --seed 1 --classes negative positive --threads 2"
            " --comparison out/mlflow/comparison.json") in shell
    trained = [settings for _, settings in commands(shell, "train")]
    assert len(trained) == runs
    assert all((s.backbone, s.pretrained, s.epochs) == ("resnet10t", False, 4) for s in trained)


def test_tiling_options_reach_the_command(sheet_workdir: Path) -> None:
    config = write_config(
        sheet_workdir / "flag.yaml",
        {
            "samples": "data/samples.csv",
            "results": "out",
            "tiling": {"on_empty": "flag", "positive_classes": ["Tumor", "DCIS"], "tissue": "none"},
        },
    )
    result = snakemake(sheet_workdir, "--configfile", str(config), "-n", "-p", "--cores", "2")
    assert result.returncode == 0, output(result)
    tiles = [settings for command in ("tile", "tile-batch") for _, settings in commands(result.stdout, command)]
    assert len(tiles) == 5  # four slides, and the cell image's batch
    assert all(s.tissue == "none" for s in tiles)
    assert all(s.positive_classes == ("Tumor", "DCIS") and s.allow_empty for s in tiles)


def test_sheet_problems_stop_the_dry_run_with_every_problem_listed(sheet_workdir: Path) -> None:
    (sheet_workdir / "data" / "samples.csv").write_text(
        "sample_id,path,label,kind\n"
        "a,a.svs,positive,slide\n"
        "a,missing.svs,positive,slide\n"
        "c d,b.tif,maybe,image\n"
    )
    result = snakemake(sheet_workdir, "--configfile", str(sheet_workdir / "config.yaml"), "-n", "--cores", "2")
    assert result.returncode != 0
    text = output(result)
    assert "4 problems in the sample sheet" in text
    assert "row 3 (a): duplicate sample_id 'a'" in text
    assert f"row 3 (a): file not found: {sheet_workdir / 'data' / 'missing.svs'}" in text
    assert "row 4 (c d): sample_id 'c d' is not safe as a file name" in text
    assert "row 4 (c d): unknown label 'maybe': the classes are negative, positive" in text
    assert "rule tile" not in text  # stopped before planning any job


def test_invalid_config_is_refused(sheet_workdir: Path) -> None:
    config = write_config(
        sheet_workdir / "bad.yaml", {"samples": "data/samples.csv", "tiling": {"on_empty": "ignore"}}
    )
    result = snakemake(sheet_workdir, "--configfile", str(config), "-n", "--cores", "2")
    assert result.returncode != 0
    assert "Error validating config file" in output(result)
    assert "'ignore' is not one of ['error', 'flag']" in output(result)


TINY_DEMO = {
    "slides": 4,
    "images": 2,
    "slide_width": 768,
    "slide_height": 640,
    "slide_mpp": 0.5,
    "image_size": 256,
    "image_mpp": 0.5,
    "seed": 0,
}


@pytest.mark.slow
def test_real_run_demo_tile_qc_train_heatmaps(tmp_path: Path) -> None:
    results = tmp_path / "results"
    config = write_config(
        tmp_path / "tiny.yaml",
        {
            "results": str(results),
            "demo": {"out": str(tmp_path / "demo"), **TINY_DEMO},
            "tiling": {
                "slide": {"mpp": 1.0, "tile_size": 64, "stride": 64},
                "image": {"mpp": 0.5, "tile_size": 64, "stride": 64},
            },
            "train": {"kinds": ["slide"], "heads": ["gap", "saol"], "seeds": [3], "epochs": 1, "batch_size": 8,
                      "steps_per_epoch": 2, "threads": 1},
            "heatmaps": {"batch_size": 16},
            "mlflow": {"experiment": "tiny"},
        },
    )
    result = snakemake(tmp_path, "--configfile", str(config), "--cores", "2", timeout=600)
    logs = "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted((results / "logs").rglob("*.log")))
    assert result.returncode == 0, output(result)[-6000:] + logs

    with open(tmp_path / "demo" / "samples.csv", newline="") as f:
        demo_samples = {row["sample_id"]: row for row in csv.DictReader(f)}
    assert len(demo_samples) == TINY_DEMO["slides"] + TINY_DEMO["images"]
    from pipeline.store import find_sample_store, open_sample

    for sample_id, row in demo_samples.items():
        store = find_sample_store(results / "tiles", sample_id)  # a slide's own store, a field's batch store
        assert open_sample(store, sample_id).n > 0, sample_id
        if row["kind"] == "slide":
            assert store == results / "tiles" / f"{sample_id}.zarr"
            assert (results / "logs" / "tile" / f"{sample_id}.log").is_file()
        else:
            assert store.parent == results / "tiles" / "batches" and store.name == "image-00001.zarr"
    assert (results / "logs" / "tile_batch" / "image-00001.log").is_file()

    with open(results / "tiles" / "qc.tsv", newline="") as f:
        qc = {row["sample"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert sorted(qc) == sorted(demo_samples)
    for sample_id, row in qc.items():
        sample = demo_samples[sample_id]
        # the per-kind grid of the config reached the tiler
        assert row["kind"] == sample["kind"]
        assert float(row["mpp"]) == (1.0 if sample["kind"] == "slide" else 0.5)
        assert int(row["tiles"]) > 0 and not row["qc_flag"]
        # the annotations reached the tiler: only positive samples have witness-labelled tiles
        assert (int(row["positive_tiles"]) > 0) == (sample["label"] == "positive"), row

    # one comparison run in MLflow with a child run per head, each holding its metrics and weights
    from mlflow.tracking import MlflowClient

    comparison = json.loads((results / "mlflow" / "comparison.json").read_text())
    assert comparison["tracking_uri"] == f"sqlite:///{results}/mlflow.db"
    client = MlflowClient(comparison["tracking_uri"])
    parent = client.get_run(comparison["parent_run_id"])
    assert parent.data.params["train.epochs"] == "1" and parent.info.experiment_id == comparison["experiment_id"]
    for head in ("gap", "saol"):
        folder = results / "models" / "slide" / head / "seed3"
        run = client.get_run((folder / "run_id.txt").read_text().strip())
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["head"] == head and run.data.params["config.train.steps_per_epoch"] == "2"
        assert json.loads((folder / "metrics.json").read_text())["test_ece"] == run.data.metrics["test_ece"]
        assert {"model/weights.safetensors", "plots/test_maps.png"} <= {
            a.path for folder_ in ("model", "plots") for a in client.list_artifacts(run.info.run_id, folder_)}
        assert (results / "logs" / "train" / "slide" / head / "seed3.log").is_file()

    # heatmaps of every slide for each head (fields have no trained model here), scored where the
    # witnesses are known and logged to the head's run; a viewer page per slide and an index
    heatmaps = results / "heatmaps"
    slides = [sid for sid, row in demo_samples.items() if row["kind"] == "slide"]
    for head in ("gap", "saol"):
        run = client.get_run((results / "models" / "slide" / head / "seed3" / "run_id.txt").read_text().strip())
        for sample_id in slides:
            info = json.loads((heatmaps / head / "seed3" / f"{sample_id}.json").read_text())
            assert info["head"] == head and info["normalisation"] == "rank" and info["range"] == [0, 1]
            for suffix in (".png", ".overlay.png", ".ome.zarr"):
                assert (heatmaps / head / "seed3" / f"{sample_id}{suffix}").exists()
            if demo_samples[sample_id]["label"] == "positive":
                assert 0 <= info["scores"]["localisation_auroc"] <= 1
                assert run.data.metrics[f"heatmap/{sample_id}/localisation_auroc"] == pytest.approx(
                    info["scores"]["localisation_auroc"])
    for sample_id in slides:  # every paged sample's tiles, a measurement per head, for QuPath
        features = json.loads((heatmaps / "qupath" / f"{sample_id}.geojson").read_text())["features"]
        assert features and set(features[0]["properties"]["measurements"]) <= {"gap", "saol"}
    index = (heatmaps / "index.html").read_text()
    data = json.loads(index.split('<script type="application/json" id="gapless-index">', 1)[1].split("</script>", 1)[0])
    linked = {data["samples"][row]: url for row, url, _ in data["pages"]}
    assert data["samples"] == slides and linked == {s: f"{s}.html" for s in slides}
    for sample_id in demo_samples:
        assert (heatmaps / f"{sample_id}.html").is_file() == (sample_id in slides)

    # the report, read from MLflow: one row per head (one seed: no interval), logged to the comparison run
    summary = (results / "report" / "summary.tsv").read_text().splitlines()
    header = summary[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in summary[1:]]
    assert sorted(r["head"] for r in rows) == ["gap", "saol"] and {r["n_seeds"] for r in rows} == {"1"}
    assert (results / "report" / "heatmaps_side_by_side.png").stat().st_size > 0
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    # a second run has nothing to do: outputs are complete and newer than inputs
    again = snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "-n")
    assert again.returncode == 0, output(again)
    assert "Nothing to be done" in output(again)


def test_a_sweep_plans_one_dataset_and_cohort_per_entry(tmp_path: Path) -> None:
    config = write_config(tmp_path / "sweep.yaml", {
        "sweep": [{"name": "w20", "witness_fraction": 0.2}, {"name": "w01", "witness_fraction": 0.01, "slides": 4}],
        "demo": {"images": 0},
        "train": {"heads": ["gap", "saol"], "seeds": [0, 1]},
    })
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(config), "-n", "-p", "--cores", "2")
    assert result.returncode == 0, output(result)
    counts = job_counts(result.stdout)
    assert counts["demo_w20"] == counts["demo_w01"] == 1 and "demo" not in counts
    assert counts["tile"] == 8 + 4 and counts["train"] == 2 * 2 * 2 and counts["heatmap"] == 2 * 2 * 2  # one per model
    shell = result.stdout
    demos = {text.split("--id-prefix ")[1]: settings for text, settings in commands(shell, "demo")}
    assert (demos["w01-"].witness_fraction, demos["w01-"].lesions, demos["w01-"].seed, demos["w01-"].slides) == (0.01, 2, 0, 4)
    assert (demos["w20-"].witness_fraction, demos["w20-"].slides, demos["w20-"].images) == (0.2, 8, 0)
    assert "gapless tile results/demo/w01/slides/slide-03.tiff --out results/tiles/w01-slide-03.zarr" in shell
    # each cohort trains on its own dataset's sheet and logs that dataset's settings
    assert ("gapless train --samples results/demo/w20/samples.csv --tiles results/tiles"
            " --out results/models/w20-slide/saol/seed1 --kind slide") in shell
    assert '"dataset": "w01", "demo": {' in shell and '"witness_fraction": 0.01, "witnesses": 0}' in shell


def test_the_benchmark_presets_are_valid_configs(tmp_path: Path) -> None:
    for name in ("benchmark.yaml", "benchmark_gpu.yaml", "gpu.yaml", "instances.yaml", "instances_gpu.yaml",
                 "slides.yaml"):
        result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(REPO / "config" / name), "-n", "--cores", "2")
        assert result.returncode == 0, name + output(result)
        assert job_counts(result.stdout)["train"] > 0
    counts = job_counts(result.stdout)  # slides.yaml: one embed job per seed (the encoder loaded once), 7 heads × 3 seeds
    assert (counts["embed"], counts["train_slides"], counts["heatmap_slides"]) == (3, 21, 21), counts


def test_the_slide_level_refuses_an_encoder_it_cannot_build(tmp_path: Path) -> None:
    """slide_level.encoder must be a tile-level model the run trains (a head of train.heads, slides in train.kinds)
    or timm:NAME; a slide-level head must be registered: one clear message before any job."""
    bad = write_config(tmp_path / "bad.yaml", {"slide_level": {"enabled": True, "encoder": "ltpa", "heads": ["gap", "nope"]}})
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(bad), "-n", "--cores", "2")
    assert result.returncode != 0
    text = output(result)
    assert "slide_level.encoder 'ltpa'" in text and "timm:NAME" in text and "slide_level.heads: unknown head 'nope'" in text
    timm = write_config(tmp_path / "timm.yaml", {"slide_level": {"enabled": True, "encoder": "timm:resnet10t"}})
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(timm), "-n", "-p", "--cores", "2")
    assert result.returncode == 0, output(result)
    assert "--backbone resnet10t" in result.stdout and job_counts(result.stdout)["embed"] == 1


def test_device_cpu_takes_no_gpu_unit_so_jobs_share_the_cores(tmp_path: Path) -> None:
    """train.device: cpu → train and heatmap jobs ask no `gpu` resource and pass --device cpu;
    the default (auto) asks one unit each, so `--resources gpu=1` runs one at a time."""
    cpu = write_config(tmp_path / "cpu.yaml", {"train": {"device": "cpu", "threads": 1}, "heatmaps": {"threads": 1}})
    runs = {
        "auto": snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), "-n", "-p", "--cores", "2"),
        "cpu": snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(cpu), "-n", "-p", "--cores", "2"),
    }
    for device, result in runs.items():
        assert result.returncode == 0, output(result)
        blocks = result.stdout.split("\nrule ")
        for rule in ("train", "heatmap"):
            jobs = [b for b in blocks if b.startswith(f"{rule}:")]
            assert jobs, rule
            gpu = "gpu=0" if device == "cpu" else "gpu=1"
            assert all(gpu in b.split("resources:")[1].splitlines()[0] for b in jobs), (rule, device)
            if rule == "train":  # in its --settings (the config's train section)
                assert [s.device for b in jobs for _, s in commands(b, "train")] == [device] * len(jobs), device
            else:
                assert all(f"--device {device}" in b for b in jobs), (rule, device)
        heatmaps = [b for b in blocks if b.startswith("heatmap:")]
        assert all(f"--threads {1 if device == 'cpu' else 2}" in b for b in heatmaps)


def _compare_block(dry_run_stdout: str) -> str:
    """The compare job's block of a dry run's output (`-n -p`): its output files and shell command."""
    (block,) = [b for b in dry_run_stdout.split("\nrule ") if b.startswith("compare:")]
    return block


def test_the_report_takes_its_settings_and_x_axis_from_the_sweep(tmp_path: Path) -> None:
    """The compare job gets train.kind and every demo key the sweep sets as --setting-key, and the x axis
    (--x): report.x, else the numeric swept key with the most distinct values; the plot is named after it."""
    sweep = [{"name": f"{m[0]}{n}", "cells_per_image": n, "image_modality": m}
             for m in ("fluorescence", "brightfield") for n in (16, 64, 256)]
    base = {"sweep": sweep, "demo": {"slides": 0, "images": 8, "image_mpp": 1.0, "witnesses": 1},
            "train": {"kinds": ["image"], "heads": ["gap", "saol"], "seeds": [0, 1]}}
    keys = ("--setting-key train.kind --setting-key config.demo.cells_per_image "
            "--setting-key config.demo.image_modality")
    auto = write_config(tmp_path / "auto.yaml", base)
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(auto), "-n", "-p", "--cores", "2")
    assert result.returncode == 0, output(result)
    block = _compare_block(result.stdout)
    assert f"gapless report --comparison results/mlflow/comparison.json --out results/report {keys} " \
           "--x config.demo.cells_per_image --heatmap gap=" in block
    assert "results/report/metric_vs_cells_per_image.png" in block and "metric_vs_witness_fraction" not in block

    # report.x: a demo key the sweep does not vary is added to the settings; an unknown one is refused
    chosen = write_config(tmp_path / "chosen.yaml", {**base, "report": {"x": "witnesses"}})
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(chosen), "-n", "-p", "--cores", "2")
    assert result.returncode == 0, output(result)
    block = _compare_block(result.stdout)
    assert f"{keys} --setting-key config.demo.witnesses --x config.demo.witnesses " in block
    assert "results/report/metric_vs_witnesses.png" in block
    wrong = write_config(tmp_path / "wrong.yaml", {**base, "report": {"x": "instances"}})
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), str(wrong), "-n", "--cores", "2")
    assert result.returncode != 0
    assert "report.x 'instances' is neither kind nor a demo key" in output(result)


def test_without_a_sweep_the_report_keeps_its_settings_and_axis(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "--configfile", str(DEFAULT_CONFIG), "-n", "-p", "--cores", "2")
    assert result.returncode == 0, output(result)
    block = _compare_block(result.stdout)
    assert ("--setting-key train.kind --setting-key config.demo.witness_fraction --setting-key config.demo.cell_density"
            " --x config.demo.witness_fraction ") in block
    assert "results/report/metric_vs_witness_fraction.png" in block
