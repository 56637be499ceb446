"""DICOM results (inference/dicom_results.py) of the 10 real RSNA DICOMs: valid for dciodvfy, read back by
highdicom and pydicom with the predicted boxes and masks and the source's UIDs; PNG/JPEG inputs get none;
a presentation state applied to a real DICOM, rendered; the web page's download."""
import importlib.metadata
import io
import os
import shutil
import subprocess
import zipfile

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw

from dicom_tools import dciodvfy_errors, dcmtk  # tests/dicom_tools.py
from pneumo_tf.evaluation import submission
from pneumo_tf.inference import dicom_results, offline, web
from pneumo_tf.models import card as model_card, exported

KINDS = ("SR", "PR", "SEG")


@pytest.fixture(scope="module")
def mask_model(box_pictures, tmp_path_factory) -> str:
    """A mask_resnet whose mask is its image (conftest's box_pictures), at a threshold where real radiographs
    give a few boxes."""
    folder = shutil.copytree(box_pictures["model_dir"], tmp_path_factory.mktemp("mask_model") / "model")
    exported.update_info(str(folder), {"threshold": 0.75})
    return str(folder)


@pytest.fixture(scope="module")
def predicted(mask_model, shared_rsna, tmp_path_factory) -> dict:
    """predict --dicom_results_dir over the real DICOMs: the summary, the submission and the results folder."""
    root = tmp_path_factory.mktemp("predicted")
    config = offline.PredictConfig(model_dir=mask_model, output=str(root / "submission.csv"),
                                   dicom_dir=str(shared_rsna / "dicom"), dicom_results_dir=str(root / "results"),
                                   workers=1)
    summary = offline.predict(config, progress_stream=io.StringIO())
    return {"summary": summary, "submission": submission.read_submission(config.output),
            "results": root / "results", "dicom_dir": shared_rsna / "dicom"}


def test_every_real_dicom_gets_an_sr_a_presentation_state_and_a_segmentation(predicted):
    sources = sorted(path.stem for path in predicted["dicom_dir"].glob("*.dcm"))
    assert sorted(os.listdir(predicted["results"])) == sorted(f"{stem}.{kind}.dcm" for stem in sources
                                                              for kind in KINDS)
    assert predicted["summary"]["dicom_results"]["images"] == 10
    assert predicted["summary"]["dicom_results"]["without_dicom_context"] == 0
    assert sum(len(scores) for _, scores in predicted["submission"].values()) > 0, "no box to check"


@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_finds_no_error_in_any_object(predicted, kind):
    for path in sorted(predicted["results"].glob(f"*.{kind}.dcm")):
        assert dciodvfy_errors(path) == [], path.name


def test_the_real_sources_themselves_fail_dciodvfy_on_age_and_pixel_spacing(predicted):
    errors = dciodvfy_errors(next(predicted["dicom_dir"].glob("*.dcm")))
    assert any("Patient's Age" in line for line in errors) and any("Pixel Spacing" in line for line in errors)


def read_objects(predicted, stem):
    return {kind: pydicom.dcmread(predicted["results"] / f"{stem}.{kind}.dcm") for kind in KINDS}


