"""gapless: many-instance histology and microscopy, from slides to attention heatmaps."""

__version__ = "0.1.0"
