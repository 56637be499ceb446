"""matterport Mask R-CNN weights (github.com/matterport/Mask_RCNN, the seed's implementation) into `mask_rcnn`.

A matterport .h5 (its COCO file mask_rcnn_coco.h5, or a user's own matterport-trained weights) is a
Keras 2 HDF5 weights file: the root's `layer_names` attribute lists the layers, each layer's group
its `weight_names` ("res2a_branch2a/kernel:0"; the RPN, a nested model "rpn_model", lists its
layers' weights "rpn_conv_shared/kernel:0", ...), and each name is a dataset in that group (a whole
saved model keeps them under "model_weights"). `load` reads them by matterport's layer names
(mrcnn/model.py: resnet_graph, the fpn_* convolutions, rpn_graph, fpn_classifier_graph,
build_fpn_mask_graph), as matterport's `load_weights(by_name=True, exclude=...)` does, converting
what this network holds differently:

- ResNet: matterport's convolutions have biases, keras-hub's do not; each is followed by batch norm,
  so the bias moves into that norm's moving mean (exact, frozen or training). matterport's norm
  epsilon is Keras 2's default 1e-3, keras-hub's 1e-5: the scale is rescaled to give the same output.
- RPN: matterport scores each anchor with a two-way softmax (background, object) and orders a cell's
  anchors by its ratios width/height 0.5, 1, 2; here one sigmoid logit per anchor, ratios
  height/width: the logit's kernel is object minus background (sigmoid(b - a) = softmax(a, b)[1]),
  and anchors are reordered to the same shapes.
- Heads: matterport's box head is two convolutions (7x7 valid, 1x1) with frozen batch norm; here two
  dense layers without norm: kernels are reshaped and each frozen norm is folded into its layer (an
  affine map: exact); the same for the mask head's convolutions. Class-specific outputs
  (mrcnn_class_logits, mrcnn_bbox_fc, mrcnn_mask) load only from a file with this network's two
  classes (background, opacity: the opacity's deltas and mask channel); the seed excludes them.

What stays approximate, as the networks differ: keras-hub's ResNet strides in its 3x3 convolutions
(ResNet v1.5) where matterport's strides in the first 1x1 (v1), and pads its stem's pooling
symmetrically; P6 is a strided convolution (left initialised) where matterport subsamples P5; RoIAlign
samples bin centres. Fine-tuning (heads, then all) adapts to that.
"""
from __future__ import annotations

import dataclasses

import h5py
import numpy as np

from pneumo_tf.errors import UserError

# The seed's load_weights(..., exclude=[...]): the class-specific layers of an 81-class COCO file.
SEED_EXCLUDE = ("mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask")
# matterport's Config.MEAN_PIXEL (RGB), subtracted from pixels in [0, 255] (mold_image), and
# RPN_ANCHOR_RATIOS (width / height), the order of a cell's anchors in the RPN's outputs.
MEAN_PIXEL = (123.7, 116.8, 103.9)
RPN_ANCHOR_RATIOS = (0.5, 1.0, 2.0)
# Keras 2's BatchNormalization epsilon, matterport's BatchNorm's.
BATCH_NORM_EPSILON = 1e-3
OPACITY = 1  # the class index of lung opacity in a two-class matterport file (0 is background)


@dataclasses.dataclass
class ImportReport:
    """What `load` did: this network's layers that got the file's weights (loaded), the file's layers that
    were not used (skipped: excluded, or not in this network), this network's layers that kept their
    initialisation (initialised: excluded sources, or no matterport counterpart)."""

    path: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    initialised: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        def listed(names):
            return ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")

        return (f"matterport weights {self.path}: loaded {len(self.loaded)} layers; skipped {len(self.skipped)} of "
                f"the file's ({listed(self.skipped)}); left {len(self.initialised)} initialised "
                f"({listed(self.initialised)})")


