"""What a training run is: `TrainConfig`, the one source of its defaults (the flags of
`python -m pneumo_tf.train` are derived from it, help included). No TensorFlow here."""
from __future__ import annotations

import dataclasses

from pneumo_tf import models
from pneumo_tf.cli import option, parse_key_values, unparse_key_values
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
    model_options: dict = option(
        {}, "Architecture option as key=value, repeatable, e.g. --model_option=channels=32 "
        "--model_option=classification_head=True, or --model_option=weights=/path/vgg16_notop.h5 for local "
        "ImageNet weights.", flag="model_option", parse=parse_key_values, unparse=unparse_key_values)
    image_size: int = option(256, "Side of the square images the model sees, in pixels.")
    batch_size: int = option(16, "Global batch size, split evenly across replicas.")
    epochs: int = option(12, "Epochs to train (early stopping may end sooner).")
    steps_per_epoch: int = option(0, "Training steps per epoch; 0 means one pass over the train split.")
    validation_steps: int = option(0, "Validation batches per epoch; 0 means the whole val split.")
    learning_rate: float = option(
        7e-4, f"Peak learning rate for a global batch of {REFERENCE_BATCH_SIZE}, scaled linearly with "
        "--batch_size and cosine-decayed to 0 over the steps after --warmup_steps.")
    warmup_steps: int = option(0, "Steps over which the learning rate rises linearly from 0 to its peak before "
                               "the cosine decay (over the remaining steps); 0: start at the peak.")
    optimizer: str = option("adam", "adam: Adam with Keras' defaults; sgd: matterport's Mask R-CNN optimizer (momentum "
                            "0.9, weight decay 1e-4, gradients clipped to a global norm of 5).", choices=OPTIMIZERS)
    strategy: str = option("auto", "tf.distribute strategy: auto picks mirrored with several GPUs (or "
                           "--cpu_replicas > 1), else one device; multi_worker_mirrored reads TF_CONFIG.",
                           choices=STRATEGIES)
    cpu_replicas: int = option(0, "Split the CPU into this many logical devices (MirroredStrategy on CPU).")
    tpu: str | None = option(None, "TPU name or address for --strategy=tpu.")
    precision: str = option("float32", "Keras dtype policy for this run: mixed_float16 for GPUs, mixed_bfloat16 "
                            "for TPUs and CPUs; outputs stay float32.", choices=PRECISIONS)
    positive_fraction: float = option(0.0, "Sample training images so this share is positive (0: as stored; "
                                      "about 23% of RSNA images are).")
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
    augment: bool = option(True, "Random flip, rotation, zoom, shift, brightness and contrast, per batch on the "
                           "device; image, mask and boxes move together.")
    early_stopping_patience: int = option(15, "Epochs without improvement of the monitored metric (val_map for "
                                          "models that give boxes, val_loss for classifiers) before stopping.")
    seed: int = option(0, "Seed of the data order, the augmentation and the initial weights.")
    log_every_steps: int = option(10, "Steps between TensorBoard learning-rate, loss and images/s scalars.")
    profile_steps: tuple[int, int] | None = option(
        (10, 12), "Steps traced for TensorBoard's profiler (input-pipeline analysis), as start,end; empty to "
        "trace none.", parse=_parse_steps, unparse=lambda steps: ",".join(map(str, steps)))
    validation_images: int = option(4, "Validation images drawn with true and predicted boxes in TensorBoard "
                                    "each epoch.")

    def validate(self) -> None:
        models.check_name(self.model)
        for name in ("image_size", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, not {getattr(self, name)}")
        for name in ("steps_per_epoch", "validation_steps", "cpu_replicas", "validation_images", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, not {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, not {self.learning_rate}")
        if self.log_every_steps < 1:
            raise UserError(f"--log_every_steps must be at least 1, not {self.log_every_steps}")
