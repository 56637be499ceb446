"""Writing a conversion: DICOM/PNG/JPEG folders + label CSVs -> TFRecord shards + manifest.json + rejects.csv.

`convert` plans (records/plan.py), writes the pending shards with a `ShardWriter`, and writes
rejects.csv and the manifest from the shards' summaries. How it stays correct and fast:
* `write_shard` is a pure function of one shard (its files go through
  records/radiograph.convert_file): each shard is written whole, in plan order, by one worker,
  so the same inputs and options always give byte-identical shards whatever runs the workers:
  `LocalPool` (processes on this machine, the default) or records/beam.BeamPipeline (Dataflow,
  Flink, Spark). The command (python -m pneumo_tf.convert) picks one.
* A shard is written under a temporary name and renamed when complete; a per-shard
  summary kept in `_partial/` lets a rerun (or a retried Beam bundle) skip finished shards.
  `_partial/plan.json` holds the plan and its digest: a rerun resumes only the same plan
  (a file removed, added or relabelled in between is refused, or --start_over).
  The manifest is written last and `_partial/` removed: a folder with a manifest is complete.
* Paths may be URLs (`gs://...`): every file operation goes through pneumo_tf.fileio.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import queue
import signal
import time
from typing import Protocol

from tqdm import tqdm

from pneumo_tf import fileio
from pneumo_tf.cli import check_constraints, option
from pneumo_tf.errors import UserError
from pneumo_tf.fileio import write_csv_atomic, write_json_atomic
from pneumo_tf.records import dicom, images, labels as labels_lib, manifest as manifest_lib, schema, synthetic
from pneumo_tf.records.plan import Plan, Shard, make_plan, plan_changes, plan_json
from pneumo_tf.records.radiograph import ConvertOptions, convert_or_reject
from pneumo_tf.records.tfrecord import TFRecordWriter

PARTIAL_DIR = "_partial"
PLAN_NAME = "plan.json"  # in PARTIAL_DIR: the plan (plan.plan_json) and its digest; Beam's workers read it
PROGRESS_EVERY = 16  # files between a worker's progress reports


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """The flags of python -m pneumo_tf.convert: what to convert, where to, and what writes the shards."""

    dicom_dir: str = option(help="Folder of training images: DICOM, PNG or JPEG files, in any mix (every file in it "
                            "is converted or rejected; its name without .dcm/.png/.jpg/.jpeg is its id).",
                            aliases=("input_dir",))
    output_dir: str = option(help="Where shards, manifest.json and rejects.csv go. Rerunning into it with the same "
                             "options and inputs resumes (finished shards are kept).")
    labels_csv: str | None = option(None, "stage_2_train_labels.csv (patientId,x,y,width,height,Target). Without it "
                                    "every readable image goes to the 'test' split with target and class -1.")
    class_info_csv: str | None = option(None, "stage_2_detailed_class_info.csv (patientId,class): the three-way "
                                        "class used for stratification and stored in label/class.")
    test_dicom_dir: str | None = option(None, "A second folder converted as the unlabeled 'test' split in the same "
                                        "run.", aliases=("test_input_dir",))
    metadata_csv: str | None = option(
        None, "patientId,PatientAge,PatientSex,ViewPosition (e.g. jpg_metadata.csv): the header facts of PNG/JPEG "
        "files, which have no header, stored as DICOMs' are (image/view, patient/age, patient/sex); for a DICOM "
        "it fills what the header lacks, and a fact both give differently rejects the file with the reason.")
    options: ConvertOptions = option(ConvertOptions())
    workers: int = option(0, "Local worker processes building examples (without --beam_pipeline_options); 0 uses "
                          "all cores.", minimum=0)
    beam_pipeline_options: str | None = option(
        None, "Convert as an Apache Beam pipeline on many machines, with these comma-separated Beam options, e.g. "
        "runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,setup_file=./setup.py (or "
        "runner=FlinkRunner,..., runner=SparkRunner,..., runner=DirectRunner,direct_num_workers=2,"
        "direct_running_mode=multi_processing). Same shards, rejects and manifest as the local pool. Folders and "
        "CSVs may be URLs that tf.io.gfile reads (gs://...). Needs pip install \"pneumo_tf[beam]\".")
    start_over: bool = option(False, "Discard the conversion --output_dir holds (finished, or unfinished with other "
                              "options or inputs: a file removed, added or relabelled since it was killed) and convert "
                              "again. Without it such a folder is refused, never resumed into a mix of two plans.")

    def validate(self) -> None:
        check_constraints(self)
        self.options.validate()


class ShardWriter(Protocol):
    """What writes a conversion's pending shards, each with `write_shard`, and returns when all are written."""

    def __call__(self, pending: list[Shard], output_dir: str, options: ConvertOptions) -> None: ...


