"""One input file -> one record: read a DICOM, PNG or JPEG radiograph and build its example, or reject it.

`convert_file` is a pure function of the file and the `ConvertOptions`: the same file and
options give the same record, whatever process runs it. The converter's workers
(records/shards.py), prediction and the web page (an upload) all convert files through it, so
a model sees the same pixels for the same file everywhere; `read_radiograph` is also the web
page's reader of the picture and the header facts. No TensorFlow here.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from pneumo_tf import fileio
from pneumo_tf.cli import check_constraints, option
from pneumo_tf.errors import RejectedFile, UserError
from pneumo_tf.records import boxes as box_lib, dicom, images, jpeg, masks, pixels, schema
from pneumo_tf.records.labels import PatientFacts, PatientLabels

IMAGE_EXTENSIONS = (".dcm", ".png", ".jpg", ".jpeg")
MIN_STORED_SIZE = 8  # the smallest --image_size that stores resized pixels


def image_id_of(path: str) -> str:
    """The file name without a .dcm, .png, .jpg or .jpeg extension (any case): RSNA's patientId."""
    name = os.path.basename(path)
    stem, extension = os.path.splitext(name)
    return stem if extension.lower() in IMAGE_EXTENSIONS else name



@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What determines the records' bytes. A rerun into the same folder must use the same."""

    image_size: int = option(0, "0 keeps source pixels and copies JPEG Baseline 8-bit grey frames byte for byte; N "
                             f"(at least {MIN_STORED_SIZE}) stores every image as an N x N PNG (boxes stay "
                             "normalised).", minimum=0)
    bit_depth: int = option(8, "8, or 16 to keep up to 16 bits of precision in transcoded (non-passthrough) PNGs; "
                            "stored ranges are scaled to the full 16-bit range.", choices=(8, 16))
    val_fraction: float = option(0.2, "Share of labeled patients in the 'val' split, stratified by class (not used "
                                 "with --folds).", minimum=0.0, exclusive_maximum=1.0)
    folds: int = option(0, "Cut the labeled patients into this many folds, stratified by class, and put fold --fold in "
                        "'val', the rest in 'train' (k-fold cross-validation: convert once per fold with the same "
                        "--seed); 0: one split by --val_fraction.", minimum=0)
    fold: int = option(0, "With --folds: which fold (0 .. folds - 1) is the 'val' split.", minimum=0)
    seed: int = option(0, "Seed of the train/val split and of the record order within shards.")
    num_shards: int = option(0, "Shards per split; 0 picks a count giving shards of at most ~128 MB and at least 8 "
                             "per split with 512+ files (so workers convert and readers interleave in parallel).",
                             minimum=0)
    limit: pixels.ImageLimit = option(pixels.ImageLimit())

    def validate(self) -> None:
        check_constraints(self)
        if 0 < self.image_size < MIN_STORED_SIZE:
            raise UserError(f"--image_size must be 0 (source pixels) or at least {MIN_STORED_SIZE}, "
                            f"not {self.image_size}")
        if self.folds == 1:
            raise UserError("--folds must be 0 (no folds) or at least 2, not 1")
        if self.fold >= max(self.folds, 1):
            raise UserError(f"--fold must be in [0, {max(self.folds, 1)}) with --folds={self.folds}, not {self.fold}")


def _png(array: np.ndarray) -> bytes:
    # Level 1: ~4x faster than the default 6 on radiographs for files ~15% larger.
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _resized(grey: np.ndarray, size: int) -> np.ndarray:
    if grey.dtype == np.uint8:
        return np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
    # Pillow resamples 16-bit through 32-bit float mode.
    resized = Image.fromarray(grey.astype(np.float32)).resize((size, size), Image.BILINEAR)
    return np.clip(np.round(np.asarray(resized)), 0, 65535).astype(np.uint16)


@dataclasses.dataclass(frozen=True)
class Radiograph:
    """One input file, read as far as converting it needs; whatever its format, it converts alike."""

    source_format: str  # images.DICOM, PNG or JPEG: what the file's content is
    facts: dicom.HeaderFacts  # an image file's: its size, the rest unknown
    passthrough: bytes | None  # a JPEG stream that is the image as it is, stored unchanged at source size
    jpeg_stream: bytes | None  # a JPEG stream of the image, decoded at 1/2..1/8 scale when pre-resizing
    grey_pixels: Callable[[int], np.ndarray]  # bit_depth -> grey pixels at source size (pixels.to_bit_depth),
    # decoded once per bit depth: the web page shows the pixels it converted


