"""Tile a slide or cell image into a zarr v3 store at a target µm/px (the store's layout: :mod:`pipeline.store`).

- :mod:`~pipeline.tiling.grid`: the settings of ``gapless tile``, the pyramid level and read size for a
  target µm/px, the tile grid and each tile's tissue fraction;
- :mod:`~pipeline.tiling.cutting`: cutting tiles into whole shards, over processes, each with its own
  reader (OpenSlide handles are not shared) and writing whole shards (partial-shard writes from
  several writers lose data in zarr 3), through zarrs (zarr-python's codec pipeline in Rust);
- :mod:`~pipeline.tiling.tiler`: ``tile_source``, in steps, written under ``<out>.partial`` and renamed
  to ``<out>`` only when complete.
"""

from pipeline.tiling.cutting import MIN_TILES_PER_WORKER, ChannelStats, effective_workers, shard_tiles
from pipeline.tiling.grid import TileGrid, TileSettings, plan_grid, tissue_fractions
from pipeline.tiling.tiler import TileResult, tile_source

__all__ = [
    "MIN_TILES_PER_WORKER",
    "ChannelStats",
    "TileGrid",
    "TileResult",
    "TileSettings",
    "effective_workers",
    "plan_grid",
    "shard_tiles",
    "tile_source",
    "tissue_fractions",
]
