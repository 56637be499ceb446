"""Flip TTA and ensembles: fusion on hand-made boxes, mirroring, the reading on hand-made outputs, a
mirror-equivariant model, ensembles across image sizes, the ensemble folder through evaluate, predict
and serve, and the flags."""
import io
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

from pneumo_tf import models
from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import report, submission
from pneumo_tf.inference import offline, web
from pneumo_tf.models import card as model_card, exported, fusion, reading
from pneumo_tf.models.architecture import BoxDetector
from pneumo_tf.models.reading import Member, Reading, ReadingConfig

MASK_RESNET = models.get("mask_resnet")


def detections(boxes, scores):
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)


# ---------------------------------------------------------------------------------------------
# Fusion and mirroring on hand-made boxes (yxyx, normalised).

A = detections([[0.1, 0.1, 0.5, 0.5]], [0.8])
B = detections([[0.2, 0.2, 0.6, 0.6]], [0.4])  # IoU with A: 0.09 / 0.23 = 0.391


def test_weighted_boxes_fusion_by_hand():
    # Weights 2 and 1: each box counts score x weight, 1.6 and 0.4; the fused box is
    # (1.6 A + 0.4 B) / 2.0, its score (1.6 + 0.4) / 2 boxes x min(2 readings, 2 boxes) / 3 = 2/3.
    boxes, scores = fusion.fuse([A, B], [2, 1], "wbf", iou_threshold=0.3)
    np.testing.assert_allclose(boxes, [[0.12, 0.12, 0.52, 0.52]], atol=1e-6)
    np.testing.assert_allclose(scores, [2 / 3], rtol=1e-6)
    # Above their IoU they stay apart, each scored by its weight's share: 0.8 x 2/3, 0.4 x 1/3.
    boxes, scores = fusion.fuse([A, B], [2, 1], "wbf", iou_threshold=0.5)
    np.testing.assert_allclose(boxes, np.concatenate([A[0], B[0]]), atol=1e-6)
    np.testing.assert_allclose(scores, [0.8 * 2 / 3, 0.4 / 3], rtol=1e-6)


def test_nms_methods_by_hand():
    # NMS keeps the best of the pair; weights scale scores by weight / largest weight (B: 0.4 x 1/2).
    boxes, scores = fusion.fuse([A, B], [2, 1], "nms", iou_threshold=0.3)
    np.testing.assert_array_equal(boxes, A[0])
    np.testing.assert_allclose(scores, [0.8])
    # ensemble-boxes' soft-NMS drops a box only once its decayed score is under 0.001: both stay,
    # with their scaled, undecayed scores.
    boxes, scores = fusion.fuse([A, B], [2, 1], "soft_nms", iou_threshold=0.3)
    np.testing.assert_array_equal(boxes, np.concatenate([A[0], B[0]]))
    np.testing.assert_allclose(scores, [0.8, 0.2])


@pytest.mark.parametrize("method", fusion.FUSION_METHODS)
def test_fusion_of_nothing_and_of_one(method):
    nothing = detections(np.zeros((0, 4)), [])
    assert [len(part) for part in fusion.fuse([nothing, nothing], method=method)] == [0, 0]
    boxes, scores = fusion.fuse([A, nothing], method=method)
    np.testing.assert_allclose(boxes, A[0], atol=1e-6)
    # Weighted boxes fusion halves a box that one reading of two found; the NMS methods keep it.
    np.testing.assert_allclose(scores, [0.4 if method == "wbf" else 0.8], rtol=1e-6)


def test_score_alignment_by_hand():
    # Anchor 0.2: [0, 0.2] stretches onto [0, 0.5], [0.2, 1] onto [0.5, 1].
    np.testing.assert_allclose(fusion.align_scores([0.0, 0.1, 0.2, 0.6, 1.0], 0.2), [0.0, 0.25, 0.5, 0.75, 1.0],
                               rtol=1e-6)
    np.testing.assert_allclose([fusion.aligned_threshold(t, 0.2) for t in (0.0, 0.25, 0.5, 0.75, 1.0)],
                               [0.0, 0.1, 0.2, 0.6, 1.0], rtol=1e-12)
    # At 0.5 a member reads exactly at its anchor (no rounding: the grid's thresholds are saved as they are).
    assert all(fusion.aligned_threshold(0.5, anchor) == anchor for anchor in (0.05, 0.2, 0.55, 0.95))
    for anchor in (0.05, 0.75, 0.95):
        for threshold in np.linspace(0.05, 0.95, 19):
            assert fusion.align_scores([fusion.aligned_threshold(threshold, anchor)], anchor)[0] \
                == pytest.approx(threshold, rel=1e-6)


