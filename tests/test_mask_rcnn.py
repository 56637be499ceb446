"""What is specific to the mask_rcnn architecture (models/mask_rcnn.py) and its ops (models/detection_ops.py), on
64-px inputs. What every architecture shares is in tests/test_contract.py."""
from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf

import tiny_models  # tests/tiny_models.py
from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import metric
from pneumo_tf.evaluation.collect import yxyx_to_xywh
from pneumo_tf.models import detection_ops as ops, mask_rcnn
from pneumo_tf.records.boxes import MAX_BOXES
from pneumo_tf.training import distribute

SIZE = 64
# tests/tiny_models.py's: a resnet18-like backbone of 64 filters, anchors 16..256 px, small heads.
TINY = tiny_models.options("mask_rcnn")
ARCH = mask_rcnn.ARCHITECTURE


# -- parameter counts from layer shapes ------------------------------------------------------

def _conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _bn(channels):
    return 4 * channels  # gamma, beta, moving mean and variance


def _resnet18ish_params(blocks, filters=64):
    # One-channel 7x7 stem; basic blocks of two 3x3 convolutions; every stack after the
    # first opens with a strided 1x1 shortcut convolution.
    total = _conv(7, 1, 64, bias=False) + _bn(64)
    block = 2 * (_conv(3, filters, filters, bias=False) + _bn(filters))
    return total + 4 * blocks * block + 3 * (_conv(1, filters, filters, bias=False) + _bn(filters))


def _heads_params(c_stages, fpn, rpn, anchors_per_cell, pool, fc, mask_pool, mask_width, mask_convs):
    fpn_params = sum(_conv(1, c, fpn) for c in c_stages) + 5 * _conv(3, fpn, fpn)  # P2..P5 and P6
    rpn_params = _conv(3, fpn, rpn) + _conv(1, rpn, anchors_per_cell) + _conv(1, rpn, 4 * anchors_per_cell)
    box = pool * pool * fpn * fc + fc + fc * fc + fc + fc * 2 + 2 + fc * 4 + 4
    mask = _conv(3, fpn, mask_width) + (mask_convs - 1) * _conv(3, mask_width, mask_width)
    mask += _conv(2, mask_width, mask_width) + _conv(1, mask_width, 1)
    del mask_pool  # the pooled size sets no weight of the (convolutional) mask head
    return fpn_params + rpn_params + box + mask + 1  # + the sampler's step counter


GOLDEN_TINY = tiny_models.TINY["mask_rcnn"].params  # TINY at 64 px
GOLDEN_SEED = 45_202_007  # the seed's ResNet-50 configuration (the defaults) at 256 px
RESNET50_ONE_CHANNEL = 23_554_880  # keras-hub's ResNet-50 without head, one input channel


def test_golden_counts_match_hand_arithmetic():
    assert GOLDEN_TINY == _resnet18ish_params(1) + _heads_params(
        (64, 64, 64, 64), 32, 32, 3, 7, 64, 14, 16, 1)
    assert GOLDEN_SEED == RESNET50_ONE_CHANNEL + _heads_params(
        (256, 512, 1024, 2048), 256, 512, 3, 7, 1024, 14, 256, 4)


def test_tiny_backbone_count():
    network = mask_rcnn.build(SIZE, TINY)
    assert network.first_stage.get_layer("backbone").count_params() == _resnet18ish_params(1)


def test_golden_parameter_count_seed_config_at_256():
    network = mask_rcnn.build(256)
    assert network.count_params() == GOLDEN_SEED
    assert network.first_stage.get_layer("backbone").count_params() == RESNET50_ONE_CHANNEL
    # matterport's anchors: one side per level, 3 ratios, every cell of P2..P6 (64^2 + ... + 4^2).
    assert network.anchors.shape == (3 * (64**2 + 32**2 + 16**2 + 8**2 + 4**2), 4)


