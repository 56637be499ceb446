"""Shared fixtures: tiny synthetic RSNA folders and the real challenge files from ../shared."""
import contextlib
import json
import os
import pathlib
import shutil
import threading

import pytest

from pneumo_tf.records import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_RSNA = REPO.parent / "shared" / "data" / "rsna"


@pytest.fixture(scope="session")
def shared_rsna() -> pathlib.Path:
    """The real RSNA files (10 DICOMs, full CSVs); absent in a user's fresh clone."""
    if not (SHARED_RSNA / "dicom").is_dir():
        pytest.skip(f"real RSNA files not found at {SHARED_RSNA} (they live in ../shared beside the repo)")
    return SHARED_RSNA


@pytest.fixture(scope="session")
def synthetic_rsna(tmp_path_factory) -> dict:
    """24 labeled + 3 test synthetic 1024-px DICOMs in the RSNA layout, made once per session."""
    folder = tmp_path_factory.mktemp("synthetic_rsna")
    return synthetic.write_dataset(str(folder), synthetic.SyntheticConfig(24, 3, seed=7), workers=1)


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_records(synthetic_rsna, tmp_path_factory) -> str:
    """The synthetic folder converted at 64 px: 24 labeled records in train and val, 3 in test."""
    from pneumo_tf.records import radiograph, shards

    output = tmp_path_factory.mktemp("tiny_records") / "records"
    shards.convert(
        synthetic_rsna["train_dir"], str(output), synthetic_rsna["train_labels"],
        synthetic_rsna["detailed_class_info"], synthetic_rsna["test_dir"],
        radiograph.ConvertOptions(image_size=64, num_shards=2), shards.LocalPool(1),
    )
    return str(output)


@pytest.fixture(scope="session")
def tiny_trained_model(tiny_records, tmp_path_factory) -> str:
    """A tiny mask_resnet trained for two steps on `tiny_records`; use `trained_model` to change it."""
    from pneumo_tf.training import loop

    model_dir = str(tmp_path_factory.mktemp("tiny_trained") / "model")
    loop.train_and_evaluate(loop.TrainConfig(
        records_dir=tiny_records, model_dir=model_dir, model="mask_resnet",
        model_options={"channels": 4, "n_blocks": 1, "depth": 2}, image_size=64, batch_size=4, epochs=1,
        steps_per_epoch=2,
    ))
    return model_dir


@pytest.fixture(scope="session")
def real_trained_model(shared_rsna, tmp_path_factory) -> str:
    """A tiny mask_resnet trained for two steps on the 10 real DICOMs (converted at 64 px with their labels)."""
    from pneumo_tf.records import radiograph, shards
    from pneumo_tf.training import loop

    root = tmp_path_factory.mktemp("real_trained")
    shards.convert(str(shared_rsna / "dicom"), str(root / "records"), str(shared_rsna / "stage_2_train_labels.csv"),
                   str(shared_rsna / "stage_2_detailed_class_info.csv"),
                   options=radiograph.ConvertOptions(image_size=64), writer=shards.LocalPool(1))
    loop.train_and_evaluate(loop.TrainConfig(
        records_dir=str(root / "records"), model_dir=str(root / "model"), model="mask_resnet",
        model_options={"channels": 4, "n_blocks": 1, "depth": 2}, image_size=64, batch_size=4, epochs=1,
        steps_per_epoch=2,
    ))
    return str(root / "model")


@pytest.fixture(scope="module")
def trained_model(tiny_trained_model, tmp_path_factory) -> str:
    """A test module's own copy of the tiny trained model (evaluation rewrites its threshold)."""
    copy = tmp_path_factory.mktemp("trained_model") / "model"
    shutil.copytree(tiny_trained_model, copy)
    return str(copy)


@pytest.fixture
def running():
    """`with running(wsgi_app, **settings) as base_url:` serves the app for the block with the server
    python -m pneumo_tf.serve runs (web.make_server, ServeConfig `settings`), at 127.0.0.1 on a free port."""
    from pneumo_tf.inference import web

    @contextlib.contextmanager
    def serve(wsgi_app, **settings):
        server = web.make_server(wsgi_app, web.ServeConfig(model_dir="", port=0, **settings))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.effective_port}"
        finally:
            server.close()
            thread.join(timeout=30)

    return serve


@pytest.fixture
def foreign_records(tmp_path) -> str:
    """A folder whose manifest.json is of another format version than this package reads."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 999, "splits": {}}))
    return str(folder)


@pytest.fixture(scope="session")
def box_pictures(tmp_path_factory) -> dict:
    """Records whose pictures are their label boxes, and a model whose mask is its input.

    Each box is drawn resized by up to 25% and at its own brightness, and some negatives
    show a decoy box, so detections at different thresholds differ and mAP varies between
    0 and 1: the trained tiny model alone would score 0 everywhere. Pictures are 256 px,
    so a box in the wrong (1024-px) space would be caught.
    """
    import keras
    import numpy as np

    from pneumo_tf import models
    from pneumo_tf.fileio import write_csv_atomic
    from pneumo_tf.models import exported
    from pneumo_tf.records import radiograph, shards

    root = tmp_path_factory.mktemp("box_pictures")
    dicom_dir = root / "dicom"
    dicom_dir.mkdir()
    rng = np.random.default_rng(3)
    size = 256
    rows = []
    for index in range(16):
        patient_id = f"patient{index:02d}"
        truth = synthetic.sample_boxes(rng, size) if index % 2 else []
        drawn = truth or ([] if index % 4 == 0 else synthetic.sample_boxes(rng, size)[:1])
        pixels = np.zeros((size, size), np.uint8)
        for x, y, width, height in drawn:
            grow_x, grow_y = (int(extent * rng.uniform(-0.125, 0.125)) for extent in (width, height))
            pixels[max(y - grow_y, 0): y + height + grow_y, max(x - grow_x, 0): x + width + grow_x] = \
                int(rng.uniform(0.15, 1.0) * 255)
        synthetic.encode_dicom(pixels, patient_id, "PA", 40, "F").save_as(
            dicom_dir / f"{patient_id}.dcm", enforce_file_format=True
        )
        rows += [[patient_id, x, y, w, h, 1] for x, y, w, h in truth] or [[patient_id, "", "", "", "", 0]]
    labels_csv = str(root / "labels.csv")
    write_csv_atomic(labels_csv, ["patientId", "x", "y", "width", "height", "Target"], rows)
    records = str(root / "records")
    shards.convert(str(dicom_dir), records, labels_csv,
                    options=radiograph.ConvertOptions(image_size=64, val_fraction=0.5),
                   writer=shards.LocalPool(1))
    image = keras.Input((64, 64, 1), name="image")
    network = keras.Model({"image": image}, {"mask": keras.layers.Identity(name="mask")(image)})
    model_dir = str(root / "model")
    # Read as the mask network is: boxes are the components of the thresholded mask.
    exported.write(network, models.get("mask_resnet"), model_dir, {"model": "mask_resnet", "image_size": 64,
                                                                    "threshold": 0.5})
    return {"records": records, "labels_csv": labels_csv, "model_dir": model_dir}