def _attribute(group, name: str) -> list[str]:
    """A Keras 2 name-list attribute, also when Keras split it into name0, name1, ... (large headers)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [value.decode("utf8") if hasattr(value, "decode") else str(value) for value in values]


def read_weights(path: str) -> dict[str, dict[str, np.ndarray]]:
    """A Keras 2 HDF5 weights file as {layer name: {"kernel" | "bias" | "gamma" | ...: array}}; a nested
    model's weights go under their own layers' names (its weight names' last folder)."""
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"cannot read matterport weights {path}: {error}") from error
    with handle:
        root = handle["model_weights"] if "layer_names" not in handle.attrs and "model_weights" in handle else handle
        if not _attribute(root, "layer_names"):
            raise UserError(f"{path} is not a Keras 2 HDF5 weights file (no layer_names attribute)")
        found: dict[str, dict[str, np.ndarray]] = {}
        for layer_name in _attribute(root, "layer_names"):
            group = root[layer_name]
            for weight_name in _attribute(group, "weight_names"):
                parts = weight_name.split("/")
                owner = parts[-2] if len(parts) > 1 else layer_name
                found.setdefault(owner, {})[parts[-1].split(":")[0]] = np.asarray(group[weight_name])
        return found


# -- conversions (matterport's tensors -> this network's weights, in the layer's weight order) ------


def _folded_norm(tensors, norm: str, size: int):
    """(scale, shift) of matterport's frozen batch norm `norm` as an affine map y = x * scale + shift."""
    values = tensors[norm]
    scale = values["gamma"] / np.sqrt(values["moving_variance"] + BATCH_NORM_EPSILON)
    shift = values["beta"] - values["moving_mean"] * scale
    return scale.reshape(size), shift.reshape(size)


def _conv_folded(tensors, conv: str, norm: str, shape):
    """Kernel and bias of conv followed by its frozen norm, as one layer with a kernel of `shape`."""
    kernel, bias = tensors[conv]["kernel"], tensors[conv]["bias"]
    scale, shift = _folded_norm(tensors, norm, kernel.shape[-1])
    return [(kernel * scale).reshape(shape), bias * scale + shift]


def _norm_after_biased_conv(tensors, norm: str, conv: str, epsilon: float):
    """keras-hub's norm after a bias-free conv, giving what matterport's norm gives after its biased conv."""
    values = tensors[norm]
    variance = values["moving_variance"]
    gamma = values["gamma"] * np.sqrt((variance + epsilon) / (variance + BATCH_NORM_EPSILON))
    return [gamma, values["beta"], values["moving_mean"] - tensors[conv]["bias"], variance]


def _opacity_columns(tensors, name: str, per_class: int):
    """The opacity's columns of a class-specific layer's kernel and bias (last axis: classes x per_class)."""
    kernel, bias = tensors[name]["kernel"], tensors[name]["bias"]
    classes = kernel.shape[-1] // per_class
    if classes != 2:
        raise UserError(f"matterport layer {name} is for {classes} classes (shape {kernel.shape}); mask_rcnn has "
                        f"background and opacity: exclude it (the seed's exclusions do)")
    columns = slice(OPACITY * per_class, (OPACITY + 1) * per_class)
    return [kernel[..., columns], bias[columns]]


def _rpn_anchor_order(ratios) -> list[int]:
    """For each of this network's anchors in a cell (ratio height / width), matterport's anchor index."""
    order = []
    for ratio in ratios:
        matches = [index for index, theirs in enumerate(RPN_ANCHOR_RATIOS) if np.isclose(theirs, 1.0 / ratio)]
        if not matches:
            raise UserError(f"mask_rcnn rpn_anchor_ratios {tuple(ratios)} (height / width) must be among matterport's "
                            f"width / height ratios' inverses {tuple(1 / r for r in RPN_ANCHOR_RATIOS)} "
                            "to load its RPN")
        order.append(matches[0])
    return order


