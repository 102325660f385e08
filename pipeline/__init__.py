"""gapless: many-instance histology and microscopy, from slides to attention heatmaps."""

import os
import warnings

__version__ = "0.1.0"

# albumentations (pinned at 2.0.8, its last MIT release) must not look for updates at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Snakemake marks a directory output with a .snakemake_timestamp file, which zarr warns about each
# time a tile store (a directory output) is listed; the file is Snakemake's, not a broken store.
SNAKEMAKE_MARKER_WARNING = r"Object at \.snakemake_timestamp is not recognized"
warnings.filterwarnings("ignore", message=SNAKEMAKE_MARKER_WARNING)