def test_options_are_checked():
    with pytest.raises(UserError, match="unknown mask_rcnn option.*rpn_nms"):
        ARCH.make_options({**TINY.as_dict(), "rpn_nms": 0.7})
    with pytest.raises(UserError, match="divisible by 64"):
        mask_rcnn.build(96, TINY)
    with pytest.raises(UserError, match="one positive RoI"):
        mask_rcnn.build(SIZE, replace(TINY, train_rois_per_image=4, roi_positive_ratio=0.2))
    with pytest.raises(UserError, match="from post_nms_rois_training=8 proposals"):
        mask_rcnn.build(SIZE, replace(TINY, post_nms_rois_training=8))
    with pytest.raises(UserError, match="stem_filters must be 64"):
        mask_rcnn.build(SIZE, replace(TINY, stem_filters=16))
    with pytest.raises(UserError, match="loss_weights has unknown terms"):
        mask_rcnn.build(SIZE, replace(TINY, loss_weights={"mask": 2.0}))


def test_a_network_saved_before_options_had_types_loads():
    """Older model.keras files hold the options as the config's own keys, tuples as JSON lists."""
    given = {"backbone": "resnet18", "backbone_blocks": [1, 1, 1, 1], "backbone_filters": [64, 64, 64, 64],
             "top_down_pyramid_size": 32, "rpn_conv_size": 32, "rpn_anchor_scales": [16, 32, 64, 128, 256],
             "rpn_train_anchors_per_image": 64, "pre_nms_limit": 256, "post_nms_rois_training": 64,
             "post_nms_rois_inference": 64, "train_rois_per_image": 16, "roi_positive_ratio": 0.25,
             "fpn_classif_fc_layers_size": 64, "mask_head_size": 16, "mask_head_convs": 1}
    network = mask_rcnn.MaskRCNN.from_config({"image_size": SIZE, "name": "mask_rcnn", **given})
    assert network.options == TINY and network.count_params() == GOLDEN_TINY
    assert network.get_config() == {"image_size": SIZE, "name": "mask_rcnn", "options": TINY.as_dict()}


def _flagfile_options(path):
    """(flags, model options) of an absl flagfile, options as --model_option gives them (texts)."""
    values, options = {}, {}
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            continue
        name, _, value = line[2:].partition("=")
        if name == "model_option":
            key, _, value = value.partition("=")
            options[key] = value
        else:
            values[name] = value
    return values, options


def test_flagfile_holds_the_seed_settings_which_are_the_defaults():
    values, options = _flagfile_options(pathlib.Path(__file__).parents[1] / "flags" / "mask_rcnn.flags")
    assert values == {"model": "mask_rcnn", "image_size": "256", "batch_size": "16", "epochs": "12",
                      "learning_rate": "0.004", "optimizer": "sgd"}
    config = ARCH.make_options(options)
    assert (config.backbone, config.train_rois_per_image, config.roi_positive_ratio, config.roi_positives) == (
        "resnet50", 8, 0.225, 1)
    assert (config.detection_min_confidence, config.detection_nms_threshold, config.detection_max_instances,
            config.rpn_nms_threshold) == (0.9, 0.6, 3, 0.5)
    assert config.weights == {"rpn_class": 1, "rpn_bbox": 1, "mrcnn_class": 1.25, "mrcnn_bbox": 1, "mrcnn_mask": 1}
    assert dataclasses.replace(config, loss_weights={}) == mask_rcnn.MaskRCNNOptions()


# -- anchors and RPN targets -------------------------------------------------------------

def test_anchors_are_keras_hubs_in_the_rpns_order():
    anchors = mask_rcnn.build(SIZE, TINY).anchors * SIZE
    # 16x16 cells of P2 (stride 4) ... 1 cell of P6, 3 ratios each.
    assert anchors.shape == (3 * (256 + 64 + 16 + 4 + 1), 4)
    # First cell of P2 (centre 0, 0), side 16: ratio (height / width) 0.5, 1, 2, with
    # keras-hub's rounding of half-sides (5.66 -> 6, 11.3 -> 11).
    np.testing.assert_array_equal(anchors[:3], [[-6, -11, 6, 11], [-8, -8, 8, 8], [-11, -6, 11, 6]])
    # Next cell is one stride (4 px) to the right; P3 starts after P2's 768 anchors.
    np.testing.assert_array_equal(anchors[4], [-8, -4, 8, 12])
    np.testing.assert_array_equal(anchors[768 + 1], [-16, -16, 16, 16])
    np.testing.assert_array_equal(anchors[-2], [-128, -128, 128, 128])  # P6, side 256


