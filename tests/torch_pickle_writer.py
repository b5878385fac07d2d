"""A torch.save-compatible writer for tests, independent of the reader under test and of torch.

Writes both layouts (zip, torch >= 1.6; legacy, five pickles then raw storages) with the pure-Python
pickler, so GLOBAL can name `torch.*` without torch installed, and reports where each storage's raw
bytes lie in the file (the fuzz tests need that to tell a data byte from a structure byte).
"""
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class Global:
    """A module.name reference written as a GLOBAL opcode, whatever is importable here."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists the callable be callable
        raise AssertionError("never called")


class FakeStorage:
    """A storage's bytes; `numel` is the element count its persistent id claims (default: the true one)."""

    def __init__(self, key, array, numel=None):
        self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)
        self.numel = self.array.size if numel is None else numel


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class Call:
    """Pickles as `func(*args)`: how a malicious pickle runs code on load."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                  np.dtype("float16"): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
                  np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
                  np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}


class TorchPickler(pickle._Pickler):  # the pure-Python pickler lets GLOBAL be written for any name
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = _save_global_ref

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", Global("torch", _STORAGE_NAMES[obj.array.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_zip_checkpoint(path, obj, storages, prefix="archive"):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", buf.getvalue())
        zf.writestr(f"{prefix}/byteorder", "little")
        for s in storages:
            zf.writestr(f"{prefix}/data/{s.key}", s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
        zf.writestr(f"{prefix}/version", "3\n")


def tensor(storage, offset=0, size=None, stride=None):
    size = tuple(storage.array.shape) if size is None else size
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    return FakeTensor(storage, offset, size, stride)


def write_legacy_checkpoint(path, obj, storages, numel_override=None):
    """The legacy layout; returns {storage key: (first byte, end byte)} of each storage's raw data.

    `numel_override` {key: n} writes n as that storage's element-count header instead of the true one.
    """
    regions = {}
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL,
                                                       "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        TorchPickler(f, protocol=2).dump(obj)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            n = (numel_override or {}).get(s.key, s.numel)
            f.write(struct.pack("<q", n))
            start = f.tell()
            f.write(s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())
            regions[s.key] = (start, f.tell())
    return regions
