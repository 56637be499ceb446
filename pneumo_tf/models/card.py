"""The model card: what an exported model (or an ensemble) is and where it came from, one JSON document.

A model folder holds it as `model_card.json` beside pneumo_tf.json: training's export writes it
before pneumo_tf.json (pneumo_tf.models.exported), so a complete folder has its card. An ensemble
folder holds the card of the reading it records. `python -m pneumo_tf.evaluate` appends its
measurements; predict writes a copy beside a submission (`submission.model.json`); the web page and
its JSON API show `short(card)`; the DICOM results carry the digest; `python -m pneumo_tf.describe`
prints it.

A file of its own rather than keys of pneumo_tf.json: pneumo_tf.json is what loading the model
needs; the card is the document that travels (copied whole beside a submission, embedded in an
ensemble's card) and that the digest names.

Schema, card_version 1 (a null section is unknown: a model exported before cards existed gets a
card built from its pneumo_tf.json, with data, recipe, versions and created null):

  card_version  1
  kind          "model" or "ensemble"
  name          the architecture ("mask_resnet"), or the ensemble's reading ("2 x mask_resnet, hflip, wbf")
  created       when the export (or the ensemble's first evaluation) wrote it: UTC, ISO 8601
  model         architecture, preset (null without one), options (as training resolved them),
                image_size, parameters (weights in the network)
  recipe        flags (every training setting as a flagfile line: they reproduce the run), command
                (the command line, when a command started the run), flagfiles [{path, sha256, text}]
                (those the command line named, as they were)
  data          the training records: records_dir, manifest_sha256 (of its manifest.json), splits
                {split: {records, positive}}, formats {dicom, png, jpeg: records}, conversion
                {image_size, bit_depth}, synthetic (the generator's {generator, settings} when
                records/synthetic.py wrote the images, false for other images, null when the
                manifest predates the converter recording it)
  training      epochs (asked), epochs_run, exported_epoch (0-based), steps_per_epoch, steps_run,
                batch_size, learning_rate (peak), optimizer, precision, replicas, seed, train_seconds
  validation    at export: split, images, epoch, map with its threshold (the best of the sweep on
                that split, threshold_split: the threshold was chosen on the same images), auc, loss
  versions      Python's and the packages' at export
  evaluations   appended by evaluate, oldest first: date, split, records_dir, manifest_sha256,
                images, positives, synthetic, map, auc, f1, threshold, threshold_metric,
                threshold_split, threshold_saved, reading
  members       ensembles: [{model_dir, weight, card_sha256, card}], each member's card without its
                evaluations, as it was when the ensemble's card was written
  reading       ensembles: tta, fusion, fusion_iou, score_alignment (members carry their anchors)
  prediction    only in the copy beside a submission: date, submission, threshold, images, source

The digest is the SHA-256 of the canonical JSON (sorted keys, no spaces) of the card without its
evaluations and prediction: it names the model and its provenance, and stays the same while
measurements are appended and copies are made.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex

from pneumo_tf import cli, fileio
from pneumo_tf.cli import option
from pneumo_tf.errors import UserError
from pneumo_tf.models import exported, reading as reading_lib
from pneumo_tf.records import manifest as manifest_lib

CARD_VERSION = 1
CARD_FILE = exported.CARD_FILE
# Fewer real training images than this get a warning: the challenge's train set has 26,684.
MIN_REAL_TRAIN_IMAGES = 3000
PACKAGES = ("pneumo_tf", "tensorflow", "keras", "keras-hub", "numpy", "pydicom", "pillow")
# Not part of what the model is: the digest leaves them out.
APPENDED = ("evaluations", "prediction")
UNKNOWN = "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_versions() -> dict:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def digest(card: dict) -> str:
    """SHA-256 (hex) of the card's canonical JSON without what is appended to it (see the module docstring)."""
    kept = {key: value for key, value in card.items() if key not in APPENDED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def provenance(card: dict) -> dict:
    """The card without its evaluations and prediction (what its digest covers)."""
    return {key: copy.deepcopy(value) for key, value in card.items() if key not in APPENDED}


# ------------------------------------------------------------------------------------------------
# Building cards.


def records_facts(records_dir: str) -> dict:
    """What names a records folder: its path, its manifest's digest and whether it is synthetic."""
    path = os.path.join(records_dir, manifest_lib.MANIFEST_NAME)
    manifest = manifest_lib.read_manifest(records_dir)
    with fileio.open_file(path, "rb") as handle:
        manifest_sha256 = hashlib.sha256(handle.read()).hexdigest()
    return {"records_dir": fileio.absolute(records_dir), "manifest_sha256": manifest_sha256,
            "synthetic": manifest.get("synthetic")}


def data_section(records_dir: str) -> dict:
    manifest = manifest_lib.read_manifest(records_dir)
    return {
        **records_facts(records_dir),
        "splits": {split: {"records": entry["records"], "positive": entry["positive"]}
                   for split, entry in manifest["splits"].items()},
        "formats": manifest["formats"],
        "conversion": {key: manifest["options"][key] for key in ("image_size", "bit_depth")},
    }


def _flagfiles(arguments) -> list[dict]:
    """The flagfiles a command line names (--flagfile=PATH or --flagfile PATH), as they are now."""
    paths, arguments = [], list(arguments)
    for index, argument in enumerate(arguments):
        name, separator, value = argument.lstrip("-").partition("=")
        if name == "flagfile":
            paths.append(value if separator else (arguments[index + 1] if index + 1 < len(arguments) else ""))
    found = []
    for path in filter(None, paths):
        with open(path, "rb") as handle:
            data = handle.read()
        found.append({"path": os.path.abspath(path), "sha256": hashlib.sha256(data).hexdigest(),
                      "text": data.decode("utf-8", "replace")})
    return found


def recipe_section(config, arguments=None, command: str = "python -m pneumo_tf.train") -> dict:
    """The run's settings as flags; `arguments` (the command line's, without the program) when a command ran it."""
    return {
        "flags": cli.flags_from_config(config),
        "command": None if arguments is None else " ".join([command, *map(shlex.quote, arguments)]),
        "flagfiles": _flagfiles(arguments or ()),
    }


def _known(info: dict) -> dict:
    """The sections pneumo_tf.json (what training returns and exports) says: model, training, validation."""
    history = info.get("history") or {}
    epochs = info.get("epochs") or []
    exported_epoch = info.get("exported_epoch")
    at = epochs.index(exported_epoch) if exported_epoch in epochs else None

    def logged(name):
        values = history.get(name)
        value = values[at] if values is not None and at is not None and at < len(values) else None
        return None if value is None or math.isnan(value) else value  # JSON has no NaN: undefined is null

    auc_name = next((name for name in history if name.startswith("val_") and name.endswith("auc")), None)
    steps = info.get("steps_per_epoch")
    training = None
    if "epochs_run" in info:
        # pneumo_tf.json holds neither the epochs asked, the batch size nor the optimizer: export_card adds them.
        training = {
            "epochs": None, "epochs_run": info["epochs_run"], "exported_epoch": exported_epoch,
            "steps_per_epoch": steps, "steps_run": info["epochs_run"] * steps if steps else None,
            "batch_size": None, "optimizer": None,
            **{key: info.get(key) for key in ("learning_rate", "precision", "replicas", "seed", "train_seconds")},
        }
    validation = None
    if at is not None and "val_loss" in history:
        validation = {"split": "val", "images": None, "epoch": exported_epoch, "map": logged("val_map"),
                      "threshold": logged("val_map_threshold"), "threshold_split": "val",
                      "auc": logged(auc_name) if auc_name else None, "loss": logged("val_loss")}
    return {
        "model": {"architecture": info["model"], "preset": info.get("preset") or None,
                  "options": info.get("model_options", {}), "image_size": info["image_size"], "parameters": None},
        "training": training,
        "validation": validation,
    }


def unknown_card(info: dict) -> dict:
    """The card of a model exported without one: what its pneumo_tf.json says, the rest unknown (null)."""
    return {"card_version": CARD_VERSION, "kind": "model", "name": info["model"], "created": None,
            **_known(info), "recipe": None, "data": None, "versions": None, "evaluations": []}


def export_card(config, summary: dict, parameters: int | None = None, arguments=None) -> dict:
    """The card training exports: `config` (a TrainConfig) and `summary` (what it exports as pneumo_tf.json)."""
    card = {"card_version": CARD_VERSION, "kind": "model", "name": summary["model"], "created": now(),
            **_known(summary), "recipe": recipe_section(config, arguments), "data": data_section(config.records_dir),
            "versions": package_versions(), "evaluations": []}
    card["model"]["parameters"] = parameters
    card["training"].update(epochs=config.epochs, batch_size=config.batch_size, optimizer=config.optimizer)
    if card["validation"] is not None:
        records = card["data"]["splits"].get("val", {}).get("records")
        limit = config.validation_steps * config.batch_size
        card["validation"]["images"] = min(records, limit) if records is not None and limit else records
    return card


def ensemble_card(reading, folder: str | None = None) -> dict:
    """The card of a fused reading (pneumo_tf.models.reading.Reading): its members' cards and how they are
    read. Members' folders are relative to `folder` (the ensemble folder) when given."""
    members = []
    for one in reading.members:
        model_dir = one.model.model_dir
        member = of_folder(model_dir)
        shown = os.path.relpath(os.path.abspath(model_dir), os.path.abspath(folder)) if folder else model_dir
        members.append({"model_dir": shown, "weight": one.weight, "anchor": one.anchor, "card_sha256": digest(member),
                        "card": provenance(member)})
    return {"card_version": CARD_VERSION, "kind": "ensemble", "name": reading.name, "created": now(),
            "members": members, "reading": {"tta": reading.tta, "fusion": reading.fusion,
                                            "fusion_iou": reading.fusion_iou,
                                            "score_alignment": reading.score_alignment},
            "versions": package_versions(), "evaluations": []}


# ------------------------------------------------------------------------------------------------
# Reading and writing.


def _card_path(folder: str) -> str:
    return os.path.join(folder, CARD_FILE)


def read_file(path: str) -> dict:
    """A card file, with one clear error when it is not one this pneumo_tf reads."""
    try:
        with open(path) as handle:
            card = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a valid model card (not JSON: {error})") from error
    if not isinstance(card, dict) or not isinstance(card.get("card_version"), int):
        raise UserError(f"{path} is not a pneumo_tf model card (no card_version)")
    if card["card_version"] > CARD_VERSION:
        raise UserError(f"{path} is a model card of version {card['card_version']}, written by a newer pneumo_tf "
                        f"(this one reads version {CARD_VERSION}): upgrade pneumo_tf")
    return card


def of_folder(folder: str) -> dict:
    """The card of a model or ensemble folder: its file, or one built from what the folder says."""
    if os.path.isfile(_card_path(folder)):
        return read_file(_card_path(folder))
    if reading_lib.is_ensemble(folder):  # evaluated before ensembles had cards
        return ensemble_card(reading_lib.load(folder), folder)
    return unknown_card(exported.read_info(folder))


def of_reading(reading) -> dict:
    """The card of a reading (pneumo_tf.models.reading.Reading): its model's, its ensemble folder's, or (a
    fused reading given ad hoc) one built from its members."""
    if reading.ensemble_dir is not None:
        if os.path.isfile(_card_path(reading.ensemble_dir)):
            return read_file(_card_path(reading.ensemble_dir))
        return ensemble_card(reading, reading.ensemble_dir)
    if reading.is_plain:
        return of_folder(reading.model_dirs[0])
    return ensemble_card(reading)


def write(folder: str, card: dict) -> str:
    """Writes `folder`/model_card.json whole (write-then-rename); returns its path."""
    path = _card_path(folder)
    fileio.write_json_atomic(path, card)
    return path


@contextlib.contextmanager
def _locked(folder: str):
    """Holds an exclusive lock on the folder: two evaluations appending at once both keep their entries."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def evaluation_entry(summary: dict, records_dir: str) -> dict:
    """An evaluation's figures as a card keeps them (`summary`: pneumo_tf.evaluation.report's)."""
    facts = records_facts(records_dir)
    return {
        "date": now(), "split": summary["split"], "records_dir": facts["records_dir"],
        "manifest_sha256": facts["manifest_sha256"], "synthetic": facts["synthetic"],
        "images": summary["images"], "positives": summary["positives"],
        **{key: summary[key] for key in ("map", "auc", "f1", "threshold", "threshold_metric")},
        "threshold_split": summary["split"], "threshold_saved": summary["threshold_saved"],
        "reading": summary["model"],
    }


def record_evaluation(folder: str, reading, entry: dict) -> str:
    """Appends `entry` to the card of `folder`, where `reading` lives (a model folder, or an
    ensemble folder); returns the card's path.

    Never rewrites what is there: the entry is appended to the card read under a lock, and the card is
    replaced whole, so an interrupted evaluation leaves the card as it was. An ensemble folder whose card
    records other members or another way of reading them (the folder was written anew) starts a new card.
    """
    with _locked(folder):
        if reading.is_plain and reading.ensemble_dir is None:
            card = of_folder(folder)
        else:
            card = ensemble_card(reading, folder)
            if os.path.isfile(_card_path(folder)):
                saved = read_file(_card_path(folder))
                if (saved.get("members"), saved.get("reading")) == (card["members"], card["reading"]):
                    card = saved
        card["evaluations"] = [*card.get("evaluations", []), entry]
        return write(folder, card)


def beside(output: str) -> str:
    """Where a result file's card goes: submission.csv -> submission.model.json."""
    return os.path.splitext(output)[0] + ".model.json"


