"""Tools nobody here wrote, for the DICOM tests: dicom3tools' dciodvfy and DCMTK's command-line programs.

pynetdicom installs console scripts named like DCMTK's (storescu, storescp): `dcmtk(name)` finds
DCMTK's own on PATH (its --version names dcmtk) and skips the test with the reason when there is none.
"""
import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest

INSTALL = "install Debian's dcmtk and dicom3tools (apt-get install dcmtk dicom3tools; .ci/run does)"


def dcmtk(name: str) -> str:
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
            if "dcmtk" in (version.stdout + version.stderr).lower():
                return path
    pytest.skip(f"DCMTK's {name} not found: {INSTALL}")


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's Error lines for one file (the skip when the tool is absent)."""
    tool = shutil.which("dciodvfy") or pytest.skip(f"dicom3tools' dciodvfy not found: {INSTALL}")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Abort"))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process=None, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the listener exited: {process.stderr.read() if process.stderr else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@contextlib.contextmanager
def storescp(folder, ae_title: str = "RECEIVER"):
    """DCMTK's storescp on a free port, storing every object it receives into `folder`: yields the port."""
    port = free_port()
    os.makedirs(folder, exist_ok=True)
    process = subprocess.Popen([dcmtk("storescp"), "--output-directory", str(folder), "--accept-all",
                                "--aetitle", ae_title, "--acse-timeout", "30", "--dimse-timeout", "30", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=60)


def storescu(port: int, *paths, ae_title: str = "PNEUMO_TF", timeout: float = 120) -> subprocess.CompletedProcess:
    """DCMTK's storescu sending `paths` to 127.0.0.1:`port`, proposing JPEG Baseline (RSNA's) and uncompressed."""
    return subprocess.run([dcmtk("storescu"), "--propose-jpeg8", "--call", ae_title, "--acse-timeout", "30",
                           "--dimse-timeout", "60", "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout)
