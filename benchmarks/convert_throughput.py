"""Conversion throughput: the seed report's PNG loop against `python -m pneumo_tf.convert`.

    python benchmarks/convert_throughput.py                      # 6000 images, all cores
    python benchmarks/convert_throughput.py --num_images=600 --repeats=3

Synthesises RSNA-like DICOMs once (1024 px, one JPEG Baseline frame, labels CSVs), then
times four whole processes, each writing into a fresh folder:

  seed loop    the seed notebook's `convert_save`: pydicom dcmread + pixel_array, PIL
               convert("RGB"), resize to 224 x 224, standardise, PNG per file, one process;
  passthrough  `python -m pneumo_tf.convert --image_size=0` (JPEG frames copied);
  256 px       `python -m pneumo_tf.convert --image_size=256` (PNG at 256 x 256);
  beam         passthrough as an Apache Beam pipeline on the local direct runner with as many
               worker processes (`--beam_pipeline_options=runner=FnApiRunner,direct_num_workers=N,
               direct_running_mode=multi_processing`: FnApiRunner is the engine runner=DirectRunner
               runs when it cannot download its Prism binary, as here), so its ratio to
               passthrough is Beam's overhead on the same files; its shards must equal
               passthrough's (the manifests' sha256). Left out when apache-beam is not installed.

Wall time covers interpreter start-up, imports (TensorFlow included) and every worker
process, as a user sees it. The machine is shared and noisy, so the three methods run
interleaved (in a rotated order each repeat) and the best of --repeats counts. A run only
counts if its process exits 0 and its output holds every file (PNG count, or the
manifest's record count with no rejects): a fast failure cannot pass for a fast run.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import machine  # benchmarks/machine.py (the script's folder is on sys.path)

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 6000, "Synthetic labeled DICOMs to convert.")
flags.DEFINE_string("work_dir", None, "Folder for the synthetic data (reused when it holds the same count) and the "
                    "outputs. A folder given here is kept; the default temporary one is removed unless --keep.")
flags.DEFINE_bool("keep", False, "Keep the temporary work folder (synthetic DICOMs and run logs) at the end.")
flags.DEFINE_integer("workers", 0, "Converter worker processes (and synthesis processes); 0 uses all cores.")
flags.DEFINE_integer("repeats", 1, "Runs of each method, interleaved; the best counts.")
# Internal: the benchmark runs the seed loop in its own process through this same file.
flags.DEFINE_bool("run_seed_loop", False, "Internal: run only the seed loop from --dicom_dir into --output_dir.")
flags.DEFINE_string("dicom_dir", None, "Internal, with --run_seed_loop: the DICOM folder.")
flags.DEFINE_string("output_dir", None, "Internal, with --run_seed_loop: the PNG folder.")

SEED_SIZE = 224  # the seed report's image_size
TARGETS = {"passthrough": 20.0, "image_size=256": 5.0}  # the required speed-ups over the seed loop
BEAM = "beam passthrough"


def seed_loop(dicom_dir: str, output_dir: str, size: int = SEED_SIZE) -> None:
    """The seed report's conversion loop (`convert_save` with color='RGB', image_size=224)."""
    import numpy as np
    import pydicom
    import pydicom.config
    from PIL import Image

    # Silenced as in the converter, so both sides are timed on the work and not on stderr.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(dicom_dir)):
        ds = pydicom.dcmread(os.path.join(dicom_dir, name))
        image = Image.fromarray(ds.pixel_array).convert("RGB").resize((size, size))
        standardised = (np.asarray(image) - np.min(image)) / 255.0
        Image.fromarray((standardised * 255).astype(np.uint8)).save(
            os.path.join(output_dir, os.path.splitext(name)[0] + ".png")
        )


# ---------------------------------------------------------------------------------------------
# Data and runs.


def synthetic_data(work_dir: str, num_images: int, workers: int) -> dict[str, str]:
    """The RSNA-layout data set in work_dir/data, written unless it already holds num_images files."""
    from pneumo_tf.records import synthetic

    data_dir = os.path.join(work_dir, "data")
    train_dir = os.path.join(data_dir, synthetic.TRAIN_DIR)
    paths = {
        "train_dir": train_dir,
        "labels_csv": os.path.join(data_dir, synthetic.LABELS_CSV),
        "class_info_csv": os.path.join(data_dir, synthetic.CLASS_INFO_CSV),
    }
    have = len(glob.glob(os.path.join(train_dir, "*.dcm"))) if os.path.isdir(train_dir) else 0
    if have == num_images and os.path.isfile(paths["labels_csv"]) and os.path.isfile(paths["class_info_csv"]):
        print(f"reusing {num_images} synthetic DICOMs in {data_dir}")
        return paths
    shutil.rmtree(data_dir, ignore_errors=True)
    print(f"synthesising {num_images} RSNA-like DICOMs into {data_dir} ...", flush=True)
    started = time.perf_counter()
    synthetic.write_dataset(data_dir, synthetic.SyntheticConfig(num_images), workers=workers)
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return paths


