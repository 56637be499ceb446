"""Hyper-parameter search: KerasTuner's oracles choose, and every trial is a normal training run.

    python -m pneumo_tf.tune --flagfile=flags/mask_resnet.flags --records_dir=records --tune_dir=runs/tune \\
        --search=learning_rate=log:1e-4:3e-3,batch_size=choice:8:16:32,model_option.channels=choice:16:32 \\
        --trials=8 [--algorithm=random|bayesian|hyperband] [--parallel=2]

The search space, one `name=kind:...` per comma-separated item:
  log:LOW:HIGH          a float drawn log-uniformly (learning rates)
  float:LOW:HIGH        a float drawn uniformly
  int:LOW:HIGH[:STEP]   an integer
  choice:A:B:...        one of the values (numbers, True/False, or words)
where name is a flag of python -m pneumo_tf.train (learning_rate, batch_size, image_size, epochs,
positive_fraction, seed, augment, ...) or model_option.KEY for an architecture option.

Each trial is `loop.train_and_evaluate` on the train flags with the trial's values, in its
own model folder (tune_dir/trials/<trial id>: TensorBoard logs, checkpoints, the exported
model), so `tensorboard --logdir=tune_dir/trials` compares the trials in its HParams dashboard
(the trainer logs every searched value as an hparam). The objective is the trial's best val
challenge mAP (val_map) for models that give boxes, its best val AUC (val_target_auc) for
classifiers. Hyperband trains each trial from scratch for the epochs its bracket gives
(--epochs is its largest budget): the cosine learning-rate schedule spans a run's epochs, so a
run cannot simply be continued for more.

tune_dir/
  search/          KerasTuner's state (oracle.json, one trial_<id>/trial.json per trial)
  trials/<id>/     each trial's model folder
  tune.json        the search as asked (a rerun must ask the same)
  best.flags       the best trial's flags: `python -m pneumo_tf.train --flagfile=tune_dir/best.flags`
                   retrains it (into tune_dir/best_model unless --model_dir follows the flagfile);
                   number for number under TensorFlow's op determinism
                   (tf.config.experimental.enable_op_determinism(), as the tests run it), slightly
                   differently without it, as training reads its shards out of order for speed

Resuming: rerunning the same command continues the search where it stopped: finished trials
are kept, and a trial that was running when the search was killed runs again with the same
values into the same folder, where training resumes from its last finished epoch.

In parallel: --parallel=N runs N trials at a time as processes on this machine, through
KerasTuner's distributed mode (one chief process holding the oracle, N workers asking it
for trials over gRPC on 127.0.0.1). The same mode spreads trials over machines: start the same
command on every machine (tune_dir on storage all of them see) with
  KERASTUNER_ORACLE_IP=<chief address> KERASTUNER_ORACLE_PORT=<port>
  KERASTUNER_TUNER_ID=chief on one machine (it only serves the oracle) and
  KERASTUNER_TUNER_ID=tuner0, tuner1, ... on the workers (each runs trials one after another).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import typing

import keras_tuner
import numpy as np

from pneumo_tf import cli, models
from pneumo_tf.cli import check_constraints, option
from pneumo_tf.errors import UserError
from pneumo_tf.fileio import atomic_open, write_json_atomic
from pneumo_tf.training import loop
from pneumo_tf.training.config import TrainConfig

ALGORITHMS = ("random", "bayesian", "hyperband")
KINDS = ("log", "float", "int", "choice")
MODEL_OPTION = "model_option."
# Flags a search cannot vary: where the data and the trial's folder are, the architecture and its
# preset (applied before the search: --model_option.KEY and the flags vary what it set).
FIXED_FIELDS = ("records_dir", "model_dir", "model", "preset")
# KerasTuner's Hyperband puts the trial's budget here, among its other entries.
TUNER_ENTRIES = "tuner/"
HYPERBAND_EPOCHS = "tuner/epochs"
CHIEF = "chief"


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    search: tuple[str, ...] = option((), "The search space: name=kind:... items, comma separated (kinds log, float, "
                                     "int, choice; see python -m pneumo_tf.tune's docstring).")
    tune_dir: str | None = option(None, "Folder of the search: KerasTuner's state, one model folder per trial, "
                                  "best.flags. Rerunning into it resumes the search.")
    trials: int = option(10, "Trials to run (random and bayesian; hyperband's brackets set their own count).",
                         minimum=1)
    algorithm: str = option("random", "random search, bayesian optimisation (Gaussian process), or hyperband "
                            "(successive halving over --epochs).", choices=ALGORITHMS)
    tuner_seed: int = option(0, "Seed of the search's draws (each trial trains with --seed).")
    hyperband_factor: int = option(3, "Hyperband's reduction factor: each bracket keeps 1/factor of its trials.",
                                   minimum=2)
    parallel: int = option(1, "Trials run at a time as processes on this machine (KerasTuner's chief and workers).",
                           minimum=1)

    def validate(self) -> None:
        check_constraints(self)
        if not self.search:
            raise UserError("--search needs at least one name=kind:... item")
        if not self.tune_dir:
            raise UserError("give --tune_dir (the search's folder)")


# ------------------------------------------------------------------------------------------------
# The search space.


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a word, such as an up-sampling mode


def _field_types() -> dict:
    hints = typing.get_type_hints(TrainConfig)
    return {field.name: cli._base_type(hints[field.name]) for field in dataclasses.fields(TrainConfig)}


def check_searchable(name: str, types: dict) -> None:
    """A UserError unless a search may vary `name`: a train flag but FIXED_FIELDS, or model_option.KEY."""
    if name in FIXED_FIELDS or (name not in types and not name.startswith(MODEL_OPTION)) or name == "model_options":
        raise UserError(f"--search cannot vary {name!r}: name a flag of python -m pneumo_tf.train (but "
                        f"{', '.join(FIXED_FIELDS)}) or model_option.KEY")


def search_space(items) -> keras_tuner.HyperParameters:
    """--search items -> KerasTuner's HyperParameters (checked against the train flags)."""
    space = keras_tuner.HyperParameters()
    types = _field_types()
    for item in items:
        name, separator, spec = item.partition("=")
        kind, *values = spec.split(":")
        if not separator or kind not in KINDS:
            raise UserError(f"--search item {item!r} is not name=kind:... with kind one of {', '.join(KINDS)}")
        check_searchable(name, types)
        try:
            if kind == "choice":
                space.Choice(name, [_literal(value) for value in values])
            elif kind == "int":
                low, high, *step = (int(value) for value in values)
                if len(step) > 1:
                    raise ValueError("int takes LOW:HIGH[:STEP]")
                space.Int(name, low, high, step=step[0] if step else 1)
            else:
                low, high = (float(value) for value in values)
                space.Float(name, low, high, sampling="log" if kind == "log" else "linear")
        except (ValueError, TypeError) as error:
            raise UserError(f"--search item {item!r}: {error}") from error
    return space


