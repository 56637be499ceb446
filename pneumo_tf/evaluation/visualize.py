"""What evaluation shows: the PR curve of image probabilities for TensorBoard, and radiographs
with their true boxes (green) and predicted boxes (red). Training's epoch-end validation,
evaluation and prediction's overlays all draw with these."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tensorflow as tf
from tensorboard.plugins.pr_curve import summary as pr_curve_summary

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
