"""The registry: architecture name -> the module that defines it.

Each module in pneumo_tf/models/ defines one architecture: a `build` function, its options
dataclass and presets, and an `ARCHITECTURE`, an instance of a
pneumo_tf.models.architecture.Architecture subclass (the contract that training, evaluation,
prediction and serving read). Modules are imported on first use, so listing the names (flags)
needs no TensorFlow and the detectors' keras-hub loads only when a detector is used; --help
imports them all to show every model's options and presets (`options_help`, `presets_help`).
"""
from __future__ import annotations

import importlib

from pneumo_tf.errors import UserError

ARCHITECTURES = {
    "cnn": "pneumo_tf.models.cnn",
    "vgg16": "pneumo_tf.models.vgg16",
    "mask_resnet": "pneumo_tf.models.mask_resnet",
    "retinanet": "pneumo_tf.models.retinanet",
    "mask_rcnn": "pneumo_tf.models.mask_rcnn",
}
NAMES = tuple(ARCHITECTURES)
# --trainable_layers: matterport's layer groups of a ResNet detector (pneumo_tf.models.pretrained).
LAYER_GROUPS = ("heads", "3+", "4+", "5+", "all")


def check_name(name: str) -> None:
    """Raises the one UserError for an unknown architecture name."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(ARCHITECTURES))}")


def get(name: str):
    """The Architecture registered as `name`."""
    check_name(name)
    return importlib.import_module(ARCHITECTURES[name]).ARCHITECTURE


def options_help() -> str:
    """Every model's options, one line each (name (type, default, range): help), grouped by model."""
    from pneumo_tf import cli

    groups = []
    for name in NAMES:
        lines = cli.describe_fields(get(name).options_type)
        groups.append("\n".join([f"{name} options:"] + [f"- {line}" for line in lines]))
    return "\n".join(groups)


def presets_help() -> str:
    """Every model's presets with what each is for."""
    lines = []
    for name in NAMES:
        for preset_name, preset in sorted(get(name).presets.items()):
            lines.append(f"- {name} {preset_name}: {preset.description}")
    return "Presets:\n" + "\n".join(lines)
