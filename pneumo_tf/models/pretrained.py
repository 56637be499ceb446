"""Pretrained weights the way the libraries that publish them load them, and what fine-tuning them needs.

* keras.applications weights (`keras_application`): ImageNet files live in the Keras cache
  (<Keras home>/models, the home being $KERAS_HOME or ~/.keras); a file there is read as it is,
  without any network access; a missing one is downloaded there once by keras.applications itself.
  Offline, one UserError names the file, its URL and the cache folder.
* keras-hub presets (`load_backbone`, `load_detector`): a preset name keras-hub lists
  (resnet_50_imagenet, retinanet_resnet50_fpn_coco, ...) is fetched by `from_preset` through
  kagglehub into its cache ($KAGGLEHUB_CACHE, default ~/.cache/kagglehub) once and read from there
  afterwards; a folder in the `save_to_preset` layout (config.json, model.weights.h5,
  image_converter.json, for a detector task.json too) is read directly. A name that is neither cached
  nor downloadable gives one UserError with both ways out.
* Grey radiographs into 3-channel networks (`InputConversion`, `grey_to_model_input`): the grey
  channel is repeated to the network's channels and normalised as the preset declares it (its image
  converter's per-channel scale and offset, for pixels in [0, 255]); nothing is assumed.
* Fine-tuning (`set_trainable_layers`): matterport's layer groups on a keras-hub ResNet encoder
  (heads: all but the encoder; 3+, 4+, 5+: the ResNet stages from that one up too; all), with the
  encoder's batch norm frozen (statistics and scale: keras' trainable=False, which also runs it in
  inference mode) unless it trains, as matterport's TRAIN_BN = False.
"""
from __future__ import annotations

import dataclasses
import os
import re

import keras
import keras_hub
from keras import layers

from pneumo_tf.errors import UserError
from pneumo_tf.models import LAYER_GROUPS

BACKBONE_PRESET_HELP = (
    "A keras-hub ResNet preset for the encoder: a name keras-hub lists (resnet_18_imagenet, resnet_50_imagenet, "
    "resnet_vd_50_imagenet, ...; downloaded once into the kagglehub cache) or a local folder in keras-hub's "
    "save_to_preset layout. Its stacks replace the encoder options; grey images are repeated to its channels and "
    "normalised as its image converter says. Empty: a randomly initialised encoder.")
TRAIN_BN_HELP = ("Train the batch norm of a pretrained encoder (matterport's TRAIN_BN); by default its statistics "
                 "and scale stay as pretrained. A randomly initialised encoder's batch norm always trains.")
_RESNET_STACK = re.compile(r"stack(\d+)_")


@dataclasses.dataclass(frozen=True)
class InputConversion:
    """How a network wants its pixels: x * scale + offset per channel, for pixel values in [0, 255]
    (keras-hub's ImageConverter; None: that step is left out)."""

    scale: tuple[float, ...] | float | None = None
    offset: tuple[float, ...] | float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def grey_to_model_input(image, conversion: InputConversion, channels: int, name: str):
    """[B, S, S, 1] images in [0, 1] -> the network's input: the grey channel repeated to `channels`,
    then each channel c as (255 * x) * scale[c] + offset[c] (one Rescaling layer)."""
    x = image if channels == 1 else layers.Concatenate(name=f"{name}_channels")([image] * channels)

    def per_channel(value, default):
        value = default if value is None else value
        return [float(item) for item in value] if isinstance(value, (tuple, list)) else [float(value)] * channels

    scale = [255.0 * item for item in per_channel(conversion.scale, 1.0)]
    return layers.Rescaling(scale=scale, offset=per_channel(conversion.offset, 0.0), name=f"{name}_normalise")(x)


# -- keras.applications weights ------------------------------------------------------------------


def keras_cache_folder() -> str:
    """Where keras.utils.get_file (so keras.applications) keeps weights files: <Keras home>/models, or
    /tmp/.keras/models when the home is not writable, as get_file decides."""
    from keras.src.backend.config import keras_home  # Keras has no public accessor of its home folder

    home = os.path.expanduser(keras_home())
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return os.path.join(home, "models")


def keras_application(build, file_name: str, url: str, owner: str):
    """`build(weights)` with keras.applications' ImageNet weights: `build(path)` when `file_name` is in the
    Keras cache (read as it is, no download and no hash check: a file there is what a user put or Keras
    fetched), else `build("imagenet")`, which downloads it into the cache first. UserError when that fails."""
    cached = os.path.join(keras_cache_folder(), file_name)
    if os.path.isfile(cached):
        try:
            return build(cached)
        except (OSError, ValueError) as error:
            raise UserError(f"{owner} cannot read the cached ImageNet weights {cached} ({error}): delete the file "
                            "to download it again") from error
    try:
        return build("imagenet")
    except Exception as error:  # keras.utils.get_file raises a bare Exception on a failed fetch
        if os.path.isfile(cached):
            raise  # downloaded, so the failure is not the network's
        reason = getattr(error.__context__, "reason", error)  # get_file's message repeats the URL
        raise UserError(
            f"{owner} ImageNet weights {file_name} are not in the Keras cache {os.path.dirname(cached)} and could "
            f"not be downloaded from {url} ({reason}). On a machine with network access run the same command once "
            f"(or download that URL into the cache folder), then copy the file to {cached} here (KERAS_HOME sets "
            f"the Keras home)") from error


