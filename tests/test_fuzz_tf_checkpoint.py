"""Broken and crafted TensorFlow checkpoints: each ends in TFCheckpointError naming the file within bounded
CPU time and traced memory, or reads exactly the bytes the file holds. What each showed: tests/README.md.

The mutations start from a checkpoint TensorFlow wrote (tests/fixtures/tf/dtypes: 13 entries, every
dtype, a string tensor), rewritten here by a small SSTable writer with prefix-compressed keys, restart
points and several data blocks, so that every field can be changed with the table's checksums kept
right (a changed byte under a wrong checksum never reaches the parser; test_tf_checkpoint.py flips those).
"""
from __future__ import annotations

import os
import re
import signal
import struct
import time
import tracemalloc

import numpy as np
import pytest

from embjax.weights import limits, tf_checkpoint
from embjax.weights.limits import Limits
from embjax.weights.tf_checkpoint import TFCheckpointError
from test_tf_checkpoint import _field as field, _varint as varint  # the protobuf encoders

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf")
MAGIC = 0xDB4775248B80FB57
# CPU seconds (time.process_time), not wall time: a reader that loops or expands a crafted file burns CPU,
# waiting for a core on a loaded machine does not. Small mutated files get 1 s and 32 MB; the structured
# cases (files of up to a few hundred KB claiming entries, keys and elements without end) 2 s and 100 MB.
SECOND, PEAK = 1.0, 32 << 20
BIG_SECONDS, BIG_PEAK = 2.0, 100 << 20


@pytest.fixture(autouse=True)
def _default_limits(monkeypatch):
    monkeypatch.delenv(limits.ENV_MAX_BYTES, raising=False)
    for name in Limits.__dataclass_fields__:
        monkeypatch.delenv("EMBJAX_WEIGHT_" + name.upper(), raising=False)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) << 10


