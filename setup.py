"""pneumo_tf: train chest X-ray pneumonia detectors in TensorFlow from RSNA-layout DICOM folders."""
from setuptools import find_packages, setup

setup(
    name="pneumo_tf",
    version="0.1.0",
    description="TFRecord conversion, tf.data pipelines and training for RSNA pneumonia detection",
    packages=find_packages(include=["pneumo_tf", "pneumo_tf.*"]),
    # The web page's template and stylesheet (python -m pneumo_tf.serve).
    package_data={"pneumo_tf": ["inference/templates/*.html", "inference/static/*.css"]},
    python_requires=">=3.11",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "pydicom>=3",
        "pylibjpeg>=2",
        "pylibjpeg-libjpeg>=2",
        "pylibjpeg-openjpeg>=2",
        "numpy",
        "pandas",
        "scikit-learn",
        "matplotlib",
        "scipy",
        "absl-py",
        "tensorboard",
        # TensorBoard's Profile tab, for the trace --profile_steps writes (tensorboard-plugin-profile's new name).
        "xprof>=2.24",
        "pillow",
        "google-crc32c",
        "flask>=3",
        # The web page's WSGI server (python -m pneumo_tf.serve): pure Python, bounded threads, timeouts, body limits.
        "waitress>=3",
        "tqdm",
        # The detectors (retinanet, mask_rcnn): pinned, as mask_rcnn imports its FPN from keras_hub.src.
        "keras-hub==0.32.0",
        # Pretrained weights: matterport's Keras 2 .h5 files (h5py), keras-hub's named presets (kagglehub).
        "h5py",
        "kagglehub",
        # Box fusion for flip TTA and ensembles (evaluate, predict, serve); brings numba and llvmlite.
        "ensemble-boxes>=1.0.9,<2",
        # DICOM results (SR, presentation state, segmentation) and the DICOM node (python -m pneumo_tf.dicom_node).
        "highdicom>=0.28,<0.29",
        "pynetdicom>=3.0,<3.1",
        # Hyper-parameter search (python -m pneumo_tf.tune): small, its dependencies come with TensorFlow.
        "keras-tuner>=1.4.7,<1.5",
    ],
    extras_require={
        "dev": ["pytest", "selenium", "ruff>=0.17,<0.18"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        # Conversion as a Beam pipeline (--beam_pipeline_options); on Dataflow add apache-beam[gcp].
        "beam": ["apache-beam>=2.77,<2.78"],
    },
)
