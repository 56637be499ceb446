"""The input pipeline: TFRecord shards -> batches of images, masks, boxes and labels.

`make_dataset` yields dicts of
  image      float32 [B, S, S, 1] in [0, 1]
  mask       float32 [B, S, S, 1] in {0, 1} (union of the boxes)
  boxes      float32 [B, MAX_BOXES, 4] normalised (ymin, xmin, ymax, xmax), zero padded
  num_boxes  int32 [B];  target int32 [B];  class int32 [B] (-1 both when unlabeled)
  id         string [B] (patientId)
  source_height, source_width  int32 [B] (the DICOM's pixels, to map boxes back)
  view, sex  string [B];  age int32 [B] (the header's, "" and -1 when unknown: data/metadata.py
             encodes them for models that take them)

It is assembled from small dataset -> dataset (or tensor -> tensor) functions that
training and evaluation share:

  shards (manifest) -> read_records -> [split_by_target] -> shuffle -> repeat
    -> [sample_from_datasets] -> decode_records -> batch -> prefetch

Shuffling and class sampling act on raw serialised records (small, cheap to hold
in a buffer); `decode_records` then parses them a batch at a time with
`tf.io.parse_example` and decodes each image in a parallel map. With `cache=True`
decode_records moves before the shuffle and its output is kept in memory, so later
epochs skip reading and decoding altogether.

Distribution: under a `tf.distribute.InputContext` each input pipeline reads its
own shards (or, with fewer shards than pipelines, its own records of every shard)
and batches at the per-replica batch size; `distributed_dataset` wires that up.

With `data_service` (data/remote.py) all of the above up to the batches runs on the
tf.data service's workers instead of in this process: the dispatcher then splits the
files among the workers (dynamic sharding), and the input pipelines of all training
hosts share one job instead of reading their own shards.
"""
from __future__ import annotations

import contextlib

import tensorflow as tf

from pneumo_tf.data import remote
from pneumo_tf.errors import UserError
from pneumo_tf.records import schema
from pneumo_tf.records.boxes import MAX_BOXES
from pneumo_tf.records.manifest import checked_shard_paths, read_manifest, shard_paths

# Scales `tf.io.decode_jpeg` can decode at directly (libjpeg's DCT scaling).
JPEG_RATIOS = (1, 2, 4, 8)

LABEL_KEYS = ("boxes", "num_boxes", "target", "class")
# Per-image facts that ride along: the id, the source size (to map boxes back), and the header's
# view, sex and age as stored (strings and int; pneumo_tf.data.metadata encodes them for a model).
METADATA_KEYS = ("id", "source_height", "source_width", "view", "sex", "age")

DEFAULT_SHUFFLE_BUFFER = 1024
# Masks (exactly 0 or 1) cross the tf.data service's wire as uint8: a quarter of float32's bytes to
# send and to receive. Measured here (256 px, batches of 32): the training process's CPU per example
# received fell from 0.42 to 0.25 ms.
MASK_WIRE_DTYPE = tf.uint8
DEFAULT_INTERLEAVE_CYCLE = 16


def num_examples(records_dir: str, split: str) -> int:
    """Records in one split according to the manifest (for steps per epoch)."""
    manifest = read_manifest(records_dir)
    shard_paths(records_dir, split, manifest)  # a missing or empty split is a UserError there
    return int(manifest["splits"][split]["records"])


def jpeg_ratio_index(source_size, image_size):
    """Index into JPEG_RATIOS of the largest ratio that still decodes to >= image_size pixels.

    Works on Python ints and on tensors. 0 (ratio 1) when even the full size is
    smaller than image_size: the resize then upsamples.
    """
    ratios = tf.constant(JPEG_RATIOS, tf.int64)
    fits = tf.cast(tf.cast(source_size, tf.int64) >= ratios * image_size, tf.int32)
    # `fits` is monotone (larger ratios fail first), so its sum is one past the answer.
    return tf.maximum(tf.reduce_sum(fits) - 1, 0)


