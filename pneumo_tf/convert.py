"""Convert an RSNA-layout folder of DICOM, PNG or JPEG radiographs into TFRecord shards with a manifest.

    python -m pneumo_tf.convert --dicom_dir=stage_2_train_images \\
        --labels_csv=stage_2_train_labels.csv --class_info_csv=stage_2_detailed_class_info.csv \\
        --test_dicom_dir=stage_2_test_images --output_dir=records

A folder may hold DICOMs, PNGs and JPEGs in any mix (NIH ChestX-ray14, CheXpert, Kaggle's
PNG/JPEG mirrors): each file is read by what its content is, its name without the
extension is its id (patientId in the labels CSV). --input_dir and --test_input_dir are
the same flags under names that do not say DICOM.
"""
from absl import flags

from pneumo_tf import cli
from pneumo_tf.records import shards

FLAGS = flags.FLAGS
flags.DEFINE_string("dicom_dir", None, "Folder of training images: DICOM, PNG or JPEG files, in any mix (every "
                    "file in it is converted or rejected; its name without .dcm/.png/.jpg/.jpeg is its id).")
flags.DEFINE_string("labels_csv", None, "stage_2_train_labels.csv (patientId,x,y,width,height,Target). "
                    "Without it every readable image goes to the 'test' split with target and class -1.")
flags.DEFINE_string("class_info_csv", None, "stage_2_detailed_class_info.csv (patientId,class): the three-way "
                    "class used for stratification and stored in label/class.")
flags.DEFINE_string("test_dicom_dir", None, "A second folder converted as the unlabeled 'test' split in the same run.")
flags.DEFINE_alias("input_dir", "dicom_dir")
flags.DEFINE_alias("test_input_dir", "test_dicom_dir")
flags.DEFINE_string("output_dir", None, "Where shards, manifest.json and rejects.csv go. Rerunning into it with "
                    "the same options resumes (finished shards are kept).")
cli.define_flags(shards.ConvertOptions)
flags.DEFINE_integer("workers", 0, "Worker processes building examples; 0 uses all cores.")
flags.DEFINE_integer("num_workers", 1, "Machines sharing this conversion: each writes its share of the shards "
                     "into the same --output_dir; then run once with --finalize to write the manifest.")
flags.DEFINE_integer("worker_index", 0, "This machine's index in [0, --num_workers).")
flags.DEFINE_bool("finalize", False, "With --num_workers > 1: write manifest.json and rejects.csv once every "
                  "machine has written its shards.")
flags.mark_flags_as_required(["dicom_dir", "output_dir"])


def main():
    manifest = shards.convert(
        FLAGS.dicom_dir, FLAGS.output_dir, FLAGS.labels_csv, FLAGS.class_info_csv, FLAGS.test_dicom_dir,
        cli.config_from_flags(shards.ConvertOptions), workers=FLAGS.workers or None, num_machines=FLAGS.num_workers,
        machine_index=FLAGS.worker_index, finalize=FLAGS.finalize or FLAGS.num_workers == 1,
    )
    if manifest is None:
        print(f"worker {FLAGS.worker_index} of {FLAGS.num_workers}: shards written to {FLAGS.output_dir}")
        return
    counts = ", ".join(f"{split} {entry['records']}" for split, entry in manifest["splits"].items())
    print(f"{manifest['records']} records ({counts}), {manifest['rejects']} rejects -> {FLAGS.output_dir} "
          f"({manifest['files_per_second']} files/s)")


if __name__ == "__main__":
    cli.run(main)
