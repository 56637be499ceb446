"""What a training run is: `TrainConfig`, the one source of its defaults (the flags of
`python -m pneumo_tf.train` are derived from it, help included), and `with_preset`, which fills
what a run does not set from a named preset of its architecture. No TensorFlow at import
(validating a config imports its architecture's module).

A preset (pneumo_tf.models.architecture.Preset, registered beside each model) holds model
options and training settings. `with_preset(config, explicit)` gives `config` the preset's
value of every field not in `explicit` (the command's flags given on the command line or in a
flagfile; for a config built in Python, by default, the fields that differ from TrainConfig's
defaults), and merges model options key by key (the config's own win). The result records the
resolved values (and the preset's name) as the run's hparams and in its exported pneumo_tf.json.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection

from pneumo_tf import models
from pneumo_tf.cli import check_constraints, option, parse_key_values, unparse_key_values
from pneumo_tf.errors import UserError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# --learning_rate is given for this global batch and scaled linearly with the real one.
REFERENCE_BATCH_SIZE = 16  # the seed report's batch: flagfiles carry its learning rates as they were


def _parse_steps(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(value) for value in text.split(","))
    except ValueError as error:
        raise UserError(f"needs start,end, got {text!r}") from error
    return start, end


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    records_dir: str = option(help="Folder written by python -m pneumo_tf.convert (manifest.json + shards).")
    model_dir: str = option(help="Where logs, checkpoints, the resumable backup and the exported model go. "
                            "Rerunning into it after a kill resumes from the last finished epoch.")
    model: str = option("mask_resnet", "Architecture to train.", choices=models.NAMES)
    preset: str = option("", "A named preset of --model (e.g. demo): its model options and training settings apply "
                         "to every flag not given explicitly (on the command line or in a flagfile), its model "
                         "options key by key. Empty: none.", details=models.presets_help)
    model_options: dict = option(
        {}, "Architecture option as key=value, repeatable, parsed by the option's type, e.g. "
        "--model_option=channels=32 --model_option=classification_head=True "
        "--model_option=stackwise_num_blocks=1,1,1,1, or --model_option=weights=/path/vgg16_notop.h5 for local "
        "ImageNet weights.", flag="model_option", parse=parse_key_values, unparse=unparse_key_values,
        details=models.options_help)
    image_size: int = option(256, "Side of the square images the model sees, in pixels.", minimum=1)
    batch_size: int = option(16, "Global batch size, split evenly across replicas.", minimum=1)
    epochs: int = option(12, "Epochs to train (early stopping may end sooner).", minimum=1)
    steps_per_epoch: int = option(0, "Training steps per epoch; 0 means one pass over the train split.", minimum=0)
    validation_steps: int = option(0, "Validation batches per epoch; 0 means the whole val split.", minimum=0)
    learning_rate: float = option(
        7e-4, f"Peak learning rate for a global batch of {REFERENCE_BATCH_SIZE}, scaled linearly with "
        "--batch_size and cosine-decayed to 0 over the steps after --warmup_steps.", exclusive_minimum=0.0)
    warmup_steps: int = option(0, "Steps over which the learning rate rises linearly from 0 to its peak before "
                               "the cosine decay (over the remaining steps); 0: start at the peak.", minimum=0)
    optimizer: str = option("adam", "adam: Adam with Keras' defaults; sgd: matterport's Mask R-CNN optimizer (momentum "
                            "0.9, weight decay 1e-4, gradients clipped to a global norm of 5).", choices=OPTIMIZERS)
    strategy: str = option("auto", "tf.distribute strategy: auto picks mirrored with several GPUs (or "
                           "--cpu_replicas > 1), else one device; multi_worker_mirrored reads TF_CONFIG.",
                           choices=STRATEGIES)
    cpu_replicas: int = option(0, "Split the CPU into this many logical devices (MirroredStrategy on CPU).",
                               minimum=0)
    tpu: str | None = option(None, "TPU name or address for --strategy=tpu.")
    precision: str = option("float32", "Keras dtype policy for this run: mixed_float16 for GPUs, mixed_bfloat16 "
                            "for TPUs and CPUs; outputs stay float32.", choices=PRECISIONS)
    positive_fraction: float = option(0.0, "Sample training images so this share is positive (0: as stored; "
                                      "about 23% of RSNA images are).", minimum=0.0, exclusive_maximum=1.0)
    cache: bool = option(False, "Keep the decoded train and val images in memory (about 8 x image_size^2 bytes "
                         "each: small --image_size only).")
    data_service: str = option(
        "", "A tf.data service dispatcher (grpc://HOST:PORT, started with python -m pneumo_tf.data_service) whose "
        "workers read, parse, decode and batch the train split; augmentation stays on this host's accelerators. "
        "Processing mode: dynamic sharding (distributed_epoch): the dispatcher hands each shard file to one worker, "
        "and all replicas of all hosts share one job, so every training example is read once per pass over the "
        "split; workers may join or leave mid-run (a lost worker's in-flight examples are skipped for that pass). "
        "Files are shuffled as without the service; records only within each worker's shuffle buffer. Workers must "
        "read the records at the same path (shared storage or gs://). Validation reads locally. Empty: all on "
        "this host.")
    data_service_timeout: float = option(
        600.0, "With --data_service: seconds training waits for a batch (the first one includes tracing the model) "
        "before it stops with an error naming the dispatcher, instead of waiting forever when every worker is gone.",
        exclusive_minimum=0.0)
    augment: bool = option(True, "Random flip, rotation, zoom, shift, brightness and contrast, per batch on the "
                           "device; image, mask and boxes move together.")
    augment_strength: float = option(1.0, "Multiplies the augmentation's ranges (rotation 2 degrees, zoom and shifts "
                                     "15%, brightness 0.1, contrast 10% at 1; the flip stays at one in two): 0 keeps "
                                     "only the flips.", minimum=0.0)
    trainable_layers: str = option(
        "all", "The layers that train, matterport's groups (retinanet, mask_rcnn): heads (all but the ResNet "
        "encoder), 3+, 4+, 5+ (also the encoder's stages from that one up), all.", choices=models.LAYER_GROUPS)
    trainable_layers_epochs: int = option(
        0, "Epochs trained with --trainable_layers before every layer trains (matterport's two stages: heads for N "
        "epochs, then all); 0: --trainable_layers for the whole run.", minimum=0)
    early_stopping_patience: int = option(15, "Epochs without improvement of the monitored metric (val_map for "
                                          "models that give boxes, val_loss for classifiers) before stopping.",
                                          minimum=0)
    seed: int = option(0, "Seed of the data order, the augmentation and the initial weights.")
    log_every_steps: int = option(10, "Steps between TensorBoard learning-rate, loss and images/s scalars.",
                                  minimum=1)
    profile_steps: tuple[int, int] | None = option(
        (10, 12), "Steps traced for TensorBoard's profiler (input-pipeline analysis), as start,end; empty to "
        "trace none.", parse=_parse_steps, unparse=lambda steps: ",".join(map(str, steps)))
    validation_images: int = option(4, "Validation images drawn with true and predicted boxes in TensorBoard "
                                    "each epoch.", minimum=0)

    def validate(self) -> None:
        """The declared constraints, the model's name, its options (types, names, ranges) and its preset's name."""
        check_constraints(self)
        models.check_name(self.model)
        architecture = models.get(self.model)
        architecture.make_options(self.model_options)
        if self.preset:
            architecture.preset(self.preset)
        if self.trainable_layers not in architecture.layer_groups:
            raise UserError(f"--trainable_layers={self.trainable_layers}: the {self.model} model trains "
                            f"{', '.join(architecture.layer_groups)}")
        if self.trainable_layers_epochs and not (self.trainable_layers != "all"
                                                 and self.trainable_layers_epochs < self.epochs):
            raise UserError(f"--trainable_layers_epochs={self.trainable_layers_epochs} trains --trainable_layers for "
                            "that many epochs, then all: it needs --trainable_layers other than all and fewer epochs "
                            f"than --epochs={self.epochs}")


def with_preset(config: TrainConfig, explicit: Collection[str] | None = None) -> TrainConfig:
    """`config` with its preset's values for every field not in `explicit`, model options merged key by
    key (the config's own win), and the model options typed (see the module docstring).

    explicit: names of the fields given explicitly; None: those that differ from TrainConfig's defaults.
    Without a preset, only the model options are typed.
    """
    architecture = models.get(config.model)
    values, options = {}, dict(config.model_options)
    if config.preset:
        preset = architecture.preset(config.preset)
        if explicit is None:
            defaults = TrainConfig(records_dir=config.records_dir, model_dir=config.model_dir)
            explicit = {field.name for field in dataclasses.fields(config)
                        if getattr(config, field.name) != getattr(defaults, field.name)}
        unknown = sorted(set(preset.train) - {field.name for field in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"preset {config.preset} of {config.model} sets no TrainConfig field {unknown}")
        values = {name: value for name, value in preset.train.items() if name not in explicit}
        options = {**preset.model_options, **options}
    typed = architecture.make_options(options)
    return dataclasses.replace(config, **values, model_options={name: getattr(typed, name) for name in options})
