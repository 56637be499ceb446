"""Run a DICOM node: a Storage SCP that predicts every radiograph sent to it and sends the results back.

    python -m pneumo_tf.dicom_node --model_dir=runs/mask_resnet --port=11112 \\
        --destination=PACS@pacs.example.org:104 [--output_dir=results/] [--host=0.0.0.0]

See pneumo_tf/inference/storage_scp.py for what it accepts, the statuses it answers and what it sends.
--verbosity=1 shows TensorFlow's start-up logging; the node logs refusals and failed sends.
"""
import logging
import threading

from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from pneumo_tf.inference import storage_scp  # noqa: E402
from pneumo_tf.records import dicom  # noqa: E402

cli.define_flags(storage_scp.NodeConfig)


def main():
    dicom.quiet_pydicom()  # RSNA headers would warn on every image
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pneumo_tf").setLevel(logging.INFO)
    config = cli.config_from_flags(storage_scp.NodeConfig)
    node = storage_scp.DicomNode(config)
    port = node.start()
    where = " and ".join(part for part in (config.destination and f"sending results to {config.destination}",
                                           config.output_dir and f"writing them to {config.output_dir}") if part)
    print(f"DICOM node {config.ae_title} at {config.host}:{port}, {where} (Ctrl+C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


if __name__ == "__main__":
    cli.run(main)
