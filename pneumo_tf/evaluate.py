"""Evaluate an exported model on a labeled split, or score a Kaggle submission file.

    python -m pneumo_tf.evaluate --model_dir=runs/mask_resnet --records_dir=records --split=val

prints and writes a threshold sweep table (accuracy, per-class precision/recall/F1,
AUC, challenge mAP), the confusion matrix at the chosen threshold, PR and ROC curves
(PNG and TensorBoard), and saves the threshold maximising mAP into the model's
pneumo_tf.json, where predict and the web page read it.

    python -m pneumo_tf.evaluate --submission=submission.csv --labels_csv=stage_2_train_labels.csv

prints the challenge mAP of any submission file over the patients it shares with the labels.
"""
import json
import sys

from absl import app, flags

from pneumo_tf.evaluation import report
from pneumo_tf.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Folder of a trained model (model.keras + pneumo_tf.json).")
flags.DEFINE_string("records_dir", None, "Folder written by python -m pneumo_tf.convert (manifest.json + shards).")
flags.DEFINE_string("split", "val", "Labeled split to evaluate on (val, or train).")
flags.DEFINE_integer("batch_size", 16, "Images per model call.")
flags.DEFINE_list("thresholds", [str(t) for t in report.DEFAULT_THRESHOLDS],
                  "Confidence thresholds of the sweep, comma separated, each in (0, 1).")
flags.DEFINE_string("output_dir", None, "Where tables, curves and summary.json go "
                    "(default <model_dir>/evaluation/<split>).")
flags.DEFINE_bool("save_threshold", True, "Save the chosen threshold into the model's pneumo_tf.json "
                  "(turn off when evaluating on a split that should not tune the model, such as train).")
flags.DEFINE_string("submission", None, "Score this Kaggle-format submission CSV (patientId,PredictionString) "
                    "against --labels_csv instead of evaluating a model.")
flags.DEFINE_string("labels_csv", None, "stage_2_train_labels.csv-format labels for --submission.")


def _thresholds() -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in FLAGS.thresholds)
    except ValueError as error:
        raise UserError(f"--thresholds needs comma-separated numbers, got {','.join(FLAGS.thresholds)}") from error


def score_submission() -> int:
    if not FLAGS.labels_csv:
        raise UserError("--submission needs --labels_csv to score against")
    if FLAGS.model_dir or FLAGS.records_dir:
        raise UserError("--submission scores a file on its own: drop --model_dir and --records_dir")
    result = report.score_submission_file(FLAGS.submission, FLAGS.labels_csv)
    print(f"challenge mAP {result['map']} over {result['scored_images']} scored images "
          f"({result['patients']} patients in both {FLAGS.submission} and {FLAGS.labels_csv})")
    return 0


def evaluate_model() -> int:
    if not FLAGS.model_dir or not FLAGS.records_dir:
        raise UserError("give --model_dir and --records_dir (or --submission with --labels_csv)")
    config = report.EvaluateConfig(
        model_dir=FLAGS.model_dir, records_dir=FLAGS.records_dir, split=FLAGS.split, batch_size=FLAGS.batch_size,
        thresholds=_thresholds(), output_dir=FLAGS.output_dir, save_threshold=FLAGS.save_threshold,
    )
    result = report.evaluate(config)
    print(result.report())
    print(json.dumps(result.summary, indent=2, sort_keys=True))
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        return score_submission() if FLAGS.submission else evaluate_model()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    app.run(main)
