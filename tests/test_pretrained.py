"""Pretrained weights, offline (models/pretrained.py, models/matterport.py): keras-hub presets the tests save with
save_to_preset (as a folder and in kagglehub's cache under a preset name), keras.applications' VGG16 file in the
Keras cache, matterport .h5 files in Keras 2's layout, and matterport's layer groups (--trainable_layers)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import keras2_h5  # tests/keras2_h5.py
from pneumo_tf.errors import UserError
from pneumo_tf.models import mask_rcnn, matterport, pretrained, retinanet, vgg16
from test_mask_rcnn import SIZE, TINY as TINY_MASK_RCNN, synthetic_batch, train_step
from test_retinanet import TINY as TINY_RETINANET

REPO = pathlib.Path(__file__).resolve().parents[1]
# timm's ImageNet mean and standard deviation, as keras-hub's ResNet presets declare them.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# resnet_18_imagenet's size at this test's scale: keras-hub's narrowest ResNet (64 filters, one basic block a stack).
STACKS = dict(stackwise_num_filters=[64, 64, 64, 64], stackwise_num_blocks=[1, 1, 1, 1],
              stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block")


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and name lookup fails at once; yields the list of attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _save_resnet_preset(folder) -> keras.Model:
    """A tiny 3-channel ResNet with random weights and an ImageNet converter, saved as a keras-hub preset."""
    keras.utils.set_random_seed(11)
    encoder = keras_hub.models.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[7],
                                              image_shape=(None, None, 3), **STACKS)
    # Statistics of their own (not 0 and 1), as pretrained ones are.
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(1).normal(0.0, 0.05, layer.moving_mean.shape))
            layer.moving_variance.assign(np.random.default_rng(2).uniform(0.8, 1.2, layer.moving_variance.shape))
    encoder.save_to_preset(str(folder))
    keras_hub.layers.ResNetImageConverter(scale=[1 / (255 * s) for s in STD],
                                          offset=[-m / s for m, s in zip(MEAN, STD)]).save_to_preset(str(folder))
    return encoder


@pytest.fixture(scope="module")
def resnet_preset(tmp_path_factory):
    """(folder, the saved encoder's weights by layer name)."""
    folder = tmp_path_factory.mktemp("presets") / "tiny_resnet"
    encoder = _save_resnet_preset(folder)
    return str(folder), {layer.name: [w.numpy() for w in layer.weights] for layer in encoder.layers if layer.weights}


def _encoder_weights(encoder):
    return {layer.name: [w.numpy() for w in layer.weights] for layer in encoder.layers if layer.weights}


def _assert_same_weights(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        for got, want in zip(actual[name], expected[name], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=name)


# -- keras-hub presets: a local folder --------------------------------------------------------------


def test_backbone_preset_folder_gives_the_saved_weights_and_the_presets_normalisation(resnet_preset):
    folder, saved = resnet_preset
    network = mask_rcnn.build(SIZE, replace(TINY_MASK_RCNN, backbone_preset=folder))
    backbone = network.first_stage.get_layer("backbone")
    _assert_same_weights(_encoder_weights(backbone), saved)
    # Grey repeated to 3 channels, then the converter's scale and offset for pixels in [0, 255].
    normalise = network.first_stage.get_layer("backbone_input_normalise")
    np.testing.assert_allclose(normalise.scale, [1 / s for s in STD], rtol=1e-6)
    np.testing.assert_allclose(normalise.offset, [-m / s for m, s in zip(MEAN, STD)], rtol=1e-6)
    grey = np.full((1, SIZE, SIZE, 1), 0.5, np.float32)
    converted = keras.Model(network.first_stage.inputs, normalise.output)([grey])
    np.testing.assert_allclose(np.asarray(converted)[0, 0, 0], [(0.5 - m) / s for m, s in zip(MEAN, STD)],
                               rtol=1e-5)
    # The pretrained encoder's batch norm is frozen by default (matterport's TRAIN_BN = False).
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 12 and not any(layer.trainable for layer in norms)
    assert network.count_params() == mask_rcnn.build(SIZE, TINY_MASK_RCNN).count_params() + 2 * 7 * 7 * 64


def _snapshot(layers):
    """(layer name, weight, a copy of its value) for every weight of `layers`."""
    return [(layer.name, weight, weight.numpy().copy()) for layer in layers for weight in layer.weights]


def _moved(snapshot) -> set:
    """The names of the snapshot's layers any of whose weights changed since."""
    return {name for name, weight, value in snapshot if not np.array_equal(weight.numpy(), value)}


def _step(network, count=4):
    inputs, labels = synthetic_batch(count)
    train_step(network, keras.optimizers.SGD(0.05), inputs, labels)


def test_frozen_groups_do_not_move_and_batch_norm_statistics_stay_frozen(resnet_preset):
    folder, _ = resnet_preset
    keras.utils.set_random_seed(3)
    options = replace(TINY_MASK_RCNN, backbone_preset=folder)
    network = mask_rcnn.build(SIZE, options)
    backbone = network.first_stage.get_layer("backbone")
    encoder = [layer for layer in backbone.layers if layer.weights]
    norms = {layer.name for layer in encoder if isinstance(layer, keras.layers.BatchNormalization)}
    heads = [network.first_stage.get_layer(name) for name in ("fpn", "rpn_conv_shared", "rpn_class")]

    mask_rcnn.ARCHITECTURE.set_trainable_layers(network, options, "heads")
    before = _snapshot(encoder + heads)
    _step(network)
    assert _moved(before) == {"fpn", "rpn_conv_shared", "rpn_class"}  # the encoder did not move at all

    mask_rcnn.ARCHITECTURE.set_trainable_layers(network, options, "3+")
    before = _snapshot(encoder)
    _step(network)
    stages = {name: pretrained.resnet_stage(name) for name, _, _ in before}
    assert _moved(before) == {name for name in stages if stages[name] >= 3 and name not in norms}

    mask_rcnn.ARCHITECTURE.set_trainable_layers(network, options, "all")
    before = _snapshot(encoder)
    _step(network)
    assert _moved(before) == {layer.name for layer in encoder} - norms  # statistics and scale stay pretrained

    # train_bn: the norms train with their stage, statistics included.
    trained = replace(options, train_bn=True)
    mask_rcnn.ARCHITECTURE.set_trainable_layers(network, trained, "all")
    before = _snapshot(encoder)
    _step(network)
    assert _moved(before) == {layer.name for layer in encoder}


def test_a_network_from_a_preset_saves_and_loads_without_the_preset(resnet_preset, tmp_path):
    folder = tmp_path / "preset"
    shutil.copytree(resnet_preset[0], folder)
    network = mask_rcnn.build(SIZE, replace(TINY_MASK_RCNN, backbone_preset=str(folder)))
    images = {"image": np.random.default_rng(0).uniform(size=(2, SIZE, SIZE, 1)).astype(np.float32)}
    expected = network(images)
    network.save(tmp_path / "model.keras")
    shutil.rmtree(folder)
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    for key in expected:
        np.testing.assert_array_equal(np.asarray(loaded(images)[key]), np.asarray(expected[key]))


def test_preset_errors_are_user_errors(resnet_preset, tmp_path):
    partial = tmp_path / "no_converter"
    shutil.copytree(resnet_preset[0], partial)
    (partial / "image_converter.json").unlink()
    with pytest.raises(UserError, match="lacks a file.*image_converter.json"):
        mask_rcnn.build(SIZE, replace(TINY_MASK_RCNN, backbone_preset=str(partial)))
    with pytest.raises(UserError, match="'no_such_preset'.*Unknown preset identifier"):
        mask_rcnn.build(SIZE, replace(TINY_MASK_RCNN, backbone_preset="no_such_preset"))
    with pytest.raises(UserError, match="backbone_preset or matterport_weights"):
        mask_rcnn.MaskRCNNOptions(backbone_preset="resnet_50_imagenet", matterport_weights="coco.h5")
    with pytest.raises(UserError, match="backbone_preset or detector_preset"):
        retinanet.RetinaNetOptions(backbone_preset="resnet_50_imagenet", detector_preset="retinanet_resnet50_fpn_coco")


# -- keras-hub presets by name, through kagglehub's cache -----------------------------------------------


def _cache_as(name: str, folder: str) -> str:
    """Puts the preset `folder` in kagglehub's cache ($KAGGLEHUB_CACHE) as keras-hub's preset `name`, each file
    marked complete the way kagglehub marks a finished download; returns the cached folder."""
    from kagglehub.cache import Cache, get_cached_path
    from kagglehub.handle import parse_model_handle
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS

    handle = parse_model_handle(BUILTIN_PRESETS[name]["kaggle_handle"].removeprefix("kaggle://"))
    shutil.copytree(folder, get_cached_path(handle))
    for file_name in os.listdir(folder):
        Cache().mark_as_complete(handle, file_name)
    return get_cached_path(handle)


def test_a_preset_name_loads_from_the_kagglehub_cache_without_network(resnet_preset, tmp_path, monkeypatch,
                                                                        no_network):
    folder, saved = resnet_preset
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    cached = _cache_as("resnet_18_imagenet", folder)
    assert cached.startswith(str(tmp_path / "kagglehub" / "models" / "keras" / "resnetv1"))
    keras.utils.set_random_seed(0)
    network = retinanet.build(SIZE, replace(TINY_RETINANET, backbone_preset="resnet_18_imagenet", max_level=5))
    encoder = network.detector.backbone.image_encoder
    _assert_same_weights(_encoder_weights(encoder), saved)
    heads = network.detector.classification_head
    before = _snapshot([heads])
    labels = {"boxes": np.array([[[0.2, 0.2, 0.6, 0.5]] + [[0, 0, 0, 0]] * 7] * 2, np.float32),
              "num_boxes": np.array([1, 0], np.int32)}
    images = {"image": np.random.default_rng(0).uniform(size=(2, SIZE, SIZE, 1)).astype(np.float32)}
    optimizer = keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
        terms = retinanet.ARCHITECTURE.loss(network, images, labels, network(images, training=True), training=True)
        total = tf.add_n(list(terms.values()))
    optimizer.apply_gradients(zip(tape.gradient(total, network.trainable_variables), network.trainable_variables))
    assert np.isfinite(float(total)) and _moved(before) == {heads.name}
    assert no_network == []  # nothing tried to reach the network


def test_a_preset_name_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    with pytest.raises(UserError) as caught:
        mask_rcnn.build(SIZE, replace(TINY_MASK_RCNN, backbone_preset="resnet_50_imagenet"))
    message = str(caught.value)
    assert "'resnet_50_imagenet' is not in the kagglehub cache " + str(tmp_path / "kagglehub") in message
    assert "KAGGLEHUB_CACHE" in message and "save_to_preset" in message and "\n" not in message


# -- a whole RetinaNet from a detector preset -----------------------------------------------------------


@pytest.fixture(scope="module")
def detector_preset(tmp_path_factory):
    """A tiny 3-class keras-hub RetinaNet (the COCO preset's layout at 64 filters: P3-P5, keras-hub's anchors and
    box variance, two head convolutions) with its preprocessor, saved as a preset; (folder, detector)."""
    keras.utils.set_random_seed(5)
    encoder = keras_hub.models.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[7],
                                              image_shape=(None, None, 3), **STACKS)
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=5, use_p5=False)
    converter = keras_hub.layers.RetinaNetImageConverter(scale=[1 / (255 * s) for s in STD],
                                                         offset=[-m / s for m, s in zip(MEAN, STD)])
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=3, pre_logits_num_conv_layers=2,
        preprocessor=keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter))
    folder = tmp_path_factory.mktemp("presets") / "tiny_retinanet_coco"
    detector.save_to_preset(str(folder))
    return str(folder), detector


