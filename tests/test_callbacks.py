"""TensorBoard callbacks: what lands in the event files, and the validation mAP on hand-worked cases."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from pneumo_tf import models
from pneumo_tf.data.augment import AugmentConfig
from pneumo_tf.evaluation import visualize
from pneumo_tf.records.boxes import MAX_BOXES
from pneumo_tf.training import callbacks
from pneumo_tf.training.loop import Trainer

SIZE = 32
# Whole-pixel, pairwise disjoint boxes as (top, left, bottom, right) pixel rows/columns, ends exclusive.
A = (4, 4, 12, 12)
B = (18, 6, 26, 20)
C = (6, 20, 14, 28)

# (true boxes, boxes the "partial" images show, target). A model whose mask is its input
# image then scores, per image:
CASES = [
    ([A], [A], 1),  # found exactly: 1
    ([A, B], [A], 1),  # one of two found: TP 1, FN 1 at every IoU threshold: 1/2
    ([], [], 0),  # nothing either way: left out
    ([], [C], 0),  # a box where there is none: 0
    ([B], [], 1),  # missed: 0
    ([], [C], -1),  # unlabeled: left out of everything (it would score 0)
]
PARTIAL_MAP = (1 + 0.5 + 0 + 0) / 4
# Mean IoU of the thresholded mask per image, over all six images (unlabeled included):
# A of A, A of A and B (64 of 176 pixels), nothing of nothing, C of nothing (0), nothing of B
# (0), C of nothing.
PARTIAL_MEAN_IOU = (1 + 64 / 176 + 1 + 0 + 0 + 0) / 6


def paint(boxes) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE, 1), np.float32)
    for top, left, bottom, right in boxes:
        mask[top:bottom, left:right] = 1.0
    return mask


def batches(shown, batch_size: int = 4) -> tf.data.Dataset:
    """CASES as pipeline batches whose images show `shown(true_boxes, partial_boxes)`."""
    boxes = np.zeros((len(CASES), MAX_BOXES, 4), np.float32)
    for index, (truth, _, _) in enumerate(CASES):
        boxes[index, : len(truth)] = np.array(truth, np.float32).reshape(-1, 4) / SIZE
    targets = np.array([target for _, _, target in CASES], np.int32)
    examples = {
        "image": np.stack([paint(shown(truth, partial)) for truth, partial, _ in CASES]),
        "mask": np.stack([paint(truth) for truth, _, _ in CASES]),
        "boxes": boxes,
        "num_boxes": np.array([len(truth) for truth, _, _ in CASES], np.int32),
        "target": targets,
        "class": np.where(targets == 1, 2, targets).astype(np.int32),
        "id": np.array([f"patient{index}".encode() for index in range(len(CASES))]),
        "source_height": np.full(len(CASES), 1024, np.int32),
        "source_width": np.full(len(CASES), 1024, np.int32),
    }
    return tf.data.Dataset.from_tensor_slices(examples).batch(batch_size)


def perfect(truth, partial):
    return truth


def partial(truth, partial):
    return partial


def nothing(truth, partial):
    return []


def mask_is_image_model() -> keras.Model:
    """A stand-in network whose probability mask is its input image."""
    image = keras.Input((SIZE, SIZE, 1), name="image")
    return keras.Model({"image": image}, {"mask": keras.layers.Identity(name="mask")(image)})


def read_tensors(directory) -> dict:
    """{tag: [(step, value ndarray), ...]} and {tag: plugin name} of every event file in `directory`."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()[event_accumulator.TENSORS]
    values = {tag: [(event.step, tf.make_ndarray(event.tensor_proto)) for event in accumulator.Tensors(tag)]
              for tag in tags}
    plugins = {tag: accumulator.SummaryMetadata(tag).plugin_data.plugin_name for tag in tags}
    return values, plugins


def classifier_model() -> keras.Model:
    """A stand-in classifier whose probability is its image's largest pixel."""
    image = keras.Input((SIZE, SIZE, 1), name="image")
    return keras.Model({"image": image}, {"target": keras.layers.GlobalMaxPooling2D(name="target")(image)})


def evaluate_once(log_dir, network, dataset, architecture="mask_resnet", **options) -> dict:
    architecture = models.get(architecture)
    callback = callbacks.EpochEvaluation(dataset, str(log_dir), architecture, network, **options)
    callback.set_model(Trainer(network, architecture, AugmentConfig.off()))
    logs = {}
    callback.on_train_begin()
    callback.on_epoch_end(0, logs)
    callback.on_train_end()
    return logs