def write_beside(output: str, card: dict, prediction: dict) -> str:
    """Writes `card` with `prediction` (what was predicted with it) beside the result file `output`."""
    path = beside(output)
    fileio.write_json_atomic(path, {**card, "prediction": {"date": now(), "submission": os.path.basename(output),
                                                           **prediction}})
    return path


# ------------------------------------------------------------------------------------------------
# What people read: the short card, its warnings and the whole card as text.


def _train_images(card: dict) -> int | None:
    data = card.get("data")
    return None if data is None else data["splits"].get("train", {}).get("records", 0)


def trained_on(card: dict) -> str:
    """What a model was trained on, in words ("1,600 synthetic images (pneumo_tf's generator, easy, seed 0)")."""
    if card["kind"] == "ensemble":
        return "; ".join(f"member {index} ({member['card']['name']}): {trained_on(member['card'])}"
                         for index, member in enumerate(card["members"], start=1))
    data = card.get("data")
    if data is None:
        return "unknown (exported without a model card)"
    count = f"{_train_images(card):,}"
    formats = ", ".join(name.upper() for name, records in data["formats"].items() if records)
    if data["synthetic"]:
        settings = data["synthetic"].get("settings", {})
        details = ", ".join(f"{key} {settings[key]}" for key in ("difficulty", "seed") if key in settings)
        return f"{count} synthetic images (pneumo_tf's generator{', ' + details if details else ''})"
    if data["synthetic"] is None:
        return f"{count} images ({formats}) of unknown origin (converted before records said whether synthetic)"
    return f"{count} real images ({formats})"


