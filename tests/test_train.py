"""Training end to end: export, strategies, precision, resume, CLI errors."""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

import replicas  # tests/replicas.py
from pneumo_tf import cli, models
from pneumo_tf.data import augment, metadata, pipeline
from pneumo_tf.errors import UserError
from pneumo_tf.models import exported
from pneumo_tf.models.mask_resnet import MaskResNetOptions
from pneumo_tf.training import loop
from pneumo_tf.training.config import TrainConfig, with_preset

TINY_MASK = ["--model=mask_resnet", "--model_option=channels=4", "--model_option=n_blocks=1",
             "--model_option=depth=2", "--image_size=64", "--batch_size=4"]


def run_train(records, model_dir, *args, env=None, timeout=600):
    command = [sys.executable, "-m", "pneumo_tf.train", f"--records_dir={records}", f"--model_dir={model_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_train_and_export_mask_resnet(tiny_records, tmp_path):
    config = loop.TrainConfig(
        records_dir=tiny_records, model_dir=str(tmp_path / "run"), model="mask_resnet",
        model_options={"channels": 4, "n_blocks": 1, "depth": 2, "image_head": "three_class",
                       "metadata": "view,sex,age"},
        image_size=64, batch_size=4, epochs=2, steps_per_epoch=2, log_every_steps=1, profile_steps=(2, 3),
    )
    summary = loop.train_and_evaluate(config)
    assert summary["epochs_run"] == 2 and summary["steps_per_epoch"] == 2
    history = summary["history"]
    assert len(history["val_map"]) == 2
    # The loss minimised is the sum of the logged terms, in training and in validation.
    np.testing.assert_allclose(history["loss"], np.add(history["mask_loss"], history["image_loss"]), rtol=1e-5)
    np.testing.assert_allclose(history["val_loss"], np.add(history["val_mask_loss"], history["val_image_loss"]),
                               rtol=1e-6)
    # The export holds the best epoch by val_map (the first of equals).
    val_map = summary["history"]["val_map"]
    assert summary["monitor"] == "val_map" and summary["exported_epoch"] == val_map.index(max(val_map))
    # The batch is 4 at the seed's reference 16, so the peak rate is a quarter of 7e-4.
    assert summary["learning_rate"] == pytest.approx(7e-4 / 4)
    model = exported.load(str(tmp_path / "run"))
    assert model.info["model"] == "mask_resnet" and model.image_size == 64 and model.threshold == 0.5
    # Every option as resolved: the ones given and the defaults; the metadata the network takes.
    assert model.info["preset"] == "" and model.info["model_options"] == {
        **MaskResNetOptions().as_dict(), "channels": 4, "n_blocks": 1, "depth": 2, "image_head": "three_class",
        "metadata": ["view", "sex", "age"]}
    assert model.metadata == ("view", "sex", "age")
    images = np.random.default_rng(0).random((2, 64, 64, 1), dtype=np.float32)
    raw = {"view": tf.constant(["AP", "PA"]), "sex": tf.constant(["M", ""]), "age": tf.constant([51, -1])}
    outputs = model.infer(images, raw)
    assert outputs["mask"].shape == (2, 64, 64, 1) and outputs["image_probability"].shape == (2,)
    # The SavedModel's signature takes the raw header facts and runs the same inference.
    saved = tf.saved_model.load(str(tmp_path / "run" / "saved_model"))
    served = saved.serve(tf.constant(images), raw["view"], raw["sex"], raw["age"])
    for key in ("mask", "image_probability"):
        np.testing.assert_allclose(served[key], outputs[key], rtol=1e-5, atol=1e-6)
    # The facts reach the network: other facts, other probabilities.
    other = model.infer(images, {**raw, "view": tf.constant(["PA", "AP"])})
    assert not np.allclose(other["image_probability"], outputs["image_probability"])
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert checkpoints == ["best.json", "best.weights.h5", "epoch-001.weights.h5", "epoch-002.weights.h5"]
    assert not os.path.exists(tmp_path / "run" / "backup")  # removed once training finished
    traces = list((tmp_path / "run" / "logs" / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1  # the profiler's trace of steps 2-3, for TensorBoard's input-pipeline analysis


@pytest.mark.slow
def test_classifiers_train_one_step_in_bfloat16(tiny_records, tmp_path):
    for model, extra in (("cnn", ["--model_option=width=0.25"]), ("vgg16", [])):
        result = run_train(
            tiny_records, tmp_path / model, f"--model={model}", "--image_size=64", "--batch_size=2",
            "--epochs=1", "--steps_per_epoch=1", "--validation_steps=1", "--precision=mixed_bfloat16", *extra,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / model / "pneumo_tf.json") as handle:
            info = json.load(handle)
        history = info["history"]
        terms = history["target_loss"][0] + history.get("regularization_loss", [0.0])[0]  # vgg16's head has L2
        assert info["precision"] == "mixed_bfloat16" and history["loss"][0] == pytest.approx(terms, rel=1e-5)
        assert ("regularization_loss" in history) == (model == "vgg16")


def mirrored_matches_one_device():
    """mask_resnet with a three-class image head and the metadata side input (a replica-pooled IoU loss,
    synchronised batch norm, a second input)."""
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((4, 32, 32, 1), dtype=np.float32),
        "mask": (rng.random((4, 32, 32, 1)) > 0.7).astype(np.float32),
        "target": np.array([1, 0, 1, 0], np.int32),
        "class": np.array([2, 1, 2, 0], np.int32),
        "metadata": metadata.encode(("view", "sex", "age"), ["AP", "PA", "", "AP"], ["M", "F", "F", ""],
                                    [70, 30, -1, 55]).numpy(),
    }
    architecture = models.get("mask_resnet")
    (_, logs_one, _, weights_one), (_, logs_two, _, weights_two) = replicas.one_step_on_one_and_two_replicas(
        lambda: architecture.build(32, architecture.make_options(
            {"channels": 4, "n_blocks": 1, "depth": 2, "image_head": "three_class", "metadata": "view,sex,age"})),
        architecture, *architecture.to_fit(batch), learning_rate=0.1)
    for key in ("loss", "mask_loss", "image_loss"):
        np.testing.assert_allclose(logs_one[key], logs_two[key], rtol=1e-5)
    for a, b in zip(weights_one, weights_two):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("same")


@pytest.mark.slow
def test_mirrored_over_two_cpus_matches_one_device():
    replicas.check_in_fresh_process("test_train", "mirrored_matches_one_device")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_as_two_local_processes(tiny_records, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                     "task": {"type": "worker", "index": index}}))
        command = [sys.executable, "-m", "pneumo_tf.train", f"--records_dir={tiny_records}",
                   f"--model_dir={tmp_path / 'run'}", "--strategy=multi_worker_mirrored", *TINY_MASK,
                   "--epochs=1", "--steps_per_epoch=2", "--validation_steps=1"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    with open(tmp_path / "run" / "pneumo_tf.json") as handle:
        info = json.load(handle)
    assert info["replicas"] == 2 and info["epochs_run"] == 1 and info["steps_per_epoch"] == 2
    assert os.path.isfile(tmp_path / "run" / "model.keras")


@pytest.mark.slow
def test_killed_run_resumes_from_the_last_epoch(tiny_records, tmp_path):
    model_dir = tmp_path / "run"
    args = [f"--records_dir={tiny_records}", f"--model_dir={model_dir}", *TINY_MASK, "--epochs=4",
            "--steps_per_epoch=8", "--validation_steps=1"]
    process = subprocess.Popen([sys.executable, "-m", "pneumo_tf.train", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # BackupAndRestore writes its state at the end of each epoch; kill -9 right after the first.
    state = model_dir / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    while time.time() < deadline and not state.exists() and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with open(state) as handle:
        finished = json.load(handle)["epoch"]  # epochs the killed run completed
    assert 1 <= finished < 4 and not (model_dir / "pneumo_tf.json").exists()
    best_file = model_dir / "checkpoints" / "best.json"
    before = json.loads(best_file.read_text()) if best_file.exists() else None
    result = run_train(tiny_records, model_dir, *args[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    with open(model_dir / "pneumo_tf.json") as handle:
        info = json.load(handle)
    assert info["epochs"] == list(range(finished, 4))  # resumed after the finished epochs
    # The exported epoch is the best over both runs, not only the resumed one.
    resumed = [(v, e) for v, e in zip(info["history"]["val_map"], info["epochs"]) if v == v]
    candidates = resumed + ([(before["value"], before["epoch"])] if before else [])
    best_value = max(v for v, _ in candidates)
    assert info["exported_epoch"] == min(e for v, e in candidates if v == best_value)
    assert json.loads(best_file.read_text())["value"] == best_value
    assert (model_dir / "checkpoints" / "epoch-004.weights.h5").exists()
    assert not (model_dir / "backup").exists()  # removed once training finished


# Runs a tiny training in a process that kills itself (SIGKILL) at one moment: argv[1] records, argv[2]
# model folder, argv[3] the moment: "validation" (the epoch-end evaluation of epoch 1) or "backup" (half-way
# through writing the backup's weights after epoch 1).
KILLED_TRAINING = """
import os, signal, sys
from keras.src.saving import saving_lib
from pneumo_tf.training import callbacks, loop

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[3] == "validation":
    evaluate = callbacks.EpochEvaluation.on_epoch_end
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            kill()
        return evaluate(self, epoch, logs)
    callbacks.EpochEvaluation.on_epoch_end = on_epoch_end
else:
    save = saving_lib.save_weights_only
    backups = []
    def save_weights_only(model, filepath, *args, **kwargs):
        save(model, filepath, *args, **kwargs)
        if os.path.basename(str(filepath)).startswith("latest"):
            backups.append(filepath)
            if len(backups) == 2:  # the second epoch's: cut the file in half, then die
                with open(filepath, "r+b") as handle:
                    handle.truncate(os.path.getsize(filepath) // 2)
                kill()
    saving_lib.save_weights_only = save_weights_only
loop.train_and_evaluate(loop.TrainConfig(
    records_dir=sys.argv[1], model_dir=sys.argv[2], model="mask_resnet",
    model_options={"channels": 4, "n_blocks": 1, "depth": 2}, image_size=64, batch_size=4, epochs=3,
    steps_per_epoch=2, validation_steps=1))
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["validation", "backup"])
def test_kills_during_validation_or_a_checkpoint_write_lose_no_epoch(moment, tiny_records, tmp_path):
    model_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_TRAINING, tiny_records, str(model_dir), moment],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((model_dir / "backup" / "training_metadata.json").read_text())
    assert state["epoch"] == 1  # epoch 1 was not finished: its evaluation or its backup did not complete
    with h5py.File(model_dir / "backup" / "latest.weights.h5"):  # whole (a killed write left a temporary file)
        pass
    result = run_train(tiny_records, model_dir, *TINY_MASK, "--epochs=3", "--steps_per_epoch=2",
                       "--validation_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((model_dir / "pneumo_tf.json").read_text())
    assert info["epochs"] == [1, 2]  # epoch 1 ran again, with its validation
    assert len(info["history"]["val_map"]) == 2 and len(info["history"]["val_loss"]) == 2
    for epoch in (1, 2, 3):
        assert (model_dir / "checkpoints" / f"epoch-{epoch:03d}.weights.h5").exists()


@pytest.mark.parametrize("args, message", [
    (["--records_dir=/nonexistent/records"], "records folder not found"),
    (["--batch_size=0"], "flag --batch_size=0: must be at least 1, not 0"),
    (["--model_option=chanels=4"], "unknown mask_resnet option(s) chanels; known: box_extent_ratio, channels, depth, "),
    (["--model_option=depth=two"], "mask_resnet option depth: expected int, got 'two'"),
    (["--preset=fast"], "unknown preset 'fast' of model mask_resnet; its presets: demo"),
    (["--model_option=channels"], "--model_option: expected key=value, got 'channels'"),
    (["--data_service=grpc://127.0.0.1:1"], "the tf.data service dispatcher at grpc://127.0.0.1:1 is unreachable"),
])
def test_cli_errors(tiny_records, tmp_path, args, message):
    result = run_train(tiny_records, tmp_path / "run", *TINY_MASK, *args)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_unknown_model_is_refused_with_the_known_names(tiny_records, tmp_path):
    result = run_train(tiny_records, tmp_path / "run", "--model=resnet9000")
    assert result.returncode != 0 and not (tmp_path / "run").exists()
    assert ("flag --model=resnet9000: value should be one of <cnn|vgg16|mask_resnet|retinanet|mask_rcnn>"
            in result.stderr)


def test_help_and_train_config_agree_on_every_default():
    # absl prints the flags as XML and exits 1 after --helpxml, as after --help.
    result = subprocess.run([sys.executable, "-m", "pneumo_tf.train", "--helpxml"], capture_output=True, text=True,
                            timeout=300)
    shown = {flag.findtext("name"): flag for flag in ElementTree.fromstring(result.stdout).iter("flag")
             if flag.findtext("file", "").endswith("train.py")}
    fields = {field.metadata.get("flag") or field.name: field for field in dataclasses.fields(TrainConfig)}
    assert set(shown) == set(fields)
    defaults = TrainConfig(records_dir="r", model_dir="m")
    for name, field in fields.items():
        assert field.metadata["help"] in shown[name].findtext("meaning"), name  # absl adds choices, "repeat"
        if name in ("records_dir", "model_dir"):  # required: no default
            continue
        # The default --help shows, given back as a flag, is TrainConfig's default.
        values = flags.FlagValues()
        cli.define_flags(TrainConfig, flag_values=values)
        default = shown[name].findtext("default")
        # (A None default shows as nothing; a list default is given back by leaving the flag out.)
        given = [] if shown[name].findtext("type") == "multi string" or not default else [f"--{name}={default}"]
        values(["train", "--records_dir=r", "--model_dir=m", *given])
        assert getattr(cli.config_from_flags(TrainConfig, flag_values=values), field.name) == \
            getattr(defaults, field.name), name


def test_flags_round_trip_every_field():
    values = flags.FlagValues()
    cli.define_flags(TrainConfig, flag_values=values)
    values(["train", "--records_dir=r", "--model_dir=m", "--model=vgg16", "--model_option=freeze_backbone=false",
            "--model_option=weights=/a b/c.h5", "--profile_steps=", "--tpu=node", "--nocache", "--cache"])
    config = cli.config_from_flags(TrainConfig, flag_values=values)
    # Model options stay texts until the model's options dataclass parses them (with_preset, validate).
    assert config == TrainConfig(records_dir="r", model_dir="m", model="vgg16",
                                 model_options={"freeze_backbone": "false", "weights": "/a b/c.h5"}, profile_steps=None,
                                 tpu="node", cache=True)
    typed = with_preset(config)
    assert typed.model_options == {"freeze_backbone": False, "weights": "/a b/c.h5"}
    # The flags written for a config give it back.
    again = flags.FlagValues()
    cli.define_flags(TrainConfig, flag_values=again)
    again(["train", *cli.flags_from_config(typed)])
    assert with_preset(cli.config_from_flags(TrainConfig, flag_values=again)) == typed


def _flags_config(*args, flagfile=None):
    """(TrainConfig from train's flags, the fields given), as python -m pneumo_tf.train makes them."""
    values = flags.FlagValues()
    cli.define_flags(TrainConfig, flag_values=values)
    values(["train", "--records_dir=r", "--model_dir=m", *args, *([f"--flagfile={flagfile}"] if flagfile else [])])
    return cli.config_from_flags(TrainConfig, flag_values=values), cli.explicit_fields(TrainConfig, flag_values=values)


def test_a_preset_sets_what_the_flags_do_not(tmp_path):
    preset = models.get("retinanet").preset("demo")
    config, given = _flags_config("--model=retinanet", "--preset=demo", "--model_option=max_level=4",
                                  "--image_size=64")
    resolved = with_preset(config, given)
    assert resolved.learning_rate == preset.train["learning_rate"] == 3e-4
    # Model options key by key: the preset's, the one given replaced, all typed.
    assert resolved.model_options == {**preset.model_options, "max_level": 4}
    assert resolved.model_options["stackwise_num_filters"] == (64, 64, 128, 256)
    # A flag given wins, even at the default value, on the command line or in a flagfile.
    for args, flagfile_lines in ((["--learning_rate=0.0007"], []), ([], ["--learning_rate=0.0007"])):
        flagfile = tmp_path / "run.flags"
        flagfile.write_text("\n".join(["--model=retinanet", "--preset=demo", *flagfile_lines]) + "\n")
        resolved = with_preset(*_flags_config(*args, flagfile=flagfile))
        assert resolved.learning_rate == 7e-4 and resolved.model_options == dict(preset.model_options)
    # Built in Python: the fields that differ from the defaults are the ones given.
    python_built = TrainConfig(records_dir="r", model_dir="m", model="retinanet", preset="demo", learning_rate=1e-3)
    assert with_preset(python_built).learning_rate == 1e-3
    assert with_preset(dataclasses.replace(python_built, learning_rate=7e-4)).learning_rate == 3e-4
    # No preset: the flags as given, options typed.
    plain = with_preset(_flags_config("--model=retinanet", "--model_option=max_level=4")[0])
    assert plain.learning_rate == 7e-4 and plain.model_options == {"max_level": 4}


def test_every_preset_sets_known_settings_to_valid_values():
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    for name in models.NAMES:
        architecture = models.get(name)
        assert "demo" in architecture.presets, name
        for preset_name, preset in architecture.presets.items():
            assert set(preset.train) <= fields - {"model", "preset", "model_options"}, (name, preset_name)
            resolved = with_preset(TrainConfig(records_dir="r", model_dir="m", model=name, preset=preset_name))
            resolved.validate()
            assert resolved.model_options == dict(preset.model_options)


def test_an_unknown_preset_names_the_models_presets():
    with pytest.raises(UserError, match="^unknown preset 'big' of model cnn; its presets: demo$"):
        with_preset(TrainConfig(records_dir="r", model_dir="m", model="cnn", preset="big"))
    with pytest.raises(UserError, match="^unknown preset 'big' of model cnn; its presets: demo$"):
        TrainConfig(records_dir="r", model_dir="m", model="cnn", preset="big").validate()


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 0}, "--batch_size must be at least 1, not 0"),
    ({"learning_rate": 0.0}, "--learning_rate must be greater than 0, not 0"),
    ({"positive_fraction": 1.0}, r"--positive_fraction must be in \[0, 1\), not 1"),
    ({"warmup_steps": -1}, "--warmup_steps must be at least 0, not -1"),
    ({"model_options": {"channels": 0}}, "mask_resnet option channels must be at least 1, not 0"),
])
def test_a_train_config_built_in_python_is_refused_as_its_flags_would_be(changes, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        dataclasses.replace(TrainConfig(records_dir="r", model_dir="m"), **changes).validate()


@pytest.mark.slow
def test_a_run_with_a_preset_records_what_it_resolved(tiny_records, tmp_path):
    result = run_train(tiny_records, tmp_path / "run", *TINY_MASK, "--preset=demo", "--epochs=1",
                       "--steps_per_epoch=1", "--validation_steps=1", "--profile_steps=")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "pneumo_tf.json").read_text())
    preset = models.get("mask_resnet").preset("demo")
    # The preset's learning rate (flags did not give one) at batch 4; its upsampling; the flags' sizes.
    assert info["preset"] == "demo" and info["learning_rate"] == pytest.approx(preset.train["learning_rate"] / 4)
    assert info["model_options"] == {**MaskResNetOptions().as_dict(), "channels": 4, "n_blocks": 1, "depth": 2,
                                     "upsampling": "bilinear"}
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "run" / "logs"))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    hparams = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG]).hparams
    assert hparams["preset"].string_value == "demo"
    assert hparams["learning_rate"].number_value == pytest.approx(preset.train["learning_rate"] / 4)
    assert hparams["model_option.upsampling"].string_value == "bilinear"
    assert hparams["model_option.channels"].number_value == 4


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine():
    def rates(optimizer, steps):
        found = []
        for step in steps:
            optimizer.iterations.assign(step)
            found.append(float(optimizer.learning_rate))
        return found

    # The peak is --learning_rate scaled from the reference batch 16 to 32.
    config = TrainConfig(records_dir="r", model_dir="m", learning_rate=1e-3, batch_size=32, warmup_steps=10)
    peak, optimizer = loop._optimizer(config, total_steps=110)
    assert peak == pytest.approx(2e-3)
    # 0 -> peak over steps 0-10, then a cosine over the last 100: half the peak at step 60, 0 at 110.
    np.testing.assert_allclose(rates(optimizer, [0, 5, 10, 60, 110]), [0, 1e-3, 2e-3, 1e-3, 0], atol=1e-9)
    _, plain = loop._optimizer(dataclasses.replace(config, warmup_steps=0), total_steps=110)
    np.testing.assert_allclose(rates(plain, [0, 55, 110]), [2e-3, 1e-3, 0], atol=1e-9)


