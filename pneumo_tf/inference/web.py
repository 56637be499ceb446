"""A web page and a JSON API that show an exported model's (or an ensemble's) reading of one uploaded
radiograph (a DICOM, PNG or JPEG file, told apart by its content as the converter tells them apart).

    python -m pneumo_tf.serve --model_dir=runs/mask_resnet [--tta=hflip] [--host=127.0.0.1] [--port=8080] \
        [--max_upload_mb=50]

--model_dir may be an ensemble folder (python -m pneumo_tf.evaluate --ensemble_dir), read with
its members, weights, TTA, fusion and threshold (pneumo_tf.models.reading).

  GET  /              a page with a file input; POST / shows the radiograph (8-bit, windowed),
                      the predicted boxes with their confidences, the decision and the header facts
                      (a PNG or JPEG has no view, age, sex or pixel spacing: shown as unknown)
  POST /api/predict   multipart field "file" -> JSON: id, decision, probability, threshold,
                      boxes (confidence, x, y, width, height in source pixels), image facts and format,
                      and the model's short card (what the page shows beside the result: what the
                      model was trained on, its latest mAP and where, warnings; pneumo_tf.models.card)
  POST /api/dicom_results  multipart field "file" (a DICOM) -> a zip of its DICOM result objects
                      (SR, presentation state, and a segmentation for models with masks; see
                      pneumo_tf.inference.dicom_results); the page links the same zip after a DICOM upload
  GET  /healthz       JSON: status, model, image size, threshold, the model card's digest

An upload goes through the code training and predict use: records.radiograph.convert_file
(converted as the model's training records were, pneumo_tf.json "conversion") ->
schema.serialize_example -> pipeline.parse_batch + pipeline.decode_image (at each member's
size) -> the reading's networks -> collect.challenge_detections and the reading's
image probability, at the threshold evaluation saved. So the page shows exactly what
`python -m pneumo_tf.predict --dicom_dir` writes for the same file. The page's picture and facts come from
radiograph.read_radiograph, the converter's reader of every format. Uploads stay in memory (never spooled to a
temporary file) and the page draws the boxes as SVG over the radiograph, sent inline as a data: URI PNG:
nothing is written to disk, so simultaneous users never see each other's results.

Hostile uploads and slow clients. The server is waitress (`make_server`; BUILD.md says why): a
fixed pool of --threads handles requests, a client silent for --timeout seconds is dropped, and a
body over --max_upload_mb is refused before the app sees it. At most --max_conversions uploads are
converted and read at once (an upload waits --timeout for its turn, then gets 503); decoding runs
outside the lock that makes model calls take turns. A file whose header claims an image over
--max_image_mb decoded (an image bomb) gets 422 before anything is decoded, and each upload is
parsed and decoded once. The page has no authentication and binds 127.0.0.1 unless --host says
otherwise; a page the operator opens elsewhere cannot use it either: a request naming a host this
server does not answer to gets 400 (DNS rebinding), a POST from another origin 403.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import ipaddress
import socket
import threading
import urllib.parse

import flask
import numpy as np
import pydicom
import tensorflow as tf
from PIL import Image
from werkzeug import exceptions
from werkzeug.sansio.utils import host_is_trusted

from pneumo_tf.cli import check_constraints, option
from pneumo_tf.data import metadata, pipeline
from pneumo_tf.errors import RejectedFile, UserError
from pneumo_tf.evaluation import collect, submission
from pneumo_tf.inference import dicom_results
from pneumo_tf.models import card as model_card, reading as reading_lib
from pneumo_tf.models.reading import ReadingConfig
from pneumo_tf.records import dicom, images, labels as labels_lib, pixels, radiograph as radiograph_lib, schema
from pneumo_tf.records.labels import PatientFacts

DISPLAY_MAX_SIZE = 1024  # the page's radiograph is downscaled to this many pixels on its long side
POSITIVE, NEGATIVE = "Opacity", "No Opacity"
UNKNOWN = "unknown"

# The page needs nothing but its stylesheet and inline (data:) images: no script runs at all.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_dir: str = option(help="Folder of a trained model (model.keras + pneumo_tf.json) or an ensemble folder; "
                            "the threshold saved there by python -m pneumo_tf.evaluate makes the decision.")
    host: str = option("127.0.0.1", "Address to listen on. 127.0.0.1 (default) serves this machine only; 0.0.0.0 "
                       "serves every network interface (the page has no authentication).")
    port: int = option(8080, "Port to listen on (0 picks a free one).", minimum=0, maximum=65535)
    max_upload_mb: float = option(50.0, "Largest upload accepted, in MB; a larger one gets HTTP 413 and a message.",
                                  exclusive_minimum=0.0)
    threads: int = option(24, "Requests handled at once (waitress threads); each may hold an upload of "
                          "--max_upload_mb in memory.", minimum=1)
    max_conversions: int = option(2, "Uploads converted and read by the model at once (the memory-heavy part: a "
                                  "decoded image of up to --max_image_mb and its copies); the others wait their turn.",
                                  minimum=1)
    timeout: float = option(60.0, "Seconds a client may stay silent before its connection is closed, and the longest "
                            "an upload waits for its turn (then HTTP 503).", exclusive_minimum=0.0)
    trusted_hosts: tuple[str, ...] = option((), "Host names the page is reached by (a .suffix allows subdomains), "
                                            "besides localhost, --host and this machine's names; IP addresses are "
                                            "always accepted. A request naming another host gets HTTP 400 (a "
                                            "DNS-rebinding page cannot reach the server).")
    reading: ReadingConfig = option(ReadingConfig())
    limit: pixels.ImageLimit = option(pixels.ImageLimit())  # --max_image_mb: a larger image gets HTTP 422


class UploadError(Exception):
    """An upload the server cannot read, with the HTTP status and the message to show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Busy(Exception):
    """No turn to convert an upload came within the wait (see UploadReading)."""


