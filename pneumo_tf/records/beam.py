"""Conversion as an Apache Beam pipeline: one conversion spread over many machines by an engine
people already run (Dataflow, Flink, Spark; TensorFlow Datasets builds large data sets the same way).

    python -m pneumo_tf.convert ... \\
        --beam_pipeline_options="runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"

Only the writing of shards moves to Beam: `BeamPipeline` is a `shards.ShardWriter`, which the
command passes to `shards.convert` in place of the local process pool. The launching process
plans as locally (records/plan.py), then runs a pipeline whose elements are the pending
shards, one element per shard, each written whole by `shards.write_shard` (temporary name,
then rename), so the shards are byte-identical to the local process pool's and a retried
bundle writes the same bytes again. When the pipeline is done, the launching process writes
rejects.csv and the manifest from the shards' summaries, as locally.

Apache Beam is imported only here and only when asked for: `pip install "pneumo_tf[beam]"`.
"""
from __future__ import annotations

import functools
import os

from pneumo_tf import fileio
from pneumo_tf.errors import UserError
from pneumo_tf.records import shards as shards_lib
from pneumo_tf.records.plan import Shard, shard_from_json
from pneumo_tf.records.radiograph import ConvertOptions

# The workers read the shards' files from the plan the launching process wrote into _partial/
# (shards.PLAN_NAME, JSON: a worker never unpickles what a folder holds). Beam's Create would embed
# them in the job graph instead, and a large data set's file list (MIMIC-CXR: 377,110 files, ~50 MB)
# exceeds what runners accept there (Dataflow: 10 MB).
INSTALL_HINT = 'pip install "pneumo_tf[beam]" (in a checkout: pip install -e ".[beam]")'
METRICS_NAMESPACE = "pneumo_tf"


def pipeline_options(text: str):
    """Beam PipelineOptions from TFDS's form "runner=DataflowRunner,project=P,temp_location=gs://B/tmp".

    Checked before anything is written: Apache Beam installed, the runner known and importable.
    """
    try:
        from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
        from apache_beam.runners.runner import create_runner
    except ImportError as error:
        raise UserError(f"--beam_pipeline_options needs Apache Beam, which is not installed ({error}): "
                        f"{INSTALL_HINT}") from error
    options = PipelineOptions([f"--{item.strip()}" for item in text.split(",") if item.strip()])
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    try:
        create_runner(runner)
    except (ValueError, ImportError) as error:
        raise UserError(f"--beam_pipeline_options: runner {runner} cannot start: {error}") from error
    return options


class BeamPipeline:
    """A `shards.ShardWriter` that writes the pending shards with a Beam pipeline on the runner of
    `text` (pipeline_options' form); the options are checked when it is made."""

    def __init__(self, text: str):
        self.options = pipeline_options(text)

    def __call__(self, pending: list[Shard], output_dir: str, options: ConvertOptions) -> None:
        import apache_beam as beam

        if not pending:
            return
        plan_path = os.path.join(output_dir, shards_lib.PARTIAL_DIR, shards_lib.PLAN_NAME)
        with beam.Pipeline(options=self.options) as pipeline:
            _ = (
                pipeline
                | "Shards" >> beam.Create(sorted(shard.name for shard in pending))
                | "Write" >> beam.Map(write_named_shard, plan_path, output_dir, options)
            )


@functools.lru_cache(maxsize=1)
def _planned_shards(plan_path: str) -> dict:
    """The plan's shards by name, read once per worker process."""
    shards = map(shard_from_json, fileio.read_json(plan_path)["plan"]["shards"])
    return {shard.name: shard for shard in shards}


def write_named_shard(name: str, plan_path: str, output_dir: str, options: ConvertOptions) -> str:
    """One Beam element: writes the named shard of the plan; counts its records and rejects for the
    runner's monitoring (Dataflow's job page shows them while it runs)."""
    from apache_beam.metrics import Metrics

    summary = shards_lib.write_shard(_planned_shards(plan_path)[name], output_dir, options)
    Metrics.counter(METRICS_NAMESPACE, "records").inc(summary["records"])
    Metrics.counter(METRICS_NAMESPACE, "rejected_files").inc(len(summary["rejects"]))
    Metrics.counter(METRICS_NAMESPACE, "shards").inc()
    return name
