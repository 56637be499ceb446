"""Training: `train_and_evaluate(config)` builds the model under the strategy, fits it on the
records' input pipeline with on-device augmentation, and exports it.

Layout of `config.model_dir` after a run:
  logs/           TensorBoard events (train/, validation/, hparams, profiler trace)
  backup/         BackupAndRestore state: a killed run resumes from its last finished epoch
  checkpoints/    weights after every epoch, the best by the monitored metric, and best.json
                  (its epoch and value, carried across a resume)
  model.keras     the exported network (Keras format; predict, evaluate and serve load it)
  saved_model/    the same network as a TensorFlow SavedModel for TF Serving
  pneumo_tf.json  what a reader needs: model name, image size, decision threshold, metrics
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time

import keras
import tensorflow as tf

from pneumo_tf import models
from pneumo_tf.data import augment
from pneumo_tf.training import callbacks as callbacks_lib
from pneumo_tf.training import distribute
from pneumo_tf.data import pipeline
from pneumo_tf.errors import UserError
from pneumo_tf.fileio import write_json_atomic
from pneumo_tf.records.manifest import read_manifest

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
INFO_FILE = "pneumo_tf.json"
# --learning_rate is given for this global batch and scaled linearly with the real one.
REFERENCE_BATCH_SIZE = 16  # the seed report's batch: flagfiles carry its learning rates as they were


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    records_dir: str
    model_dir: str
    model: str = "mask_resnet"
    model_options: dict = dataclasses.field(default_factory=dict)
    image_size: int = 256
    batch_size: int = 16  # global: split across replicas
    epochs: int = 25
    steps_per_epoch: int = 0  # 0: one pass over the train split
    validation_steps: int = 0  # 0: the whole val split
    learning_rate: float = 7e-4  # for a global batch of REFERENCE_BATCH_SIZE; cosine-decayed
    strategy: str = "auto"
    cpu_replicas: int = 0
    tpu: str | None = None
    precision: str = "float32"
    positive_fraction: float | None = None
    cache: bool = False
    augment: bool = True
    early_stopping_patience: int = 15
    seed: int = 0
    log_every_steps: int = 10
    profile_steps: tuple[int, int] | None = None
    max_validation_images: int = 4

    def validate(self) -> None:
        for name in ("image_size", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, not {getattr(self, name)}")
        if self.steps_per_epoch < 0 or self.validation_steps < 0:
            raise UserError("--steps_per_epoch and --validation_steps must be >= 0")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, not {self.learning_rate}")
        if self.model not in models.BUILDERS:
            raise UserError(f"unknown model {self.model!r}; known models: {', '.join(sorted(models.BUILDERS))}")


def fit_example(batch: dict, output_names) -> tuple[dict, dict]:
    """A pipeline batch -> (inputs, labels) as `fit` takes them.

    Labels are the batch keys named like the network's outputs, shaped like them ("target"
    becomes float [B, 1]); inputs keep what augmentation needs besides them (image, boxes,
    num_boxes). Strings and other metadata stay out: they could not enter an XLA step.
    """
    labels = {}
    for name in output_names:
        value = tf.cast(batch[name], tf.float32)
        labels[name] = value[:, None] if name == "target" else value
    inputs = {key: batch[key] for key in ("image", "boxes", "num_boxes")}
    return inputs, labels


class AugmentingTrainer(keras.Model):
    """Wraps a network so each training step augments its batch on the device first.

    Data are (inputs, labels) pairs from `fit_example`. Only the inner `network` is
    exported: the wrapper exists for fit().
    """

    def __init__(self, network: keras.Model, augment_config: augment.AugmentConfig, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.augment_config = augment_config
        self.seed = seed
        self.set_data_spec(None)

    def set_data_spec(self, spec) -> None:
        """The (inputs, labels) KerasTensors of one batch, used to build metrics before fit."""
        # Set past Keras' attribute tracking, which would turn the dicts into tracked
        # containers that the symbolic build then unpacks wrongly.
        object.__setattr__(self, "data_spec", spec)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds metrics from a real first batch that it all-reduces across replicas:
        # under MultiWorkerMirroredStrategy that fails for dict batches (and moves every
        # pixel over the network). The batch's specs build the same state.
        if iterator is not None and self.data_spec is not None:
            iterator, data_batch = None, self.data_spec
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def call(self, inputs, training=False):
        image = inputs["image"] if isinstance(inputs, dict) else inputs
        return self.network({"image": image}, training=training)

    def train_step(self, data):
        inputs, labels = data
        if self.augment_config != augment.AugmentConfig.off():
            # The optimizer's step makes every step's draw different and a resumed run repeat it.
            step_seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
            # Image, mask and boxes move together; other labels pass through.
            batch = augment.augment_batch({**inputs, **labels}, augment.replica_seed(step_seed), self.augment_config)
            inputs = {key: batch[key] for key in inputs}
            labels = {key: batch[key] for key in labels}
        return self._reducible(super().train_step(({"image": inputs["image"]}, labels)))

    def test_step(self, data):
        inputs, labels = data
        return self._reducible(super().test_step(({"image": inputs["image"]}, labels)))

    def _reducible(self, logs: dict) -> dict:
        # Keras 3 reduces step logs under MultiWorkerMirroredStrategy with reduce(MEAN, axis=0),
        # which fails on scalars (tensorflow/tensorflow#72388); a leading axis of 1 makes that
        # reduction the mean over replicas.
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs


class BestSoFar(keras.callbacks.Callback):
    """Keeps the best epoch and value of the monitored metric in best.json beside best.weights.h5.

    It decides as ModelCheckpoint(save_best_only) does (strictly better; NaN never is), so the
    two agree; a resumed run passes `value` as that checkpoint's initial threshold, so an epoch
    worse than one before the kill does not replace the best weights. A fresh run starts over.
    """

    def __init__(self, path: str, monitor: str, mode: str, resuming: bool):
        super().__init__()
        self.path, self.monitor, self.mode = path, monitor, mode
        self.value, self.epoch = None, None
        if resuming and os.path.isfile(path):
            with open(path) as handle:
                saved = json.load(handle)
            self.value, self.epoch = saved["value"], saved["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is None or math.isnan(float(current)):
            return
        current = float(current)
        if self.value is None or (current > self.value if self.mode == "max" else current < self.value):
            self.value, self.epoch = current, epoch
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json_atomic(self.path, {"epoch": epoch, "value": current, "monitor": self.monitor})


def _learning_rate(config: TrainConfig, total_steps: int):
    peak = config.learning_rate * config.batch_size / REFERENCE_BATCH_SIZE
    # The seed's cosine annealing, per step instead of per epoch.
    return peak, keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(total_steps, 1))


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0)


def _worker_dir(model_dir: str, strategy) -> str:
    """Where this worker writes: the chief writes model_dir, others a scratch folder (MWMS rule)."""
    if _is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return os.path.join(model_dir, "workers", f"{resolver.task_type}_{resolver.task_id}")


def train_and_evaluate(config: TrainConfig) -> dict:
    """Trains `config.model` on `config.records_dir` and exports it to `config.model_dir`."""
    config.validate()
    train_examples = pipeline.num_examples(config.records_dir, "train")
    val_examples = pipeline.num_examples(config.records_dir, "val")
    distribute.set_precision(config.precision)
    strategy = distribute.make_strategy(config.strategy, config.cpu_replicas, config.tpu)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise UserError(f"--batch_size {config.batch_size} must be a multiple of the {replicas} replicas")
    steps_per_epoch = config.steps_per_epoch or max(1, train_examples // config.batch_size)
    validation_steps = config.validation_steps or max(1, -(-val_examples // config.batch_size))
    peak_rate, schedule = _learning_rate(config, steps_per_epoch * config.epochs)
    output_dir = _worker_dir(config.model_dir, strategy)
    log_dir = os.path.join(output_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)

    with strategy.scope():
        network = models.build_model(config.model, config.image_size, **config.model_options)
        trainer = AugmentingTrainer(
            network, augment.AugmentConfig() if config.augment else augment.AugmentConfig.off(), config.seed
        )
        trainer.compile(optimizer=keras.optimizers.Adam(schedule), **models.compile_args(network))
        trainer.build({"image": (None, config.image_size, config.image_size, 1)})

    to_fit = functools.partial(fit_example, output_names=tuple(network.output_names))
    train_data = pipeline.distributed_dataset(
        strategy, config.records_dir, "train", config.batch_size, config.image_size, training=True, map_fn=to_fit,
        positive_fraction=config.positive_fraction, cache=config.cache, seed=config.seed,
    )
    val_data = pipeline.distributed_dataset(
        strategy, config.records_dir, "val", config.batch_size, config.image_size, training=False, map_fn=to_fit,
        cache=config.cache,
    )
    # The epoch-end report streams the val split once, on the chief's own pipeline.
    report_data = pipeline.make_dataset(
        config.records_dir, "val", config.batch_size, config.image_size, training=False, cache=config.cache
    )
    trainer.set_data_spec(tf.nest.map_structure(
        lambda spec: keras.KerasTensor(spec.shape, spec.dtype.name), report_data.map(to_fit).element_spec
    ))
    has_mask = "mask" in network.output_names
    monitor = "val_map" if has_mask else "val_loss"
    mode = "max" if has_mask else "min"
    checkpoints = os.path.join(output_dir, "checkpoints")
    best_path = os.path.join(checkpoints, "best.weights.h5")
    resuming = os.path.isdir(os.path.join(output_dir, "backup"))
    best_so_far = BestSoFar(os.path.join(checkpoints, "best.json"), monitor, mode, resuming)
    fit_callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup")),
        callbacks_lib.StepScalars(log_dir, config.batch_size, every_n_steps=config.log_every_steps),
        # Before the checkpoint and early stopping callbacks: it adds val_map to the logs.
        callbacks_lib.EpochEvaluation(
            report_data, log_dir, max_images=config.max_validation_images, compute_map=has_mask
        ),
        keras.callbacks.TensorBoard(
            log_dir, update_freq="epoch", profile_batch=config.profile_steps or 0, write_graph=False
        ),
        keras.callbacks.ModelCheckpoint(os.path.join(checkpoints, "epoch-{epoch:03d}.weights.h5"), save_weights_only=True),
        keras.callbacks.ModelCheckpoint(
            best_path, monitor=monitor, mode=mode, save_best_only=True, save_weights_only=True,
            initial_value_threshold=best_so_far.value,
        ),
        best_so_far,
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=config.early_stopping_patience, min_delta=0.0005,
        ),
    ]
    hparams = {
        "model": config.model, "image_size": config.image_size, "batch_size": config.batch_size,
        "learning_rate": peak_rate, "precision": config.precision, "replicas": replicas,
        "positive_fraction": config.positive_fraction or 0.0, "augment": config.augment,
    }
    callbacks_lib.log_hparams(log_dir, hparams)

    started = time.perf_counter()
    with pipeline.naming_bad_records(config.records_dir, ("train", "val"), config.image_size):
        history = trainer.fit(
            train_data, epochs=config.epochs, steps_per_epoch=steps_per_epoch, validation_data=val_data,
            validation_steps=validation_steps, callbacks=fit_callbacks, verbose=2,
        )
    seconds = time.perf_counter() - started
    steps_run = len(history.epoch) * steps_per_epoch
    # Export the best epoch by the monitored metric (over the killed runs too), not merely the last.
    best_epoch = best_so_far.epoch
    if best_epoch is not None:
        trainer.load_weights(best_path)
    summary = {
        "model": config.model,
        "model_options": config.model_options,
        "image_size": config.image_size,
        # How the training records were converted: predict and serve convert DICOMs the same way.
        "conversion": {key: read_manifest(config.records_dir)["options"][key] for key in ("image_size", "bit_depth")},
        "threshold": 0.5,
        "epochs_run": len(history.epoch),
        "epochs": list(history.epoch),  # 0-based; a resumed run starts after the finished ones
        "exported_epoch": best_epoch if best_epoch is not None else history.epoch[-1],
        "monitor": monitor,
        "steps_per_epoch": steps_per_epoch,
        "train_seconds": round(seconds, 3),
        "images_per_second": round(steps_run * config.batch_size / seconds, 2) if seconds > 0 else None,
        "replicas": replicas,
        "precision": config.precision,
        "learning_rate": peak_rate,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
    }
    if _is_chief(strategy):
        export(network, config.model_dir, summary)
    return summary


def export(network: keras.Model, model_dir: str, info: dict) -> None:
    """Writes model.keras, saved_model/ and pneumo_tf.json (last, so its presence means complete)."""
    os.makedirs(model_dir, exist_ok=True)
    # Until the new info is written, no info: a crash part-way must not pair the old
    # pneumo_tf.json (image size, threshold) with a new network.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(model_dir, INFO_FILE))
    path = os.path.join(model_dir, MODEL_FILE)
    network.save(f"{path}.tmp.keras")
    os.replace(f"{path}.tmp.keras", path)
    saved = os.path.join(model_dir, SAVED_MODEL_DIR)
    shutil.rmtree(f"{saved}.tmp", ignore_errors=True)  # left by a crashed export
    network.export(f"{saved}.tmp", format="tf_saved_model", verbose=False)
    if os.path.isdir(saved):
        shutil.rmtree(saved)
    os.replace(f"{saved}.tmp", saved)
    write_json_atomic(os.path.join(model_dir, INFO_FILE), info)


def load_exported(model_dir: str) -> tuple[keras.Model, dict]:
    """The exported network and its info, with a clear error for a folder that holds none."""
    info_path = os.path.join(model_dir, INFO_FILE)
    if not os.path.isdir(model_dir):
        raise UserError(f"model folder not found: {model_dir}")
    if not os.path.isfile(info_path):
        raise UserError(f"{model_dir} holds no exported pneumo_tf model (no {INFO_FILE}): train one first")
    with open(info_path) as handle:
        info = json.load(handle)
    network = keras.models.load_model(os.path.join(model_dir, MODEL_FILE), compile=False)
    return network, info
