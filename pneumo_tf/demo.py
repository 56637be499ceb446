"""The main job on built-in data, no download: synthesise an RSNA-layout folder, convert it,
train a detector, evaluate it with the challenge metric and predict the test split.

    python -m pneumo_tf.demo --output_dir=demo_out

writes demo_out/{data,records,model,submission.csv,summary.json} and prints the time of each
phase. Flags scale it up (more images, more epochs, another model). A rerun into the same
folder reuses its synthetic data and records. --verbosity=1 shows TensorFlow's start-up logging.
"""
from __future__ import annotations

import dataclasses
import os
import time

from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from tqdm import tqdm  # noqa: E402

from pneumo_tf import models  # noqa: E402
from pneumo_tf.cli import option  # noqa: E402
from pneumo_tf.errors import UserError  # noqa: E402
from pneumo_tf.evaluation import report  # noqa: E402
from pneumo_tf.fileio import write_json_atomic  # noqa: E402
from pneumo_tf.inference import offline  # noqa: E402
from pneumo_tf.records import radiograph, shards, synthetic  # noqa: E402
from pneumo_tf.records.synthetic import SyntheticConfig  # noqa: E402
from pneumo_tf.training import loop  # noqa: E402
from pneumo_tf.training.config import TrainConfig  # noqa: E402

