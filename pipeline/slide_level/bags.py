"""A slide as the heads see it at the slide level: its tile embeddings laid on its tile grid.

A slide's embedding store (:mod:`pipeline.embed`) holds one D-vector per tissue tile and the tile's
(row, column) on the slide's tile grid. ``SlideBag`` is that grid cropped to the tiles' bounding box:
a D×h×w float grid, zero where no tile is (a hole: background, or tissue the tiler left out), and a
1×h×w mask, True at the tiles — the same B×C×h×w input the heads take within a tile, with the mask
in ``extra["mask"]`` so no head pools over holes. Several slides in one batch are padded to the
largest grid (more holes). Memory: one slide's grid is D·h·w float32 (a 40× slide tiled at 224 px
and 0.5 µm/px, ~180 × 220 positions at D = 512: 81 MB); ``SlideBags`` reads each slide from its
store when asked and keeps at most ``cache_mb`` of them as float16.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import GaplessError


@dataclass
class SlideBag:
    """One slide on its tile grid: ``grid`` D×h×w, ``mask`` h×w bool, and where each tile went."""

    sample_id: str
    grid: np.ndarray  # (D, h, w) float16 or float32, 0 at holes
    mask: np.ndarray  # (h, w) bool, True where a tile is
    rows: np.ndarray  # (N,) each tile's row in ``grid``
    cols: np.ndarray  # (N,) each tile's column in ``grid``
    coords: np.ndarray  # (N, 2) level-0 top-left (x, y) of each tile
    origin: tuple[int, int]  # the (row, column) of the slide's tile grid at grid[:, 0, 0]

    @property
    def n_tiles(self) -> int:
        return int(len(self.rows))


def bag_from_embeddings(emb, sample_id: str, dtype=np.float32) -> SlideBag:
    """``SlideBag`` of an ``Embeddings`` (:func:`pipeline.embed.read_embeddings`): its tiles placed at
    their grid positions, cropped to their bounding box. Two tiles at one position: GaplessError."""
    grid_pos = np.asarray(emb.grid, np.int64)
    features = np.asarray(emb.features)
    if len(grid_pos) == 0:
        raise GaplessError(getattr(emb, "path", None) or sample_id, "the embedding store holds no tiles",
                           "re-tile the slide (is it empty? see results/tiles/qc.tsv) and embed it again")
    r0, c0 = grid_pos.min(axis=0)
    rows, cols = grid_pos[:, 0] - r0, grid_pos[:, 1] - c0
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    flat = rows * w + cols
    if len(np.unique(flat)) != len(flat):
        raise GaplessError(getattr(emb, "path", None) or sample_id, "two tiles share one grid position",
                           "embed the slide again from a tile store tiled without overlap (stride = tile size)")
    grid = np.zeros((features.shape[1], h * w), dtype)
    grid[:, flat] = features.T
    mask = np.zeros(h * w, bool)
    mask[flat] = True
    return SlideBag(sample_id, grid.reshape(-1, h, w), mask.reshape(h, w), rows, cols,
                    np.asarray(emb.coords, np.int64), (int(r0), int(c0)))


class SlideBags:
    """The slides of a cohort by sample id, read from their embedding stores on demand (``cache_mb`` kept).

    ``bag(sample_id)`` → ``SlideBag`` (float16 grid); ``dim`` the embedding width, checked alike for all.
    """

    def __init__(self, stores: Mapping[str, str | Path], cache_mb: float = 4096):
        from pipeline.embed import read_embeddings

        self.stores = {k: Path(v) for k, v in stores.items()}
        self._read = read_embeddings
        self._cache: OrderedDict[str, SlideBag] = OrderedDict()
        self._bytes, self._budget = 0, cache_mb * 2**20
        self.attrs: dict[str, dict] = {}
        dims = {}
        for sample_id, path in self.stores.items():
            attrs = self._read(path, arrays=False).attrs
            self.attrs[sample_id] = attrs
            dims.setdefault(int(attrs["dim"]), sample_id)
        if len(dims) > 1:
            (d1, s1), (d2, s2) = list(dims.items())[:2]
            raise GaplessError(self.stores[s2], f"embeddings of width {d2}, but {s1}'s are {d1}",
                               "embed every slide of the cohort with the same encoder")
        self.dim = next(iter(dims)) if dims else 0

    def bag(self, sample_id: str) -> SlideBag:
        if sample_id in self._cache:
            self._cache.move_to_end(sample_id)
            return self._cache[sample_id]
        emb = self._read(self.stores[sample_id])
        bag = bag_from_embeddings(emb, sample_id, np.float16)
        self._cache[sample_id] = bag
        self._bytes += bag.grid.nbytes
        while self._bytes > self._budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.grid.nbytes
        return bag


def collate(bags: Sequence[SlideBag]):
    """Bags → (B×D×H×W float32 tensor, B×1×H×W bool mask), padded to the largest grid (padding masked)."""
    import torch

    h = max(b.grid.shape[1] for b in bags)
    w = max(b.grid.shape[2] for b in bags)
    d = bags[0].grid.shape[0]
    x = torch.zeros(len(bags), d, h, w)
    mask = torch.zeros(len(bags), 1, h, w, dtype=torch.bool)
    for i, b in enumerate(bags):
        _, bh, bw = b.grid.shape
        x[i, :, :bh, :bw] = torch.from_numpy(np.asarray(b.grid, np.float32))
        mask[i, 0, :bh, :bw] = torch.from_numpy(b.mask)
    return x, mask
