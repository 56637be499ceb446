"""The input pipeline on other machines' CPUs: TensorFlow's tf.data service.

An 8-GPU host's CPUs cannot decode images as fast as its accelerators train. The tf.data
service moves reading, parsing and decoding onto worker processes on any number of CPU
machines; the training host only receives finished batches (and augments them on the
accelerator, as always):

    python -m pneumo_tf.data_service --role=dispatcher --port=5050
    python -m pneumo_tf.data_service --role=worker --dispatcher=HOST:5050 --port=5051   # on each CPU machine
    python -m pneumo_tf.train ... --data_service=grpc://HOST:5050

Processing mode: dynamic sharding (`ShardingPolicy.DYNAMIC`, "distributed_epoch"). The
dispatcher hands the split's shard files, one at a time, to whichever worker asks next, and
every consumer of the job (one input pipeline per training host) takes the batches some
worker finished. So each example is read once per pass over the split, across all workers
and replicas, and workers may join or leave while training runs. Consequences: the files come
in the same shuffled order as in-process, but records are shuffled only within each worker's
buffer (over the files that worker got); batches are formed on the workers; a worker lost
mid-pass takes the examples it had in flight with it, for that pass only. The shard files must
be readable at the same path from every worker (shared storage, or gs:// records).

The dispatcher journals its state in --work_dir (fault-tolerant mode): restarted on the same
port with the same folder, it recovers its jobs and workers, and training carries on.

Security: TensorFlow's servers listen on every network interface (0.0.0.0) with insecure,
unauthenticated gRPC, whatever --host says (it only names the worker to trainers). Whoever
reaches a port can send dataset graphs that read and write files on the workers. Run them on a
private network or behind a firewall only; both roles print that warning when they start.
If every worker dies, the trainer's next batch never comes: training's watchdog
(--data_service_timeout, callbacks.StallWatchdog) stops it with a message naming the dispatcher.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import sys
import tempfile

import tensorflow as tf

from pneumo_tf.cli import check_constraints, option
from pneumo_tf.errors import UserError

ROLES = ("dispatcher", "worker")
EXPOSURE_WARNING = ("warning: the tf.data service listens on every network interface with unauthenticated, "
                    "unencrypted gRPC: anyone who reaches port {port} can run dataset graphs that read and write files "
                    "on the workers. Run it only on a private network or behind a firewall.")
PROTOCOL = "grpc"
PROCESSING_MODE = tf.data.experimental.service.ShardingPolicy.DYNAMIC
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """One tf.data service server: the dispatcher (one per cluster) or a worker (one per CPU machine)."""

    role: str = option(help="dispatcher: the one process that hands out work; worker: decodes batches (one per CPU "
                       "machine). Either listens on every network interface with unauthenticated gRPC, whoever "
                       "reaches its port can run dataset graphs that read and write files on the workers: private "
                       "networks or behind a firewall only.", choices=ROLES)
    port: int = option(5050, "Port to serve on, on every network interface (TensorFlow's servers bind 0.0.0.0); 0 "
                       "picks a free one (the address is printed).", minimum=0, maximum=65535)
    work_dir: str = option("", "dispatcher: folder (local or gs://) where it journals its state, so that restarted "
                           "with the same --port and folder it recovers its jobs and workers; default "
                           f"{os.path.join('~', '.cache', 'pneumo_tf', 'dispatcher_PORT')} (this user's only; a folder "
                           "on durable storage lets it restart on another machine).")
    dispatcher: str = option("", "worker: the dispatcher's HOST:PORT (grpc://HOST:PORT also accepted).")
    host: str = option("", "worker: the name or address by which trainers reach this machine (default: its fully "
                       "qualified domain name); it still listens on every interface.")

    def validate(self) -> None:
        check_constraints(self)
        if self.role == "worker" and not self.dispatcher:
            raise UserError("--role=worker needs --dispatcher=HOST:PORT")


def service_address(text: str) -> str:
    """'HOST:PORT' or 'grpc://HOST:PORT' -> 'grpc://HOST:PORT', the form tf.data takes."""
    protocol, separator, address = text.partition("://")
    if not separator:
        protocol, address = PROTOCOL, text
    host, colon, port = address.rpartition(":")
    if protocol != PROTOCOL or not colon or not host or not port.isdigit():
        raise UserError(f"tf.data service address {text!r} is not HOST:PORT or grpc://HOST:PORT")
    return f"{PROTOCOL}://{address}"


def check_reachable(address: str) -> None:
    """A UserError now, when nothing listens at the dispatcher's address, instead of tf.data
    retrying the connection for ever."""
    host, _, port = service_address(address).partition("://")[2].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise UserError(f"the tf.data service dispatcher at {address} is unreachable ({error}): start it with "
                        "python -m pneumo_tf.data_service --role=dispatcher, or fix the address") from error


def distribute(dataset: tf.data.Dataset, address: str, shared_by: tuple | None = None) -> tf.data.Dataset:
    """`dataset` processed by the service's workers, this process receiving its elements.

    shared_by: None for a job of this consumer alone; otherwise the values that define the
    dataset (the same on every training host), which name one job all those consumers share,
    so that together they receive each element once.
    """
    check_reachable(address)
    job_name = None
    if shared_by is not None:
        job_name = "pneumo_tf-" + hashlib.sha256(repr(shared_by).encode()).hexdigest()[:24]
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=PROCESSING_MODE, service=service_address(address), job_name=job_name,
        target_workers="ANY",  # every worker of the dispatcher, never only those in this process
        # Uncompressed: decompressing costs the training host's CPU, which the service is there to
        # spare (measured here: tf.data's default snappy compression made receiving a 256-px example
        # cost 0.70 instead of 0.44 ms of CPU), for bytes a data-center network carries easily.
        compression=None,
    ))


def start_dispatcher(port: int, work_dir: str) -> tf.data.experimental.service.DispatchServer:
    """A fault-tolerant dispatcher journaling into work_dir; its address is `.target`."""
    return tf.data.experimental.service.DispatchServer(tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=True,
    ))


def start_worker(dispatcher: str, port: int = 0, host: str = "") -> tf.data.experimental.service.WorkerServer:
    """A worker registered with the dispatcher, reachable by trainers at host (default: this machine's name)."""
    return tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
        dispatcher_address=service_address(dispatcher).partition("://")[2],
        worker_address=f"{host or socket.getfqdn()}:%port%",  # tf.data puts the bound port in
        port=port,
    ))


