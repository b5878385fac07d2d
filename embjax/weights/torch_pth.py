"""PyTorch checkpoint (.pth / .pt) reader that needs no torch and runs nothing from the file.

Owns: parsing both serialization formats `torch.save` has used, into NumPy arrays.

- Legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a row (magic
  number, protocol version, sys info, the object itself, the list of storage keys), then every storage's
  raw bytes, each preceded by its element count as a little-endian int64.
- Zip (torch >= 1.6): `<prefix>/data.pkl` holds the object, `<prefix>/data/<key>` each storage's raw
  bytes, `<prefix>/byteorder` the byte order (absent means little-endian).

In both, tensors are pickled as calls of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` whose storage is a persistent id. The unpickler here resolves exactly the globals a state dict
needs (OrderedDict, the tensor/parameter rebuild functions and the typed storage classes) to local
stand-ins; any other global is refused with an error naming it and the file, so a malicious pickle can
not import or call anything.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointFormatError",
    "UnsafePickleError",
    "load_state_dict",
    "load_pickle",
    "STORAGE_DTYPES",
]

# torch.<Name>Storage -> NumPy dtype of one element (little-endian; byte order is fixed up per file).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (corrupt, truncated or of an unknown layout)."""


class UnsafePickleError(CheckpointFormatError):
    """The pickle asks for a global outside the allow-list: it may try to run code, so it is refused."""


class _StorageRef:
    """A storage named by a persistent id; its bytes are attached once they have been read."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int | None):
        self.key, self.dtype, self.numel, self.data = key, dtype, numel, None


class _StorageView:
    """A legacy-format view into a root storage: `size` elements starting at element `offset`."""

    __slots__ = ("root", "offset", "size")

    def __init__(self, root: _StorageRef, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size


class _TensorRef:
    """What `_rebuild_tensor_v2` would have built, kept symbolic until the storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    del requires_grad, backward_hooks, metadata  # training-time state, meaningless for NumPy arrays
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


