"""Evaluation: a model (or an ensemble) over one labeled split -> threshold table, curves, and its threshold.

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
pneumo_tf.json, or the ensemble folder, where prediction and the web page read it.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.figure import Figure
from sklearn import metrics as sk_metrics

from pneumo_tf.data import pipeline
from pneumo_tf.evaluation import metric
from pneumo_tf.evaluation.visualize import write_pr_curve
from pneumo_tf.cli import option
from pneumo_tf.models import reading as reading_lib
from pneumo_tf.models.architecture import check_threshold
from pneumo_tf.models.reading import ReadingConfig
from pneumo_tf.errors import UserError
from pneumo_tf.evaluation.postprocess import Collected, collect_readings
from pneumo_tf.fileio import atomic_open, write_json_atomic
from pneumo_tf.records import schema

DEFAULT_THRESHOLDS = tuple(round(0.1 * step, 2) for step in range(1, 10))
TABLE_COLUMNS = (
    "threshold", "accuracy", "precision_positive", "recall_positive", "f1_positive",
    "precision_negative", "recall_negative", "f1_negative", "auc", "map",
)
MAP_COLUMN = "map"
READINGS_COLUMNS = ("reading", "weight", "threshold", "map", "auc")
F1_COLUMN = "f1_positive"
PREDICTED_COLUMNS = ("predicted negative", "predicted positive")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    model_dir: str | None = option(None, "Folder of a trained model (model.keras + pneumo_tf.json), an ensemble "
                                   "folder, or several model folders separated by commas (an ensemble).")
    records_dir: str | None = option(None, "Folder written by python -m pneumo_tf.convert (manifest.json + shards).")
    split: str = option("val", "Labeled split to evaluate on (val, or train).")
    batch_size: int = option(16, "Images per model call.")
    thresholds: tuple[float, ...] = option(DEFAULT_THRESHOLDS, "Confidence thresholds of the sweep, comma "
                                           "separated, each in (0, 1).")
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
        self.reading.validate()
        fused = reading_lib.is_new_fused_reading(self.model_dir, self.reading)
        if self.ensemble_dir and not fused:
            raise UserError("--ensemble_dir saves a fused reading (several --model_dir models or --tta=hflip); "
                            f"{self.model_dir} read as asked keeps its threshold itself")
        if fused and not self.ensemble_dir and (self.save_threshold or not self.output_dir):
            raise UserError("a fused reading (several --model_dir models or --tta=hflip) keeps its threshold in an "
                            "ensemble folder: give --ensemble_dir, or --nosave_threshold with --output_dir")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, not {self.batch_size}")
        if not self.thresholds:
            raise UserError("--thresholds needs at least one threshold")
        for threshold in self.thresholds:
            check_threshold(threshold, "--thresholds")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    summary: dict
    table: pd.DataFrame
    confusion: pd.DataFrame
    confusion_by_class: pd.DataFrame
    readings: pd.DataFrame | None = None  # for a fused reading: READINGS_COLUMNS, its parts and itself

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


def _both_classes(targets) -> bool:
    return len(np.unique(targets)) == 2


def threshold_table(collected: Collected, thresholds) -> pd.DataFrame:
    """One row per threshold with the columns of TABLE_COLUMNS (see the module docstring)."""
    targets = collected.targets
    # AUC is undefined with one class only; NaN says so rather than a misleading number.
    auc = sk_metrics.roc_auc_score(targets, collected.probabilities) if _both_classes(targets) else math.nan
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


def _curve_png(x, y, curve_label: str, chosen_point, threshold: float, xlabel: str, ylabel: str, title: str,
               **plot_options) -> bytes:
    # Matplotlib's Figure without pyplot: no global backend or figure state, so this is
    # safe in a notebook and on a machine without a display.
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    axes.plot(x, y, label=curve_label, **plot_options)
    axes.plot(*chosen_point, "o", label=f"threshold {threshold:g}")
    axes.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.legend(loc="best")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def curve_pngs(collected: Collected, chosen: pd.Series) -> dict[str, bytes]:
    """{"pr_curve": PNG, "roc_curve": PNG} of the image probabilities, the chosen threshold's point marked."""
    targets, probabilities = collected.targets, collected.probabilities
    precision, recall, _ = sk_metrics.precision_recall_curve(targets, probabilities)
    average_precision = sk_metrics.average_precision_score(targets, probabilities)
    false_positive_rate, true_positive_rate, _ = sk_metrics.roc_curve(targets, probabilities)
    return {
        "pr_curve": _curve_png(
            recall, precision, f"AP {average_precision:.3f}",
            (chosen["recall_positive"], chosen["precision_positive"]), chosen["threshold"],
            "recall", "precision", "Precision-recall (image level)", drawstyle="steps-post",
        ),
        # The false positive rate is 1 - specificity, the negative class's recall.
        "roc_curve": _curve_png(
            false_positive_rate, true_positive_rate, f"AUC {chosen['auc']:.3f}",
            (1.0 - chosen["recall_negative"], chosen["recall_positive"]), chosen["threshold"],
            "false positive rate", "true positive rate", "ROC (image level)",
        ),
    }