def test_a_detector_preset_keeps_all_but_the_class_logits(detector_preset, tmp_path):
    folder, source = detector_preset
    keras.utils.set_random_seed(0)
    network = retinanet.build(SIZE, replace(TINY_RETINANET, detector_preset=folder))
    detector = network.detector
    # The preset's layout and box encoding, not the options': P3-P5, anchors of 4 * stride, variance 1.
    assert (detector.backbone.min_level, detector.backbone.max_level,
            detector.anchor_generator.anchor_size) == (3, 5, 4)
    assert list(detector.label_encoder.box_variance) == list(source.label_encoder.box_variance)
    assert detector.pre_logits_num_conv_layers == 2
    for mine, theirs in [(detector.backbone, source.backbone), (detector.box_head, source.box_head)]:
        for got, want in zip(mine.get_weights(), theirs.get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    for got, want in zip(detector.classification_head.conv_layers, source.classification_head.conv_layers,
                         strict=True):
        np.testing.assert_array_equal(got.kernel.numpy(), want.kernel.numpy())
    # The class logits: one class, the paper's prior (3 classes x 9 anchors in the preset).
    logits = detector.classification_head.prediction_layer
    assert source.classification_head.prediction_layer.kernel.shape[-1] == 27 and logits.kernel.shape[-1] == 9
    np.testing.assert_allclose(logits.bias.numpy(), -np.log(99.0), rtol=1e-6)
    assert float(np.std(logits.kernel.numpy())) < 0.02
    network.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False)
    images = {"image": np.random.default_rng(0).uniform(size=(1, SIZE, SIZE, 1)).astype(np.float32)}
    np.testing.assert_array_equal(np.asarray(loaded(images)["cls_logits"]), np.asarray(network(images)["cls_logits"]))


