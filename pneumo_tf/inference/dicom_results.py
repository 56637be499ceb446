"""DICOM result objects for one radiograph, written with highdicom: what a viewer shows beside the image.

For a DICOM source and the model's reading of it (`Findings`: the boxes and scores that the
submission holds, in source pixels, the image probability and the decision threshold, and for
models that give masks the pixels they call opacity), `result_objects` returns:

  SR   Comprehensive SR, TID 1500 Imaging Measurement Report: per box one planar ROI group
       (finding "Abnormal opacity" (DCM 112033), its box as a closed POLYLINE on the source
       image, its score as a "Probability" (DCM 122157, UCUM "1")); one image-level group
       (abnormal opacity Present/Absent at the threshold, the image probability); the model as
       the algorithm identification and as the observing device.
  PR   Grayscale Softcopy Presentation State: the boxes as closed polylines and their scores as
       text on one graphic layer, so an ordinary viewer draws them over the image, and the
       decision with the image probability as a line of text in the top left corner.
  SEG  Segmentation (BINARY, one segment "Lung opacity"), for models that give masks only; an
       image with nothing found gets an empty frame, so "nothing" is said, not left out.

Every object references the source study, series and SOP instance exactly (the same Study
Instance UID; its own new series), copies the patient and study attributes from the source
(never invents one) and gets new UIDs (highdicom's, from a UUID). Values that the source
holds in a form the standard does not allow are converted or left out (`header_for_results`),
so every object passes dciodvfy. PNG and JPEG inputs have no patient, study or UIDs to refer to:
they get no DICOM results.

The algorithm (`Algorithm`, built from the model folder's info and model card by `algorithm_of`)
is the one place that says which model wrote a result: name, version, the model card's digest
(pneumo_tf.models.card) and parameters go into the SR's algorithm identification, the SEG's
segment, and the PR's content description.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import os
import re
import warnings
import zipfile

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import format_number_as_ds

from pneumo_tf.fileio import atomic_open
from pneumo_tf.models import card as model_card

MANUFACTURER = "pneumo_tf"
# Codes (see BUILD.md, "DICOM results").
ABNORMAL_OPACITY = codes.DCM.AbnormalOpacity  # (112033, DCM): CID 6101 (thoracic findings)
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # (49755003, SCT): CID 7150
LUNG = codes.SCT.Lung  # (39607008, SCT): the finding site
PROBABILITY = codes.DCM.Probability  # (122157, DCM)
NO_UNITS = codes.UCUM.NoUnits  # ("1", UCUM)
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent  # (52101004 / 272519000, SCT): CID 240
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")  # the procedure reported
# New series, one per object kind: numbers a viewer lists after the source's own.
SERIES_NUMBERS = {"SR": 9001, "PR": 9002, "SEG": 9003}
LAYER = "PNEUMO_TF_BOXES"
BOX_COLOR = hd.color.CIELabColor(55.0, 80.0, 67.0)  # red, as the overlays draw boxes
SEGMENT_LABEL = "Lung opacity"


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Which model wrote a result. Built by `algorithm_of` from the model folder and its model card."""

    name: str  # "pneumo_tf mask_resnet", at most 64 characters (LO)
    version: str  # the package version
    parameters: dict[str, str] = dataclasses.field(default_factory=dict)  # "model_card" holds the card's digest

    @property
    def description(self) -> str:
        """One line for the presentation state's content description (LO, 64 characters): name, version
        and the first 16 hex digits of the model card's digest."""
        card = self.parameters.get("model_card")
        suffix = f" {self.version}" + (f" card {card[:16]}" if card else "")
        return f"{self.name[:64 - len(suffix)]}{suffix}"

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(self.name, self.version, self._parameter_list(),
                                             family=codes.DCM.ArtificialIntelligence)

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(self.name, codes.DCM.ArtificialIntelligence, self.version,
                                                  parameters=self.parameters or None)

    def _parameter_list(self) -> list[str] | None:
        # TEXT content items (UT): no length limit.
        return [f"{key}={value}" for key, value in self.parameters.items()] or None


