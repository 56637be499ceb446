"""Prediction: an exported model (or an ensemble, or a model with flip TTA: a reading, see
pneumo_tf.models.reading) over a records split or an image folder -> a Kaggle submission CSV.

Image folders (DICOM, PNG and JPEG files, told apart by content as the converter does)
are converted first (records/shards.py, no labels: every image lands in the "test" split)
into a temporary records folder that is removed afterwards, so
predictions see exactly the pipeline and preprocessing that training and evaluation
saw. Batches stream through the model and straight into the submission writer:
nothing but the current batch is held in memory, whatever the number of images.

`collect.run_batches` and `collect.challenge_detections` are the model-calling
and box-converting steps that evaluation shares, so a box written here is the box
evaluation scored. The model card of what was read (pneumo_tf.models.card) is written beside
the submission (submission.csv -> submission.model.json), with the threshold used. With
--dicom_results_dir each DICOM's boxes (the same ones), image probability and, for models with
masks, mask also become DICOM objects (pneumo_tf.inference.dicom_results).
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pneumo_tf.cli import check_constraints, option
from pneumo_tf.data import pipeline
from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import submission
from pneumo_tf.evaluation.collect import challenge_detections, run_batches
from pneumo_tf.evaluation.visualize import PREDICTED_BOX_COLOR
from pneumo_tf.fileio import atomic_open
from pneumo_tf.inference import dicom_results
from pneumo_tf.models import card as model_card, reading as reading_lib
from pneumo_tf.models.reading import Reading, ReadingConfig
from pneumo_tf.records import images, manifest as manifest_lib, plan, radiograph, shards
from pneumo_tf.records.manifest import REJECTS_NAME

BOX_COLOR = tuple(int(255 * channel) for channel in PREDICTED_BOX_COLOR)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    model_dir: str = option(help="Folder of a trained model (model.keras + pneumo_tf.json), an ensemble folder "
                            "(python -m pneumo_tf.evaluate --ensemble_dir), or model folders separated by commas.")
    output: str = option(help="Submission CSV to write (patientId,PredictionString; boxes in source pixels).")
    records_dir: str | None = option(None, "Instead of --dicom_dir: a folder written by python -m pneumo_tf.convert.")
    split: str = option("test", "Split of --records_dir to predict.")
    verify_records: bool = option(False, manifest_lib.VERIFY_HELP)
    dicom_dir: str | None = option(None, "Folder of DICOM, PNG or JPEG files to predict (every file is predicted or "
                                   "reported as rejected; a file's id is its name without the extension).",
                                   aliases=("input_dir",))
    threshold: float | None = option(None, "Confidence threshold (default: the one python -m pneumo_tf.evaluate "
                                     "saved in the model's pneumo_tf.json or the ensemble folder).",
                                     exclusive_minimum=0.0, exclusive_maximum=1.0)
    batch_size: int = option(16, "Images per model call.", minimum=1)
    overlay_dir: str | None = option(None, "Also write one PNG per image with its predicted boxes and scores here.")
    overlay_size: int = option(512, "Overlays smaller than this many pixels are upscaled to it.", minimum=1)
    convert_image_size: int | None = option(
        None, "How --dicom_dir is converted: 0 passes JPEG frames through, N stores N x N PNGs; by default as the "
        "model's training records were converted (its pixels exactly).")
    workers: int = option(0, "Processes converting --dicom_dir; 0 uses all cores.", minimum=0)
    metadata_csv: str | None = option(
        None, "patientId,PatientAge,PatientSex,ViewPosition of --dicom_dir's PNG/JPEG files (which have no header), "
        "as python -m pneumo_tf.convert takes it: what models trained with metadata read; without it those facts "
        "are unknown.")
    dicom_results_dir: str | None = option(
        None, "Also write DICOM results of every DICOM in --dicom_dir here: <id>.SR.dcm (a TID 1500 structured "
        "report), <id>.PR.dcm (a presentation state drawing the boxes) and, for models with masks, <id>.SEG.dcm (a "
        "segmentation). PNG and JPEG files have no patient, study or UIDs to refer to: they get none.")
    reading: ReadingConfig = option(ReadingConfig())

    def validate(self) -> None:
        check_constraints(self)
        if (self.records_dir is None) == (self.dicom_dir is None):
            raise UserError("give either --records_dir (with --split) or --dicom_dir, not both or neither")
        if self.metadata_csv is not None and self.dicom_dir is None:
            raise UserError("--metadata_csv goes with --dicom_dir: records hold their facts already")
        if self.dicom_results_dir is not None and self.dicom_dir is None:
            raise UserError("--dicom_results_dir needs --dicom_dir: records hold no DICOM header to refer to")


def draw_overlay(image, boxes_yxyx, scores, min_size: int) -> Image.Image:
    """The grey image [S, S, 1] in [0, 1] as RGB with its boxes and scores, at least min_size pixels wide.

    Drawn with Pillow at the output size rather than with visualize.draw_boxes at the
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


