"""The DICOM node (inference/storage_scp.py): DCMTK's storescu sends the real DICOMs, DCMTK's storescp
receives the results; concurrent associations, the association limit, and refusals with their DIMSE status."""
import os
import subprocess
import sys
import threading
import time

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import BasicTextSRStorage, SecondaryCaptureImageStorage

from dicom_tools import dciodvfy_errors, storescp, storescu  # tests/dicom_tools.py
from pneumo_tf.inference import storage_scp
from pneumo_tf.models import exported

KINDS = ("SR", "PR", "SEG")


@pytest.fixture(scope="module")
def mask_model(box_pictures, tmp_path_factory) -> str:
    import shutil

    folder = shutil.copytree(box_pictures["model_dir"], tmp_path_factory.mktemp("node_model") / "model")
    exported.update_info(str(folder), {"threshold": 0.75})
    return str(folder)


@pytest.fixture(scope="module")
def upload_reading(mask_model):
    from pneumo_tf.inference import web

    return web.UploadReading(mask_model)


def wait_until(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def run_node(upload_reading, **options):
    config = storage_scp.NodeConfig(model_dir=upload_reading.reading.model_dirs[0], port=0, **options)
    node = storage_scp.DicomNode(config, upload_reading)
    node.start()
    return node


def test_ten_real_dicoms_round_trip_to_storescp(upload_reading, shared_rsna, tmp_path):
    paths = sorted((shared_rsna / "dicom").glob("*.dcm"))
    with storescp(tmp_path / "received") as port:
        node = run_node(upload_reading, destination=f"RECEIVER@127.0.0.1:{port}", output_dir=str(tmp_path / "out"))
        try:
            started = time.perf_counter()
            sent = storescu(node.port, *paths)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: node.counts["sent"] == 30)
            print(f"10 real DICOMs storescu -> node -> storescp: {time.perf_counter() - started:.2f} s")
        finally:
            node.stop()
    assert node.counts == {"received": 10, "refused": 0, "results": 10, "sent": 30, "send_failures": 0}
    received = [pydicom.dcmread(tmp_path / "received" / name) for name in sorted(os.listdir(tmp_path / "received"))]
    sources = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in paths}
    kinds = {}
    for dataset in received:
        kinds[dataset.Modality] = kinds.get(dataset.Modality, 0) + 1
    assert kinds == {"SR": 10, "PR": 10, "SEG": 10}
    for dataset in received:
        referenced = dataset.ReferencedSeriesSequence[0] if "ReferencedSeriesSequence" in dataset else \
            dataset.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        items = referenced.get("ReferencedImageSequence") or referenced.get("ReferencedInstanceSequence") or \
            referenced.ReferencedSOPSequence
        assert items[0].ReferencedSOPInstanceUID in sources
    # What arrived is what the node wrote to its folder, byte for byte valid.
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"{uid}.{kind}.dcm" for uid in sources for kind in KINDS)
    for name in sorted(os.listdir(tmp_path / "received"))[:3]:
        assert dciodvfy_errors(tmp_path / "received" / name) == []


