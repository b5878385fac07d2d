"""TensorFlow checkpoints (V2 tensor bundles and V1 files) read without TensorFlow or protobuf code.

    arrays = tf_checkpoint.load("model.ckpt")                # prefix: model.ckpt.index beside it (V2)
    arrays = tf_checkpoint.load("resnet_v2_152_savedmodel")  # a SavedModel directory: variables/ inside
    arrays = tf_checkpoint.load("inception_v4.ckpt")         # one file, no .index beside it (V1)

Owns the on-disk layout of a checkpoint written by `tf.train.Saver` (TF-Slim's `model.ckpt` files) or by
`tf.train.Checkpoint` / `tf.saved_model.save` (a SavedModel's `variables/variables.*`):

* `<prefix>.index` is an SSTable (the LevelDB table layout): data blocks of prefix-compressed
  key/value entries with a restart array, each block followed by a 1-byte compression type and the
  masked CRC32C of the block and that byte; an index block whose values are the data blocks' handles
  (varint offset and size); a 48-byte footer holding the metaindex and index handles and a magic
  number. Under the empty key sits a BundleHeaderProto (number of shards, byte order); under every
  tensor's name a BundleEntryProto (dtype, shape, shard, offset, size, masked CRC32C of the bytes).
* `<prefix>.data-<shard>-of-<shards>` hold the tensors' raw bytes (row-major, the header's byte order);
  string tensors hold varint lengths, a checksum of the lengths, then the bytes.
* The older V1 format (TF-Slim's 2016 zoo files) is one SSTable file holding the values themselves;
  see the V1 section below.

The few protobuf fields needed are decoded here from the wire format. Every table block's checksum and
every V2 tensor's checksum is verified; any structural problem, truncation or checksum mismatch raises
`TFCheckpointError` naming the file and, where there is one, the tensor. Numeric tensors come back as
NumPy arrays (float32/64, float16, bfloat16, int8/16/32/64, uint8/16/32/64, bool); string tensors are
checked and left out of the result (they hold bookkeeping, not weights). The total size is checked
against `max_bytes` before any tensor is read. Partitioned (sliced) variables are joined in V1 files
and refused with an error in V2 bundles.

SavedModel names. A TF2 SavedModel stores variables under object-graph keys such as
`model/layer-3/kernel/.ATTRIBUTES/VARIABLE_VALUE`; its `_CHECKPOINTABLE_OBJECT_GRAPH` string tensor
records, for each such key, the variable's own name (`full_name`, e.g. `InceptionV3/Conv2d_1a_3x3/
weights`). `load` renames every key to that name when it is recorded and unique; keys without one keep
their object path minus the `/.ATTRIBUTES/VARIABLE_VALUE` suffix. Checkpoints without an object graph
(TF-Slim's, TF1 hub modules') already use the variables' names and are returned as they are.
"""
from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from embjax.weights import limits

__all__ = [
    "TFCheckpointError",
    "DEFAULT_MAX_BYTES",
    "TensorEntry",
    "load",
    "read_index",
    "resolve_prefix",
    "is_checkpoint_prefix",
    "is_saved_model",
    "is_v1_file",
    "has_table_magic",
    "masked_crc32c",
]

# 8 GiB (embjax.weights.limits, shared by every reader): the largest thesis checkpoint (NASNet-Large) is
# about 0.4 GiB.
DEFAULT_MAX_BYTES = limits.DEFAULT_MAX_BYTES

_TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's (and TensorFlow's table) footer magic number
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_BLOCK_TRAILER = 5  # compression type byte + masked CRC32C
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"

# TensorFlow DataType enum values -> NumPy dtypes (little-endian; flipped for big-endian bundles).
_DT_STRING = 7
_DTYPES = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
_BFLOAT16 = 14
_DTYPE_NAMES = {7: "string", 8: "complex64", 11: "qint8", 12: "quint8", 13: "qint32", 14: "bfloat16",
                15: "qint16", 16: "quint16", 18: "complex128", 20: "resource", 21: "variant"}


class TFCheckpointError(ValueError):
    """A TensorFlow checkpoint that cannot be read as written: truncated, corrupt, or of a layout this
    reader does not handle. The message names the file and, where there is one, the tensor."""


