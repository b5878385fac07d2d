"""PyTorch checkpoint (.pth / .pt) reader that needs no torch and runs nothing from the file.

Owns: parsing both serialization formats `torch.save` has used, into NumPy arrays, safely against
hostile or broken files.

- Legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a row (magic
  number, protocol version, sys info, the object itself, the list of storage keys), then every storage's
  raw bytes, each preceded by its element count as a little-endian int64.
- Zip (torch >= 1.6): `<prefix>/data.pkl` holds the object, `<prefix>/data/<key>` each storage's raw
  bytes, `<prefix>/byteorder` the byte order (absent means little-endian).

In both, tensors are pickled as calls of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` whose storage is a persistent id. The unpickler here (Python's own pure-Python one, with the
dangerous opcodes replaced) resolves exactly the globals a state dict needs to stand-ins created for
this call only; any other global is refused with an error naming it and the file, so a pickle can
neither import nor call anything, nor change state that outlives the call. On top of that:

* BUILD (attribute setting) is accepted only on OrderedDicts (torch's `_metadata`, which is dropped);
  calls only of the allow-list, OrderedDict only without arguments; dict and set keys only of scalar
  types whose hashing costs no more than their size.
* Every size the file claims is checked against the file and against a per-call byte budget
  (`embjax.weights.limits`, default 8 GiB) before anything is allocated: storages against the bytes left
  in the file or the zip member's recorded size, tensors by their logical size (so zero strides cannot
  expand a tiny file), and the pickle at 128 bytes of objects per byte read.
* Objects referenced several times (the pickle memo) are converted once and stay shared; cycles and
  nesting deeper than `limits.MAX_NESTING` are errors.
* Every failure is a `CheckpointFormatError` naming the file and, where there is one, the tensor or
  storage.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import types
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from embjax.weights.limits import MAX_NESTING, ByteBudget, is_regular_file, short_repr

__all__ = [
    "CheckpointFormatError",
    "UnsafePickleError",
    "load_state_dict",
    "load_pickle",
    "STORAGE_DTYPES",
]

# torch.<Name>Storage -> NumPy dtype of one element (little-endian; byte order is fixed up per file).
STORAGE_DTYPES = types.MappingProxyType({
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
})

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# An upper bound on the memory one pickle byte can make the unpickler hold: every opcode is at least one
# byte and creates at most one object (an empty dict, the largest, is 64 bytes + 16 of GC header) plus a
# stack slot and a memo entry (8 + 16 bytes with the memo dict's growth).
_PICKLE_BYTES_PER_BYTE = 128
_MAX_NDIM = 32  # NumPy allows 64; no real tensor comes near either
_MAX_INT_KEY = (1 << 61) - 2  # ints below the hash modulus hash to themselves: no crafted collisions
_SCALAR_KEY_TYPES = (str, bytes, bool, type(None))


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (corrupt, truncated, hostile or of an unknown layout)."""


class UnsafePickleError(CheckpointFormatError):
    """The pickle asks for a global or an operation outside the allow-list, so it is refused."""


# --- stand-ins: created per call, refusing any attribute setting ------------------------------------


class _StandIn:
    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle sets attributes on a {type(self).__name__.strip('_')}; "
                                "checkpoints never do that")


class _StorageRef(_StandIn):
    """A storage named by a persistent id; its bytes are attached once they have been read."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int | None):
        self.key, self.dtype, self.numel, self.data = key, dtype, numel, None


class _StorageView(_StandIn):
    """A legacy-format view into a root storage: `size` elements starting at element `offset`."""

    __slots__ = ("root", "offset", "size")

    def __init__(self, root: _StorageRef, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size


class _TensorRef(_StandIn):
    """What `_rebuild_tensor_v2` would have built, kept symbolic until the storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _RebuildTensor(_StandIn):
    __slots__ = ()

    def __call__(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                 metadata=None):
        del requires_grad, backward_hooks, metadata  # training-time state, meaningless for NumPy arrays
        return _TensorRef(storage, storage_offset, size, stride)


