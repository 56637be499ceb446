"""Training: `train_and_evaluate(config)` builds the architecture under the strategy and the
precision policy, fits it on the records' input pipeline with on-device augmentation,
validates it once per epoch with the challenge metric, and exports the best epoch.

Layout of `config.model_dir` after a run:
  logs/           TensorBoard events (train/, validation/, hparams, profiler trace)
  backup/         BackupAndRestore state: a killed run resumes from its last finished epoch
                  (finished: trained, evaluated, checkpointed)
  checkpoints/    weights after every epoch, the best by the monitored metric, and best.json
                  (its epoch and value, carried across a resume)
  model.keras, saved_model/, model_card.json, pneumo_tf.json   the exported model (pneumo_tf.models.exported)
Every weights file is written to a temporary name and renamed (Trainer.save_weights), so a kill
mid-write never leaves a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import keras
import tensorflow as tf

from pneumo_tf import fileio, models
from pneumo_tf.data import augment, metadata, pipeline, remote
from pneumo_tf.errors import UserError
from pneumo_tf.models import card as model_card, exported
from pneumo_tf.models.architecture import Architecture
from pneumo_tf.records.manifest import read_manifest
from pneumo_tf.training import callbacks as callbacks_lib, distribute
from pneumo_tf.training.config import REFERENCE_BATCH_SIZE, TrainConfig
from pneumo_tf.training.keras_shim import Prebuilt, WholeBackup

REGULARIZATION = "regularization"
WEIGHTS_SUFFIX = ".weights.h5"


class Trainer(Prebuilt):
    """Wraps an architecture's network for `fit`: each training step augments its batch on the
    device, then minimises the architecture's loss terms. Only the network is exported.

    Data are (inputs, labels) pairs from `architecture.to_fit`. Every loss term is logged as
    "<term>_loss" beside their sum "loss", and the architecture's metrics by their names.
    """

    def __init__(self, network: keras.Model, architecture: Architecture,
                 augment_config: augment.AugmentConfig = augment.AugmentConfig(), seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.architecture = architecture
        self.augment_config = augment_config
        self.seed = seed
        # Regularisation penalties (vgg16's L2) count as one more term, as Keras adds them.
        self.term_names = tuple(architecture.loss_names(network)) + ((REGULARIZATION,) if network.losses else ())
        self.term_trackers = [keras.metrics.Mean(name=f"{name}_loss") for name in self.term_names]
        metrics = architecture.metrics(network)
        self.metric_outputs = tuple(name for name, found in metrics.items() for _ in found)
        self.output_metrics = [metric for found in metrics.values() for metric in found]
        self.built = True  # every layer and metric above is built

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Keras' save_weights, whole or not at all: written to a temporary name, synced, renamed. The
        checkpoints and the backup all save through here, so a kill or power loss mid-write leaves the
        previous file in place, never a truncated one that every later resume fails to load."""
        filepath = os.fspath(filepath)
        if max_shard_size is not None or not filepath.endswith(WEIGHTS_SUFFIX):
            return super().save_weights(filepath, overwrite, max_shard_size)
        # Keras wants the suffix on the temporary name too.
        tmp = fileio.temporary_name(filepath.removesuffix(WEIGHTS_SUFFIX)) + WEIGHTS_SUFFIX
        try:
            super().save_weights(tmp, overwrite=True)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            fileio.replace(tmp, filepath)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def loss_terms(self, inputs, labels, raw, training) -> dict:
        """The architecture's named loss terms for one batch (plus regularisation), float32."""
        terms = dict(self.architecture.loss(self.network, inputs, labels, raw, training))
        if self.network.losses:
            terms[REGULARIZATION] = keras.ops.sum(keras.ops.stack(self.network.losses))
        return {name: keras.ops.cast(terms[name], "float32") for name in self.term_names}

    def train_step(self, data):
        inputs, labels = data
        if self.augment_config != augment.AugmentConfig.off():
            # The optimizer's step makes every step's draw different and a resumed run repeat it.
            step_seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
            # Image, mask and boxes move together, whichever side of (inputs, labels) they are on.
            batch = augment.augment_batch({**inputs, **labels}, augment.replica_seed(step_seed), self.augment_config)
            inputs = {key: batch[key] for key in inputs}
            labels = {key: batch[key] for key in labels}
        return self._reducible(super().train_step((inputs, labels)))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        terms = self.loss_terms(x, y, y_pred, training)
        for tracker, name in zip(self.term_trackers, self.term_names):
            tracker.update_state(terms[name])
        total = keras.ops.sum(keras.ops.stack(list(terms.values())))
        # Keras' convention: replicas' gradients are summed, so each contributes 1 / replicas.
        return total / tf.distribute.get_strategy().num_replicas_in_sync

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        for name, metric in zip(self.metric_outputs, self.output_metrics):
            metric.update_state(y[name], y_pred[name])
        return self.get_metrics_result()

    def _reducible(self, logs: dict) -> dict:
        # Keras 3 reduces step logs under MultiWorkerMirroredStrategy with reduce(MEAN, axis=0),
        # which fails on scalars (tensorflow/tensorflow#72388); a leading axis of 1 makes that
        # reduction the mean over replicas.
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs


