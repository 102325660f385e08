"""The slide level: a slide's tile embeddings on its tile grid, the same registered heads over them,
trained from slide labels alone (:mod:`.train`), and their maps on the slide (:mod:`.heatmap`).

Only the data path knows the scale: :mod:`.bags` turns an embedding store (:mod:`pipeline.embed`) into
the B×D×h×w grid and the mask every head takes (``extra["mask"]``); the heads, ``HeadOutput``, the
canvas, normalisation, scores and heatmap files are the tile level's.
"""
