"""The seed report's two-stage Mask R-CNN (matterport's design) on Keras 3, as the `mask_rcnn` architecture.

Architecture (He et al. 2017; matterport/Mask_RCNN, the seed's implementation):

  image -> ResNet (C2..C5) -> FPN (P2..P6) -> RPN head on every level (objectness + deltas
  for 3 anchors per cell; anchor sides 32..512 px on P2..P6)
  -> proposals: top `pre_nms_limit` anchors, decoded, padded NMS (rpn_nms_threshold)
  -> training: proposals + ground truth, sampled to `train_rois_per_image` RoIs (up to
     `roi_positive_ratio` positive, IoU >= 0.5), RoIAlign from P2..P5 (7x7 for the box
     head, 14x14 for the mask head), box/class head (two fully connected layers), mask
     head (four 3x3 convolutions, a 2x up-convolution, 28x28 logits)
  -> inference: every proposal through the box/class head, refined, kept when
     P(opacity) >= detection_min_confidence, NMS (detection_nms_threshold), the best
     detection_max_instances; the mask head on each detection's box (RoIAlign 14x14 ->
     28x28 probabilities, output "masks"), pasted into its box on the host (`masks`).

Train and inference paths. The network (`MaskRCNN`, a keras.Model) returns the first
stage: FPN features "P2".."P6", "rpn_logits" [B, A] and "rpn_deltas" [B, A, 4]. The rest
needs the ground truth during training, so it runs in `MaskRCNN.loss_terms` (targets,
proposals, the RoI sampler, RoIAlign, both heads) and `MaskRCNN.detect` (proposals, box
head, detection layer); the heads are layers of the network, so their gradients flow
and they are saved with it. `MaskRCNNArchitecture` maps the model contract
(pneumo_tf.models.architecture) onto these.

From keras-hub (0.32): ResNetBackbone (its pyramid outputs C2..C5), the FPN layer of its
RetinaNet (FeaturePyramid, P6 by a stride-2 convolution of P5 where matterport
subsamples P5; not in keras-hub's public API, hence the src import), AnchorGenerator and
BoxMatcher; from Keras, IoU and box delta encoding; from TensorFlow, the padded NMS
(keras-hub's drops boxes in graph mode: see detection_ops). Written here
(pneumo_tf.models.detection_ops), because keras-hub has no Mask R-CNN (keras-hub#2449)
and because of XLA: RoIAlign with gathers (tf.image.crop_and_resize has no XLA kernel),
a fixed-size sampler, and no dynamic shapes anywhere (padded tensors with validity
masks), so a training step and `infer` compile with `jit_compile=True`.

Pretrained weights (pneumo_tf.models.pretrained, .matterport): `backbone_preset` takes the
encoder from a keras-hub ResNet preset (ImageNet), `matterport_weights` imports a matterport
.h5 (its COCO file) by layer name with the seed's exclusions; either way grey images are
repeated to three channels and normalised as those weights expect, and the encoder's batch
norm stays frozen (matterport's TRAIN_BN = False) unless train_bn. `--trainable_layers`
(heads, 3+, 4+, 5+, all) trains matterport's layer groups (`set_trainable_layers`).

Differences from matterport, each for a reason:
- A randomly initialised backbone's batch norm trains (matterport freezes it for its
  pretrained weights). It is synchronised across replicas, so N replicas train what one
  device trains on the global batch, as the RoI and anchor samplers do (see
  detection_ops.balanced_sample).
- Sampled RoIs always number train_rois_per_image (negatives fill what positives leave,
  as in Detectron): matterport's rule (negatives = positives / ratio - positives) gives
  an image without boxes no RoI at all, and ~70% of RSNA images have none.
- Ground-truth boxes join the proposals before sampling (Detectron), so the box and mask
  heads see positives from the first step.
- One objectness logit per anchor (sigmoid) instead of a two-way softmax; box deltas and
  masks for the one foreground class only (matterport also predicts unused background
  ones); no batch norm in the heads (matterport's is frozen, i.e. an affine map).
- The mask target is the record's box mask (the union of the boxes) cropped to each
  positive RoI by the same RoIAlign (28x28) and thresholded at 0.5: RSNA's masks are boxes.
- RoIAlign samples each bin's centre with half-pixel alignment (Detectron2's aligned
  RoIAlign; matterport's crop_and_resize samples bin corners) and assigns a RoI to
  floor(4 + log2(sqrt(area) / 224)) (the FPN paper; matterport rounds).
- A detection's score is P(opacity) (matterport keeps a RoI's argmax class: the same
  decision for any min confidence >= 0.5, and lower thresholds keep a ranking).

The seed's settings (report section 8: DetectorConfig) are the defaults: ResNet-50 at
256 px, TRAIN_ROIS_PER_IMAGE 8, ROI_POSITIVE_RATIO 0.225, DETECTION_MAX_INSTANCES 3,
DETECTION_MIN_CONFIDENCE 0.9, DETECTION_NMS_THRESHOLD 0.6, RPN_NMS_THRESHOLD 0.5, and
LOSS_WEIGHTS rpn_class 1, rpn_bbox 1, mrcnn_class 1.25, mrcnn_bbox 1, mrcnn_mask 1;
everything it did not set is matterport's default (anchor scales, 256 anchors per image
for the RPN, 6000/2000/1000 proposals, 7/14 pooling, 1024-unit head, box std devs).
See flags/mask_rcnn.flags.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras import layers
from keras_hub.src.models.retinanet.feature_pyramid import FeaturePyramid
from PIL import Image

from pneumo_tf.cli import option
from pneumo_tf.errors import UserError
from pneumo_tf.models import detection_ops as ops, matterport, pretrained
from pneumo_tf.models.architecture import (
    BOXES,
    IMAGE_LOGITS,
    NUM_DETECTIONS,
    REAL_DATA_TRAINING,
    SCORES,
    BoxDetector,
    BoxModelOptions,
    Preset,
    detector_outputs,
    image_head_logits,
    image_head_loss,
    metadata_bias,
    metadata_input,
    network_inputs,
    replica_count,
    sum_over_replicas,
    with_image_probability,
)

# The first stage's output with the metadata's logit bias per image [B, 1] (see `classify`).
METADATA_BIAS = "metadata_bias"
# Blocks per stack and block type of keras-hub's ResNet presets.
RESNETS = {
    "resnet18": ((2, 2, 2, 2), "basic_block"),
    "resnet34": ((3, 4, 6, 3), "basic_block"),
    "resnet50": ((3, 4, 6, 3), "bottleneck_block"),
    "resnet101": ((3, 4, 23, 3), "bottleneck_block"),
}
LEVELS = (2, 3, 4, 5, 6)  # P2..P6 for the RPN
ROI_LEVELS = 4  # P2..P5 for RoIAlign (matterport's and the FPN paper's)
LOSS_NAMES = ("rpn_class", "rpn_bbox", "mrcnn_class", "mrcnn_bbox", "mrcnn_mask")
SEED_LOSS_WEIGHTS = {"rpn_class": 1.0, "rpn_bbox": 1.0, "mrcnn_class": 1.25, "mrcnn_bbox": 1.0, "mrcnn_mask": 1.0}
# Background and Lung Opacity (the seed's NUM_CLASSES = 2).
NUM_CLASSES = 2
# The inference output of the detections' masks, and the probability a pasted mask pixel needs (matterport's).
MASKS = "masks"
MASK_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class MaskRCNNOptions(BoxModelOptions):
    """Every option of the network (--model_option=name=value); names follow matterport's Config,
    defaults are the seed's settings and else matterport's (see the module docstring)."""

    model_name: ClassVar[str] = "mask_rcnn"

    # Backbone: keras-hub's ResNet.
    backbone: str = option("resnet50", "keras-hub's ResNet layout: blocks per stack and block type.",
                           choices=tuple(RESNETS))
    backbone_blocks: tuple[int, ...] | None = option(None, "Blocks per stack in place of the backbone's (4 stacks).",
                                                     minimum=1)
    backbone_filters: tuple[int, ...] = option((64, 128, 256, 512), "Filters per stack (4 stacks; keras-hub needs "
                                               "64 first).", minimum=1)
    stem_filters: int = option(64, "Filters of the 7x7 stem convolution.", minimum=1)
    top_down_pyramid_size: int = option(256, "Channels of the FPN.", minimum=1)
    # RPN.
    rpn_anchor_scales: tuple[int, ...] = option((32, 64, 128, 256, 512), "Anchor side in pixels on each level "
                                                "P2..P6.", minimum=1)
    rpn_anchor_ratios: tuple[float, ...] = option((0.5, 1.0, 2.0), "Anchor aspect ratios (height / width).",
                                                  exclusive_minimum=0.0)
    rpn_conv_size: int = option(512, "Channels of the RPN's shared 3x3 convolution.", minimum=1)
    rpn_train_anchors_per_image: int = option(256, "Anchors sampled per image for the RPN's losses (up to half "
                                              "positive).", minimum=1)
    rpn_positive_iou: float = option(0.7, "Anchor IoU with a box at or above which the anchor is positive.",
                                     exclusive_minimum=0.0, maximum=1.0)
    rpn_negative_iou: float = option(0.3, "Anchor IoU below which the anchor is negative.", minimum=0.0, maximum=1.0)
    rpn_bbox_std_dev: tuple[float, ...] = option(ops.BOX_DELTA_SCALES, "Scales of the RPN's box deltas.",
                                                 exclusive_minimum=0.0)
    pre_nms_limit: int = option(6000, "Best anchors that go into the proposals' NMS.", minimum=1)
    post_nms_rois_training: int = option(2000, "Proposals kept in training.", minimum=1)
    post_nms_rois_inference: int = option(1000, "Proposals kept in inference.", minimum=1)
    rpn_nms_threshold: float = option(0.5, "IoU of the proposals' NMS (seed; matterport: 0.7).", minimum=0.0,
                                      maximum=1.0)
    # Second stage.
    train_rois_per_image: int = option(8, "RoIs sampled per image for the heads (seed; matterport: 200).", minimum=1)
    roi_positive_ratio: float = option(0.225, "Largest share of positive RoIs (seed; matterport: 0.33).",
                                       exclusive_minimum=0.0, maximum=1.0)
    roi_positive_iou: float = option(0.5, "RoI IoU with a box at or above which the RoI is positive.",
                                     exclusive_minimum=0.0, maximum=1.0)
    bbox_std_dev: tuple[float, ...] = option(ops.BOX_DELTA_SCALES, "Scales of the box head's deltas.",
                                             exclusive_minimum=0.0)
    pool_size: int = option(7, "RoIAlign output side for the box head.", minimum=1)
    mask_pool_size: int = option(14, "RoIAlign output side for the mask head (masks are twice that).", minimum=1)
    fpn_classif_fc_layers_size: int = option(1024, "Units of the box head's two fully connected layers.", minimum=1)
    mask_head_size: int = option(256, "Channels of the mask head's convolutions.", minimum=1)
    mask_head_convs: int = option(4, "3x3 convolutions of the mask head.", minimum=0)
    # Detection layer.
    detection_min_confidence: float = option(0.9, "Detections keep RoIs with P(opacity) at least this (seed; "
                                             "matterport: 0.7).", minimum=0.0, maximum=1.0)
    detection_nms_threshold: float = option(0.6, "IoU of the detections' NMS (seed; matterport: 0.3).",
                                            minimum=0.0, maximum=1.0)
    detection_max_instances: int = option(3, "Detections kept per image (seed; matterport: 100).", minimum=1)
    loss_weights: dict[str, float] = option({}, "Loss weights by term (rpn_class, rpn_bbox, mrcnn_class, mrcnn_bbox, "
                                            "mrcnn_mask); missing terms keep the seed's weight.")
    # Pretrained weights.
    backbone_preset: str | None = option(None, pretrained.BACKBONE_PRESET_HELP)
    matterport_weights: str | None = option(
        None, "A matterport Mask R-CNN .h5 (its COCO weights, github.com/matterport/Mask_RCNN/releases/download/v2.0/"
        "mask_rcnn_coco.h5, or your own) loaded by layer name into a resnet50/resnet101 backbone and the heads; grey "
        "images are repeated to three channels less matterport's mean pixel.")
    matterport_exclude: tuple[str, ...] = option(matterport.SEED_EXCLUDE, "matterport layers not loaded (the seed's: "
                                                 "the class-specific ones of an 81-class file); () loads them all.")
    train_bn: bool = option(False, pretrained.TRAIN_BN_HELP)

    @property
    def roi_positives(self) -> int:
        """Most positive RoIs per image: matterport's int(TRAIN_ROIS_PER_IMAGE * ROI_POSITIVE_RATIO)."""
        return int(self.train_rois_per_image * self.roi_positive_ratio + 1e-6)

    @property
    def weights(self) -> dict:
        return {**SEED_LOSS_WEIGHTS, **self.loss_weights}

    def check(self) -> None:
        if len(self.backbone_filters) != 4 or self.backbone_filters[0] != 64:
            raise UserError(f"mask_rcnn backbone_filters needs 4 stacks starting at 64 (keras-hub's ResNet), "
                            f"not {self.backbone_filters}")
        if RESNETS[self.backbone][1] == "basic_block" and self.stem_filters != self.backbone_filters[0]:
            raise UserError(f"mask_rcnn {self.backbone} adds its stem to its first stack: stem_filters must be "
                            f"{self.backbone_filters[0]}, not {self.stem_filters}")
        if self.backbone_blocks is not None and len(self.backbone_blocks) != 4:
            raise UserError(f"mask_rcnn backbone_blocks needs 4 stacks, not {self.backbone_blocks}")
        if len(self.rpn_anchor_scales) != len(LEVELS):
            raise UserError(f"mask_rcnn rpn_anchor_scales needs one side per level P2..P6, not "
                            f"{self.rpn_anchor_scales}")
        if self.roi_positives < 1:
            raise UserError(f"mask_rcnn train_rois_per_image * roi_positive_ratio must allow one positive RoI; "
                            f"{self.train_rois_per_image} * {self.roi_positive_ratio} does not")
        if self.post_nms_rois_training < self.train_rois_per_image:
            raise UserError(f"mask_rcnn samples train_rois_per_image={self.train_rois_per_image} RoIs from "
                            f"post_nms_rois_training={self.post_nms_rois_training} proposals: too few")
        unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
        if unknown:
            raise UserError(f"mask_rcnn loss_weights has unknown terms {unknown}; known: {', '.join(LOSS_NAMES)}")
        if self.backbone_preset and self.matterport_weights:
            raise UserError("mask_rcnn takes backbone_preset or matterport_weights (which hold a backbone), not both")
        if self.matterport_weights and RESNETS[self.backbone][1] != "bottleneck_block":
            raise UserError(f"mask_rcnn matterport_weights need matterport's resnet50 or resnet101 backbone, not "
                            f"{self.backbone}")

    @property
    def freezes_batch_norm(self) -> bool:
        """Whether the encoder's batch norm stays as pretrained (pretrained weights and not train_bn)."""
        return bool(self.backbone_preset or self.matterport_weights) and not self.train_bn


