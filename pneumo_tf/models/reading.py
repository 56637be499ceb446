"""A model's reading of images: what evaluate, predict and serve read boxes and image probabilities from.

A reading (`Reading`, made by `load` from --model_dir and the `ReadingConfig` flags) is one
exported model (pneumo_tf.models.exported), optionally read with flip test-time augmentation,
or an ensemble of such models, their boxes fused. Its models are its members (`Member`);
each member reads every image in one or two views (as it is, and mirrored with hflip); a
member read alone is a part of the reading (`Part`, what the evaluation report compares the
whole with). A reading offers the host side of the model contract (`ReadsOutputs` in
pneumo_tf.models.architecture: `detections(outputs, threshold)`, `image_probability(outputs)`,
`gives_boxes`), so the commands never know which of these they read:

  outputs = reading.infer(batch)              # one batched network call per member
  reading.detections(outputs, t), reading.image_probability(outputs)

Test-time augmentation (tta="hflip"): each member runs once on the batch concatenated with
its left-right mirror image (one batched call on the accelerator), the mirrored half's boxes
are mirrored back, and the two sets are fused; the image probability is the mean of the two.

Ensembles: each member reads the records at its own image size (`dataset` decodes the split
once per size, in lockstep, and checks the ids match); every view of every member gives one
set of boxes, weighted by its member's weight, and all sets are fused at once with the fusion
method (pneumo_tf.models.fusion); the image probability is the weighted mean of the members'.
Members that give no boxes (classifiers) add to the probability only.

The threshold: as everywhere, one t decides both the image (probability > t) and its boxes
(score > t). Fused boxes keep that meaning: at threshold t each view's detections at t are
fused, and the fused boxes with score > t are kept. Fusion happens per threshold, not once at
a low one, because the mask network's boxes are the components of its mask thresholded at t:
at a low threshold they are other (merged, larger) boxes. With fusion per threshold a box that
every view finds at t keeps its score; one that only some find is scored down (weighted
boxes fusion) and dropped once that falls to t or below. A single view's detections are returned
as the architecture gives them, untouched.

Score alignment (--score_alignment=threshold, pneumo_tf.models.fusion): members that score on
different scales are read at matching points. Each member's anchor is the threshold evaluation
saved for it alone; at the reading's threshold t each member reads its outputs at the threshold
of its own that maps to t (its anchor at t = 0.5), and its scores and image probability go
through the same map before fusion and averaging.

Where a reading's threshold lives: one model read plainly keeps it in its pneumo_tf.json. Any
fused reading (hflip, several models) keeps it in an ensemble folder, written by
`python -m pneumo_tf.evaluate --ensemble_dir` together with everything that reading is:

    ensemble_dir/
      pneumo_tf_ensemble.json  members (model folders, relative to ensemble_dir), weights and
                               anchors, tta, fusion method and IoU, score alignment, the
                               threshold evaluation chose, and the evaluation's numbers
      evaluation/, logs/       the evaluation report and its TensorBoard events

`load(ensemble_dir)` reads it back as the same reading; predict and serve take it as their
--model_dir. A fused reading given ad hoc (--model_dir=a,b or --tta=hflip) has no threshold of
its own: a single model's saved threshold stands in for its hflip reading; several models need
a threshold given or an ensemble folder.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from pneumo_tf import fileio
from pneumo_tf.cli import check_constraints, option
from pneumo_tf.data import metadata, pipeline
from pneumo_tf.errors import UserError
from pneumo_tf.fileio import write_json_atomic
from pneumo_tf.models import exported, fusion as box_fusion
from pneumo_tf.models.architecture import Detections, no_detections
from pneumo_tf.records.radiograph import ConvertOptions

TTA_MODES = ("none", "hflip")
ENSEMBLE_FILE = "pneumo_tf_ensemble.json"
# The pipeline batch holds the first member's images as "image", the other sizes' under this.
IMAGE_AT_SIZE = "image_{}"


@dataclasses.dataclass(frozen=True)
class ReadingConfig:
    """How the --model_dir models are read: the flags evaluate, predict and serve share."""

    tta: str | None = option(None, "Test-time augmentation: none, or hflip (each image is also read mirrored in the "
                             "same batched call; boxes fused, probabilities averaged). Default none; an ensemble "
                             "folder uses its own.", choices=TTA_MODES)
    weights: tuple[float, ...] = option((), "Weights of the --model_dir models (ensemble members), comma separated; "
                                        "default equal.", exclusive_minimum=0.0)
    fusion: str | None = option(None, "How boxes of several readings (hflip views, ensemble members) are fused: wbf "
                                "(weighted boxes fusion), soft_nms or nms, by the ensemble-boxes package. Default "
                                "wbf; an ensemble folder uses its own.", choices=box_fusion.FUSION_METHODS)
    fusion_iou: float | None = option(None, "IoU above which fusion takes two boxes for the same opacity; default "
                                      f"{box_fusion.DEFAULT_IOU_THRESHOLD}; an ensemble folder uses its own.",
                                      exclusive_minimum=0.0, exclusive_maximum=1.0)
    score_alignment: str | None = option(
        None, "none, or threshold: before fusion, each model's scores are mapped piecewise linearly so that its own "
        "saved threshold (python -m pneumo_tf.evaluate on it alone) becomes 0.5, and models that score on different "
        "scales are read at matching points (pneumo_tf.models.fusion). Default none; an ensemble folder uses its own.",
        choices=box_fusion.ALIGNMENTS)

    def given(self) -> list[str]:
        """The flags set to something other than their defaults."""
        return [f"--{field.name}" for field in dataclasses.fields(self)
                if getattr(self, field.name) != field.default]


class Member:
    """One exported model of a reading, with its weight, its views (1, or 2 with hflip) and, when
    the reading aligns scores, its anchor: the threshold of its own that the reading's 0.5 stands for.

    `call` is in-graph: with hflip it runs the network once on the images and their mirror
    images concatenated along the batch; `views` splits the (numpy) outputs back per view.
    Every output of the contract is batch-major, so the split is a slice.
    """

    def __init__(self, model: exported.ExportedModel, weight: float = 1.0, tta: str = "none",
                 anchor: float | None = None):
        self.model, self.weight, self.tta = model, float(weight), tta
        if anchor is not None and not 0.0 < anchor < 1.0:
            raise UserError(f"{model.model_dir}: an anchor threshold must lie strictly between 0 and 1, not {anchor}")
        self.anchor = None if anchor is None else float(anchor)
        self.architecture = model.architecture
        self.image_size = model.image_size
        self.view_count = 2 if tta == "hflip" else 1

    def call(self, images, raw: dict):
        """In-graph: images and the batch's raw view, sex and age -> the network's outputs (both views)."""
        if self.view_count == 2:
            images = tf.concat([images, tf.reverse(images, axis=[2])], axis=0)
            raw = {name: tf.concat([value, value], axis=0) for name, value in raw.items()}
        return self.architecture.infer(self.model.network, self.model.inputs(images, raw))

    def views(self, outputs: dict) -> list[dict]:
        """Numpy outputs of `call` -> one outputs dict per view (the second one of mirrored images)."""
        outputs = {name: np.asarray(value) for name, value in outputs.items()}
        count = len(next(iter(outputs.values()))) // self.view_count
        return [{name: value[view * count:(view + 1) * count] for name, value in outputs.items()}
                for view in range(self.view_count)]

    def own_threshold(self, threshold: float) -> float:
        """The threshold on this member's own scale that the reading's `threshold` stands for."""
        return threshold if self.anchor is None else box_fusion.aligned_threshold(threshold, self.anchor)

    def _aligned(self, scores) -> np.ndarray:
        return np.asarray(scores, np.float32) if self.anchor is None else box_fusion.align_scores(scores, self.anchor)

    def view_detections(self, views: list[dict], threshold: float) -> list[list[Detections]]:
        """Per view, per image, the detections at `threshold` in the original image's frame (scores aligned)."""
        own = self.own_threshold(threshold)
        found = [[(boxes, self._aligned(scores)) for boxes, scores in self.architecture.detections(view, own)]
                 for view in views]
        return [found[0]] + [[box_fusion.mirror(detections) for detections in mirrored] for mirrored in found[1:]]

    def image_probability(self, views: list[dict]) -> np.ndarray:
        """float32 [B]: the mean of its views' probabilities (aligned)."""
        return self._aligned(np.mean([self.architecture.image_probability(view) for view in views], axis=0))


