"""Write a synthetic RSNA-layout folder: the built-in data of the demo, the tests and the benchmarks.

    python -m pneumo_tf.synthesise --output_dir=/tmp/rsna --num_images=200 [--difficulty=hard]

writes stage_2_train_images/*.dcm, stage_2_test_images/*.dcm (with --num_test_images),
stage_2_train_labels.csv and stage_2_detailed_class_info.csv, shaped like the challenge's
(see pneumo_tf/records/synthetic.py for what the pictures hold and what --difficulty changes).
Every flag is a field of pneumo_tf.records.synthetic.SynthesiseConfig.
"""
from tqdm import tqdm

from pneumo_tf import cli
from pneumo_tf.records import synthetic

cli.define_flags(synthetic.SynthesiseConfig)


def main():
    config = cli.config_from_flags(synthetic.SynthesiseConfig)
    cli.check_constraints(config)
    with tqdm(total=config.data.num_images + config.data.num_test_images, desc="synthesise", unit="files") as progress:
        paths = synthetic.write_dataset(config.output_dir, config.data, config.workers or None, progress)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    cli.run(main)
