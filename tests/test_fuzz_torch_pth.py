"""Hostile and broken .pth files: each ends in CheckpointFormatError within a second and bounded memory.

Crafted pickles reproduce the attacks a reviewer found on the first reader (a BUILD opcode changing
the storage stand-ins for later files, zero strides, doubling shared lists, a self-referencing list, a
huge legacy element count, an oversized zip member) and a few more on the unpickler itself; the
seeded fuzz loops truncate, flip and mis-size small files of both layouts. What each showed is listed in
tests/README.md.
"""
import collections
import io
import pickle
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from embjax.weights import limits, torch_pth
from embjax.weights.torch_pth import CheckpointFormatError, UnsafePickleError
from torch_pickle_writer import (  # noqa: E402  (shared test writer)
    Call, FakeStorage, Global, TorchPickler, tensor, write_legacy_checkpoint, write_zip_checkpoint)

# The bound is on CPU seconds (time.process_time): a reader that loops or expands a crafted file
# burns CPU, while waiting for a core on a loaded machine (the suite runs beside other jobs) does not.
SECOND = 1.0
# Peak Python-heap growth allowed while reading a crafted file of at most a few KB. The reads below need
# well under 1 MB; 32 MB is far below any of the sizes the files claim (GBs to EBs).
PEAK_BYTES = 32 << 20


@pytest.fixture(autouse=True)
def _default_cap(monkeypatch):
    monkeypatch.delenv(limits.ENV_MAX_BYTES, raising=False)


def bounded(fn, *args, **kwargs):
    """Runs fn, asserting it takes under a second and under PEAK_BYTES of traced memory."""
    tracemalloc.start()
    start = time.process_time()
    try:
        return fn(*args, **kwargs)
    finally:
        elapsed = time.process_time() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < SECOND, f"took {elapsed:.2f} s"
        assert peak < PEAK_BYTES, f"peak traced memory {peak:,} bytes"


def pickle_fragment(obj):
    """The opcodes that push `obj`, without the PROTO header and STOP (so fragments can be chained)."""
    data = pickle_bytes(obj)
    assert data[:2] == b"\x80\x02" and data[-1:] == pickle.STOP
    return data[2:-1]


def pickle_bytes(obj):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_raw_zip(path, pickle_data, storages=(), prefix="archive"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle_data)
        for s in storages:
            zf.writestr(f"{prefix}/data/{s.key}", s.array.tobytes())


def benign_file(path):
    values = np.array([1.5, -2.25, 3.0, 1e-3], np.float32)
    s = FakeStorage("0", values)
    write_zip_checkpoint(path, collections.OrderedDict(w=tensor(s)), [s])
    return values


# --- the attacks named in the issue ---------------------------------------------------------------


