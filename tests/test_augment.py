"""Tests for pneumo_tf.data.augment: exact geometry, box/mask agreement, determinism, graph/XLA/replicas."""
import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from pneumo_tf.data import augment
from pneumo_tf.data.augment import AugmentConfig, augment_batch
from pneumo_tf.errors import UserError
from pneumo_tf.records.boxes import MAX_BOXES, rasterize

SIZE = 64
# Boxes per image as pixel (top, left, bottom, right), far enough apart that their
# masks stay separate blobs after any augmentation tested here.
PIXEL_BOXES = [
    [(6, 8, 22, 26), (34, 38, 56, 58)],
    [(12, 20, 44, 40)],
    [],
    [(4, 4, 14, 12), (40, 10, 58, 24), (30, 44, 46, 60)],
]
SEED = tf.constant([3, 7], tf.int32)
STRONG = AugmentConfig(rotation_range=15.0, zoom_range=0.2, width_shift_range=0.15, height_shift_range=0.15)


def make_batch():
    """A batch whose mask is exactly the rasterised boxes (pneumo_tf.records.boxes convention)."""
    rng = np.random.default_rng(0)
    batch_size = len(PIXEL_BOXES)
    boxes = np.zeros((batch_size, MAX_BOXES, 4), np.float32)
    mask = np.zeros((batch_size, SIZE, SIZE, 1), np.float32)
    for i, pixel_boxes in enumerate(PIXEL_BOXES):
        if pixel_boxes:
            boxes[i, : len(pixel_boxes)] = np.array(pixel_boxes, np.float32) / SIZE
        xyxy = [(left / SIZE, top / SIZE, right / SIZE, bottom / SIZE) for top, left, bottom, right in pixel_boxes]
        mask[i, ..., 0] = rasterize(xyxy, SIZE, SIZE)
    return {
        "image": tf.constant(rng.random((batch_size, SIZE, SIZE, 1), dtype=np.float32)),
        "mask": tf.constant(mask),
        "boxes": tf.constant(boxes),
        "num_boxes": tf.constant([len(b) for b in PIXEL_BOXES], tf.int32),
        "target": tf.constant([1, 1, 0, 1], tf.int32),
        "class": tf.constant([2, 2, 0, 2], tf.int32),
        "id": tf.constant([f"patient-{i}" for i in range(batch_size)]),
    }


def params(batch_size, **values):
    """Fixed augmentation parameters: identity except the given per-image values."""
    defaults = dict(flip=0.0, angle=0.0, scale=1.0, shift_x=0.0, shift_y=0.0, brightness=0.0, contrast=1.0)
    defaults.update(values)
    return augment._Params(
        **{
            name: tf.constant(np.broadcast_to(np.float32(value), (batch_size,))[:, None])
            for name, value in defaults.items()
        }
    )


def numpy(batch):
    return {key: value.numpy() for key, value in batch.items()}