def _storage_class(name: str):
    # Only ever used as a marker inside persistent ids; calling it would be a bug in the file.
    def refuse(*args, **kwargs):
        raise UnsafePickleError(f"torch.{name} called directly; checkpoints never do that")
    refuse.storage_name = name
    return refuse


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_SAFE_GLOBALS.update({("torch", name): _storage_class(name) for name in STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_SAFE_GLOBALS`; storages become `_StorageRef`s shared by key."""

    def __init__(self, file: BinaryIO, path: str, storages: dict[str, _StorageRef], legacy: bool):
        super().__init__(file)
        self._path, self._storages, self._legacy = path, storages, legacy

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to load global '{module}.{name}': only state dicts of tensors "
                f"are read (allowed: {sorted(f'{m}.{n}' for m, n in _SAFE_GLOBALS)}). If you trust the "
                "file, load it with torch and re-save its state dict.") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._path}: unknown persistent id {pid!r:.200}")
        storage_type, key, _location, numel = pid[1:5]
        name = getattr(storage_type, "storage_name", None)
        if name is None:
            raise CheckpointFormatError(f"{self._path}: persistent id names no storage type: {pid!r:.200}")
        key = str(key)
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(key, STORAGE_DTYPES[name], int(numel))
        if self._legacy and len(pid) > 5 and pid[5] is not None:
            view_key, offset, view_size = pid[5]
            del view_key
            return _StorageView(ref, int(offset), int(view_size))
        return ref


def _materialize(obj: Any, path: str) -> Any:
    """Replaces every `_TensorRef` (at any depth of dicts, lists and tuples) by a NumPy array copy."""
    if isinstance(obj, _TensorRef):
        return _tensor_to_numpy(obj, path)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v, path)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, path) for v in obj)
    if isinstance(obj, (_StorageRef, _StorageView)):
        raise CheckpointFormatError(f"{path}: a bare storage outside a tensor is not supported")
    return obj


def _tensor_to_numpy(t: _TensorRef, path: str) -> np.ndarray:
    storage, offset = t.storage, t.offset
    if isinstance(storage, _StorageView):
        offset, storage = offset + storage.offset, storage.root
    if not isinstance(storage, _StorageRef) or storage.data is None:
        raise CheckpointFormatError(f"{path}: tensor refers to a storage that the file does not contain")
    try:
        size = tuple(int(s) for s in t.size)
        stride = tuple(int(s) for s in t.stride)
        offset = int(offset)
    except (TypeError, ValueError):
        raise CheckpointFormatError(f"{path}: malformed tensor size/stride {t.size!r}/{t.stride!r}") from None
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise CheckpointFormatError(f"{path}: malformed tensor size/stride {size}/{stride}")
    flat = storage.data
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointFormatError(
            f"{path}: tensor (size {size}, stride {stride}, offset {offset}) reads past the end of storage "
            f"'{storage.key}' ({flat.size} elements): the file is corrupt or truncated")
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view, order="C")  # a compact, writable copy that owns its memory


def _read_exact(f: BinaryIO, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CheckpointFormatError(f"{path}: truncated file: expected {n} bytes of {what}, got {len(data)}")
    return data


def _load_legacy(f: BinaryIO, path: str) -> Any:
    def next_pickle(what: str, unpickler_cls=None, **kw):
        try:
            if unpickler_cls is None:
                return _RestrictedUnpickler(f, path, {}, legacy=True).load()
            return unpickler_cls(f, path, **kw).load()
        except (UnsafePickleError, CheckpointFormatError):
            raise
        except Exception as e:  # EOFError, UnpicklingError, struct errors ... all mean a bad file
            raise CheckpointFormatError(f"{path}: cannot read the {what} pickle ({type(e).__name__}: {e}); "
                                        "the file is corrupt or truncated") from e

    magic = next_pickle("magic-number")
    if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (bad magic number {magic!r:.50})")
    protocol = next_pickle("protocol-version")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {protocol!r:.50}")
    sys_info = next_pickle("sys-info")
    little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, _StorageRef] = {}
    obj = next_pickle("object", _RestrictedUnpickler, storages=storages, legacy=True)
    keys = next_pickle("storage-keys")
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise CheckpointFormatError(f"{path}: storage key list does not match the storages the object uses")
    for key in map(str, keys):
        ref = storages[key]
        (numel,) = struct.unpack("<q", _read_exact(f, 8, path, f"storage '{key}' header"))
        if numel < 0 or (ref.numel is not None and numel != ref.numel):
            raise CheckpointFormatError(f"{path}: storage '{key}' header says {numel} elements, "
                                        f"the pickle says {ref.numel}: the file is corrupt")
        raw = _read_exact(f, numel * ref.dtype.itemsize, path, f"storage '{key}'")
        dtype = ref.dtype if little_endian else ref.dtype.newbyteorder(">")
        ref.data = np.frombuffer(raw, dtype).astype(ref.dtype, copy=False)
    return _materialize(obj, path)


def _load_zip(path: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointFormatError(f"{path}: unreadable zip archive ({e}); the file is corrupt or truncated") from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointFormatError(f"{path}: zip archive has no single '<prefix>/data.pkl' (entries: "
                                        f"{names[:5]}...); not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        little_endian = True
        if prefix + "byteorder" in names:
            little_endian = zf.read(prefix + "byteorder").strip() != b"big"
        storages: dict[str, _StorageRef] = {}
        try:
            obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path, storages, legacy=False).load()
            for key, ref in storages.items():
                raw = zf.read(f"{prefix}data/{key}")
                dtype = ref.dtype if little_endian else ref.dtype.newbyteorder(">")
                if len(raw) % dtype.itemsize or (ref.numel is not None and len(raw) // dtype.itemsize < ref.numel):
                    raise CheckpointFormatError(f"{path}: storage '{key}' has {len(raw)} bytes, too few for "
                                                f"{ref.numel} elements of {ref.dtype}")
                ref.data = np.frombuffer(raw, dtype).astype(ref.dtype, copy=False)
        except (UnsafePickleError, CheckpointFormatError):
            raise
        except Exception as e:  # missing member, CRC error, broken pickle ...
            raise CheckpointFormatError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                                        "the file is corrupt or truncated") from e
    return _materialize(obj, path)


def load_pickle(path: str | os.PathLike) -> Any:
    """Loads any torch.save'd object made of dicts, lists, tuples, scalars and tensors (as NumPy arrays)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        head = f.read(2)
        if head[:1] != b"\x80":  # every pickle since protocol 2 starts with the PROTO opcode
            raise CheckpointFormatError(f"{path}: neither a zip archive nor a pickle; not a torch.save file")
        f.seek(0)
        return _load_legacy(f, path)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (name -> tensor) as an ordered dict of NumPy arrays, in file order.

    Raises FileNotFoundError for a missing file, CheckpointFormatError (a ValueError) for a corrupt or
    truncated one or one that is not a flat state dict, UnsafePickleError for a pickle that names any
    global outside the allow-list.
    """
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{os.fspath(path)}: holds a {type(obj).__name__}, not a state dict")
    not_arrays = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if not_arrays:
        raise CheckpointFormatError(
            f"{os.fspath(path)}: not a flat state dict of tensors (entries {not_arrays[:5]} are not); "
            "use load_pickle() and pick the state dict out of it (often under 'state_dict' or 'model')")
    return collections.OrderedDict(obj)
