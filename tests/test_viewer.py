"""The HTML viewer: the Deep Zoom pyramid, the pages, their inputs, the pages in Chromium, and `gapless view`.

A tiny demo slide and fluorescence field are made once; two fake heads ("gap": red over the left half,
"saol": blue over the right half) are written as pipeline.heatmap writes them. The browser checks run
Debian's Chromium headless through Playwright on the pages opened straight from disk (file://) and
served by `gapless view` (a subprocess on a free port); pixels are read from screenshots, which file://
canvas tainting does not affect.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from pipeline.demo import DemoSettings, generate
from pipeline.errors import GaplessError
from pipeline.head_info import HeadInfo, registered_heads
from pipeline.heatmap.document import HeatmapDocument, document_text
from pipeline.viewer import (
    load_heatmap_json,
    read_pyramid,
    write_index,
    write_sample_page,
    write_slide_pyramid,
)
from pipeline.viewer.deepzoom import disk_usage, level_mpp

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
W, H = 1024, 768  # demo slide, level-0 px
EXT = 128  # heatmap tile extent, level-0 px
HEADS = {"gap": (255, 0, 0), "saol": (0, 0, 255)}


def tile_p(head: str, x: int, y: int) -> float:
    """A distinct probability per head and tile, so a click shows which tile and head answered."""
    base = ((x // EXT) * 7 + (y // EXT) * 3) % 50 / 100
    return round(base + (0.0 if head == "gap" else 0.5) + 0.0123, 4)


def write_heatmap(folder: Path, sample: str, head: str | HeadInfo, width: int, height: int, colour, left: bool,
                  stem: str | None = None, **overrides) -> Path:
    """A heatmap JSON and overlay as pipeline.heatmap writes them: opaque colour on one half.

    The JSON is pipeline.heatmap.document's (its one writer); ``head`` is a registered head's name
    (its own words, as training records them) or any ``HeadInfo``; ``overrides`` then replace keys of
    the written JSON, to write what the writer never would (bad values, NaN).
    """
    info = head if isinstance(head, HeadInfo) else registered_heads()[head]
    out = folder / info.name
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or sample
    ov = np.zeros((height // 16, width // 16, 4), np.uint8)
    half = ov.shape[1] // 2
    if left:
        ov[:, :half] = (*colour, 255)
    else:
        ov[:, half:] = (*colour, 255)
    Image.fromarray(ov, "RGBA").save(out / f"{stem}.png")
    document = HeatmapDocument(
        sample=sample, head=info, run_id=f"run-{info.name}", normalisation="rank", colormap="viridis",
        range=(0.0, 1.0), width=width, height=height, mpp=0.5, overlay=f"{stem}.png", tile_extent=EXT,
        tiles=[[x, y, tile_p(info.name, x, y)] for y in range(0, height - EXT + 1, EXT) for x in range(0, width - EXT + 1, EXT)],
        classes=["negative", "positive"],
        scores={"localisation_auroc": 0.7 if info.name == "gap" else 0.9, "pointing_game": 1.0},
    )
    path = out / f"{stem}.json"
    path.write_text(document_text(document), encoding="utf-8")
    return _patch(path, **overrides) if overrides else path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Demo data, two pyramids, heatmaps of two heads, two sample pages and the index."""
    root = tmp_path_factory.mktemp("viewer")
    generate(root / "demo", DemoSettings(slides=1, images=1, slide_width=W, slide_height=H, image_size=256,
                                         cell_density=20, lesions=1), progress=False)
    hm = root / "heatmaps"
    slide = root / "demo" / "slides" / "slide-00.tiff"
    field = root / "demo" / "images" / "field-00.ome.tif"
    write_slide_pyramid(slide, hm / "slides" / "slide-00", progress=False, max_mpp=None)  # every level
    write_slide_pyramid(field, hm / "slides" / "field-00", progress=False, workers=2, max_mpp=None)
    jsons = [write_heatmap(hm, "slide-00", h, W, H, c, left=(h == "gap")) for h, c in HEADS.items()]
    field_json = write_heatmap(hm, "field-00", "attnpool", 256, 256, (0, 255, 0), left=True)
    summary = write_sample_page(hm / "slide-00.html", "slide-00", hm / "slides" / "slide-00", jsons,
                                annotations=root / "demo" / "annotations" / "slide-00.geojson",
                                info={"label": "positive"})
    field_summary = write_sample_page(hm / "field-00.html", "field-00", hm / "slides" / "field-00", [field_json])
    write_index(hm / "index.html", [("slide-00", hm / "slide-00.html", summary),
                                    ("field-00", hm / "field-00.html", field_summary)])
    return {"root": root, "hm": hm, "slide": slide, "field": field, "jsons": jsons, "summary": summary}


# ---------------------------------------------------------------------------------------------
# pyramid


def test_slide_pyramid_is_openslides_deep_zoom(site):
    pyr_dir = site["hm"] / "slides" / "slide-00"
    info = read_pyramid(pyr_dir)
    assert (info["width"], info["height"], info["tile_size"], info["overlap"], info["format"]) == (W, H, 254, 1, "jpeg")
    assert info["kind"] == "slide" and info["mpp"] == pytest.approx(0.5)
    assert not pyr_dir.with_name("slide-00.partial").exists()
    with openslide.OpenSlide(str(site["slide"])) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        assert info["levels"] == dz.level_count
        for level in range(dz.level_count):
            cols, rows = dz.level_tiles[level]
            files = sorted(p.name for p in (info["files"] / str(level)).iterdir())
            assert files == sorted(f"{c}_{r}.jpeg" for c in range(cols) for r in range(rows))
        # an interior full-resolution tile is the slide's pixels (JPEG twice: small differences)
        top = dz.level_count - 1
        ours = np.asarray(Image.open(info["files"] / str(top) / "1_1.jpeg").convert("RGB"), dtype=float)
        ref = np.asarray(dz.get_tile(top, (1, 1)).convert("RGB"), dtype=float)
        assert ours.shape == ref.shape == (256, 256, 3)
        assert np.abs(ours - ref).mean() < 4
        assert ref.std() > 10  # tissue, not blank


def test_cell_image_pyramid_shows_fluorescence_in_colour(site):
    info = read_pyramid(site["hm"] / "slides" / "field-00")
    assert (info["width"], info["height"]) == (256, 256)
    assert info["kind"] == "image" and info["modality"] == "fluorescence"
    tile = np.asarray(Image.open(info["files"] / str(info["levels"] - 1) / "0_0.jpeg").convert("RGB"))
    assert tile.shape == (255, 255, 3)  # 254 + 1 px overlap on the right and bottom
    assert tile.max() > 100 and np.median(tile) < 60  # bright cells on a dark background