class Reading:
    """Members read together (see the module docstring); outputs are, per member, its views' numpy outputs."""

    def __init__(self, members: Sequence[Member], fusion_method: str = box_fusion.DEFAULT_FUSION,
                 fusion_iou: float = box_fusion.DEFAULT_IOU_THRESHOLD, threshold: float | None = None,
                 ensemble_dir: str | None = None):
        self.members = list(members)
        self.fusion, self.fusion_iou = fusion_method, float(fusion_iou)
        self.threshold = threshold
        self.ensemble_dir = ensemble_dir
        self.image_sizes = tuple(dict.fromkeys(member.image_size for member in self.members))
        self.gives_boxes = any(member.architecture.gives_boxes for member in self.members)
        self.gives_masks = any(member.architecture.gives_masks for member in self.members)
        self._traced = tf.function(self.outputs, reduce_retracing=True)

    @property
    def tta(self) -> str:
        return self.members[0].tta

    @property
    def score_alignment(self) -> str:
        return "none" if self.members[0].anchor is None else "threshold"

    @property
    def weights(self) -> list[float]:
        return [member.weight for member in self.members]

    @property
    def model_dirs(self) -> list[str]:
        return [member.model.model_dir for member in self.members]

    @property
    def is_plain(self) -> bool:
        """One model read as it is (no TTA, its own scores): its threshold lives in its own pneumo_tf.json."""
        return len(self.members) == 1 and self.tta == "none" and self.score_alignment == "none"

    @property
    def name(self) -> str:
        """The architecture for a plain model, else what is fused ("2 x mask_resnet, hflip, wbf")."""
        if self.is_plain:
            return self.members[0].architecture.name
        names = sorted({member.architecture.name for member in self.members})
        parts = [f"{len(self.members)} x {'+'.join(names)}"] + (["hflip"] if self.tta == "hflip" else [])
        parts += ["aligned"] if self.score_alignment == "threshold" else []
        return ", ".join(parts + [self.fusion])

    # --------------------------------------------------------------------------------------------
    # Running the networks.

    def outputs(self, images: tuple, raw: dict):
        """In-graph: images float32 [B, S, S, 1] at each of `image_sizes`, and the batch's raw view, sex and
        age (pneumo_tf.data.metadata.RAW_KEYS) -> each member's raw outputs."""
        by_size = dict(zip(self.image_sizes, images))
        return [member.call(by_size[member.image_size], raw) for member in self.members]

    def split(self, raw) -> list[list[dict]]:
        """Each member's outputs (tensors or numpy) -> per member, per view, numpy outputs."""
        return [member.views(outputs) for member, outputs in zip(self.members, raw)]

    def infer(self, batch: dict) -> list[list[dict]]:
        """A batch of `dataset` (or any pipeline batch at the members' one size) -> outputs."""
        images = tuple(batch["image"] if index == 0 else batch[IMAGE_AT_SIZE.format(size)]
                       for index, size in enumerate(self.image_sizes))
        return self.split(self._traced(images, {name: batch[name] for name in metadata.RAW_KEYS.values()}))

    def dataset(self, records_dir: str, split: str, batch_size: int) -> tf.data.Dataset:
        """The split's evaluation batches, with each member size's images (IMAGE_AT_SIZE beyond the first).

        Sizes after the first read the split again in lockstep (the same manifest order);
        each batch checks that the ids match.
        """
        datasets = [pipeline.make_dataset(records_dir, split, batch_size, size, training=False)
                    for size in self.image_sizes]
        if len(datasets) == 1:
            return datasets[0]

        def merge(first, *others):
            batch = dict(first)
            for size, other in zip(self.image_sizes[1:], others):
                tf.debugging.assert_equal(first["id"], other["id"], message="size-wise reads out of step")
                batch[IMAGE_AT_SIZE.format(size)] = other["image"]
            return batch

        return tf.data.Dataset.zip(tuple(datasets)).map(merge)

    # --------------------------------------------------------------------------------------------
    # Reading the outputs (the host side of the model contract).

    def detections(self, outputs: list[list[dict]], threshold: float) -> list[Detections]:
        """Per image, the fused boxes with scores above `threshold` (see the module docstring)."""
        per_view, weights = [], []
        for member, views in zip(self.members, outputs):
            if member.architecture.gives_boxes:
                found = member.view_detections(views, threshold)
                per_view += found
                weights += [member.weight] * len(found)
        if len(per_view) == 1:
            return per_view[0]
        count = len(self.image_probability(outputs))
        if not per_view:
            return [no_detections() for _ in range(count)]
        kept = []
        for per_image in zip(*per_view):
            boxes, scores = box_fusion.fuse(per_image, weights, self.fusion, self.fusion_iou)
            keep = scores > threshold
            kept.append((boxes[keep], scores[keep]))
        return kept

    def image_probability(self, outputs: list[list[dict]]) -> np.ndarray:
        """float32 [B]: the members' probabilities (each the mean of its views), weighted mean."""
        probabilities = [member.image_probability(views) for member, views in zip(self.members, outputs)]
        return np.average(probabilities, axis=0, weights=self.weights).astype(np.float32)

    def masks(self, outputs: list[list[dict]], threshold: float, sizes) -> list[np.ndarray]:
        """Per image, bool [height, width] for its (height, width) in `sizes`: the pixels called opacity at
        `threshold` by views (each member's, mirrored views mirrored back) holding at least half the
        weight of those that give masks; a single view's masks as the architecture gives them."""
        votes, total = None, 0.0
        for member, views in zip(self.members, outputs):
            if not member.architecture.gives_masks:
                continue
            for index, view in enumerate(views):
                found = member.architecture.masks(view, member.own_threshold(threshold), sizes)
                if index == 1:  # the mirrored view
                    found = [mask[:, ::-1] for mask in found]
                weighted = [member.weight * mask for mask in found]
                votes = weighted if votes is None else [a + b for a, b in zip(votes, weighted)]
                total += member.weight
        if votes is None:
            raise ValueError(f"{self.name} gives no masks")
        return [vote >= 0.5 * total for vote in votes]

    def parts(self) -> list[tuple[str, "Part"]]:
        """(label, part) of each member alone, without TTA and, when this reading uses it, with:
        what the evaluation report compares the whole with. Parts read this reading's outputs."""
        found = []
        for index, member in enumerate(self.members):
            modes = ("none", "hflip") if member.tta == "hflip" else ("none",)
            for tta in modes:
                alone = Reading([Member(member.model, 1.0, tta)], self.fusion, self.fusion_iou)
                label = member.model.model_dir + (" + hflip" if tta == "hflip" else "")
                found.append((label, Part(alone, index, alone.members[0].view_count)))
        return found

    def conversion_options(self, image_size: int | None = None) -> ConvertOptions:
        """How to convert source files for this reading: as its members' training records were when
        they agree; else at source resolution (every member's size decodes from it) and the deepest bit depth."""
        options = {member.model.conversion_options(image_size) for member in self.members}
        if len(options) == 1:
            return options.pop()
        return ConvertOptions(image_size=0 if image_size is None else image_size,
                              bit_depth=max(option.bit_depth for option in options))

    def describe(self) -> dict:
        """What this reading is, as the evaluation summary records it."""
        return {"name": self.name, "model_dirs": self.model_dirs, "weights": self.weights, "tta": self.tta,
                "fusion": self.fusion, "fusion_iou": self.fusion_iou, "score_alignment": self.score_alignment,
                "anchors": [member.anchor for member in self.members],
                "image_sizes": list(self.image_sizes)}