def _read_bytes(source, count: int = -1) -> bytes:
    """The first `count` bytes (all when -1) of a path or a seekable binary file object, left where it was."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            return handle.read(count)
    start = source.tell()
    try:
        return source.read(count)
    finally:
        source.seek(start)


def read_radiograph(source, limit: int = pixels.MAX_DECODED_BYTES) -> Radiograph:
    """A DICOM, PNG or JPEG file (a path or a binary file object), told apart by its first bytes.

    Raises RejectedFile with the reason when it is none of them or cannot be read, pixels.ImageTooLarge
    when its header claims an image of more than `limit` bytes decoded (nothing is decoded then).
    """
    if isinstance(source, str) and fileio.is_url(source):
        with fileio.open_file(source, "rb") as handle:
            source = io.BytesIO(handle.read())  # one request; the readers below seek in memory
    head = _read_bytes(source, images.SNIFF_BYTES)
    source_format = images.sniff(head)
    if source_format == images.DICOM:
        ds = dicom.read(source)
        dicom.check_decoded_size(ds, limit)
        frame = dicom.passthrough_frame(ds)
        return Radiograph(images.DICOM, dicom.header_facts(ds), frame, frame,
                          functools.cache(functools.partial(dicom.grey_pixels, ds)))
    if not head:
        raise RejectedFile("empty file")
    if source_format is None:
        raise RejectedFile("not a DICOM, PNG or JPEG file (no DICM prefix at byte 128, no PNG or JPEG signature)")
    image = images.read(_read_bytes(source), source_format, limit)
    facts = dicom.HeaderFacts(rows=image.height, columns=image.width, frames=image.frames, view="", age=-1, sex="",
                              pixel_spacing=(0.0, 0.0))
    return Radiograph(source_format, facts, images.passthrough_frame(image),
                      image.data if source_format == images.JPEG else None,
                      functools.cache(functools.partial(images.grey_pixels, image)))


def with_known_facts(facts: dicom.HeaderFacts, known: PatientFacts | None) -> dicom.HeaderFacts:
    """The header's facts completed by `known` (a metadata CSV's row, a form's fields): each fact the
    header lacks is taken from `known`; one both give must agree, or the file is rejected with why."""
    if known is None:
        return facts
    values = {}
    for name, unknown in (("age", -1), ("sex", ""), ("view", "")):
        header, given = getattr(facts, name), getattr(known, name)
        if given != unknown and header != unknown and str(header).upper() != str(given).upper():
            raise RejectedFile(f"the metadata says {name} {given!r}, the DICOM header {header!r}")
        values[name] = header if header != unknown else given
    return dataclasses.replace(facts, **values)


def convert_file(source, image_id: str, labels: PatientLabels | None, options: ConvertOptions,
                 known: PatientFacts | None = None):
    """One DICOM, PNG or JPEG file (a path, a binary file object, or a Radiograph read_radiograph read
    from one) -> (Record, facts dict).

    `known`: facts from a metadata CSV (or a form) for a file whose header lacks them (`with_known_facts`).
    Pure: the same file, facts and options give the same record. Raises RejectedFile with the reason.
    """
    radiograph = source if isinstance(source, Radiograph) else read_radiograph(source, options.limit.bytes)
    facts = with_known_facts(radiograph.facts, known)
    size = options.image_size
    if radiograph.passthrough is not None and size == 0:
        jpeg.verify_decodes(radiograph.passthrough)  # stored unchanged, so the pipeline must be able to decode it
        encoded, image_format, height, width = radiograph.passthrough, schema.JPEG, facts.rows, facts.columns
    elif radiograph.jpeg_stream is not None and size and options.bit_depth == 8:
        # Let the JPEG decoder scale by 1/2..1/8 (DCT scaling): far cheaper than a full decode.
        grey = np.asarray(jpeg.decode(radiograph.jpeg_stream, size).resize((size, size), Image.BILINEAR))
        encoded, image_format, height, width = _png(grey), schema.PNG, size, size
    else:
        grey = radiograph.grey_pixels(options.bit_depth)
        if size:
            grey = _resized(grey, size)
        encoded, image_format = _png(grey), schema.PNG
        height, width = grey.shape

    boxes = ()
    if labels is not None:
        boxes = tuple(box_lib.xywh_to_normalised(b, facts.columns, facts.rows) for b in labels.boxes)
    mask_encoded, mask_row_repeats, mask_col_repeats = masks.encode(boxes, height, width)
    record = schema.Record(
        image_id=image_id,
        image_encoded=encoded,
        image_format=image_format,
        height=height,
        width=width,
        source_height=facts.rows,
        source_width=facts.columns,
        mask_encoded=mask_encoded,
        mask_row_repeats=mask_row_repeats,
        mask_col_repeats=mask_col_repeats,
        target=labels.target if labels is not None else schema.UNLABELED,
        label_class=labels.label_class if labels is not None else schema.UNLABELED,
        boxes=boxes,
        view=facts.view,
        age=facts.age,
        sex=facts.sex,
        pixel_spacing=facts.pixel_spacing,
    )
    return record, {"format": radiograph.source_format, "passthrough": image_format == schema.JPEG,
                    "multi_frame": facts.frames > 1}


def convert_or_reject(path, image_id: str, labels: PatientLabels | None, options: ConvertOptions,
                      known: PatientFacts | None = None):
    """(record, facts), or (None, reason) for a file that cannot become a record (never raises)."""
    try:
        return convert_file(path, image_id, labels, options, known)
    except RejectedFile as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - one bad file must never stop the run
        return None, f"conversion failed: {type(error).__name__}: {error}"
