"""retinanet: what is specific to keras-hub's RetinaNet (anchors, targets, focal loss, decoding, options), on
64-px images and a tiny encoder. What every architecture shares is in tests/test_contract.py."""
from __future__ import annotations

import pathlib
import time
from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_hub.src.models.retinanet.retinanet_presets import backbone_presets

import tiny_models  # tests/tiny_models.py
from pneumo_tf.errors import UserError
from pneumo_tf.evaluation.metric import challenge_map
from pneumo_tf.models import retinanet
from pneumo_tf.models.architecture import BOXES, NUM_DETECTIONS, SCORES
from pneumo_tf.training import distribute

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64
# tests/tiny_models.py's: 720 anchors at 64 px, 9 per position on 8 x 8 (P3) and 4 x 4 (P4) grids.
TINY = tiny_models.options("retinanet")
ANCHORS = 9 * (8 * 8 + 4 * 4)
ALPHA, GAMMA = retinanet.FOCAL_ALPHA, retinanet.FOCAL_GAMMA

GOLDEN_DEFAULT = 32_247_917  # ResNet-50, P3-P7, four head convolutions


def _conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _tiny_params():
    # Encoder: 7x7 stem + BN; stack 0 two 3x3 convs + 2 BN (identity shortcut); stacks 1-2
    # the same plus a 1x1 shortcut conv + BN. BN holds 4 vectors.
    bn = 4 * 64
    encoder = _conv(7, 1, 64, bias=False) + bn
    encoder += 2 * (_conv(3, 64, 64, bias=False) + bn)
    encoder += 2 * (_conv(1, 64, 64, bias=False) + bn + 2 * (_conv(3, 64, 64, bias=False) + bn))
    # Pyramid P3, P4: a 1x1 lateral (64 -> 256) and a 3x3 output conv per level.
    pyramid = 2 * (_conv(1, 64, 256) + _conv(3, 256, 256))
    # Heads shared by the levels: one 3x3 conv, then 3x3 logits for 9 anchors x (4 deltas | 1 class).
    heads = 2 * _conv(3, 256, 256) + _conv(3, 256, 9 * 4) + _conv(3, 256, 9 * 1)
    return encoder + pyramid + heads


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return retinanet.build(SIZE, TINY)


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, SIZE, SIZE, 1), dtype=np.float32)


def _labels(boxes_per_image):
    """{"boxes": [B, 8, 4] normalised yxyx, zero-padded, "num_boxes": [B]} from lists of boxes."""
    boxes = np.zeros((len(boxes_per_image), 8, 4), np.float32)
    for i, image_boxes in enumerate(boxes_per_image):
        if image_boxes:
            boxes[i, : len(image_boxes)] = image_boxes
    return {"boxes": boxes, "num_boxes": np.array([len(b) for b in boxes_per_image], np.int32)}


# The square 32-px P3 anchor centred at (32, 32): keras-hub puts anchor centres on multiples of
# the stride, so this box is exactly an anchor.
CENTRE_BOX = [0.25, 0.25, 0.75, 0.75]


def test_golden_counts_are_the_hand_arithmetic_and_keras_hubs():
    assert _tiny_params() == tiny_models.TINY["retinanet"].params
    # keras-hub's published count for its COCO preset (the same layout, RGB, 91 classes) less
    # the stem's two extra input channels and the class logits of 90 more classes.
    coco = backbone_presets["retinanet_resnet50_fpn_coco"]["metadata"]["params"]
    assert coco == 34_121_239
    assert GOLDEN_DEFAULT == coco - 7 * 7 * 2 * 64 - (3 * 3 * 256 + 1) * 9 * 90
    assert retinanet.build(128).count_params() == GOLDEN_DEFAULT