def _optimizer(config: TrainConfig, total_steps: int) -> tuple[float, keras.optimizers.Optimizer]:
    """(peak learning rate, the optimizer): the rate scaled linearly with the batch, raised linearly
    from 0 over the warm-up steps, then cosine-decayed per step (the seed's annealing was per epoch)."""
    peak = config.learning_rate * config.batch_size / REFERENCE_BATCH_SIZE
    if config.warmup_steps:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(total_steps - config.warmup_steps, 1), warmup_target=peak,
            warmup_steps=config.warmup_steps)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(total_steps, 1))
    if config.optimizer == "sgd":  # matterport's LEARNING_MOMENTUM, WEIGHT_DECAY and GRADIENT_CLIP_NORM
        return peak, keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-4, global_clipnorm=5.0)
    return peak, keras.optimizers.Adam(schedule)


def _worker_dir(model_dir: str, strategy) -> str:
    """Where this worker writes: the chief writes model_dir, others a scratch folder (MWMS rule)."""
    if strategy.extended.should_checkpoint:
        return model_dir
    resolver = strategy.cluster_resolver
    return os.path.join(model_dir, "workers", f"{resolver.task_type}_{resolver.task_id}")


def _best_so_far(path: str, resuming: bool) -> tuple[int | None, float | None]:
    """(epoch, value) of best.json when resuming, else (None, None): a fresh run starts over."""
    if not (resuming and os.path.isfile(path)):
        return None, None
    with open(path) as handle:
        saved = json.load(handle)
    return saved["epoch"], saved["value"]


def _datasets(config: TrainConfig, strategy, architecture: Architecture, fields) -> tuple:
    """(train, val): the distributed training stream and this worker's validation pass."""
    train_data = pipeline.distributed_dataset(
        strategy, config.records_dir, "train", config.batch_size, config.image_size, training=True,
        map_fn=lambda batch: architecture.to_fit(metadata.with_metadata(batch, fields)),
        positive_fraction=config.positive_fraction or None, cache=config.cache,
        seed=config.seed, data_service=config.data_service or None,
    )
    # Validation streams the val split once per epoch, on this worker's own pipeline: loss,
    # metrics, challenge mAP and the TensorBoard images all come from that one pass.
    val_data = pipeline.make_dataset(
        config.records_dir, "val", config.batch_size, config.image_size, training=False, cache=config.cache
    ).map(lambda batch: metadata.with_metadata(batch, fields))
    if config.validation_steps:
        val_data = val_data.take(config.validation_steps)
    return train_data, val_data


def _fit_callbacks(config: TrainConfig, architecture: Architecture, network, options, val_data, output_dir: str,
                   log_dir: str, best_checkpoint, best_record) -> list:
    """The callbacks of the run, in the order they must run."""
    monitor, mode = architecture.monitor
    checkpoints = os.path.join(output_dir, "checkpoints")
    return [
        keras.callbacks.TerminateOnNaN(),
        *([callbacks_lib.TrainableLayers(
            lambda layers: architecture.set_trainable_layers(network, options, layers), config.trainable_layers,
            config.trainable_layers_epochs)] if config.trainable_layers != "all" else []),
        callbacks_lib.StepScalars(log_dir, config.batch_size, every_n_steps=config.log_every_steps),
        # Before TensorBoard, the checkpoints and early stopping: it adds the val_* logs they read.
        callbacks_lib.EpochEvaluation(val_data, log_dir, architecture, network, max_images=config.validation_images),
        keras.callbacks.TensorBoard(
            log_dir, update_freq="epoch", profile_batch=config.profile_steps or 0, write_graph=False
        ),
        keras.callbacks.ModelCheckpoint(os.path.join(checkpoints, "epoch-{epoch:03d}.weights.h5"),
                                        save_weights_only=True),
        best_checkpoint,
        best_record,
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=config.early_stopping_patience, min_delta=0.0005,
        ),
        *([callbacks_lib.StallWatchdog(config.data_service_timeout, (
            f"no training batch for {config.data_service_timeout:g} s from the tf.data service at "
            f"{config.data_service}: its workers are gone or stuck. Start workers (python -m pneumo_tf.data_service "
            f"--role=worker --dispatcher=...) and rerun: training resumes after its last finished epoch "
            "(--data_service_timeout sets the wait)"))] if config.data_service else []),
        # Last: an epoch counts as done (a resume starts after it) only once its evaluation, checkpoints
        # and best.json are written; a kill before then repeats the epoch instead of losing its metrics.
        WholeBackup(os.path.join(output_dir, "backup")),
    ]


def _hparams(config: TrainConfig, options, peak_rate: float, replicas: int) -> dict:
    """The run's settings for TensorBoard's HParams dashboard."""
    return {
        "model": config.model, "preset": config.preset, "image_size": config.image_size,
        "batch_size": config.batch_size,
        "learning_rate": peak_rate, "warmup_steps": config.warmup_steps, "optimizer": config.optimizer,
        "precision": config.precision, "replicas": replicas, "positive_fraction": config.positive_fraction,
        "augment": config.augment, "augment_strength": config.augment_strength, "epochs": config.epochs,
        "seed": config.seed, "trainable_layers": config.trainable_layers,
        "trainable_layers_epochs": config.trainable_layers_epochs,
        # The architecture options the run sets (its own and its preset's), so searches over them compare
        # in TensorBoard's HParams dashboard.
        **{f"model_option.{name}": getattr(options, name) for name in config.model_options},
    }