def describe_input(train_dir: str) -> str:
    sizes = [entry.stat().st_size for entry in os.scandir(train_dir)]
    return (f"input: {len(sizes)} DICOMs, {sum(sizes) / 2**20:.0f} MB, {sum(sizes) / len(sizes) / 1024:.0f} KB a file "
            "(RSNA: ~130 KB)")


@dataclasses.dataclass
class Method:
    name: str
    description: str
    image_size: int | None  # None: the seed loop; else the converter's --image_size
    beam: bool = False  # the converter as a Beam pipeline on the local direct runner


def methods() -> tuple[Method, ...]:
    found = (
        Method("seed loop", f"pydicom decode, PIL RGB, {SEED_SIZE} px PNG files, 1 process", None),
        Method("passthrough", "pneumo_tf.convert --image_size=0", 0),
        Method("image_size=256", "pneumo_tf.convert --image_size=256", 256),
    )
    if importlib.util.find_spec("apache_beam") is None:
        print(f"{BEAM}: left out, apache-beam is not installed (pip install -e \".[beam]\")")
        return found
    return found + (Method(BEAM, "pneumo_tf.convert --image_size=0 --beam_pipeline_options=runner=FnApiRunner,"
                           "direct_num_workers=<workers>,direct_running_mode=multi_processing", 0, beam=True),)


@dataclasses.dataclass
class Run:
    seconds: float  # whole-process wall time
    files: int
    inner_seconds: float | None  # the converter's own elapsed_seconds from its manifest
    shards: tuple = ()  # (name, sha256) of the converter's shards


def _command(method: Method, data: dict[str, str], output_dir: str, workers: int) -> list[str]:
    if method.image_size is None:
        return [sys.executable, os.path.abspath(__file__), "--run_seed_loop",
                f"--dicom_dir={data['train_dir']}", f"--output_dir={output_dir}"]
    engine = [f"--workers={workers}"]
    if method.beam:
        engine = [f"--beam_pipeline_options=runner=FnApiRunner,direct_num_workers={workers},"
                  "direct_running_mode=multi_processing"]
    return [sys.executable, "-m", "pneumo_tf.convert", f"--dicom_dir={data['train_dir']}",
            f"--labels_csv={data['labels_csv']}", f"--class_info_csv={data['class_info_csv']}",
            f"--output_dir={output_dir}", f"--image_size={method.image_size}", *engine]


