"""Evaluation: the threshold table on hand-worked cases, the threshold pick, reports, curves,
TensorBoard, and the cross-check against scoring predict's submission file."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import collect, report, submission, sweep, visualize
from pneumo_tf.inference import offline
from pneumo_tf.models import exported
from pneumo_tf.records.manifest import FORMAT_VERSION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def copy_model(model_dir, tmp_path) -> str:
    """A private copy: evaluation writes its threshold into the model folder."""
    return shutil.copytree(model_dir, tmp_path / "model")


def read_info(model_dir) -> dict:
    with open(os.path.join(model_dir, exported.INFO_FILE)) as handle:
        return json.load(handle)


# ---------------------------------------------------------------------------------------------
# The table and the pick, by hand.

BOX = np.array([[0.0, 0.0, 10.0, 10.0]])
NO_BOX = np.zeros((0, 4))


def hand_worked() -> collect.Collected:
    """Four images, probabilities 0.9 / 0.6 / 0.3 / 0.05 for targets 1 / 0 / 1 / 0, at thresholds 0.5 and 0.7.

    Detections: a exact (score 0.9) at both; b a false box (0.6) at 0.5 only; c and d nothing.
    """
    ground_truth = {"a": BOX, "b": NO_BOX, "c": BOX, "d": NO_BOX}
    found = {"a": (BOX, np.array([0.9])), "b": (BOX + 50, np.array([0.6]))}
    return collect.Collected(
        ids=list(ground_truth), probabilities=np.array([0.9, 0.6, 0.3, 0.05], np.float32),
        targets=np.array([1, 0, 1, 0]), classes=np.array([2, 1, 2, 0]), ground_truth=ground_truth,
        detections=[found, {"a": found["a"]}], unlabeled=0,
    )


def test_threshold_table_on_a_hand_worked_case():
    table = sweep.threshold_table(hand_worked(), [0.5, 0.7])
    assert list(table.columns) == list(sweep.TABLE_COLUMNS)
    # At 0.5: TP a, FP b, FN c, TN d. mAP: a 1, b 0 (a box, no truth), c 0, d left out.
    # At 0.7: TP a, FN c, TN b and d. mAP: a 1, c 0; b and d left out.
    # AUC: of the 4 positive-negative pairs, only (0.3, 0.6) is misordered.
    expected = pd.DataFrame({
        "threshold": [0.5, 0.7], "accuracy": [0.5, 0.75],
        "precision_positive": [0.5, 1.0], "recall_positive": [0.5, 0.5], "f1_positive": [0.5, 2 / 3],
        "precision_negative": [0.5, 2 / 3], "recall_negative": [0.5, 1.0], "f1_negative": [0.5, 0.8],
        "auc": [0.75, 0.75], "map": [1 / 3, 0.5],
    })
    pd.testing.assert_frame_equal(table, expected)


def test_confusion_matrices_by_target_and_by_class():
    by_target, by_class = sweep.confusion_matrices(hand_worked(), 0.5)
    assert by_target.to_numpy().tolist() == [[1, 1], [1, 1]]
    assert list(by_class.index) == ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    assert by_class.to_numpy().tolist() == [[1, 0], [0, 1], [1, 1]]


def sweep_table(maps, f1s) -> pd.DataFrame:
    thresholds = np.round(np.arange(1, len(maps) + 1) * 0.1, 1)
    return pd.DataFrame({"threshold": thresholds, "map": maps, "f1_positive": f1s})


@pytest.mark.parametrize("maps, f1s, has_boxes, row, column", [
    ([0.1, 0.3, 0.2], [0.9, 0.1, 0.5], True, 1, "map"),  # mAP decides over F1
    ([0.3, 0.3, 0.3], [0.2, 0.6, 0.6], True, 1, "map"),  # tie: better F1, then the lower threshold
    ([np.nan, 0.0, np.nan], [0.9, 0.1, 0.2], True, 1, "map"),  # NaN rows never win
    ([np.nan, np.nan, np.nan], [0.1, 0.7, 0.2], True, 1, "f1_positive"),  # mAP undefined everywhere
    ([0.0, 0.0, 0.0], [0.1, 0.2, 0.7], False, 2, "f1_positive"),  # a classifier: F1
])
def test_pick_threshold(maps, f1s, has_boxes, row, column):
    table = sweep_table(maps, f1s)
    picked_row, picked_column, reason = sweep.pick_threshold(table, has_boxes)
    assert (picked_row, picked_column) == (row, column)
    assert ("F1" in reason) == (column == "f1_positive")
    # The same threshold whatever the row order.
    reversed_row, _, _ = sweep.pick_threshold(table.iloc[::-1].reset_index(drop=True), has_boxes)
    assert reversed_row == len(maps) - 1 - row


# ---------------------------------------------------------------------------------------------
# A tiny trained model end to end.


def event_tags(log_dir) -> dict:
    """{tag: (plugin name, [values])} of the tensors in the event files of `log_dir`."""
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return {
        tag: (accumulator.SummaryMetadata(tag).plugin_data.plugin_name,
              [tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)])
        for tag in accumulator.Tags()[event_accumulator.TENSORS]
    }


def test_evaluate_trained_model(trained_model, tiny_records, tmp_path):
    model_dir = copy_model(trained_model, tmp_path)
    result = report.evaluate(report.EvaluateConfig(model_dir=str(model_dir), records_dir=tiny_records))
    summary = result.summary
    output = model_dir / "evaluation" / "val"
    assert summary["output_dir"] == str(output)

    table = pd.read_csv(output / "thresholds.csv")
    assert list(table.columns) == list(sweep.TABLE_COLUMNS)
    np.testing.assert_allclose(table["threshold"], np.arange(1, 20) / 20)  # 0.05, 0.10, ..., 0.95
    pd.testing.assert_frame_equal(table, result.table, check_exact=True)
    assert table["auc"].nunique() == 1
    markdown = (output / "thresholds.md").read_text().splitlines()
    assert len(markdown) == 2 + 19 and markdown[0].startswith("| threshold | accuracy |")

    # The pick: the largest mAP, ties to the better F1 and then the lower threshold.
    best = table["map"] == table["map"].max()
    expected = table[best].sort_values("f1_positive", ascending=False, kind="stable").iloc[0]
    info = read_info(model_dir)
    assert info["threshold"] == summary["threshold"] == expected["threshold"]
    assert info["threshold_metric"] == "map" and info["threshold_split"] == "val"
    assert info["val_map"] == expected["map"] and info["val_f1"] == expected["f1_positive"]
    assert info["model"] == "mask_resnet"  # the rest of the info is kept

    images = pd.read_csv(output / "images.csv")
    assert summary["images"] == len(images) == 5 and summary["positives"] == int((images["target"] == 1).sum())
    confusion = pd.read_csv(output / "confusion_matrix.csv", index_col=0)
    assert confusion.to_numpy().sum() == len(images)
    assert confusion.loc["target 1 (positive)"].sum() == summary["positives"]

    for name in ("pr_curve.png", "roc_curve.png"):
        with open(output / name, "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE
        with Image.open(output / name) as picture:
            picture.verify()
    tags = event_tags(model_dir / "logs" / "evaluation_val")
    plugin, [curve] = tags[f"{visualize.PR_CURVE_NAME}/pr_curves"]
    assert plugin == "pr_curves" and curve.shape == (6, visualize.PR_CURVE_THRESHOLDS)
    # At the lowest PR threshold every image is called positive: TP + FP is every image.
    assert curve[0, 0] + curve[1, 0] == len(images) and curve[0, 0] == summary["positives"]
    assert tags["evaluation/pr_curve"][0] == "images" and tags["evaluation/roc_curve"][0] == "images"
    assert "Chosen threshold" in result.report()


@pytest.mark.parametrize("split, message", [
    ("test", "no labeled images"),
    ("holdout", "no records in split 'holdout'"),
])
def test_unusable_split_is_refused(trained_model, tiny_records, tmp_path, split, message):
    with pytest.raises(UserError, match=message):
        report.evaluate(report.EvaluateConfig(
            model_dir=str(copy_model(trained_model, tmp_path)), records_dir=tiny_records, split=split
        ))


# ---------------------------------------------------------------------------------------------
# Evaluation's mAP against the challenge score of predict's submission file.


def test_best_threshold_is_the_argmax_of_map(box_pictures, tmp_path):
    model_dir = copy_model(box_pictures["model_dir"], tmp_path)
    result = report.evaluate(
        report.EvaluateConfig(model_dir=str(model_dir), records_dir=box_pictures["records"])
    )
    table = result.table
    maps = table["map"].to_numpy()
    assert 0.0 < maps.min() < maps.max() < 1.0  # a real choice
    # Ties on mAP go to the better positive-class F1, then to the lower threshold.
    tied = table[maps == maps.max()]
    expected = tied[tied[sweep.F1_COLUMN] == tied[sweep.F1_COLUMN].max()]["threshold"].min()
    info = read_info(model_dir)
    assert info["threshold"] == expected
    assert info["val_map"] == maps.max()


def submission_matches_evaluation(model_dir, records, labels_csv, thresholds, tmp_path):
    result = report.evaluate(report.EvaluateConfig(
        model_dir=str(model_dir), records_dir=records, thresholds=tuple(thresholds), save_threshold=False,
    ))
    evaluated_ids = set(pd.read_csv(os.path.join(result.summary["output_dir"], "images.csv"))["id"])
    for threshold, evaluated_map in zip(result.table["threshold"], result.table["map"]):
        output = str(tmp_path / f"val-{threshold}.csv")
        offline.predict(offline.PredictConfig(
            model_dir=str(model_dir), output=output, records_dir=records, split="val", threshold=threshold,
        ), progress_stream=io.StringIO())
        assert set(submission.read_submission(output)) == evaluated_ids
        scored = submission.score_submission(output, labels_csv)
        assert scored["patients"] == len(evaluated_ids)
        assert abs(scored["map"] - evaluated_map) <= 1e-9, threshold


def test_scored_submission_reproduces_evaluation_map(box_pictures, tmp_path):
    submission_matches_evaluation(
        copy_model(box_pictures["model_dir"], tmp_path), box_pictures["records"], box_pictures["labels_csv"],
        sweep.DEFAULT_THRESHOLDS, tmp_path,
    )


def test_scored_submission_reproduces_evaluation_map_of_trained_model(trained_model, tiny_records,
                                                                     synthetic_rsna, tmp_path):
    submission_matches_evaluation(
        copy_model(trained_model, tmp_path), tiny_records, synthetic_rsna["train_labels"], [0.3, 0.6], tmp_path
    )


# ---------------------------------------------------------------------------------------------
# The command line.


def run_evaluate(*args):
    return subprocess.run([sys.executable, "-m", "pneumo_tf.evaluate", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_scores_a_submission_file(box_pictures, tmp_path):
    output = str(tmp_path / "submission.csv")
    summary = offline.predict(offline.PredictConfig(
        model_dir=box_pictures["model_dir"], output=output, records_dir=box_pictures["records"], split="val",
        threshold=0.5,
    ), progress_stream=io.StringIO())
    expected = submission.score_submission(output, box_pictures["labels_csv"])
    result = run_evaluate(f"--submission={output}", f"--labels_csv={box_pictures['labels_csv']}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"challenge mAP {expected['map']} over {expected['scored_images']} scored images" in result.stdout
    assert f"({summary['images']} patients in both" in result.stdout


def test_cli_evaluates_without_saving_the_threshold(box_pictures, tmp_path):
    model_dir = copy_model(box_pictures["model_dir"], tmp_path)
    result = run_evaluate(f"--model_dir={model_dir}", f"--records_dir={box_pictures['records']}",
                          f"--output_dir={tmp_path / 'report'}", "--thresholds=0.5,0.2", "--nosave_threshold")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| threshold | accuracy |" in result.stdout and "Chosen threshold 0.2" in result.stdout
    assert len(pd.read_csv(tmp_path / "report" / "thresholds.csv")) == 2
    assert read_info(model_dir)["threshold"] == 0.5


@pytest.mark.parametrize("case, message", [
    ("missing model", "model folder not found"),
    ("foreign records", f"format version 999, but this pneumo_tf reads version {FORMAT_VERSION}"),
])
def test_cli_errors(case, message, trained_model, tiny_records, foreign_records, tmp_path):
    args = {
        "missing model": [f"--model_dir={tmp_path / 'nowhere'}", f"--records_dir={tiny_records}"],
        "foreign records": [f"--model_dir={trained_model}", f"--records_dir={foreign_records}"],
    }[case]
    result = run_evaluate(*args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