def default_work_dir(port: int) -> str:
    """The dispatcher's journal folder when --work_dir is not given: one per port (a restart on the same port
    recovers), in this user's cache, never a predictable name in the shared temporary folder that another user
    could create first and fill with a journal of their own."""
    if not port:  # a port of its own each time: nothing to recover
        return tempfile.mkdtemp(prefix="pneumo_tf_dispatcher_")
    folder = os.path.join(os.path.expanduser("~"), ".cache", "pneumo_tf", f"dispatcher_{port}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def serve(config: ServiceConfig) -> None:
    """Runs one server until the process is stopped, after printing where it serves (and the warning)."""
    config.validate()
    if config.role == "dispatcher":
        work_dir = config.work_dir or default_work_dir(config.port)
        server = start_dispatcher(config.port, work_dir)
        port = server.target.rpartition(":")[2]
        serving = (f"tf.data service dispatcher serving at {PROTOCOL}://{socket.getfqdn()}:{port} "
                   f"(state journaled in {work_dir})")
    else:
        check_reachable(config.dispatcher)
        server = start_worker(config.dispatcher, config.port, config.host)
        # `_address` is the only way WorkerServer tells the port it bound (--port=0).
        port = server._address.rpartition(":")[2]
        serving = f"tf.data service worker serving at {PROTOCOL}://{server._address} for the dispatcher at " \
                  f"{config.dispatcher}"
    print(EXPOSURE_WARNING.format(port=port), file=sys.stderr, flush=True)
    print(serving, flush=True)
    server.join()
