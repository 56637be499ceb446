"""A DICOM node: a Storage SCP (pynetdicom) that reads every radiograph sent to it and sends the
model's results back as DICOM objects.

    python -m pneumo_tf.dicom_node --model_dir=runs/mask_resnet --port=11112 \
        --destination=PACS@pacs.example.org:104 [--output_dir=results/]

A modality or PACS sends CR, DX or Secondary Capture images to this AE (C-STORE). Each is read
as the web page reads an upload (pneumo_tf.inference.web.UploadReading: the converter's reader,
the model at its saved threshold) and its result objects (pneumo_tf.inference.dicom_results: a
TID 1500 SR, a presentation state with the boxes, a segmentation for models with masks) are
written to --output_dir as <source SOP Instance UID>.<SR|PR|SEG>.dcm and/or sent by C-STORE to
--destination, one association per image, by one sender thread (a slow or absent destination
never holds up the modality; a failed send is logged and counted, the files stay in
--output_dir when given).

The C-STORE response says what became of the image:
  0x0000 Success                   read; its results are written / queued for the destination
  0x0122 SOP Class Not Supported   not a radiograph (every storage SOP class is accepted at
                                   association, so a PACS forwarding a whole study sees which
                                   instance was refused, not a failed association)
  0xA900 Data Set Does Not Match   the data set's SOP Class UID is not the one of the request
  0xA700 Out of Resources          the header claims more decoded pixels than --max_image_mb
                                   (records.dicom.check_decoded_size: an image bomb, refused
                                   before any decoding), or no turn to be read came within
                                   --timeout (the web page's reading: two images at a time)
  0xC000 Cannot Understand         unreadable data set or undecodable pixels (ErrorComment says which)
  0x0110 Processing Failure        the image was read but writing its results failed
An object larger than --max_object_mb cannot be answered with a status (DIMSE answers a whole
request): the association is aborted as soon as the data passes the limit, so no request holds
more than that in memory. At most --max_associations associations run at once (more are
rejected, transient: the sender may retry); each waits at most --timeout seconds for its peer.

The node binds 127.0.0.1 unless --host says otherwise and accepts any calling AE title: DICOM
has no authentication, so expose it only on a network where that is acceptable.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import queue
import threading
import weakref

import pydicom
from pydicom.uid import UID, AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

from pneumo_tf.cli import check_constraints, option
from pneumo_tf.errors import RejectedFile, UserError
from pneumo_tf.inference import dicom_results
from pneumo_tf.models.reading import ReadingConfig
from pneumo_tf.records import dicom, pixels

LOG = logging.getLogger(__name__)

# What a chest radiograph arrives as: CR, DX (for presentation and for processing), and Secondary
# Capture (the RSNA challenge's files, digitised films).
RADIOGRAPH_SOP_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                          DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)
RESULT_SOP_CLASSES = (ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage, SegmentationStorage)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


def parse_destination(text: str) -> tuple[str, str, int]:
    """"AE@HOST:PORT" -> (AE title, host, port), or a UserError."""
    title, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    if not (at and colon and title and host and port.isdigit()) or len(title) > 16 or not 0 < int(port) < 65536:
        raise UserError(f"--destination must be AE@HOST:PORT (an AE title of at most 16 characters), not {text!r}")
    return title, host, int(port)


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    model_dir: str = option(help="Folder of a trained model or an ensemble folder; its saved threshold decides.")
    ae_title: str = option("PNEUMO_TF", "This node's AE title (what a modality or PACS is configured to send to).")
    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 listens on every interface (DICOM has no "
                       "authentication).")
    port: int = option(11112, "Port to listen on (0 picks a free one; DICOM's registered port is 104).", minimum=0,
                       maximum=65535)
    destination: str | None = option(None, "Where results are sent by C-STORE: AE@HOST:PORT (a PACS, a viewer).")
    output_dir: str | None = option(None, "Folder the results are also written to: <source SOP Instance UID>."
                                    "<SR|PR|SEG>.dcm.")
    max_associations: int = option(10, "Associations served at once; more are rejected (transient).", minimum=1)
    max_object_mb: float = option(256.0, "Largest object received, in MB; the association of a larger one is aborted.",
                                  exclusive_minimum=0.0)
    limit: pixels.ImageLimit = option(pixels.ImageLimit())  # --max_image_mb; a larger image: status 0xA700
    timeout: float = option(60.0, "Seconds a peer may stay silent (network, association and DIMSE timeouts).",
                            exclusive_minimum=0.0)
    reading: ReadingConfig = option(ReadingConfig())

    def validate(self) -> None:
        check_constraints(self)
        if self.destination is None and self.output_dir is None:
            raise UserError("give --destination (AE@HOST:PORT), --output_dir, or both: results need somewhere to go")
        if self.destination is not None:
            parse_destination(self.destination)
        if not 0 < len(self.ae_title) <= 16:
            raise UserError(f"--ae_title must have 1 to 16 characters, not {self.ae_title!r}")


def _status(code: int, comment: str = "") -> pydicom.Dataset:
    status = pydicom.Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]  # LO
    return status


class DicomNode:
    """The Storage SCP of `config`, with its sender thread. `start()` listens, `stop()` finishes the
    queued sends and closes. `counts` says what happened (received, refused, results, sent, send_failures)."""

    def __init__(self, config: NodeConfig, reading=None):
        config.validate()
        from pneumo_tf.inference import web  # the web page's reading of one file (Flask comes with it)

        self.config = config
        self.reading = reading or web.UploadReading(config.model_dir, config.reading, config.limit, wait=config.timeout)
        self.counts = {"received": 0, "refused": 0, "results": 0, "sent": 0, "send_failures": 0}
        self._counts_lock = threading.Lock()
        self._received_bytes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._aborted: weakref.WeakSet = weakref.WeakSet()
        self._sends: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="dicom-node-sender", daemon=True)
        self._server = None
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_associations = config.max_associations
        for name in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self.ae, name, config.timeout)
        decodable = _decodable_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            syntaxes = decodable if context.abstract_syntax in RADIOGRAPH_SOP_CLASSES else AllTransferSyntaxes
            self.ae.add_supported_context(context.abstract_syntax, syntaxes)
        self.ae.add_supported_context(Verification)
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    @property
    def port(self) -> int:
        return self._server.socket.getsockname()[1]

    def start(self) -> int:
        """Listens (in background threads); returns the port."""
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_PDU_RECV, self._on_pdu)]
        try:
            self._server = self.ae.start_server((self.config.host, self.config.port), block=False,
                                                evt_handlers=handlers)
        except OSError as error:
            raise UserError(f"cannot listen on {self.config.host}:{self.config.port}: "
                            f"{error.strerror or error}") from error
        self._sender.start()
        return self.port

    def stop(self) -> None:
        """Stops accepting, finishes the queued sends (each bounded by --timeout), closes."""
        if self._server is not None:
            self._server.shutdown()
        if self._sender.is_alive():
            self._sends.put(None)
            self._sender.join()

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self.counts[key] += 1

    # -- receiving ------------------------------------------------------------------------------

    def _on_pdu(self, event) -> None:
        """Aborts an association whose current request's data set passes --max_object_mb."""
        if not isinstance(event.pdu, P_DATA_TF) or event.assoc in self._aborted:
            return
        received = self._received_bytes.get(event.assoc, 0)
        for item in event.pdu.presentation_data_value_items:
            value = item.presentation_data_value
            if value[0] & 1:  # command fragments are small and bounded by the protocol
                continue
            received += len(value) - 1
            if received > self.config.max_object_mb * 2**20:
                LOG.warning("aborting the association of %s: an object of more than %g MB",
                            event.assoc.requestor.ae_title, self.config.max_object_mb)
                self._count("refused")
                self._aborted.add(event.assoc)
                event.assoc.abort()
                return
            if value[0] & 2:  # the request's last data set fragment
                received = 0
        self._received_bytes[event.assoc] = received

    def _on_store(self, event) -> pydicom.Dataset:
        self._count("received")
        status = self._read(event)
        if status.Status != SUCCESS:
            self._count("refused")
            LOG.warning("refused %s: 0x%04X %s", event.request.AffectedSOPInstanceUID, status.Status,
                        status.get("ErrorComment", ""))
        return status

    def _read(self, event) -> pydicom.Dataset:
        sop_class = UID(event.request.AffectedSOPClassUID)
        if sop_class not in RADIOGRAPH_SOP_CLASSES:
            return _status(SOP_CLASS_NOT_SUPPORTED, f"not a radiograph: {sop_class.name}")
        data = event.encoded_dataset(include_meta=True)
        try:
            source = pydicom.dcmread(io.BytesIO(data))  # pixel data stays encoded until read
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for a corrupt data set
            return _status(CANNOT_UNDERSTAND, f"unreadable data set: {type(error).__name__}")
        if source.get("SOPClassUID") != sop_class:
            return _status(DATA_SET_DOES_NOT_MATCH, f"SOP Class UID {source.get('SOPClassUID')} != request's")
        try:
            dicom.check_decoded_size(source, self.config.limit.bytes)
        except pixels.ImageTooLarge as error:
            return _status(OUT_OF_RESOURCES, str(error))
        from pneumo_tf.inference.web import Busy  # loaded with the reading

        try:
            result = self.reading.predict(data, str(source.SOPInstanceUID), with_mask=True, display=False)
        except RejectedFile as error:
            return _status(CANNOT_UNDERSTAND, str(error))
        except Busy as error:  # no turn to be read within the wait: the sender may retry
            return _status(OUT_OF_RESOURCES, f"busy: {error}")
        try:
            objects = self.reading.dicom_results(data, result)
            if self.config.output_dir is not None:
                dicom_results.write(objects, self.config.output_dir, str(source.SOPInstanceUID))
        except Exception as error:  # noqa: BLE001 - the modality is told, the node keeps serving
            LOG.exception("results of %s failed", source.SOPInstanceUID)
            return _status(PROCESSING_FAILURE, f"results failed: {type(error).__name__}")
        self._count("results")
        if self.config.destination is not None:
            self._sends.put(objects)
        return _status(SUCCESS)

    # -- sending --------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while (objects := self._sends.get()) is not None:
            try:
                self._send(objects)
            except Exception:  # noqa: BLE001 - a broken destination must not stop the sender
                LOG.exception("sending results failed")
                self._count("send_failures")

    def _send(self, objects: list[pydicom.Dataset]) -> None:
        title, host, port = parse_destination(self.config.destination)
        association = self.ae.associate(host, port, ae_title=title)
        if not association.is_established:
            LOG.error("cannot send results: no association with %s", self.config.destination)
            self._count("send_failures")
            return
        try:
            for dataset in objects:
                status = association.send_c_store(dataset)
                if status and status.Status == SUCCESS:
                    self._count("sent")
                else:
                    LOG.error("%s refused %s: %s", self.config.destination, dataset.Modality,
                              f"0x{status.Status:04X}" if status else "no response")
                    self._count("send_failures")
        finally:
            association.release()


def _decodable_transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes whose pixels this installation can decode (pydicom's decoders, pylibjpeg's)."""
    from pydicom.pixels import get_decoder

    found = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                found.append(uid)
        except NotImplementedError:
            continue
    return found
