"""JPEG frames stored unchanged in records: their header facts, and proof that they decode.

A frame copied into `image/encoded` is decoded later by the input pipeline with
`tf.io.decode_jpeg(ratio=1|2|4|8)`. A frame that libjpeg cannot decode would stop
every training, evaluation or prediction run that reaches it, so the converter only
stores a frame that `verify_decodes` accepted.

Why one decode at 1/8 scale proves the others: TensorFlow and Pillow both decode with
libjpeg-turbo, whose fatal errors (unknown or misplaced markers, bogus tables, a broken
header) all come from the marker reader and the entropy decoder. Those read the whole
stream whatever the output scale; scaling only changes the inverse DCT. Damage inside
the entropy-coded data that libjpeg can resynchronise past ("Corrupt JPEG data", bad
Huffman codes) is a warning for both, and the frame decodes (with a visible smear), as
it would in any viewer. Measured on 400 damaged copies of real RSNA frames (random and
single-bit flips, truncations, foreign markers): TensorFlow's verdict was the same at
all four ratios, and the same as Pillow's full and 1/8-scale decodes, for every copy
(tests/test_convert.py checks this on fresh damage). The 1/8-scale decode costs about
1.3 ms for a 1024 x 1024 frame (a full decode 2.0 ms); converter workers stay free of
TensorFlow.
"""
from __future__ import annotations

import dataclasses
import io
import struct

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


def frame_header(frame: bytes) -> FrameHeader:
    """The stream's frame header (its SOF segment), checking the stream's framing (SOI ... EOI)."""
    if not frame.startswith(b"\xff\xd8") or b"\xff\xd9" not in frame[-4:]:
        raise RejectedFile("JPEG frame truncated or corrupt (no SOI/EOI marker)")
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            raise RejectedFile("JPEG frame corrupt (bad marker)")
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        if marker in _SOF_MARKERS:
            if position + 10 > len(frame):
                break
            precision, height, width, components = struct.unpack(">BHHB", frame[position + 4 : position + 10])
            return FrameHeader(marker, precision, height, width, components)
        position += 2 + length
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
    """Raises RejectedFile unless libjpeg decodes the frame (at 1/8 scale: see the module docstring)."""
    decode(frame)


def describe_damage(frame: bytes) -> str | None:
    """Where a frame that does not decode is broken, when a marker walk can tell; else None.

    Only called on failure, for the reason written to rejects.csv: libjpeg's own message
    stays inside the decoder.
    """
    position = 2
    while position + 4 <= len(frame):
        marker = frame[position + 1]
        if frame[position] != 0xFF:
            return f"no marker where one must be, at byte {position}"
        if marker == 0xFF or marker in _STANDALONE_MARKERS:
            position += 1 if marker == 0xFF else 2
            continue
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        if marker != SOS:
            position += 2 + length
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
