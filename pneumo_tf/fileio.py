"""Writing files whole or not at all: every output a reader may see goes through here."""
from __future__ import annotations

import contextlib
import csv
import json
import os


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_args):
    """Opens a temporary sibling of `path`; on success it is synced and renamed to `path`.

    On any error the temporary file is removed and `path` is left as it was.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, payload) -> None:
    with atomic_open(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_csv_atomic(path: str, header, rows) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