# ---------------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), masked as TensorFlow and LevelDB store it


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _crc32c_python(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:  # the C implementation checks a gigabyte in well under a second; the fallback is for small data
    import google_crc32c as _google_crc32c

    def crc32c(data, crc: int = 0) -> int:
        """CRC32C of `data`, continuing from `crc` (the CRC of what came before)."""
        # The C extension refuses a bytearray but takes a NumPy view of it: no copy of tensor bytes.
        return _google_crc32c.extend(crc, np.frombuffer(data, np.uint8))

except ImportError:  # pragma: no cover - google-crc32c is a dependency; kept so a broken install still reads
    crc32c = _crc32c_python


def masked_crc32c(data, crc: int | None = None) -> int:
    """The masked CRC32C TensorFlow stores: rotate right by 15 bits and add a constant (so that a CRC
    of data that itself holds CRCs is not trivially related to them)."""
    crc = crc32c(data) if crc is None else crc
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------
# Varints and the protobuf wire format


class _Malformed(Exception):
    """Internal: a parse failure; turned into TFCheckpointError with the file and key attached."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed("varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """[(field number, wire type, value)] of one protobuf message: ints for varint/fixed fields, slices
    of `buf` for length-delimited ones (sub-messages, strings, packed arrays; views, not copies, when
    `buf` is a memoryview)."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            if pos + 8 > end:
                raise _Malformed("fixed64 field runs past the end of its message")
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("length-delimited field runs past the end of its message")
            value, pos = buf[pos : pos + length], pos + length  # a view when buf is a memoryview
        elif wire == 5:
            if pos + 4 > end:
                raise _Malformed("fixed32 field runs past the end of its message")
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value))
    return out


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor's BundleEntryProto: where its bytes are and how to check them."""

    name: str
    dtype: int  # TensorFlow DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked; None when the entry records none
    sliced: bool  # a partitioned variable: its data live in slice entries this reader does not join


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, wire, value in _fields(buf):
        if number == 2 and wire == 2:
            size = 0
            for n, w, v in _fields(value):
                if n == 1 and w == 0:
                    size = _int64(v)
            if size < 0:
                raise _Malformed(f"negative dimension {size}")
            dims.append(size)
        elif number == 3 and wire == 0 and value:
            raise _Malformed("shape of unknown rank")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> TensorEntry:
    dtype, shape, shard, offset, size, crc, sliced = 0, (), 0, 0, 0, None, False
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            shape = _parse_shape(value)
        elif number == 3 and wire == 0:
            shard = value
        elif number == 4 and wire == 0:
            offset = _int64(value)
        elif number == 5 and wire == 0:
            size = _int64(value)
        elif number == 6 and wire == 5:
            crc = value
        elif number == 7:
            sliced = True
    if offset < 0 or size < 0:
        raise _Malformed(f"negative offset {offset} or size {size}")
    return TensorEntry(name, dtype, shape, shard, offset, size, crc, sliced)


# ---------------------------------------------------------------------------------------------------
# The SSTable


def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    """The contents of the block at (offset, size), its trailer's checksum verified."""
    if offset + size + _BLOCK_TRAILER > len(data):
        raise _Malformed(
            f"{what} block at bytes {offset}..{offset + size + _BLOCK_TRAILER} runs past the end of the "
            f"file ({len(data)} bytes): truncated"
        )
    contents = data[offset : offset + size]
    kind = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1 : offset + size + 5], "little")
    actual = masked_crc32c(None, crc=crc32c(data[offset : offset + size + 1]))
    if stored != actual:
        raise _Malformed(f"{what} block at byte {offset}: checksum mismatch (stored {stored:#010x}, "
                         f"computed {actual:#010x}): the file is corrupt")
    if kind != 0:
        raise _Malformed(f"{what} block at byte {offset} is compressed (type {kind}); TensorFlow writes "
                         "checkpoint tables uncompressed and this reader reads only those")
    return contents


