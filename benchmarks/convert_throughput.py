"""Conversion throughput: the seed report's PNG loop against `python -m pneumo_tf.convert`,
on a DICOM folder and on the same images as a PNG folder and as a JPEG folder.

    python benchmarks/convert_throughput.py                      # 6000 images, all cores
    python benchmarks/convert_throughput.py --num_images=600 --repeats=3

Synthesises RSNA-like DICOMs once (1024 px, one JPEG Baseline frame, labels CSVs) and
exports them as PNG files (8-bit grey, Pillow's default compression, as Kaggle's PNG
mirrors) and as JPEG files (each DICOM's frame, as CheXpert's and MIMIC-CXR-JPG's grey
baseline JPEGs), then times whole processes, each writing into a fresh folder, per input:

  seed loop    the seed notebook's `convert_save`: read the file (pydicom dcmread +
               pixel_array for DICOMs, PIL for PNG/JPEG), PIL convert("RGB"), resize to
               224 x 224, standardise, PNG per file, one process: each input's baseline;
  passthrough  `python -m pneumo_tf.convert --image_size=0` (DICOM: JPEG frames copied;
               JPEG: files copied; PNG: decoded and stored as grey PNG at 1024 px);
  256 px       `python -m pneumo_tf.convert --image_size=256` (PNG at 256 x 256);
  beam         DICOM passthrough as an Apache Beam pipeline on the local direct runner with as
               many worker processes (`--beam_pipeline_options=runner=FnApiRunner,direct_num_workers=N,
               direct_running_mode=multi_processing`: FnApiRunner is the engine runner=DirectRunner
               runs when it cannot download its Prism binary, as here), so its ratio to passthrough
               is Beam's overhead on the same files; its shards must equal passthrough's (the
               manifests' sha256). Left out when apache-beam is not installed.

Wall time covers interpreter start-up, imports (TensorFlow included) and every worker
process, as a user sees it. The machine is shared and noisy, so the methods run
interleaved (in a rotated order each repeat) and the best of --repeats counts. A run only
counts if its process exits 0 and its output holds every file (PNG count, or the
manifest's record count per source format with no rejects): a fast failure cannot pass
for a fast run.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import common  # benchmarks/common.py (the script's folder is on sys.path)
from pneumo_tf import cli
from pneumo_tf.cli import option
from pneumo_tf.errors import UserError

SEED_SIZE = 224  # the seed report's image_size
INPUTS = ("dicom", "png", "jpeg")


@dataclasses.dataclass(frozen=True)
class ConvertThroughputConfig:
    num_images: int = option(6000, "Synthetic labeled DICOMs to convert.", minimum=1)
    work: common.WorkFolderConfig = option(common.WorkFolderConfig())
    workers: int = option(0, "Converter worker processes (and synthesis processes); 0 uses all cores.", minimum=0)
    repeats: int = option(1, "Runs of each method, interleaved; the best counts.", minimum=1)
    inputs: tuple[str, ...] = option(INPUTS, "Input folders to time, comma separated; each with its own seed loop.",
                                     choices=INPUTS)
    # Internal: the benchmark runs the seed loop in its own process through this same file.
    run_seed_loop: bool = option(False, "Internal: run only the seed loop from --input_dir into --output_dir.")
    input_dir: str | None = option(None, "Internal, with --run_seed_loop: the DICOM, PNG or JPEG folder.")
    output_dir: str | None = option(None, "Internal, with --run_seed_loop: the PNG folder.")
# The required speed-ups over the seed loop, on DICOMs.
TARGETS = {("dicom", "passthrough"): 20.0, ("dicom", "image_size=256"): 5.0}
BEAM = "dicom: beam passthrough"  # its label


def seed_loop(input_dir: str, output_dir: str, size: int = SEED_SIZE) -> None:
    """The seed report's conversion loop (`convert_save` with color='RGB', image_size=224); PNG and
    JPEG files are read with PIL, as a notebook over the PNG exports reads them."""
    import numpy as np
    import pydicom
    import pydicom.config
    from PIL import Image

    # Silenced as in the converter, so both sides are timed on the work and not on stderr.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(input_dir)):
        path = os.path.join(input_dir, name)
        pixels = pydicom.dcmread(path).pixel_array if name.endswith(".dcm") else np.asarray(Image.open(path))
        image = Image.fromarray(pixels).convert("RGB").resize((size, size))
        standardised = (np.asarray(image) - np.min(image)) / 255.0
        Image.fromarray((standardised * 255).astype(np.uint8)).save(
            os.path.join(output_dir, os.path.splitext(name)[0] + ".png")
        )


# ---------------------------------------------------------------------------------------------
# Data and runs.


def _file_count(folder: str, extension: str) -> int:
    return len(glob.glob(os.path.join(folder, f"*{extension}"))) if os.path.isdir(folder) else 0


def synthetic_data(work_dir: str, num_images: int, workers: int, inputs) -> dict[str, str]:
    """The RSNA-layout data set in work_dir/data and its PNG and JPEG exports (those in `inputs`), each
    written unless it already holds num_images files: {dicom, png, jpeg (folders), labels_csv, class_info_csv}."""
    from pneumo_tf.records import synthetic

    data_dir = os.path.join(work_dir, "data")
    paths = {
        "dicom": os.path.join(data_dir, synthetic.TRAIN_DIR),
        "labels_csv": os.path.join(data_dir, synthetic.LABELS_CSV),
        "class_info_csv": os.path.join(data_dir, synthetic.CLASS_INFO_CSV),
    }
    have = _file_count(paths["dicom"], ".dcm")
    if have == num_images and os.path.isfile(paths["labels_csv"]) and os.path.isfile(paths["class_info_csv"]):
        print(f"reusing {num_images} synthetic DICOMs in {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
        print(f"synthesising {num_images} RSNA-like DICOMs into {data_dir} ...", flush=True)
        started = time.perf_counter()
        synthetic.write_dataset(data_dir, synthetic.SyntheticConfig(num_images), workers=workers)
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    for image_format in ("png", "jpeg"):
        if image_format not in inputs:
            continue
        folder = paths[image_format] = os.path.join(work_dir, f"data_{image_format}")
        if _file_count(folder, synthetic.EXPORT_EXTENSIONS[image_format]) == num_images:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        print(f"exporting them as {image_format.upper()} files into {folder} ...", flush=True)
        started = time.perf_counter()
        synthetic.export_images(paths["dicom"], folder, image_format, workers=workers)
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return paths


def describe_input(input_format: str, folder: str) -> str:
    sizes = [entry.stat().st_size for entry in os.scandir(folder)]
    return (f"input {input_format}: {len(sizes)} files, {sum(sizes) / 2**20:.0f} MB, "
            f"{sum(sizes) / len(sizes) / 1024:.0f} KB a file")


@dataclasses.dataclass
class Method:
    input_format: str  # dicom, png or jpeg: which folder it reads
    name: str
    description: str
    image_size: int | None  # None: the seed loop; else the converter's --image_size
    beam: bool = False  # the converter as a Beam pipeline instead of its process pool

    @property
    def label(self) -> str:
        return f"{self.input_format}: {self.name}"


METHODS = tuple(
    method
    for input_format in INPUTS
    for method in (
        Method(input_format, "seed loop", f"{'pydicom' if input_format == 'dicom' else 'PIL'} decode, PIL RGB, "
               f"{SEED_SIZE} px PNG files, 1 process", None),
        Method(input_format, "passthrough" if input_format != "png" else "image_size=0",
               "pneumo_tf.convert --image_size=0", 0),
        Method(input_format, "image_size=256", "pneumo_tf.convert --image_size=256", 256),
    )
)


@dataclasses.dataclass
class Run:
    seconds: float  # whole-process wall time
    files: int
    inner_seconds: float | None  # the converter's own elapsed_seconds from its manifest
    cpu_seconds: float  # user + system CPU of the process and every process it waited for (its workers)
    shards: tuple = ()  # (name, sha256) of the converter's shards


def _command(method: Method, data: dict[str, str], output_dir: str, workers: int) -> list[str]:
    input_dir = data[method.input_format]
    if method.image_size is None:
        return [sys.executable, os.path.abspath(__file__), "--run_seed_loop",
                f"--input_dir={input_dir}", f"--output_dir={output_dir}"]
    engine = [f"--workers={workers}"]
    if method.beam:
        engine = [f"--beam_pipeline_options=runner=FnApiRunner,direct_num_workers={workers},"
                  "direct_running_mode=multi_processing"]
    return [sys.executable, "-m", "pneumo_tf.convert", f"--input_dir={input_dir}",
            f"--labels_csv={data['labels_csv']}", f"--class_info_csv={data['class_info_csv']}",
            f"--output_dir={output_dir}", f"--image_size={method.image_size}", *engine]


def _check_output(method: Method, output_dir: str, num_images: int) -> tuple[int, float | None, tuple]:
    """(files written, converter's inner seconds, its shards' (name, sha256)); raises AssertionError
    unless every file made it."""
    if method.image_size is None:
        from PIL import Image

        pngs = sorted(glob.glob(os.path.join(output_dir, "*.png")))
        assert len(pngs) == num_images, f"{method.label} wrote {len(pngs)} PNGs, expected {num_images}"
        with Image.open(pngs[0]) as image:
            assert image.size == (SEED_SIZE, SEED_SIZE) and image.mode == "RGB", (image.size, image.mode)
        return len(pngs), None, ()
    with open(os.path.join(output_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["records"] == num_images and manifest["rejects"] == 0, (
        f"{method.label}: manifest counts {manifest['records']} records and {manifest['rejects']} rejects, "
        f"expected {num_images} records"
    )
    assert manifest["formats"][method.input_format] == num_images, f"{method.label}: formats {manifest['formats']}"
    passthrough = num_images if method.image_size == 0 and method.input_format != "png" else 0
    assert manifest["passthrough_records"] == passthrough, (
        f"{method.label}: {manifest['passthrough_records']} passthrough records, expected {passthrough}"
    )
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert sum(s["records"] for s in shards) == num_images
    assert all(os.path.getsize(os.path.join(output_dir, s["name"])) == s["bytes"] for s in shards)
    return manifest["records"], manifest["elapsed_seconds"], tuple(sorted((s["name"], s["sha256"]) for s in shards))


def time_method(method: Method, data: dict[str, str], output_dir: str, workers: int, num_images: int) -> Run:
    """Runs one method as its own process into a fresh folder; checks its output; removes it."""
    shutil.rmtree(output_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    log_path = f"{output_dir}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "w") as log:
        cpu_before = _children_cpu_seconds()
        started = time.perf_counter()
        result = subprocess.run(_command(method, data, output_dir, workers), stdout=log, stderr=subprocess.STDOUT,
                                env=env, check=False)
        seconds = time.perf_counter() - started
        cpu_seconds = _children_cpu_seconds() - cpu_before
    if result.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"{method.label} exited with {result.returncode}; end of its output:\n{tail}")
    files, inner, shards = _check_output(method, output_dir, num_images)
    shutil.rmtree(output_dir)
    return Run(seconds, files, inner, cpu_seconds, shards)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------
# Report.


def report(methods, best: dict[str, Run]) -> bool:
    """Prints the table; True when every target is met. "vs seed" compares with the seed loop over
    the same input folder."""
    header = (f"{'input: method':<22} {'files':>6} {'seconds':>8} {'files/s':>8} {'vs seed':>8}  {'in-proc s':>9}  "
              f"{'CPU ms/file':>11}  target")
    print(header)
    print("-" * (len(header) + 12))
    passed = True
    for method in methods:
        seed = best[f"{method.input_format}: seed loop"]
        run = best[method.label]
        rate = run.files / run.seconds
        ratio = rate / (seed.files / seed.seconds)
        target = TARGETS.get((method.input_format, method.name))
        verdict = ""
        if target is not None:
            ok = ratio >= target
            passed &= ok
            verdict = f">= {target:.0f}x  {'PASS' if ok else 'FAIL'}"
        inner = f"{run.inner_seconds:9.1f}" if run.inner_seconds is not None else f"{'-':>9}"
        cpu = 1000 * run.cpu_seconds / run.files
        print(f"{method.label:<22} {run.files:>6} {run.seconds:>8.1f} {rate:>8.1f} {ratio:>7.1f}x  {inner}  "
              f"{cpu:11.1f}  {verdict}")
    print()
    for method in methods:
        print(f"  {method.label}: {method.description}")
    print("  seconds: whole-process wall time, best of repeats (start-up, imports, all workers);")
    print("  in-proc s: the converter's own elapsed_seconds from manifest.json (no start-up or imports);")
    print("  CPU ms/file: CPU time of the run (all its processes, start-up included) per file: other processes")
    print("  on a shared machine change seconds a lot, a method's CPU time much less.")
    if BEAM in best:
        local, beam = best["dicom: passthrough"], best[BEAM]
        same = "the same shards (sha256)" if beam.shards == local.shards else "OTHER SHARDS THAN THE LOCAL POOL"
        passed &= beam.shards == local.shards
        print(f"\nBeam's overhead: the Beam pipeline converts at {local.seconds / beam.seconds:.2f}x the local pool's "
              f"files/s ({local.inner_seconds / beam.inner_seconds:.2f}x in-process) on the same files, "
              f"writing {same}.")
    return passed


def benchmark(config: ConvertThroughputConfig) -> int:
    workers = config.workers or os.cpu_count() or 1
    with common.work_folder("convert_throughput_", config.work) as work_dir:
        for line in (common.describe(("tensorflow", "pydicom", "pillow", "numpy", "pylibjpeg-libjpeg")),
                     f"converter workers: {workers}"):
            print(line)
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        inputs = [input_format for input_format in INPUTS if input_format in config.inputs]
        methods = [method for method in METHODS if method.input_format in inputs]
        if "dicom" in inputs:
            if importlib.util.find_spec("apache_beam") is None:
                print(f"{BEAM}: left out, apache-beam is not installed (pip install -e \".[beam]\")")
            else:
                methods.append(Method("dicom", "beam passthrough", "pneumo_tf.convert --image_size=0 "
                                      "--beam_pipeline_options=runner=FnApiRunner,direct_num_workers=<workers>,"
                                      "direct_running_mode=multi_processing", 0, beam=True))
        data = synthetic_data(work_dir, config.num_images, workers, inputs)
        for input_format in inputs:
            print(describe_input(input_format, data[input_format]), flush=True)
        runs: dict[str, list[Run]] = {m.label: [] for m in methods}
        for repeat in range(config.repeats):
            shift = repeat % len(methods)  # rotate so no method always runs first (cold cache) or last
            for method in methods[shift:] + methods[:shift]:
                folder_name = method.label.replace(": ", "-").replace("=", "_").replace(" ", "_")
                output_dir = os.path.join(work_dir, "out", folder_name)
                run = time_method(method, data, output_dir, workers, config.num_images)
                runs[method.label].append(run)
                print(f"  repeat {repeat + 1}/{config.repeats} {method.label:<22} {run.seconds:7.1f} s "
                      f"{run.files / run.seconds:8.1f} files/s", flush=True)
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print()
        best = {name: min(method_runs, key=lambda r: r.seconds) for name, method_runs in runs.items()}
        return 0 if report(methods, best) else 1


def main():
    config = cli.config_from_flags(ConvertThroughputConfig)
    if config.run_seed_loop:
        if not (config.input_dir and config.output_dir):
            raise UserError("--run_seed_loop needs --input_dir and --output_dir")
        seed_loop(config.input_dir, config.output_dir)
        return 0
    return benchmark(config)


if __name__ == "__main__":
    cli.define_flags(ConvertThroughputConfig)
    cli.run(main)
