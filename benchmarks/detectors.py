"""The box models side by side on the same budget: mask_resnet, retinanet and mask_rcnn.

    python benchmarks/detectors.py                       # 1,500 hard synthetic images, 128 px
    python benchmarks/detectors.py --models=retinanet --steps=600

Synthesises the project's hard setting (`--difficulty=hard`: subtle, low-contrast opacities,
and unlabelled sharp round nodules in half of the images without opacity, which a detector
must learn to ignore), converts it once, then trains each model with the same budget: the
same records, image size, global batch, number of steps (cut into --epochs epochs, each
followed by validation; the best epoch by val mAP is exported), learning-rate warm-up and
seed, with the decoded images cached in memory after the first epoch. Each architecture keeps
its own model options and peak learning rate, as a user would tune them: the demo's presets
(pneumo_tf.demo.DEMO_PRESETS). Then each export is evaluated on the val split with the challenge metric
(`python -m pneumo_tf.evaluate`: the best threshold of the sweep).

Prints, per model: val challenge mAP and AUC at the chosen threshold, training images/s,
wall time of training, parameters and the exported folder's size; then the ranking and
the targets: every model at val mAP >= 0.3 on the hard setting, and the whole benchmark
(data included) under 30 minutes on 2 CPU cores. The exit status is 1 when a target fails.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import common  # noqa: E402  benchmarks/common.py (the script's folder is on sys.path)
from pneumo_tf import cli  # noqa: E402
from pneumo_tf.demo import DEMO_PRESETS  # noqa: E402
from pneumo_tf.errors import UserError  # noqa: E402
from pneumo_tf.evaluation import report  # noqa: E402
from pneumo_tf.models import exported  # noqa: E402
from pneumo_tf.records import radiograph, shards, synthetic  # noqa: E402
from pneumo_tf.training import loop  # noqa: E402
from pneumo_tf.training.config import TrainConfig  # noqa: E402

FLAGS = flags.FLAGS
common.define_work_dir_flags("the hard synthetic data, its records and the models")
flags.DEFINE_integer("num_images", 1500, "Labeled synthetic radiographs (hard setting; 80% train, 20% val).")
flags.DEFINE_integer("source_size", 256, "Side of the synthetic DICOMs (JPEG frames, decoded at ratio 2 for 128).")
flags.DEFINE_integer("image_size", 128, "Side of the images every model sees.")
flags.DEFINE_integer("batch_size", 16, "Global batch of every model.")
flags.DEFINE_integer("steps", 300, "Training steps of every model.")
flags.DEFINE_integer("epochs", 2, "Epochs the steps are cut into (validation after each; the best is exported). "
                     "Training does not depend on it: 3 and 6 gave the same val mAP at steps 200, 400 and 600.")
flags.DEFINE_integer("warmup_steps", 50, "Steps of every model's linear learning-rate warm-up (then the cosine "
                     "decay). RetinaNet at 300 steps: val mAP 0.66 with 50, 0.11 without.")
flags.DEFINE_list("models", ["mask_resnet", "retinanet", "mask_rcnn"], "Models to compare.")
flags.DEFINE_integer("seed", 0, "Seed of the data and of every training.")
flags.DEFINE_multi_string("model_option", [], "MODEL.key=value, repeatable: changes one option of MODEL's preset, "
                          "e.g. retinanet.pre_logits_num_conv_layers=2 (an ablation).")
flags.DEFINE_float("learning_rate", 0.0, "Peak learning rate of every model; 0: each model's preset.")
flags.DEFINE_bool("deterministic", True, "TensorFlow's op determinism (tf.config.experimental."
                  "enable_op_determinism): shards are read in the same order every run, and a rerun of "
                  "mask_resnet or retinanet gives the same numbers. mask_rcnn's still vary, from oneDNN's "
                  "kernels: with TF_ENABLE_ONEDNN_OPTS=0 they repeat, at 1.3x its step time. Without it "
                  "RetinaNet's val mAP was 0.79 in one run and 0.40 in the next.")

MIN_MAP = 0.3
MAX_MINUTES = 30.0


def records(work_dir: str) -> str:
    """The hard synthetic data set converted once (passthrough frames), reused when present."""
    data_dir = os.path.join(work_dir, f"data_{FLAGS.num_images}_{FLAGS.source_size}_{FLAGS.seed}")
    records_dir = data_dir + "_records"
    if not os.path.isfile(os.path.join(records_dir, "manifest.json")):
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(records_dir, ignore_errors=True)
        paths = synthetic.write_dataset(data_dir, synthetic.SyntheticConfig(
            FLAGS.num_images, seed=FLAGS.seed, image_size=FLAGS.source_size, difficulty="hard"))
        shards.convert(paths["train_dir"], records_dir, paths["train_labels"], paths["detailed_class_info"],
                       options=radiograph.ConvertOptions(seed=FLAGS.seed))
    return records_dir


def exported_bytes(model_dir: str) -> int:
    """The exported model's size on disk: model.keras and saved_model/ (not logs or checkpoints)."""
    saved = os.path.join(model_dir, exported.SAVED_MODEL_DIR)
    return os.path.getsize(os.path.join(model_dir, exported.MODEL_FILE)) + sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(saved) for name in names)