def assert_batches_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def assert_batches_close(actual, expected):
    """Equal up to float rounding in image and boxes: Grappler's constant folding may
    reassociate float arithmetic, so two different graphs can differ in the last bit."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        if key in ("image", "boxes"):
            np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def assert_valid(batch):
    image, mask, boxes, num_boxes = batch["image"], batch["mask"], batch["boxes"], batch["num_boxes"]
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(mask)) <= {0.0, 1.0}
    for i, count in enumerate(num_boxes):
        assert np.all(boxes[i, count:] == 0.0)
        assert np.all(boxes[i, :count, 2] > boxes[i, :count, 0]) and np.all(boxes[i, :count, 3] > boxes[i, :count, 1])
        assert boxes[i].min() >= 0.0 and boxes[i].max() <= 1.0


def test_off_returns_the_batch_bit_for_bit():
    batch = make_batch()
    # Off-grid boxes too: the identity must not round any coordinate.
    rng = np.random.default_rng(1)
    top_left = rng.random((4, MAX_BOXES, 2)) * 0.5
    boxes = np.concatenate([top_left, top_left + 0.05 + rng.random((4, MAX_BOXES, 2)) * 0.45], axis=-1)
    boxes = (boxes * (np.arange(MAX_BOXES) < 3)[None, :, None]).astype(np.float32)
    batch.update(boxes=tf.constant(boxes), num_boxes=tf.constant([3, 3, 3, 3], tf.int32))
    assert_batches_equal(numpy(augment_batch(batch, SEED, AugmentConfig.off())), numpy(batch))


def test_flip_is_exact():
    batch = make_batch()
    config = dataclasses.replace(AugmentConfig.off(), flip_probability=1.0)
    out = numpy(augment_batch(batch, SEED, config))
    expected = numpy(batch)
    np.testing.assert_array_equal(out["image"], expected["image"][:, :, ::-1])
    np.testing.assert_array_equal(out["mask"], expected["mask"][:, :, ::-1])
    ymin, xmin, ymax, xmax = np.moveaxis(expected["boxes"], -1, 0)
    flipped = np.stack([ymin, np.float32(1) - xmax, ymax, np.float32(1) - xmin], axis=-1)
    flipped[np.arange(MAX_BOXES)[None, :] >= expected["num_boxes"][:, None]] = 0.0
    np.testing.assert_array_equal(out["boxes"], flipped)
    np.testing.assert_array_equal(out["num_boxes"], expected["num_boxes"])


def test_whole_pixel_shift_moves_pixels_and_drops_boxes_left_out_of_frame():
    batch = make_batch()
    # Image 0 moves right by 32 px, image 3 up by 16 px; images 1 and 2 stay put.
    out = numpy(augment._augment_with(batch, params(4, shift_x=[0.5, 0, 0, 0], shift_y=[0, 0, 0, -0.25])))
    image = batch["image"].numpy()
    np.testing.assert_array_equal(out["image"][0, :, 32:], image[0, :, :32])
    np.testing.assert_array_equal(out["image"][0, :, :32], 0.0)
    np.testing.assert_array_equal(out["image"][3, :48], image[3, 16:])
    np.testing.assert_array_equal(out["image"][3, 48:], 0.0)
    np.testing.assert_array_equal(out["image"][1:3], image[1:3])
    # Image 0: the right box leaves the frame, the left one lands at columns 40..58.
    # Image 3: the top box leaves the frame, the other two move up 16 px and come first.
    expected_boxes = np.zeros((4, MAX_BOXES, 4), np.float32)
    expected_boxes[0, 0] = np.array([6, 40, 22, 58]) / SIZE
    expected_boxes[1, 0] = np.array([12, 20, 44, 40]) / SIZE
    expected_boxes[3, :2] = np.array([[24, 10, 42, 24], [14, 44, 30, 60]]) / SIZE
    np.testing.assert_array_equal(out["num_boxes"], [1, 1, 0, 2])
    np.testing.assert_array_equal(out["boxes"], expected_boxes)
    # The shifted mask is still exactly the rasterised boxes.
    for i in range(4):
        ymin, xmin, ymax, xmax = out["boxes"][i, : out["num_boxes"][i]].T
        np.testing.assert_array_equal(out["mask"][i, ..., 0], rasterize(zip(xmin, ymin, xmax, ymax), SIZE, SIZE))


def test_box_partly_out_of_frame_is_clipped():
    batch = make_batch()
    # Image 1's box (rows 12..44) moves up 16 px to rows -4..28 and is clipped at the top.
    out = numpy(augment._augment_with(batch, params(4, shift_y=[0, -0.25, 0, 0])))
    np.testing.assert_array_equal(out["boxes"][1, 0], np.array([0, 20, 28, 40], np.float32) / SIZE)
    np.testing.assert_array_equal(out["num_boxes"], [2, 1, 0, 3])


def blob_boxes(mask):
    """Pixel-edge boxes (top, left, bottom, right) of the mask's connected blobs."""
    labels, _ = scipy.ndimage.label(mask)
    return np.array([(rows.start, cols.start, rows.stop, cols.stop)
                     for rows, cols in scipy.ndimage.find_objects(labels)])


# A blob's box differs from the mapped box by pixel quantisation (up to 0.5 px) and,
# with rotation, where bilinear-then-threshold rounds the rectangle's corners.
@pytest.mark.parametrize("config, tolerance", [(AugmentConfig(), 1.0), (STRONG, 2.0)], ids=["default", "strong"])
def test_mask_blobs_match_transformed_boxes(config, tolerance):
    batch = make_batch()
    errors = []
    for step in range(6):
        out = numpy(augment_batch(batch, tf.constant([11, step], tf.int32), config))
        assert_valid(out)
        for i in range(len(PIXEL_BOXES)):
            boxes = out["boxes"][i, : out["num_boxes"][i]] * SIZE
            blobs = blob_boxes(out["mask"][i, ..., 0])
            # Every kept box has exactly one blob and every blob one box: pair by nearest centre.
            assert len(blobs) == len(boxes), (step, i)
            for box in boxes:
                distance = np.abs((blobs[:, :2] + blobs[:, 2:]) - (box[:2] + box[2:])).sum(axis=1)
                errors.append(np.abs(blobs[np.argmin(distance)] - box).max())
    assert len(errors) >= 30
    assert max(errors) <= tolerance


