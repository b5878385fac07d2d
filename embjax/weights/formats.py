"""Which format a weight file is in, and reading it: the one place that dispatches on file kinds.

`file_kind(path)` tells the kind from the file (content for directories and TensorFlow checkpoints, else the
suffix); `read(kind, path)` returns the raw contents through the reader of that kind ({layer: [arrays]} for
Keras .h5, a state dict for PyTorch / safetensors, {name: array} for TensorFlow). Converting the contents
into a model's variables is the model's converter's (embjax.models.convert); nothing here knows a model.
"""
from __future__ import annotations

import os


class WeightFormatError(ValueError):
    """A weight file of a kind this model has no converter for, or of an unknown kind."""


# File kinds by suffix.
SUFFIX_KINDS = {
    ".h5": "keras_h5",
    ".hdf5": "keras_h5",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".safetensors": "safetensors",
    ".ckpt": "tf_checkpoint",  # a TensorFlow V1 checkpoint file (TF-Slim's 2016 zoo files)
}
# Every kind `read` reads ("orbax" directories are converted variables: embjax.weights.store).
KINDS = ("keras_h5", "torch", "safetensors", "tf_checkpoint", "tf_saved_model")


def file_kind(path: str | os.PathLike) -> str:
    """The kind of weights at `path`, by content for directories and TensorFlow checkpoints:

    'tf_saved_model' for a directory with variables/variables.index (a TF-Hub SavedModel), 'orbax' for
    any other directory (converted variables, embjax.weights.store), 'tf_checkpoint' for a checkpoint
    prefix with `<path>.index` beside it (or the .index file itself) and for a V1 checkpoint file
    (`.ckpt`, or any file ending with the table magic number), else the kind the suffix names
    (keras_h5, torch, safetensors).
    """
    path = os.fspath(path)
    from embjax.weights import tf_checkpoint

    if os.path.isdir(path):
        return "tf_saved_model" if tf_checkpoint.is_saved_model(path) else "orbax"
    shard_prefix, shard, _ = path.rpartition(".data-")
    if tf_checkpoint.is_checkpoint_prefix(path) or (shard and os.path.isfile(shard_prefix + ".index")):
        return "tf_checkpoint"
    if os.path.splitext(path)[1].lower() not in SUFFIX_KINDS and tf_checkpoint.has_table_magic(path):
        return "tf_checkpoint"  # a V1 checkpoint file under another name
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIX_KINDS:
        raise WeightFormatError(
            f"cannot tell the format of {path!r} from its suffix {suffix!r}; embjax reads "
            f"{', '.join(sorted(SUFFIX_KINDS))} files and orbax directories (embjax.weights.store)"
        )
    return SUFFIX_KINDS[suffix]


def read(kind: str, path: str):
    """The raw contents of the weight file `path` of `kind` (one of KINDS)."""
    if kind in ("tf_checkpoint", "tf_saved_model"):
        from embjax.weights import tf_checkpoint

        return tf_checkpoint.load(path)
    if kind == "keras_h5":
        from embjax.weights import h5

        return h5.read_keras_weights(path)
    if kind == "torch":
        from embjax.weights import torch_pth

        return torch_pth.load_state_dict(path)
    if kind == "safetensors":
        from embjax.weights import safetensors_io

        return safetensors_io.load_state_dict(path)
    raise WeightFormatError(f"no reader for weight files of kind {kind!r} ({path!r}); kinds: {', '.join(KINDS)}")


__all__ = ["WeightFormatError", "SUFFIX_KINDS", "KINDS", "file_kind", "read"]
