"""The sharding converter: DICOM folders + label CSVs -> TFRecord shards + manifest.json + rejects.csv.

How it stays correct and fast:
* `convert_file` is a pure function of one file (a future Apache Beam runner reuses it);
  worker processes run it, the parent only serialises and writes, in plan order, so the
  same inputs and options always give byte-identical shards whatever the worker count.
* The plan (which file goes to which split and shard) depends only on the file names,
  the labels, the options and the seed, so N machines can each write their share.
* A shard is written under a temporary name and renamed when complete; a per-shard
  summary kept in `_partial/` lets a rerun skip finished shards after a crash. The
  manifest is written last and `_partial/` removed: a folder with a manifest is complete.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import queue
import shutil
import time

import numpy as np
from PIL import Image

from pneumo_tf.cli import option
from pneumo_tf.records import boxes as box_lib
from pneumo_tf.errors import RejectedFile, UserError
from pneumo_tf.fileio import write_csv_atomic, write_json_atomic
from tqdm import tqdm
from pneumo_tf.records import dicom, jpeg, labels as labels_lib, manifest as manifest_lib, masks, schema
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


def convert_file(source, image_id: str, labels: PatientLabels | None, options: ConvertOptions):
    """One DICOM file (a path or a binary file object) -> (Record, facts dict).

    Pure: the same file and options give the same record. Raises RejectedFile with the reason.
    """
    ds = dicom.read(source)
    facts = dicom.header_facts(ds)
    frame = dicom.passthrough_frame(ds)
    size = options.image_size
    if frame is not None and size == 0:
        jpeg.verify_decodes(frame)  # stored unchanged, so the pipeline must be able to decode it
        encoded, image_format, height, width = frame, schema.JPEG, facts.rows, facts.columns
    elif frame is not None and options.bit_depth == 8:
        # Let the JPEG decoder scale by 1/2..1/8 (DCT scaling): far cheaper than a full decode.
        grey = np.asarray(jpeg.decode(frame, size).resize((size, size), Image.BILINEAR))
        encoded, image_format, height, width = _png(grey), schema.PNG, size, size
    else:
        grey = dicom.grey_pixels(ds, options.bit_depth)
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
    return record, {"passthrough": image_format == schema.JPEG, "multi_frame": facts.frames > 1}


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


def list_dicoms(folder: str) -> list[str]:
    """Every regular, non-hidden file in the folder, sorted: each becomes a record or a reject."""
    if not os.path.isdir(folder):
        raise UserError(f"DICOM folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    return [os.path.join(folder, n) for n in names]


def image_id_of(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".dcm")] if name.lower().endswith(".dcm") else name


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
        estimate = sum(os.path.getsize(p) for p in paths)
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
        for path in list_dicoms(folder):
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


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_shard(shard: Shard, output_dir: str, options: ConvertOptions, report=None) -> dict:
    """Converts one shard's files and writes the shard whole; returns its summary.

    Runs in a worker process, so no record crosses a process boundary; the writer needs
    no TensorFlow (records/tfrecord.py), so workers start fast and stay small. The shard is written under a temporary name,
    its summary kept in _partial/, then renamed: it exists complete or not at all.
    `report(n)` is told every few files how many were done, for the progress bar.
    """
    dicom.quiet_pydicom()
    final = os.path.join(output_dir, shard.name)
    tmp = f"{final}.tmp-{os.getpid()}"
    summary = {"name": shard.name, "split": shard.split, "records": 0, "positive": 0, "boxes": 0,
               "classes": collections.Counter(), "rejects": [], "passthrough": 0, "multi_frame": 0}
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
    if report is not None and unreported:
        report(unreported)
    summary["classes"] = dict(sorted(summary["classes"].items()))
    summary["bytes"] = os.path.getsize(tmp)
    summary["sha256"] = _sha256(tmp)
    write_json_atomic(os.path.join(output_dir, PARTIAL_DIR, f"{shard.name}.json"), summary)
    os.replace(tmp, final)
    return summary


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
    absolute = lambda p: os.path.abspath(p) if p else None  # noqa: E731
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
    if not os.path.exists(output_dir):
        return None
    if not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    if os.path.isfile(os.path.join(output_dir, manifest_lib.MANIFEST_NAME)):
        manifest = manifest_lib.read_manifest(output_dir)
        differences = _differences(manifest["options"], recorded)
        if differences:
            raise UserError(f"{output_dir} holds a conversion made with other options ({differences})")
        return manifest
    state_path = os.path.join(output_dir, PARTIAL_DIR, "options.json")
    if os.path.isfile(state_path):
        with open(state_path) as handle:
            differences = _differences(json.load(handle), recorded)
        if differences:
            raise UserError(f"{output_dir} holds an unfinished conversion with other options ({differences})")
    elif os.listdir(output_dir) and not os.path.isdir(os.path.join(output_dir, PARTIAL_DIR)):
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
    missing = []
    for shard in plan.shards:
        summary_path = os.path.join(output_dir, PARTIAL_DIR, f"{shard.name}.json")
        if not (os.path.isfile(summary_path) and os.path.isfile(os.path.join(output_dir, shard.name))):
            missing.append(shard.name)
            continue
        with open(summary_path) as handle:
            summary = json.load(handle)
        entry = splits.setdefault(shard.split, {"records": 0, "positive": 0, "boxes": 0, "classes": {}, "shards": []})
        for key in ("records", "positive", "boxes"):
            entry[key] += summary[key]
        for name, count in summary["classes"].items():
            entry["classes"][name] = entry["classes"].get(name, 0) + count
        entry["shards"].append({k: summary[k] for k in ("name", "records", "bytes", "sha256")})
        rejects.extend(tuple(r) for r in summary["rejects"])
        totals.update(passthrough=summary["passthrough"], multi_frame=summary["multi_frame"])
    if missing:
        raise UserError(f"{len(missing)} shard(s) not written yet (e.g. {missing[0]}): run every worker first")

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
        "passthrough_records": totals["passthrough"],
        "transcoded_records": sum(s["records"] for s in splits.values()) - totals["passthrough"],
        # Multi-frame files give their first frame only.
        "multi_frame_first_frame_only": totals["multi_frame"],
        "elapsed_seconds": round(elapsed, 3),
        "files_per_second": round(files_this_run / elapsed, 2) if elapsed > 0 else None,
    }
    write_json_atomic(os.path.join(output_dir, manifest_lib.MANIFEST_NAME), manifest)
    shutil.rmtree(os.path.join(output_dir, PARTIAL_DIR), ignore_errors=True)
    return manifest


def convert(
    dicom_dir: str,
    output_dir: str,
    labels_csv: str | None = None,
    class_info_csv: str | None = None,
    test_dicom_dir: str | None = None,
    options: ConvertOptions = ConvertOptions(),
    workers: int | None = None,
    num_machines: int = 1,
    machine_index: int = 0,
    finalize: bool | None = None,
    progress_stream=None,
) -> dict | None:
    """Converts a folder; returns the manifest (None for a machine that only wrote its share).

    With num_machines N > 1, machine i writes the shards whose index modulo N is i; then one
    call with finalize=True (any machine, same arguments) writes the manifest.
    """
    started = time.perf_counter()
    options.validate()
    if class_info_csv and not labels_csv:
        raise UserError("--class_info_csv needs --labels_csv")
    if num_machines < 1:
        raise UserError(f"--num_workers must be at least 1, not {num_machines}")
    if not 0 <= machine_index < num_machines:
        raise UserError(f"--worker_index must be in [0, {num_machines}), not {machine_index}")
    if test_dicom_dir is not None and not os.path.isdir(test_dicom_dir):
        raise UserError(f"test DICOM folder not found: {test_dicom_dir}")
    labels = labels_lib.read_labels(labels_csv, class_info_csv) if labels_csv else None
    plan = make_plan(dicom_dir, labels, test_dicom_dir, options)
    if not plan.shards:
        raise UserError(f"nothing to convert: no usable DICOM files in {dicom_dir}")
    shards_per_split = {s.split: s.count for s in plan.shards}
    recorded = _recorded_options(options, dicom_dir, labels_csv, class_info_csv, test_dicom_dir, shards_per_split)
    finished = _check_output_dir(output_dir, recorded)
    if finished is not None:
        return finished
    finalize = (num_machines == 1) if finalize is None else finalize

    partial = os.path.join(output_dir, PARTIAL_DIR)
    os.makedirs(partial, exist_ok=True)
    write_json_atomic(os.path.join(partial, "options.json"), recorded)
    own = [s for s in plan.shards if s.index % num_machines == machine_index] if not finalize or num_machines == 1 else []
    for shard in own:  # temporary files of a killed run
        for stale in glob.glob(os.path.join(glob.escape(output_dir), f"{shard.name}.tmp-*")):
            os.remove(stale)
    pending = [
        s for s in own
        if not (os.path.isfile(os.path.join(output_dir, s.name)) and os.path.isfile(os.path.join(partial, f"{s.name}.json")))
    ]
    files = sum(len(s.files) for s in pending)
    workers = max(1, workers or os.cpu_count() or 1)
    with tqdm(total=files, desc="convert", unit="files", file=progress_stream) as progress:
        _write_shards(pending, output_dir, options, workers, progress)
    if not finalize:
        return None
    return _finalize(output_dir, plan, recorded, started, files)
