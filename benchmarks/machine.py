"""What machine a benchmark ran on, printed at the top of every benchmark's output."""
import importlib.metadata
import os
import platform


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
