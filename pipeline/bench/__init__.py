"""``gapless bench``: measured speed ratios, each in one run. :mod:`~pipeline.bench.tiling`: the tiler
against a bare read-only loop over the same grid; :mod:`~pipeline.bench.heads`: each head's training
step against gap's, and the data loader against the model."""
