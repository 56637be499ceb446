"""Input pipeline throughput: `make_dataset` against the seed's ImageDataGenerator and the decode ceiling.

    python benchmarks/pipeline_throughput.py                        # 2000 images, 15 s a measurement
    python benchmarks/pipeline_throughput.py --num_images=600 --seconds=8
    python benchmarks/pipeline_throughput.py --work_dir=/tmp/pipeline_bench --repeats=3

Synthesises RSNA-like DICOMs once (1024 px, one JPEG Baseline frame, labels CSVs), converts
them twice and writes the seed's PNG folders, then measures the images per second each of
these delivers, in one process, side by side:

  passthrough       `make_dataset` (train split, training=True) on `--image_size=0` records: the
                    1024-px JPEG frame decoded at DCT ratio 4, plus, for images with boxes, the
                    stored mask (each run of identical rows and columns kept once, records/masks.py)
                    resized to S by `decode_mask`;
  resized records   `make_dataset` on `--image_size=S` records (S x S 8-bit PNG and its mask);
  ImageDataGenerator  the seed report's baseline, tf_keras `ImageDataGenerator(rescale=1/255)
                    .flow_from_directory` over class folders of full-size (1024 px) grey PNGs,
                    resized on load to (S, S), color_mode="grayscale", one Python thread;
  decode ceiling    `tf.io.decode_jpeg(ratio=4)` alone over every JPEG frame of the passthrough
                    records, held in memory, in an autotuned parallel map on all cores: the most
                    images/s any pipeline on passthrough records can deliver;
  tf.data service   passthrough's `make_dataset` with `data_service=`: a dispatcher and one worker
                    started as their own processes on this machine (`python -m pneumo_tf.data_service`),
                    the worker reading and decoding, this process receiving the batches over gRPC.
                    Its ratio to passthrough is the service's overhead on one machine (--service).

Diagnostics (--diagnostics, on by default) split each pipeline's per-image work the same
tight-loop way: the image plus its mask decoded exactly as the pipeline does
(`decode_example`), the stored mask alone, the resized records' PNG alone, and two other ways
to get the passthrough mask (decoding the stored mask of images without boxes too; records
format 1's full-size 1-bit mask PNG, decoded, area-resized and thresholded), so the report can
say where the time goes and what the stored form saves.

Every measurement makes a fresh iterator, skips --warmup_batches, then counts the images of
the batches delivered in --seconds (or --batches) and the process's CPU time; the iterator is
deleted before the next measurement so no pipeline works in the background of another. Methods
run interleaved, in a rotated order each repeat, and the best of --repeats counts (the machine
is shared and noisy). Images/s decide the targets; the breakdown of where the time goes uses
CPU time per image, which other processes on the machine disturb far less.
Targets: resized records >= 10x ImageDataGenerator; passthrough >= 80% of the decode ceiling;
tf.data service >= 80% of passthrough.
The exit status is 1 when a target fails.

Needs tf_keras for the baseline only (`pip install "tf_keras~=2.21.0"`, matching TensorFlow
2.21); pneumo_tf itself never imports it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import gc
import glob
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402  benchmarks/common.py (the script's folder is on sys.path)
from pneumo_tf import cli  # noqa: E402
from pneumo_tf.cli import option  # noqa: E402
from pneumo_tf.data import pipeline  # noqa: E402
from pneumo_tf.records import masks, radiograph, shards, synthetic  # noqa: E402
from pneumo_tf.records.manifest import read_manifest, shard_paths  # noqa: E402

SOURCE_SIZE = 1024  # the synthetic DICOMs' pixels, as RSNA's
TARGET_VS_IMAGE_DATA_GENERATOR = 10.0  # resized records' images/s over the seed baseline's
TARGET_VS_CEILING = 0.80  # passthrough images/s over the decode ceiling's
TARGET_SERVICE_VS_IN_PROCESS = 0.80  # images/s through the tf.data service over passthrough's in-process
BIT_DEPTH = 8  # both conversions use the converter's default
PNG_CLASSES = ("normal", "opacity")  # the seed's two flow_from_directory class folders (label/target 0, 1)


@dataclasses.dataclass(frozen=True)
class PipelineThroughputConfig:
    num_images: int = option(2000, "Synthetic labeled DICOMs (records use the 80% train split).", minimum=20)
    work: common.WorkFolderConfig = option(common.WorkFolderConfig())
    image_size: int = option(256, "Pixels the pipelines deliver (and the resized records store).", minimum=16)
    batch_size: int = option(32, "Images per batch, for every method.", minimum=1)
    seconds: float = option(15.0, "Seconds of steady-state batches counted per measurement.", exclusive_minimum=0.0)
    batches: int = option(0, "Count this many batches per measurement instead of --seconds (0: use seconds).",
                          minimum=0)
    warmup_batches: int = option(5, "Batches taken and not counted at the start of each measurement.", minimum=0)
    repeats: int = option(2, "Measurements of each method, interleaved; the best counts.", minimum=1)
    diagnostics: bool = option(True, "Also measure the parts of each pipeline's decode (image, mask) and two cheaper "
                               "passthrough masks.")
    service: bool = option(True, "Also measure passthrough through a tf.data service with one worker on this "
                           "machine.")


# ---------------------------------------------------------------------------------------------
# Data: synthetic DICOMs -> passthrough records, resized records, the seed's PNG folders.


@dataclasses.dataclass(frozen=True)
class BenchData:
    data: dict  # synthetic.write_dataset's paths
    passthrough_dir: str
    resized_dir: str | None
    png_dir: str | None


def _dicom_count(train_dir: str) -> int:
    return len(glob.glob(os.path.join(train_dir, "*.dcm"))) if os.path.isdir(train_dir) else 0


def synthetic_data(work_dir: str, num_images: int) -> tuple[dict, bool]:
    """(paths of the RSNA-layout data in work_dir/data, whether it was written now)."""
    data_dir = os.path.join(work_dir, "data")
    paths = {
        "train_dir": os.path.join(data_dir, synthetic.TRAIN_DIR),
        "labels": os.path.join(data_dir, synthetic.LABELS_CSV),
        "class_info": os.path.join(data_dir, synthetic.CLASS_INFO_CSV),
    }
    complete = all(os.path.isfile(paths[key]) for key in ("labels", "class_info"))
    if complete and _dicom_count(paths["train_dir"]) == num_images:
        print(f"reusing {num_images} synthetic DICOMs in {data_dir}", flush=True)
        return paths, False
    shutil.rmtree(data_dir, ignore_errors=True)
    print(f"synthesising {num_images} RSNA-like {SOURCE_SIZE}-px DICOMs into {data_dir} ...", flush=True)
    started = time.perf_counter()
    synthetic.write_dataset(data_dir, synthetic.SyntheticConfig(num_images, image_size=SOURCE_SIZE))
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return paths, True


def records(data: dict, output_dir: str, image_size: int, num_images: int, fresh: bool) -> str:
    """output_dir converted from data at image_size (0: passthrough), reused when complete and current."""
    if os.path.isdir(output_dir):
        try:
            current = not fresh and read_manifest(output_dir)["records"] == num_images
        except Exception:  # noqa: BLE001 - anything unreadable is simply reconverted
            current = False
        if current:
            return output_dir
        shutil.rmtree(output_dir)
    print(f"converting to {output_dir} (image_size={image_size}) ...", flush=True)
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        shards.convert(
            data["train_dir"], output_dir, data["labels"], data["class_info"],
            options=radiograph.ConvertOptions(image_size=image_size), writer=shards.LocalPool(progress_stream=quiet),
        )
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return output_dir


def _write_png(job) -> None:
    """One DICOM -> one full-size grey PNG, as the seed's `convert_save` (without its resize)."""
    import pydicom
    from PIL import Image

    from pneumo_tf.records import dicom

    dicom_path, png_path = job
    dicom.quiet_pydicom()
    image = Image.fromarray(pydicom.dcmread(dicom_path).pixel_array).convert("L")
    image.save(f"{png_path}.tmp.png")
    os.replace(f"{png_path}.tmp.png", png_path)


