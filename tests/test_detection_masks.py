"""Masks in the model contract (Architecture.masks): mask_resnet's thresholded mask, mask_rcnn's mask head
pasted into its boxes (in-graph part compiled with XLA), and a reading's masks with flip TTA."""
import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf import models
from pneumo_tf.data import metadata
from pneumo_tf.models import architecture, exported, mask_rcnn, reading as reading_lib

MASK_RESNET = models.get("mask_resnet")
MASK_RCNN = mask_rcnn.ARCHITECTURE


def test_which_architectures_give_masks():
    assert {name: models.get(name).gives_masks for name in models.NAMES} == {
        "cnn": False, "vgg16": False, "mask_resnet": True, "retinanet": False, "mask_rcnn": True}
    with pytest.raises(NotImplementedError, match="the retinanet model gives no masks"):
        models.get("retinanet").masks({}, 0.5, [(4, 4)])


def test_resize_nearest_keeps_edges_on_the_grid():
    mask = np.array([[1, 0], [0, 1]], bool)
    np.testing.assert_array_equal(architecture.resize_nearest(mask, 4, 6), np.kron(mask, np.ones((2, 3), bool)))
    # Pixel centres: output pixel j of 2 samples input position (j + 0.5) * 2 of 4.
    np.testing.assert_array_equal(architecture.resize_nearest(np.arange(4)[None], 1, 2), [[1, 3]])


def test_mask_resnet_masks_are_its_kept_components_at_any_size():
    probability = np.zeros((1, 16, 16, 1), np.float32)
    probability[0, 2:6, 4:12] = 0.9  # a component: a box
    probability[0, 10, 10] = 0.8  # one pixel: above 0.1% of 256 pixels, so a box too
    probability[0, 12:16, 0:2] = 0.4  # below the threshold
    outputs = {"mask": probability}
    [(boxes, _)] = MASK_RESNET.detections(outputs, 0.5)
    [mask] = MASK_RESNET.masks(outputs, 0.5, [(32, 64)])
    assert mask.shape == (32, 64) and mask.dtype == bool
    expected = np.kron(probability[0, ..., 0] > 0.5, np.ones((2, 4), bool))
    np.testing.assert_array_equal(mask, expected)
    assert len(boxes) == 2  # both components are boxes, and the mask holds exactly their pixels


def test_mask_resnet_masks_leave_out_speckle_without_a_box():
    probability = np.zeros((1, 64, 64, 1), np.float32)
    probability[0, 10:30, 10:30] = 0.9
    probability[0, 50, 50] = 0.9  # 1 pixel < 0.1% of 4,096: no box, so not in the mask either
    [mask] = MASK_RESNET.masks({"mask": probability}, 0.5, [(64, 64)])
    assert mask.sum() == 400 and not mask[50, 50]


def rcnn_outputs(masks, boxes, scores):
    count = len(scores)
    pad = 3 - count
    return {"boxes": np.pad(np.asarray(boxes, np.float32), [(0, pad), (0, 0)])[None],
            "scores": np.pad(np.asarray(scores, np.float32), [(0, pad)])[None],
            "num_detections": np.array([count], np.int32),
            "masks": np.pad(np.asarray(masks, np.float32), [(0, pad), (0, 0), (0, 0)])[None]}


def test_mask_rcnn_pastes_each_kept_detections_mask_into_its_box():
    full = np.ones((28, 28), np.float32)
    left_half = np.zeros((28, 28), np.float32)
    left_half[:, :14] = 1.0
    outputs = rcnn_outputs([full, left_half, full], [[0.25, 0.25, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0, 0, 1, 1]],
                           [0.9, 0.8, 0.3])
    [mask] = MASK_RCNN.masks(outputs, 0.5, [(100, 200)])
    expected = np.zeros((100, 200), bool)
    expected[25:50, 50:100] = True  # the first box, all of it
    expected[50:100, 0:50] = True  # the left half of the second; the third scores 0.3 <= 0.5
    np.testing.assert_array_equal(mask, expected)
    [(boxes, scores)] = MASK_RCNN.detections(outputs, 0.5)
    assert len(scores) == 2  # the same detections the boxes are
    [nothing] = MASK_RCNN.masks(outputs, 0.95, [(10, 10)])
    assert not nothing.any()


TINY = mask_rcnn.MaskRCNNOptions(
    backbone="resnet18", backbone_blocks=(1, 1, 1, 1), backbone_filters=(64, 64, 64, 64), top_down_pyramid_size=16,
    rpn_conv_size=16, rpn_anchor_scales=(16, 32, 64, 128, 256), rpn_train_anchors_per_image=64, pre_nms_limit=256,
    post_nms_rois_training=64, post_nms_rois_inference=64, train_rois_per_image=16, roi_positive_ratio=0.25,
    fpn_classif_fc_layers_size=32, mask_head_size=8, mask_head_convs=1, detection_min_confidence=0.0)


@pytest.mark.slow
def test_mask_rcnn_masks_are_its_mask_head_on_the_detections_and_compile_with_xla():
    network = mask_rcnn.build(64, TINY)
    images = tf.random.stateless_uniform((2, 64, 64, 1), seed=(1, 2))
    eager = {key: value.numpy() for key, value in MASK_RCNN.infer(network, {"image": images}).items()}
    compiled = tf.function(lambda x: MASK_RCNN.infer(network, {"image": x}), jit_compile=True)(images)
    np.testing.assert_allclose(compiled["masks"], eager["masks"], atol=1e-4)
    raw = network({"image": images}, training=False)
    expected = tf.sigmoid(network.mask_logits(raw, tf.constant(eager["boxes"]))).numpy()
    assert eager["num_detections"].tolist() == [3, 3]
    np.testing.assert_allclose(eager["masks"], expected, atol=1e-6)
    assert ((0 < eager["masks"]) & (eager["masks"] < 1)).all()


def test_a_readings_masks_with_flip_tta_are_mirrored_back(box_pictures):
    """The identity mask network: its mask is its image, so a mirrored view gives the same mask once mirrored back."""
    model = exported.load(box_pictures["model_dir"])
    images = np.zeros((1, 64, 64, 1), np.float32)
    images[0, 8:24, 4:20] = 0.9  # off-centre: mirroring matters
    plain = reading_lib.Reading([reading_lib.Member(model)])
    flipped = reading_lib.Reading([reading_lib.Member(model, tta="hflip")])
    assert plain.gives_masks and flipped.gives_masks
    expected = np.zeros((128, 128), bool)
    expected[16:48, 8:40] = True
    for reading in (plain, flipped):
        outputs = reading.split(reading.outputs((tf.constant(images),), metadata.unknown(len(images))))
        [mask] = reading.masks(outputs, 0.5, [(128, 128)])
        np.testing.assert_array_equal(mask, expected)
