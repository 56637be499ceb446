"""Reading the challenge's label CSVs (boxes per patient, the three-way class) and a metadata CSV (the
header facts of PNG/JPEG files, which carry none)."""
from __future__ import annotations

import dataclasses

import numpy as np

from pneumo_tf import fileio
from pneumo_tf.errors import UserError
from pneumo_tf.records import schema

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
METADATA_COLUMNS = ("patientId", "PatientAge", "PatientSex", "ViewPosition")
SEXES = ("M", "F", "O", "")


@dataclasses.dataclass(frozen=True)
class PatientLabels:
    target: int
    label_class: int  # index into schema.CLASS_NAMES, or schema.UNLABELED when unknown
    boxes: tuple[tuple[float, float, float, float], ...]  # (x, y, width, height) in source pixels


@dataclasses.dataclass(frozen=True)
class PatientFacts:
    """What a header says about a radiograph's patient and view, as a metadata CSV gives it for files
    without a header; -1 and "" are unknown (pneumo_tf.data.metadata has their encoding)."""

    age: int = -1  # whole years
    sex: str = ""  # M / F / O
    view: str = ""  # ViewPosition: AP / PA / ...


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


def read_metadata(metadata_csv: str) -> dict[str, PatientFacts]:
    """Facts per patientId from a CSV with columns patientId,PatientAge,PatientSex,ViewPosition (as
    ../shared/data/rsna/jpg_metadata.csv); empty cells are unknown. Ages are whole years (a DICOM Age
    String such as 051Y is read too)."""
    frame = _read_csv(metadata_csv, METADATA_COLUMNS, "metadata CSV")
    from pneumo_tf.records.dicom import age_in_years

    facts = {}
    for row, (pid, age, sex, view) in enumerate(frame[list(METADATA_COLUMNS)].itertuples(index=False), start=2):
        age = "" if age != age else str(age).removesuffix(".0")  # NaN: empty
        sex = "" if sex != sex else str(sex).strip().upper()
        years = age_in_years(age)
        if (age.strip() and years < 0) or sex not in SEXES:
            raise UserError(f"metadata CSV {metadata_csv}: row {row} ({pid}) has PatientAge {age!r} / PatientSex "
                            f"{sex!r}: expected whole years and one of M, F, O or empty")
        if pid in facts:
            raise UserError(f"metadata CSV {metadata_csv}: patientId {pid} appears twice")
        facts[pid] = PatientFacts(years, sex, "" if view != view else str(view).strip().upper())
    return facts
