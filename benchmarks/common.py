"""What the benchmark scripts share: the machine they ran on (printed at the top of every
benchmark's output), their work folder (--work_dir, --keep), and for the model benchmarks the
--model_option / --train_option changes to a preset and a training run from scratch."""
import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import shutil
import tempfile
import time
import typing

from pneumo_tf import cli, models as models_lib
from pneumo_tf.cli import option
from pneumo_tf.errors import UserError


@dataclasses.dataclass(frozen=True)
class WorkFolderConfig:
    """The flags of a benchmark's work folder (a field of its config: `work: WorkFolderConfig`)."""

    work_dir: str | None = option(None, "Folder for the benchmark's data and outputs (reused by a later run when it "
                                  "holds the same data). A folder given here is kept; the default temporary one is "
                                  "removed unless --keep.")
    keep: bool = option(False, "Keep the temporary work folder at the end.")


@contextlib.contextmanager
def work_folder(prefix: str, config: WorkFolderConfig):
    """The --work_dir folder (made if needed), or a new temporary one removed after the block unless --keep;
    a folder the user named is never removed."""
    work_dir = config.work_dir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work_dir, exist_ok=True)
    try:
        yield work_dir
    finally:
        if config.work_dir is None and not config.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print(f"work folder kept: {work_dir}")


def describe(packages) -> str:
    """One line: system, CPU model, cores (and how many this process may use), Python and package versions."""

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(f"{package} {version(package)}" for package in packages)
    return (f"machine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores ({usable} usable); "
            f"python {platform.python_version()}, {versions}")


def option_changes(model_options: dict, model: str) -> dict:
    """The --model_option=MODEL.key=value changes (`model_options`: {"MODEL.key": value}) to `model`'s preset."""
    changes = {}
    for name_key, value in model_options.items():
        name, dot, key = name_key.partition(".")
        if not dot or name not in models_lib.NAMES:
            raise UserError(f"--model_option wants MODEL.key=value with a model of {', '.join(models_lib.NAMES)}, "
                            f"not {name_key}={value}")
        if name == model:
            changes[key] = value
    return changes


def typed_train_settings(values: dict) -> dict:
    """--train_option=key=value texts as the TrainConfig fields they name want them (a UserError for others)."""
    from pneumo_tf.training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"--train_option: no training setting {', '.join(unknown)}")
    try:
        return {name: cli.coerce_value(value, hints[name]) for name, value in values.items()}
    except ValueError as error:
        raise UserError(f"--train_option: {error}") from error


def train_fresh(train) -> dict:
    """Trains `train` (a resolved TrainConfig) into an emptied model_dir; its summary, with the wall time of
    the whole call as train_seconds."""
    from pneumo_tf.training import loop

    shutil.rmtree(train.model_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = loop.train_and_evaluate(train)
    return {**summary, "train_seconds": time.perf_counter() - started}
