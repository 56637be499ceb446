"""RetinaNet (one-stage, focal loss): keras-hub's detector behind the pneumo_tf model contract.

keras-hub provides the network and its box machinery: `ResNetBackbone` (the image encoder,
randomly initialised, or a keras-hub ResNet preset's: `backbone_preset`), `RetinaNetBackbone` (a feature pyramid on
the encoder's P3-P5 plus strided P6, P7), `RetinaNetObjectDetector` (shared box and class
heads over every level), `AnchorGenerator` and `RetinaNetLabelEncoder` (anchor-to-box matching
and delta targets). Here it is one class
(lung opacity) on grey images, and the parts keras-hub gets wrong for RSNA or for this
framework are replaced:

* Input and outputs. `RetinaNetNetwork` wraps the detector so it takes {"image": [B, S, S, 1]}
  and returns its raw {"bbox_regression": [B, A, 4] (center_xywh deltas), "cls_logits":
  [B, A, 1]} as float32 under any precision policy. The encoder's BatchNormalization layers
  are synchronised across replicas (as in mask_resnet: with small per-replica detection batches,
  N replicas would otherwise train another model than one device on the same global batch);
  the wrapper re-applies that after a `.keras` reload, which rebuilds keras-hub's backbone
  from its constructor arguments.
* Boxes (`keras_hub_labels`). keras-hub's label encoder wants boxes in pixels with padding rows
  of -1 and classes 0 / -1 (its relative "rel_yxyx" format fails when the model is built), so
  the batch's normalised (ymin, xmin, ymax, xmax), padded after num_boxes, are converted.
* Loss (`RetinaNet.loss`). keras-hub's `compute_loss` sets every weight to zero when a batch
  has no positive anchor. About 70% of RSNA images have no box and per-replica batches are
  small, so many steps would teach nothing about false positives. Here the focal loss over
  negative anchors is always kept, and both terms are divided by the positive anchors of the
  GLOBAL batch (`sum_over_replicas`, then at least 1): each replica returns its local sum
  times the replica count over that normaliser, the contract's convention, so N replicas
  give one device's loss and gradients. Focal loss with the RetinaNet paper's alpha 0.25 and
  gamma 2 (keras-hub's default compile leaves class balancing off); keras-hub's Huber box loss
  (delta 1) on positive anchors.
* Box targets. The deltas are divided by a box variance of (0.1, 0.1, 0.2, 0.2)
  (`detection_ops.BOX_DELTA_SCALES`, mask_rcnn's too); keras-hub's default is 1, which leaves
  the targets at ~0.1, where the Huber loss is quadratic: the box term was ~0.01 against a
  focal term of ~0.7, so the shared encoder learnt next to nothing from the boxes, and on
  faint opacities nothing from the focal loss either (benchmarks/README.md has the figures).
* Initialisation. keras-hub fills the heads' kernels from N(0, 0.05), five times the paper's
  0.01, which drowns the focal loss's prior at the start, and puts the prior's bias on the box
  head instead of the class head; `build` initialises the heads as the paper does (see
  `_initialise_the_heads_as_the_paper`).
* Anchor matching. No anchor is ignored by default (negative_threshold = positive_threshold
  = 0.5; keras-hub and the paper ignore IoU 0.4-0.5): ignored anchors overlap an opacity, so
  they learn to score high, but no box loss trains their boxes, and the challenge metric counts
  each such box as a false positive. negative_threshold=0.4 restores the paper's band.
* Decoding (`RetinaNet.outputs`). Under mixed_float16 keras-hub's `decode_predictions` fails
  (a float16 x float32 Mul): predictions are cast to float32 first, and the anchor generator
  and label encoder are float32 layers. keras-hub's `NonMaxSuppression` is not used: inside a
  non-XLA `tf.function` (Keras' usual path on CPU and under tf.distribute) it drops or swaps
  kept boxes (its tile indices come from a float linspace cast to int: on random boxes 1 to
  3 of 64 kept boxes differed from its eager result, seen on keras-hub 0.32), it needs a
  static batch size, and it walks every anchor in tiles until it has max_detections boxes
  (14 s for two 512-px images on this project's 2-core CPU). TensorFlow's NMS kernel, padded
  (`detection_ops.padded_nms`, shared with mask_rcnn), is exact in eager, graph and XLA mode
  and takes any batch size; the `pre_nms_top_k` highest-scoring anchors go into it (the
  RetinaNet paper's 1000), which gives the same detections unless more than that many
  anchors pass `min_confidence`. Boxes come back normalised to [0, 1] as
  `detector_outputs`, padded with zeros.
* Pretrained weights (pneumo_tf.models.pretrained). `backbone_preset` takes the encoder from a
  keras-hub ResNet preset; `detector_preset` the whole detector from a keras-hub RetinaNet preset
  (retinanet_resnet50_fpn_coco): its encoder, pyramid, heads and anchors, with the class head's
  last convolution replaced by a one-class one (the paper's initialisation), as the seed's
  exclusions replace matterport's class-specific layers. Grey images are repeated to the preset's
  channels and normalised as its image converter says; the encoder's batch norm stays frozen
  unless train_bn; `--trainable_layers` (heads, 3+, 4+, 5+, all) trains matterport's groups
  (heads: the pyramid and the heads).
* XLA. The loss (label encoding included) and the outputs (decoding and NMS) run inside
  `tf.function(jit_compile=True)` on CPU. keras-hub's own `train_on_batch` with dict labels
  fails; training goes through pneumo_tf's trainer (`fit`) with this loss instead.

keras-hub's anchors are centred on multiples of the level's stride (the top-left corner of
each feature cell, not its centre), with sizes 4 * stride * 2^(k/3), k = 0, 1, 2, and aspect
ratios 1:2, 1:1, 2:1 (9 per position): at 512 px, 32 to 812 pixels, which covers RSNA's
opacities (at that size 20 to 264 pixels wide, 22 to 471 high, mostly taller than wide).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import keras
import keras_hub
import tensorflow as tf
from keras_hub.layers import AnchorGenerator
from keras_hub.src.models.retinanet.retinanet_label_encoder import RetinaNetLabelEncoder

from pneumo_tf.cli import option
from pneumo_tf.data import metadata as metadata_lib
from pneumo_tf.errors import UserError
from pneumo_tf.models import architecture, pretrained
from pneumo_tf.models.architecture import IMAGE_LOGITS, METADATA, Preset, detector_outputs, sum_over_replicas
from pneumo_tf.models.detection_ops import BOX_DELTA_SCALES, padded_nms

# One class, lung opacity, with keras-hub's label encoder's class values for the rest.
OPACITY, BACKGROUND, IGNORED = 0.0, -1.0, -2.0
# keras-hub's label encoder reads rows of -1 as "no box".
PADDING = -1.0
# Focal loss (Lin et al. 2017, table 1a/1b: alpha 0.25 weights positives, gamma 2).
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
# keras-hub's box loss: Huber with Keras' default delta on the center_xywh deltas.
HUBER_DELTA = 1.0
# The paper's Gaussian fill of the heads' convolutions (keras-hub's is Keras' default, 0.05).
HEAD_KERNEL_STDDEV = 0.01

BLOCK_TYPES = ("basic_block", "bottleneck_block", "basic_block_vd", "bottleneck_block_vd")


@dataclasses.dataclass(frozen=True)
class RetinaNetOptions(architecture.BoxModelOptions):
    """Defaults: ResNet-50 (bottleneck blocks 3, 4, 6, 3), pyramid levels P3-P7 with 256 channels and
    four 256-channel head convolutions, keras-hub's `retinanet_resnet50_fpn_coco` layout with one
    class and one input channel. ResNet-18 is block_type="basic_block", stackwise_num_blocks=(2, 2, 2,
    2). Stack i gives pyramid level P(i + 2)."""

    model_name: ClassVar[str] = "retinanet"

    stackwise_num_filters: tuple[int, ...] = option(
        (64, 128, 256, 512), "Filters of each ResNet stack (keras-hub needs 64 first).", minimum=1)
    stackwise_num_blocks: tuple[int, ...] = option((3, 4, 6, 3), "Residual blocks of each ResNet stack.", minimum=1)
    block_type: str = option("bottleneck_block", "keras-hub's ResNet block.", choices=BLOCK_TYPES)
    min_level: int = option(3, "Lowest pyramid level with anchors and heads (P3: stride 8).", minimum=2)
    max_level: int = option(7, "Highest pyramid level; levels above the encoder's are strided convolutions from "
                            "the pyramid's P5 (or from the encoder's last stage with use_p5).", minimum=2)
    use_p5: bool = option(False, "Build the levels above the encoder's from its last stage instead of P5.")
    pre_logits_num_conv_layers: int = option(
        4, "3x3 256-channel convolutions each head applies before its logits (the paper's 4).", minimum=0)
    use_prediction_head_norm: bool = option(False, "Group normalisation in the heads' convolutions.")
    positive_threshold: float = option(0.5, "Anchor IoU with a box at or above which the anchor is positive.",
                                       exclusive_minimum=0.0, maximum=1.0)
    negative_threshold: float = option(
        0.5, "Anchor IoU below which the anchor is background; in between it is ignored by the loss (0.4 gives the "
        "paper's ignored band).", exclusive_minimum=0.0, maximum=1.0)
    nms_iou_threshold: float = option(0.5, "Decoding: boxes overlapping a better one by more than this are "
                                      "suppressed.", minimum=0.0, maximum=1.0)
    max_detections: int = option(4, "Decoding: boxes kept per image (RSNA images have at most 4).", minimum=1)
    min_confidence: float = option(0.05, "Decoding: scores not above this are dropped.", minimum=0.0, maximum=1.0)
    pre_nms_top_k: int = option(1000, "Decoding: the best anchors that go into NMS (the paper's 1000).", minimum=1)
    anchor_size: float = option(4.0, "Anchor sides are anchor_size * 2**level * 2**(k/3) pixels (keras-hub's 4: "
                                "32 to 812 px on P3-P7); every box needs an anchor of IoU >= positive_threshold "
                                "to be learnt at all.", exclusive_minimum=0.0)
    classification_head_prior_probability: float = option(
        0.01, "P(opacity) of every anchor at initialisation (the paper's prior).", exclusive_minimum=0.0,
        exclusive_maximum=1.0)
    box_variance: tuple[float, ...] = option(
        BOX_DELTA_SCALES, "Scales of the box deltas (centre x, centre y, log width, log height): the regression "
        "targets are the deltas divided by them (keras-hub's default is 1).", exclusive_minimum=0.0)
    backbone_preset: str | None = option(None, pretrained.BACKBONE_PRESET_HELP)
    detector_preset: str | None = option(
        None, "A keras-hub RetinaNet preset (retinanet_resnet50_fpn_coco, or a save_to_preset folder) for the whole "
        "detector: its encoder, pyramid, heads, anchors and box variance replace the options that set them, and the "
        "class head's last convolution is a new one-class one.")
    train_bn: bool = option(False, pretrained.TRAIN_BN_HELP)

    def check(self) -> None:
        filters, blocks = self.stackwise_num_filters, self.stackwise_num_blocks
        if not filters or len(filters) != len(blocks) or filters[0] != 64:
            raise UserError(
                "retinanet needs stackwise_num_filters and stackwise_num_blocks of the same length, the first "
                f"stack with 64 filters (keras-hub's ResNet); got {filters} and {blocks}"
            )
        if not self.min_level <= min(self.max_level, len(filters) + 1):
            raise UserError(
                f"retinanet min_level must be between 2 and both max_level and the encoder's last level "
                f"P{len(filters) + 1}; got min_level={self.min_level}, max_level={self.max_level}"
            )
        if self.negative_threshold > self.positive_threshold:
            raise UserError("retinanet needs negative_threshold <= positive_threshold; got "
                            f"{self.negative_threshold} and {self.positive_threshold}")
        if len(self.box_variance) != 4:
            raise UserError(f"retinanet box_variance needs 4 scales (x, y, width, height); got {self.box_variance}")
        if self.max_detections > self.pre_nms_top_k:
            raise UserError(f"retinanet needs max_detections <= pre_nms_top_k; got {self.max_detections} and "
                            f"{self.pre_nms_top_k}")
        if self.backbone_preset and self.detector_preset:
            raise UserError("retinanet takes backbone_preset or detector_preset (which holds a backbone), not both")

    @property
    def freezes_batch_norm(self) -> bool:
        """Whether the encoder's batch norm stays as pretrained (a preset and not train_bn)."""
        return bool(self.backbone_preset or self.detector_preset) and not self.train_bn