def test_mirroring_is_exact_and_its_own_inverse():
    boxes, scores = fusion.mirror(detections([[0.125, 0.25, 0.5, 0.375], [0.0, 0.0, 1.0, 0.5]], [0.9, 0.3]))
    np.testing.assert_array_equal(boxes, [[0.125, 0.625, 0.5, 0.75], [0.0, 0.5, 1.0, 1.0]])
    np.testing.assert_array_equal(scores, np.float32([0.9, 0.3]))
    np.testing.assert_array_equal(fusion.mirror((boxes, scores))[0], [[0.125, 0.25, 0.5, 0.375], [0.0, 0.0, 1.0, 0.5]])


# ---------------------------------------------------------------------------------------------
# The reading on hand-made outputs (the host side: no network runs).


def offline_member(architecture, weight=1.0, tta="none", image_size=16, anchor=None) -> Member:
    model = exported.ExportedModel("hand-made", None, architecture, {"image_size": image_size, "threshold": 0.5})
    return Member(model, weight, tta, anchor)


def one_box(score: float) -> dict:
    """A detector's outputs for one image: one box [0.1, 0.2, 0.3, 0.5] at `score`."""
    return {"boxes": np.array([[[0.1, 0.2, 0.3, 0.5]]], np.float32), "scores": np.array([[score]], np.float32),
            "num_detections": np.array([1], np.int32)}


def block_mask(row: int, col: int, value: float = 0.9, size: int = 16) -> np.ndarray:
    """[1, size, size, 1] zeros with a 4 x 4 block of `value` at (row, col)."""
    mask = np.zeros((1, size, size, 1), np.float32)
    mask[0, row:row + 4, col:col + 4] = value
    return mask


def test_two_copies_fuse_to_the_model_and_disjoint_boxes_are_both_kept():
    one = {"mask": block_mask(0, 0)}
    alone = MASK_RESNET.detections(one, 0.3)[0]
    np.testing.assert_array_equal(alone[0], [[0.0, 0.0, 0.25, 0.25]])
    copies = Reading([offline_member(MASK_RESNET), offline_member(MASK_RESNET)])
    boxes, scores = copies.detections([[one], [one]], 0.3)[0]
    np.testing.assert_allclose(boxes, alone[0], atol=1e-7)
    np.testing.assert_allclose(scores, alone[1], rtol=1e-6)

    other = {"mask": block_mask(8, 8, 0.7)}
    disjoint = copies.detections([[one], [other]], 0.3)[0]
    # Each found by one member of two: half its score, both kept above 0.3 ...
    np.testing.assert_allclose(disjoint[0], [[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]], atol=1e-7)
    np.testing.assert_allclose(disjoint[1], [0.45, 0.35], rtol=1e-6)
    # ... and the threshold applies to the fused scores: at 0.4 only the first remains.
    np.testing.assert_allclose(copies.detections([[one], [other]], 0.4)[0][1], [0.45], rtol=1e-6)
    # The image probability is the members' weighted mean (the mask's largest value here).
    weighted = Reading([offline_member(MASK_RESNET, 3.0), offline_member(MASK_RESNET, 1.0)])
    np.testing.assert_allclose(weighted.image_probability([[one], [other]]), [(3 * 0.9 + 0.7) / 4], rtol=1e-6)


def test_hflip_views_are_split_mirrored_back_and_fused():
    detector = BoxDetector()
    # One call on [image, mirrored image]: the second half's box is the first's mirror image.
    outputs = {
        "boxes": np.array([[[0.1, 0.2, 0.3, 0.5]], [[0.1, 0.5, 0.3, 0.8]]], np.float32),
        "scores": np.array([[0.9], [0.7]], np.float32),
        "num_detections": np.array([1, 1], np.int32),
    }
    member = offline_member(detector, tta="hflip")
    flipped = Reading([member])
    views = flipped.split([outputs])
    assert len(views) == 1 and len(views[0]) == 2 and views[0][1]["scores"].tolist() == [[np.float32(0.7)]]
    boxes, scores = flipped.detections(views, 0.5)[0]
    np.testing.assert_allclose(boxes, [[0.1, 0.2, 0.3, 0.5]], atol=1e-6)
    np.testing.assert_allclose(scores, [0.8], rtol=1e-6)
    np.testing.assert_allclose(flipped.image_probability(views), [0.8], rtol=1e-6)
    # The parts read the same outputs: the member without TTA, and with it.
    (plain_label, plain), (flip_label, flip) = flipped.parts()
    assert flip_label == plain_label + " + hflip"
    np.testing.assert_allclose(plain.detections(views, 0.5)[0][1], [0.9])
    np.testing.assert_allclose(flip.detections(views, 0.5)[0][1], [0.8], rtol=1e-6)


