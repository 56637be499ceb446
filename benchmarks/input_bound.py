"""Input-bound ratio: a training step fed by the real pipeline over the same step fed from memory.

    python benchmarks/input_bound.py                                # 2000 images, batch 16, 256 px
    python benchmarks/input_bound.py --work_dir=/tmp/pneumo_bench    # reuse pipeline_throughput's data
    python benchmarks/input_bound.py --repeats=3                     # a quick look

Synthesises RSNA-like DICOMs and converts them to passthrough records (as
pipeline_throughput.py does, sharing its --work_dir layout), builds `mask_resnet` with its
default options at --image_size, wraps it in training's Trainer (Adam, the architecture's
loss: the seed's IoU + BCE mask loss, and the mean-IoU metric; augmentation off: it would
lengthen both arms' steps alike),
and times train steps fed two ways:

  pipeline  `make_dataset(train, training=True)` on the passthrough records, batches mapped by
            the architecture's `to_fit`: every step waits for (and shares the cores with)
            reading, parsing and decoding;
  memory    the same dataset's first batch, `take(1).cache().repeat()`: no input work at all.

One model serves both arms, so weights, graph and compilation are identical. Each arm keeps
one iterator for the whole run. After a warm-up (tracing, pipeline start) of --warmup_steps
per arm, the arms run interleaved blocks of --steps steps, in alternating order for
--repeats rounds. A step is `next(iterator)` plus `train_on_batch` (the compiled train function
`fit` uses). The ratio is the median over rounds of the pipeline block's mean step time over the
memory block's: load from other processes changes step times by up to 2x for tens of seconds at
a time, and the two blocks of a round run back to back.
Target: <= 1.10. It also prints how much of a pipeline step was spent waiting for the batch, the
CPU-time ratio of the two arms (robust to other processes on a shared machine) and the extra CPU
time per image the pipeline costs. The exit status is 1 when the target fails.
"""
from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  benchmarks/common.py (this folder is on sys.path when run as a script)
import pipeline_throughput  # noqa: E402
from pneumo_tf import cli, models  # noqa: E402
from pneumo_tf.cli import option  # noqa: E402
from pneumo_tf.data import pipeline  # noqa: E402
from pneumo_tf.data.augment import AugmentConfig  # noqa: E402
from pneumo_tf.training.loop import Trainer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class InputBoundConfig:
    num_images: int = option(2000, "Synthetic labeled DICOMs (the train split, 80%, feeds the pipeline).", minimum=20)
    work: common.WorkFolderConfig = option(common.WorkFolderConfig())
    image_size: int = option(256, "Model input and pipeline output size.", minimum=16)
    batch_size: int = option(16, "Images per step (16: training's default and the seed's batch).", minimum=1)
    steps: int = option(2, "Timed steps per block.", minimum=1)
    warmup_steps: int = option(3, "Untimed steps per arm before the first block (after the first trace).", minimum=0)
    repeats: int = option(8, "Rounds of one block per arm, in alternating order (short blocks, many rounds: load "
                          "from other processes drifts less within a round).", minimum=1)


MODEL = "mask_resnet"
TARGET = 1.10  # most the pipeline-fed step may take, relative to the memory-fed one


def time_steps(model: keras.Model, iterator, steps: int) -> tuple[list[float], list[float], float]:
    """(seconds per step, seconds of it spent waiting for the batch, process CPU seconds in all)."""
    step_seconds, wait_seconds = [], []
    cpu_started = time.process_time()
    for _ in range(steps):
        started = time.perf_counter()
        x, y = next(iterator)
        fetched = time.perf_counter()
        model.train_on_batch(x, y)
        step_seconds.append(time.perf_counter() - started)
        wait_seconds.append(fetched - started)
    return step_seconds, wait_seconds, time.process_time() - cpu_started


