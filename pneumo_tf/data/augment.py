"""Random augmentation of whole batches, run inside the training step.

Augmenting a batch on the accelerator keeps the tf.data pipeline down to reading,
decoding and batching (the CPU is the scarce resource when feeding a GPU), and
a stateless seed makes every step reproducible: the same seed gives the same
batch on every run, resumed or not, eagerly or inside `tf.function` (two
differently optimised graphs may differ in the last bit of a float).

Each image gets one random affine map (horizontal flip, rotation, zoom, shift).
Image and mask are resampled once through it together, the boxes are mapped
through the same map, and brightness/contrast jitter touches the image only.

Coordinates: boxes follow `pneumo_tf.records.boxes` (normalised ymin, xmin, ymax, xmax,
where 0 and 1 are the outer edges of the image); the resampler works in pixel
indices, where pixel (row, col) has its centre at (row, col). Both describe the
same map: forward (input to output) for boxes, inverse (output to input) for pixels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import tensorflow as tf

from pneumo_tf.cli import check_constraints, coerce_value, option
from pneumo_tf.errors import UserError

# A box thinner than this after clipping (in pixels of the batch) covers at most a
# line of mask pixels, so it is dropped rather than kept as a target the mask lacks.
MIN_BOX_SIDE_PIXELS = 0.5


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation; every draw is uniform and per image.

    Defaults are the seed report's `ImageDataGenerator(rotation_range=2,
    zoom_range=0.15, width_shift_range=0.15, height_shift_range=0.15)` plus a
    horizontal flip and mild brightness/contrast jitter. Unlike Keras, the zoom
    keeps the aspect ratio (one scale for both axes), and a scale above 1 enlarges.
    """

    flip_probability: float = option(0.5, "Probability of a left-right mirror.", minimum=0.0, maximum=1.0)
    rotation_range: float = option(2.0, "Degrees: the angle is in [-r, r].", minimum=0.0)
    # A scale reaching 0 would make the inverse map (and the resampling) blow up.
    zoom_range: float = option(0.15, "The scale is in [1 - z, 1 + z].", minimum=0.0, exclusive_maximum=1.0)
    width_shift_range: float = option(0.15, "Fraction of the width: the shift is in [-r, r].", minimum=0.0)
    height_shift_range: float = option(0.15, "Fraction of the height: the shift is in [-r, r].", minimum=0.0)
    brightness_delta: float = option(0.1, "Added to [0, 1] pixels: in [-d, d].", minimum=0.0)
    contrast_range: tuple[float, float] = option((0.9, 1.1), "(low, high): the factor about the image mean.",
                                                 minimum=0.0)

    def __post_init__(self):
        # Flags may hand over a list; a tuple keeps the config hashable, so it can
        # be a static argument of a tf.function.
        try:
            object.__setattr__(self, "contrast_range", coerce_value(self.contrast_range, tuple[float, float]))
        except ValueError as error:
            raise UserError(f"augment contrast_range: {error}") from error
        check_constraints(self, label=lambda name: f"augment {name}")
        if self.contrast_range[0] > self.contrast_range[1]:
            raise UserError(f"augment contrast_range must be (low, high) with low <= high, got {self.contrast_range}")

    def scaled(self, strength: float) -> AugmentConfig:
        """These ranges times `strength` (the flip's probability kept; zoom kept below 1, contrast at or above
        0): 0 leaves only the flips, 2 rotates, zooms, shifts and jitters twice as far."""
        low, high = self.contrast_range
        return dataclasses.replace(
            self, rotation_range=self.rotation_range * strength, zoom_range=min(self.zoom_range * strength, 0.9),
            width_shift_range=self.width_shift_range * strength, height_shift_range=self.height_shift_range * strength,
            brightness_delta=self.brightness_delta * strength,
            contrast_range=(max(1.0 - (1.0 - low) * strength, 0.0), 1.0 + (high - 1.0) * strength))

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation: `augment_batch` returns the batch unchanged, bit for bit
        (but for boxes already thinner than MIN_BOX_SIDE_PIXELS, which it drops)."""
        return cls(
            flip_probability=0.0,
            rotation_range=0.0,
            zoom_range=0.0,
            width_shift_range=0.0,
            height_shift_range=0.0,
            brightness_delta=0.0,
            contrast_range=(1.0, 1.0),
        )


class _Params(NamedTuple):
    """One draw per image, each float32 [B, 1] so it broadcasts against points [B, N]."""

    flip: tf.Tensor  # 1.0 mirrors the image left-right, 0.0 keeps it
    angle: tf.Tensor  # radians
    scale: tf.Tensor
    shift_x: tf.Tensor  # fraction of the width
    shift_y: tf.Tensor  # fraction of the height
    brightness: tf.Tensor
    contrast: tf.Tensor


def augment_batch(batch: dict, seed, config: AugmentConfig = AugmentConfig()) -> dict:
    """The batch with every image randomly flipped, rotated, zoomed, shifted and jittered.

    `seed` is a shape [2] int32 or int64 tensor, for example (run seed, step)
    passed through `replica_seed`; the result is a pure function of it.
    Keys other than image, mask, boxes and num_boxes pass through untouched; mask and
    boxes (with num_boxes) are optional.
    """
    batch_size = tf.shape(batch["image"])[0]
    return _augment_with(batch, _draw(seed, batch_size, config))


def replica_seed(seed) -> tf.Tensor:
    """`seed` with the replica's index folded in, so replicas augment their shards differently.

    Call it inside `strategy.run`; outside any strategy it acts as replica 0.
    """
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    # The result takes the dtype of the folded-in value; int32 is the one XLA accepts.
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int32), alg="philox")


def _draw(seed, batch_size, config: AugmentConfig) -> _Params:
    # One draw of all uniforms, Philox named explicitly: "auto_select" may pick a
    # different generator on another device type, breaking reproducibility.
    uniform = tf.random.stateless_uniform([batch_size, 7], seed, alg="philox")
    u_flip, u_angle, u_scale, u_x, u_y, u_brightness, u_contrast = tf.split(uniform, 7, axis=1)

    def symmetric(u, limit):
        # limit * (2u - 1) is exactly 0 for a zero range, keeping `off()` bit exact.
        return limit * (2.0 * u - 1.0)

    flip = tf.cast(u_flip < config.flip_probability, tf.float32)
    angle = symmetric(u_angle, math.radians(config.rotation_range))
    scale = 1.0 + symmetric(u_scale, config.zoom_range)
    shift_x = symmetric(u_x, config.width_shift_range)
    shift_y = symmetric(u_y, config.height_shift_range)
    brightness = symmetric(u_brightness, config.brightness_delta)
    low, high = config.contrast_range
    contrast = low + (high - low) * u_contrast
    return _Params(flip, angle, scale, shift_x, shift_y, brightness, contrast)


def _augment_with(batch: dict, params: _Params) -> dict:
    """The deterministic half of `augment_batch`: apply given per-image parameters."""
    image = tf.cast(batch["image"], tf.float32)
    shape = tf.shape(image)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

    # Jitter before resampling, so the contrast pivots on the radiograph's own mean
    # and the area shifted in from outside stays exactly 0.
    mean = tf.reduce_mean(image, axis=[1, 2, 3], keepdims=True)
    brightness, contrast = params.brightness[:, :, None, None], params.contrast[:, :, None, None]
    # x * c + m * (1 - c) rather than (x - m) * c + m: exact when c is 1.
    image = tf.clip_by_value(image * contrast + mean * (1.0 - contrast) + brightness, 0.0, 1.0)

    forward, inverse = _affine_maps(params, height, width)
    # Image and mask share one resampling; bilinear weights are convex, so the image
    # stays in [0, 1], and thresholding the mask at 0.5 keeps it binary with its
    # edge where the box edge maps to.
    # Classifiers train without a mask: then only the image is resampled.
    channels = image.shape[-1]
    has_mask = "mask" in batch
    stacked = tf.concat([image, tf.cast(batch["mask"], tf.float32)], axis=-1) if has_mask else image
    pixels = _resample(stacked, inverse)
    augmented = {**batch, "image": tf.cast(pixels[..., :channels], batch["image"].dtype)}
    if "boxes" in batch:  # classifiers and the mask network train without boxes
        augmented["boxes"], augmented["num_boxes"] = _map_boxes(
            batch["boxes"], batch["num_boxes"], forward, height, width
        )
    if has_mask:
        augmented["mask"] = tf.cast(pixels[..., channels:] >= 0.5, batch["mask"].dtype)
    return augmented


def _affine_maps(params: _Params, height, width):
    """(forward map on normalised coordinates, inverse map on pixel indices).

    The forward linear part, in pixels and (x, y) order, is scale * R(angle) * F with
    F = diag(-1, 1) for a flip; both maps turn about the image centre and move it by
    (shift_x * width, shift_y * height) pixels.
    """
    mirror = 1.0 - 2.0 * params.flip  # -1 flips, +1 keeps
    cos, sin = tf.cos(params.angle), tf.sin(params.angle)
    s = params.scale
    # Normalising x by width and y by height changes the off-diagonal terms when the
    # image is not square; without this a rotation would shear.
    forward_linear = (
        (s * mirror * cos, -s * sin * (height / width)),
        (s * mirror * sin * (width / height), s * cos),
    )
    forward = _affine(
        forward_linear, source=(0.5, 0.5), target=(0.5 + params.shift_x, 0.5 + params.shift_y)
    )
    # Inverse of s * R(a) * F is F * R(-a) / s.
    inverse_linear = ((mirror * cos / s, mirror * sin / s), (-sin / s, cos / s))
    centre_x, centre_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    inverse = _affine(
        inverse_linear,
        source=(centre_x + params.shift_x * width, centre_y + params.shift_y * height),
        target=(centre_x, centre_y),
    )
    return forward, inverse


def _affine(linear, source, target):
    """Coefficients (a0, a1, a2, b0, b1, b2) of p -> linear @ (p - source) + target.

    The map is stored as linear @ p + offset with offset = target - linear @ source,
    so no rounding happens when linear is +-1 and 0: identity and flip stay exact.
    """
    (m00, m01), (m10, m11) = linear
    source_x, source_y = source
    target_x, target_y = target
    offset_x = target_x - (m00 * source_x + m01 * source_y)
    offset_y = target_y - (m10 * source_x + m11 * source_y)
    return m00, m01, offset_x, m10, m11, offset_y


def _apply(affine, x, y):
    a0, a1, a2, b0, b1, b2 = affine
    return a0 * x + a1 * y + a2, b0 * x + b1 * y + b2


def _resample(images, inverse):
    """Bilinear samples of images [B, H, W, C] at inverse(output pixel); outside reads 0.

    Written with gathers instead of tf.raw_ops.ImageProjectiveTransformV3 (same
    convention, same result) because that op has no XLA kernel, and Keras compiles
    the train step with XLA by default on a single GPU.
    """
    shape = tf.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    rows, cols = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
    x, y = _apply(
        inverse,
        tf.cast(tf.reshape(cols, [1, -1]), tf.float32),
        tf.cast(tf.reshape(rows, [1, -1]), tf.float32),
    )
    x0, y0 = tf.floor(x), tf.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    col0, row0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    flat = tf.reshape(images, [batch, height * width, channels])

    def read(row, col):
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        index = tf.clip_by_value(row, 0, height - 1) * width + tf.clip_by_value(col, 0, width - 1)
        return tf.where(inside[..., None], tf.gather(flat, index, batch_dims=1), 0.0)

    # At an integer sample point the weights are exactly 1 and 0, so whole-pixel
    # moves (and the identity) copy pixels bit for bit.
    top = read(row0, col0) * (1.0 - wx) + read(row0, col0 + 1) * wx
    bottom = read(row0 + 1, col0) * (1.0 - wx) + read(row0 + 1, col0 + 1) * wx
    return tf.reshape(top * (1.0 - wy) + bottom * wy, shape)


def _map_boxes(boxes, num_boxes, forward, height, width):
    """Boxes through the forward map, clipped, thin ones dropped, kept ones first."""
    dtype = boxes.dtype
    max_boxes = tf.shape(boxes)[1]
    ymin, xmin, ymax, xmax = tf.unstack(tf.cast(boxes, tf.float32), axis=-1)
    # A rotated box's axis-aligned box is the min/max over its four mapped corners.
    corners_x, corners_y = _apply(
        forward, tf.concat([xmin, xmax, xmin, xmax], axis=1), tf.concat([ymin, ymin, ymax, ymax], axis=1)
    )
    corners_x = tf.reshape(corners_x, [-1, 4, max_boxes])
    corners_y = tf.reshape(corners_y, [-1, 4, max_boxes])
    mapped = tf.clip_by_value(
        tf.stack(
            [
                tf.reduce_min(corners_y, axis=1),
                tf.reduce_min(corners_x, axis=1),
                tf.reduce_max(corners_y, axis=1),
                tf.reduce_max(corners_x, axis=1),
            ],
            axis=-1,
        ),
        0.0,
        1.0,
    )
    keep = (
        (tf.range(max_boxes)[None, :] < num_boxes[:, None])
        & ((mapped[..., 2] - mapped[..., 0]) * height >= MIN_BOX_SIDE_PIXELS)
        & ((mapped[..., 3] - mapped[..., 1]) * width >= MIN_BOX_SIDE_PIXELS)
    )
    # A stable sort on "dropped" moves kept boxes to the front in their order; the
    # dropped rows become the zero padding.
    order = tf.argsort(tf.cast(~keep, tf.int32), axis=1, stable=True)
    packed = tf.gather(tf.where(keep[..., None], mapped, 0.0), order, batch_dims=1)
    return tf.cast(packed, dtype), tf.reduce_sum(tf.cast(keep, num_boxes.dtype), axis=1)
