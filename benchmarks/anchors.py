"""How well the detectors' anchors fit the real RSNA boxes: each box's best anchor IoU, per anchor setting.

    python benchmarks/anchors.py                                   # the real presets at 128 px
    python benchmarks/anchors.py --image_size=256 --preset=demo

A box teaches a detector nothing unless some anchor overlaps it enough: RetinaNet's label encoder makes an
anchor positive at IoU >= positive_threshold (0.5), Mask R-CNN's RPN at rpn_positive_iou (0.7; its best anchor
counts as positive whatever its IoU, so below 0.7 the box is learnt from one anchor only). This reads every
box of the official label CSV (about 9,500 boxes of 20-800 px at 1,024 px), scales it to --image_size, and
computes its IoU with every anchor the model generates at that size (positions and all, the model's own anchor
code). Prints, for the preset's anchors and for the settings around them (RetinaNet's anchor_size, Mask R-CNN's
rpn_anchor_scales times a factor): the share of boxes whose best anchor reaches 0.4, 0.5 and 0.7, and the median
best IoU. No training: a few seconds.
"""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import common  # noqa: E402  benchmarks/common.py (the script's folder is on sys.path)
from pneumo_tf import cli, models as models_lib  # noqa: E402
from pneumo_tf.cli import option  # noqa: E402
from pneumo_tf.errors import UserError  # noqa: E402
from pneumo_tf.evaluation import metric  # noqa: E402
from pneumo_tf.records import labels as labels_lib  # noqa: E402

SHARED_LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "rsna",
                             "stage_2_train_labels.csv")
SOURCE_SIZE = 1024  # the challenge's radiographs
LEVELS = (0.4, 0.5, 0.7)


@dataclasses.dataclass(frozen=True)
class AnchorsConfig:
    labels_csv: str = option(os.path.normpath(SHARED_LABELS), "The challenge's label CSV (patientId, x, y, width, "
                             "height, Target).")
    image_size: int = option(128, "Side the models read the 1,024-px radiographs at.", minimum=16)
    preset: str = option("real", "The presets whose anchor settings are the reference.",
                         details=models_lib.presets_help)
    factors: tuple[float, ...] = option((0.5, 0.75, 1.0, 1.5, 2.0), "Multiples of the preset's anchor sides to "
                                        "compare.")

    def validate(self) -> None:
        cli.check_constraints(self)
        if not os.path.isfile(self.labels_csv):
            raise UserError(f"no label CSV at {self.labels_csv}: the real RSNA files live in ../shared/data/rsna "
                            "beside the repository, or name one with --labels_csv")


def real_boxes(labels_csv: str, image_size: int) -> np.ndarray:
    """[N, 4] (x, y, width, height) pixel boxes at `image_size` of every box in the label CSV."""
    found = [box for patient in labels_lib.read_labels(labels_csv).values() for box in patient.boxes]
    return np.array(found, np.float64).reshape(-1, 4) * (image_size / SOURCE_SIZE)


def best_iou(boxes: np.ndarray, anchors_yxyx: np.ndarray, chunk: int = 512) -> np.ndarray:
    """[N] the largest IoU (the challenge metric's iou_matrix) of each (x, y, w, h) box with any anchor."""
    top, left, bottom, right = np.asarray(anchors_yxyx, np.float64).T
    anchors = np.stack([left, top, right - left, bottom - top], axis=1)
    return np.concatenate([metric.iou_matrix(boxes[start:start + chunk], anchors).max(axis=1)
                           for start in range(0, len(boxes), chunk)] or [np.zeros(0)])


def retinanet_anchors(image_size: int, options) -> np.ndarray:
    from pneumo_tf.models import retinanet

    generated = retinanet.anchor_generator(options)(np.zeros((1, image_size, image_size, 1), np.float32))
    return np.concatenate([np.asarray(value) for value in generated.values()])


def mask_rcnn_anchors(image_size: int, options) -> np.ndarray:
    from pneumo_tf.models import mask_rcnn

    return mask_rcnn.anchors(image_size, options) * image_size


def variants(config: AnchorsConfig):
    """(model, setting in words, anchors in pixels) for each detector and factor."""
    for name, anchor_field, make in (("retinanet", "anchor_size", retinanet_anchors),
                                     ("mask_rcnn", "rpn_anchor_scales", mask_rcnn_anchors)):
        architecture = models_lib.get(name)
        preset = architecture.presets.get(config.preset)
        options = architecture.make_options(preset.model_options if preset else {})
        reference = getattr(options, anchor_field)
        for factor in config.factors:
            value = (tuple(int(round(side * factor)) for side in reference) if isinstance(reference, tuple)
                     else reference * factor)
            changed = dataclasses.replace(options, **{anchor_field: value})
            yield name, f"{anchor_field}={value}{' (preset)' if factor == 1.0 else ''}", make(config.image_size,
                                                                                                changed)


def benchmark(config: AnchorsConfig) -> int:
    config.validate()
    boxes = real_boxes(config.labels_csv, config.image_size)
    sides = np.sqrt(boxes[:, 2] * boxes[:, 3])
    print(common.describe(("tensorflow", "keras-hub", "numpy")))
    print(f"{len(boxes)} real boxes at {config.image_size} px: side (square root of the area) "
          f"5th/50th/95th percentile {np.percentile(sides, 5):.1f} / {np.median(sides):.1f} / "
          f"{np.percentile(sides, 95):.1f} px\n")
    header = f"{'model':<10} {'anchors':<48} {'count':>6} " + " ".join(f"{'>=' + str(level):>6}" for level in LEVELS)
    print(header + f" {'median':>7}")
    print("-" * (len(header) + 8))
    for name, setting, anchors in variants(config):
        best = best_iou(boxes, anchors)
        shares = " ".join(f"{np.mean(best >= level):>6.3f}" for level in LEVELS)
        print(f"{name:<10} {setting:<48} {len(anchors):>6} {shares} {np.median(best):>7.3f}")
    return 0


def main():
    return benchmark(cli.config_from_flags(AnchorsConfig))


if __name__ == "__main__":
    cli.define_flags(AnchorsConfig)
    cli.run(main)
