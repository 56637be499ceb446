"""Synthetic RSNA-layout data: the built-in data of the demo, the tests and the benchmarks.

Writes `<output_dir>/stage_2_train_images/*.dcm`, `stage_2_test_images/*.dcm`,
`stage_2_train_labels.csv` and `stage_2_detailed_class_info.csv` shaped like the
challenge's: 8-bit MONOCHROME2 radiographs in one JPEG Baseline frame, Secondary
Capture, CR, CHEST, PA/AP, age, sex and pixel spacing. The pictures are chest-like
(torso, dark lung fields, spine, ribs, noise), and every labelled box holds a soft
bright opacity inside a lung field, so a detector can learn to find them.

`--difficulty=easy` (the default) makes opacities every model finds (the demo scores
val mAP near 1). `--difficulty=hard` is for comparing models: opacities are subtle
(low contrast, under twice the ribs' amplitude, under the same noise) and patchy (their
brightness varies from 20% to 100% across the box, so what is visible does not outline
the labelled box), and half of the
images without opacity hold one to three small, sharp, round nodules that are NOT
labelled, so a detector must learn what an opacity looks like rather than "anything
bright". `--difficulty=faint` is hard with opacities of 16 grey levels, about the ribs'
amplitude: the image alone leaves many decisions uncertain, so side inputs (the view) have
room to help. `--difficulty=lookalike` is the hard setting's data where every "No Lung Opacity /
Not Normal" picture also holds one to three opacities drawn exactly as labelled ones but NOT
labelled, as the challenge's look-alikes: no picture tells them apart, so the image alone
cannot decide and only side inputs can (with `--opacity_view_ratio`, the view says how likely an
opacity is to be labelled). Its labels and its other pictures are the hard setting's.

    python -m pneumo_tf.synthesise --output_dir=/tmp/rsna --num_images=200

Beside the labels CSVs, `synthetic.json` says that the data set is synthetic and with which
settings; the converter copies it into the manifest ("synthetic", see records/manifest.py), so
a model trained on these records says so in its model card.

`export_images` writes a DICOM folder again as PNG or JPEG files, the form Kaggle's
mirrors, NIH ChestX-ray14 and CheXpert come in (tests and benchmarks of image folders).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import uuid

import numpy as np
import pydicom
import pydicom.encaps
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from pneumo_tf import cli, fileio
from pneumo_tf.fileio import write_csv_atomic, write_json_atomic
from pneumo_tf.records import dicom, images, jpeg, schema

TRAIN_DIR = "stage_2_train_images"
TEST_DIR = "stage_2_test_images"
LABELS_CSV = "stage_2_train_labels.csv"
CLASS_INFO_CSV = "stage_2_detailed_class_info.csv"
MARKER_JSON = "synthetic.json"
GENERATOR = "pneumo_tf.records.synthetic"

# RSNA's shares: 33% Normal, 44% No Lung Opacity / Not Normal, 23% Lung Opacity.
CLASS_SHARES = (0.33, 0.44, 0.23)
# Peak brightness added by an opacity, in grey levels (ribs add 14, noise has sigma 6).
OPACITY_CONTRAST = {"easy": 70.0, "hard": 24.0, "faint": 16.0, "lookalike": 24.0}
NODULE_CONTRAST = 60.0
# Share of AP films (RSNA's: about 47%); the rest are PA.
AP_SHARE = 0.47


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_images: int = cli.option(200, "Labeled training images (about 23% with opacities).", minimum=0)
    num_test_images: int = cli.option(0, "Unlabeled images in stage_2_test_images.", minimum=0)
    seed: int = cli.option(0, "Seed: the same seed writes the same files.")
    image_size: int = cli.option(1024, "Width and height of the radiographs in pixels.")
    difficulty: str = cli.option("easy", "easy: clear opacities; hard: subtle opacities plus unlabelled sharp "
                                 "nodules in images without opacity (for comparing models); faint: hard with "
                                 "opacities as faint as the ribs; lookalike: hard, and every 'Not Normal' "
                                 "picture also holds unlabelled opacities drawn as labelled ones.",
                                 choices=tuple(OPACITY_CONTRAST))
    opacity_view_ratio: float = cli.option(
        1.0, "How many times as frequent opacities are on AP films as on PA films (RSNA: about 4); the share of AP "
        "films stays 47%. 1: the view says nothing about the label.", exclusive_minimum=0.0)


def ap_probabilities(ratio: float, positive_share: float = CLASS_SHARES[2]) -> tuple[float, float]:
    """(P(AP | opacity), P(AP | no opacity)) that keep AP_SHARE of AP films and make P(opacity | AP) `ratio`
    times P(opacity | PA), for a share `positive_share` of images with opacities."""
    with_opacity = ratio * AP_SHARE / (1.0 - AP_SHARE + ratio * AP_SHARE)
    without = (AP_SHARE - with_opacity * positive_share) / (1.0 - positive_share)
    if not 0.0 <= without <= 1.0:
        raise ValueError(f"no view distribution gives an opacity view ratio of {ratio} with {AP_SHARE:.0%} AP films")
    return with_opacity, without


@dataclasses.dataclass(frozen=True)
class SynthesiseConfig:
    """The flags of python -m pneumo_tf.synthesise."""

    output_dir: str = cli.option(help="Folder to write the RSNA-layout data set into.")
    data: SyntheticConfig = cli.option(SyntheticConfig())
    workers: int = cli.option(0, "Processes writing files; 0 uses all cores.", minimum=0)


def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2


def sample_boxes(rng: np.random.Generator, size: int) -> list[tuple[int, int, int, int]]:
    """One to three (x, y, width, height) pixel boxes centred inside lung fields."""
    count = rng.choice([1, 2, 3], p=[0.45, 0.5, 0.05])
    lungs = rng.permutation([0.3, 0.7])
    boxes = []
    for index in range(count):
        centre_x = lungs[index % 2] + rng.uniform(-0.05, 0.05)
        centre_y = rng.uniform(0.35, 0.62)
        width, height = rng.uniform(0.12, 0.22), rng.uniform(0.15, 0.3)
        x0 = int(np.clip(centre_x - width / 2, 0.02, 0.98 - width) * size)
        y0 = int(np.clip(centre_y - height / 2, 0.05, 0.95 - height) * size)
        boxes.append((x0, y0, int(width * size), int(height * size)))
    return boxes


def _opacity(rng: np.random.Generator, u, v, box, size: int, difficulty: str) -> np.ndarray:
    """The brightness an opacity in the (x, y, w, h) pixel box adds, float32 [size, size]: a flat-topped
    bump that fills the box and fades at its edges; patchy unless `difficulty` is easy."""
    x, y, w, h = box
    du = (u - (x + w / 2) / size) / (w / 2 / size)
    dv = (v - (y + h / 2) / size) / (h / 2 / size)
    bump = np.exp(-(du**4 + dv**4) * 1.5)
    if difficulty != "easy":
        # Patchy, as consolidation is: brightness varies smoothly from 20% to 100% across
        # the box, so the opacity's visible extent is not the box's.
        waves = sum(np.sin(rng.uniform(2, 5) * du * np.cos(a) + rng.uniform(2, 5) * dv * np.sin(a)
                           + rng.uniform(0, 6.3)) for a in rng.uniform(0, np.pi, 3))
        bump = bump * (0.6 + 0.4 * np.clip(waves / 1.5, -1.0, 1.0))
    return OPACITY_CONTRAST[difficulty] * bump


def make_radiograph(rng: np.random.Generator, boxes, size: int = 1024, difficulty: str = "easy",
                    lookalikes=(), lookalike_rng: np.random.Generator | None = None) -> np.ndarray:
    """A chest-like uint8 picture of size x size with an opacity in each (x, y, w, h) box (see the
    module docstring for `difficulty`), and one drawn alike in each box of `lookalikes` (unlabelled)
    from `lookalike_rng`, so that the picture is otherwise the one drawn without them."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = axis[None, :], axis[:, None]
    shift_u, shift_v = rng.uniform(-0.02, 0.02, size=2)
    lung_scale = rng.uniform(0.9, 1.1)
    image = np.full((size, size), 20.0, dtype=np.float32)
    image += 130.0 * (_ellipse(u, v, 0.5 + shift_u, 0.55 + shift_v, 0.46, 0.6) < 1)  # torso
    lungs = np.zeros((size, size), dtype=bool)
    for centre in (0.3, 0.7):
        lungs |= _ellipse(u, v, centre + shift_u, 0.47 + shift_v, 0.15 * lung_scale, 0.29 * lung_scale) < 1
    image[lungs] -= 85.0
    ribs = np.maximum(0.0, np.sin(v * 45.0 + 8.0 * (u - 0.5) ** 2 + rng.uniform(0, 6.3)))
    image += 14.0 * ribs * lungs
    image += 45.0 * (np.abs(u - 0.5 - shift_u) < 0.045) * (v > 0.12)  # spine
    for box in boxes:
        image += _opacity(rng, u, v, box, size, difficulty)
    for box in lookalikes:
        image += _opacity(lookalike_rng, u, v, box, size, difficulty)
    if difficulty != "easy" and not boxes and rng.random() < 0.5:
        for _ in range(rng.integers(1, 4)):
            # A small round nodule with a sharp edge, anywhere in a lung field; never labelled.
            centre = rng.choice([0.3, 0.7]) + rng.uniform(-0.06, 0.06), rng.uniform(0.3, 0.65)
            radius = rng.uniform(0.015, 0.035)
            image += NODULE_CONTRAST * (_ellipse(u, v, *centre, radius, radius) < 1)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)
    image += rng.normal(0.0, 6.0, size=(size, size)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_dicom(pixels: np.ndarray, patient_id: str, view: str, age: int, sex: str) -> pydicom.Dataset:
    """A Secondary Capture CR chest DICOM holding `pixels` as one JPEG Baseline frame, as RSNA's."""
    buffer = io.BytesIO()
    # Quality 75 gives ~125 KB files at 1024 px, like RSNA's 70-190 KB.
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=75)
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = pydicom.Dataset()
    ds.file_meta = file_meta
    instance = generate_uid(entropy_srcs=[patient_id])
    file_meta.MediaStorageSOPInstanceUID = instance
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, "series"])
    ds.Modality, ds.ConversionType, ds.BodyPartExamined = "CR", "WSD", "CHEST"
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName = ds.PatientID = patient_id
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = sex, str(age), view
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.143, 0.143]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PixelData = pydicom.encaps.encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    return ds


