"""The threshold sweep: one row of image-level and challenge numbers per threshold, and the choice.

`threshold_table` scores what one pass over a split kept (evaluation/collect.Collected) at
every threshold of the sweep: accuracy; precision, recall and F1 of the positive and the
negative class; AUC (threshold-free); challenge mAP. `pick_threshold` chooses the threshold
(the mAP decides), `confusion_matrices` counts the decisions there, and `reading_rows`
compares the parts of a fused reading, each at its own best threshold.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn import metrics as sk_metrics

from pneumo_tf.evaluation import metric
from pneumo_tf.evaluation.collect import Collected
from pneumo_tf.records import schema

# 0.05 to 0.95: on real radiographs the best threshold of a model is often above 0.9 (the mask network's
# at 0.95 in 2 of 3 folds, benchmarks/README.md), where a 0.1 grid stops.
DEFAULT_THRESHOLDS = tuple(round(0.05 * step, 2) for step in range(1, 20))
TABLE_COLUMNS = (
    "threshold", "accuracy", "precision_positive", "recall_positive", "f1_positive",
    "precision_negative", "recall_negative", "f1_negative", "auc", "map",
)
MAP_COLUMN = "map"
READINGS_COLUMNS = ("reading", "weight", "threshold", "map", "auc")
F1_COLUMN = "f1_positive"
PREDICTED_COLUMNS = ("predicted negative", "predicted positive")


def both_classes(targets) -> bool:
    return len(np.unique(targets)) == 2


def threshold_table(collected: Collected, thresholds) -> pd.DataFrame:
    """One row per threshold with the columns of TABLE_COLUMNS (see the module docstring)."""
    targets = collected.targets
    # AUC is undefined with one class only; NaN says so rather than a misleading number.
    auc = sk_metrics.roc_auc_score(targets, collected.probabilities) if both_classes(targets) else math.nan
    rows = []
    for threshold, detections in zip(thresholds, collected.detections):
        predicted = (collected.probabilities > threshold).astype(np.int64)
        precision, recall, f1, _ = sk_metrics.precision_recall_fscore_support(
            targets, predicted, labels=[1, 0], zero_division=0
        )
        rows.append({
            "threshold": float(threshold),
            "accuracy": float(np.mean(predicted == targets)),
            "precision_positive": precision[0], "recall_positive": recall[0], "f1_positive": f1[0],
            "precision_negative": precision[1], "recall_negative": recall[1], "f1_negative": f1[1],
            "auc": auc,
            MAP_COLUMN: metric.challenge_map(detections, collected.ground_truth),
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def pick_threshold(table: pd.DataFrame, has_boxes: bool) -> tuple[int, str, str]:
    """(row index, column maximised, reason in words) of the threshold to use.

    The mAP decides; NaN rows (nothing to score at that threshold) never win. Ties,
    common since mAP moves in steps, go to the better positive-class F1 and then to
    the lower threshold, which favours recall as screening does. Models without
    boxes, or a split where mAP is NaN at every threshold, maximise F1 instead.
    """
    if not has_boxes:
        column, reason = F1_COLUMN, "the model gives no boxes, so the positive-class F1 is maximised instead of mAP"
    elif table[MAP_COLUMN].isna().all():
        column, reason = F1_COLUMN, "mAP is undefined at every threshold, so the positive-class F1 is maximised"
    else:
        column, reason = MAP_COLUMN, "maximises the challenge mAP"
    score = table[column].to_numpy(dtype=np.float64)
    best = np.flatnonzero(score == np.nanmax(score))
    # lexsort's last key sorts first: highest F1, then lowest threshold.
    order = np.lexsort((table["threshold"].to_numpy()[best], -table[F1_COLUMN].to_numpy()[best]))
    return int(best[order[0]]), column, reason


def confusion_matrices(collected: Collected, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts of predicted negative/positive at `threshold`, with rows by target and by three-way class."""
    predicted = (collected.probabilities > threshold).astype(np.int64)
    by_target = pd.DataFrame(
        sk_metrics.confusion_matrix(collected.targets, predicted, labels=[0, 1]),
        index=pd.Index(["target 0 (negative)", "target 1 (positive)"], name="actual"),
        columns=list(PREDICTED_COLUMNS),
    )
    names = [*schema.CLASS_NAMES, "unknown class"]
    present = [c for c in (0, 1, 2, schema.UNLABELED) if (collected.classes == c).any()]
    by_class = pd.DataFrame(
        [[int(np.sum((collected.classes == c) & (predicted == p))) for p in (0, 1)] for c in present],
        index=pd.Index([names[c] for c in present], name="class"),
        columns=list(PREDICTED_COLUMNS),
    )
    return by_target, by_class


def reading_rows(labels: list[tuple[str, float]], collected: list[Collected], thresholds,
                 has_boxes: bool) -> pd.DataFrame:
    """One row per (label, weight) of a reading's parts and the whole: its best threshold of the sweep and the
    mAP and AUC there."""
    rows = []
    for (label, weight), found in zip(labels, collected):
        table = threshold_table(found, thresholds)
        row = table.iloc[pick_threshold(table, has_boxes)[0]]
        rows.append({"reading": label, "weight": weight, "threshold": row["threshold"], "map": row[MAP_COLUMN],
                     "auc": row["auc"]})
    return pd.DataFrame(rows, columns=list(READINGS_COLUMNS))
