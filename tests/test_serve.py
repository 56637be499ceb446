"""The web page and JSON API: real DICOMs, equality with prediction, bad input, concurrency, odd DICOMs, CLI."""
import base64
import concurrent.futures
import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pydicom
import pytest
import tensorflow as tf
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from pneumo_tf.data import pipeline
from pneumo_tf.evaluation import collect, submission
from pneumo_tf.inference import offline, web
from pneumo_tf.models import card as model_card, exported
from pneumo_tf.records import dicom, radiograph, shards, synthetic

SOURCE_SIZE = 1024  # the real and the synthetic DICOMs


@pytest.fixture(scope="module")
def app(trained_model):
    return web.create_app(trained_model)


def reference_probabilities(model_dir, dicom_dir, scratch) -> dict:
    """{id: probability} through prediction's own path: the folder converted as predict converts it, the
    pipeline's records, collect.run_batches (a submission holds no probability)."""
    model = exported.load(str(model_dir))
    records = os.path.join(scratch, "records")
    shards.convert(str(dicom_dir), records, options=model.conversion_options(),
                   writer=shards.LocalPool(1, progress_stream=io.StringIO()))
    dataset = pipeline.make_dataset(records, "test", 4, model.image_size, training=False)
    probabilities = {}
    for batch, outputs in collect.run_batches(lambda batch: model.infer(batch["image"]), dataset):
        for image_id, probability in zip(batch["id"], model.architecture.image_probability(outputs)):
            probabilities[image_id.decode()] = float(probability)
    return probabilities


def reference_boxes(model_dir, dicom_dir, scratch) -> dict:
    """{id: (boxes xywh, confidences)} as `python -m pneumo_tf.predict --dicom_dir` writes them."""
    output = os.path.join(scratch, "submission.csv")
    offline.predict(offline.PredictConfig(model_dir=str(model_dir), output=output, dicom_dir=str(dicom_dir),
                                                workers=1), progress_stream=io.StringIO())
    return submission.read_submission(output)


@pytest.fixture(scope="module")
def real(trained_model, shared_rsna, tmp_path_factory) -> dict:
    """The model with its threshold at the median probability of the 10 real DICOMs (so both decisions
    occur), its app, and what `python -m pneumo_tf.predict` gives for each of those files."""
    scratch = tmp_path_factory.mktemp("real_reference")
    dicom_dir = shared_rsna / "dicom"
    probabilities = reference_probabilities(trained_model, dicom_dir, str(scratch / "probabilities"))
    low, high = sorted(probabilities.values())[4:6]
    assert low < high, "the real images need distinct probabilities"
    model_dir = shutil.copytree(trained_model, scratch / "model")
    info_path = model_dir / exported.INFO_FILE
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "threshold": (low + high) / 2}))
    boxes = reference_boxes(model_dir, dicom_dir, str(scratch))
    assert set(boxes) == set(probabilities)
    return {"app": web.create_app(str(model_dir)), "threshold": (low + high) / 2, "dicom_dir": dicom_dir,
            "reference": {image_id: (probabilities[image_id], *boxes[image_id]) for image_id in probabilities}}


def upload(client, path_or_bytes, filename=None, url="/api/predict"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    filename = filename or os.path.basename(path_or_bytes)
    return client.post(url, data={"file": (io.BytesIO(data), filename)}, content_type="multipart/form-data")


def check_well_formed(result: dict, image_id: str, threshold: float, height: int, width: int) -> None:
    assert result["id"] == image_id and result["threshold"] == threshold
    assert result["opacity"] == (result["probability"] > threshold)
    assert result["decision"] == ("Opacity" if result["opacity"] else "No Opacity")
    assert (result["image"]["rows"], result["image"]["columns"]) == (height, width)
    confidences = [box["confidence"] for box in result["boxes"]]
    assert confidences == sorted(confidences, reverse=True)
    for box in result["boxes"]:
        # A box's confidence is its component's mean mask probability, every pixel of which is above threshold.
        assert threshold < box["confidence"] <= 1.0
        assert 0 <= box["x"] and 0 <= box["y"] and box["width"] > 0 and box["height"] > 0
        assert box["x"] + box["width"] <= width + 1e-6 and box["y"] + box["height"] <= height + 1e-6


def check_matches_reference(result: dict, reference) -> None:
    probability, boxes, confidences = reference
    assert result["probability"] == pytest.approx(probability, abs=1e-5)
    served = np.array([[box["x"], box["y"], box["width"], box["height"]] for box in result["boxes"]]).reshape(-1, 4)
    assert served.shape == boxes.shape
    # The submission rounds coordinates to 0.1 px and confidences to 1e-4.
    np.testing.assert_allclose(served, boxes, atol=0.05 + 1e-6)
    np.testing.assert_allclose([box["confidence"] for box in result["boxes"]], confidences, atol=5e-5 + 1e-6)
    # The same text up to one rounding step: a confidence within 5e-5 of a rounding edge may round
    # either way when the model reads one image rather than a batch of them.
    string_boxes, string_confidences = submission.parse_prediction_string(result["prediction_string"])
    np.testing.assert_allclose(string_boxes.reshape(-1, 4), boxes, atol=0.1 + 1e-6)
    np.testing.assert_allclose(string_confidences, confidences, atol=1e-4 + 1e-9)


def test_healthz(app, trained_model):
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "model": "mask_resnet", "image_size": 64, "threshold": 0.5,
                             "model_card_sha256": model_card.digest(model_card.of_folder(trained_model))}


