"""The model contract, checked the same way for every registered architecture (keras-hub's run_task_test idea).

Each architecture runs at test size (tests/tiny_models.py) as it is and with every side input (all the
metadata and, for a box model, a three-class image head): golden parameter counts, what goes in and comes
out and in which dtype, one training step whose logged loss is the architecture's loss, the `.keras` and
SavedModel round trips of the exported folder, a mixed_bfloat16 step against float32, an XLA step and
inference against eager, and one step on MirroredStrategy over two logical CPUs against one device. What
is specific to one model stays in its own test file.

Two steps "are the same" when their logs agree to float32 rounding and their weight updates differ by no
more than reordering the batch moves them (`assert_same_step`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tiny_models
from pneumo_tf import models
from pneumo_tf.data import augment, metadata
from pneumo_tf.errors import UserError
from pneumo_tf.models import architecture as contract, exported
from pneumo_tf.records import schema
from pneumo_tf.training import distribute
from pneumo_tf.training.loop import Trainer
from tiny_models import SIZE, TINY

TESTS = pathlib.Path(__file__).resolve().parent


def each_model(sides=(False, True), slow_when=lambda tiny: False):
    """pytest parameters (name, side) for every registered architecture; `side` adds the side inputs."""
    return [pytest.param(name, side, id=f"{name}-side" if side else name,
                         marks=[pytest.mark.slow] if slow_when(TINY[name]) else [])
            for name in models.NAMES for side in sides]


def numpy(values: dict) -> dict:
    return {key: np.asarray(value) for key, value in values.items()}


def loss_terms(network, name, inputs, labels, training) -> dict:
    """The architecture's loss terms on the batch, and the regularisation penalties the trainer adds."""
    terms = {key: float(value) for key, value in
             models.get(name).loss(network, inputs, labels, network(inputs, training=training), training).items()}
    if network.losses:
        terms["regularization"] = float(sum(network.losses))
    return terms


def trainer(network, name, optimizer, jit_compile=False) -> Trainer:
    fitted = Trainer(network, models.get(name), augment.AugmentConfig.off())
    fitted.compile(optimizer=optimizer, jit_compile=jit_compile)
    return fitted


