"""Faults a cluster meets, each tried as a user would: odd sample ids, write failures (a full disk, a
read-only folder, a file where a folder should be), useless splits, annotations in the wrong frame,
nested --config overrides and errors that used to hide their cause. Every case ends in one clear line
and a non-zero exit, loses nothing finished and leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import GaplessError, os_error_message
from pipeline.files import atomic_directory, atomic_write_text, check_output_target, outputs
from pipeline.samples import load_sample_sheet

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"
BIN = Path(sys.executable).parent


def gapless(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "gapless"), "-q", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def snakemake(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                           str(workdir), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a failed gapless command (progress and log lines aside)."""
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"gapless {command}: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four tiny demo slides (two positive) tiled at 64 px, and one gap model trained on them for two steps."""
    from pipeline.demo import DemoSettings, generate

    root = tmp_path_factory.mktemp("faults")
    sheet = generate(root / "demo", DemoSettings(slides=4, images=0, slide_width=768, slide_height=640,
                                                  witness_fraction=0.3, lesions=2), progress=False)
    tiles = root / "tiles"
    for s in load_sample_sheet(sheet):
        done = gapless("tile", s.path, "--out", tiles / f"{s.sample_id}.zarr", "--mpp", 1, "--tile-size", 64,
                       "--annotations", s.annotations)
        assert done.returncode == 0, done.stderr
    run = root / "runs" / "gap"
    trained = gapless("train", "--samples", sheet, "--tiles", tiles, "--out", run, "--epochs", 1, "--batch-size", 4,
                      "--steps-per-epoch", 2, "--threads", 1, "--tracking-uri", f"sqlite:///{root}/mlflow.db")
    assert trained.returncode == 0, trained.stderr[-3000:]
    return root, sheet, tiles, run


# ---------------------------------------------------------------------------------------------
# 1. Sample ids and the atomic writer: nothing finished is ever removed.


def test_odd_sample_ids_are_refused_when_the_sheet_is_read(tmp_path):
    (tmp_path / "s.svs").write_bytes(b"")
    rows = ["..", "-x", ".hidden", "A", "a", "x.partial", "CON", "y" * 101, "ok-1"]
    (tmp_path / "samples.csv").write_text("sample_id,path,label\n" + "".join(f"{r},s.svs,positive\n" for r in rows))
    with pytest.raises(GaplessError) as caught:
        load_sample_sheet(tmp_path / "samples.csv")
    text = str(caught.value)
    assert "7 problems" in text
    assert "row 2 (..): sample_id '..' starts with '.'" in text
    assert "row 3 (-x): sample_id '-x' starts with '-'" in text
    assert "row 4 (.hidden)" in text
    assert "row 6 (a): sample_id 'a' differs from 'A' (row 5) only by case" in text
    assert "ends with '.partial'" in text and "device name on Windows" in text and "use at most 100" in text
    assert "ok-1" not in text


def test_the_writer_never_removes_a_folder_of_other_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    slides = tmp_path / "results" / "heatmaps" / "slides"
    (slides / "s1").mkdir(parents=True)
    (slides / "s1" / "slide.dzi").write_text("finished")
    canary = tmp_path / "results" / "heatmaps" / "canary.txt"
    canary.write_text("a finished output of another sample")
    for target in ("results/heatmaps/slides/..", "results/heatmaps/slides/.", "results/heatmaps/slides/", ".", str(tmp_path.parent)):
        with pytest.raises(GaplessError):
            with atomic_directory(target, holds="slide.dzi") as partial:
                (partial / "slide.dzi").write_text("new")
    with pytest.raises(GaplessError, match="is not an output of this kind"):  # a folder of other outputs
        with atomic_directory("results/heatmaps", holds="slide.dzi"):
            pass
    with atomic_directory(slides / "s1", holds="slide.dzi") as partial:  # an older output of its kind: replaced
        (partial / "slide.dzi").write_text("new")
    assert (slides / "s1" / "slide.dzi").read_text() == "new"
    assert canary.read_text() == "a finished output of another sample"
    assert sorted(p.name for p in slides.iterdir()) == ["s1"]  # no .partial left behind
    with pytest.raises(GaplessError, match="folder stands where a file"):
        atomic_write_text(slides / "s1", "x")
    with pytest.raises(GaplessError):
        check_output_target("results/..")


