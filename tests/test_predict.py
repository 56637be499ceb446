"""Prediction: the submission file from records and from DICOMs, overlays, thresholds, errors."""
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from pneumo_tf.errors import UserError
from pneumo_tf.evaluation import submission
from pneumo_tf.inference import offline
from pneumo_tf.models import exported
from pneumo_tf.records import shards, synthetic
from pneumo_tf.records.manifest import FORMAT_VERSION

# At 0.3 the two-step model's mask (about 0.5 everywhere) gives boxes, so box parsing is exercised.
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def test_ids(synthetic_rsna) -> set:
    return {name.removesuffix(".dcm") for name in os.listdir(synthetic_rsna["test_dir"])}


def predict(model_dir, output, **options) -> dict:
    stream = io.StringIO()
    summary = offline.predict(offline.PredictConfig(model_dir=str(model_dir), output=str(output), **options),
                                 progress_stream=stream)
    summary["progress"] = stream.getvalue()
    return summary


def csv_rows(path) -> dict:
    """{patientId: PredictionString} as written, checking one row per id."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    rows = dict(line.split(",", 1) for line in lines[1:])
    assert len(rows) == len(lines) - 1
    return rows


def test_predict_records_split(trained_model, tiny_records, test_ids, tmp_path):
    output = tmp_path / "out" / "submission.csv"
    summary = predict(trained_model, output, records_dir=tiny_records, threshold=THRESHOLD,
                      overlay_dir=str(tmp_path / "overlays"))
    with open(output) as handle:
        assert handle.readline() == "patientId,PredictionString\n"
    assert set(csv_rows(output)) == test_ids
    parsed = submission.read_submission(str(output))
    boxes = np.concatenate([found_boxes for found_boxes, _ in parsed.values()])
    assert summary["boxes"] == len(boxes) > 0 and summary["images"] == len(test_ids)
    # Source pixel space: the synthetic DICOMs are 1024 x 1024.
    assert (boxes >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 1024).all()
    assert summary["threshold"] == THRESHOLD and summary["rejects"] == []
    assert f"{len(test_ids)}/{len(test_ids)}" in summary["progress"]
    overlays = sorted(os.listdir(tmp_path / "overlays"))
    assert overlays == sorted(f"{image_id}.png" for image_id in test_ids)
    with Image.open(tmp_path / "overlays" / overlays[0]) as picture:
        assert picture.size == (512, 512) and picture.mode == "RGB"


def test_threshold_defaults_to_the_saved_one(trained_model, tiny_records, tmp_path):
    model_dir = shutil.copytree(trained_model, tmp_path / "model")
    info_path = model_dir / exported.INFO_FILE
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "threshold": 0.85}))
    assert predict(model_dir, tmp_path / "submission.csv", records_dir=tiny_records)["threshold"] == 0.85


def test_dicom_dir_gives_the_rows_of_its_converted_records(trained_model, tiny_records, synthetic_rsna, tmp_path,
                                                          monkeypatch):
    from_records = tmp_path / "from_records.csv"
    predict(trained_model, from_records, records_dir=tiny_records, threshold=THRESHOLD)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from_dicoms = tmp_path / "from_dicoms.csv"
    # tiny_records stores 64-px images: converting the same way gives the same pixels.
    summary = predict(trained_model, from_dicoms, dicom_dir=synthetic_rsna["test_dir"], threshold=THRESHOLD,
                      convert_image_size=64, workers=1)
    assert csv_rows(from_dicoms) == csv_rows(from_records)
    assert summary["rejects"] == [] and os.listdir(scratch) == []  # the temporary records are gone


def test_png_and_jpeg_folders(trained_model, tiny_records, synthetic_rsna, test_ids, tmp_path):
    """The test DICOMs as JPEG files (their frames) give the DICOMs' rows; as PNG files, the rows of
    the records the PNG folder converts to (a PNG is decoded whole, a frame at 1/8 scale, before the
    resize to 64 px, so their pixels differ by rounding)."""
    from_records = tmp_path / "from_records.csv"
    predict(trained_model, from_records, records_dir=tiny_records, threshold=THRESHOLD)
    rows = {}
    for image_format in ("jpeg", "png"):
        folder = synthetic.export_images(synthetic_rsna["test_dir"], str(tmp_path / image_format), image_format,
                                         workers=1)
        output = tmp_path / f"from_{image_format}.csv"
        summary = predict(trained_model, output, dicom_dir=folder, threshold=THRESHOLD, convert_image_size=64,
                          workers=1)
        assert summary["images"] == len(test_ids) and summary["rejects"] == []
        rows[image_format] = csv_rows(output)
    assert rows["jpeg"] == csv_rows(from_records)
    png_records = str(tmp_path / "png_records")
    shards.convert(str(tmp_path / "png"), png_records, options=exported.load(trained_model).conversion_options(64),
                   writer=shards.LocalPool(1, progress_stream=io.StringIO()))
    predict(trained_model, tmp_path / "from_png_records.csv", records_dir=png_records, threshold=THRESHOLD)
    assert rows["png"] == csv_rows(tmp_path / "from_png_records.csv") and set(rows["png"]) == test_ids


def test_config_needs_exactly_one_source(trained_model, tmp_path):
    with pytest.raises(UserError, match="either --records_dir"):
        predict(trained_model, tmp_path / "submission.csv")
    assert not (tmp_path / "submission.csv").exists()


def run_predict(*args):
    return subprocess.run([sys.executable, "-m", "pneumo_tf.predict", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_reports_rejected_dicoms(trained_model, synthetic_rsna, test_ids, tmp_path):
    dicom_dir = shutil.copytree(synthetic_rsna["test_dir"], tmp_path / "dicom")
    (dicom_dir / "broken.dcm").write_bytes(b"not a DICOM file")
    output = tmp_path / "submission.csv"
    # Through --dicom_dir's format-neutral name, as convert has it.
    result = run_predict(f"--model_dir={trained_model}", f"--input_dir={dicom_dir}", f"--output={output}",
                         "--workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    rejected = [line for line in result.stderr.splitlines() if line.startswith("rejected ")]
    assert len(rejected) == 1 and "broken.dcm" in rejected[0]
    assert f"{len(test_ids)} images from {dicom_dir}" in result.stdout and "1 rejected" in result.stdout
    assert set(csv_rows(output)) == test_ids


@pytest.mark.parametrize("case, message", [
    ("missing model", "model folder not found"),
    ("foreign records", f"format version 999, but this pneumo_tf reads version {FORMAT_VERSION}"),
])
def test_cli_errors(case, message, trained_model, tiny_records, foreign_records, tmp_path):
    model_dir, records = {
        "missing model": (tmp_path / "nowhere", tiny_records),
        "foreign records": (trained_model, foreign_records),
    }[case]
    output = tmp_path / "submission.csv"
    result = run_predict(f"--model_dir={model_dir}", f"--records_dir={records}", f"--output={output}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not output.exists()


def test_commands_print_only_their_own_output(trained_model, tiny_records, tmp_path):
    """TensorFlow's start-up logging (CUDA probing, CPU features, oneDNN) and INFO lines stay off by
    default; --verbosity=1 brings them back. (conftest sets TF_CPP_MIN_LOG_LEVEL: unset here, as a
    user's shell has it.)"""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    args = [sys.executable, "-m", "pneumo_tf.predict", f"--model_dir={trained_model}", f"--records_dir={tiny_records}",
            f"--output={tmp_path / 'submission.csv'}", "--threshold=0.5"]
    quiet = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    # Only the progress bar and the model card's warning on stderr, and the one summary line on stdout.
    assert [line for line in quiet.stderr.replace("\r", "\n").splitlines() if line and "predict:" not in line] == [
        "warning: Trained on 19 synthetic pictures, not radiographs: its readings of real chest X-rays mean nothing."]
    assert len(quiet.stdout.splitlines()) == 1 and quiet.stdout.startswith("3 images from ")
    verbose = subprocess.run([*args, "--verbosity=1"], capture_output=True, text=True, timeout=300, env=env)
    assert verbose.returncode == 0 and "cuda" in verbose.stderr.lower()


