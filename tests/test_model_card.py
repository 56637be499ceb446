"""The model card: written with the export, read back for older exports, appended to by evaluate (never
overwritten, and valid after an interruption), listed by ensembles, copied beside a submission, shown by
the web page and its API, printed by describe."""
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading

import markupsafe
import pytest
from absl import flags

from pneumo_tf import cli, fileio
from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import report
from pneumo_tf.inference import offline, web
from pneumo_tf.models import card as model_card, exported, reading
from pneumo_tf.records import manifest as manifest_lib, synthetic
from pneumo_tf.training.config import TrainConfig, with_preset


def copy_model(model_dir, folder) -> str:
    return str(shutil.copytree(model_dir, folder))


def not_json(constant):
    raise AssertionError(f"{constant} is not JSON: a browser's JSON.parse refuses it")


def read_card(model_dir) -> dict:
    """The card file, parsed as strict JSON (no NaN or Infinity)."""
    with open(os.path.join(model_dir, exported.CARD_FILE)) as handle:
        return json.load(handle, parse_constant=not_json)


def evaluate(model_dir, records, split="val", **options):
    return report.evaluate(report.EvaluateConfig(model_dir=str(model_dir), records_dir=records, split=split,
                                                 thresholds=(0.3, 0.5), **options))


# ------------------------------------------------------------------------------------------------
# Where the records come from.


def test_the_generator_marks_its_data_and_the_converter_records_it(synthetic_rsna, tiny_records):
    marker = synthetic.read_marker(synthetic_rsna["train_labels"])
    assert marker == {"generator": "pneumo_tf.records.synthetic",
                      "settings": dataclasses.asdict(synthetic.SyntheticConfig(24, 3, seed=7))}
    assert manifest_lib.read_manifest(tiny_records)["synthetic"] == marker
    assert synthetic.read_marker(None) is None


# ------------------------------------------------------------------------------------------------
# The card of an export.


def test_a_trained_model_exports_its_card(tiny_trained_model, tiny_records):
    card = read_card(tiny_trained_model)
    info = exported.read_info(tiny_trained_model)
    manifest = manifest_lib.read_manifest(tiny_records)
    assert (card["card_version"], card["kind"], card["name"]) == (1, "model", "mask_resnet")
    assert card["model"] == {"architecture": "mask_resnet", "preset": None, "options": info["model_options"],
                             "image_size": 64,
                             "parameters": exported.load(tiny_trained_model).network.count_params()}
    # Every option as resolved: the run's own and the architecture's defaults.
    assert {name: card["model"]["options"][name] for name in ("channels", "n_blocks", "depth")} == {
        "channels": 4, "n_blocks": 1, "depth": 2}
    assert len(card["model"]["options"]) > 3
    data = card["data"]
    assert data["records_dir"] == os.path.abspath(tiny_records)
    assert data["splits"] == {split: {"records": entry["records"], "positive": entry["positive"]}
                              for split, entry in manifest["splits"].items()}
    assert {split: entry["records"] for split, entry in data["splits"].items()} == {"train": 19, "val": 5, "test": 3}
    assert data["formats"] == {"dicom": 27, "png": 0, "jpeg": 0}
    assert data["synthetic"]["settings"]["num_images"] == 24 and data["conversion"] == {"image_size": 64,
                                                                                        "bit_depth": 8}
    with open(os.path.join(tiny_records, "manifest.json"), "rb") as handle:
        assert data["manifest_sha256"] == hashlib.sha256(handle.read()).hexdigest()
    training = card["training"]
    assert (training["epochs"], training["epochs_run"], training["steps_per_epoch"], training["steps_run"],
            training["batch_size"]) == (1, 1, 2, 2, 4)
    validation = card["validation"]
    assert (validation["split"], validation["images"], validation["epoch"]) == ("val", 5, 0)
    assert validation["map"] == info["history"]["val_map"][0]
    assert validation["threshold"] == info["history"]["val_map_threshold"][0]
    assert card["versions"]["tensorflow"] and card["versions"]["keras"] and card["created"].endswith("Z")
    assert card["evaluations"] == [] and card["recipe"]["command"] is None

    # The recipe's flags give the run's TrainConfig back.
    flag_values = flags.FlagValues()
    cli.define_flags(TrainConfig, flag_values=flag_values)
    flag_values(["train", *card["recipe"]["flags"]])
    assert with_preset(cli.config_from_flags(TrainConfig, flag_values=flag_values)) == TrainConfig(
        records_dir=tiny_records, model_dir=tiny_trained_model, model="mask_resnet",
        model_options={"channels": 4, "n_blocks": 1, "depth": 2}, image_size=64, batch_size=4, epochs=1,
        steps_per_epoch=2)

    short = model_card.short(card)
    assert short["trained_on"] == "19 synthetic images (pneumo_tf's generator, difficulty easy, seed 7)"
    assert short["warnings"] == ["Trained on 19 synthetic pictures, not radiographs: its readings of real chest "
                                 "X-rays mean nothing."]
    assert short["card_sha256"] == model_card.digest(card) and len(short["card_sha256"]) == 64


