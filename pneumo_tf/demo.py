"""The main job on built-in data, no download: synthesise an RSNA-layout folder, convert it,
train a detector, evaluate it with the challenge metric and predict the test split.

    python -m pneumo_tf.demo --output_dir=demo_out

writes demo_out/{data,records,model,submission.csv,summary.json} and prints the time of each
phase. Flags scale it up (more images, more epochs, another model). Each model trains with its
"demo" preset (pneumo_tf/models/<model>.py: options small enough for minutes on 2 CPU cores at
128 px, and a peak learning rate) wherever a flag is not given. A rerun into the same folder
reuses its synthetic data and records. --verbosity=1 shows TensorFlow's start-up logging.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Collection

from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from tqdm import tqdm  # noqa: E402

from pneumo_tf import models  # noqa: E402
from pneumo_tf.cli import check_constraints, option  # noqa: E402
from pneumo_tf.evaluation import report  # noqa: E402
from pneumo_tf.fileio import write_json_atomic  # noqa: E402
from pneumo_tf.inference import offline  # noqa: E402
from pneumo_tf.records import radiograph, shards, synthetic  # noqa: E402
from pneumo_tf.records.synthetic import SyntheticConfig  # noqa: E402
from pneumo_tf.training import loop  # noqa: E402
from pneumo_tf.training.config import TrainConfig, with_preset  # noqa: E402

# The demo's settings that are training settings too: a preset sets them unless the demo's user did.
TRAINING_SETTINGS = ("model_options", "image_size", "batch_size", "epochs", "learning_rate", "cache")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output_dir: str = option("demo_out", "Folder for the data, records, model, submission and summary.json; a "
                             "rerun reuses its synthetic data and records.")
    num_images: int = option(2000, "Labeled synthetic radiographs (about 23% with opacities; at least 20, to give "
                             "train and val splits).", minimum=20)
    num_test_images: int = option(200, "Unlabeled synthetic radiographs predicted into submission.csv.", minimum=0)
    seed: int = option(0, "Seed of the data, the split and the training.")
    workers: int = option(0, "Processes for synthesis and conversion; 0 uses all cores.", minimum=0)
    model: str = option("mask_resnet", "Architecture to train; classifiers give image-level decisions only.",
                        choices=models.NAMES)
    preset: str = option("demo", "The model's preset: it sets the model options and training settings that the "
                         "flags below do not; empty: none.", details=models.presets_help)
    model_options: dict = option({}, "Architecture option as key=value, repeatable; each one given replaces the "
                                 "preset's.", flag="model_option", parse=cli.parse_key_values,
                                 unparse=cli.unparse_key_values)
    image_size: int = option(128, "Side of the images the model sees (cnn needs at least 64).", minimum=1)
    batch_size: int = option(16, "Global batch size.", minimum=1)
    epochs: int = option(4, "Training epochs (4: val mAP above 0.9 on the demo data; under 1 min of training "
                         "on a 2-core AVX-512 machine, about 4 min on the slowest of the kind).", minimum=1)
    learning_rate: float = option(TrainConfig.learning_rate, "Peak learning rate for a global batch of 16; the "
                                  "preset's unless given.", exclusive_minimum=0.0)
    cache: bool = option(True, "Keep the decoded train and val images in memory after the first epoch (the "
                         "demo's 2,000 at 128 px take about 260 MB).")



def run_demo(config: DemoConfig, explicit: Collection[str] | None = None) -> dict:
    """Runs the whole path; returns (and writes to <output_dir>/summary.json) what it measured.

    explicit: the fields of `config` its user gave (the command's flags given); None: those that
    differ from DemoConfig's defaults. The preset sets the training settings among the others.
    """
    check_constraints(config)
    if explicit is None:
        explicit = {field.name for field in dataclasses.fields(config)
                    if getattr(config, field.name) != getattr(DemoConfig(), field.name)}
    paths = {name: os.path.join(config.output_dir, name) for name in ("data", "records", "model")}
    phases: dict[str, float] = {}
    started = last = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases[name] = round(now - last, 1)
        last = now

    data = os.path.join(paths["data"], synthetic.LABELS_CSV)
    synthetic_config = SyntheticConfig(config.num_images, config.num_test_images, config.seed)
    if not os.path.isfile(data):  # a rerun reuses the data set it already made
        with tqdm(total=config.num_images + config.num_test_images, desc="synthesise", unit="files") as progress:
            written = synthetic.write_dataset(paths["data"], synthetic_config, config.workers or None, progress)
    else:
        written = synthetic.dataset_paths(paths["data"], synthetic_config)
    phase_done("synthesise")
    manifest = shards.convert(
        written["train_dir"], paths["records"], written["train_labels"], written["detailed_class_info"],
        written["test_dir"], radiograph.ConvertOptions(seed=config.seed), shards.LocalPool(config.workers or None),
    )
    phase_done("convert")
    train_config = TrainConfig(
        records_dir=paths["records"], model_dir=paths["model"], model=config.model, preset=config.preset,
        seed=config.seed, **{name: getattr(config, name) for name in TRAINING_SETTINGS},
    )
    trained = loop.train_and_evaluate(with_preset(train_config, explicit=(
        {field.name for field in dataclasses.fields(TrainConfig)} - set(TRAINING_SETTINGS)) | set(explicit)))
    phase_done("train")
    evaluated = report.evaluate(report.EvaluateConfig(model_dir=paths["model"], records_dir=paths["records"]))
    print(evaluated.report())
    phase_done("evaluate")
    submission = os.path.join(config.output_dir, "submission.csv")
    predicted = None
    if config.num_test_images:
        predicted = offline.predict(offline.PredictConfig(
            model_dir=paths["model"], output=submission, records_dir=paths["records"], split="test",
        ))
    phase_done("predict")
    summary = {
        "model_dir": paths["model"],
        "records_dir": paths["records"],
        "records": manifest["records"],
        "val_map": evaluated.summary["map"],
        "best_threshold": evaluated.summary["threshold"],
        "val_auc": evaluated.summary["auc"],
        "train_seconds": trained["train_seconds"],
        "images_per_second": trained["images_per_second"],
        "epochs_run": trained["epochs_run"],
        "tensorboard_logs": os.path.join(paths["model"], "logs"),
        "threshold_table": evaluated.summary["files"]["thresholds.md"],
        "submission": submission if predicted else None,
        "phase_seconds": phases,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(os.path.join(config.output_dir, "summary.json"), summary)
    return summary


def main():
    summary = run_demo(cli.config_from_flags(DemoConfig), explicit=cli.explicit_fields(DemoConfig))
    val_map = "n/a (nothing to score)" if summary["val_map"] is None else f"{summary['val_map']:.3f}"
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["phase_seconds"].items())
    print(f"\nval mAP {val_map} at threshold {summary['best_threshold']:g}; "
          f"trained {summary['epochs_run']} epochs ({summary['images_per_second']:.0f} images/s)")
    print(f"all done in {summary['total_seconds']:.0f} s: {phases}")
    print(f"TensorBoard:      tensorboard --logdir={summary['tensorboard_logs']}")
    print(f"threshold table:  {summary['threshold_table']}")
    print(f"submission:       {summary['submission']}")
    print(f"exported model:   {summary['model_dir']} (python -m pneumo_tf.serve --model_dir={summary['model_dir']})")
    print(f"model card:       python -m pneumo_tf.describe --model_dir={summary['model_dir']}")
    print(f"summary:          {os.path.join(cli.FLAGS.output_dir, 'summary.json')}")


if __name__ == "__main__":
    cli.define_flags(DemoConfig)
    cli.run(main)