def _block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one block, keys restored from their shared prefixes."""
    if len(block) < 4:
        raise _Malformed(f"{what} block of {len(block)} bytes is too short for its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * restarts
    if restarts < 1 or limit < 0:
        raise _Malformed(f"{what} block has an impossible restart count {restarts}")
    entries, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos, limit)
        unshared, pos = _varint(block, pos, limit)
        value_len, pos = _varint(block, pos, limit)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise _Malformed(f"{what} block entry at byte {pos} overruns its block")
        key = key[:shared] + bytes(block[pos : pos + unshared])
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def _table_entries(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable held in `data`, in key order (values are views into `data`)."""
    data = memoryview(data)
    if len(data) < _FOOTER_SIZE:
        raise _Malformed(f"{len(data)} bytes is shorter than the table footer ({_FOOTER_SIZE}): truncated")
    footer = data[-_FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
        raise _Malformed("no table magic number at the end: truncated, or not a checkpoint .index file")
    pos = 0
    meta_offset, pos = _varint(footer, pos, 40)
    meta_size, pos = _varint(footer, pos, 40)
    index_offset, pos = _varint(footer, pos, 40)
    index_size, pos = _varint(footer, pos, 40)
    if any(footer[pos:40]):  # the writer pads the two handles with zeros: anything else is damage
        raise _Malformed("table footer padding is not zero: the file is corrupt")
    _read_block(data, meta_offset, meta_size, "metaindex")  # empty in checkpoints; read for its checksum
    index = _read_block(data, index_offset, index_size, "index")
    entries = []
    last_key = None
    for _, handle in _block_entries(index, "index"):
        offset, p = _varint(handle, 0, len(handle))
        size, _ = _varint(handle, p, len(handle))
        for key, value in _block_entries(_read_block(data, offset, size, "data"), "data"):
            if last_key is not None and key <= last_key:
                raise _Malformed(f"keys out of order ({last_key!r} then {key!r})")
            last_key = key
            entries.append((key, value))
    return entries


# ---------------------------------------------------------------------------------------------------
# Bundles


def is_checkpoint_prefix(path: str | os.PathLike) -> bool:
    """True when `path` names a checkpoint: `<path>.index` exists (or `path` is that .index file)."""
    path = os.fspath(path)
    return os.path.isfile(path + ".index") or (path.endswith(".index") and os.path.isfile(path))


def is_saved_model(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding `variables/variables.index` (a SavedModel's variables)."""
    return os.path.isfile(os.path.join(os.fspath(path), "variables", "variables.index"))


def resolve_prefix(path: str | os.PathLike) -> str:
    """The checkpoint prefix `path` stands for: itself, itself minus `.index`, a data shard's prefix, or
    `<path>/variables/variables` for a SavedModel directory. FileNotFoundError when there is none."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_saved_model(path):
            return os.path.join(path, "variables", "variables")
        if os.path.isfile(os.path.join(path, "variables.index")):  # the variables/ directory itself
            return os.path.join(path, "variables")
        raise FileNotFoundError(
            f"{path!r} is a directory without variables/variables.index: not a SavedModel; pass a "
            "checkpoint prefix (the path of model.ckpt.index minus '.index') or a SavedModel directory"
        )
    if path.endswith(".index") and os.path.isfile(path):
        return path[: -len(".index")]
    base, sep, _ = path.rpartition(".data-")
    if sep and os.path.isfile(base + ".index"):
        return base
    if os.path.isfile(path + ".index"):
        return path
    raise FileNotFoundError(f"no TensorFlow checkpoint at {path!r}: {path + '.index'!r} does not exist")


def read_index(index_path: str | os.PathLike) -> tuple[dict, dict[str, TensorEntry]]:
    """(header, {tensor name: TensorEntry}) of a `.index` file; header has num_shards and endianness."""
    index_path = os.fspath(index_path)
    try:
        with open(index_path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise TFCheckpointError(f"cannot read checkpoint index {index_path!r}: {err}") from err
    try:
        raw = _table_entries(data)
    except _Malformed as err:
        raise TFCheckpointError(f"checkpoint index {index_path!r}: {err}") from None
    header, entries = None, {}
    for key, value in raw:
        if key.startswith(b"\x00"):
            continue  # a slice of a partitioned variable (binary key); its full entry is refused in load
        try:
            name = key.decode("utf8")
        except UnicodeDecodeError:
            raise TFCheckpointError(f"checkpoint index {index_path!r}: key {key!r} is not UTF-8") from None
        try:
            if name == "":
                header = {"num_shards": 1, "endianness": 0}
                for number, wire, v in _fields(value):
                    if number == 1 and wire == 0:
                        header["num_shards"] = v
                    elif number == 2 and wire == 0:
                        header["endianness"] = v
            else:
                entries[name] = _parse_entry(name, value)
        except _Malformed as err:
            raise TFCheckpointError(f"checkpoint index {index_path!r}, tensor {name!r}: {err}") from None
    if header is None:
        raise TFCheckpointError(
            f"checkpoint index {index_path!r} has no bundle header (empty key): not a TensorFlow V2 checkpoint"
        )
    if header["num_shards"] < 1 or header["endianness"] not in (0, 1):
        raise TFCheckpointError(f"checkpoint index {index_path!r}: impossible header {header}")
    for entry in entries.values():
        if entry.shard_id >= header["num_shards"]:
            raise TFCheckpointError(
                f"checkpoint index {index_path!r}, tensor {entry.name!r}: shard {entry.shard_id} of "
                f"{header['num_shards']}"
            )
    return header, entries


def _numpy_dtype(entry: TensorEntry, big_endian: bool):
    dtype = _dtype_of(entry.dtype)
    if dtype is None:
        return None
    return dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype


def _dtype_of(enum: int):
    """The NumPy dtype of a TensorFlow DataType enum value; None for types this reader does not return."""
    if enum == _BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return _DTYPES.get(enum)


def _read_string_tensor(raw: bytes, entry: TensorEntry) -> list[bytes]:
    """Elements of a string tensor: varint lengths, a masked CRC32C of the lengths, then the bytes."""
    count = int(np.prod(entry.shape, dtype=np.int64))
    pos, lengths = 0, []
    for _ in range(count):
        length, pos = _varint(raw, pos, len(raw))
        lengths.append(length)
    pos += 4  # the lengths' own checksum; the entry's checksum covers it and everything else
    out = []
    for length in lengths:
        if pos + length > len(raw):
            raise _Malformed("string element runs past the tensor's bytes")
        out.append(raw[pos : pos + length])
        pos += length
    return out


def _string_tensor_crc(raw: bytes, entry: TensorEntry) -> int:
    """The CRC32C TensorFlow computes for a string tensor: over each length as a little-endian uint32
    (uint64 beyond 4 GiB; not the varints that are stored), then the stored length checksum and the
    string bytes."""
    count = int(np.prod(entry.shape, dtype=np.int64))
    pos, crc = 0, 0
    for _ in range(count):
        length, pos = _varint(raw, pos, len(raw))
        crc = crc32c(struct.pack("<I" if length <= 0xFFFFFFFF else "<Q", length), crc)
    return crc32c(raw[pos:], crc)


def _object_graph_names(blob: bytes) -> dict[str, str]:
    """{checkpoint key: variable full name} from a serialized TrackableObjectGraph."""
    names = {}
    for number, wire, node in _fields(blob):
        if number != 1 or wire != 2:
            continue
        for n, w, attribute in _fields(node):
            if n != 2 or w != 2:
                continue
            full_name = key = ""
            for an, aw, av in _fields(attribute):
                if an == 2 and aw == 2:
                    full_name = bytes(av).decode("utf8", "replace")
                elif an == 3 and aw == 2:
                    key = bytes(av).decode("utf8", "replace")
            if key and full_name:
                names[key] = full_name[:-2] if full_name.endswith(":0") else full_name
    return names


def _shard_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def load(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """{variable name: array} of the TensorFlow checkpoint or SavedModel at `path` (see the module
    docstring for accepted paths and the naming of SavedModel variables).

    Raises FileNotFoundError when there is no checkpoint or a data shard is missing, and
    TFCheckpointError naming the file (and tensor) for anything truncated, corrupt, unsupported, or
    larger in total than `max_bytes` (default: $EMBJAX_MAX_WEIGHT_BYTES or 8 GiB, as for every reader;
    see `embjax.weights.limits`).
    """
    max_bytes = limits.resolve_max_bytes(max_bytes)
    if is_v1_file(path):
        return _load_v1(os.fspath(path), max_bytes)
    prefix = resolve_prefix(path)
    index_path = prefix + ".index"
    header, entries = read_index(index_path)
    big_endian = header["endianness"] == 1
    num_shards = header["num_shards"]

    plan = []
    total = 0
    for entry in entries.values():
        if entry.sliced:
            raise TFCheckpointError(
                f"checkpoint index {index_path!r}, tensor {entry.name!r}: a partitioned (sliced) variable; "
                "this reader reads whole tensors only"
            )
        dtype = None if entry.dtype == _DT_STRING else _numpy_dtype(entry, big_endian)
        if entry.dtype != _DT_STRING and dtype is None:
            kind = _DTYPE_NAMES.get(entry.dtype, f"enum value {entry.dtype}")
            raise TFCheckpointError(
                f"checkpoint index {index_path!r}, tensor {entry.name!r}: dtype {kind} is not supported"
            )
        if dtype is not None:
            count = int(np.prod(entry.shape, dtype=np.int64))
            if entry.size != count * dtype.itemsize:
                raise TFCheckpointError(
                    f"checkpoint index {index_path!r}, tensor {entry.name!r}: {entry.size} bytes recorded "
                    f"for shape {entry.shape} of {dtype.name} ({count * dtype.itemsize} bytes): corrupt"
                )
            total += entry.size
        else:
            total += entry.size  # string tensors are read for their checksums, then left out
        plan.append((entry, dtype))
    if total > max_bytes:
        raise TFCheckpointError(
            f"checkpoint {prefix!r} holds {total / 2**30:.2f} GiB of tensors, more than max_bytes="
            f"{max_bytes / 2**30:.2f} GiB; pass a larger max_bytes if that much memory is available"
        )

    arrays: dict[str, np.ndarray] = {}
    object_graph: bytes | None = None
    plan.sort(key=lambda p: (p[0].shard_id, p[0].offset))
    handles: dict[int, tuple[str, object, int]] = {}
    try:
        for entry, dtype in plan:
            if entry.shard_id not in handles:
                shard_path = _shard_path(prefix, entry.shard_id, num_shards)
                if not os.path.isfile(shard_path):
                    raise FileNotFoundError(
                        f"checkpoint {prefix!r}: data shard {shard_path!r} is missing (needed for tensor "
                        f"{entry.name!r})"
                    )
                handles[entry.shard_id] = (shard_path, open(shard_path, "rb"), os.path.getsize(shard_path))
            shard_path, handle, shard_size = handles[entry.shard_id]
            where = f"checkpoint data {shard_path!r}, tensor {entry.name!r}"
            if entry.offset + entry.size > shard_size:
                raise TFCheckpointError(
                    f"{where}: bytes {entry.offset}..{entry.offset + entry.size} lie past the end of the "
                    f"file ({shard_size} bytes): truncated"
                )
            handle.seek(entry.offset)
            raw = bytearray(entry.size)
            if handle.readinto(raw) != entry.size:
                raise TFCheckpointError(f"{where}: short read: truncated")
            try:
                crc = _string_tensor_crc(bytes(raw), entry) if dtype is None else crc32c(raw)
            except _Malformed as err:
                raise TFCheckpointError(f"{where}: {err}") from None
            if entry.crc32c is not None and masked_crc32c(None, crc=crc) != entry.crc32c:
                raise TFCheckpointError(
                    f"{where}: checksum mismatch (stored {entry.crc32c:#010x}, computed "
                    f"{masked_crc32c(None, crc=crc):#010x}): the file is corrupt"
                )
            if dtype is None:
                if entry.name == _OBJECT_GRAPH_KEY:
                    try:
                        (object_graph,) = _read_string_tensor(bytes(raw), entry)[:1] or [b""]
                    except _Malformed as err:
                        raise TFCheckpointError(f"{where}: {err}") from None
                continue
            array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
            arrays[entry.name] = array.astype(dtype.newbyteorder("="), copy=False) if big_endian else array
    finally:
        for _, handle, _ in handles.values():
            handle.close()

    if object_graph is None:
        return arrays
    try:
        full_names = _object_graph_names(object_graph)
    except (_Malformed, UnicodeDecodeError) as err:
        raise TFCheckpointError(f"checkpoint {prefix!r}, tensor {_OBJECT_GRAPH_KEY!r}: {err}") from None
    counts: dict[str, int] = {}
    for key in arrays:
        name = full_names.get(key)
        if name:
            counts[name] = counts.get(name, 0) + 1
    renamed = {}
    for key, array in arrays.items():
        name = full_names.get(key)
        if not name or counts[name] > 1:
            name = key[: -len(_VARIABLE_SUFFIX)] if key.endswith(_VARIABLE_SUFFIX) else key
        if name in renamed:  # an object path equal to another variable's full name: keep both apart
            name = key
        renamed[name] = array
    return renamed


# ---------------------------------------------------------------------------------------------------
# The older V1 format (TF-Slim's 2016 model-zoo files): one SSTable file, no .index beside it. Under the
# empty key a SavedTensorSlices message with the `meta` of every tensor (name, shape, dtype, slices);
# under every other key a SavedTensorSlices with one `data` slice: the tensor's name, the slice's
# extents and a TensorProto holding the values (packed repeated fields). V1 stores no per-tensor
# checksums; the table blocks' checksums cover every byte of the file.


def is_v1_file(path: str | os.PathLike) -> bool:
    """True when `path` is a file that can only be a V1 checkpoint: not an .index or .data shard, and
    no `<path>.index` beside it (whether it really is one, `load` checks)."""
    path = os.fspath(path)
    base = os.path.basename(path)
    return (os.path.isfile(path) and not path.endswith(".index") and ".data-" not in base
            and not os.path.isfile(path + ".index"))


def has_table_magic(path: str | os.PathLike) -> bool:
    """True when the file ends with the SSTable magic number (a V1 checkpoint, or a V2 .index)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size < _FOOTER_SIZE:
            return False
        with open(path, "rb") as f:
            f.seek(size - 8)
            return int.from_bytes(f.read(8), "little") == _TABLE_MAGIC
    except OSError:
        return False


# TensorProto fields holding values, by dtype: (field number, element dtype when packed as fixed-width,
# None for varints).
_VALUE_FIELDS = {
    1: (5, np.dtype("<f4")),  # float_val
    2: (6, np.dtype("<f8")),  # double_val
    3: (7, None), 4: (7, None), 5: (7, None), 6: (7, None), 17: (7, None),  # int_val
    9: (10, None),  # int64_val
    10: (11, None),  # bool_val
    14: (13, None), 19: (13, None), 22: (16, None), 23: (17, None),  # half_val, uint32_val, uint64_val
}


def _varints(buf: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos, len(buf))
        out.append(value)
    return out


def _tensor_proto_values(buf: bytes, enum: int, dtype: np.dtype, count: int) -> np.ndarray:
    """The `count` values of a serialized TensorProto of DataType `enum`, as a flat array of `dtype`."""
    number, packed_dtype = _VALUE_FIELDS[enum]
    content, parts, scalars = None, [], []
    for n, wire, value in _fields(buf):
        if n == 4 and wire == 2:
            content = value
        elif n == number:
            if wire == 2 and packed_dtype is not None:
                parts.append(np.frombuffer(value, packed_dtype))
            elif wire == 2:
                scalars.extend(_varints(value))
            elif wire == 5 and packed_dtype is not None:
                parts.append(np.frombuffer(struct.pack("<I", value), packed_dtype))
            elif wire == 1 and packed_dtype is not None:
                parts.append(np.frombuffer(struct.pack("<Q", value), packed_dtype))
            else:
                scalars.append(value)
    if content is not None:
        if len(content) != count * dtype.itemsize:
            raise _Malformed(f"{len(content)} bytes of content for {count} values of {dtype.name}")
        return np.frombuffer(content, dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype).astype(dtype)
    if packed_dtype is not None:
        values = np.concatenate(parts) if parts else np.zeros(0, packed_dtype)
    elif enum in (14, 19):  # half/bfloat16 bit patterns in int32 varints
        values = np.asarray(scalars, np.uint16).view(dtype)
    else:
        values = np.asarray([_int64(v) if enum not in (10, 22, 23) else v for v in scalars], np.int64)
    if values.size != count:
        raise _Malformed(f"{values.size} values stored for a slice of {count}")
    return values.astype(dtype, copy=False)


def _extents(buf: bytes | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of a TensorSliceProto in a tensor of `shape` (an extent without length is the full dim)."""
    extents = [] if buf is None else [v for n, w, v in _fields(buf) if n == 1 and w == 2]
    if buf is not None and len(extents) != len(shape):
        raise _Malformed(f"slice of rank {len(extents)} in a tensor of rank {len(shape)}")
    index = []
    for dim, extent in zip(shape, extents or [b""] * len(shape)):
        start, length = 0, None
        for n, w, v in _fields(extent):
            if n == 1 and w == 0:
                start = _int64(v)
            elif n == 2 and w == 0:
                length = _int64(v)
        length = dim - start if length is None else length
        if start < 0 or length < 0 or start + length > dim:
            raise _Malformed(f"slice {start}:{start + length} outside a dimension of {dim}")
        index.append(slice(start, start + length))
    return tuple(index)


def _load_v1(path: str, max_bytes: int) -> dict[str, np.ndarray]:
    size = os.path.getsize(path)
    if size > max_bytes:  # values take about the file's size (proto framing adds a little)
        raise TFCheckpointError(
            f"checkpoint {path!r} is {size / 2**30:.2f} GiB, more than max_bytes={max_bytes / 2**30:.2f} GiB; "
            "pass a larger max_bytes if that much memory is available"
        )
    with open(path, "rb") as f:
        data = f.read()
    try:
        raw = _table_entries(data)
    except _Malformed as err:
        raise TFCheckpointError(
            f"checkpoint {path!r}: {err} (read as a TensorFlow V1 checkpoint, since no {path + '.index'!r} "
            "is beside it)"
        ) from None
    if not raw or raw[0][0] != b"":
        raise TFCheckpointError(f"checkpoint {path!r}: no V1 metadata entry (empty key): not a TF checkpoint")
    metas: dict[str, tuple[tuple[int, ...], int]] = {}
    try:
        for number, wire, meta in _fields(raw[0][1]):
            if number != 1 or wire != 2:
                continue
            for n, w, tensor in _fields(meta):
                if n != 1 or w != 2:
                    continue
                name, shape, enum = "", (), 0
                for tn, tw, tv in _fields(tensor):
                    if tn == 1 and tw == 2:
                        name = bytes(tv).decode("utf8")
                    elif tn == 2 and tw == 2:
                        shape = _parse_shape(tv)
                    elif tn == 3 and tw == 0:
                        enum = tv
                metas[name] = (shape, enum)
    except (_Malformed, UnicodeDecodeError) as err:
        raise TFCheckpointError(f"checkpoint {path!r}, metadata: {err}") from None
    declared, total = {}, 0
    for name, (shape, enum) in metas.items():
        dtype = _dtype_of(enum)
        if dtype is None and enum != _DT_STRING:
            kind = _DTYPE_NAMES.get(enum, f"enum value {enum}")
            raise TFCheckpointError(f"checkpoint {path!r}, tensor {name!r}: dtype {kind} is not supported")
        if dtype is not None:
            declared[name] = dtype
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if total > max_bytes:  # the metadata's shapes, checked before anything is allocated
        raise TFCheckpointError(
            f"checkpoint {path!r} declares {total / 2**30:.2f} GiB of tensors, more than max_bytes="
            f"{max_bytes / 2**30:.2f} GiB; pass a larger max_bytes if that much memory is available"
        )
    arrays = {name: np.zeros(metas[name][0], dtype) for name, dtype in declared.items()}
    filled = {name: 0 for name in arrays}
    for key, value in raw[1:]:
        name = key
        try:
            for number, wire, saved in _fields(value):
                if number != 2 or wire != 2:
                    continue
                slice_buf, proto = None, None
                for n, w, v in _fields(saved):
                    if n == 1 and w == 2:
                        name = bytes(v).decode("utf8")
                    elif n == 2 and w == 2:
                        slice_buf = v
                    elif n == 3 and w == 2:
                        proto = v
                if name not in metas:
                    raise _Malformed("data for a tensor the metadata does not list")
                if name not in arrays:
                    continue  # a string tensor: bookkeeping, left out
                target = arrays[name]
                index = _extents(slice_buf, target.shape)
                part_shape = tuple(s.stop - s.start for s in index)
                count = int(np.prod(part_shape, dtype=np.int64))
                target[index] = _tensor_proto_values(proto or b"", metas[name][1], target.dtype, count).reshape(
                    part_shape)
                filled[name] += count
        except (_Malformed, UnicodeDecodeError, KeyError) as err:
            raise TFCheckpointError(f"checkpoint {path!r}, tensor {name!r}: {err}") from None
    for name, count in filled.items():
        if count != arrays[name].size:
            raise TFCheckpointError(
                f"checkpoint {path!r}, tensor {name!r}: slices cover {count} of {arrays[name].size} values: "
                "the file is incomplete"
            )
    return arrays
