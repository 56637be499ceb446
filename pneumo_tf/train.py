"""Train a pneumonia detector on converted records.

    python -m pneumo_tf.train --flagfile=flags/mask_resnet.flags \\
        --records_dir=records --model_dir=runs/mask_resnet --strategy=mirrored

The learning rate given is for a global batch of 16 (the seed report's) and is scaled
linearly with --batch_size (Goyal et al., 2017): doubling the batch doubles the rate.
"""
import ast
import sys

from absl import app, flags

from pneumo_tf.training import distribute
from pneumo_tf.training import trainer
from pneumo_tf.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("records_dir", None, "Folder written by python -m pneumo_tf.convert (manifest.json + shards).")
flags.DEFINE_string("model_dir", None, "Where logs, checkpoints, the resumable backup and the exported model go. "
                    "Rerunning into it after a kill resumes from the last finished epoch.")
flags.DEFINE_string("model", "mask_resnet", "Architecture: cnn, vgg16 or mask_resnet.")
flags.DEFINE_multi_string("model_option", [], "Architecture option as key=value, repeatable, e.g. "
                          "--model_option=channels=32 --model_option=classification_head=True, or "
                          "--model_option=weights=/path/vgg16_notop.h5 for local ImageNet weights.")
flags.DEFINE_integer("image_size", 256, "Side of the square images the model sees, in pixels.")
flags.DEFINE_integer("batch_size", 16, "Global batch size, split evenly across replicas.")
flags.DEFINE_integer("epochs", 12, "Epochs to train (early stopping may end sooner).")
flags.DEFINE_integer("steps_per_epoch", 0, "Training steps per epoch; 0 means one pass over the train split.")
flags.DEFINE_integer("validation_steps", 0, "Validation batches per epoch; 0 means the whole val split.")
flags.DEFINE_float("learning_rate", 7e-4, "Peak Adam learning rate for a global batch of 16, scaled linearly with "
                   "--batch_size and cosine-decayed to 0 over all steps.")
flags.DEFINE_enum("strategy", "auto", distribute.STRATEGIES, "tf.distribute strategy: auto picks mirrored with "
                  "several GPUs (or --cpu_replicas > 1), else one device; multi_worker_mirrored reads TF_CONFIG.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many logical devices (MirroredStrategy on CPU).")
flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.")
flags.DEFINE_enum("precision", "float32", distribute.PRECISIONS, "Keras dtype policy: mixed_float16 for GPUs, "
                  "mixed_bfloat16 for TPUs and CPUs; outputs stay float32.")
flags.DEFINE_float("positive_fraction", 0.0, "Sample training images so this share is positive (0: as stored; "
                   "about 23% of RSNA images are).")
flags.DEFINE_bool("cache", False, "Keep the decoded train and val images in memory (about 8 x image_size^2 bytes "
                  "each: small --image_size only).")
flags.DEFINE_bool("augment", True, "Random flip, rotation, zoom, shift, brightness and contrast, per batch on the "
                  "device; image, mask and boxes move together.")
flags.DEFINE_integer("early_stopping_patience", 15, "Epochs without improvement of the monitored metric "
                     "(val_map for mask models, val_loss for classifiers) before stopping.")
flags.DEFINE_integer("seed", 0, "Seed of the data order and augmentation.")
flags.DEFINE_integer("log_every_steps", 10, "Steps between TensorBoard learning-rate, loss and images/s scalars.")
flags.DEFINE_string("profile_steps", "10,12", "Steps traced for TensorBoard's profiler (input-pipeline analysis), "
                    "as start,end; empty to trace none.")
flags.mark_flags_as_required(["records_dir", "model_dir"])


def parse_model_options(pairs):
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UserError(f"--model_option needs key=value, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a plain string such as a path
    return options


def config_from_flags() -> trainer.TrainConfig:
    profile = None
    if FLAGS.profile_steps:
        try:
            start, end = (int(v) for v in FLAGS.profile_steps.split(","))
        except ValueError as error:
            raise UserError(f"--profile_steps needs start,end, got {FLAGS.profile_steps!r}") from error
        profile = (start, end)
    return trainer.TrainConfig(
        records_dir=FLAGS.records_dir, model_dir=FLAGS.model_dir, model=FLAGS.model,
        model_options=parse_model_options(FLAGS.model_option), image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch,
        validation_steps=FLAGS.validation_steps, learning_rate=FLAGS.learning_rate, strategy=FLAGS.strategy,
        cpu_replicas=FLAGS.cpu_replicas, tpu=FLAGS.tpu, precision=FLAGS.precision,
        positive_fraction=FLAGS.positive_fraction or None, cache=FLAGS.cache, augment=FLAGS.augment,
        early_stopping_patience=FLAGS.early_stopping_patience, seed=FLAGS.seed,
        log_every_steps=FLAGS.log_every_steps, profile_steps=profile,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        summary = trainer.train_and_evaluate(config_from_flags())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"trained {summary['model']} for {summary['epochs_run']} epochs in {summary['train_seconds']} s "
          f"({summary['images_per_second']} images/s); exported to {FLAGS.model_dir}")
    return 0


if __name__ == "__main__":
    app.run(main)