def write_tensorboard(log_dir: str, step: int, collected: Collected, table_markdown: str, pngs: dict[str, bytes],
                      summary: dict) -> None:
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        write_pr_curve(collected.targets, collected.probabilities, step)
        for name, png in pngs.items():
            tf.summary.image(f"evaluation/{name}", tf.io.decode_png(png, channels=3)[None])
        tf.summary.text("evaluation/thresholds", table_markdown)
        for name in ("auc", "map", "threshold"):
            if summary[name] is not None:
                tf.summary.scalar(f"evaluation/{name}", summary[name])
    writer.close()


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


def reading_rows(readers: list[tuple[str, float]], collected: list[Collected], thresholds,
                 has_boxes: bool) -> pd.DataFrame:
    """One row per (label, weight) reading: its best threshold of the sweep and the mAP and AUC there."""
    rows = []
    for (label, weight), found in zip(readers, collected):
        table = threshold_table(found, thresholds)
        row = table.iloc[pick_threshold(table, has_boxes)[0]]
        rows.append({"reading": label, "weight": weight, "threshold": row["threshold"], "map": row[MAP_COLUMN],
                     "auc": row["auc"]})
    return pd.DataFrame(rows, columns=list(READINGS_COLUMNS))


def evaluate(config: EvaluateConfig) -> Evaluation:
    """Evaluates the model (or ensemble) of `config.model_dir` on one split, writes the reports and saves the
    threshold (see the module docstring)."""
    config.validate()
    thresholds = sorted(set(config.thresholds))
    # The manifest and split are checked before the (slower) model load.
    pipeline.num_examples(config.records_dir, config.split)
    reader = reading_lib.load(config.model_dir, config.reading)
    parts = [] if reader.is_plain else reader.parts()
    dataset = reader.dataset(config.records_dir, config.split, config.batch_size)
    with pipeline.naming_bad_records(config.records_dir, (config.split,), reader.image_sizes[0]):
        collected, *collected_parts = collect_readings([reader, *(part for _, part in parts)], reader.infer,
                                                       dataset, thresholds)
    if not collected.ids:
        raise UserError(f"split '{config.split}' of {config.records_dir} has no labeled images: "
                        "evaluate a labeled split (val or train)")

    table = threshold_table(collected, thresholds)
    row_index, column, reason = pick_threshold(table, reader.gives_boxes)
    chosen = table.iloc[row_index]
    confusion, confusion_by_class = confusion_matrices(collected, chosen["threshold"])
    readings = None
    if parts:
        readings = reading_rows(
            [(label, reader.weights[part.member_index]) for label, part in parts] + [(reader.name, math.nan)],
            [*collected_parts, collected], thresholds, reader.gives_boxes,
        )

    # Where this reading lives: its ensemble folder (new or loaded) or its one model folder.
    home = config.ensemble_dir or reader.ensemble_dir or (reader.model_dirs[0] if reader.is_plain else None)
    output_dir = config.output_dir or os.path.join(home, "evaluation", config.split)
    os.makedirs(output_dir, exist_ok=True)
    files: dict[str, str] = {}

    def output(name: str) -> str:
        files[name] = os.path.join(output_dir, name)
        return files[name]

    summary = {
        "model": reader.name,
        "model_dir": config.model_dir,
        "predictor": reader.describe(),
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
        summary["readings"] = [{key: _number(value) if isinstance(value, float) else value for key, value in row.items()}
                               for row in readings.to_dict("records")]
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
    pngs = curve_pngs(collected, chosen) if _both_classes(collected.targets) else {}
    for name, png in pngs.items():
        _write_bytes(png, output(f"{name}.png"))
    # A plain model's at its last trained epoch, the step of validation's own PR curves.
    step = int((reader.members[0].model.info.get("epochs") or [0])[-1]) if reader.is_plain else 0
    write_tensorboard(summary["log_dir"], step, collected, table_markdown, pngs, summary)
    if config.save_threshold:
        summary["threshold_dir"] = reading_lib.save_threshold(reader, threshold_info(summary), config.ensemble_dir)
    write_json_atomic(output("summary.json"), summary)
    return Evaluation(summary, table, confusion, confusion_by_class, readings)


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