def test_levels_without_a_source_level_are_resized_from_a_finer_one(tmp_path):
    """A single-level slide wider than 2 × 4096 px: the Deep Zoom levels at 1/2 and 1/4 scale have no
    source level and are read from level 0 and resized, block by block, without seams."""
    import tifffile

    w, h = 9000, 300
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 255 // w, yy * 255 // h, (np.sin(xx / 37) * np.cos(yy / 23) + 1) * 127], -1).astype(np.uint8)
    slide = tmp_path / "wide.tiff"
    tifffile.imwrite(slide, pixels, tile=(256, 256), photometric="rgb", compression="deflate")
    info = read_pyramid(write_slide_pyramid(slide, tmp_path / "pyr", progress=False, workers=2))
    with openslide.OpenSlide(str(slide)) as osr:
        assert osr.level_count == 1
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        assert info["levels"] == dz.level_count
        for level in range(dz.level_count):
            cols, rows = dz.level_tiles[level]
            files = sorted(p.name for p in (info["files"] / str(level)).iterdir())
            assert files == sorted(f"{c}_{r}.jpeg" for c in range(cols) for r in range(rows))
        for level in range(dz.level_count - 3, dz.level_count):  # 2250, 4500 and 9000 px wide
            cols, rows = dz.level_tiles[level]
            for c in range(cols):
                for r in range(rows):
                    ours = np.asarray(Image.open(info["files"] / str(level) / f"{c}_{r}.jpeg").convert("RGB"), dtype=float)
                    ref = np.asarray(dz.get_tile(level, (c, r)).convert("RGB"), dtype=float)
                    assert ours.shape == ref.shape and np.abs(ours - ref).mean() < 4, (level, c, r)


def test_pyramid_replaces_an_old_one_and_cleans_partials(site, tmp_path):
    out = tmp_path / "pyr"
    (tmp_path / "pyr.partial").mkdir()  # a killed run's leftovers
    out.mkdir()
    (out / "slide.dzi").write_text("an older pyramid")
    (out / "stale.txt").write_text("old")
    write_slide_pyramid(site["field"], out, progress=False, tile_size=126)
    assert not (out / "stale.txt").exists() and not (tmp_path / "pyr.partial").exists()
    assert read_pyramid(out)["tile_size"] == 126
    # a folder that is not a pyramid (e.g. a folder of other outputs) is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "finished.json").write_text("{}")
    with pytest.raises(GaplessError, match="not an output of this kind"):
        write_slide_pyramid(site["field"], other, progress=False, tile_size=126)
    assert (other / "finished.json").read_text() == "{}" and not (tmp_path / "other.partial").exists()