def test_aligned_members_are_read_at_their_own_thresholds():
    # Two detectors find the same box: one scores it 0.3 and chose 0.2 alone, the other 0.9 and chose 0.8.
    detector = BoxDetector()
    outputs = [[one_box(0.3)], [one_box(0.9)]]
    plain = Reading([offline_member(detector), offline_member(detector)])
    # Unaligned, at 0.5 the first drops its box and the second's alone is halved to 0.45: nothing is kept.
    assert len(plain.detections(outputs, 0.5)[0][1]) == 0
    aligned = Reading([offline_member(detector, anchor=0.2), offline_member(detector, anchor=0.8)])
    assert aligned.name.endswith(", aligned, wbf") and not aligned.is_plain
    # Aligned, 0.3 on the first's scale is 0.5 + 0.1 x 0.5 / 0.8 = 0.5625, 0.9 on the second's 0.75;
    # both are read at 0.5 (at their anchors) and fused to their mean.
    boxes, scores = aligned.detections(outputs, 0.5)[0]
    np.testing.assert_allclose(boxes, [[0.1, 0.2, 0.3, 0.5]], atol=1e-6)
    np.testing.assert_allclose(scores, [(0.5625 + 0.75) / 2], rtol=1e-6)
    np.testing.assert_allclose(aligned.image_probability(outputs), [(0.5625 + 0.75) / 2], rtol=1e-6)
    # At 0.55 the first reads at 0.2 + 0.05 x 0.8 / 0.5 = 0.28 and keeps its box; at 0.6 it reads at 0.36 and
    # drops it, and the second's alone is halved to 0.375: nothing is kept.
    np.testing.assert_allclose(aligned.detections(outputs, 0.55)[0][1], [(0.5625 + 0.75) / 2], rtol=1e-6)
    assert len(aligned.detections(outputs, 0.6)[0][1]) == 0
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        offline_member(detector, anchor=1.0)


# ---------------------------------------------------------------------------------------------
# Real networks: a mirror-equivariant model, several image sizes, the ensemble folder.


def identity_model(model_dir, image_size: int, threshold: float = 0.5) -> str:
    """A mask network whose mask is its input: mirror-equivariant by construction."""
    image = keras.Input((image_size, image_size, 1), name="image")
    network = keras.Model({"image": image}, {"mask": keras.layers.Identity(name="mask")(image)})
    exported.write(network, MASK_RESNET, str(model_dir),
                   {"model": "mask_resnet", "image_size": image_size, "threshold": threshold})
    return str(model_dir)


def read_all(whole: Reading, records: str, split: str = "val", batch_size: int = 4) -> list:
    return [(batch, whole.infer(batch)) for batch in whole.dataset(records, split, batch_size)]


def test_hflip_of_a_mirror_equivariant_model_gives_its_boxes(box_pictures):
    plain = reading.load(box_pictures["model_dir"])
    flipped = reading.load(box_pictures["model_dir"], ReadingConfig(tta="hflip"))
    compared = 0
    for (_, plain_outputs), (_, flipped_outputs) in zip(read_all(plain, box_pictures["records"]),
                                                        read_all(flipped, box_pictures["records"])):
        for threshold in (0.2, 0.5):
            for mine, theirs in zip(plain.detections(plain_outputs, threshold),
                                    flipped.detections(flipped_outputs, threshold)):
                np.testing.assert_allclose(theirs[0], mine[0], atol=1e-6)
                np.testing.assert_allclose(theirs[1], mine[1], rtol=1e-6)
                compared += len(mine[1])
        np.testing.assert_allclose(flipped.image_probability(flipped_outputs), plain.image_probability(plain_outputs))
    assert compared > 0


