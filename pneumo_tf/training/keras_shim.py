"""The one place pneumo_tf relies on private Keras API, and why.

When `fit` starts under a distribution strategy, Keras 3 (`TensorFlowTrainer.
_maybe_symbolic_build`) takes the first batch from the iterator and all-reduces it across
replicas only to build, symbolically, state that may be missing: the model, the compiled
metrics and losses, the optimizer. Under MultiWorkerMirroredStrategy that all-reduce
fails for dict batches, and everywhere it moves a whole batch of pixels between devices.
No public hook skips it. `Prebuilt` models build everything up front (the network when
it is made, metrics when they are constructed, no compiled losses or metrics), so the
only state left to build is the optimizer's, which this override builds directly.

tests/test_train.py::test_keras_still_calls_the_symbolic_build_shim fails the day Keras
renames or stops calling the method.
"""
from __future__ import annotations

import keras


class Prebuilt(keras.Model):
    """A keras.Model whose layers and metrics are all built before `fit` (see the module docstring)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():  # its variables are mirrored like the model's
                self.optimizer.build(self.trainable_variables)