def warnings(card: dict) -> list[str]:
    """Plain warnings for people reading the model's results: synthetic, too few or unknown training images."""
    if card["kind"] == "ensemble":
        return [f"Member {index} ({member['card']['name']}): {warning}"
                for index, member in enumerate(card["members"], start=1) for warning in warnings(member["card"])]
    data = card.get("data")
    if data is None:
        return ["Where this model's training images came from is unknown (it was exported without a model card)."]
    count = _train_images(card)
    if data["synthetic"]:
        return [f"Trained on {count:,} synthetic pictures, not radiographs: its readings of real chest X-rays mean "
                "nothing."]
    if data["synthetic"] is None:
        return [f"Not known whether its {count:,} training images were real radiographs."]
    if count < MIN_REAL_TRAIN_IMAGES:
        return [f"Trained on only {count:,} real radiographs (fewer than {MIN_REAL_TRAIN_IMAGES:,}): too few for "
                "its readings to be trusted."]
    return []


def at_export(card: dict) -> dict | None:
    """The validation at export as a measurement, like an evaluation's (with its date and records)."""
    validation = card.get("validation")
    if validation is None:
        return None
    data = card.get("data") or {}
    return {**validation, "date": card.get("created"), "records_dir": data.get("records_dir"),
            "synthetic": data.get("synthetic")}


