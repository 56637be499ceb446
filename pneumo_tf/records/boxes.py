"""Box conventions, in one place.

* Challenge / CSV space: (x, y, width, height) in source pixels (1024 for RSNA).
* Records: (xmin, ymin, xmax, ymax) normalised to [0, 1] of the source image.
* Batches and models: (ymin, xmin, ymax, xmax) normalised, TensorFlow's order
  (`tf.image.draw_bounding_boxes`, `crop_and_resize`).
"""
from __future__ import annotations

import numpy as np

# Boxes per image a batch holds (RSNA has at most 4); more are dropped by the pipeline.
MAX_BOXES = 8


def xywh_to_normalised(box, source_width: int, source_height: int):
    """(x, y, w, h) in pixels -> (xmin, ymin, xmax, ymax) in [0, 1], clipped."""
    x, y, w, h = (float(v) for v in box)
    return (
        min(max(x / source_width, 0.0), 1.0),
        min(max(y / source_height, 0.0), 1.0),
        min(max((x + w) / source_width, 0.0), 1.0),
        min(max((y + h) / source_height, 0.0), 1.0),
    )


def rasterize(boxes, height: int, width: int) -> np.ndarray:
    """The union of normalised (xmin, ymin, xmax, ymax) boxes as a bool mask of height x width.

    A box covers rows round(ymin * height) .. round(ymax * height) - 1 (and likewise
    columns), so whole-pixel boxes at source size come out exact.
    """
    mask = np.zeros((height, width), dtype=bool)
    for xmin, ymin, xmax, ymax in boxes:
        top, bottom = int(round(ymin * height)), int(round(ymax * height))
        left, right = int(round(xmin * width)), int(round(xmax * width))
        mask[top:bottom, left:right] = True
    return mask
