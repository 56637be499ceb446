"""Image bombs: files of a few KB whose headers claim gigabytes of pixels are refused from the header,
before any decoder allocates them, by the converter, the web page and the DICOM node alike."""
import io
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from pneumo_tf.records import images, pixels


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int, colour_type: int = 0, bit_depth: int = 8) -> bytes:
    """A valid all-black PNG, compressed row by row (never held decoded): 12,000 x 12,000 grey is ~140 KB."""
    channels = {0: 1, 2: 3}[colour_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)  # filter byte 0, then black samples
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return images.PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height, colour_type, bit_depth, message", [
    # Over the byte limit with fewer pixels than Pillow's guard allows: the size check refuses them.
    (8000, 8000, 0, 16, "image too large: 8000 x 8000 pixels x 1 frame(s) x 2 byte(s) is 122 MB decoded, above "
                        "the limit of 100 MB"),
    (7000, 7000, 2, 8, "image too large: 7000 x 7000 pixels x 1 frame(s) x 3 byte(s) is 140 MB decoded"),
    # Past twice Pillow's limit: its DecompressionBombError, whatever the warning filters.
    (30000, 30000, 0, 8, "image too large: Image size (900000000 pixels) exceeds limit of 209715200 pixels"),
])
def test_a_png_bomb_is_refused_from_its_header(width, height, colour_type, bit_depth, message):
    data = bomb_png(width, height, colour_type, bit_depth)
    assert len(data) < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(pixels.ImageTooLarge, match="^" + re.escape(message)):
            images.read(data, images.PNG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing was decoded


def test_pillows_bomb_warning_is_an_error():
    # 12,000 x 12,000 grey (137 MB, ~140 KB of PNG): Pillow's warning, made an error, refuses it at open.
    data = bomb_png(12000, 12000)
    assert len(data) < 200_000
    pixels.guard_pillow()  # as importing pixels did (pytest resets warning filters around each test)
    with pytest.raises(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(data))
    with pytest.raises(pixels.ImageTooLarge, match=re.escape("image too large: Image size (144000000 pixels) exceeds "
                                                             "limit of 104857600 pixels")):
        images.read(data, images.PNG)


def test_a_png_within_the_limit_is_read_and_a_lower_limit_refuses_it():
    data = bomb_png(3000, 2000)
    image = images.read(data, images.PNG)
    assert (image.height, image.width) == (2000, 3000)
    assert images.grey_pixels(image).shape == (2000, 3000)
    with pytest.raises(pixels.ImageTooLarge, match="is 6 MB decoded, above the limit of 5 MB"):
        images.read(data, images.PNG, limit=5 * 2**20)


def test_stretching_grey_levels_takes_one_float32_copy():
    values = np.random.default_rng(0).integers(0, 65536, (1000, 1000), dtype=np.uint16)
    expected = np.round((values - values.min()) * (255 / (int(values.max()) - int(values.min())))).astype(np.uint8)
    tracemalloc.start()
    try:
        stretched = pixels.to_bit_depth(values, 65535, 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.abs(stretched.astype(int) - expected).max() <= 1 and (stretched == expected).mean() > 0.999
    # float32 copy (4 bytes a sample) and the result (1): float64 and its temporaries took 8 each.
    assert peak < 5.5 * values.size
    twelve_bit = values >> 4
    tracemalloc.start()
    try:
        scaled = pixels.to_bit_depth(twelve_bit, 4095, 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(scaled, np.round(twelve_bit * (65535 / 4095)).astype(np.uint16))
    assert peak < 2.5 * values.size  # the result (2 bytes a sample) and a table, no float copy
