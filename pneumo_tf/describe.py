"""Print the model card of a model folder, an ensemble folder or a card file.

    python -m pneumo_tf.describe --model_dir=runs/mask_resnet [--json]

shows what the model is and where it came from: architecture and options, the recipe (flags,
flagfiles, command line), the training records (manifest digest, records per split, formats,
synthetic or real), epochs and steps, the validation at export, package versions, every
evaluation since, and a warning when it was trained on synthetic or too few real images
(pneumo_tf/models/card.py has the schema). --verbosity=1 shows TensorFlow's start-up logging.
"""
from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from pneumo_tf.models import card as model_card  # noqa: E402

cli.define_flags(model_card.DescribeConfig)


def main():
    print(model_card.describe(cli.config_from_flags(model_card.DescribeConfig)))


if __name__ == "__main__":
    cli.run(main)
