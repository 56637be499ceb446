"""PNG and JPEG radiographs through the converter: the same records as their DICOMs, mixed folders,
every pixel rule, rejects with reasons, boxes on non-square images, the --input_dir flags."""
import csv
import io
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pneumo_tf.errors import RejectedFile
from pneumo_tf.records import (
    boxes as box_lib,
    images,
    jpeg,
    manifest as manifest_lib,
    radiograph,
    schema,
    shards,
    synthetic,
)
from test_convert import decode_png, read_records, run_cli, stored_mask, synthetic_args

# tf.io.decode_jpeg (the pipeline's decoder, libjpeg's fast integer DCT) against Pillow's decode
# (its accurate DCT) of the same JPEG, measured on synthetic 1024-px frames: at most 3 grey levels
# apart (2 in most frames), 0.49 on average.
JPEG_DECODER_TOLERANCE = 3
JPEG_DECODER_MEAN_TOLERANCE = 0.6


@pytest.fixture(scope="module")
def exported(synthetic_rsna, tmp_path_factory) -> dict:
    """The synthetic DICOMs exported as PNG and as JPEG folders: {format: data paths like synthetic_rsna's}."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for image_format in (images.PNG, images.JPEG):
        folders[image_format] = {
            **synthetic_rsna,
            "train_dir": synthetic.export_images(synthetic_rsna["train_dir"], str(root / image_format / "train"),
                                                 image_format, workers=1),
            "test_dir": synthetic.export_images(synthetic_rsna["test_dir"], str(root / image_format / "test"),
                                                image_format, workers=1),
        }
    return folders


@pytest.fixture(scope="module")
def dicom_records(synthetic_rsna, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("dicom_records") / "records"
    shards.convert(synthetic_rsna["train_dir"], str(output), synthetic_rsna["train_labels"],
                   synthetic_rsna["detailed_class_info"], synthetic_rsna["test_dir"],
                   radiograph.ConvertOptions(num_shards=2), writer=shards.LocalPool(1, progress_stream=io.StringIO()))
    return read_records(str(output))


@pytest.mark.parametrize("image_format", [images.PNG, images.JPEG])
def test_image_folders_give_the_records_of_their_dicoms(image_format, exported, dicom_records, tmp_path):
    data = exported[image_format]
    output = tmp_path / "records"
    if image_format == images.PNG:  # through the command line's format-neutral flag names
        args = synthetic_args(data, output, "--num_shards=2", "--workers=1")
        args[0] = f"--input_dir={data['train_dir']}"
        args[3] = f"--test_input_dir={data['test_dir']}"
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        shards.convert(data["train_dir"], str(output), data["train_labels"], data["detailed_class_info"],
                       data["test_dir"], radiograph.ConvertOptions(num_shards=2),
                       writer=shards.LocalPool(1, progress_stream=io.StringIO()))
    manifest = manifest_lib.read_manifest(str(output))
    records = read_records(str(output))
    assert manifest["formats"] == {"dicom": 0, "png": 0, "jpeg": 0, image_format: 27}
    assert manifest["passthrough_records"] == (27 if image_format == images.JPEG else 0) and manifest["rejects"] == 0
    assert set(records) == set(dicom_records) and len(records) == 27
    same_keys = ("split", schema.TARGET, schema.CLASS, *schema.BOX_KEYS, schema.MASK_ENCODED, schema.IMAGE_HEIGHT,
                 schema.IMAGE_WIDTH, schema.SOURCE_HEIGHT, schema.SOURCE_WIDTH)
    for image_id, record in records.items():
        reference = dicom_records[image_id]
        for key in same_keys:
            assert record[key] == reference[key], (image_id, key)
        # What an image file does not hold is unknown.
        assert record[schema.VIEW] == [b""] and record[schema.AGE] == [-1] and record[schema.SEX] == [b""]
        assert record[schema.PIXEL_SPACING] == [0.0, 0.0]
        frame = reference[schema.IMAGE_ENCODED][0]
        if image_format == images.JPEG:
            assert record[schema.IMAGE_FORMAT] == [b"jpeg"] and record[schema.IMAGE_ENCODED][0] == frame
            continue
        assert record[schema.IMAGE_FORMAT] == [b"png"]
        stored = decode_png(record[schema.IMAGE_ENCODED][0])
        np.testing.assert_array_equal(stored, np.asarray(Image.open(io.BytesIO(frame))))
        # The pipeline decodes the DICOM's record with TensorFlow: the same pixels within its DCT's rounding.
        difference = np.abs(stored.astype(int) - tf.io.decode_jpeg(frame, channels=1).numpy()[..., 0])
        assert difference.max() <= JPEG_DECODER_TOLERANCE and difference.mean() < JPEG_DECODER_MEAN_TOLERANCE


def _png(array, **save) -> bytes:
    buffer = io.BytesIO()
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _jpeg(array, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed(synthetic_rsna, tmp_path_factory) -> dict:
    """A folder of 2 DICOMs, 6 PNGs (grey 8 and 16-bit, RGB, RGBA, palette, one named .jpg), 3 JPEGs
    (grey baseline, grey progressive, colour) and 7 files that cannot be records."""
    folder = tmp_path_factory.mktemp("mixed") / "images"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name in sorted(os.listdir(synthetic_rsna["train_dir"]))[:2]:
        shutil.copy(os.path.join(synthetic_rsna["train_dir"], name), folder / name)
    picture = synthetic.make_radiograph(rng, [(20, 24, 16, 20)], 64)[:, 8:56]  # 64 x 48, smooth as JPEG likes
    arrays = {
        "grey8": rng.integers(0, 256, (48, 40), dtype=np.uint8),
        "grey16": rng.integers(1000, 52001, (40, 32), dtype=np.uint16),
        "rgb": rng.integers(0, 256, (24, 20, 3), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (24, 20, 4), dtype=np.uint8),
        "palette": rng.integers(0, 4, (16, 24), dtype=np.uint8),
        "misnamed": rng.integers(0, 256, (20, 16), dtype=np.uint8),
        "picture": picture,
        "colour": np.stack([picture, np.clip(picture.astype(int) + 40, 0, 255).astype(np.uint8), picture // 2], -1),
    }
    palette = Image.fromarray(arrays["palette"], mode="P")
    palette.putpalette([0, 0, 0, 90, 90, 90, 200, 200, 200, 255, 255, 255])
    files = {
        "grey8.png": _png(arrays["grey8"]),
        "grey16.png": _png(arrays["grey16"]),
        "rgb.png": _png(arrays["rgb"]),
        "rgba.png": _png(arrays["rgba"]),
        "palette.png": _png(palette),
        "misnamed.jpg": _png(arrays["misnamed"]),  # a PNG, whatever its name says
        "baseline.jpg": _jpeg(picture),
        "baseline.png": _png(picture),  # the same id as baseline.jpg: a duplicate
        "progressive.jpeg": _jpeg(picture, progressive=True),
        "colour.JPG": _jpeg(arrays["colour"]),
        "notes.txt": b"patientId,Target\nabc,1\n",
        "empty.png": b"",
        "cut_short.png": _png(arrays["grey8"])[:-200],  # the compressed data cut short
        "bad_header.png": images.PNG_SIGNATURE + b"\x00" * 40,
        "truncated.jpg": _jpeg(picture)[:-300],  # no EOI
    }
    # A foreign marker inside the compressed data: libjpeg stops (as in test_convert's damaged frames).
    broken = bytearray(_jpeg(picture))
    broken[len(broken) // 2: len(broken) // 2 + 2] = b"\xff\x27"
    files["broken.jpg"] = bytes(broken)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {"folder": folder, "arrays": arrays, "files": files}


EXPECTED_REJECTS = {
    "bad_header.png": "PNG header unreadable",
    "baseline.png": "duplicate image id baseline",
    "broken.jpg": "JPEG frame does not decode (marker 0xFF27 inside the compressed data",
    "empty.png": "empty file",
    "cut_short.png": "PNG does not decode",
    "notes.txt": "not a DICOM, PNG or JPEG file",
    "truncated.jpg": "JPEG frame does not decode",
}


def _convert(folder, output, **options):
    manifest = shards.convert(str(folder), str(output), options=radiograph.ConvertOptions(**options),
                              writer=shards.LocalPool(1, progress_stream=io.StringIO()))
    with open(output / manifest_lib.REJECTS_NAME, newline="") as handle:
        rejects = {os.path.basename(row["file"]): row["reason"] for row in csv.DictReader(handle)}
    return manifest, read_records(str(output)), rejects


def _pixels(record) -> np.ndarray:
    return decode_png(record[schema.IMAGE_ENCODED][0])


def test_mixed_folder_counts_rejects_and_pixels(mixed, tmp_path):
    arrays, files = mixed["arrays"], mixed["files"]
    manifest, records, rejects = _convert(mixed["folder"], tmp_path / "out8")
    dicom_ids = {name[:-4] for name in os.listdir(mixed["folder"]) if name.endswith(".dcm")}
    assert set(records) == dicom_ids | {"grey8", "grey16", "rgb", "rgba", "palette", "misnamed", "baseline",
                                        "progressive", "colour"}
    assert manifest["formats"] == {"dicom": 2, "png": 6, "jpeg": 3}
    assert manifest["passthrough_records"] == 3 and manifest["transcoded_records"] == 8
    assert manifest["records"] == 11 and manifest["rejects"] == 7 and manifest["splits"]["test"]["records"] == 11
    assert sorted(rejects) == sorted(EXPECTED_REJECTS)
    for name, reason in EXPECTED_REJECTS.items():
        assert rejects[name].startswith(reason), (name, rejects[name])

    # 8-bit grey is kept exactly; 16-bit grey stretched from its minimum to its maximum, as DICOM's.
    np.testing.assert_array_equal(_pixels(records["grey8"]), arrays["grey8"])
    np.testing.assert_array_equal(_pixels(records["misnamed"]), arrays["misnamed"])
    grey16 = arrays["grey16"].astype(np.float64)
    stretched = np.round((grey16 - grey16.min()) * 255 / (grey16.max() - grey16.min())).astype(np.uint8)
    np.testing.assert_array_equal(_pixels(records["grey16"]), stretched)
    # Colour gives its BT.601 luminance (Pillow's integer weights, within one level of the exact sum); alpha is ignored.
    luminance = np.round(arrays["rgb"].astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(_pixels(records["rgb"]) - luminance).max() <= 1
    np.testing.assert_array_equal(_pixels(records["rgb"]), np.asarray(Image.fromarray(arrays["rgb"]).convert("L")))
    np.testing.assert_array_equal(_pixels(records["rgba"]),
                                  np.asarray(Image.fromarray(arrays["rgba"][..., :3]).convert("L")))
    np.testing.assert_array_equal(_pixels(records["palette"]), np.array([0, 90, 200, 255])[arrays["palette"]])

    # A grey baseline JPEG is stored as it is; a progressive one is decoded (the same picture).
    baseline = records["baseline"]
    assert baseline[schema.IMAGE_FORMAT] == [b"jpeg"] and baseline[schema.IMAGE_ENCODED] == [files["baseline.jpg"]]
    assert records["progressive"][schema.IMAGE_FORMAT] == [b"png"]
    # Progressive coding reorders the same quantised coefficients: the baseline file's pixels exactly.
    np.testing.assert_array_equal(_pixels(records["progressive"]),
                                  np.asarray(Image.open(io.BytesIO(files["baseline.jpg"]))))
    # A colour JPEG gives its luma, as tf.io.decode_jpeg(channels=1) gives it.
    luma = tf.io.decode_jpeg(files["colour.JPG"], channels=1).numpy()[..., 0].astype(int)
    assert np.abs(_pixels(records["colour"]) - luma).max() <= JPEG_DECODER_TOLERANCE
    for image_id in ("grey8", "grey16", "colour", "baseline"):
        record = records[image_id]
        height, width = arrays["picture" if image_id in ("colour", "baseline") else image_id].shape[:2]
        assert record[schema.SOURCE_HEIGHT] == record[schema.IMAGE_HEIGHT] == [height]
        assert record[schema.SOURCE_WIDTH] == record[schema.IMAGE_WIDTH] == [width]

    # 16 bits: 16-bit PNGs kept exactly, 8-bit data x 257, the grey baseline JPEG still passed through.
    manifest16, records16, rejects16 = _convert(mixed["folder"], tmp_path / "out16", bit_depth=16)
    assert rejects16 == rejects and manifest16["passthrough_records"] == 3
    np.testing.assert_array_equal(_pixels(records16["grey16"]), arrays["grey16"])
    np.testing.assert_array_equal(_pixels(records16["grey8"]), arrays["grey8"].astype(np.uint16) * 257)
    np.testing.assert_array_equal(_pixels(records16["progressive"]),
                                  _pixels(records["progressive"]).astype(np.uint16) * 257)
    assert records16["baseline"][schema.IMAGE_ENCODED] == [files["baseline.jpg"]]

    # Pre-resized: every image a PNG of that size, source sizes kept.
    manifest32, records32, _ = _convert(mixed["folder"], tmp_path / "out32", image_size=32)
    assert manifest32["passthrough_records"] == 0 and manifest32["formats"] == manifest["formats"]
    for image_id, record in records32.items():
        assert _pixels(record).shape == (32, 32)
        assert record[schema.SOURCE_HEIGHT] == records[image_id][schema.SOURCE_HEIGHT]


def test_boxes_are_normalised_by_each_images_own_size(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    (folder / "wide.png").write_bytes(_png(rng.integers(0, 256, (200, 300), dtype=np.uint8)))
    (folder / "tall.jpg").write_bytes(_jpeg(rng.integers(0, 256, (300, 200), dtype=np.uint8)))
    (folder / "clear.png").write_bytes(_png(rng.integers(0, 256, (100, 100), dtype=np.uint8)))
    labels = tmp_path / "labels.csv"
    labels.write_text("patientId,x,y,width,height,Target\nwide,30,20,60,40,1\ntall,20,30,40,60,1\nclear,,,,,0\n")
    manifest = shards.convert(str(folder), str(tmp_path / "out"), str(labels),
                              options=radiograph.ConvertOptions(val_fraction=0.0),
                              writer=shards.LocalPool(1, progress_stream=io.StringIO()))
    records = read_records(str(tmp_path / "out"))
    assert manifest["splits"]["train"]["records"] == 3 and manifest["splits"]["train"]["boxes"] == 2
    for image_id, (height, width) in (("wide", (200, 300)), ("tall", (300, 200))):
        record = records[image_id]
        assert [record[key] for key in schema.BOX_KEYS] == [[pytest.approx(0.1)], [pytest.approx(0.1)],
                                                          [pytest.approx(0.3)], [pytest.approx(0.3)]]
        assert record[schema.SOURCE_HEIGHT] == [height] and record[schema.SOURCE_WIDTH] == [width]
        mask = stored_mask(record)
        assert mask.shape == (height, width) and mask.sum() == (height * 0.2) * (width * 0.2)
        np.testing.assert_array_equal(mask, box_lib.rasterize([(0.1, 0.1, 0.3, 0.3)], height, width))
    assert records["clear"][schema.TARGET] == [0] and records["clear"][schema.XMIN] == []


@pytest.mark.parametrize("head, expected", [
    (images.PNG_SIGNATURE + b"\x00" * 200, images.PNG),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 200, images.JPEG),
    (b"\x00" * 128 + b"DICM" + b"\x00" * 10, images.DICOM),
    (b"\xff\xd8\x00" + b"\x00" * 200, None),  # SOI without a marker after it
    (b"DICM" + b"\x00" * 200, None),  # the prefix belongs after the 128-byte preamble
    (b"", None),
])
def test_sniff_reads_content_not_names(head, expected):
    assert images.sniff(head[: images.SNIFF_BYTES]) == expected


@pytest.mark.parametrize("name, image_id", [
    ("abc.dcm", "abc"), ("abc.DCM", "abc"), ("abc.png", "abc"), ("abc.jpg", "abc"), ("abc.JPEG", "abc"),
    ("a.b.png", "a.b"), ("notes.txt", "notes.txt"), ("abc", "abc"),
])
def test_image_id_is_the_name_without_an_image_extension(name, image_id):
    assert radiograph.image_id_of(os.path.join("folder", name)) == image_id


def test_frame_header_names_the_coding_process():
    picture = np.zeros((24, 40), np.uint8)
    baseline = jpeg.frame_header(_jpeg(picture))
    assert (baseline.marker, baseline.precision, baseline.height, baseline.width, baseline.components) == (
        jpeg.BASELINE, 8, 24, 40, 1)
    assert jpeg.frame_header(_jpeg(picture, progressive=True)).marker == 0xC2
    assert jpeg.frame_header(_jpeg(np.zeros((24, 40, 3), np.uint8))).components == 3
    with pytest.raises(RejectedFile, match="no SOI/EOI marker"):
        jpeg.frame_header(_jpeg(picture)[:-10])