def test_a_warm_up_as_long_as_the_run_is_refused(tiny_records, tmp_path):
    result = run_train(tiny_records, tmp_path / "run", *TINY_MASK, "--epochs=2", "--steps_per_epoch=3",
                       "--warmup_steps=6")
    assert result.returncode != 0 and not (tmp_path / "run").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --warmup_steps 6 leaves no step to train at the peak rate: the run has 6 "
                      "(2 epochs of 3)"], result.stderr[-2000:]


def test_keras_still_calls_the_symbolic_build_shim():
    """keras_shim.Prebuilt overrides a private Keras method: this fails the day Keras renames it or
    stops calling it from fit (the multi-worker test would then fail far slower)."""
    import inspect

    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    assert list(inspect.signature(TensorFlowTrainer._maybe_symbolic_build).parameters) == [
        "self", "iterator", "data_batch"]
    calls = []

    class Counting(loop.Trainer):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            calls.append(iterator is not None)
            super()._maybe_symbolic_build(iterator, data_batch)

    architecture = models.get("cnn")
    network = architecture.build(64, architecture.make_options({"width": 0.05}))
    model = Counting(network, architecture, augment.AugmentConfig.off())
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    batch = {"image": np.zeros((2, 64, 64, 1), np.float32), "target": np.array([0, 1], np.int32)}
    data = tf.data.Dataset.from_tensors(architecture.to_fit(batch)).repeat()
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    assert calls == [True] and model.optimizer.built


def test_validation_reads_the_val_split_once_an_epoch(tiny_records, tmp_path, monkeypatch):
    decoded = {"train": 0, "val": 0}
    make_dataset = pipeline.make_dataset

    def counting(records_dir, split, *args, **kwargs):
        dataset = make_dataset(records_dir, split, *args, **kwargs)

        def count(images):
            decoded[split] += int(images.shape[0])
            return 0

        def counted(batch):
            with tf.control_dependencies([tf.py_function(count, [batch["image"]], tf.int32)]):
                return {key: tf.identity(value) for key, value in batch.items()}

        return dataset.map(counted)

    monkeypatch.setattr(pipeline, "make_dataset", counting)
    summary = loop.train_and_evaluate(TrainConfig(
        records_dir=tiny_records, model_dir=str(tmp_path / "run"), model="mask_resnet",
        model_options={"channels": 4, "n_blocks": 1, "depth": 2}, image_size=64, batch_size=4, epochs=2,
        steps_per_epoch=2, profile_steps=None,
    ))
    assert decoded["val"] == 2 * pipeline.num_examples(tiny_records, "val")
    assert {"val_loss", "val_mask_loss", "val_mask_mean_iou", "val_map"} <= set(summary["history"])