@dataclasses.dataclass(frozen=True)
class Box:
    confidence: float
    x: float  # source pixels
    y: float
    width: float
    height: float


@dataclasses.dataclass(frozen=True)
class Result:
    """The model's reading of one radiograph."""

    image_id: str
    probability: float
    threshold: float
    boxes: tuple[Box, ...]  # highest confidence first
    facts: dicom.HeaderFacts
    source_format: str  # images.DICOM, PNG or JPEG
    display_png: bytes  # the windowed 8-bit radiograph, at most DISPLAY_MAX_SIZE pixels on its long side
    model: str
    mask: np.ndarray | None = None  # bool [rows, columns], when asked for and the model gives masks
    dicom_results: bytes | None = None  # a zip of the DICOM result objects (DICOM uploads to the page)
    model_card: dict | None = None  # the model's short card (pneumo_tf.models.card.short)

    @property
    def positive(self) -> bool:
        # As in evaluation: an image is positive when its probability is above the threshold.
        return self.probability > self.threshold

    @property
    def decision(self) -> str:
        return POSITIVE if self.positive else NEGATIVE

    def to_json(self) -> dict:
        return {
            "id": self.image_id,
            "decision": self.decision,
            "opacity": self.positive,
            "probability": self.probability,
            "threshold": self.threshold,
            "boxes": [dataclasses.asdict(box) for box in self.boxes],
            "prediction_string": submission.format_prediction_string(
                [(b.x, b.y, b.width, b.height) for b in self.boxes], [b.confidence for b in self.boxes]
            ),
            "image": {
                "rows": self.facts.rows,
                "columns": self.facts.columns,
                "view": self.facts.view,
                "age": self.facts.age,
                "sex": self.facts.sex,
                "pixel_spacing": list(self.facts.pixel_spacing),
                "format": self.source_format,
            },
            "model": self.model,
            "model_card": self.model_card,
        }


