"""Serve an exported model as a web page and a JSON API.

    python -m pneumo_tf.serve --model_dir=runs/mask_resnet [--host=127.0.0.1] [--port=8080]

See pneumo_tf/inference/web.py for what the page shows and how an upload is read.
"""
import sys

from absl import app as absl_app, flags
from werkzeug import serving

from pneumo_tf.errors import UserError
from pneumo_tf.inference.web import DEFAULT_MAX_UPLOAD_MB, create_app
from pneumo_tf.records import dicom


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when run as a program, so importing create_app adds none."""
    flags.DEFINE_string("model_dir", None, "Folder of a trained model (model.keras + pneumo_tf.json); the threshold "
                        "saved there by python -m pneumo_tf.evaluate makes the decision.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on. 127.0.0.1 (default) serves this machine only; "
                        "0.0.0.0 serves every network interface (the page has no authentication).")
    flags.DEFINE_integer("port", 8080, "Port to listen on (0 picks a free one).")
    flags.DEFINE_float("max_upload_mb", DEFAULT_MAX_UPLOAD_MB, "Largest upload accepted, in MB; a larger one gets "
                       "HTTP 413 and a message.")
    flags.mark_flags_as_required(["model_dir"])


def main(argv):
    if len(argv) > 1:
        raise absl_app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    dicom.quiet_pydicom()  # RSNA headers would warn on every upload
    try:
        if not 0 <= FLAGS.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, not {FLAGS.port}")
        flask_app = create_app(FLAGS.model_dir, FLAGS.max_upload_mb)
        try:
            server = serving.make_server(FLAGS.host, FLAGS.port, flask_app, threaded=True)
        except OSError as error:
            raise UserError(f"cannot listen on {FLAGS.host}:{FLAGS.port}: {error.strerror or error}") from error
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"serving {FLAGS.model_dir} at http://{FLAGS.host}:{server.server_port}/ (Ctrl+C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    define_flags()
    absl_app.run(main)
