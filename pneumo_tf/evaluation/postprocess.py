"""Model outputs -> image probabilities and detections: the one place that does it.

Evaluation, prediction, the web page and the training callbacks all call these
functions, so a box means the same thing everywhere. `outputs` is the dict a
registry model returns (see pneumo_tf.models), as numpy arrays or tensors:
"target" [B, 1] and/or "mask" [B, S, S, 1], probabilities in [0, 1].

Models with a "mask" output give boxes: one per connected component of the
thresholded mask (`mask_resnet.boxes_from_mask`). Pure classifiers (only a
"target" output) give image-level decisions only: `detections` returns no boxes
for them, so their challenge score is 0 on every image with ground truth.

`collect` runs a model once over a pipeline dataset and keeps what evaluation and the
epoch-end callback score: per image, its probability, labels, true boxes and detections.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from pneumo_tf.evaluation import metric
from pneumo_tf.data.boxes import normalised_to_xywh
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


def model_outputs(network, dataset, call=None) -> Iterator[tuple[dict, dict]]:
    """(batch, outputs) as numpy dicts for each batch of a finite pipeline dataset.

    `call(images)` runs the model; by default a tf.function made here (pass one to reuse
    its traces across calls, as the epoch-end callback does).
    """
    import tensorflow as tf

    if call is None:
        # One trace per batch shape (the last batch may be smaller): much faster than eager calls.
        call = tf.function(lambda images: network({"image": images}, training=False), reduce_retracing=True)
    for batch in dataset:
        outputs = {name: value.numpy() for name, value in call(batch["image"]).items()}
        yield {key: value.numpy() for key, value in batch.items()}, outputs


def challenge_detections(outputs, batch, threshold: float) -> list[tuple[np.ndarray, np.ndarray, metric.Prediction]]:
    """Per image of a batch: (boxes yxyx normalised, scores, (boxes xywh in source pixels, scores))."""
    found = []
    for index, (boxes, scores) in enumerate(detections(outputs, threshold)):
        source = int(batch["source_height"][index]), int(batch["source_width"][index])
        found.append((boxes, scores, to_challenge(boxes, scores, *source)))
    return found


@dataclasses.dataclass
class Collected:
    """What one pass over a split keeps per labeled image (images with target -1 are only counted)."""

    ids: list[str]
    probabilities: np.ndarray  # float32 [N]
    targets: np.ndarray  # int [N]
    classes: np.ndarray  # int [N], -1 where the class is unknown
    ground_truth: dict[str, np.ndarray]  # id -> boxes xywh in source pixels
    detections: list[dict[str, metric.Prediction]]  # one {id: (boxes xywh, scores)} per threshold
    unlabeled: int


def collect(network, dataset, thresholds, call=None) -> Collected:
    """Runs the model once over a finite pipeline dataset, keeping per-image results only
    (see model_outputs for `call`)."""
    ids, probabilities, targets, classes = [], [], [], []
    ground_truth: dict[str, np.ndarray] = {}
    detections: list[dict[str, metric.Prediction]] = [{} for _ in thresholds]
    unlabeled = 0
    for batch, outputs in model_outputs(network, dataset, call):
        probability = image_probability(outputs)
        found = [challenge_detections(outputs, batch, threshold) for threshold in thresholds]
        for index, image_id in enumerate(batch["id"]):
            if batch["target"][index] < 0:
                unlabeled += 1
                continue
            image_id = image_id.decode()
            if image_id in ground_truth:
                raise ValueError(f"the dataset yields image {image_id} twice: read the split once")
            true_boxes = batch["boxes"][index][: batch["num_boxes"][index]]
            # Source pixels, as a submission is scored against the labels CSV.
            ground_truth[image_id] = yxyx_to_xywh(
                true_boxes, int(batch["source_height"][index]), int(batch["source_width"][index])
            )
            for per_threshold, kept in zip(found, detections):
                kept[image_id] = per_threshold[index][2]
            ids.append(image_id)
            probabilities.append(probability[index])
            targets.append(batch["target"][index])
            classes.append(batch["class"][index])
    return Collected(ids, np.asarray(probabilities, np.float32), np.asarray(targets, np.int64),
                     np.asarray(classes, np.int64), ground_truth, detections, unlabeled)