@pytest.mark.parametrize("shown, expected_map, expected_iou",
                         [(perfect, 1.0, 1.0), (nothing, 0.0, 0.5), (partial, PARTIAL_MAP, PARTIAL_MEAN_IOU)])
def test_val_logs_on_hand_worked_cases(tmp_path, shown, expected_map, expected_iou):
    logs = evaluate_once(tmp_path, mask_is_image_model(), batches(shown))
    assert logs["val_map"] == expected_map
    assert logs["val_mask_mean_iou"] == pytest.approx(expected_iou, rel=1e-5)
    # The mask loss of each batch of 4 and 2 images, weighted by its images: its value is the
    # architecture's own on the same outputs (tests/test_models.py pins that one by hand).
    architecture, network = models.get("mask_resnet"), mask_is_image_model()
    losses = []
    for batch in batches(shown):
        inputs, labels = architecture.to_fit(batch)
        losses.append(float(architecture.loss(network, inputs, labels, network(inputs), training=False)["mask"]))
    assert logs["val_mask_loss"] == pytest.approx((4 * losses[0] + 2 * losses[1]) / 6, rel=1e-6)
    assert logs["val_loss"] == logs["val_mask_loss"]


def test_pr_curve_counts_labeled_images_only(tmp_path):
    evaluate_once(tmp_path, mask_is_image_model(), batches(partial))
    values, plugins = read_tensors(tmp_path / "validation")
    tag = f"{visualize.PR_CURVE_NAME}/pr_curves"
    assert plugins[tag] == "pr_curves"
    [(step, curve)] = values[tag]
    assert step == 0 and curve.shape == (6, visualize.PR_CURVE_THRESHOLDS)
    true_positives, false_positives = curve[0], curve[1]
    # Image probabilities (mask maxima) of the labeled images: 1, 1, 0, 1, 0 for targets 1, 1, 0, 0, 1.
    # The unlabeled image (probability 1) would add a false positive at every threshold.
    assert (true_positives[0], false_positives[0]) == (3, 2)
    assert (true_positives[-1], false_positives[-1]) == (2, 1)


def test_images_show_true_boxes_green_and_predicted_boxes_red(tmp_path):
    evaluate_once(tmp_path, mask_is_image_model(), batches(partial), max_images=4)
    values, plugins = read_tensors(tmp_path / "validation")
    assert plugins[callbacks.BOXES_IMAGE_TAG] == "images"
    [(step, encoded)] = values[callbacks.BOXES_IMAGE_TAG]
    assert step == 0 and len(encoded) == 2 + 4  # width, height, then one PNG per image
    images = [tf.io.decode_png(png).numpy() for png in encoded[2:]]

    def count(image, color):
        return int(np.all(image == color, axis=-1).sum())

    green, red = (0, 255, 0), (255, 0, 0)
    # Image 0: the prediction is the true box, drawn over in green. Image 2: no box at all.
    # Image 3: a prediction without a true box.
    assert count(images[0], green) > 0 and count(images[0], red) == 0
    assert count(images[2], green) == 0 and count(images[2], red) == 0
    assert count(images[3], green) == 0 and count(images[3], red) > 0


def test_classifier_gets_its_loss_metrics_and_pr_curve_and_no_map(tmp_path):
    logs = evaluate_once(tmp_path, classifier_model(), batches(partial), architecture="cnn")
    assert "val_map" not in logs
    # Probabilities (image maxima) 1, 1, 0, 1, 0, 1 against targets 1, 1, 0, 0, 1, -1. Keras'
    # metrics read any non-zero target as positive, the unlabeled -1 too (train and val splits
    # hold no unlabeled image): TP 3 (images 0, 1, 5), FP 1 (image 3), FN 1 (image 4).
    assert logs["val_target_precision"] == pytest.approx(3 / 4)
    assert logs["val_target_recall"] == pytest.approx(3 / 4)
    values, _ = read_tensors(tmp_path / "validation")
    assert f"{visualize.PR_CURVE_NAME}/pr_curves" in values


def test_infinite_or_repeated_validation_data_is_refused(tmp_path):
    mask_resnet = models.get("mask_resnet")
    with pytest.raises(ValueError, match="finite"):
        callbacks.EpochEvaluation(batches(perfect).repeat(), str(tmp_path), mask_resnet, mask_is_image_model())
    with pytest.raises(ValueError, match="twice"):
        evaluate_once(tmp_path, mask_is_image_model(), batches(perfect).repeat(2))