def test_architecture_and_network_contract(tiny):
    architecture = retinanet.RetinaNet()
    assert architecture.name == "retinanet" and architecture.gives_boxes
    assert architecture.monitor == ("val_map", "max")
    batch = {"image": _images(2), "mask": np.zeros((2, SIZE, SIZE, 1), np.float32),
             "target": np.array([1, 0], np.int32), **_labels([[CENTRE_BOX], []])}
    inputs, _ = architecture.to_fit(batch)
    raw = tiny(inputs, training=False)
    assert {key: tuple(t.shape) for key, t in raw.items()} == {
        "bbox_regression": (2, ANCHORS, 4), "cls_logits": (2, ANCHORS, 1)}
    # Every BatchNormalization of keras-hub's encoder (stem 1, stack 0 2, stacks 1-2 3 each) is
    # synchronised across replicas.
    norms = [layer for layer in tiny.detector.backbone.image_encoder.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 9 and all(layer.synchronized for layer in norms)


def _numpy_anchors():
    """keras-hub's anchor rule written out: per level l (stride s = 2**l), positions (y, x) on the
    s-grid from 0, and per position aspect ratios r (height / width) 0.5, 1, 2, each with sizes
    int(4 s 2**(k/3)), k = 0, 1, 2: half-height round(size sqrt(r) / 2), half-width
    round(size / sqrt(r) / 2)."""
    anchors = []
    for level in (3, 4):
        stride = 2**level
        halves = []
        for ratio in (0.5, 1.0, 2.0):
            for k in range(3):
                size = int(4 * stride * 2 ** (k / 3))
                halves.append((np.round(size * np.sqrt(ratio) / 2), np.round(size / np.sqrt(ratio) / 2)))
        for y in range(0, SIZE, stride):
            for x in range(0, SIZE, stride):
                anchors.extend((y - h, x - w, y + h, x + w) for h, w in halves)
    return np.array(anchors, np.float32)


def _iou(anchors, box):
    overlap = [np.clip(np.minimum(anchors[:, i + 2], box[i + 2]) - np.maximum(anchors[:, i], box[i]), 0, None)
               for i in (0, 1)]
    intersection = overlap[0] * overlap[1]
    areas = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return intersection / (areas + (box[2] - box[0]) * (box[3] - box[1]) - intersection)


def test_anchors_follow_the_written_rule(tiny):
    anchors = retinanet.anchor_boxes(tiny).numpy()
    np.testing.assert_array_equal(anchors, _numpy_anchors())
    # Index (row * 8 + column) * 9 + ratio * 3 + scale: P3, row 4, column 4, square, 32 px.
    np.testing.assert_array_equal(anchors[(4 * 8 + 4) * 9 + 3], np.array(CENTRE_BOX) * SIZE)


def test_keras_hub_labels_are_pixels_with_minus_one_padding():
    labels = _labels([[[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.125, 0.25]], []])
    labels["boxes"][1, 0] = 0.5  # past num_boxes: padding whatever it holds
    boxes, classes = retinanet.keras_hub_labels(labels["boxes"], labels["num_boxes"], height=64, width=128)
    expected = -np.ones((2, 8, 4), np.float32)
    expected[0, 0] = [16, 64, 48, 128]
    expected[0, 1] = [0, 0, 8, 32]
    np.testing.assert_array_equal(boxes, expected)
    expected_classes = -np.ones((2, 8), np.float32)
    expected_classes[0, :2] = 0
    np.testing.assert_array_equal(classes, expected_classes)


def _focal(p, positive):
    """The RetinaNet paper's focal loss of one anchor with probability p."""
    if positive:
        return -ALPHA * (1 - p) ** GAMMA * np.log(p)
    return -(1 - ALPHA) * p**GAMMA * np.log(1 - p)


def _constant_raw(batch, logit=-2.0, deltas=0.0):
    return {
        "bbox_regression": tf.fill((batch, ANCHORS, 4), deltas),
        "cls_logits": tf.fill((batch, ANCHORS, 1), logit),
    }


def test_batch_without_boxes_keeps_the_focal_loss_on_negatives(tiny):
    architecture = retinanet.RetinaNet()
    inputs, labels = {"image": _images(2)}, _labels([[], []])
    # Every anchor is background; the normaliser is max(0 positives, 1) = 1.
    terms = architecture.loss(tiny, inputs, labels, _constant_raw(2, logit=-2.0, deltas=0.3), training=True)
    assert set(terms) == {"classification", "box"}
    p = 1 / (1 + np.exp(2.0))
    assert float(terms["classification"]) == pytest.approx(2 * ANCHORS * _focal(p, False), rel=1e-5)
    assert float(terms["box"]) == 0.0
    # The network's own outputs too (keras-hub's compute_loss gives 0 for this batch): every anchor's
    # negative focal term. Summed in float64 here, over 1,440 anchors.
    raw = tiny(inputs, training=True)
    terms = architecture.loss(tiny, inputs, labels, raw, training=True)
    p = 1 / (1 + np.exp(-np.asarray(raw["cls_logits"], np.float64)))
    assert float(terms["classification"]) == pytest.approx(_focal(p, False).sum(), rel=1e-4)
    assert float(terms["box"]) == 0.0


def test_positive_anchor_normaliser_is_the_hand_count(tiny):
    architecture = retinanet.RetinaNet()
    inputs, labels = {"image": _images(2)}, _labels([[CENTRE_BOX], []])
    # Anchors of IoU >= 0.5 with the 32-px square at (32, 32), all on P3 (P4's 64-px anchors
    # reach 0.25): at its centre the 32 and 40 px squares and the 32 and 40 px 1:2 and 2:1
    # anchors (IoU 1, 0.64, 0.53 x 4); at each of the 4 centres 8 px away, the 32 and 40 px
    # squares (0.6, 0.52) and the 32 and 40 px anchors long along the shift (0.50, 0.53).
    hand_count = 6 + 4 * 4
    iou = _iou(_numpy_anchors(), np.array(CENTRE_BOX) * SIZE)
    assert (iou >= 0.5).sum() == hand_count == 22
    box_targets, classes = retinanet.training_targets(tiny, labels["boxes"], labels["num_boxes"])
    classes = classes.numpy()
    assert (classes == retinanet.OPACITY).sum() == hand_count
    np.testing.assert_array_equal(np.flatnonzero(classes[0] == retinanet.OPACITY), np.flatnonzero(iou >= 0.5))
    assert (classes == retinanet.IGNORED).sum() == 0  # the default matches without an ignore band
    # Deltas equal to the targets except 1 off on each coordinate of one positive anchor:
    # Huber(1) = 0.5 there, 0 elsewhere, so the box term is 0.5 / the normaliser.
    anchor = (4 * 8 + 4) * 9 + 3
    deltas = box_targets.numpy().copy()
    deltas[0, anchor] += 1.0
    raw = {"bbox_regression": tf.constant(deltas), "cls_logits": tf.fill((2, ANCHORS, 1), -2.0)}
    terms = architecture.loss(tiny, inputs, labels, raw, training=True)
    assert float(terms["box"]) == pytest.approx(0.5 / hand_count, rel=1e-6)
    p = 1 / (1 + np.exp(2.0))
    expected = (hand_count * _focal(p, True) + (2 * ANCHORS - hand_count) * _focal(p, False)) / hand_count
    assert float(terms["classification"]) == pytest.approx(expected, rel=1e-5)


def test_box_targets_are_deltas_over_the_box_variance(tiny):
    """The 32-px square anchor at (32, 32) and the box 4 px below it (IoU 0.78): center_xywh deltas
    (0, 4 / 32, 0, 0), divided by the default box variance (0.1, 0.1, 0.2, 0.2)."""
    box = (np.array(CENTRE_BOX) * SIZE + [4, 0, 4, 0]) / SIZE
    labels = _labels([[box]])
    box_targets, classes = retinanet.training_targets(tiny, labels["boxes"], labels["num_boxes"])
    anchor = (4 * 8 + 4) * 9 + 3
    assert classes[0, anchor] == retinanet.OPACITY
    np.testing.assert_allclose(box_targets[0, anchor], [0.0, 0.125 / 0.1, 0.0, 0.0], atol=1e-6)
    unit = retinanet.build(SIZE, replace(TINY, box_variance=(1.0, 1.0, 1.0, 1.0)))  # keras-hub's default
    unit_targets, _ = retinanet.training_targets(unit, labels["boxes"], labels["num_boxes"])
    np.testing.assert_allclose(unit_targets[0, anchor], [0.0, 0.125, 0.0, 0.0], atol=1e-6)


def test_loss_is_keras_hubs_when_the_batch_has_boxes(tiny):
    """Where keras-hub's compute_loss is right (a positive anchor in the batch) the two agree."""
    inputs, labels = {"image": _images(2)}, _labels([[CENTRE_BOX, [0.0, 0.5, 0.5, 1.0]], []])
    raw = tiny(inputs, training=False)
    terms = retinanet.RetinaNet().loss(tiny, inputs, labels, raw, training=False)
    detector = retinanet.build(SIZE, TINY).detector  # a separate copy to compile
    detector.compile(
        box_loss=keras.losses.Huber(reduction="sum"),
        classification_loss=keras.losses.BinaryFocalCrossentropy(
            apply_class_balancing=True, alpha=ALPHA, gamma=GAMMA, from_logits=True, reduction="sum"),
    )
    boxes, classes = retinanet.keras_hub_labels(labels["boxes"], labels["num_boxes"], SIZE, SIZE)
    theirs = detector.compute_loss(x=inputs["image"], y={"boxes": boxes, "labels": classes}, y_pred=raw,
                                   sample_weight=None)
    assert float(terms["classification"] + terms["box"]) == pytest.approx(float(theirs), rel=1e-5)


def _hand_raw():
    """Zero deltas (every box is its anchor) and logits of -10 but at four anchors of image 0."""
    logits = np.full((2, ANCHORS, 1), -10.0, np.float32)
    logits[0, (3 * 8 + 4) * 9 + 3] = 2.0  # P3 (24, 32), square 32 px: (8, 16, 40, 48)
    logits[0, (3 * 8 + 4) * 9 + 4] = 1.0  # same centre, 40 px: IoU 0.64 with it, suppressed
    logits[0, 8 * 8 * 9 + (3 * 4 + 3) * 9 + 3] = 0.5  # P4 (48, 48), 64 px: (16, 16, 80, 80), IoU 0.18
    logits[0, 0] = -3.5  # sigmoid 0.029, under min_confidence 0.05
    return {"bbox_regression": tf.zeros((2, ANCHORS, 4)), "cls_logits": tf.constant(logits)}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "xla"])
