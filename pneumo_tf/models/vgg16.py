"""The seed's VGG16 transfer-learning classifier on grey radiographs."""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import keras
from keras import layers

from pneumo_tf.cli import option
from pneumo_tf.errors import UserError
from pneumo_tf.models import architecture
from pneumo_tf.models.architecture import Classifier, ModelOptions, Preset

NOTOP_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
# keras.applications.vgg16.preprocess_input ("caffe" mode) flips RGB to BGR and
# subtracts these means; a grey image repeated to three channels is the same in
# either order, so only the subtraction is left.
_IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)
# With the backbone frozen the seed still fine-tunes its last three layers
# (block5_conv2, block5_conv3 and the weightless block5_pool).
_FINE_TUNED_WHEN_FROZEN = ("block5_conv2", "block5_conv3")
# VGG16 halves the image five times.
_MIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class VGG16Options(ModelOptions):
    model_name: ClassVar[str] = "vgg16"

    weights: str | None = option(None, "Path of a local no-top VGG16 weights file (the ImageNet .h5 from "
                                 f"{NOTOP_WEIGHTS_URL}, or any file keras.Model.load_weights reads); none: random "
                                 "initialisation.")
    freeze_backbone: bool = option(True, "Train only the last two convolutions of the backbone, as the seed's first "
                                   "VGG16 run did; False trains it all, as its second run did.")


PRESETS = {
    "demo": Preset("The seed's network, Adam 5e-4.", train={"learning_rate": 5e-4}),
}


def _checked_weights(weights: str | None) -> str | None:
    """None or the path of an existing local file; never lets Keras download."""
    if weights is None:
        return None
    if weights == "imagenet":
        raise UserError(
            "vgg16 cannot download ImageNet weights (no network at run time): download "
            f"{NOTOP_WEIGHTS_URL} on a machine with network access and pass its path as "
            "the weights option"
        )
    if not os.path.isfile(weights):
        raise UserError(f"vgg16 weights file not found: {weights}")
    return weights


def build(image_size: int, options: VGG16Options = VGG16Options()) -> keras.Model:
    """Builds VGG16 (no top) + the seed's head for [image_size, image_size, 1] images in [0, 1]."""
    if image_size < _MIN_IMAGE_SIZE:
        raise UserError(
            f"the vgg16 model needs an image size of at least {_MIN_IMAGE_SIZE}; got {image_size}"
        )
    weights = _checked_weights(options.weights)
    try:
        backbone = keras.applications.VGG16(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            name="vgg16_backbone",
        )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load vgg16 weights from {weights}: {error}") from error
    if options.freeze_backbone:
        for layer in backbone.layers:
            layer.trainable = layer.name in _FINE_TUNED_WHEN_FROZEN

    image = keras.Input(shape=(image_size, image_size, 1), name="image")
    rgb = layers.Concatenate(name="grey_to_rgb")([image, image, image])
    # Preprocessing lives in the model so callers always feed [0, 1] images.
    x = layers.Rescaling(
        scale=255.0, offset=[-mean for mean in _IMAGENET_BGR_MEANS], name="vgg16_preprocess"
    )(rgb)
    x = backbone(x)
    x = layers.Flatten()(x)
    metadata = architecture.metadata_input(options)
    if metadata is not None:  # the header's facts join the image's features before the dense head
        x = layers.Concatenate()([x, keras.ops.cast(metadata, x.dtype)])
    x = layers.Dense(64, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01))(x)
    x = layers.Dropout(0.5)(x)
    # float32 so the probability (and the loss on it) stays exact under a mixed policy.
    target = layers.Dense(1, activation="sigmoid", dtype="float32", name="target")(x)
    return keras.Model(architecture.network_inputs(image, metadata), {"target": target}, name="vgg16")


class VGG16(Classifier):
    name = "vgg16"
    options_type = VGG16Options
    presets = PRESETS
    build = staticmethod(build)


ARCHITECTURE = VGG16()