def preset(model: str) -> tuple[dict, float]:
    """The demo's preset of `model` with the --model_option changes made to it, and its learning rate."""
    options, learning_rate = DEMO_PRESETS[model]
    changes = {}
    for change in FLAGS.model_option:
        name, dot, key_value = change.partition(".")
        if not dot or name not in DEMO_PRESETS:
            raise UserError(f"--model_option wants MODEL.key=value with a model of {', '.join(DEMO_PRESETS)}, "
                            f"not {change!r}")
        if name == model:
            changes.update(cli.parse_key_values([key_value]))
    return {**options, **changes}, FLAGS.learning_rate or learning_rate


def run(model: str, options: dict, learning_rate: float, records_dir: str, work_dir: str) -> dict:
    model_dir = os.path.join(work_dir, "models", model)
    shutil.rmtree(model_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = loop.train_and_evaluate(TrainConfig(
        records_dir=records_dir, model_dir=model_dir, model=model, model_options=options,
        image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
        steps_per_epoch=FLAGS.steps // FLAGS.epochs, learning_rate=learning_rate, warmup_steps=FLAGS.warmup_steps,
        cache=True, seed=FLAGS.seed, profile_steps=None, early_stopping_patience=FLAGS.epochs,
    ))
    train_seconds = time.perf_counter() - started
    evaluated = report.evaluate(report.EvaluateConfig(model_dir=model_dir, records_dir=records_dir))
    network = exported.load(model_dir).network
    return {
        "model": model, "map": evaluated.summary["map"], "auc": evaluated.summary["auc"],
        "threshold": evaluated.summary["threshold"], "images_per_second": summary["images_per_second"],
        "train_seconds": train_seconds, "exported_epoch": summary["exported_epoch"],
        "parameters": network.count_params(), "exported_mb": exported_bytes(model_dir) / 2**20,
        "val_maps": summary["history"].get("val_map", []),
    }


def benchmark() -> int:
    started = time.perf_counter()
    unknown = sorted(set(FLAGS.models) - set(DEMO_PRESETS))
    if unknown:
        raise UserError(f"--models: no preset for {', '.join(unknown)}; one of {', '.join(DEMO_PRESETS)}")
    presets = {model: preset(model) for model in FLAGS.models}  # a malformed --model_option fails before any work
    if FLAGS.deterministic:
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    with common.work_folder("detectors_") as work_dir:
        print(common.describe(("tensorflow", "keras", "keras-hub", "numpy")), flush=True)
        records_dir = records(work_dir)
        print(f"data: {FLAGS.num_images} hard synthetic images at {FLAGS.source_size} px -> {records_dir} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        results = []
        for model in FLAGS.models:
            options, learning_rate = presets[model]
            print(f"\n=== {model}: {FLAGS.steps} steps of {FLAGS.batch_size} images at {FLAGS.image_size} px, "
                  f"learning rate {learning_rate}, options {options}", flush=True)
            results.append(run(model, options, learning_rate, records_dir, work_dir))
            print(f"=== {model}: val mAP {results[-1]['map']}, per epoch {results[-1]['val_maps']}", flush=True)
        total_minutes = (time.perf_counter() - started) / 60

    return report_results(results, total_minutes)


def report_results(results: list[dict], total_minutes: float) -> int:
    print()
    header = (f"{'model':<12} {'val mAP':>8} {'AUC':>6} {'thresh':>6} {'images/s':>9} {'train s':>8} "
              f"{'best ep':>7} {'params':>11} {'export MB':>9}")
    print(header)
    print("-" * len(header))
    for result in results:
        score = "nan" if result["map"] is None else f"{result['map']:.3f}"
        auc = "nan" if result["auc"] is None else f"{result['auc']:.3f}"
        print(f"{result['model']:<12} {score:>8} {auc:>6} {result['threshold']:>6.2f} "
              f"{result['images_per_second']:>9.1f} {result['train_seconds']:>8.0f} {result['exported_epoch']:>7} "
              f"{result['parameters']:>11,} {result['exported_mb']:>9.1f}")
    ranking = sorted(results, key=lambda result: -(result["map"] or 0.0))
    print(f"\nranking by val mAP: {' > '.join(result['model'] for result in ranking)}")
    failed = [result["model"] for result in results if (result["map"] or 0.0) < MIN_MAP]
    print(f"val mAP >= {MIN_MAP} on the hard setting: {'PASS' if not failed else 'FAIL for ' + ', '.join(failed)}")
    print(f"whole benchmark {total_minutes:.1f} min (target < {MAX_MINUTES:.0f}): "
          f"{'PASS' if total_minutes < MAX_MINUTES else 'FAIL'}")
    return 0 if not failed and total_minutes < MAX_MINUTES else 1


def main(argv):
    del argv
    try:
        sys.exit(benchmark())
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