def _rpn_objectness(tensors, order):
    kernel, bias = tensors["rpn_class_raw"]["kernel"], tensors["rpn_class_raw"]["bias"]
    theirs = [2 * index for index in order]  # channel 2m is background, 2m + 1 object
    return [kernel[..., [c + 1 for c in theirs]] - kernel[..., theirs], bias[[c + 1 for c in theirs]] - bias[theirs]]


def _rpn_deltas(tensors, order):
    kernel, bias = tensors["rpn_bbox_pred"]["kernel"], tensors["rpn_bbox_pred"]["bias"]
    channels = [4 * index + k for index in order for k in range(4)]
    return [kernel[..., channels], bias[channels]]


def _direct(tensors, name: str, kinds=("kernel", "bias")):
    return [tensors[name][kind] for kind in kinds]


# -- the mapping ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Transfer:
    layer: object  # this network's layer
    sources: tuple[str, ...]  # matterport's layers it reads
    convert: object  # tensors -> values in layer.weights' order


def _backbone_transfers(backbone) -> list[_Transfer]:
    """matterport's ResNet (conv1, bn_conv1, res{stage}{block}_branch{1,2a,2b,2c} and bn...) onto keras-hub's
    (conv1_conv, conv1_bn, stack{stage-2}_block{i}_{0,1,2,3}_conv and _bn)."""
    pairs = [("conv1", "bn_conv1", "conv1_conv", "conv1_bn")]
    for layer in backbone.layers:
        name = layer.name
        if name.startswith("stack") and name.endswith("_conv"):
            stack, block, index = name.split("_")[:3]
            stage, letter = int(stack[5:]) + 2, chr(ord("a") + int(block[5:]))
            branch = {"0": "1", "1": "2a", "2": "2b", "3": "2c"}[index]
            pairs.append((f"res{stage}{letter}_branch{branch}", f"bn{stage}{letter}_branch{branch}", name,
                          name[: -len("_conv")] + "_bn"))
    transfers = []
    for conv, norm, our_conv, our_norm in pairs:
        norm_layer = backbone.get_layer(our_norm)
        transfers.append(_Transfer(backbone.get_layer(our_conv), (conv,), lambda t, c=conv: [t[c]["kernel"]]))
        transfers.append(_Transfer(norm_layer, (norm, conv), lambda t, n=norm, c=conv, e=norm_layer.epsilon:
                                   _norm_after_biased_conv(t, n, c, e)))
    return transfers


def _folded_convs(head, layer_prefix: str, source_prefix: str, indices) -> list[_Transfer]:
    """Transfers into `head`'s layers `{layer_prefix}{i}` from matterport's `{source_prefix}_conv{i}` with its
    `{source_prefix}_bn{i}` folded in, for each i of `indices`."""
    transfers = []
    for index in indices:
        layer = head.get_layer(f"{layer_prefix}{index}")
        conv, norm = f"{source_prefix}_conv{index}", f"{source_prefix}_bn{index}"
        transfers.append(_Transfer(layer, (conv, norm),
                                   lambda t, c=conv, n=norm, s=layer.kernel.shape: _conv_folded(t, c, n, s)))
    return transfers