_SMALL_RESNET = {"stackwise_num_filters": (64, 64, 128, 256), "stackwise_num_blocks": (1, 1, 1, 1),
                 "block_type": "basic_block", "min_level": 3, "max_level": 5, "pre_logits_num_conv_layers": 0}

PRESETS = {
    "demo": Preset(
        "A ResNet-18-like encoder of one block per stack, pyramid P3-P5 with 16-px anchors and up (for boxes of "
        "15-40 px at 128 px), no head convolution before the logits; Adam 3e-4 (benchmarks/README.md has the "
        "measurements).",
        model_options={**_SMALL_RESNET, "anchor_size": 2.0},
        train={"learning_rate": 3e-4}),
    "real": Preset(
        "The recipe for real radiographs on a CPU budget (benchmarks/real.py): the demo's network, 24 passes at "
        "128 px with the decoded images cached, 40% of each batch positive (positive_fraction 0.4: fold mean "
        "0.120 -> 0.152 on the 3 folds the recipe was chosen on, 0.106 -> 0.140 on the 2 others), Adam 3e-4 after "
        "a 50-step warm-up.",
        model_options={**_SMALL_RESNET, "anchor_size": 2.0},
        train={"learning_rate": 3e-4, "warmup_steps": 50, **architecture.REAL_DATA_TRAINING}),
}