@pytest.mark.parametrize("target,state", [
    # the first reader's storage stand-ins were module-level functions carrying `storage_name`
    (("torch", "FloatStorage"), {"storage_name": "IntStorage", "name": "IntStorage"}),
    (("torch", "FloatStorage"), (None, {"name": "IntStorage"})),        # slot state: setattr
    (("torch._utils", "_rebuild_tensor_v2"), (None, {"__defaults__": (True, None, None)})),
    (("collections", "OrderedDict"), (None, {"__init__": 1})),          # the class itself
])
def test_build_on_a_global_is_refused_and_leaves_nothing_behind(tmp_path, target, state):
    hostile = tmp_path / "hostile.pt"
    s = FakeStorage("0", np.ones(4, np.float32))
    data = (b"\x80\x02" + pickle.GLOBAL + f"{target[0]}\n{target[1]}\n".encode() + pickle_fragment(state)
            + pickle.BUILD + pickle.POP + pickle_fragment({"w": tensor(s)}) + pickle.STOP)
    write_raw_zip(hostile, data, [s])
    with pytest.raises(UnsafePickleError, match="hostile.pt"):
        bounded(torch_pth.load_state_dict, hostile)
    # A benign float32 file read afterwards in the same process comes back as float32, bit for bit.
    values = benign_file(tmp_path / "benign.pt")
    got = torch_pth.load_state_dict(tmp_path / "benign.pt")["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


def test_build_on_a_tensor_or_plain_dict_is_refused(tmp_path):
    s = FakeStorage("0", np.ones(4, np.float32))
    for i, target in enumerate([tensor(s), {}]):
        path = tmp_path / f"build{i}.pt"
        data = (b"\x80\x02" + pickle_fragment(target) + pickle_fragment({"size": (1 << 40,)}) + pickle.BUILD
                + pickle.STOP)
        write_raw_zip(path, data, [s])
        with pytest.raises(UnsafePickleError, match="sets attributes"):
            bounded(torch_pth.load_pickle, path)


def test_zero_strides_count_by_logical_size(tmp_path):
    one = FakeStorage("0", np.array([7.0], np.float32))
    huge = tmp_path / "zero_strides.pt"  # 2**16 x 2**16 float32: 16 GiB from one element
    write_zip_checkpoint(huge, {"w": tensor(one, size=(1 << 16, 1 << 16), stride=(0, 0))}, [one])
    assert huge.stat().st_size < 1024
    with pytest.raises(CheckpointFormatError, match=r"zero_strides\.pt.*tensor \['w'\].*17,179,869,184 bytes"):
        bounded(torch_pth.load_state_dict, huge)
    # Under a 1 MiB cap the same trick is refused at 4 MiB and read correctly at 64 KiB.
    mid = tmp_path / "mid.pt"
    write_zip_checkpoint(mid, {"w": tensor(one, size=(1024, 1024), stride=(0, 0))}, [one])
    with pytest.raises(CheckpointFormatError, match="cap"):
        bounded(torch_pth.load_state_dict, mid, max_bytes=1 << 20)
    small = tmp_path / "small.pt"
    write_zip_checkpoint(small, {"w": tensor(one, size=(128, 128), stride=(0, 0))}, [one])
    np.testing.assert_array_equal(bounded(torch_pth.load_state_dict, small, max_bytes=1 << 20)["w"],
                                  np.full((128, 128), 7.0, np.float32))


def test_the_cap_comes_from_the_environment(tmp_path, monkeypatch):
    s = FakeStorage("0", np.ones(1024, np.float32))
    path = tmp_path / "four_kib.pt"
    write_zip_checkpoint(path, {"w": tensor(s)}, [s])
    monkeypatch.setenv(limits.ENV_MAX_BYTES, "4000")
    with pytest.raises(CheckpointFormatError, match="4,000-byte cap"):
        torch_pth.load_state_dict(path)
    monkeypatch.setenv(limits.ENV_MAX_BYTES, str(1 << 20))
    assert torch_pth.load_state_dict(path)["w"].shape == (1024,)


def test_nested_shared_lists_are_resolved_once(tmp_path):
    leaf = FakeStorage("0", np.arange(3, dtype=np.float32))
    nested = [tensor(leaf)]
    for _ in range(40):  # 2**40 paths to the tensor through shared references
        nested = [nested, nested]
    path = tmp_path / "doubling.pt"
    write_zip_checkpoint(path, {"x": nested}, [leaf])
    assert path.stat().st_size < 2048
    got = bounded(torch_pth.load_pickle, path)["x"]
    for _ in range(40):
        assert got[0] is got[1]  # sharing kept: converted once, not 2**40 times
        got = got[0]
    np.testing.assert_array_equal(got[0], [0, 1, 2])


def test_nesting_deeper_than_the_limit(tmp_path):
    path = tmp_path / "deep.pt"
    nested = []
    for _ in range(limits.MAX_NESTING + 10):
        nested = [nested]
    write_zip_checkpoint(path, {"x": nested}, [])
    with pytest.raises(CheckpointFormatError, match="deeper than 64"):
        bounded(torch_pth.load_pickle, path)
    # Far deeper, straight from opcodes: 20,000 nested lists in 40 KB.
    raw = tmp_path / "deeper.pt"
    write_raw_zip(raw, b"\x80\x02" + pickle.EMPTY_LIST * 20_000 + pickle.APPEND * 19_999 + pickle.STOP)
    with pytest.raises(CheckpointFormatError, match="deeper than 64"):
        bounded(torch_pth.load_pickle, raw)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_self_reference_is_an_error_not_a_recursion_error(tmp_path, kind):
    if kind == "list":
        loop = []
        loop.append(loop)
    else:
        loop = {}
        loop["me"] = loop
    path = tmp_path / "cycle.pt"
    write_zip_checkpoint(path, {"x": loop}, [])
    with pytest.raises(CheckpointFormatError, match=r"cycle\.pt.*refers to itself"):
        bounded(torch_pth.load_pickle, path)


def test_legacy_huge_element_count(tmp_path):
    path = tmp_path / "huge.pth"
    s = FakeStorage("0", np.ones(4, np.float32), numel=1 << 60)  # the pickle and the header both say 2**60
    write_legacy_checkpoint(path, {"w": tensor(s, size=(4,))}, [s])
    with pytest.raises(CheckpointFormatError, match=r"huge\.pth.*storage '0'.*only 16 are left"):
        bounded(torch_pth.load_state_dict, path)
    lying = tmp_path / "lying.pth"  # the header alone lies
    s = FakeStorage("0", np.ones(4, np.float32))
    write_legacy_checkpoint(lying, {"w": tensor(s)}, [s], numel_override={"0": 1 << 60})
    with pytest.raises(CheckpointFormatError, match=r"lying\.pth.*storage '0' header says"):
        bounded(torch_pth.load_state_dict, lying)


def test_zip_member_larger_or_smaller_than_promised(tmp_path):
    big = FakeStorage("0", np.ones(1 << 18, np.float32), numel=4)  # a 1 MiB member for a 16-byte storage
    path = tmp_path / "big_member.pt"
    write_zip_checkpoint(path, {"w": tensor(big, size=(4,))}, [big])
    with pytest.raises(CheckpointFormatError, match=r"big_member\.pt.*storage '0'.*1,048,576 bytes.*16"):
        bounded(torch_pth.load_state_dict, path)
    short = FakeStorage("0", np.ones(4, np.float32), numel=10)
    path = tmp_path / "short_member.pt"
    write_zip_checkpoint(path, {"w": tensor(short, size=(10,))}, [short])
    with pytest.raises(CheckpointFormatError, match=r"short_member\.pt.*records 16 bytes.*exactly 40"):
        bounded(torch_pth.load_state_dict, path)


# --- attacks on the unpickler itself --------------------------------------------------------------


@pytest.mark.parametrize("name,data", [
    # a memo index of 2**32-1: the C unpickler would allocate and clear 32 GiB of memo table
    ("memo_index", b"\x80\x02]r\xff\xff\xff\xff."),
    # 2**62 bytes claimed by BINBYTES8, 2**60 by a protocol-4 frame (the frame's short tail is read)
    ("binbytes8", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"abc."),
    ("frame", b"\x80\x04\x95" + struct.pack("<Q", 1 << 60) + b"N."),
    # a decimal LONG of 100,000 digits (quadratic to convert)
    ("long_text", b"\x80\x02L" + b"9" * 100_000 + b"L\n."),
    ("ext_code", b"\x80\x02\x82\x01."),
    ("out_of_band", b"\x80\x05\x97."),
])
def test_unpickler_abuse(tmp_path, name, data):
    path = tmp_path / f"{name}.pt"
    write_raw_zip(path, data)
    try:
        got = bounded(torch_pth.load_pickle, path)
    except CheckpointFormatError as e:
        assert path.name in str(e)
    else:  # harmless values, read without allocating what the opcodes claim
        assert (name, got) in (("memo_index", []), ("frame", None)), (name, got)


@pytest.mark.parametrize("key", [(1, 2), 1 << 61, 2.5])
def test_dict_keys_with_costly_or_collidable_hashes_are_refused(tmp_path, key):
    s = FakeStorage("0", np.ones(1, np.float32))
    path = tmp_path / "keys.pt"
    write_zip_checkpoint(path, {key: tensor(s)}, [s])
    with pytest.raises(CheckpointFormatError, match="dict key"):
        bounded(torch_pth.load_pickle, path)


@pytest.mark.parametrize("obj,match", [
    (Call(Global("collections", "OrderedDict"), ([("a", 1)],)), "OrderedDict called with arguments"),
    (Call(Global("torch", "FloatStorage"), (3,)), "FloatStorage called directly"),
    (Call(Global("torch._utils", "_rebuild_tensor_v2"), ("no storage", 0, (2,), (1,))), "does not contain"),
    (Call(Global("torch._utils", "_rebuild_tensor_v2"), ()), "TypeError"),
])
def test_calls_outside_the_allowed_shapes(tmp_path, obj, match):
    path = tmp_path / "calls.pt"
    write_zip_checkpoint(path, {"x": obj}, [])
    with pytest.raises(CheckpointFormatError, match=match):
        bounded(torch_pth.load_pickle, path)


def test_malformed_tensor_metadata(tmp_path):
    s = FakeStorage("0", np.arange(4, dtype=np.float32))
    cases = {
        "ndim": tensor(s, size=(1,) * 1000, stride=(1,) * 1000),
        "float_size": tensor(s, size=(2.0,), stride=(1,)),
        "negative": tensor(s, size=(2,), stride=(-1,)),
        "past_end": tensor(s, offset=3, size=(2,), stride=(1,)),
    }
    for name, t in cases.items():
        path = tmp_path / f"{name}.pt"
        write_zip_checkpoint(path, {"w": t}, [s])
        with pytest.raises(CheckpointFormatError, match=rf"{name}\.pt.*tensor \['w'\]"):
            bounded(torch_pth.load_state_dict, path)
    # Strides of length-1 dimensions are never used, however large: read, not an overflow.
    path = tmp_path / "unit_dim.pt"
    write_zip_checkpoint(path, {"w": tensor(s, size=(1, 4), stride=(1 << 62, 1))}, [s])
    np.testing.assert_array_equal(torch_pth.load_state_dict(path)["w"], [[0, 1, 2, 3]])


# --- seeded fuzzing of small, valid files --------------------------------------------------------


def small_state_dict(rng):
    """Four contiguous tensors, one storage each, of four dtypes."""
    arrays = collections.OrderedDict(
        conv=rng.standard_normal((4, 3)).astype(np.float32),
        bias=rng.standard_normal(5).astype(np.float64),
        steps=np.array([3, -1], np.int64),
        half=rng.standard_normal(6).astype(np.float16),
    )
    storages = [FakeStorage(str(i), a) for i, a in enumerate(arrays.values())]
    obj = collections.OrderedDict((k, tensor(s, size=a.shape)) for (k, a), s in zip(arrays.items(), storages))
    return arrays, obj, storages


def read_or_error(path, **kwargs):
    """('ok', state dict) or ('error', message), within a second; anything else fails the test."""
    start = time.process_time()
    try:
        out = ("ok", torch_pth.load_state_dict(path, max_bytes=1 << 20, **kwargs))
    except CheckpointFormatError as e:
        assert path.name in str(e), str(e)
        out = ("error", str(e))
    assert time.process_time() - start < SECOND
    return out


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_truncated_at_every_offset(tmp_path, layout):
    arrays, obj, storages = small_state_dict(np.random.default_rng(1))
    full = tmp_path / "full.pt"
    (write_zip_checkpoint if layout == "zip" else write_legacy_checkpoint)(full, obj, storages)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    # Every offset of the legacy file; every other one of the zip (each zip open costs ~4 ms).
    for keep in range(1, len(data), 1 if layout == "legacy" else 2):
        cut.write_bytes(data[:keep])
        outcome, _ = read_or_error(cut)
        assert outcome == "error", f"a file cut to {keep} of {len(data)} bytes was read"


def _flip(data, offset, bit):
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def test_zip_flipped_bytes_error_or_read_unchanged(tmp_path):
    # Every member of a torch zip is CRC-checked, so a flip is either caught or lands where it changes
    # nothing that is read (timestamps, the unread `version` member): never a silently different tensor.
    arrays, obj, storages = small_state_dict(np.random.default_rng(2))
    full = tmp_path / "full.pt"
    write_zip_checkpoint(full, obj, storages)
    data = full.read_bytes()
    rng = np.random.default_rng(3)
    path = tmp_path / "flipped.pt"
    outcomes = collections.Counter()
    for offset, bit in zip(rng.integers(0, len(data), 400), rng.integers(0, 8, 400)):
        path.write_bytes(_flip(data, offset, bit))
        outcome, got = read_or_error(path)
        outcomes[outcome] += 1
        if outcome == "ok":
            assert list(got) == list(arrays), f"flip at {offset}"
            for k, v in arrays.items():
                assert got[k].dtype == v.dtype
                np.testing.assert_array_equal(got[k], v, err_msg=f"flip at byte {offset} bit {bit}")
    assert outcomes["error"] > 200  # most bytes of a small zip are covered by a CRC or are structure


def test_legacy_flipped_bytes(tmp_path):
    # The legacy layout has no checksum. A flip in a storage's raw bytes must change exactly that byte of
    # that tensor (the reader reports what the file says, no more); a flip in the pickles must end in an
    # error or in a state dict of arrays, never in another exception, a hang or a crash.
    arrays, obj, storages = small_state_dict(np.random.default_rng(4))
    full = tmp_path / "full.pth"
    regions = write_legacy_checkpoint(full, obj, storages)
    data = full.read_bytes()
    key_of = {s.key: name for s, name in zip(storages, arrays)}
    rng = np.random.default_rng(5)
    path = tmp_path / "flipped.pth"
    for offset, bit in zip(rng.integers(0, len(data), 400), rng.integers(0, 8, 400)):
        path.write_bytes(_flip(data, offset, bit))
        outcome, got = read_or_error(path)
        in_data = [k for k, (a, b) in regions.items() if a <= offset < b]
        if in_data:
            (key,) = in_data
            name = key_of[key]
            raw = bytearray(arrays[name].tobytes())
            raw[offset - regions[key][0]] ^= 1 << bit
            want = np.frombuffer(bytes(raw), arrays[name].dtype).reshape(arrays[name].shape)
            assert outcome == "ok"
            np.testing.assert_array_equal(got[name].view(np.uint8), want.view(np.uint8))
            for other in arrays.keys() - {name}:
                np.testing.assert_array_equal(got[other], arrays[other])
        elif outcome == "ok":
            assert all(isinstance(v, np.ndarray) for v in got.values())


def test_wrong_lengths(tmp_path):
    arrays, obj, storages = small_state_dict(np.random.default_rng(6))
    for s in storages:
        for delta in (-1, 1):
            legacy = tmp_path / "header.pth"
            write_legacy_checkpoint(legacy, obj, storages, numel_override={s.key: s.array.size + delta})
            assert read_or_error(legacy)[0] == "error"
            zipped = tmp_path / "member.pt"
            wrong = FakeStorage(s.key, np.resize(s.array, s.array.size + delta), numel=s.array.size)
            write_zip_checkpoint(zipped, obj, [wrong if t is s else t for t in storages])
            outcome, message = read_or_error(zipped)
            assert outcome == "error" and f"storage '{s.key}'" in message


def test_a_fifo_or_a_directory_is_refused_at_once(tmp_path):
    import os

    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        start = time.process_time()
        with pytest.raises(torch_pth.CheckpointFormatError, match="not a regular file"):
            torch_pth.load_state_dict(path)
        assert time.process_time() - start < 1.0