def test_members_read_the_records_at_their_own_sizes(box_pictures, tmp_path):
    small = identity_model(tmp_path / "small", 32)
    both = reading.load(f"{box_pictures['model_dir']},{small}")
    assert both.image_sizes == (64, 32)
    alone = [reading.load(folder) for folder in (box_pictures["model_dir"], small)]
    together = read_all(both, box_pictures["records"])
    assert sum(len(batch["id"]) for batch, _ in together) == 8
    for index, one in enumerate(alone):
        for (batch, outputs), (own_batch, own_outputs) in zip(together, read_all(one, box_pictures["records"])):
            assert batch["id"].numpy().tolist() == own_batch["id"].numpy().tolist()
            np.testing.assert_array_equal(outputs[index][0]["mask"], own_outputs[0][0]["mask"])


def test_evaluate_writes_an_ensemble_folder_that_predict_and_serve_read(box_pictures, tmp_path):
    model_dir = box_pictures["model_dir"]
    single = report.evaluate(report.EvaluateConfig(model_dir=model_dir, records_dir=box_pictures["records"],
                                                   output_dir=str(tmp_path / "single"), save_threshold=False))
    ensemble_dir = tmp_path / "runs" / "ensemble"
    result = report.evaluate(report.EvaluateConfig(
        model_dir=f"{model_dir},{model_dir}", records_dir=box_pictures["records"], ensemble_dir=str(ensemble_dir),
        reading=ReadingConfig(weights=(2.0, 1.0)),
    ))
    # Two copies of one model: the ensemble's sweep is the model's.
    pd.testing.assert_frame_equal(result.table, single.table, atol=1e-9)
    assert result.summary["threshold"] == single.summary["threshold"]
    assert list(result.readings["reading"]) == [model_dir, model_dir, "2 x mask_resnet, wbf"]
    assert result.readings["map"].tolist() == [single.summary["map"]] * 3
    assert result.readings["weight"].tolist()[:2] == [2.0, 1.0]
    assert result.summary["output_dir"] == str(ensemble_dir / "evaluation" / "val")
    assert os.path.isfile(ensemble_dir / "evaluation" / "val" / "readings.csv")
    assert "Each member alone and the whole" in result.report()

    saved = json.loads((ensemble_dir / reading.ENSEMBLE_FILE).read_text())
    relative = os.path.relpath(model_dir, ensemble_dir)
    assert saved["members"] == [{"model_dir": relative, "weight": 2.0, "anchor": None},
                                {"model_dir": relative, "weight": 1.0, "anchor": None}]
    assert (saved["tta"], saved["fusion"], saved["fusion_iou"], saved["score_alignment"]) \
        == ("none", "wbf", 0.55, "none")
    assert saved["threshold"] == result.summary["threshold"] and saved["val_map"] == result.summary["map"]
    # The members' own pneumo_tf.json is untouched.
    assert exported.read_info(model_dir)["threshold"] == 0.5

    # Predict reads the folder with its threshold: the model's rows at that threshold.
    rows = {}
    for name, folder in (("ensemble", ensemble_dir), ("model", model_dir)):
        output = tmp_path / f"{name}.csv"
        summary = offline.predict(offline.PredictConfig(
            model_dir=str(folder), output=str(output), records_dir=box_pictures["records"], split="val",
            threshold=None if name == "ensemble" else result.summary["threshold"]), progress_stream=io.StringIO())
        assert summary["threshold"] == result.summary["threshold"]
        rows[name] = submission.read_submission(str(output))
    assert rows["ensemble"].keys() == rows["model"].keys()
    for image_id, (boxes, scores) in rows["model"].items():
        np.testing.assert_allclose(rows["ensemble"][image_id][0], boxes, atol=0.05 + 1e-6)
        np.testing.assert_allclose(rows["ensemble"][image_id][1], scores, atol=5e-5 + 1e-6)

    health = web.create_app(str(ensemble_dir)).test_client().get("/healthz").json
    assert health == {"status": "ok", "model": "2 x mask_resnet, wbf", "image_size": 64,
                      "threshold": result.summary["threshold"],
                      "model_card_sha256": model_card.digest(model_card.of_folder(str(ensemble_dir)))}
    # The folder fixes its reading; flags that would change it are refused.
    with pytest.raises(UserError, match="drop --tta"):
        reading.load(str(ensemble_dir), ReadingConfig(tta="hflip"))


