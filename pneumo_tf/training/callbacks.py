"""Keras callbacks for TensorBoard and model selection, plus the HParams dashboard entry of a run.

Layout of a run's log_dir (the one keras.callbacks.TensorBoard uses, so they mix):
  <log_dir>             hparams session and experiment config (`log_hparams`)
  <log_dir>/train       per-step scalars (`StepScalars`), step = optimizer iterations
  <log_dir>/validation  per-epoch challenge mAP, PR curve and box images (`EpochEvaluation`),
                        step = epoch index, like Keras's own `epoch_*` scalars

Place `EpochEvaluation` BEFORE ModelCheckpoint / EarlyStopping in the callback
list: it adds logs["val_map"], which callbacks after it see (Keras passes one
logs dict down the list; History and the progress bar come last).

In multi-worker training every worker gets them, each with its own log_dir (training
gives non-chief workers a scratch folder): val_map drives EarlyStopping on all workers,
which must stop together.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.pr_curve import summary as pr_curve_summary

from pneumo_tf.evaluation import metric
from pneumo_tf.evaluation import postprocess

LEARNING_RATE_TAG = "step/learning_rate"
IMAGES_PER_SECOND_TAG = "step/images_per_second"
EPOCH_IMAGES_PER_SECOND_TAG = "epoch_images_per_second"
LOSS_TAG = "step/loss"
VAL_MAP_TAG = "epoch_val_map"
PR_CURVE_NAME = "image_probability"  # TensorBoard's tag is "<name>/pr_curves"
BOXES_IMAGE_TAG = "validation_boxes"

PR_CURVE_THRESHOLDS = 201
TRUE_BOX_COLOR = (0.0, 1.0, 0.0)
PREDICTED_BOX_COLOR = (1.0, 0.0, 0.0)

DEFAULT_HPARAM_METRICS = (
    ("validation", VAL_MAP_TAG),
    ("validation", "epoch_loss"),
    ("train", "epoch_loss"),
)


def _to_int(variable) -> int:
    # int() fails on the MirroredVariable a distribution strategy makes of the iterations.
    return int(keras.ops.convert_to_numpy(variable))


class StepScalars(keras.callbacks.Callback):
    """Every `every_n_steps` batches, writes to <log_dir>/train at step = optimizer iterations:

    step/learning_rate      the optimizer's rate at that step (a schedule is evaluated
                            there: Keras's `optimizer.learning_rate` does that)
    step/images_per_second  global_batch_size * batches / wall time since the previous
                            logged step (or the epoch start: evaluation between epochs
                            is not training time)
    step/loss               the mean training loss over the batches since the previous
                            logged step (the batch loss when every_n_steps is 1)
    and at each epoch end, at step = epoch, epoch_images_per_second (training only).

    Keras 3 only reports the running mean of the loss since the epoch start; the
    interval mean is recovered from two running means, exactly when batches have
    the same size (training drops the last partial batch).
    Tensors are read only on logged steps, so other steps never wait for the device.
    """

    def __init__(self, log_dir: str, global_batch_size: int, every_n_steps: int = 10):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self._directory = os.path.join(log_dir, "train")
        self._global_batch_size = global_batch_size
        self._every_n_steps = every_n_steps
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self._directory)
        # Counting batches from the optimizer's iterations aligns the logged steps with
        # multiples of every_n_steps, also when training resumes from a checkpoint.
        self._batches_seen = _to_int(self.model.optimizer.iterations)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start_batches = self._batches_seen
        self._epoch_start = time.perf_counter()
        self._mark = (self._epoch_start, self._batches_seen, 0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the index of the epoch's last finished batch (steps_per_execution may skip some).
        epoch_batches = batch + 1
        self._last_batch_end = time.perf_counter()
        previous, self._batches_seen = self._batches_seen, self._epoch_start_batches + epoch_batches
        if self._batches_seen // self._every_n_steps == previous // self._every_n_steps:
            return
        now = time.perf_counter()
        mark_time, mark_batches, mark_epoch_batches, mark_mean_loss = self._mark
        mean_loss = float(logs["loss"])
        interval_loss = (epoch_batches * mean_loss - mark_epoch_batches * mark_mean_loss) / (
            epoch_batches - mark_epoch_batches
        )
        optimizer = self.model.optimizer
        with self._writer.as_default(step=_to_int(optimizer.iterations)):
            tf.summary.scalar(LEARNING_RATE_TAG, float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
            tf.summary.scalar(
                IMAGES_PER_SECOND_TAG,
                (self._batches_seen - mark_batches) * self._global_batch_size / (now - mark_time),
            )
            tf.summary.scalar(LOSS_TAG, interval_loss)
        self._mark = (now, self._batches_seen, epoch_batches, mean_loss)

    def on_epoch_end(self, epoch, logs=None):
        # Training images/s of the epoch up to its last batch (validation runs after it).
        images = (self._batches_seen - self._epoch_start_batches) * self._global_batch_size
        if images:
            with self._writer.as_default(step=epoch):
                tf.summary.scalar(EPOCH_IMAGES_PER_SECOND_TAG, images / (self._last_batch_end - self._epoch_start))
        self._writer.flush()

    def on_train_end(self, logs=None):
        self._writer.close()


class EpochEvaluation(keras.callbacks.Callback):
    """At each epoch end, runs the model once over the finite validation `dataset` and writes
    to <log_dir>/validation:

    epoch_val_map            the challenge mAP (metric.challenge_map) of
                             postprocess.detections at `threshold`, also put in
                             logs["val_map"]; only when `compute_map` (classifiers give
                             no boxes, so their mAP says nothing)
    image_probability        PR curve of postprocess.image_probability against target
    validation_boxes         the first batch's first `max_images` images with true boxes
                             (green) and predicted boxes (red)

    `dataset` yields pipeline batches (postprocess.collect reads them); images with
    target -1 (unlabeled) are left out of the mAP and the PR curve. The
    model is called as `model(batch["image"], training=False)` and must return the
    network's dict outputs. Only per-image boxes, scores and probabilities are kept,
    never the images (except the few drawn). mAP is NaN when no labeled image has a
    true or predicted box (metric.challenge_map); validate on a split with positives,
    since a NaN first val_map becomes ModelCheckpoint's "best" and nothing beats it.
    """

    def __init__(self, dataset: tf.data.Dataset, log_dir: str, *, compute_map: bool, threshold: float = 0.5,
                 max_images: int = 4):
        super().__init__()
        if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError("the validation dataset must be finite: build it with repeat=False")
        self._dataset = dataset
        self._directory = os.path.join(log_dir, "validation")
        self._compute_map = compute_map
        self._threshold = threshold
        self._max_images = max_images
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self._directory)
        # One trace per batch shape (the last batch may be smaller): much faster than eager calls.
        self._predict = tf.function(self._call_model, reduce_retracing=True)

    def _call_model(self, images):
        return self.model(images, training=False)

    def on_epoch_end(self, epoch, logs=None):
        collected = postprocess.collect(self.model, self._dataset, [self._threshold], call=self._predict)
        with self._writer.as_default(step=epoch):
            if self._compute_map:
                val_map = metric.challenge_map(collected.detections[0], collected.ground_truth)
                if logs is not None:
                    logs["val_map"] = val_map
                tf.summary.scalar(VAL_MAP_TAG, val_map)
            if collected.ids:
                write_pr_curve(collected.targets, collected.probabilities, step=epoch)
            if self._max_images:
                tf.summary.image(BOXES_IMAGE_TAG, draw_boxes(self._first_images()), max_outputs=self._max_images)
        self._writer.flush()

    def _first_images(self):
        """(image, true boxes, predicted boxes) of the first batch's first max_images images."""
        batch = next(iter(self._dataset.take(1)))
        found = postprocess.detections(self._predict(batch["image"]), self._threshold)
        images, boxes, counts = batch["image"].numpy(), batch["boxes"].numpy(), batch["num_boxes"].numpy()
        return [(images[i], boxes[i][: counts[i]], found[i][0]) for i in range(min(self._max_images, len(images)))]

    def on_train_end(self, logs=None):
        self._writer.close()