@dataclasses.dataclass
class Part:
    """One member of a reading read alone (see Reading.parts), from the whole reading's outputs."""

    reading: Reading
    member_index: int
    view_count: int

    @property
    def gives_boxes(self) -> bool:
        return self.reading.gives_boxes

    def _own(self, outputs):
        return [outputs[self.member_index][: self.view_count]]

    def detections(self, outputs, threshold):
        return self.reading.detections(self._own(outputs), threshold)

    def image_probability(self, outputs):
        return self.reading.image_probability(self._own(outputs))


# ------------------------------------------------------------------------------------------------
# Loading and the ensemble folder.


def is_ensemble(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ENSEMBLE_FILE))


def _read_ensemble_file(folder: str) -> dict:
    return fileio.read_json(os.path.join(folder, ENSEMBLE_FILE))


def _model_dirs(model_dir: str) -> list[str]:
    dirs = [folder.strip() for folder in model_dir.split(",") if folder.strip()]
    if not dirs:
        raise UserError("--model_dir names no folder")
    return dirs


def is_new_fused_reading(model_dir: str, config: ReadingConfig) -> bool:
    """Whether `load(model_dir, config)` gives a fused reading that no ensemble folder records yet."""
    dirs = _model_dirs(model_dir)
    if len(dirs) == 1 and is_ensemble(dirs[0]):
        return False
    return len(dirs) > 1 or (config.tta or "none") != "none" or (config.score_alignment or "none") != "none"


