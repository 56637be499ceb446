"""Model outputs -> probabilities and detections (the architectures' contract) and the challenge's
space (evaluation/collect.py), on hand-made outputs with exact answers."""
import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf import models
from pneumo_tf.evaluation import collect
from pneumo_tf.models.architecture import BoxDetector, detector_outputs

MASK_RESNET = models.get("mask_resnet")
CLASSIFIER = models.get("cnn")

SIZE = 32


def two_rectangle_mask() -> np.ndarray:
    """[1, 32, 32, 1]: rectangle A (rows 2-5, cols 3-10) at 0.625, rectangle B (rows 20-29, cols 16-23)
    half 0.5 and half 1.0 (mean 0.75), on a 0.25 background that the 0.4 threshold removes.

    All values are binary fractions, so the component means are exact in float32.
    """
    mask = np.full((SIZE, SIZE), 0.25, np.float32)
    mask[2:6, 3:11] = 0.625
    mask[20:30, 16:24] = 0.5
    mask[20:25, 16:24] = 1.0
    return mask[None, ..., None]


# (ymin, xmin, ymax, xmax) covering whole pixels, highest score (B) first.
EXPECTED_BOXES = np.array([[20, 16, 30, 24], [2, 3, 6, 11]], np.float32) / SIZE
EXPECTED_SCORES = np.array([0.75, 0.625], np.float32)


def test_mask_detections_are_the_two_rectangles():
    [(boxes, scores)] = MASK_RESNET.detections({"mask": two_rectangle_mask()}, threshold=0.4)
    np.testing.assert_array_equal(boxes, EXPECTED_BOXES)
    np.testing.assert_array_equal(scores, EXPECTED_SCORES)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32


def test_detections_accept_tensors_and_give_one_entry_per_image():
    masks = np.concatenate([two_rectangle_mask(), np.zeros((1, SIZE, SIZE, 1), np.float32)])
    (boxes, scores), (no_boxes, no_scores) = MASK_RESNET.detections({"mask": tf.constant(masks)}, 0.4)
    np.testing.assert_array_equal(boxes, EXPECTED_BOXES)
    np.testing.assert_array_equal(scores, EXPECTED_SCORES)
    assert no_boxes.shape == (0, 4) and no_scores.shape == (0,)


def test_mask_probability_is_the_mask_maximum():
    masks = np.concatenate([two_rectangle_mask(), np.zeros((1, SIZE, SIZE, 1), np.float32)])
    np.testing.assert_array_equal(MASK_RESNET.image_probability({"mask": masks}), [1.0, 0.0])


def test_target_output_is_the_probability_when_present():
    outputs = {"mask": two_rectangle_mask(), "target": np.array([[0.125]], np.float32)}
    np.testing.assert_array_equal(MASK_RESNET.image_probability(outputs), [0.125])


def test_classifier_gives_probabilities_and_no_boxes():
    outputs = {"target": np.array([[0.25], [0.875]], np.float32)}
    probabilities = CLASSIFIER.image_probability(outputs)
    np.testing.assert_array_equal(probabilities, [0.25, 0.875])
    assert probabilities.shape == (2,)
    per_image = CLASSIFIER.detections(outputs, threshold=0.5)
    assert len(per_image) == 2
    for boxes, scores in per_image:
        assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_box_detector_outputs_keep_valid_rows_above_the_threshold_highest_first():
    outputs = detector_outputs(
        boxes=[[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.2], [0.0, 0.0, 0.1, 0.1]],
               [[0.2, 0.2, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]],
        scores=[[0.625, 0.875, 0.25], [0.375, -1.0, -1.0]],
        num_detections=[3, 1],
    )
    outputs = {key: value.numpy() for key, value in outputs.items()}
    (boxes, scores), (other_boxes, other_scores) = BoxDetector().detections(outputs, threshold=0.3)
    # Sorted by score, clipped to the image, the 0.25 box dropped; padding rows never read.
    np.testing.assert_array_equal(boxes, np.array([[0.5, 0.5, 0.9, 1.0], [0.1, 0.2, 0.3, 0.4]], np.float32))
    np.testing.assert_array_equal(scores, np.array([0.875, 0.625], np.float32))
    np.testing.assert_array_equal(other_boxes, np.array([[0.2, 0.2, 0.4, 0.4]], np.float32))
    np.testing.assert_array_equal(other_scores, np.array([0.375], np.float32))
    # The image probability is the best score; an image without detections has 0.
    outputs["num_detections"] = np.array([3, 0], np.int32)
    np.testing.assert_array_equal(BoxDetector().image_probability(outputs), np.array([0.875, 0.0], np.float32))
    assert BoxDetector().detections(outputs, threshold=0.9)[0][0].shape == (0, 4)


def test_to_challenge_gives_source_pixel_xywh_exactly():
    boxes, scores = collect.to_challenge((EXPECTED_BOXES, EXPECTED_SCORES), 1024, 1024)
    np.testing.assert_array_equal(boxes, [[512, 640, 256, 320], [96, 64, 256, 128]])
    np.testing.assert_array_equal(scores, [0.75, 0.625])
    assert boxes.dtype == np.float64 and scores.dtype == np.float64


def test_to_challenge_scales_height_and_width_separately():
    boxes, _ = collect.to_challenge(([[0.25, 0.5, 0.75, 1.0]], [0.5]), source_height=512, source_width=1024)
    np.testing.assert_array_equal(boxes, [[512, 128, 512, 256]])


def test_to_challenge_of_no_boxes_is_empty():
    boxes, scores = collect.to_challenge((np.zeros((0, 4), np.float32), np.zeros(0, np.float32)), 1024, 1024)
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_to_challenge_needs_one_score_per_box():
    with pytest.raises(ValueError, match="one score per box"):
        collect.to_challenge((EXPECTED_BOXES, [0.5]), 1024, 1024)
