"""Reading PNG and JPEG radiographs: what a file is, and its pixels.

Many teams get chest radiographs as image files rather than DICOMs: Kaggle's RSNA
mirrors (PNG/JPEG), NIH ChestX-ray14 (PNG, 1024 x 1024), CheXpert and MIMIC-CXR-JPG
(JPEG). The converter takes them beside DICOMs (records/shards.py decides, per file,
which reader reads it):

* What a file is comes from its first bytes (`sniff`), never from its name.
* A grey 8-bit baseline JPEG is the image as it is: the converter stores its bytes
  unchanged, as it does RSNA's DICOM frames (records/jpeg.py proves it decodes).
* Every other image is decoded to grey and stored as PNG by the rules DICOM pixels
  follow (pixels.to_bit_depth): 8-bit data stays exact (x 257 at --bit_depth=16),
  16-bit PNGs keep 16 bits at --bit_depth=16 and are stretched min..max into 8 bits
  otherwise; colour gives its luminance (ITU-R BT.601 weights, Pillow's and libjpeg's);
  alpha is ignored. EXIF orientation is not applied, as tf.io.decode_jpeg does not.
* An image file holds no view, age, sex or pixel spacing: those are recorded unknown.
* A file whose header claims a larger image than the limit is refused before it is decoded
  (pixels.check_decoded_size, as for DICOMs; Pillow's own guard is an error too).

No TensorFlow here: converter workers stay light.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageMode

from pneumo_tf.errors import RejectedFile
from pneumo_tf.records import jpeg, pixels

# Source formats, as the manifest counts them.
DICOM, PNG, JPEG = "dicom", "png", "jpeg"
FORMATS = (DICOM, PNG, JPEG)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI, then the first segment's marker
DICOM_PREFIX, DICOM_PREFIX_OFFSET = b"DICM", 128  # after the 128-byte preamble; pydicom requires it too
SNIFF_BYTES = DICOM_PREFIX_OFFSET + len(DICOM_PREFIX)

# Pillow modes of 16-bit grey PNGs.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def sniff(head: bytes) -> str | None:
    """DICOM, PNG or JPEG from a file's first SNIFF_BYTES bytes; None when it is none of them."""
    if head.startswith(PNG_SIGNATURE):
        return PNG
    if head.startswith(JPEG_SIGNATURE):
        return JPEG
    if head[DICOM_PREFIX_OFFSET:SNIFF_BYTES] == DICOM_PREFIX:
        return DICOM
    return None


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """A PNG or JPEG file whose header was read; its pixels are decoded on demand."""

    format: str  # PNG or JPEG
    data: bytes
    height: int
    width: int
    frames: int  # animated PNGs and multi-picture JPEGs hold several; the first is read


def _open(data: bytes, image_format: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=[image_format.upper()])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # pixels.py sets Pillow's guard
        raise pixels.ImageTooLarge(f"image too large: {error}") from error
    except Exception as error:  # Pillow raises several types for a broken header; all mean "unreadable"
        raise RejectedFile(f"{image_format.upper()} header unreadable ({jpeg.pillow_error(error)})") from error


def read(data: bytes, image_format: str, limit: int = pixels.MAX_DECODED_BYTES) -> ImageFile:
    """A PNG or JPEG file's bytes -> ImageFile (header only), raising RejectedFile when unreadable and
    pixels.ImageTooLarge when its first frame (the one read) would take more than `limit` bytes decoded."""
    with _open(data, image_format) as picture:
        width, height = picture.size
        frames = getattr(picture, "n_frames", 1)
        mode = ImageMode.getmode(picture.mode)
    if not (height and width):
        raise RejectedFile(f"{image_format.upper()} of {width} x {height} pixels")
    pixels.check_decoded_size(height, width, 1, len(mode.bands) * np.dtype(mode.typestr).itemsize, limit)
    return ImageFile(image_format, data, height, width, frames)


def passthrough_frame(image: ImageFile) -> bytes | None:
    """The file's bytes when they can be stored unchanged: a grey 8-bit baseline JPEG, framed
    SOI ... EOI (the pipeline decodes it as it decodes RSNA's frames); else None.

    Progressive, colour, 12-bit or oddly framed JPEGs are decoded and stored as PNG instead.
    """
    if image.format != JPEG:
        return None
    try:
        header = jpeg.frame_header(image.data)
    except RejectedFile:
        return None  # Pillow's decoding judges it, and says what is wrong
    simple = header.marker == jpeg.BASELINE and header.precision == 8 and header.components == 1
    return image.data if simple else None


def grey_pixels(image: ImageFile, bit_depth: int = 8) -> np.ndarray:
    """The image as grey pixels: uint8, or uint16 when bit_depth is 16 (see the module docstring)."""
    if image.format == JPEG:
        # A min_size of the long side keeps the decoder at full scale.
        grey = np.asarray(jpeg.decode(image.data, max(image.height, image.width)))
        return pixels.to_bit_depth(grey, 255, bit_depth)
    with _open(image.data, PNG) as picture:
        try:
            picture.load()
            if picture.mode in _SIXTEEN_BIT_MODES:
                values, stored_top = np.asarray(picture), 65535
            else:
                values, stored_top = np.asarray(picture if picture.mode == "L" else picture.convert("L")), 255
        except Exception as error:  # truncated data, a broken zlib stream or chunk: all mean "undecodable"
            raise RejectedFile(f"PNG does not decode ({jpeg.pillow_error(error)})") from error
    return pixels.to_bit_depth(values, stored_top, bit_depth)