_SMALL = {"backbone": "resnet18", "backbone_blocks": (1, 1, 1, 1), "backbone_filters": (64, 64, 128, 256),
          "top_down_pyramid_size": 64, "rpn_conv_size": 64, "rpn_anchor_scales": (16, 32, 64, 128, 256),
          "pre_nms_limit": 1000, "post_nms_rois_training": 256, "post_nms_rois_inference": 128,
          "train_rois_per_image": 32, "roi_positive_ratio": 0.25, "fpn_classif_fc_layers_size": 256,
          "mask_head_size": 32, "mask_head_convs": 2, "detection_min_confidence": 0.05,
          "detection_nms_threshold": 0.3, "loss_weights": {"mrcnn_class": 8.0}}

PRESETS = {
    "demo": Preset(
        "ResNet-18-like stacks of one block, anchors 16-256 px on P2-P6, small heads; the seed's settings but three "
        "(P(opacity) floor 0.05, detection NMS 0.3, the box head's class term weighted 8: benchmarks/README.md has "
        "the measurements); Adam 1e-3.",
        model_options=_SMALL,
        train={"learning_rate": 1e-3}),
    "real": Preset(
        "The recipe for real radiographs on a CPU budget (benchmarks/real.py): the demo's network, 24 passes at "
        "128 px with the decoded images cached, 40% of each batch positive (positive_fraction 0.4: val mAP up on "
        "each of the 5 folds, fold mean 0.132 -> 0.152 on the 3 the recipe was chosen on), Adam 1e-3 after a 50-step "
        "warm-up.",
        model_options=_SMALL,
        train={"learning_rate": 1e-3, "warmup_steps": 50, **REAL_DATA_TRAINING}),
}