def read_records(paths, *, training: bool, cycle_length: int, seed=None, input_context=None) -> tf.data.Dataset:
    """Serialised records of the given shard files, this input pipeline's share only."""
    files = tf.data.Dataset.from_tensor_slices(list(paths))
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    shard_records = pipelines > 1 and len(paths) < pipelines
    if pipelines > 1 and not shard_records:
        files = files.shard(pipelines, pipeline_id)
    if training:
        # After sharding, so pipelines with different seeds still read disjoint files.
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def records_of(path):
        records = tf.data.TFRecordDataset(path)
        # Sharding each file by record position (not the interleaved stream, whose
        # order is non-deterministic in training) keeps the pipelines disjoint.
        return records.shard(pipelines, pipeline_id) if shard_records else records

    return files.interleave(
        records_of,
        cycle_length=cycle_length,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not training,
    )


def is_positive(serialized):
    """Whether one serialised record has label/target 1, parsing only that key."""
    spec = {schema.TARGET: schema.parse_features()[schema.TARGET]}
    return tf.equal(tf.io.parse_single_example(serialized, spec)[schema.TARGET], 1)


def split_by_target(records: tf.data.Dataset) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(positive, negative) streams of raw records, for class-balanced sampling.

    Each stream reads every record and keeps its own, so shards are read twice; the
    extra cost is the light one-key parse per record, not decoding, which only
    happens for the records that are sampled.
    """
    return records.filter(is_positive), records.filter(lambda serialized: tf.logical_not(is_positive(serialized)))


def parse_batch(serialized):
    """A batch of serialised records -> batched fields, still encoded, boxes already dense.

    Everything vectorisable happens here, once per batch: the parse itself, the box
    reordering and padding, the label casts.
    """
    features = tf.io.parse_example(serialized, schema.parse_features())
    # Records hold (xmin, ymin, xmax, ymax); batches use TensorFlow's (ymin, xmin, ymax, xmax).
    boxes = tf.stack([features[schema.YMIN], features[schema.XMIN], features[schema.YMAX], features[schema.XMAX]], -1)
    return {
        "image_encoded": features[schema.IMAGE_ENCODED],
        "image_format": features[schema.IMAGE_FORMAT],
        "stored_size": tf.minimum(features[schema.IMAGE_HEIGHT], features[schema.IMAGE_WIDTH]),
        "mask_encoded": features[schema.MASK_ENCODED],
        "mask_row_repeats": features[schema.MASK_ROW_REPEATS],
        "mask_col_repeats": features[schema.MASK_COL_REPEATS],
        "boxes": boxes.to_tensor(default_value=0.0, shape=[None, MAX_BOXES, 4]),
        "num_boxes": tf.cast(tf.minimum(boxes.row_lengths(), MAX_BOXES), tf.int32),
        "target": tf.cast(features[schema.TARGET], tf.int32),
        "class": tf.cast(features[schema.CLASS], tf.int32),
        "id": features[schema.IMAGE_ID],
        # Predictions map boxes back to the source image's pixels for the challenge's format.
        "source_height": tf.cast(features[schema.SOURCE_HEIGHT], tf.int32),
        "source_width": tf.cast(features[schema.SOURCE_WIDTH], tf.int32),
        "view": features[schema.VIEW],
        "sex": features[schema.SEX],
        "age": tf.cast(features[schema.AGE], tf.int32),
    }


def _resize(pixels, image_size: int):
    """Area-resizes an [h, w, 1] float image to image_size x image_size; a no-op when it already is."""
    shape = tf.shape(pixels)
    already = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    resized = tf.cond(already, lambda: pixels, lambda: tf.image.resize(pixels, [image_size, image_size], "area"))
    return tf.ensure_shape(resized, [image_size, image_size, 1])


def decode_image(encoded, image_format, stored_size, image_size: int, bit_depth: int):
    """One encoded image -> float32 [S, S, 1] in [0, 1].

    JPEG (8-bit passthrough frames) decodes at the largest DCT ratio that keeps at
    least S pixels, so a 1024-pixel frame wanted at 256 never exists at full size.
    PNG decodes at the stored depth and is scaled by that depth's maximum.
    """

    def jpeg():
        branches = [
            lambda ratio=ratio: tf.io.decode_jpeg(encoded, channels=1, ratio=ratio) for ratio in JPEG_RATIOS
        ]
        return tf.cast(tf.switch_case(jpeg_ratio_index(stored_size, image_size), branches), tf.float32) / 255.0

    def png():
        dtype = tf.uint16 if bit_depth == 16 else tf.uint8
        return tf.cast(tf.io.decode_png(encoded, channels=1, dtype=dtype), tf.float32) / float(dtype.max)

    pixels = tf.cond(tf.equal(image_format, schema.JPEG), jpeg, png)
    return _resize(pixels, image_size)


def _overlaps(repeats, size: int):
    """How much of each of `size` equal output pixels each run of stored pixels covers, along one axis.

    repeats: int64 [K], the stored pixels each collapsed row (or column) stands for;
    their sum is the stored length N. Returns (int64 [size, K], N): output pixel i spans
    stored coordinates [i N / size, (i + 1) N / size); in units of 1 / size stored pixel
    every span and overlap is a whole number, so the counts are exact.
    """
    run_ends = tf.cumsum(repeats)
    length = run_ends[-1]
    run_ends *= size
    run_starts = run_ends - repeats * size
    pixel_starts = tf.range(size, dtype=tf.int64) * length
    pixel_ends = pixel_starts + length
    overlap_end = tf.minimum(pixel_ends[:, None], run_ends[None, :])
    overlap_start = tf.maximum(pixel_starts[:, None], run_starts[None, :])
    return tf.maximum(overlap_end - overlap_start, 0), length


def decode_mask(encoded, row_repeats, col_repeats, image_size: int):
    """A stored mask (records/masks.py: collapsed PNG and repeats) -> float32 [S, S, 1] in {0, 1}.

    A pixel is in the mask when at least half of its area is: area-resizing the full-size
    mask and thresholding at 0.5, in exact arithmetic (at the stored size, the mask itself;
    at whole-number scales the same as `tf.image.resize(..., "area")`, ties included),
    computed without the full-size raster. The covered area of every output pixel is
    rows_overlap @ collapsed @ columns_overlap^T, whole numbers, exact in float64.
    """
    collapsed = tf.cast(tf.io.decode_png(encoded, channels=1)[:, :, 0] > 0, tf.float64)
    rows, height = _overlaps(row_repeats, image_size)
    columns, width = _overlaps(col_repeats, image_size)
    covered = tf.matmul(tf.matmul(tf.cast(rows, tf.float64), collapsed), tf.cast(columns, tf.float64), transpose_b=True)
    inside = 2.0 * covered >= tf.cast(height * width, tf.float64)  # each output pixel's area is height x width units
    return tf.ensure_shape(tf.cast(inside, tf.float32)[:, :, None], [image_size, image_size, 1])


def decode_example(fields, image_size: int, bit_depth: int):
    """One example's parsed fields -> the example dict the models consume."""
    example = {key: fields[key] for key in (*LABEL_KEYS, *METADATA_KEYS)}
    example["image"] = decode_image(
        fields["image_encoded"], fields["image_format"], fields["stored_size"], image_size, bit_depth
    )
    # The mask is the union of the boxes (schema): with none it is empty. Skipping the decode of
    # those (77% of RSNA) saves ~0.1 ms of CPU per image, 6% of the passthrough pipeline's.
    example["mask"] = tf.cond(
        fields["num_boxes"] > 0,
        lambda: decode_mask(fields["mask_encoded"], fields["mask_row_repeats"], fields["mask_col_repeats"], image_size),
        lambda: tf.zeros([image_size, image_size, 1], tf.float32),
    )
    return example