def latest_measurement(card: dict) -> dict | None:
    """The most recent mAP measured: the last evaluation's, else the validation's at export."""
    return card["evaluations"][-1] if card.get("evaluations") else at_export(card)


def _kind_of_images(synthetic) -> str:
    """"synthetic " or "real " for a manifest's "synthetic" value; "" when unknown (None)."""
    if synthetic is None:
        return ""
    return "synthetic " if synthetic else "real "


def measured_on(measurement: dict | None) -> str:
    """A measurement in words: "val mAP 0.912, AUC 0.990 on 400 synthetic images (threshold 0.3, chosen on
    that split), 2026-12-06"."""
    if measurement is None:
        return "not measured"
    score = "undefined" if measurement["map"] is None else f"{measurement['map']:.3f}"
    if measurement.get("auc") is not None:
        score += f", AUC {measurement['auc']:.3f}"
    images = measurement.get("images")
    where = "" if images is None else f" on {images:,} {_kind_of_images(measurement.get('synthetic'))}images"
    threshold = "" if measurement.get("threshold") is None else (
        f" (threshold {measurement['threshold']:g}, chosen on that split)")
    date = f", {measurement['date'][:10]}" if measurement.get("date") else ""
    return f"{measurement['split']} mAP {score}{where}{threshold}{date}"


