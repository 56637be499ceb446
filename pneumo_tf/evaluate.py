"""Evaluate an exported model on a labeled split, or score a Kaggle submission file.

    python -m pneumo_tf.evaluate --model_dir=runs/mask_resnet --records_dir=records --split=val

prints and writes a threshold sweep table (accuracy, per-class precision/recall/F1,
AUC, challenge mAP), the confusion matrix at the chosen threshold, PR and ROC curves
(PNG and TensorBoard), and saves the threshold maximising mAP into the model's
pneumo_tf.json, where predict and the web page read it.

    python -m pneumo_tf.evaluate --submission=submission.csv --labels_csv=stage_2_train_labels.csv

prints the challenge mAP of any submission file over the patients it shares with the labels.
--verbosity=1 shows TensorFlow's start-up logging.
"""
import json
import math

from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from absl import flags  # noqa: E402

from pneumo_tf.errors import UserError  # noqa: E402
from pneumo_tf.evaluation import report, submission  # noqa: E402

cli.define_flags(report.EvaluateConfig)
flags.DEFINE_string("submission", None, "Score this Kaggle-format submission CSV (patientId,PredictionString) "
                    "against --labels_csv instead of evaluating a model.")
flags.DEFINE_string("labels_csv", None, "stage_2_train_labels.csv-format labels for --submission.")
FLAGS = flags.FLAGS


def score_submission() -> None:
    if not FLAGS.labels_csv:
        raise UserError("--submission needs --labels_csv to score against")
    if FLAGS.model_dir or FLAGS.records_dir:
        raise UserError("--submission scores a file on its own: drop --model_dir and --records_dir")
    result = submission.score_submission(FLAGS.submission, FLAGS.labels_csv)
    score = "undefined (no box and no prediction to score)" if math.isnan(result["map"]) else result["map"]
    print(f"challenge mAP {score} over {result['scored_images']} scored images "
          f"({result['patients']} patients in both {FLAGS.submission} and {FLAGS.labels_csv})")


def main():
    if FLAGS.submission:
        return score_submission()
    result = report.evaluate(cli.config_from_flags(report.EvaluateConfig))
    print(result.report())
    print(json.dumps(result.summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    cli.run(main)