# -- keras-hub presets ---------------------------------------------------------------------------


def _from_preset(load, preset: str, owner: str, what: str):
    """load() with the preset's errors as one UserError each: a name not cached and not downloadable
    (offline), an unknown name or folder, a folder missing a file."""
    try:
        return load()
    except FileNotFoundError as error:
        raise UserError(f"{owner} {what} {preset!r} lacks a file: {error}") from error
    except (OSError, RuntimeError) as error:  # kagglehub: requests' ConnectionError, HTTP and auth errors
        from kagglehub.config import get_cache_folder

        raise UserError(
            f"{owner} {what} {preset!r} is not in the kagglehub cache {get_cache_folder()} and could not be "
            f"downloaded ({type(error).__name__}: {error}). On a machine with network access load it once "
            "(the same command, or keras_hub.models.Backbone.from_preset) and copy the cache folder here, pointing "
            "KAGGLEHUB_CACHE at it, or save it into a folder with save_to_preset and pass that folder (README.md)"
        ) from error
    except ValueError as error:  # keras-hub: "Unknown preset identifier", a config of another class
        raise UserError(f"{owner} {what} {preset!r}: {error}") from error


def preset_conversion(preset: str, owner: str) -> InputConversion:
    """The input conversion the preset declares (its image converter's scale and offset)."""
    converter = _from_preset(lambda: keras_hub.layers.ImageConverter.from_preset(preset), preset, owner, "preset")
    return InputConversion(_plain(converter.scale), _plain(converter.offset))


def _plain(value):
    return tuple(float(item) for item in value) if isinstance(value, (tuple, list)) else value


def load_backbone(preset: str, owner: str) -> tuple[keras.Model, InputConversion]:
    """(the preset's keras-hub ResNetBackbone with its weights, the preset's input conversion)."""
    backbone = _from_preset(lambda: keras_hub.models.Backbone.from_preset(preset), preset, owner, "backbone_preset")
    if not isinstance(backbone, keras_hub.models.ResNetBackbone):
        raise UserError(f"{owner} backbone_preset {preset!r} holds a {type(backbone).__name__}; it takes keras-hub "
                        "ResNet presets (resnet_18_imagenet, resnet_50_imagenet, resnet_vd_50_imagenet, ...)")
    return backbone, preset_conversion(preset, owner)


def load_detector(preset: str, owner: str):
    """(the preset's keras-hub RetinaNetObjectDetector with its weights, the preset's input conversion)."""
    detector = _from_preset(lambda: keras_hub.models.RetinaNetObjectDetector.from_preset(preset), preset, owner,
                            "detector_preset")
    if not isinstance(detector.backbone.image_encoder, keras_hub.models.ResNetBackbone):
        raise UserError(f"{owner} detector_preset {preset!r} has a {type(detector.backbone.image_encoder).__name__} "
                        "encoder; it takes RetinaNet presets with a ResNet encoder")
    return detector, preset_conversion(preset, owner)


# -- fine-tuning ---------------------------------------------------------------------------------


def resnet_stage(layer_name: str) -> int:
    """matterport's ResNet stage of a keras-hub ResNet layer: 1 for the stem (conv1_*, pool1_*), 2-5 for
    stack0-stack3, 5 for what follows the stacks (ResNetV2's post_bn)."""
    match = _RESNET_STACK.match(layer_name)
    if match:
        return int(match.group(1)) + 2
    return 1 if layer_name.startswith(("conv", "pool")) else 5


def set_trainable_layers(network: keras.Model, encoder: keras.Model, layers_to_train: str,
                         freeze_batch_norm: bool) -> None:
    """Makes matterport's group `layers_to_train` of `network` trainable and freezes the rest of its
    ResNet `encoder` (one of network's layers): "heads" trains all but the encoder, "3+", "4+", "5+"
    also the encoder's stages from that one up (stack0 is stage 2), "all" everything. The encoder's
    batch norm layers stay frozen when `freeze_batch_norm`."""
    if layers_to_train not in LAYER_GROUPS:
        raise UserError(f"trainable layers must be one of {', '.join(LAYER_GROUPS)}, not {layers_to_train!r}")
    first_stage = {"heads": 6, "all": 1}.get(layers_to_train) or int(layers_to_train[0])
    network.trainable = True  # every layer, the encoder's included, before its stages are set
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and freeze_batch_norm:
            layer.trainable = False
        elif layer.weights:
            layer.trainable = resnet_stage(layer.name) >= first_stage
