"""The TFRecord schema: every key, how a record is written and how it is parsed.

One `tf.train.Example` per image. The converter writes through `serialize_example`
and every reader parses through `parse_features`, so the keys live here and nowhere
else. Writing needs no TensorFlow (records/tfrecord.py encodes the protos), so
converter worker processes stay light; only `parse_features` imports it.
"""
from __future__ import annotations

import dataclasses

from pneumo_tf.records.tfrecord import encode_example, encode_feature

# Keys (BUILD.md, "The record schema", says what each holds).
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
# The union of the boxes at the stored image's size with each run of identical rows and of
# columns kept once (records/masks.py): a 1-bit PNG plus how many stored rows and columns each stands for.
MASK_ENCODED = "mask/encoded"
MASK_ROW_REPEATS = "mask/row_repeats"
MASK_COL_REPEATS = "mask/col_repeats"

BOX_KEYS = (XMIN, YMIN, XMAX, YMAX)

# label/class values; -1 marks an unlabeled (test) image for both target and class.
CLASS_NAMES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
LUNG_OPACITY = CLASS_NAMES.index("Lung Opacity")  # the class of every image with a box (target 1)
NOT_NORMAL = CLASS_NAMES.index("No Lung Opacity / Not Normal")  # abnormal, but no opacity (look-alikes)
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
    # The mask as records/masks.py `encode` gives it: collapsed PNG, row repeats, column repeats.
    mask_encoded: bytes
    mask_row_repeats: tuple[int, ...]
    mask_col_repeats: tuple[int, ...]
    target: int = UNLABELED
    label_class: int = UNLABELED
    # Boxes as (xmin, ymin, xmax, ymax) normalised to [0, 1] of the source image.
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    view: str = ""
    age: int = -1
    sex: str = ""
    pixel_spacing: tuple[float, float] = (0.0, 0.0)


def serialize_example(record: Record) -> bytes:
    """The record as a serialised tf.train.Example, deterministically (sorted feature keys)."""
    features = {
        IMAGE_ENCODED: encode_feature("bytes", [record.image_encoded]),
        IMAGE_FORMAT: encode_feature("bytes", [record.image_format.encode()]),
        IMAGE_HEIGHT: encode_feature("int64", [record.height]),
        IMAGE_WIDTH: encode_feature("int64", [record.width]),
        SOURCE_HEIGHT: encode_feature("int64", [record.source_height]),
        SOURCE_WIDTH: encode_feature("int64", [record.source_width]),
        IMAGE_ID: encode_feature("bytes", [record.image_id.encode()]),
        VIEW: encode_feature("bytes", [record.view.encode()]),
        AGE: encode_feature("int64", [record.age]),
        SEX: encode_feature("bytes", [record.sex.encode()]),
        PIXEL_SPACING: encode_feature("float", record.pixel_spacing),
        TARGET: encode_feature("int64", [record.target]),
        CLASS: encode_feature("int64", [record.label_class]),
        MASK_ENCODED: encode_feature("bytes", [record.mask_encoded]),
        MASK_ROW_REPEATS: encode_feature("int64", record.mask_row_repeats),
        MASK_COL_REPEATS: encode_feature("int64", record.mask_col_repeats),
    }
    for index, key in enumerate(BOX_KEYS):
        features[key] = encode_feature("float", [box[index] for box in record.boxes])
    return encode_example(features)


def parse_features():
    """The feature spec for `tf.io.parse_example`; boxes and mask repeats parse as ragged tensors."""
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
        MASK_ROW_REPEATS: tf.io.RaggedFeature(tf.int64),
        MASK_COL_REPEATS: tf.io.RaggedFeature(tf.int64),
    }
    for key in BOX_KEYS:
        spec[key] = tf.io.RaggedFeature(tf.float32)
    return spec
