"""Prediction: an exported model over a records split or a DICOM folder -> a Kaggle submission CSV.

DICOM folders are converted first (records.convert, no labels: every image lands in
the "test" split) into a temporary records folder that is removed afterwards, so
predictions see exactly the pipeline and preprocessing that training and evaluation
saw. Batches stream through the model and straight into the submission writer:
nothing but the current batch is held in memory, whatever the number of images.

`model_outputs` and `challenge_detections` are the model-calling and box-converting
steps that evaluation shares, so a box written here is the box evaluation scored.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from pneumo_tf.training import callbacks
from pneumo_tf.data import pipeline
from pneumo_tf.evaluation import submission
from pneumo_tf.training import trainer
from pneumo_tf.errors import UserError
from pneumo_tf.fileio import atomic_open
from pneumo_tf.evaluation.postprocess import challenge_detections, model_outputs
from pneumo_tf.progress import Progress
from pneumo_tf.records import shards
from pneumo_tf.records.manifest import REJECTS_NAME

BOX_COLOR = tuple(int(255 * channel) for channel in callbacks.PREDICTED_BOX_COLOR)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    model_dir: str
    output: str  # the submission CSV
    records_dir: str | None = None
    split: str = "test"
    dicom_dir: str | None = None
    threshold: float | None = None  # None: the one saved in the model's pneumo_tf.json
    batch_size: int = 16
    overlay_dir: str | None = None
    overlay_size: int = 512  # overlays smaller than this are upscaled to it
    # How a DICOM folder is converted (0 passes JPEG frames through); None converts it as
    # the training records were (pneumo_tf.json "conversion"), which gives their pixels exactly.
    convert_image_size: int | None = None
    workers: int | None = None  # conversion processes; None uses every core

    def validate(self) -> None:
        if (self.records_dir is None) == (self.dicom_dir is None):
            raise UserError("give either --records_dir (with --split) or --dicom_dir, not both or neither")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, not {self.batch_size}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise UserError(f"--threshold must be between 0 and 1 (exclusive), not {self.threshold}")
        if self.overlay_size < 1:
            raise UserError(f"--overlay_size must be at least 1, not {self.overlay_size}")


def conversion_options(info: dict, image_size: int | None = None) -> shards.ConvertOptions:
    """How to convert DICOMs for a model: as its training records were (pneumo_tf.json), so
    its inputs get their pixels exactly, unless `image_size` says otherwise."""
    conversion = info.get("conversion", {})
    return shards.ConvertOptions(
        image_size=conversion.get("image_size", 0) if image_size is None else image_size,
        bit_depth=conversion.get("bit_depth", 8),
    )


def draw_overlay(image, boxes_yxyx, scores, min_size: int) -> Image.Image:
    """The grey image [S, S, 1] in [0, 1] as RGB with its boxes and scores, at least min_size pixels wide.

    Drawn with Pillow at the output size rather than with callbacks.draw_boxes at the
    model's: scores need text, and lines drawn after upscaling keep their width.
    """
    grey = Image.fromarray(np.round(np.clip(image[..., 0], 0.0, 1.0) * 255).astype(np.uint8))
    size = max(min_size, grey.width)
    picture = grey.resize((size, size), Image.BILINEAR).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for (ymin, xmin, ymax, xmax), score in zip(np.asarray(boxes_yxyx).reshape(-1, 4), scores):
        corners = [xmin * size, ymin * size, xmax * size - 1, ymax * size - 1]
        draw.rectangle(corners, outline=BOX_COLOR, width=max(1, size // 256))
        draw.text((corners[0] + 2, corners[1] + 2), f"{score:.2f}", fill=BOX_COLOR)
    return picture


def _write_png(picture: Image.Image, path: str) -> None:
    with atomic_open(path, "wb") as handle:
        picture.save(handle, format="PNG")


def predict_records(network, info: dict, config: PredictConfig, records_dir: str, split: str,
                    progress_stream=None) -> dict:
    """Writes the submission for one split of a records folder; returns counts."""
    threshold = config.threshold if config.threshold is not None else float(info["threshold"])
    total = pipeline.num_examples(records_dir, split)
    dataset = pipeline.make_dataset(records_dir, split, config.batch_size, int(info["image_size"]), training=False)
    if config.overlay_dir:
        os.makedirs(config.overlay_dir, exist_ok=True)
    counts = {"images": 0, "images_with_boxes": 0, "boxes": 0}

    def rows():
        with Progress(total, "predict", unit="images", stream=progress_stream) as progress:
            for batch, outputs in model_outputs(network, dataset):
                found = challenge_detections(outputs, batch, threshold)
                for index, (image_id, (boxes, scores, (xywh, confidences))) in enumerate(zip(batch["id"], found)):
                    image_id = image_id.decode()
                    if config.overlay_dir:
                        picture = draw_overlay(batch["image"][index], boxes, scores, config.overlay_size)
                        _write_png(picture, os.path.join(config.overlay_dir, f"{image_id}.png"))
                    counts["images"] += 1
                    counts["images_with_boxes"] += int(len(scores) > 0)
                    counts["boxes"] += len(scores)
                    yield image_id, xywh, confidences
                progress.update(len(found))

    parent = os.path.dirname(os.path.abspath(config.output))
    os.makedirs(parent, exist_ok=True)
    with pipeline.naming_bad_records(records_dir, (split,), int(info["image_size"])):
        submission.write_submission(config.output, rows())
    return {**counts, "threshold": threshold, "output": config.output}


def _read_rejects(records_dir: str) -> list[tuple[str, str]]:
    with open(os.path.join(records_dir, REJECTS_NAME), newline="") as handle:
        return [(row["file"], row["reason"]) for row in csv.DictReader(handle)]


def predict(config: PredictConfig, progress_stream=None) -> dict:
    """Writes the submission CSV (and overlays) of `config`; returns a summary with counts and rejects."""
    config.validate()
    # Before any conversion: a wrong model folder should not cost a folder's conversion first.
    network, info = trainer.load_exported(config.model_dir)
    boxes_possible = "mask" in network.output_names
    if config.records_dir is not None:
        summary = predict_records(network, info, config, config.records_dir, config.split, progress_stream)
        return {**summary, "source": f"{config.records_dir} ({config.split})", "rejects": [],
                "model_has_boxes": boxes_possible}

    scratch = tempfile.mkdtemp(prefix="pneumo_tf_predict_")
    try:
        records_dir = os.path.join(scratch, "records")
        options = conversion_options(info, config.convert_image_size)
        manifest = shards.convert(
            config.dicom_dir, records_dir, options=options,
            workers=config.workers, progress_stream=progress_stream,
        )
        rejects = _read_rejects(records_dir)
        if manifest["records"] == 0:
            reason = f" (e.g. {rejects[0][0]}: {rejects[0][1]})" if rejects else ""
            raise UserError(f"no readable DICOM file in {config.dicom_dir}: {len(rejects)} rejected{reason}")
        summary = predict_records(network, info, config, records_dir, "test", progress_stream)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**summary, "source": config.dicom_dir, "rejects": rejects, "model_has_boxes": boxes_possible}
