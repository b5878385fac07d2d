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

Bounded by construction: only regular files are opened; the footer's magic number is checked before
anything else is read, and every block's extent against the file's size before it is read; tables are
read one block at a time and keys restored one at a time, against the named bounds of
`embjax.weights.limits.Limits` (entries, key bytes, rank, element counts in exact integers, the size of
an .index); restart arrays are checked; tensors whose bytes overlap and V1 slices that overlap are
refused; an entry without a checksum is checked against 0 (proto3 leaves a zero field out, so that is
what it records). The time and memory of a refusal follow the bytes read up to the first bad field.

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

from embjax.weights import limits as limits_mod

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
DEFAULT_MAX_BYTES = limits_mod.DEFAULT_MAX_BYTES

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
    if pos < end and buf[pos] < 0x80:  # one byte: most lengths, tags and small values
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed("varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >> 64:
                raise _Malformed("varint value does not fit 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _fields(buf):
    """(field number, wire type, value) of one protobuf message, in order: ints for varint/fixed fields,
    slices of `buf` for length-delimited ones (sub-messages, strings, packed arrays; views, not copies,
    when `buf` is a memoryview). A generator: a bad field raises when it is reached."""
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
            if length > end - pos:
                raise _Malformed("length-delimited field runs past the end of its message")
            value, pos = buf[pos : pos + length], pos + length  # a view when buf is a memoryview
        elif wire == 5:
            if pos + 4 > end:
                raise _Malformed("fixed32 field runs past the end of its message")
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


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
    # The masked CRC32C of the bytes. The entry is proto3, so a checksum that happens to be 0 is not
    # written: an entry without the field records 0, and is checked against 0 like any other.
    crc32c: int
    sliced: bool  # a partitioned variable: its data live in slice entries this reader does not join
    count: int = 0  # elements, from the shape (exact)


def _parse_shape(buf, lim: limits_mod.Limits) -> tuple[int, ...]:
    dims = []
    for number, wire, value in _fields(buf):
        if number == 2 and wire == 2:
            if len(dims) >= lim.max_rank:
                raise _Malformed(f"shape of rank above max_rank={lim.max_rank}; {limits_mod.Limits.hint('max_rank')}")
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


def _element_count(shape: tuple[int, ...], lim: limits_mod.Limits) -> int:
    try:
        return limits_mod.element_count(shape, lim)
    except ValueError as err:
        raise _Malformed(str(err)) from None


def _parse_entry(name: str, buf, lim: limits_mod.Limits) -> TensorEntry:
    dtype, shape, shard, offset, size, crc, sliced = 0, (), 0, 0, 0, 0, False
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            shape = _parse_shape(value, lim)
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
    return TensorEntry(name, dtype, shape, shard, offset, size, crc, sliced, _element_count(shape, lim))


# ---------------------------------------------------------------------------------------------------
# The SSTable, read one block at a time (never the whole file)


class _Table:
    """An open SSTable file. `entries()` yields its (key, value) pairs in order, reading, checking and
    parsing one block at a time: the footer's magic number is checked before anything else is read, each
    block's extent against the file's size before it is read, and the entry count and key sizes against
    `limits` as keys are restored, so a bad file costs what was read up to its first bad field."""

    def __init__(self, handle, size: int, lim: limits_mod.Limits):
        self.handle, self.size, self.limits = handle, size, lim

    def _read(self, offset: int, length: int) -> bytes:
        self.handle.seek(offset)
        data = self.handle.read(length)
        if len(data) != length:
            raise _Malformed(f"short read at byte {offset}: the file changed or is truncated")
        return data

    def block(self, offset: int, size: int, what: str) -> memoryview:
        """The contents of the block at (offset, size), its trailer's checksum verified."""
        if offset + size + _BLOCK_TRAILER > self.size:
            raise _Malformed(
                f"{what} block at bytes {offset}..{offset + size + _BLOCK_TRAILER} runs past the end of the "
                f"file ({self.size} bytes): truncated")
        data = self._read(offset, size + _BLOCK_TRAILER)
        kind = data[size]
        stored = int.from_bytes(data[size + 1 : size + 5], "little")
        actual = masked_crc32c(None, crc=crc32c(memoryview(data)[: size + 1]))
        if stored != actual:
            raise _Malformed(f"{what} block at byte {offset}: checksum mismatch (stored {stored:#010x}, "
                             f"computed {actual:#010x}): the file is corrupt")
        if kind != 0:
            raise _Malformed(f"{what} block at byte {offset} is compressed (type {kind}); TensorFlow writes "
                             "checkpoint tables uncompressed and this reader reads only those")
        return memoryview(data)[:size]

    def _block_entries(self, block: memoryview, what: str):
        """(key, value) of one block, keys restored from their shared prefixes one at a time; the restart
        array is checked: it starts at 0, ascends, and every restart point is the start of an entry that
        shares nothing with the key before it."""
        if len(block) < 4:
            raise _Malformed(f"{what} block of {len(block)} bytes is too short for its restart count")
        restarts = int.from_bytes(block[-4:], "little")
        limit = len(block) - 4 - 4 * restarts
        if restarts < 1 or limit < 0:
            raise _Malformed(f"{what} block has an impossible restart count {restarts}")
        points = np.frombuffer(block[limit : len(block) - 4], "<u4").astype(np.int64)
        if points[0] != 0 or (points.size > 1 and (np.diff(points) <= 0).any()) or points[-1] >= max(limit, 1):
            raise _Malformed(f"{what} block's restart array ({restarts} points) does not start at 0, ascend "
                             "and stay inside the block: the file is corrupt")
        points = points.tolist()
        key, pos, next_point = b"", 0, 0
        max_key = self.limits.max_key_bytes
        while pos < limit:
            at_restart = next_point < restarts and points[next_point] == pos
            if next_point < restarts and points[next_point] < pos:
                raise _Malformed(f"{what} block: restart point {int(points[next_point])} is not the start of an entry")
            next_point += at_restart
            start = pos
            shared, pos = _varint(block, pos, limit)
            unshared, pos = _varint(block, pos, limit)
            value_len, pos = _varint(block, pos, limit)
            if at_restart and shared:
                raise _Malformed(f"{what} block entry at byte {start} is a restart point but shares "
                                 f"{shared} bytes with the key before it")
            if shared > len(key):
                raise _Malformed(f"{what} block entry at byte {start} shares {shared} bytes of a "
                                 f"{len(key)}-byte key")
            if shared + unshared > max_key:
                raise _Malformed(f"{what} block entry at byte {start}: a key of {shared + unshared:,} bytes, more "
                                 f"than max_key_bytes={max_key:,}; {limits_mod.Limits.hint('max_key_bytes')}")
            if unshared + value_len > limit - pos:
                raise _Malformed(f"{what} block entry at byte {start} overruns its block")
            key = key[:shared] + bytes(block[pos : pos + unshared])
            pos += unshared
            yield key, block[pos : pos + value_len]
            pos += value_len
        if next_point != restarts and limit:
            raise _Malformed(f"{what} block: restart point {int(points[next_point])} is not the start of an entry")

    def entries(self):
        """Every (key, value) of the table in key order (values are views into their block)."""
        if self.size < _FOOTER_SIZE:
            raise _Malformed(f"{self.size} bytes is shorter than the table footer ({_FOOTER_SIZE}): truncated")
        footer = self._read(self.size - _FOOTER_SIZE, _FOOTER_SIZE)
        if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
            raise _Malformed("no table magic number at the end: truncated, or not a TensorFlow checkpoint table")
        pos = 0
        meta_offset, pos = _varint(footer, pos, 40)
        meta_size, pos = _varint(footer, pos, 40)
        index_offset, pos = _varint(footer, pos, 40)
        index_size, pos = _varint(footer, pos, 40)
        if any(footer[pos:40]):  # the writer pads the two handles with zeros: anything else is damage
            raise _Malformed("table footer padding is not zero: the file is corrupt")
        # Empty in checkpoints (no filter blocks); read for its checksum and its layout, then ignored.
        for _ in self._block_entries(self.block(meta_offset, meta_size, "metaindex"), "metaindex"):
            pass
        index = self.block(index_offset, index_size, "index")
        lim = self.limits
        count = key_bytes = 0
        last_key = None
        for _, handle in self._block_entries(index, "index"):
            offset, p = _varint(handle, 0, len(handle))
            size, p = _varint(handle, p, len(handle))
            if p != len(handle):
                raise _Malformed("index block entry holds more than a block handle")
            for key, value in self._block_entries(self.block(offset, size, "data"), "data"):
                if last_key is not None and key <= last_key:
                    raise _Malformed(f"keys out of order ({limits_mod.short_repr(last_key)} then "
                                     f"{limits_mod.short_repr(key)})")
                count += 1
                key_bytes += len(key)
                if count > lim.max_entries:
                    raise _Malformed(f"more than max_entries={lim.max_entries:,} entries; "
                                     f"{limits_mod.Limits.hint('max_entries')}")
                if key_bytes > lim.max_total_key_bytes:
                    raise _Malformed(f"keys of more than max_total_key_bytes={lim.max_total_key_bytes:,} bytes "
                                     f"in all; {limits_mod.Limits.hint('max_total_key_bytes')}")
                last_key = key
                yield key, value


def _open_regular(path: str, what: str):
    """(handle, size) of a regular file; TFCheckpointError for a FIFO, device, directory or unreadable file
    (FileNotFoundError when there is none)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not limits_mod.is_regular_file(path):
        raise TFCheckpointError(f"{what} {path!r} is not a regular file (a FIFO, device or directory); "
                                "checkpoints are read from regular files only")
    try:
        handle = open(path, "rb")
        return handle, os.fstat(handle.fileno()).st_size
    except OSError as err:
        raise TFCheckpointError(f"cannot read {what} {path!r}: {err}") from err


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
        if os.path.exists(os.path.join(path, "variables", "variables.index")):
            return os.path.join(path, "variables", "variables")
        if os.path.exists(os.path.join(path, "variables.index")):  # the variables/ directory itself
            return os.path.join(path, "variables")
        raise FileNotFoundError(
            f"{path!r} is a directory without variables/variables.index: not a SavedModel; pass a "
            "checkpoint prefix (the path of model.ckpt.index minus '.index') or a SavedModel directory"
        )
    if path.endswith(".index") and os.path.exists(path):
        return path[: -len(".index")]
    base, sep, _ = path.rpartition(".data-")
    if sep and os.path.exists(base + ".index"):
        return base
    if os.path.exists(path + ".index"):
        return path
    raise FileNotFoundError(f"no TensorFlow checkpoint at {path!r}: {path + '.index'!r} does not exist")


def read_index(index_path: str | os.PathLike,
               limits: limits_mod.Limits | None = None) -> tuple[dict, dict[str, TensorEntry]]:
    """(header, {tensor name: TensorEntry}) of a `.index` file; header has num_shards and endianness."""
    index_path = os.fspath(index_path)
    lim = limits_mod.Limits.resolve(limits)
    handle, size = _open_regular(index_path, "checkpoint index")
    where = f"checkpoint index {index_path!r}"
    header, entries = None, {}
    name = None
    with handle:
        if size > lim.max_header_bytes:
            raise TFCheckpointError(f"{where} is {size:,} bytes, more than max_header_bytes="
                                    f"{lim.max_header_bytes:,}; {limits_mod.Limits.hint('max_header_bytes')}")
        try:
            for key, value in _Table(handle, size, lim).entries():
                name = None
                if key.startswith(b"\x00"):
                    continue  # a slice of a partitioned variable (binary key); its full entry is refused in load
                try:
                    name = key.decode("utf8")
                except UnicodeDecodeError:
                    raise _Malformed(f"key {limits_mod.short_repr(key)} is not UTF-8") from None
                if name == "":
                    header = {"num_shards": 1, "endianness": 0}
                    for number, wire, v in _fields(value):
                        if number == 1 and wire == 0:
                            header["num_shards"] = v
                        elif number == 2 and wire == 0:
                            header["endianness"] = v
                else:
                    entries[name] = _parse_entry(name, value, lim)
                name = None  # a table error past this entry is not this tensor's
        except _Malformed as err:
            at = f", tensor {name!r}" if name else ""
            raise TFCheckpointError(f"{where}{at}: {err}") from None
        except OSError as err:
            raise TFCheckpointError(f"cannot read {where}: {err}") from err
    if header is None:
        raise TFCheckpointError(
            f"{where} has no bundle header (empty key): not a TensorFlow V2 checkpoint"
        )
    if header["num_shards"] < 1 or header["endianness"] not in (0, 1):
        raise TFCheckpointError(f"{where}: impossible header {header}")
    for entry in entries.values():
        if entry.shard_id >= header["num_shards"]:
            raise TFCheckpointError(
                f"{where}, tensor {entry.name!r}: shard {entry.shard_id} of {header['num_shards']}"
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
    if entry.count > len(raw):  # every element's length takes at least one byte
        raise _Malformed(f"{entry.count:,} strings cannot fit in {len(raw):,} bytes")
    pos, lengths = 0, []
    for _ in range(entry.count):
        length, pos = _varint(raw, pos, len(raw))
        lengths.append(length)
    pos += 4  # the lengths' own checksum; the entry's checksum covers it and everything else
    out = []
    for length in lengths:
        if length > len(raw) - pos:
            raise _Malformed("string element runs past the tensor's bytes")
        out.append(raw[pos : pos + length])
        pos += length
    return out


def _string_tensor_crc(raw: bytes, entry: TensorEntry) -> int:
    """The CRC32C TensorFlow computes for a string tensor: over each length as a little-endian uint32
    (uint64 beyond 4 GiB; not the varints that are stored), then the stored length checksum and the
    string bytes."""
    if entry.count > len(raw):
        raise _Malformed(f"{entry.count:,} strings cannot fit in {len(raw):,} bytes")
    pos, crc = 0, 0
    for _ in range(entry.count):
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


# What a damaged file can still raise from NumPy or the standard library where no check above names it:
# turned into TFCheckpointError by `load`, so a caller catches one error type for every bad file.
_STRAY_ERRORS = (ValueError, OverflowError, IndexError, KeyError, TypeError, struct.error, UnicodeError)


def load(path: str | os.PathLike, max_bytes: int | None = None,
         limits: limits_mod.Limits | None = None) -> dict[str, np.ndarray]:
    """{variable name: array} of the TensorFlow checkpoint or SavedModel at `path` (see the module
    docstring for accepted paths and the naming of SavedModel variables).

    Raises FileNotFoundError when there is no checkpoint or a data shard is missing, and
    TFCheckpointError naming the file (and tensor) for anything truncated, corrupt, unsupported, or
    beyond a limit: `max_bytes` caps the total size (default: $EMBJAX_MAX_WEIGHT_BYTES or 8 GiB, as for
    every reader), `limits` the entries, key sizes, ranks and element counts (default `Limits.resolve()`;
    see `embjax.weights.limits`).
    """
    max_bytes = limits_mod.resolve_max_bytes(max_bytes)  # a bad setting is the caller's error, not the file's
    limits = limits_mod.Limits.resolve(limits)
    try:
        return _load(os.fspath(path), max_bytes, limits)
    except (TFCheckpointError, FileNotFoundError):
        raise
    except _STRAY_ERRORS as err:
        raise TFCheckpointError(f"checkpoint {os.fspath(path)!r}: unreadable ({type(err).__name__}: "
                                f"{limits_mod.short_repr(str(err))}); the file is corrupt") from err
    except OSError as err:
        raise TFCheckpointError(f"cannot read checkpoint {os.fspath(path)!r}: {err}") from err


def _load(path: str, max_bytes: int | None, limits_: limits_mod.Limits | None) -> dict[str, np.ndarray]:
    max_bytes = limits_mod.resolve_max_bytes(max_bytes)
    lim = limits_mod.Limits.resolve(limits_)
    if os.path.exists(path) and not os.path.isdir(path) and not limits_mod.is_regular_file(path):
        raise TFCheckpointError(f"checkpoint {path!r} is not a regular file (a FIFO, device or socket); "
                                "checkpoints are read from regular files only")
    if is_v1_file(path):
        return _load_v1(path, max_bytes, lim)
    prefix = resolve_prefix(path)
    index_path = prefix + ".index"
    header, entries = read_index(index_path, lim)
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
        if dtype is not None and entry.size != entry.count * dtype.itemsize:
            raise TFCheckpointError(
                f"checkpoint index {index_path!r}, tensor {entry.name!r}: {entry.size} bytes recorded "
                f"for shape {entry.shape} of {dtype.name} ({entry.count * dtype.itemsize} bytes): corrupt"
            )
        total += entry.size  # string tensors are read for their checksums, then left out
        plan.append((entry, dtype))
    if total > max_bytes:
        raise TFCheckpointError(
            f"checkpoint {prefix!r} holds {total / 2**30:.2f} GiB of tensors, more than max_bytes="
            f"{max_bytes / 2**30:.2f} GiB; pass a larger max_bytes if that much memory is available"
        )
    # Every tensor's bytes are its own: TensorFlow writes them one after another (with at most alignment
    # padding between), so two byte ranges that overlap mean a damaged or crafted index.
    plan.sort(key=lambda p: (p[0].shard_id, p[0].offset, p[0].size))
    previous = None
    for entry, _ in plan:
        if not entry.size:
            continue
        if previous is not None and previous.shard_id == entry.shard_id and \
                entry.offset < previous.offset + previous.size:
            raise TFCheckpointError(
                f"checkpoint index {index_path!r}, tensor {entry.name!r}: bytes {entry.offset}.."
                f"{entry.offset + entry.size} of shard {entry.shard_id} overlap those of tensor "
                f"{previous.name!r} ({previous.offset}..{previous.offset + previous.size}): corrupt")
        previous = entry

    arrays: dict[str, np.ndarray] = {}
    object_graph: bytes | None = None
    shard = None  # (shard id, path, handle, size): one shard open at a time, the plan runs shard by shard
    try:
        for entry, dtype in plan:
            if shard is None or shard[0] != entry.shard_id:
                if shard is not None:
                    shard[2].close()
                    shard = None
                shard_path = _shard_path(prefix, entry.shard_id, num_shards)
                try:
                    handle, size = _open_regular(shard_path, "checkpoint data shard")
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"checkpoint {prefix!r}: data shard {shard_path!r} is missing (needed for tensor "
                        f"{entry.name!r})"
                    ) from None
                shard = (entry.shard_id, shard_path, handle, size)
            _, shard_path, handle, shard_size = shard
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
            if masked_crc32c(None, crc=crc) != entry.crc32c:
                raise TFCheckpointError(
                    f"{where}: checksum mismatch (stored {entry.crc32c:#010x}"
                    f"{', the entry records none' if not entry.crc32c else ''}, computed "
                    f"{masked_crc32c(None, crc=crc):#010x}): the file is corrupt"
                )
            if dtype is None:
                if entry.name == _OBJECT_GRAPH_KEY:
                    try:
                        (object_graph,) = _read_string_tensor(bytes(raw), entry)[:1] or [b""]
                    except _Malformed as err:
                        raise TFCheckpointError(f"{where}: {err}") from None
                continue
            try:
                array = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
            except ValueError as err:
                raise TFCheckpointError(f"{where}: shape {entry.shape} cannot be built ({err})") from None
            arrays[entry.name] = array.astype(dtype.newbyteorder("="), copy=False) if big_endian else array
    finally:
        if shard is not None:
            shard[2].close()

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
    if not limits_mod.is_regular_file(path):
        return False
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


def _varints(buf) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos, len(buf))
        out.append(value)
    return out


def _scalar_values(scalars: list[int], enum: int, dtype: np.dtype) -> np.ndarray:
    """Varint-coded TensorProto values as `dtype`, each checked to fit it (no wrap-around, no overflow)."""
    if enum == 10:  # bool_val: any non-zero varint is true, as protobuf reads it
        return np.asarray([v != 0 for v in scalars], np.bool_)
    if enum in (14, 19):  # half/bfloat16 bit patterns in int32 varints
        lo, hi, values = 0, 0xFFFF, scalars
    elif enum in (22, 23):  # uint32_val, uint64_val: unsigned as they are
        lo, hi, values = 0, np.iinfo(dtype).max, scalars
    else:  # int_val (int32 and narrower types) and int64_val: two's complement in 64 bits
        info = np.iinfo(dtype)
        lo, hi, values = int(info.min), int(info.max), [_int64(v) for v in scalars]
    for v in values:
        if not lo <= v <= hi:
            raise _Malformed(f"value {v} does not fit {dtype.name}")
    if enum in (14, 19):
        return np.asarray(values, np.uint16).view(dtype)
    return np.asarray(values, np.uint64 if enum == 23 else np.int64).astype(dtype)


def _tensor_proto_values(buf, enum: int, dtype: np.dtype, count: int) -> np.ndarray:
    """The `count` values of a serialized TensorProto of DataType `enum`, as a flat array of `dtype`."""
    number, packed_dtype = _VALUE_FIELDS[enum]
    content, parts, scalars = None, [], []
    for n, wire, value in _fields(buf):
        if n == 4 and wire == 2:
            content = value
        elif n == number:
            if wire == 2 and packed_dtype is not None:
                if len(value) % packed_dtype.itemsize:
                    raise _Malformed(f"packed {packed_dtype.name} values of {len(value)} bytes")
                parts.append(np.frombuffer(value, packed_dtype))
            elif wire == 2:
                scalars.extend(_varints(value))
            elif wire == 5 and packed_dtype is not None and packed_dtype.itemsize == 4:
                parts.append(np.frombuffer(struct.pack("<I", value), packed_dtype))
            elif wire == 1 and packed_dtype is not None and packed_dtype.itemsize == 8:
                parts.append(np.frombuffer(struct.pack("<Q", value), packed_dtype))
            elif wire == 0 and packed_dtype is None:
                scalars.append(value)
            else:
                raise _Malformed(f"value field {n} of wire type {wire} for dtype {dtype.name}")
    if content is not None:
        if len(content) != count * dtype.itemsize:
            raise _Malformed(f"{len(content)} bytes of content for {count} values of {dtype.name}")
        return np.frombuffer(content, dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype).astype(dtype)
    if packed_dtype is not None:
        values = np.concatenate(parts) if parts else np.zeros(0, packed_dtype)
    else:
        values = _scalar_values(scalars, enum, dtype)
    if values.size != count:
        raise _Malformed(f"{values.size} values stored for a slice of {count}")
    return values.astype(dtype, copy=False)


def _extents(buf, shape: tuple[int, ...]) -> tuple[slice, ...]:
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


def _v1_metadata(value, lim: limits_mod.Limits) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """{name: (shape, dtype enum, element count)} from the V1 metadata entry (SavedTensorSlices.meta)."""
    metas: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for number, wire, meta in _fields(value):
        if number != 1 or wire != 2:
            continue
        for n, w, tensor in _fields(meta):
            if n != 1 or w != 2:
                continue
            if len(metas) >= lim.max_entries:
                raise _Malformed(f"metadata lists more than max_entries={lim.max_entries:,} tensors; "
                                 f"{limits_mod.Limits.hint('max_entries')}")
            name, shape, enum = "", (), 0
            for tn, tw, tv in _fields(tensor):
                if tn == 1 and tw == 2:
                    if len(tv) > lim.max_key_bytes:
                        raise _Malformed(f"a tensor name of {len(tv):,} bytes, more than max_key_bytes="
                                         f"{lim.max_key_bytes:,}; {limits_mod.Limits.hint('max_key_bytes')}")
                    name = bytes(tv).decode("utf8")
                elif tn == 2 and tw == 2:
                    shape = _parse_shape(tv, lim)
                elif tn == 3 and tw == 0:
                    enum = tv
            if name in metas:
                raise _Malformed(f"tensor {name!r} listed twice")
            metas[name] = (shape, enum, _element_count(shape, lim))
    return metas


def _load_v1(path: str, max_bytes: int, lim: limits_mod.Limits) -> dict[str, np.ndarray]:
    handle, size = _open_regular(path, "checkpoint")
    with handle:
        if size > max_bytes:  # values take about the file's size (proto framing adds a little)
            raise TFCheckpointError(
                f"checkpoint {path!r} is {size / 2**30:.2f} GiB, more than max_bytes={max_bytes / 2**30:.2f} "
                "GiB; pass a larger max_bytes if that much memory is available"
            )
        return _read_v1(path, _Table(handle, size, lim), max_bytes, lim)


def _read_v1(path: str, table: _Table, max_bytes: int, lim: limits_mod.Limits) -> dict[str, np.ndarray]:
    # Slices are collected first (their values come from the file, so they take about what was read),
    # checked to cover every tensor exactly, and only then copied into arrays of the declared shapes.
    metas, declared = None, {}
    slices: dict[str, list[tuple[tuple[slice, ...], np.ndarray]]] = {}
    filled: dict[str, int] = {}
    name = None
    try:
        for key, value in table.entries():
            name = None
            if metas is None:
                if key != b"":
                    raise TFCheckpointError(
                        f"checkpoint {path!r}: no V1 metadata entry (empty key): not a TF checkpoint")
                metas = _v1_metadata(value, lim)
                total = 0
                for tname, (shape, enum, count) in metas.items():
                    dtype = _dtype_of(enum)
                    if dtype is None and enum != _DT_STRING:
                        kind = _DTYPE_NAMES.get(enum, f"enum value {enum}")
                        raise TFCheckpointError(
                            f"checkpoint {path!r}, tensor {tname!r}: dtype {kind} is not supported")
                    if dtype is not None:
                        declared[tname] = dtype
                        total += count * dtype.itemsize
                if total > max_bytes:  # the metadata's shapes, checked before anything is allocated
                    raise TFCheckpointError(
                        f"checkpoint {path!r} declares {total / 2**30:.2f} GiB of tensors, more than max_bytes="
                        f"{max_bytes / 2**30:.2f} GiB; pass a larger max_bytes if that much memory is available"
                    )
                slices = {tname: [] for tname in declared}
                filled = {tname: 0 for tname in declared}
                continue
            name = bytes(key).decode("utf8", "replace")
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
                if name not in declared:
                    continue  # a string tensor: bookkeeping, left out
                shape, enum, total_count = metas[name]
                index = _extents(slice_buf, shape)
                part_shape = tuple(s.stop - s.start for s in index)
                count = _element_count(part_shape, lim)
                if filled[name] + count > total_count:
                    raise _Malformed(f"slices hold more than the tensor's {total_count:,} values: they overlap")
                values = _tensor_proto_values(proto or b"", enum, declared[name], count)
                filled[name] += count
                slices[name].append((index, values.reshape(part_shape)))
            name = None
    except _Malformed as err:
        at = f", tensor {name!r}" if name is not None else ""
        raise TFCheckpointError(f"checkpoint {path!r}{at}: {err} (read as a TensorFlow V1 checkpoint, since no "
                                f"{path + '.index'!r} is beside it)") from None
    except UnicodeDecodeError as err:
        raise TFCheckpointError(f"checkpoint {path!r}: a name that is not UTF-8 ({err})") from None
    if metas is None:
        raise TFCheckpointError(f"checkpoint {path!r}: no V1 metadata entry (empty key): not a TF checkpoint")
    arrays = {}
    for tname, dtype in declared.items():
        shape, _, count = metas[tname]
        if filled[tname] != count:
            raise TFCheckpointError(
                f"checkpoint {path!r}, tensor {tname!r}: slices cover {filled[tname]} of {count} values: "
                "the file is incomplete"
            )
        # The slices hold exactly `count` values in all (checked above); any overlap leaves a gap.
        target = np.zeros(shape, dtype)
        seen = np.zeros(shape, np.bool_)
        for index, values in slices.pop(tname):
            if seen[index].any():
                raise TFCheckpointError(f"checkpoint {path!r}, tensor {tname!r}: two slices overlap (at "
                                        f"{[(s.start, s.stop) for s in index]}): the file is corrupt")
            seen[index] = True
            target[index] = values
        arrays[tname] = target
    return arrays