def anchors(image_size: int, options: MaskRCNNOptions) -> np.ndarray:
    """float32 [A, 4] normalised yxyx, in the order of the RPN's outputs (level, row, column, ratio)."""
    per_level = []
    for level, side in zip(LEVELS, options.rpn_anchor_scales):
        generator = keras_hub.layers.AnchorGenerator(
            bounding_box_format="yxyx", min_level=level, max_level=level, num_scales=1,
            aspect_ratios=list(options.rpn_anchor_ratios), anchor_size=side / 2**level,
        )
        per_level.append(np.asarray(generator(np.zeros((1, image_size, image_size, 1)))[f"P{level}"]))
    return (np.concatenate(per_level) / image_size).astype(np.float32)


def _backbone(image_size: int, options: MaskRCNNOptions, resnet=None) -> keras.Model:
    """keras-hub's ResNet (`resnet`, else one of the options' layout: 3 channels for matterport's weights)
    as image -> {"P2": C2, ..., "P5": C5}, with synchronised batch norm."""
    if resnet is None:
        blocks, block_type = RESNETS[options.backbone]
        resnet = keras_hub.models.ResNetBackbone(
            input_conv_filters=[options.stem_filters], input_conv_kernel_sizes=[7],
            stackwise_num_filters=list(options.backbone_filters),
            stackwise_num_blocks=list(options.backbone_blocks or blocks), stackwise_num_strides=[1, 2, 2, 2],
            block_type=block_type, image_shape=(image_size, image_size, 3 if options.matterport_weights else 1),
            name="resnet",
        )
    # Detection batches are small per replica: per-replica statistics would make N
    # replicas train another model than one device on the same global batch.
    for layer in resnet.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.synchronized = True
    outputs = {f"P{level}": resnet.pyramid_outputs[f"P{level}"] for level in LEVELS[:-1]}
    return keras.Model(resnet.inputs, outputs, name="backbone")


