"""Write a synthetic RSNA-layout folder: the built-in data of the demo, the tests and the benchmarks.

    python -m pneumo_tf.synthesise --output_dir=/tmp/rsna --num_images=200 [--difficulty=hard]

writes stage_2_train_images/*.dcm, stage_2_test_images/*.dcm (with --num_test_images),
stage_2_train_labels.csv and stage_2_detailed_class_info.csv, shaped like the challenge's
(see pneumo_tf/records/synthetic.py for what the pictures hold and what --difficulty changes).
"""
from absl import flags
from tqdm import tqdm

from pneumo_tf import cli
from pneumo_tf.records import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Folder to write the RSNA-layout data set into.")
cli.define_flags(synthetic.SyntheticConfig)
flags.DEFINE_integer("workers", 0, "Processes writing files; 0 uses all cores.")
flags.mark_flag_as_required("output_dir")


def main():
    config = cli.config_from_flags(synthetic.SyntheticConfig)
    with tqdm(total=config.num_images + config.num_test_images, desc="synthesise", unit="files") as progress:
        paths = synthetic.write_dataset(FLAGS.output_dir, config, FLAGS.workers or None, progress)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    cli.run(main)