def algorithm_of(reading, threshold: float) -> Algorithm:
    """The algorithm of a reading (pneumo_tf.models.reading.Reading) at its decision threshold, with its
    model card's digest (the whole 64 hex digits)."""
    try:
        version = importlib.metadata.version("pneumo_tf")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    models = ",".join(os.path.basename(os.path.normpath(folder)) for folder in reading.model_dirs)
    return Algorithm(f"pneumo_tf {reading.name}"[:64], version,
                     {"threshold": f"{threshold:g}", "model_dir": models,
                      "model_card": model_card.digest(model_card.of_reading(reading))})


@dataclasses.dataclass(frozen=True)
class Findings:
    """The model's reading of one image, in the source image's pixels."""

    boxes: np.ndarray  # float [N, 4] x, y, width, height (the submission's boxes), highest score first
    scores: np.ndarray  # float [N]
    probability: float  # the image's probability of an opacity
    threshold: float  # positive when probability > threshold; boxes have scores above it
    mask: np.ndarray | None = None  # bool [rows, columns]: what a model with masks calls opacity

    @property
    def positive(self) -> bool:
        return self.probability > self.threshold


# ------------------------------------------------------------------------------------------------
# The source's header, as the objects may copy it.


def _age_string(value) -> str | None:
    """A Patient's Age as the AS VR has it (nnnD/W/M/Y); a bare number, as RSNA writes it, is years."""
    text = str(value).strip()
    if re.fullmatch(r"\d{3}[DWMY]", text):
        return text
    match = re.fullmatch(r"0*(\d{1,3})\s*([DWMY]?)", text, flags=re.IGNORECASE)
    return f"{int(match.group(1)):03d}{(match.group(2) or 'Y').upper()}" if match else None


def _decimal_string(value) -> str:
    """The nearest decimal of at most 16 characters (DS), without trailing zeros: 0.14300000000000002 -> 0.143."""
    text = str(value)
    if len(text) <= 16:
        return text
    text = format_number_as_ds(float(value))
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text.lower() else text


def _decimal_strings(value) -> list[str] | None:
    """DS values of at most 16 characters (None when they are not numbers)."""
    values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        return [_decimal_string(item) for item in values]
    except (TypeError, ValueError):
        return None


def header_for_results(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source's attributes without its pixel data, with values the objects may copy.

    What the standard does not allow is converted where the meaning is certain, else left out:
    an Age String of a bare number ("63", RSNA's form) becomes "063Y", an unreadable one is left
    out (Patient's Age is optional); a Decimal String longer than 16 characters
    ("0.14300000000000002") becomes the nearest decimal that fits ("0.143"), a non-number is
    left out. Nothing else is changed.
    """
    header = pydicom.Dataset()
    header.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    for element in source:
        if element.tag == 0x7FE00010:  # PixelData
            continue
        if element.VR == "AS" and element.value not in (None, ""):
            age = _age_string(element.value)
            if age is None:
                continue
            element = pydicom.DataElement(element.tag, "AS", age)
        elif element.VR == "DS" and element.value not in (None, ""):
            values = _decimal_strings(element.value)
            if values is None:
                continue
            element = pydicom.DataElement(element.tag, "DS", values if len(values) > 1 else values[0])
        header.add(element)
    return header


# ------------------------------------------------------------------------------------------------
# The objects.


def _rectangle(box) -> np.ndarray:
    """(x, y, width, height) -> the closed polyline of its corners, (column, row) pairs in pixels."""
    x, y, width, height = (float(value) for value in box)
    return np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]])


def _clip(boxes, rows: int, columns: int) -> np.ndarray:
    """Boxes kept inside the image (0..columns, 0..rows), as DICOM's pixel coordinates need."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.clip(boxes[:, 0], 0, columns)
    y0 = np.clip(boxes[:, 1], 0, rows)
    x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, columns)
    y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, rows)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def structured_report(source: pydicom.Dataset, findings: Findings, algorithm: Algorithm) -> hd.sr.ComprehensiveSR:
    """The TID 1500 measurement report of `findings` on `source` (a header from header_for_results)."""
    algorithm_id = algorithm.sr_identification()
    region_source = hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID)
    groups = []
    boxes = _clip(findings.boxes, int(source.Rows), int(source.Columns))
    for number, (box, score) in enumerate(zip(boxes, findings.scores), start=1):
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(hd.UID(), f"Opacity {number}"),
            referenced_region=hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, _rectangle(box), region_source),
            finding_type=ABNORMAL_OPACITY, finding_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            algorithm_id=algorithm_id, finding_sites=[hd.sr.FindingSite(LUNG)],
            measurements=[hd.sr.Measurement(PROBABILITY, float(score), NO_UNITS, algorithm_id=algorithm_id)],
        ))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(hd.UID(), "Image"),
        algorithm_id=algorithm_id, finding_sites=[hd.sr.FindingSite(LUNG)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[hd.sr.Measurement(PROBABILITY, float(findings.probability), NO_UNITS,
                                        algorithm_id=algorithm_id)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(ABNORMAL_OPACITY,
                                                             PRESENT if findings.positive else ABSENT)],
    ))
    device = hd.sr.ObserverContext(codes.DCM.Device, hd.sr.DeviceObserverIdentifyingAttributes(
        uid=pydicom.uid.generate_uid(entropy_srcs=[MANUFACTURER, algorithm.name, algorithm.version]),
        name=algorithm.name, manufacturer_name=MANUFACTURER, model_name=algorithm.name))
    report = hd.sr.MeasurementReport(hd.sr.ObservationContext(observer_device_context=device), PLAIN_CHEST_XRAY,
                                     groups, title=codes.DCM.ImagingMeasurementReport)
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=hd.UID(), series_number=SERIES_NUMBERS["SR"],
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
    )