def _first_stage(image_size: int, options: MaskRCNNOptions, resnet=None,
                 conversion: pretrained.InputConversion | None = None) -> keras.Model:
    """image (and metadata) -> FPN features P2..P6, the RPN's outputs over all anchors (float32), and
    with metadata its logit bias ("metadata_bias" [B, 1]), with an image head its logits; a pretrained
    backbone sees the image as its weights expect (`conversion`)."""
    image = keras.Input((image_size, image_size, 1), name="image")
    metadata = metadata_input(options)
    fpn = FeaturePyramid(min_level=LEVELS[0], max_level=LEVELS[-1], use_p5=False,
                         num_filters=options.top_down_pyramid_size, name="fpn")
    backbone = _backbone(image_size, options, resnet)
    x = image if conversion is None else pretrained.grey_to_model_input(
        image, conversion, backbone.inputs[0].shape[-1], name="backbone_input")
    features = fpn(backbone(x))
    anchors_per_cell = len(options.rpn_anchor_ratios)
    # One head shared by every level, as in matterport and the FPN paper.
    shared = layers.Conv2D(options.rpn_conv_size, 3, padding="same", activation="relu", name="rpn_conv_shared")
    objectness = layers.Conv2D(anchors_per_cell, 1, dtype="float32", name="rpn_class")
    regression = layers.Conv2D(4 * anchors_per_cell, 1, dtype="float32", name="rpn_bbox")
    logits, deltas = [], []
    for level in LEVELS:
        x = shared(features[f"P{level}"])
        logits.append(layers.Reshape((-1,), dtype="float32")(objectness(x)))
        deltas.append(layers.Reshape((-1, 4), dtype="float32")(regression(x)))
    outputs = dict(features)
    outputs["rpn_logits"] = layers.Concatenate(axis=1, dtype="float32", name="rpn_logits")(logits)
    outputs["rpn_deltas"] = layers.Concatenate(axis=1, dtype="float32", name="rpn_deltas")(deltas)
    if metadata is not None:
        outputs[METADATA_BIAS] = metadata_bias(metadata)
    if options.image_head != "none":
        outputs[IMAGE_LOGITS] = image_head_logits(features[f"P{LEVELS[-1]}"], metadata, options.image_head,
                                                  options.image_head_shapes_features)
    return keras.Model(network_inputs(image, metadata), outputs, name="first_stage")