@keras.saving.register_keras_serializable(package="pneumo_tf")
class RetinaNetNetwork(keras.Model):
    """keras-hub's RetinaNetObjectDetector as {"image": [B, S, S, 1][, "metadata": [B, M]]} -> float32 raw outputs.

    `detector` is the wrapped `keras_hub.models.RetinaNetObjectDetector`; its
    `anchor_generator` and `label_encoder` configure the loss and the decoding, and are saved
    with it, as are the decoding's settings (see `build`). The forward pass is the detector's own
    (its backbone, then its box and class heads on every pyramid level), written out here so the
    pyramid's top level can feed an image head and the metadata can shift the class logits
    (`metadata_width`, `image_head`: see pneumo_tf.models.architecture).
    """

    def __init__(self, detector, pre_nms_top_k: int = 1000, nms_iou_threshold: float = 0.5,
                 max_detections: int = 4, min_confidence: float = 0.05, metadata_width: int = 0,
                 image_head: str = "none", image_head_shapes_features: bool = False, conversion: dict | None = None,
                 **kwargs):
        height, width, channels = detector.backbone.image_shape
        image = keras.Input((height, width, 1), name="image")
        metadata = keras.Input((metadata_width,), name=METADATA) if metadata_width else None
        # A pretrained encoder sees the grey image as its preset's converter says (a dict: config-ready).
        features = detector.backbone(image if conversion is None else pretrained.grey_to_model_input(
            image, pretrained.InputConversion(**conversion), channels, name="encoder_input"))
        boxes, classes = [], []
        for level, feature in features.items():  # as RetinaNetObjectDetector: P3 first
            boxes.append(keras.layers.Reshape((-1, 4), name=f"box_pred_{level}")(detector.box_head(feature)))
            classes.append(keras.layers.Reshape((-1, 1), name=f"cls_pred_{level}")(
                detector.classification_head(feature)))
        # float32 from the raw outputs on, so loss and decoding are exact under a mixed policy.
        logits = keras.layers.Concatenate(axis=1, dtype="float32", name="cls_logits")(classes)
        if metadata is not None:
            bias = keras.layers.Reshape((1, 1), dtype="float32")(architecture.metadata_bias(metadata))
            logits = keras.layers.Add(dtype="float32", name="cls_logits_with_metadata")([logits, bias])
        outputs = {"bbox_regression": keras.layers.Concatenate(axis=1, dtype="float32", name="bbox_regression")(boxes),
                   "cls_logits": logits}
        if image_head != "none":
            outputs[IMAGE_LOGITS] = architecture.image_head_logits(list(features.values())[-1], metadata, image_head,
                                                                image_head_shapes_features)
        super().__init__(inputs=architecture.network_inputs(image, metadata), outputs=outputs, **kwargs)
        self.detector = detector
        self.pre_nms_top_k = pre_nms_top_k
        self.nms_iou_threshold = nms_iou_threshold
        self.max_detections = max_detections
        self.min_confidence = min_confidence
        self.metadata_width = metadata_width
        self.image_head = image_head
        self.image_head_shapes_features = image_head_shapes_features
        self.conversion = conversion
        for layer in detector.backbone.image_encoder.layers:  # where keras-hub's RetinaNet has them
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True

    def get_config(self):
        detector = keras.layers.serialize(self.detector)
        # keras-hub's Task compiles itself with its own losses unless told not to; unused here,
        # and a compiled detector warns about its optimizer on every reload.
        detector["config"]["compile"] = False
        return {
            "detector": detector,
            "pre_nms_top_k": self.pre_nms_top_k,
            "nms_iou_threshold": self.nms_iou_threshold,
            "max_detections": self.max_detections,
            "min_confidence": self.min_confidence,
            "metadata_width": self.metadata_width,
            "image_head": self.image_head,
            "image_head_shapes_features": self.image_head_shapes_features,
            "name": self.name,
            **({"conversion": self.conversion} if self.conversion is not None else {}),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["detector"] = keras.layers.deserialize(config["detector"])
        return cls(**config)


def anchor_generator(options: RetinaNetOptions) -> AnchorGenerator:
    """The anchors of every level: keras-hub's 3 scales and 3 ratios, as float32 layers (pixel coordinates lose
    whole pixels in 16 bits)."""
    return AnchorGenerator(
        "yxyx", min_level=options.min_level, max_level=options.max_level, num_scales=3, aspect_ratios=[0.5, 1.0, 2.0],
        anchor_size=options.anchor_size, dtype="float32",
    )


def build(image_size: int, options: RetinaNetOptions = RetinaNetOptions()) -> RetinaNetNetwork:
    """Builds RetinaNet for [image_size, image_size, 1] images in [0, 1], randomly initialised or from a preset.

    A tiny test model, e.g. stackwise_num_filters=(64, 64, 64), stackwise_num_blocks=(1, 1, 1),
    block_type="basic_block", max_level=4, pre_logits_num_conv_layers=1. Decoding keeps the
    `pre_nms_top_k` best anchors, drops scores not above `min_confidence`, suppresses boxes
    overlapping a better one by more than `nms_iou_threshold` and keeps at most `max_detections`.
    """
    source, conversion = None, None
    if options.detector_preset:
        source, conversion = pretrained.load_detector(options.detector_preset, "retinanet")
        options = _with_the_presets_layout(options, source)
        encoder = source.backbone.image_encoder
    elif options.backbone_preset:
        encoder, conversion = pretrained.load_backbone(options.backbone_preset, "retinanet")
    # Anchors are laid on a grid of image_size / 2**level cells, the heads' maps on the
    # encoder's; the two agree only when every level divides the image.
    if image_size % 2**options.max_level:
        raise UserError(
            f"retinanet with max_level {options.max_level} needs an image size divisible by "
            f"{2**options.max_level}; got {image_size}"
        )
    try:
        if conversion is None:
            encoder = keras_hub.models.ResNetBackbone(
                input_conv_filters=[64],
                input_conv_kernel_sizes=[7],
                stackwise_num_filters=list(options.stackwise_num_filters),
                stackwise_num_blocks=list(options.stackwise_num_blocks),
                stackwise_num_strides=[1] + [2] * (len(options.stackwise_num_filters) - 1),
                block_type=options.block_type,
                image_shape=(image_size, image_size, 1),
            )
        backbone = keras_hub.models.RetinaNetBackbone(
            image_encoder=encoder, min_level=options.min_level, max_level=options.max_level, use_p5=options.use_p5,
            use_fpn_batch_norm=source.backbone.use_fpn_batch_norm if source else False,
            image_shape=(image_size, image_size, encoder.image_shape[-1]),
        )
    except ValueError as error:  # keras-hub's checks of the stacks against the levels
        raise UserError(f"retinanet options do not fit together: {error}") from error
    anchors = anchor_generator(options)
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=1,
        bounding_box_format="yxyx",
        anchor_generator=anchors,
        label_encoder=RetinaNetLabelEncoder(
            anchors, bounding_box_format="yxyx", encoding_format="center_xywh",
            positive_threshold=options.positive_threshold, negative_threshold=options.negative_threshold,
            dtype="float32", box_variance=list(options.box_variance),
        ),
        pre_logits_num_conv_layers=options.pre_logits_num_conv_layers,
        use_prediction_head_norm=options.use_prediction_head_norm,
        classification_head_prior_probability=options.classification_head_prior_probability,
        compile=False,  # see RetinaNetNetwork.get_config
    )
    _initialise_the_heads_as_the_paper(detector, options.classification_head_prior_probability)
    if source is not None:
        _take_all_but_the_class_logits(source, detector)
    network = RetinaNetNetwork(detector, pre_nms_top_k=options.pre_nms_top_k,
                               nms_iou_threshold=options.nms_iou_threshold, max_detections=options.max_detections,
                               min_confidence=options.min_confidence,
                               metadata_width=metadata_lib.width(options.metadata), image_head=options.image_head,
                               image_head_shapes_features=options.image_head_shapes_features,
                               conversion=None if conversion is None else conversion.as_dict(), name="retinanet")
    if options.freezes_batch_norm:
        ARCHITECTURE.set_trainable_layers(network, options, "all")
    return network


