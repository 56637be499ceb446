"""Evaluation: a model (or an ensemble) over one labeled split -> threshold table, curves, and its threshold.

`evaluate(config)` is python -m pneumo_tf.evaluate: it runs the pass (evaluation/collect.py),
the sweep and the choice of threshold (evaluation/sweep.py), draws the curves and writes
TensorBoard (evaluation/visualize.py), and writes the files below and the threshold (here).

One confidence threshold t makes both of a model's decisions, as everywhere in
pneumo_tf: an image is called positive when its image probability is above t (as
a mask pixel is foreground when its probability is above t), and its boxes are its
detections at t (pneumo_tf.models.reading says what that means for hflip and
ensembles). The split is streamed once; per image only the probability, target,
class, true boxes and, for each threshold of the sweep, the detections are kept,
never the images.

Written to `output_dir` (default <home>/evaluation/<split>, where home is the model
folder, or the ensemble folder of a fused reading):
  thresholds.csv, thresholds.md  one row per threshold: accuracy; precision, recall
                                 and F1 of the positive and the negative class; AUC
                                 (threshold-free, the same on every row); challenge mAP
  confusion_matrix.csv           at the chosen threshold, rows by target
  confusion_by_class.csv         the same with rows by the three-way class
  readings.csv                   a fused reading only: each member alone (without and
                                 with hflip) and the whole, each at its own best
                                 threshold, with its mAP and AUC there (same pass)
  images.csv                     id, target, class, probability of every labeled image
  pr_curve.png, roc_curve.png    with the chosen threshold marked
  summary.json                   what `evaluate` returns as `summary`
and to TensorBoard under <home>/logs/evaluation_<split> at the model's last epoch
(0 for an ensemble): the PR curve (as validation writes it), both curve images, the
table as text, AUC, mAP and the chosen threshold.

The chosen threshold maximises the challenge mAP; it is saved into the model's
pneumo_tf.json, or the ensemble folder, where prediction and the web page read it. The
figures (records, split, mAP, AUC, threshold) are appended to the model card of that folder
(pneumo_tf.models.card), which so keeps the history of the model's measurements.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd

from pneumo_tf.cli import check_constraints, option
from pneumo_tf.data import pipeline
from pneumo_tf.errors import UserError
from pneumo_tf.evaluation.collect import collect_readings
from pneumo_tf.evaluation.sweep import (
    DEFAULT_THRESHOLDS,
    F1_COLUMN,
    MAP_COLUMN,
    both_classes,
    confusion_matrices,
    pick_threshold,
    reading_rows,
    threshold_table,
)
from pneumo_tf.evaluation.visualize import curve_pngs, write_tensorboard
from pneumo_tf.fileio import atomic_open, write_json_atomic
from pneumo_tf.models import card as model_card, reading as reading_lib
from pneumo_tf.models.reading import ReadingConfig
from pneumo_tf.records import manifest as manifest_lib


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    model_dir: str | None = option(None, "Folder of a trained model (model.keras + pneumo_tf.json), an ensemble "
                                   "folder, or several model folders separated by commas (an ensemble).")
    records_dir: str | None = option(None, "Folder written by python -m pneumo_tf.convert (manifest.json + shards).")
    split: str = option("val", "Labeled split to evaluate on (val, or train).")
    verify_records: bool = option(False, manifest_lib.VERIFY_HELP)
    batch_size: int = option(16, "Images per model call.", minimum=1)
    thresholds: tuple[float, ...] = option(DEFAULT_THRESHOLDS, "Confidence thresholds of the sweep, comma "
                                           "separated, each in (0, 1).", exclusive_minimum=0.0,
                                           exclusive_maximum=1.0)
    output_dir: str | None = option(None, "Where tables, curves and summary.json go (default "
                                    "<model_dir>/evaluation/<split>).")
    save_threshold: bool = option(True, "Save the chosen threshold into the model's pneumo_tf.json, or the ensemble "
                                  "folder's (turn off when evaluating on a split that should not tune the model, "
                                  "such as train).")
    reading: ReadingConfig = option(ReadingConfig())
    ensemble_dir: str | None = option(None, "For several --model_dir models or --tta=hflip: the ensemble folder to "
                                      "write (members, weights, TTA, fusion and the chosen threshold), which "
                                      "predict and serve take as --model_dir; the report goes inside it.")

    def validate(self) -> None:
        if not self.model_dir or not self.records_dir:
            raise UserError("give --model_dir and --records_dir (or --submission with --labels_csv)")
        check_constraints(self)
        fused = reading_lib.is_new_fused_reading(self.model_dir, self.reading)
        if self.ensemble_dir and not fused:
            raise UserError("--ensemble_dir saves a fused reading (several --model_dir models, --tta=hflip or "
                            f"--score_alignment); {self.model_dir} read as asked keeps its threshold itself")
        if fused and not self.ensemble_dir and (self.save_threshold or not self.output_dir):
            raise UserError("a fused reading (several --model_dir models, --tta=hflip or --score_alignment) keeps "
                            "its threshold in an ensemble folder: give --ensemble_dir, or --nosave_threshold with "
                            "--output_dir")
        if not self.thresholds:
            raise UserError("--thresholds needs at least one threshold")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    summary: dict
    table: pd.DataFrame
    confusion: pd.DataFrame
    confusion_by_class: pd.DataFrame
    readings: pd.DataFrame | None = None  # for a fused reading: sweep.READINGS_COLUMNS, its parts and itself

    def report(self) -> str:
        """The table, the confusion matrices and the choice, as printable markdown."""
        summary = self.summary
        parts = [
            f"Threshold sweep of {summary['model']} on {summary['split']} ({summary['images']} labeled images, "
            f"{summary['positives']} positive):",
            to_markdown(self.table),
            f"Chosen threshold {summary['threshold']:g} ({summary['threshold_reason']}); "
            f"confusion matrix there:",
            to_markdown(self.confusion.reset_index()),
            to_markdown(self.confusion_by_class.reset_index()),
        ]
        if self.readings is not None:
            parts += ["Each member alone and the whole, each at its own best threshold of the sweep:",
                      to_markdown(self.readings)]
        return "\n\n".join(parts)


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def to_markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table (pandas needs the tabulate package for that)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _number(value) -> float | None:
    """JSON has no NaN: undefined numbers are written as null."""
    return None if math.isnan(value) else float(value)


def _write_csv(frame: pd.DataFrame, path: str, index: bool = False) -> None:
    with atomic_open(path, newline="") as handle:
        frame.to_csv(handle, index=index, lineterminator="\n")


def _write_bytes(payload: bytes, path: str) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(payload)


def evaluate(config: EvaluateConfig) -> Evaluation:
    """Evaluates the model (or ensemble) of `config.model_dir` on one split, writes the reports and saves the
    threshold (see the module docstring)."""
    config.validate()
    thresholds = sorted(set(config.thresholds))
    # The manifest and split are checked before the (slower) model load.
    pipeline.num_examples(config.records_dir, config.split)
    if config.verify_records:
        manifest_lib.verify_shards(config.records_dir, [config.split])
    reading = reading_lib.load(config.model_dir, config.reading)
    parts = [] if reading.is_plain else reading.parts()
    dataset = reading.dataset(config.records_dir, config.split, config.batch_size)
    with pipeline.naming_bad_records(config.records_dir, (config.split,), reading.image_sizes[0]):
        collected, *collected_parts = collect_readings([reading, *(part for _, part in parts)], reading.infer,
                                                       dataset, thresholds)
    if not collected.ids:
        raise UserError(f"split '{config.split}' of {config.records_dir} has no labeled images: "
                        "evaluate a labeled split (val or train)")

    table = threshold_table(collected, thresholds)
    row_index, column, reason = pick_threshold(table, reading.gives_boxes)
    chosen = table.iloc[row_index]
    confusion, confusion_by_class = confusion_matrices(collected, chosen["threshold"])
    readings = None
    if parts:
        readings = reading_rows(
            [(label, reading.weights[part.member_index]) for label, part in parts] + [(reading.name, math.nan)],
            [*collected_parts, collected], thresholds, reading.gives_boxes,
        )

    # Where this reading lives: its ensemble folder (new or loaded) or its one model folder.
    home = config.ensemble_dir or reading.ensemble_dir or (reading.model_dirs[0] if reading.is_plain else None)
    output_dir = config.output_dir or os.path.join(home, "evaluation", config.split)
    os.makedirs(output_dir, exist_ok=True)
    files: dict[str, str] = {}

    def output(name: str) -> str:
        files[name] = os.path.join(output_dir, name)
        return files[name]

    summary = {
        "model": reading.name,
        "model_dir": config.model_dir,
        "reading": reading.describe(),
        "records_dir": config.records_dir,
        "split": config.split,
        "images": len(collected.ids),
        "positives": int(np.sum(collected.targets == 1)),
        "unlabeled_skipped": collected.unlabeled,
        "threshold": float(chosen["threshold"]),
        "threshold_metric": column,
        "threshold_reason": reason,
        "map": _number(chosen[MAP_COLUMN]),
        "f1": _number(chosen[F1_COLUMN]),
        "auc": _number(chosen["auc"]),
        "threshold_saved": config.save_threshold,
        "output_dir": output_dir,
        "log_dir": os.path.join(home or output_dir, "logs", f"evaluation_{config.split}"),
        "files": files,
    }
    if readings is not None:
        summary["readings"] = [{key: _number(value) if isinstance(value, float) else value
                                for key, value in row.items()}
                               for row in readings.to_dict("records")]
    table_markdown, pngs = _write_reports(output, collected, table, chosen, confusion, confusion_by_class, readings)
    # A plain model's at its last trained epoch, the step of validation's own PR curves.
    step = int((reading.members[0].model.info.get("epochs") or [0])[-1]) if reading.is_plain else 0
    write_tensorboard(summary["log_dir"], step, collected, table_markdown, pngs, summary)
    if config.save_threshold:
        summary["threshold_dir"] = reading_lib.save_threshold(reading, threshold_info(summary), config.ensemble_dir)
    # The folder the reading lives in keeps the figures in its card; a fused reading saved nowhere has none.
    card_dir = summary.get("threshold_dir") or reading.ensemble_dir or (home if reading.is_plain else None)
    if card_dir is not None:
        summary["model_card"] = model_card.record_evaluation(
            card_dir, reading, model_card.evaluation_entry(summary, config.records_dir))
    write_json_atomic(output("summary.json"), summary)
    return Evaluation(summary, table, confusion, confusion_by_class, readings)


def _write_reports(output, collected, table, chosen, confusion, confusion_by_class, readings) -> tuple[str, dict]:
    """Writes the threshold table (CSV and Markdown), the confusion matrices, the per-reading rows, every image's
    probability and the curves, each to `output(name)`; returns the table's Markdown and the curves' PNGs."""
    table_markdown = to_markdown(table)
    _write_csv(table, output("thresholds.csv"))
    _write_bytes((table_markdown + "\n").encode(), output("thresholds.md"))
    _write_csv(confusion, output("confusion_matrix.csv"), index=True)
    _write_csv(confusion_by_class, output("confusion_by_class.csv"), index=True)
    if readings is not None:
        _write_csv(readings, output("readings.csv"))
    images = pd.DataFrame({"id": collected.ids, "target": collected.targets, "class": collected.classes,
                           "probability": collected.probabilities})
    _write_csv(images, output("images.csv"))
    # Curves need both classes; a split of one class still gets its table.
    pngs = curve_pngs(collected, chosen) if both_classes(collected.targets) else {}
    for name, png in pngs.items():
        _write_bytes(png, output(f"{name}.png"))
    return table_markdown, pngs


def threshold_info(summary: dict) -> dict:
    """The chosen threshold and its split's numbers, as a model's pneumo_tf.json or an ensemble folder keeps them."""
    split = summary["split"]
    return {
        "threshold": summary["threshold"],
        "threshold_metric": summary["threshold_metric"],
        "threshold_split": split,
        f"{split}_map": summary["map"],
        f"{split}_f1": summary["f1"],
        f"{split}_auc": summary["auc"],
        **({f"{split}_readings": summary["readings"]} if "readings" in summary else {}),
    }