# Hand-made anchors against one box (0, 0, 0.5, 0.5):
#   a0 the box itself: IoU 1 -> positive, deltas 0
#   a1 (0, 0, .25, .25): IoU 0.25 < 0.3 -> negative
#   a2 (.5, .5, 1, 1): IoU 0 -> negative
#   a3 (.25, 0, .75, .5): intersection .125, union .375, IoU 1/3 -> ignored
#   a4 (0, 0, .5, .4): IoU 0.8 -> positive; centre x 0.2 vs 0.25 over width 0.4 = 0.125,
#      log(0.5 / 0.4) = 0.2231; divided by the std devs (0.1, 0.1, 0.2, 0.2).
ANCHORS = np.array([[0, 0, .5, .5], [0, 0, .25, .25], [.5, .5, 1, 1], [.25, 0, .75, .5], [0, 0, .5, .4]],
                   np.float32)


def test_rpn_targets_on_hand_made_boxes():
    gt = np.zeros((3, 2, 4), np.float32)
    gt[0, 0] = [0, 0, .5, .5]
    # Image 1: (.5, .5, .9, .9) overlaps a2 best, with IoU .16 / .25 = 0.64 < 0.7: a2 is
    # positive as the box's best anchor. Its deltas: centre .7 vs .75 over .5 -> -0.1,
    # log(.4 / .5) = -0.2231.
    gt[1, 0] = [.5, .5, .9, .9]
    # Image 2 has no box: its padding row holds a box that must be ignored.
    gt[2, 0] = [0, 0, .5, .5]
    num_boxes = np.array([1, 1, 0])
    valid = np.arange(2)[None, :] < num_boxes[:, None]
    labels, matched = ops.match_anchors(ANCHORS, gt, valid, positive_iou=0.7, negative_iou=0.3)
    np.testing.assert_array_equal(labels, [[1, 0, 0, -1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    deltas = np.asarray(ops.encode(ANCHORS, matched, (0.1, 0.1, 0.2, 0.2)))
    np.testing.assert_allclose(deltas[0, 0], [0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(deltas[0, 4], [0, 1.25, 0, math.log(0.5 / 0.4) / 0.2], atol=1e-5)
    np.testing.assert_allclose(deltas[1, 2], [-1, -1, math.log(0.8) / 0.2, math.log(0.8) / 0.2], atol=1e-5)


def test_balanced_sample_takes_positives_first_by_priority():
    positive = np.array([[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], bool)
    negative = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0, 0]], bool)
    priority = np.array([[5, 9, 1, 7, 3, 8, 100], [1, 2, 3, 4, 5, 6, 7]], np.int32)
    indices, is_positive, valid = ops.balanced_sample(positive, negative, priority, size=4, max_positives=2)
    # Image 0: positives 1 (9) and 0 (5), capped at 2; negatives 5 (8) and 3 (7) fill up;
    # index 6 is neither (ignored) however high its priority.
    np.testing.assert_array_equal(indices[0], [1, 0, 5, 3])
    np.testing.assert_array_equal(is_positive, [[1, 1, 0, 0], [0, 0, 0, 0]])
    # Image 1: one negative, nothing else: three empty slots.
    assert indices[1, 0] == 3
    np.testing.assert_array_equal(valid, [[1, 1, 1, 1], [1, 0, 0, 0]])


def test_sampling_priorities_follow_the_image_not_its_batch_position():
    rng = np.random.default_rng(0)
    images = rng.random((3, SIZE, SIZE, 1), dtype=np.float32)
    ids = tf.range(50)
    order = ops.sampling_priorities(ops.image_keys(images), 7, ids, salt=1).numpy()
    swapped = ops.sampling_priorities(ops.image_keys(images[::-1]), 7, ids, salt=1).numpy()
    np.testing.assert_array_equal(order, swapped[::-1])
    later = ops.sampling_priorities(ops.image_keys(images), 8, ids, salt=1).numpy()
    assert not np.array_equal(np.argsort(order[0]), np.argsort(later[0]))  # a new order each step
    assert (order >= 0).all() and len(set(order[0])) == 50


# -- RoI sampler -------------------------------------------------------------------------

def test_roi_sampler_on_hand_made_proposals():
    # One box (.1, .1, .5, .5) in image 0, none in image 1 (its padding must not count).
    gt = np.array([[[.1, .1, .5, .5], [0, 0, 0, 0]], [[.1, .1, .5, .5], [0, 0, 0, 0]]], np.float32)
    gt_valid = np.array([[True, False], [False, False]])
    proposals = np.array([[
        [.1, .1, .5, .5],  # p0: the box, IoU 1 -> positive
        [.1, .1, .5, .35],  # p1: IoU .1 / .16 = 0.625 -> positive
        [.6, .6, .9, .9],  # p2: IoU 0 -> negative
        [.1, .3, .5, .7],  # p3: IoU 1/3, but padding (not valid)
    ]] * 2, np.float32)
    proposal_valid = np.array([[True, True, True, False], [True, True, True, True]])
    # Candidates: p0..p3, then the ground truth g0, g1.
    priority = np.array([[1, 5, 2, 9, 3, 8], [1, 5, 2, 9, 3, 8]], np.int32)
    sampled = ops.sample_rois(proposals, proposal_valid, gt, gt_valid, priority, size=4, max_positives=2,
                              positive_iou=0.5, std=(0.1, 0.1, 0.2, 0.2))
    rois, targets = sampled["rois"].numpy(), sampled["targets"].numpy()
    # Image 0: positives by priority p1 (5), g0 (3) - p0 (1) is left out by the cap of 2;
    # the one valid negative p2; a slot stays empty.
    np.testing.assert_allclose(rois[0, :3], [proposals[0, 1], gt[0, 0], proposals[0, 2]])
    np.testing.assert_array_equal(sampled["is_positive"][0], [1, 1, 0, 0])
    np.testing.assert_array_equal(sampled["valid"][0], [1, 1, 1, 0])
    # p1 against the box: centre x .225 vs .3 over width .25 -> 0.3 / 0.1; log(.4 / .25) / 0.2.
    np.testing.assert_allclose(targets[0, 0], [0, 3, 0, math.log(.4 / .25) / 0.2], atol=1e-5)
    np.testing.assert_allclose(targets[0, 1:], 0, atol=1e-6)
    # Image 1 has no box: its four proposals are negatives, by priority p3 (9), p1, p2, p0.
    np.testing.assert_allclose(rois[1], proposals[1, [3, 1, 2, 0]])
    assert not sampled["is_positive"][1].numpy().any() and sampled["valid"][1].numpy().all()


# -- RoIAlign ----------------------------------------------------------------------------

def _numpy_roi_align(maps, boxes, levels, size):
    """Loops over every output cell: one bilinear sample at the bin centre, cell centres at (i + .5) / H."""
    batch, count = boxes.shape[:2]
    out = np.zeros((batch, count, size, size, maps[0].shape[-1]))
    for b in range(batch):
        for n in range(count):
            feature = maps[levels[b, n]][b]
            height, width = feature.shape[:2]
            y0, x0, y1, x1 = boxes[b, n]
            for i in range(size):
                y = min(max((y0 + (i + 0.5) * (y1 - y0) / size) * height - 0.5, 0), height - 1)
                for j in range(size):
                    x = min(max((x0 + (j + 0.5) * (x1 - x0) / size) * width - 0.5, 0), width - 1)
                    top, left = int(np.floor(y)), int(np.floor(x))
                    bottom, right = min(top + 1, height - 1), min(left + 1, width - 1)
                    dy, dx = y - top, x - left
                    out[b, n, i, j] = ((1 - dy) * ((1 - dx) * feature[top, left] + dx * feature[top, right])
                                       + dy * ((1 - dx) * feature[bottom, left] + dx * feature[bottom, right]))
    return out


def test_roi_align_is_exact_on_a_linear_map():
    # f(row, column) = 2 row + 3 column + 1 on a 4x4 map: bilinear sampling is exact.
    rows, columns = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    feature = (2 * rows + 3 * columns + 1).astype(np.float32)[None, :, :, None]
    boxes = np.array([[[.25, .25, .75, .75],  # bin centres at rows/columns 1 and 2
                       [0, 0, 1, 1],  # bin centres at 0.5 and 2.5
                       [.8, .9, 1, 1]]], np.float32)  # the corner: rows 2.9, 3.3 -> 3; columns 3.2, 3.4 -> 3
    pooled = ops.roi_align([feature], boxes, np.zeros((1, 3), np.int32), 2).numpy()[0, ..., 0]
    np.testing.assert_allclose(pooled[0], [[6, 9], [8, 11]])
    np.testing.assert_allclose(pooled[1], [[3.5, 9.5], [7.5, 13.5]])
    np.testing.assert_allclose(pooled[2], [[15.8, 15.8], [16, 16]], rtol=1e-6)


def test_roi_align_matches_numpy_on_three_levels():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(2, side, side, 3)).astype(np.float32) for side in (16, 8, 4)]
    corners = rng.random((2, 6, 2, 2))
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1).astype(np.float32)
    boxes[0, 0] = [0, 0, 1, 1]  # the whole image
    boxes[0, 1] = [0.9, 0.05, 1.0, 0.3]  # on the bottom border
    boxes[1, 0] = [0.3, 0.999, 0.35, 1.0]  # a sliver on the right border
    boxes[1, 1] = [0.4, 0.4, 0.4, 0.6]  # zero height
    levels = rng.integers(0, 3, (2, 6)).astype(np.int32)
    pooled = ops.roi_align(maps, boxes, levels, 5).numpy()
    np.testing.assert_allclose(pooled, _numpy_roi_align(maps, boxes, levels, 5), rtol=1e-5, atol=1e-5)