def test_same_seed_same_output_other_seed_differs():
    batch = make_batch()
    first = numpy(augment_batch(batch, SEED, STRONG))
    assert_batches_equal(numpy(augment_batch(batch, SEED, STRONG)), first)
    other = numpy(augment_batch(batch, tf.constant([3, 8], tf.int32), STRONG))
    for key in ("image", "mask", "boxes"):
        assert not np.array_equal(other[key], first[key]), key


def test_graph_mode_equals_eager():
    batch = make_batch()
    # An unknown batch size, as the last partial batch of a dataset would have.
    signature = {key: tf.TensorSpec([None, *value.shape[1:]], value.dtype) for key, value in batch.items()}

    @tf.function(input_signature=[signature, tf.TensorSpec([2], tf.int32)])
    def graph_augment(batch, seed):
        return augment_batch(batch, seed, STRONG)

    assert_batches_close(numpy(graph_augment(batch, SEED)), numpy(augment_batch(batch, SEED, STRONG)))


def test_compiles_with_xla():
    # XLA's Philox stream differs from the CPU kernel's, so random draws are not
    # compared with eager; the flip-only config needs no randomness and must be exact.
    def compiled(config):
        @tf.function(jit_compile=True)
        def run(batch, seed):
            return augment_batch(batch, seed, config)

        return run

    # Strings cannot enter an XLA cluster, so the id key stays outside.
    batch = {key: value for key, value in make_batch().items() if key != "id"}
    flip = dataclasses.replace(AugmentConfig.off(), flip_probability=1.0)
    assert_batches_equal(numpy(compiled(flip)(batch, SEED)), numpy(augment_batch(batch, SEED, flip)))
    strong = compiled(STRONG)
    out = numpy(strong(batch, SEED))
    assert_valid(out)
    assert_batches_equal(numpy(strong(batch, SEED)), out)


def test_photometric_jitter_touches_the_image_only_and_clips():
    batch = make_batch()
    image = batch["image"].numpy()
    out = numpy(augment._augment_with(batch, params(4, brightness=[0.25, -0.25, 0, 0], contrast=[1, 1, 0.5, 3])))
    np.testing.assert_array_equal(out["image"][0], np.minimum(image[0] + np.float32(0.25), 1))
    np.testing.assert_array_equal(out["image"][1], np.maximum(image[1] - np.float32(0.25), 0))
    for i, factor in ((2, 0.5), (3, 3.0)):
        mean = image[i].mean()
        np.testing.assert_allclose(out["image"][i], np.clip((image[i] - mean) * factor + mean, 0, 1), atol=1e-6)
    assert out["image"][3].min() == 0.0 and out["image"][3].max() == 1.0
    for key in ("mask", "boxes", "num_boxes"):
        np.testing.assert_array_equal(out[key], batch[key].numpy())


def test_other_keys_pass_through_and_dtypes_are_kept():
    batch = make_batch()
    batch["image"] = tf.cast(batch["image"], tf.bfloat16)
    out = augment_batch(batch, SEED, STRONG)
    assert out["image"].dtype == tf.bfloat16 and out["mask"].dtype == tf.float32
    assert out["boxes"].dtype == tf.float32 and out["num_boxes"].dtype == tf.int32
    for key in ("target", "class", "id"):
        assert out[key] is batch[key]


def test_resample_matches_image_projective_transform():
    # The gather-based resampler replaces ImageProjectiveTransformV3 (no XLA kernel)
    # and must keep its output->input convention, bilinear weights and zero fill.
    rng = np.random.default_rng(2)
    images = rng.random((3, 16, 20, 2), dtype=np.float32)
    coefficients = rng.normal(0.0, 0.3, (3, 6)).astype(np.float32) + np.float32([1, 0, 2, 0, 1, -1.5])
    ours = augment._resample(tf.constant(images), tuple(tf.constant(c[:, None]) for c in coefficients.T))
    reference = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=np.pad(coefficients, [(0, 0), (0, 2)]),
        output_shape=[16, 20],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-6)