def png_folders(data: dict, png_dir: str, num_images: int, fresh: bool) -> str:
    """png_dir/<class>/<patientId>.png for every DICOM, 1024 x 1024 8-bit grey, by label/target."""
    have = len(glob.glob(os.path.join(png_dir, "*", "*.png")))
    if not fresh and have == num_images:
        return png_dir
    shutil.rmtree(png_dir, ignore_errors=True)
    with open(data["labels"], newline="") as handle:
        target = {row["patientId"]: int(row["Target"]) for row in csv.DictReader(handle)}
    for name in PNG_CLASSES:
        os.makedirs(os.path.join(png_dir, name))
    jobs = []
    for path in sorted(glob.glob(os.path.join(data["train_dir"], "*.dcm"))):
        patient_id = os.path.splitext(os.path.basename(path))[0]
        jobs.append((path, os.path.join(png_dir, PNG_CLASSES[target[patient_id]], f"{patient_id}.png")))
    print(f"writing {len(jobs)} full-size PNGs for ImageDataGenerator into {png_dir} ...", flush=True)
    started = time.perf_counter()
    # Spawned, not forked: this process holds TensorFlow.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
        list(pool.map(_write_png, jobs, chunksize=16))
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return png_dir


def prepare(work_dir: str, num_images: int, image_size: int | None = None, pngs: bool = True) -> BenchData:
    """Everything the benchmarks read, written once into work_dir and reused by later runs.

    image_size None skips the resized records; pngs False skips the seed's PNG folders.
    """
    data, fresh = synthetic_data(work_dir, num_images)
    passthrough = records(data, os.path.join(work_dir, "records", "passthrough"), 0, num_images, fresh)
    resized = None
    if image_size:
        resized = records(data, os.path.join(work_dir, "records", f"size_{image_size}"), image_size, num_images, fresh)
    png_dir = png_folders(data, os.path.join(work_dir, "png"), num_images, fresh) if pngs else None
    return BenchData(data, passthrough, resized, png_dir)


