"""Predict boxes with an exported model and write a Kaggle submission CSV.

    python -m pneumo_tf.predict --model_dir=runs/mask_resnet --dicom_dir=stage_2_test_images \\
        --output=submission.csv

A DICOM folder is converted into temporary records first (same pipeline and
preprocessing as training; removed afterwards); a converted records folder is read
directly with --records_dir (and --split, default test). The threshold defaults to
the one `python -m pneumo_tf.evaluate` saved into the model's pneumo_tf.json.
"""
import sys

from absl import app, flags

from pneumo_tf.inference import offline
from pneumo_tf.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Folder of a trained model (model.keras + pneumo_tf.json).")
flags.DEFINE_string("dicom_dir", None, "Folder of DICOM files to predict (every file is predicted or reported as "
                    "rejected).")
flags.DEFINE_string("records_dir", None, "Instead of --dicom_dir: a folder written by python -m pneumo_tf.convert.")
flags.DEFINE_string("split", "test", "Split of --records_dir to predict.")
flags.DEFINE_string("output", None, "Submission CSV to write (patientId,PredictionString; boxes in source pixels).")
flags.DEFINE_float("threshold", None, "Confidence threshold (default: the one saved in the model's pneumo_tf.json).")
flags.DEFINE_integer("batch_size", 16, "Images per model call.")
flags.DEFINE_string("overlay_dir", None, "Also write one PNG per image with its predicted boxes and scores here.")
flags.DEFINE_integer("overlay_size", 512, "Overlays smaller than this many pixels are upscaled to it.")
flags.DEFINE_integer("convert_image_size", None, "How --dicom_dir is converted: 0 passes JPEG frames through, N "
                     "stores N x N PNGs; by default as the model's training records were converted (its pixels exactly).")
flags.DEFINE_integer("workers", 0, "Processes converting --dicom_dir; 0 uses all cores.")
flags.mark_flags_as_required(["model_dir", "output"])

MAX_REJECTS_SHOWN = 10


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = offline.PredictConfig(
        model_dir=FLAGS.model_dir, output=FLAGS.output, records_dir=FLAGS.records_dir, split=FLAGS.split,
        dicom_dir=FLAGS.dicom_dir, threshold=FLAGS.threshold, batch_size=FLAGS.batch_size,
        overlay_dir=FLAGS.overlay_dir, overlay_size=FLAGS.overlay_size,
        convert_image_size=FLAGS.convert_image_size, workers=FLAGS.workers or None,
    )
    try:
        summary = offline.predict(config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, reason in summary["rejects"][:MAX_REJECTS_SHOWN]:
        print(f"rejected {path}: {reason}", file=sys.stderr)
    if len(summary["rejects"]) > MAX_REJECTS_SHOWN:
        print(f"... and {len(summary['rejects']) - MAX_REJECTS_SHOWN} more rejected files", file=sys.stderr)
    if not summary["model_has_boxes"]:
        print("note: the model is a classifier (no mask output): every PredictionString is empty", file=sys.stderr)
    print(f"{summary['images']} images from {summary['source']}: {summary['boxes']} boxes on "
          f"{summary['images_with_boxes']} images at threshold {summary['threshold']:g}, "
          f"{len(summary['rejects'])} rejected -> {summary['output']}")
    return 0


if __name__ == "__main__":
    app.run(main)