def write_shard(shard: Shard, output_dir: str, options: ConvertOptions, report=None, fatal=None,
                starting=None) -> dict:
    """Converts one shard's files and writes the shard whole; returns its summary.

    Runs in a worker process (of the local pool or of a Beam runner), so no record crosses a
    process boundary; the writer needs no TensorFlow (records/tfrecord.py), so workers start
    fast and stay small. The shard is written under a name no other attempt uses, its summary
    kept in _partial/, then renamed: it exists complete or not at all, and an attempt retried
    by Beam writes the same bytes again. `report(n)` is told every few files how many were
    done, for the progress bar; `starting(i)` the index of each file before it is converted.
    Files in `fatal` ({path: reason}: their conversion ended a worker process) are rejected unread.
    """
    dicom.quiet_pydicom()
    final = os.path.join(output_dir, shard.name)
    tmp = fileio.temporary_name(final)
    summary = {"name": shard.name, "split": shard.split, "records": 0, "positive": 0, "boxes": 0,
               "classes": collections.Counter(), "rejects": [], "passthrough": 0, "multi_frame": 0,
               "formats": dict.fromkeys(images.FORMATS, 0)}
    unreported = 0
    with TFRecordWriter(tmp) as writer:
        for index, (path, image_id, labels, known) in enumerate(shard.files):
            if starting is not None:
                starting(index)
            if fatal and path in fatal:
                record, facts = None, fatal[path]
            else:
                record, facts = convert_or_reject(path, image_id, labels, options, known)
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


class LocalPool:
    """Writes the shards with `workers` processes of this machine (all cores by default; in this
    process when 1), with a progress bar on `progress_stream` (stderr by default).

    A worker process that dies converting a file (the kernel's out-of-memory killer, a decoder that
    crashes) breaks the pool. The files then being converted are each converted again alone, in a
    process of their own: one that ends that process too is rejected with the reason, and the
    unfinished shards are written again (with half the workers when none did: several large files
    at once then took the memory).
    """

    def __init__(self, workers: int | None = None, progress_stream=None):
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.progress_stream = progress_stream

    def __call__(self, pending: list[Shard], output_dir: str, options: ConvertOptions) -> None:
        files = sum(len(shard.files) for shard in pending)
        with tqdm(total=files, desc="convert", unit="files", file=self.progress_stream) as progress:
            if self.workers == 1 or len(pending) <= 1:
                for shard in pending:
                    write_shard(shard, output_dir, options, progress.update)
                return
            workers, fatal = self.workers, {}
            context = multiprocessing.get_context("spawn")  # a clean interpreter per worker, never a fork
            while pending:
                in_flight = context.RawArray("q", [-1] * len(pending))  # per shard: the index of the file converting
                try:
                    return _in_processes(pending, output_dir, options, workers, progress, context, in_flight, fatal)
                except concurrent.futures.process.BrokenProcessPool:
                    written = _written_shards(output_dir)
                    suspects = [shard.files[in_flight[slot]] for slot, shard in enumerate(pending)
                                if shard.name not in written and in_flight[slot] >= 0]
                    killers = _ending_their_process(suspects, options, context)
                    if not killers and workers == 1:
                        named = f" converting {suspects[0][0]}" if suspects else ""
                        raise UserError(f"the converter's worker process died{named}, but not when converting it "
                                        "alone: rerun the conversion (it resumes)") from None
                    workers = workers if killers else workers // 2
                    fatal.update(killers)
                    pending = [shard for shard in pending if shard.name not in written]