def load_fields(records_dir: str) -> dict[str, tf.Tensor]:
    """Every record of every split, parsed by the pipeline's own `parse_batch`, kept in memory.

    The mask repeats stay ragged, one row per record, as `parse_batch` gives them.
    """
    manifest = read_manifest(records_dir)
    paths = [path for split in manifest["splits"] for path in shard_paths(records_dir, split, manifest)]
    batches = list(tf.data.TFRecordDataset(paths).batch(256).map(pipeline.parse_batch))
    return {key: tf.concat([batch[key] for batch in batches], axis=0) for key in batches[0]}


def with_full_size_masks(fields: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """fields plus "full_size_mask": each stored mask expanded to a full-size 1-bit PNG, as records
    of format version 1 stored it (for the diagnostic that decodes masks the old way)."""
    pngs = []
    for encoded, row_repeats, col_repeats in zip(fields["mask_encoded"].numpy(), fields["mask_row_repeats"].numpy(),
                                                 fields["mask_col_repeats"].numpy()):
        collapsed = tf.io.decode_png(encoded, channels=1).numpy()[:, :, 0] > 0
        pngs.append(masks.png_1bit(masks.expand(collapsed, row_repeats, col_repeats)))
    return {**fields, "full_size_mask": tf.constant(pngs)}


# ---------------------------------------------------------------------------------------------
# Batch sources. Each is a function returning a fresh iterator of batches.


def tight_loop(fields: dict[str, tf.Tensor], decode, keys, image_size: int, batch_size: int) -> Iterator:
    """decode(one record's fields) over fields held in memory, in an autotuned parallel map, batched.

    Only `keys` are sliced, so a loop copies no bytes its decode does not read.
    """
    options = tf.data.Options()
    options.autotune.enabled = True
    options.deterministic = False
    dataset = (
        tf.data.Dataset.from_tensor_slices({key: fields[key] for key in keys})
        .repeat()
        .map(lambda f: decode(f, image_size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    return iter(dataset)


def jpeg_ratio(image_size: int) -> int:
    """The DCT scale the pipeline decodes a SOURCE_SIZE frame at, for image_size pixels."""
    # pipeline.jpeg_ratio_index's rule in plain Python (the decodes below call this while tracing).
    return max((ratio for ratio in pipeline.JPEG_RATIOS if SOURCE_SIZE >= ratio * image_size), default=1)


# Tight-loop decodes: one record's fields (as `parse_batch` gives them) -> what gets batched.


def jpeg_alone(fields, image_size: int):
    """The decode ceiling: nothing but the JPEG decode the pipeline cannot avoid."""
    return tf.io.decode_jpeg(fields["image_encoded"], channels=1, ratio=jpeg_ratio(image_size))


def png_alone(fields, image_size: int):
    return tf.io.decode_png(fields["image_encoded"], channels=1)


def _image(fields, image_size: int):
    return pipeline.decode_image(
        fields["image_encoded"], fields["image_format"], fields["stored_size"], image_size, BIT_DEPTH
    )


def image_and_mask(fields, image_size: int):
    """Exactly the pipeline's per-image decode: `decode_example` (image, and the mask of images with boxes)."""
    example = pipeline.decode_example(fields, image_size, BIT_DEPTH)
    return example["image"], example["mask"]


def _stored_mask(fields, image_size: int):
    return pipeline.decode_mask(fields["mask_encoded"], fields["mask_row_repeats"], fields["mask_col_repeats"],
                                image_size)


def mask_alone(fields, image_size: int):
    return _stored_mask(fields, image_size)


def image_and_every_mask(fields, image_size: int):
    """Alternative: the stored mask decoded for every image, also those without boxes (all-zero)."""
    return _image(fields, image_size), _stored_mask(fields, image_size)


def full_size_mask(encoded, image_size: int):
    """Records format 1's mask decode: the full-size 1-bit PNG, float, area resize, threshold at 0.5."""
    mask = tf.cast(tf.io.decode_png(encoded, channels=1), tf.float32) / 255.0
    return tf.cast(tf.image.resize(mask, [image_size, image_size], "area") >= 0.5, tf.float32)


def image_and_full_size_mask(fields, image_size: int):
    """Alternative: as format 1 decoded, the full-size mask PNG for images with boxes, zeros otherwise."""
    mask = tf.cond(
        fields["num_boxes"] > 0,
        lambda: full_size_mask(fields["full_size_mask"], image_size),
        lambda: tf.zeros([image_size, image_size, 1], tf.float32),
    )
    return _image(fields, image_size), mask


def image_data_generator(png_dir: str, image_size: int, batch_size: int) -> Iterator:
    """The seed report's flow_from_directory, validation-style (rescale only; its training
    generator adds zoom, flip and rotation, which only makes it slower)."""
    try:
        from tf_keras.preprocessing.image import ImageDataGenerator
    except ImportError as error:
        raise SystemExit(
            f"the ImageDataGenerator baseline needs tf_keras matching TensorFlow {tf.__version__}: "
            f'pip install "tf_keras~={".".join(tf.__version__.split(".")[:2])}.0" ({error})'
        ) from error
    return ImageDataGenerator(rescale=1.0 / 255).flow_from_directory(
        png_dir, target_size=(image_size, image_size), color_mode="grayscale", batch_size=batch_size,
        class_mode="binary", classes=list(PNG_CLASSES), shuffle=True, seed=0,
    )


def images_in(batch) -> int:
    if isinstance(batch, dict):
        return int(batch["image"].shape[0])
    first = batch[0] if isinstance(batch, tuple) else batch
    return int(first.shape[0])


# ---------------------------------------------------------------------------------------------
# Measuring.


@dataclasses.dataclass
class Method:
    name: str
    description: str
    make_batches: Callable[[], Iterator]
    diagnostic: bool = False
    helper_pid: int | None = None  # a process doing part of the work (the tf.data service worker)


@dataclasses.dataclass(frozen=True)
class Measurement:
    images_per_second: float  # wall clock: what a consumer of the batches sees
    cpu_ms_per_image: float  # CPU time of this whole process (every thread) per image
    helper_cpu_ms_per_image: float | None = None  # CPU time of the method's helper process per image

    @property
    def cores_busy(self) -> float:
        """Cores this process kept busy on average: below the machine's count when others took a share."""
        return self.images_per_second * self.cpu_ms_per_image / 1000.0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measure(method: Method, warmup: int, seconds: float, batches: int) -> Measurement:
    """Steady state of a fresh iterator: warm-up batches skipped, then a timed count.

    CPU time is counted too: other processes on a shared machine change the wall-clock
    rate a lot but one image's CPU cost much less, so the breakdowns use CPU time.
    """
    iterator = method.make_batches()
    for _ in range(warmup):
        next(iterator)
    images = counted = 0
    helper_started = process_cpu_seconds(method.helper_pid) if method.helper_pid else None
    started, cpu_started = time.perf_counter(), time.process_time()
    while True:
        images += images_in(next(iterator))
        counted += 1
        elapsed = time.perf_counter() - started
        if (batches and counted >= batches) or (not batches and elapsed >= seconds):
            break
    cpu = time.process_time() - cpu_started
    helper_ms = None
    if method.helper_pid:
        helper_ms = 1000.0 * (process_cpu_seconds(method.helper_pid) - helper_started) / images
    del iterator  # stops its background threads before the next method runs
    gc.collect()
    return Measurement(images / elapsed, 1000.0 * cpu / images, helper_ms)


IMAGE_KEYS = ("image_encoded", "image_format", "stored_size")
PASSTHROUGH, RESIZED, BASELINE, CEILING = "passthrough", "resized records", "ImageDataGenerator", "decode ceiling"
SERVICE = "tf.data service, 1 worker"


def _start_server(*args) -> tuple[subprocess.Popen, str]:
    """python -m pneumo_tf.data_service with args, and the port it serves on once it says so."""
    process = subprocess.Popen([sys.executable, "-m", "pneumo_tf.data_service", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if " serving at " not in line:
        process.kill()
        raise SystemExit(f"python -m pneumo_tf.data_service {' '.join(args)} did not start: {line!r}")
    return process, line.split(" serving at ")[1].split()[0].rpartition(":")[2]


@contextlib.contextmanager
def local_service(work_dir: str):
    """A tf.data service dispatcher and one worker on this machine, each its own process started as a
    user starts them; yields (the dispatcher's address, the worker's pid)."""
    processes = []
    shutil.rmtree(work_dir, ignore_errors=True)  # a journal of an earlier run would bring back its dead worker
    try:
        dispatcher, port = _start_server("--role=dispatcher", "--port=0", f"--work_dir={work_dir}")
        processes.append(dispatcher)
        address = f"grpc://127.0.0.1:{port}"
        worker, _ = _start_server("--role=worker", f"--dispatcher={address}", "--port=0", "--host=127.0.0.1")
        processes.append(worker)
        yield address, worker.pid
    finally:
        for process in processes:
            process.kill()
            process.wait()


def methods(bench: BenchData, image_size: int, batch_size: int, diagnostics: bool,
            service: tuple[str, int] | None = None) -> list[Method]:
    """The measured methods: the four of the targets, the tf.data service (given its address and
    worker pid), then the diagnostics."""
    ratio = jpeg_ratio(image_size)
    passthrough = load_fields(bench.passthrough_dir)

    def dataset(records_dir, **kwargs):
        return lambda: iter(pipeline.make_dataset(records_dir, "train", batch_size, image_size, training=True, seed=0,
                                                  **kwargs))

    def loop(fields, decode, keys):
        return lambda: tight_loop(fields, decode, keys, image_size, batch_size)

    found = [
        Method(PASSTHROUGH, f"make_dataset, image_size=0 records: {SOURCE_SIZE}-px JPEG at ratio {ratio} + "
               f"stored mask (images with boxes)", dataset(bench.passthrough_dir)),
        Method(RESIZED, f"make_dataset, image_size={image_size} records: {image_size}-px PNG + {image_size}-px mask",
               dataset(bench.resized_dir)),
        Method(BASELINE, f"tf_keras flow_from_directory, {SOURCE_SIZE}-px grey PNGs -> {image_size}, one thread",
               lambda: image_data_generator(bench.png_dir, image_size, batch_size)),
        Method(CEILING, f"decode_jpeg(ratio={ratio}) alone over the passthrough frames in memory, all cores",
               loop(passthrough, jpeg_alone, ["image_encoded"])),
    ]
    if service is not None:
        address, worker_pid = service
        found.append(Method(SERVICE, "passthrough's make_dataset with data_service: a dispatcher and 1 worker process "
                            "on this machine decode, this process receives over gRPC",
                            dataset(bench.passthrough_dir, data_service=address), helper_pid=worker_pid))
    if not diagnostics:
        return found
    resized = load_fields(bench.resized_dir)
    mask_keys = ("mask_encoded", "mask_row_repeats", "mask_col_repeats")
    return found + [
        Method("pt: jpeg+mask", "passthrough fields in memory, decode_example as the pipeline (image; mask of images "
               "with boxes)", loop(passthrough, image_and_mask, tuple(passthrough)), True),
        Method("pt: mask alone", "decode_mask alone over every stored mask (collapsed PNG, two small matrix products, "
               "threshold)", loop(passthrough, mask_alone, mask_keys), True),
        Method("pt: jpeg+every mask", "decode_image + decode_mask for every image, also those without boxes",
               loop(passthrough, image_and_every_mask, (*IMAGE_KEYS, *mask_keys)), True),
        Method("pt: jpeg+1024-px mask", f"as records format 1: decode_image + the {SOURCE_SIZE}-px 1-bit mask PNG "
               "(images with boxes), float, area resize, threshold",
               loop(with_full_size_masks(passthrough), image_and_full_size_mask,
                    (*IMAGE_KEYS, "full_size_mask", "num_boxes")), True),
        Method("rs: png alone", f"decode_png alone over the {image_size}-px records' images in memory",
               loop(resized, png_alone, ["image_encoded"]), True),
        Method("rs: png+mask", f"{image_size}-px records' fields in memory, decode_example as the pipeline",
               loop(resized, image_and_mask, tuple(resized)), True),
    ]


# ---------------------------------------------------------------------------------------------
# Report.


def machine_facts() -> str:
    return (common.describe(("tensorflow", "keras", "tf_keras", "pillow", "numpy"))
            + f"; load average {os.getloadavg()[0]:.2f}")


def describe_decoding(bench: BenchData, image_size: int) -> list[str]:
    """What one example costs to decode in each records folder, from the records themselves."""
    lines = []
    for label, records_dir in ((PASSTHROUGH, bench.passthrough_dir), (RESIZED, bench.resized_dir)):
        fields = {key: value.numpy() for key, value in load_fields(records_dir).items()}
        image_kb = np.mean([len(b) for b in fields["image_encoded"]]) / 1024
        stored = int(fields["stored_size"][0])
        boxed = fields["num_boxes"] > 0
        if stored == SOURCE_SIZE:
            image = (f"a {stored}x{stored} JPEG ({image_kb:.0f} KB) decoded at ratio {jpeg_ratio(image_size)} "
                     f"straight to {stored // jpeg_ratio(image_size)} px")
        else:
            image = f"a {stored}x{stored} 8-bit PNG ({image_kb:.0f} KB), no resize"
        rows = np.mean([len(r) for r in fields["mask_row_repeats"][boxed]])
        columns = np.mean([len(c) for c in fields["mask_col_repeats"][boxed]])
        png_bytes = np.mean([len(b) for b in fields["mask_encoded"][boxed]])
        mask = (f"for the {np.mean(boxed):.0%} with boxes, the {stored}x{stored} mask stored collapsed to "
                f"{rows:.1f}x{columns:.1f} runs of rows x columns on average (a {png_bytes:.0f}-byte 1-bit PNG), "
                f"resized to {image_size} by two matrix products and thresholded; zeros for the rest")
        lines.append(f"  {label}: per image {image}; plus {mask}.")
    return lines


def report(runs: dict[str, list[Measurement]], found: list[Method], image_size: int) -> bool:
    """Prints the table; True when every target is met."""
    best = {name: max(run.images_per_second for run in values) for name, values in runs.items()}
    baseline, ceiling = best[BASELINE], best[CEILING]
    targets = {
        RESIZED: (best[RESIZED] / baseline, TARGET_VS_IMAGE_DATA_GENERATOR,
                  f">= {TARGET_VS_IMAGE_DATA_GENERATOR:.0f}x ImageDataGenerator"),
        PASSTHROUGH: (best[PASSTHROUGH] / ceiling, TARGET_VS_CEILING, f">= {TARGET_VS_CEILING:.0%} of the ceiling"),
    }
    if SERVICE in best:
        targets[SERVICE] = (best[SERVICE] / best[PASSTHROUGH], TARGET_SERVICE_VS_IN_PROCESS,
                            f">= {TARGET_SERVICE_VS_IN_PROCESS:.0%} of passthrough")
    header = (f"{'method':<26} {'images/s':>9} {'median':>8} {'vs IDG':>8} {'vs ceiling':>10} "
              f"{'CPU ms/img':>10}  target")
    print(header)
    print("-" * (len(header) + 34))
    passed = True
    for method in found:
        if method.diagnostic and not found[found.index(method) - 1].diagnostic:
            print("diagnostics: tight loops over records held in memory (pt: passthrough, rs: resized records)")
        rate = best[method.name]
        verdict = ""
        if method.name in targets:
            value, target, text = targets[method.name]
            passed &= value >= target
            verdict = f"{text}  {'PASS' if value >= target else 'FAIL'}"
        median = float(np.median([run.images_per_second for run in runs[method.name]]))
        print(f"{method.name:<26} {rate:>9.1f} {median:>8.1f} {rate / baseline:>7.1f}x {rate / ceiling:>10.2f} "
              f"{cpu_ms(runs, method.name):>10.2f}  {verdict}")
    print("images/s: best of the repeats (the ratios use it); median: of the repeats; CPU ms/img: the process's CPU "
          "time (all threads) per image, least of the repeats")
    print(fairness(runs))
    print()
    for method in found:
        print(f"  {method.name}: {method.description}")
    if SERVICE in best:
        print()
        for line in service_scaling(runs, best, image_size):
            print(line)
    return passed


def service_scaling(runs: dict[str, list[Measurement]], best: dict[str, float], image_size: int) -> list[str]:
    """The service's cost on each side and what it implies for more workers (CPU time: see module docstring)."""
    receive_ms = cpu_ms(runs, SERVICE)
    worker_ms = min(run.helper_cpu_ms_per_image for run in runs[SERVICE])
    in_process_ms = cpu_ms(runs, PASSTHROUGH)
    cores = os.cpu_count() or 1
    return [
        f"tf.data service: {best[SERVICE] / best[PASSTHROUGH]:.2f}x passthrough's images/s in-process, on this one "
        f"machine where worker and trainer share its {cores} cores.",
        f"  CPU per image: the worker {worker_ms:.2f} ms (read, parse, decode, batch; in-process: {in_process_ms:.2f} "
        f"ms), the training process {receive_ms:.2f} ms (receive, deserialize).",
        f"  Each added worker machine adds its cores' decoding, ~1000 / {worker_ms:.2f} ms = "
        f"{1000 / worker_ms:.0f} images/s per core like these, until the training host's receiving saturates: "
        f"~{1000 / receive_ms:.0f} images/s per core of it here (or its network: an example is a "
        f"{image_size}x{image_size} float32 image and uint8 mask, {5 * image_size ** 2 / 2**20:.2f} "
        "MB, uncompressed).",
    ]


def fairness(runs: dict[str, list[Measurement]]) -> str:
    """Whether passthrough and the ceiling had the machine alike: both parallel, each should keep every core busy."""
    cores = {name: max(runs[name], key=lambda run: run.images_per_second).cores_busy for name in (PASSTHROUGH, CEILING)}
    text = (f"cores busy in the best runs: passthrough {cores[PASSTHROUGH]:.2f}, decode ceiling {cores[CEILING]:.2f} "
            f"(of {len(os.sched_getaffinity(0))})")
    if abs(cores[PASSTHROUGH] / cores[CEILING] - 1.0) > 0.1:
        return (f"{text}: other processes took different shares of the machine in the two, so their images/s ratio "
                "reflects the load more than the pipelines; rerun when the machine is quiet, or see the CPU-time "
                "projection below")
    return text


def cpu_ms(runs: dict[str, list[Measurement]], name: str) -> float:
    return min(run.cpu_ms_per_image for run in runs[name])


def where_time_goes(runs: dict[str, list[Measurement]]) -> list[str]:
    """Each pipeline's CPU time per image, split by the diagnostics.

    The parts are differences of separately measured loops: estimates, but CPU time
    (unlike images/s) hardly depends on what else the shared machine is running.
    """
    if "pt: jpeg+mask" not in runs:
        return []
    ms = {name: cpu_ms(runs, name) for name in runs}
    lines = ["where the CPU time goes (ms of CPU per image, all threads):"]
    for title, image_name, decode_name, image_text in (
        (PASSTHROUGH, CEILING, "pt: jpeg+mask", "JPEG decode at the ratio (the ceiling)"),
        (RESIZED, "rs: png alone", "rs: png+mask", "PNG decode"),
    ):
        total = ms[title]
        image_ms, beyond_image_ms, rest_ms = ms[image_name], ms[decode_name] - ms[image_name], total - ms[decode_name]
        lines += [
            f"{title}: {total:.2f} ms per image",
            f"  {image_text:<44} {image_ms:6.2f} ms {image_ms / total:5.0%}",
            f"  {'rest of decode_example: image cast, mask':<44} {beyond_image_ms:6.2f} ms "
            f"{beyond_image_ms / total:5.0%}",
            f"  {'the rest: read, parse, shuffle, batch':<44} {rest_ms:6.2f} ms {rest_ms / total:5.0%}",
        ]
    lines.append(f"  (ImageDataGenerator: {ms[BASELINE]:.2f} ms per image, in one thread)")
    rest_ms = ms[PASSTHROUGH] - ms["pt: jpeg+mask"]
    lines.append(f"passthrough with another mask, projected from CPU time (its decode loop + the same {rest_ms:.2f} ms "
                 "rest; the ceiling's share is what its images/s would be as a fraction of the ceiling's on the "
                 "same cores):")
    for name in ("pt: jpeg+mask", "pt: jpeg+every mask", "pt: jpeg+1024-px mask"):
        total = ms[name] + rest_ms
        lines.append(f"  {name:<26} {ms[name]:5.2f} + {rest_ms:.2f} = {total:5.2f} ms: "
                     f"{ms[CEILING] / total:4.0%} of the ceiling")
    return lines


def benchmark(config: PipelineThroughputConfig) -> int:
    cli.check_constraints(config)
    with common.work_folder("pipeline_throughput_", config.work) as work_dir:
        with contextlib.ExitStack() as stack:
            print(machine_facts())
            bench = prepare(work_dir, config.num_images, config.image_size)
            print(f"num_images {config.num_images} (make_dataset reads the train split: "
                  f"{pipeline.num_examples(bench.passthrough_dir, 'train')}; the ceiling and ImageDataGenerator all), "
                  f"image_size {config.image_size}, batch_size {config.batch_size}, "
                  + (f"{config.batches} batches" if config.batches else f"{config.seconds:g} s")
                  + f" per measurement after {config.warmup_batches} warm-up batches, best of {config.repeats}",
                  flush=True)
            service = None
            if config.service:
                service = stack.enter_context(local_service(os.path.join(work_dir, "dispatcher")))
            found = methods(bench, config.image_size, config.batch_size, config.diagnostics, service)
            runs: dict[str, list[Measurement]] = {m.name: [] for m in found}
            for repeat in range(config.repeats):
                shift = repeat % len(found)  # rotate so no method always runs first or last
                for method in found[shift:] + found[:shift]:
                    run = measure(method, config.warmup_batches, config.seconds, config.batches)
                    runs[method.name].append(run)
                    print(f"  repeat {repeat + 1}/{config.repeats} {method.name:<26} "
                          f"{run.images_per_second:8.1f} images/s {run.cpu_ms_per_image:6.2f} CPU ms/image "
                          f"{run.cores_busy:5.2f} cores busy", flush=True)
            print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            print()
            passed = report(runs, found, config.image_size)
            print()
            print("what the pipeline decodes per image (image + mask):")
            for line in describe_decoding(bench, config.image_size):
                print(line)
            print()
            for line in where_time_goes(runs):
                print(line)
            print()
            print(f"targets: {'all PASS' if passed else 'some FAIL'}")
            return 0 if passed else 1

def main():
    return benchmark(cli.config_from_flags(PipelineThroughputConfig))


if __name__ == "__main__":
    cli.define_flags(PipelineThroughputConfig)
    cli.run(main)
