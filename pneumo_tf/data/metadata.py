"""What the header says about a radiograph, as a model's side input: view, sex and age encoded as numbers.

The records keep the header's facts as they are (`image/view` "AP"/"PA"/"", `patient/sex`
"M"/"F"/"O"/"", `patient/age` years or -1: pneumo_tf.records.schema). A model trained with
`--metadata=view,sex,age` (any subset, in that order) takes them as one float32 vector per
image, `encode(fields, view, sex, age)`:

  view  3 values: one-hot AP, PA, unknown (empty, or any other view such as LL)
  sex   3 values: one-hot M, F, unknown (empty or O)
  age   2 values: age / 100 clipped to [0, 1.2] (0 when unknown), and 1 when unknown

Every field has an explicit "unknown", so PNG/JPEG inputs without a header (and without a
metadata CSV) still have a valid encoding, and a model learns what knowing nothing means.
The encoding is a pure TensorFlow function of the raw fields: the input pipeline, prediction,
the web server and the exported SavedModel all call it, so a model sees the same numbers
wherever it runs.
"""
from __future__ import annotations

import tensorflow as tf

from pneumo_tf.errors import UserError

FIELDS = ("view", "sex", "age")
VIEWS = ("AP", "PA")
SEXES = ("M", "F")
AGE_SCALE = 100.0  # years per unit
MAX_AGE = 120.0  # RSNA's headers hold a few ages of 148-155 (typing errors): clipped
WIDTHS = {"view": len(VIEWS) + 1, "sex": len(SEXES) + 1, "age": 2}
# The raw fields of a pipeline batch the encoding reads (pneumo_tf.data.pipeline).
RAW_KEYS = {"view": "view", "sex": "sex", "age": "age"}


def parse_fields(text: str | tuple | list | None) -> tuple[str, ...]:
    """"view,age" (or a sequence) -> ("view", "age") in the canonical order; "" or None -> ()."""
    if not text:
        return ()
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown metadata field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    return tuple(name for name in FIELDS if name in names)


def width(fields) -> int:
    """Length of the encoded vector of `fields`."""
    return sum(WIDTHS[name] for name in fields)


def _one_hot(values, vocabulary) -> tf.Tensor:
    """String [B] -> float32 [B, len(vocabulary) + 1], the last column for anything else."""
    matches = tf.stack([tf.equal(values, word) for word in vocabulary], axis=-1)
    known = tf.reduce_any(matches, axis=-1, keepdims=True)
    return tf.cast(tf.concat([matches, tf.logical_not(known)], axis=-1), tf.float32)


def encode(fields, view, sex, age) -> tf.Tensor:
    """The side input of `fields` for a batch: view, sex string [B], age int [B] -> float32 [B, width(fields)].

    Upper-cases and strips the strings (headers write "ap " or "Pa" too).
    """
    view = tf.strings.upper(tf.strings.strip(tf.convert_to_tensor(view, tf.string)))
    sex = tf.strings.upper(tf.strings.strip(tf.convert_to_tensor(sex, tf.string)))
    age = tf.cast(tf.convert_to_tensor(age), tf.float32)
    parts = []
    for name in parse_fields(fields):
        if name == "view":
            parts.append(_one_hot(view, VIEWS))
        elif name == "sex":
            parts.append(_one_hot(sex, SEXES))
        else:
            known = age >= 0
            scaled = tf.where(known, tf.minimum(age, MAX_AGE) / AGE_SCALE, 0.0)
            parts.append(tf.stack([scaled, tf.cast(tf.logical_not(known), tf.float32)], axis=-1))
    if not parts:
        return tf.zeros([tf.shape(age)[0], 0], tf.float32)
    return tf.concat(parts, axis=-1)


def encode_batch(fields, batch: dict) -> tf.Tensor:
    """`encode` of a pipeline batch's raw fields."""
    return encode(fields, batch[RAW_KEYS["view"]], batch[RAW_KEYS["sex"]], batch[RAW_KEYS["age"]])


def with_metadata(batch: dict, fields) -> dict:
    """A pipeline batch with "metadata", the encoding of `fields` (unchanged when `fields` is empty):
    what a network built with those fields takes beside the image."""
    if not fields:
        return batch
    return {**batch, "metadata": encode_batch(fields, batch)}


def unknown(batch_size) -> dict:
    """Raw fields of `batch_size` images about which nothing is known ("" and -1)."""
    return {"view": tf.fill([batch_size], ""), "sex": tf.fill([batch_size], ""), "age": tf.fill([batch_size], -1)}


def model_inputs(images, fields, raw: dict | None = None) -> dict:
    """A network's inputs: {"image": images} and, with `fields`, "metadata" encoded from `raw` (a batch's
    view, sex and age; None: nothing known about the images)."""
    inputs = {"image": images}
    if fields:
        raw = unknown(tf.shape(images)[0]) if raw is None else raw
        inputs["metadata"] = encode_batch(fields, raw)
    return inputs