def _box_head(options: MaskRCNNOptions) -> keras.Model:
    """[R, pool, pool, C] RoI features -> class logits [R, 2] and opacity box deltas [R, 4] (float32)."""
    rois = keras.Input((options.pool_size, options.pool_size, options.top_down_pyramid_size), name="roi_features")
    x = layers.Flatten()(rois)
    for index in range(2):
        x = layers.Dense(options.fpn_classif_fc_layers_size, activation="relu", name=f"mrcnn_fc{index + 1}")(x)
    outputs = {
        "class_logits": layers.Dense(NUM_CLASSES, dtype="float32", name="mrcnn_class_logits")(x),
        "deltas": layers.Dense(4, dtype="float32", name="mrcnn_bbox")(x),
    }
    return keras.Model(rois, outputs, name="box_head")


def _mask_head(options: MaskRCNNOptions) -> keras.Model:
    """[R, m, m, C] RoI features -> opacity mask logits [R, 2m, 2m, 1] (float32)."""
    size = options.mask_pool_size
    rois = keras.Input((size, size, options.top_down_pyramid_size), name="roi_features")
    x = rois
    for index in range(options.mask_head_convs):
        x = layers.Conv2D(options.mask_head_size, 3, padding="same", activation="relu",
                          name=f"mrcnn_mask_conv{index + 1}")(x)
    x = layers.Conv2DTranspose(options.mask_head_size, 2, strides=2, activation="relu", name="mrcnn_mask_deconv")(x)
    logits = layers.Conv2D(1, 1, dtype="float32", name="mrcnn_mask")(x)
    return keras.Model(rois, logits, name="mask_head")


def _pooled_mean(total, count):
    """This replica's share of sum / count over the global batch (the contract's pooling rule)."""
    return total * float(replica_count()) / tf.maximum(sum_over_replicas(tf.cast(count, tf.float32)), 1.0)