def _damaged(model_dir, tmp_path, damage) -> str:
    copy = tmp_path / "damaged"
    shutil.copytree(model_dir, copy)
    damage(copy)
    return str(copy)


def _rewrite_zip_member(path, name, data):
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, data if member == name else content)


def _ensemble_of(model_dir):
    def damage(folder):
        shutil.copytree(model_dir, folder / "member")
        (folder / "pneumo_tf_ensemble.json").write_text(json.dumps({"members": [{"model_dir": "member"}]}))
    return damage


DAMAGE = {
    "info_not_json": (lambda folder: (folder / "pneumo_tf.json").write_text('{"model": "mask_res'),
                      "pneumo_tf.json is not valid JSON: Unterminated string"),
    "info_without_model": (lambda folder: (folder / "pneumo_tf.json").write_text('{"image_size": 64}'),
                           "pneumo_tf.json lacks 'model': re-export the model"),
    "info_not_an_object": (lambda folder: (folder / "pneumo_tf.json").write_text("[1, 2]"),
                           "pneumo_tf.json is not a pneumo_tf model's info (a JSON object)"),
    "model_truncated": (lambda folder: (folder / "model.keras").write_bytes(
                            (folder / "model.keras").read_bytes()[:5000]),
                        "model.keras is not a Keras archive (cut short or overwritten): re-export the model"),
    "model_missing": (lambda folder: (folder / "model.keras").unlink(), "model.keras is missing: re-export"),
    "model_broken_inside": (lambda folder: _rewrite_zip_member(folder / "model.keras", "config.json", b"{"),
                            "model.keras cannot be loaded (JSONDecodeError: "),
    "ensemble_not_json": (lambda folder: (folder / "pneumo_tf_ensemble.json").write_text("{"),
                          "pneumo_tf_ensemble.json is not valid JSON: Expecting property name"),
    "ensemble_incomplete": (None, "pneumo_tf_ensemble.json lacks 'weight': write it again with python -m "
                                  "pneumo_tf.evaluate --ensemble_dir"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_file(case, trained_model, tmp_path):
    from pneumo_tf.models import reading

    damage, message = DAMAGE[case]
    if damage is None:
        damage = _ensemble_of(trained_model)
    elif case.startswith("ensemble"):
        ensemble = _ensemble_of(trained_model)
        damage = (lambda first, second: lambda folder: (first(folder), second(folder)))(ensemble, damage)
    folder = _damaged(trained_model, tmp_path, damage)
    with pytest.raises(UserError) as raised:
        reading.load(folder)
    text = str(raised.value)
    assert "\n" not in text and text.startswith(folder) and message in text, text
    if case == "model_truncated":  # the command line: one line, exit 2
        result = subprocess.run([sys.executable, "-m", "pneumo_tf.predict", f"--model_dir={folder}",
                                 f"--output={tmp_path / 'out.csv'}", f"--dicom_dir={tmp_path}"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {text}"


def test_predict_refuses_a_split_that_reads_short_and_verifies_on_request(trained_model, tiny_records, tmp_path):
    records = shutil.copytree(tiny_records, tmp_path / "records")
    manifest_path = records / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    held = manifest["splits"]["test"]["records"]
    manifest["splits"]["test"]["records"] += 1  # the shards hold one record fewer than the manifest says
    manifest_path.write_text(json.dumps(manifest))
    output = tmp_path / "submission.csv"
    with pytest.raises(UserError, match=f"read {held} images from {records} \\(test\\) but its manifest holds "
                                        f"{held + 1}: its shards are damaged"):
        predict(trained_model, output, records_dir=str(records), threshold=THRESHOLD)
    assert not output.exists()  # no submission missing a patient
    manifest["splits"]["test"]["records"] = held
    manifest_path.write_text(json.dumps(manifest))
    shard = records / manifest["splits"]["test"]["shards"][0]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(UserError, match="does not match its manifest's SHA-256"):
        predict(trained_model, output, records_dir=str(records), threshold=THRESHOLD, verify_records=True)
    assert not output.exists()