def test_pyramid_errors(site, tmp_path):
    with pytest.raises(GaplessError, match="not found"):
        write_slide_pyramid(tmp_path / "missing.tiff", tmp_path / "out", progress=False)
    with pytest.raises(GaplessError, match="tile size"):
        write_slide_pyramid(site["slide"], tmp_path / "out", tile_size=4, progress=False)
    with pytest.raises(GaplessError, match="overlap"):
        write_slide_pyramid(site["slide"], tmp_path / "out", overlap=-1, progress=False)
    with pytest.raises(GaplessError, match="finest µm/px"):
        write_slide_pyramid(site["slide"], tmp_path / "out", max_mpp=0, progress=False)
    data = Path(__file__).parent / "data"
    with pytest.raises(GaplessError, match="OpenSlide cannot open it"):
        write_slide_pyramid(data / "unopenable.tiff", tmp_path / "out", progress=False)
    with pytest.raises(GaplessError, match="cannot read the pixels"):  # opens, but its tiles are corrupt
        write_slide_pyramid(data / "unreadable.svs", tmp_path / "out", progress=False, workers=2)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(GaplessError):
        write_slide_pyramid(not_an_image, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------------------------------------
# pages and their inputs


def test_page_is_relative_and_self_contained(site):
    hm = site["hm"]
    text = (hm / "slide-00.html").read_text(encoding="utf-8")
    assert str(site["root"]) not in text  # no absolute paths: the folder can be moved
    assert "http://" not in text and "https://" not in text
    assert '<script src="viewer_assets/viewer.js">' in text
    assert (hm / "viewer_assets" / "viewer.js").is_file() and (hm / "viewer_assets" / "viewer.css").is_file()
    data = json.loads(text.split("window.GAPLESS_SAMPLE = ", 1)[1].split(";</script>", 1)[0])
    assert [h["name"] for h in data["heads"]] == ["gap", "saol"]
    assert data["pyramid"]["url"] == "slides/slide-00/slide_files/"
    assert data["heads"][0]["overlay"] == "gap/slide-00.png"
    assert len(data["heads"][0]["tiles"]) == (W // EXT) * (H // EXT)
    assert data["annotations"] and data["annotations"][0]["name"] == "Witness"
    assert site["summary"]["heads"]["saol"] == {"localisation_auroc": 0.9, "pointing_game": 1.0}
    index = (hm / "index.html").read_text(encoding="utf-8")
    rows = index_rows(hm / "index.html")
    assert {s: r["page"] for s, r in rows.items()} == {"slide-00": "slide-00.html", "field-00": "field-00.html"}
    assert rows["slide-00"]["saol"]["localisation_auroc"] == 0.9 and str(site["root"]) not in index
    assert '<script src="viewer_assets/index.js">' in index and (hm / "viewer_assets" / "index.js").is_file()


def test_index_table_of_scores(site, tmp_path):
    page = site["hm"] / "slide-00.html"
    one = {"heads": {"gap": {"auroc": 0.6, "witness_cells": 12}, "saol": {"auroc": 0.8, "witness_cells": 12}},
           "info": {"label": "positive"}}
    two = {"gap": {"auroc": None, "witness_cells": 0}, "saol": {"auroc": None, "witness_cells": 0}}  # bare form
    out = write_index(tmp_path / "sub" / "index.html", [("one", page, one), ("two", page, two)])
    data = embedded_index(out)
    assert [(data["heads"][c["head"]]["name"], data["metrics"][c["metric"]]["name"]) for c in data["columns"]] == [
        ("gap", "auroc"), ("saol", "auroc")]  # a column per head and metric
    rows = index_rows(out)
    assert rows["one"]["info"] == {"label": "positive", "witness cells": 12}  # the count is the sample's, once
    assert rows["two"]["info"] == {"label": None, "witness cells": 0}
    assert (rows["one"]["gap"], rows["one"]["saol"], rows["two"]["gap"]) == ({"auroc": 0.6}, {"auroc": 0.8}, {"auroc": None})
    assert rows["one"]["page"] == os.path.relpath(page, tmp_path / "sub") and (tmp_path / "sub" / "viewer_assets" / "index.js").is_file()
    assert one["heads"]["gap"] == {"auroc": 0.6, "witness_cells": 12}  # the caller's dicts are left alone


def test_script_data_cannot_break_out_of_its_script(site, tmp_path):
    hm = site["hm"]
    sample = "a</script><b>"
    j = write_heatmap(tmp_path, sample, "gap", W, H, (255, 0, 0), True, stem="odd")
    out = write_sample_page(tmp_path / "x.html", sample, hm / "slides" / "slide-00", [j])
    text = (tmp_path / "x.html").read_text(encoding="utf-8")
    assert text.count("</script>") == 2 and "<b>" not in text
    assert out["heads"] == {"gap": {"localisation_auroc": 0.7, "pointing_game": 1.0}}


def test_heads_are_shown_in_their_own_words_and_order(site, tmp_path):
    """Labels, descriptions and order come from each heatmap (its head's HeadInfo), for any head."""
    hm = site["hm"]
    mine = HeadInfo("mine", "My head", "a head only this test knows", order=5)
    jsons = [write_heatmap(tmp_path, "slide-00", h, W, H, (255, 0, 0), True) for h in ("saol", mine, "gap")]
    summary = write_sample_page(tmp_path / "s.html", "slide-00", hm / "slides" / "slide-00", jsons)
    text = (tmp_path / "s.html").read_text(encoding="utf-8")
    data = json.loads(text.split("window.GAPLESS_SAMPLE = ", 1)[1].split(";</script>", 1)[0])
    assert [(h["name"], h["label"]) for h in data["heads"]] == [("mine", "My head"), ("gap", "GAP"), ("saol", "SAOL")]
    assert data["heads"][0]["description"] == "a head only this test knows"
    # the summary carries them to the index, also through the JSON `gapless page` writes
    summary = json.loads(json.dumps(summary))
    assert summary["head_info"]["mine"] == {"label": "My head", "description": "a head only this test knows", "order": 5}
    out = write_index(tmp_path / "index.html", [("slide-00", tmp_path / "s.html", summary)])
    heads = embedded_index(out)["heads"]
    assert [h["label"] for h in heads] == ["My head", "GAP", "SAOL"]
    assert heads[0]["description"] == "a head only this test knows" and "<b>My head</b> (mine)" in out.read_text()


def _bad_inputs(tmp_path: Path, hm: Path):
    """(description, call) pairs that must each raise a GaplessError naming the problem."""
    pyr = hm / "slides" / "slide-00"
    good = write_heatmap(tmp_path / "good", "slide-00", "gap", W, H, (255, 0, 0), True)

    def heatmap(name, **overrides):
        return write_heatmap(tmp_path / name, "slide-00", "gap", W, H, (255, 0, 0), True, **overrides)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    no_overlay = heatmap("no_overlay")
    (no_overlay.parent / "slide-00.png").unlink()
    empty_pyr = tmp_path / "empty_pyr"
    empty_pyr.mkdir()
    other = write_heatmap(tmp_path / "other", "slide-01", "gap", W, H, (255, 0, 0), True)
    squashed = heatmap("squashed")
    Image.new("RGBA", (64, 10)).save(squashed.parent / "slide-00.png")
    page = tmp_path / "p.html"
    return [
        ("no such slide pyramid", lambda: write_sample_page(page, "slide-00", tmp_path / "nope", [good])),
        ("no slide.dzi", lambda: write_sample_page(page, "slide-00", empty_pyr, [good])),
        ("no heatmaps given", lambda: write_sample_page(page, "slide-00", pyr, [])),
        ("heatmap JSON not found", lambda: write_sample_page(page, "slide-00", pyr, [tmp_path / "none.json"])),
        ("not valid JSON", lambda: write_sample_page(page, "slide-00", pyr, [broken])),
        ("missing key", lambda: write_sample_page(page, "slide-00", pyr, [_drop(heatmap("nokey"), "tiles")])),
        ("overlay PNG", lambda: write_sample_page(page, "slide-00", pyr, [no_overlay])),
        ("not 'slide-00'", lambda: write_sample_page(page, "slide-00", pyr, [other])),
        ("given twice", lambda: write_sample_page(page, "slide-00", pyr, [good, good])),
        ("the pyramid in", lambda: write_sample_page(page, "slide-00", pyr, [_patch(heatmap("size"), width=W + 10)])),
        ("colormap", lambda: write_sample_page(page, "slide-00", pyr, [heatmap("cmap", colormap="no-such-map")])),
        ("`range`", lambda: write_sample_page(page, "slide-00", pyr, [heatmap("range", range=[1, 0])])),
        ("tiles\\[0\\]", lambda: write_sample_page(page, "slide-00", pyr, [heatmap("tiles", tiles=[[1, 2]])])),
        ("not the shape", lambda: write_sample_page(page, "slide-00", pyr, [squashed])),
        ("does not exist", lambda: write_index(tmp_path / "i.html", [("s", tmp_path / "none.html", {})])),
        ("listed twice", lambda: write_index(tmp_path / "i.html", [("s", hm / "slide-00.html", {}), ("s", hm / "slide-00.html", {})])),
    ]


def _drop(path: Path, key: str) -> Path:
    doc = json.loads(path.read_text(encoding="utf-8"))
    del doc[key]
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_bad_inputs_raise_clear_errors(site, tmp_path):
    for expected, call in _bad_inputs(tmp_path, site["hm"]):
        with pytest.raises(GaplessError, match=expected) as err:
            call()
        assert err.value.fix, expected  # every error says how to fix it
    assert not (tmp_path / "p.html").exists()


def test_heatmap_json_nan_probabilities_are_missing_values(tmp_path):
    path = write_heatmap(tmp_path, "s", "gap", W, H, (255, 0, 0), True, tiles=[[0, 0, float("nan")], [128, 0, 0.5]],
                         scores={"pointing_game": float("nan")})
    doc = load_heatmap_json(path)
    assert doc["tiles"] == [[0, 0, None], [128, 0, 0.5]] and doc["scores"] == {"pointing_game": None}


# ---------------------------------------------------------------------------------------------
# in Chromium


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A Playwright page that records console errors and uncaught exceptions."""

    def __init__(self, browser, viewport=(760, 560)):
        self.page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))

    def open(self, path: Path, fragment: str = ""):
        self.page.goto(path.resolve().as_uri() + fragment)
        return self

    def settle(self):
        self.page.wait_for_function("window.gaplessViewer && window.gaplessViewer.idle()", timeout=15000)

    def pane(self, i: int = 0) -> np.ndarray:
        """The pane as drawn: a screenshot, RGB."""
        self.settle()
        png = self.page.locator(f"#pane-{i}").screenshot()
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def at(self, i: int, x: float, y: float) -> tuple[int, int]:
        """Pane-screenshot pixel (col, row) of level-0 point (x, y)."""
        c = self.page.evaluate(f"gaplessViewer.toClient({i}, {x}, {y})")
        box = self.page.locator(f"#pane-{i}").bounding_box()
        return int(c["x"] - box["x"]), int(c["y"] - box["y"])

    def close(self):
        self.page.close()


def test_sample_page_in_chromium(site, browser):
    p = Page(browser).open(site["hm"] / "slide-00.html")
    page = p.page
    p.settle()
    stats = page.evaluate("gaplessViewer.stats()")
    assert stats["loaded"] > 0 and stats["failed"] == 0
    # the whole slide fits: tiles of a coarser level than full resolution, none of the finest
    assert stats["level"] < stats["maxLevel"] and str(stats["maxLevel"]) not in stats["levels"]

    # opacity 0: the slide itself, drawn where it belongs (compare with OpenSlide's pixels)
    page.locator("#opacity").fill("0")
    bare = p.pane()
    (x0, y0), (x1, y1) = p.at(0, 0, 0), p.at(0, W, H)
    drawn = bare[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
    assert drawn.std() > 10  # tissue, not a blank canvas
    with openslide.OpenSlide(str(site["slide"])) as osr:
        ref = osr.read_region((0, 0), 0, (W, H)).convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    ref = np.asarray(ref).astype(int)[2:-2, 2:-2]
    assert np.abs(drawn - ref).mean() < 12, "the slide is not drawn where it should be"

    # opacity 1: GAP's overlay (opaque red over the left half) covers the left half only
    page.locator("#opacity").fill("100")
    assert page.locator("#opacity-value").inner_text() == "100%"
    gap = p.pane()
    assert np.abs(gap - bare).mean() > 5
    lx, ly = p.at(0, W * 0.25, H * 0.5)
    rx, ry = p.at(0, W * 0.75, H * 0.5)
    assert tuple(gap[ly, lx]) == (255, 0, 0)
    assert tuple(gap[ry, rx]) == tuple(bare[ry, rx])

    # switching heads: SAOL's overlay (opaque blue over the right half) replaces it
    page.get_by_role("button", name="SAOL").click()
    assert page.get_by_role("button", name="SAOL").get_attribute("aria-pressed") == "true"
    saol = p.pane()
    assert np.abs(saol - gap).mean() > 5
    assert tuple(saol[ry, rx]) == (0, 0, 255)
    assert tuple(saol[ly, lx]) == tuple(bare[ly, lx])
    assert page.locator("#pane-0").get_attribute("data-head") == "saol"
    assert "SAOL" in page.locator("#legend").inner_text()

    # a click on a tile shows its probability for the current head, and every head's in the table
    tx, ty = 3 * EXT + 40, 2 * EXT + 70
    c = page.evaluate(f"gaplessViewer.toClient(0, {tx}, {ty})")
    page.mouse.click(c["x"], c["y"])
    info = page.locator("#tile-info").inner_text()
    expected = tile_p("saol", 3 * EXT, 2 * EXT)
    assert page.locator("#tile-probability").inner_text().startswith("SAOL: P(positive) = ")
    assert f"{expected:.3f}" in page.locator("#tile-probability").inner_text()
    assert f"{tile_p('gap', 3 * EXT, 2 * EXT):.3f}" in info
    assert f"{expected:.3f}" in page.locator("#pane-0 .pane-pop").inner_text()

    # zooming in loads full-resolution tiles, only the visible ones
    page.locator("#zoom-in").click()
    page.locator("#zoom-in").click()
    p.settle()
    stats = page.evaluate("gaplessViewer.stats()")
    top = str(stats["maxLevel"])
    assert stats["level"] == stats["maxLevel"] and stats["failed"] == 0
    assert 0 < stats["levels"][top] < 5 * 4  # the full level has 5 × 4 tiles
    assert not p.errors, p.errors
    p.close()


def test_side_by_side_views_stay_in_sync(site, browser):
    p = Page(browser, viewport=(1100, 600)).open(site["hm"] / "slide-00.html", "#head=saol")
    page = p.page
    p.settle()
    assert page.locator("#pane-0").get_attribute("data-head") == "saol"
    page.locator("#layout").select_option("pair")
    p.settle()
    assert page.evaluate("gaplessViewer.panes().map(p => p.head)") == ["saol", "gap"]
    page.locator("#opacity").fill("100")
    left, right = p.pane(0), p.pane(1)
    # the same place in both views: SAOL blue on the right half, GAP red on the left half
    assert tuple(left[p.at(0, W * 0.75, H / 2)[::-1]]) == (0, 0, 255)
    assert tuple(right[p.at(1, W * 0.25, H / 2)[::-1]]) == (255, 0, 0)
    # zoom with the wheel in one view; both show the same region
    box = page.locator("#pane-1").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.wheel(0, -400)
    p.settle()
    a0, a1 = p.at(0, 300, 300), p.at(1, 300, 300)
    assert a0 == a1
    # drag in the other view: both follow
    box = page.locator("#pane-0").bounding_box()
    page.mouse.move(box["x"] + 200, box["y"] + 300)
    page.mouse.down()
    page.mouse.move(box["x"] + 260, box["y"] + 280, steps=4)
    page.mouse.up()
    p.settle()
    b0, b1 = p.at(0, 300, 300), p.at(1, 300, 300)
    assert b0 == b1 and (b0[0] - a0[0], b0[1] - a0[1]) == (60, -20)
    page.locator("#layout").select_option("all")
    p.settle()
    assert page.evaluate("gaplessViewer.panes().map(p => p.head)") == ["gap", "saol"]
    # the per-view head menu switches that view only
    page.locator("#pane-1 select").select_option(label="GAP")
    assert page.evaluate("gaplessViewer.panes().map(p => p.head)") == ["gap", "gap"]
    assert not p.errors, p.errors
    p.close()


def test_index_links_every_sample(site, browser):
    p = Page(browser).open(site["hm"] / "index.html")
    page = p.page
    page.wait_for_function("window.gaplessIndex && gaplessIndex.ready")
    assert page.title() == "gapless heatmaps"
    assert page.locator("table.index-table tbody tr").count() == 2
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    thumbs = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert thumbs == [True, True]
    page.get_by_role("link", name="field-00").click()
    p.settle()
    assert page.url.endswith("/field-00.html")
    stats = page.evaluate("gaplessViewer.stats()")
    assert stats["loaded"] > 0 and stats["failed"] == 0
    assert p.pane().std() > 10
    page.get_by_role("link", name="all samples").click()
    page.wait_for_load_state()
    assert page.url.endswith("/index.html")
    assert not p.errors, p.errors
    p.close()


def test_moved_folder_still_works(site, browser, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(site["hm"], moved)
    p = Page(browser).open(moved / "slide-00.html")
    p.settle()
    assert p.page.evaluate("gaplessViewer.stats()")["failed"] == 0
    assert not p.errors, p.errors
    p.close()


def embedded_index(path: Path) -> dict:
    """The index's embedded table data (index.py writes it, index.js reads it)."""
    text = path.read_text(encoding="utf-8")
    return json.loads(text.split('<script type="application/json" id="gapless-index">', 1)[1].split("</script>", 1)[0])


def index_rows(path: Path) -> dict[str, dict]:
    """The index's rows decoded as index.js decodes them: ``{sample: {"page": url or None, "info": {key: value},
    head: {metric: value}}}``."""
    data = embedded_index(path)
    pages = {row: url for row, url, _ in data["pages"]}
    rows = {}
    for r, sample in enumerate(data["samples"]):
        info = {}
        for c in data["info"]:
            info[c["key"]] = c["numbers"][r] if "numbers" in c else (c["values"][c["codes"][r]] if c["codes"][r] >= 0 else None)
        row = {"page": pages.get(r), "info": info}
        for c in data["columns"]:
            v = c["values"][r]
            row.setdefault(data["heads"][c["head"]]["name"], {})[data["metrics"][c["metric"]]["name"]] = (
                None if v is None else v / c["scale"] if c["scale"] != 1 else v)
        rows[sample] = row
    return rows


def _patch(path: Path, **values) -> Path:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(values)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# a static export capped at a µm/px, and `gapless view` serving full resolution from the slide

CAP = 1.0  # µm/px of the capped export; the demo slide is 0.5 µm/px, so one level is left out


@pytest.fixture(scope="module")
def capped(site):
    """The demo slide's page over a pyramid capped at 1 µm/px (the default), the heads as in ``site``."""
    hm = site["root"] / "capped"
    pyr = write_slide_pyramid(site["slide"], hm / "slides" / "slide-00", progress=False)
    jsons = [write_heatmap(hm, "slide-00", h, W, H, c, left=(h == "gap")) for h, c in HEADS.items()]
    write_sample_page(hm / "slide-00.html", "slide-00", pyr, jsons)
    (site["root"] / "secret.txt").write_text("outside the served folder")
    return hm


@pytest.fixture(scope="module")
def served(capped, tmp_path_factory):
    """`gapless view` on the capped folder, started as a user starts it; yields its printed URL."""
    log = tmp_path_factory.mktemp("view") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "view", str(capped), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            line = lines.get(timeout=90)
        except queue.Empty:
            pytest.fail(f"gapless view printed no URL in 90 s: {log.read_text()}")
        match = re.search(r"http://\S+", line)
        assert match, line
        yield match.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _request(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no normalisation of ``..``, unlike a browser or urllib)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _tile_diff(data: bytes, dz: DeepZoomGenerator, level: int, col: int, row: int) -> float:
    ours = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
    ref = np.asarray(dz.get_tile(level, (col, row)).convert("RGB"), dtype=float)
    assert ours.shape == ref.shape, (level, col, row)
    return float(np.abs(ours - ref).mean())


def test_capped_export_has_fewer_files_and_stops_at_the_cap(site, capped):
    full, cap = site["hm"] / "slides" / "slide-00", capped / "slides" / "slide-00"
    (full_files, full_bytes), (cap_files, cap_bytes) = disk_usage(full), disk_usage(cap)
    assert cap_files < full_files and cap_bytes < full_bytes
    assert full_files - cap_files == 5 * 4  # the full-resolution level's 5 × 4 tiles, and nothing else
    info = read_pyramid(cap)
    assert (info["width"], info["height"]) == (W, H)  # the descriptor still describes the whole slide
    assert info["max_level"] == info["levels"] - 2 and level_mpp(info, info["max_level"]) == pytest.approx(CAP)
    assert info["max_mpp"] == CAP and info["source"] == str(site["slide"].resolve())
    assert not (info["files"] / str(info["levels"] - 1)).exists()
    with openslide.OpenSlide(str(site["slide"])) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        for level in range(info["max_level"] + 1):  # the levels written are OpenSlide's
            cols, rows = dz.level_tiles[level]
            assert sorted(p.name for p in (info["files"] / str(level)).iterdir()) == sorted(
                f"{c}_{r}.jpeg" for c in range(cols) for r in range(rows))
        assert _tile_diff((info["files"] / str(info["max_level"]) / "1_1.jpeg").read_bytes(), dz, info["max_level"], 1, 1) < 4


def test_pyramid_command_prints_counts_and_takes_the_tiles_mpp(site, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.tiling import TileSettings, tile_source

    assert main(["-q", "pyramid", str(site["slide"]), "--out", str(tmp_path / "full"), "--max-mpp", "full"]) == 0
    full_line = capsys.readouterr().out
    files, size = disk_usage(tmp_path / "full")
    assert f"{files} files, {size:,} bytes" in full_line and "every level" in full_line
    assert main(["-q", "pyramid", str(site["slide"]), "--out", str(tmp_path / "cap")]) == 0  # default: 1 µm/px
    line = capsys.readouterr().out
    files, size = disk_usage(tmp_path / "cap")
    assert f"{files} files, {size:,} bytes" in line and "finest 1 µm/px" in line
    # with the sample's tile store, the tiles' µm/px is the cap
    tile_source(site["slide"], tmp_path / "s.zarr", TileSettings(mpp=2.0, tile_size=64, stride=64), progress=False)
    assert main(["-q", "pyramid", str(site["slide"]), "--out", str(tmp_path / "store"), "--store", str(tmp_path / "s.zarr")]) == 0
    info = read_pyramid(tmp_path / "store")
    assert level_mpp(info, info["max_level"]) == pytest.approx(2.0) and "finest 2 µm/px" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["-q", "pyramid", str(site["slide"]), "--out", str(tmp_path / "bad"), "--max-mpp", "-1"])


def test_capped_static_page_in_chromium(site, capped, browser):
    """Opened from disk, the capped page shows the slide, zooms to its finest level (magnified past it) and
    keeps the overlay on the slide; it never asks for the levels it lacks."""
    info = read_pyramid(capped / "slides" / "slide-00")
    p = Page(browser).open(capped / "slide-00.html")
    page = p.page
    p.settle()
    stats = page.evaluate("gaplessViewer.stats()")
    assert not stats["served"] and stats["written"] == stats["finest"] == info["max_level"]
    page.locator("#opacity").fill("0")
    bare = p.pane()
    (x0, y0), (x1, y1) = p.at(0, 0, 0), p.at(0, W, H)
    with openslide.OpenSlide(str(site["slide"])) as osr:
        ref = osr.read_region((0, 0), 0, (W, H)).convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    assert np.abs(bare[y0 + 2:y1 - 2, x0 + 2:x1 - 2] - np.asarray(ref).astype(int)[2:-2, 2:-2]).mean() < 12
    for _ in range(3):
        page.locator("#zoom-in").click()
    p.settle()
    stats = page.evaluate("gaplessViewer.stats()")
    assert stats["level"] == info["max_level"] < stats["maxLevel"] and stats["failed"] == 0
    assert str(stats["maxLevel"]) not in stats["levels"]
    bare = p.pane()
    page.locator("#opacity").fill("100")
    gap = p.pane()
    left, right = p.at(0, W / 2 - 12, H / 2), p.at(0, W / 2 + 12, H / 2)
    assert tuple(gap[left[1], left[0]]) == (255, 0, 0)  # the overlay's edge is where the slide's middle is
    assert tuple(gap[right[1], right[0]]) == tuple(bare[right[1], right[0]])
    assert not p.errors, p.errors
    p.close()


def test_served_page_cuts_full_resolution_from_the_slide(site, capped, served, browser):
    """Served, the same page asks for the level the export left out; the server cuts it from the slide."""
    info = read_pyramid(capped / "slides" / "slide-00")
    top = info["levels"] - 1
    p = Page(browser)
    page = p.page
    responses = []
    page.on("response", lambda r: responses.append(r))
    page.goto(served.rsplit("/", 1)[0] + "/slide-00.html")
    p.settle()
    stats = page.evaluate("gaplessViewer.stats()")
    assert stats["served"] and stats["finest"] == top and stats["written"] == info["max_level"]
    page.locator("#opacity").fill("0")
    for _ in range(3):
        page.locator("#zoom-in").click()
    p.settle()
    stats = page.evaluate("gaplessViewer.stats()")
    assert stats["level"] == top and stats["failed"] == 0 and stats["levels"][str(top)] > 0
    full = [r for r in responses if f"/slide_files/{top}/" in r.url]
    assert full and all(r.status == 200 and r.headers["content-type"] == "image/jpeg" for r in full)
    assert not (info["files"] / str(top)).exists()  # nothing was written to disk
    with openslide.OpenSlide(str(site["slide"])) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        for r in full:
            col, row = map(int, r.url.rsplit("/", 1)[1].split(".")[0].split("_"))
            assert _tile_diff(r.body(), dz, top, col, row) < 4, r.url
    bare = p.pane()
    page.locator("#opacity").fill("100")
    gap = p.pane()
    left, right = p.at(0, W / 2 - 12, H / 2), p.at(0, W / 2 + 12, H / 2)
    assert tuple(gap[left[1], left[0]]) == (255, 0, 0)
    assert tuple(gap[right[1], right[0]]) == tuple(bare[right[1], right[0]])
    assert not p.errors, (p.errors, [(r.url, r.status) for r in responses if r.status != 200])
    p.close()


def test_server_refuses_anything_outside_its_root(site, capped, served):
    assert _request(served, "/slide-00.html")[0] == 200
    status, body = _request(served, "/slides/slide-00/pyramid.json")
    assert status == 200 and json.loads(body)["max_level"] == read_pyramid(capped / "slides" / "slide-00")["max_level"]
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/slides/..%2f..%2f..%2fsecret.txt", "/slides/../../secret.txt",
                 "/gap/..\\..\\secret.txt", "/.%2e/secret.txt", "/slide-00.html%00", "/%ff"):
        status, body = _request(served, path)
        assert status == 403 and b"outside" in body, (path, status, body)
    link = capped / "link.txt"
    link.symlink_to(site["root"] / "secret.txt")  # a link inside the root to a file outside it
    try:
        assert _request(served, "/link.txt")[0] == 403
    finally:
        link.unlink()
    # a page of another site that resolves a name to 127.0.0.1 (DNS rebinding) is refused by its Host
    assert _request(served, "/slide-00.html", {"Host": "attacker.example"})[0] == 403
    assert _request(served, "/slides/slide-00/slide_files/99/0_0.jpeg")[0] == 404  # no such level


def test_server_listens_on_loopback_only(served):
    parts = urlsplit(served)
    assert parts.hostname == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):  # another loopback address: bound to 127.0.0.1, not to all
        socket.create_connection(("127.0.0.2", parts.port), timeout=5).close()
    tcp = Path("/proc/net/tcp")
    if tcp.is_file():  # the kernel's view: the one listening socket on this port is 127.0.0.1's
        listening = [line.split()[1] for line in tcp.read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == parts.port]
        assert listening == [f"0100007F:{parts.port:04X}"]


