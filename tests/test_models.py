"""What is specific to cnn, vgg16 and mask_resnet (their parameter arithmetic, options, shapes), the registry,
losses and mask post-processing, on 32-64 px inputs. What every architecture shares is in tests/test_contract.py."""
from __future__ import annotations

import keras
import numpy as np
import pytest

import keras2_h5  # tests/keras2_h5.py
from pneumo_tf import models
from pneumo_tf.data import metadata
from pneumo_tf.errors import UserError
from pneumo_tf.models import vgg16
from pneumo_tf.models.losses import iou_bce_loss, mean_iou
from pneumo_tf.models.mask_resnet import boxes_from_mask
from pneumo_tf.records import boxes
from pneumo_tf.records.boxes import MAX_BOXES
from tiny_models import TINY

SIZE = 64


def build_model(name, image_size, **options):
    architecture = models.get(name)
    return architecture.build(image_size, architecture.make_options(options))


def _batch(seed: int = 0, n: int = 2, fields=()) -> dict:
    """A random n-image pipeline batch (image, mask, target, class, boxes, num_boxes), with the
    encoded metadata of `fields`."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, n).astype(np.int32)
    batch = {
        "image": rng.random((n, SIZE, SIZE, 1), dtype=np.float32),
        "mask": (rng.random((n, SIZE, SIZE, 1)) > 0.5).astype(np.float32),
        "target": target,
        "class": np.where(target == 1, 2, rng.integers(0, 2, n)).astype(np.int32),
        "boxes": np.zeros((n, MAX_BOXES, 4), np.float32),
        "num_boxes": np.zeros(n, np.int32),
        "view": np.array(["AP", "PA", ""][:n] + ["PA"] * max(n - 3, 0)), "sex": np.array(["F"] * n),
        "age": np.arange(n, dtype=np.int32) + 30,
    }
    return {key: np.asarray(value) for key, value in metadata.with_metadata(batch, fields).items()}


# Parameter counts from layer shapes. BatchNormalization holds 4 vectors (gamma,
# beta, moving mean and variance); kernels are k*k*in*out, plus out for a bias.
def _conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _separable(cin, cout):
    return 3 * 3 * cin + cin * cout + cout  # depthwise, pointwise, bias


def _mask_resnet_params(channels, n_blocks, depth, head_classes=0, metadata_width=0):
    total = _conv(3, 1, channels, bias=False)
    for _ in range(depth):
        cin, channels = channels, channels * 2
        total += 4 * cin + _conv(1, cin, channels, bias=False)
        total += n_blocks * 2 * (4 * channels + _conv(3, channels, channels, bias=False))
    total += 4 * channels + _conv(1, channels, 1)
    metadata_bias = metadata_width + 1 if metadata_width else 0  # Dense(1) on the metadata
    return total + head_classes * (channels + metadata_width + 1) + metadata_bias


def _cnn_params_at_64(width=1.0, metadata_width=0):
    # At 64 px six halvings leave 1x1xC to flatten; width scales every layer.
    def scaled(count):
        return round(count * width)

    total = _conv(3, 1, scaled(128)) + _conv(3, scaled(128), scaled(128))
    for cin, cout in [(128, 256), (256, 256), (256, 256), (256, 256), (256, 512)]:
        total += _separable(scaled(cin), scaled(cout)) + _separable(scaled(cout), scaled(cout)) + 4 * scaled(cout)
    for index, (cin, cout) in enumerate([(512, 512), (512, 256), (256, 128), (128, 1)]):
        inputs = scaled(cin) + (metadata_width if index == 0 else 0)  # the metadata joins the flattened features
        total += inputs * (scaled(cout) if cout > 1 else 1) + (scaled(cout) if cout > 1 else 1)
    return total


# VGG16 without top has 14,714,688 parameters; 64 px leaves 2x2x512 to flatten into a 64-unit layer.
_VGG16_HEAD = (2 * 2 * 512 * 64 + 64) + (64 + 1)


def test_golden_counts_are_the_hand_arithmetic():
    """tests/tiny_models.py's golden counts (which tests/test_contract.py checks the builds against), and
    the default options' counts, from layer shapes."""
    # channels=4, n_blocks=1, depth=2: stem 36; level 1 (8 ch) 16+32+2*(32+576) = 1264;
    # level 2 (16 ch) 32+128+2*(64+2304) = 4896; head 64+17 = 81; total 6277.
    assert TINY["mask_resnet"].options == {"channels": 4, "n_blocks": 1, "depth": 2}
    assert TINY["mask_resnet"].params == _mask_resnet_params(4, 1, 2) == 6277
    # Three classes from the 16 pooled channels and the 8 metadata values; the metadata's logit bias.
    assert TINY["mask_resnet"].side_params == _mask_resnet_params(4, 1, 2, 3, 8) == 6277 + 3 * 25 + 9
    assert build_model("mask_resnet", SIZE).count_params() == _mask_resnet_params(32, 2, 4) == 12_727_969
    with_head = build_model("mask_resnet", SIZE, channels=4, n_blocks=1, depth=2, image_head="binary")
    assert with_head.count_params() == _mask_resnet_params(4, 1, 2, head_classes=1) == 6277 + 17
    assert TINY["cnn"].options == {"width": 0.25}
    assert TINY["cnn"].params == _cnn_params_at_64(0.25) == 100_097
    assert TINY["cnn"].side_params == _cnn_params_at_64(0.25, metadata_width=8)
    assert build_model("cnn", SIZE).count_params() == _cnn_params_at_64() == 1_494_017
    assert TINY["vgg16"].options == {}
    assert TINY["vgg16"].params == 14_714_688 + _VGG16_HEAD
    assert TINY["vgg16"].side_params == 14_714_688 + _VGG16_HEAD + 8 * 64


