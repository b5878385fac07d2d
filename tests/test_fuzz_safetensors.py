"""Broken and crafted .safetensors files: each ends in CheckpointFormatError naming the file, within a
second and bounded memory, or reads exactly what the file says. What each showed: tests/README.md.
"""
import collections
import json
import struct
import time
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from embjax.weights import limits, safetensors_io
from embjax.weights.torch_pth import CheckpointFormatError

# The bound is on CPU seconds (time.process_time): a reader that loops or expands a crafted file
# burns CPU, while waiting for a core on a loaded machine (the suite runs beside other jobs) does not.
SECOND = 1.0
PEAK_BYTES = 32 << 20  # the files below are at most a few KB; the sizes they claim are GBs and more


@pytest.fixture(autouse=True)
def _default_cap(monkeypatch):
    monkeypatch.delenv(limits.ENV_MAX_BYTES, raising=False)


def small_tensors():
    rng = np.random.default_rng(0)
    return collections.OrderedDict(
        kernel=rng.standard_normal((3, 4)).astype(np.float32),
        bias=rng.standard_normal(5).astype(np.float64),
        bf=rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        steps=np.array([2, -7], np.int64),
    )


def raw_file(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def read_or_error(path, **kwargs):
    tracemalloc.start()
    start = time.process_time()
    try:
        return "ok", safetensors_io.load_state_dict(path, **kwargs)
    except CheckpointFormatError as e:
        assert path.name in str(e), str(e)
        return "error", str(e)
    finally:
        elapsed = time.process_time() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < SECOND, f"took {elapsed:.2f} s"
        assert peak < PEAK_BYTES, f"peak traced memory {peak:,} bytes"


def test_truncated_at_every_offset(tmp_path):
    full = tmp_path / "full.safetensors"
    safetensors_io.save_state_dict(full, small_tensors())
    data = full.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for keep in range(0, len(data)):
        cut.write_bytes(data[:keep])
        outcome, message = read_or_error(cut)
        assert outcome == "error", f"a file cut to {keep} of {len(data)} bytes was read"


def test_flipped_bytes(tmp_path):
    # No checksum in the format: a flip in the data must change exactly that byte of that tensor; a flip in
    # the header must end in an error or in tensors that exactly cover the data (the header's new word).
    tensors = small_tensors()
    full = tmp_path / "full.safetensors"
    safetensors_io.save_state_dict(full, tensors)
    data = full.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    path = tmp_path / "flipped.safetensors"
    rng = np.random.default_rng(1)
    outcomes = collections.Counter()
    for offset, bit in zip(rng.integers(0, len(data), 400), rng.integers(0, 8, 400)):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << bit
        path.write_bytes(bytes(flipped))
        outcome, got = read_or_error(path)
        outcomes[outcome] += 1
        if offset >= 8 + n:  # a data byte
            assert outcome == "ok"
            at = offset - 8 - n
            (name,) = [k for k, v in header.items() if k != "__metadata__" and
                       v["data_offsets"][0] <= at < v["data_offsets"][1]]
            want = bytearray(tensors[name].tobytes())
            want[at - header[name]["data_offsets"][0]] ^= 1 << bit
            assert got[name].tobytes() == bytes(want)
            for other in tensors.keys() - {name}:
                assert got[other].tobytes() == tensors[other].tobytes()
        elif outcome == "ok":
            assert sum(v.nbytes for v in got.values()) == len(data) - 8 - n
    assert outcomes["error"] > 0 and outcomes["ok"] > 0


@pytest.mark.parametrize("name,header,data,match", [
    ("huge_header", None, b"", "header length"),
    ("past_end", {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}, b"\0" * 16,
     "outside the file"),
    ("shape_mismatch", {"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16,
     "needs 20 bytes"),
    ("overlap", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "overlapping"),
    ("gap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, "overlapping"),
    ("trailing", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, "trailing"),
    ("bad_dtype", {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, "dtype"),
    ("negative_dim", {"a": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ("float_dim", {"a": {"dtype": "U8", "shape": [4.0], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ("many_dims", {"a": {"dtype": "U8", "shape": [1] * 1000, "data_offsets": [0, 1]}}, b"\0", "shape"),
    ("not_a_map", [1, 2, 3], b"", "not a map"),
    ("metadata", {"__metadata__": {"a": 1}}, b"", "__metadata__"),
])
def test_crafted_headers(tmp_path, name, header, data, match):
    path = tmp_path / f"{name}.safetensors"
    if header is None:
        path.write_bytes(struct.pack("<Q", 1 << 63) + b"{}")
    else:
        raw_file(path, header, data)
    outcome, message = read_or_error(path)
    assert outcome == "error" and match in message, message


def test_deep_json_and_duplicate_keys(tmp_path):
    deep = tmp_path / "deep.safetensors"
    blob = b"[" * 100_000 + b"]" * 100_000
    deep.write_bytes(struct.pack("<Q", len(blob)) + blob)
    assert read_or_error(deep)[0] == "error"
    dup = tmp_path / "dup.safetensors"
    blob = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, ' \
           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    dup.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0")
    outcome, message = read_or_error(dup)
    assert outcome == "error" and "duplicate" in message


def test_wrong_lengths(tmp_path):
    full = tmp_path / "full.safetensors"
    safetensors_io.save_state_dict(full, small_tensors())
    data = full.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for name in small_tensors():
        for delta in (-1, 1):
            changed = json.loads(json.dumps(header))
            changed[name]["data_offsets"][1] += delta
            path = tmp_path / "lengths.safetensors"
            raw_file(path, changed, data[8 + n:])
            outcome, message = read_or_error(path)
            assert outcome == "error", (name, delta)
    # the 8-byte header length itself, off by one either way
    for delta in (-1, 1):
        path = tmp_path / "header_length.safetensors"
        path.write_bytes(struct.pack("<Q", n + delta) + data[8:])
        assert read_or_error(path)[0] == "error"


def test_cap_counts_the_tensors(tmp_path):
    path = tmp_path / "big.safetensors"
    safetensors_io.save_state_dict(path, {"a": np.zeros(1024, np.float32), "b": np.zeros(1024, np.float32)})
    outcome, message = read_or_error(path, max_bytes=6000)
    assert outcome == "error" and "6,000-byte cap" in message and "tensor 'b'" in message
    assert read_or_error(path, max_bytes=8192)[0] == "ok"


def test_many_keys_and_one_duplicate_is_linear(tmp_path):
    # 50,000 entries and one key given twice (a 3 MiB header): a count per key made this quadratic (40 s).
    entries = ", ".join(f'"t{i}": {{"dtype": "U8", "shape": [1], "data_offsets": [{i}, {i + 1}]}}'
                        for i in range(50_000))
    blob = ("{" + entries + ', "t7": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}').encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 50_000)
    start = time.process_time()  # CPU only: tracemalloc slows the parse of 150,000 small dicts threefold
    with pytest.raises(CheckpointFormatError, match=r"duplicate keys \['t7'\]"):
        safetensors_io.load_state_dict(path)
    assert time.process_time() - start < 2.0


def test_entry_name_and_header_limits(tmp_path):
    path = tmp_path / "limits.safetensors"
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(20)}
    raw_file(path, header, b"\0" * 20)
    outcome, message = read_or_error(path, limits=limits.Limits(max_entries=10))
    assert outcome == "error" and "max_entries=10" in message, message
    assert read_or_error(path, limits=limits.Limits(max_entries=20))[0] == "ok"
    raw_file(path, {"x" * 2000: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    outcome, message = read_or_error(path)
    assert outcome == "error" and "max_key_bytes" in message, message
    raw_file(path, {"a": {"dtype": "U8", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}})
    outcome, message = read_or_error(path)
    assert outcome == "error" and "max_elements" in message, message
    raw_file(path, header, b"\0" * 20)
    outcome, message = read_or_error(path, limits=limits.Limits(max_header_bytes=100))
    assert outcome == "error" and "max_header_bytes=100" in message, message


def test_a_fifo_is_refused_at_once(tmp_path):
    import os

    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    outcome, message = read_or_error(fifo)
    assert outcome == "error" and "not a regular file" in message