def test_served_page_without_its_slide_shows_the_levels_on_disk(capped, browser, tmp_path):
    """A pyramid whose slide is gone (moved, another machine): the server says so once and answers 404 for
    the finer tiles; the page goes back to the levels on disk instead of failing on every tile."""
    from pipeline.viewer import start_server

    moved = tmp_path / "moved"
    shutil.copytree(capped, moved)
    meta_path = moved / "slides" / "slide-00" / "pyramid.json"
    meta = json.loads(meta_path.read_text())
    meta["source"] = str(tmp_path / "gone.tiff")
    meta_path.write_text(json.dumps(meta))
    server, url = start_server(moved / "slide-00.html")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        p = Page(browser)
        p.page.goto(url)
        p.settle()
        for _ in range(3):
            p.page.locator("#zoom-in").click()
        p.settle()
        stats = p.page.evaluate("gaplessViewer.stats()")
        assert stats["served"] and stats["finest"] == stats["written"] == stats["level"] == meta["max_level"]
        assert stats["failed"] >= 1 and stats["levels"][str(meta["max_level"])] > 0
        assert p.pane().std() > 10  # the slide, magnified from the finest level on disk
        assert any("showing the pyramid's levels" in e for e in p.errors), p.errors
        p.close()
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# the index over the heatmap manifests: every mapped sample, pages for some


