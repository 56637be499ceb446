"""The converter: exact contents of records, rejects, determinism, resume, CLI errors."""
import csv
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pydicom.encaps
import pytest
import tensorflow as tf
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pneumo_tf.data import pipeline
from pneumo_tf.errors import RejectedFile, UserError
from pneumo_tf.fileio import write_json_atomic
from pneumo_tf.records import (
    beam,
    boxes as box_lib,
    dicom,
    jpeg,
    labels as labels_lib,
    manifest as manifest_lib,
    masks,
    plan,
    radiograph,
    schema,
    shards,
    synthetic,
)


def read_records(records_dir):
    """{image id: {key: value}} for every record of every shard the manifest lists, with its split."""
    manifest = manifest_lib.read_manifest(records_dir)
    records = {}
    for split in manifest["splits"]:
        for path in manifest_lib.shard_paths(records_dir, split, manifest):
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                feature = tf.train.Example.FromString(raw).features.feature
                values = {}
                for key, value in feature.items():
                    kind = value.WhichOneof("kind")
                    values[key] = list(getattr(value, kind).value)
                image_id = values[schema.IMAGE_ID][0].decode()
                assert image_id not in records
                records[image_id] = {"split": split, **values}
    return records


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def stored_mask(record) -> np.ndarray:
    """The record's mask at the stored image's size: its collapsed PNG expanded by the repeats."""
    collapsed = decode_png(record[schema.MASK_ENCODED][0]).astype(bool)
    return masks.expand(collapsed, record[schema.MASK_ROW_REPEATS], record[schema.MASK_COL_REPEATS])


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pneumo_tf.convert", *args], capture_output=True, text=True, timeout=timeout
    )


def synthetic_args(data, output_dir, *extra):
    return [
        f"--dicom_dir={data['train_dir']}", f"--labels_csv={data['train_labels']}",
        f"--class_info_csv={data['detailed_class_info']}", f"--test_dicom_dir={data['test_dir']}",
        f"--output_dir={output_dir}", *extra,
    ]


@pytest.fixture(scope="module")
def converted(synthetic_rsna, tmp_path_factory):
    output = tmp_path_factory.mktemp("records") / "passthrough"
    manifest = shards.convert(
        synthetic_rsna["train_dir"], str(output), synthetic_rsna["train_labels"],
        synthetic_rsna["detailed_class_info"], synthetic_rsna["test_dir"],
        radiograph.ConvertOptions(num_shards=2), shards.LocalPool(2),
    )
    return output, manifest, read_records(str(output))


def test_synthetic_records_match_labels_and_dicoms(synthetic_rsna, converted):
    output, manifest, records = converted
    labels = labels_lib.read_labels(synthetic_rsna["train_labels"], synthetic_rsna["detailed_class_info"])
    test_ids = {name[:-4] for name in os.listdir(synthetic_rsna["test_dir"])}
    assert set(records) == set(labels) | test_ids
    assert len(records) == 27 and manifest["records"] == 27 and manifest["rejects"] == 0
    for image_id, record in records.items():
        path = os.path.join(synthetic_rsna["test_dir" if image_id in test_ids else "train_dir"], f"{image_id}.dcm")
        ds = pydicom.dcmread(path)
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        assert record[schema.IMAGE_ENCODED][0] == frame  # passthrough: the DICOM's bytes, unchanged
        assert record[schema.IMAGE_FORMAT] == [b"jpeg"]
        assert record[schema.IMAGE_HEIGHT] == record[schema.SOURCE_HEIGHT] == [1024]
        assert record[schema.VIEW][0].decode() == ds.ViewPosition
        assert record[schema.AGE] == [int(ds.PatientAge)]
        assert record[schema.SEX][0].decode() == ds.PatientSex
        np.testing.assert_allclose(record[schema.PIXEL_SPACING], [0.143, 0.143], rtol=1e-6)
        if image_id in test_ids:
            assert record["split"] == "test"
            assert record[schema.TARGET] == [-1] and record[schema.CLASS] == [-1] and not record[schema.XMIN]
            expected_boxes = []
        else:
            assert record["split"] in ("train", "val")
            label = labels[image_id]
            assert record[schema.TARGET] == [label.target] and record[schema.CLASS] == [label.label_class]
            expected_boxes = [box_lib.xywh_to_normalised(b, 1024, 1024) for b in label.boxes]
            got = list(zip(*(record[k] for k in schema.BOX_KEYS)))
            np.testing.assert_allclose(got, expected_boxes, atol=1e-7)
            assert len(got) == len(label.boxes)
        np.testing.assert_array_equal(stored_mask(record), box_lib.rasterize(expected_boxes, 1024, 1024))


def test_manifest_counts(converted):
    output, manifest, records = converted
    by_split = {}
    for record in records.values():
        by_split.setdefault(record["split"], []).append(record)
    for split, members in by_split.items():
        entry = manifest["splits"][split]
        assert entry["records"] == len(members) == sum(s["records"] for s in entry["shards"])
        assert entry["positive"] == sum(r[schema.TARGET][0] == 1 for r in members)
        assert entry["boxes"] == sum(len(r[schema.XMIN]) for r in members)
        for shard in entry["shards"]:
            path = os.path.join(output, shard["name"])
            assert "tfrecord" in shard["name"] and os.path.getsize(path) == shard["bytes"]
            with open(path, "rb") as handle:
                assert hashlib.file_digest(handle, "sha256").hexdigest() == shard["sha256"]
    # 2 shards asked for in each split, but a split never gets more shards than files.
    assert [len(manifest["splits"][s]["shards"]) for s in ("train", "val", "test")] == [2, 2, 2]
    assert manifest["passthrough_records"] == 27 and manifest["options"]["image_size"] == 0
    assert sorted(os.listdir(output)) == sorted(
        ["manifest.json", "rejects.csv"] + [s["name"] for e in manifest["splits"].values() for s in e["shards"]]
    )