def fit_one_step(fitted: Trainer, inputs, labels, strategy=None) -> dict:
    data = tf.data.Dataset.from_tensors((inputs, labels)).repeat()
    if strategy is not None:
        data = strategy.experimental_distribute_dataset(data)
    history = fitted.fit(data, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    return {key: values[0] for key, values in history.history.items()}


def state(network) -> list[np.ndarray]:
    """Every variable of the network, trainable or not, with its layers' random generators' states."""
    return [np.array(variable) for variable in network.variables]


def restore(network, values) -> None:
    for variable, value in zip(network.variables, values, strict=True):
        variable.assign(value)


def without_dropout(network) -> None:
    """Dropout off: TensorFlow's kernels and XLA draw masks with different random algorithms, and replicas
    draw theirs per replica, so steps compared across them would differ by the masks alone."""
    for layer in network._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


def test_the_table_holds_every_registered_architecture():
    assert set(TINY) == set(models.NAMES)


@pytest.mark.parametrize("name", models.NAMES)
def test_options_are_typed_and_checked(name):
    architecture = models.get(name)
    defaults = architecture.make_options()
    assert isinstance(defaults, architecture.options_type) and architecture.make_options(defaults) is defaults
    known = sorted(field.name for field in dataclasses.fields(architecture.options_type))
    with pytest.raises(UserError, match=f"^unknown {name} option\\(s\\) colour; known: {', '.join(known)}$"):
        architecture.make_options({"colour": "red"})
    # Texts (from --model_option) are parsed by each field's type and give the default back.
    texts = {field: str(value) for field, value in defaults.as_dict().items()}
    assert architecture.make_options(texts) == defaults
    assert architecture.make_options({"metadata": "view,age"}).metadata == ("view", "age")
    with pytest.raises(UserError, match="metadata"):
        architecture.make_options({"metadata": "view,height"})


@pytest.mark.parametrize(("name", "side"), each_model())
def test_golden_parameter_count(name, side):
    tiny = TINY[name]
    assert tiny_models.build(name, side).count_params() == (tiny.side_params if side else tiny.params)


@pytest.mark.parametrize(("name", "side"), each_model())
def test_inputs_raw_outputs_and_decoding(name, side):
    architecture = models.get(name)
    network = tiny_models.build(name, side)
    inputs, labels = tiny_models.fit_data(name, side)
    box_model = issubclass(architecture.options_type, contract.BoxModelOptions)
    assert set(inputs) == {"image"} | ({"metadata"} if side else set())
    if side:
        assert inputs["metadata"].shape == (4, tiny_models.METADATA_WIDTH)
    assert set(labels) == (set(architecture.label_keys) | set(architecture.optional_label_keys)
                           | ({"num_boxes"} if "boxes" in architecture.label_keys else set()))
    raw = numpy(network(inputs, training=False))
    assert {len(value) for value in raw.values()} == {4}  # batch-major
    assert raw.get(contract.IMAGE_LOGITS, np.zeros(0)).shape == ((4, 3) if side and box_model else (0,))
    terms = loss_terms(network, name, inputs, labels, training=False)
    assert list(terms) == list(architecture.loss_names(network)) + (["regularization"] if network.losses else [])
    assert all(np.isfinite(value) for value in terms.values())

    outputs = numpy(architecture.infer(network, inputs))
    assert {key: value.dtype.name for key, value in outputs.items() if value.dtype != np.float32} == (
        {contract.NUM_DETECTIONS: "int32"} if isinstance(architecture, contract.BoxDetector) else {})
    probability = architecture.image_probability(outputs)
    assert probability.shape == (4,) and probability.dtype == np.float32
    assert ((0 <= probability) & (probability <= 1)).all()
    if side and box_model:  # the image head's P(Lung Opacity), and it gates the boxes
        logits = raw[contract.IMAGE_LOGITS].astype(np.float64)
        softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(probability, softmax[:, schema.LUNG_OPACITY], rtol=1e-5)
        assert all(len(scores) == 0 for _, scores in architecture.detections(outputs, float(probability.max())))
    for threshold in (0.0, float(np.median(probability))):
        found = architecture.detections(outputs, threshold)
        assert len(found) == 4
        for boxes, scores in found:
            assert boxes.dtype == scores.dtype == np.float32 and boxes.shape == (len(scores), 4)
            assert (scores > threshold).all() and (np.diff(scores) <= 0).all()
            assert ((0 <= boxes) & (boxes <= 1)).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        if not architecture.gives_boxes:
            assert all(len(scores) == 0 for _, scores in found)
        if architecture.gives_masks:
            masks = architecture.masks(outputs, threshold, [(32, 48)] * 4)
            assert [(mask.shape, mask.dtype) for mask in masks] == [((32, 48), bool)] * 4
            # Pixels only where the detections are.
            assert all(mask.any() == (len(scores) > 0) for mask, (_, scores) in zip(masks, found))


# One test for the step and the round trips: each needs a traced training step (seconds on a shared CPU).
@pytest.mark.parametrize(("name", "side"), each_model())
def test_first_step_logs_the_architectures_loss_and_the_export_round_trips(name, side, tmp_path):
    architecture = models.get(name)
    network = tiny_models.build(name, side)
    inputs, labels = tiny_models.fit_data(name, side)
    fitted = trainer(network, name, keras.optimizers.Adam(1e-3))
    # The first step's logged loss is the architecture's loss of the initial weights on the batch
    # (training mode), term by term: the trainer adds nothing and drops nothing. Computing it moves
    # batch-norm statistics, samplers and dropout generators: their state is put back for the step.
    initial = state(network)
    terms = loss_terms(network, name, inputs, labels, training=True)
    restore(network, initial)
    logs = fit_one_step(fitted, inputs, labels)
    assert {key.removesuffix("_loss"): value for key, value in logs.items() if key.endswith("_loss")} == \
        pytest.approx(terms, rel=1e-5)
    assert logs["loss"] == pytest.approx(sum(terms.values()), rel=1e-5)
    assert {metric.name for found in architecture.metrics(network).values() for metric in found} <= set(logs)
    # Every trainable weight takes part (Adam moves each one with a gradient by about its rate).
    before = {weight.path: value for weight, value in zip(network.variables, initial)}
    unmoved = [weight.path for weight in network.trainable_weights
               if np.array_equal(before[weight.path], np.array(weight))]
    assert unmoved == []

    # The exported folder: model.keras gives the same network (the weights with the batch-norm statistics
    # and the samplers' steps the step moved), the SavedModel the same inference, for any batch size.
    options = tiny_models.options(name, side)
    model_dir = tmp_path / "model"
    exported.write(network, architecture, str(model_dir), {
        "model": name, "image_size": SIZE, "metadata": list(options.metadata), "model_options": options.as_dict(),
        "threshold": 0.5})
    loaded = exported.load(str(model_dir))
    assert loaded.architecture is architecture and loaded.metadata == options.metadata
    for original, reloaded in zip(network.get_weights(), loaded.network.get_weights(), strict=True):
        np.testing.assert_array_equal(reloaded, original)
    expected = numpy(architecture.infer(network, inputs))
    for key, value in numpy(architecture.infer(loaded.network, inputs)).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    assert loss_terms(loaded.network, name, inputs, labels, False) == loss_terms(network, name, inputs, labels, False)
    saved = tf.saved_model.load(str(model_dir / exported.SAVED_MODEL_DIR))
    raw = {key: tf.constant(value) for key, value in tiny_models.batch().items() if key in metadata.RAW_KEYS}
    for count in (4, 1):
        images = tf.constant(inputs["image"][:count])
        served = saved.serve(images, *(raw[key][:count] for key in ("view", "sex", "age"))) if side else \
            saved.serve(images)
        wanted = architecture.infer(network, metadata.model_inputs(images, options.metadata,
                                                                    {key: value[:count] for key, value in raw.items()}))
        assert served.keys() == wanted.keys()
        for key in wanted:
            np.testing.assert_allclose(np.asarray(served[key]), np.asarray(wanted[key]), rtol=1e-5, atol=1e-6,
                                       err_msg=key)


@pytest.mark.parametrize(("name", "side"), each_model(sides=(False,)))
def test_mixed_bfloat16_step_is_float32s_to_bfloat16_rounding(name, side):
    architecture = models.get(name)
    inputs, labels = tiny_models.fit_data(name, side)
    with distribute.precision("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        network = tiny_models.build(name, side)
        fitted = trainer(network, name, keras.optimizers.SGD(0.01))
    assert keras.config.dtype_policy().name == "float32"  # the block's policy only
    assert any(layer.compute_dtype == "bfloat16" for layer in network._flatten_layers())
    reference = tiny_models.build(name, side)
    assert {layer.compute_dtype for layer in reference._flatten_layers()} == {"float32"}
    reference.set_weights(network.get_weights())
    without_dropout(network)
    without_dropout(reference)
    # Everything the contract returns is float32, and within bfloat16's rounding of float32's values.
    outputs = architecture.infer(network, inputs)
    assert {key for key, value in outputs.items() if value.dtype != tf.float32} <= {contract.NUM_DETECTIONS}
    initial = state(network)
    terms = loss_terms(network, name, inputs, labels, training=True)
    restore(network, initial)
    want = loss_terms(reference, name, inputs, labels, training=True)
    assert terms == pytest.approx(want, rel=0.05)
    before = [np.array(weight) for weight in network.trainable_weights]
    logs = fit_one_step(fitted, inputs, labels)
    assert logs["loss"] == pytest.approx(sum(want.values()), rel=0.05)
    assert all(not np.array_equal(a, np.array(b)) for a, b in zip(before, network.trainable_weights))


@dataclasses.dataclass
class Step:
    """One training step: its logs, the weights before and after it."""

    logs: dict
    initial: list
    after: list


def one_step(name, side, initial=None, *, reverse=False, strategy=None, jit_compile=False) -> Step:
    """One SGD step of the trainer on the contract batch (reversed: the same sums in another order), from
    `initial` weights (None: the seeded build's), dropout off, under `strategy`."""
    inputs, labels = tiny_models.fit_data(name, side)
    if reverse:
        inputs, labels = ({key: value[::-1] for key, value in part.items()} for part in (inputs, labels))
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        keras.utils.set_random_seed(1)
        network = tiny_models.build(name, side)
        without_dropout(network)
        fitted = trainer(network, name, keras.optimizers.SGD(0.05), jit_compile=jit_compile)
        initial = network.get_weights() if initial is None else initial
        network.set_weights(initial)
    logs = fit_one_step(fitted, inputs, labels, strategy if strategy.num_replicas_in_sync > 1 else None)
    return Step(logs, initial, network.get_weights())


def step_differences(reference: Step, other: Step, reordered: Step) -> dict:
    """What `assert_same_step` checks, as plain numbers (a fresh process sends them as JSON)."""
    floats = [index for index, value in enumerate(reference.initial) if np.issubdtype(value.dtype, np.floating)]

    def largest(a: list, b: list) -> float:
        return float(max(np.abs(a[index] - b[index]).max() for index in floats))

    return {
        "logs": reference.logs, "other_logs": other.logs,
        "largest_update": largest(reference.after, reference.initial),
        "difference": largest(other.after, reference.after),
        "reordering": largest(reordered.after, reference.after),
        "other_integers": [int(np.abs(other.after[i] - reference.after[i]).max()) for i in
                           range(len(reference.after)) if i not in floats],
    }


def assert_same_step(differences: dict) -> None:
    """The same step to float32 rounding: logs within 1e-5; updates within what reordering the batch's sums
    moves them by (4 times that, plus 1e-5 of the largest update for float32's own rounding), integers equal.

    Why reordering is the yardstick: a convolution before a batch normalisation gets a gradient that cancels
    to rounding in exact arithmetic (its mean is normalised away), so some updates are rounding alone, and
    their size depends on the weights (reversing mask_resnet's batch moves its stem by ~5e-4 of the largest
    update, RetinaNet's by ~4e-6). An error in the contract (a term not pooled over replicas, a scale off by
    the replica count) moves updates by a good part of their own size."""
    logs, other = differences["logs"], differences["other_logs"]
    assert other.keys() == logs.keys()
    for key in logs:
        assert other[key] == pytest.approx(logs[key], rel=1e-5, abs=1e-7), key
    tolerance = 4 * differences["reordering"] + 1e-5 * differences["largest_update"]
    assert differences["largest_update"] > 0
    assert differences["difference"] <= tolerance, differences
    assert not any(differences["other_integers"]), differences


@pytest.mark.parametrize(("name", "side"), each_model(sides=(False,), slow_when=lambda tiny: tiny.slow))
def test_xla_step_and_inference_equal_eager(name, side):
    if not TINY[name].xla:
        pytest.skip(f"{name} does not compile with XLA")
    eager = one_step(name, side)
    assert_same_step(step_differences(eager, one_step(name, side, eager.initial, jit_compile=True),
                                      one_step(name, side, eager.initial, reverse=True)))
    architecture = models.get(name)
    network = tiny_models.build(name, side)
    inputs, _ = tiny_models.fit_data(name, side)
    expected = numpy(architecture.infer(network, inputs))
    compiled = numpy(tf.function(lambda x: architecture.infer(network, x), jit_compile=True)(inputs))
    assert compiled.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(compiled[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def mirrored_steps(path: str) -> None:
    """Runs in a fresh process with two logical CPUs: per architecture with its side inputs, one step on
    one device, the same on the batch reversed, and on MirroredStrategy (2 images per replica); writes
    their `step_differences` to `path` as JSON (an exception as its text)."""
    one_device, mirrored = tf.distribute.OneDeviceStrategy("/cpu:0"), distribute.make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    results = {}
    for name in models.NAMES:  # one MirroredStrategy for all: a second one's collectives clash with the first's
        try:
            reference = one_step(name, True, strategy=one_device)
            reordered = one_step(name, True, reference.initial, reverse=True, strategy=one_device)
            results[name] = step_differences(reference, one_step(name, True, reference.initial, strategy=mirrored),
                                             reordered)
        except Exception as error:  # noqa: BLE001 - reported by that model's test
            results[name] = f"{type(error).__name__}: {error}"[-3000:]
    pathlib.Path(path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("mirrored") / "results.json"
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from pneumo_tf.training import distribute; "
              f"distribute.split_cpu(2); import test_contract; test_contract.mirrored_steps({str(path)!r})")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("name", "side"), each_model(sides=(True,)))
def test_mirrored_over_two_cpus_equals_one_device(mirrored_results, name, side):
    result = mirrored_results[name]
    assert isinstance(result, dict), result
    assert_same_step(result)
