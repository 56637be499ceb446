"""Model outputs -> image probabilities and detections: the one place that does it.

Evaluation, prediction, the web page and the training callbacks all call these
functions, so a box means the same thing everywhere. `outputs` is the dict a
registry model returns (see pneumo_tf.models), as numpy arrays or tensors:
"target" [B, 1] and/or "mask" [B, S, S, 1], probabilities in [0, 1].

Models with a "mask" output give boxes: one per connected component of the
thresholded mask (`mask_resnet.boxes_from_mask`). Pure classifiers (only a
"target" output) give image-level decisions only: `detections` returns no boxes
for them, so their challenge score is 0 on every image with ground truth.
"""
from __future__ import annotations

import numpy as np

from pneumo_tf.boxes import normalised_to_xywh
from pneumo_tf.models.mask_resnet import boxes_from_mask

# Detections of one image: (boxes float32 [N, 4] normalised (ymin, xmin, ymax, xmax), scores float32 [N]).
Detections = tuple[np.ndarray, np.ndarray]


def _output(outputs, name: str) -> np.ndarray | None:
    return np.asarray(outputs[name], dtype=np.float32) if name in outputs else None


def image_probability(outputs) -> np.ndarray:
    """float32 [B]: the "target" output when the model has one, else the largest mask probability per image."""
    target = _output(outputs, "target")
    if target is not None:
        return target.reshape(len(target))
    mask = _output(outputs, "mask")
    if mask is not None:
        return mask.reshape(len(mask), -1).max(axis=1)
    raise ValueError(f"outputs need a 'target' or a 'mask' entry, got {sorted(outputs)}")


def detections(outputs, threshold: float) -> list[Detections]:
    """Per image, the boxes of the mask thresholded at `threshold` and their scores, highest first.

    Classifiers (no "mask" output) give empty arrays for every image; their
    decision is `image_probability`.
    """
    mask = _output(outputs, "mask")
    if mask is not None:
        return [boxes_from_mask(image_mask[..., 0], threshold) for image_mask in mask]
    images = len(image_probability(outputs))
    return [(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)) for _ in range(images)]


def yxyx_to_xywh(boxes_yxyx, source_height: int, source_width: int) -> np.ndarray:
    """Normalised (ymin, xmin, ymax, xmax) [N, 4] -> (x, y, width, height) float64 [N, 4] in source pixels."""
    boxes = np.asarray(boxes_yxyx, dtype=np.float64).reshape(-1, 4)
    return np.array(
        [normalised_to_xywh((xmin, ymin, xmax, ymax), source_width, source_height) for ymin, xmin, ymax, xmax in boxes],
        dtype=np.float64,
    ).reshape(-1, 4)


def to_challenge(boxes_yxyx, scores, source_height: int, source_width: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's detections in the challenge's space: (boxes (x, y, w, h) float64 [N, 4] in source pixels, scores float64 [N])."""
    boxes = yxyx_to_xywh(boxes_yxyx, source_height, source_width)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"need one score per box: {len(boxes)} boxes, {len(scores)} scores")
    return boxes, scores
