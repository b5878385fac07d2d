"""safetensors files as ordered dicts of NumPy arrays (the format holds no code, so nothing to restrict).

Owns checking a file's header before the `safetensors` library reads it, and turning every failure into
a `CheckpointFormatError` that names the file and the tensor, so a missing, truncated, corrupt or
oversized weight file reads the same everywhere in embjax. The header (an 8-byte little-endian length,
then JSON: name -> dtype, shape, [begin, end) of its bytes) is parsed here first: every tensor's byte
range must lie inside the file and match its shape and dtype exactly, and the total is charged to the
per-call byte budget of `embjax.weights.limits` before any tensor is read.
"""
from __future__ import annotations

import collections
import json
import os
import struct
from typing import Mapping

import numpy as np

from embjax.weights.limits import ByteBudget, short_repr
from embjax.weights.torch_pth import CheckpointFormatError

__all__ = ["load_state_dict", "save_state_dict", "CheckpointFormatError"]

# The safetensors library refuses longer headers too.
_MAX_HEADER_BYTES = 100_000_000
_MAX_NDIM = 32
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {short_repr(sorted({k for k in keys if keys.count(k) > 1}))}")
    return dict(pairs)


def _checked_header(path: str, budget: ByteBudget) -> list[str]:
    """Tensor names in data order, once every entry of the header has been checked against the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path}: {len(head)} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointFormatError(f"{path}: header length {n:,} exceeds the file ({size:,} bytes) or "
                                        f"the {_MAX_HEADER_BYTES:,}-byte limit; the file is truncated or corrupt")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, duplicate keys, nesting, huge numbers
        raise CheckpointFormatError(f"{path}: unreadable safetensors header ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: the safetensors header is a {type(header).__name__}, not a map")
    data_bytes = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings")
            continue
        what = f"{path}: tensor {name!r}"
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise CheckpointFormatError(f"{what}: malformed header entry {short_repr(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise CheckpointFormatError(f"{what}: unknown dtype {short_repr(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
                and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointFormatError(f"{what}: malformed shape {short_repr(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise CheckpointFormatError(f"{what}: byte range {short_repr(offsets)} lies outside the file's "
                                        f"{data_bytes:,} data bytes; the file is truncated or corrupt")
        nbytes = int(np.prod(shape, dtype=object)) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointFormatError(f"{what}: shape {shape} of {dtype} needs {nbytes:,} bytes, its byte "
                                        f"range holds {offsets[1] - offsets[0]:,}")
        budget.charge(nbytes, f"tensor {name!r} (shape {shape}, {dtype})")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise CheckpointFormatError(f"{path}: tensor {name!r} starts at byte {begin:,} of the data, the "
                                        f"previous one ends at {end:,}: overlapping or unaccounted bytes")
        end = stop
    if end != data_bytes:
        raise CheckpointFormatError(f"{path}: the tensors cover {end:,} of the file's {data_bytes:,} data "
                                    "bytes; the file is corrupt or has trailing bytes")
    return [name for _, _, name in spans]


def load_state_dict(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Reads every tensor of a .safetensors file, in the file's key order (bfloat16 via ml_dtypes).

    Raises FileNotFoundError for a missing file and CheckpointFormatError (a ValueError) naming the file
    (and the tensor, where one is at fault) for a truncated, corrupt or oversized one; `max_bytes` caps
    the total size of the tensors (default $EMBJAX_MAX_WEIGHT_BYTES or 8 GiB, see
    `embjax.weights.limits`).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    budget = ByteBudget(path, max_bytes, CheckpointFormatError)
    _checked_header(path, budget)
    name = None
    try:
        out = collections.OrderedDict()
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
        return out
    except Exception as e:  # SafetensorError, and whatever else the library lets through
        where = f" at tensor {name!r}" if name is not None else ""
        raise CheckpointFormatError(f"{path}: not a readable safetensors file{where} ({type(e).__name__}: "
                                    f"{str(e)[:200]}); it is corrupt or truncated: download or write it "
                                    "again") from e


def save_state_dict(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                    metadata: Mapping[str, str] | None = None) -> None:
    """Writes name -> array to a .safetensors file (arrays made C-contiguous; metadata is str -> str)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.fspath(path),
              metadata=dict(metadata) if metadata else None)