def test_val_split_is_stratified_by_class():
    labels = {f"id{i:03d}": labels_lib.PatientLabels(int(i % 10 < 2),
                                                     (0 if i % 10 >= 6 else 1) if i % 10 >= 2 else 2, ())
              for i in range(100)}
    train, val = plan.split_ids(labels, list(labels), 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    counts = pd.Series([labels[i].label_class for i in val]).value_counts().to_dict()
    assert counts == {0: 8, 1: 8, 2: 4}  # 40 / 40 / 20 patients per class, 20% of each
    assert plan.split_ids(labels, list(labels), 0.2, seed=3) == (train, val)
    assert plan.split_ids(labels, list(labels), 0.2, seed=4) != (train, val)


def test_folds_partition_the_patients_stratified_by_class():
    # 101 patients: 40 Normal, 40 Not Normal, 21 Lung Opacity.
    labels = {f"id{i:03d}": labels_lib.PatientLabels(int(i % 10 < 2),
                                                     (0 if i % 10 >= 6 else 1) if i % 10 >= 2 else 2, ())
              for i in range(101)}
    vals = [plan.split_ids(labels, list(labels), 0.2, seed=3, folds=5, fold=fold) for fold in range(5)]
    for train, val in vals:
        assert not set(train) & set(val) and len(train) + len(val) == 101
    all_val = [image_id for _, val in vals for image_id in val]
    assert sorted(all_val) == sorted(labels)  # every patient in exactly one val split
    assert sorted(len(val) for _, val in vals) == [20, 20, 20, 20, 21]
    counts = [pd.Series([labels[i].label_class for i in val]).value_counts().to_dict() for _, val in vals]
    assert [(c[0], c[1]) for c in counts] == [(8, 8)] * 5
    assert sorted(c[2] for c in counts) == [4, 4, 4, 4, 5]
    # The same seed and fold give the same split; folds=0 keeps --val_fraction's split.
    assert plan.split_ids(labels, list(labels), 0.2, seed=3, folds=5, fold=2) == vals[2]
    assert plan.split_ids(labels, list(labels), 0.2, seed=3) == plan.split_ids(labels, list(labels), 0.2, 3, 0, 0)


@pytest.mark.parametrize("folds,fold,message", [(1, 0, "--folds must be 0"), (5, 5, "--fold must be in [0, 5)"),
                                                (0, 1, "--fold must be in [0, 1)")])
def test_bad_folds_are_refused(folds, fold, message):
    with pytest.raises(UserError, match=re.escape(message)):
        radiograph.ConvertOptions(folds=folds, fold=fold).validate()


def test_real_csvs_facts(shared_rsna):
    labels = labels_lib.read_labels(
        str(shared_rsna / "stage_2_train_labels.csv"), str(shared_rsna / "stage_2_detailed_class_info.csv")
    )
    assert len(labels) == 26684
    assert sum(label.target for label in labels.values()) == 6012
    assert sum(len(label.boxes) for label in labels.values()) == 9555
    assert pd.Series([patient.label_class for patient in labels.values()]).value_counts().to_dict() == {
        1: 11821, 0: 8851, 2: 6012}
    per_positive = pd.Series([len(patient.boxes) for patient in labels.values() if patient.target])
    per_positive = per_positive.value_counts().to_dict()
    assert per_positive == {1: 2614, 2: 3266, 3: 119, 4: 13}


def test_real_dicoms_convert_exactly(shared_rsna, tmp_path):
    manifest = shards.convert(
        str(shared_rsna / "dicom"), str(tmp_path / "out"), str(shared_rsna / "stage_2_train_labels.csv"),
        str(shared_rsna / "stage_2_detailed_class_info.csv"), options=radiograph.ConvertOptions(val_fraction=0.3),
        writer=shards.LocalPool(1),
    )
    records = read_records(str(tmp_path / "out"))
    assert manifest["records"] == 10 and manifest["rejects"] == 0
    assert manifest["labeled_without_dicom"] == 26684 - 10
    raw = pd.read_csv(shared_rsna / "stage_2_train_labels.csv")
    expected_positive = {"00436515", "00704310", "00aecb01"}
    assert {i[:8] for i, r in records.items() if r[schema.TARGET] == [1]} == expected_positive
    for image_id, record in records.items():
        ds = pydicom.dcmread(shared_rsna / "dicom" / f"{image_id}.dcm")
        assert image_id == ds.PatientID
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        assert record[schema.IMAGE_ENCODED][0] == frame
        rows = raw[raw.patientId == image_id].dropna()
        expected = sorted((r.x / 1024, r.y / 1024, (r.x + r.width) / 1024, (r.y + r.height) / 1024)
                          for r in rows.itertuples())
        got = sorted(zip(*(record[k] for k in schema.BOX_KEYS)))
        assert len(got) == len(expected) == (2 if image_id[:8] in expected_positive else 0)
        np.testing.assert_allclose(np.reshape(got, (-1, 4)), np.reshape(expected, (-1, 4)), atol=1e-7)
        np.testing.assert_array_equal(stored_mask(record), box_lib.rasterize(expected, 1024, 1024))
        # Decoding the passed-through bytes with TensorFlow matches pydicom's decoder within
        # the libjpeg-turbo / libjpeg difference (up to 6 grey levels, mean ~0.5).
        decoded = tf.io.decode_jpeg(frame).numpy()[..., 0].astype(int)
        difference = np.abs(decoded - ds.pixel_array.astype(int))
        assert difference.max() <= 8 and difference.mean() < 1.0


REAL_JPEGS = 12  # a handful of the 1,000 real radiographs in ../shared/data/rsna/jpg


def test_real_jpegs_convert_with_their_labels_classes_and_metadata(shared_rsna, tmp_path):
    names = sorted(os.listdir(shared_rsna / "jpg"))[:REAL_JPEGS]
    folder = tmp_path / "jpg"
    folder.mkdir()
    for name in names:
        shutil.copy(shared_rsna / "jpg" / name, folder / name)
    manifest = shards.convert(
        str(folder), str(tmp_path / "out"), str(shared_rsna / "stage_2_train_labels.csv"),
        str(shared_rsna / "stage_2_detailed_class_info.csv"), writer=shards.LocalPool(1),
        metadata_csv=str(shared_rsna / "jpg_metadata.csv"),
    )
    records = read_records(str(tmp_path / "out"))
    assert manifest["records"] == REAL_JPEGS and manifest["rejects"] == 0
    assert manifest["formats"]["jpeg"] == manifest["passthrough_records"] == REAL_JPEGS
    assert sorted(records) == sorted(name.removesuffix(".jpg") for name in names)
    labels = pd.read_csv(shared_rsna / "stage_2_train_labels.csv")
    classes = pd.read_csv(shared_rsna / "stage_2_detailed_class_info.csv").drop_duplicates().set_index("patientId")
    facts = pd.read_csv(shared_rsna / "jpg_metadata.csv").set_index("patientId")
    for image_id, record in records.items():
        assert record[schema.IMAGE_ENCODED][0] == (folder / f"{image_id}.jpg").read_bytes()  # passed through
        rows = labels[labels.patientId == image_id].dropna()
        expected = sorted((r.x / 1024, r.y / 1024, (r.x + r.width) / 1024, (r.y + r.height) / 1024)
                          for r in rows.itertuples())
        np.testing.assert_allclose(np.reshape(sorted(zip(*(record[k] for k in schema.BOX_KEYS))), (-1, 4)),
                                   np.reshape(expected, (-1, 4)), atol=1e-7)
        assert record[schema.TARGET] == [int(len(rows) > 0)]
        assert schema.CLASS_NAMES[record[schema.CLASS][0]] == classes.loc[image_id, "class"]
        row = facts.loc[image_id]
        assert (record[schema.VIEW][0].decode(), record[schema.SEX][0].decode(), record[schema.AGE][0]) == (
            row.ViewPosition, row.PatientSex, row.PatientAge)
    assert manifest["options"]["metadata_csv"] == str(shared_rsna / "jpg_metadata.csv")


def _metadata_csv(path, rows):
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([labels_lib.METADATA_COLUMNS, *rows])
    return str(path)


def test_the_metadata_csv_gives_jpegs_the_side_inputs_their_dicoms_have(shared_rsna, tmp_path):
    from pneumo_tf.data import metadata

    dicoms = {path.stem: pydicom.dcmread(path) for path in sorted((shared_rsna / "dicom").glob("*.dcm"))}
    jpegs = tmp_path / "jpg"
    jpegs.mkdir()
    for image_id, ds in dicoms.items():  # the DICOM's JPEG frame as a .jpg, as a Kaggle mirror holds it
        (jpegs / f"{image_id}.jpg").write_bytes(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    csv_path = _metadata_csv(tmp_path / "facts.csv", [(image_id, ds.PatientAge, ds.PatientSex, ds.ViewPosition)
                                                      for image_id, ds in dicoms.items()])
    encoded = {}
    for name, folder, extra in (("dicom", shared_rsna / "dicom", None), ("jpeg", jpegs, csv_path)):
        shards.convert(str(folder), str(tmp_path / name), writer=shards.LocalPool(1), metadata_csv=extra)
        batch = next(iter(pipeline.make_dataset(str(tmp_path / name), "test", 10, 32, training=False)))
        side = metadata.encode_batch(metadata.FIELDS, batch).numpy()
        encoded[name] = dict(zip(batch["id"].numpy().astype(str), side))
    assert sorted(encoded["dicom"]) == sorted(encoded["jpeg"]) == sorted(dicoms)
    for image_id in dicoms:
        np.testing.assert_array_equal(encoded["jpeg"][image_id], encoded["dicom"][image_id])
    # Without the CSV the JPEGs' facts are unknown: view, sex and age each in their "unknown" column.
    shards.convert(str(jpegs), str(tmp_path / "bare"), writer=shards.LocalPool(1))
    batch = next(iter(pipeline.make_dataset(str(tmp_path / "bare"), "test", 10, 32, training=False)))
    np.testing.assert_array_equal(metadata.encode_batch(metadata.FIELDS, batch).numpy(),
                                  np.tile([0, 0, 1, 0, 0, 1, 0, 1], (10, 1)))


def test_a_metadata_row_that_contradicts_the_header_is_a_reject(shared_rsna, tmp_path):
    path = sorted((shared_rsna / "dicom").glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    other = {"AP": "PA", "PA": "AP"}[ds.ViewPosition]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(path, folder / path.name)
    csv_path = _metadata_csv(tmp_path / "facts.csv", [(path.stem, "", "", other)])
    manifest = shards.convert(str(folder), str(tmp_path / "out"), writer=shards.LocalPool(1), metadata_csv=csv_path)
    assert manifest["records"] == 0 and manifest["rejects"] == 1
    with open(tmp_path / "out" / "rejects.csv") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["reason"] == f"the metadata says view {other!r}, the DICOM header {ds.ViewPosition!r}"
    # A row that agrees, or only fills what the header lacks, converts.
    agreeing = _metadata_csv(tmp_path / "agree.csv", [(path.stem, "", ds.PatientSex, ds.ViewPosition)])
    assert shards.convert(str(folder), str(tmp_path / "ok"), writer=shards.LocalPool(1),
                          metadata_csv=agreeing)["records"] == 1


@pytest.mark.parametrize("rows,message", [
    ([("a", "51", "X", "AP")], "row 2 (a) has PatientAge '51' / PatientSex 'X'"),
    ([("a", "old", "M", "AP")], "row 2 (a) has PatientAge 'old'"),
    ([("a", "51", "M", "AP"), ("a", "52", "M", "AP")], "patientId a appears twice"),
])
def test_bad_metadata_csvs_are_user_errors(tmp_path, rows, message):
    with pytest.raises(UserError, match=re.escape(message)):
        labels_lib.read_metadata(_metadata_csv(tmp_path / "facts.csv", rows))


def _uncompressed_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, **elements):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    frames = pixels.shape[0] if pixels.ndim == 3 and photometric != "RGB" else 1
    rows, columns = pixels.shape[-2:] if photometric != "RGB" else pixels.shape[:2]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored = allocated, bits_stored or allocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_transcoded_pixels_equal_pydicoms(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "dicoms"
    folder.mkdir()
    grey8 = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    grey12 = rng.integers(0, 4096, (32, 32), dtype=np.uint16)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    _uncompressed_dicom(folder / "mono2.dcm", grey8)
    _uncompressed_dicom(folder / "mono1.dcm", grey8, photometric="MONOCHROME1")
    _uncompressed_dicom(folder / "twelve.dcm", grey12, bits_stored=12)
    _uncompressed_dicom(folder / "window.dcm", grey12, bits_stored=12, WindowCenter=1000, WindowWidth=1000)
    _uncompressed_dicom(folder / "rgb.dcm", rgb, photometric="RGB")
    _uncompressed_dicom(folder / "frames.dcm", frames)
    (folder / "notes.txt").write_text("not a DICOM")

    def stored(bit_depth):
        out = tmp_path / f"out{bit_depth}"
        manifest = shards.convert(str(folder), str(out), options=radiograph.ConvertOptions(bit_depth=bit_depth),
                                  writer=shards.LocalPool(1))
        records = read_records(str(out))
        pixels = {}
        for image_id, record in records.items():
            assert record[schema.IMAGE_FORMAT] == [b"png"]
            pixels[image_id] = np.asarray(Image.open(io.BytesIO(record[schema.IMAGE_ENCODED][0])))
        return manifest, pixels, out

    manifest, pixels, out = stored(8)
    assert manifest["splits"]["test"]["records"] == 6 and manifest["multi_frame_first_frame_only"] == 1
    with open(out / "rejects.csv") as handle:
        rejects = list(csv.DictReader(handle))
    assert [os.path.basename(r["file"]) for r in rejects] == ["notes.txt"]
    assert rejects[0]["reason"].startswith("not a DICOM, PNG or JPEG file")
    np.testing.assert_array_equal(pixels["mono2"], grey8)
    np.testing.assert_array_equal(pixels["mono1"], 255 - grey8)
    np.testing.assert_array_equal(pixels["frames"], frames[0])
    # 12-bit to 8-bit: a linear stretch from the image's minimum to its maximum.
    stretch = np.round((grey12 - grey12.min()) * 255.0 / (grey12.max() - grey12.min())).astype(np.uint8)
    np.testing.assert_array_equal(pixels["twelve"], stretch)
    luminance = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    lum8 = np.round((luminance - luminance.min()) * 255 / (luminance.max() - luminance.min())).astype(np.uint8)
    np.testing.assert_array_equal(pixels["rgb"], lum8)
    ds = pydicom.dcmread(folder / "window.dcm")
    windowed = pydicom.pixels.apply_voi_lut(ds.pixel_array, ds)
    expected = np.round((windowed - windowed.min()) * 255.0 / (windowed.max() - windowed.min())).astype(np.uint8)
    np.testing.assert_array_equal(pixels["window"], expected)

    _, pixels16, _ = stored(16)
    assert pixels16["twelve"].dtype == np.uint16
    # Stored ranges fill the 16-bit range, so 1.0 is white after the pipeline's / 65535.
    np.testing.assert_array_equal(pixels16["twelve"], np.round(grey12 * (65535 / 4095)).astype(np.uint16))
    np.testing.assert_array_equal(pixels16["mono2"], grey8.astype(np.uint16) * 257)
    np.testing.assert_array_equal(pixels16["mono1"], (255 - grey8).astype(np.uint16) * 257)


def test_resized_records(synthetic_rsna, tmp_path):
    manifest = shards.convert(
        synthetic_rsna["train_dir"], str(tmp_path / "out"), synthetic_rsna["train_labels"],
        synthetic_rsna["detailed_class_info"], options=radiograph.ConvertOptions(image_size=64),
        writer=shards.LocalPool(1),
    )
    records = read_records(str(tmp_path / "out"))
    assert manifest["passthrough_records"] == 0 and len(records) == 24
    for image_id, record in records.items():
        image = decode_png(record[schema.IMAGE_ENCODED][0])
        assert image.shape == (64, 64) and image.dtype == np.uint8
        assert record[schema.IMAGE_HEIGHT] == [64] and record[schema.SOURCE_HEIGHT] == [1024]
        source = dicom.grey_pixels(pydicom.dcmread(os.path.join(synthetic_rsna["train_dir"], f"{image_id}.dcm")))
        block_means = source.reshape(64, 16, 64, 16).mean(axis=(1, 3))
        assert np.abs(image - block_means).mean() < 3.0
        boxes = list(zip(*(record[k] for k in schema.BOX_KEYS)))
        np.testing.assert_array_equal(stored_mask(record), box_lib.rasterize(boxes, 64, 64))


def test_pydicom_corpus_each_file_one_record_or_one_reject(tmp_path):
    corpus = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    folder = tmp_path / "corpus"
    folder.mkdir()
    names = sorted(n for n in os.listdir(corpus) if os.path.isfile(os.path.join(corpus, n)))
    for index, name in enumerate(names):
        shutil.copy(os.path.join(corpus, name), folder / f"{index:03d}_{name}")
    manifest = shards.convert(str(folder), str(tmp_path / "out"), writer=shards.LocalPool(2))
    records = read_records(str(tmp_path / "out"))
    with open(tmp_path / "out" / "rejects.csv") as handle:
        rejects = list(csv.DictReader(handle))
    record_files = {image_id for image_id in records}
    reject_files = {os.path.basename(r["file"]) for r in rejects}
    all_files = {f"{i:03d}_{n}" for i, n in enumerate(names)}
    assert len(records) + len(rejects) == len(names) == manifest["records"] + manifest["rejects"]
    assert {radiograph.image_id_of(f) for f in reject_files} | record_files == {
        radiograph.image_id_of(f) for f in all_files}
    assert all(r["reason"] for r in rejects)
    assert len(records) >= 40  # most of pydicom's corpus holds decodable pixels


def _as_image_files(data: dict, root) -> dict:
    """The synthetic DICOM folders as PNG and JPEG files (alternately) plus a junk file: data paths like data's."""
    mixed = dict(data)
    for key in ("train_dir", "test_dir"):
        exports = {image_format: synthetic.export_images(data[key], str(root / image_format / key), image_format)
                   for image_format in ("png", "jpeg")}
        folder = root / "mixed" / key
        folder.mkdir(parents=True)
        for index, name in enumerate(sorted(os.listdir(exports["png"]))):
            stem = name.removesuffix(".png")
            image_format = ("png", "jpeg")[index % 2]
            extension = synthetic.EXPORT_EXTENSIONS[image_format]
            shutil.copy(os.path.join(exports[image_format], stem + extension), folder / (stem + extension))
        (folder / "notes.txt").write_text("not an image")
        mixed[key] = str(folder)
    return mixed


@pytest.mark.slow
@pytest.mark.parametrize("source", ["dicom", "png_and_jpeg"])
def test_two_processes_give_identical_shards_and_resume_after_kill(source, tmp_path):
    # 300 small images transcoded to 128 px: each shard takes long enough (tens of ms) to
    # kill the run between two shards.
    data = synthetic.write_dataset(str(tmp_path / "data"), synthetic.SyntheticConfig(300, 8, seed=3, image_size=256))
    if source == "png_and_jpeg":
        data = _as_image_files(data, tmp_path / "images")
    first, second, killed = tmp_path / "first", tmp_path / "second", tmp_path / "killed"
    options = ("--num_shards=8", "--image_size=128")
    assert run_cli(*synthetic_args(data, first, *options, "--workers=2")).returncode == 0
    assert run_cli(*synthetic_args(data, second, *options, "--workers=1")).returncode == 0
    shard_names = sorted(n for n in os.listdir(first) if "tfrecord" in n)
    assert len(shard_names) == 8 + 8 + 8
    manifest = manifest_lib.read_manifest(str(first))
    if source == "png_and_jpeg":
        assert manifest["formats"] == {"dicom": 0, "png": 154, "jpeg": 154} and manifest["rejects"] == 2
    else:
        assert manifest["formats"] == {"dicom": 308, "png": 0, "jpeg": 0} and manifest["rejects"] == 0
    for name in shard_names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    # Kill -9 once the first shard is complete, then rerun: finished shards are kept, the
    # rest are written, and the folder ends byte-identical with no temporary files.
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumo_tf.convert", *synthetic_args(data, killed, *options, "--workers=1")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            n.endswith(".tfrecord") for n in (os.listdir(killed) if killed.exists() else [])):
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists()
    finished_before = {n: (killed / n).stat().st_mtime_ns for n in os.listdir(killed) if n.endswith(".tfrecord")}
    assert 1 <= len(finished_before) < len(shard_names)
    result = run_cli(*synthetic_args(data, killed, *options, "--workers=1"))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(killed)) == sorted(os.listdir(first))
    for name in shard_names:
        assert (killed / name).read_bytes() == (first / name).read_bytes(), name
    for name, mtime in finished_before.items():
        assert (killed / name).stat().st_mtime_ns == mtime  # skipped, not rewritten
    assert (killed / "rejects.csv").read_bytes() == (first / "rejects.csv").read_bytes()


# Beam's FnApiRunner is what runner=DirectRunner runs offline: DirectRunner first tries the Prism
# runner, whose binary it downloads from GitHub, and falls back to it when that fails.
BEAM_RUNNER = "runner=FnApiRunner"
BEAM_TWO_PROCESSES = f"{BEAM_RUNNER},direct_num_workers=2,direct_running_mode=multi_processing"


@pytest.fixture(scope="module")
def with_a_bad_file(synthetic_rsna, tmp_path_factory):
    """The synthetic folders plus an unreadable file among the test images (it reaches the converter)."""
    folder = tmp_path_factory.mktemp("with_a_bad_file")
    shutil.copytree(synthetic_rsna["train_dir"], folder / "train")
    shutil.copytree(synthetic_rsna["test_dir"], folder / "test")
    (folder / "test" / "broken.dcm").write_bytes(b"DICM but not really")
    return (str(folder / "train"), synthetic_rsna["train_labels"], synthetic_rsna["detailed_class_info"],
            str(folder / "test"))


def _convert(inputs, output_dir, writer, **kwargs):
    train_dir, labels_csv, class_info_csv, test_dir = inputs
    return shards.convert(train_dir, str(output_dir), labels_csv, class_info_csv, test_dir,
                          radiograph.ConvertOptions(num_shards=3), writer, **kwargs)


def _without_timing(manifest):
    return {k: v for k, v in manifest.items() if k not in ("elapsed_seconds", "files_per_second", "versions")}


def _folder_state(folder):
    return {entry.name: (entry.stat().st_mtime_ns, entry.stat().st_size) for entry in os.scandir(folder)}


@pytest.mark.slow
def test_beam_conversion_equals_the_local_pools_byte_for_byte(with_a_bad_file, tmp_path):
    pytest.importorskip("apache_beam")
    local = _convert(with_a_bad_file, tmp_path / "local", shards.LocalPool(2))
    by_beam = _convert(with_a_bad_file, tmp_path / "beam", beam.BeamPipeline(BEAM_TWO_PROCESSES))
    names = sorted(os.listdir(tmp_path / "local"))
    assert names == sorted(os.listdir(tmp_path / "beam"))
    assert len([n for n in names if n.endswith(".tfrecord")]) == 9 and by_beam["records"] == 27
    assert by_beam["rejects"] == 1
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "beam" / name).read_bytes(), name
    assert _without_timing(by_beam) == _without_timing(local)
    with open(tmp_path / "beam" / "rejects.csv") as handle:
        assert [(os.path.basename(r["file"]), r["reason"][:29]) for r in csv.DictReader(handle)] == [
            ("broken.dcm", "not a DICOM, PNG or JPEG file")]

    # A second run over the finished folder finds its manifest and writes nothing.
    before = _folder_state(tmp_path / "beam")
    again = _convert(with_a_bad_file, tmp_path / "beam", beam.BeamPipeline(BEAM_TWO_PROCESSES))
    assert again == by_beam and _folder_state(tmp_path / "beam") == before


def _stopping_after(count, write_shard):
    """write_shard, but raising KeyboardInterrupt (a kill) once `count` shards are written."""
    written = []

    def stopping(*args, **kwargs):
        if len(written) == count:
            raise KeyboardInterrupt
        written.append(write_shard(*args, **kwargs))
        return written[-1]

    return stopping


def test_beam_resumes_and_a_retried_shard_writes_the_same_bytes(with_a_bad_file, tmp_path):
    """A killed Beam run leaves finished shards, their summaries and a half-written temporary file;
    the rerun writes only the rest, and writing a shard again (Beam retrying its bundle) changes nothing."""
    pytest.importorskip("apache_beam")
    reference = _convert(with_a_bad_file, tmp_path / "reference", shards.LocalPool(1))
    output = tmp_path / "resumed"
    train_dir, labels_csv, class_info_csv, test_dir = with_a_bad_file
    planned = plan.make_plan(train_dir, labels_lib.read_labels(labels_csv, class_info_csv), test_dir,
                             radiograph.ConvertOptions(num_shards=3))
    first, *rest = planned.shards
    with pytest.MonkeyPatch.context() as patch:  # a local run killed after its first shard
        patch.setattr(shards, "write_shard", _stopping_after(1, shards.write_shard))
        with pytest.raises(KeyboardInterrupt):
            _convert(with_a_bad_file, output, shards.LocalPool(1, io.StringIO()))
    (output / f"{rest[0].name}.tmp-0123456789abcdef").write_bytes(b"half a shard")
    first_written = (output / first.name).stat().st_mtime_ns

    manifest = _convert(with_a_bad_file, output, beam.BeamPipeline(BEAM_RUNNER))
    assert (output / first.name).stat().st_mtime_ns == first_written  # kept, not rewritten
    assert sorted(os.listdir(output)) == sorted(os.listdir(tmp_path / "reference"))
    for name in os.listdir(output):
        if name != "manifest.json":
            assert (output / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert _without_timing(manifest) == _without_timing(reference)

    # A retried element: the plan file is gone with _partial/ after the manifest, so write it anew.
    retry_dir = tmp_path / "retried"
    (retry_dir / shards.PARTIAL_DIR).mkdir(parents=True)
    plan_path = str(retry_dir / shards.PARTIAL_DIR / shards.PLAN_NAME)
    write_json_atomic(plan_path, {"sha256": "", "plan": plan.plan_json(planned)})
    for _ in range(2):
        beam.write_named_shard(first.name, plan_path, str(retry_dir), radiograph.ConvertOptions(num_shards=3))
    assert sorted(os.listdir(retry_dir)) == sorted([first.name, shards.PARTIAL_DIR])
    assert (retry_dir / first.name).read_bytes() == (output / first.name).read_bytes()


def test_beam_writes_to_and_reads_from_urls(with_a_bad_file, tmp_path):
    """The same conversion with every path a URL (TensorFlow's in-process ram:// filesystem, so an
    in-process runner) gives the same bytes: folders, CSVs, shards and manifest all go through tf.io.gfile."""
    pytest.importorskip("apache_beam")
    from pneumo_tf import fileio

    local = _convert(with_a_bad_file, tmp_path / "local", shards.LocalPool(1))
    url_inputs = []
    for path in with_a_bad_file:
        url = f"ram://inputs/{os.path.basename(path)}"
        if os.path.isdir(path):
            tf.io.gfile.makedirs(url)
            for name in os.listdir(path):
                tf.io.gfile.copy(os.path.join(path, name), f"{url}/{name}")
        else:
            tf.io.gfile.copy(path, url)
        url_inputs.append(url)
    try:
        manifest = _convert(url_inputs, "ram://records",
                            beam.BeamPipeline(f"{BEAM_RUNNER},direct_running_mode=in_memory"))
        assert sorted(fileio.listdir("ram://records")) == sorted(os.listdir(tmp_path / "local"))
        for name in os.listdir(tmp_path / "local"):
            if name.endswith(".tfrecord"):
                with fileio.open_file(f"ram://records/{name}", "rb") as handle:
                    assert handle.read() == (tmp_path / "local" / name).read_bytes(), name
        assert manifest["splits"] == local["splits"] and manifest["rejects"] == local["rejects"] == 1
        assert manifest["options"]["dicom_dir"] == "ram://inputs/train"
    finally:
        for url in ("ram://inputs", "ram://records"):
            fileio.rmtree(url)


def test_beam_options_without_apache_beam_name_the_extra(synthetic_rsna, tmp_path):
    # A package named apache_beam that fails to import stands for Beam not being installed.
    blocker = tmp_path / "no_beam" / "apache_beam"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'apache_beam'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")]))
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pneumo_tf.convert", *synthetic_args(synthetic_rsna, output),
         "--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "needs Apache Beam" in error_lines[0], result.stderr
    assert 'pip install "pneumo_tf[beam]"' in error_lines[0]
    assert not output.exists()


def test_an_unknown_beam_runner_is_refused_before_writing(synthetic_rsna, tmp_path):
    pytest.importorskip("apache_beam")
    with pytest.raises(UserError, match="runner NoSuchRunner cannot start: Unexpected pipeline runner"):
        shards.convert(synthetic_rsna["train_dir"], str(tmp_path / "out"),
                       writer=beam.BeamPipeline("runner=NoSuchRunner"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dir", "image folder not found"),
        ("bad_columns", "lacks column(s) Target"),
        ("other_options", "holds a conversion made with other options (image_size: 0 there, 64 now)"),
        ("bad_size", "--image_size must be"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(case, message, synthetic_rsna, converted, tmp_path):
    output = tmp_path / "out"
    args = synthetic_args(synthetic_rsna, output)
    if case == "missing_dir":
        args[0] = f"--dicom_dir={tmp_path / 'nowhere'}"
    elif case == "bad_columns":
        bad = tmp_path / "labels.csv"
        bad.write_text("patientId,x,y,width,height\nabc,1,2,3,4\n")
        args[1] = f"--labels_csv={bad}"
    elif case == "other_options":
        output = converted[0]
        args = synthetic_args(synthetic_rsna, output, "--image_size=64", "--num_shards=2")
        before = sorted(os.listdir(output))
    else:
        args.append("--image_size=3")
    result = run_cli(*args)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    if case == "other_options":
        assert sorted(os.listdir(output)) == before
    else:
        assert not output.exists()


def test_cli_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "pneumo_tf.convert", "--helpshort"], capture_output=True, text=True)
    for flag in ("dicom_dir", "labels_csv", "class_info_csv", "test_dicom_dir", "output_dir", "val_fraction", "seed",
                 "num_shards", "workers", "image_size", "bit_depth", "beam_pipeline_options"):
        assert f"--{flag}" in result.stdout


def test_labels_with_a_non_numeric_coordinate_are_a_user_error(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("patientId,x,y,width,height,Target\na,1,2,3,4,1\nb,,,,,0\nc,5,six,7,8,1\n")
    with pytest.raises(UserError, match="row 4 has a coordinate that is not a number"):
        labels_lib.read_labels(str(bad))


def _damaged_copies(shared_rsna, folder, rng):
    """Damaged copies of the real DICOMs' JPEG frames, written as DICOMs: {file stem: kind}.

    Kinds: "bytes" (50 random bytes overwritten), "bits" (a few single-bit flips), "truncated"
    (the frame cut short, EOI kept), "marker" (a foreign 0xFF27 marker in the compressed data).
    """
    kinds = {}
    for number, path in enumerate(sorted((shared_rsna / "dicom").glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        for copy in range(8):
            kind = ("bytes", "bits", "truncated", "marker")[copy % 4]
            data = bytearray(frame)
            start = 700  # past the header (~600 bytes): the damage lands in the compressed data
            if kind == "bytes":
                for position in rng.integers(start, len(data) - 2, 50):
                    data[position] = rng.integers(256)
            elif kind == "bits":
                for position in rng.integers(start, len(data) - 2, 3):
                    data[position] ^= 1 << int(rng.integers(8))
            elif kind == "truncated":
                data = data[: int(rng.integers(start, len(data) - 2))] + b"\xff\xd9"
            else:
                position = int(rng.integers(start, len(data) - 2))
                data[position : position + 2] = b"\xff\x27"
            ds.PixelData = pydicom.encaps.encapsulate([bytes(data)])
            stem = f"{number:02d}-{copy}-{kind}"
            ds.save_as(folder / f"{stem}.dcm")
            kinds[stem] = kind
    return kinds


def _tensorflow_decodes(frame: bytes, ratios=(1, 2, 4, 8)) -> list[bool]:
    verdicts = []
    for ratio in ratios:
        try:
            tf.io.decode_jpeg(frame, channels=1, ratio=ratio)
            verdicts.append(True)
        except tf.errors.InvalidArgumentError:
            verdicts.append(False)
    return verdicts


def test_the_jpeg_check_gives_tensorflows_verdict_on_damaged_headers_and_data(shared_rsna):
    """verify_decodes decodes only the headers of a frame whose compressed data is clean (the fast
    path) and the whole frame otherwise: both must agree with TensorFlow at ratio 1 and 8."""
    rng = np.random.default_rng(5)
    fast_path = {"clean": 0, "damaged header": 0}
    disagreements = []
    for path in sorted((shared_rsna / "dicom").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        scan = jpeg._scan_start(frame)
        assert jpeg._clean_scan_start(frame) == scan is not None  # real frames take the fast path
        copies = [("clean", frame)]
        for _ in range(12):  # a few bytes of the tables and headers overwritten (not SOI, not the lengths' walk)
            data = bytearray(frame)
            for position in rng.integers(2, scan, 3):
                data[position] = rng.integers(256)
            copies.append(("damaged header", bytes(data)))
        for _ in range(8):
            data = bytearray(frame)
            for position in rng.integers(scan, len(data) - 2, 20):
                data[position] = rng.integers(256)
            copies.append(("damaged data", bytes(data)))
        for kind, copy in copies:
            try:
                jpeg.verify_decodes(copy)
                verdict = True
            except RejectedFile:
                verdict = False
            if _tensorflow_decodes(copy, ratios=(1, 8)) != [verdict] * 2:
                disagreements.append((path.name, kind))
            if kind in fast_path and jpeg._clean_scan_start(copy) is not None:
                fast_path[kind] += 1
    assert disagreements == []
    # Both paths were exercised: every clean frame, and damaged headers in front of clean data.
    assert fast_path["clean"] == 10 and fast_path["damaged header"] >= 40


def test_damaged_frames_end_as_decodable_records_or_rejects(shared_rsna, tmp_path):
    from pneumo_tf.data import pipeline

    folder = tmp_path / "damaged"
    folder.mkdir()
    kinds = _damaged_copies(shared_rsna, folder, np.random.default_rng(11))
    manifest = shards.convert(str(folder), str(tmp_path / "records"), writer=shards.LocalPool(2))
    assert manifest["records"] + manifest["rejects"] == 80
    with open(tmp_path / "records" / manifest_lib.REJECTS_NAME, newline="") as handle:
        rejects = {os.path.basename(row["file"])[:-4]: row["reason"] for row in csv.DictReader(handle)}
    records = read_records(str(tmp_path / "records"))
    assert len(records) + len(rejects) == len(kinds) == 80 and not set(records) & set(rejects)
    for stem, kind in kinds.items():
        ds = pydicom.dcmread(folder / f"{stem}.dcm")
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        # The converter's verdict is TensorFlow's, at every ratio the pipeline uses.
        assert _tensorflow_decodes(frame) == [stem in records] * 4, stem
        if stem in rejects:
            assert rejects[stem].startswith("JPEG frame does not decode ("), rejects[stem]
        if kind == "marker":
            assert stem in rejects and "marker 0xFF27 inside the compressed data" in rejects[stem]
    # Damage libjpeg resynchronises past stays a record; 50 overwritten bytes usually do not.
    assert sum(kinds[stem] == "bits" for stem in records) >= 15
    assert sum(kinds[stem] == "truncated" for stem in records) == 20
    assert sum(kinds[stem] == "bytes" for stem in rejects) >= 5
    # Every stored record goes through a whole pass of the pipeline at each decode ratio.
    for image_size in (1024, 512, 256, 128):
        dataset = pipeline.make_dataset(str(tmp_path / "records"), "test", 8, image_size, training=False)
        assert sum(int(batch["image"].shape[0]) for batch in dataset) == len(records)


def test_hard_synthetic_setting_keeps_the_labels_and_changes_only_the_pictures(tmp_path):
    easy = synthetic.write_dataset(str(tmp_path / "easy"), synthetic.SyntheticConfig(40, seed=5, image_size=128),
                                   workers=1)
    hard = synthetic.write_dataset(str(tmp_path / "hard"), synthetic.SyntheticConfig(
        40, seed=5, image_size=128, difficulty="hard"), workers=1)
    for key in ("train_labels", "detailed_class_info"):
        assert open(easy[key]).read() == open(hard[key]).read()
    labels = labels_lib.read_labels(easy["train_labels"], easy["detailed_class_info"])
    lifted, nodules = [], 0
    for image_id, entry in labels.items():
        pixels = {name: pydicom.dcmread(os.path.join(paths["train_dir"], f"{image_id}.dcm")).pixel_array.astype(float)
                  for name, paths in (("easy", easy), ("hard", hard))}
        for x, y, w, h in (tuple(int(v) for v in box) for box in entry.boxes):
            inside = (slice(y + h // 4, y + 3 * h // 4), slice(x + w // 4, x + 3 * w // 4))
            lifted.append((pixels["easy"][inside] - pixels["hard"][inside]).mean())
        # Unlabelled nodules: bright, sharp-edged discs only in the hard pictures without boxes.
        if not entry.boxes:
            nodules += int((pixels["hard"] - pixels["easy"] > 40).sum() > 20)
    # Opacities lose at least the 70 - 24 grey levels of contrast (more where they are patchy).
    assert len(lifted) >= 8 and min(lifted) > 25
    assert 5 <= nodules <= sum(not entry.boxes for entry in labels.values()) - 5
    # The faint setting is the hard one with opacities of 16 grey levels instead of 24: the same labels,
    # the same pictures where there is no opacity (nodules included), fainter ones where there is.
    faint = synthetic.write_dataset(str(tmp_path / "faint"), synthetic.SyntheticConfig(
        40, seed=5, image_size=128, difficulty="faint"), workers=1)
    assert open(faint["train_labels"]).read() == open(hard["train_labels"]).read()
    dimmed = []
    for image_id, entry in labels.items():
        pixels = {name: pydicom.dcmread(os.path.join(paths["train_dir"], f"{image_id}.dcm")).pixel_array.astype(float)
                  for name, paths in (("hard", hard), ("faint", faint))}
        if not entry.boxes:
            np.testing.assert_array_equal(pixels["faint"], pixels["hard"])
        for x, y, w, h in (tuple(int(v) for v in box) for box in entry.boxes):
            inside = (slice(y + h // 4, y + 3 * h // 4), slice(x + w // 4, x + 3 * w // 4))
            dimmed.append((pixels["hard"][inside] - pixels["faint"][inside]).mean())
    assert len(dimmed) == len(lifted) and 2 < min(dimmed) and max(dimmed) < 8 * 1.1 + 1  # the film's gain: 0.9-1.1


def test_lookalike_setting_adds_unlabelled_opacities_to_the_not_normal_pictures_only(tmp_path):
    hard = synthetic.write_dataset(str(tmp_path / "hard"), synthetic.SyntheticConfig(
        40, seed=5, image_size=128, difficulty="hard"), workers=1)
    lookalike = synthetic.write_dataset(str(tmp_path / "lookalike"), synthetic.SyntheticConfig(
        40, seed=5, image_size=128, difficulty="lookalike"), workers=1)
    for key in ("train_labels", "detailed_class_info"):
        assert open(lookalike[key]).read() == open(hard[key]).read()
    labels = labels_lib.read_labels(hard["train_labels"], hard["detailed_class_info"])
    not_normal = 0
    for image_id, entry in labels.items():
        pixels = {name: pydicom.dcmread(os.path.join(paths["train_dir"], f"{image_id}.dcm")).pixel_array.astype(float)
                  for name, paths in (("hard", hard), ("lookalike", lookalike))}
        if entry.label_class != schema.NOT_NORMAL:
            np.testing.assert_array_equal(pixels["lookalike"], pixels["hard"])
            continue
        # The same picture plus opacities of the hard setting's 24 grey levels (times the film's gain
        # of 0.9-1.1, patchy down to 20%; a third box may overlap the first) inside the lung fields'
        # rows; the rest differs by JPEG's rounding only.
        not_normal += 1
        added = pixels["lookalike"] - pixels["hard"]
        rows = np.nonzero((added > 8).sum(axis=1) > 3)[0]
        assert (added > 8).sum() > 100 and added.max() < 2 * 24 * 1.1 + 6
        assert 0.05 * 128 <= rows.min() and rows.max() <= 0.95 * 128
        assert np.abs(added[added <= 8]).mean() < 3
    assert not_normal == sum(entry.label_class == schema.NOT_NORMAL for entry in labels.values()) >= 8


def test_shards_and_their_folder_reach_the_disk_around_the_rename(synthetic_rsna, tmp_path, monkeypatch):
    """A power loss after the rename must find the shard whole under its name: the shard's bytes are
    synced before it is renamed, the folder (the name) after."""
    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(source, destination):
        events.append(("replace", os.fspath(source), os.fspath(destination)))
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    output = tmp_path / "records"
    shards.convert(synthetic_rsna["test_dir"], str(output), options=radiograph.ConvertOptions(num_shards=2),
                   writer=shards.LocalPool(1, io.StringIO()))
    names = sorted(name for name in os.listdir(output) if name.endswith(".tfrecord"))
    assert len(names) == 2
    for name in names:
        [renamed] = [i for i, event in enumerate(events) if event[0] == "replace" and event[2] == str(output / name)]
        assert ("fsync", events[renamed][1]) in events[:renamed]
        assert ("fsync", str(output)) in events[renamed + 1:]
    # The manifest, like every JSON file, is written to a synced temporary file, then renamed.
    [manifest] = [i for i, event in enumerate(events) if event[0] == "replace" and event[2].endswith("manifest.json")]
    assert ("fsync", events[manifest][1]) in events[:manifest] and ("fsync", str(output)) in events[manifest + 1:]


@pytest.mark.parametrize("change", ["remove_a_file", "edit_a_label"])
def test_a_resume_with_changed_inputs_is_refused_or_starts_over(change, synthetic_rsna, tmp_path):
    """Killed after its first shard, rerun after a file was removed or a label edited: resuming would keep the old
    first shard beside shards of the new plan (ids in two splits, twice, or in none). It is refused; --start_over
    converts again, to what a fresh conversion gives."""
    train_dir = shutil.copytree(synthetic_rsna["train_dir"], tmp_path / "train")
    labels = tmp_path / "labels.csv"
    shutil.copy(synthetic_rsna["train_labels"], labels)
    inputs = (str(train_dir), str(labels), synthetic_rsna["detailed_class_info"], synthetic_rsna["test_dir"])
    output = tmp_path / "records"

    def local():
        return shards.LocalPool(1, io.StringIO())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shards, "write_shard", _stopping_after(1, shards.write_shard))
        with pytest.raises(KeyboardInterrupt):
            _convert(inputs, output, local())
    assert len(list(output.glob("*.tfrecord"))) == 1
    if change == "remove_a_file":
        gone = sorted(train_dir.iterdir())[-1]
        gone.unlink()
        changed = f"1 file(s) gone (e.g. {gone})"
    else:
        rows = pd.read_csv(labels, dtype={"patientId": str})
        negative = rows[rows["Target"] == 0]["patientId"].iloc[0]
        rows.loc[rows["patientId"] == negative, ["x", "y", "width", "height", "Target"]] = [100, 100, 50, 50, 1]
        rows.to_csv(labels, index=False)
        changed = "file(s) with other labels, metadata or shard (e.g. "
    with pytest.raises(UserError) as refused:
        _convert(inputs, output, local())
    assert str(refused.value).startswith(f"{output} holds an unfinished conversion of other inputs (")
    assert changed in str(refused.value)
    assert str(refused.value).endswith("its finished shards would mix with shards of the new plan: rerun with "
                                       "--start_over to discard it and convert again, or use another --output_dir")
    fresh = _convert(inputs, tmp_path / "fresh", local())
    started_over = _convert(inputs, output, local(), start_over=True)
    assert _without_timing(started_over) == _without_timing(fresh)
    assert sorted(os.listdir(output)) == sorted(os.listdir(tmp_path / "fresh"))
    for name in os.listdir(output):
        assert (output / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes() or name == "manifest.json"
    # A finished folder is not a different conversion's either, whatever changes next.
    (train_dir / sorted(os.listdir(train_dir))[0]).unlink()
    with pytest.raises(UserError, match="holds a conversion of other inputs \\(files added, removed or relabelled "
                                        "since\\): rerun with --start_over"):
        _convert(inputs, output, local())


# Run at start-up by every interpreter of the converter (sitecustomize), its workers too: reading a file named
# poison* kills the process, as the kernel's out-of-memory killer would.
KILLING_FILE_HOOK = """
import os, signal, pydicom
_dcmread = pydicom.dcmread
def dcmread(source, *args, **kwargs):
    if os.path.basename(str(source)).startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _dcmread(source, *args, **kwargs)
pydicom.dcmread = dcmread
"""


@pytest.mark.slow
def test_a_file_that_kills_its_worker_is_rejected_and_the_run_goes_on(synthetic_rsna, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLING_FILE_HOOK)
    folder = shutil.copytree(synthetic_rsna["test_dir"], tmp_path / "images")
    readable = sorted(os.listdir(folder))
    shutil.copy(folder / readable[0], folder / "poison.dcm")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pneumo_tf.convert", f"--dicom_dir={folder}",
                             f"--output_dir={tmp_path / 'records'}", "--workers=2", "--num_shards=2"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "records" / "rejects.csv") as handle:
        assert [(os.path.basename(row["file"]), row["reason"]) for row in csv.DictReader(handle)] == [
            ("poison.dcm", "converting it ended the converter's process (killed by SIGKILL: out of memory, or a "
                           "decoder crashed)")]
    records = read_records(str(tmp_path / "records"))
    assert sorted(records) == sorted(name.removesuffix(".dcm") for name in readable)