def _reset_peak() -> bool:
    """Set this process' peak resident size (VmHWM) to its current size; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_or_error(path, named, seconds=SECOND, peak=PEAK, **kwargs):
    """("ok", arrays) or ("error", message) of tf_checkpoint.load(path); the error must name `named`.

    The memory bound is on the growth of the peak resident size over the read (VmHWM, reset before it:
    every allocation, NumPy's included, at no cost to the timing); where the peak cannot be reset, on
    tracemalloc's peak instead."""
    by_rss = _reset_peak()
    before = _status("VmRSS") if by_rss else 0
    if not by_rss:
        tracemalloc.start()
    start = time.process_time()
    try:
        return "ok", tf_checkpoint.load(path, **kwargs)
    except TFCheckpointError as e:
        assert os.path.basename(named) in str(e), str(e)
        return "error", str(e)
    finally:
        elapsed = time.process_time() - start
        if by_rss:
            top = _status("VmHWM") - before
        else:
            _, top = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert elapsed < seconds, f"took {elapsed:.2f} s of CPU"
        assert top < peak, f"peak memory grew by {top:,} bytes"


# ---------------------------------------------------------------------------------------------------
# A small writer of the wire formats


def encode(fields) -> bytes:
    return b"".join(field(n, w, v) for n, w, v in fields)


def shared_len(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def block_body(items, restart_interval=4) -> bytes:
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            shared = shared_len(last, key)
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        last = key
    restarts = restarts or [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def table(entries, per_block=4, restart_interval=2, edit=None) -> bytes:
    """An SSTable of `entries` in several data blocks; edit(kind, number, bytes) -> bytes may damage a
    block body ("data", "meta", "index") before its checksum is computed, or the footer ("footer")."""
    out = bytearray()

    def put(kind, number, body):
        body = edit(kind, number, body) if edit else body
        offset = len(out)
        out.extend(body + b"\0" + struct.pack("<I", tf_checkpoint.masked_crc32c(body + b"\0")))
        return varint(offset) + varint(len(body))

    index = []
    for number, i in enumerate(range(0, len(entries), per_block)):
        chunk = entries[i : i + per_block]
        index.append((chunk[-1][0], put("data", number, block_body(chunk, restart_interval))))
    meta = put("meta", 0, block_body([]))
    handles = meta + put("index", 0, block_body(index, 1))
    footer = handles + b"\0" * (40 - len(handles)) + struct.pack("<Q", MAGIC)
    out.extend(edit("footer", 0, footer) if edit else footer)
    return bytes(out)


def fixture_entries(name="dtypes"):
    path = os.path.join(FIXTURES, name, "model.ckpt.index")
    with open(path, "rb") as f:
        table_ = tf_checkpoint._Table(f, os.fstat(f.fileno()).st_size, Limits())
        return [(bytes(k), bytes(v)) for k, v in table_.entries()]


def fields_of(value: bytes):
    return list(tf_checkpoint._fields(value))


@pytest.fixture(scope="module")
def original():
    prefix = os.path.join(FIXTURES, "dtypes", "model.ckpt")
    with open(prefix + ".data-00000-of-00001", "rb") as f:
        data = f.read()
    return fixture_entries(), data, tf_checkpoint.load(prefix)


def write(tmp_path, index: bytes, data: bytes) -> str:
    prefix = str(tmp_path / "model.ckpt")
    with open(prefix + ".index", "wb") as f:
        f.write(index)
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)
    return prefix


def same_bytes(got, want) -> bool:
    """Every tensor holds the bytes the original held (a changed dtype or shape may reinterpret them; an
    empty tensor whose dtype became string is left out, as string tensors are)."""
    return (set(got) <= set(want) and all(want[k].size == 0 for k in set(want) - set(got))
            and all(np.asarray(got[k]).tobytes() == want[k].tobytes() for k in got))


# ---------------------------------------------------------------------------------------------------
# Mutations of a real checkpoint


def test_the_rewritten_fixture_reads_back_bit_for_bit(tmp_path, original):
    entries, data, want = original
    for per_block, interval in ((1, 1), (4, 2), (5, 16), (100, 3)):
        prefix = write(tmp_path, table(entries, per_block, interval), data)
        outcome, got = read_or_error(prefix, prefix)
        assert outcome == "ok" and same_bytes(got, want)
        assert all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape for k in want)


VARINT_VALUES = (0, 1, 2, 7, 255, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def test_every_field_of_every_bundle_entry(tmp_path, original):
    """Each field of each tensor's BundleEntryProto replaced by edge values, dropped or doubled: an error
    naming the tensor, or a read of exactly the original bytes (a dtype of the same width or a shape of
    the same count reinterprets them; the entry's checksum covers bytes, not their meaning)."""
    entries, data, want = original
    counts = {"error": 0, "ok": 0}
    for k, (key, value) in enumerate(entries):
        if key == b"":
            continue
        fields = fields_of(value)
        variants = []
        for i, (n, w, v) in enumerate(fields):
            variants.append(fields[:i] + fields[i + 1 :])  # dropped
            variants.append(fields[: i + 1] + [(n, w, v)] + fields[i + 1 :])  # doubled (the last one counts)
            if w == 0:
                variants += [fields[:i] + [(n, w, x)] + fields[i + 1 :] for x in VARINT_VALUES + (v + 1, v - 1)
                             if x != v and x >= 0]
            elif w == 5:
                variants += [fields[:i] + [(n, w, x)] + fields[i + 1 :] for x in (0, v ^ 1, 0xFFFFFFFF)]
            elif n == 2:  # the shape: dimensions changed, added, dropped; an unknown rank
                dims = [d for _, _, d in fields_of(v)]
                shapes = [[], [encode([(1, 0, 1)])] * 33, dims[:-1], dims + [encode([(1, 0, 2)])],
                          [encode([(1, 0, 2**64 - 1)])] + dims, [encode([(1, 0, 2**32)])] * 2 + [encode([(1, 0, 0)])]]
                for s in shapes:
                    variants.append(fields[:i] + [(n, w, encode([(2, 2, d) for d in s]))] + fields[i + 1 :])
                variants.append(fields[:i] + [(n, w, v + encode([(3, 0, 1)]))] + fields[i + 1 :])
        variants.append(fields + [(7, 2, b"")])  # a slices field: a partitioned variable
        variants.append(fields + [(15, 0, 3)])  # an unknown field: ignored
        for variant in variants:
            mutated = entries[:k] + [(key, encode(variant))] + entries[k + 1 :]
            prefix = write(tmp_path, table(mutated), data)
            outcome, got = read_or_error(prefix, prefix)
            counts[outcome] += 1
            if outcome == "ok":
                assert same_bytes(got, want), (key, variant)
            else:
                assert repr(key.decode()) in got or "tensor '" not in got, got
    assert counts["error"] > 4 * counts["ok"] > 0, counts


def test_the_bundle_header(tmp_path, original):
    entries, data, want = original
    assert entries[0][0] == b""
    for header in (b"", encode([(1, 0, 0)]), encode([(1, 0, 2**64 - 1)]), encode([(2, 0, 2)]),
                   encode([(2, 0, 2**63)]), b"\x08", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        prefix = write(tmp_path, table([(b"", header)] + entries[1:]), data)
        try:
            outcome, got = read_or_error(prefix, prefix)
        except FileNotFoundError as e:  # a header claiming more shards names a shard file that is not there
            assert "data-00000-of-" in str(e) and "-of-00001" not in str(e)
            continue
        if outcome == "ok":  # an empty header: one shard, little-endian, which is what the file is
            assert header == b"" and same_bytes(got, want)
    prefix = write(tmp_path, table(entries[1:]), data)
    assert read_or_error(prefix, prefix)[0] == "error"


def test_every_field_of_the_footer(tmp_path, original):
    entries, data, want = original
    index = table(entries)
    footer = index[-48:]
    body = index[:-48]
    handles, pos = [], 0
    for _ in range(4):
        value, pos = tf_checkpoint._varint(footer, pos, 40)
        handles.append(value)
    for i in range(4):
        for x in VARINT_VALUES + (handles[i] + 1, handles[i] - 1, len(body), len(body) + 10):
            if x == handles[i] or x < 0:
                continue
            new = handles[:i] + [x] + handles[i + 1 :]
            encoded = b"".join(varint(v) for v in new)
            if len(encoded) > 40:
                continue
            prefix = write(tmp_path, body + encoded + b"\0" * (40 - len(encoded)) + footer[40:], data)
            assert read_or_error(prefix, prefix + ".index")[0] == "error", (i, x)
    damaged = [footer[:39] + b"\1" + footer[40:], footer[:40] + struct.pack("<Q", MAGIC ^ 1),
               b"\x80" * 11 + footer[11:], b"\xff" * 40 + footer[40:]]
    for f in damaged:
        prefix = write(tmp_path, body + f, data)
        assert read_or_error(prefix, prefix + ".index")[0] == "error"


def _restart_edits(body: bytes):
    """Damaged restart arrays and entry headers of one block body (its checksum is recomputed)."""
    count = struct.unpack("<I", body[-4:])[0]
    start = len(body) - 4 - 4 * count
    points = list(struct.unpack(f"<{count}I", body[start:-4]))
    entries = body[:start]

    def with_points(ps, n=None):
        return entries + b"".join(struct.pack("<I", p) for p in ps) + struct.pack("<I", len(ps) if n is None else n)

    yield with_points(points, 0)
    yield with_points(points, count + 1)
    yield with_points(points, 2**32 - 1)
    yield with_points([1] + points[1:])
    yield with_points(points[::-1]) if count > 1 else with_points(points + [0])
    yield with_points(points + [start])
    yield with_points(points + [points[-1] + 1])  # inside an entry
    yield with_points(points[:1])  # later restart points left out: their entries share nothing
    yield body[:-4 - 4 * count] + b"\0" * 3  # too short for its count
    # the first entry's lengths: shared with nothing, an unshared part or a value past the block, a
    # varint of 11 bytes, a varint beyond 64 bits
    yield b"\x05" + entries[1:] + body[start:]
    yield entries[:1] + b"\xff\x7f" + entries[2:] + body[start:]
    yield entries[:2] + b"\xff\xff\x03" + entries[3:] + body[start:]
    yield b"\x80" * 11 + entries[11:] + body[start:]
    yield b"\xff" * 9 + b"\x7f" + entries[10:] + body[start:]


def test_block_and_restart_layout(tmp_path, original):
    entries, data, want = original
    counts = {"error": 0, "ok": 0}
    for kind, number in (("data", 0), ("data", 1), ("data", 2), ("index", 0), ("meta", 0)):
        plain = {}
        table(entries, edit=lambda k, n, b: plain.setdefault((k, n), b))
        for damaged in _restart_edits(plain[(kind, number)]):
            index = table(entries, edit=lambda k, n, b: damaged if (k, n) == (kind, number) else b)
            prefix = write(tmp_path, index, data)
            outcome, got = read_or_error(prefix, prefix + ".index")
            counts[outcome] += 1
            if outcome == "ok":  # a restart array shortened to its first point is still a valid block
                assert same_bytes(got, want)
    assert counts["error"] >= 5 * 13 - 5, counts


def test_every_cut_of_a_multi_block_index(tmp_path, original):
    entries, data, _ = original
    index = table(entries, per_block=2, restart_interval=1)
    for cut in range(0, len(index), 2):
        prefix = write(tmp_path, index[:cut], data)
        assert read_or_error(prefix, prefix + ".index")[0] == "error", cut


# ---------------------------------------------------------------------------------------------------
# Structured cases: small files claiming much


def _raw_index(tmp_path, body: bytes) -> str:
    """An .index whose one data block has the raw entry bytes `body` (one restart point, at 0)."""
    def edit(kind, number, b):
        return body + struct.pack("<II", 0, 1) if kind == "data" else b
    prefix = str(tmp_path / "crafted.ckpt")
    with open(prefix + ".index", "wb") as f:
        f.write(table([(b"\xff", b"")], edit=edit))
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(b"")
    return prefix


def scalar_entry(offset=0, size=4, crc=0):
    return encode([(1, 0, 1), (4, 0, offset), (5, 0, size), (6, 5, crc)])


def test_keys_growing_one_byte_each_stop_at_the_key_limit(tmp_path):
    # Each key is the one before it plus a byte: 5 bytes an entry on disk, a key as long as the entry's
    # number once restored. 20,000 and 45,000 entries (94 and 203 KiB) claim keys of 20 and 45 KB.
    value = scalar_entry()
    for n in (20_000, 45_000):
        body = varint(0) + varint(0) + varint(2) + b"\x08\x01"  # the header, key ""
        body += b"".join(varint(i) + varint(1) + varint(len(value)) + b"a" + value for i in range(n))
        prefix = _raw_index(tmp_path, body)
        outcome, message = read_or_error(prefix, prefix + ".index", BIG_SECONDS, BIG_PEAK)
        assert outcome == "error" and "max_key_bytes=1,024" in message, message


def test_long_distinct_keys_stop_at_the_key_limit(tmp_path):
    value = scalar_entry()
    first = b"k" * 3996 + b"0000"
    body = varint(0) + varint(len(first)) + varint(len(value)) + first + value
    body += b"".join(varint(3996) + varint(4) + varint(len(value)) + b"%04d" % i + value for i in range(1, 30_000))
    prefix = _raw_index(tmp_path, body)
    outcome, message = read_or_error(prefix, prefix + ".index", BIG_SECONDS, BIG_PEAK)
    assert outcome == "error" and "max_key_bytes" in message, message


def _scalars(tmp_path, n):
    data = np.arange(n, dtype=np.float32).tobytes()
    entries = [(b"", encode([(1, 0, 1)]))]
    for i in range(n):
        crc = tf_checkpoint.masked_crc32c(data[4 * i : 4 * i + 4])
        entries.append((b"v%06d" % i, scalar_entry(4 * i, 4, crc)))
    return write(tmp_path, table(entries, per_block=64, restart_interval=16), data)


def test_more_entries_than_the_limit(tmp_path, monkeypatch):
    # 50,100 scalars, 100 past the default cap: refused at entry 50,001 whatever the file's length, so a
    # million cost the same.
    prefix = _scalars(tmp_path, 50_100)
    outcome, message = read_or_error(prefix, prefix + ".index", BIG_SECONDS, BIG_PEAK)
    assert outcome == "error" and "max_entries=50,000" in message, message
    # The limit is the user's to raise: 1,100 scalars (1,101 entries with the header) under 1,000 and 1,101.
    prefix = _scalars(tmp_path / "small", 1_100) if (tmp_path / "small").mkdir() is None else None
    outcome, message = read_or_error(prefix, prefix + ".index", limits=Limits(max_entries=1_000))
    assert outcome == "error" and "max_entries=1,000" in message, message
    outcome, got = read_or_error(prefix, prefix, limits=Limits(max_entries=1_101))
    assert outcome == "ok" and len(got) == 1_100 and got["v001099"] == 1099.0
    monkeypatch.setenv("EMBJAX_WEIGHT_MAX_ENTRIES", "1000")  # or from the environment
    outcome, message = read_or_error(prefix, prefix + ".index")
    assert outcome == "error" and "max_entries=1,000" in message and "EMBJAX_WEIGHT_MAX_ENTRIES" in message
    monkeypatch.setenv("EMBJAX_WEIGHT_MAX_ENTRIES", "many")
    with pytest.raises(ValueError, match="EMBJAX_WEIGHT_MAX_ENTRIES") as info:
        tf_checkpoint.load(prefix)
    assert not isinstance(info.value, TFCheckpointError)  # the setting is wrong, not the file


def test_overlapping_tensors_are_refused(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    crc = tf_checkpoint.masked_crc32c(data)
    crc_tail = tf_checkpoint.masked_crc32c(data[4:12])
    for second in (encode([(1, 0, 1), (2, 2, encode([(2, 2, encode([(1, 0, 4)]))])), (5, 0, 16), (6, 5, crc)]),
                   encode([(1, 0, 1), (2, 2, encode([(2, 2, encode([(1, 0, 2)]))])), (4, 0, 4), (5, 0, 8),
                           (6, 5, crc_tail)])):
        first = encode([(1, 0, 1), (2, 2, encode([(2, 2, encode([(1, 0, 4)]))])), (5, 0, 16), (6, 5, crc)])
        prefix = write(tmp_path, table([(b"", b""), (b"a", first), (b"b", second)]), data)
        outcome, message = read_or_error(prefix, prefix + ".index")
        assert outcome == "error" and "overlap" in message and "'b'" in message, message


@pytest.mark.parametrize("dims, match", [
    ([2**32, 2**32, 0], "max_elements"),  # 2**64 wraps to 0 in int64: the size check passed before
    ([2**62, 4, 0], "max_elements"),
    ([1] * 100, "max_rank"),
    ([1] * 100_000, "max_rank"),
])
def test_shapes_beyond_the_limits(tmp_path, dims, match):
    shape = encode([(2, 2, encode([(1, 0, d)])) for d in dims])
    entry = encode([(1, 0, 1), (2, 2, shape), (5, 0, 0), (6, 5, tf_checkpoint.masked_crc32c(b""))])
    prefix = write(tmp_path, table([(b"", b""), (b"w", entry)]), b"")
    outcome, message = read_or_error(prefix, prefix + ".index")
    assert outcome == "error" and match in message and "'w'" in message, message


def test_a_missing_checksum_is_checked_as_zero(tmp_path):
    values = np.arange(6, dtype=np.float32)
    shape = encode([(2, 2, encode([(1, 0, 6)]))])
    entry = encode([(1, 0, 1), (2, 2, shape), (5, 0, 24)])  # no field 6
    damaged = bytearray(values.tobytes())
    damaged[5] ^= 1
    prefix = write(tmp_path, table([(b"", b""), (b"w", entry)]), bytes(damaged))
    outcome, message = read_or_error(prefix, prefix + ".data-00000-of-00001")
    assert outcome == "error" and "checksum mismatch" in message and "records none" in message, message


def test_a_huge_file_without_a_footer_costs_nothing(tmp_path):
    # 300 MiB of zeros (sparse: no disk is used): the footer is read first and has no magic number; a
    # 17 MiB .index is refused by its size before anything is read.
    big = tmp_path / "zeros.ckpt"
    with open(big, "wb") as f:
        f.truncate(300 << 20)
    outcome, message = read_or_error(str(big), str(big))  # a V1 file: no .index beside it
    assert outcome == "error" and "magic" in message, message
    prefix = str(tmp_path / "big.ckpt")
    with open(prefix + ".index", "wb") as f:
        f.truncate(300 << 20)
    outcome, message = read_or_error(prefix, prefix + ".index")
    assert outcome == "error" and "max_header_bytes" in message, message
    with open(prefix + ".index", "wb") as f:
        f.truncate(1 << 20)
    outcome, message = read_or_error(prefix, prefix + ".index")
    assert outcome == "error" and "magic" in message, message


def test_fifos_and_directories_are_refused_at_once(tmp_path):
    def hang(*_):
        raise AssertionError("the reader blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        fifo = tmp_path / "fifo.ckpt"
        os.mkfifo(fifo)
        assert read_or_error(str(fifo), str(fifo))[0] == "error"
        os.mkfifo(tmp_path / "model.ckpt.index")
        prefix = str(tmp_path / "model.ckpt")
        assert read_or_error(prefix, prefix + ".index")[0] == "error"
        assert read_or_error(prefix + ".index", prefix + ".index")[0] == "error"
        os.mkdir(tmp_path / "other.ckpt.index")
        assert read_or_error(str(tmp_path / "other.ckpt"), "other.ckpt.index")[0] == "error"
        shard_dir = tmp_path / "s"
        shard_dir.mkdir()
        entry = encode([(1, 0, 1), (5, 0, 4), (6, 5, tf_checkpoint.masked_crc32c(b"\0" * 4))])
        with open(shard_dir / "m.index", "wb") as f:
            f.write(table([(b"", b""), (b"w", entry)]))
        os.mkfifo(shard_dir / "m.data-00000-of-00001")
        assert read_or_error(str(shard_dir / "m"), "m.data-00000-of-00001")[0] == "error"
        assert tf_checkpoint.has_table_magic(fifo) is False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------
# V1 files


def v1_file(path, tensors, slices):
    """tensors: [(name, dtype enum, dims)]; slices: [(name, [(start, length)] or None, TensorProto)]."""
    metas = b"".join(field(1, 2, encode([(1, 2, name.encode()),
                                         (2, 2, encode([(2, 2, encode([(1, 0, d)])) for d in dims])),
                                         (3, 0, enum)])) for name, enum, dims in tensors)
    entries = [(b"", field(1, 2, metas))]
    for i, (name, extents, proto) in enumerate(slices):
        sl = b"" if extents is None else encode(
            [(1, 2, encode([(1, 0, s), (2, 0, n)])) for s, n in extents])
        saved = encode([(1, 2, name.encode())] + ([(2, 2, sl)] if extents is not None else []) + [(3, 2, proto)])
        entries.append((b"\x00" + b"%04d" % i, field(2, 2, saved)))
    path.write_bytes(table(entries))
    return str(path)


def test_v1_values_that_do_not_fit_their_dtype(tmp_path):
    cases = [(6, encode([(7, 0, 300)])), (6, encode([(7, 0, 2**64 - 129)])),  # int8: 300 and -129
             (4, encode([(7, 0, 256)])), (17, encode([(7, 0, 70_000)])), (22, encode([(16, 0, 2**32)])),
             (19, encode([(13, 0, 2**16)])), (3, encode([(7, 0, 2**31)])),
             (1, encode([(5, 2, b"\0" * 3)])), (1, encode([(6, 2, b"\0" * 8)])), (1, encode([(5, 0, 1)]))]
    for enum, proto in cases:
        path = v1_file(tmp_path / "v1.ckpt", [("t", enum, [1])], [("t", None, proto)])
        outcome, message = read_or_error(path, path)
        assert outcome == "error" and "'t'" in message, (enum, message)


def test_v1_unsigned_64_bit_values_read_exactly(tmp_path):
    values = [0, 2**63, 2**64 - 1, 12345]
    path = v1_file(tmp_path / "v1.ckpt", [("u", 23, [4]), ("i", 9, [2]), ("b", 10, [2])],
                   [("u", None, encode([(17, 2, b"".join(varint(v) for v in values))])),
                    ("i", None, encode([(10, 0, 2**64 - 1), (10, 0, 2**63)])),
                    ("b", None, encode([(11, 0, 0), (11, 0, 7)]))])
    outcome, got = read_or_error(path, path)
    assert outcome == "ok", got
    np.testing.assert_array_equal(got["u"], np.array(values, np.uint64))
    np.testing.assert_array_equal(got["i"], np.array([-1, -(2**63)], np.int64))
    np.testing.assert_array_equal(got["b"], np.array([False, True]))


def test_v1_slices_that_overlap_or_overcount(tmp_path):
    two = encode([(5, 2, np.ones(2, np.float32).tobytes())])
    for extents in ([[(0, 2)], [(1, 2)], [(3, 1)]],  # 5 values for 4: over-counted
                    [[(0, 2)], [(0, 2)]],  # the same half twice
                    [[(0, 2)], [(1, 2)]]):  # 4 values, one of them twice, one never
        one = encode([(5, 2, np.ones(1, np.float32).tobytes())])
        slices = [("t", e, two if e[0][1] == 2 else one) for e in extents]
        path = v1_file(tmp_path / "v1.ckpt", [("t", 1, [4])], slices)
        outcome, message = read_or_error(path, path)
        assert outcome == "error" and "'t'" in message, message
    path = v1_file(tmp_path / "v1.ckpt", [("t", 1, [4])], [("t", [(0, 2)], two), ("t", [(2, 2)], two)])
    outcome, got = read_or_error(path, path)
    assert outcome == "ok" and got["t"].tolist() == [1.0] * 4


def test_v1_shapes_and_metadata_beyond_the_limits(tmp_path):
    for dims, match in (([2**32, 2**32, 0], "max_elements"), ([1] * 40, "max_rank"), ([1 << 17] * 2, "GiB")):
        path = v1_file(tmp_path / "v1.ckpt", [("t", 1, dims)], [])
        outcome, message = read_or_error(path, path)
        assert outcome == "error" and match in message, message
    path = v1_file(tmp_path / "v1.ckpt", [("x" * 2000, 1, [1])], [])
    outcome, message = read_or_error(path, path)
    assert outcome == "error" and "max_key_bytes" in message, message