def _write_one(job) -> None:
    path, patient_id, boxes, lookalikes, seed, size, difficulty, ap_probability = job
    dicom.quiet_pydicom()
    rng = np.random.default_rng(seed)
    pixels = make_radiograph(rng, boxes, size, difficulty, lookalikes, np.random.default_rng([seed, 1]))
    view = "AP" if rng.random() < ap_probability else "PA"
    ds = encode_dicom(pixels, patient_id, view, int(rng.integers(18, 90)), "M" if rng.random() < 0.57 else "F")
    tmp = f"{path}.tmp"
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def write_dataset(output_dir: str, config: SyntheticConfig = SyntheticConfig(), workers: int | None = None,
                  progress=None) -> dict[str, str]:
    """Writes an RSNA-layout folder; returns the paths of its parts (train_dir, test_dir, CSVs).

    `progress.update(1)` is called per file written, when given.
    """
    num_images, num_test_images, image_size = config.num_images, config.num_test_images, config.image_size
    rng = np.random.default_rng(config.seed)
    # Its own stream, so that the look-alikes leave every label and every other picture as they were.
    lookalike_rng = np.random.default_rng([config.seed, 1])
    train_dir, test_dir = os.path.join(output_dir, TRAIN_DIR), os.path.join(output_dir, TEST_DIR)
    os.makedirs(train_dir, exist_ok=True)
    if num_test_images:
        os.makedirs(test_dir, exist_ok=True)
    label_rows, class_rows, jobs = [], [], []
    ap_with, ap_without = ap_probabilities(config.opacity_view_ratio)
    for index in range(num_images + num_test_images):
        patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        job_seed = int(rng.integers(2**32))
        if index >= num_images:
            jobs.append((os.path.join(test_dir, f"{patient_id}.dcm"), patient_id, [], [], job_seed, image_size,
                         config.difficulty, AP_SHARE))
            continue
        label_class = int(rng.choice(3, p=CLASS_SHARES))
        boxes = sample_boxes(rng, image_size) if label_class == schema.LUNG_OPACITY else []
        lookalikes = (sample_boxes(lookalike_rng, image_size)
                      if config.difficulty == "lookalike" and label_class == schema.NOT_NORMAL else [])
        for box in boxes or [None]:
            coords = [f"{float(c):.1f}" for c in box] if box else ["", "", "", ""]
            label_rows.append([patient_id, *coords, int(bool(boxes))])
            class_rows.append([patient_id, schema.CLASS_NAMES[label_class]])
        ap_probability = AP_SHARE if config.opacity_view_ratio == 1.0 else ap_with if boxes else ap_without
        jobs.append((os.path.join(train_dir, f"{patient_id}.dcm"), patient_id, boxes, lookalikes, job_seed,
                     image_size, config.difficulty, ap_probability))

    _run_jobs(_write_one, jobs, workers, progress)
    # Before the labels: labels without their marker would be taken for real ones.
    write_json_atomic(os.path.join(output_dir, MARKER_JSON),
                      {"generator": GENERATOR, "settings": dataclasses.asdict(config)})
    for name, header, rows in (
        (LABELS_CSV, ["patientId", "x", "y", "width", "height", "Target"], label_rows),
        (CLASS_INFO_CSV, ["patientId", "class"], class_rows),
    ):
        write_csv_atomic(os.path.join(output_dir, name), header, rows)
    return dataset_paths(output_dir, config)