def short(card: dict) -> dict:
    """The card as the web page and the JSON API show it beside a result."""
    measurement = latest_measurement(card)
    return {
        "name": card["name"],
        "card_sha256": digest(card),
        "trained_on": trained_on(card),
        "measured": measured_on(measurement),
        "map": None if measurement is None else measurement["map"],
        "map_split": None if measurement is None else measurement["split"],
        "warnings": warnings(card),
    }


def _options(options: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(options.items())) or "defaults"


def _lines(card: dict, indent: str = "") -> list[str]:
    def line(label: str, text: str) -> str:
        return f"{indent}{label:<12} {text}"

    lines = [line("card", f"{card['kind']} {card['name']}, sha256 {digest(card)}"),
             line("created", card.get("created") or UNKNOWN)]
    if card["kind"] == "ensemble":
        reading = card["reading"]
        aligned = reading.get("score_alignment", "none") == "threshold"
        lines.append(line("reading", f"tta {reading['tta']}, fusion {reading['fusion']} at IoU "
                                     f"{reading['fusion_iou']:g}" + (", scores aligned" if aligned else "")))
        for index, member in enumerate(card["members"], start=1):
            anchor = f", its threshold {member['anchor']:g} read as 0.5" if member.get("anchor") is not None else ""
            lines.append(line(f"member {index}", f"{member['model_dir']}, weight {member['weight']:g}{anchor}"))
            lines += _lines(member["card"], indent + "    ")
    else:
        model = card["model"]
        preset = f", preset {model['preset']}" if model.get("preset") else ""
        parameters = f", {model['parameters']:,} parameters" if model.get("parameters") else ""
        lines.append(line("model", f"{model['architecture']}{preset}, {model['image_size']} px{parameters}; "
                                   f"options {_options(model['options'])}"))
        recipe = card.get("recipe")
        if recipe is None:
            lines.append(line("recipe", UNKNOWN))
        else:
            for flagfile in recipe["flagfiles"]:
                lines.append(line("flagfile", f"{flagfile['path']} (sha256 {flagfile['sha256'][:16]})"))
            lines.append(line("command", recipe["command"] or "none (trained from Python)"))
            lines.append(line("flags", " ".join(recipe["flags"])))
        lines.append(line("trained on", trained_on(card)))
        data = card.get("data")
        if data is not None:
            splits = ", ".join(f"{split} {entry['records']:,} ({entry['positive']:,} positive)"
                               for split, entry in data["splits"].items())
            lines.append(line("records", f"{data['records_dir']} (manifest sha256 {data['manifest_sha256'][:16]}): "
                                         f"{splits}"))
        training = card.get("training")
        if training is None:
            lines.append(line("training", UNKNOWN))
        else:
            steps = f"{training['steps_run']:,} steps" if training.get("steps_run") is not None else "steps unknown"
            asked = f" of {training['epochs']}" if training.get("epochs") else ""
            lines.append(line("training", f"{training['epochs_run']}{asked} epochs, {steps}; exported epoch "
                                          f"{training['exported_epoch']}"))
        lines.append(line("at export", measured_on(at_export(card)) if card.get("validation") else UNKNOWN))
    versions = card.get("versions")
    lines.append(line("versions", UNKNOWN if versions is None else
                      ", ".join(f"{name} {version}" for name, version in versions.items() if version)))
    for entry in card.get("evaluations", []):
        saved = ", saved" if entry.get("threshold_saved") else ""
        lines.append(line("evaluated", f"{measured_on(entry)}{saved}; records {entry['records_dir']}"))
    return lines


def to_text(card: dict) -> str:
    """The whole card for a terminal, then its warnings."""
    lines = _lines(card)
    lines += [f"WARNING: {warning}" for warning in warnings(card)]
    if "prediction" in card:
        lines.append(f"{'predicted':<12} {json.dumps(card['prediction'], sort_keys=True)}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DescribeConfig:
    model_dir: str = option(help="A model folder, an ensemble folder, or a card file (such as the "
                            "submission.model.json predict writes).")
    as_json: bool = option(False, "Print the card as JSON instead of text.", flag="json")


def describe(config: DescribeConfig) -> str:
    """The card of `config.model_dir`, as text or JSON."""
    if os.path.isfile(config.model_dir):
        card = read_file(config.model_dir)
    else:
        if not os.path.isdir(config.model_dir):
            raise UserError(f"model folder not found: {config.model_dir}")
        card = of_folder(config.model_dir)
    return json.dumps(card, indent=2, sort_keys=True) if config.as_json else to_text(card)
