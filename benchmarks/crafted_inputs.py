"""The crafted inputs of issue 26, each read in its own process: outcome, CPU seconds, peak memory growth.

    PYTHONPATH=. python benchmarks/crafted_inputs.py [--only SUBSTRING]

Each file is written here (the writers of tests/test_fuzz_tf_checkpoint.py), then a fresh interpreter
imports the reader, resets its peak resident size (Linux VmHWM via /proc/self/clear_refs), reads the file
and reports the exception type (or "loaded"), the CPU seconds of the read (time.process_time) and how much
the peak resident size grew. The bound the issue sets: the reader's own error, under 2 CPU seconds and
100 MB; the FIFO case must return at once (its wall time is shown).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import test_fuzz_tf_checkpoint as w  # noqa: E402  (the SSTable / protobuf writers)

from embjax.weights import tf_checkpoint  # noqa: E402

CHILD = r"""
import json, os, re, sys, time
kind, path = sys.argv[1], sys.argv[2]
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) << 10
if kind == "tf":
    from embjax.weights.tf_checkpoint import load as read
elif kind == "safetensors":
    from embjax.weights.safetensors_io import load_state_dict as read
elif kind == "h5":
    from embjax.weights.h5 import read_keras_weights as read
elif kind == "features":
    from embjax import feature_files
    def read(p):
        s = feature_files.open_source("m", p)
        return s.read(0, s.rows)
elif kind == "labels":
    from embjax import feature_files
    read = lambda p: feature_files.load_labels(p, 3)
import numpy  # imported before the measurement starts
open("/proc/self/clear_refs", "w").write("5")
rss = status("VmRSS")
wall, cpu = time.perf_counter(), time.process_time()
try:
    read(path)
    outcome, message = "loaded", ""
except BaseException as e:
    outcome, message = type(e).__name__, str(e)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
print(json.dumps({"outcome": outcome, "message": message[:160], "cpu": cpu, "wall": wall,
                  "peak_mb": (status("VmHWM") - rss) / 2**20}))