def test_objects_refer_to_their_source_and_copy_its_patient_and_study(predicted):
    uids = set()
    for path in sorted(predicted["dicom_dir"].glob("*.dcm")):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        objects = read_objects(predicted, path.stem)
        for kind, dataset in objects.items():
            for keyword in ("PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime"):
                assert dataset.get(keyword) == source.get(keyword), (kind, keyword)
            # RSNA's "51" is not an Age String: converted, not invented.
            assert dataset.PatientAge == f"{int(source.PatientAge):03d}Y"
            assert dataset.SeriesInstanceUID != source.SeriesInstanceUID
            for uid in (dataset.SOPInstanceUID, dataset.SeriesInstanceUID):
                assert pydicom.uid.UID(uid).is_valid and uid not in uids
                uids.add(uid)
        sr = hd.sr.ComprehensiveSR.from_dataset(objects["SR"])
        [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        [series] = evidence.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert [item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence] == [source.SOPInstanceUID]
        [pr_series] = objects["PR"].ReferencedSeriesSequence
        assert pr_series.SeriesInstanceUID == source.SeriesInstanceUID
        assert [item.ReferencedSOPInstanceUID for item in pr_series.ReferencedImageSequence] == [source.SOPInstanceUID]
        seg = objects["SEG"]  # pydicom: highdicom's reader wants a slice thickness a radiograph has not
        [seg_series] = seg.ReferencedSeriesSequence
        assert seg_series.SeriesInstanceUID == source.SeriesInstanceUID
        assert [item.ReferencedSOPInstanceUID for item in seg_series.ReferencedInstanceSequence] == [
            source.SOPInstanceUID]
        spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        # RSNA's 0.14300000000000002 is longer than a DS may be: the nearest that fits, 0.143.
        assert all(len(str(value)) <= 16 for value in spacing)
        np.testing.assert_allclose([float(v) for v in spacing], [float(v) for v in source.PixelSpacing], rtol=1e-12)
        if str(source.PixelSpacing[0]) == "0.14300000000000002":
            assert str(spacing[0]) == "0.143"


def rectangle(x, y, width, height):
    return [[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]]


def test_objects_hold_the_predicted_boxes_scores_and_masks(predicted):
    for path in sorted(predicted["dicom_dir"].glob("*.dcm")):
        boxes, scores = predicted["submission"][path.stem]  # rounded to 0.1 px and 1e-4
        objects = read_objects(predicted, path.stem)
        sr = hd.sr.ComprehensiveSR.from_dataset(objects["SR"])
        groups = sr.content.get_planar_roi_measurement_groups()
        assert len(groups) == len(scores)
        for group, box, score in zip(groups, boxes, scores):
            assert group.reference_type == hd.sr.CodedConcept.from_code(pydicom.sr.codedict.codes.DCM.ImageRegion)
            assert group.finding_type == dicom_results.ABNORMAL_OPACITY
            np.testing.assert_allclose(group.roi.value, rectangle(*box), atol=0.05 + 1e-6)
            [image] = group.roi.ContentSequence  # SELECTED FROM the source image
            assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(
                path, stop_before_pixels=True).SOPInstanceUID
            [measurement] = group.get_measurements()
            assert measurement.value == pytest.approx(score, abs=5e-5 + 1e-9)
        [image_group] = sr.content.get_image_measurement_groups()
        [evaluation] = image_group.get_qualitative_evaluations(name=dicom_results.ABNORMAL_OPACITY)
        assert evaluation.value == (dicom_results.PRESENT if len(scores) else dicom_results.ABSENT)
        # The presentation state draws the same rectangles, with their scores.
        annotations = objects["PR"].GraphicAnnotationSequence
        drawn = [item.GraphicData for annotation in annotations
                 for item in annotation.get("GraphicObjectSequence", [])]
        texts = [item.UnformattedTextValue for annotation in annotations for item in annotation.TextObjectSequence]
        np.testing.assert_allclose(np.reshape(drawn, (-1, 5, 2)),
                                   np.reshape([rectangle(*box) for box in boxes], (-1, 5, 2)), atol=0.05 + 1e-6)
        probability = float(image_group.get_measurements()[0].value)
        assert texts[0] == f"{'no ' * (not len(scores))}opacity, probability {probability:.2f} (threshold 0.75)"
        assert texts[1:] == [f"opacity {score:.2f}" for score in scores]
        # The mask network's boxes are its mask's components: each box is the bounding box of mask pixels.
        mask = objects["SEG"].pixel_array.astype(bool).reshape(1024, 1024)
        covered = np.zeros_like(mask)
        for x, y, width, height in np.round(boxes).astype(int):
            inside = mask[y:y + height, x:x + width]
            rows, columns = np.nonzero(inside)
            assert (rows.min(), columns.min(), rows.max() + 1, columns.max() + 1) == (0, 0, height, width)
            covered[y:y + height, x:x + width] = True
        assert not (mask & ~covered).any() and mask.any() == bool(len(scores))


def test_header_for_results_converts_or_leaves_out_invalid_values():
    source = pydicom.Dataset()
    source.PatientAge, source.PixelSpacing, source.SliceThickness = "63", ["0.14300000000000002", "0.2"], "1.5"
    source.PatientName, source.PixelData = "Doe^Jane", b"\0\0"
    header = dicom_results.header_for_results(source)
    assert header.PatientAge == "063Y" and [str(v) for v in header.PixelSpacing] == ["0.143", "0.2"]
    assert header.SliceThickness == 1.5 and header.PatientName == "Doe^Jane" and "PixelData" not in header
    for value, expected in (("045Y", "045Y"), ("7 m", "007M"), ("1200", None), ("about 60", None)):
        source.PatientAge = value
        assert dicom_results.header_for_results(source).get("PatientAge") == expected, value


def test_png_and_jpeg_inputs_get_no_dicom_results(mask_model, shared_rsna, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    dicom_path = sorted((shared_rsna / "dicom").glob("*.dcm"))[0]
    shutil.copy(dicom_path, folder)
    shutil.copy(sorted((shared_rsna / "jpg").glob("*.jpg"))[0], folder / "radiograph.jpg")
    config = offline.PredictConfig(model_dir=mask_model, output=str(tmp_path / "submission.csv"),
                                   dicom_dir=str(folder), dicom_results_dir=str(tmp_path / "results"), workers=1)
    summary = offline.predict(config, progress_stream=io.StringIO())
    assert summary["images"] == 2
    assert summary["dicom_results"] == {"images": 1, "without_dicom_context": 1, "folder": config.dicom_results_dir}
    assert sorted(os.listdir(tmp_path / "results")) == sorted(f"{dicom_path.stem}.{kind}.dcm" for kind in KINDS)


def test_findings_without_a_mask_get_no_segmentation(tmp_path, shared_rsna):
    """What a model without masks (a classifier, retinanet) gets: an SR and a presentation state saying no opacity."""
    source = pydicom.dcmread(sorted((shared_rsna / "dicom").glob("*.dcm"))[0], stop_before_pixels=True)
    findings = dicom_results.Findings(np.zeros((0, 4)), np.zeros(0), 0.1, 0.5)
    objects = dicom_results.result_objects(source, findings, dicom_results.Algorithm("pneumo_tf cnn", "0.1.0"))
    assert [dataset.Modality for dataset in objects] == ["SR", "PR"]
    [annotation] = objects[1].GraphicAnnotationSequence
    assert "GraphicObjectSequence" not in annotation
    assert [item.UnformattedTextValue for item in annotation.TextObjectSequence] == [
        "no opacity, probability 0.10 (threshold 0.5)"]
    for dataset in objects:
        path = tmp_path / f"{dataset.Modality}.dcm"
        path.write_bytes(dicom_results.encode(dataset))
        assert dciodvfy_errors(path) == []


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory):
    """Where test pictures are kept: $PNEUMO_TF_TEST_ARTEFACTS, else pytest's temporary folder."""
    folder = os.environ.get("PNEUMO_TF_TEST_ARTEFACTS") or str(tmp_path_factory.mktemp("artefacts"))
    os.makedirs(folder, exist_ok=True)
    return folder


def test_presentation_state_applied_to_a_real_dicom(predicted, artefacts, tmp_path):
    """DCMTK renders the real DICOM through its presentation state (dcmdjpeg, then dcmp2pgm -p); DCMTK draws no
    graphic annotations, so the state's rectangles, read back with pydicom, are drawn on DCMTK's rendering with
    Pillow and kept as <artefacts>/presentation_state.png. Box pixels are red exactly on the predicted boxes."""
    stem = max(predicted["submission"], key=lambda key: (len(predicted["submission"][key][1]), key))
    boxes, _ = predicted["submission"][stem]
    assert len(boxes), "the image with the most boxes has none"
    uncompressed = tmp_path / "source.dcm"
    subprocess.run([dcmtk("dcmdjpeg"), str(predicted["dicom_dir"] / f"{stem}.dcm"), str(uncompressed)], check=True,
                   timeout=120)
    rendered = tmp_path / "rendered.pgm"
    subprocess.run([dcmtk("dcmp2pgm"), "--pstate", str(predicted["results"] / f"{stem}.PR.dcm"), str(uncompressed),
                    str(rendered)], check=True, timeout=120, capture_output=True)
    with Image.open(rendered) as picture:
        grey = np.asarray(picture)
    # The state keeps the image as it is (no VOI, no shutter, no spatial change) and DCMTK reads it so.
    np.testing.assert_array_equal(grey, pydicom.dcmread(uncompressed).pixel_array)
    state = pydicom.dcmread(predicted["results"] / f"{stem}.PR.dcm")
    picture = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for annotation in state.GraphicAnnotationSequence:
        for item in annotation.get("GraphicObjectSequence", []):
            draw.line([tuple(point) for point in np.reshape(item.GraphicData, (-1, 2))], fill=(255, 0, 0), width=3)
    path = os.path.join(artefacts, "presentation_state.png")
    picture.save(path)
    drawn = np.asarray(Image.open(path))
    red = (drawn[..., 0] == 255) & (drawn[..., 1] == 0) & (drawn[..., 2] == 0)
    for x, y, width, height in boxes:
        for column, row in ((x + width / 2, y), (x + width / 2, y + height), (x, y + height / 2),
                            (x + width, y + height / 2)):
            assert red[min(int(round(row)), 1023), min(int(round(column)), 1023)], (row, column)
    outlines = np.zeros_like(red)
    for x, y, width, height in np.round(boxes).astype(int):  # a 3-pixel line about each edge
        outlines[max(y - 2, 0):y + height + 3, max(x - 2, 0):x + width + 3] = True
        outlines[y + 3:y + height - 2, x + 3:x + width - 2] = False
    assert not (red & ~outlines).any()  # nothing red away from the boxes' edges


def test_web_page_offers_the_dicom_results_of_a_dicom_upload(mask_model, shared_rsna):
    app = web.create_app(mask_model)
    client = app.test_client()
    path = sorted((shared_rsna / "dicom").glob("*.dcm"))[0]

    def post(url, data, name):
        return client.post(url, data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")

    response = post("/api/dicom_results", path.read_bytes(), path.name)
    assert response.status_code == 200 and response.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
        assert sorted(archive.namelist()) == sorted(f"{path.stem}.{kind}.dcm" for kind in KINDS)
        sr = pydicom.dcmread(io.BytesIO(archive.read(f"{path.stem}.SR.dcm")))
    assert sr.StudyInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    predicted = post("/api/predict", path.read_bytes(), path.name).json
    groups = hd.sr.ComprehensiveSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
    assert len(groups) == len(predicted["boxes"])
    page = post("/", path.read_bytes(), path.name).get_data(as_text=True)
    assert f'download="{path.stem}.dicom_results.zip"' in page and 'href="data:application/zip;base64,' in page
    jpeg = sorted((shared_rsna / "jpg").glob("*.jpg"))[0]
    response = post("/api/dicom_results", jpeg.read_bytes(), jpeg.name)
    assert response.status_code == 422 and "no patient, study or UIDs" in response.json["error"]
    assert 'id="no-dicom-results"' in post("/", jpeg.read_bytes(), jpeg.name).get_data(as_text=True)


def test_objects_carry_the_model_name_version_and_card_digest(predicted, mask_model):
    card_sha256 = model_card.digest(model_card.of_folder(mask_model))
    version = importlib.metadata.version("pneumo_tf")
    stem = next(predicted["dicom_dir"].glob("*.dcm")).stem
    objects = read_objects(predicted, stem)

    def items(dataset):
        for item in dataset.get("ContentSequence", []):
            yield item
            yield from items(item)

    identification = {}
    for item in items(objects["SR"]):
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue in ("111001", "111002", "111003"):
            identification.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, set()).add(item.TextValue)
    assert identification["Algorithm Name"] == {"pneumo_tf mask_resnet"}
    assert identification["Algorithm Version"] == {version}
    assert f"model_card={card_sha256}" in identification["Algorithm Parameters"]
    assert objects["PR"].ContentDescription == f"pneumo_tf mask_resnet {version} card {card_sha256[:16]}"
    [algorithm] = objects["SEG"].SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("pneumo_tf mask_resnet", version)
    assert f"model_card={card_sha256}" in algorithm.AlgorithmParameters
