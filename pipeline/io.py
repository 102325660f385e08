"""One reader interface for whole slides (OpenSlide) and cell images (tifffile, Pillow).

Every source answers the same questions: its pyramid (level sizes and downsamples, level 0 first),
its channels and dtype, its µm/px from metadata, and ``read_region`` in level-0 coordinates returning
an H×W×C array in the source's own dtype. Slides are RGB uint8 composited onto white; cell images
keep their channels and bit depth (a 16-bit two-channel OME-TIFF stays 16-bit with two channels).
"""

from __future__ import annotations

import math
import warnings
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import GaplessError
from pipeline.samples import KINDS

MPP_TOLERANCE = 0.05  # µm/px within 5 % count as the same (a level used as is; stores, models that match)
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff")

# Resolution tags written by software that knows nothing of the microscope: 72 dpi (and friends)
# would claim ~353 µm/px. Reading them as a calibration tiles at a nonsense scale, so we refuse.
_PLACEHOLDER_DPI = (72.0, 96.0, 150.0, 300.0, 600.0)

_MPP_FIX = "pass --slide-mpp (µm/px at full resolution) or set `mpp` in the sample sheet"


def _calibration(mpp: float) -> tuple[float | None, str]:
    """``(mpp, "")``, or ``(None, why)`` when ``mpp`` is a software's placeholder dpi."""
    dpi = 25400.0 / mpp
    for candidate in _PLACEHOLDER_DPI:
        if abs(dpi - candidate) / candidate < 1e-3:
            return None, f"its resolution tags say {candidate:g} dpi, a software default, not a microscope calibration"
    return mpp, ""


class Source(ABC):
    """A readable image pyramid. Coordinates are level-0 pixels (x, y); sizes are (width, height)."""

    path: Path
    kind: str  # "slide" | "image"
    format: str  # "aperio", "generic-tiff", "ome-tiff", "tiff", "png", ...
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    channels: int
    dtype: np.dtype
    channel_names: list[str]
    metadata_mpp: float | None  # µm/px of level 0 from the file, None when absent or a placeholder
    mpp_note: str = ""  # why metadata_mpp is None, for the error message

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def background(self) -> int:
        """Fill value outside the image: white for RGB brightfield, 0 otherwise."""
        return 255 if (self.channels == 3 and self.dtype == np.uint8) else 0

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of ``size`` (w, h) at ``level`` whose top-left is ``location`` in level-0 px: h×w×C."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def resolve_mpp(self, override: float | None) -> tuple[float, str]:
        """µm/px of level 0 and where it came from (``override`` | ``metadata``), or a clear error."""
        if override is not None:
            if not (override > 0 and math.isfinite(override)):
                raise GaplessError(self.path, f"µm/px override must be a positive number, got {override}", _MPP_FIX)
            return float(override), "override"
        if self.metadata_mpp is None:
            note = f" ({self.mpp_note})" if self.mpp_note else ""
            raise GaplessError(self.path, f"no µm/px in the metadata{note}", _MPP_FIX)
        return self.metadata_mpp, "metadata"