def test_the_recipe_keeps_the_command_line_and_its_flagfiles(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--model=cnn\n--epochs=3\n")
    config = TrainConfig(records_dir="r", model_dir="m", model="cnn", epochs=3)
    recipe = model_card.recipe_section(config, ["--flagfile", str(flagfile), "--records_dir=r", "--model_dir=m"])
    assert recipe["command"] == f"python -m pneumo_tf.train --flagfile {flagfile} --records_dir=r --model_dir=m"
    assert recipe["flagfiles"] == [{"path": str(flagfile), "text": "--model=cnn\n--epochs=3\n",
                                    "sha256": hashlib.sha256(b"--model=cnn\n--epochs=3\n").hexdigest()}]
    assert "--model=cnn" in recipe["flags"] and "--epochs=3" in recipe["flags"]
    assert model_card.recipe_section(config)["command"] is None


def test_a_model_trained_on_real_dicoms_says_real(real_trained_model):
    card = read_card(real_trained_model)
    assert card["data"]["synthetic"] is False and card["data"]["formats"]["dicom"] == 10
    train = card["data"]["splits"]["train"]["records"]
    assert train == 8
    assert model_card.trained_on(card) == "8 real images (DICOM)"
    assert model_card.warnings(card) == ["Trained on only 8 real radiographs (fewer than 3,000): too few for its "
                                         "readings to be trusted."]


def test_warnings_by_kind_and_count_of_training_images():
    def card_with(synthetic_value, train):
        return {"kind": "model", "name": "m", "data": {"synthetic": synthetic_value, "formats": {"dicom": train},
                                                       "splits": {"train": {"records": train, "positive": 0}}}}

    assert model_card.warnings(card_with(False, 26_684)) == []
    assert model_card.warnings(card_with(False, 3000)) == []
    assert "only 2,999 real" in model_card.warnings(card_with(False, 2999))[0]
    assert "synthetic pictures" in model_card.warnings(card_with({"settings": {}}, 26_684))[0]
    assert "Not known whether its 5,000" in model_card.warnings(card_with(None, 5000))[0]
    assert "unknown" in model_card.warnings({"kind": "model", "name": "m", "data": None})[0]
    members = [{"card": {**card_with(False, 26_684), "name": "a"}},
               {"card": {**card_with({"settings": {}}, 10), "name": "b"}}]
    ensemble = {"kind": "ensemble", "name": "e", "members": members}
    assert [warning[:14] for warning in model_card.warnings(ensemble)] == ["Member 2 (b): "]


def test_undefined_metrics_at_export_are_null():
    info = {"model": "mask_resnet", "image_size": 64, "epochs_run": 1, "epochs": [0], "exported_epoch": 0,
            "steps_per_epoch": 2, "history": {"val_loss": [0.5], "val_map": [float("nan")], "val_map_threshold": [0.1],
                                              "val_target_auc": [0.75]}}
    validation = model_card.unknown_card(info)["validation"]
    assert (validation["map"], validation["threshold"], validation["loss"], validation["auc"]) == (None, 0.1, 0.5, 0.75)
    assert model_card.measured_on(model_card.at_export({"validation": validation})) == (
        "val mAP undefined, AUC 0.750 (threshold 0.1, chosen on that split)")


def test_an_export_without_a_card_loads_and_says_unknown(tiny_trained_model, tmp_path):
    model_dir = copy_model(tiny_trained_model, tmp_path / "old")
    os.remove(os.path.join(model_dir, exported.CARD_FILE))
    assert exported.load(model_dir).image_size == 64
    card = model_card.of_folder(model_dir)
    assert card["data"] is None and card["recipe"] is None and card["created"] is None
    short = model_card.short(card)
    assert short["trained_on"] == "unknown (exported without a model card)"
    assert short["warnings"] == ["Where this model's training images came from is unknown (it was exported without "
                                 "a model card)."]
    # What pneumo_tf.json says is kept: the architecture, its options, epochs and the validation.
    assert card["model"]["options"] == exported.read_info(model_dir)["model_options"]
    assert card["training"]["epochs_run"] == 1 and card["validation"]["split"] == "val"
    text = model_card.to_text(card)
    assert "recipe       unknown" in text and "versions     unknown" in text


def test_a_broken_or_newer_card_is_one_clear_error(tiny_trained_model, tmp_path):
    model_dir = copy_model(tiny_trained_model, tmp_path / "model")
    path = os.path.join(model_dir, exported.CARD_FILE)
    with open(path, "w") as handle:
        handle.write('{"card_version": 1, "kind": "mo')
    with pytest.raises(UserError, match="not a valid model card"):
        model_card.of_folder(model_dir)
    with open(path, "w") as handle:
        json.dump({"card_version": 99}, handle)
    with pytest.raises(UserError, match="version 99, written by a newer pneumo_tf"):
        model_card.of_folder(model_dir)


# ------------------------------------------------------------------------------------------------
# Evaluate appends.


def test_evaluate_appends_and_never_overwrites(tiny_trained_model, tiny_records, tmp_path):
    model_dir = copy_model(tiny_trained_model, tmp_path / "model")
    exported_card = read_card(model_dir)
    first = evaluate(model_dir, tiny_records)
    after_one = read_card(model_dir)
    second = evaluate(model_dir, tiny_records, split="train", save_threshold=False,
                      output_dir=str(tmp_path / "train_report"))
    card = read_card(model_dir)
    assert model_card.provenance(card) == model_card.provenance(exported_card)
    assert model_card.digest(card) == model_card.digest(exported_card)
    assert card["evaluations"][0] == after_one["evaluations"][0]
    assert [entry["split"] for entry in card["evaluations"]] == ["val", "train"]
    for entry, summary in zip(card["evaluations"], (first.summary, second.summary)):
        assert (entry["images"], entry["positives"], entry["map"], entry["auc"], entry["threshold"]) == (
            summary["images"], summary["positives"], summary["map"], summary["auc"], summary["threshold"])
        assert entry["records_dir"] == os.path.abspath(tiny_records)
        assert entry["synthetic"]["settings"]["seed"] == 7 and entry["threshold_split"] == entry["split"]
    assert [entry["threshold_saved"] for entry in card["evaluations"]] == [True, False]
    assert (card["evaluations"][0]["images"], card["evaluations"][1]["images"]) == (5, 19)
    assert first.summary["model_card"] == os.path.join(model_dir, exported.CARD_FILE)
    measured = model_card.short(card)
    assert measured["map_split"] == "train" and measured["measured"].startswith("train mAP ")


def test_evaluating_an_older_export_starts_its_card(tiny_trained_model, tiny_records, tmp_path):
    model_dir = copy_model(tiny_trained_model, tmp_path / "old")
    os.remove(os.path.join(model_dir, exported.CARD_FILE))
    evaluate(model_dir, tiny_records)
    card = read_card(model_dir)
    assert card["data"] is None and len(card["evaluations"]) == 1


def test_an_interrupted_evaluate_leaves_the_card_valid(tiny_trained_model, tiny_records, tmp_path, monkeypatch):
    model_dir = copy_model(tiny_trained_model, tmp_path / "model")
    evaluate(model_dir, tiny_records)
    path = os.path.join(model_dir, exported.CARD_FILE)
    with open(path, "rb") as handle:
        before = handle.read()
    real_dump = json.dump

    def dies_half_way(payload, handle, **options):
        if isinstance(payload, dict) and "card_version" in payload:
            text = json.dumps(payload, **options)
            handle.write(text[: len(text) // 2])
            raise KeyboardInterrupt  # as Ctrl+C in the middle of writing the card
        return real_dump(payload, handle, **options)

    monkeypatch.setattr(fileio.json, "dump", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model_dir, tiny_records)
    monkeypatch.undo()
    with open(path, "rb") as handle:
        assert handle.read() == before
    assert len(model_card.read_file(path)["evaluations"]) == 1
    assert [name for name in os.listdir(model_dir) if ".tmp" in name] == []
    evaluate(model_dir, tiny_records)  # and the next evaluation appends as usual
    assert len(read_card(model_dir)["evaluations"]) == 2


def test_appends_at_the_same_time_all_stay(tiny_trained_model, tmp_path):
    model_dir = copy_model(tiny_trained_model, tmp_path / "model")
    reader = reading.load(model_dir)
    threads = [threading.Thread(target=model_card.record_evaluation, args=(model_dir, reader, {"number": number}))
               for number in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(entry["number"] for entry in read_card(model_dir)["evaluations"]) == list(range(12))


# ------------------------------------------------------------------------------------------------
# Ensembles, predict, the page and describe.


def test_an_ensemble_folder_lists_its_members_cards(tiny_trained_model, tiny_records, tmp_path):
    members = [copy_model(tiny_trained_model, tmp_path / "a"), copy_model(tiny_trained_model, tmp_path / "b")]
    model_card.write(members[1], {**read_card(members[1]), "created": "2026-01-01T00:00:00Z"})  # another digest
    ensemble_dir = str(tmp_path / "ensemble")
    report.evaluate(report.EvaluateConfig(model_dir=",".join(members), records_dir=tiny_records, thresholds=(0.3, 0.5),
                                          ensemble_dir=ensemble_dir))
    card = read_card(ensemble_dir)
    assert card["kind"] == "ensemble" and card["name"] == "2 x mask_resnet, wbf"
    assert [member["model_dir"] for member in card["members"]] == ["../a", "../b"]
    for member, folder in zip(card["members"], members):
        assert member["card_sha256"] == model_card.digest(read_card(folder))
        assert member["card"] == model_card.provenance(read_card(folder))
    assert len(card["evaluations"]) == 1
    # The members' own cards are the ensemble's business only: none of them got the ensemble's figures.
    assert [len(read_card(folder)["evaluations"]) for folder in members] == [0, 0]
    assert card["members"][0]["card_sha256"] != card["members"][1]["card_sha256"]
    assert [warning[:50] for warning in model_card.warnings(card)] == [
        "Member 1 (mask_resnet): Trained on 19 synthetic pi", "Member 2 (mask_resnet): Trained on 19 synthetic pi"]

    report.evaluate(report.EvaluateConfig(model_dir=ensemble_dir, records_dir=tiny_records, thresholds=(0.3, 0.5)))
    again = read_card(ensemble_dir)
    assert len(again["evaluations"]) == 2 and model_card.digest(again) == model_card.digest(card)
    assert model_card.of_reading(reading.load(ensemble_dir)) == again
    # The same folder written anew with other members starts a new card.
    report.evaluate(report.EvaluateConfig(model_dir=members[0], records_dir=tiny_records, thresholds=(0.3, 0.5),
                                          ensemble_dir=ensemble_dir, reading=reading.ReadingConfig(tta="hflip")))
    renewed = read_card(ensemble_dir)
    assert len(renewed["members"]) == 1 and len(renewed["evaluations"]) == 1


def test_predict_writes_the_card_beside_the_submission(trained_model, tiny_records, tmp_path):
    output = tmp_path / "out" / "submission.csv"
    summary = offline.predict(offline.PredictConfig(model_dir=trained_model, output=str(output),
                                                    records_dir=tiny_records, threshold=0.4),
                              progress_stream=io.StringIO())
    path = tmp_path / "out" / "submission.model.json"
    assert summary["model_card"] == str(path)
    written = model_card.read_file(str(path))
    card = model_card.of_folder(trained_model)
    assert model_card.digest(written) == model_card.digest(card)
    assert {key: value for key, value in written.items() if key != "prediction"} == card
    assert {key: written["prediction"][key] for key in ("submission", "threshold", "images", "reading")} == {
        "submission": "submission.csv", "threshold": 0.4, "images": 3, "reading": "mask_resnet"}


def test_the_api_returns_the_short_card_the_page_shows(trained_model, synthetic_rsna):
    app = web.create_app(trained_model)
    client = app.test_client()
    name = sorted(os.listdir(synthetic_rsna["train_dir"]))[0]
    with open(os.path.join(synthetic_rsna["train_dir"], name), "rb") as handle:
        data = handle.read()
    expected = model_card.short(model_card.of_folder(trained_model))
    answer = client.post("/api/predict", data={"file": (io.BytesIO(data), name)}).json
    assert answer["model_card"] == expected
    assert client.get("/healthz").json["model_card_sha256"] == expected["card_sha256"]
    page = client.post("/", data={"file": (io.BytesIO(data), name)}).get_data(as_text=True)
    assert page.count('class="warning model-warning"') == 1 and "synthetic pictures" in page
    assert str(markupsafe.escape(expected["trained_on"])) in page and expected["card_sha256"][:16] in page


def test_a_page_without_warnings_shows_none(real_trained_model, synthetic_rsna, tmp_path):
    """A card of enough real images (the real model's card with the challenge's train count): no warning."""
    model_dir = copy_model(real_trained_model, tmp_path / "model")
    card = read_card(model_dir)
    card["data"]["splits"]["train"]["records"] = 21_347
    model_card.write(model_dir, card)
    name = sorted(os.listdir(synthetic_rsna["train_dir"]))[0]
    with open(os.path.join(synthetic_rsna["train_dir"], name), "rb") as handle:
        page = web.create_app(model_dir).test_client().post(
            "/", data={"file": (io.BytesIO(handle.read()), name)}).get_data(as_text=True)
    assert "model-warning" not in page and "21,347 real images (DICOM)" in page


@pytest.mark.slow
def test_describe_prints_the_card(trained_model, tmp_path):
    run = [sys.executable, "-m", "pneumo_tf.describe"]
    text = subprocess.run([*run, f"--model_dir={trained_model}"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0, text.stderr[-2000:]
    card = model_card.of_folder(trained_model)
    assert text.stdout == model_card.to_text(card) + "\n"
    assert f"sha256 {model_card.digest(card)}" in text.stdout
    assert "WARNING: Trained on 19 synthetic pictures" in text.stdout
    as_json = subprocess.run([*run, f"--model_dir={trained_model}", "--json"], capture_output=True, text=True,
                             timeout=300)
    assert json.loads(as_json.stdout) == card
    missing = subprocess.run([*run, f"--model_dir={tmp_path / 'nothing'}"], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == f"error: model folder not found: {tmp_path / 'nothing'}"