def test_an_aligned_ensemble_reads_each_model_at_its_saved_threshold(box_pictures, tmp_path):
    model_dir = str(shutil.copytree(box_pictures["model_dir"], tmp_path / "model"))
    with pytest.raises(UserError, match="has none yet: run python -m pneumo_tf.evaluate"):
        reading.load(f"{model_dir},{model_dir}", ReadingConfig(score_alignment="threshold"))
    single = report.evaluate(report.EvaluateConfig(model_dir=model_dir, records_dir=box_pictures["records"]))
    anchor = single.summary["threshold"]
    assert exported.read_info(model_dir)["threshold"] == anchor != 0.5
    ensemble_dir = tmp_path / "ensemble"
    result = report.evaluate(report.EvaluateConfig(
        model_dir=f"{model_dir},{model_dir}", records_dir=box_pictures["records"], ensemble_dir=str(ensemble_dir),
        reading=ReadingConfig(score_alignment="threshold")))
    # Two copies aligned: at 0.5 both read at the model's own threshold, so the row is the model's there.
    at_half = result.table.set_index("threshold").loc[0.5]
    at_anchor = single.table.set_index("threshold").loc[anchor]
    for column in ("map", "accuracy", "f1_positive"):
        assert at_half[column] == at_anchor[column], column
    saved = json.loads((ensemble_dir / reading.ENSEMBLE_FILE).read_text())
    assert saved["score_alignment"] == "threshold"
    assert [member["anchor"] for member in saved["members"]] == [anchor, anchor]
    card = model_card.of_folder(str(ensemble_dir))
    assert card["reading"]["score_alignment"] == "threshold"
    assert [member["anchor"] for member in card["members"]] == [anchor, anchor]
    assert f"its threshold {anchor:g} read as 0.5" in model_card.to_text(card)
    # The anchors are the ensemble's: evaluating the model again later does not move them.
    exported.update_info(model_dir, {"threshold": 0.05})
    assert [member.anchor for member in reading.load(str(ensemble_dir)).members] == [anchor, anchor]
    # One model aligned is a fused reading too: its threshold is never written over its own.
    with pytest.raises(UserError, match="give --ensemble_dir"):
        report.EvaluateConfig(model_dir=model_dir, records_dir="records",
                              reading=ReadingConfig(score_alignment="threshold")).validate()


def test_served_hflip_reading_matches_predict(trained_model, synthetic_rsna, tmp_path):
    flip = ReadingConfig(tta="hflip")
    output = tmp_path / "submission.csv"
    offline.predict(offline.PredictConfig(model_dir=trained_model, output=str(output),
                                          dicom_dir=synthetic_rsna["test_dir"], workers=1, threshold=0.3,
                                          reading=flip), progress_stream=io.StringIO())
    expected = submission.read_submission(str(output))
    model_dir = shutil.copytree(trained_model, tmp_path / "model")
    exported.update_info(str(model_dir), {"threshold": 0.3})  # the plain threshold stands in for hflip's
    client = web.create_app(str(model_dir), reading=flip).test_client()
    assert client.get("/healthz").json["model"] == "1 x mask_resnet, hflip, wbf"
    for name in sorted(os.listdir(synthetic_rsna["test_dir"])):
        with open(os.path.join(synthetic_rsna["test_dir"], name), "rb") as handle:
            served = client.post("/api/predict", data={"file": (io.BytesIO(handle.read()), name)},
                                 content_type="multipart/form-data").json
        boxes, scores = expected[name.removesuffix(".dcm")]
        got = np.array([[box["x"], box["y"], box["width"], box["height"]] for box in served["boxes"]]).reshape(-1, 4)
        np.testing.assert_allclose(got, boxes, atol=0.05 + 1e-6)
        np.testing.assert_allclose([box["confidence"] for box in served["boxes"]], scores, atol=5e-5 + 1e-6)


@pytest.mark.parametrize("config, message", [
    (dict(model_dir="a,b"), "give --ensemble_dir, or --nosave_threshold with --output_dir"),
    (dict(model_dir="a", reading=ReadingConfig(tta="hflip"), save_threshold=False), "give --ensemble_dir"),
    (dict(model_dir="a", ensemble_dir="e"), "--ensemble_dir saves a fused reading"),
    (dict(model_dir="a,b", ensemble_dir="e", reading=ReadingConfig(weights=(1.0, -1.0))),
     "--weights must be greater than 0, not -1"),
    (dict(model_dir="a", reading=ReadingConfig(tta="hflip", fusion_iou=1.5)), "--fusion_iou must be between"),
])
def test_evaluate_config_errors(config, message):
    with pytest.raises(UserError, match=message):
        report.EvaluateConfig(records_dir="records", **config).validate()