def test_fpn_levels_follow_the_fpn_rule():
    # floor(4 + log2(side / 224)) at 448 px, clipped to P2..P5: 224 px -> P4, 112 -> P3,
    # 111 -> P2, 8 -> P2 (clipped), 448 -> P5, 300 -> P4.
    sides = np.array([224, 112, 111, 8, 448, 300]) / 448
    boxes = np.stack([np.zeros(6), np.zeros(6), sides, sides], axis=-1)[None].astype(np.float32)
    np.testing.assert_array_equal(ops.fpn_levels(boxes, 448, 4), [[2, 1, 0, 0, 3, 2]])


# -- detection layer ---------------------------------------------------------------------

def _logit(p):
    return math.log(p / (1 - p))


def test_padded_nms_keeps_what_tensorflows_tiled_nms_keeps():
    # Random overlapping boxes (no IoU ties): the per-image kernel keeps the boxes, in the order,
    # of tf.image.non_max_suppression_padded, eagerly, in a tf.function and under XLA.
    rng = np.random.default_rng(3)
    corners = rng.random((3, 300, 2)) * 0.6
    boxes = np.concatenate([corners, corners + rng.random((3, 300, 2)) * 0.3 + 0.1], -1).astype(np.float32)
    scores = rng.random((3, 300)).astype(np.float32)
    want, want_count = tf.image.non_max_suppression_padded(
        boxes, scores, 64, iou_threshold=0.3, score_threshold=0.2, pad_to_max_output_size=True)
    assert want_count.numpy().tolist() == [49, 40, 44]  # fewer than 64: some are suppressed
    for nms in (ops.padded_nms, tf.function(ops.padded_nms), tf.function(ops.padded_nms, jit_compile=True)):
        kept, count = nms(boxes, scores, 64, 0.3, 0.2)
        assert kept.shape == (3, 64)
        np.testing.assert_array_equal(count, want_count)
        for row, n in enumerate(want_count.numpy()):
            np.testing.assert_array_equal(kept[row, :n], want[row, :n])