def read_marker(labels_csv: str | None) -> dict | None:
    """The marker `write_dataset` leaves beside the labels CSV it writes ({generator, settings}), or
    None when `labels_csv` has none (real labels, or none given)."""
    if not labels_csv:
        return None
    path = os.path.join(os.path.dirname(labels_csv), MARKER_JSON)
    return fileio.read_json(path) if fileio.isfile(path) else None


def _run_jobs(function, jobs, workers: int | None, progress) -> None:
    """function(job) for every job, in worker processes (in this one when workers is 1)."""
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for _ in pool.map(function, jobs, chunksize=8):
                progress and progress.update(1)
    else:
        for job in jobs:
            function(job)
            progress and progress.update(1)


EXPORT_EXTENSIONS = {images.PNG: ".png", images.JPEG: ".jpg"}


def _export_one(job) -> None:
    dicom_path, output_path, image_format = job
    dicom.quiet_pydicom()
    ds = dicom.read(dicom_path)
    frame = dicom.passthrough_frame(ds)
    if image_format == images.JPEG and frame is not None:
        data = frame
    else:
        # The pixels the DICOM's record holds: its JPEG frame decoded by libjpeg at full scale,
        # or what the converter transcodes.
        grey = np.asarray(jpeg.decode(frame, max(ds.Rows, ds.Columns))) if frame is not None else dicom.grey_pixels(ds)
        buffer = io.BytesIO()
        quality = {"quality": 95} if image_format == images.JPEG else {}
        Image.fromarray(grey).save(buffer, format=image_format.upper(), **quality)
        data = buffer.getvalue()
    tmp = f"{output_path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, output_path)


