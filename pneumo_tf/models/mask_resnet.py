"""The seed's residual mask network (`create_network`): a sigmoid box mask, boxes from its connected components."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import keras
import numpy as np
from keras import layers
from scipy import ndimage

from pneumo_tf.cli import option
from pneumo_tf.errors import UserError
from pneumo_tf.models import architecture, losses

_BN_MOMENTUM = 0.9
# The output that carries box_extent_ratio to the host's decoding, per image (outputs are batch-major).
EXTENT_RATIO = "box_extent_ratio"
UPSAMPLING_MODES = ("nearest", "bilinear")


@dataclasses.dataclass(frozen=True)
class MaskResNetOptions(architecture.BoxModelOptions):
    """The seed's create_network(channels=32, n_blocks=2, depth=4) by default."""

    model_name: ClassVar[str] = "mask_resnet"

    channels: int = option(32, "Channels of the first convolution; each down-sampling level doubles them.", minimum=1)
    n_blocks: int = option(2, "Residual blocks after each down-sampling level.", minimum=0)
    depth: int = option(4, "Down-sampling levels; each halves the image (the image size must be divisible by "
                        "2**depth).", minimum=0)
    negative_slope: float = option(0.0, "LeakyReLU slope (the seed's 0 makes it a ReLU).", minimum=0.0)
    upsampling: str = option("nearest", "How the bottleneck's mask returns to the image's size: nearest (the seed's) "
                             "repeats each cell 2**depth times, so box edges fall on that grid; bilinear "
                             "interpolates the logits first, so thresholded masks (and their boxes) follow the "
                             "opacity's edge between cells. Same parameters either way.", choices=UPSAMPLING_MODES)
    box_extent_ratio: float = option(
        1.0, "Boxes at threshold t are the extents of the mask's regions above box_extent_ratio x t that reach above "
        "t (hysteresis): the peak decides that there is an opacity, the lower level how far it reaches. 1: the "
        "regions above t (the seed's).", exclusive_minimum=0.0, maximum=1.0)


PRESETS = {
    "demo": architecture.Preset(
        "A slim mask network for 128 px (JPEG frames decode straight to 128 at ratio 8) with bilinear up-sampling, "
        "so boxes follow the opacities between bottleneck cells; Adam 2e-3.",
        model_options={"channels": 8, "n_blocks": 1, "depth": 3, "upsampling": "bilinear"},
        train={"learning_rate": 2e-3}),
    "real": architecture.Preset(
        "The recipe for real radiographs on a CPU budget (benchmarks/real.py): twice the demo's channels and one "
        "more level (16 to 256 channels, an 8 x 8 bottleneck at 128 px), 24 passes at 128 px with the decoded "
        "images cached (about 8 x 128^2 bytes an image: fine for thousands, not for the full 26,684), 40% of each "
        "batch positive (positive_fraction 0.4: val mAP up on every real fold measured); Adam 2e-3.",
        model_options={"channels": 16, "n_blocks": 1, "depth": 4, "upsampling": "bilinear"},
        train={"learning_rate": 2e-3, **architecture.REAL_DATA_TRAINING}),
}


def _norm_act(x, negative_slope: float):
    # Synchronised across replicas: with the small per-replica batches of detection
    # training, per-replica statistics would make N replicas train a different model than
    # one device on the same global batch. On one device it is plain batch norm.
    x = layers.BatchNormalization(momentum=_BN_MOMENTUM, synchronized=True)(x)
    return layers.LeakyReLU(negative_slope=negative_slope)(x)


def _downsample(x, channels: int, negative_slope: float):
    x = _norm_act(x, negative_slope)
    x = layers.Conv2D(channels, 1, padding="same", use_bias=False)(x)
    return layers.MaxPool2D(2)(x)


def _resblock(x, channels: int, negative_slope: float):
    shortcut = x
    for _ in range(2):
        x = _norm_act(x, negative_slope)
        x = layers.Conv2D(channels, 3, padding="same", use_bias=False)(x)
    return layers.Add()([x, shortcut])