def test_predict_needs_a_threshold_for_an_ad_hoc_ensemble(box_pictures, tmp_path):
    model_dir = box_pictures["model_dir"]
    with pytest.raises(UserError, match="ensemble without a threshold: give --threshold"):
        offline.predict(offline.PredictConfig(model_dir=f"{model_dir},{model_dir}", output=str(tmp_path / "s.csv"),
                                              records_dir=box_pictures["records"], split="val"))
    with pytest.raises(UserError, match="--weights gives 1 weights for 2 models"):
        reading.load(f"{model_dir},{model_dir}", ReadingConfig(weights=(1.0,)))
    assert not (tmp_path / "s.csv").exists()


def test_cli_evaluates_an_ensemble_with_hflip(box_pictures, tmp_path):
    model_dir = box_pictures["model_dir"]
    ensemble_dir = tmp_path / "ensemble"
    result = subprocess.run(
        [sys.executable, "-m", "pneumo_tf.evaluate", f"--model_dir={model_dir},{model_dir}", "--tta=hflip",
         "--weights=1,3", "--fusion=nms", "--fusion_iou=0.4", f"--records_dir={box_pictures['records']}",
         f"--ensemble_dir={ensemble_dir}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((ensemble_dir / reading.ENSEMBLE_FILE).read_text())
    assert ([member["weight"] for member in saved["members"]], saved["tta"], saved["fusion"], saved["fusion_iou"]) \
        == ([1.0, 3.0], "hflip", "nms", 0.4)
    # Each member without and with hflip, then the whole.
    readings = pd.read_csv(ensemble_dir / "evaluation" / "val" / "readings.csv")
    assert readings["reading"].tolist() == [model_dir, f"{model_dir} + hflip"] * 2 + ["2 x mask_resnet, hflip, nms"]
    assert "Each member alone and the whole" in result.stdout


class LopsidedBox(keras.layers.Layer):
    """One box per image from its pixels, not mirror-equivariant: centred left of the image's horizontal
    centre of mass, scored by the left half's mean brightness."""

    def call(self, images):
        columns = keras.ops.mean(images[..., 0], axis=1)  # [B, W]
        positions = (keras.ops.arange(images.shape[2], dtype="float32") + 0.5) / images.shape[2]
        centre = keras.ops.sum(columns * positions, axis=1) / (keras.ops.sum(columns, axis=1) + 1e-6)
        boxes = keras.ops.stack([keras.ops.full_like(centre, 0.2), keras.ops.clip(centre - 0.3, 0.0, 1.0),
                                 keras.ops.full_like(centre, 0.8), keras.ops.clip(centre + 0.1, 0.0, 1.0)], axis=-1)
        scores = keras.ops.mean(columns[:, : images.shape[2] // 2], axis=1)
        return {"boxes": boxes[:, None], "scores": scores[:, None],
                "num_detections": keras.ops.ones_like(scores, dtype="int32")}


def test_hflip_of_a_detector_is_its_two_separate_readings_fused(box_pictures):
    image = keras.Input((64, 64, 1), name="image")
    network = keras.Model({"image": image}, LopsidedBox()(image))
    model = exported.ExportedModel("lopsided", network, BoxDetector(), {"image_size": 64, "threshold": 0.5})
    flipped = Reading([Member(model, tta="hflip")])
    compared = 0
    for batch in flipped.dataset(box_pictures["records"], "val", 4):
        outputs = flipped.infer(batch)  # one call on the batch and its mirror images
        plain = {name: np.asarray(value) for name, value in model.infer(batch["image"]).items()}
        mirrored = {name: np.asarray(value) for name, value in model.infer(batch["image"][:, :, ::-1]).items()}
        threshold = 0.01
        expected = []
        for own, other in zip(model.architecture.detections(plain, threshold),
                              model.architecture.detections(mirrored, threshold)):
            boxes, scores = fusion.fuse([own, fusion.mirror(other)])
            expected.append((boxes[scores > threshold], scores[scores > threshold]))
        for (boxes, scores), (want_boxes, want_scores) in zip(flipped.detections(outputs, threshold), expected):
            np.testing.assert_allclose(boxes, want_boxes, atol=1e-6)
            np.testing.assert_allclose(scores, want_scores, atol=1e-6)
            compared += len(scores)
        probability = (model.architecture.image_probability(plain) + model.architecture.image_probability(mirrored)) / 2
        np.testing.assert_allclose(flipped.image_probability(outputs), probability, atol=1e-6)
        # Not mirror-equivariant: the flipped reading differs from the plain one.
        assert not np.allclose(flipped.image_probability(outputs), model.architecture.image_probability(plain))
    assert compared > 0