class _RebuildParameter(_StandIn):
    __slots__ = ()

    def __call__(self, data, requires_grad=False, backward_hooks=None):
        del requires_grad, backward_hooks
        return data


class _StorageType(_StandIn):
    """torch.<Name>Storage: only ever a marker inside persistent ids."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(f"torch.{self.name} called directly; checkpoints never do that")


def _new_globals() -> dict[tuple[str, str], Any]:
    table = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensor(),
        ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
    }
    table.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})
    return table


def _check_key(key, what: str) -> None:
    """Dict keys and set members are hashed by the unpickler: only types whose hash costs their size."""
    if isinstance(key, _SCALAR_KEY_TYPES) or (type(key) is int and abs(key) <= _MAX_INT_KEY):
        return
    raise CheckpointFormatError(f"{what} of type {type(key).__name__} ({short_repr(key)}); only str, bytes, "
                                f"bool, None and ints below 2**61 are accepted")


# --- the restricted unpickler -----------------------------------------------------------------------


class _BoundedReader:
    """File reads clamped to the pickle's bytes (never a huge allocation from a claimed length), and each
    byte read charged to the budget at `_PICKLE_BYTES_PER_BYTE`."""

    def __init__(self, f: BinaryIO, end: int, budget: ByteBudget, what: str):
        self._f, self._end, self._budget, self._what = f, end, budget, what

    def _clamp(self, n: int | None) -> int:
        left = max(self._end - self._f.tell(), 0)
        return left if n is None or n < 0 or n > left else n

    def _charged(self, data: bytes) -> bytes:
        self._budget.charge(len(data) * _PICKLE_BYTES_PER_BYTE, f"the objects of the {self._what} pickle")
        return data

    def read(self, n: int = -1) -> bytes:
        return self._charged(self._f.read(self._clamp(n)))

    def readline(self, n: int = -1) -> bytes:
        return self._charged(self._f.readline(self._clamp(n)))

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only this call's stand-ins; storages become `_StorageRef`s shared by key."""

    dispatch = pickle._Unpickler.dispatch.copy()

    def __init__(self, file, path: str, storages: dict[str, _StorageRef], legacy: bool):
        super().__init__(file)
        self._path, self._storages, self._legacy = path, storages, legacy
        self._globals = _new_globals()
        self._callables = {id(v): v for v in self._globals.values()}

    def find_class(self, module: str, name: str):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to load global '{module}.{name}': only state dicts of tensors "
                f"are read (allowed: {sorted(f'{m}.{n}' for m, n in self._globals)}). If you trust the "
                "file, load it with torch and re-save its state dict.") from None

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._path}: unknown persistent id {short_repr(pid)}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"{self._path}: persistent id names no storage type: {short_repr(pid)}")
        if type(key) not in (str, int) or not (numel is None or type(numel) is int):
            raise CheckpointFormatError(f"{self._path}: malformed persistent id {short_repr(pid)}")
        key = str(key)
        ref = self._storages.get(key)
        dtype = STORAGE_DTYPES[storage_type.name]
        if ref is None:
            ref = self._storages[key] = _StorageRef(key, dtype, numel)
        elif ref.dtype != dtype or ref.numel != numel:
            raise CheckpointFormatError(f"{self._path}: storage '{key}' is named twice with different "
                                        f"types or sizes ({ref.dtype}/{ref.numel} vs {dtype}/{numel})")
        if self._legacy and len(pid) > 5 and pid[5] is not None:
            view = pid[5]
            if not (type(view) is tuple and len(view) == 3 and all(type(v) is int for v in view[1:])):
                raise CheckpointFormatError(f"{self._path}: malformed storage view {short_repr(view)}")
            _, offset, view_size = view
            if offset < 0 or view_size < 0 or (numel is not None and offset + view_size > numel):
                raise CheckpointFormatError(f"{self._path}: view ({offset}, {view_size}) outside storage "
                                            f"'{key}' of {numel} elements")
            return _StorageView(ref, offset, view_size)
        return ref

    # Opcodes whose stock behaviour a hostile file could abuse.

    def _call(self, func, args, kwargs=None):
        if func is collections.OrderedDict:
            if args or kwargs:
                raise UnsafePickleError(f"{self._path}: OrderedDict called with arguments; checkpoints fill "
                                        "it item by item")
            return collections.OrderedDict()
        if id(func) not in self._callables or self._callables[id(func)] is not func:
            raise UnsafePickleError(f"{self._path}: the pickle calls {short_repr(func)}, which is not one of "
                                    "the allowed constructors")
        if type(args) is not tuple or (kwargs is not None and type(kwargs) is not dict):
            raise CheckpointFormatError(f"{self._path}: malformed call arguments {short_repr(args)}")
        return func(*args, **(kwargs or {}))

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_obj(self):
        args = self.pop_mark()
        cls = args.pop(0)
        self.append(self._call(cls, tuple(args)))
    dispatch[pickle.OBJ[0]] = load_obj

    def load_inst(self):
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        self.append(self._call(self.find_class(module, name), tuple(self.pop_mark())))
    dispatch[pickle.INST[0]] = load_inst

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is collections.OrderedDict:
            return  # torch's `_metadata` (module versions): not part of the tensors, dropped
        raise UnsafePickleError(f"{self._path}: the pickle sets attributes on a {type(inst).__name__} "
                                f"({short_repr(state)}); checkpoints only do that on OrderedDicts")
    dispatch[pickle.BUILD[0]] = load_build

    def _set_items(self, target, items):
        if not isinstance(target, dict):
            raise CheckpointFormatError(f"{self._path}: the pickle sets items on a {type(target).__name__}")
        for i in range(0, len(items) - 1, 2):
            _check_key(items[i], f"{self._path}: a dict key")
            target[items[i]] = items[i + 1]

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items(self.stack[-1], [key, value])
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._set_items(self.stack[-1], items)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        d = {}
        self._set_items(d, items)
        self.append(d)
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, set):
            raise CheckpointFormatError(f"{self._path}: the pickle adds items to a {type(target).__name__}")
        for item in items:
            _check_key(item, f"{self._path}: a set member")
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        for item in items:
            _check_key(item, f"{self._path}: a set member")
        self.append(frozenset(items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def _refuse(self):
        raise UnsafePickleError(f"{self._path}: the pickle uses extension codes or out-of-band buffers, "
                                "which checkpoints never do")
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_op[0]] = _refuse
    del _op


def _unpickle(f: BinaryIO, end: int, path: str, what: str, budget: ByteBudget,
              storages: dict[str, _StorageRef] | None, legacy: bool) -> Any:
    """One pickle from `f` (which holds it within its first `end` bytes), every failure named."""
    reader = _BoundedReader(f, end, budget, what)
    try:
        return _RestrictedUnpickler(reader, path, {} if storages is None else storages, legacy).load()
    except CheckpointFormatError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, struct errors, MemoryError ... all mean a bad file
        raise CheckpointFormatError(f"{path}: cannot read the {what} pickle ({type(e).__name__}: "
                                    f"{str(e)[:200]}); the file is corrupt or truncated") from e


# --- from symbolic tensors to arrays ----------------------------------------------------------------


class _Materializer:
    """Replaces every `_TensorRef` (at any depth of dicts, lists and tuples) by a NumPy array copy.

    Each container and tensor is converted once (`_done`, keyed by identity), so shared references stay
    shared and cost nothing the second time; a container met again while it is being converted is a
    cycle, refused, as is nesting deeper than MAX_NESTING.
    """

    def __init__(self, path: str, budget: ByteBudget):
        self.path, self.budget = path, budget
        self._done: dict[int, Any] = {}
        self._active: set[int] = set()

    def __call__(self, obj: Any, where: str = "", depth: int = 0) -> Any:
        if type(obj) in (str, bytes, bytearray, int, float, complex, bool, type(None)):
            return obj
        if depth > MAX_NESTING:
            raise CheckpointFormatError(f"{self.path}: object nested deeper than {MAX_NESTING} levels at "
                                        f"{where or 'the top'}")
        key = id(obj)
        if key in self._done:
            return self._done[key]
        if isinstance(obj, _TensorRef):
            out = _tensor_to_numpy(obj, self.path, where or "the top-level tensor", self.budget)
        elif type(obj) in (dict, collections.OrderedDict, list, tuple):
            if key in self._active:
                raise CheckpointFormatError(f"{self.path}: the object refers to itself at {where or 'the top'} "
                                            "(a cycle); checkpoints are trees")
            self._active.add(key)
            if isinstance(obj, dict):
                out = type(obj)()
                for k, v in obj.items():
                    out[k] = self(v, f"{where}[{short_repr(k)}]", depth + 1)
            else:
                out = type(obj)(self(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj))
            self._active.discard(key)
        elif type(obj) in (set, frozenset):
            out = obj  # members were restricted to scalars when the set was built
        elif isinstance(obj, (_StorageRef, _StorageView)):
            raise CheckpointFormatError(f"{self.path}: a bare storage outside a tensor at {where or 'the top'} "
                                        "is not supported")
        else:
            raise CheckpointFormatError(f"{self.path}: unsupported object {short_repr(obj)} at "
                                        f"{where or 'the top'}; only dicts, lists, tuples, scalars and tensors "
                                        "are read")
        self._done[key] = out
        return out


def _tensor_to_numpy(t: _TensorRef, path: str, where: str, budget: ByteBudget) -> np.ndarray:
    storage, offset = t.storage, t.offset
    if isinstance(storage, _StorageView):
        if type(offset) is not int:
            raise CheckpointFormatError(f"{path}: tensor {where}: malformed offset {short_repr(offset)}")
        offset, storage = offset + storage.offset, storage.root
    if not isinstance(storage, _StorageRef) or storage.data is None:
        raise CheckpointFormatError(f"{path}: tensor {where} refers to a storage that the file does not contain")
    if not (type(t.size) in (tuple, list) and type(t.stride) in (tuple, list)
            and len(t.size) <= _MAX_NDIM and len(t.stride) <= _MAX_NDIM
            and all(type(s) is int for s in (*t.size, *t.stride)) and type(offset) is int):
        raise CheckpointFormatError(f"{path}: tensor {where}: malformed size/stride/offset "
                                    f"{short_repr(t.size)}/{short_repr(t.stride)}/{short_repr(offset)}")
    size, stride = tuple(t.size), tuple(t.stride)
    if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
        raise CheckpointFormatError(f"{path}: tensor {where}: malformed size/stride {size}/{stride}")
    flat = storage.data
    numel = 1
    for n in size:
        numel *= n
    # The logical size is what gets allocated, whatever the strides (zero strides repeat one element).
    budget.charge(numel * flat.dtype.itemsize, f"tensor {where} (size {size}, {flat.dtype})")
    if numel == 0:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointFormatError(
            f"{path}: tensor {where} (size {size}, stride {stride}, offset {offset}) reads past the end of "
            f"storage '{storage.key}' ({flat.size} elements): the file is corrupt or truncated")
    itemsize = flat.dtype.itemsize
    # A dimension of length 1 is never stepped along: its stride is irrelevant and may be anything.
    byte_strides = tuple(0 if n == 1 else s * itemsize for n, s in zip(size, stride))
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=byte_strides, writeable=False)
    return np.array(view, order="C")  # a compact, writable copy that owns its memory