# Per architecture, what the demo trains when --model_option and --learning_rate are not given:
# options small enough for minutes on 2 CPU cores at 128 px, and a peak learning rate for the
# global batch of 16. benchmarks/detectors.py compares the box models with these presets.
DEMO_PRESETS = {
    # A slim mask network (JPEG frames decode straight to 128 at ratio 8), with bilinear
    # up-sampling so boxes follow the opacities between bottleneck cells.
    "mask_resnet": ({"channels": 8, "n_blocks": 1, "depth": 3, "upsampling": "bilinear"}, 2e-3),
    "cnn": ({"width": 0.25}, 1e-3),
    "vgg16": ({}, 5e-4),
    # ResNet-18-like stacks of one block; anchors of 16 px and up on P3-P5, for boxes of
    # 15-40 px at 128 px (keras-hub's default anchors start at 32 px: small boxes would
    # match no anchor and never be learnt). Adam 3e-4: at 1e-3 its focal loss spikes and, on the
    # benchmark's hard data, val mAP was 0.04 after 300 steps against 0.39 at 3e-4. No convolution
    # in the heads before their 3x3 logits (the paper has four): on that data, 600 steps with two
    # seeds each (op determinism on) gave val mAP 0.77 and 0.74 with none, 0.79 and 0.75 with one,
    # 0.31 and 0.69 with two, and a training step took 274 ms against 473 and 645.
    "retinanet": ({"stackwise_num_filters": (64, 64, 128, 256), "stackwise_num_blocks": (1, 1, 1, 1),
                   "block_type": "basic_block", "min_level": 3, "max_level": 5, "pre_logits_num_conv_layers": 0,
                   "anchor_size": 2.0}, 3e-4),
    # The same backbone; anchors 16-256 px on P2-P6; the seed's settings but three, each measured
    # on the benchmark's hard data (benchmarks/README.md has the tables):
    # - No 0.9 floor on P(opacity) (0.05): the threshold sweep of validation and `evaluate` picks
    #   the threshold, and the floor hid what the model had learnt (at step 300 an opacity's best
    #   RoI scored a median 0.41: val mAP 0.00-0.10 with the floor, 0.32 without).
    # - Detection NMS at 0.3 (matterport's default) instead of the seed's 0.6: two boxes on one
    #   faint opacity, overlapping by IoU 0.3-0.6, both passed the threshold and one counted as a
    #   false positive. The same weights after 400 steps, decoded both ways: val mAP 0.26 -> 0.34,
    #   0.54 -> 0.65 and 0.34 -> 0.42 for training seeds 0, 1 and 2.
    # - The class term of the box head weighted 8 (seed 1.25): positive RoIs are few (at most 8 of
    #   an image's 32, none in the ~75% of images without opacity), and after 400 steps an
    #   opacity's best RoI scored a median P(opacity) of 0.65, the best RoI of an empty image 0.37.
    #   With NMS 0.3, val mAP after 400 steps for seeds 0, 1, 2: weight 1.25 gave 0.34, 0.65, 0.42;
    #   3 gave 0.49, 0.70, 0.56; 5 gave 0.63, 0.66, 0.63; 8 gave 0.72, 0.73, 0.64.
    "mask_rcnn": ({"backbone": "resnet18", "backbone_blocks": (1, 1, 1, 1), "backbone_filters": (64, 64, 128, 256),
                   "top_down_pyramid_size": 64, "rpn_conv_size": 64, "rpn_anchor_scales": (16, 32, 64, 128, 256),
                   "pre_nms_limit": 1000, "post_nms_rois_training": 256, "post_nms_rois_inference": 128,
                   "train_rois_per_image": 32, "roi_positive_ratio": 0.25, "fpn_classif_fc_layers_size": 256,
                   "mask_head_size": 32, "mask_head_convs": 2, "detection_min_confidence": 0.05,
                   "detection_nms_threshold": 0.3, "loss_weights": {"mrcnn_class": 8.0}}, 1e-3),
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output_dir: str = option("demo_out", "Folder for the data, records, model, submission and summary.json; a "
                             "rerun reuses its synthetic data and records.")
    num_images: int = option(2000, "Labeled synthetic radiographs (about 23% with opacities).")
    num_test_images: int = option(200, "Unlabeled synthetic radiographs predicted into submission.csv.")
    seed: int = option(0, "Seed of the data, the split and the training.")
    workers: int = option(0, "Processes for synthesis and conversion; 0 uses all cores.")
    model: str = option("mask_resnet", "Architecture to train; classifiers give image-level decisions only.",
                        choices=models.NAMES)
    model_options: dict = option({}, "Architecture option as key=value, repeatable; none given: the demo's "
                                 "small preset of the architecture.", flag="model_option",
                                 parse=cli.parse_key_values, unparse=cli.unparse_key_values)
    image_size: int = option(128, "Side of the images the model sees (cnn needs at least 64).")
    batch_size: int = option(16, "Global batch size.")
    epochs: int = option(4, "Training epochs (4: val mAP above 0.9 on the demo data; under 1 min of training "
                         "on a 2-core AVX-512 machine, about 4 min on the slowest of the kind).")
    learning_rate: float = option(0.0, "Peak learning rate for a global batch of 16; 0: the demo's preset of the "
                                  "architecture.")
    cache: bool = option(True, "Keep the decoded train and val images in memory after the first epoch (the "
                         "demo's 2,000 at 128 px take about 260 MB).")

    def validate(self) -> None:
        if self.num_images < 20:
            raise UserError(f"--num_images must be at least 20 to give train and val splits, not {self.num_images}")


def run_demo(config: DemoConfig) -> dict:
    """Runs the whole path; returns (and writes to <output_dir>/summary.json) what it measured."""
    config.validate()
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
    preset_options, preset_rate = DEMO_PRESETS[config.model]
    trained = loop.train_and_evaluate(TrainConfig(
        records_dir=paths["records"], model_dir=paths["model"], model=config.model,
        model_options=config.model_options or preset_options, image_size=config.image_size,
        batch_size=config.batch_size, epochs=config.epochs, learning_rate=config.learning_rate or preset_rate,
        seed=config.seed, cache=config.cache,
    ))
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
    summary = run_demo(cli.config_from_flags(DemoConfig))
    val_map = "n/a (nothing to score)" if summary["val_map"] is None else f"{summary['val_map']:.3f}"
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["phase_seconds"].items())
    print(f"\nval mAP {val_map} at threshold {summary['best_threshold']:g}; "
          f"trained {summary['epochs_run']} epochs ({summary['images_per_second']:.0f} images/s)")
    print(f"all done in {summary['total_seconds']:.0f} s: {phases}")
    print(f"TensorBoard:      tensorboard --logdir={summary['tensorboard_logs']}")
    print(f"threshold table:  {summary['threshold_table']}")
    print(f"submission:       {summary['submission']}")
    print(f"exported model:   {summary['model_dir']} (python -m pneumo_tf.serve --model_dir={summary['model_dir']})")
    print(f"summary:          {os.path.join(cli.FLAGS.output_dir, 'summary.json')}")


if __name__ == "__main__":
    cli.define_flags(DemoConfig)
    cli.run(main)