def test_real_dicoms_give_what_prediction_gives(real):
    client = real["app"].test_client()
    decisions = set()
    for path in sorted(real["dicom_dir"].glob("*.dcm")):
        response = upload(client, path)
        assert response.status_code == 200, response.json
        result = response.json
        check_well_formed(result, path.stem, real["threshold"], SOURCE_SIZE, SOURCE_SIZE)
        check_matches_reference(result, real["reference"][path.stem])
        facts = dicom.header_facts(pydicom.dcmread(path))
        assert result["image"] == {"rows": facts.rows, "columns": facts.columns, "view": facts.view, "age": facts.age,
                                   "sex": facts.sex, "pixel_spacing": list(facts.pixel_spacing), "format": "dicom"}
        decisions.add(result["decision"])
    assert decisions == {"Opacity", "No Opacity"}  # the threshold sits at the median probability
    assert any(reference[1].size for reference in real["reference"].values()), "no file exercised the boxes"


def embedded_png(html: str) -> np.ndarray:
    [encoded] = re.findall(r'href="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as picture:
        return np.asarray(picture)


def test_page_shows_decision_boxes_facts_and_the_windowed_radiograph(real):
    client = real["app"].test_client()
    assert client.get("/").status_code == 200
    path = max(real["dicom_dir"].glob("*.dcm"), key=lambda p: (len(real["reference"][p.stem][1]), p.name))
    result = upload(client, path).json
    assert result["boxes"], "the file with the most boxes has none"
    response = upload(client, path, url="/")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    html = response.get_data(as_text=True)
    css_class = "positive" if result["opacity"] else "negative"
    assert f'<h2 id="decision" class="{css_class}">{result["decision"]}</h2>' in html
    assert f'<span id="probability">{result["probability"]:.3f}</span>' in html
    assert f'<code id="image-id">{path.stem}</code>' in html
    assert html.count('<g class="box"') == html.count('<tr class="box-row">') == len(result["boxes"])
    for box in result["boxes"]:
        assert f'<rect x="{box["x"]}" y="{box["y"]}" width="{box["width"]}" height="{box["height"]}"/>' in html
    facts = result["image"]
    for name, value in (("View", facts["view"]), ("Age", facts["age"]), ("Sex", facts["sex"])):
        assert f"<th scope=\"row\">{name}</th><td>{value}</td>" in html
    # The picture is the 8-bit display image dicom.grey_pixels gives, sent inline.
    np.testing.assert_array_equal(embedded_png(html), dicom.grey_pixels(dicom.read(str(path)), 8))


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, compress=None, **elements) -> None:
    """A one-frame grey DICOM of `pixels`, uncompressed unless `compress` names a transfer syntax."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientSex, ds.PatientAge, ds.ViewPosition = "DX", "F", "042Y", "AP"
    ds.PixelSpacing = [0.2, 0.25]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    if compress:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def odd_dicoms(tmp_path_factory):
    """MONOCHROME1, 16-bit, 12-bit windowed and RLE-compressed radiographs, some not square."""
    folder = tmp_path_factory.mktemp("odd") / "dicom"
    folder.mkdir()
    picture = synthetic.make_radiograph(np.random.default_rng(3), [(300, 300, 200, 250)], 320)
    sixteen = picture[:, 40:280].astype(np.uint16) * 200 + 1000  # 320 x 240, values 1000..52000
    write_dicom(folder / "mono1.dcm", picture, photometric="MONOCHROME1")
    write_dicom(folder / "sixteen.dcm", sixteen)
    write_dicom(folder / "twelve_window.dcm", (picture.astype(np.uint16) * 16), bits_stored=12,
                WindowCenter=2000, WindowWidth=3000)
    write_dicom(folder / "rle_mono1.dcm", sixteen, photometric="MONOCHROME1", compress=RLELossless)
    return {"folder": folder, "mono1": picture}


def test_odd_dicoms_are_accepted_and_match_prediction(app, trained_model, odd_dicoms, tmp_path):
    folder = odd_dicoms["folder"]
    probabilities = reference_probabilities(trained_model, folder, str(tmp_path / "probabilities"))
    boxes = reference_boxes(trained_model, folder, str(tmp_path))
    client = app.test_client()
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        response = upload(client, path)
        assert response.status_code == 200, (path.name, response.json)
        result = response.json
        check_well_formed(result, path.stem, 0.5, int(ds.Rows), int(ds.Columns))
        check_matches_reference(result, (probabilities[path.stem], *boxes[path.stem]))
        header = {key: value for key, value in result["image"].items() if key not in ("rows", "columns")}
        assert header == {"view": "AP", "age": 42, "sex": "F", "pixel_spacing": [0.2, 0.25], "format": "dicom"}
        page = upload(client, path, url="/").get_data(as_text=True)
        np.testing.assert_array_equal(embedded_png(page), dicom.grey_pixels(ds, 8))
    # MONOCHROME1 is shown inverted, as a viewer shows it.
    page = upload(client, folder / "mono1.dcm", url="/").get_data(as_text=True)
    np.testing.assert_array_equal(embedded_png(page), 255 - odd_dicoms["mono1"])


def image_file(array, image_format: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_files(synthetic_rsna, tmp_path_factory):
    """Two synthetic test DICOMs exported as PNG and JPEG, a 16-bit PNG and a colour JPEG, both not square."""
    folder = tmp_path_factory.mktemp("image_files") / "images"
    exports = tmp_path_factory.mktemp("exports")
    for image_format in ("png", "jpeg"):
        synthetic.export_images(synthetic_rsna["test_dir"], str(exports / image_format), image_format, workers=1)
    folder.mkdir()
    first, second = sorted(os.listdir(exports / "png"))[:2]
    shutil.copy(exports / "png" / first, folder / first)
    second = second.removesuffix(".png") + ".jpg"
    shutil.copy(exports / "jpeg" / second, folder / second)
    picture = synthetic.make_radiograph(np.random.default_rng(4), [(100, 120, 60, 80)], 320)
    sixteen = picture[:, 40:280].astype(np.uint16) * 200 + 1000  # 320 x 240, values 1000..52000
    (folder / "sixteen.png").write_bytes(image_file(sixteen, "PNG"))
    colour = np.stack([picture, picture, picture // 2], axis=-1)[40:280]  # 240 x 320
    (folder / "colour.jpg").write_bytes(image_file(colour, "JPEG", quality=90))
    return {"folder": folder, "sixteen": sixteen, "formats": {first: "png", second: "jpeg", "sixteen.png": "png",
                                                              "colour.jpg": "jpeg"}}


def test_png_and_jpeg_uploads_give_what_prediction_gives(app, trained_model, image_files, tmp_path):
    folder = image_files["folder"]
    probabilities = reference_probabilities(trained_model, folder, str(tmp_path / "probabilities"))
    boxes = reference_boxes(trained_model, folder, str(tmp_path))
    client = app.test_client()
    page = client.get("/").get_data(as_text=True)
    assert "Chest radiograph: DICOM, PNG or JPEG, up to 50 MB" in page
    assert 'accept=".dcm,.dicom,application/dicom,.png,image/png,.jpg,.jpeg,image/jpeg"' in page
    for name, image_format in sorted(image_files["formats"].items()):
        path = folder / name
        image_id = radiograph.image_id_of(name)
        with Image.open(path) as picture:
            width, height = picture.size
        response = upload(client, path)
        assert response.status_code == 200, (name, response.json)
        result = response.json
        check_well_formed(result, image_id, 0.5, height, width)
        check_matches_reference(result, (probabilities[image_id], *boxes[image_id]))
        # An image file holds no header: everything but its size and format is unknown.
        assert result["image"] == {"rows": height, "columns": width, "view": "", "age": -1, "sex": "",
                                   "pixel_spacing": [0.0, 0.0], "format": image_format}
        html = upload(client, path, url="/").get_data(as_text=True)
        for fact, value in (("Format", image_format.upper()), ("View", "unknown"), ("Age", "unknown"),
                            ("Sex", "unknown"), ("Pixel spacing", "unknown"), ("Size", f"{width} x {height} pixels")):
            assert f'<th scope="row">{fact}</th><td>{value}</td>' in html
        shown = embedded_png(html)
        np.testing.assert_array_equal(shown, radiograph.read_radiograph(str(path)).grey_pixels(8))
        if image_format == "jpeg":  # libjpeg's grey output (a colour file's luma), as TensorFlow's gives it
            decoded = tf.io.decode_jpeg(path.read_bytes(), channels=1, dct_method="INTEGER_ACCURATE")
            np.testing.assert_array_equal(shown, decoded.numpy()[..., 0])
        elif name != "sixteen.png":  # an 8-bit PNG is shown as it is
            with Image.open(path) as picture:
                np.testing.assert_array_equal(shown, np.asarray(picture))
    # A 16-bit PNG is shown stretched from its minimum to its maximum, as a 16-bit DICOM is.
    sixteen = image_files["sixteen"].astype(np.float64)
    stretched = np.round((sixteen - sixteen.min()) * 255 / (sixteen.max() - sixteen.min())).astype(np.uint8)
    page = upload(client, folder / "sixteen.png", url="/").get_data(as_text=True)
    np.testing.assert_array_equal(embedded_png(page), stretched)


def broken_jpeg(tmp_path) -> bytes:
    data = bytearray(image_file(synthetic.make_radiograph(np.random.default_rng(2), [], 64), "JPEG"))
    data[len(data) // 2: len(data) // 2 + 2] = b"\xff\x27"  # a foreign marker inside the compressed data
    return bytes(data)


def no_pixel_data() -> bytes:
    buffer = io.BytesIO()
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = "header-only"
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def undecodable_pixels(tmp_path) -> bytes:
    path = tmp_path / "short.dcm"
    write_dicom(path, np.zeros((64, 64), np.uint16))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:1000]  # 64 x 64 x 2 bytes expected
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


BAD_UPLOADS = {
    "not_dicom": (lambda tmp_path: b"patientId,Target\nabc,1\n", "notes.dcm", 422,
                  "notes.dcm cannot be read as a radiograph: not a DICOM, PNG or JPEG file"),
    "no_pixel_data": (lambda tmp_path: no_pixel_data(), "header.dcm", 422,
                      "header.dcm cannot be read as a radiograph: no pixel data"),
    "undecodable_pixels": (undecodable_pixels, "short.dcm", 422,
                           "short.dcm cannot be read as a radiograph: undecodable pixels"),
    "empty_file": (lambda tmp_path: b"", "empty.dcm", 400, "empty.dcm is empty"),
    "truncated_png": (lambda tmp_path: image_file(np.zeros((64, 64), np.uint8) + 7, "PNG")[:-30], "cut.png", 422,
                      "cut.png cannot be read as a radiograph: PNG does not decode"),
    "broken_jpeg": (broken_jpeg, "broken.jpg", 422, "broken.jpg cannot be read as a radiograph: JPEG frame does not "
                    "decode (marker 0xFF27 inside the compressed data"),
}


@pytest.mark.parametrize("url", ["/api/predict", "/"])
@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_get_a_4xx_and_a_message(app, case, url, tmp_path):
    make, filename, status, message = BAD_UPLOADS[case]
    client = app.test_client()
    response = upload(client, make(tmp_path), filename, url=url)
    assert response.status_code == status
    if url == "/":
        assert f'<p class="error" id="error" role="alert">{message}' in response.get_data(as_text=True)
    else:
        assert response.json["error"].startswith(message)
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("url", ["/api/predict", "/"])
def test_no_file_gets_400(app, url):
    client = app.test_client()
    message = "no file: choose a DICOM (.dcm), PNG or JPEG file and upload it in the form field &#39;file&#39;"
    for data in ({}, {"other": "value"}, {"file": (io.BytesIO(b""), "")}):  # the last: a browser's empty input
        response = client.post(url, data=data, content_type="multipart/form-data")
        assert response.status_code == 400
        if url == "/":
            assert message in response.get_data(as_text=True)
        else:
            assert response.json["error"] == message.replace("&#39;", "'")


def post_file(url: str, data: bytes, filename: str) -> tuple[int, dict]:
    """Multipart POST of one file in the field "file" with the standard library: (status, JSON body)."""
    boundary = uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode(),
        b"Content-Type: application/dicom\r\n\r\n", data, f"\r\n--{boundary}--\r\n".encode(),
    ])
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_over_the_size_limit_gets_413_and_the_server_keeps_serving(trained_model, synthetic_rsna, monkeypatch, running):
    monkeypatch.setenv("FLASK_DEBUG", "1")  # Flask would read it; debug mode stays off anyway
    small = web.create_app(trained_model, max_upload_mb=0.5)
    assert small.debug is False and small.config["MAX_CONTENT_LENGTH"] == int(0.5 * 2**20)
    big = np.random.default_rng(0).integers(0, 255, 600_000, dtype=np.uint8).tobytes()
    message = "the upload is larger than the limit of 0.5 MB (--max_upload_mb)"
    response = upload(small.test_client(), big, "big.dcm", url="/")
    assert response.status_code == 413 and message in response.get_data(as_text=True)
    path = sorted(os.listdir(synthetic_rsna["test_dir"]))[0]
    data = open(os.path.join(synthetic_rsna["test_dir"], path), "rb").read()
    assert len(data) < 0.5 * 2**20
    with running(small) as base:
        assert post_file(f"{base}/api/predict", big, "big.dcm") == (413, {"error": message})
        status, result = post_file(f"{base}/api/predict", data, path)
        assert status == 200 and result["id"] == path.removesuffix(".dcm")


def test_twenty_concurrent_uploads_each_get_their_own_result(app, synthetic_rsna, running):
    folder = synthetic_rsna["train_dir"]
    files = [(name, open(os.path.join(folder, name), "rb").read()) for name in sorted(os.listdir(folder))[:20]]
    with running(app) as base:
        url = f"{base}/api/predict"
        sequential = {}
        for name, data in files:
            status, result = post_file(url, data, name)
            assert status == 200, result
            sequential[result["id"]] = result
        assert len({result["probability"] for result in sequential.values()}) == 20, "results must tell files apart"

        start = threading.Barrier(len(files))
        concurrent = [None] * len(files)

        def send(index):
            start.wait()
            concurrent[index] = post_file(url, files[index][1], files[index][0])

        threads = [threading.Thread(target=send, args=(index,)) for index in range(len(files))]
        for thread in threads:
            thread.start()
        health = []  # /healthz stays answered while the twenty are read
        while any(thread.is_alive() for thread in threads):
            with urllib.request.urlopen(f"{base}/healthz", timeout=60) as response:
                health.append(response.status)
        for thread in threads:
            thread.join(timeout=600)
        assert health and set(health) == {200}
    for (name, _), (status, result) in zip(files, concurrent):
        assert status == 200, result
        expected = sequential[name.removesuffix(".dcm")]
        assert result["id"] == expected["id"]
        assert result["probability"] == pytest.approx(expected["probability"], abs=1e-6)
        assert result["prediction_string"] == expected["prediction_string"]


def test_only_its_own_hosts_and_pages_are_answered(app, trained_model, synthetic_rsna):
    """A page elsewhere cannot use the server: a name that resolves to it (DNS rebinding) gets 400, a cross-site POST
    403; its own names, IP addresses and --trusted_hosts are answered."""
    client = app.test_client()
    for host in ("evil.example", "evil.example:8080", "localhost.evil.example"):
        response = client.get("/healthz", headers={"Host": host})
        assert response.status_code == 400
        assert f"does not answer to the host {host.partition(':')[0]} (--trusted_hosts)" in response.get_data(True)
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "10.1.2.3", "localhost"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    name = sorted(os.listdir(synthetic_rsna["test_dir"]))[0]
    data = open(os.path.join(synthetic_rsna["test_dir"], name), "rb").read()

    def post(origin, host="127.0.0.1:8080", to=client, site=None):
        return to.post("/api/predict", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data",
                       headers={"Host": host, **({"Origin": origin} if origin else {}),
                                **({"Sec-Fetch-Site": site} if site else {})})

    for origin, site in (("http://evil.example", None), ("null", None), ("http://127.0.0.1:9999", None),
                         ("http://evil.example", "cross-site"), (None, "cross-site"), ("null", "same-site")):
        response = post(origin, site=site)
        assert response.status_code == 403 and response.json["error"] == (
            f"Forbidden: a POST from another site ({origin or site}) is refused"), response.json
    assert post("http://127.0.0.1:8080").status_code == 200 and post(None).status_code == 200
    # A form on its own page, whose referrer policy (no-referrer) makes the browser send Origin: null.
    assert post("null", site="same-origin").status_code == 200
    proxied = web.create_app(trained_model, trusted_hosts=(".example.org",)).test_client()
    assert proxied.get("/", headers={"Host": "pneumo.example.org"}).status_code == 200
    # Behind a proxy that terminates TLS the page's origin is https, the request it passes on http: hosts compare.
    assert post("https://pneumo.example.org", "pneumo.example.org", proxied).status_code == 200
    assert post("https://pneumo.example.org", "127.0.0.1:8080", proxied).status_code == 403


def test_conversions_take_turns_and_decoding_runs_outside_the_model_lock(trained_model, synthetic_rsna, running,
                                                                         monkeypatch):
    app = web.create_app(trained_model, max_conversions=2)
    reading = app.extensions["pneumo_tf.reading"]
    inside, most, locked_while_decoding, lock = [0], [0], [], threading.Lock()
    read_radiograph, decode = radiograph.read_radiograph, reading._decode

    def slow_read(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.3)
        try:
            return read_radiograph(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    def watched_decode(serialized):
        locked_while_decoding.append(reading._lock.locked())
        return decode(serialized)

    monkeypatch.setattr(radiograph, "read_radiograph", slow_read)
    monkeypatch.setattr(reading, "_decode", watched_decode)
    folder = synthetic_rsna["train_dir"]
    files = [(name, open(os.path.join(folder, name), "rb").read()) for name in sorted(os.listdir(folder))[:6]]
    with running(app) as base:
        with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
            answers = list(pool.map(lambda file: post_file(f"{base}/api/predict", file[1], file[0]), files))
    assert [status for status, _ in answers] == [200] * len(files)
    assert most[0] == 2  # six at once, two converting
    assert len(locked_while_decoding) == len(files) and not all(locked_while_decoding)

    # A turn that does not come within --timeout: 503, and the server goes on.
    waiting = web.create_app(trained_model, max_conversions=1, timeout=0.1)
    monkeypatch.setattr(radiograph, "read_radiograph", lambda *args, **kwargs: time.sleep(1) or read_radiograph(
        *args, **kwargs))
    with running(waiting) as base:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = sorted(pool.map(lambda file: post_file(f"{base}/api/predict", file[1], file[0]), files[:2]),
                             key=lambda answer: answer[0])
        assert answers[0][0] == 200 and answers[1] == (503, {"error": "the server is busy (1 uploads are being read; "
                                                                  "none finished within 0.1 s): try again in a moment"})


def test_an_upload_is_parsed_and_decoded_once(app, tmp_path, monkeypatch):
    path = tmp_path / "sixteen.dcm"  # transcoded (the model's records are 8-bit, 64 px): its pixels are decoded
    write_dicom(path, np.random.default_rng(2).integers(0, 4096, (300, 200), dtype=np.uint16), bits_stored=12)
    calls = {"dcmread": 0, "pixel_array": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(pydicom, "dcmread", counting("dcmread", pydicom.dcmread))
    monkeypatch.setattr(pydicom.pixels, "pixel_array", counting("pixel_array", pydicom.pixels.pixel_array))
    response = upload(app.test_client(), str(path), url="/")
    assert response.status_code == 200 and 'id="decision"' in response.get_data(as_text=True)
    # One parse and one decode for the record and the picture; the DICOM results read the header once more.
    assert calls == {"dcmread": 2, "pixel_array": 1}
    calls.update(dcmread=0, pixel_array=0)
    assert upload(app.test_client(), str(path)).status_code == 200
    assert calls == {"dcmread": 1, "pixel_array": 1}


def test_a_silent_client_is_dropped(app, running):
    with running(app, timeout=1.0) as base:
        port = int(base.rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nstart")
            started = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server, not by the 30 s socket timeout
            assert time.monotonic() - started < 10
        with urllib.request.urlopen(f"{base}/healthz", timeout=60) as response:
            assert response.status == 200


def test_uploads_never_touch_the_disk(app, synthetic_rsna, tmp_path, monkeypatch):
    """Werkzeug spools uploads over 500 KB to a temporary file; this app keeps them in memory."""
    path = tmp_path / "large.dcm"
    write_dicom(path, np.random.default_rng(1).integers(0, 4096, (600, 600), dtype=np.uint16), bits_stored=12)
    assert path.stat().st_size > 500 * 1024
    data = path.read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("an upload went to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    static = os.path.join(os.path.dirname(web.__file__), "static")
    static_before = sorted(os.listdir(static))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    client = app.test_client()
    for url in ("/api/predict", "/"):
        assert upload(client, data, "large.dcm", url=url).status_code == 200
    assert sorted(os.listdir(static)) == static_before and os.listdir(workdir) == []


def test_cli_serves_on_localhost_by_default(trained_model, synthetic_rsna):
    process = subprocess.Popen([sys.executable, "-m", "pneumo_tf.serve", f"--model_dir={trained_model}", "--port=0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # the server prints its address once it listens
        match = re.fullmatch(r"serving .* at (http://127\.0\.0\.1:\d+)/ \(Ctrl\+C stops\)\n", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        with urllib.request.urlopen(f"{match.group(1)}/healthz", timeout=60) as response:
            assert json.loads(response.read())["status"] == "ok"
        name = sorted(os.listdir(synthetic_rsna["test_dir"]))[0]
        data = open(os.path.join(synthetic_rsna["test_dir"], name), "rb").read()
        status, result = post_file(f"{match.group(1)}/api/predict", data, name)
        assert status == 200 and result["id"] == name.removesuffix(".dcm")
    finally:
        process.terminate()
        process.communicate(timeout=60)


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pneumo_tf.serve", f"--model_dir={tmp_path / 'missing'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: model folder not found: {tmp_path / 'missing'}"


# Tiny detectors (64 px), trained two steps, keeping their best detections whatever their score.
TINY_DETECTORS = {
    "retinanet": {"stackwise_num_filters": (64, 64, 64), "stackwise_num_blocks": (1, 1, 1),
                  "block_type": "basic_block", "max_level": 4, "pre_logits_num_conv_layers": 1,
                  "min_confidence": 0.0},
    "mask_rcnn": {"backbone": "resnet18", "backbone_blocks": (1, 1, 1, 1), "backbone_filters": (64, 64, 64, 64),
                  "top_down_pyramid_size": 16, "rpn_conv_size": 16, "rpn_anchor_scales": (16, 32, 64, 128, 256),
                  "rpn_train_anchors_per_image": 64, "pre_nms_limit": 256, "post_nms_rois_training": 64,
                  "post_nms_rois_inference": 64, "train_rois_per_image": 16, "roi_positive_ratio": 0.25,
                  "fpn_classif_fc_layers_size": 32, "mask_head_size": 8, "mask_head_convs": 1,
                  "detection_min_confidence": 0.0},
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(TINY_DETECTORS))
def test_detectors_serve_what_prediction_writes(model, tiny_records, synthetic_rsna, tmp_path):
    from pneumo_tf.training import loop
    from pneumo_tf.training.config import TrainConfig

    model_dir = tmp_path / "model"
    loop.train_and_evaluate(TrainConfig(
        records_dir=tiny_records, model_dir=str(model_dir), model=model, model_options=TINY_DETECTORS[model],
        image_size=64, batch_size=4, epochs=1, steps_per_epoch=2, profile_steps=None,
    ))
    dicom_dir = synthetic_rsna["test_dir"]
    probabilities = reference_probabilities(model_dir, dicom_dir, str(tmp_path / "probabilities"))
    threshold = min(probabilities.values()) / 2  # every image shows its best detections
    exported.update_info(str(model_dir), {"threshold": threshold})
    boxes = reference_boxes(model_dir, dicom_dir, str(tmp_path))
    client = web.create_app(str(model_dir)).test_client()
    served_boxes = 0
    for path in sorted(pathlib.Path(dicom_dir).glob("*.dcm")):
        response = upload(client, path)
        assert response.status_code == 200, response.json
        assert response.json["model"] == model
        check_matches_reference(response.json, (probabilities[path.stem], *boxes[path.stem]))
        served_boxes += len(response.json["boxes"])
    assert served_boxes > 0