def _storage_array(raw: bytes, ref: _StorageRef, little_endian: bool) -> np.ndarray:
    dtype = ref.dtype if little_endian else ref.dtype.newbyteorder(">")
    return np.frombuffer(raw, dtype).astype(ref.dtype, copy=False)


# --- the two layouts --------------------------------------------------------------------------------


def _read_exact(f: BinaryIO, n: int, end: int, path: str, what: str) -> bytes:
    left = end - f.tell()
    if n > left:
        raise CheckpointFormatError(f"{path}: truncated file: {what} needs {n:,} bytes, only {max(left, 0):,} "
                                    "are left")
    data = f.read(n)
    if len(data) != n:
        raise CheckpointFormatError(f"{path}: truncated file: expected {n} bytes of {what}, got {len(data)}")
    return data


def _load_legacy(f: BinaryIO, path: str, budget: ByteBudget) -> Any:
    end = os.fstat(f.fileno()).st_size

    def next_pickle(what, storages=None):
        return _unpickle(f, end, path, what, budget, storages, legacy=True)

    magic = next_pickle("magic-number")
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (bad magic number {short_repr(magic)})")
    protocol = next_pickle("protocol-version")
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {short_repr(protocol)}")
    sys_info = next_pickle("sys-info")
    little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    if type(little_endian) is not bool:
        raise CheckpointFormatError(f"{path}: malformed sys info {short_repr(sys_info)}")
    storages: dict[str, _StorageRef] = {}
    obj = next_pickle("object", storages)
    keys = next_pickle("storage-keys")
    if (type(keys) is not list or not all(type(k) in (str, int) for k in keys)
            or len(keys) != len(storages) or set(map(str, keys)) != set(storages)):
        raise CheckpointFormatError(f"{path}: storage key list does not match the storages the object uses")
    for key in map(str, keys):
        ref = storages[key]
        (numel,) = struct.unpack("<q", _read_exact(f, 8, end, path, f"storage '{key}' header"))
        if numel < 0 or (ref.numel is not None and numel != ref.numel):
            raise CheckpointFormatError(f"{path}: storage '{key}' header says {numel} elements, "
                                        f"the pickle says {ref.numel}: the file is corrupt")
        nbytes = numel * ref.dtype.itemsize
        raw = _read_exact(f, nbytes, end, path, f"storage '{key}' ({numel:,} x {ref.dtype})")
        budget.charge(nbytes * (1 if little_endian else 2), f"storage '{key}'")
        ref.data = _storage_array(raw, ref, little_endian)
    return _Materializer(path, budget)(obj)


