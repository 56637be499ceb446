"""Two-stage detector ops that compile with XLA: static shapes, gathers, padded NMS.

Boxes are normalised (ymin, xmin, ymax, xmax) everywhere (the batch convention of
pneumo_tf.records.boxes); padded rows travel with a boolean `valid` mask instead of being cut
off, so every tensor keeps the shape it was traced with. Nothing here holds weights:
pneumo_tf.models.mask_rcnn wires these functions to its layers.

What is written here rather than taken from keras-hub, and why:
- `roi_align`: RoIAlign with four gathers and bilinear weights.
  `tf.image.crop_and_resize` has no XLA kernel (tensorflow#23337).
- `balanced_sample`: a fixed-size positive/negative sampler. Its "random" order is a
  hash of (image pixels, step, candidate id), so the samples of an image do not
  depend on which replica holds it or on where it sits in the batch: N replicas
  draw what one device draws on the same global batch.
- `match_anchors`: keras-hub's BoxMatcher gives the IoU thresholds; its
  `force_match_for_each_col` would also force-match padded ground-truth columns, so
  the "best anchor of each box is positive" rule is applied here, to real boxes only.
- `padded_nms` is TensorFlow's greedy NMS kernel (NonMaxSuppressionV4, padded to a
  fixed size) mapped over the batch, not keras-hub's NonMaxSuppression: keras-hub 0.32
  builds each tile's indices as `cast(linspace(i * 512, (i + 1) * 512 - 1, 512), int32)`,
  and in a (non-XLA) tf.function TensorFlow's LinSpace gives values such as 62.99998
  there, so tiles gather the wrong boxes and boxes that should be kept go missing (seen
  here: 3 of 64 kept boxes wrong on random data; eager and XLA are right). TensorFlow's
  tiled `non_max_suppression_padded` keeps the same boxes as the kernel but is a loop of
  small ops: 40 ms against 7 ms for 16 images of 1,000 boxes to 256 on 2 CPU cores.
"""
from __future__ import annotations

import keras
import keras_hub
import tensorflow as tf

FORMAT = "yxyx"
# Box deltas are regressed divided by these scales (centre offsets 0.1, log sizes 0.2): Faster
# R-CNN's, matterport's BBOX_STD_DEV, keras-cv's RetinaNet's. Both detectors use them.
BOX_DELTA_SCALES = (0.1, 0.1, 0.2, 0.2)

