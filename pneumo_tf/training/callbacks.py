"""Keras callbacks for TensorBoard and model selection, plus the HParams dashboard entry of a run.

Layout of a run's log_dir (the one keras.callbacks.TensorBoard uses, so they mix):
  <log_dir>             hparams session and experiment config (`log_hparams`)
  <log_dir>/train       per-step scalars (`StepScalars`), step = optimizer iterations; Keras'
                        TensorBoard callback's epoch_* scalars of the training logs
                        (epoch_trainable_parameters from `TrainableLayers`), step = epoch index
  <log_dir>/validation  per-epoch PR curve and box images (`EpochEvaluation`), and Keras'
                        TensorBoard callback's epoch_* scalars of the val_* logs
                        (epoch_loss, epoch_map, ...), step = epoch index

Place `EpochEvaluation` BEFORE TensorBoard, ModelCheckpoint and EarlyStopping in
the callback list: it adds the val_* logs, which callbacks after it see (Keras
passes one logs dict down the list; History and the progress bar come last). The
backup (BackupAndRestore) goes after them all, so an epoch is marked done only once
everything about it is written.

In multi-worker training every worker gets them, each with its own log_dir (training
gives non-chief workers a scratch folder): val_map drives EarlyStopping on all workers,
which must stop together.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from pneumo_tf.evaluation import collect, metric
from pneumo_tf.evaluation.sweep import DEFAULT_THRESHOLDS
from pneumo_tf.evaluation.visualize import draw_boxes, write_pr_curve
from pneumo_tf.fileio import write_json_atomic
from pneumo_tf.models.architecture import Architecture

LEARNING_RATE_TAG = "step/learning_rate"
IMAGES_PER_SECOND_TAG = "step/images_per_second"
EPOCH_IMAGES_PER_SECOND_TAG = "epoch_images_per_second"
LOSS_TAG = "step/loss"
# keras.callbacks.TensorBoard writes logs["val_map"] to <log_dir>/validation under this tag.
VAL_MAP_TAG = "epoch_map"
BOXES_IMAGE_TAG = "validation_boxes"
DRAWN_THRESHOLD = 0.5  # of the predicted boxes drawn in validation_boxes

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

    def on_epoch_begin(self, epoch, logs=None):
        # Counting batches from the optimizer's iterations aligns the logged steps with multiples
        # of every_n_steps, also when training resumes (read here: the backup restores them after
        # on_train_begin).
        self._batches_seen = _to_int(self.model.optimizer.iterations)
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
    """At each epoch end, runs the network once over the finite validation `dataset` and adds
    to the logs (so TensorBoard, checkpoints and early stopping after it see them):

    val_loss, val_<term>_loss   the architecture's loss terms and their sum, the mean over images
    val_<metric>                the architecture's metrics (val_mask_mean_iou, val_target_auc, ...)
    val_map                     the challenge mAP of the detections at the best of `thresholds`
                                (evaluation's sweep, so the epoch kept is the one evaluation would
                                score best: detectors' scores start low, and a fixed 0.5 would
                                read 0 for epochs that find every box at 0.3), and
    val_map_threshold           that threshold; both only for architectures that give boxes
                                (classifiers' mAP says nothing)

    and writes to <log_dir>/validation at step = epoch:
    image_probability           PR curve of the image probabilities against the targets
    validation_boxes            the first batch's first `max_images` images with true boxes
                                (green) and predicted boxes (red, at 0.5)

    One pass: the split is read and decoded once per epoch, and per image only its boxes,
    scores and probability are kept (evaluation/collect.py), never the images but the few
    drawn. Images with target -1 (unlabeled) are left out of the mAP and the PR curve. mAP
    is NaN when no labeled image has a true or predicted box (metric.challenge_map); validate
    on a split with positives, since a NaN first val_map becomes ModelCheckpoint's "best" and
    nothing beats it.

    Build it outside the strategy's scope: its metrics are plain variables of this process.
    """

    def __init__(self, dataset: tf.data.Dataset, log_dir: str, architecture: Architecture, network: keras.Model,
                 *, thresholds=DEFAULT_THRESHOLDS, max_images: int = 4):
        super().__init__()
        if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError("the validation dataset must be finite: build it with repeat=False")
        self._dataset = dataset
        self._directory = os.path.join(log_dir, "validation")
        self._architecture = architecture
        self._network = network
        self._thresholds = tuple(thresholds)
        self._max_images = max_images
        metrics = architecture.metrics(network)
        self._metric_outputs = [name for name, found in metrics.items() for _ in found]
        self._metrics = [metric for found in metrics.values() for metric in found]
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = tf.summary.create_file_writer(self._directory)
        # One trace per batch shape (the last batch may be smaller): much faster than eager calls.
        self._step = tf.function(self._validate_batch, reduce_retracing=True)

    def _validate_batch(self, batch):
        inputs, labels = self._architecture.to_fit(batch)
        raw = self._network(inputs, training=False)
        terms = self.model.loss_terms(inputs, labels, raw, training=False)
        for name, tracked in zip(self._metric_outputs, self._metrics):
            tracked.update_state(labels[name], raw[name])
        return terms, self._architecture.outputs(self._network, inputs, raw)

    def on_epoch_end(self, epoch, logs=None):
        for tracked in self._metrics:
            tracked.reset_state()
        sums, images, drawn = {}, 0, []

        def run(batch):
            nonlocal images
            terms, outputs = self._step(batch)
            count = int(tf.shape(batch["image"])[0])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value) * count
            images += count
            if not drawn and self._max_images:
                drawn.extend(self._drawable(batch, outputs))
            return outputs

        collected = collect.collect(self._architecture, run, self._dataset, self._thresholds)
        found = {f"val_{name}_loss": total / images for name, total in sums.items()}
        found["val_loss"] = sum(found.values())
        found.update({f"val_{tracked.name}": float(tracked.result()) for tracked in self._metrics})
        if self._architecture.gives_boxes:
            maps = np.array([metric.challenge_map(found_at, collected.ground_truth)
                             for found_at in collected.detections])
            best = int(np.nanargmax(maps)) if not np.isnan(maps).all() else 0
            found["val_map"], found["val_map_threshold"] = float(maps[best]), self._thresholds[best]
        if logs is not None:
            logs.update(found)
        with self._writer.as_default(step=epoch):
            if collected.ids:
                write_pr_curve(collected.targets, collected.probabilities, step=epoch)
            if drawn:
                tf.summary.image(BOXES_IMAGE_TAG, draw_boxes(drawn), max_outputs=self._max_images)
        self._writer.flush()

    def _drawable(self, batch, outputs):
        """(image, true boxes, predicted boxes) of a batch's first max_images images."""
        found = self._architecture.detections({k: np.asarray(v) for k, v in outputs.items()}, DRAWN_THRESHOLD)
        images, boxes, counts = batch["image"].numpy(), batch["boxes"].numpy(), batch["num_boxes"].numpy()
        return [(images[i], boxes[i][: counts[i]], found[i][0]) for i in range(min(self._max_images, len(images)))]

    def on_train_end(self, logs=None):
        self._writer.close()


class StallWatchdog(keras.callbacks.Callback):
    """Ends the process with `message` (one line `error: ...`, exit 2) when no training batch finishes
    for `timeout` seconds within an epoch.

    A trainer whose tf.data service has lost every worker waits for its next batch inside
    TensorFlow's C++ for ever, where no Python exception can reach it; a thread watching the
    batches is what can still act. The clock starts at each epoch and restarts at each batch end;
    the epoch-end evaluation (local) is not watched. A resumed run carries on from the last
    finished epoch.
    """

    def __init__(self, timeout: float, message: str):
        super().__init__()
        self._timeout, self._message = timeout, message
        self._deadline = None
        self._stop = threading.Event()

    def on_train_begin(self, logs=None):
        self._stop.clear()
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def on_epoch_begin(self, epoch, logs=None):
        self._deadline = time.monotonic() + self._timeout

    def on_train_batch_end(self, batch, logs=None):
        self._deadline = time.monotonic() + self._timeout

    def on_epoch_end(self, epoch, logs=None):
        self._deadline = None

    def on_train_end(self, logs=None):
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(min(1.0, self._timeout / 4)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: {self._message}", file=sys.stderr, flush=True)
                os._exit(2)


class BestEpochRecord(keras.callbacks.Callback):
    """Keeps best.json (the best epoch and its value) beside the weights that `checkpoint`, a
    save_best_only ModelCheckpoint placed before it, keeps: whenever the checkpoint's own
    comparison finds a new best, its epoch is written. A resumed run passes the saved value as
    the checkpoint's initial threshold and the saved epoch here, so the export stays the best
    over the killed and the resumed runs together.
    """

    def __init__(self, checkpoint: keras.callbacks.ModelCheckpoint, path: str, epoch: int | None = None):
        super().__init__()
        self.checkpoint, self.path, self.epoch = checkpoint, path, epoch
        self._best = checkpoint.best

    def on_epoch_end(self, epoch, logs=None):
        if self.checkpoint.best == self._best:
            return
        self._best, self.epoch = self.checkpoint.best, epoch
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_json_atomic(self.path, {"epoch": epoch, "value": float(self._best), "monitor": self.checkpoint.monitor})


class TrainableLayers(keras.callbacks.Callback):
    """Trains the layer group `first` (pneumo_tf.models.LAYER_GROUPS) for the first `first_epochs` epochs,
    then all (0: `first` for the whole run): matterport's "heads for N epochs, then all" in one run.

    `set_group(group)` sets the network's trainable flags (the architecture's set_trainable_layers). The
    group follows the epoch at each epoch's start, so a run resumed after a kill (BackupAndRestore
    restores the epoch) trains the stage of the epoch it resumes at; the optimizer is built over every
    variable before the first stage freezes any, so both stages share its state and its checkpoints.
    Each epoch's logs get trainable_parameters (TensorBoard: train/epoch_trainable_parameters). Place it
    before TensorBoard and the checkpoints.
    """

    def __init__(self, set_group: Callable[[str], None], first: str, first_epochs: int = 0):
        super().__init__()
        self._set_group, self._first, self._first_epochs = set_group, first, first_epochs
        self._group = None

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if not optimizer.built:
            with self.model.distribute_strategy.scope():
                optimizer.build(self.model.trainable_variables)
        self._group = None

    def on_epoch_begin(self, epoch, logs=None):
        group = self._first if not self._first_epochs or epoch < self._first_epochs else "all"
        if group != self._group:
            self._set_group(group)
            self._group = group
            self.model.make_train_function(force=True)  # a step traced before froze other variables

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["trainable_parameters"] = float(sum(np.prod(weight.shape)
                                                     for weight in self.model.trainable_variables))


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