def _ending_their_process(files, options: ConvertOptions, context) -> dict[str, str]:
    """{path: reason} of the files whose conversion, alone in a process of its own, ends that process."""
    found = {}
    for path, image_id, labels, known in files:
        process = context.Process(target=convert_or_reject, args=(path, image_id, labels, options, known))
        process.start()
        process.join()
        if process.exitcode:
            how = (f"killed by {signal.Signals(-process.exitcode).name}" if process.exitcode < 0
                   else f"exit status {process.exitcode}")
            found[path] = f"converting it ended the converter's process ({how}: out of memory, or a decoder crashed)"
    return found


_IN_FLIGHT = None  # in a pool worker: per shard, the index of the file it is converting (shared with the parent)


def _watch_in_flight(array) -> None:
    """A pool worker's initializer: shared memory where each shard's writer says which file it is converting."""
    global _IN_FLIGHT
    _IN_FLIGHT = array


def _write_shard_in_pool(slot: int, shard: Shard, *args):
    return write_shard(shard, *args, starting=functools.partial(_IN_FLIGHT.__setitem__, slot))


def _in_processes(pending, output_dir, options, workers, progress, context, in_flight, fatal) -> None:
    with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(
        min(workers, len(pending)), mp_context=context, initializer=_watch_in_flight, initargs=(in_flight,)
    ) as pool:
        done = manager.Queue()
        futures = [pool.submit(_write_shard_in_pool, slot, shard, output_dir, options, done.put, fatal)
                   for slot, shard in enumerate(pending)]
        remaining = sum(len(shard.files) for shard in pending)
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


def _recorded_options(options, dicom_dir, labels_csv, class_info_csv, test_dicom_dir, num_shards_by_split,
                      metadata_csv=None):
    absolute = lambda p: fileio.absolute(p) if p else None  # noqa: E731
    recorded = {
        **dataclasses.asdict(options),
        "dicom_dir": absolute(dicom_dir),
        "labels_csv": absolute(labels_csv),
        "class_info_csv": absolute(class_info_csv),
        "test_dicom_dir": absolute(test_dicom_dir),
        "shards_per_split": num_shards_by_split,
    }
    if metadata_csv:  # recorded only when given: a conversion without one reads as before
        recorded["metadata_csv"] = absolute(metadata_csv)
    return recorded


def _differences(previous: dict, recorded: dict) -> str:
    keys = sorted(k for k in set(previous) | set(recorded) if previous.get(k) != recorded.get(k))
    return ", ".join(f"{k}: {previous.get(k)!r} there, {recorded.get(k)!r} now" for k in keys)


START_OVER = "rerun with --start_over to discard it and convert again, or use another --output_dir"


def _check_output_dir(output_dir: str, recorded: dict, plan: dict, digest: str, start_over: bool) -> dict | None:
    """Refuses a folder holding another conversion (other options, or a plan of other inputs), or with
    `start_over` empties it; returns the manifest if this very conversion is complete there.

    An unfinished conversion resumes only from the same plan: its finished shards hold the files
    the plan gave them, so after a file was removed, added or relabelled they would mix with shards
    of the new plan (an image in two splits, twice in one, or in none).
    """
    if not fileio.exists(output_dir):
        return None
    if not fileio.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    partial = os.path.join(output_dir, PARTIAL_DIR)
    if fileio.isfile(os.path.join(output_dir, manifest_lib.MANIFEST_NAME)):
        manifest = manifest_lib.read_manifest(output_dir)
        differences = _differences(manifest["options"], recorded)
        problem = differences and f"{output_dir} holds a conversion made with other options ({differences})"
        if not problem and manifest.get("plan_sha256") != digest:
            problem = f"{output_dir} holds a conversion of other inputs (files added, removed or relabelled since)"
        if not (problem or start_over):
            return manifest
    elif fileio.isdir(partial):
        state_path, plan_path = os.path.join(partial, "options.json"), os.path.join(partial, PLAN_NAME)
        differences = _differences(fileio.read_json(state_path), recorded) if fileio.isfile(state_path) else ""
        problem = differences and f"{output_dir} holds an unfinished conversion with other options ({differences})"
        if not problem and fileio.isfile(plan_path):
            saved = fileio.read_json(plan_path)
            if saved["sha256"] != digest:
                problem = (f"{output_dir} holds an unfinished conversion of other inputs "
                           f"({plan_changes(saved['plan'], plan)}): its finished shards would mix with shards of "
                           "the new plan")
        elif not problem and any(name.endswith(".tfrecord.json") for name in fileio.listdir(partial)):
            problem = f"{output_dir} holds an unfinished conversion whose plan is unknown (an older pneumo_tf's)"
    elif fileio.listdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is not empty and holds no pneumo_tf conversion")
    else:
        return None
    if problem and not start_over:
        raise UserError(f"{problem}: {START_OVER}")
    if start_over:
        for path in (*fileio.glob(output_dir, "*.tfrecord*"), *fileio.glob(output_dir, manifest_lib.MANIFEST_NAME),
                     *fileio.glob(output_dir, manifest_lib.REJECTS_NAME)):
            fileio.remove(path)
        fileio.rmtree(partial)
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