def predict_records(reading: Reading, threshold: float, config: PredictConfig, records_dir: str, split: str,
                    progress_stream=None, results: dicom_results.FolderWriter | None = None) -> dict:
    """Writes the submission for one split of a records folder (and each DICOM's `results`); returns counts."""
    total = pipeline.num_examples(records_dir, split)
    dataset = reading.dataset(records_dir, split, config.batch_size)
    if config.overlay_dir:
        os.makedirs(config.overlay_dir, exist_ok=True)
    counts = {"images": 0, "images_with_boxes": 0, "boxes": 0}

    def rows():
        with tqdm(total=total, desc="predict", unit="images", file=progress_stream) as progress:
            for batch, outputs in run_batches(reading.infer, dataset):
                found = challenge_detections(reading, outputs, batch, threshold)
                if results is not None:
                    results.add_batch(reading, outputs, batch, found, threshold)
                for index, (image_id, ((boxes, scores), (xywh, confidences))) in enumerate(zip(batch["id"], found)):
                    image_id = image_id.decode()
                    if config.overlay_dir:
                        picture = draw_overlay(batch["image"][index], boxes, scores, config.overlay_size)
                        _write_png(picture, os.path.join(config.overlay_dir, f"{image_id}.png"))
                    counts["images"] += 1
                    counts["images_with_boxes"] += int(len(scores) > 0)
                    counts["boxes"] += len(scores)
                    yield image_id, xywh, confidences
                progress.update(len(found))
        if counts["images"] != total:  # before the submission is renamed into place: no file missing patients
            raise UserError(f"read {counts['images']} images from {records_dir} ({split}) but its manifest holds "
                            f"{total}: its shards are damaged; reconvert, or check them with --verify_records")

    parent = os.path.dirname(os.path.abspath(config.output))
    os.makedirs(parent, exist_ok=True)
    with pipeline.naming_bad_records(records_dir, (split,), reading.image_sizes[0]):
        submission.write_submission(config.output, rows())
    card = model_card.write_beside(config.output, model_card.of_reading(reading),
                                   {"threshold": threshold, "images": counts["images"], "reading": reading.name})
    return {**counts, "threshold": threshold, "output": config.output, "model_card": card}


def _read_rejects(records_dir: str) -> list[tuple[str, str]]:
    with open(os.path.join(records_dir, REJECTS_NAME), newline="") as handle:
        return [(row["file"], row["reason"]) for row in csv.DictReader(handle)]


def predict(config: PredictConfig, progress_stream=None) -> dict:
    """Writes the submission CSV (and overlays) of `config`; returns a summary with counts and rejects."""
    config.validate()
    # Before any conversion: a wrong model folder should not cost a folder's conversion first.
    reading = reading_lib.load(config.model_dir, config.reading)
    threshold = config.threshold if config.threshold is not None else reading.threshold
    if threshold is None:
        raise UserError(f"{config.model_dir} is an ensemble without a threshold: give --threshold, or evaluate it "
                        "with python -m pneumo_tf.evaluate --ensemble_dir=DIR and predict with --model_dir=DIR")
    boxes_possible = reading.gives_boxes
    if config.records_dir is not None:
        if config.verify_records:
            manifest_lib.verify_shards(config.records_dir, [config.split])
        summary = predict_records(reading, threshold, config, config.records_dir, config.split, progress_stream)
        return {**summary, "source": f"{config.records_dir} ({config.split})", "rejects": [],
                "model_has_boxes": boxes_possible}

    scratch = tempfile.mkdtemp(prefix="pneumo_tf_predict_")
    try:
        records_dir = os.path.join(scratch, "records")
        options = reading.conversion_options(config.convert_image_size)
        manifest = shards.convert(
            config.dicom_dir, records_dir, options=options,
            writer=shards.LocalPool(config.workers or None, progress_stream=progress_stream),
            metadata_csv=config.metadata_csv,
        )
        rejects = _read_rejects(records_dir)
        if manifest["records"] == 0:
            reason = f" (e.g. {rejects[0][0]}: {rejects[0][1]})" if rejects else ""
            raise UserError(
                f"no readable DICOM, PNG or JPEG file in {config.dicom_dir}: {len(rejects)} rejected{reason}"
            )
        results = None
        if config.dicom_results_dir is not None:
            results = dicom_results.FolderWriter(config.dicom_results_dir, dicom_sources(config.dicom_dir),
                                                 dicom_results.algorithm_of(reading, threshold))
        summary = predict_records(reading, threshold, config, records_dir, "test", progress_stream, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if results is not None:
        summary["dicom_results"] = {"images": results.written, "without_dicom_context": summary["images"] -
                                    results.written, "folder": config.dicom_results_dir}
    return {**summary, "source": config.dicom_dir, "rejects": rejects, "model_has_boxes": boxes_possible,
            "model_has_masks": reading.gives_masks}


def dicom_sources(folder: str) -> dict[str, str]:
    """{image id: path} of the DICOM files in `folder` (told apart by content, as the converter does)."""
    sources = {}
    for path in plan.list_inputs(folder):
        with open(path, "rb") as handle:
            if images.sniff(handle.read(images.SNIFF_BYTES)) == images.DICOM:
                sources[radiograph.image_id_of(path)] = path
    return sources
