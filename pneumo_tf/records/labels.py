"""Reading the challenge's label CSVs: boxes per patient and the three-way class."""
from __future__ import annotations

import dataclasses

import numpy as np

from pneumo_tf import fileio
from pneumo_tf.errors import UserError
from pneumo_tf.records import schema

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")


@dataclasses.dataclass(frozen=True)
class PatientLabels:
    target: int
    label_class: int  # index into schema.CLASS_NAMES, or schema.UNLABELED when unknown
    boxes: tuple[tuple[float, float, float, float], ...]  # (x, y, width, height) in source pixels


def _read_csv(path: str, columns: tuple[str, ...], what: str):
    # Imported here: converter workers import this module for PatientLabels, never read CSVs,
    # and pandas would add ~0.4 s to each worker's start.
    import pandas as pd

    if not fileio.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with fileio.open_file(path, "rb") as handle:
            frame = pd.read_csv(handle, dtype={"patientId": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not a readable CSV: {error}") from error
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(
            f"{what} {path} lacks column(s) {', '.join(missing)}: expected {','.join(columns)}, "
            f"found {','.join(map(str, frame.columns))}"
        )
    return frame


def read_labels(labels_csv: str, class_info_csv: str | None = None) -> dict[str, PatientLabels]:
    """Labels per patientId from `stage_2_train_labels.csv` (+ `stage_2_detailed_class_info.csv`).

    Without the class CSV, positives get class "Lung Opacity" and negatives an unknown class.
    """
    labels = _read_csv(labels_csv, LABEL_COLUMNS, "labels CSV")
    import pandas as pd

    coordinates = labels[["x", "y", "width", "height"]]
    numeric = coordinates.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & coordinates.notna()
    if bad.any(axis=None):
        row = int(bad.any(axis=1).to_numpy().argmax())
        raise UserError(f"labels CSV {labels_csv}: row {row + 2} has a coordinate that is not a number")
    coords = numeric.to_numpy(dtype=np.float64)
    targets = labels["Target"].to_numpy()
    if not np.isin(targets, (0, 1)).all():
        raise UserError(f"labels CSV {labels_csv}: Target must be 0 or 1")
    has_box = ~np.isnan(coords).any(axis=1)
    if (has_box & (targets == 0)).any() or (~has_box & (targets == 1)).any():
        raise UserError(f"labels CSV {labels_csv}: rows with Target 1 need a box, rows with 0 none")

    classes: dict[str, int] = {}
    if class_info_csv is not None:
        info = _read_csv(class_info_csv, CLASS_COLUMNS, "class info CSV")
        index = {name: i for i, name in enumerate(schema.CLASS_NAMES)}
        unknown = sorted(set(info["class"]) - set(index))
        if unknown:
            raise UserError(f"class info CSV {class_info_csv}: unknown class(es) {unknown}")
        classes = dict(zip(info["patientId"], info["class"].map(index)))

    boxes: dict[str, list] = {}
    target_of: dict[str, int] = {}
    for pid, target, box, ok in zip(labels["patientId"], targets, coords, has_box):
        target_of[pid] = max(target_of.get(pid, 0), int(target))
        entry = boxes.setdefault(pid, [])
        if ok:
            entry.append(tuple(float(v) for v in box))

    result = {}
    for pid, target in target_of.items():
        default = schema.LUNG_OPACITY if target else schema.UNLABELED
        result[pid] = PatientLabels(target, int(classes.get(pid, default)), tuple(boxes[pid]))
    return result
