"""The Kaggle submission format, and scoring submissions against the real and a handmade labels CSV."""
import os
from pathlib import Path

import numpy as np
import pytest

from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import submission
from pneumo_tf.records.labels import read_labels

RSNA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna"
LABELS_CSV = RSNA_DIR / "stage_2_train_labels.csv"
SAMPLE_SUBMISSION_CSV = RSNA_DIR / "stage_2_sample_submission.csv"


def require_rsna_files():
    if not LABELS_CSV.is_file() or not SAMPLE_SUBMISSION_CSV.is_file():
        pytest.skip(f"real RSNA CSVs not found in {RSNA_DIR} (the shared data folder sits beside the repo)")


def test_format_rounds_and_puts_the_highest_confidence_first():
    text = submission.format_prediction_string([[10.04, 20.06, 300, 400.5], [1, 2, 3, 4]], [0.12344, 0.98766])
    assert text == "0.9877 1.0 2.0 3.0 4.0 0.1234 10.0 20.1 300.0 400.5"
    assert submission.format_prediction_string([], []) == ""
    assert submission.format_prediction_string(np.zeros((0, 4)), np.zeros(0)) == ""


def test_format_parse_round_trip():
    rng = np.random.default_rng(0)
    boxes = np.round(rng.uniform(0, 1024, size=(4, 4)), 1)
    scores = np.round(rng.uniform(0, 1, size=4), 4)
    order = np.argsort(-scores, kind="stable")
    parsed_boxes, parsed_scores = submission.parse_prediction_string(submission.format_prediction_string(boxes, scores))
    np.testing.assert_allclose(parsed_boxes, boxes[order], rtol=0, atol=1e-9)
    np.testing.assert_allclose(parsed_scores, scores[order], rtol=0, atol=1e-12)
    empty_boxes, empty_scores = submission.parse_prediction_string("  ")
    assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.5 0 0 100", "not a multiple of 5"),
        ("0.5 0 0 100 100 0.4", "not a multiple of 5"),
        ("0.5 zero 0 100 100", "non-number"),
        ("0.5 nan 0 100 100", "non-finite"),
        ("0.5 0 0 -100 100", "negative width or height"),
    ],
)
def test_malformed_prediction_strings_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        submission.parse_prediction_string(text)


def test_write_then_read(tmp_path):
    path = tmp_path / "submission.csv"
    submission.write_submission(str(path), [("a", [[1, 2, 3, 4]], [0.5]), ("b", [], [])])
    assert path.read_text() == "patientId,PredictionString\na,0.5000 1.0 2.0 3.0 4.0\nb,\n"
    assert os.listdir(tmp_path) == ["submission.csv"]
    read = submission.read_submission(str(path))
    assert list(read) == ["a", "b"]
    assert read["a"][0].tolist() == [[1, 2, 3, 4]] and read["a"][1].tolist() == [0.5]
    assert read["b"][0].shape == (0, 4)


def test_write_with_a_repeated_id_leaves_nothing_behind(tmp_path):
    path = tmp_path / "submission.csv"
    with pytest.raises(ValueError, match="given twice"):
        submission.write_submission(str(path), [("a", [], []), ("a", [], [])])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content, message",
    [
        ("patientId,Prediction\na,\n", "must start with the header"),
        ("", "must start with the header"),
        ("patientId,PredictionString\na,\na,0.5 0 0 1 1\n", "line 3: patientId a appears a second time"),
        ("patientId,PredictionString\na,0.5 0 0 1\n", r"line 2 \(a\): PredictionString has 4 numbers"),
        ("patientId,PredictionString\na,,extra\n", "expected 2 fields"),
    ],
)
def test_bad_submission_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "submission.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        submission.read_submission(str(path))


def test_missing_submission_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        submission.read_submission(str(tmp_path / "absent.csv"))


def test_real_sample_submission_parses():
    require_rsna_files()
    sample = submission.read_submission(str(SAMPLE_SUBMISSION_CSV))
    assert len(sample) == 3000
    for boxes, scores in sample.values():
        assert boxes.tolist() == [[0, 0, 100, 100]] and scores.tolist() == [0.5]


@pytest.fixture(scope="module")
def label_rows():
    """(patientId, boxes, confidences of 1) for every patient of the real labels CSV."""
    require_rsna_files()
    labels = read_labels(str(LABELS_CSV))
    return [(pid, list(entry.boxes), [1.0] * len(entry.boxes)) for pid, entry in labels.items()]


def test_labels_scored_against_themselves_score_exactly_one(tmp_path, label_rows):
    path = tmp_path / "perfect.csv"
    submission.write_submission(str(path), label_rows)
    scored = submission.score_submission(str(path), str(LABELS_CSV))
    # The 20,672 negatives without predictions are left out of the mean.
    assert scored == {"map": 1.0, "patients": 26684, "scored_images": 6012, "submission_patients": 26684,
                      "labeled_patients": 26684}


def test_one_spurious_box_on_a_negative_costs_exactly_one_scored_image(tmp_path, label_rows):
    rows = list(label_rows)
    negative = next(i for i, (_, boxes, _) in enumerate(rows) if not boxes)
    rows[negative] = (rows[negative][0], [[100, 100, 50, 50]], [0.1])
    path = tmp_path / "spurious.csv"
    submission.write_submission(str(path), rows)
    # The negative goes from left out to a score of 0.
    assert submission.score_submission(str(path), str(LABELS_CSV))["map"] == 6012 / 6013


HANDMADE_LABELS = """patientId,x,y,width,height,Target
p1,100.0,100.0,200.0,200.0,1
p1,500.0,500.0,100.0,100.0,1
p2,,,,,0
p3,0.0,0.0,100.0,100.0,1
p4,,,,,0
p5,,,,,0
p6,600.0,600.0,100.0,100.0,1
"""


def test_handmade_submission_score(tmp_path):
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(HANDMADE_LABELS)
    submission_csv = tmp_path / "submission.csv"
    submission_csv.write_text(
        "patientId,PredictionString\n"
        "p1,0.9 100 100 200 200\n"  # one of two boxes found: TP 1, FN 1 -> 1/2 at every threshold
        "p2,0.3 0 0 50 50\n"  # a negative with a prediction: 0
        "p3,0.8 0 0 100 50\n"  # IoU exactly 0.5: hits at 0.40 and 0.45 only -> 2/8
        "p4,\n"  # a negative without predictions: left out
        "test1,0.5 0 0 100 100\n"  # not in the labels: ignored
    )
    # p5 and p6 are labeled but not in the submission: ignored, so p6's box is no false negative.
    scored = submission.score_submission(str(submission_csv), str(labels_csv))
    assert scored == {"map": (0.5 + 0 + 0.25) / 3, "patients": 4, "scored_images": 3, "submission_patients": 5,
                      "labeled_patients": 6}


def test_submission_sharing_no_patient_with_the_labels_is_a_user_error(tmp_path):
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(HANDMADE_LABELS)
    submission_csv = tmp_path / "submission.csv"
    submission_csv.write_text("patientId,PredictionString\ntest1,0.5 0 0 100 100\n")
    with pytest.raises(UserError, match="nothing to score"):
        submission.score_submission(str(submission_csv), str(labels_csv))
