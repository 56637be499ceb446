"""Planning a conversion: which input file goes to which split and shard.

The plan depends only on the file names, the labels, the options and the seed, never on the
machine, so the same inputs give the same shards anywhere (records/shards.py writes them).
Splits: train/val stratified by class at patient level; unlabeled images in "test". Files
are shuffled before they are cut into shards, so every shard mixes classes.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os

import numpy as np

from pneumo_tf import fileio
from pneumo_tf.errors import UserError
from pneumo_tf.records import schema
from pneumo_tf.records.labels import PatientFacts, PatientLabels
from pneumo_tf.records.radiograph import ConvertOptions, image_id_of

TARGET_SHARD_BYTES = 128 * 2**20
# An automatic shard count gives every split at least this many shards (when it has
# MIN_SHARD_FILES files per shard), so workers convert in parallel and readers interleave.
MIN_AUTO_SHARDS = 8
MIN_SHARD_FILES = 64


@dataclasses.dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int
    # (path, image_id, labels or None for unlabeled test images, metadata CSV facts or None)
    files: tuple[tuple[str, str, PatientLabels | None, PatientFacts | None], ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.tfrecord"


@dataclasses.dataclass(frozen=True)
class Plan:
    shards: tuple[Shard, ...]
    rejects: tuple[tuple[str, str], ...]  # (file, reason) known before any pixel is read
    labeled_without_dicom: int



def list_inputs(folder: str) -> list[str]:
    """Every regular, non-hidden file in the folder, sorted: each becomes a record or a reject."""
    if not fileio.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    return [os.path.join(folder, n) for n in fileio.list_files(folder) if not n.startswith(".")]


def split_ids(labels: dict[str, PatientLabels], ids: list[str], val_fraction: float, seed: int,
              folds: int = 0, fold: int = 0):
    """Patient-level train/val split stratified by the three-way class (target when class unknown).

    With `folds`, each class's patients (shuffled by `seed`) are dealt round-robin into that many
    folds, continuing across classes so fold sizes differ by at most one; fold `fold` is val.
    The folds of one seed partition the patients: every patient is in exactly one val split.
    """
    strata: dict[int, list[str]] = collections.defaultdict(list)
    for image_id in sorted(ids):
        label = labels[image_id]
        strata[label.label_class if label.label_class != schema.UNLABELED else 10 + label.target].append(image_id)
    rng = np.random.default_rng(seed)
    train, val = [], []
    dealt = 0
    for key in sorted(strata):
        members = list(rng.permutation(strata[key]))
        if folds:
            in_val = [(dealt + position) % folds == fold for position in range(len(members))]
            dealt += len(members)
        else:
            cut = int(round(len(members) * val_fraction))
            in_val = [position < cut for position in range(len(members))]
        for member, is_val in zip(members, in_val):
            (val if is_val else train).append(member)
    return sorted(train), sorted(val)


def shard_count(options: ConvertOptions, paths: list[str]) -> int:
    """Shards for one split's files: --num_shards, or enough for ~TARGET_SHARD_BYTES each (see MIN_AUTO_SHARDS)."""
    if options.num_shards:
        return max(1, min(options.num_shards, len(paths)))
    if options.image_size == 0:
        estimate = sum(fileio.sizes(paths))
    else:  # PNG of a radiograph: ~0.6 of raw size, plus a small mask
        estimate = len(paths) * options.image_size**2 * (options.bit_depth // 8) * 0.6
    by_size = math.ceil(estimate / TARGET_SHARD_BYTES)
    # Never from the machine's core count: the same inputs must give the same shards anywhere.
    return max(1, by_size, min(MIN_AUTO_SHARDS, len(paths) // MIN_SHARD_FILES))


def make_plan(
    dicom_dir: str,
    labels: dict[str, PatientLabels] | None,
    test_dicom_dir: str | None,
    options: ConvertOptions,
    facts: dict[str, PatientFacts] | None = None,
) -> Plan:
    """The shards of a conversion, and the files rejected before any pixel is read (duplicate ids,
    labeled folders' files without a label row)."""
    rejects: list[tuple[str, str]] = []
    seen: set[str] = set()
    labeled: dict[str, str] = {}
    unlabeled: dict[str, str] = {}
    for folder, is_test in ((dicom_dir, labels is None), (test_dicom_dir, True)):
        if folder is None:
            continue
        for path in list_inputs(folder):
            image_id = image_id_of(path)
            if image_id in seen:
                rejects.append((path, f"duplicate image id {image_id}"))
            elif is_test:
                unlabeled[image_id] = path
            elif image_id not in labels:
                rejects.append((path, "no label row for this id in the labels CSV"))
            else:
                labeled[image_id] = path
            seen.add(image_id)

    split_members: dict[str, list[str]] = {}
    if labeled:
        split_members["train"], split_members["val"] = split_ids(
            labels, list(labeled), options.val_fraction, options.seed, options.folds, options.fold)
    split_members["test"] = sorted(unlabeled)

    shards = []
    paths = {**labeled, **unlabeled}
    for split_index, split in enumerate(schema.SPLITS):
        members = split_members.get(split, [])
        if not members:
            continue
        # Shuffle before cutting into shards so every shard mixes classes (file-level shuffle
        # then behaves like a record shuffle).
        order = np.random.default_rng([options.seed, split_index]).permutation(len(members))
        files = [
            (paths[members[i]], members[i], labels[members[i]] if split != "test" else None,
             (facts or {}).get(members[i])) for i in order
        ]
        count = shard_count(options, [f[0] for f in files])
        for index, part in enumerate(np.array_split(np.arange(len(files)), count)):
            shards.append(Shard(split, index, count, tuple(files[i] for i in part)))
    labeled_without_dicom = len(set(labels) - set(labeled)) if labels is not None else 0
    return Plan(tuple(shards), tuple(sorted(rejects)), labeled_without_dicom)


def plan_json(plan: Plan) -> dict:
    """The plan as JSON: what a rerun compares with the unfinished conversion's, what Beam's workers read."""
    return {
        "shards": [{"split": shard.split, "index": shard.index, "count": shard.count,
                    "files": [[path, image_id, *(None if given is None else dataclasses.asdict(given)
                                                 for given in (labels, known))]
                              for path, image_id, labels, known in shard.files]} for shard in plan.shards],
        "rejects": [list(reject) for reject in plan.rejects],
        "labeled_without_dicom": plan.labeled_without_dicom,
    }


def shard_from_json(entry: dict) -> Shard:
    """One shard of plan_json's "shards"."""
    files = tuple((path, image_id, None if labels is None else PatientLabels(
        labels["target"], labels["label_class"], tuple(tuple(box) for box in labels["boxes"])),
        None if known is None else PatientFacts(**known))
        for path, image_id, labels, known in entry["files"])
    return Shard(entry["split"], entry["index"], entry["count"], files)


def plan_changes(before: dict, after: dict) -> str:
    """What differs between two plan_json's, in words: files gone, new, or planned otherwise."""
    def planned(plan):
        return {path: (image_id, labels, known, shard["split"], shard["index"])
                for shard in plan["shards"] for path, image_id, labels, known in shard["files"]}

    old, new = planned(before), planned(after)
    changes = (
        ("gone", sorted(set(old) - set(new))),
        ("new", sorted(set(new) - set(old))),
        ("with other labels, metadata or shard", sorted(path for path in old.keys() & new if old[path] != new[path])),
    )
    return ", ".join(f"{len(paths)} file(s) {what} (e.g. {paths[0]})" for what, paths in changes if paths) \
        or "the same files, otherwise planned"
