"""The model contract: what every architecture tells the rest of pneumo_tf about itself.

Training, evaluation, prediction, serving and the TensorBoard images read an
`Architecture` (looked up by name in `pneumo_tf.models.ARCHITECTURES`) and never name
one. Adding a model is one file in `pneumo_tf/models/` that defines a subclass and one
line in the registry.

What a model file declares:
  options_type  ONE frozen dataclass, a subclass of `ModelOptions`, whose fields are
                `pneumo_tf.cli.option(default, help, minimum=..., choices=...)`: every
                --model_option key with its type, default, help and range. An instance is
                checked when made (declared constraints, then its `check()` for what involves
                several fields); strings are parsed and JSON lists read by each field's type.
  build         `build(image_size, options)`: the network for `options`, an options_type.
  presets       {name: Preset}: named settings (model options and training settings, e.g.
                "demo") that `--preset=NAME` applies to whatever a run does not set itself
                (pneumo_tf.training.config.with_preset).
`Architecture.make_options(values)` turns --model_option's texts, a preset's values or a
saved model's JSON into the typed options; `Architecture.preset(name)` looks a preset up.

The flow of one batch (pipeline batch: see pneumo_tf.data.pipeline):

  training   inputs, labels = to_fit(batch)          # in the input pipeline
             raw = network(inputs, training=True)
             terms = loss(network, inputs, labels, raw, training=True)   # minimise sum(terms)
  validation the same with training=False, plus outputs(...) below, in one pass
  inference  raw = network(inputs, training=False)      # inputs: {"image": images[, "metadata": ...]}
             outputs = outputs(network, inputs, raw)   # in-graph; the SavedModel's signature
             detections(outputs, threshold), image_probability(outputs)   # on the host (numpy)
             masks(outputs, threshold, sizes)   # only when gives_masks: what a segmentation holds

Conventions: images float32 [B, S, S, 1] in [0, 1]; boxes normalised (ymin, xmin, ymax,
xmax) (pneumo_tf.records.boxes); everything a loss or an output returns is float32, also
under a mixed precision policy.

Losses and replicas: each term is what this replica contributes, scaled so that the
MEAN over replicas is the loss of the global batch (Keras' convention: the trainer
divides the sum of the terms by the number of replicas and the gradients are summed).
A plain per-replica mean over its images is right when replicas hold equal batches; a
term that pools over the batch (soft IoU, a count of positive anchors) all-reduces what
it pools (`sum_over_replicas`) and multiplies a local sum by the replica count.

Side inputs: a network built with `options.metadata` (view, sex, age: every architecture has
the option) takes a second input, "metadata" float32 [B, metadata.width(fields)], the header's
facts encoded by pneumo_tf.data.metadata (`with_metadata` adds it to a pipeline batch from the
batch's raw view, sex and age); `to_fit` passes it on, and `infer` takes it beside the images.
The classifiers feed it to their dense head; the box models to their image head and to a
learned per-image bias of their opacity logits (`metadata_bias`), so it moves box scores too.

Image heads (box models, `image_head`): an image-level output "image_logits" from the pooled
deepest features (and the metadata), trained on the binary target ([B, 1], sigmoid) or on the
three classes ([B, 3], softmax: Normal, No Lung Opacity / Not Normal, Lung Opacity); its
P(opacity) is the model's image probability ("image_probability" among the outputs), and an
image it calls negative at t gets no boxes at t (`gate_by_image`).

One confidence threshold t makes both decisions everywhere: an image is positive when
its `image_probability` is above t, and its boxes are `detections(outputs, t)`. A model that
segments (`gives_masks`) also says which pixels it calls opacity at t (`masks`): the pixels of
its boxes' findings, drawn over the whole image at any size (the DICOM Segmentation's).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol

import keras
import numpy as np
import tensorflow as tf

from pneumo_tf import cli
from pneumo_tf.data import metadata as metadata_lib
from pneumo_tf.errors import UserError
from pneumo_tf.records import schema

# Detections of one image: (boxes float32 [N, 4] normalised (ymin, xmin, ymax, xmax), scores float32 [N]),
# highest score first.
Detections = tuple[np.ndarray, np.ndarray]

# Outputs of a box detector (`detector_outputs`): fixed-size, padded after num_detections.
BOXES, SCORES, NUM_DETECTIONS = "boxes", "scores", "num_detections"
# An image head's raw output and the image probability `outputs` computes from it (float32 [B]).
IMAGE_LOGITS, IMAGE_PROBABILITY = "image_logits", "image_probability"
# What an image head is trained on: nothing (no head), the binary target, or the three classes.
IMAGE_HEADS = ("none", "binary", "three_class")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The base of an architecture's options dataclass (see the module docstring); no options itself.

    Subclasses set `model_name` (it names the architecture in error messages) and may override
    `check()` with the checks that involve several fields.
    """

    model_name: ClassVar[str] = "model"

    metadata: tuple[str, ...] = cli.option(
        (), "Header facts the network takes as a side input, comma separated: any of view, sex, age "
        "(pneumo_tf.data.metadata; unknown values, e.g. of PNG/JPEG files without a metadata CSV, have their own "
        "encoding). Empty: the image only. Box models read it through their image head (image_head=binary): "
        "without one it only shifts each image's opacity logits, and that shift did not learn the view on "
        "synthetic look-alikes (benchmarks/README.md).", choices=metadata_lib.FIELDS)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            try:
                object.__setattr__(self, field.name, cli.coerce_value(getattr(self, field.name), hints[field.name]))
            except ValueError as error:
                raise UserError(f"{self.model_name} option {field.name}: {error}") from error
        cli.check_constraints(self, label=lambda name: f"{self.model_name} option {name}")
        self.check()

    def check(self) -> None:
        """UserErrors for values that do not fit together (each field's own range is declared)."""

    @classmethod
    def from_mapping(cls, values: Mapping) -> "ModelOptions":
        """The options with `values` (key -> value or text to parse) in place of the defaults."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"unknown {cls.model_name} option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known)) or 'none'}")
        return cls(**values)

    def as_dict(self) -> dict:
        """Every option by name, JSON-ready (tuples as lists): what pneumo_tf.json and a saved network record."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class BoxModelOptions(ModelOptions):
    """The options every box model shares: its image head (see the module docstring)."""

    image_head: str = cli.option(
        "none", "An image-level head on the pooled deepest features (and the metadata): binary (the target) or "
        "three_class (Normal / Not Normal / Lung Opacity); its P(opacity) is the image probability, and images it "
        "calls negative get no boxes. none: the image probability comes from the boxes (mask).", choices=IMAGE_HEADS)
    image_head_shapes_features: bool = cli.option(
        False, "Let the image head's loss reach the shared features (multi-task). Off: the head reads the features "
        "the box or mask loss learns and cannot pull them away from it (on the hard synthetic set a shared head "
        "kept mask_resnet's mask from learning: val mAP 0.05 against 0.78).")