class UploadReading:
    """The reading of `model_dir` applied to the bytes of an uploaded DICOM, PNG or JPEG file: thread-safe,
    nothing on disk. At most `turns` uploads are converted and read at once; one waits up to `wait`
    seconds for its turn (then Busy)."""

    def __init__(self, model_dir: str, config: ReadingConfig = ReadingConfig(),
                 limit: pixels.ImageLimit = pixels.ImageLimit(), turns: int = 2, wait: float = 60.0):
        self.reading = reading_lib.load(model_dir, config)
        if self.reading.threshold is None:
            raise UserError(f"{model_dir} is an ensemble without a threshold: evaluate it with python -m "
                            "pneumo_tf.evaluate --ensemble_dir=DIR and serve --model_dir=DIR")
        self.threshold = self.reading.threshold
        self.image_size = self.reading.image_sizes[0]
        self.options = dataclasses.replace(self.reading.conversion_options(), limit=limit)
        self.algorithm = dicom_results.algorithm_of(self.reading, self.threshold)
        self.card = model_card.short(model_card.of_reading(self.reading))
        self._decode = tf.function(self._decode_record, input_signature=[tf.TensorSpec([], tf.string)])
        self._call = tf.function(self.reading.outputs)
        # Traced once here, before any request: requests only run the traced graphs. Keras does not
        # promise that a model may be called from several threads at once, so calls take turns under
        # the lock; conversion, decoding, drawing and encoding (most of a request's time) run beside them.
        batch, images = tf.nest.map_structure(lambda tensor: tf.TensorSpec(tensor.shape, tensor.dtype),
                                              self._decode.get_concrete_function().structured_outputs)
        self._call.get_concrete_function(images, _raw_metadata(batch))
        self._lock = threading.Lock()
        self._turns, self._turn_count, self._wait = threading.BoundedSemaphore(turns), turns, wait

    def _decode_record(self, serialized):
        """One serialised record -> (its id and source size, the images at each member's size), a batch of one."""
        # parse_batch and decode_image are the steps of pipeline.decode_records that the image needs.
        fields = {key: value[0] for key, value in pipeline.parse_batch(serialized[tf.newaxis]).items()}
        images = tuple(
            pipeline.decode_image(fields["image_encoded"], fields["image_format"], fields["stored_size"], size,
                                  self.options.bit_depth)[tf.newaxis]
            for size in self.reading.image_sizes
        )
        return {key: fields[key][tf.newaxis] for key in pipeline.METADATA_KEYS}, images

    def predict(self, data: bytes, image_id: str, with_mask: bool = False, display: bool = True,
                known: PatientFacts | None = None) -> Result:
        """Reads one DICOM, PNG or JPEG file's bytes; raises RejectedFile with the reason when it cannot, Busy
        when no turn came within the wait.

        with_mask: also the pixels called opacity at source size (models with masks); display: the page's picture;
        known: view, sex and age given with the upload, for a file without a header (a DICOM's must agree).
        """
        if not self._turns.acquire(timeout=self._wait):
            raise Busy(f"{self._turn_count} uploads are being read; none finished within {self._wait:g} s")
        try:
            return self._predict(data, image_id, with_mask, display, known)
        finally:
            self._turns.release()

    def _predict(self, data: bytes, image_id: str, with_mask: bool, display: bool,
                 known: PatientFacts | None) -> Result:
        # One parse, and one decode of the pixels the record and the picture share (Radiograph caches them).
        radiograph = radiograph_lib.read_radiograph(io.BytesIO(data), self.options.limit.bytes)
        record, reason = radiograph_lib.convert_or_reject(radiograph, image_id, None, self.options, known)
        if record is None:
            raise RejectedFile(reason)
        batch, images = self._decode(tf.constant(schema.serialize_example(record)))
        with self._lock:
            outputs = self._call(images, _raw_metadata(batch))
        batch = {key: value.numpy() for key, value in batch.items()}
        outputs = self.reading.split(outputs)
        [(_, (boxes_xywh, confidences))] = collect.challenge_detections(
            self.reading, outputs, batch, self.threshold)
        boxes = tuple(Box(float(c), *(float(v) for v in xywh)) for xywh, c in zip(boxes_xywh, confidences))
        facts, mask = radiograph_lib.with_known_facts(radiograph.facts, known), None
        if with_mask and self.reading.gives_masks:
            [mask] = self.reading.masks(outputs, self.threshold, [(facts.rows, facts.columns)])
        return Result(
            image_id=image_id,
            probability=float(self.reading.image_probability(outputs)[0]),
            threshold=self.threshold,
            boxes=boxes,
            facts=facts,
            source_format=radiograph.source_format,
            display_png=display_png(radiograph.grey_pixels(8)) if display else b"",
            model=self.reading.name,
            mask=mask,
            model_card=self.card,
        )

    def dicom_results(self, data: bytes, result: Result) -> list:
        """The DICOM result objects (pneumo_tf.inference.dicom_results) of a DICOM upload read by `predict`."""
        source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        findings = dicom_results.Findings(
            np.array([[b.x, b.y, b.width, b.height] for b in result.boxes]).reshape(-1, 4),
            np.array([b.confidence for b in result.boxes]), result.probability, self.threshold, result.mask)
        return dicom_results.result_objects(source, findings, self.algorithm)


def facts_of_form(form) -> PatientFacts | None:
    """The optional view, sex and age fields of an upload (for PNG/JPEG files, which have no header), or
    None when none is given; UploadError 400 for a value that is none of the allowed ones."""
    view, sex, age = (form.get(name, "").strip().upper() for name in ("view", "sex", "age"))
    if not (view or sex or age):
        return None
    if sex not in labels_lib.SEXES or not (age == "" or (age.isdigit() and int(age) <= 150)):
        raise UploadError(400, f"sex must be M, F, O or empty and age whole years (0-150) or empty, not {sex!r} and "
                          f"{age!r}")
    return PatientFacts(int(age) if age else -1, sex, view)