def test_a_detector_preset_is_not_a_backbone_preset(detector_preset):
    with pytest.raises(UserError, match="holds a RetinaNetBackbone; it takes keras-hub ResNet presets"):
        retinanet.build(SIZE, replace(TINY_RETINANET, backbone_preset=detector_preset[0]))


# -- keras.applications' VGG16 from the Keras cache ---------------------------------------------------------

VGG16_IN_A_FRESH_KERAS_HOME = textwrap.dedent("""
    import json, os, socket, sys
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args))
        raise OSError("network access in a test")
    socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse
    sys.path.insert(0, os.path.join({repo!r}, "tests"))
    import keras, numpy as np
    import keras2_h5
    from pneumo_tf.errors import UserError
    from pneumo_tf.models import vgg16
    result = {{}}
    try:
        vgg16.build(32, vgg16.VGG16Options(weights="imagenet"))
    except UserError as error:
        result["offline_error"] = str(error)
    result["offline_attempts"] = len(attempts)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    cache = os.path.join(os.environ["KERAS_HOME"], "models")
    os.makedirs(cache, exist_ok=True)
    keras2_h5.write(os.path.join(cache, vgg16.NOTOP_WEIGHTS_FILE), keras2_h5.of_model(source))
    del attempts[:]
    model = vgg16.build(32, vgg16.VGG16Options(weights="imagenet"))
    loaded = model.get_layer("vgg16_backbone").get_weights()
    result["identical"] = all(np.array_equal(a, b) for a, b in zip(loaded, source.get_weights(), strict=True))
    result["cached_attempts"] = len(attempts)
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_vgg16_imagenet_comes_from_the_keras_cache_and_offline_says_where(tmp_path):
    """In a fresh process with KERAS_HOME set (Keras reads it at import) and no network: without the file, one
    error naming the file, URL and cache folder; with the file in the cache, its weights and no network access."""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "PYTHONPATH": str(REPO),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", VGG16_IN_A_FRESH_KERAS_HOME.format(repo=str(REPO))], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    cache = tmp_path / "keras_home" / "models"
    assert (f"vgg16 ImageNet weights {vgg16.NOTOP_WEIGHTS_FILE} are not in the Keras cache {cache} and could not be "
            f"downloaded from {vgg16.NOTOP_WEIGHTS_URL}") in found["offline_error"]
    assert found["identical"] and found["cached_attempts"] == 0


def test_vgg16_sees_grey_images_as_keras_applications_preprocesses_them():
    model = vgg16.build(32, vgg16.VGG16Options())
    grey = np.random.default_rng(0).uniform(size=(2, 32, 32, 1)).astype(np.float32)
    converted = keras.Model(model.inputs, model.get_layer("vgg16_input_normalise").output)([grey])
    expected = keras.applications.vgg16.preprocess_input(np.repeat(grey, 3, axis=-1) * 255.0)
    np.testing.assert_allclose(np.asarray(converted), expected, rtol=1e-5, atol=1e-4)


# -- matterport's Mask R-CNN weights ----------------------------------------------------------------------

# matterport's resnet50 layout at a small size: one block a stage, keras-hub's 64-filter stacks (bottleneck: 256
# channels out of every stage), mask head of 2 convolutions; what the file holds beyond it is skipped.
MATTERPORT_OPTIONS = replace(TINY_MASK_RCNN, backbone="resnet50", mask_head_convs=2, train_rois_per_image=8,
                             matterport_weights="set per test")


def matterport_file(options, classes=2, extra_blocks=("res2b",), mask_convs=4, rng=None) -> dict:
    """matterport's layers (mrcnn/model.py's names, Keras 2 weight order and shapes) for `options`' sizes, random
    values: {layer name: [(weight name, array)]}. Batch norm variances are positive; `extra_blocks` adds identity
    blocks this network lacks, `mask_convs` matterport's four mask convolutions."""
    rng = rng or np.random.default_rng(0)
    layers = {}

    def conv(name, shape, bias=True):
        layers[name] = [(f"{name}/kernel:0", rng.normal(0, 0.1, shape).astype(np.float32))]
        if bias:
            layers[name].append((f"{name}/bias:0", rng.normal(0, 0.1, shape[-1]).astype(np.float32)))

    def norm(name, size):
        layers[name] = [(f"{name}/{kind}:0", value.astype(np.float32)) for kind, value in (
            ("gamma", rng.uniform(0.5, 1.5, size)), ("beta", rng.normal(0, 0.1, size)),
            ("moving_mean", rng.normal(0, 0.2, size)), ("moving_variance", rng.uniform(0.001, 2.0, size)))]

    conv("conv1", (7, 7, 3, 64))
    norm("bn_conv1", 64)
    channels = 64
    for stage, filters in zip((2, 3, 4, 5), options.backbone_filters):
        for letter in ("a",) + tuple(block[-1] for block in extra_blocks if block.startswith(f"res{stage}")):
            base = f"{stage}{letter}_branch"
            inputs = channels if letter == "a" else 4 * filters
            for branch, shape in (("2a", (1, 1, inputs, filters)), ("2b", (3, 3, filters, filters)),
                                  ("2c", (1, 1, filters, 4 * filters))) + (
                    (("1", (1, 1, inputs, 4 * filters)),) if letter == "a" else ()):
                conv(f"res{base}{branch}", shape)
                norm(f"bn{base}{branch}", shape[-1])
            layers[f"res{stage}{letter}_out"] = []  # an activation: a group without weights, as in the file
        channels = 4 * filters
    fpn, rpn = options.top_down_pyramid_size, options.rpn_conv_size
    for level, filters in zip((2, 3, 4, 5), options.backbone_filters):
        conv(f"fpn_c{level}p{level}", (1, 1, 4 * filters, fpn))
        conv(f"fpn_p{level}", (3, 3, fpn, fpn))
    layers["rpn_model"] = []  # a nested model: its layers' weights, named by them
    for name, shape in (("rpn_conv_shared", (3, 3, fpn, rpn)), ("rpn_class_raw", (1, 1, rpn, 6)),
                        ("rpn_bbox_pred", (1, 1, rpn, 12))):
        conv(name, shape)
        layers["rpn_model"] += layers.pop(name)
    size, fc = options.pool_size, options.fpn_classif_fc_layers_size
    conv("mrcnn_class_conv1", (size, size, fpn, fc))
    norm("mrcnn_class_bn1", fc)
    conv("mrcnn_class_conv2", (1, 1, fc, fc))
    norm("mrcnn_class_bn2", fc)
    conv("mrcnn_class_logits", (fc, classes))
    conv("mrcnn_bbox_fc", (fc, 4 * classes))
    width = options.mask_head_size
    for index in range(1, mask_convs + 1):
        conv(f"mrcnn_mask_conv{index}", (3, 3, fpn if index == 1 else width, width))
        norm(f"mrcnn_mask_bn{index}", width)
    conv("mrcnn_mask_deconv", (2, 2, width, width))
    conv("mrcnn_mask", (1, 1, width, classes))
    return layers


