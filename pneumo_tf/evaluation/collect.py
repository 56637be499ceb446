"""The evaluation pass: a reading over one split, once, keeping per image what scoring needs (`collect`).

Evaluation (evaluation/report.py) and training's epoch-end validation run it; prediction and
the web page share its steps: `run_batches` (the model calls) and `challenge_detections` (a
batch's outputs -> each image's detections in the challenge's space: boxes (x, y, width,
height) in the source image's pixels). What the outputs mean (boxes and image probability) is
the reading's to say (pneumo_tf.models.architecture.ReadsOutputs); per image only the
probability, target, class, true boxes and the detections at each threshold are kept, never
the images.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pneumo_tf.evaluation import metric
from pneumo_tf.models.architecture import Detections, ReadsOutputs


def yxyx_to_xywh(boxes_yxyx, source_height: int, source_width: int) -> np.ndarray:
    """Normalised (ymin, xmin, ymax, xmax) [N, 4] -> (x, y, width, height) float64 [N, 4] in source pixels."""
    ymin, xmin, ymax, xmax = np.asarray(boxes_yxyx, dtype=np.float64).reshape(-1, 4).T
    return np.stack(
        [xmin * source_width, ymin * source_height, (xmax - xmin) * source_width, (ymax - ymin) * source_height],
        axis=-1,
    )


def to_challenge(detections: Detections, source_height: int, source_width: int) -> metric.Prediction:
    """One image's detections in the challenge's space: (boxes xywh float64 [N, 4] in source pixels, scores
    float64 [N])."""
    boxes_yxyx, scores = detections
    boxes = yxyx_to_xywh(boxes_yxyx, source_height, source_width)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"need one score per box: {len(boxes)} boxes, {len(scores)} scores")
    return boxes, scores


def _as_numpy(outputs):
    """Tensors anywhere in nested dicts and lists -> numpy arrays (a reading's outputs nest per member)."""
    if isinstance(outputs, dict):
        return {name: _as_numpy(value) for name, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return [_as_numpy(value) for value in outputs]
    return np.asarray(outputs)


def run_batches(infer: Callable, dataset) -> Iterator[tuple[dict, dict]]:
    """(batch, outputs) as numpy for each batch of a finite pipeline dataset; `infer(batch)`
    takes the batch's tensors and returns the outputs its reading reads."""
    for batch in dataset:
        outputs = _as_numpy(infer(batch))
        yield {key: value.numpy() for key, value in batch.items()}, outputs


def challenge_detections(reading: ReadsOutputs, outputs, batch: dict,
                         threshold: float) -> list[tuple[Detections, metric.Prediction]]:
    """Per image of a batch: (its detections, the same in the challenge's space)."""
    found = []
    for index, detections in enumerate(reading.detections(outputs, threshold)):
        source = int(batch["source_height"][index]), int(batch["source_width"][index])
        found.append((detections, to_challenge(detections, *source)))
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


def collect(reading: ReadsOutputs, infer: Callable, dataset, thresholds) -> Collected:
    """Runs the model once over a finite pipeline dataset (see run_batches for `infer`), keeping
    per-image results only."""
    return collect_readings([reading], infer, dataset, thresholds)[0]


def collect_readings(readings: Sequence[ReadsOutputs], infer: Callable, dataset, thresholds) -> list[Collected]:
    """`collect` for several readings of the same outputs (an ensemble and each of its parts) in one pass."""
    ids, targets, classes = [], [], []
    probabilities: list[list[float]] = [[] for _ in readings]
    ground_truth: dict[str, np.ndarray] = {}
    detections = [[{} for _ in thresholds] for _ in readings]
    unlabeled = 0
    for batch, outputs in run_batches(infer, dataset):
        labeled = []
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
            ids.append(image_id)
            targets.append(batch["target"][index])
            classes.append(batch["class"][index])
            labeled.append((index, image_id))
        for reading, kept_probabilities, kept_detections in zip(readings, probabilities, detections):
            probability = reading.image_probability(outputs)
            kept_probabilities += [probability[index] for index, _ in labeled]
            for threshold, kept in zip(thresholds, kept_detections):
                found = challenge_detections(reading, outputs, batch, threshold)
                kept.update({image_id: found[index][1] for index, image_id in labeled})
    return [Collected(ids, np.asarray(kept_probabilities, np.float32), np.asarray(targets, np.int64),
                      np.asarray(classes, np.int64), ground_truth, kept_detections, unlabeled)
            for kept_probabilities, kept_detections in zip(probabilities, detections)]