def trial_config(base: TrainConfig, values: dict, model_dir: str) -> TrainConfig:
    """The train config of one trial: `base` with the trial's values, into `model_dir`.

    The values come from the oracle, which in a multi-machine search answers over the network, and
    from the trial files in tune_dir: only what a search may vary is applied (never where the data
    or the model go), anything else is refused.
    """
    types = _field_types()
    fields, options = {"model_dir": model_dir}, dict(base.model_options)
    for name, value in values.items():
        if name == HYPERBAND_EPOCHS:
            fields["epochs"] = int(value)
            continue
        if name.startswith(TUNER_ENTRIES):  # KerasTuner's bookkeeping: the Hyperband round, bracket, ...
            continue
        check_searchable(name, types)
        if name.startswith(MODEL_OPTION):
            options[name.removeprefix(MODEL_OPTION)] = value
        else:
            fields[name] = types[name](value)  # a choice of 8, 16 is int already; 1e-3 stays float
    return dataclasses.replace(base, model_options=options, **fields)


def objective(model: str) -> keras_tuner.Objective:
    """val_map for models that give boxes, val_target_auc for classifiers; both maximised."""
    return keras_tuner.Objective("val_map" if models.get(model).gives_boxes else "val_target_auc", "max")


def trial_score(summary: dict, name: str) -> float:
    """A finished run's best value of the objective over its epochs (NaN when no epoch had one)."""
    values = [value for value in summary["history"].get(name, []) if not math.isnan(value)]
    return float(np.max(values)) if values else math.nan


# ------------------------------------------------------------------------------------------------
# The tuner.


class TrainingTuner(keras_tuner.engine.base_tuner.BaseTuner):
    """A KerasTuner tuner whose trials are `loop.train_and_evaluate` runs (no hypermodel)."""

    def __init__(self, oracle, base: TrainConfig, tune_dir: str):
        self.base = base
        self.trials_dir = os.path.join(tune_dir, "trials")
        super().__init__(oracle, directory=tune_dir, project_name="search")

    def trial_dir(self, trial_id: str) -> str:
        return os.path.join(self.trials_dir, trial_id)

    def run_trial(self, trial, *args, **kwargs):
        config = trial_config(self.base, trial.hyperparameters.values, self.trial_dir(trial.trial_id))
        try:
            summary = loop.train_and_evaluate(config)
        except UserError as error:  # values this data cannot train with (a batch larger than the split, ...)
            raise keras_tuner.errors.FailedTrialError(str(error)) from error
        name = self.oracle.objective.name
        return {name: trial_score(summary, name)}

    # A trial's model is its exported model folder; KerasTuner's own model saving is not used.
    def save_model(self, trial_id, model, step=0):
        pass

    def load_model(self, trial):
        raise NotImplementedError(f"the trial's model is the exported model in {self.trial_dir(trial.trial_id)}")


