"""The static HTML viewer: the Deep Zoom pyramid, the pages, their inputs, and the pages in Chromium.

A tiny demo slide and fluorescence field are made once; two fake heads ("gap": red over the left half,
"saol": blue over the right half) are written as pipeline.heatmap writes them. The browser checks run
Debian's Chromium headless through Playwright on the pages opened straight from disk (file://); pixels
are read from screenshots, which file:// canvas tainting does not affect.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

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
    write_slide_pyramid(slide, hm / "slides" / "slide-00", progress=False)
    write_slide_pyramid(field, hm / "slides" / "field-00", progress=False, workers=2)
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
    assert 'href="slide-00.html"' in index and 'href="field-00.html"' in index
    assert "0.900" in index and str(site["root"]) not in index


def test_index_table_of_scores(site, tmp_path):
    page = site["hm"] / "slide-00.html"
    one = {"heads": {"gap": {"auroc": 0.6, "witness_cells": 12}, "saol": {"auroc": 0.8, "witness_cells": 12}},
           "info": {"label": "positive"}}
    two = {"gap": {"auroc": None, "witness_cells": 0}, "saol": {"auroc": None, "witness_cells": 0}}  # bare form
    out = write_index(tmp_path / "sub" / "index.html", [("one", page, one), ("two", page, two)])
    text = out.read_text(encoding="utf-8")
    assert text.count("<th>auroc</th>") == 2  # a column per head
    assert "witness cells</th>" in text and "witness_cells" not in text  # the count is the sample's, once
    assert '<td class="num best">0.800</td>' in text and '<td class="num">0.600</td>' in text
    assert f'href="{os.path.relpath(page, tmp_path / "sub")}"' in text and (tmp_path / "sub" / "viewer_assets" / "viewer.css").is_file()
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
    index = write_index(tmp_path / "index.html", [("slide-00", tmp_path / "s.html", summary)]).read_text(encoding="utf-8")
    assert index.index(">My head</th>") < index.index(">GAP</th>") < index.index(">SAOL</th>")
    assert 'title="a head only this test knows"' in index and "<b>My head</b> (mine)" in index


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
    assert page.title() == "gapless heatmaps"
    assert page.locator("table.index-table tbody tr").count() == 2
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


def _patch(path: Path, **values) -> Path:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(values)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path
