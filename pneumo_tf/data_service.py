"""Start a tf.data service dispatcher or worker: training's input pipeline on other machines' CPUs.

    python -m pneumo_tf.data_service --role=dispatcher --port=5050
    python -m pneumo_tf.data_service --role=worker --dispatcher=HOST:5050 --port=5051   # on each CPU machine
    python -m pneumo_tf.train ... --data_service=grpc://HOST:5050

Workers read the records at the paths the trainer names, so put them on storage every
machine reads (a shared file system, or gs:// records). Workers need TensorFlow only. The
server runs until the process is stopped. See pneumo_tf/data/remote.py for the processing
mode (dynamic sharding: each example once per pass over the split).
"""
from pneumo_tf import cli

cli.import_tensorflow_quietly()  # before anything imports TensorFlow
from pneumo_tf.data import remote  # noqa: E402

cli.define_flags(remote.ServiceConfig)


def main():
    remote.serve(cli.config_from_flags(remote.ServiceConfig))


if __name__ == "__main__":
    cli.run(main)