def benchmark(config: InputBoundConfig) -> int:
    cli.check_constraints(config)
    with common.work_folder("input_bound_", config.work) as work_dir:
        print(pipeline_throughput.machine_facts())
        bench = pipeline_throughput.prepare(work_dir, config.num_images, image_size=None, pngs=False)
        size, batch_size = config.image_size, config.batch_size
        train_records = pipeline.num_examples(bench.passthrough_dir, "train")

        keras.utils.set_random_seed(0)
        architecture = models.get(MODEL)
        model = Trainer(architecture.build(size), architecture, AugmentConfig.off())
        model.compile(optimizer=keras.optimizers.Adam())
        print(f"num_images {config.num_images} (train split {train_records} passthrough records), model {MODEL} "
              f"(default options, {model.count_params():,} parameters), image_size {size}, batch_size {batch_size}, "
              f"jit_compile {model.jit_compile}, {config.steps} timed steps per block, {config.repeats} rounds, "
              f"{config.warmup_steps} warm-up steps per arm", flush=True)

        real = pipeline.make_dataset(bench.passthrough_dir, "train", batch_size, size, training=True, seed=0)
        real = real.map(architecture.to_fit)
        arms = {"pipeline": iter(real), "memory": iter(real.take(1).cache().repeat())}

        started = time.perf_counter()
        for iterator in arms.values():  # the first call traces the train function
            for _ in range(config.warmup_steps):
                model.train_on_batch(*next(iterator))
        print(f"warm-up (trace + {config.warmup_steps} steps per arm) {time.perf_counter() - started:.0f} s",
              flush=True)

        steps = {name: [] for name in arms}
        waits = {name: [] for name in arms}
        cpu = {name: 0.0 for name in arms}
        round_ratios = []
        for repeat in range(config.repeats):
            order = list(arms) if repeat % 2 == 0 else list(arms)[::-1]
            block_means = {}
            for name in order:
                step_seconds, wait_seconds, cpu_seconds = time_steps(model, arms[name], config.steps)
                steps[name] += step_seconds
                waits[name] += wait_seconds
                cpu[name] += cpu_seconds
                block_means[name] = float(np.mean(step_seconds))
            round_ratios.append(block_means["pipeline"] / block_means["memory"])
            print(f"  round {repeat + 1:>2}/{config.repeats} s/step: pipeline {block_means['pipeline']:6.3f}, memory "
                  f"{block_means['memory']:6.3f}, ratio {round_ratios[-1]:.3f}", flush=True)
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print()
        return report(steps, waits, cpu, round_ratios, batch_size)

def report(steps: dict, waits: dict, cpu: dict, round_ratios: list[float], batch_size: int) -> int:
    header = (f"{'fed from':<10} {'steps':>5} {'median s':>9} {'mean s':>8} {'min s':>7} {'images/s':>9} "
              f"{'wait %':>7} {'CPU s/step':>10}")
    print(header)
    print("-" * len(header))
    for name in steps:
        median = float(np.median(steps[name]))
        wait_share = np.sum(waits[name]) / np.sum(steps[name])
        print(f"{name:<10} {len(steps[name]):>5} {median:>9.3f} {np.mean(steps[name]):>8.3f} "
              f"{np.min(steps[name]):>7.3f} {batch_size / median:>9.1f} {wait_share:>7.1%} "
              f"{cpu[name] / len(steps[name]):>10.2f}")
    # Other processes on a shared machine change the step time by up to 2x for tens of seconds
    # at a time; the two blocks of a round run back to back, so their ratio mostly cancels it.
    ratio = float(np.median(round_ratios))
    cpu_per_step = {name: cpu[name] / len(steps[name]) for name in steps}
    extra_cpu = (cpu_per_step["pipeline"] - cpu_per_step["memory"]) / batch_size
    print()
    print(f"input-bound ratio (median over rounds of pipeline / memory block time): {ratio:.3f}  "
          f"target <= {TARGET:.2f}  {'PASS' if ratio <= TARGET else 'FAIL'}")
    print(f"  rounds: {' '.join(f'{r:.3f}' for r in round_ratios)}")
    print(f"  all steps: medians {np.median(steps['pipeline']) / np.median(steps['memory']):.3f}, means "
          f"{np.mean(steps['pipeline']) / np.mean(steps['memory']):.3f}, fastest steps "
          f"{np.min(steps['pipeline']) / np.min(steps['memory']):.3f}")
    # CPU time hardly depends on other processes: with the step and the pipeline sharing
    # saturated cores, it approximates the ratio an otherwise idle machine would show.
    print(f"  CPU time per step: {cpu_per_step['pipeline'] / cpu_per_step['memory']:.3f}; the pipeline's extra CPU "
          f"per image: {1000 * extra_cpu:.2f} ms")
    print("wait %: share of step time spent in next(iterator), i.e. the step waiting for its batch")
    return 0 if ratio <= TARGET else 1


def main():
    return benchmark(cli.config_from_flags(InputBoundConfig))


if __name__ == "__main__":
    cli.define_flags(InputBoundConfig)
    cli.run(main)