@pytest.mark.parametrize("shapes_features", [False, True])
def test_image_head_loss_reaches_the_shared_features_only_when_asked(shapes_features):
    import tensorflow as tf

    model = build_model("mask_resnet", SIZE, channels=4, n_blocks=1, depth=2, image_head="three_class",
                        image_head_shapes_features=shapes_features)
    images = np.random.default_rng(0).random((2, SIZE, SIZE, 1), dtype=np.float32)
    labels = {"class": np.array([2, 0], np.int32), "mask": np.zeros_like(images)}
    with tf.GradientTape() as tape:
        loss = models.get("mask_resnet").loss(model, {"image": images}, labels, model({"image": images},
                                                                                       training=True), True)["image"]
    head = {"image_logits/kernel", "image_logits/bias"}
    gradients = {weight.path: gradient for weight, gradient in
                 zip(model.trainable_weights, tape.gradient(loss, model.trainable_weights))}
    assert all(np.abs(gradients[path]).max() > 0 for path in head)
    # The mask's 1x1 logits are not below the head; every other weight computes the features it pools.
    features = {path: gradient for path, gradient in gradients.items() if path not in head
                and not path.startswith("mask_logits/")}
    assert len(features) == len(model.trainable_weights) - 4
    if shapes_features:
        assert all(gradient is not None and np.abs(gradient).max() > 0 for gradient in features.values())
    else:  # detached: no gradient at all from the head's loss
        assert all(gradient is None for gradient in features.values())


def test_vgg16_frozen_backbone_fine_tunes_only_block5_conv2_and_conv3():
    model = build_model("vgg16", SIZE)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 2 * _conv(3, 512, 512) + _VGG16_HEAD
    unfrozen = build_model("vgg16", SIZE, freeze_backbone=False)
    assert sum(int(np.prod(w.shape)) for w in unfrozen.trainable_weights) == TINY["vgg16"].params


@pytest.mark.parametrize(
    ("name", "options", "outputs"),
    [
        ("cnn", {"width": 0.25}, {"target": (1,)}),
        ("vgg16", {}, {"target": (1,)}),
        ("mask_resnet", {"channels": 4}, {"mask": (SIZE, SIZE, 1)}),
        (
            "mask_resnet",
            {"channels": 4, "image_head": "binary"},
            {"mask": (SIZE, SIZE, 1), "image_logits": (1,)},
        ),
        (
            "mask_resnet",
            {"channels": 4, "image_head": "three_class", "metadata": ("sex",), "box_extent_ratio": 0.5},
            {"mask": (SIZE, SIZE, 1), "image_logits": (3,), "box_extent_ratio": (1,)},
        ),
        ("cnn", {"width": 0.25, "metadata": ("view", "sex", "age")}, {"target": (1,)}),
    ],
)
def test_input_and_output_contract(name, options, outputs):
    model = build_model(name, SIZE, **options)
    fields = options.get("metadata", ())
    assert {key: tuple(t.shape) for key, t in model.input.items()} == {
        "image": (None, SIZE, SIZE, 1), **({"metadata": (None, metadata.width(fields))} if fields else {})
    }
    assert {key: tuple(t.shape[1:]) for key, t in model.output.items()} == outputs


def test_mask_resnet_mask_has_the_input_shape():
    model = build_model("mask_resnet", SIZE, depth=4)
    prediction = model({"image": _batch()["image"]}, training=False)
    assert prediction["mask"].shape == (2, SIZE, SIZE, 1)


def test_unknown_model_name_lists_known_names():
    with pytest.raises(UserError, match="unknown model 'resnet'; known models: cnn, mask_rcnn, mask_resnet, "
                                        "retinanet, vgg16"):
        build_model("resnet", SIZE)


def test_too_small_or_indivisible_image_sizes_are_user_errors():
    with pytest.raises(UserError, match="at least 64"):
        build_model("cnn", 32)
    with pytest.raises(UserError, match="at least 32"):
        build_model("vgg16", 16)
    with pytest.raises(UserError, match="divisible by 16"):
        build_model("mask_resnet", 40)