class CountingPasses:
    """A pipeline-like validation dataset that counts how many times it is read from the start."""

    def __init__(self, dataset):
        self.passes = 0
        self._dataset = dataset
        self.dataset = tf.data.Dataset.from_generator(self._generate, output_signature=dataset.element_spec)

    def _generate(self):
        self.passes += 1
        yield from self._dataset.as_numpy_iterator()


def test_fit_writes_step_scalars_and_reads_validation_once_an_epoch(tmp_path):
    keras.utils.set_random_seed(0)
    architecture = models.get("mask_resnet")
    network = architecture.build(SIZE, architecture.make_options({"channels": 4, "depth": 2}))
    trainer = Trainer(network, architecture, AugmentConfig.off())
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=1, decay_rate=0.5)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule))
    train = batches(partial, batch_size=2).map(architecture.to_fit)
    step_scalars = callbacks.StepScalars(str(tmp_path), global_batch_size=2, every_n_steps=2)
    validation = CountingPasses(batches(partial))
    evaluation = callbacks.EpochEvaluation(validation.dataset.apply(tf.data.experimental.assert_cardinality(2)),
                                           str(tmp_path), architecture, network, max_images=2)
    board = keras.callbacks.TensorBoard(str(tmp_path), update_freq="epoch", profile_batch=0, write_graph=False)
    # 3 batches an epoch, 2 epochs: iterations 2, 4 and 6 are logged.
    history = trainer.fit(
        train.repeat(), epochs=2, steps_per_epoch=3, callbacks=[step_scalars, evaluation, board], shuffle=False,
        verbose=0,
    )
    assert validation.passes == 2  # one pass per epoch gives loss, metrics, mAP, curve and images
    val_map = history.history["val_map"]
    assert len(val_map) == 2 and {"val_loss", "val_mask_loss", "val_mask_mean_iou"} <= set(history.history)

    train_values, train_plugins = read_tensors(tmp_path / "train")
    for tag in (callbacks.LEARNING_RATE_TAG, callbacks.IMAGES_PER_SECOND_TAG, callbacks.LOSS_TAG):
        assert [step for step, _ in train_values[tag]] == [2, 4, 6], tag
        assert train_plugins[tag] == "scalars"
    learning_rates = [float(value) for _, value in train_values[callbacks.LEARNING_RATE_TAG]]
    np.testing.assert_allclose(learning_rates, [0.01 * 0.5**step for step in (2, 4, 6)], rtol=1e-6)
    assert all(float(value) > 0 for _, value in train_values[callbacks.IMAGES_PER_SECOND_TAG])
    epoch_rates = train_values[callbacks.EPOCH_IMAGES_PER_SECOND_TAG]
    assert [step for step, _ in epoch_rates] == [0, 1] and all(float(value) > 0 for _, value in epoch_rates)
    # Epoch 2 logs batch 1 (iteration 4) and batches 2-3 (iteration 6): their weighted
    # mean is the epoch's mean loss.
    _, loss_4, loss_6 = (float(value) for _, value in train_values[callbacks.LOSS_TAG])
    np.testing.assert_allclose((loss_4 + 2 * loss_6) / 3, history.history["loss"][1], rtol=1e-5)

    validation_values, _ = read_tensors(tmp_path / "validation")
    logged_map = [(step, float(value)) for step, value in validation_values[callbacks.VAL_MAP_TAG]]
    assert logged_map == [(0, pytest.approx(val_map[0])), (1, pytest.approx(val_map[1]))]
    assert [step for step, _ in validation_values[f"{visualize.PR_CURVE_NAME}/pr_curves"]] == [0, 1]
    assert [len(encoded) for _, encoded in validation_values[callbacks.BOXES_IMAGE_TAG]] == [2 + 2, 2 + 2]


def test_log_hparams_writes_the_session_and_experiment(tmp_path):
    hparams = {"model": "mask_resnet", "learning_rate": 0.001, "epochs": 3, "balanced": False, "sizes": [1, 2]}
    callbacks.log_hparams(str(tmp_path), hparams)
    accumulator = event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    session = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    assert session.hparams["model"].string_value == "mask_resnet"
    assert session.hparams["learning_rate"].number_value == 0.001
    assert session.hparams["epochs"].number_value == 3
    assert session.hparams["balanced"].bool_value is False
    assert session.hparams["sizes"].string_value == "[1, 2]"
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    assert sorted(info.name for info in experiment.hparam_infos) == sorted(hparams)
    assert [(info.name.group, info.name.tag) for info in experiment.metric_infos] == list(
        callbacks.DEFAULT_HPARAM_METRICS
    )
