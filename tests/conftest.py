"""Shared fixtures: tiny synthetic RSNA folders and the real challenge files from ../shared."""
import os
import pathlib

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
    return synthetic.write_dataset(str(folder), num_images=24, num_test_images=3, seed=7, workers=1)


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_records(synthetic_rsna, tmp_path_factory) -> str:
    """The synthetic folder converted at 64 px: 24 labeled records in train and val, 3 in test."""
    from pneumo_tf.records import convert

    output = tmp_path_factory.mktemp("tiny_records") / "records"
    convert.convert(
        synthetic_rsna["train_dir"], str(output), synthetic_rsna["train_labels"],
        synthetic_rsna["detailed_class_info"], synthetic_rsna["test_dir"],
        convert.ConvertOptions(image_size=64, num_shards=2), workers=1,
    )
    return str(output)