def load(model_dir: str, config: ReadingConfig = ReadingConfig()) -> Reading:
    """The reading of `model_dir`: a model folder, an ensemble folder, or model folders separated by commas."""
    check_constraints(config)
    dirs = _model_dirs(model_dir)
    if len(dirs) == 1 and is_ensemble(dirs[0]):
        if config.given():
            raise UserError(f"{dirs[0]} is an ensemble folder: its members, weights, TTA and fusion were chosen with "
                            f"its threshold, so drop {', '.join(config.given())} (or evaluate a new ensemble)")
        return read_ensemble(dirs[0])
    nested = [folder for folder in dirs if is_ensemble(folder)]
    if nested:
        raise UserError(f"{nested[0]} is an ensemble folder: an ensemble's members are model folders")
    weights = config.weights or (1.0,) * len(dirs)
    if len(weights) != len(dirs):
        raise UserError(f"--weights gives {len(weights)} weights for {len(dirs)} models in --model_dir")
    models = [exported.load(folder) for folder in dirs]
    tta = config.tta or "none"
    anchors = [None] * len(models)
    if (config.score_alignment or "none") == "threshold":
        unevaluated = [model.model_dir for model in models if not model.threshold_chosen]
        if unevaluated:
            raise UserError(f"--score_alignment=threshold reads each model's own saved threshold, and "
                            f"{unevaluated[0]} has none yet: run python -m pneumo_tf.evaluate --model_dir on it first")
        anchors = [model.threshold for model in models]
    members = [Member(model, weight, tta, anchor) for model, weight, anchor in zip(models, weights, anchors)]
    # A model's saved threshold was chosen for its plain reading; it stands in for its hflip reading
    # (aligned, its threshold is where the alignment puts it).
    threshold = None
    if len(models) == 1:
        threshold = models[0].threshold if anchors[0] is None else box_fusion.ALIGNED_ANCHOR
    return Reading(members, config.fusion or box_fusion.DEFAULT_FUSION,
                     box_fusion.DEFAULT_IOU_THRESHOLD if config.fusion_iou is None else config.fusion_iou, threshold)