def decode_records(records: tf.data.Dataset, parse_batch_size: int, image_size: int, bit_depth: int, *,
                   deterministic: bool) -> tf.data.Dataset:
    """Serialised records -> decoded examples: a batched parse, then a parallel per-image decode.

    Decoders are not vectorised, so the parsed batch is unbatched and every image
    decodes in its own autotuned parallel map call. Measured side by side (2 shared
    cores, 1024-px JPEG -> 256 plus its mask, batches of 16) this gave a median 1.5x
    the images/s of a tf.map_fn over the parsed batch (parallel_iterations=16), which
    in turn tied with a per-record parse + decode.
    """
    return (
        records.batch(parse_batch_size)
        .map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        .unbatch()
        .map(
            lambda fields: decode_example(fields, image_size, bit_depth),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=deterministic,
        )
    )


def make_dataset(
    records_dir: str,
    split: str,
    batch_size: int,
    image_size: int,
    training: bool,
    *,
    positive_fraction: float | None = None,
    cache: bool = False,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool | None = None,
    drop_remainder: bool | None = None,
    interleave_cycle: int = DEFAULT_INTERLEAVE_CYCLE,
    data_service: str | None = None,
) -> tf.data.Dataset:
    """Batches of one split of a records folder (see the module docstring for their layout).

    training: shuffles shards and records (seeded by `seed`), reads out of order,
      and by default repeats forever and drops the last partial batch; evaluation
      reads every record once in manifest order.
    positive_fraction: training only; samples label/target == 1 records with this
      probability (the negatives with the rest), whatever the split's balance.
    cache: keeps the decoded, resized examples in memory (about 8 * S * S bytes
      each: 3.5 GB for RSNA's 26,684 images at S = 128); for small S only.
    input_context: this input pipeline's share of the records, at the per-replica
      batch size (`distributed_dataset` passes it).
    data_service: a tf.data service dispatcher's address (grpc://HOST:PORT): its workers
      read, parse, decode and batch; this process receives the batches. Under several
      input pipelines they share one job, which gives each of them batches of all shards.
    """
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    manifest = read_manifest(records_dir)
    paths = checked_shard_paths(records_dir, split, manifest)  # a shard cut short must not read as fewer records
    if positive_fraction is not None:
        _check_positive_fraction(positive_fraction, training, repeat, manifest["splits"][split], split)
    if cache and data_service:
        raise UserError("cache keeps decoded images in this process, data_service decodes them on the service's "
                        "workers: use one of them")
    bit_depth = int(manifest["options"]["bit_depth"])
    shared_by = None
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        if data_service and input_context.num_input_pipelines > 1:
            # Every pipeline builds this same dataset, and the job they share gives each batch to one of them.
            shared_by = (records_dir, split, batch_size, image_size, training, positive_fraction, shuffle_buffer,
                         seed, repeat, drop_remainder, interleave_cycle, input_context.num_input_pipelines)

    records = read_records(
        paths, training=training, cycle_length=interleave_cycle, seed=seed,
        # With the service its dispatcher splits the files among workers and consumers; a static shard
        # per pipeline before dynamic sharding loses files (seen on TF 2.21: shard(2, 0) and shard(2, 1)
        # of 6 files delivered 3 and 2 files, one of them twice).
        input_context=None if data_service else input_context,
    )

    def decode(stream):
        return decode_records(stream, batch_size, image_size, bit_depth, deterministic=not training)

    dataset = _sampled_stream(records, positive_fraction, training=training, repeat=repeat, cache=cache,
                              shuffle_buffer=shuffle_buffer, seed=seed, decode=decode)
    if not cache:
        dataset = decode(dataset)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if data_service:
        return _through_service(dataset, training, data_service, shared_by)
    return _tuned(dataset, training)