def summary_text(findings: Findings) -> str:
    """The presentation state's line about the whole image: "opacity, probability 0.93 (threshold 0.5)"."""
    decision = "opacity" if findings.positive else "no opacity"
    return f"{decision}, probability {findings.probability:.2f} (threshold {findings.threshold:g})"


def presentation_state(source: pydicom.Dataset, findings: Findings,
                       algorithm: Algorithm) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The boxes and their scores drawn over `source` by any viewer that applies presentation states."""
    rows, columns = int(source.Rows), int(source.Columns)
    layer = hd.pr.GraphicLayer(LAYER, order=1, description="pneumo_tf boxes", display_color=BOX_COLOR)
    graphics, texts = [], []
    line = max(rows, columns) / 40  # a text line's height, as the web page sizes its labels
    for box, score in zip(_clip(findings.boxes, rows, columns), findings.scores):
        graphics.append(hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, _rectangle(box),
                                            hd.pr.AnnotationUnitsValues.PIXEL))
        x, y = float(box[0]), float(box[1])
        # Inside the box's top edge, so the text stays on the image whatever the box's place.
        texts.append(hd.pr.TextObject(f"opacity {score:.2f}", hd.pr.AnnotationUnitsValues.PIXEL,
                                      bounding_box=(x, y, min(x + 6 * line, columns), min(y + line, rows)),
                                      text_justification=hd.pr.TextJustificationValues.LEFT))
    # The decision in the top left corner: a state without boxes still says what the model found.
    texts.insert(0, hd.pr.TextObject(summary_text(findings), hd.pr.AnnotationUnitsValues.PIXEL,
                                     bounding_box=(0.0, 0.0, min(16 * line, columns), min(line, rows)),
                                     text_justification=hd.pr.TextJustificationValues.LEFT))
    annotations = [hd.pr.GraphicAnnotation([source], layer, graphic_objects=graphics or None, text_objects=texts)]
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], series_instance_uid=hd.UID(), series_number=SERIES_NUMBERS["PR"],
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name, software_versions=algorithm.version, device_serial_number="0",
        content_label="PNEUMO_TF", content_description=algorithm.description, graphic_annotations=annotations,
        graphic_layers=[layer],
    )
    _copy_body_part(source, state)
    return state


def segmentation(source: pydicom.Dataset, findings: Findings, algorithm: Algorithm) -> hd.seg.Segmentation:
    """A binary segmentation of what the model calls opacity (needs `findings.mask`)."""
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE, segmented_property_type=ABNORMAL_OPACITY,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.seg_identification(), tracking_uid=hd.UID(), tracking_id=SEGMENT_LABEL,
        anatomic_regions=[LUNG],
    )
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=np.asarray(findings.mask, bool)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=SERIES_NUMBERS["SEG"], sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version, device_serial_number="0", omit_empty_frames=False,
    )
    _copy_body_part(source, seg)
    # Type 2 for an image without a patient-relative geometry (a projection radiograph's): the source's value.
    seg.PatientOrientation = source.get("PatientOrientation", "")
    return seg


def _copy_body_part(source: pydicom.Dataset, result: pydicom.Dataset) -> None:
    """The source's Body Part Examined (which tells a validator the part is unpaired: no Laterality needed)."""
    if source.get("BodyPartExamined"):
        result.BodyPartExamined = source.BodyPartExamined