def test_outputs_decode_hand_made_raw_outputs(tiny, jit_compile):
    architecture = retinanet.RetinaNet()
    images = tf.constant(_images(2))
    decode = tf.function(lambda raw: architecture.outputs(tiny, {"image": images}, raw), jit_compile=jit_compile)
    outputs = {key: np.asarray(value) for key, value in decode(_hand_raw()).items()}
    assert {key: (value.shape, value.dtype) for key, value in outputs.items()} == {
        BOXES: ((2, 4, 4), np.float32), SCORES: ((2, 4), np.float32), NUM_DETECTIONS: ((2,), np.int32)}
    np.testing.assert_array_equal(outputs[NUM_DETECTIONS], [2, 0])
    expected_boxes = np.zeros((2, 4, 4), np.float32)
    expected_boxes[0, 0] = np.array([8, 16, 40, 48]) / SIZE
    expected_boxes[0, 1] = [16 / SIZE, 16 / SIZE, 1.0, 1.0]  # clipped to the image
    np.testing.assert_allclose(outputs[BOXES], expected_boxes, atol=1e-6)
    expected_scores = np.zeros((2, 4), np.float32)
    expected_scores[0, :2] = 1 / (1 + np.exp([-2.0, -0.5]))
    np.testing.assert_allclose(outputs[SCORES], expected_scores, rtol=1e-6)
    # The shared BoxDetector decoding on the host.
    (boxes_0, scores_0), (boxes_1, scores_1) = architecture.detections(outputs, threshold=0.7)
    np.testing.assert_allclose(boxes_0, expected_boxes[0, :1], atol=1e-6)
    np.testing.assert_allclose(scores_0, expected_scores[0, :1], rtol=1e-6)
    assert boxes_1.shape == (0, 4) and scores_1.shape == (0,)
    np.testing.assert_allclose(architecture.image_probability(outputs), [expected_scores[0, 0], 0.0], rtol=1e-6)