"""


def _index(d, name, body_entries=None, raw_body=None, data=b"", per_block=4, interval=2):
    prefix = os.path.join(d, name)
    if raw_body is not None:
        index = w.table([(b"\xff", b"")], edit=lambda k, n, b: raw_body + struct.pack("<II", 0, 1) if k == "data" else b)
    else:
        index = w.table(body_entries, per_block, interval)
    with open(prefix + ".index", "wb") as f:
        f.write(index)
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)
    return prefix


def growing_keys(d, n):
    value = b""
    body = w.varint(0) + w.varint(0) + w.varint(2) + b"\x08\x01"
    body += b"".join(w.varint(i) + w.varint(1) + w.varint(len(value)) + b"a" + value for i in range(n))
    return _index(d, f"grow{n}", raw_body=body)


def long_keys(d):
    value = w.scalar_entry()
    first = b"k" * 3996 + b"0000"
    body = w.varint(0) + w.varint(len(first)) + w.varint(len(value)) + first + value
    body += b"".join(w.varint(3996) + w.varint(4) + w.varint(len(value)) + b"%04d" % i + value
                     for i in range(1, 30_000))
    return _index(d, "long", raw_body=body)


def scalars(d, n):
    data = np.arange(n, dtype=np.float32).tobytes()
    entries = [(b"", w.encode([(1, 0, 1)]))]
    entries += [(b"v%07d" % i, w.scalar_entry(4 * i, 4, tf_checkpoint.masked_crc32c(data[4 * i: 4 * i + 4])))
                for i in range(n)]
    return _index(d, f"scalars{n}", entries, data=data, per_block=64, interval=16)


def overlapping(d):
    data = np.arange(4, dtype=np.float32).tobytes()
    crc = tf_checkpoint.masked_crc32c(data)
    e = w.encode([(1, 0, 1), (2, 2, w.encode([(2, 2, w.encode([(1, 0, 4)]))])), (5, 0, 16), (6, 5, crc)])
    return _index(d, "overlap", [(b"", b""), (b"a", e), (b"b", e)], data=data)


def wrapping_shape(d):
    shape = w.encode([(2, 2, w.encode([(1, 0, 2**32)]))] * 2)
    e = w.encode([(1, 0, 1), (2, 2, shape), (5, 0, 0), (6, 5, tf_checkpoint.masked_crc32c(b""))])
    return _index(d, "wrap", [(b"", b""), (b"w", e)])


def deep_rank(d):
    shape = w.encode([(2, 2, w.encode([(1, 0, 1)]))] * 100_000)
    e = w.encode([(1, 0, 1), (2, 2, shape), (5, 0, 4), (6, 5, 0)])
    return _index(d, "rank", [(b"", b""), (b"w", e)], data=b"\0" * 4)


def missing_crc(d):
    e = w.encode([(1, 0, 1), (2, 2, w.encode([(2, 2, w.encode([(1, 0, 6)]))])), (5, 0, 24)])
    return _index(d, "nocrc", [(b"", b""), (b"w", e)], data=b"\1" * 24)


def zeros(d, name):
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.truncate(300 << 20)
    return path


def v1_cases(d):
    out = {}
    out["V1 int8 value 300"] = w.v1_file(_P(d, "v1a.ckpt"), [("t", 6, [1])], [("t", None, w.encode([(7, 0, 300)]))])
    out["V1 uint64 value 2^63 (valid)"] = w.v1_file(_P(d, "v1b.ckpt"), [("u", 23, [1])],
                                                    [("u", None, w.encode([(17, 0, 2**63)]))])
    two = w.encode([(5, 2, np.ones(2, np.float32).tobytes())])
    out["V1 overlapping slices"] = w.v1_file(_P(d, "v1c.ckpt"), [("t", 1, [4])],
                                             [("t", [(0, 2)], two), ("t", [(1, 2)], two)])
    return out


class _P(str):
    """A str path with write_bytes, as the test writers expect a pathlib.Path."""

    def __new__(cls, d, name):
        return super().__new__(cls, os.path.join(d, name))

    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(data)


def safetensors_dup(d):
    entries = ", ".join(f'"t{i}": {{"dtype": "U8", "shape": [1], "data_offsets": [{i}, {i + 1}]}}'
                        for i in range(50_000))
    blob = ("{" + entries + ', "t7": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}').encode()
    path = os.path.join(d, "dup.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"\0" * 50_000)
    return path


def h5_repeat(d):
    import h5py

    path = os.path.join(d, "repeat.h5")
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("w", data=np.zeros(4, np.float32))
        f.attrs["layer_names"] = [b"layer"]
        f.create_group("layer").attrs["weight_names"] = np.array([b"/w"] * 200_000)
    return path


def h5_links(d):
    import h5py

    path = os.path.join(d, "links.h5")
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("w", data=np.zeros(4, np.float32))
        f.attrs["layer_names"] = [b"layer"]
        g = f.create_group("layer")
        for i in range(50_000):
            g[f"w{i}"] = f["w"]
        g.attrs["weight_names"] = np.array([b"w%d" % i for i in range(50_000)])
    return path


def npy_cases(d):
    fifo = os.path.join(d, "a.npy")
    os.mkfifo(fifo)
    empty = os.path.join(d, "empty.npy")
    open(empty, "wb").close()
    big = os.path.join(d, "big.npy")
    x = np.zeros((3, 2))
    x[1, 1] = 1e300
    np.save(big, x)
    return {"FIFO named a.npy": ("features", fifo), "0-byte .npy (features)": ("features", empty),
            "0-byte .npy (labels)": ("labels", empty), "float64 1e300": ("features", big)}


def cases(d):
    out = {
        "keys growing by a byte, 24,000 entries": ("tf", growing_keys(d, 24_000)),
        "keys growing by a byte, 52,000 entries": ("tf", growing_keys(d, 52_000)),
        "30,000 distinct 4,000-byte keys": ("tf", long_keys(d)),
        "a million scalars": ("tf", scalars(d, 1_000_000)),
        "60,000 scalars": ("tf", scalars(d, 60_000)),
        "overlapping byte ranges": ("tf", overlapping(d)),
        "shape (2^32, 2^32), size 0": ("tf", wrapping_shape(d)),
        "rank 100,000": ("tf", deep_rank(d)),
        "no crc32c field, damaged bytes": ("tf", missing_crc(d)),
        "300 MiB of zeros as .index": ("tf", zeros(d, "zeros.ckpt.index")),
        "300 MiB of zeros as a V1 file": ("tf", zeros(d, "zeros_v1.ckpt")),
        **{k: ("tf", v) for k, v in v1_cases(d).items()},
        "safetensors: 50,000 keys, one duplicate": ("safetensors", safetensors_dup(d)),
        "h5: one layer naming a dataset 200,000 times": ("h5", h5_repeat(d)),
        "h5: 50,000 distinct links to one dataset": ("h5", h5_links(d)),
        **npy_cases(d),
    }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for name, (kind, path) in cases(d).items():
            if args.only not in name:
                continue
            size = os.path.getsize(path + ".index") if os.path.isfile(path + ".index") else (
                os.path.getsize(path) if os.path.isfile(path) else 0)
            try:
                proc = subprocess.run([sys.executable, "-c", CHILD, kind, path], capture_output=True, text=True,
                                      env=env, timeout=60)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                r = {"outcome": "TIMEOUT (60 s)", "message": "", "cpu": float("nan"), "wall": 60.0, "peak_mb": 0}
            rows.append((name, size, r))
            print(f"| {name} | {size / 1024:,.0f} KiB | {r['outcome']} | {r['cpu']:.3f} | {r['wall']:.3f} | "
                  f"{r['peak_mb']:.1f} | {r['message'][:90]} |", flush=True)


if __name__ == "__main__":
    print("| case | file | outcome | CPU s | wall s | peak +MB | message |\n|---|---|---|---|---|---|---|")
    main()
