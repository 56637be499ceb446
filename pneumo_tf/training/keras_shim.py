"""The one place pneumo_tf relies on private Keras API, and why.

`Prebuilt`: when `fit` starts under a distribution strategy, Keras 3 (`TensorFlowTrainer.
_maybe_symbolic_build`) takes the first batch from the iterator and all-reduces it across
replicas only to build, symbolically, state that may be missing: the model, the compiled
metrics and losses, the optimizer. Under MultiWorkerMirroredStrategy that all-reduce
fails for dict batches, and everywhere it moves a whole batch of pixels between devices.
No public hook skips it. `Prebuilt` models build everything up front (the network when
it is made, metrics when they are constructed, no compiled losses or metrics), so the
only state left to build is the optimizer's, which this override builds directly.

tests/test_train.py::test_keras_still_calls_the_symbolic_build_shim fails the day Keras
renames or stops calling the method.

`WholeBackup`: BackupAndRestore writes its state (the weights, then training_metadata.json)
in place, so a kill or power loss inside either write leaves a file every later resume fails
to read. `_save_model` is where it writes both; the override writes each whole or not at all.
tests/test_train.py::test_kills_during_validation_or_a_checkpoint_write_lose_no_epoch fails
the day Keras stops calling it.
"""
from __future__ import annotations

import os

import keras

from pneumo_tf.fileio import write_json_atomic


class Prebuilt(keras.Model):
    """A keras.Model whose layers and metrics are all built before `fit` (see the module docstring)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():  # its variables are mirrored like the model's
                self.optimizer.build(self.trainable_variables)


class WholeBackup(keras.callbacks.BackupAndRestore):
    """keras.callbacks.BackupAndRestore (saving every epoch) whose state files are each written to a
    temporary name, synced and renamed (see the module docstring). The weights need a model whose
    `save_weights` does that (training.loop.Trainer); they are written first, so a kill between the
    two writes makes the resumed run repeat the last epoch, never skip one."""

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        self.model.save_weights(self._weights_path, overwrite=True)
        write_json_atomic(self._training_metadata_path, {"epoch": self._current_epoch, "batch": self._last_batch_seen})
