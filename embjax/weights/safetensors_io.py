"""safetensors files as ordered dicts of NumPy arrays (the format holds no code, so nothing to restrict).

Owns turning the `safetensors` library's errors into ones that name the file, so a missing, truncated
or corrupt weight file reads the same everywhere in embjax.
"""
from __future__ import annotations

import collections
import os
from typing import Mapping

import numpy as np

from embjax.weights.torch_pth import CheckpointFormatError

__all__ = ["load_state_dict", "save_state_dict", "CheckpointFormatError"]


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a .safetensors file, in the file's key order (bfloat16 via ml_dtypes).

    Raises FileNotFoundError for a missing file and CheckpointFormatError (a ValueError) naming the file
    for a truncated or corrupt one.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            return collections.OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except SafetensorError as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e}); it is corrupt or "
                                    "truncated: download or write it again") from e


def save_state_dict(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                    metadata: Mapping[str, str] | None = None) -> None:
    """Writes name -> array to a .safetensors file (arrays made C-contiguous; metadata is str -> str)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.fspath(path),
              metadata=dict(metadata) if metadata else None)
