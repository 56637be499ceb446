"""pneumo_tf: chest X-ray pneumonia detection in TensorFlow, from DICOM folders to submissions."""
__version__ = "0.1.0"