def test_ten_concurrent_associations(upload_reading, shared_rsna, tmp_path):
    paths = sorted((shared_rsna / "dicom").glob("*.dcm"))
    node = run_node(upload_reading, output_dir=str(tmp_path / "out"), max_associations=10)
    try:
        results = [None] * len(paths)
        start = threading.Barrier(len(paths))

        def send(index):
            start.wait()
            results[index] = storescu(node.port, paths[index])

        threads = [threading.Thread(target=send, args=(index,)) for index in range(len(paths))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        node.stop()
    assert [result.returncode for result in results] == [0] * 10, [result.stderr for result in results]
    assert node.counts["results"] == 10 and len(os.listdir(tmp_path / "out")) == 30


def test_associations_past_the_limit_are_rejected_and_the_node_keeps_serving(upload_reading, shared_rsna, tmp_path):
    path = sorted((shared_rsna / "dicom").glob("*.dcm"))[0]
    node = run_node(upload_reading, output_dir=str(tmp_path / "out"), max_associations=2)
    held = []
    try:
        client = AE()
        client.add_requested_context(SecondaryCaptureImageStorage)
        held = [client.associate("127.0.0.1", node.port, ae_title="PNEUMO_TF") for _ in range(2)]
        assert all(association.is_established for association in held)
        refused = storescu(node.port, path)
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr
        for association in held:
            association.release()
        wait_until(lambda: len(node.ae.active_associations) == 0, 30)
        assert storescu(node.port, path).returncode == 0
    finally:
        for association in held:
            if association.is_established:
                association.abort()
        node.stop()
    assert node.counts["results"] == 1


def dataset_of(path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def image_bomb(real: pydicom.Dataset) -> pydicom.Dataset:
    """A real file's header claiming 30,000 x 30,000 16-bit pixels (1.7 GB decoded) over a few bytes."""
    bomb = pydicom.Dataset()
    bomb.update(real)
    bomb.file_meta = real.file_meta
    bomb.SOPInstanceUID = generate_uid()
    bomb.Rows = bomb.Columns = 30000
    bomb.BitsAllocated, bomb.BitsStored, bomb.HighBit = 16, 16, 15
    return bomb


def undecodable(real: pydicom.Dataset) -> pydicom.Dataset:
    """A real file with a foreign marker inside its JPEG frame's compressed data."""
    broken = pydicom.Dataset()
    broken.update(real)
    broken.file_meta = real.file_meta
    broken.SOPInstanceUID = generate_uid()
    frame = next(pydicom.encaps.generate_frames(real.PixelData, number_of_frames=1))
    middle = len(frame) // 2
    broken.PixelData = pydicom.encaps.encapsulate([frame[:middle] + b"\xff\x27" + frame[middle + 2:]])
    return broken


def text_report() -> pydicom.Dataset:
    report = pydicom.Dataset()
    report.SOPClassUID, report.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    report.Modality, report.PatientID = "SR", "x"
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return report


def test_bad_input_is_refused_with_its_dimse_status_and_the_node_keeps_serving(upload_reading, shared_rsna, tmp_path):
    real = dataset_of(sorted((shared_rsna / "dicom").glob("*.dcm"))[0])
    node = run_node(upload_reading, output_dir=str(tmp_path / "out"))
    client = AE()
    client.add_requested_context(SecondaryCaptureImageStorage, [real.file_meta.TransferSyntaxUID])
    client.add_requested_context(BasicTextSRStorage, [ExplicitVRLittleEndian])
    try:
        association = client.associate("127.0.0.1", node.port, ae_title="PNEUMO_TF")
        assert association.is_established
        statuses = {}
        for name, dataset in (("text report", text_report()), ("image bomb", image_bomb(real)),
                              ("undecodable", undecodable(real)), ("real", real)):
            response = association.send_c_store(dataset)
            statuses[name] = (response.Status, response.get("ErrorComment", ""))
        association.release()
    finally:
        node.stop()
    assert statuses["text report"] == (0x0122, "not a radiograph: Basic Text SR Storage")
    assert statuses["image bomb"][0] == 0xA700 and statuses["image bomb"][1].startswith("image too large: 30000 x")
    assert statuses["undecodable"][0] == 0xC000 and "JPEG" in statuses["undecodable"][1]
    assert statuses["real"] == (0x0000, "")
    assert node.counts == {"received": 4, "refused": 3, "results": 1, "sent": 0, "send_failures": 0}


def test_an_object_over_the_size_limit_aborts_its_association(upload_reading, shared_rsna, tmp_path):
    path = sorted((shared_rsna / "dicom").glob("*.dcm"))[0]  # 140 KB
    node = run_node(upload_reading, output_dir=str(tmp_path / "out"), max_object_mb=0.05)
    try:
        refused = storescu(node.port, path)
        assert refused.returncode != 0
        assert node.counts["results"] == 0 and node.counts["refused"] == 1
    finally:
        node.stop()
    small = run_node(upload_reading, output_dir=str(tmp_path / "out2"), max_object_mb=1.0)
    try:
        assert storescu(small.port, path).returncode == 0
    finally:
        small.stop()


def test_cli_needs_somewhere_to_send_results(mask_model):
    result = subprocess.run([sys.executable, "-m", "pneumo_tf.dicom_node", f"--model_dir={mask_model}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: give --destination (AE@HOST:PORT), --output_dir, or "
                                                      "both: results need somewhere to go")
