"""Tissue masks for brightfield (stain on white) and fluorescence (signal on black) images.

Both work on a low-resolution overview of the whole source (a few thousand pixels on the long side),
never on full-resolution pixels, so a 100,000-px slide costs the same as a small one.
"""

from __future__ import annotations

import numpy as np

from pipeline.io import Source

MODALITIES = ("brightfield", "fluorescence")
TISSUE_METHODS = ("auto", "brightfield", "fluorescence", "none")


def read_overview(source: Source, downsample: float, chunk: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole source at about ``downsample`` level-0 px per pixel: h×w×C in the source dtype.

    Reads the coarsest pyramid level at least that fine, in ``chunk``-px pieces, so memory stays at
    the size of the output. Returns the image and the exact (x, y) level-0 px per output pixel.
    """
    W, H = source.dimensions
    downsample = max(1.0, float(downsample))
    out_w, out_h = max(1, round(W / downsample)), max(1, round(H / downsample))
    level = max(i for i, d in enumerate(source.level_downsamples) if d <= downsample * 1.001 or i == 0)
    lw, lh = source.level_dimensions[level]
    ld = source.level_downsamples[level]
    out = np.empty((out_h, out_w, source.channels), dtype=source.dtype)
    sx, sy = out_w / lw, out_h / lh  # output px per level px
    step = _aligned_step(ld, chunk)
    for ty in range(0, lh, step):
        for tx in range(0, lw, step):
            w, h = min(step, lw - tx), min(step, lh - ty)
            piece = source.read_region((round(tx * ld), round(ty * ld)), level, (w, h))
            ox0, oy0 = round(tx * sx), round(ty * sy)
            ox1, oy1 = round((tx + w) * sx), round((ty + h) * sy)
            if ox1 <= ox0 or oy1 <= oy0:
                continue
            out[oy0:oy1, ox0:ox1] = _box_reduce(piece, (ox1 - ox0, oy1 - oy0))
    return out, (W / out_w, H / out_h)


def _aligned_step(downsample: float, chunk: int, longest: int = 4096) -> int:
    """A piece size near ``chunk`` whose multiples are whole level-0 pixels at ``downsample``.

    A region whose origin falls between a level's pixels (level-0 px / downsample not a whole number)
    is resampled by OpenSlide, 3–4× slower than a plain read: a level 3 of 35355 / 4420 px (downsample
    7.9989) read in 2048-px pieces took 0.95 s instead of 0.3 s. Pieces of a multiple of the smallest
    whole number of level px that spans whole level-0 px (884 there) start on pixels; without one up to
    ``longest``, ``chunk`` it is."""
    for p in range(1, longest + 1):
        if abs(p * downsample - round(p * downsample)) < 1e-6:
            return p * max(1, chunk // p)
    return chunk


def _box_reduce(piece: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``piece`` shrunk to ``size`` (w, h) by a box filter: as block means when the factor is a whole
    number (a cell image's overview: 5× cheaper than Pillow's per-channel float resize), else Pillow."""
    from PIL import Image

    w, h = size
    fy, fx = piece.shape[0] // h, piece.shape[1] // w
    if fy == fx and fy > 1 and piece.shape[0] == h * fy and piece.shape[1] == w * fx and piece.dtype in _AREA_DTYPES:
        from pipeline.opencv import cv2

        out = np.empty((h, w, piece.shape[2]), piece.dtype)
        for c in range(piece.shape[2]):  # channel by channel: a planar image's channels are contiguous
            # INTER_AREA at a whole factor is the mean of each block, rounded
            out[..., c] = cv2.resize(np.ascontiguousarray(piece[..., c]), (w, h), interpolation=cv2.INTER_AREA)
        return out
    return resize(piece, (w, h), Image.Resampling.BOX)


_AREA_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))  # what OpenCV resizes


def resize(pixels: np.ndarray, size: tuple[int, int], resample=None) -> np.ndarray:
    """H×W×C → size (w, h)×C, any dtype, antialiased when shrinking (Pillow, per channel if needed)."""
    from PIL import Image

    if resample is None:
        resample = Image.Resampling.LANCZOS
    w, h = size
    if pixels.shape[1] == w and pixels.shape[0] == h:
        return pixels
    if pixels.dtype == np.uint8 and pixels.shape[2] in (1, 3):
        mode_pixels = pixels[..., 0] if pixels.shape[2] == 1 else pixels
        out = np.asarray(Image.fromarray(mode_pixels).resize((w, h), resample))
        return out.reshape(h, w, pixels.shape[2])
    info = np.iinfo(pixels.dtype) if pixels.dtype.kind in "ui" else None
    planes = []
    for c in range(pixels.shape[2]):
        plane = Image.fromarray(pixels[..., c].astype(np.float32), mode="F").resize((w, h), resample)
        planes.append(np.asarray(plane))
    out = np.stack(planes, axis=-1)
    if info is not None:
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(pixels.dtype)


