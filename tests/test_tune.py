"""Hyper-parameter search: the search space, trial configs, train flags written back, and a 2-trial
search on tiny records that is killed between trials, resumes, and whose best.flags retrains the
best trial to the same numbers."""
import json
import os
import re
import subprocess
import sys

import keras_tuner
import pytest
from absl import flags

from pneumo_tf import cli
from pneumo_tf.errors import UserError
from pneumo_tf.training import search
from pneumo_tf.training.config import TrainConfig, with_preset

BASE = TrainConfig(records_dir="records", model_dir="", model_options={"channels": 4, "depth": 2})


def test_search_space_kinds():
    space = search.search_space(["learning_rate=log:1e-4:3e-3", "positive_fraction=float:0.2:0.5",
                               "epochs=int:2:8:2", "batch_size=choice:8:16:32",
                               "model_option.upsampling=choice:nearest:bilinear", "augment=choice:True:False"])
    by_name = {entry.name: entry for entry in space.space}
    assert (by_name["learning_rate"].min_value, by_name["learning_rate"].max_value,
            by_name["learning_rate"].sampling) == (1e-4, 3e-3, "log")
    assert by_name["positive_fraction"].sampling == "linear"
    assert (by_name["epochs"].min_value, by_name["epochs"].max_value, by_name["epochs"].step) == (2, 8, 2)
    assert by_name["batch_size"].values == [8, 16, 32]
    assert by_name["model_option.upsampling"].values == ["nearest", "bilinear"]
    assert by_name["augment"].values == [True, False]


@pytest.mark.parametrize("item, message", [
    ("learning_rate", "is not name=kind"),
    ("learning_rate=exp:1:2", "is not name=kind"),
    ("records_dir=choice:a:b", "cannot vary 'records_dir'"),
    ("model=choice:cnn:vgg16", "cannot vary 'model'"),
    ("momentum=float:0:1", "cannot vary 'momentum'"),
    ("epochs=int:2", "epochs=int:2"),
])
def test_search_space_errors(item, message):
    with pytest.raises(UserError, match=message):
        search.search_space([item])


def test_trial_config_applies_values_with_the_flags_types():
    config = search.trial_config(BASE, {"learning_rate": 0.002, "batch_size": 8, "model_option.channels": 8,
                                      "image_size": 64.0, search.HYPERBAND_EPOCHS: 3, "tuner/round": 0}, "trial")
    assert config == TrainConfig(records_dir="records", model_dir="trial", learning_rate=0.002, batch_size=8,
                                 image_size=64, epochs=3, model_options={"channels": 8, "depth": 2})
    assert isinstance(config.image_size, int)


@pytest.mark.parametrize("name", ["model_dir", "records_dir", "model", "model_options", "momentum"])
def test_trial_config_refuses_values_a_search_cannot_vary(name):
    """The oracle answers over the network in a multi-machine search (and reads trial files from tune_dir):
    a trial's values may not say where data or models go."""
    with pytest.raises(UserError, match=f"cannot vary '{name}'"):
        search.trial_config(BASE, {"learning_rate": 0.002, name: "/elsewhere"}, "trial")


def test_a_value_with_a_line_break_never_reaches_best_flags(tmp_path):
    config = search.trial_config(BASE, {"model_option.upsampling": "bilinear\n--model_dir=/elsewhere"}, "trial")
    path = tmp_path / "best.flags"
    with pytest.raises(UserError, match=re.escape("--model_option cannot be written as a flag: its value "
                                                  r"'upsampling=bilinear\n--model_dir=/elsewhere' holds a line break")):
        search.write_best_flags(str(path), config, "3", "val_map", 0.5, ["model_option.upsampling"])
    assert not path.exists()
    with pytest.raises(UserError, match="--records_dir cannot be written as a flag"):
        cli.flags_from_config(TrainConfig(records_dir="records\r--model_dir=x", model_dir="m"))


def test_flags_from_config_round_trip():
    config = TrainConfig(records_dir="r", model_dir="m", model_options={"channels": 16, "upsampling": "bilinear"},
                         learning_rate=0.00027185007029646405, augment=False, profile_steps=None, tpu=None)
    lines = cli.flags_from_config(config)
    assert "--noaugment" in lines and "--profile_steps=" in lines and not any("tpu" in line for line in lines)
    parsed = flags.FlagValues()
    cli.define_flags(TrainConfig, flag_values=parsed)
    parsed(["train", *lines])
    # Model options come back as texts, which the model's options type reads back as the values.
    assert with_preset(cli.config_from_flags(TrainConfig, flag_values=parsed)) == config


def test_objective_and_oracles():
    assert search.objective("mask_resnet").name == "val_map" and search.objective("cnn").name == "val_target_auc"
    space = search.search_space(["learning_rate=log:1e-4:3e-3"])
    oracles = {algorithm: search.make_oracle(
        search.TuneConfig(search=("x",), tune_dir="t", trials=5, algorithm=algorithm), BASE, space)
        for algorithm in search.ALGORITHMS}
    assert isinstance(oracles["random"], keras_tuner.oracles.RandomSearchOracle)
    assert isinstance(oracles["bayesian"], keras_tuner.oracles.BayesianOptimizationOracle)
    assert oracles["random"].max_trials == 5 and oracles["hyperband"].max_epochs == BASE.epochs