# ---------------------------------------------------------------------------
# Deterministic sampling order


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection on uint32 that mixes every input bit."""
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))
    h = h * tf.constant(0x85EBCA6B, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(13, tf.uint32)))
    h = h * tf.constant(0xC2B2AE35, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))


# Pixels per side of the grid of samples an image's key is hashed from.
_KEY_GRID = 8


def image_keys(images):
    """uint32 [B]: a hash of each image's pixels on an 8x8 grid (exact bits, no float sums).

    Two images that differ anywhere on the grid get unrelated keys; an image gets the
    same key whichever replica or batch position holds it.
    """
    images = tf.cast(images, tf.float32)
    size = images.shape[1]
    stride = max(size // _KEY_GRID, 1)
    grid = images[:, stride // 2 :: stride, stride // 2 :: stride, 0]
    bits = tf.reshape(tf.bitcast(grid, tf.uint32), [tf.shape(images)[0], -1])
    positions = tf.cast(tf.range(tf.shape(bits)[1]), tf.uint32)
    mixed = _fmix32(bits + _fmix32(positions + tf.constant(0x9E3779B9, tf.uint32)))
    return tf.reduce_sum(mixed, axis=1)  # uint32 sums wrap: order-free and exact


def sampling_priorities(keys, step, ids, salt: int):
    """int32 [B, N] in [0, 2**31): the order in which the candidates `ids` ([N] or [B, N]) are sampled.

    A pure function of (image key, step, candidate id, salt): reproducible, the same on
    any replica, and different at every step. Keying on an id that names the candidate
    (an anchor's index) rather than its rank keeps a candidate's priority when two of
    them swap places (a near tie between scores).
    """
    step = tf.cast(step, tf.uint32) * tf.constant(0x9E3779B9, tf.uint32)
    seed = _fmix32(keys + step + tf.constant(salt * 0x632BE5AB & 0xFFFFFFFF, tf.uint32))
    ids = _fmix32(tf.cast(ids, tf.uint32) * tf.constant(0x85EBCA77, tf.uint32) + 1)
    hashed = _fmix32(tf.bitwise.bitwise_xor(seed[:, None], ids))
    return tf.cast(tf.bitwise.right_shift(hashed, tf.constant(1, tf.uint32)), tf.int32)


def balanced_sample(positive, negative, priority, size: int, max_positives: int):
    """Fixed-size sampling of candidates: up to `max_positives` positives, negatives fill the rest.

    positive, negative: bool [B, N] (disjoint; candidates that are neither are never
    taken); priority: int32 [B, N] >= 0, highest taken first. Returns, per image, `size`
    slots with the positives first: indices int32 [B, size] into N, is_positive bool
    [B, size] and valid bool [B, size] (False for slots left empty because the image
    has too few candidates; their index is meaningless).
    """
    if not 0 < max_positives <= size:
        raise ValueError(f"need 0 < max_positives <= size, got {max_positives} and {size}")
    missing = tf.constant(-1, tf.int32)
    positive_priority, positive_index = tf.math.top_k(tf.where(positive, priority, missing), k=max_positives)
    negative_priority, negative_index = tf.math.top_k(tf.where(negative, priority, missing), k=size)
    num_positive = tf.reduce_sum(tf.cast(positive_priority >= 0, tf.int32), axis=1, keepdims=True)
    slot = tf.range(size, dtype=tf.int32)[None, :]
    is_positive = slot < num_positive
    positive_slot = tf.broadcast_to(tf.minimum(slot, max_positives - 1), tf.shape(is_positive))
    negative_slot = tf.maximum(slot - num_positive, 0)
    indices = tf.where(
        is_positive,
        tf.gather(positive_index, positive_slot, batch_dims=1),
        tf.gather(negative_index, negative_slot, batch_dims=1),
    )
    valid = is_positive | (tf.gather(negative_priority, negative_slot, batch_dims=1) >= 0)
    return indices, is_positive, valid


# ---------------------------------------------------------------------------
# Boxes


def encode(reference, boxes, std):
    """Deltas (dy, dx, log dh, log dw) / std of `boxes` against `reference` (same shapes, or [N, 4] reference)."""
    return keras.utils.bounding_boxes.encode_box_to_deltas(
        reference, boxes, anchor_format=FORMAT, box_format=FORMAT, variance=list(std)
    )


def decode(reference, deltas, std):
    """Inverse of `encode`, clipped to the image."""
    boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
        reference, deltas, anchor_format=FORMAT, box_format=FORMAT, variance=list(std)
    )
    return tf.clip_by_value(boxes, 0.0, 1.0)


def smooth_l1(difference):
    """Huber loss with delta 1, elementwise (matterport's smooth_l1_loss)."""
    absolute = tf.abs(difference)
    return tf.where(absolute < 1.0, 0.5 * tf.square(difference), absolute - 0.5)


def iou_with_ground_truth(boxes, gt_boxes, gt_valid):
    """IoU [B, N, G] of boxes ([N, 4] shared or [B, N, 4]) with each image's boxes; -1 for padding."""
    iou = keras.utils.bounding_boxes.compute_iou(boxes, gt_boxes, bounding_box_format=FORMAT)
    return tf.where(gt_valid[:, None, :], iou, -1.0)


def match_anchors(anchors, gt_boxes, gt_valid, positive_iou: float, negative_iou: float):
    """RPN labels of every anchor: 1 positive, 0 negative, -1 ignored; and each anchor's box.

    Positive: IoU >= positive_iou with some box, or the highest IoU any anchor has with
    one of the boxes (ties all count, as in matterport's build_rpn_targets). Negative:
    IoU < negative_iou with every box (every anchor of an image without boxes).
    Returns labels int32 [B, A] and the matched box float32 [B, A, 4].
    """
    iou = iou_with_ground_truth(anchors, gt_boxes, gt_valid)
    matcher = keras_hub.layers.BoxMatcher(thresholds=[negative_iou, positive_iou], match_values=[0, -1, 1])
    matched, labels = matcher(iou)
    best_of_box = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, G]; -1 for padding
    best_anchor = tf.reduce_any((iou >= best_of_box) & (best_of_box > 0.0), axis=2)
    labels = tf.where(best_anchor, 1, labels)
    return labels, tf.gather(gt_boxes, matched, batch_dims=1)


def sample_rois(proposals, proposal_valid, gt_boxes, gt_valid, priority, size: int, max_positives: int,
                positive_iou: float, std):
    """The second stage's training RoIs: proposals plus the ground truth, sampled to `size` per image.

    A candidate is positive when its IoU with some box is >= positive_iou, negative
    otherwise (every candidate of an image without boxes). `priority` int32 [B, K + G]
    orders the proposals, then the ground truth (see sampling_priorities). Returns a dict of [B, size] tensors,
    positives first: rois [.., 4], is_positive, valid, targets [.., 4] (the matched box
    encoded against the RoI; zero for negatives).
    """
    candidates = tf.concat([proposals, gt_boxes], axis=1)
    candidate_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    iou = iou_with_ground_truth(candidates, gt_boxes, gt_valid)
    matcher = keras_hub.layers.BoxMatcher(thresholds=[positive_iou], match_values=[0, 1])
    matched, labels = matcher(iou)
    indices, is_positive, valid = balanced_sample(
        candidate_valid & (labels == 1), candidate_valid & (labels == 0), priority, size, max_positives
    )
    rois = tf.gather(candidates, indices, batch_dims=1)
    matched_boxes = tf.gather(gt_boxes, tf.gather(matched, indices, batch_dims=1), batch_dims=1)
    targets = tf.where(is_positive[..., None], encode(rois, matched_boxes, std), 0.0)
    return {"rois": rois, "is_positive": is_positive, "valid": valid, "targets": targets}


# ---------------------------------------------------------------------------
# Proposals and detections


def padded_nms(boxes, scores, max_outputs: int, iou_threshold: float, score_threshold: float):
    """Greedy NMS with a fixed output size: (indices int32 [B, max_outputs] into N, count int32 [B]).

    boxes [B, N, 4], scores [B, N]. Kept boxes come highest score first; rows past
    `count` are padding. A box is suppressed when its IoU with a kept,
    higher-scored box is > iou_threshold; scores <= score_threshold are dropped.
    TensorFlow's NonMaxSuppressionV4 kernel per image: static shapes, compiles with XLA
    (tf2xla has it when padded, for at most N outputs), any batch size.
    """
    outputs = min(int(max_outputs), int(boxes.shape[1]))  # XLA's kernel gives at most N

    def one_image(args):
        image_boxes, image_scores = args
        indices, count = tf.raw_ops.NonMaxSuppressionV4(
            boxes=image_boxes, scores=image_scores, max_output_size=outputs, iou_threshold=iou_threshold,
            score_threshold=score_threshold, pad_to_max_output_size=True)
        return indices, count

    indices, count = tf.map_fn(one_image, (tf.cast(boxes, tf.float32), tf.cast(scores, tf.float32)),
                               fn_output_signature=(tf.TensorSpec([outputs], tf.int32), tf.TensorSpec([], tf.int32)))
    return tf.pad(indices, [[0, 0], [0, max_outputs - outputs]]), count


def propose(logits, deltas, anchors, pre_nms: int, post_nms: int, iou_threshold: float, std):
    """RPN outputs -> proposals: top `pre_nms` anchors by objectness, decoded, clipped, NMS to `post_nms`.

    logits [B, A], deltas [B, A, 4], anchors [A, 4]. Returns boxes [B, post_nms, 4]
    (zero-padded), valid [B, post_nms] and the index of each proposal's anchor int32
    [B, post_nms] (the sampler keys its order on it). No gradient: the second stage does
    not train the RPN.
    """
    logits, deltas = tf.stop_gradient(logits), tf.stop_gradient(deltas)
    scores, top = tf.math.top_k(tf.cast(logits, tf.float32), k=pre_nms)
    boxes = decode(tf.gather(anchors, top), tf.gather(tf.cast(deltas, tf.float32), top, batch_dims=1), std)
    kept, count = padded_nms(boxes, tf.sigmoid(scores), post_nms, iou_threshold, float("-inf"))
    valid = tf.range(post_nms)[None, :] < count[:, None]
    boxes = tf.where(valid[..., None], tf.gather(boxes, kept, batch_dims=1), 0.0)
    return boxes, valid, tf.gather(top, kept, batch_dims=1)


def detect(rois, roi_valid, class_logits, deltas, std, min_confidence: float, iou_threshold: float,
           max_detections: int):
    """The detection layer: refined RoIs scored by P(opacity), thresholded, NMS, the best `max_detections`.

    rois [B, N, 4], roi_valid [B, N], class_logits [B, N, 2] (background, opacity),
    deltas [B, N, 4]. A RoI is kept when its opacity probability is >= min_confidence
    (matterport's DETECTION_MIN_CONFIDENCE). Returns boxes [B, max_detections, 4],
    scores [B, max_detections] (highest first, zero-padded) and counts int32 [B].
    """
    scores = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[..., 1]
    boxes = decode(rois, tf.cast(deltas, tf.float32), std)
    scores = tf.where(roi_valid & (scores >= min_confidence), scores, 0.0)
    kept, count = padded_nms(boxes, scores, max_detections, iou_threshold, 0.0)
    valid = tf.range(max_detections)[None, :] < count[:, None]
    return (tf.where(valid[..., None], tf.gather(boxes, kept, batch_dims=1), 0.0),
            tf.where(valid, tf.gather(scores, kept, batch_dims=1), 0.0), count)


# ---------------------------------------------------------------------------
# RoIAlign


def fpn_levels(boxes, image_size: int, num_levels: int, min_level: int = 2, canonical_size: float = 224.0,
               canonical_level: int = 4):
    """Index (0 = min_level) of the pyramid level each box is pooled from, int32 [B, N].

    The FPN paper's rule: level = floor(4 + log2(sqrt(area in pixels) / 224)), clipped
    to the levels that exist.
    """
    heights = (boxes[..., 2] - boxes[..., 0]) * image_size
    widths = (boxes[..., 3] - boxes[..., 1]) * image_size
    side = tf.sqrt(tf.maximum(heights * widths, 1e-6))
    level = tf.floor(canonical_level + tf.math.log(side / canonical_size) / tf.math.log(2.0))
    return tf.cast(tf.clip_by_value(level - min_level, 0, num_levels - 1), tf.int32)


def roi_align(feature_maps, boxes, levels, output_size: int):
    """RoIAlign: [B, N, output_size, output_size, C] features of each box, from the map `levels` picks.

    feature_maps: list of [B, H_l, W_l, C] (same C); boxes [B, N, 4] normalised; levels
    int32 [B, N] indexes feature_maps. One bilinear sample at the centre of each output
    bin (sampling ratio 1). Feature cell (i, j) of an H x W map covers the image
    region [i/H, (i+1)/H) x [j/W, (j+1)/W) and is sampled at its centre (Detectron2's
    `aligned=True`); samples are clamped to the centres of the border cells.
    Written with gathers: crop_and_resize has no XLA kernel.
    """
    batch = tf.shape(boxes)[0]
    num_boxes = boxes.shape[1]
    channels = feature_maps[0].shape[-1]
    heights = [int(f.shape[1]) for f in feature_maps]
    widths = [int(f.shape[2]) for f in feature_maps]
    offsets = [0]
    for height, width in zip(heights[:-1], widths[:-1]):
        offsets.append(offsets[-1] + height * width)
    flat = tf.concat([tf.reshape(f, [batch, -1, channels]) for f in feature_maps], axis=1)

    height = tf.gather(tf.constant(heights, tf.float32), levels)[..., None]  # [B, N, 1]
    width = tf.gather(tf.constant(widths, tf.float32), levels)[..., None]
    offset = tf.gather(tf.constant(offsets, tf.int32), levels)[..., None, None]
    row_width = tf.cast(width, tf.int32)[..., None]  # [B, N, 1, 1]

    boxes = tf.cast(boxes, tf.float32)
    centres = (tf.range(output_size, dtype=tf.float32) + 0.5) / output_size

    def sample_positions(start, end, size):
        position = (start[..., None] + centres * (end - start)[..., None]) * size - 0.5
        position = tf.clip_by_value(position, 0.0, size - 1.0)
        low = tf.floor(position)
        high = tf.minimum(low + 1.0, size - 1.0)
        return tf.cast(low, tf.int32), tf.cast(high, tf.int32), position - low

    y_low, y_high, y_fraction = sample_positions(boxes[..., 0], boxes[..., 2], height)  # [B, N, P]
    x_low, x_high, x_fraction = sample_positions(boxes[..., 1], boxes[..., 3], width)

    def corner(y, x):
        index = offset + y[..., :, None] * row_width + x[..., None, :]  # [B, N, P, P]
        values = tf.gather(flat, tf.reshape(index, [batch, -1]), batch_dims=1)
        return tf.reshape(values, [batch, num_boxes, output_size, output_size, channels])

    y_fraction = tf.cast(y_fraction[..., :, None, None], flat.dtype)
    x_fraction = tf.cast(x_fraction[..., None, :, None], flat.dtype)
    top = corner(y_low, x_low) * (1 - x_fraction) + corner(y_low, x_high) * x_fraction
    bottom = corner(y_high, x_low) * (1 - x_fraction) + corner(y_high, x_high) * x_fraction
    return top * (1 - y_fraction) + bottom * y_fraction
