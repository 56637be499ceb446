"""Strategy and precision: chosen here and nowhere else.

`make_strategy("mirrored", cpu_replicas=2)` splits the CPU into logical devices so
MirroredStrategy runs (and is tested) without GPUs; "multi_worker_mirrored" reads
TF_CONFIG; "tpu" resolves `--tpu`. `precision(policy)` sets the Keras dtype policy for
the block that builds the models and restores the previous one after it, so a notebook
that ran one mixed-precision training does not go on building bfloat16 models (models
cast their outputs to float32; Keras wraps the optimizer in a LossScaleOptimizer for
mixed_float16).
"""
from __future__ import annotations

import contextlib
import json
import os

import keras
import tensorflow as tf

from pneumo_tf.errors import UserError
from pneumo_tf.training.config import PRECISIONS, STRATEGIES


def split_cpu(replicas: int) -> None:
    """Makes `replicas` logical CPU devices (must run before TensorFlow initialises its devices)."""
    if replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == replicas:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as error:  # devices already initialised in this process
        raise UserError(f"--cpu_replicas={replicas} must be set before TensorFlow starts: {error}") from error


def make_strategy(name: str = "auto", cpu_replicas: int = 0, tpu: str | None = None) -> tf.distribute.Strategy:
    """A tf.distribute strategy by name.

    auto: MirroredStrategy over all GPUs when there are several (or over `cpu_replicas`
    logical CPUs), else the default one-device strategy.
    """
    if name not in STRATEGIES:
        raise UserError(f"unknown --strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker_mirrored":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy=multi_worker_mirrored needs TF_CONFIG describing the cluster and this task")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as error:
            raise UserError(f"TF_CONFIG is not valid JSON: {error}") from error
        split_cpu(cpu_replicas)
        return tf.distribute.MultiWorkerMirroredStrategy()
    split_cpu(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored" or (name == "auto" and (len(gpus) > 1 or cpu_replicas > 1)):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


@contextlib.contextmanager
def precision(policy: str):
    """The Keras dtype policy for the block: float32, mixed_float16 (GPU) or mixed_bfloat16 (TPU, CPU).

    Layers take the policy when they are built; the previous global policy is back after the block.
    """
    if policy not in PRECISIONS:
        raise UserError(f"unknown --precision {policy!r}; choose one of {', '.join(PRECISIONS)}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
