"""Step time of a detector whose pretrained encoder is frozen (--trainable_layers=heads) against one that trains.

    python benchmarks/frozen_backbone.py                          # retinanet and mask_rcnn, demo presets, 128 px
    python benchmarks/frozen_backbone.py --models=mask_rcnn --steps=20 --repeats=5

Each model is built from its preset (--preset, "demo" by default, at the demo's 128 px and batch 16) with a
pretrained-style encoder: the preset's encoder layout saved as a keras-hub preset folder (random weights: speed
does not depend on their values) and loaded through --model_option=backbone_preset, as a user's ImageNet preset
is, so the grey-to-RGB conversion and the frozen batch norm are the user's. Three variants train the same batch
(augmentation off, Adam) in pneumo_tf's trainer: all (every layer; the encoder's batch norm frozen, the default),
all + train_bn, and heads (the encoder frozen). After a warm-up (tracing), the variants run --steps steps in turn,
--repeats times in a rotated order; the median seconds a step of each counts. Prints per model and variant:
trainable and total parameters, seconds a step and the ratio to "all".
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  benchmarks/common.py (the script's folder is on sys.path)
from pneumo_tf import cli, models as models_lib  # noqa: E402
from pneumo_tf.cli import option  # noqa: E402

VARIANTS = (("all", False), ("all + train_bn", True), ("heads", False))


@dataclasses.dataclass(frozen=True)
class FrozenBackboneConfig:
    work: common.WorkFolderConfig = option(common.WorkFolderConfig())
    models: tuple[str, ...] = option(("retinanet", "mask_rcnn"), "Models to time.", choices=("retinanet", "mask_rcnn"))
    preset: str = option("demo", "Each model's preset (its options).", details=models_lib.presets_help)
    image_size: int = option(128, "Side of the images (the demo's).", minimum=32)
    batch_size: int = option(16, "Batch (the demo's).", minimum=1)
    steps: int = option(10, "Timed steps of each variant per repeat.", minimum=1)
    repeats: int = option(3, "Rounds over the variants (rotated order); the median step time counts.", minimum=1)


def _encoder_preset(architecture, options, folder: str) -> str:
    """The options' encoder layout as a keras-hub ResNet preset folder (3 channels, random weights)."""
    import keras_hub

    if architecture.name == "retinanet":
        filters, blocks, block_type = options.stackwise_num_filters, options.stackwise_num_blocks, options.block_type
    else:
        from pneumo_tf.models.mask_rcnn import RESNETS

        blocks, block_type = options.backbone_blocks or RESNETS[options.backbone][0], RESNETS[options.backbone][1]
        filters = options.backbone_filters
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=list(filters),
        stackwise_num_blocks=list(blocks), stackwise_num_strides=[1] + [2] * (len(filters) - 1),
        block_type=block_type, image_shape=(None, None, 3))
    encoder.save_to_preset(folder)
    keras_hub.layers.ResNetImageConverter(scale=[1 / (255 * s) for s in (0.229, 0.224, 0.225)],
                                          offset=[-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
                                          ).save_to_preset(folder)
    return folder


def _batch(image_size: int, batch_size: int, seed: int = 0) -> dict:
    """A pipeline-like batch: noise with one bright box in three images out of four."""
    import numpy as np

    from pneumo_tf.records.boxes import MAX_BOXES

    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.08, (batch_size, image_size, image_size, 1)).astype(np.float32)
    boxes = np.zeros((batch_size, MAX_BOXES, 4), np.float32)
    mask = np.zeros((batch_size, image_size, image_size, 1), np.float32)
    num_boxes = (np.arange(batch_size) % 4 != 3).astype(np.int32)
    for index in np.flatnonzero(num_boxes):
        top, left = rng.integers(0, image_size // 2, 2)
        side = image_size // 4
        images[index, top:top + side, left:left + side] += 0.4
        mask[index, top:top + side, left:left + side] = 1
        boxes[index, 0] = np.array([top, left, top + side, left + side]) / image_size
    return {"image": np.clip(images, 0, 1), "boxes": boxes, "num_boxes": num_boxes, "mask": mask,
            "target": num_boxes}


def _trainers(name: str, config: FrozenBackboneConfig, work_dir: str) -> dict:
    """{variant: (trainer, dataset, trainable parameters, parameters)}, each warmed up (traced)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pneumo_tf.data import augment
    from pneumo_tf.training.loop import Trainer

    architecture = models_lib.get(name)
    options = architecture.make_options(architecture.preset(config.preset).model_options)
    folder = _encoder_preset(architecture, options, os.path.join(work_dir, f"{name}_encoder"))
    found = {}
    for variant, train_bn in VARIANTS:
        variant_options = dataclasses.replace(options, backbone_preset=folder, train_bn=train_bn)
        keras.utils.set_random_seed(0)
        network = architecture.build(config.image_size, variant_options)
        architecture.set_trainable_layers(network, variant_options, variant.split()[0])
        trainer = Trainer(network, architecture, augment.AugmentConfig.off())
        trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
        inputs, labels = architecture.to_fit(_batch(config.image_size, config.batch_size))
        dataset = tf.data.Dataset.from_tensors((inputs, labels)).repeat()
        trainer.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)  # traces the step
        trainable = int(sum(np.prod(weight.shape) for weight in network.trainable_variables))
        found[variant] = (trainer, dataset, trainable, network.count_params())
    return found


def benchmark(config: FrozenBackboneConfig) -> int:
    cli.check_constraints(config)
    print(common.describe(("tensorflow", "keras", "keras-hub")), flush=True)
    rows = []
    with common.work_folder("pneumo_frozen_backbone_", config.work) as work_dir:
        for name in config.models:
            print(f"building and tracing {name} ({config.preset} preset, {config.image_size} px, batch "
                  f"{config.batch_size}) ...", flush=True)
            trainers = _trainers(name, config, work_dir)
            seconds = {variant: [] for variant in trainers}
            order = list(trainers)
            for repeat in range(config.repeats):
                for variant in order[repeat % len(order):] + order[: repeat % len(order)]:
                    trainer, dataset, _, _ = trainers[variant]
                    started = time.perf_counter()
                    trainer.fit(dataset, epochs=1, steps_per_epoch=config.steps, verbose=0, shuffle=False)
                    seconds[variant].append((time.perf_counter() - started) / config.steps)
            for variant, (_, _, trainable, total) in trainers.items():
                rows.append((name, variant, trainable, total, statistics.median(seconds[variant]),
                             statistics.median(seconds[variant]) / statistics.median(seconds["all"])))
    print(f"\n{'model':<10} {'variant':<15} {'trainable':>10} {'parameters':>10} {'s/step':>7} {'vs all':>6}")
    for name, variant, trainable, total, step, ratio in rows:
        print(f"{name:<10} {variant:<15} {trainable:>10,} {total:>10,} {step:>7.3f} {ratio:>6.2f}")
    print(f"\nmedian of {config.repeats} rounds of {config.steps} steps, variants interleaved; 'all' keeps the "
          "pretrained encoder's batch norm frozen (the default)")
    return 0


def main():
    return benchmark(cli.config_from_flags(FrozenBackboneConfig))


if __name__ == "__main__":
    cli.define_flags(FrozenBackboneConfig)
    cli.run(main)
