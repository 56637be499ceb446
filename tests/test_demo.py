"""The main job end to end on a tiny built-in data set."""
import json
import os

from pneumo_tf import demo
from pneumo_tf.evaluation import submission


def test_demo_runs_the_whole_path_and_writes_its_summary(tmp_path):
    config = demo.DemoConfig(
        output_dir=str(tmp_path / "demo"), num_images=24, num_test_images=4, workers=1, epochs=1,
        image_size=64, batch_size=4, model_options={"channels": 4, "n_blocks": 1, "depth": 2},
    )
    summary = demo.run_demo(config)
    with open(tmp_path / "demo" / "summary.json") as handle:
        assert json.load(handle) == summary
    assert summary["records"] == 28 and summary["epochs_run"] == 1
    assert 0.0 <= summary["val_map"] <= 1.0 and 0.0 < summary["best_threshold"] < 1.0
    assert summary["train_seconds"] > 0 and summary["images_per_second"] > 0
    assert os.path.isfile(os.path.join(summary["model_dir"], "model.keras"))
    assert os.path.isfile(summary["threshold_table"])
    assert len(submission.read_submission(summary["submission"])) == 4
