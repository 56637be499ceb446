"""Boxes of several readings of one image -> one set: mirroring back, and fusion by the
`ensemble-boxes` package (weighted boxes fusion, soft-NMS, NMS).

Everything here is numpy on the host, one image at a time, in the contract's space:
Detections = (boxes float32 [N, 4] normalised (ymin, xmin, ymax, xmax), scores float32 [N]),
highest score first. ensemble-boxes works on (xmin, ymin, xmax, ymax) in [0, 1]; the
conversion both ways lives here only.

What each method returns (iou = `iou_threshold`; weights default to 1 per reading):
  wbf       weighted boxes fusion (Solovyev et al., 2021): boxes of all readings whose IoU
            with a cluster's fused box exceeds iou join it; the fused box is the mean of its
            boxes weighted by score x reading weight, its score the mean of score x weight
            over its boxes, times min(readings, boxes in cluster) / sum of weights. So a box
            every reading agrees on keeps its score, and one only a single reading of two
            equal ones found gets half of it.
  nms       the highest-scoring box of each group overlapping by more than iou; scores are
            scaled by weight / largest weight first (readings of equal weight keep theirs).
  soft_nms  ensemble-boxes' Gaussian soft-NMS (sigma 0.5) on the same scaled scores: overlapping
            boxes are dropped only when their decayed score falls under 0.001, and the scores
            returned are the undecayed ones, so it removes far less than nms does.

Score alignment (`align_scores`, `aligned_threshold`): members of an ensemble score on their own
scales (on real radiographs one detector's best threshold is 0.2, another's 0.75, the mask
network's 0.95), and fusion under one threshold then reads each at a different point of its
curve. Aligned, each member's scores go through the piecewise-linear map that sends 0 -> 0, its
own chosen threshold (its anchor) -> 0.5 and 1 -> 1, so the ensemble's threshold 0.5 reads
every member at its own best threshold and moves all of them together from there.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pneumo_tf.models.architecture import Detections, no_detections

FUSION_METHODS = ("wbf", "soft_nms", "nms")
DEFAULT_FUSION = "wbf"
DEFAULT_IOU_THRESHOLD = 0.55  # ensemble-boxes' default for weighted boxes fusion

_YXYX_TO_XYXY = [1, 0, 3, 2]  # the same permutation maps back

ALIGNMENTS = ("none", "threshold")
ALIGNED_ANCHOR = 0.5  # where every member's own threshold lands


def align_scores(scores, anchor: float) -> np.ndarray:
    """float32 scores in [0, 1] -> the same through the piecewise-linear map 0 -> 0, anchor -> 0.5, 1 -> 1."""
    scores = np.asarray(scores, np.float64)
    low = scores * (ALIGNED_ANCHOR / anchor)
    high = ALIGNED_ANCHOR + (scores - anchor) * ((1.0 - ALIGNED_ANCHOR) / (1.0 - anchor))
    return np.where(scores <= anchor, low, high).astype(np.float32)


def aligned_threshold(threshold: float, anchor: float) -> float:
    """The threshold on a member's own scale that `align_scores` maps to `threshold` (its inverse)."""
    if threshold <= ALIGNED_ANCHOR:
        return float(threshold * anchor / ALIGNED_ANCHOR)
    return float(anchor + (threshold - ALIGNED_ANCHOR) * (1.0 - anchor) / (1.0 - ALIGNED_ANCHOR))


def mirror(detections: Detections) -> Detections:
    """Detections of a left-right mirrored image, mapped to the original image (and back again).

    A box over columns [xmin, xmax) of the mirrored image covers [1 - xmax, 1 - xmin) of the
    original; rows and scores do not change.
    """
    boxes, scores = detections
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    mirrored = np.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]], axis=-1)
    return mirrored.astype(np.float32), np.asarray(scores, np.float32)


def fuse(readings: Sequence[Detections], weights: Sequence[float] | None = None, method: str = DEFAULT_FUSION,
         iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> Detections:
    """One image's detections from several readings (models, views) -> one set, highest score first."""
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}: one of {', '.join(FUSION_METHODS)}")
    weights = np.ones(len(readings)) if weights is None else np.asarray(weights, np.float64)
    if len(weights) != len(readings):
        raise ValueError(f"need one weight per reading: {len(readings)} readings, {len(weights)} weights")
    boxes = [np.clip(np.asarray(found, np.float64).reshape(-1, 4), 0.0, 1.0)[:, _YXYX_TO_XYXY]
             for found, _ in readings]
    scores = [np.asarray(found, np.float64).reshape(-1) for _, found in readings]
    labels = [np.zeros(len(found)) for found in scores]
    # Imported on first fusion: it imports numba, which takes seconds that plain reads should not pay.
    import ensemble_boxes

    if not any(len(found) for found in scores):
        # ensemble-boxes' NMS cannot concatenate zero results: nothing in, nothing out.
        return no_detections()
    if method == "wbf":
        fused, fused_scores, _ = ensemble_boxes.weighted_boxes_fusion(
            boxes, scores, labels, weights=weights, iou_thr=iou_threshold, skip_box_thr=0.0, conf_type="avg")
    else:
        # ensemble-boxes divides NMS scores by the sum of the weights, which would halve the scores of
        # two equal readings; scaled by the largest weight here instead, its own weights stay unset.
        scaled = [found * weight / weights.max() for found, weight in zip(scores, weights)]
        nms_method = ensemble_boxes.nms if method == "nms" else ensemble_boxes.soft_nms
        fused, fused_scores, _ = nms_method(boxes, scaled, labels, iou_thr=iou_threshold)
    order = np.argsort(-np.asarray(fused_scores), kind="stable")
    fused = np.asarray(fused, np.float64).reshape(-1, 4)[order][:, _YXYX_TO_XYXY]
    return fused.astype(np.float32), np.asarray(fused_scores, np.float32)[order]
