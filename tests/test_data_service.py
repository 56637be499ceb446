"""The input pipeline on the tf.data service: every record once per epoch, training through it
(one device, mirrored, multi-worker), a worker killed and the dispatcher restarted mid-run."""
import collections
import gc
import json
import os
import signal
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from pneumo_tf import models
from pneumo_tf.data import augment, pipeline, remote
from pneumo_tf.errors import UserError
from pneumo_tf.models import exported
from pneumo_tf.training import loop

TINY_MASK_OPTIONS = {"channels": 4, "n_blocks": 1, "depth": 2}
TINY_MASK = ["--model=mask_resnet", "--model_option=channels=4", "--model_option=n_blocks=1",
             "--model_option=depth=2", "--image_size=64", "--batch_size=4"]


def _port(target: str) -> str:
    return target.rpartition(":")[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A dispatcher and two workers in this process, on 127.0.0.1 and ports the system picks."""
    dispatcher = remote.start_dispatcher(0, str(tmp_path_factory.mktemp("dispatcher")))
    address = f"grpc://127.0.0.1:{_port(dispatcher.target)}"
    workers = [remote.start_worker(address, 0, "127.0.0.1") for _ in range(2)]
    yield address
    gc.collect()  # the trainers' iterators, whose open requests would hold the servers' shutdown for seconds
    for server in (*workers, dispatcher):
        server._stop()  # the servers' only way to stop before the process ends


def examples(batches) -> collections.Counter:
    """The multiset of examples (id, image and mask pixels, boxes, target) in the batches."""
    found = collections.Counter()
    for batch in batches:
        for values in zip(*(batch[key].numpy() for key in ("id", "image", "mask", "boxes", "target"))):
            found[tuple(value.tobytes() if hasattr(value, "tobytes") else value for value in values)] += 1
    return found


def test_every_record_arrives_once_per_epoch(tiny_records, cluster):
    local = examples(pipeline.make_dataset(tiny_records, "train", 4, 64, training=False))
    assert sum(local.values()) == pipeline.num_examples(tiny_records, "train") == 19 == len(local)
    served = pipeline.make_dataset(tiny_records, "train", 4, 64, training=False, data_service=cluster)
    for _ in range(2):  # two epochs of one dataset: a new job each, each record once, decoded as locally
        assert examples(served) == local
    shuffled = pipeline.make_dataset(tiny_records, "train", 4, 64, training=True, repeat=False,
                                     drop_remainder=False, seed=1, data_service=cluster)
    assert examples(shuffled) == local


def test_input_pipelines_of_several_hosts_share_one_job(tiny_records, cluster):
    """Under MultiWorkerMirroredStrategy each host builds the same dataset; together they get each record once."""
    local = examples(pipeline.make_dataset(tiny_records, "train", 4, 64, training=False))
    consumers = [
        iter(pipeline.make_dataset(tiny_records, "train", 4, 64, training=True, repeat=False, drop_remainder=False,
                                   seed=2, data_service=cluster,
                                   input_context=tf.distribute.InputContext(2, index, 2)))
        for index in range(2)
    ]
    received, running = [], [True, True]
    while any(running):
        for index, consumer in enumerate(consumers):
            if running[index]:
                batch = next(consumer, None)
                running[index] = batch is not None
                if batch is not None:
                    assert batch["image"].shape[0] <= 2  # the per-replica batch
                    received.append(batch)
    assert examples(received) == local


def test_train_through_the_service_exports(tiny_records, cluster, tmp_path):
    summary = loop.train_and_evaluate(loop.TrainConfig(
        records_dir=tiny_records, model_dir=str(tmp_path / "run"), model="mask_resnet",
        model_options=TINY_MASK_OPTIONS, image_size=64, batch_size=4, epochs=2, steps_per_epoch=2,
        validation_steps=1, profile_steps=None, data_service=cluster,
    ))
    assert summary["epochs_run"] == 2 and len(summary["history"]["loss"]) == 2
    assert exported.load(str(tmp_path / "run")).image_size == 64


def test_an_address_is_checked_before_any_work(tiny_records, tmp_path):
    with pytest.raises(UserError, match=r"dispatcher at grpc://127\.0\.0\.1:1 is unreachable \(.*refused"):
        remote.check_reachable("grpc://127.0.0.1:1")
    with pytest.raises(UserError, match="'http://host:5050' is not HOST:PORT or grpc://HOST:PORT"):
        remote.service_address("http://host:5050")
    assert remote.service_address("host:5050") == remote.service_address("grpc://host:5050") == "grpc://host:5050"
    with pytest.raises(UserError, match="cache keeps decoded images in this process"):
        pipeline.make_dataset(tiny_records, "train", 4, 64, training=True, cache=True, data_service="127.0.0.1:1")
    with pytest.raises(UserError, match="--role=worker needs --dispatcher=HOST:PORT"):
        remote.serve(remote.ServiceConfig(role="worker", port=0))
    with pytest.raises(UserError, match="unreachable"):
        remote.serve(remote.ServiceConfig(role="worker", port=0, dispatcher="127.0.0.1:1"))


def start_server(*args) -> tuple[subprocess.Popen, str]:
    """python -m pneumo_tf.data_service with args, and the address it prints once it serves."""
    process = subprocess.Popen([sys.executable, "-m", "pneumo_tf.data_service", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    assert " serving at grpc://" in line, line
    return process, line.split(" serving at ")[1].split()[0]


class KillAt(keras.callbacks.Callback):
    """Runs `action` once, at the end of training batch `batch` (mid-epoch), and counts the batches."""

    def __init__(self, batch, action):
        super().__init__()
        self.at, self.action, self.batches = batch, action, 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        if batch == self.at:
            self.action()


@pytest.mark.slow
def test_training_survives_a_killed_worker_and_a_restarted_dispatcher(tiny_records, tmp_path):
    work_dir = str(tmp_path / "dispatcher")
    dispatcher, address = start_server("--role=dispatcher", "--port=0", f"--work_dir={work_dir}")
    port = _port(address)
    address = f"grpc://127.0.0.1:{port}"
    workers = [start_server("--role=worker", f"--dispatcher={address}", "--port=0", "--host=127.0.0.1")[0]
               for _ in range(2)]
    try:
        architecture = models.get("mask_resnet")
        network = architecture.build(64, architecture.make_options(TINY_MASK_OPTIONS))
        model = loop.Trainer(network, architecture, augment.AugmentConfig.off())
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        data = pipeline.make_dataset(tiny_records, "train", 4, 64, training=True, seed=0, data_service=address)
        data = data.map(architecture.to_fit)

        def kill_a_worker():
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait()

        # An epoch of 12 steps (2.5 passes over the 19 records); one worker dies after step 3.
        killed = KillAt(2, kill_a_worker)
        history = model.fit(data, epochs=1, steps_per_epoch=12, callbacks=[killed], verbose=0, shuffle=False)
        assert killed.batches == 12 and len(history.history["loss"]) == 1 and workers[0].returncode == -9

        restarted_dispatcher = {}

        def restart_the_dispatcher():
            dispatcher.send_signal(signal.SIGKILL)
            dispatcher.wait()
            # Same port and journal: it recovers its job and the surviving worker, which re-registers.
            restarted_dispatcher["process"] = start_server("--role=dispatcher", f"--port={port}",
                                                          f"--work_dir={work_dir}")[0]

        restarted = KillAt(1, restart_the_dispatcher)
        model.fit(data, epochs=1, steps_per_epoch=8, callbacks=[restarted], verbose=0, shuffle=False)
        assert restarted.batches == 8
        dispatcher_after = restarted_dispatcher["process"]
        assert dispatcher_after.poll() is None
    finally:
        for process in [*workers, dispatcher, *restarted_dispatcher.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()


def _train_command(records, model_dir, *args):
    return [sys.executable, "-m", "pneumo_tf.train", f"--records_dir={records}", f"--model_dir={model_dir}",
            *TINY_MASK, "--epochs=1", "--steps_per_epoch=2", "--validation_steps=1", "--profile_steps=", *args]


@pytest.mark.slow
def test_mirrored_and_multi_worker_training_through_the_service(tiny_records, cluster, tmp_path):
    mirrored = subprocess.run(
        _train_command(tiny_records, tmp_path / "mirrored", "--strategy=mirrored", "--cpu_replicas=2",
                       f"--data_service={cluster}"),
        capture_output=True, text=True, timeout=600,
    )
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    with open(tmp_path / "mirrored" / "pneumo_tf.json") as handle:
        assert json.load(handle)["replicas"] == 2

    from test_train import _free_ports

    hosts = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": hosts},
                                                     "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen(
            _train_command(tiny_records, tmp_path / "multi", "--strategy=multi_worker_mirrored",
                           f"--data_service={cluster}"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    with open(tmp_path / "multi" / "pneumo_tf.json") as handle:
        info = json.load(handle)
    assert info["replicas"] == 2 and info["steps_per_epoch"] == 2


def test_servers_warn_that_they_listen_everywhere_and_journal_in_a_private_folder(tmp_path):
    """The dispatcher's default journal is this user's (not a name in the shared /tmp another user could create
    first), and both roles say on start-up that anyone reaching the port can run dataset graphs."""
    from test_train import _free_ports

    [port] = _free_ports(1)
    env = dict(os.environ, HOME=str(tmp_path))
    processes, lines = [], []
    try:
        for args in (["--role=dispatcher", f"--port={port}"],
                     ["--role=worker", f"--dispatcher=127.0.0.1:{port}", "--port=0", "--host=127.0.0.1"]):
            processes.append(subprocess.Popen([sys.executable, "-m", "pneumo_tf.data_service", *args], env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            lines.append(processes[-1].stdout.readline())  # printed after the warning
            assert " serving at grpc://" in lines[-1], lines[-1]
    finally:
        for process in processes:
            process.terminate()
    for process, line in zip(processes, lines):
        warnings = [text for text in process.communicate(timeout=60)[1].splitlines() if text.startswith("warning: ")]
        served = line.split(" serving at grpc://")[1].split()[0].rpartition(":")[2]
        assert warnings == [f"warning: the tf.data service listens on every network interface with unauthenticated, "
                            f"unencrypted gRPC: anyone who reaches port {served} can run dataset graphs that read and "
                            "write files on the workers. Run it only on a private network or behind a firewall."]
    journal = tmp_path / ".cache" / "pneumo_tf" / f"dispatcher_{port}"
    assert lines[0].endswith(f"(state journaled in {journal})\n") and journal.stat().st_mode & 0o777 == 0o700


@pytest.mark.slow
def test_a_trainer_whose_service_lost_every_worker_stops_naming_the_dispatcher(tiny_records, tmp_path):
    dispatcher, address = start_server("--role=dispatcher", "--port=0", f"--work_dir={tmp_path / 'journal'}")
    address = f"grpc://127.0.0.1:{_port(address)}"
    try:  # no worker at all: the first batch never comes
        result = subprocess.run(_train_command(tiny_records, tmp_path / "run", f"--data_service={address}",
                                               "--data_service_timeout=20"),
                                capture_output=True, text=True, timeout=400)
    finally:
        dispatcher.kill()
        dispatcher.wait()
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: no training batch for 20 s from the tf.data service at {address}: its workers are gone or stuck.")
