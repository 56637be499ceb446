"""The RSNA Pneumonia Detection Challenge metric: mean over images of a precision averaged over IoU thresholds.

Per image and IoU threshold t in 0.40, 0.45, ..., 0.75: predictions are taken in
descending confidence (ties keep their input order); each is matched to the
unmatched ground-truth box of highest IoU (ties: the lowest ground-truth index),
and is a hit when that IoU is strictly greater than t; a hit marks the box
matched, a miss leaves every box free for later predictions. Then
precision(t) = TP / (TP + FP + FN) and the image's score is the mean over t.
An image without ground truth scores 0 when it has any prediction and is left
out of the mean when it has none; the dataset score is the mean over the images
not left out, and NaN when every image is left out (no ground truth and no
prediction anywhere: there is nothing to score, and 0 would read as a failure).

Boxes are (x, y, width, height) in source pixels, with continuous coordinates:
a box covers [x, x + width) x [y, y + height) and its area is width * height, as
in the challenge's published evaluation kernel (no "+1" pixel convention).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

# Built from integers and rounded so floating error can neither add nor drop a threshold.
IOU_THRESHOLDS = np.round(np.arange(8) * 0.05 + 0.40, 2)

# Predictions per image: (boxes [N, 4] xywh, confidences [N]).
Prediction = tuple[np.ndarray, np.ndarray]


def as_xywh_array(boxes) -> np.ndarray:
    """Boxes as a float64 [N, 4] array; any empty input ([], (), a zero-size array) gives shape [0, 4]."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] as (x, y, width, height), got {array.shape}")
    return array


def iou_matrix(a, b) -> np.ndarray:
    """IoU of every box of `a` [N, 4] with every box of `b` [M, 4], both (x, y, w, h): [N, M].

    Disjoint or edge-touching boxes give 0, and so do two zero-area boxes (no 0/0).
    """
    a = as_xywh_array(a)[:, None, :]
    b = as_xywh_array(b)[None, :, :]
    overlap_w = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    overlap_h = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    intersection = np.clip(overlap_w, 0.0, None) * np.clip(overlap_h, 0.0, None)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def image_precisions(pred_boxes, scores, gt_boxes) -> np.ndarray | None:
    """precision(t) for each of IOU_THRESHOLDS, or None when the image is left out (no boxes at all).

    The greedy matching runs at every IoU threshold at once.
    """
    pred = as_xywh_array(pred_boxes)
    gt = as_xywh_array(gt_boxes)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(pred),):
        raise ValueError(f"need one confidence per predicted box: {len(pred)} boxes, scores of shape {scores.shape}")
    if len(pred) == 0 and len(gt) == 0:
        return None
    ious = iou_matrix(pred[np.argsort(-scores, kind="stable")], gt)
    rows = np.arange(len(IOU_THRESHOLDS))
    matched = np.zeros((len(IOU_THRESHOLDS), len(gt)), dtype=bool)
    tp = np.zeros(len(IOU_THRESHOLDS), dtype=np.int64)
    # Without ground truth every prediction is a false positive: TP stays 0.
    for k in range(len(pred) if len(gt) else 0):
        # A matched box gets IoU -1: it never beats a free box and never passes a threshold.
        candidates = np.where(matched, -1.0, ious[k])
        best = candidates.argmax(axis=1)
        hit = candidates[rows, best] > IOU_THRESHOLDS
        matched[rows[hit], best[hit]] = True
        tp += hit
    # TP + FP + FN = predictions + ground-truth boxes - TP.
    return tp / (len(pred) + len(gt) - tp)


def image_score(pred_boxes, scores, gt_boxes) -> float | None:
    """The image's mean precision over IOU_THRESHOLDS, or None when it is left out of the mean."""
    precisions = image_precisions(pred_boxes, scores, gt_boxes)
    return None if precisions is None else float(precisions.mean())


_NO_PREDICTION: Prediction = (np.zeros((0, 4)), np.zeros(0))


def _paired(predictions: Mapping[str, Prediction], ground_truth: Mapping) -> Iterator[tuple]:
    """(pred_boxes, scores, gt_boxes) per ground-truth image; an image without predictions gets none."""
    unknown = predictions.keys() - ground_truth.keys()
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted image(s) have no ground truth entry (e.g. {sorted(unknown)[0]!r}): "
            "give negatives an empty box list, and leave unlabeled images out"
        )
    for image_id, gt_boxes in ground_truth.items():
        pred_boxes, scores = predictions.get(image_id, _NO_PREDICTION)
        yield pred_boxes, scores, gt_boxes


def challenge_map(predictions: Mapping[str, Prediction], ground_truth: Mapping) -> float:
    """The challenge score of `predictions` {id: (boxes, scores)} against `ground_truth` {id: boxes}.

    Every ground-truth image is evaluated (one missing from `predictions` has no
    predictions); a prediction for an image absent from `ground_truth` is a
    ValueError, since it cannot be scored and usually means mismatched ids.
    NaN when every image is left out.
    """
    scored = [s for s in (image_score(*pair) for pair in _paired(predictions, ground_truth)) if s is not None]
    return float(np.mean(scored)) if scored else float("nan")