def test_padded_nms_suppresses_above_the_threshold_and_pads_past_n():
    # IoU of the pair is exactly 0.5: kept at 0.5 (suppression is IoU > threshold), not at 0.49.
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, .5], [0, 0, .1, .1]]], np.float32)
    scores = np.array([[.9, .8, .05]], np.float32)
    kept, count = ops.padded_nms(boxes, scores, 5, 0.5, 0.1)
    assert kept.shape == (1, 5) and count.numpy().tolist() == [2]  # the third scores under 0.1
    assert kept[0, :2].numpy().tolist() == [0, 1]
    kept, count = ops.padded_nms(boxes, scores, 5, 0.49, 0.0)
    assert count.numpy().tolist() == [2] and kept[0, :2].numpy().tolist() == [0, 2]


def test_detection_layer_on_hand_made_head_outputs():
    rois = np.array([[
        [.1, .1, .5, .5],  # r0 .95
        [.1, .1, .5, .45],  # r1 .93: IoU .875 with r0 -> suppressed at 0.6
        [.6, .6, .9, .9],  # r2 .97; its deltas double its height: (.45, .6, 1.05, .9), clipped to 1
        [.1, .55, .4, .95],  # r3 .92, disjoint
        [.6, .1, .9, .4],  # r4 .85 < 0.9 -> dropped
        [.6, .45, .9, .55],  # r5 .99 but a padded RoI -> dropped
        [.6, .7, .9, 1.0],  # r6 .91: IoU .06 / .195 = .31 with refined r2 -> kept, 4th
    ]], np.float32)
    probabilities = [.95, .93, .97, .92, .85, .99, .91]
    logits = np.array([[[0, _logit(p)] for p in probabilities]], np.float32)
    deltas = np.zeros((1, 7, 4), np.float32)
    deltas[0, 2, 2] = math.log(2) / 0.2
    valid = np.array([[1, 1, 1, 1, 1, 0, 1]], bool)
    std = (0.1, 0.1, 0.2, 0.2)
    boxes, scores, count = ops.detect(rois, valid, logits, deltas, std, 0.9, 0.6, 3)
    assert count.numpy().tolist() == [3]
    np.testing.assert_allclose(scores[0], [.97, .95, .92], rtol=1e-5)
    np.testing.assert_allclose(boxes[0], [[.45, .6, 1, .9], rois[0, 0], rois[0, 3]], atol=1e-5)
    boxes, scores, count = ops.detect(rois, valid, logits, deltas, std, 0.9, 0.6, 5)
    assert count.numpy().tolist() == [4]  # r1 suppressed, r4 and r5 dropped
    np.testing.assert_allclose(scores[0], [.97, .95, .92, .91, 0], rtol=1e-5)
    np.testing.assert_array_equal(boxes[0, 4], [0, 0, 0, 0])
    _, scores, count = ops.detect(rois, valid, logits, deltas, std, 0.9, 0.9, 5)
    assert count.numpy().tolist() == [5]  # at NMS 0.9 r1 (IoU .875) survives
    np.testing.assert_allclose(scores[0], [.97, .95, .93, .92, .91], rtol=1e-5)