def test_decoding_options_reach_the_nms():
    network = retinanet.build(SIZE, replace(TINY, max_detections=1, min_confidence=0.9, nms_iou_threshold=0.7))
    outputs = retinanet.RetinaNet().outputs(network, {"image": tf.zeros((2, SIZE, SIZE, 1))}, _hand_raw())
    # Only the first anchor scores above 0.9 (sigmoid(2) = 0.88 does not): nothing is kept.
    assert outputs[BOXES].shape == (2, 1, 4)
    np.testing.assert_array_equal(outputs[NUM_DETECTIONS], [0, 0])
    network = retinanet.build(SIZE, replace(TINY, nms_iou_threshold=0.7))
    outputs = retinanet.RetinaNet().outputs(network, {"image": tf.zeros((2, SIZE, SIZE, 1))}, _hand_raw())
    # IoU 0.64 no longer suppresses the 40-px square: three detections.
    np.testing.assert_array_equal(outputs[NUM_DETECTIONS], [3, 0])
    np.testing.assert_allclose(outputs[SCORES][0, :3], 1 / (1 + np.exp([-2.0, -1.0, -0.5])), rtol=1e-6)


def test_outputs_accept_float16_raw_outputs(tiny):
    """keras-hub's decode_predictions fails on float16 predictions (mixed_float16); outputs casts."""
    raw = {key: tf.cast(value, tf.float16) for key, value in _hand_raw().items()}
    outputs = retinanet.RetinaNet().outputs(tiny, {"image": tf.zeros((2, SIZE, SIZE, 1))}, raw)
    assert {value.dtype for value in outputs.values()} == {tf.float32, tf.int32}
    np.testing.assert_array_equal(outputs[NUM_DETECTIONS], [2, 0])