def _tensors(layers: dict) -> dict:
    """{owner layer: {kind: array}} of matterport_file's layers (the RPN model's by its layers)."""
    found = {}
    for weights in layers.values():
        for weight_name, value in weights:
            owner, kind = weight_name.split(":")[0].split("/")[-2:]
            found.setdefault(owner, {})[kind] = value
    return found


@pytest.fixture(scope="module")
def matterport_network():
    keras.utils.set_random_seed(0)
    return mask_rcnn.MaskRCNN(SIZE, MATTERPORT_OPTIONS)


def _numpy_affine(tensors, conv, norm, epsilon=matterport.BATCH_NORM_EPSILON):
    """matterport's conv bias + frozen norm as y = conv(x) * a + c."""
    values = tensors[norm]
    a = values["gamma"] / np.sqrt(values["moving_variance"] + epsilon)
    return a, (tensors[conv]["bias"] - values["moving_mean"]) * a + values["beta"]


def test_matterport_weights_land_in_their_layers(matterport_network, tmp_path):
    network = matterport_network
    written = matterport_file(network.options)
    keras2_h5.write(tmp_path / "weights.h5", written)
    tensors = _tensors(written)
    report = matterport.load(network, str(tmp_path / "weights.h5"), exclude=())
    backbone = network.first_stage.get_layer("backbone")
    # ResNet: kernels as they are; each norm gives the same affine map as matterport's conv bias + norm.
    for stage in (2, 3, 4, 5):
        for index, branch in (("0", "1"), ("1", "2a"), ("2", "2b"), ("3", "2c")):
            ours = f"stack{stage - 2}_block0_{index}"
            np.testing.assert_array_equal(backbone.get_layer(f"{ours}_conv").kernel.numpy(),
                                          tensors[f"res{stage}a_branch{branch}"]["kernel"])
            norm = backbone.get_layer(f"{ours}_bn")
            a = norm.gamma.numpy() / np.sqrt(norm.moving_variance.numpy() + norm.epsilon)
            want_a, want_c = _numpy_affine(tensors, f"res{stage}a_branch{branch}", f"bn{stage}a_branch{branch}")
            np.testing.assert_allclose(a, want_a, rtol=1e-5)
            np.testing.assert_allclose(norm.beta.numpy() - norm.moving_mean.numpy() * a, want_c, rtol=1e-4, atol=1e-6)
    # The stem end to end: matterport's padded 7x7 conv with bias, its norm (epsilon 1e-3), relu, on an image
    # already converted (the 3-channel backbone input).
    image = np.random.default_rng(1).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    stem = keras.Model(backbone.inputs, backbone.get_layer("conv1_relu").output)
    z = tf.nn.conv2d(np.pad(image, ((0, 0), (3, 3), (3, 3), (0, 0))), tensors["conv1"]["kernel"], 2, "VALID")
    a, c = _numpy_affine(tensors, "conv1", "bn_conv1")
    np.testing.assert_allclose(np.asarray(stem([image])), np.maximum(z * a + c, 0), rtol=1e-4, atol=1e-4)
    fpn = network.first_stage.get_layer("fpn")
    for level in (2, 3, 4, 5):
        np.testing.assert_array_equal(fpn.lateral_conv_layers[f"P{level}"].kernel.numpy(),
                                      tensors[f"fpn_c{level}p{level}"]["kernel"])
        np.testing.assert_array_equal(fpn.output_conv_layers[f"P{level}"].bias.numpy(),
                                      tensors[f"fpn_p{level}"]["bias"])

    # RPN: our sigmoid is matterport's softmax foreground probability of the anchor of the same shape (matterport's
    # ratios are width / height, ours height / width).
    features = np.random.default_rng(2).normal(size=(1, 4, 4, network.options.top_down_pyramid_size))
    features = features.astype(np.float32)
    shared = network.first_stage.get_layer("rpn_conv_shared")(features)
    ours = tf.sigmoid(network.first_stage.get_layer("rpn_class")(shared)).numpy()
    ours_deltas = network.first_stage.get_layer("rpn_bbox")(shared).numpy()
    theirs_shared = np.maximum(tf.nn.conv2d(features, tensors["rpn_conv_shared"]["kernel"], 1, "SAME")
                               + tensors["rpn_conv_shared"]["bias"], 0)
    logits = (np.einsum("bhwc,cd->bhwd", theirs_shared, tensors["rpn_class_raw"]["kernel"][0, 0])
              + tensors["rpn_class_raw"]["bias"]).reshape(1, 4, 4, 3, 2)
    deltas = (np.einsum("bhwc,cd->bhwd", theirs_shared, tensors["rpn_bbox_pred"]["kernel"][0, 0])
              + tensors["rpn_bbox_pred"]["bias"]).reshape(1, 4, 4, 3, 4)
    probability = np.exp(logits[..., 1]) / np.exp(logits).sum(-1)
    same_shape = [[0.5, 1.0, 2.0].index(1 / ratio) for ratio in network.options.rpn_anchor_ratios]
    np.testing.assert_allclose(ours, probability[..., same_shape], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours_deltas.reshape(1, 4, 4, 3, 4), deltas[..., same_shape, :], rtol=1e-4, atol=1e-5)

    # Box head: two convolutions with frozen norms, then the opacity's logits and deltas (class 1 of 2).
    rois = np.random.default_rng(3).normal(size=(5, 7, 7, network.options.top_down_pyramid_size)).astype(np.float32)
    x = rois.reshape(5, -1)
    for index in (1, 2):
        a, c = _numpy_affine(tensors, f"mrcnn_class_conv{index}", f"mrcnn_class_bn{index}")
        x = np.maximum(x @ tensors[f"mrcnn_class_conv{index}"]["kernel"].reshape(x.shape[1], -1) * a + c, 0)
    head = network.box_head(rois)
    np.testing.assert_allclose(head["class_logits"], x @ tensors["mrcnn_class_logits"]["kernel"]
                               + tensors["mrcnn_class_logits"]["bias"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(head["deltas"], (x @ tensors["mrcnn_bbox_fc"]["kernel"]
                                                + tensors["mrcnn_bbox_fc"]["bias"])[:, 4:8], rtol=1e-3, atol=1e-4)
    # Mask head: its convolutions with frozen norms, the up-convolution, the opacity's channel.
    size = network.options.mask_pool_size
    rois = np.random.default_rng(4).normal(size=(2, size, size, network.options.top_down_pyramid_size))
    x = rois.astype(np.float32)
    for index in (1, 2):
        a, c = _numpy_affine(tensors, f"mrcnn_mask_conv{index}", f"mrcnn_mask_bn{index}")
        x = np.maximum(tf.nn.conv2d(x, tensors[f"mrcnn_mask_conv{index}"]["kernel"], 1, "SAME").numpy() * a + c, 0)
    x = np.maximum(keras.ops.conv_transpose(x, tensors["mrcnn_mask_deconv"]["kernel"], 2).numpy()
                   + tensors["mrcnn_mask_deconv"]["bias"], 0)
    want = np.einsum("bhwc,cd->bhwd", x, tensors["mrcnn_mask"]["kernel"][0, 0]) + tensors["mrcnn_mask"]["bias"]
    np.testing.assert_allclose(network.mask_head(rois.astype(np.float32)), want[..., 1:2], rtol=1e-3, atol=1e-4)

    assert {"conv1_conv", "conv1_bn", "lateral_conv_P2", "rpn_class", "mrcnn_fc1", "mrcnn_bbox",
            "mrcnn_mask"} <= set(report.loaded)
    # What the file has beyond this network is skipped; what matterport has no counterpart for stays initialised.
    assert set(report.skipped) == {"res2b_branch2a", "res2b_branch2b", "res2b_branch2c", "bn2b_branch2a",
                                   "bn2b_branch2b", "bn2b_branch2c", "mrcnn_mask_conv3", "mrcnn_mask_conv4",
                                   "mrcnn_mask_bn3", "mrcnn_mask_bn4"}
    assert report.initialised == ["coarser_P6"]


def test_the_seeds_exclusions_keep_their_initialisation(tmp_path):
    keras.utils.set_random_seed(0)
    network = mask_rcnn.MaskRCNN(SIZE, MATTERPORT_OPTIONS)
    excluded = [network.box_head.get_layer("mrcnn_class_logits"), network.box_head.get_layer("mrcnn_bbox"),
                network.mask_head.get_layer("mrcnn_mask")]
    initial = [weight.numpy().copy() for layer in excluded for weight in layer.weights]
    written = matterport_file(network.options, classes=81, extra_blocks=())
    keras2_h5.write(tmp_path / "coco.h5", written)
    report = matterport.load(network, str(tmp_path / "coco.h5"))  # the seed's exclusions by default
    for value, weight in zip(initial, [weight for layer in excluded for weight in layer.weights], strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)
    assert set(matterport.SEED_EXCLUDE) - {"mrcnn_bbox"} <= set(report.skipped)  # mrcnn_bbox: weightless there
    assert report.initialised == ["mrcnn_class_logits", "mrcnn_bbox", "mrcnn_mask", "coarser_P6"]
    np.testing.assert_allclose(network.box_head.get_layer("mrcnn_fc2").bias.numpy(),
                               _numpy_affine(_tensors(written), "mrcnn_class_conv2", "mrcnn_class_bn2")[1], rtol=1e-6)
    # Without the exclusions an 81-class file's class layers cannot be this network's two classes.
    with pytest.raises(UserError, match="mrcnn_bbox_fc is for 81 classes"):
        matterport.load(network, str(tmp_path / "coco.h5"), exclude=())


def test_a_wrong_shaped_or_missing_layer_is_one_clear_error_and_loads_nothing(matterport_network, tmp_path):
    network = matterport_network
    before = [weight.numpy().copy() for weight in network.weights]
    wrong = matterport_file(network.options)
    wrong["fpn_p3"][0] = ("fpn_p3/kernel:0", np.zeros((3, 3, 8, 8), np.float32))
    del wrong["res3a_branch2b"]
    keras2_h5.write(tmp_path / "wrong.h5", wrong)
    with pytest.raises(UserError) as caught:
        matterport.load(network, str(tmp_path / "wrong.h5"))
    message = str(caught.value)
    assert message.startswith(f"cannot load matterport weights {tmp_path / 'wrong.h5'} into mask_rcnn: ")
    assert "stack1_block0_2_conv needs matterport layer(s) res3a_branch2b, not in the file" in message
    assert ("output_conv_P3 needs shapes [(3, 3, 32, 32), (32,)], matterport's fpn_p3 give [(3, 3, 8, 8), (32,)]"
            in message)
    for value, weight in zip(before, network.weights, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)
    (tmp_path / "not.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="cannot read matterport weights"):
        matterport.load(network, str(tmp_path / "not.h5"))


def test_build_loads_matterport_weights_behind_their_input_conversion(tmp_path, capsys):
    keras2_h5.write(tmp_path / "weights.h5", matterport_file(MATTERPORT_OPTIONS))
    options = replace(MATTERPORT_OPTIONS, matterport_weights=str(tmp_path / "weights.h5"))
    network = mask_rcnn.build(SIZE, options)
    assert "matterport weights" in capsys.readouterr().out
    normalise = network.first_stage.get_layer("backbone_input_normalise")
    np.testing.assert_allclose(normalise.offset, [-m for m in matterport.MEAN_PIXEL])
    np.testing.assert_allclose(normalise.scale, [255.0] * 3)
    backbone = network.first_stage.get_layer("backbone")
    assert not any(layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    terms = train_step(network, keras.optimizers.SGD(0.01), *synthetic_batch(2))
    assert all(np.isfinite(float(value)) for value in terms.values())
    with pytest.raises(UserError, match="matterport's resnet50 or resnet101 backbone, not resnet18"):
        replace(options, backbone="resnet18")


# -- matterport's two stages in one run --------------------------------------------------------------------


def test_trainable_layers_are_checked_with_the_run():
    from pneumo_tf.training.config import TrainConfig

    def run(**values):
        return TrainConfig(records_dir="records", model_dir="model", **values)

    with pytest.raises(UserError, match="--trainable_layers=heads: the vgg16 model trains all$"):
        run(model="vgg16", trainable_layers="heads").validate()
    with pytest.raises(UserError, match="needs --trainable_layers other than all and fewer epochs than --epochs=12"):
        run(model="mask_rcnn", trainable_layers_epochs=2).validate()
    with pytest.raises(UserError, match="fewer epochs than --epochs=2"):
        run(model="retinanet", trainable_layers="4+", trainable_layers_epochs=2, epochs=2).validate()
    run(model="retinanet", trainable_layers="4+", trainable_layers_epochs=1, epochs=2).validate()


class Killed(Exception):
    """Stands for a kill right after an epoch's end (its backup, logs and TensorBoard scalars written)."""


def _epoch_scalars(log_dir, tag) -> dict:
    """{epoch: value} of a TensorBoard scalar over every event file in log_dir (a resumed run adds one)."""
    found = {}
    for path in sorted(pathlib.Path(log_dir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    found[event.step] = float(tf.make_ndarray(value.tensor))
    return found


@pytest.mark.slow
def test_heads_then_all_in_one_run_resumes_in_either_stage(tiny_records, resnet_preset, tmp_path, monkeypatch):
    """--trainable_layers=heads --trainable_layers_epochs=2 over 4 epochs, killed after epoch 0 (first stage) and
    after epoch 2 (second stage): each resumed run trains the stage of its epochs, as TensorBoard shows."""
    from pneumo_tf.training import loop
    from pneumo_tf.training.config import TrainConfig

    options = {**TINY_MASK_RCNN.as_dict(), "backbone_preset": resnet_preset[0]}
    config = TrainConfig(records_dir=tiny_records, model_dir=str(tmp_path / "run"), model="mask_rcnn",
                         model_options=options, image_size=SIZE, batch_size=4, epochs=4, steps_per_epoch=1,
                         validation_steps=1, trainable_layers="heads", trainable_layers_epochs=2, augment=False,
                         profile_steps=None, validation_images=0)
    end_of_epoch = keras.callbacks.History.on_epoch_end  # History is the last callback Keras calls

    for kill_after in (0, 2):
        def on_epoch_end(self, epoch, logs=None, kill_after=kill_after):
            end_of_epoch(self, epoch, logs)
            if epoch == kill_after:
                raise Killed()

        with monkeypatch.context() as patch:
            patch.setattr(keras.callbacks.History, "on_epoch_end", on_epoch_end)
            with pytest.raises(Killed):
                loop.train_and_evaluate(config)
    summary = loop.train_and_evaluate(config)
    assert summary["epochs"] == [3]

    network = mask_rcnn.build(SIZE, mask_rcnn.ARCHITECTURE.make_options(options))
    counts = {}
    for group in ("heads", "all"):
        mask_rcnn.ARCHITECTURE.set_trainable_layers(network, network.options, group)
        counts[group] = float(sum(np.prod(weight.shape) for weight in network.trainable_variables))
    assert counts["heads"] < counts["all"]
    logged = _epoch_scalars(tmp_path / "run" / "logs" / "train", "epoch_trainable_parameters")
    assert logged == {0: counts["heads"], 1: counts["heads"], 2: counts["all"], 3: counts["all"]}