def export_images(dicom_dir: str, output_dir: str, image_format: str, workers: int | None = None,
                  progress=None) -> str:
    """Writes every DICOM of `dicom_dir` as `<id>.png` or `<id>.jpg` into output_dir, as Kaggle's
    PNG/JPEG mirrors of RSNA hold them; returns output_dir.

    png: the pixels the DICOM's record holds (a JPEG frame decoded by libjpeg at full scale),
    8-bit grey. jpeg: the DICOM's JPEG Baseline frame byte for byte (a DICOM without one: its
    pixels at quality 95). So converting the export gives the DICOMs' ids and boxes, and their
    records' pixels (PNG: as libjpeg's accurate DCT decodes the frame).
    """
    os.makedirs(output_dir, exist_ok=True)
    extension = EXPORT_EXTENSIONS[image_format]
    jobs = [
        (os.path.join(dicom_dir, name), os.path.join(output_dir, os.path.splitext(name)[0] + extension), image_format)
        for name in sorted(os.listdir(dicom_dir))
    ]
    _run_jobs(_export_one, jobs, workers, progress)
    return output_dir


def dataset_paths(output_dir: str, config: SyntheticConfig) -> dict[str, str | None]:
    """The parts of a data set `write_dataset` wrote: train_dir, test_dir (None without test images),
    train_labels, detailed_class_info."""
    return {
        "train_dir": os.path.join(output_dir, TRAIN_DIR),
        "test_dir": os.path.join(output_dir, TEST_DIR) if config.num_test_images else None,
        "train_labels": os.path.join(output_dir, LABELS_CSV),
        "detailed_class_info": os.path.join(output_dir, CLASS_INFO_CSV),
    }
