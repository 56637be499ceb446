"""Peak memory of training is independent of the data set's size.

Converts synthetic data sets of --small and --large images (256-px radiographs, so making
20,000 takes about a minute a core), then runs the same short training job
(`python -m pneumo_tf.train`, mask_resnet, a fixed number of steps, validation and the
epoch-end mAP over the whole val split) on each as its own process, and prints the peak
resident memory of each and their ratio. Target: the large within 1.15x of the small.

    python benchmarks/memory.py                 # 1,000 vs 20,000 images
    python benchmarks/memory.py --large=5000    # quicker
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import common  # benchmarks/common.py (the script's folder is on sys.path)
from pneumo_tf import cli
from pneumo_tf.cli import option
from pneumo_tf.records import shards, synthetic

TARGET = 1.15


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    small: int = option(1000, "Images in the small data set.", minimum=20)
    large: int = option(20000, "Images in the large data set.", minimum=20)
    steps: int = option(60, "Training steps (the same for both).", minimum=1)
    work: common.WorkFolderConfig = option(common.WorkFolderConfig())


def records_for(work_dir: str, count: int) -> str:
    data, records = os.path.join(work_dir, f"data_{count}"), os.path.join(work_dir, f"records_{count}")
    if not os.path.isfile(os.path.join(records, "manifest.json")):
        paths = synthetic.write_dataset(data, synthetic.SyntheticConfig(count, seed=count, image_size=256))
        manifest = shards.convert(paths["train_dir"], records, paths["train_labels"], paths["detailed_class_info"])
        assert manifest["records"] == count, manifest["records"]
    return records


def peak_rss_of_training(records: str, model_dir: str, steps: int) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one training process."""
    command = [
        sys.executable, "-m", "pneumo_tf.train", f"--records_dir={records}", f"--model_dir={model_dir}",
        "--model=mask_resnet", "--model_option=channels=8", "--model_option=depth=3", "--image_size=128",
        "--batch_size=16", "--epochs=1", f"--steps_per_epoch={steps}", "--validation_steps=20",
    ]
    started = time.perf_counter()
    # A fresh child per run: RUSAGE_CHILDREN's maximum then covers exactly that child.
    code = (
        "import resource, subprocess, sys; "
        f"subprocess.run({command!r}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip()) / 1024, time.perf_counter() - started


def benchmark(config: MemoryConfig) -> int:
    cli.check_constraints(config)
    with common.work_folder("pneumo_memory_", config.work) as work_dir:
        print(f"preparing records of {config.small} and {config.large} synthetic images in {work_dir} ...", flush=True)
        small, large = records_for(work_dir, config.small), records_for(work_dir, config.large)
        results = {}
        for name, records in (("small", small), ("large", large)):
            model_dir = os.path.join(work_dir, f"model_{name}")
            shutil.rmtree(model_dir, ignore_errors=True)
            results[name] = peak_rss_of_training(records, model_dir, config.steps)
            with open(os.path.join(model_dir, "pneumo_tf.json")) as handle:
                assert json.load(handle)["epochs_run"] == 1
        ratio = results["large"][0] / results["small"][0]
        print(f"\n{'records':>8}  {'peak RSS MB':>11}  {'seconds':>7}")
        for name, count in (("small", config.small), ("large", config.large)):
            print(f"{count:>8}  {results[name][0]:>11.0f}  {results[name][1]:>7.1f}")
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        print(f"\nlarge / small peak RSS: {ratio:.3f} (target <= {TARGET}) {verdict}")
        print(f"same job: mask_resnet 128 px, batch 16, {config.steps} steps, validation + epoch-end mAP over the val "
              "split")
        return 0 if ratio <= TARGET else 1


def main():
    return benchmark(cli.config_from_flags(MemoryConfig))


if __name__ == "__main__":
    cli.define_flags(MemoryConfig)
    cli.run(main)
