"""The sharding converter: DICOM/PNG/JPEG folders + label CSVs -> TFRecord shards + manifest.json + rejects.csv.

How it stays correct and fast:
* `convert_file` is a pure function of one file and `write_shard` of one shard: each shard
  is written whole, in plan order, by one worker, so the same inputs and options always give
  byte-identical shards whatever runs the workers: the local process pool here, or an Apache
  Beam pipeline (records/beam.py, `beam_pipeline_options`) on Dataflow, Flink or Spark.
* The plan (which file goes to which split and shard) depends only on the file names,
  the labels, the options and the seed, never on the machine.
* A shard is written under a temporary name and renamed when complete; a per-shard
  summary kept in `_partial/` lets a rerun (or a retried Beam bundle) skip finished shards.
  The manifest is written last and `_partial/` removed: a folder with a manifest is complete.
* Paths may be URLs (`gs://...`): every file operation goes through pneumo_tf.fileio.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import math
import multiprocessing
import os
import platform
import queue
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from pneumo_tf.cli import option
from pneumo_tf.records import boxes as box_lib
from pneumo_tf.errors import RejectedFile, UserError
from pneumo_tf import fileio
from pneumo_tf.fileio import write_csv_atomic, write_json_atomic
from tqdm import tqdm
from pneumo_tf.records import dicom, images, jpeg, labels as labels_lib, manifest as manifest_lib, masks, schema
from pneumo_tf.records.labels import PatientLabels
from pneumo_tf.records.tfrecord import TFRecordWriter

PARTIAL_DIR = "_partial"
TARGET_SHARD_BYTES = 128 * 2**20
PROGRESS_EVERY = 16  # files between a worker's progress reports
# An automatic shard count gives every split at least this many shards (when it has
# MIN_SHARD_FILES files per shard), so workers convert in parallel and readers interleave.
MIN_AUTO_SHARDS = 8
MIN_SHARD_FILES = 64


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What determines the records' bytes. A rerun into the same folder must use the same."""

    image_size: int = option(0, "0 keeps source pixels and copies JPEG Baseline 8-bit grey frames byte for byte; N "
                             "stores every image as an N x N PNG (boxes stay normalised).")
    bit_depth: int = option(8, "8, or 16 to keep up to 16 bits of precision in transcoded (non-passthrough) PNGs; "
                            "stored ranges are scaled to the full 16-bit range.")
    val_fraction: float = option(0.2, "Share of labeled patients in the 'val' split, stratified by class.")
    seed: int = option(0, "Seed of the train/val split and of the record order within shards.")
    num_shards: int = option(0, "Shards per split; 0 picks a count giving shards of at most ~128 MB and at least 8 "
                             "per split with 512+ files (so workers convert and readers interleave in parallel).")

    def validate(self) -> None:
        if self.image_size < 0 or 0 < self.image_size < 8:
            raise UserError(f"--image_size must be 0 (source pixels) or at least 8, not {self.image_size}")
        if self.bit_depth not in (8, 16):
            raise UserError(f"--bit_depth must be 8 or 16, not {self.bit_depth}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.num_shards < 0:
            raise UserError(f"--num_shards must be >= 0, not {self.num_shards}")


@dataclasses.dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int
    # (path, image_id, labels or None for unlabeled test images)
    files: tuple[tuple[str, str, PatientLabels | None], ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.tfrecord"


@dataclasses.dataclass(frozen=True)
class Plan:
    shards: tuple[Shard, ...]
    rejects: tuple[tuple[str, str], ...]  # (file, reason) known before any pixel is read
    labeled_without_dicom: int


# ---------------------------------------------------------------------------------------------
# One file -> one record (pure).


def _png(array: np.ndarray) -> bytes:
    # Level 1: ~4x faster than the default 6 on radiographs for files ~15% larger.
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _resized(grey: np.ndarray, size: int) -> np.ndarray:
    if grey.dtype == np.uint8:
        return np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
    # Pillow resamples 16-bit through 32-bit float mode.
    resized = Image.fromarray(grey.astype(np.float32)).resize((size, size), Image.BILINEAR)
    return np.clip(np.round(np.asarray(resized)), 0, 65535).astype(np.uint16)


@dataclasses.dataclass(frozen=True)
class Radiograph:
    """One input file, read as far as converting it needs; whatever its format, it converts alike."""

    source_format: str  # images.DICOM, PNG or JPEG: what the file's content is
    facts: dicom.HeaderFacts  # an image file's: its size, the rest unknown
    passthrough: bytes | None  # a JPEG stream that is the image as it is, stored unchanged at source size
    jpeg_stream: bytes | None  # a JPEG stream of the image, decoded at 1/2..1/8 scale when pre-resizing
    grey_pixels: Callable[[int], np.ndarray]  # bit_depth -> grey pixels at source size (pixels.to_bit_depth)


def _read_bytes(source, count: int = -1) -> bytes:
    """The first `count` bytes (all when -1) of a path or a seekable binary file object, left where it was."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            return handle.read(count)
    start = source.tell()
    try:
        return source.read(count)
    finally:
        source.seek(start)


def read_radiograph(source) -> Radiograph:
    """A DICOM, PNG or JPEG file (a path or a binary file object), told apart by its first bytes.

    Raises RejectedFile with the reason when it is none of them or cannot be read.
    """
    if isinstance(source, str) and fileio.is_url(source):
        with fileio.open_file(source, "rb") as handle:
            source = io.BytesIO(handle.read())  # one request; the readers below seek in memory
    head = _read_bytes(source, images.SNIFF_BYTES)
    source_format = images.sniff(head)
    if source_format == images.DICOM:
        ds = dicom.read(source)
        frame = dicom.passthrough_frame(ds)
        return Radiograph(images.DICOM, dicom.header_facts(ds), frame, frame,
                          functools.partial(dicom.grey_pixels, ds))
    if not head:
        raise RejectedFile("empty file")
    if source_format is None:
        raise RejectedFile("not a DICOM, PNG or JPEG file (no DICM prefix at byte 128, no PNG or JPEG signature)")
    image = images.read(_read_bytes(source), source_format)
    facts = dicom.HeaderFacts(rows=image.height, columns=image.width, frames=image.frames, view="", age=-1, sex="",
                              pixel_spacing=(0.0, 0.0))
    return Radiograph(source_format, facts, images.passthrough_frame(image),
                      image.data if source_format == images.JPEG else None,
                      functools.partial(images.grey_pixels, image))


def convert_file(source, image_id: str, labels: PatientLabels | None, options: ConvertOptions):
    """One DICOM, PNG or JPEG file (a path or a binary file object) -> (Record, facts dict).

    Pure: the same file and options give the same record. Raises RejectedFile with the reason.
    """
    radiograph = read_radiograph(source)
    facts = radiograph.facts
    size = options.image_size
    if radiograph.passthrough is not None and size == 0:
        jpeg.verify_decodes(radiograph.passthrough)  # stored unchanged, so the pipeline must be able to decode it
        encoded, image_format, height, width = radiograph.passthrough, schema.JPEG, facts.rows, facts.columns
    elif radiograph.jpeg_stream is not None and size and options.bit_depth == 8:
        # Let the JPEG decoder scale by 1/2..1/8 (DCT scaling): far cheaper than a full decode.
        grey = np.asarray(jpeg.decode(radiograph.jpeg_stream, size).resize((size, size), Image.BILINEAR))
        encoded, image_format, height, width = _png(grey), schema.PNG, size, size
    else:
        grey = radiograph.grey_pixels(options.bit_depth)
        if size:
            grey = _resized(grey, size)
        encoded, image_format = _png(grey), schema.PNG
        height, width = grey.shape

    boxes = ()
    if labels is not None:
        boxes = tuple(box_lib.xywh_to_normalised(b, facts.columns, facts.rows) for b in labels.boxes)
    mask_encoded, mask_row_repeats, mask_col_repeats = masks.encode(boxes, height, width)
    record = schema.Record(
        image_id=image_id,
        image_encoded=encoded,
        image_format=image_format,
        height=height,
        width=width,
        source_height=facts.rows,
        source_width=facts.columns,
        mask_encoded=mask_encoded,
        mask_row_repeats=mask_row_repeats,
        mask_col_repeats=mask_col_repeats,
        target=labels.target if labels is not None else schema.UNLABELED,
        label_class=labels.label_class if labels is not None else schema.UNLABELED,
        boxes=boxes,
        view=facts.view,
        age=facts.age,
        sex=facts.sex,
        pixel_spacing=facts.pixel_spacing,
    )
    return record, {"format": radiograph.source_format, "passthrough": image_format == schema.JPEG,
                    "multi_frame": facts.frames > 1}


def convert_or_reject(path, image_id: str, labels: PatientLabels | None, options: ConvertOptions):
    """(record, facts), or (None, reason) for a file that cannot become a record (never raises)."""
    try:
        return convert_file(path, image_id, labels, options)
    except RejectedFile as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
        return None, f"conversion failed: {type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------
# Planning: which file goes to which split and shard.


def list_inputs(folder: str) -> list[str]:
    """Every regular, non-hidden file in the folder, sorted: each becomes a record or a reject."""
    if not fileio.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    return [os.path.join(folder, n) for n in fileio.list_files(folder) if not n.startswith(".")]


IMAGE_EXTENSIONS = (".dcm", ".png", ".jpg", ".jpeg")


def image_id_of(path: str) -> str:
    """The file name without a .dcm, .png, .jpg or .jpeg extension (any case): RSNA's patientId."""
    name = os.path.basename(path)
    stem, extension = os.path.splitext(name)
    return stem if extension.lower() in IMAGE_EXTENSIONS else name


def split_ids(labels: dict[str, PatientLabels], ids: list[str], val_fraction: float, seed: int):
    """Patient-level train/val split stratified by the three-way class (target when class unknown)."""
    strata: dict[int, list[str]] = collections.defaultdict(list)
    for image_id in sorted(ids):
        label = labels[image_id]
        strata[label.label_class if label.label_class != schema.UNLABELED else 10 + label.target].append(image_id)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for key in sorted(strata):
        members = list(rng.permutation(strata[key]))
        cut = int(round(len(members) * val_fraction))
        val.extend(members[:cut])
        train.extend(members[cut:])
    return sorted(train), sorted(val)


def _shard_count(options: ConvertOptions, paths: list[str]) -> int:
    if options.num_shards:
        return max(1, min(options.num_shards, len(paths)))
    if options.image_size == 0:
        estimate = sum(fileio.sizes(paths))
    else:  # PNG of a radiograph: ~0.6 of raw size, plus a small mask
        estimate = len(paths) * options.image_size**2 * (options.bit_depth // 8) * 0.6
    by_size = math.ceil(estimate / TARGET_SHARD_BYTES)
    # Never from the machine's core count: the same inputs must give the same shards anywhere.
    return max(1, by_size, min(MIN_AUTO_SHARDS, len(paths) // MIN_SHARD_FILES))


def make_plan(
    dicom_dir: str,
    labels: dict[str, PatientLabels] | None,
    test_dicom_dir: str | None,
    options: ConvertOptions,
) -> Plan:
    rejects: list[tuple[str, str]] = []
    seen: set[str] = set()
    labeled: dict[str, str] = {}
    unlabeled: dict[str, str] = {}
    for folder, is_test in ((dicom_dir, labels is None), (test_dicom_dir, True)):
        if folder is None:
            continue
        for path in list_inputs(folder):
            image_id = image_id_of(path)
            if image_id in seen:
                rejects.append((path, f"duplicate image id {image_id}"))
            elif is_test:
                unlabeled[image_id] = path
            elif image_id not in labels:
                rejects.append((path, "no label row for this id in the labels CSV"))
            else:
                labeled[image_id] = path
            seen.add(image_id)

    split_members: dict[str, list[str]] = {}
    if labeled:
        split_members["train"], split_members["val"] = split_ids(labels, list(labeled), options.val_fraction, options.seed)
    split_members["test"] = sorted(unlabeled)

    shards = []
    paths = {**labeled, **unlabeled}
    for split_index, split in enumerate(schema.SPLITS):
        members = split_members.get(split, [])
        if not members:
            continue
        # Shuffle before cutting into shards so every shard mixes classes (file-level shuffle
        # then behaves like a record shuffle).
        order = np.random.default_rng([options.seed, split_index]).permutation(len(members))
        files = [
            (paths[members[i]], members[i], labels[members[i]] if split != "test" else None) for i in order
        ]
        count = _shard_count(options, [f[0] for f in files])
        for index, part in enumerate(np.array_split(np.arange(len(files)), count)):
            shards.append(Shard(split, index, count, tuple(files[i] for i in part)))
    labeled_without_dicom = len(set(labels) - set(labeled)) if labels is not None else 0
    return Plan(tuple(shards), tuple(sorted(rejects)), labeled_without_dicom)


# ---------------------------------------------------------------------------------------------
# Writing shards.


def write_shard(shard: Shard, output_dir: str, options: ConvertOptions, report=None) -> dict:
    """Converts one shard's files and writes the shard whole; returns its summary.

    Runs in a worker process (of the local pool or of a Beam runner), so no record crosses a
    process boundary; the writer needs no TensorFlow (records/tfrecord.py), so workers start
    fast and stay small. The shard is written under a name no other attempt uses, its summary
    kept in _partial/, then renamed: it exists complete or not at all, and an attempt retried
    by Beam writes the same bytes again. `report(n)` is told every few files how many were
    done, for the progress bar.
    """
    dicom.quiet_pydicom()
    final = os.path.join(output_dir, shard.name)
    tmp = fileio.temporary_name(final)
    summary = {"name": shard.name, "split": shard.split, "records": 0, "positive": 0, "boxes": 0,
               "classes": collections.Counter(), "rejects": [], "passthrough": 0, "multi_frame": 0,
               "formats": dict.fromkeys(images.FORMATS, 0)}
    unreported = 0
    with TFRecordWriter(tmp) as writer:
        for path, image_id, labels in shard.files:
            record, facts = convert_or_reject(path, image_id, labels, options)
            unreported += 1
            if report is not None and unreported == PROGRESS_EVERY:
                report(unreported)
                unreported = 0
            if record is None:
                summary["rejects"].append((path, facts))
                continue
            writer.write(schema.serialize_example(record))
            summary["records"] += 1
            summary["positive"] += int(record.target == 1)
            summary["boxes"] += len(record.boxes)
            summary["classes"][_class_name(record.label_class)] += 1
            summary["passthrough"] += int(facts["passthrough"])
            summary["multi_frame"] += int(facts["multi_frame"])
            summary["formats"][facts["format"]] += 1
    if report is not None and unreported:
        report(unreported)
    summary["classes"] = dict(sorted(summary["classes"].items()))
    summary["bytes"] = writer.bytes_written
    summary["sha256"] = writer.sha256.hexdigest()
    write_json_atomic(_summary_path(shard, output_dir), summary)
    fileio.replace(tmp, final)
    return summary


def _summary_path(shard: Shard, output_dir: str) -> str:
    return os.path.join(output_dir, PARTIAL_DIR, f"{shard.name}.json")


def _written_shards(output_dir: str) -> set[str]:
    """Names of the shards complete in output_dir: the shard and its summary (written first) are there.

    Two listings, not a look-up per shard: on cloud storage each look-up is a request.
    """
    partial = os.path.join(output_dir, PARTIAL_DIR)
    summaries = {name[: -len(".json")] for name in fileio.listdir(partial) if name.endswith(".json")}
    return summaries & set(fileio.listdir(output_dir))


def _write_shards(shards, output_dir, options, workers, progress) -> None:
    """Writes the shards, each whole in one worker process (in this process when workers is 1)."""
    if workers == 1 or len(shards) == 1:
        for shard in shards:
            write_shard(shard, output_dir, options, progress.update)
        return
    context = multiprocessing.get_context("spawn")  # a clean interpreter per worker, never a fork
    with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(
        min(workers, len(shards)), mp_context=context
    ) as pool:
        done = manager.Queue()
        futures = [pool.submit(write_shard, shard, output_dir, options, done.put) for shard in shards]
        remaining = sum(len(shard.files) for shard in shards)
        while remaining:
            try:
                count = done.get(timeout=1.0)
            except queue.Empty:
                # A worker that failed (full disk, killed, crashed) reports no more files:
                # result() passes its error on instead of waiting for counts that never come.
                for future in futures:
                    if future.done():
                        future.result()
                continue
            remaining -= count
            progress.update(count)
        for future in futures:
            future.result()


def _class_name(label_class: int) -> str:
    return schema.CLASS_NAMES[label_class] if label_class >= 0 else "unlabeled"


# ---------------------------------------------------------------------------------------------
# The whole conversion.


def _recorded_options(options, dicom_dir, labels_csv, class_info_csv, test_dicom_dir, num_shards_by_split):
    absolute = lambda p: fileio.absolute(p) if p else None  # noqa: E731
    return {
        **dataclasses.asdict(options),
        "dicom_dir": absolute(dicom_dir),
        "labels_csv": absolute(labels_csv),
        "class_info_csv": absolute(class_info_csv),
        "test_dicom_dir": absolute(test_dicom_dir),
        "shards_per_split": num_shards_by_split,
    }


def _differences(previous: dict, recorded: dict) -> str:
    keys = sorted(k for k in set(previous) | set(recorded) if previous.get(k) != recorded.get(k))
    return ", ".join(f"{k}: {previous.get(k)!r} there, {recorded.get(k)!r} now" for k in keys)


def _check_output_dir(output_dir: str, recorded: dict) -> dict | None:
    """Refuses a folder holding another conversion; returns the manifest if this one is complete."""
    if not fileio.exists(output_dir):
        return None
    if not fileio.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    if fileio.isfile(os.path.join(output_dir, manifest_lib.MANIFEST_NAME)):
        manifest = manifest_lib.read_manifest(output_dir)
        differences = _differences(manifest["options"], recorded)
        if differences:
            raise UserError(f"{output_dir} holds a conversion made with other options ({differences})")
        return manifest
    state_path = os.path.join(output_dir, PARTIAL_DIR, "options.json")
    if fileio.isfile(state_path):
        differences = _differences(fileio.read_json(state_path), recorded)
        if differences:
            raise UserError(f"{output_dir} holds an unfinished conversion with other options ({differences})")
    elif fileio.listdir(output_dir) and not fileio.isdir(os.path.join(output_dir, PARTIAL_DIR)):
        raise UserError(f"--output_dir {output_dir} is not empty and holds no pneumo_tf conversion")
    return None


def _versions() -> dict:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("pneumo_tf", "tensorflow", "pydicom", "numpy", "pillow", "pylibjpeg"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _finalize(output_dir, plan, recorded, started, files_this_run):
    splits = {}
    rejects = list(plan.rejects)
    totals = collections.Counter()
    formats = collections.Counter()
    missing = []
    written = _written_shards(output_dir)
    for shard in plan.shards:
        if shard.name not in written:
            missing.append(shard.name)
            continue
        summary = fileio.read_json(_summary_path(shard, output_dir))
        entry = splits.setdefault(shard.split, {"records": 0, "positive": 0, "boxes": 0, "classes": {}, "shards": []})
        for key in ("records", "positive", "boxes"):
            entry[key] += summary[key]
        for name, count in summary["classes"].items():
            entry["classes"][name] = entry["classes"].get(name, 0) + count
        entry["shards"].append({k: summary[k] for k in ("name", "records", "bytes", "sha256")})
        rejects.extend(tuple(r) for r in summary["rejects"])
        totals.update(passthrough=summary["passthrough"], multi_frame=summary["multi_frame"])
        formats.update(summary["formats"])
    if missing:
        raise UserError(f"{len(missing)} shard(s) were not written (e.g. {missing[0]}): rerun the conversion")

    rejects.sort()
    write_csv_atomic(os.path.join(output_dir, manifest_lib.REJECTS_NAME), ["file", "reason"], rejects)

    elapsed = time.perf_counter() - started
    manifest = {
        "format_version": manifest_lib.FORMAT_VERSION,
        "options": recorded,
        "versions": _versions(),
        "splits": splits,
        "records": sum(s["records"] for s in splits.values()),
        "rejects": len(rejects),
        "labeled_without_dicom": plan.labeled_without_dicom,
        "formats": {name: formats[name] for name in images.FORMATS},  # records by source file format
        "passthrough_records": totals["passthrough"],
        "transcoded_records": sum(s["records"] for s in splits.values()) - totals["passthrough"],
        # Multi-frame files give their first frame only.
        "multi_frame_first_frame_only": totals["multi_frame"],
        "elapsed_seconds": round(elapsed, 3),
        "files_per_second": round(files_this_run / elapsed, 2) if elapsed > 0 else None,
    }
    write_json_atomic(os.path.join(output_dir, manifest_lib.MANIFEST_NAME), manifest)
    fileio.rmtree(os.path.join(output_dir, PARTIAL_DIR))
    return manifest


def convert(
    dicom_dir: str,
    output_dir: str,
    labels_csv: str | None = None,
    class_info_csv: str | None = None,
    test_dicom_dir: str | None = None,
    options: ConvertOptions = ConvertOptions(),
    workers: int | None = None,
    beam_pipeline_options: str | None = None,
    progress_stream=None,
) -> dict:
    """Converts a folder and returns the manifest.

    Shards are written by `workers` local processes (all cores by default), or, with
    `beam_pipeline_options` ("runner=DataflowRunner,project=...", see records/beam.py), by
    an Apache Beam pipeline on that runner; either way with the same bytes.
    """
    started = time.perf_counter()
    options.validate()
    if class_info_csv and not labels_csv:
        raise UserError("--class_info_csv needs --labels_csv")
    if beam_pipeline_options:
        from pneumo_tf.records import beam

        beam_options = beam.pipeline_options(beam_pipeline_options)  # checked before anything is written
    if test_dicom_dir is not None and not fileio.isdir(test_dicom_dir):
        raise UserError(f"test DICOM folder not found: {test_dicom_dir}")
    labels = labels_lib.read_labels(labels_csv, class_info_csv) if labels_csv else None
    plan = make_plan(dicom_dir, labels, test_dicom_dir, options)
    if not plan.shards:
        raise UserError(f"nothing to convert: no usable DICOM, PNG or JPEG files in {dicom_dir}")
    shards_per_split = {s.split: s.count for s in plan.shards}
    recorded = _recorded_options(options, dicom_dir, labels_csv, class_info_csv, test_dicom_dir, shards_per_split)
    finished = _check_output_dir(output_dir, recorded)
    if finished is not None:
        return finished

    fileio.makedirs(os.path.join(output_dir, PARTIAL_DIR))
    write_json_atomic(os.path.join(output_dir, PARTIAL_DIR, "options.json"), recorded)
    for stale in fileio.glob(output_dir, "*.tmp-*"):  # temporary files of a killed run
        fileio.remove(stale)
    written = _written_shards(output_dir)
    pending = [shard for shard in plan.shards if shard.name not in written]
    files = sum(len(s.files) for s in pending)
    if beam_pipeline_options:
        beam.write_shards(pending, output_dir, options, beam_options)
    else:
        with tqdm(total=files, desc="convert", unit="files", file=progress_stream) as progress:
            _write_shards(pending, output_dir, options, max(1, workers or os.cpu_count() or 1), progress)
    return _finalize(output_dir, plan, recorded, started, files)
