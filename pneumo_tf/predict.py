"""Predict boxes with an exported model and write a Kaggle submission CSV.

    python -m pneumo_tf.predict --model_dir=runs/mask_resnet --dicom_dir=stage_2_test_images \\
        --output=submission.csv

A folder of DICOM, PNG or JPEG files is converted into temporary records first (same pipeline and
preprocessing as training; removed afterwards; --input_dir is --dicom_dir under a name that does not
say DICOM, as in convert); a converted records folder is read
directly with --records_dir (and --split, default test). The threshold defaults to
the one `python -m pneumo_tf.evaluate` saved into the model's pneumo_tf.json.
--verbosity=1 shows TensorFlow's start-up logging.
"""
import sys

from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from pneumo_tf.inference import offline  # noqa: E402
from pneumo_tf.models import card as model_card  # noqa: E402

cli.define_flags(offline.PredictConfig)
MAX_REJECTS_SHOWN = 10


def main():
    summary = offline.predict(cli.config_from_flags(offline.PredictConfig))
    for path, reason in summary["rejects"][:MAX_REJECTS_SHOWN]:
        print(f"rejected {path}: {reason}", file=sys.stderr)
    if len(summary["rejects"]) > MAX_REJECTS_SHOWN:
        print(f"... and {len(summary['rejects']) - MAX_REJECTS_SHOWN} more rejected files", file=sys.stderr)
    if not summary["model_has_boxes"]:
        print("note: the model is a classifier (it gives no boxes): every PredictionString is empty", file=sys.stderr)
    results = summary.get("dicom_results")
    if results and results["without_dicom_context"]:
        print(f"note: {results['without_dicom_context']} PNG/JPEG images have no DICOM context (patient, study, UIDs): "
              "no DICOM results for them", file=sys.stderr)
    if results:
        print(f"DICOM results (SR, presentation state{', segmentation' if summary['model_has_masks'] else ''}) of "
              f"{results['images']} images -> {results['folder']}")
    print(f"{summary['images']} images from {summary['source']}: {summary['boxes']} boxes on "
          f"{summary['images_with_boxes']} images at threshold {summary['threshold']:g}, "
          f"{len(summary['rejects'])} rejected -> {summary['output']} (model card: {summary['model_card']})")
    for warning in model_card.warnings(model_card.read_file(summary["model_card"])):
        print(f"warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
