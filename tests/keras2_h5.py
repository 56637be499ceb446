"""Writes weights files in Keras 2's HDF5 layout, the one keras.applications' ImageNet files and matterport's
Mask R-CNN weights have: the root's `layer_names` attribute, one group per layer with a `weight_names` attribute,
and each weight a dataset at its name inside that group ("conv1/kernel:0")."""
import h5py
import numpy as np


def write(path, layers: dict) -> None:
    """layers: {layer name: [(weight name, array), ...]} in file order; a layer without weights gets an empty list."""
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [name.encode() for name in layers]
        file.attrs["backend"] = b"tensorflow"
        file.attrs["keras_version"] = b"2.2.4"
        for name, weights in layers.items():
            group = file.create_group(name)
            group.attrs["weight_names"] = np.array([weight_name.encode() for weight_name, _ in weights], dtype="S")
            for weight_name, value in weights:
                group.create_dataset(weight_name, data=value)


def of_model(model) -> dict:
    """A Keras model's layers as `write` takes them (weights named as Keras 2 named them: layer/kind:0)."""
    return {layer.name: [(f"{layer.name}/{weight.name}:0", weight.numpy()) for weight in layer.weights]
            for layer in model.layers}
