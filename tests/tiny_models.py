"""Every registered architecture at test size: the table tests/test_contract.py runs the model contract over,
and the synthetic batch all of them train on.

A new architecture is one file in pneumo_tf/models/, one line in the registry and one `Tiny` entry here:
options that make it build and step in about a second at 64 px on a CPU, its golden parameter counts at
that size (plain, and with the side inputs `SIDE_INPUTS` adds), and whether its training step and inference
compile with XLA. The per-model test files derive their hand arithmetic from these counts and reuse the
options for what is specific to the model.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pneumo_tf import models
from pneumo_tf.data import metadata
from pneumo_tf.models import architecture
from pneumo_tf.records.boxes import MAX_BOXES

SIZE = 64
# Every header fact (view 3 + sex 3 + age 2 = 8 values).
METADATA_FIELDS = metadata.FIELDS
METADATA_WIDTH = metadata.width(METADATA_FIELDS)


@dataclasses.dataclass(frozen=True)
class Tiny:
    """One architecture at test size."""

    options: dict
    params: int  # count_params() at SIZE with `options`
    side_params: int  # ... and with `side_inputs(name)`
    xla: bool = True  # its training step and `infer` compile with jit_compile=True
    slow: bool = False  # its XLA compilation and mirrored step take over ~10 s


# A ResNet of three one-block stacks (keras-hub needs 64 filters first), levels P3-P4, one
# head convolution: 720 anchors at 64 px, 9 per position on 8 x 8 (P3) and 4 x 4 (P4) grids.
RETINANET = {"stackwise_num_filters": (64, 64, 64), "stackwise_num_blocks": (1, 1, 1), "block_type": "basic_block",
             "max_level": 4, "pre_logits_num_conv_layers": 1}
# The narrowest network keras-hub's ResNet allows (64 filters per stack, one basic block each), with
# anchors 16..256 px for 64-px images, small heads and few proposals.
MASK_RCNN = {"backbone": "resnet18", "backbone_blocks": (1, 1, 1, 1), "backbone_filters": (64, 64, 64, 64),
             "top_down_pyramid_size": 32, "rpn_conv_size": 32, "rpn_anchor_scales": (16, 32, 64, 128, 256),
             "rpn_train_anchors_per_image": 64, "pre_nms_limit": 256, "post_nms_rois_training": 64,
             "post_nms_rois_inference": 64, "train_rois_per_image": 16, "roi_positive_ratio": 0.25,
             "fpn_classif_fc_layers_size": 64, "mask_head_size": 16, "mask_head_convs": 1}

# Side inputs add, to a classifier, the metadata's 8 values to its first dense layer's inputs; to a box
# model, an image head of three classes on its C deepest channels and the metadata ((C + 8 + 1) x 3) and the
# metadata's logit bias (8 + 1).
_BOX_SIDE = METADATA_WIDTH + 1


def _three_class_head(channels: int) -> int:
    return (channels + METADATA_WIDTH + 1) * 3 + _BOX_SIDE


TINY = {
    # A quarter-width network: its first dense layer has 128 units.
    "cnn": Tiny({"width": 0.25}, params=100_097, side_params=100_097 + METADATA_WIDTH * 128),
    # The seed's network; its first dense layer has 64 units.
    "vgg16": Tiny({}, params=14_845_889, side_params=14_845_889 + METADATA_WIDTH * 64),
    # 4 channels doubled twice: 16 at the bottleneck.
    "mask_resnet": Tiny({"channels": 4, "n_blocks": 1, "depth": 2}, params=6_277,
                        side_params=6_277 + _three_class_head(16)),
    # The head pools P4's 256 channels.
    "retinanet": Tiny(RETINANET, params=2_732_141, side_params=2_732_141 + _three_class_head(256), slow=True),
    # The head pools P6 (top_down_pyramid_size: 32 channels).
    "mask_rcnn": Tiny(MASK_RCNN, params=488_359, side_params=488_359 + _three_class_head(32), slow=True),
}


def side_inputs(name: str) -> dict:
    """The options that give `name` every side input the contract knows: all the metadata, and for a box
    model a three-class image head."""
    options = {"metadata": METADATA_FIELDS}
    if issubclass(models.get(name).options_type, architecture.BoxModelOptions):
        options["image_head"] = "three_class"
    return options


def options(name: str, side: bool = False, **changes):
    """The typed options of `name` at test size (with the side inputs), with `changes`."""
    values = {**TINY[name].options, **(side_inputs(name) if side else {}), **changes}
    return models.get(name).make_options(values)


def build(name: str, side: bool = False, **changes):
    return models.get(name).build(SIZE, options(name, side, **changes))


# Two images with boxes (bright rectangles, one and two), two without: on two replicas the first holds
# every box, so a term pooled over the batch (positive anchors, soft IoU) must be pooled over replicas.
PIXEL_BOXES = [[(16, 16, 48, 48)], [(8, 4, 36, 30), (28, 34, 60, 62)], [], []]
RAW_METADATA = {"view": ["AP", "PA", "", "LL"], "sex": ["M", "F", "", "O"], "age": [30, 70, -1, 150]}


def batch(fields=(), seed: int = 0) -> dict:
    """A pipeline batch of 4 SIZE-px images (image, mask, target, class, boxes, num_boxes, raw view, sex,
    age), with "metadata" encoded for `fields`."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.08, (len(PIXEL_BOXES), SIZE, SIZE, 1)).astype(np.float32)
    mask = np.zeros_like(images)
    boxes = np.zeros((len(PIXEL_BOXES), MAX_BOXES, 4), np.float32)
    for index, image_boxes in enumerate(PIXEL_BOXES):
        for slot, (top, left, bottom, right) in enumerate(image_boxes):
            images[index, top:bottom, left:right] += 0.4
            mask[index, top:bottom, left:right] = 1.0
            boxes[index, slot] = np.array([top, left, bottom, right]) / SIZE
    num_boxes = np.array([len(image_boxes) for image_boxes in PIXEL_BOXES], np.int32)
    found = {
        "image": np.clip(images, 0.0, 1.0), "mask": mask, "boxes": boxes, "num_boxes": num_boxes,
        "target": (num_boxes > 0).astype(np.int32), "class": np.array([2, 2, 0, 1], np.int32),
        "view": np.array(RAW_METADATA["view"]), "sex": np.array(RAW_METADATA["sex"]),
        "age": np.array(RAW_METADATA["age"], np.int32),
    }
    return {key: np.asarray(value) for key, value in metadata.with_metadata(found, fields).items()}


def fit_data(name: str, side: bool = False) -> tuple[dict, dict]:
    """(inputs, labels) of `batch()` for `name` (numpy), as the input pipeline gives them to the trainer."""
    fields = options(name, side).metadata
    inputs, labels = models.get(name).to_fit(batch(fields))
    return ({key: np.asarray(value) for key, value in inputs.items()},
            {key: np.asarray(value) for key, value in labels.items()})