def _sampled_stream(records, positive_fraction, *, training, repeat, cache, shuffle_buffer, seed, decode):
    """The serialized records in the order training or evaluation reads them: per class when
    `positive_fraction` samples the classes, each stream decoded and cached (by `decode`) when `cache`,
    shuffled when training, repeated when `repeat`."""
    streams = split_by_target(records) if positive_fraction is not None else (records,)

    def prepare(stream):
        if cache:
            # Decode before the cache so later epochs only shuffle and batch.
            stream = decode(stream).cache()
        if training:
            stream = stream.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        return stream.repeat() if repeat else stream

    streams = [prepare(stream) for stream in streams]
    if positive_fraction is None:
        return streams[0]
    # Stopping on an empty stream (one pipeline's share without positives) ends the
    # data visibly instead of silently sampling only the other class.
    return tf.data.Dataset.sample_from_datasets(
        streams, weights=[positive_fraction, 1.0 - positive_fraction], seed=seed, stop_on_empty_dataset=True
    )


def _tuned(dataset: tf.data.Dataset, training: bool) -> tf.data.Dataset:
    """Autotuned and prefetched; in order unless training."""
    options = tf.data.Options()
    # Autotune picks the AUTOTUNE parallelism and prefetch buffer sizes above.
    options.autotune.enabled = True
    options.deterministic = not training
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def _through_service(dataset: tf.data.Dataset, training: bool, data_service: str, shared_by) -> tf.data.Dataset:
    """The batches made by the tf.data service's workers, masks sent as MASK_WIRE_DTYPE."""
    dataset = dataset.map(lambda batch: {**batch, "mask": tf.cast(batch["mask"], MASK_WIRE_DTYPE)})
    dataset = remote.distribute(_tuned(dataset, training), data_service, shared_by)
    dataset = dataset.map(lambda batch: {**batch, "mask": tf.cast(batch["mask"], tf.float32)})
    return dataset.prefetch(tf.data.AUTOTUNE)


