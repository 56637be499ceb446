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