def _with_the_presets_layout(options: RetinaNetOptions, source) -> RetinaNetOptions:
    """`options` with the layout of the preset detector `source`: its levels, heads, anchor sizes and box
    variance (its box head predicts deltas for those anchors at that variance)."""
    generator, encoder = source.anchor_generator, source.label_encoder
    if (generator.num_scales, list(generator.aspect_ratios), encoder.encoding_format) != (
            3, [0.5, 1.0, 2.0], "center_xywh"):
        raise UserError(f"retinanet detector_preset {options.detector_preset!r} has anchors of {generator.num_scales} "
                        f"scales and ratios {generator.aspect_ratios} ({encoder.encoding_format} deltas); retinanet "
                        "takes 3 scales, ratios 0.5, 1, 2 and center_xywh deltas (keras-hub's)")
    return dataclasses.replace(
        options, min_level=source.backbone.min_level, max_level=source.backbone.max_level,
        use_p5=source.backbone.use_p5, pre_logits_num_conv_layers=source.pre_logits_num_conv_layers,
        use_prediction_head_norm=source.use_prediction_head_norm, anchor_size=float(generator.anchor_size),
        box_variance=tuple(float(value) for value in encoder.box_variance))


def _take_all_but_the_class_logits(source, detector) -> None:
    """Copies the preset detector's pyramid, box head and class head convolutions into `detector`; the
    class head's last convolution (one output per anchor and class) stays this detector's one class's."""
    detector.backbone.feature_pyramid.set_weights(source.backbone.feature_pyramid.get_weights())
    detector.box_head.set_weights(source.box_head.get_weights())
    for mine, theirs in zip(detector.classification_head.conv_layers + detector.classification_head.group_norm_layers,
                            source.classification_head.conv_layers + source.classification_head.group_norm_layers):
        mine.set_weights(theirs.get_weights())


