"""One training step on one device and on MirroredStrategy over two logical CPUs, from the same
initial weights and batch: what every model's mirrored test compares.

Logical CPUs must be made before TensorFlow initialises its devices, so a check runs in a
fresh process: `check_in_fresh_process(module, function)` splits the CPU there, imports the
test module and calls `function()`, which asserts and prints "same".
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent


def one_step_on_one_and_two_replicas(build, architecture, inputs: dict, labels: dict, learning_rate: float):
    """[(replicas, history, initial weights, weights after the step)] for 1 and 2 replicas; `build()`
    makes the network (under the strategy's scope); plain SGD, no augmentation."""
    import keras
    import tensorflow as tf

    from pneumo_tf.data import augment
    from pneumo_tf.training import distribute
    from pneumo_tf.training.loop import Trainer

    dataset = tf.data.Dataset.from_tensors((inputs, labels)).repeat()
    initial, results = None, []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), distribute.make_strategy("mirrored")):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            network = build()
            trainer = Trainer(network, architecture, augment.AugmentConfig.off())
            trainer.compile(optimizer=keras.optimizers.SGD(learning_rate))
            if initial is None:
                initial = network.get_weights()
            network.set_weights(initial)
        history = trainer.fit(strategy.experimental_distribute_dataset(dataset), epochs=1, steps_per_epoch=1,
                              verbose=0, shuffle=False)
        results.append((strategy.num_replicas_in_sync, history.history, initial, network.get_weights()))
    assert [replicas for replicas, *_ in results] == [1, 2]
    print("logs", results[0][1], results[1][1])
    return results


def check_in_fresh_process(module: str, function: str) -> None:
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from pneumo_tf.training import distribute; "
              f"distribute.split_cpu(2); import {module}; {module}.{function}()")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "same" in result.stdout, result.stdout + result.stderr[-3000:]