@keras.saving.register_keras_serializable(package="pneumo_tf")
class MaskRCNN(keras.Model):
    """The network: call gives the first stage; `loss_terms` and `detect` run the second.

    Built complete (every head has its weights) so the optimizer, `count_params` and a
    saved file see all of it before the first step. `sampler_step` counts training
    steps: the anchor and RoI samplers draw a new order at every step from it.
    With options.backbone_preset the encoder is the preset's (loaded when `encoder` is not
    given); its layout and input conversion are saved in the config, so a saved network
    loads without the preset.
    """

    def __init__(self, image_size: int, options: MaskRCNNOptions = MaskRCNNOptions(), name: str = "mask_rcnn",
                 encoder=None, conversion: pretrained.InputConversion | None = None):
        super().__init__(name=name)
        if image_size % 2 ** LEVELS[-1]:
            raise UserError(f"the mask_rcnn model needs an image size divisible by {2 ** LEVELS[-1]} "
                            f"(its coarsest level, P6); got {image_size}")
        self.image_size = image_size
        self.options = options
        self.anchors = anchors(image_size, self.options)
        if len(self.anchors) < self.options.rpn_train_anchors_per_image:
            raise UserError(f"mask_rcnn at {image_size} px has {len(self.anchors)} anchors, fewer than "
                            f"rpn_train_anchors_per_image={self.options.rpn_train_anchors_per_image}")
        if options.backbone_preset and encoder is None:
            encoder, conversion = pretrained.load_backbone(options.backbone_preset, "mask_rcnn")
        if options.matterport_weights:
            conversion = pretrained.InputConversion(offset=tuple(-mean for mean in matterport.MEAN_PIXEL))
        # What get_config saves of a preset's encoder: its layout (the weights go with the network's).
        self.encoder_config = None if encoder is None else keras.layers.serialize(encoder)
        self.conversion = conversion
        self.first_stage = _first_stage(image_size, self.options, encoder, conversion)
        self.box_head = _box_head(self.options)
        self.mask_head = _mask_head(self.options)
        self.sampler_step = self.add_weight(name="sampler_step", shape=(), dtype="int32", initializer="zeros",
                                            trainable=False, aggregation="only_first_replica")
        self.built = True

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict):
            inputs = {"image": inputs}
        return self.first_stage({name: inputs[name] for name in self.first_stage.input}, training=training)

    def get_config(self):
        config = {"image_size": self.image_size, "name": self.name, "options": self.options.as_dict()}
        if self.options.backbone_preset:
            config.update(encoder=self.encoder_config, conversion=self.conversion.as_dict())
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        image_size, name = config.pop("image_size"), config.pop("name", "mask_rcnn")
        encoder = keras.layers.deserialize(config.pop("encoder")) if "encoder" in config else None
        conversion = pretrained.InputConversion(**config.pop("conversion")) if "conversion" in config else None
        # Files saved before the options had a type hold them as the config's other keys.
        options = config.pop("options", config)
        return cls(image_size, MaskRCNNOptions.from_mapping(options), name=name, encoder=encoder,
                   conversion=conversion)

    # -- second stage -------------------------------------------------------------------

    def proposals(self, raw, training: bool):
        """(boxes [B, K, 4], valid [B, K], anchor ids [B, K]): the RPN's proposals, K by the mode
        (matterport's POST_NMS_ROIS_TRAINING / _INFERENCE)."""
        options = self.options
        count = options.post_nms_rois_training if training else options.post_nms_rois_inference
        return ops.propose(raw["rpn_logits"], raw["rpn_deltas"], self.anchors,
                           min(options.pre_nms_limit, len(self.anchors)), count, options.rpn_nms_threshold,
                           options.rpn_bbox_std_dev)

    def _pooled(self, raw, rois, size: int):
        """RoIAlign of [B, N, 4] boxes from P2..P5 -> [B * N, size, size, C]."""
        levels = ops.fpn_levels(rois, self.image_size, ROI_LEVELS, min_level=LEVELS[0])
        maps = [raw[f"P{level}"] for level in LEVELS[:ROI_LEVELS]]
        pooled = ops.roi_align(maps, rois, levels, size)
        return tf.reshape(pooled, [-1, size, size, pooled.shape[-1]])

    def classify(self, raw, rois, training: bool = False):
        """Box/class head on [B, N, 4] RoIs -> (class logits [B, N, 2], opacity deltas [B, N, 4])."""
        head = self.box_head(self._pooled(raw, rois, self.options.pool_size), training=training)
        shape = tf.shape(rois)[:2]
        class_logits = tf.reshape(head["class_logits"], tf.concat([shape, [NUM_CLASSES]], 0))
        if METADATA_BIAS in raw:  # the image's metadata shifts the opacity logit of every RoI
            class_logits += tf.pad(raw[METADATA_BIAS][:, None, :], [[0, 0], [0, 0], [NUM_CLASSES - 1, 0]])
        return class_logits, tf.reshape(head["deltas"], tf.concat([shape, [4]], 0))

    def mask_logits(self, raw, rois, training: bool = False):
        """Mask head on [B, N, 4] RoIs -> logits [B, N, 2m, 2m]."""
        logits = self.mask_head(self._pooled(raw, rois, self.options.mask_pool_size), training=training)
        side = 2 * self.options.mask_pool_size
        return tf.reshape(logits, tf.concat([tf.shape(rois)[:2], [side, side]], 0))

    def detect(self, raw):
        """The inference path: (boxes [B, D, 4], scores [B, D], counts [B]) with D = detection_max_instances."""
        options = self.options
        rois, valid, _ = self.proposals(raw, training=False)
        class_logits, deltas = self.classify(raw, rois)
        return ops.detect(rois, valid, class_logits, deltas, options.bbox_std_dev, options.detection_min_confidence,
                          options.detection_nms_threshold, options.detection_max_instances)

    def detection_masks(self, raw, boxes, counts):
        """The mask head on the detections: opacity probabilities [B, D, 2m, 2m] over each box, 0 past counts."""
        masks = tf.sigmoid(self.mask_logits(raw, tf.stop_gradient(boxes)))
        valid = tf.range(boxes.shape[1])[None, :] < counts[:, None]
        return tf.where(valid[..., None, None], masks, 0.0)

    def loss_terms(self, images, gt_boxes, num_boxes, gt_mask, raw, training: bool) -> dict:
        """The five weighted loss terms (float32 scalars, this replica's share; see architecture.py).

        images [B, S, S, 1] (they key the samplers' order), gt_boxes [B, G, 4] normalised with
        num_boxes [B] real ones, gt_mask [B, S, S, 1] the union of the boxes, raw = call(images).
        A training call advances `sampler_step`; a validation call draws the same samples again.
        """
        gt_boxes = tf.cast(gt_boxes, tf.float32)
        gt_valid = tf.range(gt_boxes.shape[1])[None, :] < tf.cast(num_boxes, tf.int32)[:, None]
        keys = ops.image_keys(images)
        step = tf.identity(self.sampler_step.value)
        terms = {
            **self._rpn_losses(raw, gt_boxes, gt_valid, keys, step),
            **self._head_losses(raw, gt_boxes, gt_valid, gt_mask, keys, step, training),
        }
        if training:
            self.sampler_step.assign_add(1)
        weights = self.options.weights
        return {name: tf.cast(weights[name], tf.float32) * terms[name] for name in LOSS_NAMES}

    def _rpn_losses(self, raw, gt_boxes, gt_valid, keys, step) -> dict:
        """Objectness over sampled anchors (positives up to half), deltas over the positives
        (matterport's build_rpn_targets, rpn_class_loss_graph and rpn_bbox_loss_graph)."""
        options = self.options
        labels, anchor_boxes = ops.match_anchors(self.anchors, gt_boxes, gt_valid, options.rpn_positive_iou,
                                                 options.rpn_negative_iou)
        size = options.rpn_train_anchors_per_image
        priority = ops.sampling_priorities(keys, step, tf.range(len(self.anchors)), salt=1)
        index, positive, valid = ops.balanced_sample(labels == 1, labels == 0, priority, size, size // 2)
        logits = tf.gather(raw["rpn_logits"], index, batch_dims=1)
        cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(positive, tf.float32), logits)
        targets = ops.encode(tf.gather(self.anchors, index), tf.gather(anchor_boxes, index, batch_dims=1),
                             options.rpn_bbox_std_dev)
        errors = ops.smooth_l1(tf.gather(raw["rpn_deltas"], index, batch_dims=1) - targets)
        return {
            "rpn_class": _pooled_mean(tf.reduce_sum(tf.where(valid, cross_entropy, 0.0)),
                                      tf.reduce_sum(tf.cast(valid, tf.int32))),
            "rpn_bbox": _pooled_mean(tf.reduce_sum(tf.where(positive[..., None], errors, 0.0)),
                                     4 * tf.reduce_sum(tf.cast(positive, tf.int32))),
        }

    def _head_losses(self, raw, gt_boxes, gt_valid, gt_mask, keys, step, training: bool) -> dict:
        """Class over the sampled RoIs, deltas and masks over the positive ones (matterport's
        DetectionTargetLayer and mrcnn_*_loss_graph, on proposals + ground truth)."""
        options = self.options
        proposals, proposal_valid, anchor_ids = self.proposals(raw, training=True)
        # Candidates are named by their anchor, ground-truth box g by len(anchors) + g.
        gt_ids = len(self.anchors) + tf.range(gt_boxes.shape[1])
        ids = tf.concat([anchor_ids, tf.broadcast_to(gt_ids, tf.shape(gt_valid))], axis=1)
        rois = ops.sample_rois(proposals, proposal_valid, gt_boxes, gt_valid,
                               ops.sampling_priorities(keys, step, ids, salt=2), options.train_rois_per_image,
                               options.roi_positives, options.roi_positive_iou, options.bbox_std_dev)
        positive, valid = rois["is_positive"], rois["valid"]
        class_logits, deltas = self.classify(raw, rois["rois"], training=training)
        class_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(positive, tf.int32), class_logits)
        box_errors = ops.smooth_l1(deltas - rois["targets"])

        # The sampler puts positives first: the first roi_positives slots hold them all.
        mask_rois, mask_positive = rois["rois"][:, : options.roi_positives], positive[:, : options.roi_positives]
        side = 2 * options.mask_pool_size
        crops = ops.roi_align([tf.cast(gt_mask, tf.float32)], mask_rois, tf.zeros_like(mask_positive, tf.int32), side)
        mask_loss = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(crops[..., 0] >= 0.5, tf.float32),
                                                            self.mask_logits(raw, mask_rois, training=training))
        return {
            "mrcnn_class": _pooled_mean(tf.reduce_sum(tf.where(valid, class_loss, 0.0)),
                                        tf.reduce_sum(tf.cast(valid, tf.int32))),
            "mrcnn_bbox": _pooled_mean(tf.reduce_sum(tf.where(positive[..., None], box_errors, 0.0)),
                                       4 * tf.reduce_sum(tf.cast(positive, tf.int32))),
            "mrcnn_mask": _pooled_mean(tf.reduce_sum(tf.where(mask_positive[..., None, None], mask_loss, 0.0)),
                                       side * side * tf.reduce_sum(tf.cast(mask_positive, tf.int32))),
        }


