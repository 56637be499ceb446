"""The input pipeline on a tiny hand-made records folder: exact pixels, boxes, counts and sharding."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf.data import pipeline
from pneumo_tf.errors import UserError
from pneumo_tf.fileio import write_json_atomic
from pneumo_tf.records import manifest as manifest_lib, masks, schema
from pneumo_tf.records.boxes import MAX_BOXES, rasterize
from pneumo_tf.records.manifest import FORMAT_VERSION, MANIFEST_NAME

SIZE = 64
TRAIN_IDS = [f"p{index:02d}" for index in range(12)]
TEST_IDS = ["t0", "t1"]
JPEG_IDS = {"p00", "p01", "p02", "p03"}
# Box corners are multiples of 1/8, so masks stay exact at 64, 32 and 16 pixels.
BOXES = {
    "p00": ((0.125, 0.25, 0.5, 0.75), (0.5, 0.125, 0.875, 0.375)),
    # More boxes than a batch holds: the pipeline keeps the first MAX_BOXES.
    "p06": tuple((0.125 * (k % 4), 0.125 * (k // 4), 0.125 * (k % 4) + 0.125, 0.125 * (k // 4) + 0.25)
                 for k in range(MAX_BOXES + 1)),
}
KEYS = {"image", "mask", "boxes", "num_boxes", "target", "class", "id", "source_height", "source_width", "view", "sex",
        "age"}


def _pixels(image_id: str, jpeg: bool, bit_depth: int) -> np.ndarray:
    """A known [64, 64, 1] image: noise for PNG; for JPEG, 16-pixel blocks with a gentle ramp.

    The ramp survives quality 100 within a grey level, yet makes a ratio-4 decode
    differ from a full decode plus area resize, so the tests can tell the paths apart.
    """
    rng = np.random.default_rng(int.from_bytes(image_id.encode(), "little"))
    if jpeg:
        blocks = rng.integers(20, 200, size=(SIZE // 16, SIZE // 16))
        ramp = 2 * (np.arange(SIZE) % 16)
        return (np.kron(blocks, np.ones((16, 16))) + ramp)[..., None].astype(np.uint8)
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    return rng.integers(0, np.iinfo(dtype).max + 1, size=(SIZE, SIZE, 1)).astype(dtype)


def _record(image_id: str, labeled: bool, bit_depth: int) -> tuple[schema.Record, np.ndarray]:
    jpeg = image_id in JPEG_IDS
    pixels = _pixels(image_id, jpeg, bit_depth)
    encoded = tf.io.encode_jpeg(pixels, quality=100) if jpeg else tf.io.encode_png(pixels)
    boxes = BOXES.get(image_id, ())
    mask_encoded, mask_row_repeats, mask_col_repeats = masks.encode(boxes, SIZE, SIZE)
    record = schema.Record(
        image_id=image_id,
        image_encoded=encoded.numpy(),
        image_format=schema.JPEG if jpeg else schema.PNG,
        height=SIZE,
        width=SIZE,
        source_height=SIZE,
        source_width=SIZE,
        mask_encoded=mask_encoded,
        mask_row_repeats=mask_row_repeats,
        mask_col_repeats=mask_col_repeats,
        target=int(bool(boxes)) if labeled else schema.UNLABELED,
        label_class=(2 if boxes else 0) if labeled else schema.UNLABELED,
        boxes=boxes,
    )
    return record, pixels


def _write_split(records_dir: str, split: str, records: list[schema.Record], num_shards: int) -> dict:
    shards = []
    for shard, chunk in enumerate(np.array_split(np.arange(len(records)), num_shards)):
        name = f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"
        path = os.path.join(records_dir, name)
        with tf.io.TFRecordWriter(path) as writer:
            for index in chunk:
                writer.write(schema.serialize_example(records[index]))
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        shards.append({"name": name, "records": len(chunk), "bytes": os.path.getsize(path), "sha256": digest})
    return {
        "records": len(records),
        "positive": sum(record.target == 1 for record in records),
        "boxes": sum(len(record.boxes) for record in records),
        "shards": shards,
    }


def write_records_folder(records_dir: str, num_shards: int = 3, bit_depth: int = 8) -> dict[str, np.ndarray]:
    """A records folder with 12 labeled train images (2 positive) and 2 unlabeled test images; returns pixels by id."""
    os.makedirs(records_dir)
    train = [_record(image_id, True, bit_depth) for image_id in TRAIN_IDS]
    test = [_record(image_id, False, bit_depth) for image_id in TEST_IDS]
    manifest = {
        "format_version": FORMAT_VERSION,
        "options": {"image_size": 0, "bit_depth": bit_depth},
        "splits": {
            "train": _write_split(records_dir, "train", [record for record, _ in train], num_shards),
            "test": _write_split(records_dir, "test", [record for record, _ in test], 1),
        },
    }
    write_json_atomic(os.path.join(records_dir, MANIFEST_NAME), manifest)
    return {record.image_id: pixels for record, pixels in train + test}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    records_dir = str(tmp_path_factory.mktemp("records") / "rsna")
    return records_dir, write_records_folder(records_dir)


def collect(dataset) -> dict[str, np.ndarray]:
    """Every batch of a finite dataset, concatenated per key."""
    batches = list(dataset.as_numpy_iterator())
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def by_id(epoch: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    return {image_id.decode(): {key: value[i] for key, value in epoch.items()}
            for i, image_id in enumerate(epoch["id"])}


@pytest.fixture(scope="module")
def native_epoch(folder):
    # Batch 5 over 12 records also exercises a partial last batch.
    return collect(pipeline.make_dataset(folder[0], "train", 5, SIZE, training=False))


@pytest.mark.parametrize(
    ("source_size", "image_size", "ratio"),
    [(64, 16, 4), (1024, 256, 4), (1024, 512, 2), (1024, 100, 8), (1024, 1024, 1), (1024, 300, 2), (200, 512, 1)],
)
def test_jpeg_ratio_is_the_largest_that_keeps_image_size(source_size, image_size, ratio):
    assert pipeline.JPEG_RATIOS[int(pipeline.jpeg_ratio_index(source_size, image_size))] == ratio


def test_batches_have_the_documented_keys_dtypes_and_static_shapes(folder):
    training = pipeline.make_dataset(folder[0], "train", 4, 32, training=True, seed=0)
    evaluation = pipeline.make_dataset(folder[0], "train", 4, 32, training=False)
    for dataset, batch in ((training, 4), (evaluation, None)):
        spec = dataset.element_spec
        assert set(spec) == KEYS
        assert spec["image"].shape.as_list() == [batch, 32, 32, 1] and spec["image"].dtype == tf.float32
        assert spec["mask"].shape.as_list() == [batch, 32, 32, 1] and spec["mask"].dtype == tf.float32
        assert spec["boxes"].shape.as_list() == [batch, MAX_BOXES, 4] and spec["boxes"].dtype == tf.float32
        for key in ("num_boxes", "target", "class"):
            assert spec[key].shape.as_list() == [batch] and spec[key].dtype == tf.int32
        for key in ("id", "view", "sex"):
            assert spec[key].shape.as_list() == [batch] and spec[key].dtype == tf.string
        assert spec["age"].shape.as_list() == [batch] and spec["age"].dtype == tf.int32
    # Training repeats: 5 batches of 4 is more than the 12 records.
    assert sum(batch["id"].shape[0] for batch in training.take(5)) == 20


def test_eval_reads_every_id_once_in_a_deterministic_order(folder, native_epoch):
    again = collect(pipeline.make_dataset(folder[0], "train", 5, SIZE, training=False))
    assert sorted(native_epoch["id"].astype(str)) == TRAIN_IDS
    assert list(again["id"]) == list(native_epoch["id"])


def test_png_pixels_and_masks_are_exact_at_native_size(folder, native_epoch):
    pixels = folder[1]
    for image_id, example in by_id(native_epoch).items():
        expected_mask = rasterize(BOXES.get(image_id, ()), SIZE, SIZE)[..., None].astype(np.float32)
        np.testing.assert_array_equal(example["mask"], expected_mask)
        if image_id not in JPEG_IDS:
            np.testing.assert_array_equal(example["image"], pixels[image_id].astype(np.float32) / 255.0)


def test_jpeg_pixels_are_close_at_native_size(folder, native_epoch):
    for image_id, example in by_id(native_epoch).items():
        if image_id in JPEG_IDS:
            expected = folder[1][image_id].astype(np.float32) / 255.0
            np.testing.assert_allclose(example["image"], expected, atol=2 / 255)


def test_jpeg_decodes_at_ratio_4_for_a_quarter_size(folder):
    epoch = by_id(collect(pipeline.make_dataset(folder[0], "train", 6, 16, training=False)))
    for image_id in JPEG_IDS:
        encoded = tf.io.encode_jpeg(folder[1][image_id], quality=100)
        at_ratio_4 = tf.io.decode_jpeg(encoded, channels=1, ratio=4).numpy().astype(np.float32) / 255.0
        full_then_area = tf.image.resize(
            tf.io.decode_jpeg(encoded, channels=1).numpy().astype(np.float32) / 255.0, [16, 16], "area"
        ).numpy()
        assert np.abs(full_then_area - at_ratio_4).max() > 0.5 / 255  # the two paths are distinguishable
        np.testing.assert_allclose(epoch[image_id]["image"], at_ratio_4, atol=1e-6)
        block_means = folder[1][image_id].astype(np.float64).reshape(16, 4, 16, 4).mean(axis=(1, 3))[..., None]
        np.testing.assert_allclose(epoch[image_id]["image"], block_means / 255.0, atol=2 / 255)


def test_resize_averages_png_pixels_and_keeps_masks_binary(folder):
    epoch = by_id(collect(pipeline.make_dataset(folder[0], "train", 12, 32, training=False)))
    for image_id, example in epoch.items():
        np.testing.assert_array_equal(
            example["mask"], rasterize(BOXES.get(image_id, ()), 32, 32)[..., None].astype(np.float32)
        )
        if image_id not in JPEG_IDS:
            pixels = folder[1][image_id].astype(np.float64) / 255.0
            block_means = pixels.reshape(32, 2, 32, 2).mean(axis=(1, 3))[..., None]
            np.testing.assert_allclose(example["image"], block_means, atol=1e-6)


def _half_covered_reference(mask: np.ndarray, size: int) -> np.ndarray:
    """Pixels of a size x size resize of the full mask with at least half their area in it.

    In units of 1 / size stored pixel, stored pixel y spans [y size, (y + 1) size) and
    output pixel i spans [i H, (i + 1) H), so every overlap, and every covered area, is
    a whole number (float64 holds these exactly).
    """
    height, width = mask.shape

    def overlaps(length):
        stored, output = np.arange(length) * size, np.arange(size) * length
        ends = np.minimum(output[:, None] + length, stored[None, :] + size)
        return np.clip(ends - np.maximum(output[:, None], stored[None, :]), 0, None).astype(np.float64)

    covered = overlaps(height) @ mask.astype(np.float64) @ overlaps(width).T
    return (2 * covered >= height * width).astype(np.float32)[..., None]


# (stored height, stored width, output size): whole and fractional scales, down and up, square
# and not. Box edges on whole and half output pixels leave output pixels exactly half covered
# (416 at 1024 -> 256, 281 at 1000 x 800 -> 300): they are in.
MASK_CASES = [(1024, 1024, 256), (64, 64, 64), (64, 64, 32), (64, 64, 24), (60, 90, 32), (37, 50, 64),
              (1000, 800, 300)]


@pytest.mark.parametrize(("height", "width", "size"), MASK_CASES)
def test_decode_mask_keeps_the_pixels_at_least_half_covered(height, width, size):
    rng = np.random.default_rng(height * width + size)
    corners = np.sort(rng.integers(0, 2 * size + 1, size=(4, 2, 2)), axis=-1) / (2 * size)
    boxes = [(x[0], y[0], x[1], y[1]) for x, y in corners] + [(0.2, 0.3, 0.45, 0.7)]
    full = rasterize(boxes, height, width)
    expected = _half_covered_reference(full, size)
    encoded, row_repeats, col_repeats = masks.encode(boxes, height, width)
    eager = pipeline.decode_mask(encoded, tf.constant(row_repeats, tf.int64), tf.constant(col_repeats, tf.int64), size)
    np.testing.assert_array_equal(eager, expected)
    # In graph mode inside tf.data, from a record parsed as the pipeline parses it.
    record = schema.Record("m", b"", schema.PNG, height, width, height, width, encoded, row_repeats, col_repeats)
    parsed = tf.data.Dataset.from_tensors([schema.serialize_example(record)]).map(pipeline.parse_batch).unbatch()
    decoded = parsed.map(lambda f: pipeline.decode_mask(f["mask_encoded"], f["mask_row_repeats"],
                                                        f["mask_col_repeats"], size))
    np.testing.assert_array_equal(next(iter(decoded)), expected)
    if size == height == width:
        np.testing.assert_array_equal(eager[..., 0], full)
    if height % size == 0 and width % size == 0:
        # What the pipeline computed before (area resize of the full PNG, threshold): at a
        # whole-number scale TensorFlow's float sums are exact, so even ties agree.
        area = tf.image.resize(full[..., None].astype(np.float32), [size, size], "area")
        np.testing.assert_array_equal(eager, tf.cast(area >= 0.5, tf.float32))


def test_decode_mask_by_hand():
    # A 4 x 6 mask with its top row and left column set, to 2 x 2: the top-left output pixel is
    # 4 of 6 stored pixels covered, the top-right 3 of 6 (exactly half: in), the bottom-left
    # 2 of 6 (out), the bottom-right none.
    mask = np.zeros((4, 6), bool)
    mask[0, :] = mask[:, 0] = True
    collapsed, row_repeats, col_repeats = masks.collapse(mask)
    assert collapsed.tolist() == [[True, True], [True, False]] and row_repeats == (1, 3) and col_repeats == (1, 5)
    decoded = pipeline.decode_mask(masks.png_1bit(collapsed), tf.constant(row_repeats, tf.int64),
                                   tf.constant(col_repeats, tf.int64), 2)
    assert decoded[..., 0].numpy().tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_boxes_are_reordered_zero_padded_and_truncated(native_epoch):
    epoch = by_id(native_epoch)
    for image_id, example in epoch.items():
        stored = BOXES.get(image_id, ())[:MAX_BOXES]
        expected = np.zeros((MAX_BOXES, 4), np.float32)
        for row, (xmin, ymin, xmax, ymax) in enumerate(stored):
            expected[row] = (ymin, xmin, ymax, xmax)
        np.testing.assert_array_equal(example["boxes"], expected)
        assert example["num_boxes"] == len(stored)
        assert example["target"] == int(bool(stored)) and example["class"] == (2 if stored else 0)
    assert epoch["p06"]["num_boxes"] == MAX_BOXES


def test_unlabeled_images_keep_minus_one(folder):
    epoch = by_id(collect(pipeline.make_dataset(folder[0], "test", 2, SIZE, training=False)))
    assert sorted(epoch) == TEST_IDS
    for example in epoch.values():
        assert example["target"] == -1 and example["class"] == -1 and example["num_boxes"] == 0
        assert not example["mask"].any()


def test_16_bit_png_is_scaled_by_65535(tmp_path):
    records_dir = str(tmp_path / "rsna16")
    pixels = write_records_folder(records_dir, num_shards=1, bit_depth=16)
    epoch = by_id(collect(pipeline.make_dataset(records_dir, "train", 12, SIZE, training=False)))
    for image_id, example in epoch.items():
        if image_id not in JPEG_IDS:
            assert pixels[image_id].dtype == np.uint16 and pixels[image_id].max() > 255
            np.testing.assert_array_equal(example["image"], pixels[image_id].astype(np.float32) / 65535.0)


def test_positive_fraction_balances_a_skewed_split(folder):
    dataset = pipeline.make_dataset(folder[0], "train", 20, 16, training=True, positive_fraction=0.5, seed=1)
    targets = np.concatenate([batch["target"] for batch in dataset.take(20).as_numpy_iterator()])
    assert targets.size == 400
    # 2 of 12 records are positive; balanced sampling makes it about half (4 sigma is 0.1).
    assert abs(targets.mean() - 0.5) < 0.1


def test_cache_gives_the_same_eval_batches(folder):
    uncached = list(pipeline.make_dataset(folder[0], "train", 5, 32, training=False).as_numpy_iterator())
    cached = list(pipeline.make_dataset(folder[0], "train", 5, 32, training=False, cache=True).as_numpy_iterator())
    assert len(cached) == len(uncached) == 3
    for cached_batch, uncached_batch in zip(cached, uncached):
        assert set(cached_batch) == KEYS
        for key in KEYS:
            np.testing.assert_array_equal(cached_batch[key], uncached_batch[key])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("num_shards", [3, 1], ids=["shards_per_pipeline", "records_per_pipeline"])
def test_input_pipelines_read_disjoint_shares(tmp_path, num_shards, training):
    records_dir = str(tmp_path / "rsna")
    write_records_folder(records_dir, num_shards=num_shards)
    shares = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=2)
        # Unseeded training shuffles differently in each pipeline; the shares must not depend on it.
        dataset = pipeline.make_dataset(records_dir, "train", 4, 16, training=training, input_context=context,
                                        repeat=False, drop_remainder=False)
        epoch = collect(dataset)
        shares.append(set(epoch["id"].astype(str)))
    assert not shares[0] & shares[1]
    assert sorted(shares[0] | shares[1]) == TRAIN_IDS


def test_input_context_batches_at_the_per_replica_size(folder):
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2)
    dataset = pipeline.make_dataset(folder[0], "train", 8, 16, training=True, input_context=context, seed=0)
    assert dataset.element_spec["image"].shape.as_list() == [4, 16, 16, 1]


def test_distributed_dataset_feeds_a_strategy(folder):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    dataset = pipeline.distributed_dataset(strategy, folder[0], "train", 4, 16, training=True, seed=0)
    batch = next(iter(dataset))
    assert batch["image"].shape == (4, 16, 16, 1) and set(batch) == KEYS
    mapped = pipeline.distributed_dataset(
        strategy, folder[0], "train", 4, 16, training=True, seed=0, map_fn=lambda b: (b["image"], b["target"])
    )
    image, target = next(iter(mapped))
    assert image.shape == (4, 16, 16, 1) and target.shape == (4,)


def test_num_examples_comes_from_the_manifest(folder):
    assert pipeline.num_examples(folder[0], "train") == 12
    assert pipeline.num_examples(folder[0], "test") == 2


def test_user_mistakes_raise_user_errors(folder, tmp_path):
    with pytest.raises(UserError, match="not found"):
        pipeline.make_dataset(str(tmp_path / "missing"), "train", 4, 16, training=False)
    with pytest.raises(UserError, match="split 'val'"):
        pipeline.make_dataset(folder[0], "val", 4, 16, training=False)
    with pytest.raises(UserError, match="split 'val'"):
        pipeline.num_examples(folder[0], "val")
    with pytest.raises(UserError, match="positive and negative"):
        pipeline.make_dataset(folder[0], "test", 4, 16, training=True, positive_fraction=0.5)
    with pytest.raises(UserError, match="training"):
        pipeline.make_dataset(folder[0], "train", 4, 16, training=False, positive_fraction=0.5)


@pytest.mark.parametrize(("manifest", "message"), [
    ({"format_version": 1, "splits": {}},
     f"holds records of format version 1, but this pneumo_tf reads version {FORMAT_VERSION}: reconvert the images "
     "into a new folder"),
    ({"splits": {}}, "is not a pneumo_tf records manifest"),
    ([1, 2], "is not a pneumo_tf records manifest"),
])
def test_records_of_another_format_are_refused_with_what_to_do(tmp_path, manifest, message):
    write_json_atomic(str(tmp_path / MANIFEST_NAME), manifest)
    with pytest.raises(UserError, match=message):
        pipeline.make_dataset(str(tmp_path), "train", 4, 16, training=False)


def test_a_shard_missing_from_disk_is_a_user_error(tmp_path):
    records_dir = str(tmp_path / "rsna")
    write_records_folder(records_dir, num_shards=1)
    os.remove(os.path.join(records_dir, "train-00000-of-00001.tfrecord"))
    with pytest.raises(UserError, match="reconvert"):
        pipeline.make_dataset(records_dir, "train", 4, 16, training=False)


def _damaged_jpeg(image_id: str) -> bytes:
    """A JPEG with a foreign marker in its compressed data: libjpeg stops with a fatal error."""
    data = bytearray(tf.io.encode_jpeg(_pixels(image_id, True, 8), quality=100).numpy())
    data[len(data) // 2 : len(data) // 2 + 2] = b"\xff\x27"
    return bytes(data)


def test_an_undecodable_record_is_named_not_a_bare_op_error(tmp_path):
    records_dir = str(tmp_path / "rsna")
    write_records_folder(records_dir, num_shards=2)
    # Rewrite the train split with p02's frame damaged, as an older converter could have stored it.
    records = [_record(image_id, True, 8)[0] for image_id in TRAIN_IDS]
    records[2] = dataclasses.replace(records[2], image_encoded=_damaged_jpeg("p02"))
    _write_split(records_dir, "train", records, 2)
    with pytest.raises(tf.errors.InvalidArgumentError):  # what a bare pass says
        collect(pipeline.make_dataset(records_dir, "train", 4, SIZE, training=False))
    with pytest.raises(UserError) as raised:
        with pipeline.naming_bad_records(records_dir, ("train",), SIZE):
            collect(pipeline.make_dataset(records_dir, "train", 4, SIZE, training=False))
    message = str(raised.value)
    assert message.startswith(f"1 record(s) of {records_dir} cannot be decoded: id p02 (record 2 of ")
    assert "train-00000-of-00002.tfrecord" in message and "Reconvert" in message
    assert pipeline.unreadable_records(records_dir, "train", SIZE)[0][:3] == (
        os.path.join(records_dir, "train-00000-of-00002.tfrecord"), 2, "p02")


def test_a_damaged_shard_is_named(tmp_path):
    records_dir = str(tmp_path / "rsna")
    write_records_folder(records_dir, num_shards=1)
    path = os.path.join(records_dir, "train-00000-of-00001.tfrecord")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # a disk error: the record's CRC no longer matches
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match=r"cannot be decoded: id \? \(record \d+ of .*train-00000-of-00001"):
        with pipeline.naming_bad_records(records_dir, ("train",), SIZE):
            collect(pipeline.make_dataset(records_dir, "train", 4, SIZE, training=False))


def test_other_errors_pass_through_unchanged(folder):
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a record problem"):
        with pipeline.naming_bad_records(folder[0], ("train",), SIZE):
            raise tf.errors.InvalidArgumentError(None, None, "not a record problem")


def _record_ends(data: bytes) -> list[int]:
    """Byte offsets where each record of a TFRecord file ends (8-byte length, 4-byte CRC, data, 4-byte CRC)."""
    ends, offset = [], 0
    while offset < len(data):
        offset += 12 + int.from_bytes(data[offset:offset + 8], "little") + 4
        ends.append(offset)
    return ends


def test_a_shard_cut_short_or_damaged_is_named(tiny_records, tmp_path):
    records = shutil.copytree(tiny_records, tmp_path / "records")
    manifest = json.loads((records / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    path = records / shard["name"]
    whole = path.read_bytes()
    ends = _record_ends(whole)
    assert len(ends) == shard["records"] > 2 and ends[-1] == len(whole) == shard["bytes"]
    # Cut at a record boundary, as a crash after a partial write leaves it: it would read as fewer records.
    path.write_bytes(whole[:ends[1]])
    assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == 2
    with pytest.raises(UserError, match=re.escape(f"{path} has {ends[1]} bytes but the manifest records "
                                                  f"{shard['bytes']}: it was cut short or damaged")):
        pipeline.make_dataset(str(records), "train", 4, 64, training=False)
    # Same size, one byte changed: only the full check finds it.
    path.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))
    pipeline.make_dataset(str(records), "val", 4, 64, training=False)
    manifest_lib.verify_shards(str(records), ["val", "test"])
    with pytest.raises(UserError, match=re.escape(f"{path} does not match its manifest's SHA-256")):
        manifest_lib.verify_shards(str(records), ["train"])