def _initialise_the_heads_as_the_paper(detector, prior: float) -> None:
    """The RetinaNet paper's head initialisation (Lin et al. 2017, section 4.1): every head
    convolution's kernel drawn from N(0, 0.01), biases 0, but the class logits' bias
    -log((1 - prior) / prior), so every anchor starts at P(opacity) = prior and the thousands of
    background anchors do not swamp the first steps. keras-hub 0.32 departs from it twice:
    - its kernels are "random_normal", Keras' N(0, 0.05): each of the head's 3x3x256 convolutions
      then multiplies the spread of its input by ~2.4 instead of ~0.5, so at initialisation the
      class logits spread over +-25 (std 8.8 on the demo's 128-px model), the prior is lost and
      the first step's focal loss was ~240 per positive anchor (benchmarks/README.md: what
      training then learnt);
    - it gives the prior's bias to the BOX head's last layer (its deltas then start at -4.6:
      boxes e^-4.6 times their anchors) and none to the class head's.
    Both are put back here.
    """
    for head in (detector.box_head, detector.classification_head):
        for weight in head.weights:  # convolution kernels and biases (GroupNorm's gamma and beta stay)
            if weight.path.endswith("/kernel"):
                weight.assign(keras.random.normal(weight.shape, stddev=HEAD_KERNEL_STDDEV, dtype=weight.dtype))
            elif weight.path.endswith("/bias"):
                weight.assign(keras.ops.zeros_like(weight))
    class_bias = detector.classification_head.prediction_layer.bias
    class_bias.assign(keras.ops.full_like(class_bias, -math.log((1 - prior) / prior)))


