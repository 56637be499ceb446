"""The manifest: what a records folder holds. Written last by the converter, read by every reader.

Layout of `manifest.json`:
  format_version, versions (of Python and the packages), options (the conversion's options),
  splits: {split: {records, positive, boxes, classes: {name: n},
                   shards: [{name, records, bytes, sha256}]}},
  rejects, labeled_without_dicom, formats: {dicom, png, jpeg: records from files of that format},
  synthetic: the marker beside the labels CSV ({generator, settings}) when pneumo_tf's generator
             wrote the data (records/synthetic.py), false otherwise (absent: converted before the
             converter recorded it, so unknown),
  passthrough_records, transcoded_records, multi_frame_first_frame_only, elapsed_seconds, files_per_second.
"""
from __future__ import annotations

import hashlib
import os

from pneumo_tf import fileio
from pneumo_tf.errors import UserError

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.csv"
# What the records hold, as the input pipeline reads it. 2: masks are stored with each run of
# identical rows and columns kept once (records/masks.py); version 1 stored them as full-size PNGs.
FORMAT_VERSION = 2
VERIFY_CHUNK_BYTES = 8 * 2**20


def read_manifest(records_dir: str) -> dict:
    """The manifest of a records folder, with a clear error when there is none or it is foreign."""
    path = os.path.join(records_dir, MANIFEST_NAME)
    if not fileio.isdir(records_dir):
        raise UserError(f"records folder not found: {records_dir}")
    if not fileio.isfile(path):
        raise UserError(f"{records_dir} holds no {MANIFEST_NAME}: convert images first (python -m pneumo_tf.convert)")
    manifest = fileio.read_json(path)
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise UserError(f"{path} is not a pneumo_tf records manifest: convert the DICOMs (python -m pneumo_tf.convert)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"{records_dir} holds records of format version {manifest['format_version']}, but this pneumo_tf reads "
            f"version {FORMAT_VERSION}: reconvert the images into a new folder"
        )
    return manifest


def shard_paths(records_dir: str, split: str, manifest: dict | None = None) -> list[str]:
    """Full paths of one split's shards, in manifest order."""
    manifest = manifest if manifest is not None else read_manifest(records_dir)
    splits = manifest["splits"]
    if split not in splits or not splits[split]["shards"]:
        raise UserError(f"{records_dir} has no records in split '{split}' (it has: {', '.join(sorted(splits))})")
    return [os.path.join(records_dir, shard["name"]) for shard in splits[split]["shards"]]


def checked_shard_paths(records_dir: str, split: str, manifest: dict | None = None) -> list[str]:
    """shard_paths, after one size look-up per shard: a shard missing, or of another size than the
    manifest records (cut short by a crash, a full disk or an interrupted copy, which would read as
    fewer records), is a UserError naming it."""
    manifest = manifest if manifest is not None else read_manifest(records_dir)
    paths = shard_paths(records_dir, split, manifest)
    sizes = fileio.sizes(paths, missing_ok=True)
    missing = [path for path, size in zip(paths, sizes) if size is None]
    if missing:
        raise UserError(f"{records_dir} lacks shards its manifest lists ({', '.join(missing)}): reconvert")
    for path, size, entry in zip(paths, sizes, manifest["splits"][split]["shards"]):
        if size != entry["bytes"]:
            raise UserError(f"{path} has {size} bytes but the manifest records {entry['bytes']}: it was cut short "
                            "or damaged (a crash, a full disk, an interrupted copy); copy it again or reconvert")
    return paths


VERIFY_HELP = ("Before reading --records_dir, read its split's shards whole and compare their SHA-256 with the "
               "manifest's (their sizes are always compared).")


def verify_shards(records_dir: str, splits) -> None:
    """Reads every shard of `splits` whole and compares its SHA-256 with the manifest's; a UserError names
    the first that differs (a slower, complete check than checked_shard_paths' sizes)."""
    manifest = read_manifest(records_dir)
    for split in splits:
        for path, entry in zip(checked_shard_paths(records_dir, split, manifest), manifest["splits"][split]["shards"]):
            digest = hashlib.sha256()
            with fileio.open_file(path, "rb") as handle:
                while chunk := handle.read(VERIFY_CHUNK_BYTES):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise UserError(f"{path} does not match its manifest's SHA-256 (damaged on disk or in a copy): "
                                "copy it again or reconvert")
