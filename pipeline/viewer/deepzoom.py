"""The Deep Zoom (DZI) layout of a slide pyramid folder: its geometry, its descriptor, and reading it back.

A pyramid folder holds ``slide.dzi`` (the descriptor), ``slide_files/{level}/{col}_{row}.{format}``
(level 0 is 1×1 px, the last level is full resolution; each level halves the one above it, rounding
up) and ``pyramid.json`` (size, tile size, kind, modality, µm/px, the source, the finest level written).
Tiles are ``tile_size`` px with ``overlap`` px more on every side that has a neighbour, as OpenSlide's
``DeepZoomGenerator`` cuts them.

The descriptor always describes the whole slide at full resolution, but a folder may hold only the
levels up to ``max_level`` (a static export capped at a µm/px): the viewer then shows that level
magnified, and ``gapless view`` cuts the finer ones from the source on demand. Level numbers and tile
names are the same either way.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.errors import GaplessError

DZI_NAME = "slide"  # <pyramid_dir>/slide.dzi and <pyramid_dir>/slide_files/
DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"
PYRAMID_SCHEMA = "gapless.pyramid/1"
_PYRAMID_FIX = "write the pyramid first: gapless pyramid SLIDE --out DIR"


def dz_level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """Deep Zoom level sizes (px), 1×1 first, full resolution last (as OpenSlide's DeepZoomGenerator).

    Level ``L`` of ``n`` is the level-0 image downsampled by exactly ``2 ** (n - 1 - L)``, rounded up.
    """
    size = (width, height)
    dims = [size]
    while size[0] > 1 or size[1] > 1:
        size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
        dims.append(size)
    return dims[::-1]


def dz_level_tiles(size: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """(columns, rows) of tiles of a level of ``size`` (w, h) px."""
    return math.ceil(size[0] / tile_size), math.ceil(size[1] / tile_size)


def dz_tile_box(col: int, row: int, size: tuple[int, int], tile_size: int, overlap: int) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1) of tile (col, row) of a level of ``size`` px: its core plus ``overlap``
    on every side with a neighbour, within the level."""
    cols, rows = dz_level_tiles(size, tile_size)
    x0 = col * tile_size - (overlap if col > 0 else 0)
    y0 = row * tile_size - (overlap if row > 0 else 0)
    x1 = min(size[0], (col + 1) * tile_size + (overlap if col < cols - 1 else 0))
    y1 = min(size[1], (row + 1) * tile_size + (overlap if row < rows - 1 else 0))
    return x0, y0, x1, y1


def dzi_text(width: int, height: int, tile_size: int, overlap: int, fmt: str) -> str:
    """The ``.dzi`` descriptor, byte for byte as ``DeepZoomGenerator.get_dzi`` writes it."""
    image = ET.Element("Image", TileSize=str(tile_size), Overlap=str(overlap), Format=fmt, xmlns=DZI_XMLNS)
    ET.SubElement(image, "Size", Width=str(width), Height=str(height))
    return ET.tostring(image, encoding="unicode")


def finest_level(levels: int, source_mpp: float | None, max_mpp: float | None, tile_size: int,
                 size: tuple[int, int]) -> int:
    """The finest Deep Zoom level (of ``levels``, for a ``size`` level-0 image) that is not finer than
    ``max_mpp`` µm/px, given ``source_mpp`` µm per level-0 px (within ``MPP_TOLERANCE``).

    ``max_mpp`` or ``source_mpp`` None: the last level (full resolution). Never coarser than the finest
    level that fits in one tile (the page's whole-slide picture).
    """
    from pipeline.io import MPP_TOLERANCE

    last = levels - 1
    if max_mpp is None or source_mpp is None:
        return last
    dims = dz_level_dimensions(*size)
    one_tile = max(lv for lv, (w, h) in enumerate(dims) if w <= tile_size and h <= tile_size)
    fine_enough = [lv for lv in range(levels) if source_mpp * 2 ** (last - lv) >= max_mpp * (1 - MPP_TOLERANCE)]
    return max([one_tile] + fine_enough)


def level_mpp(pyr: dict, level: int) -> float | None:
    """µm/px of Deep Zoom ``level`` of the pyramid ``pyr`` (:func:`read_pyramid`), None without µm/px."""
    mpp = pyr.get("mpp")
    return None if mpp is None else float(mpp) * 2 ** (pyr["levels"] - 1 - level)


def disk_usage(folder: str | Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``: what a pyramid costs on disk."""
    files = size = 0
    for path in Path(folder).rglob("*"):
        if path.is_file():
            files += 1
            size += path.stat().st_size
    return files, size


def pyramid_summary(pyramid_dir: str | Path, capped: bool = True) -> str:
    """What a pyramid folder holds, in words: the levels written (finest µm/px), its files and bytes.
    ``capped``: a cap in µm/px was asked for (to say why a folder without µm/px has every level)."""
    pyr = read_pyramid(pyramid_dir)
    files, size = disk_usage(pyramid_dir)
    last = pyr["levels"] - 1
    finest, full = level_mpp(pyr, pyr["max_level"]), level_mpp(pyr, last)
    if pyr["max_level"] < last:
        levels = (f"levels 0-{pyr['max_level']} of 0-{last} (finest {finest:.3g} µm/px; the slide's {full:.3g} µm/px "
                  "served by `gapless view`)")
    elif capped and full is None:
        levels = "every level (no µm/px known, so not capped: pass --slide-mpp)"
    else:
        levels = "every level" + (f" (full resolution, {full:.3g} µm/px)" if full else "")
    return f"{levels}, {files} files, {size:,} bytes ({size / 1e6:.1f} MB)"


def read_pyramid(pyramid_dir: str | Path) -> dict:
    """The geometry of a DZI pyramid folder (``slide.dzi`` + ``slide_files/``), checked.

    Returns ``tile_size``, ``overlap``, ``format``, ``width``, ``height`` (level-0 px), ``dzi`` and
    ``files`` (paths), ``levels`` (all Deep Zoom levels of the slide), ``max_level`` (the finest level
    the folder holds: ``levels - 1`` unless the export was capped at a µm/px) and, from ``pyramid.json``
    when present, ``mpp`` (of level 0), ``kind``, ``modality``, ``source`` (the slide, absolute),
    ``quality`` and ``max_mpp`` (the cap asked for, or None).
    """
    pyramid_dir = Path(pyramid_dir)
    if not pyramid_dir.is_dir():
        raise GaplessError(pyramid_dir, "no such slide pyramid folder", _PYRAMID_FIX)
    dzi = pyramid_dir / f"{DZI_NAME}.dzi"
    if not dzi.is_file():
        found = sorted(pyramid_dir.glob("*.dzi"))
        if len(found) != 1:
            raise GaplessError(pyramid_dir, "no slide.dzi (Deep Zoom descriptor) in the pyramid folder", _PYRAMID_FIX)
        dzi = found[0]
    info = _read_dzi(dzi)
    files = dzi.with_name(dzi.stem + "_files")
    levels = len(dz_level_dimensions(info["width"], info["height"]))
    meta = _read_meta(pyramid_dir / "pyramid.json")
    max_level = meta.get("max_level")
    if not (isinstance(max_level, int) and 0 <= max_level < levels):
        max_level = levels - 1
    top = files / str(max_level)
    if not top.is_dir() or not (top / f"0_0.{info['format']}").is_file():
        what = "full-resolution level" if max_level == levels - 1 else f"level {max_level}, the finest it records"
        raise GaplessError(files, f"the pyramid's tiles are missing (no {what})", _PYRAMID_FIX)
    info.update(dzi=dzi, files=files, levels=levels, max_level=max_level)
    for key in ("mpp", "kind", "modality", "source", "quality", "max_mpp"):
        info[key] = meta.get(key)
    return info


def _read_meta(path: Path) -> dict:
    """``pyramid.json``, or {} when absent or unreadable (a Deep Zoom folder made by other tools)."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _read_dzi(dzi: Path) -> dict:
    try:
        root = ET.fromstring(dzi.read_text(encoding="utf-8"))
        size = next(el for el in root.iter() if el.tag.endswith("Size"))
        info = {
            "tile_size": int(root.get("TileSize")),
            "overlap": int(root.get("Overlap")),
            "format": str(root.get("Format")),
            "width": int(size.get("Width")),
            "height": int(size.get("Height")),
        }
    except (ET.ParseError, StopIteration, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise GaplessError(dzi, f"not a Deep Zoom descriptor ({exc.__class__.__name__}: {exc})", _PYRAMID_FIX) from None
    if info["width"] < 1 or info["height"] < 1 or info["tile_size"] < 1 or info["overlap"] < 0:
        raise GaplessError(dzi, f"impossible Deep Zoom geometry {info}", _PYRAMID_FIX)
    if info["format"].lower() not in ("jpeg", "jpg", "png", "webp"):
        raise GaplessError(dzi, f"tile format {info['format']!r} is not one a browser shows", _PYRAMID_FIX)
    return info


def thumbnail_tile(pyr: dict) -> Path | None:
    """The single tile of the finest level that still fits in one tile: the slide's thumbnail."""
    dims = dz_level_dimensions(pyr["width"], pyr["height"])
    best = None
    for level, (w, h) in enumerate(dims[: pyr.get("max_level", len(dims) - 1) + 1]):
        if w <= pyr["tile_size"] and h <= pyr["tile_size"]:
            best = level
    if best is None:
        return None
    path = pyr["files"] / str(best) / f"0_0.{pyr['format']}"
    return path if path.is_file() else None