def result_objects(source: pydicom.Dataset, findings: Findings, algorithm: Algorithm) -> list[pydicom.Dataset]:
    """The SR and the presentation state, and the segmentation when `findings` has a mask."""
    header = header_for_results(source)
    with warnings.catch_warnings():
        # The source's names are copied as they are; RSNA's one-component names make highdicom warn.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        objects = [structured_report(header, findings, algorithm), presentation_state(header, findings, algorithm)]
        if findings.mask is not None:
            objects.append(segmentation(header, findings, algorithm))
    return objects


def file_name(stem: str, dataset: pydicom.Dataset) -> str:
    """"<stem>.SR.dcm", "<stem>.PR.dcm" or "<stem>.SEG.dcm": the source's name and the object's modality."""
    return f"{stem}.{dataset.Modality}.dcm"


def encode(dataset: pydicom.Dataset) -> bytes:
    """The object in the DICOM file format (preamble, file meta information, data set)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(objects: list[pydicom.Dataset], folder: str, stem: str) -> list[str]:
    """Writes each object whole (write-then-rename) into `folder`; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for dataset in objects:
        path = os.path.join(folder, file_name(stem, dataset))
        with atomic_open(path, "wb") as handle:
            handle.write(encode(dataset))
        paths.append(path)
    return paths


def zip_archive(objects: list[pydicom.Dataset], stem: str) -> bytes:
    """The objects as one zip file (the web page's download)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for dataset in objects:
            archive.writestr(file_name(stem, dataset), encode(dataset))
    return buffer.getvalue()


class FolderWriter:
    """Writes each predicted DICOM's objects into a folder (predict --dicom_results_dir), batch by batch.

    `sources` maps image ids to their DICOM files (others, PNG and JPEG files, get no objects);
    a batch is read with its reading (pneumo_tf.models.reading.Reading) as predict reads it.
    """

    def __init__(self, folder: str, sources: dict[str, str], algorithm: Algorithm):
        self.folder, self.sources, self.algorithm = folder, sources, algorithm
        self.written = 0

    def add_batch(self, reading, outputs, batch: dict, found: list, threshold: float) -> None:
        """`found` is collect.challenge_detections(reading, outputs, batch, threshold)."""
        ids = [image_id.decode() for image_id in batch["id"]]
        if not any(image_id in self.sources for image_id in ids):
            return
        probabilities = reading.image_probability(outputs)
        sizes = [(int(height), int(width)) for height, width in zip(batch["source_height"], batch["source_width"])]
        masks = reading.masks(outputs, threshold, sizes) if reading.gives_masks else [None] * len(ids)
        for image_id, (_, (boxes, scores)), probability, mask in zip(ids, found, probabilities, masks):
            if image_id not in self.sources:
                continue
            source = pydicom.dcmread(self.sources[image_id], stop_before_pixels=True)
            findings = Findings(boxes, scores, float(probability), threshold, mask)
            write(result_objects(source, findings, self.algorithm), self.folder, image_id)
            self.written += 1