class OpenSlideSource(Source):
    """A whole slide in any format OpenSlide reads; RGBA composited onto white (not premultiplied)."""

    kind = "slide"

    def __init__(self, path: Path):
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise GaplessError(self.path, f"not a slide format OpenSlide reads ({exc})", _FORMAT_FIX) from None
        except openslide.OpenSlideError as exc:
            fix = _CONVERT_FIX if "nsupported" in str(exc) else _CORRUPT_FIX
            raise GaplessError(self.path, f"OpenSlide cannot open it: {exc}", fix) from None
        self.format = openslide.OpenSlide.detect_format(str(self.path)) or "unknown"
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.channels = 3
        self.dtype = np.dtype(np.uint8)
        self.channel_names = ["R", "G", "B"]
        self.metadata_mpp, self.mpp_note = self._mpp_from_properties(self._slide.properties)

    @staticmethod
    def _mpp_from_properties(props) -> tuple[float | None, str]:
        try:
            mpp_x = float(props["openslide.mpp-x"])
            mpp_y = float(props.get("openslide.mpp-y", mpp_x))
        except (KeyError, ValueError):
            return None, "the file carries no openslide.mpp-x"
        if not (mpp_x > 0 and mpp_y > 0):
            return None, f"openslide.mpp-x is {mpp_x}"
        if abs(mpp_x - mpp_y) / mpp_x > 0.01:
            warnings.warn(f"non-square pixels ({mpp_x} × {mpp_y} µm); using the x resolution", stacklevel=2)
        return _calibration(mpp_x)

    def read_region(self, location, level, size):
        import openslide

        from PIL import Image

        try:
            region = self._slide.read_region((int(location[0]), int(location[1])), level, size)
        except openslide.OpenSlideError as exc:
            raise GaplessError(
                self.path,
                f"cannot read pixels at level {level} near ({location[0]}, {location[1]}): {exc}",
                _CORRUPT_FIX,
            ) from None
        # Pillow's C conversions: 3× cheaper per tile than compositing in numpy
        if region.getchannel("A").getextrema()[0] < 255:  # outside the scanned area: transparent
            white = Image.new("RGBA", region.size, (255, 255, 255, 255))
            white.alpha_composite(region)
            region = white
        return np.asarray(region.convert("RGB"))

    def close(self):
        self._slide.close()


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """H×W×4 uint8 (straight, not premultiplied alpha) → H×W×3 uint8 over a white background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


class ArraySource(Source):
    """A cell image held in memory (TIFF/OME-TIFF via tifffile, PNG/JPEG/... via Pillow), one level."""

    kind = "image"

    def __init__(self, path: Path, pixels: np.ndarray, fmt: str, channel_names: list[str],
                 mpp: float | None, mpp_note: str):
        self.path = Path(path)
        self.pixels = pixels  # H×W×C
        self.format = fmt
        h, w, c = pixels.shape
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.channels = c
        self.dtype = pixels.dtype
        self.channel_names = channel_names
        self.metadata_mpp = mpp
        self.mpp_note = mpp_note

    def read_region(self, location, level, size):
        if level != 0:
            raise ValueError(f"{self.path} has one level; asked for level {level}")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        H, W, C = self.pixels.shape
        if x >= 0 and y >= 0 and x + w <= W and y + h <= H:
            return self.pixels[y : y + h, x : x + w]
        out = np.full((h, w, C), self.background, dtype=self.dtype)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.pixels[y0:y1, x0:x1]
        return out


_FORMAT_FIX = "use a format OpenSlide reads (SVS, NDPI, MRXS, DICOM, tiled TIFF, ...) or a TIFF/PNG/JPEG cell image"
_CONVERT_FIX = "convert it to a tiled pyramidal TIFF with JPEG or deflate compression (e.g. vips tiffsave --tile --pyramid)"
_CORRUPT_FIX = "the file is damaged or truncated: copy it again or re-export it from the scanner software"


def same_mpp(a: float, b: float) -> bool:
    """Whether two µm/px values are the same within ``MPP_TOLERANCE`` (relative)."""
    return abs(float(a) / float(b) - 1) <= MPP_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Which reader opens a file: one ordered list of readers, each with a cheap probe (does this file look
# like mine?), an opener and a header-only check. Everything that opens a source goes through it:
# tiling, the viewer's pyramid, the sample sheet's check, kind inference.


@dataclass(frozen=True)
class Reader:
    """A way to open sources: ``probe(path)`` answers cheaply whether it reads ``path``; ``open(path)``
    returns a :class:`Source`; ``check(path)`` reads the header only and returns ``(metadata µm/px or
    None, why not)``, raising what opening would raise."""

    name: str
    kind: str  # slide | image
    probe: Callable[[Path], bool]
    open: Callable[[Path], Source]
    check: Callable[[Path], tuple[float | None, str]]


def _openslide_probe(path: Path) -> bool:
    """OpenSlide reads it as an RGB pyramid: not a tiled TIFF of more than 3 channels or 8 bits
    (multi-channel fluorescence, which OpenSlide would reduce to 8-bit RGBA)."""
    import openslide

    fmt = openslide.OpenSlide.detect_format(str(path))
    return fmt is not None and (fmt != "generic-tiff" or _tiff_is_rgb8(path))


def _openslide_check(path: Path) -> tuple[float | None, str]:
    with OpenSlideSource(path) as source:
        level = source.level_count - 1
        w, h = source.level_dimensions[level]
        source.read_region((0, 0), level, (max(1, min(w, 64)), max(1, min(h, 64))))  # a tile decodes
        return source.metadata_mpp, source.mpp_note


def _tiff_probe(path: Path) -> bool:
    return path.name.lower().endswith(TIFF_SUFFIXES) or _has_tiff_magic(path)


def _tiff_check(path: Path) -> tuple[float | None, str]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            # the axes check on a stand-in of one pixel per plane: no pixel is read
            _to_yxc(path, np.zeros([1 if ax in "YX" else n for ax, n in zip(series.axes.upper(), series.shape)]),
                    series.axes)
            return _tiff_mpp(tif, tif.pages[0], _ome_root(tif))
    except GaplessError:
        raise
    except Exception as exc:
        raise GaplessError(path, f"cannot read the TIFF: {exc}", _CORRUPT_FIX) from None


def _pillow_check(path: Path) -> tuple[float | None, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = (im.format or path.suffix.lstrip(".")).lower()
            im.verify()  # the file's structure (and a PNG's checksums), without decoding
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise GaplessError(path, f"not an image gapless can read ({exc})", _FORMAT_FIX) from None
    return None, f"{fmt.upper()} files carry no microscope calibration"


READERS: tuple[Reader, ...] = (
    Reader("openslide", "slide", _openslide_probe, lambda path: OpenSlideSource(path), _openslide_check),
    Reader("tifffile", "image", _tiff_probe, lambda path: _open_tiff(path), _tiff_check),
    Reader("pillow", "image", lambda path: True, lambda path: _open_pillow(path), _pillow_check),
)


def reader_for(path: str | Path, kind: str | None = None) -> tuple[Reader, Path]:
    """The first reader of ``READERS`` (of ``kind``, when given) whose probe accepts ``path``, and the file
    it opens (a DICOM folder's first slide file); with ``kind`` given and no probe accepting, the first
    reader of that kind, whose opening then says why it cannot."""
    path = Path(path)
    if not path.exists():
        raise GaplessError(path, "file not found", "check the path (relative paths in a sample sheet are relative to the sheet)")
    if kind is not None and kind not in KINDS:
        raise GaplessError(path, f"unknown kind {kind!r}", f"use {' or '.join(KINDS)}")
    if path.is_dir():
        path, kind = _slide_in_folder(path), "slide"
    candidates = [r for r in READERS if kind is None or r.kind == kind]
    return next((r for r in candidates if r.probe(path)), candidates[0]), path


def infer_kind(path: str | Path) -> str:
    """``slide`` when OpenSlide reads the file as an RGB pyramid, else ``image`` (read in memory)."""
    path = Path(path)
    if path.is_dir() and not any(True for _ in _dicom_files(path)):
        return "image"
    return reader_for(path)[0].kind


def open_source(path: str | Path, kind: str | None = None) -> Source:
    """Open a slide or cell image through its reader; ``kind`` forces the kind, None infers it."""
    reader, path = reader_for(path, kind)
    return reader.open(path)


def probe_source(path: str | Path, kind: str | None = None, mpp: float | None = None) -> str:
    """Check cheaply that ``path`` can be tiled, without reading its pixels; return its kind.

    The reader's header-only check (OpenSlide opens it and decodes a corner of its coarsest level;
    tifffile and Pillow read the header without decoding the image), then µm/px as tiling resolves
    it (``mpp`` overrides the metadata). Raises the ``GaplessError`` that tiling would raise, so a
    sample sheet's bad files are all found before any job runs.
    """
    reader, path = reader_for(path, kind)
    metadata_mpp, note = reader.check(path)
    if mpp is None and metadata_mpp is None:
        raise GaplessError(path, f"no µm/px in the metadata ({note})" if note else "no µm/px in the metadata", _MPP_FIX)
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise GaplessError(path, f"µm/px override must be a positive number, got {mpp}", _MPP_FIX)
    return reader.kind


def _tiff_is_rgb8(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return page.samplesperpixel in (3, 4) and page.bitspersample == 8 and not tif.is_ome
    except Exception:  # leave the verdict to OpenSlide, which reports its own error
        return True


def _dicom_files(folder: Path):
    for candidate in sorted(folder.iterdir()):
        if candidate.suffix.lower() == ".dcm" or (candidate.is_file() and _has_dicom_magic(candidate)):
            yield candidate


def _slide_in_folder(folder: Path) -> Path:
    """A DICOM slide is a folder of .dcm files; OpenSlide opens it from any one of them."""
    for candidate in _dicom_files(folder):
        return candidate
    raise GaplessError(folder, "a folder, and no DICOM (.dcm) slide inside it",
                       "give the slide file itself (for MIRAX, the .mrxs file beside its folder)")


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _has_tiff_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _open_tiff(path: Path) -> ArraySource:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            data = series.asarray()
            ome = _ome_root(tif)
            mpp, note = _tiff_mpp(tif, tif.pages[0], ome)
            names = _ome_channel_names(ome) if ome is not None else []
            fmt = "ome-tiff" if tif.is_ome else "tiff"
    except GaplessError:
        raise
    except Exception as exc:
        raise GaplessError(path, f"cannot read the TIFF: {exc}", _CORRUPT_FIX) from None
    pixels = _to_yxc(path, data, axes)
    if pixels.shape[2] == 4 and pixels.dtype == np.uint8 and not names:
        pixels = composite_on_white(pixels)
    names = names if len(names) == pixels.shape[2] else _default_channel_names(pixels)
    # a planar (C, Y, X) image stays as read, seen as Y×X×C: each region read copies only itself
    return ArraySource(path, pixels, fmt, names, mpp, note)


def _to_yxc(path: Path, data: np.ndarray, axes: str) -> np.ndarray:
    """Rearrange a tifffile series to H×W×C; single planes only (no z-stacks or time series)."""
    axes = axes.upper()
    for ax in list(axes):
        if ax in "YXCS":
            continue
        i = axes.index(ax)
        if data.shape[i] != 1:
            raise GaplessError(
                path,
                f"has {data.shape[i]} planes along axis {ax!r} (axes {axes}); gapless tiles single 2-D planes",
                "export one plane or a maximum projection",
            )
        data = np.take(data, 0, axis=i)
        axes = axes.replace(ax, "", 1)
    if "C" in axes and "S" in axes:
        c, s = axes.index("C"), axes.index("S")
        data = np.moveaxis(data, (c, s), (-2, -1))
        data = data.reshape(*data.shape[:-2], data.shape[-2] * data.shape[-1])
        axes = axes.replace("C", "").replace("S", "") + "C"
    axes = axes.replace("S", "C")
    if "C" not in axes:
        data = data[..., None]
        axes += "C"
    if sorted(axes) != ["C", "X", "Y"]:
        raise GaplessError(path, f"unexpected TIFF axes {axes!r}", "export a 2-D image with channels")
    return np.transpose(data, [axes.index("Y"), axes.index("X"), axes.index("C")])


def _ome_root(tif) -> ET.Element | None:
    """The parsed OME-XML of an OME-TIFF; None for other TIFFs or unreadable XML."""
    if not tif.is_ome:
        return None
    try:
        return ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return None


def _tiff_mpp(tif, page, ome: ET.Element | None) -> tuple[float | None, str]:
    if ome is not None:
        try:
            pixels = next(el for el in ome.iter() if el.tag.endswith("Pixels"))
            size = pixels.get("PhysicalSizeX")
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if size is not None:
                factor = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
                if factor is None:
                    return None, f"OME PhysicalSizeX has unknown unit {unit!r}"
                return float(size) * factor, ""
        except (StopIteration, ValueError):
            pass
    ij = tif.imagej_metadata or {}
    xres = page.tags.get("XResolution")
    unit_tag = page.tags.get("ResolutionUnit")
    if xres is None:
        return None, "the TIFF has no resolution tags"
    num, den = xres.value
    if not num or not den:
        return None, "the TIFF resolution tags are empty"
    px_per_unit = num / den
    unit = int(unit_tag.value) if unit_tag is not None else 2
    if ij.get("unit") in ("micron", "um", "µm", "\\u00B5m"):
        return 1.0 / px_per_unit, ""
    if unit == 3:  # centimetre
        mpp = 1e4 / px_per_unit
    elif unit == 2:  # inch
        mpp = 25400.0 / px_per_unit
    else:
        return None, "the TIFF resolution tags have no unit"
    return _calibration(mpp)


def _ome_channel_names(ome: ET.Element) -> list[str]:
    return [el.get("Name") or f"C{i}" for i, el in enumerate(e for e in ome.iter() if e.tag.endswith("Channel"))]


def _default_channel_names(pixels: np.ndarray) -> list[str]:
    if pixels.shape[2] == 3 and pixels.dtype == np.uint8:
        return ["R", "G", "B"]
    return [f"C{i}" for i in range(pixels.shape[2])]


def _open_pillow(path: Path) -> ArraySource:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = (im.format or path.suffix.lstrip(".")).lower()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                pixels = composite_on_white(np.asarray(im.convert("RGBA")))
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                pixels = np.asarray(im).astype(np.uint16)[..., None]
            elif im.mode == "L":
                pixels = np.asarray(im)[..., None]
            else:
                pixels = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise GaplessError(path, f"not an image gapless can read ({exc})", _FORMAT_FIX) from None
    # Pillow's dpi is a display setting, never a microscope calibration.
    return ArraySource(path, np.ascontiguousarray(pixels), fmt, _default_channel_names(pixels), None,
                       f"{fmt.upper()} files carry no microscope calibration")
