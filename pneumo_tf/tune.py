"""Search training hyper-parameters with KerasTuner; every trial is a normal training run.

    python -m pneumo_tf.tune --flagfile=flags/mask_resnet.flags --records_dir=records --tune_dir=runs/tune \\
        --search=learning_rate=log:1e-4:3e-3,batch_size=choice:8:16:32 --trials=8

takes every flag of python -m pneumo_tf.train (but --model_dir: each trial gets its own folder
under --tune_dir) plus the search's own, runs or resumes the search, and writes the best trial's
flags to <tune_dir>/best.flags, which python -m pneumo_tf.train --flagfile=... retrains.
See pneumo_tf/training/search.py for the search space, resuming and parallel trials.
--verbosity=1 shows TensorFlow's start-up logging.
"""
import sys

from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from pneumo_tf.training import search  # noqa: E402
from pneumo_tf.training.config import TrainConfig, with_preset  # noqa: E402

cli.define_flags(TrainConfig, exclude=("model_dir",))
cli.define_flags(search.TuneConfig)


def main():
    config = cli.config_from_flags(search.TuneConfig)
    if config.parallel > 1:
        config.validate()
        return search.run_parallel(sys.argv[1:], config.parallel)
    base = with_preset(cli.config_from_flags(TrainConfig, model_dir=""),
                       explicit=cli.explicit_fields(TrainConfig) | {"model_dir"})
    summary = search.tune(config, base)
    if summary is not None:
        print(f"{summary['trials_completed']} trials finished; best: trial {summary['best_trial']} with "
              f"{summary['objective']} {summary['score']:.4g} ({summary['trial_dir']}), values {summary['values']}")
        print(f"retrain it: python -m pneumo_tf.train --flagfile={summary['best_flags']}")
        print(f"compare the trials: tensorboard --logdir={summary['trials_dir']}")


if __name__ == "__main__":
    cli.run(main)