PERCENTILE_PIXELS = 1 << 14  # percentiles of a picture come from at most this many of its pixels


def _pixel_sample(flat: np.ndarray) -> np.ndarray:
    """(n, C) pixels → every k-th of them, at most ``PERCENTILE_PIXELS`` (a percentile's error from
    16,384 evenly spread pixels is far below what a threshold or a display stretch notices; the full
    sort cost ~40 ms per million pixels and channel, most of a cell image's tiling time)."""
    step = max(1, -(-len(flat) // PERCENTILE_PIXELS))
    return flat[::step]


def detect_modality(overview: np.ndarray) -> str:
    """``brightfield`` when most of the image is bright (stain on white), else ``fluorescence``.

    Compares each channel's median to its 99.5th percentile: white background and pale stain keep
    the median high; fluorescence is mostly dark background with sparse bright signal.
    """
    x = _pixel_sample(overview.reshape(-1, overview.shape[-1])).astype(np.float32)
    med, hi = np.percentile(x, [50, 99.5], axis=0)  # one partition for both
    valid = hi > 0
    if not valid.any():
        return "fluorescence"
    brightness = float(np.mean(med[valid] / hi[valid]))
    return "brightfield" if brightness > 0.5 else "fluorescence"


def tissue_mask(overview: np.ndarray, modality: str, px_size_um: float | None = None) -> np.ndarray:
    """Boolean h×w mask of tissue (brightfield) or cell-covered area (fluorescence).

    ``px_size_um`` is the overview's µm per pixel, used to size smoothing and the smallest kept
    object (about 50 µm across); None uses pixel-based defaults.
    """
    if modality == "none":
        return np.ones(overview.shape[:2], dtype=bool)
    if modality == "brightfield":
        mask = _brightfield_mask(overview)
    elif modality == "fluorescence":
        mask = _fluorescence_mask(overview, px_size_um)
    else:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return _clean(mask, px_size_um)


def _brightfield_mask(rgb: np.ndarray) -> np.ndarray:
    """Stained tissue absorbs light: optical density above that of the (estimated) white background."""
    if rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[-1] == 3:
        return _brightfield_mask_rgb8(rgb)
    from scipy import ndimage

    x = rgb.astype(np.float32)
    if x.shape[-1] != 3:
        x = np.repeat(x.mean(axis=-1, keepdims=True), 3, axis=-1)
    if rgb.dtype != np.uint8:
        x = x / max(float(np.percentile(_pixel_sample(x.reshape(-1, 3)), 99.9)), 1.0) * 255.0
    white = np.clip(np.percentile(_pixel_sample(x.reshape(-1, 3)), 99, axis=0), 200.0, 255.0)
    od = -np.log10(np.clip(x, 1.0, None) / white)
    od_max = ndimage.uniform_filter(od.max(axis=-1), size=3)
    saturation = ndimage.uniform_filter(x.max(axis=-1) - x.min(axis=-1), size=3)
    return (od_max > 0.06) | (saturation > 18.0)


def _brightfield_mask_rgb8(rgb: np.ndarray) -> np.ndarray:
    """:func:`_brightfield_mask` of 8-bit RGB, the same mask 7× faster (0.18 against 1.4 s on the
    overview of a 50,000 × 40,000 px slide): each channel's optical density from a 256-entry table
    (the same float64 values as the pixelwise formula), the 3-px means by OpenCV (reflected edges, as
    ``uniform_filter``), the saturation in 8 bits."""
    from pipeline.opencv import cv2

    white = np.clip(np.percentile(_pixel_sample(rgb.reshape(-1, 3)).astype(np.float32), 99, axis=0), 200.0, 255.0)
    levels = np.clip(np.arange(256, dtype=np.float32), 1.0, None)
    density = -np.log10(levels[:, None] / white[None, :])  # (256, 3)
    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    od_max = np.maximum(np.maximum(density[:, 0][r], density[:, 1][g]), density[:, 2][b])
    saturation = (cv2.max(cv2.max(r, g), b) - cv2.min(cv2.min(r, g), b)).astype(np.float32)
    od_max = cv2.blur(od_max, (3, 3), borderType=cv2.BORDER_REFLECT)
    saturation = cv2.blur(saturation, (3, 3), borderType=cv2.BORDER_REFLECT)
    return (od_max > 0.06) | (saturation > 18.0)


def _fluorescence_mask(image: np.ndarray, px_size_um: float | None) -> np.ndarray:
    """Signal on black: per-channel background-subtracted signal, smoothed over ~a cell, Otsu."""
    x = image.astype(np.float32)
    sample = _pixel_sample(x.reshape(-1, x.shape[-1]))
    lo, hi = np.percentile(sample, [1, 99.5], axis=0).astype(np.float32)  # float32: no float64 copy of the image
    signal = ((x - lo) / np.maximum(hi - lo, np.float32(1e-6))).clip(0, 1).max(axis=-1)
    sigma = 2.0 if px_size_um is None else max(1.0, 5.0 / px_size_um)  # ~5 µm: a nucleus
    smooth = _gaussian(signal, sigma)
    if float(smooth.max() - smooth.min()) < 1e-3:
        return np.zeros(signal.shape, dtype=bool)
    cells = smooth > threshold_otsu(smooth)
    # A cell's surroundings belong to the field of cells; grow the mask by ~10 µm.
    grow = 3 if px_size_um is None else max(1, round(10.0 / px_size_um))
    return _dilate(cells, grow)


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` (reflected edges, kernel out to 4 σ), by OpenCV: 5× faster."""
    from pipeline.opencv import cv2

    radius = int(4.0 * sigma + 0.5)
    return cv2.GaussianBlur(image.astype(np.float32), (2 * radius + 1, 2 * radius + 1), sigma, sigma,
                            borderType=cv2.BORDER_REFLECT)


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation`` with its default cross, ``iterations`` times, by OpenCV."""
    from pipeline.opencv import cv2

    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return cv2.dilate(mask.astype(np.uint8), cross, iterations=iterations, borderType=cv2.BORDER_CONSTANT,
                      borderValue=0).astype(bool)


def threshold_otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def _clean(mask: np.ndarray, px_size_um: float | None) -> np.ndarray:
    """Close small gaps, fill holes, drop specks smaller than ~50 µm across.

    ``scipy.ndimage``'s binary closing (its cross, twice, outside = 0), hole filling and 4-connected
    labelling, done by OpenCV (the same masks, a quarter of the time: this runs once per field of a
    screening cohort)."""
    from pipeline.opencv import cv2

    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    edge = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0}
    m = mask.astype(np.uint8)
    m |= cv2.erode(cv2.dilate(m, cross, iterations=2, **edge), cross, iterations=2, **edge)
    filled = _fill_holes(m)
    min_side = 4 if px_size_um is None else max(2.0, 50.0 / px_size_um)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(filled.astype(np.uint8), connectivity=4)
    if n <= 1:
        return filled
    keep = stats[:, cv2.CC_STAT_AREA] > int(min_side**2)
    keep[0] = False
    return keep[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (background not 4-connected to the outside becomes foreground)
    by one OpenCV flood fill from outside the image: the same mask, 10× faster."""
    from pipeline.opencv import cv2

    h, w = mask.shape
    outside = np.zeros((h + 2, w + 2), np.uint8)  # a one-pixel frame of background around the mask
    outside[1:-1, 1:-1] = mask > 0
    cv2.floodFill(outside, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1, flags=4)
    return (mask > 0) | (outside[1:-1, 1:-1] == 0)


def to_display_rgb(overview: np.ndarray, modality: str) -> np.ndarray:
    """An RGB uint8 picture for QC and heatmap backgrounds.

    Brightfield RGB passes through; fluorescence channels are each stretched between their 0.5th
    and 99.8th percentiles and given a colour (blue, green, red, magenta, cyan, yellow, ...).
    """
    if overview.dtype == np.uint8 and overview.shape[-1] == 3 and modality == "brightfield":
        return overview
    x = overview.astype(np.float32)
    flat = _pixel_sample(x.reshape(-1, x.shape[-1]))
    lo, hi = np.percentile(flat, [0.5, 99.8], axis=0).astype(np.float32)
    x = ((x - lo) / np.maximum(hi - lo, np.float32(1e-6))).clip(0, 1)
    if x.shape[-1] == 1:
        rgb = np.repeat(x, 3, axis=-1)
        if modality == "brightfield":
            return (rgb * 255 + 0.5).astype(np.uint8)
    else:
        colours = np.array(
            [[0, 0.45, 1], [0, 1, 0], [1, 0, 0], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=np.float32
        )
        weights = colours[np.arange(x.shape[-1]) % len(colours)]
        rgb = np.clip(x @ weights, 0, 1)
    return (rgb * 255 + 0.5).astype(np.uint8)
