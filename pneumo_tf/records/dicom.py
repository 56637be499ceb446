"""Reading DICOM radiographs: header facts, the JPEG passthrough frame, and grey pixels.

The converter, predict and the web page all read DICOMs through this module, so a file
gives the same pixels everywhere. No TensorFlow here: converter workers stay light.
"""
from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pydicom
import pydicom.config
import pydicom.encaps
import pydicom.pixels

from pneumo_tf import fileio
from pneumo_tf.errors import RejectedFile
from pneumo_tf.records import jpeg, pixels

# JPEG Baseline (Process 1): the RSNA transfer syntax, copied into records unchanged.
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def quiet_pydicom() -> None:
    """Stops pydicom warning about non-standard values (RSNA writes ages as "51"), once per process.

    Converter and generator workers call it: thousands of identical warnings would bury the
    progress bar, and the values are parsed leniently here anyway.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


@dataclasses.dataclass(frozen=True)
class HeaderFacts:
    rows: int
    columns: int
    frames: int
    view: str  # ViewPosition: PA / AP / ...
    age: int  # whole years, -1 when absent
    sex: str  # M / F / O, "" when absent
    pixel_spacing: tuple[float, float]  # (row, column) mm, (0, 0) when absent


def read(source) -> pydicom.Dataset:
    """Parses a DICOM file (path, URL or binary file object), raising RejectedFile for non-DICOM input."""
    try:
        if isinstance(source, str) and fileio.is_url(source):
            with fileio.open_file(source, "rb") as handle:
                source = io.BytesIO(handle.read())  # one request, then pydicom seeks in memory
        ds = pydicom.dcmread(source)
    except Exception as error:  # pydicom raises many types for corrupt input; all mean "unreadable"
        raise RejectedFile(f"unreadable DICOM: {type(error).__name__}: {error}") from error
    if "PixelData" not in ds:
        raise RejectedFile("no pixel data")
    for keyword in ("Rows", "Columns"):
        if not ds.get(keyword):
            raise RejectedFile(f"missing {keyword}")
    return ds


def check_decoded_size(ds: pydicom.Dataset, limit: int = pixels.MAX_DECODED_BYTES) -> int:
    """The bytes `ds`'s pixels take decoded, from its header alone; raises pixels.ImageTooLarge above `limit`.

    Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated / 8, so a file is
    refused before any decoder (pydicom, pylibjpeg, Pillow) allocates its pixels.
    """
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 8)
    return pixels.check_decoded_size(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), frames,
                                     samples * max(bits, 8) // 8, limit)


def age_in_years(value) -> int:
    # Age String is nnnD/W/M/Y; RSNA writes plain numbers ("51").
    match = re.fullmatch(r"\s*(\d+)\s*([DWMY]?)\s*", str(value or ""))
    if not match:
        return -1
    number, unit = int(match.group(1)), match.group(2) or "Y"
    per_year = {"D": 365, "W": 52, "M": 12, "Y": 1}[unit]
    return number // per_year


def header_facts(ds: pydicom.Dataset) -> HeaderFacts:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (0.0, 0.0)
    try:
        spacing = (float(spacing[0]), float(spacing[1]))
    except (TypeError, ValueError, IndexError):
        spacing = (0.0, 0.0)
    return HeaderFacts(
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames") or 1),
        view=str(ds.get("ViewPosition") or ""),
        age=age_in_years(ds.get("PatientAge")),
        sex=str(ds.get("PatientSex") or ""),
        pixel_spacing=spacing,
    )


def passthrough_frame(ds: pydicom.Dataset) -> bytes | None:
    """The encapsulated JPEG Baseline frame when the stored bytes ARE the image, else None.

    That holds for one 8-bit MONOCHROME2 grey frame with no rescale or VOI transform:
    decoding the bytes then gives exactly what a viewer shows, so they are copied as-is.
    """
    if ds.file_meta.get("TransferSyntaxUID") != JPEG_BASELINE:
        return None
    simple = (
        int(ds.get("SamplesPerPixel", 1)) == 1
        and str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME2"
        and int(ds.get("BitsStored", 8)) == 8
        and int(ds.get("NumberOfFrames") or 1) == 1
        and float(ds.get("RescaleSlope", 1) or 1) == 1
        and float(ds.get("RescaleIntercept", 0) or 0) == 0
        and "WindowCenter" not in ds
        and "VOILUTSequence" not in ds
        and "ModalityLUTSequence" not in ds
    )
    if not simple:
        return None
    try:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as error:
        raise RejectedFile(f"encapsulated pixel data unreadable: {type(error).__name__}: {error}") from error
    header = jpeg.frame_header(frame)
    if (header.height, header.width, header.components) != (int(ds.Rows), int(ds.Columns), 1):
        raise RejectedFile(
            f"JPEG frame is {header.height}x{header.width}x{header.components}, header says {ds.Rows}x{ds.Columns}x1"
        )
    return frame


def grey_pixels(ds: pydicom.Dataset, bit_depth: int = 8) -> np.ndarray:
    """The first frame as display-ready grey pixels: uint8, or uint16 when bit_depth is 16.

    Applies the Modality LUT / rescale and the VOI window or LUT when present, reduces
    colour to luminance (ITU-R BT.601), inverts MONOCHROME1; the stored depth (BitsStored)
    maps to the output's by pixels.to_bit_depth.
    """
    try:
        frame = pydicom.pixels.pixel_array(ds, index=0)
    except Exception as error:
        raise RejectedFile(f"undecodable pixels: {type(error).__name__}: {error}") from error
    if frame.ndim not in (2, 3) or frame.shape[0] != int(ds.Rows) or frame.shape[1] != int(ds.Columns):
        raise RejectedFile(f"pixel data of shape {frame.shape} does not match {ds.Rows}x{ds.Columns}")

    transformed = False
    if frame.ndim == 3:  # pydicom converts YBR to RGB by default
        values = frame[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        transformed = True
    else:
        values = frame
        if "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope", 1) or 1) != 1 or float(
            ds.get("RescaleIntercept", 0) or 0
        ) != 0:
            values = pydicom.pixels.apply_modality_lut(values, ds)
            transformed = True
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            values = pydicom.pixels.apply_voi_lut(values, ds, index=0)
            transformed = True

    stored_top = 2 ** int(ds.get("BitsStored") or 8 * frame.dtype.itemsize) - 1
    grey = pixels.to_bit_depth(values, stored_top, bit_depth, transformed)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = np.iinfo(grey.dtype).max - grey
    return grey