def write_pr_curve(targets, probabilities, step: int) -> None:
    """The PR curve of image probabilities against targets (1 positive), to the default writer."""
    curve = pr_curve_summary.pb(
        PR_CURVE_NAME,
        labels=np.asarray(targets) == 1,
        predictions=np.asarray(probabilities, np.float32),
        num_thresholds=PR_CURVE_THRESHOLDS,
    )
    # TensorBoard has no TF2 PR-curve op (tensorboard#2902): write its protobuf as is.
    tf.summary.experimental.write_raw_pb(curve.SerializeToString(), step=step)


def draw_boxes(images_and_boxes: Iterable[tuple]) -> tf.Tensor:
    """float32 [N, S, S, 3]: each grey image [S, S, 1] in RGB with its predicted boxes in red and
    its true boxes in green on top (boxes normalised yxyx, [K, 4] each)."""
    drawn = []
    for image, true_boxes, predicted_boxes in images_and_boxes:
        # One image at a time: padding boxes of a batched call would be drawn as dots.
        rgb = tf.image.grayscale_to_rgb(tf.convert_to_tensor(image, tf.float32))[None]
        for boxes, color in ((predicted_boxes, PREDICTED_BOX_COLOR), (true_boxes, TRUE_BOX_COLOR)):
            rgb = tf.image.draw_bounding_boxes(rgb, np.asarray(boxes, np.float32).reshape(1, -1, 4), [color])
        drawn.append(rgb[0])
    return tf.stack(drawn)


def log_hparams(log_dir: str, hparams: Mapping[str, object],
                metrics: Iterable[tuple[str, str]] = DEFAULT_HPARAM_METRICS) -> None:
    """Writes the run's hyper-parameters so TensorBoard's HParams dashboard lists it.

    `metrics` are (run subdirectory, scalar tag) pairs shown as the dashboard's
    columns. Values that are not bool, int, float or str (None, lists) are shown as
    text. TensorBoard takes the experiment config (hparam names, metrics) from the
    first run it finds, so runs compared together should log the same names, as
    runs of one trainer do.
    """
    values = {name: value if isinstance(value, (bool, int, float, str)) else str(value)
              for name, value in hparams.items()}
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in values],
            metrics=[hp.Metric(tag, group=group) for group, tag in metrics],
        )
        hp.hparams(values)
    writer.close()
