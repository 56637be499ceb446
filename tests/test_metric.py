"""The challenge metric on hand-worked cases (the rule pneumo_tf/evaluation/metric.py's docstring states), plus
cross-checks against plain loops."""
from fractions import Fraction

import numpy as np
import pytest

from pneumo_tf.evaluation import metric

GT = [0, 0, 100, 100]


def fraction_iou(a, b):
    """Exact IoU of two (x, y, w, h) boxes with integer coordinates."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    return Fraction(iw * ih, aw * ah + bw * bh - iw * ih)


def test_thresholds_are_the_eight_challenge_values():
    assert metric.IOU_THRESHOLDS.tolist() == [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]


def test_image_without_ground_truth_or_predictions_is_left_out():
    assert metric.image_precisions([], [], []) is None
    assert metric.image_score(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4))) is None


def test_image_without_ground_truth_scores_zero_with_any_prediction():
    precisions = metric.image_precisions([GT, [300, 300, 50, 50]], [0.9, 0.1], [])
    assert precisions.tolist() == [0.0] * 8
    assert metric.image_score([GT], [0.01], []) == 0.0


def test_image_with_ground_truth_and_no_predictions_scores_zero():
    assert metric.image_precisions([], [], [GT]).tolist() == [0.0] * 8
    assert metric.image_score([], [], [GT, [300, 300, 50, 50]]) == 0.0


def test_perfect_match_scores_one():
    assert metric.image_precisions([GT], [0.3], [GT]).tolist() == [1.0] * 8
    assert metric.image_score([[500, 10, 40, 60], GT], [0.5, 0.9], [GT, [500, 10, 40, 60]]) == 1.0


def test_iou_of_exactly_one_half_hits_only_below_one_half():
    half = [0, 0, 100, 50]
    assert fraction_iou(half, GT) == Fraction(1, 2)
    assert metric.iou_matrix([half], [GT])[0, 0] == 0.5
    # A hit needs IoU > t: 0.5 passes 0.40 and 0.45 only.
    assert metric.image_precisions([half], [1.0], [GT]).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert metric.image_score([half], [1.0], [GT]) == 2 / 8


def test_false_positives_and_false_negatives_are_counted():
    ground_truth = [GT, [200, 200, 100, 100], [500, 500, 100, 100]]
    exact = GT
    partial = [200, 200, 100, 60]  # IoU 0.6 with the second box
    stray = [800, 800, 50, 50]  # overlaps nothing
    assert fraction_iou(partial, ground_truth[1]) == Fraction(3, 5)
    precisions = metric.image_precisions([stray, partial, exact], [0.7, 0.8, 0.9], ground_truth)
    # t < 0.6: TP 2 (exact, partial), FP 1 (stray), FN 1 (third box) -> 2/4.
    # t >= 0.6: TP 1, FP 2 (partial now misses), FN 2 -> 1/5.
    assert precisions.tolist() == [0.5] * 4 + [0.2] * 4
    assert metric.image_score([stray, partial, exact], [0.7, 0.8, 0.9], ground_truth) == pytest.approx(0.35, abs=1e-15)


# Two stacked ground-truth boxes; `straddling` overlaps both and prefers the upper one.
UPPER, LOWER = GT, [0, 100, 100, 100]
STRADDLING = [0, 5, 100, 185]


def test_straddling_box_ious():
    assert fraction_iou(STRADDLING, UPPER) == Fraction(1, 2)
    assert fraction_iou(STRADDLING, LOWER) == Fraction(6, 13)  # 0.4615: passes 0.40 and 0.45 only


def test_higher_confidence_prediction_claims_the_box_first():
    # Exact box first: it takes UPPER; STRADDLING falls back to LOWER, a hit at t = 0.40, 0.45
    # (precision 2/2), a miss beyond (TP 1, FP 1, FN 1 -> 1/3).
    exact_first = metric.image_precisions([UPPER, STRADDLING], [0.9, 0.8], [UPPER, LOWER])
    np.testing.assert_array_equal(exact_first, [1, 1] + [1 / 3] * 6)
    assert metric.image_score([UPPER, STRADDLING], [0.9, 0.8], [UPPER, LOWER]) == pytest.approx(0.5, abs=1e-15)
    # Flipped confidences: STRADDLING takes UPPER at t = 0.40, 0.45, leaving the exact box only LOWER
    # (IoU 0): TP 1, FP 1, FN 1. Beyond, STRADDLING misses, the exact box takes UPPER: again 1/3.
    straddling_first = metric.image_precisions([UPPER, STRADDLING], [0.8, 0.9], [UPPER, LOWER])
    np.testing.assert_array_equal(straddling_first, [1 / 3] * 8)


def test_equal_confidences_match_in_input_order():
    exact_listed_first = metric.image_score([UPPER, STRADDLING], [0.5, 0.5], [UPPER, LOWER])
    straddling_listed_first = metric.image_score([STRADDLING, UPPER], [0.5, 0.5], [UPPER, LOWER])
    assert exact_listed_first == pytest.approx(0.5, abs=1e-15)
    assert straddling_listed_first == pytest.approx(1 / 3, abs=1e-15)


def test_dataset_mean_leaves_out_images_without_boxes():
    ground_truth = {
        "perfect": [GT],
        "half": [GT],
        "missed": [GT],  # absent from predictions: counts as no predictions, scores 0
        "empty": [],  # no ground truth and no predictions: left out
        "false_alarm": [],
    }
    predictions = {
        "perfect": ([GT], [0.9]),
        "half": ([[0, 0, 100, 50]], [0.9]),
        "empty": ([], []),
        "false_alarm": ([GT], [0.2]),
    }
    # (1 + 0.25 + 0 + 0) / 4 scored images.
    assert metric.challenge_map(predictions, ground_truth) == 1.25 / 4


def test_dataset_with_every_image_left_out_scores_nan():
    assert np.isnan(metric.challenge_map({"a": ([], [])}, {"a": [], "b": []}))


def test_predictions_for_unknown_images_are_rejected():
    with pytest.raises(ValueError, match="no ground truth"):
        metric.challenge_map({"stranger": ([GT], [1.0])}, {"a": [GT]})


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        metric.iou_matrix([1, 2, 3, 4], [GT])
    with pytest.raises(ValueError, match="one confidence per"):
        metric.image_score([GT], [0.5, 0.4], [GT])


def test_iou_matrix_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    # Whole pixels on a small canvas give many overlaps, shared edges and identical boxes.
    a = rng.integers(0, 60, size=(23, 4)) + [0, 0, 1, 1]
    b = np.concatenate([rng.integers(0, 60, size=(16, 4)) + [0, 0, 1, 1], a[:3]])
    expected = [[float(fraction_iou(p, q)) for q in b.tolist()] for p in a.tolist()]
    np.testing.assert_allclose(metric.iou_matrix(a, b), expected, rtol=1e-12, atol=0)
    assert metric.iou_matrix(a, []).shape == (23, 0)
    assert metric.iou_matrix(np.zeros((0, 4)), b).shape == (0, 19)
    assert metric.iou_matrix([[5, 5, 0, 0]], [[5, 5, 0, 0]]).tolist() == [[0.0]]


def reference_precisions(pred_boxes, scores, gt_boxes):
    """The rule of metric.py's docstring as plain loops, one threshold at a time."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    precisions = []
    for t in metric.IOU_THRESHOLDS:
        free = set(range(len(gt_boxes)))
        tp = 0
        for i in order:
            ious = {j: float(fraction_iou(pred_boxes[i], gt_boxes[j])) for j in free}
            best = max(sorted(ious), key=ious.get, default=None)
            if best is not None and ious[best] > t:
                free.remove(best)
                tp += 1
        precisions.append(tp / (len(pred_boxes) + len(gt_boxes) - tp))
    return precisions


def random_image(rng, max_boxes=5):
    """Clustered whole-pixel boxes, so IoUs cross the thresholds often."""
    def boxes(n):
        return (rng.integers(0, 30, size=(n, 2)).tolist(), rng.integers(20, 60, size=(n, 2)).tolist())
    gt_xy, gt_wh = boxes(rng.integers(0, max_boxes))
    n = int(rng.integers(0, max_boxes))
    pred_xy, pred_wh = boxes(n)
    scores = np.round(rng.random(n), 1).tolist()  # coarse: ties happen
    return [a + b for a, b in zip(pred_xy, pred_wh)], scores, [a + b for a, b in zip(gt_xy, gt_wh)]


def test_vectorised_matching_matches_the_plain_loop():
    rng = np.random.default_rng(1)
    for _ in range(300):
        pred, scores, gt = random_image(rng)
        got = metric.image_precisions(pred, scores, gt)
        if not pred and not gt:
            assert got is None
        else:
            np.testing.assert_allclose(got, reference_precisions(pred, scores, gt), rtol=1e-15)
