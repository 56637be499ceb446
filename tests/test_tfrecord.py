"""Records written without TensorFlow are byte for byte what TensorFlow writes."""
import numpy as np
import tensorflow as tf

from pneumo_tf.records import schema
from pneumo_tf.records.tfrecord import TFRecordWriter


def tensorflow_serialised(record: schema.Record) -> bytes:
    def feature(kind, values):
        if kind == "bytes":
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        if kind == "float":
            return tf.train.Feature(float_list=tf.train.FloatList(value=values))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    features = {
        schema.IMAGE_ENCODED: feature("bytes", [record.image_encoded]),
        schema.IMAGE_FORMAT: feature("bytes", [record.image_format.encode()]),
        schema.IMAGE_HEIGHT: feature("int64", [record.height]),
        schema.IMAGE_WIDTH: feature("int64", [record.width]),
        schema.SOURCE_HEIGHT: feature("int64", [record.source_height]),
        schema.SOURCE_WIDTH: feature("int64", [record.source_width]),
        schema.IMAGE_ID: feature("bytes", [record.image_id.encode()]),
        schema.VIEW: feature("bytes", [record.view.encode()]),
        schema.AGE: feature("int64", [record.age]),
        schema.SEX: feature("bytes", [record.sex.encode()]),
        schema.PIXEL_SPACING: feature("float", list(record.pixel_spacing)),
        schema.TARGET: feature("int64", [record.target]),
        schema.CLASS: feature("int64", [record.label_class]),
        schema.MASK_ENCODED: feature("bytes", [record.mask_encoded]),
        schema.MASK_ROW_REPEATS: feature("int64", list(record.mask_row_repeats)),
        schema.MASK_COL_REPEATS: feature("int64", list(record.mask_col_repeats)),
    }
    for index, key in enumerate(schema.BOX_KEYS):
        features[key] = feature("float", [box[index] for box in record.boxes])
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


RECORDS = [
    schema.Record("00436515-870c-4b36-a041-de91049b9ab4", bytes(range(256)) * 700, "jpeg", 1024, 1024, 1024, 1024,
                  b"\x89PNG mask", (256, 51, 369, 41, 307), (205, 256, 102, 256, 205), target=1, label_class=2,
                  boxes=((0.1, 0.2, 0.3, 0.45), (0.6, 0.25, 0.9, 0.8)), view="AP", age=32, sex="F",
                  pixel_spacing=(0.139, 0.139)),
    schema.Record("unlabeled", b"", "png", 64, 48, 3000, 2500, b"", (), (), view="", age=-1, sex="",
                  pixel_spacing=(0.0, 0.0)),  # -1s are 10-byte varints; empty lists and strings
    schema.Record("ünïcode id", b"\x00" * 130, "png", 300, 200, 2**31, 2**40, b"m", (300,), (2**40,), target=0,
                  label_class=0, boxes=((1e-8, 0.0, 1.0, 1.0),), age=150, sex="O", pixel_spacing=(3.4e38, 1e-30)),
]


def test_examples_equal_tensorflows_deterministic_serialisation():
    for record in RECORDS:
        assert schema.serialize_example(record) == tensorflow_serialised(record)


def test_files_equal_tensorflows_tfrecord_writer_and_read_back(tmp_path):
    payloads = [schema.serialize_example(r) for r in RECORDS] + [b"", b"x" * 100_000]
    ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "theirs.tfrecord"
    with TFRecordWriter(str(ours)) as writer:
        for payload in payloads:
            writer.write(payload)
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for payload in payloads:
            writer.write(payload)
    assert ours.read_bytes() == theirs.read_bytes()
    read = list(tf.data.TFRecordDataset(str(ours)).as_numpy_iterator())
    assert read == payloads
    parsed = tf.io.parse_example(read[:3], schema.parse_features())
    np.testing.assert_array_equal(parsed[schema.TARGET].numpy(), [1, -1, 0])
    assert parsed[schema.XMIN].row_lengths().numpy().tolist() == [2, 0, 1]
