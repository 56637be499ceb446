"""Serve an exported model as a web page and a JSON API.

    python -m pneumo_tf.serve --model_dir=runs/mask_resnet [--tta=hflip] [--host=127.0.0.1] [--port=8080]
    python -m pneumo_tf.serve --model_dir=runs/ensemble     # written by python -m pneumo_tf.evaluate --ensemble_dir

See pneumo_tf/inference/web.py for what the page shows, how an upload is read and what the server
refuses. --verbosity=1 shows TensorFlow's start-up logging.
"""
from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from pneumo_tf.inference import web  # noqa: E402
from pneumo_tf.records import dicom  # noqa: E402

cli.define_flags(web.ServeConfig)


def main():
    dicom.quiet_pydicom()  # RSNA headers would warn on every upload
    config = cli.config_from_flags(web.ServeConfig)
    cli.check_constraints(config)
    server = web.make_server(web.create_app(**vars(config)), config)
    print(f"serving {config.model_dir} at http://{config.host}:{server.effective_port}/ (Ctrl+C stops)", flush=True)
    try:
        server.run()
    finally:
        server.close()


if __name__ == "__main__":
    cli.run(main)
