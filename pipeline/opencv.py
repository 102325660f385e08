"""OpenCV for gapless's own pixel work (resampling, blurs, morphology), with its thread pool off.

``from pipeline.opencv import cv2`` instead of ``import cv2``. OpenCV's pool of threads, once started by
a threaded call, is not safe across ``fork()``: a DataLoader worker forked later from the same process
hangs in its first OpenCV call (seen: in ``cv2.setNumThreads`` after the process had tiled a slide). gapless
parallelises by processes (tiling helpers, loader workers), so the pool is turned off before any call:
every OpenCV operation runs on the calling thread. albumentations does the same on import.
"""

import cv2

cv2.setNumThreads(0)

__all__ = ["cv2"]