def write_manifest(path: Path, head: str, samples: dict[str, dict], indent: int | None = 1) -> Path:
    """A heatmap manifest as `gapless heatmap --samples ... --manifest` writes it (pipeline.heatmap.run);
    ``indent=None``: compact, written 10× faster (json's C encoder), read alike."""
    from pipeline.heatmap.run import MANIFEST_SCHEMA

    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": MANIFEST_SCHEMA, "head": head, "run_id": f"run-{head}", "model": f"models/slide/{head}/seed0",
           "normalisation": "rank", "samples": samples}
    path.write_text(json.dumps(doc, indent=indent), encoding="utf-8")
    return path


def manifest_entry(folder: Path, head: str, sample: str, p_max: float | None, auroc: float | None = None,
                   witnesses: int = 0, tiles: int = 12, pointing: bool = False) -> dict:
    """One sample's entry; ``pointing`` adds the pointing-game scores, as a real manifest has them."""
    scores = {"localisation_auroc": auroc, "witness_cells": witnesses, "tissue_cells": 40}
    if pointing:
        scores |= {"pointing_game_top1": None if auroc is None else float(auroc > 0.5),
                   "pointing_game_top5": None if auroc is None else round(auroc * 5) / 5}
    return {"json": str(folder / head / f"{sample}.json"), "png": str(folder / head / f"{sample}.png"), "tiles": tiles,
            "p_mean": None if p_max is None else p_max / 2, "p_max": p_max, "scores": scores}


