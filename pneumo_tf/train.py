"""Train a pneumonia detector on converted records.

    python -m pneumo_tf.train --flagfile=flags/mask_resnet.flags \\
        --records_dir=records --model_dir=runs/mask_resnet --strategy=mirrored

    python -m pneumo_tf.train --model=retinanet --preset=demo --records_dir=records --model_dir=runs/r

The learning rate given is for a global batch of 16 (the seed report's) and is scaled
linearly with --batch_size (Goyal et al., 2017): doubling the batch doubles the rate.
Every flag is a field of pneumo_tf.training.config.TrainConfig, which holds its default;
--preset=NAME takes the model's named settings for every flag not given (--help lists each
model's options and presets).
--verbosity=1 shows TensorFlow's start-up logging.
"""
import sys

from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from pneumo_tf.training import loop  # noqa: E402
from pneumo_tf.training.config import TrainConfig, with_preset  # noqa: E402

cli.define_flags(TrainConfig)


def main():
    config = with_preset(cli.config_from_flags(TrainConfig), explicit=cli.explicit_fields(TrainConfig))
    summary = loop.train_and_evaluate(config, arguments=sys.argv[1:])
    print(f"trained {summary['model']} for {summary['epochs_run']} epochs in {summary['train_seconds']} s "
          f"({summary['images_per_second']} images/s); exported to {cli.FLAGS.model_dir}")


if __name__ == "__main__":
    cli.run(main)