def build(image_size: int, options: MaskResNetOptions = MaskResNetOptions()) -> keras.Model:
    """Builds the mask network for [image_size, image_size, 1] images in [0, 1].

    `depth` down-sampling levels each double the channels (starting from `channels`) and
    halve the image, followed by `n_blocks` residual blocks; the mask is predicted at the
    bottleneck and up-sampled back to the input size (see MaskResNetOptions).
    """
    channels, depth, negative_slope = options.channels, options.depth, options.negative_slope
    if image_size % 2**depth:
        raise UserError(
            f"the mask_resnet model with depth {depth} needs an image size divisible by "
            f"{2**depth} to give a mask of the image's size; got {image_size}"
        )
    image = keras.Input(shape=(image_size, image_size, 1), name="image")
    x = layers.Conv2D(channels, 3, padding="same", use_bias=False)(image)
    for _ in range(depth):
        channels *= 2
        x = _downsample(x, channels, negative_slope)
        for _ in range(options.n_blocks):
            x = _resblock(x, channels, negative_slope)
    features = _norm_act(x, negative_slope)
    metadata = architecture.metadata_input(options)
    # float32 from the logits on, so sigmoid, loss and the up-sampled mask are exact under a
    # mixed policy. The metadata's bias shifts the logits of every pixel of an image alike.
    logits = layers.Conv2D(1, 1, dtype="float32", name="mask_logits")(features)
    if metadata is not None:
        logits = layers.Add(dtype="float32")([logits, layers.Reshape((1, 1, 1))(architecture.metadata_bias(metadata))])
    # Nearest up-sampling commutes with the sigmoid (the seed's order); bilinear interpolates logits.
    interpolation = "nearest" if options.upsampling == "nearest" else "bilinear"
    logits = layers.UpSampling2D(2**depth, interpolation=interpolation, dtype="float32")(logits)
    outputs = {"mask": layers.Activation("sigmoid", dtype="float32", name="mask")(logits)}
    if options.box_extent_ratio != 1.0:
        outputs[EXTENT_RATIO] = ConstantPerImage(options.box_extent_ratio, name=EXTENT_RATIO)(image)
    if options.image_head != "none":
        outputs[architecture.IMAGE_LOGITS] = architecture.image_head_logits(
            features, metadata, options.image_head, options.image_head_shapes_features)
    return keras.Model(architecture.network_inputs(image, metadata), outputs, name="mask_resnet")