@pytest.mark.slow
def test_replicas_get_their_own_seed_under_mirrored_strategy():
    # Logical CPU devices must be set before TensorFlow starts, hence a fresh process.
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf
        from pneumo_tf.data.augment import AugmentConfig, augment_batch, replica_seed
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        rng = np.random.default_rng(0)
        batch = {
            # Four copies of one image: replicas see equal shards, so only their seeds differ.
            "image": np.tile(rng.random((1, 16, 16, 1), dtype=np.float32), (4, 1, 1, 1)),
            "mask": np.zeros((4, 16, 16, 1), np.float32),
            "boxes": np.tile(np.float32([[0.25, 0.25, 0.75, 0.5]] + [[0, 0, 0, 0]] * 7), (4, 1, 1)),
            "num_boxes": np.ones(4, np.int32),
        }
        batch["mask"][:, 4:12, 4:8] = 1.0
        seed = tf.constant([5, 9], tf.int32)
        config = AugmentConfig(rotation_range=10.0)
        shards = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch)))

        @tf.function
        def step(shard):
            return strategy.run(lambda b: augment_batch(b, replica_seed(seed), config), args=(shard,))

        results = strategy.experimental_local_results(step(next(shards)))
        for replica, result in enumerate(results):
            shard = {key: value[2 * replica : 2 * replica + 2] for key, value in batch.items()}
            own_seed = tf.random.experimental.stateless_fold_in(seed, replica, alg="philox")
            expected = augment_batch(shard, own_seed, config)
            # Tolerance for image and boxes: the replica graph and eager may round differently.
            for key in batch:
                atol = 1e-6 if key in ("image", "boxes") else 0
                np.testing.assert_allclose(result[key].numpy(), expected[key].numpy(), rtol=0, atol=atol, err_msg=key)
        assert not np.array_equal(results[0]["image"].numpy(), results[1]["image"].numpy())
        print("replicas ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "replicas ok" in run.stdout


@pytest.mark.parametrize(
    "bad",
    [
        dict(flip_probability=1.5),
        dict(rotation_range=-1.0),
        dict(zoom_range=1.0),
        dict(width_shift_range=-0.1),
        dict(contrast_range=(1.2, 0.8)),
        dict(contrast_range=(0.9,)),
    ],
)
def test_config_rejects_bad_ranges(bad):
    with pytest.raises(UserError, match="augment"):
        AugmentConfig(**bad)


def test_config_is_hashable_with_a_list_for_contrast():
    assert hash(AugmentConfig(contrast_range=[0.8, 1.2])) == hash(AugmentConfig(contrast_range=(0.8, 1.2)))


def test_batches_without_a_mask_transform_image_and_boxes_as_with_one():
    # Classifier batches carry no mask: the image and boxes must come out as they do with one.
    batch = make_batch()
    seed = tf.constant([5, 9], tf.int64)
    with_mask = augment_batch(batch, seed, AugmentConfig())
    without = augment_batch({k: v for k, v in batch.items() if k != "mask"}, seed, AugmentConfig())
    assert "mask" not in without
    np.testing.assert_allclose(without["image"].numpy(), with_mask["image"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(without["boxes"].numpy(), with_mask["boxes"].numpy())
    np.testing.assert_array_equal(without["num_boxes"].numpy(), with_mask["num_boxes"].numpy())


def test_strength_scales_every_range_but_the_flip():
    base = AugmentConfig()
    assert base.scaled(1.0) == base
    assert base.scaled(0.0) == dataclasses.replace(AugmentConfig.off(), flip_probability=base.flip_probability)
    double = base.scaled(2.0)
    assert (double.rotation_range, double.zoom_range, double.width_shift_range, double.height_shift_range,
            double.brightness_delta) == pytest.approx((4.0, 0.3, 0.3, 0.3, 0.2))
    assert double.contrast_range == pytest.approx((0.8, 1.2)) and double.flip_probability == 0.5
    # Zoom stays below 1 (a scale of 0 has no inverse), contrast at or above 0.
    assert AugmentConfig().scaled(20.0).zoom_range == 0.9 and AugmentConfig().scaled(20.0).contrast_range[0] == 0.0
