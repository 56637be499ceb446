"""The Kaggle submission format: writing, reading and scoring `patientId,PredictionString` CSVs.

A PredictionString is `confidence x y width height` per box, space separated,
boxes concatenated, in source pixel space (1024 for RSNA); empty for no boxes.
Written values are rounded to 4 decimals for the confidence and 1 decimal for
coordinates: sub-pixel precision is kept (a coordinate moves by at most
0.05 px), files stay small, and whole-pixel boxes (the labels') survive exactly.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterable

import numpy as np

from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import metric
from pneumo_tf.fileio import atomic_open
from pneumo_tf.records.labels import read_labels

HEADER = ("patientId", "PredictionString")
CONFIDENCE_DECIMALS = 4
COORDINATE_DECIMALS = 1


def format_prediction_string(boxes_xywh, scores) -> str:
    """`confidence x y width height ...` for boxes [N, 4] in pixels, highest confidence first.

    Writing in descending confidence (ties in input order) means that a reader's
    stable sort of the rounded confidences, where rounding may create ties,
    still matches boxes in the original order.
    """
    boxes = metric.as_xywh_array(boxes_xywh)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(boxes),):
        raise ValueError(f"need one confidence per box: {len(boxes)} boxes, scores of shape {scores.shape}")
    order = np.argsort(-scores, kind="stable")
    c, d = CONFIDENCE_DECIMALS, COORDINATE_DECIMALS
    return " ".join(
        f"{score:.{c}f} {x:.{d}f} {y:.{d}f} {w:.{d}f} {h:.{d}f}"
        for score, (x, y, w, h) in zip(scores[order], boxes[order])
    )


def parse_prediction_string(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [N, 4] as (x, y, w, h), confidences [N]) from a PredictionString, in written order."""
    tokens = text.split()
    if len(tokens) % 5:
        raise UserError(
            f"PredictionString has {len(tokens)} numbers, not a multiple of 5 "
            f"(confidence x y width height per box): {text[:100]!r}"
        )
    try:
        values = np.array([float(token) for token in tokens], dtype=np.float64).reshape(-1, 5)
    except ValueError as error:
        raise UserError(f"PredictionString holds a non-number ({error}): {text[:100]!r}") from error
    if not np.isfinite(values).all():
        raise UserError(f"PredictionString holds a non-finite number: {text[:100]!r}")
    if (values[:, 3:] < 0).any():
        raise UserError(f"PredictionString has a box of negative width or height: {text[:100]!r}")
    return values[:, 1:], values[:, 0]


def write_submission(path: str, rows: Iterable[tuple[str, object, object]]) -> None:
    """Writes (patient_id, boxes [N, 4] xywh pixels, scores [N]) rows as a submission CSV.

    The file is written under a temporary name and renamed, so it exists whole or
    not at all; a repeated patient id is a ValueError and leaves nothing behind.
    """
    written: set[str] = set()
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        for patient_id, boxes, scores in rows:
            if patient_id in written:
                raise ValueError(f"patientId {patient_id} given twice: a submission has one row per patient")
            written.add(patient_id)
            writer.writerow((patient_id, format_prediction_string(boxes, scores)))


def read_submission(path: str) -> dict[str, metric.Prediction]:
    """{patientId: (boxes [N, 4], confidences [N])} from a submission CSV, with a UserError for a bad file."""
    if not os.path.isfile(path):
        raise UserError(f"submission CSV not found: {path}")
    submission: dict[str, metric.Prediction] = {}
    # utf-8-sig: spreadsheet programs prepend a byte-order mark that would otherwise spoil the header.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != HEADER:
            raise UserError(f"submission CSV {path} must start with the header {','.join(HEADER)}, found {header}")
        for row in reader:
            if not row:
                continue
            where = f"submission CSV {path} line {reader.line_num}"
            if len(row) != 2:
                raise UserError(f"{where}: expected 2 fields (patientId,PredictionString), found {len(row)}")
            patient_id, prediction = row
            if patient_id in submission:
                raise UserError(f"{where}: patientId {patient_id} appears a second time")
            try:
                submission[patient_id] = parse_prediction_string(prediction)
            except UserError as error:
                raise UserError(f"{where} ({patient_id}): {error}") from error
    return submission


def score_submission(submission_csv: str, labels_csv: str) -> dict:
    """The challenge score ("map") of a submission over the patients it shares with a labels CSV,
    with what it scored: "patients" in both files and "scored_images" (those with a box or a
    prediction).

    Labeled patients missing from the submission are ignored (not counted as empty
    predictions), and so are submission patients without labels (e.g. test patients): this
    scores a submission for any subset, such as a validation split. "map" is NaN when no
    shared patient has a box or a prediction.
    """
    labels = read_labels(labels_csv)
    submission = read_submission(submission_csv)
    shared = [patient_id for patient_id in submission if patient_id in labels]
    if not shared:
        raise UserError(f"no patientId of {submission_csv} is in {labels_csv}: nothing to score")
    predictions = {patient_id: submission[patient_id] for patient_id in shared}
    ground_truth = {patient_id: metric.as_xywh_array(labels[patient_id].boxes) for patient_id in shared}
    scored_images = sum(1 for p in shared if len(ground_truth[p]) or len(predictions[p][1]))
    return {"map": metric.challenge_map(predictions, ground_truth), "patients": len(shared),
            "scored_images": scored_images, "submission_patients": len(submission), "labeled_patients": len(labels)}