def keras_hub_labels(boxes, num_boxes, height: int, width: int):
    """Batch boxes -> keras-hub's label encoder's (gt_boxes, gt_classes).

    boxes float32 [B, K, 4] normalised (ymin, xmin, ymax, xmax) with rows past num_boxes [B]
    as padding -> boxes in pixels of a height x width image with padding rows of -1, and
    classes [B, K]: 0 (opacity) for boxes, -1 for padding.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    present = tf.range(tf.shape(boxes)[1])[None, :] < tf.cast(num_boxes, tf.int32)[:, None]
    pixels = boxes * tf.constant([height, width, height, width], tf.float32)
    return (
        tf.where(present[..., None], pixels, PADDING),
        tf.where(present, OPACITY, BACKGROUND),
    )


def _shape_of_images(network: RetinaNetNetwork):
    """A tensor of the network's image shape: keras-hub's anchor generator and label encoder read
    the image size from their `images` argument's static shape, and nothing else from it."""
    height, width, channels = network.detector.backbone.image_shape
    return tf.zeros((1, height, width, channels))


def training_targets(network: RetinaNetNetwork, boxes, num_boxes):
    """keras-hub's label encoding of a batch's boxes: box deltas [B, A, 4] (center_xywh) and
    anchor classes [B, A] (0 opacity, -1 background, -2 ignored), over the network's anchors."""
    height, width, _ = network.detector.backbone.image_shape
    gt_boxes, gt_classes = keras_hub_labels(boxes, num_boxes, height, width)
    return network.detector.label_encoder(images=_shape_of_images(network), gt_boxes=gt_boxes, gt_classes=gt_classes)