def test_trial_score_is_the_best_epoch():
    assert search.trial_score({"history": {"val_map": [float("nan"), 0.25, 0.5, 0.125]}}, "val_map") == 0.5
    assert str(search.trial_score({"history": {"val_map": [float("nan")]}}, "val_map")) == "nan"


# ---------------------------------------------------------------------------------------------
# End to end, in subprocesses with TensorFlow's op determinism (training reads shards out of order
# for speed; determinism makes two runs of the same flags comparable number for number).

RUN = """
import os, runpy, sys
import tensorflow as tf
tf.config.experimental.enable_op_determinism()
if os.environ.get("KILL_AFTER_FIRST_TRIAL"):
    from pneumo_tf.training import search
    end = search.TrainingTuner.on_trial_end
    def end_then_die(self, trial):
        end(self, trial)
        os._exit(137)  # as a kill would: no cleanup at all
    search.TrainingTuner.on_trial_end = end_then_die
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__")
"""


def run(module, *args, **env):
    return subprocess.run([sys.executable, "-c", RUN, module, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_search_resumes_after_a_kill_and_best_flags_retrain_the_best_trial(tiny_records, tmp_path):
    tune_dir = tmp_path / "tune"
    args = [f"--records_dir={tiny_records}", f"--tune_dir={tune_dir}", "--model_option=channels=4",
            "--model_option=n_blocks=1", "--model_option=depth=2", "--image_size=64", "--batch_size=4",
            "--epochs=2", "--steps_per_epoch=2", "--search=learning_rate=log:1e-3:1e-2,seed=choice:0:1",
            "--trials=2", "--tuner_seed=3"]
    killed = run("pneumo_tf.tune", *args, KILL_AFTER_FIRST_TRIAL="1")
    assert killed.returncode == 137, killed.stderr[-3000:]
    first = tune_dir / "search" / "trial_0" / "trial.json"
    assert json.loads(first.read_text())["status"] == "COMPLETED"
    assert os.listdir(tune_dir / "trials") == ["0"] and not (tune_dir / "best.flags").exists()
    first_bytes, first_export = first.read_bytes(), (tune_dir / "trials" / "0" / "pneumo_tf.json").stat().st_mtime_ns

    resumed = run("pneumo_tf.tune", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Trial 0 was not run again; trial 1 ran; both count.
    assert first.read_bytes() == first_bytes
    assert (tune_dir / "trials" / "0" / "pneumo_tf.json").stat().st_mtime_ns == first_export
    assert sorted(os.listdir(tune_dir / "trials")) == ["0", "1"]
    assert "2 trials finished" in resumed.stdout
    trials = [json.loads((tune_dir / "search" / f"trial_{index}" / "trial.json").read_text()) for index in (0, 1)]
    assert [trial["status"] for trial in trials] == ["COMPLETED", "COMPLETED"]
    best = max(trials, key=lambda trial: trial["score"])
    # Each trial's score is the best val_map its training logged.
    for trial in trials:
        info = json.loads((tune_dir / "trials" / trial["trial_id"] / "pneumo_tf.json").read_text())
        assert trial["score"] == max(info["history"]["val_map"])
        assert info["learning_rate"] == trial["hyperparameters"]["values"]["learning_rate"] * 4 / 16

    # best.flags: the best trial's values on top of the train flags; retraining gives its numbers.
    best_flags = (tune_dir / "best.flags").read_text().splitlines()
    values = best["hyperparameters"]["values"]
    assert f"--learning_rate={values['learning_rate']}" in best_flags and f"--seed={values['seed']}" in best_flags
    assert f"--model_dir={tune_dir / 'best_model'}" in best_flags
    retrained = run("pneumo_tf.train", f"--flagfile={tune_dir / 'best.flags'}")
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    trial_history = json.loads((tune_dir / "trials" / best["trial_id"] / "pneumo_tf.json").read_text())["history"]
    history = json.loads((tune_dir / "best_model" / "pneumo_tf.json").read_text())["history"]
    assert history["val_map"] == trial_history["val_map"] and history["val_loss"] == trial_history["val_loss"]

    # The same folder with another search is refused, not mixed in.
    other = run("pneumo_tf.tune", *[arg.replace("--trials=2", "--trials=3") for arg in args])
    assert other.returncode == 2 and "holds another search (it differs in trials)" in other.stderr


@pytest.mark.slow
def test_parallel_trials_through_a_local_chief(tiny_records, tmp_path):
    tune_dir = tmp_path / "tune"
    result = subprocess.run(
        [sys.executable, "-m", "pneumo_tf.tune", f"--records_dir={tiny_records}", f"--tune_dir={tune_dir}",
         "--model_option=channels=4", "--model_option=n_blocks=1", "--model_option=depth=2", "--image_size=64",
         "--batch_size=4", "--epochs=1", "--steps_per_epoch=1", "--search=learning_rate=log:1e-4:1e-2",
         "--trials=2", "--parallel=2"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tune_dir / "trials")) == ["0", "1"] and (tune_dir / "best.flags").is_file()
    # Both workers took part (a worker holds one trial at a time, and each saved its state).
    assert sorted(name for name in os.listdir(tune_dir / "search") if name.startswith("tuner")) == \
        ["tuner0.json", "tuner1.json"]
    statuses = [json.loads((tune_dir / "search" / f"trial_{index}" / "trial.json").read_text())["status"]
                for index in (0, 1)]
    assert statuses == ["COMPLETED", "COMPLETED"]