def _check_output(method: Method, output_dir: str, num_images: int) -> tuple[int, float | None, tuple]:
    """(files written, converter's inner seconds, its shards' names and sha256); raises AssertionError
    unless every file made it."""
    if method.image_size is None:
        from PIL import Image

        pngs = sorted(glob.glob(os.path.join(output_dir, "*.png")))
        assert len(pngs) == num_images, f"seed loop wrote {len(pngs)} PNGs, expected {num_images}"
        with Image.open(pngs[0]) as image:
            assert image.size == (SEED_SIZE, SEED_SIZE) and image.mode == "RGB", (image.size, image.mode)
        return len(pngs), None, ()
    with open(os.path.join(output_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["records"] == num_images and manifest["rejects"] == 0, (
        f"{method.name}: manifest counts {manifest['records']} records and {manifest['rejects']} rejects, "
        f"expected {num_images} records"
    )
    passthrough = num_images if method.image_size == 0 else 0
    assert manifest["passthrough_records"] == passthrough, (
        f"{method.name}: {manifest['passthrough_records']} passthrough records, expected {passthrough}"
    )
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert sum(s["records"] for s in shards) == num_images
    assert all(os.path.getsize(os.path.join(output_dir, s["name"])) == s["bytes"] for s in shards)
    return manifest["records"], manifest["elapsed_seconds"], tuple((s["name"], s["sha256"]) for s in shards)


def time_method(method: Method, data: dict[str, str], output_dir: str, workers: int, num_images: int) -> Run:
    """Runs one method as its own process into a fresh folder; checks its output; removes it."""
    shutil.rmtree(output_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    log_path = f"{output_dir}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "w") as log:
        started = time.perf_counter()
        result = subprocess.run(_command(method, data, output_dir, workers), stdout=log, stderr=subprocess.STDOUT,
                                env=env, check=False)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"{method.name} exited with {result.returncode}; end of its output:\n{tail}")
    files, inner, written = _check_output(method, output_dir, num_images)
    shutil.rmtree(output_dir)
    return Run(seconds, files, inner, written)


# ---------------------------------------------------------------------------------------------
# Report.


def report(best: dict[str, Run], found: tuple[Method, ...]) -> bool:
    """Prints the table and Beam's overhead; True when every target is met."""
    seed_rate = best["seed loop"].files / best["seed loop"].seconds
    header = f"{'method':<16} {'files':>6} {'seconds':>8} {'files/s':>8} {'vs seed':>8}  {'in-proc s':>9}  target"
    print(header)
    print("-" * (len(header) + 12))
    passed = True
    for method in found:
        run = best[method.name]
        rate = run.files / run.seconds
        ratio = rate / seed_rate
        target = TARGETS.get(method.name)
        verdict = ""
        if target is not None:
            ok = ratio >= target
            passed &= ok
            verdict = f">= {target:.0f}x  {'PASS' if ok else 'FAIL'}"
        inner = f"{run.inner_seconds:9.1f}" if run.inner_seconds is not None else f"{'-':>9}"
        print(f"{method.name:<16} {run.files:>6} {run.seconds:>8.1f} {rate:>8.1f} {ratio:>7.1f}x  {inner}  {verdict}")
    print()
    for method in found:
        print(f"  {method.name}: {method.description}")
    print("  seconds: whole-process wall time, best of repeats (start-up, imports, all workers);")
    print("  in-proc s: the converter's own elapsed_seconds from manifest.json (no start-up or imports).")
    if BEAM in best:
        local, beam = best["passthrough"], best[BEAM]
        same = "the same shards (sha256)" if beam.shards == local.shards else "OTHER SHARDS THAN THE LOCAL POOL"
        passed &= beam.shards == local.shards
        print(f"\nBeam's overhead: the Beam pipeline converts at {local.seconds / beam.seconds:.2f}x the local pool's "
              f"files/s ({local.inner_seconds / beam.inner_seconds:.2f}x in-process) on the same files, "
              f"writing {same}.")
    return passed


def benchmark() -> int:
    workers = FLAGS.workers or os.cpu_count() or 1
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="convert_throughput_")
    os.makedirs(work_dir, exist_ok=True)
    remove_work_dir = FLAGS.work_dir is None and not FLAGS.keep  # never delete a folder the user named
    try:
        for line in (machine.describe(("tensorflow", "pydicom", "pillow", "numpy", "pylibjpeg-libjpeg")),
                     f"converter workers: {workers}"):
            print(line)
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        data = synthetic_data(work_dir, FLAGS.num_images, workers)
        print(describe_input(data["train_dir"]), flush=True)
        found = methods()
        runs: dict[str, list[Run]] = {m.name: [] for m in found}
        for repeat in range(FLAGS.repeats):
            shift = repeat % len(found)  # rotate so no method always runs first (cold cache) or last
            for method in found[shift:] + found[:shift]:
                output_dir = os.path.join(work_dir, "out", method.name.replace("=", "_").replace(" ", "_"))
                run = time_method(method, data, output_dir, workers, FLAGS.num_images)
                runs[method.name].append(run)
                print(f"  repeat {repeat + 1}/{FLAGS.repeats} {method.name:<15} {run.seconds:7.1f} s "
                      f"{run.files / run.seconds:8.1f} files/s", flush=True)
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print()
        best = {name: min(method_runs, key=lambda r: r.seconds) for name, method_runs in runs.items()}
        return 0 if report(best, found) else 1
    finally:
        if remove_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print(f"kept {work_dir} (synthetic data and run logs)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.run_seed_loop:
        if not (FLAGS.dicom_dir and FLAGS.output_dir):
            raise app.UsageError("--run_seed_loop needs --dicom_dir and --output_dir")
        seed_loop(FLAGS.dicom_dir, FLAGS.output_dir)
        return 0
    if FLAGS.num_images < 1 or FLAGS.repeats < 1 or FLAGS.workers < 0:
        raise app.UsageError("--num_images and --repeats must be >= 1, --workers >= 0")
    return benchmark()


if __name__ == "__main__":
    app.run(main)