def test_mixed_bfloat16_keeps_anchors_and_label_encoding_float32():
    with distribute.precision("mixed_bfloat16"):
        detector = retinanet.build(SIZE, TINY).detector
    assert detector.classification_head.compute_dtype == "bfloat16"
    assert detector.label_encoder.compute_dtype == detector.anchor_generator.compute_dtype == "float32"


def test_keras_file_keeps_the_decoding_options_and_synchronised_batch_norm(tmp_path):
    """keras-hub rebuilds its backbone from constructor arguments on load: the wrapper synchronises the
    encoder's batch norms again and keeps its own decoding options."""
    network = retinanet.build(SIZE, replace(TINY, max_detections=6, min_confidence=0.01, pre_nms_top_k=100))
    network.save(tmp_path / "retinanet.keras")
    loaded = keras.models.load_model(tmp_path / "retinanet.keras", compile=False)
    assert isinstance(loaded, retinanet.RetinaNetNetwork) and loaded.pre_nms_top_k == 100
    norms = [layer for layer in loaded.detector.backbone.image_encoder.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 9 and all(layer.synchronized for layer in norms)
    outputs = retinanet.ARCHITECTURE.infer(loaded, {"image": tf.constant(_images(2))})
    assert outputs[BOXES].shape == (2, 6, 4)


@pytest.mark.parametrize(("options", "message"), [
    ({"image_size": 72}, "divisible by 16"),
    ({"stackwise_num_filters": (32, 64, 64)}, "first stack with 64 filters"),
    ({"stackwise_num_blocks": (1, 1)}, "same length"),
    ({"block_type": "dense"}, "block_type must be one of"),
    ({"max_level": 5}, "options do not fit together"),  # P5 needs a fourth stack
    ({"min_level": 5}, "min_level must be between 2"),
    ({"negative_threshold": 0.6}, "negative_threshold <= positive_threshold"),
    ({"max_detections": 20, "pre_nms_top_k": 10}, "max_detections <= pre_nms_top_k"),
    ({"box_variance": (0.1, 0.2)}, "box_variance needs 4 scales"),
    ({"box_variance": (0.1, 0.1, 0.0, 0.2)}, "retinanet option box_variance must be greater than 0, not 0"),
    ({"max_detections": 0}, "retinanet option max_detections must be at least 1, not 0"),
    ({"positive_threshold": 1.5}, r"retinanet option positive_threshold must be in \(0, 1\], not 1.5"),
    ({"stackwise_num_blocks": "(1, 1, x)"}, "retinanet option stackwise_num_blocks: expected a tuple of int"),
    ({"use_p5": "maybe"}, "retinanet option use_p5: expected true or false, got 'maybe'"),
    ({"pre_nms": 5},
     "unknown retinanet option.s. pre_nms; known: anchor_size, backbone_preset, block_type, box_variance"),
])
def test_option_errors_are_user_errors(options, message):
    options = {**TINY.as_dict(), **options}
    image_size = options.pop("image_size", SIZE)
    with pytest.raises(UserError, match=message):
        retinanet.build(image_size, retinanet.ARCHITECTURE.make_options(options))


def _synthetic_batch(seed=0):
    """8 images of noise, 5 with bright rectangles (one with two), 3 without; boxes as the batch has them."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.1, (8, SIZE, SIZE, 1)).astype(np.float32)
    pixel_boxes = [[(8, 10, 40, 38)], [(20, 4, 52, 30), (6, 36, 34, 60)], [(30, 28, 60, 60)], [(4, 4, 30, 36)],
                   [(16, 16, 48, 44)], [], [], []]
    for image, image_boxes in zip(images, pixel_boxes):
        for ymin, xmin, ymax, xmax in image_boxes:
            image[ymin:ymax, xmin:xmax] += 0.5
    labels = _labels([[np.array(box) / SIZE for box in image_boxes] for image_boxes in pixel_boxes])
    return np.clip(images, 0, 1), labels


def _xywh(boxes):
    """Normalised (ymin, xmin, ymax, xmax) -> the metric's (x, y, width, height) in pixels."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * SIZE
    return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], axis=1)


