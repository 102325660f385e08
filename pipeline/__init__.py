"""gapless: many-instance histology and microscopy, from slides to attention heatmaps."""

import os

__version__ = "0.1.0"

# albumentations (pinned at 2.0.8, its last MIT release) must not look for updates at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
