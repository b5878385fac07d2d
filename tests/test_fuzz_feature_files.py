"""Broken and crafted feature, label and head files (embjax.feature_files): each ends in FeatureFileError
naming the file, at once and in bounded CPU time and memory, or reads exactly what the file holds.
What each showed: tests/README.md.
"""
from __future__ import annotations

import os
import signal
import time
import tracemalloc

import numpy as np
import pytest

from embjax import feature_files
from embjax.feature_files import FeatureFileError

SECOND, PEAK = 1.0, 32 << 20


@pytest.fixture(autouse=True)
def _never_block():
    """A reader that blocks (on a FIFO) fails the test after 10 s instead of hanging the suite."""
    def hang(*_):
        raise AssertionError("the reader blocked")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def outcome(fn, named):
    tracemalloc.start()
    start = time.process_time()
    try:
        return "ok", fn()
    except FeatureFileError as e:
        assert os.path.basename(str(named)) in str(e), str(e)
        return "error", str(e)
    finally:
        elapsed = time.process_time() - start
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < SECOND, f"took {elapsed:.2f} s"
        assert top < PEAK, f"peak traced memory {top:,} bytes"


def read_all(path):
    source = feature_files.open_source("m", str(path))
    return source.read(0, source.rows)


def test_a_valid_file_reads_exactly(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 3))
    np.save(tmp_path / "x.npy", x)
    result, got = outcome(lambda: read_all(tmp_path / "x.npy"), "x.npy")
    assert result == "ok" and np.array_equal(got, x.astype(np.float32))


def test_every_cut_of_a_feature_and_a_label_file(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    labels = np.array([0, 1, 2, 1])
    for name, array, read in (("x.npy", x, read_all),
                              ("y.npy", labels, lambda p: feature_files.load_labels(str(p), 4))):
        np.save(tmp_path / name, array)
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / ("cut_" + name)
        for keep in range(len(data)):
            cut.write_bytes(data[:keep])
            result, _ = outcome(lambda: read(cut), cut)
            assert result == "error", (name, keep)


def test_every_flipped_header_byte(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "x.npy", x)
    data = (tmp_path / "x.npy").read_bytes()
    header = data.index(b"\n") + 1
    path = tmp_path / "flip.npy"
    counts = {"ok": 0, "error": 0}
    for offset in range(header):
        damaged = bytearray(data)
        damaged[offset] ^= 0x41
        path.write_bytes(bytes(damaged))
        result, got = outcome(lambda: read_all(path), path)
        counts[result] += 1
        if result == "ok":  # a flip the header tolerates reads the same values
            assert np.array_equal(got, x), offset
    assert counts["error"] > 0, counts


@pytest.mark.parametrize("kind", ["features", "labels", "heads"])
def test_empty_files(tmp_path, kind):
    path = tmp_path / ("x.npz" if kind == "heads" else "x.npy")
    path.write_bytes(b"")
    read = {"features": lambda: read_all(path), "labels": lambda: feature_files.load_labels(str(path), 3),
            "heads": lambda: feature_files.load_head(str(path), 3, "m")}[kind]
    result, message = outcome(read, path)
    assert result == "error", message


@pytest.mark.parametrize("kind", ["features", "labels", "heads"])
def test_fifos_return_an_error_at_once(tmp_path, kind):
    path = tmp_path / ("a.npz" if kind == "heads" else "a.npy")
    os.mkfifo(path)
    read = {"features": lambda: read_all(path), "labels": lambda: feature_files.load_labels(str(path), 3),
            "heads": lambda: feature_files.load_head(str(path), 3, "m")}[kind]
    result, message = outcome(read, path)
    assert result == "error" and "not a regular file" in message, message
    shards = tmp_path / "shards"  # a FIFO among a directory's shards
    shards.mkdir(exist_ok=True)
    np.save(shards / "part-0.npy", np.zeros((2, 3), np.float32))
    if not (shards / "part-1.npy").exists():
        os.mkfifo(shards / "part-1.npy")
    result, message = outcome(lambda: read_all(shards), "part-1.npy")
    assert result == "error" and "not a regular file" in message


@pytest.mark.parametrize("value, said", [
    (1e300, "1e+300, beyond float32's range (±3.4e38) in which features are read,"),
    (-4e38, "-4e+38, beyond float32's range (±3.4e38) in which features are read,"),
    (np.inf, "an infinity"),
    (np.nan, "NaN"),
])
def test_values_beyond_float32_are_reported_as_such(tmp_path, value, said):
    x = np.zeros((3, 2))
    x[1, 1] = value
    np.save(tmp_path / "x.npy", x)
    result, message = outcome(lambda: read_all(tmp_path / "x.npy"), "x.npy")
    assert result == "error" and f"row 1 (row 1 of model 'm') holds {said} in column 1" in message, message
    np.save(tmp_path / "ok.npy", np.array([[3e38, -3e38]]))  # inside float32's range: read
    assert outcome(lambda: read_all(tmp_path / "ok.npy"), "ok.npy")[0] == "ok"


def test_crafted_headers(tmp_path):
    def npy(header: str, body: bytes = b"") -> bytes:
        h = header.encode()
        h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
        return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + body

    cases = {
        "huge": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1 << 40, 3), }"),
        "claims": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2**40, 2**40), }"),
        "negative": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 3), }"),
        "object": npy("{'descr': '|O', 'fortran_order': False, 'shape': (1, 1), }", b"\0" * 8),
        "code": npy("__import__('os').system('true')"),
        "version": b"\x93NUMPY\x09\x00" + b"\0" * 100,
        "magic": b"\x93NUMPX\x01\x00" + b"\0" * 100,
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.npy"
        path.write_bytes(data)
        result, message = outcome(lambda: read_all(path), path)
        assert result == "error", (name, message)
