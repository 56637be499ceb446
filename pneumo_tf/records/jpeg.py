"""JPEG frames stored unchanged in records: their header facts, and proof that they decode.

A frame copied into `image/encoded` is decoded later by the input pipeline with
`tf.io.decode_jpeg(ratio=1|2|4|8)`. A frame that libjpeg cannot decode would stop
every training, evaluation or prediction run that reaches it, so the converter only
stores a frame that `verify_decodes` accepted.

Why the check is complete, and cheap. TensorFlow and Pillow both decode with libjpeg-turbo,
whose fatal errors (unknown or misplaced markers, bogus tables, a broken header) all come
from its marker reader and its table set-up; damage inside the entropy-coded data that
libjpeg can resynchronise past ("Corrupt JPEG data", bad Huffman codes) is a warning, and
the frame decodes (with a visible smear), as it would in any viewer. So:

- When the compressed data after the (only) SOS header holds no marker but stuffed bytes
  (0xFF00) and restart markers up to the final EOI (`_clean_scan_start`, a vectorised byte
  scan, ~0.05 ms), the marker reader meets nothing there but that EOI: decoding the headers
  alone (`frame[:scan] + EOI`, 1/8 scale, ~0.2 ms) meets every fatal check the whole frame
  meets.
- Any other frame, which is to say a damaged one, is decoded whole at 1/8 scale (~1.3 ms for
  1024 x 1024: the Huffman decoding of every block, which scaling does not skip; scaling only
  changes the inverse DCT, so one scale stands for all).

Measured on damaged copies of real RSNA frames (random and single-bit flips, truncations,
foreign markers, header damage): TensorFlow's verdict was the same at all four ratios, and
the same as this check's, for every copy (tests/test_convert.py checks both on fresh damage).
Converter workers stay free of TensorFlow.
"""
from __future__ import annotations

import dataclasses
import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from pneumo_tf.errors import RejectedFile

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
BASELINE = 0xC0  # SOF0: baseline sequential DCT, Huffman coded, 8-bit
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}
_RESTART_MARKERS = set(range(0xD0, 0xD8))


@dataclasses.dataclass(frozen=True)
class FrameHeader:
    """A JPEG stream's SOF segment: its coding process and what it holds."""

    marker: int  # SOF marker: BASELINE (0xC0), progressive 0xC2, lossless 0xC3, ...
    precision: int  # bits per sample
    height: int
    width: int
    components: int  # 1 grey, 3 colour (YCbCr or RGB), 4 CMYK


def _header_segments(frame: bytes):
    """(position, marker, length) of each header segment after SOI, up to and including the first SOS;
    marker None when a byte that must start a marker does not (damage), which ends the walk."""
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            yield position, None, 0
            return
        marker = frame[position + 1]
        if marker == 0xFF or marker in _STANDALONE_MARKERS:  # fill byte; markers without a length
            position += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        yield position, marker, length
        if marker == SOS:
            return
        position += 2 + length


def frame_header(frame: bytes) -> FrameHeader:
    """The stream's frame header (its SOF segment), checking the stream's framing (SOI ... EOI)."""
    if not frame.startswith(b"\xff\xd8") or b"\xff\xd9" not in frame[-4:]:
        raise RejectedFile("JPEG frame truncated or corrupt (no SOI/EOI marker)")
    for position, marker, _ in _header_segments(frame):
        if marker is None:
            raise RejectedFile("JPEG frame corrupt (bad marker)")
        if marker in _SOF_MARKERS and position + 10 <= len(frame):
            precision, height, width, components = struct.unpack(">BHHB", frame[position + 4 : position + 10])
            return FrameHeader(marker, precision, height, width, components)
    raise RejectedFile("JPEG frame corrupt (no frame header)")


def decode(frame: bytes, min_size: int = 1) -> Image.Image:
    """The frame decoded as grey at the smallest DCT scale (1/1..1/8) that keeps at least
    `min_size` pixels per side; raises RejectedFile, saying what is wrong, when libjpeg cannot.

    Colour streams give their luminance (ITU-R BT.601 weights), which libjpeg outputs
    without converting colour (the Y of YCbCr); CMYK goes through Pillow's conversion.
    """
    try:
        image = Image.open(io.BytesIO(frame))
        image.draft("L", (min_size, min_size))
        image.load()
        return image if image.mode == "L" else image.convert("L")
    except Exception as error:  # Pillow reports libjpeg's fatal errors as OSError; anything else is as fatal
        raise RejectedFile(f"JPEG frame does not decode ({describe_damage(frame) or pillow_error(error)})") from error


def pillow_error(error: Exception) -> str:
    """Pillow's error as a reason for rejects.csv, which must be the same on every run: the message
    of UnidentifiedImageError names the in-memory file object, an address that changes."""
    if isinstance(error, UnidentifiedImageError):
        return "Pillow cannot identify the image"
    return f"{type(error).__name__}: {error}"


def verify_decodes(frame: bytes) -> None:
    """Raises RejectedFile unless libjpeg decodes the frame (see the module docstring for why this suffices)."""
    scan = _clean_scan_start(frame)
    decode(frame if scan is None else frame[:scan] + b"\xff\xd9")


def _scan_start(frame: bytes) -> int | None:
    """Where the compressed data after the first SOS header starts; None when the header walk fails first."""
    for position, marker, length in _header_segments(frame):
        if marker == SOS and position + 2 + length <= len(frame):
            return position + 2 + length
    return None


def _clean_scan_start(frame: bytes) -> int | None:
    """The start of the compressed data when it holds no marker but stuffed bytes (0xFF00) and restart
    markers (0xFFD0-D7) up to the frame's final EOI (0xFFD9, within its last 4 bytes); else None."""
    scan, end = _scan_start(frame), frame.rfind(b"\xff\xd9", max(len(frame) - 4, 0))
    if scan is None or end < scan:
        return None
    data = np.frombuffer(frame, np.uint8, end - scan, scan)
    if data.size and data[-1] == 0xFF:  # fill before the EOI: legal, rare, left to the decoder
        return None
    following = data[np.flatnonzero(data[:-1] == 0xFF) + 1]
    clean = np.all((following == 0x00) | ((following & 0xF8) == 0xD0))
    return scan if clean else None


def describe_damage(frame: bytes) -> str | None:
    """Where a frame that does not decode is broken, when a marker walk can tell; else None.

    Only called on failure, for the reason written to rejects.csv: libjpeg's own message
    stays inside the decoder.
    """
    for position, marker, length in _header_segments(frame):
        if marker is None:
            return f"no marker where one must be, at byte {position}"
        if marker != SOS:
            continue
        # Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte), a restart marker or
        # fill; any other marker before the final EOI is foreign.
        scan = position + 2 + length
        while True:
            found = frame.find(b"\xff", scan)
            if found < 0 or found + 1 >= len(frame):
                return None
            following = frame[found + 1]
            if following == 0x00 or following in _RESTART_MARKERS or following == 0xFF:
                scan = found + 1 if following == 0xFF else found + 2
                continue
            if following == EOI and found + 2 >= len(frame) - 2:
                return None
            return f"marker 0xFF{following:02X} inside the compressed data at byte {found}"
    return None
