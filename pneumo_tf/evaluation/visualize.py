"""What evaluation shows: the PR and ROC curves of image probabilities (PNG and TensorBoard), and
radiographs with their true boxes (green) and predicted boxes (red). Training's epoch-end
validation, evaluation and prediction's overlays all draw with these."""
from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.figure import Figure
from sklearn import metrics as sk_metrics
from tensorboard.plugins.pr_curve import summary as pr_curve_summary

from pneumo_tf.evaluation.collect import Collected

PR_CURVE_NAME = "image_probability"  # TensorBoard's tag is "<name>/pr_curves"
PR_CURVE_THRESHOLDS = 201
TRUE_BOX_COLOR = (0.0, 1.0, 0.0)
PREDICTED_BOX_COLOR = (1.0, 0.0, 0.0)


def write_pr_curve(targets, probabilities, step: int) -> None:
    """The PR curve of image probabilities against targets (1 positive), to the default writer."""
    curve = pr_curve_summary.pb(
        PR_CURVE_NAME,
        labels=np.asarray(targets) == 1,
        predictions=np.asarray(probabilities, np.float32),
        num_thresholds=PR_CURVE_THRESHOLDS,
    )
    # TensorBoard has no TF2 PR-curve op (tensorboard#2902): write its protobuf as is.
    tf.summary.experimental.write_raw_pb(curve.SerializeToString(), step=step)


def draw_boxes(images_and_boxes: Iterable[tuple]) -> tf.Tensor:
    """float32 [N, S, S, 3]: each grey image [S, S, 1] in RGB with its predicted boxes in red and
    its true boxes in green on top (boxes normalised yxyx, [K, 4] each)."""
    drawn = []
    for image, true_boxes, predicted_boxes in images_and_boxes:
        # One image at a time: padding boxes of a batched call would be drawn as dots.
        rgb = tf.image.grayscale_to_rgb(tf.convert_to_tensor(image, tf.float32))[None]
        for boxes, color in ((predicted_boxes, PREDICTED_BOX_COLOR), (true_boxes, TRUE_BOX_COLOR)):
            rgb = tf.image.draw_bounding_boxes(rgb, np.asarray(boxes, np.float32).reshape(1, -1, 4), [color])
        drawn.append(rgb[0])
    return tf.stack(drawn)


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
