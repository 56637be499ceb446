"""The seed's custom CNN classifier: pneumonia (Lung Opacity) probability per image."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import keras
from keras import layers

from pneumo_tf.cli import option
from pneumo_tf.errors import UserError
from pneumo_tf.models import architecture
from pneumo_tf.models.architecture import Classifier, ModelOptions, Preset

_STEM_FILTERS = 128
# (filters, dropout after the block) for the five SeparableConv2D blocks; the seed
# raises dropout with depth and has none after the first block.
_SEPARABLE_BLOCKS = ((256, None), (256, 0.2), (256, 0.3), (256, 0.4), (512, 0.5))
# (units, dropout after the layer) for the fully connected head.
_DENSE_LAYERS = ((512, 0.7), (256, 0.5), (128, 0.3))
# The stem and each block halve the image once.
_HALVINGS = 1 + len(_SEPARABLE_BLOCKS)


@dataclasses.dataclass(frozen=True)
class CNNOptions(ModelOptions):
    model_name: ClassVar[str] = "cnn"

    width: float = option(1.0, "Multiplies every layer's filters and units (0.25 gives a model that trains quickly "
                          "on a CPU); 1.0 is the seed's network.", exclusive_minimum=0.0)


PRESETS = {
    "demo": Preset("A quarter-width network (minutes on 2 CPU cores at 128 px), Adam 1e-3.",
                   model_options={"width": 0.25}, train={"learning_rate": 1e-3}),
}


def _scaled(count: int, width: float) -> int:
    return max(1, round(count * width))


def build(image_size: int, options: CNNOptions = CNNOptions()) -> keras.Model:
    """Builds the CNN for [image_size, image_size, 1] images in [0, 1]."""
    width = options.width
    if image_size < 2**_HALVINGS:
        raise UserError(
            f"the cnn model halves the image {_HALVINGS} times and needs an image size "
            f"of at least {2**_HALVINGS}; got {image_size}"
        )
    image = keras.Input(shape=(image_size, image_size, 1), name="image")
    x = image
    for _ in range(2):
        x = layers.Conv2D(_scaled(_STEM_FILTERS, width), 3, padding="same", activation="relu")(x)
    x = layers.MaxPool2D(2)(x)
    for filters, dropout in _SEPARABLE_BLOCKS:
        for _ in range(2):
            x = layers.SeparableConv2D(
                _scaled(filters, width), 3, padding="same", activation="relu"
            )(x)
        # Synchronised across replicas, as in the other architectures: N replicas train the model one
        # device trains on the same global batch. On one device it is plain batch norm.
        x = layers.BatchNormalization(synchronized=True)(x)
        x = layers.MaxPool2D(2)(x)
        if dropout is not None:
            x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    metadata = architecture.metadata_input(options)
    if metadata is not None:  # the header's facts join the image's features before the dense head
        x = layers.Concatenate()([x, keras.ops.cast(metadata, x.dtype)])
    for units, dropout in _DENSE_LAYERS:
        x = layers.Dense(_scaled(units, width), activation="relu")(x)
        x = layers.Dropout(dropout)(x)
    # float32 so the probability (and the loss on it) stays exact under a mixed policy.
    target = layers.Dense(1, activation="sigmoid", dtype="float32", name="target")(x)
    return keras.Model(architecture.network_inputs(image, metadata), {"target": target}, name="cnn")


class CNN(Classifier):
    name = "cnn"
    options_type = CNNOptions
    presets = PRESETS
    build = staticmethod(build)


ARCHITECTURE = CNN()