def _member_bytes(zf: zipfile.ZipFile, name: str, expected: int | None, limit: int | None, path: str,
                  what: str, budget: ByteBudget) -> bytes:
    """A zip member's bytes, its recorded size checked against what it should hold before reading."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointFormatError(f"{path}: the archive has no member '{name}' ({what}); the file is "
                                    "incomplete") from None
    if expected is not None and info.file_size != expected:
        raise CheckpointFormatError(f"{path}: member '{name}' ({what}) records {info.file_size:,} bytes, the "
                                    f"tensor metadata needs exactly {expected:,}: the file is corrupt")
    if limit is not None and info.file_size > limit:
        raise CheckpointFormatError(f"{path}: member '{name}' ({what}) records {info.file_size:,} bytes, more "
                                    f"than the {limit} such a member can hold")
    budget.charge(info.file_size, f"member '{name}' ({what})")
    # zipfile stops decompressing at the recorded size and checks the CRC; a shorter member is caught here.
    raw = zf.read(info)
    if len(raw) != info.file_size:
        raise CheckpointFormatError(f"{path}: member '{name}' ({what}) holds {len(raw)} bytes, its header "
                                    f"records {info.file_size}")
    return raw


def _load_zip(path: str, budget: ByteBudget) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, OSError, struct errors from a mangled directory ...
        raise CheckpointFormatError(f"{path}: unreadable zip archive ({e}); the file is corrupt or truncated") from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointFormatError(f"{path}: zip archive has no single '<prefix>/data.pkl' (entries: "
                                        f"{short_repr(names)}); not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        storages: dict[str, _StorageRef] = {}
        try:
            little_endian = True
            if prefix + "byteorder" in names:
                order = _member_bytes(zf, prefix + "byteorder", None, 16, path, "byte order", budget).strip()
                if order not in (b"little", b"big"):
                    raise CheckpointFormatError(f"{path}: unknown byte order {short_repr(order)}")
                little_endian = order == b"little"
            raw_pickle = _member_bytes(zf, pkl[0], None, None, path, "the object pickle", budget)
            obj = _unpickle(io.BytesIO(raw_pickle), len(raw_pickle), path, "object", budget, storages,
                            legacy=False)
            del raw_pickle
            for key, ref in storages.items():
                if ref.numel is None:
                    raise CheckpointFormatError(f"{path}: storage '{key}' has no element count")
                raw = _member_bytes(zf, f"{prefix}data/{key}", ref.numel * ref.dtype.itemsize, None, path,
                                    f"storage '{key}' ({ref.numel:,} x {ref.dtype})", budget)
                if not little_endian:
                    budget.charge(len(raw), f"storage '{key}' (byte-swapped copy)")
                ref.data = _storage_array(raw, ref, little_endian)
        except CheckpointFormatError:
            raise
        except Exception as e:  # CRC error, broken deflate stream, MemoryError ...
            raise CheckpointFormatError(f"{path}: cannot read the checkpoint ({type(e).__name__}: "
                                        f"{str(e)[:200]}); the file is corrupt or truncated") from e
    return _Materializer(path, budget)(obj)


def load_pickle(path: str | os.PathLike, max_bytes: int | None = None) -> Any:
    """Loads any torch.save'd object made of dicts, lists, tuples, scalars and tensors (as NumPy arrays).

    `max_bytes` caps what the call may allocate (default: $EMBJAX_MAX_WEIGHT_BYTES or 8 GiB); see
    `embjax.weights.limits`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    if not is_regular_file(path):
        raise CheckpointFormatError(f"{path}: not a regular file (a FIFO, device or directory); weight files are "
                                    "read from regular files only")
    budget = ByteBudget(path, max_bytes, CheckpointFormatError)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, budget)
        with open(path, "rb") as f:
            head = f.read(2)
            if head[:1] != b"\x80":  # every pickle since protocol 2 starts with the PROTO opcode
                raise CheckpointFormatError(f"{path}: neither a zip archive nor a pickle; not a torch.save file")
            f.seek(0)
            return _load_legacy(f, path, budget)
    except CheckpointFormatError:
        raise
    except Exception as e:  # anything that slipped past the checks above still names the file
        raise CheckpointFormatError(f"{path}: cannot read the checkpoint ({type(e).__name__}: "
                                    f"{str(e)[:200]}); the file is corrupt or truncated") from e


def load_state_dict(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (name -> tensor) as an ordered dict of NumPy arrays, in file order.

    Raises FileNotFoundError for a missing file, CheckpointFormatError (a ValueError) for a corrupt,
    truncated, oversized (see `max_bytes` in `load_pickle`) or hostile one or one that is not a flat
    state dict, UnsafePickleError (a CheckpointFormatError) for a pickle that names any global or
    operation outside the allow-list.
    """
    obj = load_pickle(path, max_bytes)
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{os.fspath(path)}: holds a {type(obj).__name__}, not a state dict")
    not_arrays = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if not_arrays:
        raise CheckpointFormatError(
            f"{os.fspath(path)}: not a flat state dict of tensors (entries {short_repr(not_arrays)} are not); "
            "use load_pickle() and pick the state dict out of it (often under 'state_dict' or 'model')")
    return collections.OrderedDict(obj)
