"""What the benchmark scripts share: the machine they ran on (printed at the top of every
benchmark's output) and their work folder (--work_dir, --keep)."""
import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import shutil
import tempfile

from pneumo_tf.cli import option


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