def test_vgg16_missing_or_unreadable_weights_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model("vgg16", SIZE, weights=str(tmp_path / "absent.h5"))
    not_weights = tmp_path / "not_weights.h5"
    not_weights.write_bytes(b"not an hdf5 file")
    with pytest.raises(UserError, match="cannot load vgg16 weights"):
        build_model("vgg16", SIZE, weights=str(not_weights))


def test_vgg16_loads_a_local_imagenet_style_weights_file(tmp_path):
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.h5"
    keras2_h5.write(path, keras2_h5.of_model(source))  # the layout of Keras' ImageNet files
    model = vgg16.build(32, vgg16.VGG16Options(weights=str(path)))
    loaded = model.get_layer("vgg16_backbone").get_weights()
    for expected, actual in zip(source.get_weights(), loaded, strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_iou_bce_loss_and_mean_iou_on_a_hand_worked_case():
    y_true = np.zeros((2, 2, 2, 1), np.float32)
    y_true[0, 0, :, 0] = 1.0  # image 0: top row; image 1: empty
    y_pred = np.full((2, 2, 2, 1), 0.25, np.float32)
    y_pred[0, 0, 0, 0] = 0.75
    # Thresholded: image 0 predicts 1 pixel of a 2-pixel mask (IoU 1/2); image 1
    # predicts nothing of nothing (IoU 1).
    np.testing.assert_allclose(mean_iou(y_true, y_pred), [0.5, 1.0], rtol=1e-5)
    # Probability given to the true value, pixel by pixel: image 0 misses one mask
    # pixel (0.25), every other pixel of both images gets 0.75.
    bce = -np.log([[0.75, 0.25, 0.75, 0.75], [0.75, 0.75, 0.75, 0.75]]).mean(axis=1)
    # Soft IoU pooled over the batch, smoothed by 1: intersection 0.75 + 0.25,
    # union 2 (true) + 2.5 (predicted) - 1.
    iou_loss = 1 - (1.0 + 1) / (3.5 + 1)
    np.testing.assert_allclose(
        iou_bce_loss(y_true, y_pred), 0.25 * bce + 0.75 * iou_loss, rtol=1e-5
    )


def test_boxes_from_mask_two_rectangles():
    height, width = 32, 64  # not square, so rows and columns cannot be confused
    probability = np.full((height, width), 0.1, np.float32)
    probability[2:10, 4:20] = 0.7  # first in label order, lower score
    probability[20:30, 40:50] = 0.8
    probability[20:30, 50:60] = 1.0  # second component's mean is 0.9
    probability[0, 63] = 0.99  # one pixel, below the 0.1% minimum area of 2048 px
    found_boxes, scores = boxes_from_mask(probability, threshold=0.5)
    expected = np.array(
        [[20 / 32, 40 / 64, 30 / 32, 60 / 64], [2 / 32, 4 / 64, 10 / 32, 20 / 64]], np.float32
    )
    assert found_boxes.dtype == np.float32 and scores.dtype == np.float32
    np.testing.assert_array_equal(found_boxes, expected)
    np.testing.assert_allclose(scores, [0.9, 0.7], rtol=1e-6)
    # The boxes cover exactly the pixels that made them (rasterize takes x-first boxes).
    kept_pixels = probability > 0.5
    kept_pixels[0, 63] = False
    as_xy = found_boxes[:, [1, 0, 3, 2]]
    np.testing.assert_array_equal(boxes.rasterize(as_xy, height, width), kept_pixels)


def test_boxes_from_mask_nothing_above_threshold():
    found_boxes, scores = boxes_from_mask(np.full((16, 16), 0.5, np.float32), threshold=0.5)
    assert found_boxes.shape == (0, 4) and found_boxes.dtype == np.float32
    assert scores.shape == (0,) and scores.dtype == np.float32


def test_bilinear_upsampling_has_the_same_parameters_and_smooth_edges():
    nearest = build_model("mask_resnet", 32, channels=4, n_blocks=1, depth=2)
    bilinear = build_model("mask_resnet", 32, channels=4, n_blocks=1, depth=2, upsampling="bilinear")
    assert bilinear.count_params() == nearest.count_params() == _mask_resnet_params(4, 1, 2)
    bilinear.set_weights(nearest.get_weights())
    image = {"image": np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)}
    coarse = np.asarray(nearest(image)["mask"])[0, ..., 0]
    smooth = np.asarray(bilinear(image)["mask"])[0, ..., 0]
    # Nearest repeats each of the 8 x 8 cells in 4 x 4 blocks; bilinear varies within them.
    assert np.unique(coarse).size <= 64 < np.unique(smooth).size
    with pytest.raises(UserError, match="upsampling"):
        build_model("mask_resnet", 32, upsampling="cubic")
