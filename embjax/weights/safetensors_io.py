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

from embjax.weights.limits import ByteBudget, Limits, element_count, is_regular_file, short_repr
from embjax.weights.torch_pth import CheckpointFormatError

__all__ = ["load_state_dict", "save_state_dict", "CheckpointFormatError"]

# The safetensors library refuses headers over 100 MB whatever Limits.max_header_bytes says.
_LIBRARY_MAX_HEADER_BYTES = 100_000_000
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _object_hook(limits: Limits):
    """json's object_pairs_hook: every JSON object as a dict, refusing a key given twice (linear: one set,
    not a count per key) and stopping as soon as the objects parsed so far hold more members than
    max_entries header entries can (three per entry, plus the metadata's)."""
    budget = [5 * limits.max_entries + 16]

    def hook(pairs):
        budget[0] -= len(pairs)
        if budget[0] < 0:
            raise ValueError(f"more than max_entries={limits.max_entries:,} header entries; "
                             f"{Limits.hint('max_entries')}")
        return _no_duplicates(pairs)

    return hook


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen, dup = set(), []
        for k, _ in pairs:
            if k in seen:
                dup.append(k)
            seen.add(k)
        raise ValueError(f"duplicate keys {short_repr(sorted(set(dup)))}")
    return out


def _checked_header(path: str, budget: ByteBudget, limits: Limits) -> list[str]:
    """Tensor names in data order, once every entry of the header has been checked against the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path}: {len(head)} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointFormatError(f"{path}: header length {n:,} exceeds the file ({size:,} bytes); the "
                                        "file is truncated or corrupt")
        cap = min(limits.max_header_bytes, _LIBRARY_MAX_HEADER_BYTES)
        if n > cap:
            raise CheckpointFormatError(f"{path}: a header of {n:,} bytes, more than max_header_bytes={cap:,}; "
                                        f"{Limits.hint('max_header_bytes')}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_hook(limits))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, duplicate keys, nesting, huge numbers
        raise CheckpointFormatError(f"{path}: unreadable safetensors header ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: the safetensors header is a {type(header).__name__}, not a map")
    data_bytes = size - 8 - n
    if len(header) > limits.max_entries + 1:  # + __metadata__
        raise CheckpointFormatError(f"{path}: {len(header):,} header entries, more than max_entries="
                                    f"{limits.max_entries:,}; {Limits.hint('max_entries')}")
    spans = []
    for name, entry in header.items():
        if len(name.encode("utf-8", "surrogatepass")) > limits.max_key_bytes:
            raise CheckpointFormatError(f"{path}: tensor name {short_repr(name)} is longer than max_key_bytes="
                                        f"{limits.max_key_bytes:,}; {Limits.hint('max_key_bytes')}")
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
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointFormatError(f"{what}: malformed shape {short_repr(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise CheckpointFormatError(f"{what}: byte range {short_repr(offsets)} lies outside the file's "
                                        f"{data_bytes:,} data bytes; the file is truncated or corrupt")
        try:
            count = element_count(shape, limits)
        except ValueError as e:
            raise CheckpointFormatError(f"{what}: {e}") from None
        nbytes = count * _ITEMSIZE[dtype]
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


def load_state_dict(path: str | os.PathLike, max_bytes: int | None = None,
                    limits: Limits | None = None) -> dict[str, np.ndarray]:
    """Reads every tensor of a .safetensors file, in the file's key order (bfloat16 via ml_dtypes).

    Raises FileNotFoundError for a missing file and CheckpointFormatError (a ValueError) naming the file
    (and the tensor, where one is at fault) for a truncated, corrupt or oversized one; `max_bytes` caps
    the total size of the tensors (default $EMBJAX_MAX_WEIGHT_BYTES or 8 GiB) and `limits` the header
    size, entries, name lengths, ranks and element counts (see `embjax.weights.limits`).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    if not is_regular_file(path):
        raise CheckpointFormatError(f"{path}: not a regular file (a FIFO, device or directory); weight files are "
                                    "read from regular files only")
    budget = ByteBudget(path, max_bytes, CheckpointFormatError)
    try:
        _checked_header(path, budget, Limits.resolve(limits))
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot be read ({e})") from e
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