# The training the box models' "real" presets share (benchmarks/real.py measured them): 24 passes over
# the training split at 128 px, the decoded images cached after the first (8 x 128^2 bytes an image),
# batches 40% positive (25% of the real images are): that raised every model on every real fold measured.
REAL_DATA_TRAINING = {"image_size": 128, "epochs": 24, "cache": True, "positive_fraction": 0.4}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Named settings of an architecture: model options and training settings (fields of
    pneumo_tf.training.config.TrainConfig: learning_rate, warmup_steps, image_size, batch_size,
    epochs, positive_fraction, augment, ...). A run takes each of them unless it sets it itself."""

    description: str
    model_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    train: Mapping[str, object] = dataclasses.field(default_factory=dict)


class ReadsOutputs(Protocol):
    """The host side of the contract: what turns a batch's outputs into detections and image
    probabilities. An Architecture reads one network's outputs; a pneumo_tf.models.reading.Reading
    reads its members' (one model, flip TTA, an ensemble)."""

    gives_boxes: bool

    def detections(self, outputs, threshold: float) -> list[Detections]: ...

    def image_probability(self, outputs) -> np.ndarray: ...


def no_detections() -> Detections:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)


def sum_over_replicas(value):
    """Sums a per-replica value over all replicas (the identity outside a multi-replica step).

    The all-reduce's gradient is the all-reduce of the gradients, so a term pooled this way
    gives every replica the global batch's value and gradient.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce("SUM", value)


def replica_count() -> int:
    """Replicas in sync in the current step (1 outside a strategy's replica context)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


class Architecture:
    """One architecture: subclasses set `name` and `gives_boxes` and override what differs.

    Instances hold no state: one per architecture lives in the registry.
    """

    name: str = ""
    # The options dataclass of --model_option (a ModelOptions subclass) and the named presets.
    options_type: type[ModelOptions] = ModelOptions
    presets: Mapping[str, Preset] = {}
    # Whether `detections` can return boxes: models that do are selected by val_map (the
    # challenge mAP), pure classifiers by val_loss, and their mAP is not reported.
    gives_boxes: bool = True
    # Whether `masks` can say which pixels are opacity (mask_resnet's mask, mask_rcnn's mask head).
    gives_masks: bool = False
    # Keys of a pipeline batch that the training step needs as inputs besides the image;
    # augmentation moves image, mask and boxes together, whichever side they are on.
    input_keys: tuple[str, ...] = ("image",)
    label_keys: tuple[str, ...] = ()
    # Labels passed on when the batch has them (an image head's target and class).
    optional_label_keys: tuple[str, ...] = ()
    # The --trainable_layers groups `set_trainable_layers` knows (pneumo_tf.models.pretrained.LAYER_GROUPS
    # for ResNet detectors); "all" leaves the network's own trainable flags as its build set them.
    layer_groups: tuple[str, ...] = ("all",)

    @property
    def monitor(self) -> tuple[str, str]:
        """(logs key, "max" or "min") that selects the best epoch and drives early stopping."""
        return ("val_map", "max") if self.gives_boxes else ("val_loss", "min")

    def make_options(self, values: ModelOptions | Mapping | None = None) -> ModelOptions:
        """`options_type` from a mapping of option -> value (--model_option's texts, a preset's values,
        a saved model's JSON; missing ones keep their defaults), or as given when it is one already."""
        if isinstance(values, self.options_type):
            return values
        return self.options_type.from_mapping(values or {})

    def preset(self, name: str) -> Preset:
        """The preset called `name`, or a UserError listing this architecture's presets."""
        if name not in self.presets:
            raise UserError(f"unknown preset {name!r} of model {self.name}; its presets: "
                            f"{', '.join(sorted(self.presets)) or 'none'}")
        return self.presets[name]

    def build(self, image_size: int, options: ModelOptions) -> keras.Model:
        """The network for [image_size, image_size, 1] images with `options` (an `options_type`)."""
        raise NotImplementedError

    def set_trainable_layers(self, network: keras.Model, options: ModelOptions, layers_to_train: str) -> None:
        """Trains the group `layers_to_train` (one of `layer_groups`) of `network` and freezes the rest."""
        if layers_to_train not in self.layer_groups:
            raise UserError(f"the {self.name} model trains layer groups {', '.join(self.layer_groups)}, not "
                            f"{layers_to_train!r}")

    def to_fit(self, batch: dict) -> tuple[dict, dict]:
        """A pipeline batch -> (inputs, labels) for the training and validation steps.

        Runs in the input pipeline; strings and other metadata stay out (they cannot enter an
        XLA step). Boxes always travel with num_boxes so augmentation can move them.
        """
        inputs = {key: batch[key] for key in self.input_keys}
        if METADATA in batch:
            inputs[METADATA] = batch[METADATA]
        labels = {key: batch[key] for key in self.label_keys}
        labels.update({key: batch[key] for key in self.optional_label_keys if key in batch})
        if "boxes" in inputs or "boxes" in labels:
            (inputs if "boxes" in inputs else labels)["num_boxes"] = batch["num_boxes"]
        return inputs, labels

    def loss_names(self, network: keras.Model) -> tuple[str, ...]:
        """The keys `loss` returns for this network (the trainer makes one tracker per term up front)."""
        raise NotImplementedError

    def loss(self, network: keras.Model, inputs: dict, labels: dict, raw: dict, training: bool) -> dict:
        """Named loss terms (float32 scalars, already weighted; see the module docstring on replicas)."""
        raise NotImplementedError

    def metrics(self, network: keras.Model) -> dict[str, list]:
        """Keras metrics by raw output name, each updated with (labels[name], raw[name]); fresh objects
        (they hold state), named as they are logged ("mask_mean_iou")."""
        return {}

    def outputs(self, network: keras.Model, inputs: dict, raw: dict) -> dict:
        """In-graph: the network's raw inference outputs -> what `detections` and `image_probability` read."""
        return raw

    def detections(self, outputs: dict, threshold: float) -> list[Detections]:
        """Per image, its boxes with scores above `threshold`, highest first (numpy in, numpy out)."""
        raise NotImplementedError

    def image_probability(self, outputs: dict) -> np.ndarray:
        """float32 [B]: the probability that each image shows an opacity."""
        raise NotImplementedError

    def masks(self, outputs: dict, threshold: float, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Per image, bool [height, width] at its (height, width) in `sizes` (any size: the whole image,
        the frame of the normalised boxes): the pixels of the findings `detections(outputs, threshold)`
        returns. Only when `gives_masks` (numpy in, numpy out)."""
        raise NotImplementedError(f"the {self.name} model gives no masks")

    def infer(self, network: keras.Model, inputs: dict) -> dict:
        """{"image": images[, "metadata": encoded]} -> outputs, in-graph: what predict, serve and the
        exported SavedModel run."""
        return self.outputs(network, inputs, network(inputs, training=False))


class Classifier(Architecture):
    """An image classifier: one sigmoid output "target" [B, 1]; no boxes."""

    gives_boxes = False
    label_keys = ("target",)

    def to_fit(self, batch: dict) -> tuple[dict, dict]:
        inputs, labels = super().to_fit(batch)
        return inputs, {"target": tf.cast(labels["target"], tf.float32)[:, None]}

    def loss_names(self, network):
        return ("target",)

    def loss(self, network, inputs, labels, raw, training):
        return {"target": target_loss(labels["target"], raw["target"])}

    def metrics(self, network):
        return {"target": target_metrics()}

    def detections(self, outputs, threshold):
        return [no_detections() for _ in range(len(self.image_probability(outputs)))]

    def image_probability(self, outputs):
        target = np.asarray(outputs["target"], np.float32)
        return target.reshape(len(target))


def target_loss(target, probability):
    """Binary cross-entropy of the image probability [B, 1], the mean over this replica's images."""
    return keras.ops.mean(keras.losses.binary_crossentropy(target, probability))


def target_metrics() -> list:
    """Precision, recall and AUC of the "target" output at 0.5, as logged: target_precision, ..."""
    return [
        keras.metrics.Precision(name="target_precision"),
        keras.metrics.Recall(name="target_recall"),
        keras.metrics.AUC(name="target_auc"),
    ]


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [h, w] array resized to [height, width] by nearest neighbour: each output pixel takes the
    input pixel its centre falls in, so a mask's edges stay where its boxes' edges are."""
    rows = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64)
    columns = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64)
    return mask[rows[:, None], columns[None, :]]


def detector_outputs(boxes, scores, num_detections) -> dict:
    """The outputs dict of a box detector: boxes [B, K, 4] normalised yxyx, scores [B, K] in [0, 1]
    (highest first), num_detections int32 [B]; rows past num_detections are padding."""
    return {
        BOXES: tf.cast(boxes, tf.float32),
        SCORES: tf.cast(scores, tf.float32),
        NUM_DETECTIONS: tf.cast(num_detections, tf.int32),
    }


class BoxDetector(Architecture):
    """A detector whose `outputs` are `detector_outputs` (plus IMAGE_PROBABILITY with an image head):
    decoding them is shared here."""

    input_keys = ("image",)
    label_keys = ("boxes",)
    optional_label_keys = ("target", "class")

    def detections(self, outputs: dict, threshold: float) -> list[Detections]:
        return gate_by_image(outputs, threshold, self._box_detections(outputs, threshold))

    def _box_detections(self, outputs: dict, threshold: float) -> list[Detections]:
        boxes = np.asarray(outputs[BOXES], np.float32)
        scores = np.asarray(outputs[SCORES], np.float32)
        counts = np.asarray(outputs[NUM_DETECTIONS]).reshape(-1)
        found = []
        for image_boxes, image_scores, count in zip(boxes, scores, counts):
            image_boxes, image_scores = image_boxes[:count], image_scores[:count]
            keep = image_scores > threshold
            order = np.argsort(-image_scores[keep], kind="stable")
            found.append((np.clip(image_boxes[keep][order], 0.0, 1.0), image_scores[keep][order]))
        return found

    def image_probability(self, outputs: dict) -> np.ndarray:
        """The image head's P(opacity) when the network has one, else the highest detection score
        (0 for an image without detections)."""
        if IMAGE_PROBABILITY in outputs:
            return np.asarray(outputs[IMAGE_PROBABILITY], np.float32).reshape(-1)
        scores = np.asarray(outputs[SCORES], np.float32)
        counts = np.asarray(outputs[NUM_DETECTIONS]).reshape(-1)
        valid = np.arange(scores.shape[1])[None, :] < counts[:, None]
        return np.where(valid, scores, 0.0).max(axis=1, initial=0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Side inputs and image heads: the parts every architecture builds alike (see the module docstring).

METADATA = "metadata"


def metadata_input(options: ModelOptions):
    """The network's "metadata" input for `options.metadata`, or None without metadata."""
    if not options.metadata:
        return None
    return keras.Input((metadata_lib.width(options.metadata),), name=METADATA)


def network_inputs(image, metadata) -> dict:
    """A functional network's inputs dict: the image, and the metadata when there is any."""
    return {"image": image} if metadata is None else {"image": image, METADATA: metadata}


def metadata_bias(metadata, name: str = "metadata_bias"):
    """A learned logit offset per image from its metadata, float32 [B, 1]: added to a model's opacity
    logits, it lets the header's facts raise or lower every score of an image. Starts at 0."""
    return keras.layers.Dense(1, kernel_initializer="zeros", dtype="float32", name=name)(metadata)


def image_head_logits(features, metadata, kind: str, shapes_features: bool = False):
    """The image head (`kind` binary or three_class): globally pooled features [B, H, W, C] (and the
    metadata) -> float32 logits [B, 1] or [B, 3], named IMAGE_LOGITS; its gradient stops at the features
    unless `shapes_features` (BoxModelOptions.image_head_shapes_features)."""
    if not shapes_features:
        features = keras.ops.stop_gradient(features)
    pooled = keras.layers.GlobalAveragePooling2D(name="image_head_pool")(features)
    if metadata is not None:
        pooled = keras.layers.Concatenate(name="image_head_inputs")([pooled, keras.ops.cast(metadata, pooled.dtype)])
    return keras.layers.Dense(1 if kind == "binary" else len(schema.CLASS_NAMES), dtype="float32",
                              name=IMAGE_LOGITS)(pooled)


def image_head_probability(logits):
    """In-graph: image head logits [B, 1] (binary) or [B, 3] (three classes) -> P(opacity) float32 [B]."""
    logits = tf.cast(logits, tf.float32)
    if logits.shape[-1] == 1:
        return tf.sigmoid(logits[:, 0])
    return tf.nn.softmax(logits)[:, schema.LUNG_OPACITY]


def image_head_loss(labels: dict, logits):
    """The image head's cross-entropy, the mean over this replica's images: binary on the target, or
    three-way on the class (images of unknown class, -1, count as weight 0)."""
    logits = tf.cast(logits, tf.float32)
    if logits.shape[-1] == 1:
        target = tf.cast(tf.reshape(labels["target"], [-1]), tf.float32)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(target, logits[:, 0]))
    classes = tf.cast(tf.reshape(labels["class"], [-1]), tf.int32)
    known = classes >= 0
    entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(classes, 0), logits)
    return tf.reduce_sum(tf.where(known, entropy, 0.0)) / tf.cast(tf.maximum(tf.size(classes), 1), tf.float32)


def with_image_probability(outputs: dict, raw: dict) -> dict:
    """`outputs` plus IMAGE_PROBABILITY when the network has an image head (in-graph)."""
    if IMAGE_LOGITS not in raw:
        return outputs
    return {**outputs, IMAGE_PROBABILITY: image_head_probability(raw[IMAGE_LOGITS])}


def gate_by_image(outputs: dict, threshold: float, found: list[Detections]) -> list[Detections]:
    """`found` without the boxes of images whose image head calls them negative at `threshold` (one
    threshold makes both decisions); unchanged for a network without an image head."""
    if IMAGE_PROBABILITY not in outputs:
        return found
    probability = np.asarray(outputs[IMAGE_PROBABILITY], np.float32).reshape(-1)
    return [detections if p > threshold else no_detections() for detections, p in zip(found, probability)]