def test_the_pyramid_command_refuses_a_dot_dot_output_and_keeps_the_results(tmp_path):
    results = tmp_path / "results" / "heatmaps"
    (results / "slides").mkdir(parents=True)
    canary = results / "canary.txt"
    canary.write_text("finished")
    result = gapless("pyramid", FIXTURES / "small.svs", "--out", "results/heatmaps/slides/..", cwd=tmp_path)
    line = one_error_line(result, "pyramid")
    assert "results/heatmaps/slides/..: not an output name of its own" in line
    assert canary.read_text() == "finished" and sorted(p.name for p in results.iterdir()) == ["canary.txt", "slides"]


@pytest.mark.parametrize("command", [["heatmap", "s.zarr", "--model", "m", "--out", "o", "--sample=-x"],
                                     ["page", "..", "--pyramid", "p", "--heatmap", "h.json", "--out", "o.html",
                                      "--summary", "s.json"]])
def test_commands_refuse_an_unsafe_sample_id(command, tmp_path):
    line = one_error_line(gapless(*command, cwd=tmp_path), command[0])
    assert "sample_id" in line and "start it with a letter or a digit" in line
    assert list(tmp_path.iterdir()) == []


def test_the_workflow_refuses_odd_ids_before_any_job(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        shutil.copyfile(FIXTURES / "small.svs", data / f"{name}.svs")
    (data / "samples.csv").write_text("sample_id,path,label\n..,a.svs,positive\n-b,b.svs,negative\nA,c.svs,positive\n"
                                      "a,c.svs,negative\n")
    (tmp_path / "results" / "heatmaps").mkdir(parents=True)
    (tmp_path / "results" / "heatmaps" / "canary.txt").write_text("finished")
    result = snakemake(tmp_path, "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "1",
                       "--config", "samples=data/samples.csv")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "3 problems in the sample sheet" in text and "only by case" in text and "starts with '-'" in text
    assert (tmp_path / "results" / "heatmaps" / "canary.txt").read_text() == "finished"


# ---------------------------------------------------------------------------------------------
# 3. Write failures: one line naming the path, no partial output.


def test_os_errors_read_as_one_line_with_a_fix():
    import errno

    full = os_error_message(OSError(errno.ENOSPC, "No space left on device"), "results/heatmaps/x.json")
    assert full == ("results/heatmaps/x.json: while writing it: No space left on device; free space on that "
                    "filesystem, or write the results to another one (config `results`, or --out)")
    denied = os_error_message(PermissionError(errno.EACCES, "Permission denied", "/data/out"))
    assert denied.startswith("/data/out: Permission denied; check the permissions")
    worker = os_error_message(OSError("Caught OSError in DataLoader worker process 0.\nTraceback ...\nOSError: disk gone"))
    assert "\n" not in worker and "disk gone" in worker


def test_a_group_of_outputs_appears_together_or_not_at_all(tmp_path):
    (tmp_path / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with outputs():
            atomic_write_text(tmp_path / "old.txt", "new")
            atomic_write_text(tmp_path / "b.txt", "b")
            raise RuntimeError("disk full while writing the third")
    assert (tmp_path / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    with outputs():
        atomic_write_text(tmp_path / "old.txt", "new")
        atomic_write_text(tmp_path / "b.txt", "b")
        assert not (tmp_path / "b.txt").exists()  # appears only when the block ends
    assert (tmp_path / "old.txt").read_text() == "new" and (tmp_path / "b.txt").read_text() == "b"


def _in_small_filesystem(script: str, size: str = "64k", read_only: bool = False) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a fresh tmpfs of ``size`` mounted at $MNT, in a private mount namespace
    (unshare: no root needed where user namespaces are allowed); it sees nothing of it afterwards."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    mount = f"mount -t tmpfs -o size={size}{',ro' if read_only else ''} tmpfs \"$MNT\""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f'MNT=$(mktemp -d) && {mount} && cd "$MNT" && {script}'],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_full_disk_fails_the_heatmap_in_one_line_and_leaves_no_partial_set(cohort):
    root, sheet, tiles, run = cohort
    result = _in_small_filesystem(
        f"gapless -q heatmap {tiles / 'slide-00.zarr'} --model {run} --out out --threads 1; echo rc=$?; "
        "find out -mindepth 1 | sort; echo end")
    assert "rc=2" in result.stdout, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gapless heatmap: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "No space left on device" in errors[0] and "out" in errors[0] and "free space" in errors[0]
    listing = result.stdout.split("rc=2", 1)[1].split("end")[0].split()
    assert listing == [], listing  # no OME-Zarr without its PNG and JSON, no .partial


def test_a_full_disk_fails_tiling_in_one_line_and_leaves_no_store():
    result = _in_small_filesystem(
        f"gapless -q tile {FIXTURES / 'CMU-1-Small-Region.svs'} --out s.zarr --mpp 1 --tile-size 64; echo rc=$?; ls -A; "
        "echo end", size="256k")
    assert "rc=2" in result.stdout, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gapless tile: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "No space left on device" in errors[0] and "s.zarr" in errors[0]
    assert result.stdout.split("rc=2", 1)[1].split("end")[0].split() == []


def test_a_read_only_folder_fails_in_one_line(cohort):
    root, sheet, tiles, run = cohort
    result = _in_small_filesystem(
        f"gapless -q heatmap {tiles / 'slide-00.zarr'} --model {run} --out out --threads 1; echo rc=$?", read_only=True)
    assert "rc=2" in result.stdout, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gapless heatmap: error:")]
    assert len(errors) == 1 and "Read-only file system" in errors[0] and "writable" in errors[0], result.stderr


def test_a_file_where_a_folder_is_expected_fails_in_one_line(tmp_path):
    (tmp_path / "results").write_text("a file, not a folder")
    result = gapless("tile", FIXTURES / "small.svs", "--out", "results/tiles/s.zarr", "--mpp", 0.5, "--tile-size", 8,
                     "--min-tissue", 0, cwd=tmp_path)
    line = one_error_line(result, "tile")
    assert "results" in line and "Not a directory" in line and "a file stands where a folder is expected" in line
    assert (tmp_path / "results").read_text() == "a file, not a folder"


# ---------------------------------------------------------------------------------------------
# 7. Annotations in the wrong frame.


def _scaled(annotations: Path, out: Path, factor: float) -> Path:
    doc = json.loads(annotations.read_text())
    for feature in doc["features"]:
        geometry = feature["geometry"]
        if geometry["type"] == "Polygon":
            geometry["coordinates"] = [[[x * factor, y * factor] for x, y in ring] for ring in geometry["coordinates"]]
        elif geometry["type"] == "Point":
            geometry["coordinates"] = [c * factor for c in geometry["coordinates"]]
    out.write_text(json.dumps(doc))
    return out


def test_annotations_outside_the_slide_fail_the_tile_job(cohort, tmp_path):
    root, sheet, tiles, run = cohort
    positive = [s for s in load_sample_sheet(sheet) if s.label == "positive"][0]
    doubled = _scaled(positive.annotations, tmp_path / "doubled.geojson", 2.0)
    result = gapless("tile", positive.path, "--out", tmp_path / "s.zarr", "--mpp", 1, "--tile-size", 64,
                     "--annotations", doubled)
    line = one_error_line(result, "tile")
    assert "positive objects are entirely outside the 768×640-px image" in line and "level-0 pixels" in line
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()


def test_annotations_off_the_tissue_flag_the_store_and_training_refuses_it(cohort, tmp_path):
    root, sheet, tiles, run = cohort
    samples = load_sample_sheet(sheet)
    flagged_tiles = tmp_path / "tiles"
    shutil.copytree(tiles, flagged_tiles)
    positive = [s for s in samples if s.label == "positive"][0]
    quartered = _scaled(positive.annotations, tmp_path / "quartered.geojson", 0.25)  # a level-2 frame
    store = flagged_tiles / f"{positive.sample_id}.zarr"
    done = gapless("tile", positive.path, "--out", store, "--mpp", 1, "--tile-size", 64, "--annotations", quartered,
                   "--overwrite")
    assert done.returncode == 0, done.stderr
    assert "annotations off tissue" in done.stderr and "QC flag: annotations off tissue" in done.stdout
    info = json.loads(gapless("info", store).stdout)
    assert info["qc_flag"].startswith("annotations off tissue")
    qc = gapless("qc", *sorted(flagged_tiles.glob("*.zarr")), "--out", tmp_path / "qc.tsv")
    assert f"qc: flagged: {positive.sample_id}: annotations off tissue" in qc.stdout

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["train", "--samples", sheet, "--tiles", flagged_tiles, "--epochs", 1, "--batch-size", 4,
              "--steps-per-epoch", 1, "--threads", 1, "--tracking-uri", uri]
    refused = gapless(*common, "--out", tmp_path / "run")
    line = one_error_line(refused, "train")
    assert "1 tile store is flagged by QC" in line and str(store) in line and "--accept-flagged" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
    accepted = gapless(*common, "--out", tmp_path / "run", "--accept-flagged")
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "training on a flagged store, as asked" in accepted.stderr


# ---------------------------------------------------------------------------------------------
# 6. Splits that cannot work, 8. nested --config overrides, 9. errors that hid their cause.


def _sheet_workdir(tmp_path: Path, rows: list[str], columns: str = "sample_id,path,label,group") -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for row in rows:
        name = row.split(",")[1]
        source = FIXTURES / ("small.svs" if name.endswith(".svs") else "dsb2018-nuclei.tif")
        if not (data / name).exists():
            shutil.copyfile(source, data / name)
    (data / "samples.csv").write_text(columns + "\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_a_sheet_whose_positives_share_one_group_is_refused_at_parse_time(tmp_path):
    rows = [f"p{i},p{i}.svs,positive,patient-1" for i in range(3)] + [f"n{i},n{i}.svs,negative,patient-{i + 2}" for i in range(3)]
    workdir = _sheet_workdir(tmp_path, rows)
    result = snakemake(workdir, "--configfile", str(REPO / "config" / "config.yaml"), "-n", "--cores", "1",
                       "--config", "samples=data/samples.csv")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the split cannot work" in text
    assert "seed 0: neither validation nor test has a 'positive' sample" in text
    assert "(split: train 4 (negative 1, positive 3); val 1 (negative 1, positive 0); test 1 (negative 1, positive 0))" in text
    assert "fix: give the samples more groups" in text and "`split` column" in text
    assert "rule tile" not in text


def test_split_checks_name_the_class_each_split_lacks():
    from pipeline.samples import Sample
    from pipeline.splits import check_split

    def sample(i, label, split=None, group=None):
        return Sample(f"s{i}", Path(f"s{i}.svs"), label, group, "slide", None, None, split)

    classes = ["negative", "positive"]
    fixed = [sample(0, "positive", "train"), sample(1, "positive", "train"), sample(2, "negative", "val"),
             sample(3, "negative", "test"), sample(4, "positive", "test")]
    check = check_split(fixed, 0, (0.5, 0.25, 0.25), classes)
    assert check.errors == ("seed 0: the training split has no 'negative' sample, so the model cannot learn that class "
                            "(split: train 2 (negative 0, positive 2); val 1 (negative 1, positive 0); "
                            "test 2 (negative 1, positive 1))",)
    fine = [sample(i, label) for i, label in enumerate(["positive", "negative"] * 4)]
    assert check_split(fine, 0, (0.5, 0.25, 0.25), classes).errors == ()
    assert check_split(fine, 0, (0.5, 0.25, 0.25), classes).warnings == ()
    four = fine[:4]
    check = check_split(four, 0, (0.5, 0.25, 0.25), classes)
    assert check.errors == () and len(check.warnings) == 1 and "validation has no" in check.warnings[0]


def test_a_legal_split_without_a_class_in_validation_is_said_on_the_console(tmp_path):
    rows = ["p0,p0.svs,positive,a", "p1,p1.svs,positive,b", "n0,n0.svs,negative,c", "n1,n1.svs,negative,d"]
    workdir = _sheet_workdir(tmp_path, rows)
    result = snakemake(workdir, "--configfile", str(REPO / "config" / "config.yaml"), "-n", "--cores", "1",
                       "--config", "samples=data/samples.csv", "train={seeds: [0]}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gapless: warning: slide: seed 0: validation has no" in result.stderr
    assert "(no validation AUROC" in result.stderr


def test_a_nested_config_override_keeps_the_other_keys(tmp_path):
    result = snakemake(tmp_path, "--configfile", str(REPO / "config" / "config.yaml"), "-n", "-p", "--cores", "1",
                       "--config", "train={epochs: 2, seeds: [5], head_kwargs: {attnpool: {num_heads: 2}}}",
                       "heatmaps={seed: 5}", "demo={slides: 6, witness_fraction: 0.1}")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    from test_workflow import commands  # the dry run's commands, read by the real parser

    trained = {text.split(" --head ")[1].split()[0]: settings for text, settings in commands(result.stdout, "train")}
    assert {s.epochs for s in trained.values()} == {2}
    assert {(s.batch_size, s.lr) for s in trained.values()} == {(32, 0.002)}  # the other train keys stay the config's
    assert trained["attnpool"].head_kwargs == {"num_heads": 2} and trained["gap"].head_kwargs == {}
    assert "--out results/models/slide/attnpool/seed5" in result.stdout and "seed0" not in result.stdout
    (demo,) = [settings for _, settings in commands(result.stdout, "demo")]
    assert (demo.slides, demo.images, demo.witness_fraction) == (6, 8, 0.1)


def test_a_heatmap_seed_outside_the_trained_seeds_is_one_line(tmp_path):
    result = snakemake(tmp_path, "--configfile", str(REPO / "config" / "config.yaml"), "-n", "--cores", "1",
                       "--config", "heatmaps={seed: 7}")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "heatmaps.seed 7 is not one of train.seeds [0, 1]" in text
    assert "MissingInputException" not in text and "KeyError" not in text


def test_bad_files_in_a_sheet_are_all_listed_before_any_job(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("unreadable.svs", "unopenable.tiff", "dsb2018-nuclei.tif", "small.svs"):
        shutil.copyfile(FIXTURES / name, data / name)
    (data / "samples.csv").write_text("sample_id,path,label\ncorrupt,unreadable.svs,positive\n"
                                      "unsupported,unopenable.tiff,negative\nnompp,dsb2018-nuclei.tif,positive\n"
                                      "fine,small.svs,negative\n")
    result = snakemake(tmp_path, "--configfile", str(REPO / "config" / "config.yaml"), "-n", "--cores", "1",
                       "--config", "samples=data/samples.csv")
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "3 problems in the sample sheet" in text
    assert "corrupt: " in text and "cannot read pixels" in text
    assert "unsupported: " in text and "OpenSlide cannot open it" in text
    assert "nompp: " in text and "no µm/px in the metadata" in text and "set `mpp` in the sample sheet" in text
    assert "fine:" not in text and "rule tile" not in text


@pytest.mark.parametrize("flag, value, words", [("--epochs", "0", "--epochs must be a whole number of 1 or more"),
                                                ("--lr", "-1", "--lr must be a positive number"),
                                                ("--batch-size", "1", "--batch-size must be a whole number of 2 or more")])
def test_train_refuses_a_bad_setting_before_touching_mlflow(flag, value, words, tmp_path):
    result = gapless("train", "--samples", "s.csv", "--tiles", "t", "--out", "o", flag, value,
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert words in one_error_line(result, "train")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_job_shows_its_own_error_on_the_console(tmp_path):
    """The tile job fails on annotations outside the slide; Snakemake's console says why, not only 'check log'."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(FIXTURES / "CMU-1-Small-Region.svs", data / "s.svs")
    far = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[9000, 9000], [9100, 9000], [9100, 9100],
                                                                                [9000, 9000]]]},
           "properties": {"classification": {"name": "Tumor"}}}
    (data / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [far]}))
    shutil.copyfile(FIXTURES / "small.svs", data / "n.svs")
    (data / "samples.csv").write_text("sample_id,path,label,annotations\ns,s.svs,positive,s.geojson\nn,n.svs,negative,\n")
    result = snakemake(tmp_path, "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "1",
                       "--config", "samples=data/samples.csv", "train={split: [1, 0, 0]}", "--", "results/tiles/s.zarr")
    assert result.returncode != 0
    assert "gapless: 1 job failed:" in result.stderr
    assert "tile (results/logs/tile/s.log): gapless tile: error:" in result.stderr
    assert "1 of 1 positive objects are entirely outside the 2220×2967-px image" in result.stderr
    assert not (tmp_path / "results" / "tiles" / "s.zarr").exists()


def test_train_refuses_a_store_with_a_missing_shard_before_any_step(cohort, tmp_path):
    root, sheet, tiles, run = cohort
    damaged = tmp_path / "tiles"
    shutil.copytree(tiles, damaged)
    shard = sorted((damaged / "slide-01.zarr" / "tiles" / "c").rglob("*"))[-1]
    shard.unlink()
    result = gapless("train", "--samples", sheet, "--tiles", damaged, "--out", tmp_path / "run", "--epochs", 1,
                     "--batch-size", 4, "--steps-per-epoch", 1, "--threads", 1,
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    line = one_error_line(result, "train")
    assert f"{damaged / 'slide-01.zarr'}: damaged tile store: 1 of" in line and "shard files missing" in line
    assert "re-tile it" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
