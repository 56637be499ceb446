"""A training's logs in a real TensorBoard server: the Profile tab lists and opens the --profile_steps trace."""
import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pneumo_tf.training import loop
from pneumo_tf.training.config import TrainConfig

SERVER_START_SECONDS = 120  # TensorBoard imports TensorFlow for the profile plugin: slow on a busy machine


@contextlib.contextmanager
def tensorboard(logdir, log_path):
    """A `tensorboard --logdir` server on a free port of 127.0.0.1; yields its URL and always stops it."""
    with open(log_path, "w") as log:
        # --port=0 lets the operating system pick a free port; TensorBoard prints the URL it got.
        # --load_fast=false keeps TensorBoard in this one process (no separate data server).
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}", "--host=127.0.0.1", "--port=0",
             "--load_fast=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            with open(log_path) as handle:
                started = re.search(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+)/", handle.read())
            if started:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as handle:
                    pytest.fail(f"TensorBoard did not start (exit status {server.poll()}):\n{handle.read()[-3000:]}")
            time.sleep(0.5)
        yield started.group(1)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and nothing else
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


def get_json(url):
    with urllib.request.urlopen(url, timeout=120) as response:
        body = response.read()
        # The profile plugin gzips its answers whatever the request accepts; urllib leaves that to us.
        if response.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return json.loads(body)


@pytest.mark.slow
def test_tensorboard_lists_and_opens_the_profile_run_of_a_training(tiny_records, tmp_path):
    model_dir = tmp_path / "run"
    loop.train_and_evaluate(TrainConfig(
        records_dir=tiny_records, model_dir=str(model_dir), model="mask_resnet",
        model_options={"channels": 4, "n_blocks": 1, "depth": 2}, image_size=64, batch_size=4, epochs=1,
        steps_per_epoch=3, profile_steps=(2, 3),
    ))
    traces = list((model_dir / "logs" / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1
    session, host = traces[0].parent.name, traces[0].name[: -len(".xplane.pb")]

    with tensorboard(model_dir / "logs", tmp_path / "tensorboard.log") as url:
        plugins = get_json(f"{url}/data/plugins_listing")
        assert "profile" in plugins, "TensorBoard has no profile plugin: is xprof installed?"
        assert plugins["profile"]["enabled"] is True  # the Profile tab is shown
        assert plugins["scalars"]["enabled"] is True
        run = f"train/{session}"
        assert get_json(f"{url}/data/plugin/profile/runs") == [run]
        tools = get_json(f"{url}/data/plugin/profile/run_tools?run={run}")
        assert {"overview_page", "input_pipeline_analyzer", "trace_viewer@"} <= set(tools)
        assert get_json(f"{url}/data/plugin/profile/hosts?run={run}&tag=input_pipeline_analyzer") == [
            {"hostname": host}
        ]
        # The plugin reads TensorFlow 2.21's trace: its input-pipeline analysis times the tf.data
        # iterator of the traced steps, one row per iterator stage (which stages ran in the traced
        # window depends on timing, so only the root is certain).
        analysis = get_json(f"{url}/data/plugin/profile/data?run={run}&tag=input_pipeline_analyzer&host={host}")
        input_ops = {row["c"][0]["v"]: row["c"][6]["v"] for row in analysis[2]["rows"]}
        assert "Iterator::Root" in input_ops and all(name.startswith("Iterator::Root") for name in input_ops)
        assert input_ops["Iterator::Root"] == "Preprocessing"
