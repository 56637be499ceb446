"""The TFRecord schema: every key, how a record is written and how it is parsed.

One `tf.train.Example` per image. The converter writes through `serialize_example`
and every reader parses through `FEATURES`, so the keys live here and nowhere else.
This module imports no TensorFlow at import time except through `parse_features`,
so converter worker processes stay light.
"""
from __future__ import annotations

import dataclasses

# Keys (DESIGN.md section 4).
IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
SOURCE_HEIGHT = "image/source_height"
SOURCE_WIDTH = "image/source_width"
IMAGE_ID = "image/id"
VIEW = "image/view"
AGE = "patient/age"
SEX = "patient/sex"
PIXEL_SPACING = "image/pixel_spacing"
TARGET = "label/target"
CLASS = "label/class"
XMIN = "bbox/xmin"
YMIN = "bbox/ymin"
XMAX = "bbox/xmax"
YMAX = "bbox/ymax"
MASK_ENCODED = "mask/encoded"

BOX_KEYS = (XMIN, YMIN, XMAX, YMAX)

# label/class values; -1 marks an unlabeled (test) image for both target and class.
CLASS_NAMES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
UNLABELED = -1

SPLITS = ("train", "val", "test")

JPEG = "jpeg"
PNG = "png"


@dataclasses.dataclass(frozen=True)
class Record:
    """Everything one example holds, in plain Python types."""

    image_id: str
    image_encoded: bytes
    image_format: str  # JPEG or PNG
    height: int
    width: int
    source_height: int
    source_width: int
    mask_encoded: bytes
    target: int = UNLABELED
    label_class: int = UNLABELED
    # Boxes as (xmin, ymin, xmax, ymax) normalised to [0, 1] of the source image.
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    view: str = ""
    age: int = -1
    sex: str = ""
    pixel_spacing: tuple[float, float] = (0.0, 0.0)


def serialize_example(record: Record) -> bytes:
    """Serialises a record deterministically (the feature map is otherwise in hash order)."""
    from tensorflow.core.example import example_pb2, feature_pb2

    def b(value: bytes | str):
        value = value.encode() if isinstance(value, str) else value
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[value]))

    def i(value: int):
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(value)]))

    def f(values):
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[float(v) for v in values]))

    features = {
        IMAGE_ENCODED: b(record.image_encoded),
        IMAGE_FORMAT: b(record.image_format),
        IMAGE_HEIGHT: i(record.height),
        IMAGE_WIDTH: i(record.width),
        SOURCE_HEIGHT: i(record.source_height),
        SOURCE_WIDTH: i(record.source_width),
        IMAGE_ID: b(record.image_id),
        VIEW: b(record.view),
        AGE: i(record.age),
        SEX: b(record.sex),
        PIXEL_SPACING: f(record.pixel_spacing),
        TARGET: i(record.target),
        CLASS: i(record.label_class),
        MASK_ENCODED: b(record.mask_encoded),
    }
    for index, key in enumerate(BOX_KEYS):
        features[key] = f(box[index] for box in record.boxes)
    example = example_pb2.Example(features=feature_pb2.Features(feature=features))
    return example.SerializeToString(deterministic=True)


def parse_features():
    """The feature spec for `tf.io.parse_example`; boxes parse as ragged tensors."""
    import tensorflow as tf

    spec = {
        IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string),
        IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
        SOURCE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        SOURCE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
        VIEW: tf.io.FixedLenFeature([], tf.string, default_value=""),
        AGE: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        SEX: tf.io.FixedLenFeature([], tf.string, default_value=""),
        PIXEL_SPACING: tf.io.FixedLenFeature([2], tf.float32, default_value=[0.0, 0.0]),
        TARGET: tf.io.FixedLenFeature([], tf.int64),
        CLASS: tf.io.FixedLenFeature([], tf.int64),
        MASK_ENCODED: tf.io.FixedLenFeature([], tf.string),
    }
    for key in BOX_KEYS:
        spec[key] = tf.io.RaggedFeature(tf.float32)
    return spec
