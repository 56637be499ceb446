"""The seed's VGG16 transfer-learning classifier on grey radiographs: keras.applications' VGG16, with
ImageNet weights from the Keras cache (pneumo_tf.models.pretrained.keras_application) or a local file."""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import keras
from keras import layers

from pneumo_tf.cli import option
from pneumo_tf.errors import UserError
from pneumo_tf.models import architecture, pretrained
from pneumo_tf.models.architecture import Classifier, ModelOptions, Preset

NOTOP_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
NOTOP_WEIGHTS_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/vgg16/{NOTOP_WEIGHTS_FILE}"
# keras.applications.vgg16.preprocess_input ("caffe" mode) flips RGB to BGR and subtracts
# these means from pixels in [0, 255]; a grey image repeated to three channels is the same
# in either order, so only the subtraction is left.
IMAGENET_CONVERSION = pretrained.InputConversion(offset=(-103.939, -116.779, -123.68))
# With the backbone frozen the seed still fine-tunes its last three layers
# (block5_conv2, block5_conv3 and the weightless block5_pool).
_FINE_TUNED_WHEN_FROZEN = ("block5_conv2", "block5_conv3")
# VGG16 halves the image five times.
_MIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class VGG16Options(ModelOptions):
    model_name: ClassVar[str] = "vgg16"

    weights: str | None = option(None, "imagenet: keras.applications' ImageNet weights, read from the Keras cache "
                                 f"(~/.keras/models/{NOTOP_WEIGHTS_FILE}, downloaded there once); or the path of a "
                                 "local no-top VGG16 weights file (any file keras.Model.load_weights reads); none: "
                                 "random initialisation.")
    freeze_backbone: bool = option(True, "Train only the last two convolutions of the backbone, as the seed's first "
                                   "VGG16 run did; False trains it all, as its second run did.")


PRESETS = {
    "demo": Preset("The seed's network, Adam 5e-4.", train={"learning_rate": 5e-4}),
}


def _backbone(image_size: int, weights: str | None) -> keras.Model:
    """keras.applications' VGG16 (no top) for [image_size, image_size, 3] inputs with `weights`."""

    def vgg16(source):
        return keras.applications.VGG16(include_top=False, weights=source, input_shape=(image_size, image_size, 3),
                                        name="vgg16_backbone")

    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise UserError(f"vgg16 weights file not found: {weights}")
    try:
        if weights == "imagenet":
            return pretrained.keras_application(vgg16, NOTOP_WEIGHTS_FILE, NOTOP_WEIGHTS_URL, "vgg16")
        return vgg16(weights)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load vgg16 weights from {weights}: {error}") from error


def build(image_size: int, options: VGG16Options = VGG16Options()) -> keras.Model:
    """Builds VGG16 (no top) + the seed's head for [image_size, image_size, 1] images in [0, 1]."""
    if image_size < _MIN_IMAGE_SIZE:
        raise UserError(
            f"the vgg16 model needs an image size of at least {_MIN_IMAGE_SIZE}; got {image_size}"
        )
    backbone = _backbone(image_size, options.weights)
    if options.freeze_backbone:
        for layer in backbone.layers:
            layer.trainable = layer.name in _FINE_TUNED_WHEN_FROZEN

    image = keras.Input(shape=(image_size, image_size, 1), name="image")
    # Preprocessing lives in the model so callers always feed [0, 1] images.
    x = backbone(pretrained.grey_to_model_input(image, IMAGENET_CONVERSION, 3, name="vgg16_input"))
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
