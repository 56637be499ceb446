"""Convert an RSNA-layout folder of DICOM, PNG or JPEG radiographs into TFRecord shards with a manifest.

    python -m pneumo_tf.convert --dicom_dir=stage_2_train_images \\
        --labels_csv=stage_2_train_labels.csv --class_info_csv=stage_2_detailed_class_info.csv \\
        --test_dicom_dir=stage_2_test_images --output_dir=records

A folder may hold DICOMs, PNGs and JPEGs in any mix (NIH ChestX-ray14, CheXpert, Kaggle's
PNG/JPEG mirrors): each file is read by what its content is, its name without the
extension is its id (patientId in the labels CSV). --input_dir and --test_input_dir are
the same flags under names that do not say DICOM.

On many machines, as an Apache Beam pipeline (here Dataflow; see BUILD.md):

    python -m pneumo_tf.convert --dicom_dir=gs://B/stage_2_train_images ... --output_dir=gs://B/records \\
        --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,setup_file=./setup.py"
"""
from absl import flags

from pneumo_tf import cli
from pneumo_tf.records import beam, radiograph, shards

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
cli.define_flags(radiograph.ConvertOptions)
flags.DEFINE_integer("workers", 0, "Local worker processes building examples (without --beam_pipeline_options); "
                     "0 uses all cores.")
flags.DEFINE_string("beam_pipeline_options", None, "Convert as an Apache Beam pipeline on many machines, with these "
                    "comma-separated Beam options, e.g. runner=DataflowRunner,project=P,region=R,temp_location="
                    "gs://B/tmp,setup_file=./setup.py (or runner=FlinkRunner,..., runner=SparkRunner,..., "
                    "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing). Same shards, "
                    "rejects and manifest as the local pool. Folders and CSVs may be URLs that tf.io.gfile reads "
                    '(gs://...). Needs pip install "pneumo_tf[beam]".')
flags.mark_flags_as_required(["dicom_dir", "output_dir"])


def main():
    options = cli.config_from_flags(radiograph.ConvertOptions)
    options.validate()
    # Checked (Beam installed, runner known) before anything is written.
    writer = (beam.BeamPipeline(FLAGS.beam_pipeline_options) if FLAGS.beam_pipeline_options
              else shards.LocalPool(FLAGS.workers or None))
    manifest = shards.convert(FLAGS.dicom_dir, FLAGS.output_dir, FLAGS.labels_csv, FLAGS.class_info_csv,
                              FLAGS.test_dicom_dir, options, writer)
    counts = ", ".join(f"{split} {entry['records']}" for split, entry in manifest["splits"].items())
    print(f"{manifest['records']} records ({counts}), {manifest['rejects']} rejects -> {FLAGS.output_dir} "
          f"({manifest['files_per_second']} files/s)")


if __name__ == "__main__":
    cli.run(main)