def read_ensemble(ensemble_dir: str) -> Reading:
    """The reading an ensemble folder records."""
    path = os.path.join(ensemble_dir, ENSEMBLE_FILE)
    info = _read_ensemble_file(ensemble_dir)
    try:
        # Files written before score alignment have no anchors: their members are read unaligned.
        entries = [(os.path.normpath(os.path.join(ensemble_dir, entry["model_dir"])), float(entry["weight"]),
                    None if entry.get("anchor") is None else float(entry["anchor"])) for entry in info["members"]]
        fields = info["tta"], info["fusion"], info["fusion_iou"], info["threshold"]
    except KeyError as error:
        raise UserError(f"{path} lacks {error}: write it again with python -m pneumo_tf.evaluate --ensemble_dir") \
            from error
    except (TypeError, ValueError) as error:
        raise UserError(f"{path} is not a pneumo_tf ensemble file ({error}): write it again with python -m "
                        "pneumo_tf.evaluate --ensemble_dir") from error
    tta, fusion, fusion_iou, threshold = fields
    members = [Member(exported.load(folder), weight, tta, anchor) for folder, weight, anchor in entries]
    return Reading(members, fusion, fusion_iou, threshold, ensemble_dir)


def save_threshold(reading: Reading, changes: dict, ensemble_dir: str | None = None) -> str:
    """Stores `changes` (the chosen threshold and its numbers) where `reading` keeps them:
    a plain model's pneumo_tf.json, or its ensemble folder (written whole, or updated); returns the folder."""
    if reading.is_plain and ensemble_dir is None:
        exported.update_info(reading.model_dirs[0], changes)
        return reading.model_dirs[0]
    folder = ensemble_dir or reading.ensemble_dir
    if folder is None:
        raise ValueError("a fused reading's threshold needs an ensemble folder")
    path = os.path.join(folder, ENSEMBLE_FILE)
    saved = _read_ensemble_file(folder) if os.path.isfile(path) and folder == reading.ensemble_dir else {}
    os.makedirs(folder, exist_ok=True)
    members = [{"model_dir": os.path.relpath(os.path.abspath(member.model.model_dir), os.path.abspath(folder)),
                "weight": member.weight, "anchor": member.anchor} for member in reading.members]
    write_json_atomic(path, {**saved, **changes, "members": members, "tta": reading.tta, "fusion": reading.fusion,
                             "fusion_iou": reading.fusion_iou, "score_alignment": reading.score_alignment})
    return folder