def make_oracle(config: TuneConfig, base: TrainConfig, space: keras_tuner.HyperParameters):
    common = {"objective": objective(base.model), "hyperparameters": space, "seed": config.tuner_seed,
              "tune_new_entries": False, "allow_new_entries": False}
    if config.algorithm == "random":
        return keras_tuner.oracles.RandomSearchOracle(max_trials=config.trials, **common)
    if config.algorithm == "bayesian":
        return keras_tuner.oracles.BayesianOptimizationOracle(max_trials=config.trials, **common)
    return keras_tuner.oracles.HyperbandOracle(max_epochs=base.epochs, factor=config.hyperband_factor, **common)


def _check_same_search(path: str, asked: dict) -> None:
    """A rerun resumes the search only when it asks for the same one."""
    if os.path.isfile(path):
        with open(path) as handle:
            saved = json.load(handle)
        if saved != asked:
            changed = sorted(key for key in asked if saved.get(key) != asked[key])
            raise UserError(f"{os.path.dirname(path)} holds another search (it differs in {', '.join(changed)}): "
                            "use a new --tune_dir, or the same flags to resume it")
    else:
        write_json_atomic(path, asked)


def write_best_flags(path: str, config: TrainConfig, trial_id: str, name: str, score: float, searched) -> None:
    header = [f"# The best trial of the search in {os.path.dirname(path)}: trial {trial_id}, {name} {score:.6g}.",
              f"# Searched: {', '.join(searched)}. Retrain it with python -m pneumo_tf.train --flagfile={path}"]
    with atomic_open(path) as handle:
        handle.write("\n".join(header + cli.flags_from_config(config)) + "\n")


def _is_worker() -> bool:
    return "KERASTUNER_ORACLE_IP" in os.environ and CHIEF not in os.environ.get("KERASTUNER_TUNER_ID", "")


def tune(config: TuneConfig, base: TrainConfig) -> dict | None:
    """Runs (or resumes) the search; returns the best trial's summary (None in a worker process)."""
    config.validate()
    base.validate()
    space = search_space(config.search)
    os.makedirs(config.tune_dir, exist_ok=True)
    asked = {"search": list(config.search), "algorithm": config.algorithm, "trials": config.trials,
             "tuner_seed": config.tuner_seed, "hyperband_factor": config.hyperband_factor,
             "train_flags": cli.flags_from_config(dataclasses.replace(base, model_dir=""))}
    if not _is_worker():
        _check_same_search(os.path.join(config.tune_dir, "tune.json"), asked)
    tuner = TrainingTuner(make_oracle(config, base, space), base, config.tune_dir)
    tuner.search()
    if _is_worker():
        return None
    best = tuner.oracle.get_best_trials(1)
    if not best:
        raise UserError(f"no trial of {config.tune_dir} finished with a {tuner.oracle.objective.name}: "
                        "see the trials' messages in its search/trial_*/trial.json")
    [trial] = best
    best_config = trial_config(base, trial.hyperparameters.values, os.path.join(config.tune_dir, "best_model"))
    path = os.path.join(config.tune_dir, "best.flags")
    write_best_flags(path, best_config, trial.trial_id, tuner.oracle.objective.name, trial.score,
                     [item.partition("=")[0] for item in config.search])
    completed = [t for t in tuner.oracle.trials.values() if t.status == keras_tuner.engine.trial.TrialStatus.COMPLETED]
    return {"best_trial": trial.trial_id, "objective": tuner.oracle.objective.name, "score": trial.score,
            "values": {k: v for k, v in trial.hyperparameters.values.items()}, "best_flags": path,
            "trial_dir": tuner.trial_dir(trial.trial_id), "trials_completed": len(completed),
            "trials_dir": tuner.trials_dir}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_parallel(argv: list[str], workers: int) -> int:
    """Runs this command as KerasTuner's chief plus `workers` worker processes on 127.0.0.1; returns the
    first non-zero exit code, else 0. The chief, which writes best.flags, prints the summary."""
    port = str(_free_port())
    command = [sys.executable, "-m", "pneumo_tf.tune", *argv, "--parallel=1"]

    def start(tuner_id: str):
        env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": port,
               "KERASTUNER_TUNER_ID": tuner_id}
        return subprocess.Popen(command, env=env)

    chief = start(CHIEF)
    processes = [start(f"tuner{index}") for index in range(workers)]
    codes = [process.wait() for process in processes] + [chief.wait()]
    return next((code for code in codes if code), 0)
