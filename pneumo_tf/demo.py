"""The main job on built-in data, no download: synthesise an RSNA-layout folder, convert it,
train a detector, evaluate it with the challenge metric and predict the test split.

    python -m pneumo_tf.demo --output_dir=demo_out

writes demo_out/{data,records,model,submission.csv,summary.json}. Flags scale it up (more
images, more epochs, another model); the defaults finish in about 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from pneumo_tf.evaluation import report
from pneumo_tf.inference import offline
from pneumo_tf.training import trainer
from pneumo_tf.errors import UserError
from pneumo_tf.models import BUILDERS
from pneumo_tf.fileio import write_json_atomic
from pneumo_tf.progress import Progress
from pneumo_tf.records import shards, synthetic


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "demo_out"
    num_images: int = 2000
    num_test_images: int = 200
    seed: int = 0
    workers: int | None = None
    # Training: a slim mask network at 128 px (JPEG frames decode straight to 128 at ratio 8),
    # with bilinear up-sampling so boxes follow the opacities between bottleneck cells.
    model: str = "mask_resnet"
    model_options: dict = dataclasses.field(
        default_factory=lambda: {"channels": 16, "n_blocks": 1, "depth": 3, "upsampling": "bilinear"}
    )
    image_size: int = 128
    batch_size: int = 16
    epochs: int = 8
    learning_rate: float = 2e-3


def run_demo(config: DemoConfig) -> dict:
    """Runs the whole path; returns (and writes to <output_dir>/summary.json) what it measured."""
    if config.num_images < 20:
        raise UserError(f"--num_images must be at least 20 to give train and val splits, not {config.num_images}")
    paths = {name: os.path.join(config.output_dir, name) for name in ("data", "records", "model")}
    started = time.perf_counter()

    data = os.path.join(paths["data"], synthetic.LABELS_CSV)
    if not os.path.isfile(data):  # a rerun reuses the data set it already made
        with Progress(config.num_images + config.num_test_images, "synthesise") as progress:
            written = synthetic.write_dataset(
                paths["data"], config.num_images, config.num_test_images, config.seed, workers=config.workers,
                progress=progress,
            )
    else:
        written = {
            "train_dir": os.path.join(paths["data"], synthetic.TRAIN_DIR),
            "test_dir": os.path.join(paths["data"], synthetic.TEST_DIR) if config.num_test_images else None,
            "train_labels": data,
            "detailed_class_info": os.path.join(paths["data"], synthetic.CLASS_INFO_CSV),
        }
    manifest = shards.convert(
        written["train_dir"], paths["records"], written["train_labels"], written["detailed_class_info"],
        written["test_dir"], shards.ConvertOptions(seed=config.seed), workers=config.workers,
    )
    trained = trainer.train_and_evaluate(trainer.TrainConfig(
        records_dir=paths["records"], model_dir=paths["model"], model=config.model,
        model_options=config.model_options, image_size=config.image_size, batch_size=config.batch_size,
        epochs=config.epochs, learning_rate=config.learning_rate, seed=config.seed,
    ))
    evaluated = report.evaluate(report.EvaluateConfig(model_dir=paths["model"], records_dir=paths["records"]))
    print(evaluated.report())
    submission = os.path.join(config.output_dir, "submission.csv")
    predicted = None
    if config.num_test_images:
        predicted = offline.predict(offline.PredictConfig(
            model_dir=paths["model"], output=submission, records_dir=paths["records"], split="test",
        ))
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
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(os.path.join(config.output_dir, "summary.json"), summary)
    return summary


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    defaults = DemoConfig()
    config = DemoConfig(
        output_dir=FLAGS.output_dir, num_images=FLAGS.num_images, num_test_images=FLAGS.num_test_images,
        seed=FLAGS.seed, workers=FLAGS.workers or None, epochs=FLAGS.epochs, model=FLAGS.model,
        # The slim mask network's options belong to mask_resnet; other models use their own defaults.
        model_options=defaults.model_options if FLAGS.model == defaults.model else {},
        image_size=FLAGS.image_size,
    )
    try:
        summary = run_demo(config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    val_map = "n/a (nothing to score)" if summary["val_map"] is None else f"{summary['val_map']:.3f}"
    print(f"\nval mAP {val_map} at threshold {summary['best_threshold']:g}; "
          f"trained {summary['epochs_run']} epochs in {summary['train_seconds']:.0f} s "
          f"({summary['images_per_second']:.0f} images/s); all done in {summary['total_seconds']:.0f} s")
    print(f"TensorBoard:      tensorboard --logdir={summary['tensorboard_logs']}")
    print(f"threshold table:  {summary['threshold_table']}")
    print(f"submission:       {summary['submission']}")
    print(f"exported model:   {summary['model_dir']} (python -m pneumo_tf.serve --model_dir={summary['model_dir']})")
    print(f"summary:          {os.path.join(config.output_dir, 'summary.json')}")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output_dir", "demo_out", "Folder for the data, records, model, submission and summary.json; "
                        "a rerun reuses its synthetic data and records.")
    flags.DEFINE_integer("num_images", 2000, "Labeled synthetic radiographs (about 23% with opacities).")
    flags.DEFINE_integer("num_test_images", 200, "Unlabeled synthetic radiographs predicted into submission.csv.")
    flags.DEFINE_integer("epochs", 8, "Training epochs.")
    flags.DEFINE_enum("model", "mask_resnet", sorted(BUILDERS), "Architecture to train; only "
                      "mask_resnet predicts boxes (classifiers give image-level decisions).")
    flags.DEFINE_integer("image_size", 128, "Side of the images the model sees (cnn needs at least 64).")
    flags.DEFINE_integer("seed", 0, "Seed of the data, the split and the training.")
    flags.DEFINE_integer("workers", 0, "Processes for synthesis and conversion; 0 uses all cores.")
    app.run(main)