def _check_positive_fraction(positive_fraction, training, repeat, split_entry, split):
    if not training or not repeat:
        raise UserError("positive_fraction samples an endless training stream: use it with training and repeat")
    if not 0.0 < positive_fraction < 1.0:
        raise UserError(f"positive_fraction must be between 0 and 1 (exclusive), got {positive_fraction}")
    # Checked up front: with one class missing the sampled stream would end at once.
    if not 0 < split_entry["positive"] < split_entry["records"]:
        raise UserError(
            f"positive_fraction needs positive and negative records, but split '{split}' has "
            f"{split_entry['positive']} positive of {split_entry['records']}"
        )


def distributed_dataset(strategy, records_dir: str, split: str, global_batch_size: int, image_size: int,
                        training: bool, map_fn=None, **kwargs):
    """`make_dataset` under a tf.distribute strategy: one pipeline per input worker, per-replica
    batches, each batch passed through `map_fn` when given (e.g. to shape it for `fit`)."""

    def dataset_fn(input_context):
        dataset = make_dataset(
            records_dir, split, global_batch_size, image_size, training, input_context=input_context, **kwargs
        )
        return dataset.map(map_fn) if map_fn is not None else dataset

    return strategy.distribute_datasets_from_function(dataset_fn)


# ---------------------------------------------------------------------------------------------
# Records that cannot be read: named, never a bare op error.


def unreadable_records(records_dir: str, split: str, image_size: int) -> list[tuple[str, int, str, str]]:
    """(shard file, record index, image id, error) of every record of a split that the pipeline
    cannot read, parse or decode at `image_size`.

    Slow (one eager decode per record): `naming_bad_records` runs it only after a pass failed.
    The converter never writes such records (it rejects frames libjpeg cannot decode); they
    come from older versions or damaged storage.
    """
    manifest = read_manifest(records_dir)
    bit_depth = int(manifest["options"]["bit_depth"])
    found = []
    for path in shard_paths(records_dir, split, manifest):
        index = -1
        try:
            for index, serialized in enumerate(tf.data.TFRecordDataset(path)):
                image_id = "?"
                try:
                    fields = {key: value[0] for key, value in parse_batch(serialized[tf.newaxis]).items()}
                    image_id = fields["id"].numpy().decode(errors="replace")
                    decode_example(fields, image_size, bit_depth)
                except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
                    found.append((path, index, image_id, error.message.splitlines()[0]))
        except tf.errors.DataLossError as error:  # a damaged shard: the records after it cannot be framed
            found.append((path, index + 1, "?", error.message.splitlines()[0]))
    return found


@contextlib.contextmanager
def naming_bad_records(records_dir: str, splits, image_size: int):
    """Turns a decode or read error of the input pipeline inside the block into a UserError that
    names the bad records (id, shard file, record index) of `splits` and says how to fix them.

    Errors that no record explains (a bug elsewhere) propagate unchanged.
    """
    try:
        yield
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
        bad = [entry for split in splits for entry in unreadable_records(records_dir, split, image_size)]
        if not bad:
            raise
        listed = "; ".join(f"id {image_id} (record {index} of {path}): {reason}" for path, index, image_id, reason
                           in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{len(bad)} record(s) of {records_dir} cannot be decoded: {listed}{more}. Reconvert the "
                        "source files with this version (the converter rejects undecodable frames)") from error
