"""``tile_source``: a slide or cell image into a tile store, in steps — plan the grid, survey the source
(overview, tissue mask, tiles kept, labels, thumbnail), then write the store (arrays, shards cut by
this process and its helpers, attributes) under ``<out>.partial``, renamed into place when complete.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.errors import GaplessError
from pipeline.files import atomic_directory
from pipeline.io import Source, open_source
from pipeline.store import TileStoreAttrs, integrity_record, small_codecs, tile_codecs
from pipeline.tiling import cutting
from pipeline.tiling.cutting import ChannelStats, _cut_here, _cut_shards, _Helpers, effective_workers, shard_tiles
from pipeline.tiling.grid import TileGrid, TileSettings, fit_whole, plan_grid, tissue_fractions

log = logging.getLogger("gapless.tiling")

MASK_PX_PER_TILE = 16  # tissue mask resolution: about this many mask pixels across a tile
MASK_MAX_SIDE = 4096
THUMBNAIL_MAX_SIDE = 1024


@dataclass
class TileResult:
    out: Path
    n_tiles: int
    seconds: float
    attrs: dict

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        a = self.attrs
        flag = f", QC flag: {a['qc_flag']}" if a.get("qc_flag") else ""
        return (
            f"{self.out}: {self.n_tiles} tiles of {a['tile_size']} px at {a['mpp']:.3g} µm/px "
            f"(level {a['level']}, {a['modality']}) in {self.seconds:.1f} s, {self.tiles_per_second:.1f} tiles/s{flag}"
        )


@dataclass
class Survey:
    """What the overview of a source says: the tiles kept, their labels, the mask and the thumbnail."""

    source_mpp: float
    mpp_source: str  # metadata | override
    grid: TileGrid
    modality: str
    method: str  # the tissue mask's method
    mask: np.ndarray
    mask_px: tuple[float, float]  # level-0 px per mask pixel (x, y)
    coords: np.ndarray  # (N, 2) int64 of the kept tiles
    fractions: np.ndarray  # (N,) float32 tissue fractions
    labels: np.ndarray  # (N,) int8
    thumbnail: np.ndarray
    thumb_px: tuple[float, float]
    qc_flag: str | None


def tile_source(
    path: str | Path,
    out: str | Path,
    settings: TileSettings = TileSettings(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> TileResult:
    """Tile ``path`` into the zarr store ``out`` (layout: :mod:`pipeline.store`); ``workers`` processes cut."""
    start_time = time.perf_counter()
    path, out = Path(path), Path(out)
    settings.validate(path)
    if out.exists() and not overwrite:
        raise GaplessError(out, "the output store already exists", "remove it or pass --overwrite")
    annotations = None
    if settings.annotations:
        from pipeline.annotations import load_annotations

        annotations = load_annotations(settings.annotations)  # fail on bad annotations before any work

    helpers = _Helpers()  # none unless the grid has work for more than one process
    source = open_source(path, settings.kind)  # for the overview, then this process cuts from it too
    try:
        source_mpp, mpp_source = source.resolve_mpp(settings.slide_mpp)
        settings = fit_whole(settings, source, source_mpp, path)
        grid = _plan(source, path, source_mpp, settings)
        # helpers start now: their start-up overlaps the overview and tissue mask
        helpers.start(path, source.kind, effective_workers(workers, grid.columns * grid.rows) - 1)
        survey = _survey(source, path, settings, annotations, grid, source_mpp, mpp_source)
        workers = effective_workers(workers, len(survey.coords))
        # the store is built in <out>.partial and replaces out (with --overwrite) only once complete
        with atomic_directory(out, holds="zarr.json") as partial:
            try:
                attrs = _write_store(partial, source, path, settings, survey, workers, helpers, start_time, progress)
            except BaseException:
                helpers.close()  # before the partial store is removed: no helper may still be writing
                raise
    finally:
        helpers.close()
        source.close()
    return TileResult(out, len(survey.coords), attrs["seconds"], attrs)


def _plan(source: Source, path: Path, source_mpp: float, settings: TileSettings) -> TileGrid:
    """The grid of ``settings`` on ``source``; a source smaller than one tile is an error."""
    grid = plan_grid(source, source_mpp, settings.mpp, settings.tile_size, settings.stride)
    if grid.columns == 0 or grid.rows == 0:
        raise GaplessError(
            path,
            f"smaller than one tile: {source.dimensions[0]}×{source.dimensions[1]} px at {source_mpp:.3g} µm/px "
            f"cannot hold a {settings.tile_size}-px tile at {settings.mpp:.3g} µm/px",
            "use a smaller --tile-size or a coarser --mpp",
        )
    return grid


def _survey(source: Source, path: Path, settings: TileSettings, annotations, grid: TileGrid, source_mpp: float,
            mpp_source: str, thumbnail_side: int = THUMBNAIL_MAX_SIDE) -> Survey:
    """One overview read serves the tissue mask (~16 px per tile) and the thumbnail (≤ 1024 px); the mask
    chooses the tiles; annotations (checked to be in the image's frame) label them."""
    from pipeline.tissue import detect_modality, read_overview, tissue_mask, to_display_rgb

    W, H = source.dimensions
    mask_ds = max(1.0, grid.extent / MASK_PX_PER_TILE, max(W, H) / MASK_MAX_SIDE)
    thumb_ds = max(1.0, max(W, H) / thumbnail_side)
    overview, overview_ds = read_overview(source, min(mask_ds, thumb_ds))
    modality = detect_modality(overview) if settings.tissue in ("auto", "none") else settings.tissue
    method = modality if settings.tissue == "auto" else settings.tissue
    mask_src, mask_px = _shrink(overview, overview_ds, mask_ds, (W, H))
    mask = tissue_mask(mask_src, method, px_size_um=source_mpp * mask_px[0])
    all_coords = grid.coords()
    all_fractions = tissue_fractions(mask, mask_px, all_coords, grid.extent)
    keep = all_fractions >= settings.min_tissue
    coords, fractions = all_coords[keep], all_fractions[keep]
    qc_flag = None
    if len(coords) == 0:
        cause = (f"no tissue found: 0 of {len(all_coords)} tiles have at least {settings.min_tissue:.0%} tissue "
                 f"({method} mask covers {mask.mean():.1%} of the image)")
        if not settings.allow_empty:
            raise GaplessError(path, cause, "check the image, lower --min-tissue, set --tissue "
                                            "brightfield|fluorescence|none, or pass --allow-empty to keep a flagged empty store")
        log.warning("%s: %s; writing an empty store flagged 'no tissue'", path, cause)
        qc_flag = "no tissue"
    labels = np.full(len(coords), -1, dtype=np.int8)
    if annotations is not None:
        from pipeline.annotations import check_frame, tile_labels

        # objects outside the image stop here; objects off the tissue flag the store
        frame_flag = check_frame(annotations, (W, H), mask, mask_px, settings.positive_classes)
        if frame_flag and len(coords):
            log.warning("%s: %s; are the coordinates level-0 px of this image? (training refuses this store "
                        "unless told to accept flagged stores)", settings.annotations, frame_flag)
            qc_flag = frame_flag
        labels = tile_labels(annotations, coords, grid.extent, settings.positive_classes)
    thumb_src, thumb_px = _shrink(overview, overview_ds, thumb_ds, (W, H))
    return Survey(source_mpp, mpp_source, grid, modality, method, mask, mask_px, coords, fractions, labels,
                  to_display_rgb(thumb_src, modality), thumb_px, qc_flag)


def _write_store(partial: Path, source: Source, path: Path, settings: TileSettings, survey: Survey, workers: int,
                 helpers: _Helpers, start_time: float, progress: bool) -> dict:
    """The arrays, the tiles cut shard by shard, then the attributes (with the integrity record, last)."""
    import zarr

    from pipeline.codecs import tile_codec

    n, T, channels, dtype = len(survey.coords), settings.tile_size, source.channels, source.dtype
    per_shard = shard_tiles(n, T * T * channels * dtype.itemsize, workers)
    codec = tile_codec(settings.codec, settings.quality, dtype, channels, survey.modality)  # JPEG or lossless
    root = zarr.open_group(partial, mode="w", zarr_format=3)
    root.create_array(  # filled shard by shard by the cutting processes, each with its own handle
        "tiles", shape=(n, T, T, channels), chunks=(1, T, T, channels), shards=(per_shard, T, T, channels),
        dtype=dtype, fill_value=0, **tile_codecs(dtype, codec), dimension_names=["tile", "y", "x", "c"],
    )
    small = small_codecs()
    for name, data, dims in (("coords", survey.coords.astype(np.int64), ["tile", "xy"]),
                             ("tissue", survey.fractions.astype(np.float32), ["tile"]),
                             ("labels", survey.labels, ["tile"]),
                             ("thumbnail", survey.thumbnail, ["y", "x", "rgb"]),
                             ("tissue_mask", survey.mask.astype(np.uint8), ["y", "x"])):
        chunks = (max(n, 1), *data.shape[1:]) if dims[0] == "tile" else data.shape
        pictures = name == "thumbnail" and not codec["lossless"]  # a JPEG store's thumbnail is a JPEG too
        root.create_array(name, data=data, chunks=chunks, dimension_names=dims,
                          **(tile_codecs(data.dtype, codec) if pictures else {"compressors": small}))

    n_shards = math.ceil(n / per_shard)
    bar = _progress(n, f"tiling {path.name}", progress)
    job = (per_shard, survey.coords, survey.grid.level, survey.grid.read_size, T)
    tiles_path = str(partial / "tiles")
    if workers == 1 or n_shards == 1:
        stats = _cut_here(source, bar.update, None, _cut_shards, tiles_path, range(0, n, per_shard), *job)
    else:
        stats = helpers.cut(source, workers - 1, tiles_path, n_shards, job, bar)
    bar.close()
    attrs = _attrs(source, path, settings, survey, stats, per_shard, workers, time.perf_counter() - start_time, codec)
    attrs["integrity"] = integrity_record(partial)  # every data file is written: what the store holds
    root.update_attributes(attrs)  # one write of zarr.json (attrs.update writes it once per key)
    return attrs


def _attrs(source: Source, path: Path, settings: TileSettings, survey: Survey, stats: ChannelStats, per_shard: int,
           workers: int, seconds: float, codec: dict | None = None) -> dict:
    grid, (W, H) = survey.grid, source.dimensions
    return TileStoreAttrs(
        source=str(path.resolve()), format=source.format, kind=source.kind, channel_names=list(source.channel_names),
        modality=survey.modality, tissue_method=survey.method, mpp=grid.tile_mpp, source_mpp=survey.source_mpp,
        mpp_source=survey.mpp_source, target_mpp=settings.mpp, level=grid.level, downsample=grid.downsample,
        read_size=grid.read_size, tile_size=settings.tile_size, stride=grid.stride, tile_extent=grid.extent,
        tile_step=grid.step, grid=[grid.columns, grid.rows], width=W, height=H, channels=source.channels,
        dtype=source.dtype.name, channel_stats=stats.summary(source.channel_names), min_tissue=settings.min_tissue,
        tissue_area_fraction=round(float(survey.mask.mean()), 4), n_tiles=len(survey.coords),
        tiles_per_shard=per_shard, workers=workers,
        annotations=str(Path(settings.annotations).resolve()) if settings.annotations else None,
        positive_classes=list(settings.positive_classes), n_positive=int((survey.labels == 1).sum()),
        thumbnail_downsample=list(survey.thumb_px), tissue_mask_downsample=list(survey.mask_px),
        qc_flag=survey.qc_flag, seconds=round(seconds, 3), tool_version=__version__,
        **({"tile_codec": codec} if codec else {}),  # else lossless, the default
    ).to_attrs()


def _shrink(image: np.ndarray, image_ds: tuple[float, float], ds: float, size: tuple[int, int]):
    """``image`` (at ``image_ds`` level-0 px per pixel) at ~``ds`` instead, and its exact (x, y) downsample."""
    if ds <= image_ds[0] * 1.01:
        return image, image_ds
    W, H = size
    w, h = max(1, round(W / ds)), max(1, round(H / ds))
    return shrink_picture(image, (w, h)), (W / w, H / h)


def shrink_picture(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An overview shrunk to ``size`` (w, h) for a mask or a thumbnail: OpenCV's area average (the mean
    of the pixels each output pixel covers, 10× faster than a Lanczos resize per channel), channel by
    channel; Pillow's resize for what OpenCV does not take."""
    from pipeline.opencv import cv2

    if image.dtype not in (np.uint8, np.uint16, np.float32) or image.shape[1] < size[0] or image.shape[0] < size[1]:
        return cutting.resize(image, size)
    out = np.empty((size[1], size[0], image.shape[2]), image.dtype)
    for c in range(image.shape[2]):
        out[..., c] = cv2.resize(np.ascontiguousarray(image[..., c]), size, interpolation=cv2.INTER_AREA)
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
