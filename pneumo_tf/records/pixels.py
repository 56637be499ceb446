"""Grey levels and image sizes: the converter's one rule for storing grey values at 8 or 16 bits,
and its one limit on how large an image a file may claim.

DICOM pixels (records/dicom.py) and PNG/JPEG pixels (records/images.py) both end here,
so an image gives the same stored values whichever file it came in, and an image bomb (a
file of a few KB whose header claims gigabytes of pixels) is refused from its header alike,
before any decoder allocates its pixels; Pillow's own guard is set here too (`guard_pillow`).
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from PIL import Image

from pneumo_tf.cli import option
from pneumo_tf.errors import RejectedFile

# The most a file may claim its image takes decoded (rows x columns x frames x bytes per sample):
# 100 MB, 50 M samples of 16 bits or 100 M of 8. The largest real radiographs fit: a 43 x 43 cm
# plate at 0.1 mm is 4,300 x 4,300 (18.5 M samples, 37 MB at 16 bits), a stitched long-leg or
# whole-spine image about 3,000 x 9,000 (27 M, 54 MB); a few-KB file claiming 30,000 x 30,000
# (1.8 GB), or a 140-KB PNG of 12,000 x 12,000 (137 MB), is refused before anything is decoded.
# Converting or reading one image takes a few times its decoded size (grey levels, PNG, the model's
# input), so the limit bounds that too.
MAX_DECODED_BYTES = 100 * 2**20


def guard_pillow() -> None:
    """Pillow's own guard against decompression bombs, for every image Pillow opens in this process:
    above MAX_DECODED_BYTES pixels an error, not merely a warning. Importing this module calls it.

    An image within the default byte limit has at most that many pixels, so the guard refuses only
    what check_decoded_size would, and covers what Pillow opens without that check. (A --max_image_mb
    above the default leaves it where it is: no radiograph has 100 M pixels.)
    """
    Image.MAX_IMAGE_PIXELS = MAX_DECODED_BYTES
    warnings.simplefilter("error", Image.DecompressionBombWarning)


guard_pillow()


class ImageTooLarge(RejectedFile):
    """A file whose header claims more decoded pixel bytes than the limit (an image bomb)."""


@dataclasses.dataclass(frozen=True)
class ImageLimit:
    """How large an image a file may claim: the converter, the web page and the DICOM node take it."""

    max_image_mb: float = option(MAX_DECODED_BYTES / 2**20, "Largest image a file may claim in its header, decoded "
                                 "(rows x columns x frames x bytes per sample), in MB; a larger one is refused before "
                                 "any pixel is decoded (an image bomb: a few-KB file can claim gigabytes).",
                                 exclusive_minimum=0.0)

    @property
    def bytes(self) -> int:
        return int(self.max_image_mb * 2**20)


def check_decoded_size(rows: int, columns: int, frames: int, bytes_per_pixel: int,
                       limit: int = MAX_DECODED_BYTES) -> int:
    """rows x columns x frames x bytes_per_pixel, the bytes an image takes decoded; raises
    ImageTooLarge above `limit`."""
    size = rows * columns * frames * bytes_per_pixel
    if size > limit:
        raise ImageTooLarge(f"image too large: {rows} x {columns} pixels x {frames} frame(s) x {bytes_per_pixel} "
                            f"byte(s) is {size / 2**20:.0f} MB decoded, above the limit of {limit / 2**20:.0f} MB")
    return size


def to_bit_depth(values: np.ndarray, stored_top: int, bit_depth: int, transformed: bool = False) -> np.ndarray:
    """Grey values as uint8 (bit_depth 8) or uint16 (bit_depth 16).

    `stored_top` is the largest value the source's depth can hold (255 for 8-bit data,
    4095 for 12-bit, 65535 for 16-bit). Untransformed integer data whose stored range fits
    the output's is mapped range to range, so white stays white: kept exactly at equal
    depth, 8-bit data x 257 and 12-bit x 65535/4095 in 16 bits. Anything else (values a
    transform produced, or a stored range wider than the output's, as 16-bit data in 8
    bits) is stretched linearly from its minimum to its maximum.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    top = 255 if bit_depth == 8 else 65535
    out_type = np.uint8 if bit_depth == 8 else np.uint16
    if (
        not transformed
        and np.issubdtype(values.dtype, np.integer)
        and values.size
        and values.min() >= 0
        and values.max() <= stored_top <= top
    ):
        if stored_top == top:
            return values.astype(out_type)
        # A table of every stored value: exact, and no float copy of the image.
        return np.round(np.arange(stored_top + 1) * (top / stored_top)).astype(out_type)[values]
    # float32 and in place: a stretched 100 M-sample image costs one 400 MB copy, not several of 800 MB.
    values = np.array(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    values -= low
    values *= top / (high - low) if high > low else 0.0
    return np.round(values, out=values).astype(out_type)