@pytest.mark.slow
def test_learns_a_small_batch_to_a_high_challenge_map():
    keras.utils.set_random_seed(0)
    images, labels = _synthetic_batch()
    network = retinanet.build(SIZE, TINY)
    architecture = retinanet.RetinaNet()
    optimizer = keras.optimizers.Adam(1e-3)
    inputs = {"image": tf.constant(images)}

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            terms = architecture.loss(network, inputs, labels, network(inputs, training=True), training=True)
            total = tf.add_n(list(terms.values()))
        optimizer.apply_gradients(zip(tape.gradient(total, network.trainable_variables), network.trainable_variables))
        return total

    steps, start = 200, time.perf_counter()
    first = float(step())
    for _ in range(steps - 1):
        last = float(step())
    seconds = time.perf_counter() - start
    outputs = tf.function(lambda x: architecture.infer(network, x), jit_compile=True)(inputs["image"])
    found = architecture.detections({key: np.asarray(value) for key, value in outputs.items()}, threshold=0.5)
    predictions = {str(i): (_xywh(boxes), scores) for i, (boxes, scores) in enumerate(found)}
    truth = {str(i): _xywh(labels["boxes"][i, :count]) for i, count in enumerate(labels["num_boxes"])}
    score = challenge_map(predictions, truth)
    print(f"retinanet learnability: {steps} steps in {seconds:.0f} s, loss {first:.3g} -> {last:.3g}, "
          f"challenge mAP {score:.3f}")
    assert last < 0.01 * first
    assert score > 0.5


def test_heads_start_as_the_paper_says(tiny):
    """Lin et al. 2017, 4.1: head kernels N(0, 0.01), biases 0, the class logits' bias the prior's.
    keras-hub 0.32 draws the kernels from N(0, 0.05) and puts the prior's bias on the box head."""
    detector = tiny.detector
    for head in (detector.box_head, detector.classification_head):
        kernels = [np.asarray(w) for w in head.weights if w.path.endswith("/kernel")]
        assert len(kernels) == 2  # TINY: one 3x3 convolution, then the prediction layer
        for kernel in kernels:
            assert abs(kernel.std() - 0.01) < 0.0005 and abs(kernel.mean()) < 0.0005
    np.testing.assert_allclose(np.asarray(detector.classification_head.prediction_layer.bias),
                               -np.log(0.99 / 0.01), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(detector.box_head.prediction_layer.bias), 0.0)
    # So every anchor of a random image starts at P(opacity) ~ 0.01: the logits stay within
    # 0.5 of the prior's (keras-hub's initialisation spread them over +-25 on the demo's model).
    logits = np.asarray(tiny({"image": tf.constant(_images(2))})["cls_logits"])
    assert np.abs(logits + np.log(0.99 / 0.01)).max() < 0.5