# -- the network under the contract ----------------------------------------------------

def synthetic_batch(count=4, size=SIZE, seed=0):
    """Bright rectangles on noise; the last quarter of the images (at least one) has none."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.08, (count, size, size, 1)).astype(np.float32)
    gt = np.zeros((count, MAX_BOXES, 4), np.float32)
    num_boxes = np.zeros(count, np.int32)
    mask = np.zeros((count, size, size, 1), np.float32)
    for index in range(count - max(count // 4, 1)):
        num_boxes[index] = 1 + index % 2
        for slot in range(num_boxes[index]):
            height, width = rng.integers(size // 4, size // 2, 2)
            top, left = rng.integers(0, size - height), rng.integers(0, size - width)
            images[index, top:top + height, left:left + width] += 0.4
            mask[index, top:top + height, left:left + width] = 1
            gt[index, slot] = [top / size, left / size, (top + height) / size, (left + width) / size]
    batch = {"image": np.clip(images, 0, 1), "boxes": gt, "num_boxes": num_boxes, "mask": mask,
             "target": (num_boxes > 0).astype(np.int32)}
    return ARCH.to_fit(batch)


def train_step(network, optimizer, inputs, labels):
    with tf.GradientTape() as tape:
        raw = network(inputs, training=True)
        terms = ARCH.loss(network, inputs, labels, raw, training=True)
        total = optimizer.scale_loss(tf.add_n(list(terms.values())))
    gradients = tape.gradient(total, network.trainable_variables)
    optimizer.apply_gradients(zip(gradients, network.trainable_variables))
    return terms


def test_to_fit_and_outputs_follow_the_contract():
    inputs, labels = synthetic_batch()
    network = mask_rcnn.build(SIZE, replace(TINY, detection_min_confidence=0.0))
    outputs = ARCH.infer(network, {"image": inputs["image"]})
    assert {key: (value.shape, value.dtype) for key, value in outputs.items()} == {
        "boxes": ((4, 3, 4), tf.float32), "scores": ((4, 3), tf.float32), "num_detections": ((4,), tf.int32),
        "masks": ((4, 3, 28, 28), tf.float32)}
    scores = outputs["scores"].numpy()
    # Untrained, every RoI scores about 0.5: at min confidence 0 each image has 3 detections.
    assert outputs["num_detections"].numpy().tolist() == [3, 3, 3, 3]
    assert (np.diff(scores, axis=1) <= 0).all() and ((0 <= scores) & (scores <= 1)).all()
    assert ((0 <= outputs["boxes"].numpy()) & (outputs["boxes"].numpy() <= 1)).all()
    np.testing.assert_allclose(ARCH.image_probability(outputs), scores[:, 0])


def test_loss_terms_and_what_images_without_boxes_train():
    inputs, labels = synthetic_batch()
    network = mask_rcnn.build(SIZE, TINY)
    raw = network(inputs, training=True)
    terms = ARCH.loss(network, inputs, labels, raw, training=False)
    assert list(terms) == ["rpn_class", "rpn_bbox", "mrcnn_class", "mrcnn_bbox", "mrcnn_mask"]
    assert all(value.dtype == tf.float32 and value.shape == () and np.isfinite(value) for value in terms.values())
    assert int(network.sampler_step.numpy()) == 0  # validation draws no new sample order
    # Only the last image has no box: its terms are the negatives' classification losses.
    empty = {key: value[3:] for key, value in inputs.items()}, {key: value[3:] for key, value in labels.items()}
    with tf.GradientTape() as tape:
        raw = network(empty[0], training=True)
        terms = ARCH.loss(network, *empty, raw, training=True)
        total = tf.add_n(list(terms.values()))
    assert int(network.sampler_step.numpy()) == 1
    assert terms["rpn_class"] > 0 and terms["mrcnn_class"] > 0
    assert terms["rpn_bbox"] == 0 and terms["mrcnn_bbox"] == 0 and terms["mrcnn_mask"] == 0
    rpn_class = network.first_stage.get_layer("rpn_class").kernel
    mrcnn_class = network.box_head.get_layer("mrcnn_class_logits").kernel
    mask = network.mask_head.get_layer("mrcnn_mask").kernel
    gradients = tape.gradient(total, [rpn_class, mrcnn_class, mask], unconnected_gradients="zero")
    assert [float(tf.reduce_max(tf.abs(g))) > 0 for g in gradients] == [True, True, False]


def test_seed_loss_weights_and_overrides():
    inputs, labels = synthetic_batch()
    weighted = mask_rcnn.build(SIZE, replace(TINY, loss_weights={"mrcnn_class": 2.5, "rpn_bbox": 0.0}))
    keras.utils.set_random_seed(0)
    plain = mask_rcnn.build(SIZE, TINY)
    weighted.set_weights(plain.get_weights())
    raw = plain(inputs, training=False)
    seed_terms = ARCH.loss(plain, inputs, labels, raw, training=False)
    terms = ARCH.loss(weighted, inputs, labels, raw, training=False)
    assert float(terms["mrcnn_class"]) == pytest.approx(2 * float(seed_terms["mrcnn_class"]))  # 2.5 vs 1.25
    assert float(terms["rpn_bbox"]) == 0
    assert float(terms["mrcnn_mask"]) == pytest.approx(float(seed_terms["mrcnn_mask"]))


def test_one_train_step_in_mixed_float16():
    """mixed_float16 (GPU) with the loss scaling Keras' compile adds; tests/test_contract.py steps in
    mixed_bfloat16."""
    inputs, labels = synthetic_batch()
    keras.utils.set_random_seed(0)
    with distribute.precision("mixed_float16"):
        network = mask_rcnn.build(SIZE, TINY)
    reference = mask_rcnn.build(SIZE, TINY)
    reference.set_weights(network.get_weights())
    assert network.first_stage.get_layer("rpn_conv_shared").compute_dtype == "float16"
    # At a loss scale where this step's float16 gradients stay finite.
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=128.0)
    before = [np.array(w) for w in network.trainable_weights]
    terms = train_step(network, optimizer, inputs, labels)
    # Both networks draw the same sample (the same step, the same images): float16's rounding apart
    # (measured: mrcnn_class 1.4%, the other terms under 0.06%).
    want = ARCH.loss(reference, inputs, labels, reference(inputs, training=True), training=True)
    assert {key: value.dtype for key, value in terms.items()} == {key: tf.float32 for key in mask_rcnn.LOSS_NAMES}
    assert {key: float(value) for key, value in terms.items()} == pytest.approx(
        {key: float(value) for key, value in want.items()}, rel=0.03)
    changed = [not np.array_equal(a, np.array(b)) for a, b in zip(before, network.trainable_weights)]
    assert all(changed), [w.path for w, c in zip(network.trainable_weights, changed) if not c]
    outputs = ARCH.infer(network, {"image": inputs["image"]})
    assert {key: value.dtype for key, value in outputs.items()} == {
        "boxes": tf.float32, "scores": tf.float32, "num_detections": tf.int32, "masks": tf.float32}


def test_keras_file_keeps_the_options_and_the_samplers_step(tmp_path):
    inputs, labels = synthetic_batch()
    network = mask_rcnn.build(SIZE, replace(TINY, detection_min_confidence=0.0, loss_weights={"mrcnn_mask": 2.0}))
    train_step(network, keras.optimizers.SGD(0.01), inputs, labels)
    network.save(tmp_path / "mask_rcnn.keras")
    loaded = keras.models.load_model(tmp_path / "mask_rcnn.keras", compile=False)
    assert isinstance(loaded, mask_rcnn.MaskRCNN) and loaded.options == network.options
    assert int(loaded.sampler_step.numpy()) == 1


def _xywh(boxes):
    return yxyx_to_xywh(boxes, SIZE, SIZE)


@pytest.mark.slow
def test_learns_a_small_fixed_batch():
    """The whole chain (targets, sampler, RoIAlign, heads, detection layer) fits 8 images in 200 steps."""
    inputs, labels = synthetic_batch(count=8)
    keras.utils.set_random_seed(0)
    # The seed's detection settings (min confidence 0.9, NMS 0.6, at most 3).
    network = mask_rcnn.build(SIZE, TINY)
    steps = 200
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps))
    step = tf.function(lambda x, y: train_step(network, optimizer, x, y))
    for _ in range(steps):
        terms = step(inputs, labels)
    outputs = {key: value.numpy() for key, value in ARCH.infer(network, {"image": inputs["image"]}).items()}
    detections = ARCH.detections(outputs, 0.9)
    predictions = {str(i): (_xywh(boxes), scores) for i, (boxes, scores) in enumerate(detections)}
    truth = {str(i): _xywh(labels["boxes"][i, : labels["num_boxes"][i]]) for i in range(8)}
    score = metric.challenge_map(predictions, truth)
    print(f"challenge mAP after {steps} steps: {score:.3f}; detections per image "
          f"{outputs['num_detections'].tolist()}; last terms { {k: round(float(v), 4) for k, v in terms.items()} }")
    assert score > 0.5