def write_sheet(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.write_text("sample_id,path,label,group,kind\n" + "".join(
        f"{s},slides/{s}.tiff,{label},{group},{kind}\n" for s, label, group, kind in rows), encoding="utf-8")
    return path


@pytest.fixture
def cohort(site, tmp_path):
    """Manifests of gap, saol and cbam over slide-00 (the site's page) and slide-01, slide-02 (no page);
    cbam is on no page, so its words come from its heatmap JSON. The sheet leaves slide-02's kind blank."""
    from pipeline.viewer.index_rows import sheet_info

    folder = tmp_path / "maps"
    write_heatmap(folder, "slide-01", "cbam", W, H, (0, 255, 0), True)
    values = {"gap": (0.91, 0.55), "saol": (0.42, 0.8), "cbam": (0.6, 0.7)}
    manifests = []
    for head, (p, auroc) in values.items():
        samples = {s: manifest_entry(folder, head, s, p - k / 10, auroc if s != "slide-01" else None,
                                     witnesses=0 if s == "slide-01" else 5, tiles=20 + k)
                   for k, s in enumerate(["slide-00", "slide-01", "slide-02"]) if head != "cbam" or s != "slide-00"}
        manifests.append(write_manifest(tmp_path / "manifests" / head / "seed0" / "slide.json", head, samples))
    sheet = write_sheet(tmp_path / "samples.csv", [("slide-00", "positive", "patient-0", "slide"),
                                                  ("slide-01", "negative", "patient-1", "slide"),
                                                  ("slide-02", "positive", "patient-1", "")])
    return {"manifests": manifests, "sheet": sheet, "info": sheet_info([sheet]), "tmp": tmp_path}


def test_manifest_schema_is_the_heatmap_writers():
    from pipeline.heatmap import run
    from pipeline.viewer import index_rows

    assert index_rows.MANIFEST_SCHEMA == run.MANIFEST_SCHEMA


def test_index_lists_every_mapped_sample_and_links_only_pages(site, cohort):
    hm, tmp = site["hm"], cohort["tmp"]
    out = write_index(tmp / "index.html", [("slide-00", hm / "slide-00.html", site["summary"])],
                      manifests=cohort["manifests"], sample_info=cohort["info"], pages_note="the test split of seed 0")
    rows = index_rows(out)
    assert list(rows) == ["slide-00", "slide-01", "slide-02"]  # the manifests' samples, in their order
    assert {s: r["page"] for s, r in rows.items()} == {"slide-00": os.path.relpath(hm / "slide-00.html", tmp),
                                                       "slide-01": None, "slide-02": None}
    assert rows["slide-00"]["info"] == {"label": "positive", "group": "patient-0", "kind": "slide", "tiles": 20,
                                        "tissue cells": 40, "witness cells": 5}
    assert rows["slide-02"]["info"]["kind"] is None and rows["slide-01"]["info"]["witness cells"] == 0
    # each head's probability and scores; the manifest's, not the page's (0.7 for gap on the page)
    assert rows["slide-00"]["gap"] == {"p_max": 0.91, "p_mean": 0.455, "localisation_auroc": 0.55}
    assert rows["slide-02"]["saol"] == {"p_max": 0.22, "p_mean": 0.11, "localisation_auroc": 0.8}
    assert rows["slide-00"]["cbam"] == {"p_max": None, "p_mean": None, "localisation_auroc": None}  # not in cbam's manifest
    # heads in their words and order: gap and saol from the page's summary, cbam from its heatmap JSON
    data = embedded_index(out)
    assert [(h["name"], h["label"]) for h in data["heads"]] == [("gap", "GAP"), ("cbam", "CBAM"), ("saol", "SAOL")]
    assert data["heads"][1]["description"] == registered_heads()["cbam"].description
    text = out.read_text(encoding="utf-8")
    assert "Pages were made for the test split of seed 0: 1 of 3 samples have a page" in text
    assert "3 samples, 1 with a page" in text


def test_index_command_finds_current_pages_in_their_folder(site, cohort, capsys):
    """`gapless index --manifest ... --pages DIR`: a summary older than the manifests is a page of older
    heatmaps and is not linked; the old form (summaries by name) still works."""
    from pipeline.cli import main

    hm, tmp = site["hm"], cohort["tmp"]
    pages = tmp / "pages"
    pages.mkdir()
    for sample, page in (("slide-00", "slide-00.html"), ("slide-01", "field-00.html")):
        summary = {"sample": sample, "page": str(hm / page), **site["summary"]}
        (pages / f"{sample}.json").write_text(json.dumps(summary), encoding="utf-8")
    stamp = cohort["manifests"][0].stat().st_mtime
    os.utime(pages / "slide-01.json", (stamp - 60, stamp - 60))  # made before the heatmaps were
    (pages / "slide-99.json").write_text("{not json", encoding="utf-8")  # no manifest lists it: never read
    args = ["-q", "index", "--pages", str(pages), "--samples", str(cohort["sheet"]), "--out", str(tmp / "i.html"),
            "--pages-note", "every mapped sample"] + [a for m in cohort["manifests"] for a in ("--manifest", str(m))]
    assert main(args) == 0
    assert "index: 3 samples (1 with a page), 3 heads -> " in capsys.readouterr().out
    rows = index_rows(tmp / "i.html")
    assert [s for s, r in rows.items() if r["page"]] == ["slide-00"] and rows["slide-02"]["info"]["label"] == "positive"
    # the old form: page summaries by name, no manifest
    assert main(["-q", "index", str(pages / "slide-00.json"), "--out", str(tmp / "old.html")]) == 0
    assert list(index_rows(tmp / "old.html")) == ["slide-00"]
    assert main(["-q", "index", "--out", str(tmp / "none.html")]) == 2
    assert "nothing to index" in capsys.readouterr().err


def test_index_refuses_bad_manifests(site, cohort):
    tmp = cohort["tmp"]
    wrong = tmp / "wrong.json"
    wrong.write_text(json.dumps({"schema": "gapless.heatmap/1", "head": "gap"}), encoding="utf-8")
    for expected, manifests in (("not a heatmap manifest", [wrong]), ("heatmap manifest not found", [tmp / "none.json"]),
                                ("in two of the manifests", [cohort["manifests"][0]] * 2)):
        with pytest.raises(GaplessError, match=expected) as err:
            write_index(tmp / "i.html", manifests=manifests)
        assert err.value.fix
    assert not (tmp / "i.html").exists()


def synthetic_cohort(folder: Path, n: int, heads: tuple[str, ...], paged: dict[int, Path] | None = None,
                     missing_every: int = 0) -> dict:
    """``n`` samples mapped by ``heads``: one manifest per head (p_max from a fixed permutation, so the
    order is known; every ``missing_every``-th sample has no p_max for the last head), a sheet (label
    alternating, 20 groups) and page summaries for the rows in ``paged``."""
    import random

    ids = [f"s-{i:06d}" for i in range(n)]
    rnd = random.Random(7)
    order = list(range(n))
    rnd.shuffle(order)
    manifests = []
    for k, head in enumerate(heads):
        write_heatmap(folder, ids[0], head, 256, 256, (255, 0, 0), True)  # the head's words, for the index
        p = {s: order[(i + 37 * k) % n] / n for i, s in enumerate(ids)}
        entries = {}
        for i, s in enumerate(ids):
            gone = missing_every and k == len(heads) - 1 and i % missing_every == 0
            entries[s] = manifest_entry(folder, head, s, None if gone else p[s], p[s] if i % 2 else None,
                                        witnesses=i % 7 if i % 2 else 0, tiles=100 + i % 500, pointing=True)
        manifests.append(write_manifest(folder / "manifests" / head / "seed0" / "cohort.json", head, entries,
                                        indent=1 if n < 10_000 else None))
    sheet = write_sheet(folder / "samples.csv", [(s, "positive" if i % 2 else "negative", f"group-{i % 20:02d}", "slide")
                                                 for i, s in enumerate(ids)])
    pages = []
    for row, page in (paged or {}).items():
        pages.append((ids[row], page, {"heads": {}, "info": {}, "thumbnail": None}))
    return {"ids": ids, "manifests": manifests, "sheet": sheet, "pages": pages}


def test_index_search_sort_and_paging_in_chromium(site, browser, tmp_path):
    from pipeline.viewer.index_rows import sheet_info

    n = 320
    c = synthetic_cohort(tmp_path, n, ("gap", "saol", "cbam"), paged={3: site["hm"] / "slide-00.html",
                                                                      250: site["hm"] / "field-00.html"},
                         missing_every=10)
    out = write_index(tmp_path / "index.html", c["pages"], manifests=c["manifests"], sample_info=sheet_info([c["sheet"]]))
    ids = c["ids"]
    p = Page(browser, viewport=(1300, 800)).open(out)
    page = p.page
    page.wait_for_function("window.gaplessIndex && gaplessIndex.ready")
    status = page.locator("#index-status")

    def rows() -> list[str]:
        return page.evaluate("gaplessIndex.rows()")

    assert status.inner_text() == "rows 1–100 of 320, page 1 of 4"
    assert rows() == ids[:100] and page.locator("#index-table tbody tr").count() == 100
    assert page.locator("#index-prev").is_disabled()
    # paging
    for _ in range(3):
        page.locator("#index-next").click()
    assert status.inner_text() == "rows 301–320 of 320, page 4 of 4" and rows() == ids[300:]
    assert page.locator("#index-next").is_disabled()
    page.locator("#index-prev").click()
    assert rows() == ids[200:300]
    # search: substrings of id, group or label, any case; every word must match
    search = page.locator("#index-search")
    search.fill("GROUP-07")
    page.wait_for_function("gaplessIndex.state().q === 'GROUP-07'")
    assert rows() == [s for i, s in enumerate(ids) if i % 20 == 7] and "16 found (of 320)" in status.inner_text()
    search.fill("group-07 negative")
    page.wait_for_function("gaplessIndex.state().q === 'group-07 negative'")
    assert rows() == []  # group 7 holds odd rows only: all positive
    assert status.inner_text() == "no sample found (of 320)"
    search.fill("s-00025")
    page.wait_for_function("gaplessIndex.state().q === 's-00025'")
    assert rows() == [f"s-{i:06d}" for i in range(250, 260)]
    # the link where a page exists, plain text where not
    assert page.locator("#index-table tbody a").count() == 1
    assert page.get_by_role("link", name="s-000250").get_attribute("href") == os.path.relpath(site["hm"] / "field-00.html", tmp_path)
    search.fill("")
    page.wait_for_function("gaplessIndex.state().q === ''")
    # sort by a score: highest first, again for lowest first; missing values last both ways
    page.locator("#index-metric").select_option("p_max")
    assert page.locator("#index-table thead tr").nth(1).locator("th").count() == 3
    data = index_rows(out)
    cbam = {s: r["cbam"]["p_max"] for s, r in data.items()}
    present = sorted((s for s in ids if cbam[s] is not None), key=lambda s: cbam[s])
    missing = [s for s in ids if cbam[s] is None]
    column = next(i for i, col in enumerate(embedded_index(out)["columns"]) if col["head"] == 1 and col["metric"] == 0)
    assert [h.inner_text() for h in page.locator("#index-table th.head-col").all()] == ["GAP", "CBAM", "SAOL"]
    page.locator(f"#index-table button[data-sort='score:{column}']").click()  # CBAM's p max
    assert page.evaluate("gaplessIndex.state()")["desc"]
    walked = rows()
    for _ in range(3):
        page.locator("#index-next").click()
        walked += rows()
    assert walked == present[::-1] + missing and len(missing) == n // 10
    page.locator(f"#index-table button[data-sort='score:{column}']").click()  # again: lowest first
    assert rows()[:5] == present[:5]
    assert page.locator("#index-table thead th[aria-sort]").get_attribute("aria-sort") == "ascending"
    # bold: the best head of a row
    first = page.locator("#index-table tbody tr").first
    best = first.locator("td.best")
    values = {h: data[rows()[0]][h]["p_max"] for h in ("gap", "saol", "cbam")}
    assert best.count() == 1 and best.inner_text() == f"{max(v for v in values.values() if v is not None):.3f}"
    # a sort by text: the group, then the page filter
    page.locator("#index-table button.sort", has_text="group").click()
    assert [s for s in rows()[:16]] == [s for i, s in enumerate(ids) if i % 20 == 0]
    page.locator("#index-paged").check()
    assert sorted(rows()) == ["s-000003", "s-000250"]
    page.locator("#index-paged").uncheck()
    # the state is in the URL: a page's link and back again keep it
    search.fill("group-1")
    page.wait_for_function("gaplessIndex.state().q === 'group-1'")
    page.locator("#index-next").click()
    kept = (status.inner_text(), rows())
    assert "q=group-1" in page.url
    page.reload()
    page.wait_for_function("window.gaplessIndex && gaplessIndex.ready")
    assert (status.inner_text(), rows()) == kept and search.input_value() == "group-1"
    search.fill("s-000003")
    page.wait_for_function("gaplessIndex.state().q === 's-000003'")
    page.get_by_role("link", name="s-000003").click()
    page.wait_for_url("**/slide-00.html")
    p.settle()  # the slide's tiles loaded: none is cut off by going back
    page.go_back()
    page.wait_for_function("window.gaplessIndex && gaplessIndex.ready")
    assert rows() == ["s-000003"] and search.input_value() == "s-000003"
    assert not p.errors, p.errors
    p.close()


@pytest.mark.slow
def test_index_of_100000_samples_stays_fast(browser, tmp_path):
    """10⁵ samples × 5 heads: the index is written in seconds, and in Chromium it shows its first page,
    finds and sorts in well under a second each (figures printed; run with -s to see them)."""
    import time

    from pipeline.viewer.index_rows import sheet_info

    n, heads = 100_000, ("gap", "cbam", "attnpool", "saol", "max")
    c = synthetic_cohort(tmp_path, n, heads)
    t0 = time.perf_counter()
    out = write_index(tmp_path / "index.html", manifests=c["manifests"], sample_info=sheet_info([c["sheet"]]))
    written = time.perf_counter() - t0
    size = out.stat().st_size
    p = Page(browser, viewport=(1300, 800))
    t0 = time.perf_counter()
    p.open(out)
    p.page.wait_for_function("window.gaplessIndex && gaplessIndex.ready", timeout=60_000)
    shown = time.perf_counter() - t0
    timings = p.page.evaluate("gaplessIndex.timings")
    search_ms = p.page.evaluate("gaplessIndex.search('group-07 positive')")
    found = p.page.evaluate("gaplessIndex.found()")
    sort_ms = p.page.evaluate("gaplessIndex.sortBy('score:0', true)")
    again_ms = p.page.evaluate("gaplessIndex.search('s-0999')")
    print(f"\nindex of {n:,} samples × {len(heads)} heads: {size / 1e6:.1f} MB written in {written:.1f} s; Chromium: "
          f"first page {shown:.2f} s after opening ({timings['firstRender']:.0f} ms after navigation: the script started at "
          f"{timings['start']:.0f} ms, decoded the data in {timings['parse']:.0f} ms); search {search_ms:.0f} ms ({found:,} found), sort {sort_ms:.0f} ms, "
          f"search in the sorted rows {again_ms:.0f} ms")
    assert found == n // 20 and p.page.evaluate("gaplessIndex.found()") == 100
    assert p.page.locator("#index-table tbody tr").count() == 100
    assert shown < 10 and search_ms < 2000 and sort_ms < 2000
    assert not p.errors, p.errors
    p.close()