@keras.saving.register_keras_serializable(package="pneumo_tf")
class ConstantPerImage(layers.Layer):
    """A fixed value per image, float32 [B, 1]: a setting of the network that its host-side decoding
    reads from the outputs, so it travels with the model (and its SavedModel)."""

    def __init__(self, value: float, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.value = float(value)

    def call(self, images):
        return keras.ops.full((keras.ops.shape(images)[0], 1), self.value, dtype="float32")

    def get_config(self):
        return {**super().get_config(), "value": self.value}


def boxes_from_mask(
    probability_mask: np.ndarray, threshold: float, min_area_fraction: float = 0.001, extent_ratio: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One box per connected component of `probability_mask > extent_ratio * threshold` that holds a
    pixel above `threshold` (with the default ratio 1: every component of `probability_mask > threshold`).

    Returns (boxes, scores): boxes float32 [N, 4] as normalised (ymin, xmin, ymax,
    xmax), the batch convention of pneumo_tf.records.boxes, covering whole pixels (a box
    spanning rows r0..r1 has ymin = r0 / H, ymax = (r1 + 1) / H, the inverse of
    boxes.rasterize); scores float32 [N], the mean probability inside the
    component, sorted descending. Components smaller than `min_area_fraction` of
    the image (the default, 0.1%, is about 1,000 pixels at 1024 px) are dropped
    as speckle. Components are 4-connected (scipy.ndimage.label's default).
    """
    probability_mask = np.asarray(probability_mask, dtype=np.float32)
    if probability_mask.ndim != 2:
        raise ValueError(f"expected a [H, W] mask, got shape {probability_mask.shape}")
    height, width = probability_mask.shape
    labels, _ = ndimage.label(probability_mask > extent_ratio * threshold)
    boxes, scores = [], []
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[rows, cols] == index
        if component.sum() < min_area_fraction * height * width:
            continue
        if extent_ratio < 1.0 and not (probability_mask[rows, cols][component] > threshold).any():
            continue
        boxes.append(
            (rows.start / height, cols.start / width, rows.stop / height, cols.stop / width)
        )
        scores.append(probability_mask[rows, cols][component].mean())
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.asarray(boxes, np.float32)[order], np.asarray(scores, np.float32)[order]


class MaskResNet(architecture.Architecture):
    """Trained on the record's box mask (and with an image head on the target or the class).

    Boxes are the connected components of the mask thresholded at the decision threshold
    (`boxes_from_mask`, on the host; `box_extent_ratio` lowers the level their extents are read
    at); the image probability is the image head's when the network has one, else the largest
    mask probability. Its masks are the thresholded mask within those boxes (speckle dropped
    with its box), resized by nearest neighbour.
    """

    name = "mask_resnet"
    options_type = MaskResNetOptions
    presets = PRESETS
    gives_boxes = True
    gives_masks = True
    label_keys = ("mask",)
    optional_label_keys = ("target", "class")
    build = staticmethod(build)

    def loss_names(self, network):
        return ("mask",) + (("image",) if architecture.IMAGE_LOGITS in network.output_names else ())

    def loss(self, network, inputs, labels, raw, training):
        # Per image, then this replica's mean; the soft-IoU part is pooled over all replicas already.
        terms = {"mask": keras.ops.mean(losses.iou_bce_loss(labels["mask"], raw["mask"]))}
        if architecture.IMAGE_LOGITS in raw:
            terms["image"] = architecture.image_head_loss(labels, raw[architecture.IMAGE_LOGITS])
        return terms

    def metrics(self, network):
        return {"mask": [keras.metrics.MeanMetricWrapper(losses.mean_iou, name="mask_mean_iou")]}

    def outputs(self, network, inputs, raw):
        found = {"mask": raw["mask"]}
        if EXTENT_RATIO in raw:
            found[EXTENT_RATIO] = raw[EXTENT_RATIO][:, 0]
        return architecture.with_image_probability(found, raw)

    def detections(self, outputs, threshold):
        mask = np.asarray(outputs["mask"], np.float32)
        ratios = np.asarray(outputs.get(EXTENT_RATIO, np.ones(len(mask))), np.float32).reshape(-1)
        found = [boxes_from_mask(image_mask[..., 0], threshold, extent_ratio=float(ratio))
                 for image_mask, ratio in zip(mask, ratios)]
        return architecture.gate_by_image(outputs, threshold, found)

    def masks(self, outputs, threshold, sizes):
        found = []
        mask = np.asarray(outputs["mask"], np.float32)[..., 0]
        ratios = np.asarray(outputs.get(EXTENT_RATIO, np.ones(len(mask))), np.float32).reshape(-1)
        for image_mask, ratio, (boxes, _), (height, width) in zip(mask, ratios, self.detections(outputs, threshold),
                                                                 sizes):
            level = float(ratio) * threshold
            side_rows, side_columns = image_mask.shape
            within = np.zeros(image_mask.shape, bool)
            for ymin, xmin, ymax, xmax in boxes:  # whole mask pixels (boxes_from_mask)
                within[round(ymin * side_rows):round(ymax * side_rows),
                       round(xmin * side_columns):round(xmax * side_columns)] = True
            found.append(architecture.resize_nearest((image_mask > level) & within, height, width))
        return found

    def image_probability(self, outputs):
        if architecture.IMAGE_PROBABILITY in outputs:
            return np.asarray(outputs[architecture.IMAGE_PROBABILITY], np.float32).reshape(-1)
        if "target" in outputs:  # a model exported with the former classification_head option
            target = np.asarray(outputs["target"], np.float32)
            return target.reshape(len(target))
        mask = np.asarray(outputs["mask"], np.float32)
        return mask.reshape(len(mask), -1).max(axis=1)


ARCHITECTURE = MaskResNet()