def train_and_evaluate(config: TrainConfig, arguments: list[str] | None = None) -> dict:
    """Trains `config.model` on `config.records_dir` and exports it to `config.model_dir`.

    `arguments`: the command line that started the run (without the program), for the model card.
    """
    config.validate()
    architecture = models.get(config.model)
    options = architecture.make_options(config.model_options)
    train_examples = pipeline.num_examples(config.records_dir, "train")
    pipeline.num_examples(config.records_dir, "val")  # a missing val split is a UserError before any work
    if config.data_service:
        remote.check_reachable(config.data_service)  # before any work, too
    strategy = distribute.make_strategy(config.strategy, config.cpu_replicas, config.tpu)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise UserError(f"--batch_size {config.batch_size} must be a multiple of the {replicas} replicas")
    steps_per_epoch = config.steps_per_epoch or max(1, train_examples // config.batch_size)
    if config.warmup_steps >= steps_per_epoch * config.epochs:
        raise UserError(f"--warmup_steps {config.warmup_steps} leaves no step to train at the peak rate: "
                        f"the run has {steps_per_epoch * config.epochs} ({config.epochs} epochs of {steps_per_epoch})")
    output_dir = _worker_dir(config.model_dir, strategy)
    log_dir = os.path.join(output_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)

    with distribute.precision(config.precision), strategy.scope():
        keras.utils.set_random_seed(config.seed)
        network = architecture.build(config.image_size, options)
        augment_config = (augment.AugmentConfig().scaled(config.augment_strength) if config.augment
                          else augment.AugmentConfig.off())
        trainer = Trainer(network, architecture, augment_config, config.seed)
        peak_rate, optimizer = _optimizer(config, steps_per_epoch * config.epochs)
        trainer.compile(optimizer=optimizer)

    fields = options.metadata  # the header's facts the network takes beside the image, encoded per batch
    train_data, val_data = _datasets(config, strategy, architecture, fields)
    monitor, mode = architecture.monitor
    best_json = os.path.join(output_dir, "checkpoints", "best.json")
    best_epoch, best_value = _best_so_far(best_json, os.path.isdir(os.path.join(output_dir, "backup")))
    best_checkpoint = keras.callbacks.ModelCheckpoint(
        os.path.join(output_dir, "checkpoints", "best.weights.h5"), monitor=monitor, mode=mode, save_best_only=True,
        save_weights_only=True, initial_value_threshold=best_value,
    )
    best_record = callbacks_lib.BestEpochRecord(best_checkpoint, best_json, best_epoch)
    fit_callbacks = _fit_callbacks(config, architecture, network, options, val_data, output_dir, log_dir,
                                   best_checkpoint, best_record)
    callbacks_lib.log_hparams(log_dir, _hparams(config, options, peak_rate, replicas))

    started = time.perf_counter()
    with pipeline.naming_bad_records(config.records_dir, ("train", "val"), config.image_size):
        history = trainer.fit(
            train_data, epochs=config.epochs, steps_per_epoch=steps_per_epoch, callbacks=fit_callbacks,
            verbose=2, shuffle=False,  # the pipeline shuffles; Keras' own shuffle does not apply to datasets
        )
    seconds = time.perf_counter() - started
    steps_run = len(history.epoch) * steps_per_epoch
    # Export the best epoch by the monitored metric (over the killed runs too), not merely the last.
    if best_record.epoch is not None:
        trainer.load_weights(best_checkpoint.filepath)
    summary = {
        "model": config.model,
        "preset": config.preset,
        "model_options": options.as_dict(),  # every option, resolved
        "metadata": list(fields),  # the header's facts the network takes (pneumo_tf.data.metadata)
        "image_size": config.image_size,
        # How the training records were converted: predict and serve convert source files the same way.
        "conversion": {key: read_manifest(config.records_dir)["options"][key] for key in ("image_size", "bit_depth")},
        "threshold": 0.5,
        "epochs_run": len(history.epoch),
        "epochs": list(history.epoch),  # 0-based; a resumed run starts after the finished ones
        "exported_epoch": best_record.epoch if best_record.epoch is not None else history.epoch[-1],
        "monitor": monitor,
        "steps_per_epoch": steps_per_epoch,
        "train_seconds": round(seconds, 3),
        "images_per_second": round(steps_run * config.batch_size / seconds, 2) if seconds > 0 else None,
        "replicas": replicas,
        "precision": config.precision,
        "learning_rate": peak_rate,
        "seed": config.seed,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
    }
    if strategy.extended.should_checkpoint:
        card = model_card.export_card(config, summary, network.count_params(), arguments)
        exported.write(network, architecture, config.model_dir, summary, card)
    return summary