def anchor_boxes(network: RetinaNetNetwork) -> tf.Tensor:
    """The network's anchors [A, 4] in pixels (ymin, xmin, ymax, xmax), in the order of the
    heads' outputs."""
    return tf.concat(list(network.detector.anchor_generator(_shape_of_images(network)).values()), axis=0)


class RetinaNet(architecture.BoxDetector):
    """The `retinanet` architecture: keras-hub's RetinaNet under the model contract."""

    name = "retinanet"
    options_type = RetinaNetOptions
    presets = PRESETS
    build = staticmethod(build)
    layer_groups = pretrained.LAYER_GROUPS

    def set_trainable_layers(self, network, options: RetinaNetOptions, layers_to_train: str) -> None:
        pretrained.set_trainable_layers(network, network.detector.backbone.image_encoder, layers_to_train,
                                        options.freezes_batch_norm)

    def loss_names(self, network):
        return ("classification", "box") + (("image",) if network.image_head != "none" else ())

    def loss(self, network, inputs: dict, labels: dict, raw: dict, training: bool) -> dict:
        """{"classification": focal loss over positive and background anchors, "box": Huber loss
        of the positive anchors' deltas}, each divided by the global batch's positive anchors
        (at least 1); see the module docstring."""
        box_targets, classes = training_targets(network, labels["boxes"], labels["num_boxes"])
        logits = tf.cast(raw["cls_logits"], tf.float32)
        deltas = tf.cast(raw["bbox_regression"], tf.float32)
        positive = tf.equal(classes, OPACITY)
        focal = keras.losses.binary_focal_crossentropy(
            tf.cast(positive, tf.float32)[..., None], logits, apply_class_balancing=True, alpha=FOCAL_ALPHA,
            gamma=FOCAL_GAMMA, from_logits=True,
        )  # [B, A]
        huber = keras.losses.huber(box_targets, deltas, delta=HUBER_DELTA)  # [B, A], mean of 4 deltas
        positives = sum_over_replicas(tf.reduce_sum(tf.cast(positive, tf.float32)))
        scale = architecture.replica_count() / tf.maximum(positives, 1.0)
        terms = {
            "classification": tf.reduce_sum(tf.where(tf.equal(classes, IGNORED), 0.0, focal)) * scale,
            "box": tf.reduce_sum(tf.where(positive, huber, 0.0)) * scale,
        }
        if IMAGE_LOGITS in raw:
            terms["image"] = architecture.image_head_loss(labels, raw[IMAGE_LOGITS])
        return terms

    def outputs(self, network, inputs: dict, raw: dict) -> dict:
        """Anchor deltas -> boxes, top `pre_nms_top_k` anchors -> padded NMS -> detector_outputs."""
        detector = network.detector
        height, width, _ = detector.backbone.image_shape
        logits = tf.cast(raw["cls_logits"], tf.float32)
        deltas = tf.cast(raw["bbox_regression"], tf.float32)
        anchors = anchor_boxes(network)
        top_logits, best = tf.math.top_k(logits[..., 0], k=min(network.pre_nms_top_k, anchors.shape[0]))
        boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors=tf.gather(anchors, best),
            boxes_delta=tf.gather(deltas, best, batch_dims=1),
            anchor_format=detector.anchor_generator.bounding_box_format,
            box_format="yxyx",
            encoded_format=detector.label_encoder.encoding_format,
            variance=detector.label_encoder.box_variance,
            image_shape=(height, width, 1),
        )
        normalised = tf.clip_by_value(boxes / tf.constant([height, width, height, width], tf.float32), 0.0, 1.0)
        scores = tf.sigmoid(top_logits)
        kept, count = padded_nms(normalised, scores, network.max_detections, network.nms_iou_threshold,
                                 network.min_confidence)
        valid = tf.range(network.max_detections)[None, :] < count[:, None]
        return architecture.with_image_probability(
            detector_outputs(tf.where(valid[..., None], tf.gather(normalised, kept, batch_dims=1), 0.0),
                             tf.where(valid, tf.gather(scores, kept, batch_dims=1), 0.0), count), raw)


ARCHITECTURE = RetinaNet()
