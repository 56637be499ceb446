"""The main job end to end on a tiny built-in data set."""
import json
import os

import pandas as pd
import pytest

from pneumo_tf import demo
from pneumo_tf.evaluation import submission
from pneumo_tf.models import card as model_card
from pneumo_tf.records.manifest import read_manifest


def test_demo_runs_the_whole_path_and_writes_its_summary(tmp_path):
    config = demo.DemoConfig(
        output_dir=str(tmp_path / "demo"), num_images=24, num_test_images=4, workers=1, epochs=1,
        image_size=64, batch_size=4, model_options={"channels": 4, "n_blocks": 1, "depth": 2},
    )
    summary = demo.run_demo(config)
    with open(tmp_path / "demo" / "summary.json") as handle:
        assert json.load(handle) == summary
    assert summary["records"] == 28 and summary["epochs_run"] == 1
    # The reported mAP is evaluation's at its chosen threshold, also saved with the model.
    table = pd.read_csv(os.path.join(os.path.dirname(summary["threshold_table"]), "thresholds.csv"))
    chosen = table[table["threshold"] == summary["best_threshold"]]
    assert summary["val_map"] == pytest.approx(float(chosen["map"].iloc[0]))
    with open(os.path.join(summary["model_dir"], "pneumo_tf.json")) as handle:
        info = json.load(handle)
    assert info["threshold"] == summary["best_threshold"] and info["val_map"] == summary["val_map"]
    assert list(summary["phase_seconds"]) == ["synthesise", "convert", "train", "evaluate", "predict"]
    assert sum(summary["phase_seconds"].values()) <= summary["total_seconds"] + 0.5
    assert os.path.isfile(os.path.join(summary["model_dir"], "model.keras"))
    assert os.path.isfile(summary["threshold_table"])
    assert len(submission.read_submission(summary["submission"])) == 4
    # The model card says synthetic, with the demo's counts, and holds the demo's evaluation.
    card = model_card.read_file(os.path.join(summary["model_dir"], "model_card.json"))
    assert card["data"]["synthetic"]["settings"] == {"num_images": 24, "num_test_images": 4, "seed": 0,
                                                     "image_size": 1024, "difficulty": "easy",
                                                     "opacity_view_ratio": 1.0}
    manifest = read_manifest(summary["records_dir"])
    assert card["data"]["splits"] == {split: {"records": entry["records"], "positive": entry["positive"]}
                                      for split, entry in manifest["splits"].items()}
    assert sum(entry["records"] for entry in card["data"]["splits"].values()) == 28
    assert [(entry["split"], entry["map"]) for entry in card["evaluations"]] == [("val", summary["val_map"])]
    assert "synthetic pictures" in model_card.warnings(card)[0]
    assert card["model"]["preset"] == "demo" and "--preset=demo" in card["recipe"]["flags"]
    assert model_card.read_file(os.path.join(tmp_path, "demo", "submission.model.json"))["prediction"]["images"] == 4