def _finalize(output_dir: str, plan: Plan, recorded: dict, digest: str, started: float, files_this_run: int) -> dict:
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
        "plan_sha256": digest,  # of the plan (every file's split, shard and labels) and the options
        "versions": _versions(),
        "splits": splits,
        "records": sum(s["records"] for s in splits.values()),
        "rejects": len(rejects),
        "labeled_without_dicom": plan.labeled_without_dicom,
        "formats": {name: formats[name] for name in images.FORMATS},  # records by source file format
        "synthetic": synthetic.read_marker(recorded["labels_csv"]) or False,
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
    writer: ShardWriter | None = None,
    metadata_csv: str | None = None,
    start_over: bool = False,
) -> dict:
    """Converts a folder and returns the manifest.

    `metadata_csv` (patientId,PatientAge,PatientSex,ViewPosition) gives PNG/JPEG files the header facts
    they lack; for a DICOM it fills what the header lacks, and a fact both give differently rejects the
    file with the reason.

    The pending shards are written by `writer`: a `LocalPool` (the default: all cores of this
    machine) or a records/beam.BeamPipeline; either way with the same bytes. An unfinished
    conversion in `output_dir` resumes when its options and plan are this one's; `start_over`
    discards one that is not (or a finished one) instead of refusing.
    """
    started = time.perf_counter()
    options.validate()
    if class_info_csv and not labels_csv:
        raise UserError("--class_info_csv needs --labels_csv")
    if test_dicom_dir is not None and not fileio.isdir(test_dicom_dir):
        raise UserError(f"test DICOM folder not found: {test_dicom_dir}")
    labels = labels_lib.read_labels(labels_csv, class_info_csv) if labels_csv else None
    facts = labels_lib.read_metadata(metadata_csv) if metadata_csv else None
    plan = make_plan(dicom_dir, labels, test_dicom_dir, options, facts)
    if not plan.shards:
        raise UserError(f"nothing to convert: no usable DICOM, PNG or JPEG files in {dicom_dir}")
    shards_per_split = {s.split: s.count for s in plan.shards}
    recorded = _recorded_options(options, dicom_dir, labels_csv, class_info_csv, test_dicom_dir, shards_per_split,
                                 metadata_csv)
    planned = plan_json(plan)
    digest = hashlib.sha256(json.dumps([planned, recorded], sort_keys=True).encode()).hexdigest()
    finished = _check_output_dir(output_dir, recorded, planned, digest, start_over)
    if finished is not None:
        return finished

    fileio.makedirs(os.path.join(output_dir, PARTIAL_DIR))
    write_json_atomic(os.path.join(output_dir, PARTIAL_DIR, "options.json"), recorded)
    write_json_atomic(os.path.join(output_dir, PARTIAL_DIR, PLAN_NAME), {"sha256": digest, "plan": planned})
    for stale in fileio.glob(output_dir, "*.tmp-*"):  # temporary files of a killed run
        fileio.remove(stale)
    written = _written_shards(output_dir)
    pending = [shard for shard in plan.shards if shard.name not in written]
    (writer or LocalPool())(pending, output_dir, options)
    return _finalize(output_dir, plan, recorded, digest, started, sum(len(s.files) for s in pending))