def _transfers(network) -> list[_Transfer]:
    """Every layer of `network` (pneumo_tf.models.mask_rcnn.MaskRCNN) that has a matterport counterpart."""
    first_stage, options = network.first_stage, network.options
    fpn = first_stage.get_layer("fpn")
    transfers = _backbone_transfers(first_stage.get_layer("backbone"))
    for level in (2, 3, 4, 5):
        transfers.append(_Transfer(fpn.lateral_conv_layers[f"P{level}"], (f"fpn_c{level}p{level}",),
                                   lambda t, n=f"fpn_c{level}p{level}": _direct(t, n)))
        transfers.append(_Transfer(fpn.output_conv_layers[f"P{level}"], (f"fpn_p{level}",),
                                   lambda t, n=f"fpn_p{level}": _direct(t, n)))
    order = _rpn_anchor_order(options.rpn_anchor_ratios)
    transfers += [
        _Transfer(first_stage.get_layer("rpn_conv_shared"), ("rpn_conv_shared",),
                  lambda t: _direct(t, "rpn_conv_shared")),
        _Transfer(first_stage.get_layer("rpn_class"), ("rpn_class_raw",), lambda t: _rpn_objectness(t, order)),
        _Transfer(first_stage.get_layer("rpn_bbox"), ("rpn_bbox_pred",), lambda t: _rpn_deltas(t, order)),
    ]
    box, mask = network.box_head, network.mask_head
    transfers += _folded_convs(box, "mrcnn_fc", "mrcnn_class", (1, 2))
    transfers += [
        _Transfer(box.get_layer("mrcnn_class_logits"), ("mrcnn_class_logits",),
                  lambda t: _direct(t, "mrcnn_class_logits")),
        _Transfer(box.get_layer("mrcnn_bbox"), ("mrcnn_bbox_fc",), lambda t: _opacity_columns(t, "mrcnn_bbox_fc", 4)),
    ]
    transfers += _folded_convs(mask, "mrcnn_mask_conv", "mrcnn_mask", range(1, options.mask_head_convs + 1))
    transfers += [
        _Transfer(mask.get_layer("mrcnn_mask_deconv"), ("mrcnn_mask_deconv",),
                  lambda t: _direct(t, "mrcnn_mask_deconv")),
        _Transfer(mask.get_layer("mrcnn_mask"), ("mrcnn_mask",), lambda t: _opacity_columns(t, "mrcnn_mask", 1)),
    ]
    return transfers


def _weighted_layers(model):
    """The layers of `model` that hold weights themselves, inside nested models and keras-hub's FPN too."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _weighted_layers(layer)
        elif hasattr(layer, "output_conv_layers"):  # keras-hub's FeaturePyramid
            yield from [*layer.lateral_conv_layers.values(), *layer.output_conv_layers.values()]
        elif layer.weights:
            yield layer


def load(network, path: str, exclude=SEED_EXCLUDE) -> ImportReport:
    """Loads matterport's weights in `path` into `network` (a MaskRCNN) by layer name, except the layers named
    in `exclude` (matterport's names); returns what it did. Nothing is assigned unless every non-excluded
    counterpart is in the file with the shapes this network needs (else one UserError listing them)."""
    tensors = read_weights(path)
    excluded, transfers = set(exclude), _transfers(network)
    report, problems, assignments, used = ImportReport(path), [], [], set()
    for transfer in transfers:
        if excluded & set(transfer.sources):
            report.initialised.append(transfer.layer.name)
            continue
        missing = [source for source in transfer.sources if source not in tensors]
        if missing:
            problems.append(f"{transfer.layer.name} needs matterport layer(s) {', '.join(missing)}, not in the file")
            continue
        used.update(transfer.sources)
        values = transfer.convert(tensors)
        shapes = [tuple(weight.shape) for weight in transfer.layer.weights]
        if [tuple(np.shape(value)) for value in values] != shapes:
            problems.append(f"{transfer.layer.name} needs shapes {shapes}, matterport's {', '.join(transfer.sources)} "
                            f"give {[tuple(np.shape(value)) for value in values]}")
            continue
        assignments.append((transfer.layer, values))
    if problems:
        raise UserError(f"cannot load matterport weights {path} into mask_rcnn: " + "; ".join(problems))
    for layer, values in assignments:
        for weight, value in zip(layer.weights, values):
            weight.assign(np.asarray(value, dtype=weight.dtype))
        report.loaded.append(layer.name)
    report.skipped = sorted(set(tensors) - used)
    covered = {id(transfer.layer) for transfer in transfers}
    report.initialised += [layer.name for model in (network.first_stage, network.box_head, network.mask_head)
                           for layer in _weighted_layers(model) if id(layer) not in covered]
    return report
