"""The mask network's loss (the seed's BCE + batch soft IoU) and its mean-IoU metric."""
from __future__ import annotations

import keras
from keras import ops

from pneumo_tf.models.architecture import sum_over_replicas

# The seed's IoU loss adds 1 to both sides so an empty mask against an empty
# prediction scores IoU 1 (loss 0) and the gradient stays finite.
_IOU_SMOOTHING = 1.0


def soft_iou_loss(y_true, y_pred):
    """1 - soft IoU of probabilities, pooled over the whole (global) batch as in the seed.

    Pooling (rather than per image) matters for RSNA: ~77% of masks are empty,
    and a per-image smoothed IoU would make any activation on them cost ~1. Under a
    tf.distribute strategy the pool is the global batch, not each replica's share.
    """
    y_true = ops.cast(y_true, y_pred.dtype)
    sums = sum_over_replicas(ops.stack([ops.sum(y_true * y_pred), ops.sum(y_true), ops.sum(y_pred)]))
    intersection = sums[0]
    union = sums[1] + sums[2] - intersection
    return 1.0 - (intersection + _IOU_SMOOTHING) / (union + _IOU_SMOOTHING)


def iou_bce_loss(y_true, y_pred):
    """The seed's mask loss, 0.25 * pixel BCE + 0.75 * batch soft-IoU loss, per image.

    Returned per image ([B]) so Keras' mean over the batch gives exactly the seed's
    value and sample weights still apply; the IoU term is shared by the batch.
    """
    y_true = ops.cast(y_true, y_pred.dtype)
    pixel_bce = keras.losses.binary_crossentropy(y_true, y_pred)  # [B, H, W]
    per_image_bce = ops.mean(pixel_bce, axis=tuple(range(1, len(pixel_bce.shape))))
    return 0.25 * per_image_bce + 0.75 * soft_iou_loss(y_true, y_pred)


def mean_iou(y_true, y_pred):
    """IoU of the mask thresholded at 0.5 (> 0.5, as Keras' Precision/BinaryIoU do), per image.

    Keras averages the [B] values over every image seen, so each image counts once;
    an empty mask with an empty prediction counts as IoU 1, as in the seed.
    """
    y_true = ops.cast(y_true > 0.5, "float32")
    y_pred = ops.cast(y_pred > 0.5, "float32")
    axes = tuple(range(1, len(y_pred.shape)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    union = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes) - intersection
    epsilon = keras.config.epsilon()
    return (intersection + epsilon) / (union + epsilon)
