"""Image bombs: files of a few KB whose headers claim gigabytes of pixels are refused from the header,
before any decoder allocates them, by the converter, the web page and the DICOM node alike."""
import csv
import io
import os
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pydicom
import pydicom.encaps
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from pneumo_tf.records import images, pixels, shards


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


def traced_peak(function, *args):
    """(function(*args), the peak bytes Python allocated while it ran)."""
    tracemalloc.start()
    try:
        result = function(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_stretching_grey_levels_takes_one_float32_copy():
    values = np.random.default_rng(0).integers(0, 65536, (1000, 1000), dtype=np.uint16)
    expected = np.round((values - values.min()) * (255 / (int(values.max()) - int(values.min())))).astype(np.uint8)
    stretched, peak = traced_peak(pixels.to_bit_depth, values, 65535, 8)
    assert np.abs(stretched.astype(int) - expected).max() <= 1 and (stretched == expected).mean() > 0.999
    # float32 copy (4 bytes a sample) and the result (1): float64 and its temporaries took 8 each.
    assert peak < 5.5 * values.size
    twelve_bit = values >> 4
    scaled, peak = traced_peak(pixels.to_bit_depth, twelve_bit, 4095, 16)
    np.testing.assert_array_equal(scaled, np.round(twelve_bit * (65535 / 4095)).astype(np.uint16))
    assert peak < 2.5 * values.size  # the result (2 bytes a sample) and a table, no float copy


def bomb_dicom(rows: int, columns: int, bits: int = 16, jpeg2000: bool = False) -> bytes:
    """A DICOM whose header claims rows x columns; its pixel data is one small frame (a valid all-black JPEG 2000
    frame of the claimed size when `jpeg2000`, which pylibjpeg would decode whole: 8,192 x 8,192 is 252 bytes)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG2000Lossless if jpeg2000 else ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = "bomb"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if jpeg2000:
        import openjpeg

        ds.PixelData = pydicom.encaps.encapsulate([openjpeg.encode(np.zeros((rows, columns), f"uint{bits}"))])
    else:
        ds.PixelData = b"\0" * 4096
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_converter_rejects_bombs_from_their_headers_and_takes_a_lower_limit(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "bomb.dcm").write_bytes(bomb_dicom(30000, 30000))
    (folder / "bomb16.png").write_bytes(bomb_png(12000, 12000, bit_depth=16))
    (folder / "plain.png").write_bytes(bomb_png(3000, 2000))  # 6 MB decoded
    manifest = shards.convert(str(folder), str(tmp_path / "records"), writer=shards.LocalPool(1, io.StringIO()))
    assert manifest["records"] == 1 and manifest["options"]["limit"] == {"max_image_mb": 100.0}
    assert _rejects(tmp_path / "records") == {
        "bomb.dcm": "image too large: 30000 x 30000 pixels x 1 frame(s) x 2 byte(s) is 1717 MB decoded, above the "
                    "limit of 100 MB",
        "bomb16.png": "image too large: 12000 x 12000 pixels x 1 frame(s) x 2 byte(s) is 275 MB decoded, above the "
                    "limit of 100 MB",
    }
    result = subprocess.run([sys.executable, "-m", "pneumo_tf.convert", f"--dicom_dir={folder}",
                             f"--output_dir={tmp_path / 'lower'}", "--max_image_mb=5", "--workers=1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _rejects(tmp_path / "lower")["plain.png"] == ("image too large: 2000 x 3000 pixels x 1 frame(s) x 1 byte(s) "
                                                         "is 6 MB decoded, above the limit of 5 MB")


def _rejects(records_dir) -> dict:
    with open(records_dir / "rejects.csv") as handle:
        return {os.path.basename(row["file"]): row["reason"] for row in csv.DictReader(handle)}


def test_the_web_page_refuses_bombs_with_a_422(trained_model):
    from pneumo_tf.inference import web

    client = web.create_app(trained_model).test_client()
    for name, data, message in (
        ("bomb.dcm", bomb_dicom(30000, 30000), "bomb.dcm cannot be read as a radiograph: image too large: 30000 x "
                                               "30000 pixels"),
        ("bomb.png", bomb_png(8000, 8000, bit_depth=16), "bomb.png cannot be read as a radiograph: image too large: "
                                                         "8000 x 8000 pixels"),
    ):
        response = client.post("/api/predict", data={"file": (io.BytesIO(data), name)},
                               content_type="multipart/form-data")
        assert response.status_code == 422 and response.json["error"].startswith(message), response.json
    assert client.get("/healthz").status_code == 200