def _raw_metadata(batch: dict) -> dict:
    """The record's header facts a model with a metadata input takes beside the images."""
    return {name: batch[name] for name in metadata.RAW_KEYS.values()}


def display_png(grey: np.ndarray) -> bytes:
    """The page's picture of an 8-bit grey image: PNG, downscaled to DISPLAY_MAX_SIZE when larger."""
    picture = Image.fromarray(grey)
    picture.thumbnail((DISPLAY_MAX_SIZE, DISPLAY_MAX_SIZE), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class InMemoryRequest(flask.Request):
    """Keeps uploaded files in memory: Werkzeug spools those over 500 KB to a temporary file.

    MAX_CONTENT_LENGTH bounds what one request may hold.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


FORMAT_NAMES = {images.DICOM: "DICOM", images.PNG: "PNG", images.JPEG: "JPEG"}


def _page_facts(facts: dicom.HeaderFacts, source_format: str) -> list[tuple[str, str]]:
    spacing = facts.pixel_spacing
    return [
        ("Format", FORMAT_NAMES[source_format]),
        ("View", facts.view or UNKNOWN),
        ("Age", str(facts.age) if facts.age >= 0 else UNKNOWN),
        ("Sex", facts.sex or UNKNOWN),
        ("Pixel spacing", f"{spacing[0]:g} x {spacing[1]:g} mm" if any(spacing) else UNKNOWN),
        ("Size", f"{facts.columns} x {facts.rows} pixels"),
    ]


def _read_upload(upload_reading: UploadReading, results: bool = False) -> Result:
    """The request's upload read by `upload_reading`; with `results`, a DICOM's result objects too (zipped)."""
    upload = flask.request.files.get("file")
    data = upload.read() if upload is not None else b""
    if not data and not (upload and upload.filename):  # a browser sends an empty, unnamed part
        raise UploadError(400, "no file: choose a DICOM (.dcm), PNG or JPEG file and upload it in the form field "
                          "'file'")
    name = upload.filename or "upload"
    if not data:
        raise UploadError(400, f"{name} is empty")
    try:
        result = upload_reading.predict(data, radiograph_lib.image_id_of(name), with_mask=results,
                                        known=facts_of_form(flask.request.form))
    except RejectedFile as error:
        raise UploadError(422, f"{name} cannot be read as a radiograph: {error}") from error
    except Busy as error:
        raise UploadError(503, f"the server is busy ({error}): try again in a moment") from error
    if results and result.source_format == images.DICOM:
        try:
            archive = dicom_results.zip_archive(upload_reading.dicom_results(data, result), result.image_id)
        except Exception:  # noqa: BLE001 - a header without what results copy (UIDs): the reading still shows
            return result
        result = dataclasses.replace(result, dicom_results=archive)
    return result


def _add_request_guards(app: flask.Flask, trusted_hosts) -> None:
    """Registers the checks of every request and the security headers of every response."""

    @app.before_request
    def same_site_only():
        """Only requests naming a host this server answers to (against DNS rebinding: a page whose own name
        resolves to this machine), and POSTs only from its own pages. Browsers say where a request comes
        from in Sec-Fetch-Site (same-origin, or none when typed in); older ones only in Origin, which is
        "null" from a page whose referrer policy is no-referrer (this page's): refused too."""
        host = flask.request.host
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
        if not (_is_ip_address(name) or host_is_trusted(name, trusted_hosts)):
            flask.abort(400, f"this server does not answer to the host {name} (--trusted_hosts)")
        if flask.request.method != "POST":
            return
        site, origin = flask.request.headers.get("Sec-Fetch-Site"), flask.request.headers.get("Origin")
        if site not in (None, "same-origin", "none") or (
                site is None and origin is not None and urllib.parse.urlsplit(origin).netloc != host):
            flask.abort(403, f"a POST from another site ({origin or site}) is refused")

    @app.after_request
    def security_headers(response):
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if flask.request.method == "POST":  # results are one person's: no cache keeps them
            response.headers["Cache-Control"] = "no-store"
        return response


def create_app(model_dir: str, **settings) -> flask.Flask:
    """The Flask app serving the exported model (or ensemble) in `model_dir` (see the module docstring);
    `settings` are ServeConfig's other fields (max_upload_mb=..., reading=..., ...)."""
    config = ServeConfig(model_dir, **settings)
    check_constraints(config)
    upload_reading = UploadReading(model_dir, config.reading, config.limit, config.max_conversions, config.timeout)
    max_upload_mb = config.max_upload_mb
    trusted_hosts = _trusted_hosts(config)
    app = flask.Flask(__name__, template_folder="templates", static_folder="static")
    app.request_class = InMemoryRequest
    # Flask reads FLASK_DEBUG from the environment; this app never runs in debug mode.
    app.config["DEBUG"] = False
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 2**20)
    app.extensions["pneumo_tf.reading"] = upload_reading
    limit = f"{max_upload_mb:g} MB"

    def page(result: Result | None = None, error: str | None = None, status: int = 200):
        image = base64.b64encode(result.display_png).decode("ascii") if result else None
        archive = base64.b64encode(result.dicom_results).decode("ascii") if result and result.dicom_results else None
        html = flask.render_template(
            "index.html", result=result, image=image, dicom_results=archive, error=error, limit=limit,
            facts=_page_facts(result.facts, result.source_format) if result else [],
            model=upload_reading.reading.name, threshold=upload_reading.threshold,
        )
        return html, status

    _add_request_guards(app, trusted_hosts)

    @app.get("/")
    def index():
        return page()

    @app.post("/")
    def upload_page():
        try:
            return page(_read_upload(upload_reading, results=True))
        except UploadError as error:
            return page(error=error.message, status=error.status)

    @app.post("/api/dicom_results")
    def api_dicom_results():
        try:
            result = _read_upload(upload_reading, results=True)
        except UploadError as error:
            return flask.jsonify(error=error.message), error.status
        if result.dicom_results is None and result.source_format != images.DICOM:
            return flask.jsonify(error=f"{result.image_id} is a {FORMAT_NAMES[result.source_format]} file: it has no "
                                 "patient, study or UIDs, so no DICOM results refer to it"), 422
        if result.dicom_results is None:
            return flask.jsonify(error=f"{result.image_id}'s header lacks what DICOM results refer to or copy "
                                 "(its study, series and instance UIDs)"), 422
        return flask.Response(result.dicom_results, mimetype="application/zip", headers={
            "Content-Disposition": f'attachment; filename="{result.image_id}.dicom_results.zip"'})

    @app.post("/api/predict")
    def api_predict():
        try:
            return flask.jsonify(_read_upload(upload_reading).to_json())
        except UploadError as error:
            return flask.jsonify(error=error.message), error.status

    @app.get("/healthz")
    def healthz():
        return flask.jsonify(status="ok", model=upload_reading.reading.name,
                             image_size=upload_reading.image_size, threshold=upload_reading.threshold,
                             model_card_sha256=upload_reading.card["card_sha256"])

    @app.errorhandler(exceptions.RequestEntityTooLarge)
    def too_large(error):
        message = f"the upload is larger than the limit of {limit} (--max_upload_mb)"
        if flask.request.path.startswith("/api/"):
            return flask.jsonify(error=message), 413
        return page(error=message, status=413)

    @app.errorhandler(exceptions.HTTPException)
    def api_http_error(error):
        if flask.request.path.startswith("/api/"):
            return flask.jsonify(error=f"{error.name}: {error.description}"), error.code
        return error

    return app


def _trusted_hosts(config: ServeConfig) -> list[str]:
    """The host names requests may name: localhost, --host, this machine's names when it listens on every
    interface, and --trusted_hosts."""
    names = ["localhost", *config.trusted_hosts]
    if config.host in ("", "0.0.0.0", "::"):
        names += [socket.gethostname(), socket.getfqdn()]
    elif not _is_ip_address(config.host):
        names.append(config.host)
    return names


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# Multipart framing around the file: the WSGI server admits this much more than --max_upload_mb, so the app
# answers an upload just over the limit with its own message.
MULTIPART_ALLOWANCE = 2**20


def make_server(app, config: ServeConfig):
    """A waitress server of `app` at config.host:port (call .run(); .close() stops it; .effective_port).

    --threads request threads (the most requests in the app at once); a connection silent for --timeout
    seconds is closed; a request body over --max_upload_mb (plus MULTIPART_ALLOWANCE) is refused with 413
    before the app sees it, and a body is kept in memory, never spooled to a temporary file.
    """
    import waitress

    body = int(config.max_upload_mb * 2**20) + MULTIPART_ALLOWANCE
    try:
        return waitress.create_server(
            app, host=config.host, port=config.port, threads=config.threads, channel_timeout=config.timeout,
            cleanup_interval=max(1.0, min(30.0, config.timeout / 2)), max_request_body_size=body,
            inbuf_overflow=body, ident="pneumo_tf")
    except OSError as error:
        raise UserError(f"cannot listen on {config.host}:{config.port}: {error.strerror or error}") from error