class MaskRCNNArchitecture(BoxDetector):
    """The contract for MaskRCNN: labels are the boxes and the box mask; outputs are detections and their
    masks ("masks" [B, D, 2m, 2m], each over its box)."""

    name = "mask_rcnn"
    options_type = MaskRCNNOptions
    presets = PRESETS
    label_keys = ("boxes", "mask")
    gives_masks = True
    layer_groups = pretrained.LAYER_GROUPS

    def build(self, image_size: int, options: MaskRCNNOptions = MaskRCNNOptions()) -> keras.Model:
        """The network, with options.matterport_weights loaded (the report printed) and the encoder's batch
        norm frozen when it is pretrained."""
        network = MaskRCNN(image_size, options)
        if options.matterport_weights:
            print(matterport.load(network, options.matterport_weights, options.matterport_exclude).summary())
        if options.freezes_batch_norm:
            self.set_trainable_layers(network, options, "all")
        return network

    def set_trainable_layers(self, network, options: MaskRCNNOptions, layers_to_train: str) -> None:
        pretrained.set_trainable_layers(network, network.first_stage.get_layer("backbone"), layers_to_train,
                                        options.freezes_batch_norm)

    def loss_names(self, network):
        return LOSS_NAMES + (("image",) if network.options.image_head != "none" else ())

    def loss(self, network: keras.Model, inputs: dict, labels: dict, raw: dict, training: bool) -> dict:
        terms = network.loss_terms(inputs["image"], labels["boxes"], labels["num_boxes"], labels["mask"], raw,
                                   training)
        if IMAGE_LOGITS in raw:
            terms["image"] = image_head_loss(labels, raw[IMAGE_LOGITS])
        return terms

    def outputs(self, network: keras.Model, inputs: dict, raw: dict) -> dict:
        boxes, scores, counts = network.detect(raw)
        found = {**detector_outputs(boxes, scores, counts), MASKS: network.detection_masks(raw, boxes, counts)}
        return with_image_probability(found, raw)

    def masks(self, outputs: dict, threshold: float, sizes) -> list[np.ndarray]:
        """Each detection above `threshold` with its mask pasted into its box (matterport's unmold_mask:
        resized bilinearly to the box's pixels, probability >= 0.5), their union per image."""
        boxes = np.clip(np.asarray(outputs[BOXES], np.float32), 0.0, 1.0)
        scores = np.asarray(outputs[SCORES], np.float32)
        counts = np.asarray(outputs[NUM_DETECTIONS]).reshape(-1)
        found = []
        called = [len(kept) > 0 for kept, _ in self.detections(outputs, threshold)]  # gated by the image head
        for image_boxes, image_scores, image_masks, count, (height, width), positive in zip(
                boxes, scores, np.asarray(outputs[MASKS], np.float32), counts, sizes, called):
            canvas = np.zeros((height, width), bool)
            for (ymin, xmin, ymax, xmax), score, mask in zip(image_boxes[:count], image_scores[:count],
                                                            image_masks[:count]):
                if score <= threshold or not positive:
                    continue
                top, left = int(np.floor(ymin * height)), int(np.floor(xmin * width))
                bottom = max(int(np.ceil(ymax * height)), top + 1)
                right = max(int(np.ceil(xmax * width)), left + 1)
                pasted = Image.fromarray(mask).resize((right - left, bottom - top), Image.BILINEAR)
                canvas[top:bottom, left:right] |= np.asarray(pasted) >= MASK_THRESHOLD
            found.append(canvas)
        return found


ARCHITECTURE = MaskRCNNArchitecture()


def build(image_size: int, options: MaskRCNNOptions = MaskRCNNOptions()) -> keras.Model:
    """The Mask R-CNN network for [image_size, image_size, 1] images."""
    return ARCHITECTURE.build(image_size, options)
