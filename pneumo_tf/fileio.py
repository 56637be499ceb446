"""Files on any filesystem, and writing them whole or not at all: every output a reader may see goes through here.

Local paths go through `os` and `open`; URLs (`gs://bucket/records`, and any other scheme
TensorFlow has a filesystem for, such as `ram://` in tests) through `tf.io.gfile`, so a
conversion on Apache Beam can read its DICOMs from and write its shards to cloud storage.
TensorFlow is imported only when a URL is used: converter workers writing local shards
never load it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import glob as glob_lib
import io
import json
import os
import shutil
import uuid

from pneumo_tf.errors import UserError

# Concurrent size look-ups for a folder of URLs: one request each, so latency, not bandwidth, bounds them.
REMOTE_STAT_THREADS = 64


def is_url(path: str) -> bool:
    return "://" in path


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def absolute(path: str) -> str:
    return path if is_url(path) else os.path.abspath(path)


def open_file(path: str, mode: str = "r", **open_args):
    """A file object for reading or writing `path`, as `open(path, mode, **open_args)`.

    For a URL, open_args are not needed: GFile reads and writes UTF-8 text and never
    translates newlines.
    """
    if not is_url(path):
        return open(path, mode, **open_args)
    handle = _gfile().GFile(path, mode)
    if "w" in mode:
        # GFile creates the file at the first write: an empty one (a shard whose files were all
        # rejected) must exist all the same.
        handle.write(b"" if "b" in mode else "")
    return handle


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_url(path):
        return _gfile().exists(path) and not _gfile().isdir(path)
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names of the entries of a folder (files and subfolders)."""
    return [name.rstrip("/") for name in _gfile().listdir(path)] if is_url(path) else os.listdir(path)


def list_files(folder: str) -> list[str]:
    """Sorted names of the regular files directly in `folder` (one listing request for a URL)."""
    if is_url(folder):
        _, _, files = next(_gfile().walk(folder), (folder, [], []))
        return sorted(files)
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_file())


def getsize(path: str) -> int:
    return _gfile().stat(path).length if is_url(path) else os.path.getsize(path)


def _size_or_none(path: str) -> int | None:
    if is_url(path):
        return getsize(path) if _gfile().exists(path) else None
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return None


def sizes(paths: list[str], missing_ok: bool = False) -> list[int | None]:
    """getsize of many files (None for a missing one when missing_ok); concurrent for URLs (a sequential
    stat of 300,000 objects takes hours)."""
    size = _size_or_none if missing_ok else getsize
    if not any(is_url(path) for path in paths):
        return [size(path) for path in paths]
    with concurrent.futures.ThreadPoolExecutor(REMOTE_STAT_THREADS) as pool:
        return list(pool.map(size, paths))


def makedirs(path: str) -> None:
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def sync(handle) -> None:
    """Flushes a file object opened by open_file and, for a local file, has the OS write it to the
    disk (an object store's file is whole once closed)."""
    handle.flush()
    if isinstance(handle, io.IOBase):
        os.fsync(handle.fileno())


def replace(source: str, destination: str) -> None:
    """Renames source to destination, replacing it (atomic locally; on object stores the
    destination object appears whole, as a copy does). Locally the folder is synced after the
    rename, so the new name survives a power loss too."""
    if is_url(source):
        _gfile().rename(source, destination, overwrite=True)
        return
    os.replace(source, destination)
    folder = os.open(os.path.dirname(os.path.abspath(destination)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove(path: str) -> None:
    if is_url(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Removes a folder and everything in it; nothing when it does not exist."""
    if is_url(path):
        if _gfile().exists(path):
            _gfile().rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def glob(folder: str, pattern: str) -> list[str]:
    """Paths in `folder` whose names match the glob `pattern` (the folder's own name is taken literally)."""
    if is_url(folder):
        return _gfile().glob(f"{folder.rstrip('/')}/{pattern}")
    return glob_lib.glob(os.path.join(glob_lib.escape(folder), pattern))


def temporary_name(path: str) -> str:
    """A sibling name unique to this writer: machines retrying the same work never share one."""
    return f"{path}.tmp-{uuid.uuid4().hex[:16]}"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_args):
    """Opens a temporary sibling of `path`; on success it is synced and renamed to `path`.

    On any error the temporary file is removed and `path` is left as it was.
    """
    tmp = temporary_name(path)
    try:
        with open_file(tmp, mode, **open_args) as handle:
            yield handle
            sync(handle)
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            remove(tmp)
        raise


def write_json_atomic(path: str, payload) -> None:
    with atomic_open(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json(path: str):
    """The JSON value in `path`; a UserError naming the file when it holds no JSON (damaged, cut short)."""
    try:
        with open_file(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error


def write_csv_atomic(path: str, header, rows) -> None:
    with atomic_open(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
