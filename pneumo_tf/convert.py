"""Convert an RSNA-layout folder of DICOM, PNG or JPEG radiographs into TFRecord shards with a manifest.

    python -m pneumo_tf.convert --dicom_dir=stage_2_train_images \\
        --labels_csv=stage_2_train_labels.csv --class_info_csv=stage_2_detailed_class_info.csv \\
        --test_dicom_dir=stage_2_test_images --output_dir=records

A folder may hold DICOMs, PNGs and JPEGs in any mix (NIH ChestX-ray14, CheXpert, Kaggle's
PNG/JPEG mirrors): each file is read by what its content is, its name without the
extension is its id (patientId in the labels CSV). --input_dir and --test_input_dir are
the same flags under names that do not say DICOM. Every flag is a field of
pneumo_tf.records.shards.ConvertConfig.

On many machines, as an Apache Beam pipeline (here Dataflow; see BUILD.md):

    python -m pneumo_tf.convert --dicom_dir=gs://B/stage_2_train_images ... --output_dir=gs://B/records \\
        --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,setup_file=./setup.py"
"""
from pneumo_tf import cli
from pneumo_tf.records import beam, shards

cli.define_flags(shards.ConvertConfig)


def main():
    config = cli.config_from_flags(shards.ConvertConfig)
    config.validate()
    # The local pool or Beam; Beam's options are checked (installed, runner known) before anything is written.
    writer = (beam.BeamPipeline(config.beam_pipeline_options) if config.beam_pipeline_options
              else shards.LocalPool(config.workers or None))
    manifest = shards.convert(config.dicom_dir, config.output_dir, config.labels_csv, config.class_info_csv,
                              config.test_dicom_dir, config.options, writer, config.metadata_csv, config.start_over)
    counts = ", ".join(f"{split} {entry['records']}" for split, entry in manifest["splits"].items())
    print(f"{manifest['records']} records ({counts}), {manifest['rejects']} rejects -> {config.output_dir} "
          f"({manifest['files_per_second']} files/s)")


if __name__ == "__main__":
    cli.run(main)
