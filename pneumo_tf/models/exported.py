"""The exported model folder: what training writes, and evaluation, prediction and serving read.

    model_dir/
      model.keras     the network (Keras format; loaded here with its architecture's code)
      saved_model/    the architecture's whole inference (images -> outputs) as a TensorFlow
                      SavedModel with one signature, "serve", for TF Serving and other runtimes
      model_card.json the model card: provenance, recipe, training records, metrics at export and
                      evaluations since (pneumo_tf.models.card); written before pneumo_tf.json
      pneumo_tf.json  the info: architecture name, preset and every option as resolved (exports
                      made before options had types: the options given), image size, how the training
                      records were converted, decision threshold, training history; written
                      last, so a folder with it is complete

Nothing here imports training: serving a model needs only this module and the architecture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import zipfile

import keras
import tensorflow as tf

from pneumo_tf import fileio, models
from pneumo_tf.data import metadata
from pneumo_tf.errors import UserError
from pneumo_tf.fileio import write_json_atomic
from pneumo_tf.models.architecture import Architecture
from pneumo_tf.records.radiograph import ConvertOptions

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
INFO_FILE = "pneumo_tf.json"
CARD_FILE = "model_card.json"
SERVING_ENDPOINT = "serve"


def write(network: keras.Model, architecture: Architecture, model_dir: str, info: dict,
          card: dict | None = None) -> None:
    """Writes model.keras, saved_model/, model_card.json (when given) and pneumo_tf.json (last, so its
    presence means complete).

    `info` needs at least "model" (the architecture's name) and "image_size".
    """
    os.makedirs(model_dir, exist_ok=True)
    # Until the new info is written, no info: a crash part-way must not pair the old
    # pneumo_tf.json (image size, threshold) or model card with a new network.
    for stale in (INFO_FILE, CARD_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(model_dir, stale))
    path = os.path.join(model_dir, MODEL_FILE)
    network.save(f"{path}.tmp.keras")
    os.replace(f"{path}.tmp.keras", path)

    saved = os.path.join(model_dir, SAVED_MODEL_DIR)
    shutil.rmtree(f"{saved}.tmp", ignore_errors=True)  # left by a crashed export
    size = int(info["image_size"])
    fields = tuple(info.get("metadata", ()))
    archive = keras.export.ExportArchive()
    archive.track(network)
    images = tf.TensorSpec([None, size, size, 1], tf.float32, name="images")
    if fields:  # the header's raw facts, encoded in the graph as training encoded them
        raw = [tf.TensorSpec([None], tf.string, name="view"), tf.TensorSpec([None], tf.string, name="sex"),
               tf.TensorSpec([None], tf.int32, name="age")]
        archive.add_endpoint(
            SERVING_ENDPOINT, lambda images, view, sex, age: architecture.infer(
                network, metadata.model_inputs(images, fields, {"view": view, "sex": sex, "age": age})),
            input_signature=[images, *raw])
    else:
        archive.add_endpoint(SERVING_ENDPOINT, lambda images: architecture.infer(network, {"image": images}),
                             input_signature=[images])
    archive.write_out(f"{saved}.tmp", verbose=False)
    if os.path.isdir(saved):
        shutil.rmtree(saved)
    os.replace(f"{saved}.tmp", saved)
    if card is not None:
        write_json_atomic(os.path.join(model_dir, CARD_FILE), card)
    write_json_atomic(os.path.join(model_dir, INFO_FILE), info)


def update_info(model_dir: str, changes: dict) -> dict:
    """Rewrites pneumo_tf.json with `changes` merged in (atomically); returns the new info."""
    info = {**read_info(model_dir), **changes}
    write_json_atomic(os.path.join(model_dir, INFO_FILE), info)
    return info


def read_info(model_dir: str) -> dict:
    """pneumo_tf.json, with a clear error for a folder that holds no exported model or a damaged one."""
    info_path = os.path.join(model_dir, INFO_FILE)
    if not os.path.isdir(model_dir):
        raise UserError(f"model folder not found: {model_dir}")
    if not os.path.isfile(info_path):
        raise UserError(f"{model_dir} holds no exported pneumo_tf model (no {INFO_FILE}): train one first")
    info = fileio.read_json(info_path)
    if not isinstance(info, dict):
        raise UserError(f"{info_path} is not a pneumo_tf model's info (a JSON object): re-export the model")
    for key in ("model", "image_size"):
        if key not in info:
            raise UserError(f"{info_path} lacks {key!r}: re-export the model (train it again) or restore the folder")
    return info


@dataclasses.dataclass
class ExportedModel:
    """A loaded model folder: the network, its architecture and its info."""

    model_dir: str
    network: keras.Model
    architecture: Architecture
    info: dict

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def threshold(self) -> float:
        """The decision threshold evaluation saved (0.5 until it has)."""
        return float(self.info["threshold"])

    @property
    def threshold_chosen(self) -> bool:
        """Whether evaluation has saved a threshold (python -m pneumo_tf.evaluate records the split it chose it on)."""
        return "threshold_split" in self.info

    def conversion_options(self, image_size: int | None = None) -> ConvertOptions:
        """How to convert source files for this model: as its training records were (pneumo_tf.json
        "conversion"), so its inputs get their pixels exactly, unless `image_size` says otherwise."""
        conversion = self.info.get("conversion", {})
        return ConvertOptions(
            image_size=conversion.get("image_size", 0) if image_size is None else image_size,
            bit_depth=conversion.get("bit_depth", 8),
        )

    @property
    def metadata(self) -> tuple[str, ...]:
        """The header's facts the network takes beside the image (pneumo_tf.data.metadata); () for none."""
        return tuple(self.info.get("metadata", ()))

    def inputs(self, images, raw: dict | None = None) -> dict:
        """The network's inputs for images float32 [B, S, S, 1] and a batch's raw view, sex and age (None:
        unknown), in-graph."""
        return metadata.model_inputs(images, self.metadata, raw)

    @functools.cached_property
    def _traced(self):
        return tf.function(lambda images, raw: self.architecture.infer(self.network, self.inputs(images, raw)),
                           reduce_retracing=True)

    def infer(self, images, raw: dict | None = None) -> dict:
        """images float32 [B, S, S, 1] (and the batch's raw view, sex, age) -> the architecture's outputs
        (tensors), traced once per batch shape."""
        return self._traced(images, raw if raw is not None else metadata.unknown(tf.shape(images)[0]))


def load(model_dir: str) -> ExportedModel:
    """The exported model in `model_dir` (see the module docstring)."""
    info = read_info(model_dir)
    architecture = models.get(info["model"])  # imports the module that registers its layers
    path = os.path.join(model_dir, MODEL_FILE)
    if not zipfile.is_zipfile(path):  # Keras would say "file not found" of a cut-short archive
        state = "not a Keras archive (cut short or overwritten)" if os.path.exists(path) else "missing"
        raise UserError(f"{path} is {state}: re-export the model (train it again) or restore the folder")
    try:
        network = keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - a damaged archive fails in many ways; all mean "cannot load"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(f"{path} cannot be loaded ({type(error).__name__}: {reason}): re-export the model "
                        "or restore the folder") from error
    return ExportedModel(model_dir, network, architecture, info)
