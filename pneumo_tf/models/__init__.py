"""Model registry: architecture name -> builder, and the losses/metrics for each output.

Every builder takes (image_size, **options) and returns a keras.Model with one
input {"image": float32 [B, S, S, 1] in [0, 1]} and a dict of float32 outputs named
after the batch keys they predict ("target" [B, 1], "mask" [B, S, S, 1]).
"""
from __future__ import annotations

import keras

from pneumo_tf.errors import UserError
from pneumo_tf.models import cnn, mask_resnet, vgg16
from pneumo_tf.models.losses import iou_bce_loss, mean_iou

BUILDERS = {
    "cnn": cnn.build,
    "vgg16": vgg16.build,
    "mask_resnet": mask_resnet.build,
}


def build_model(name: str, image_size: int, **options) -> keras.Model:
    """Builds the architecture registered as `name`."""
    if name not in BUILDERS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](image_size, **options)


def _target_objectives():
    return (
        keras.losses.BinaryCrossentropy(),
        [
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ],
    )


def _mask_objectives():
    return iou_bce_loss, [mean_iou]


# Factories, not instances: metric objects hold state and cannot be shared by models.
_OBJECTIVES = {"target": _target_objectives, "mask": _mask_objectives}


def compile_args(model: keras.Model) -> dict:
    """{"loss": ..., "metrics": ...} for `model.compile`, keyed by the model's output names."""
    unknown = [name for name in model.output_names if name not in _OBJECTIVES]
    if unknown:
        raise ValueError(f"no loss defined for outputs {unknown}; known: {sorted(_OBJECTIVES)}")
    objectives = {name: _OBJECTIVES[name]() for name in model.output_names}
    return {
        "loss": {name: loss for name, (loss, _) in objectives.items()},
        "metrics": {name: metrics for name, (_, metrics) in objectives.items()},
    }
