"""Broken and crafted Keras .h5 files: each ends in KerasWeightsError naming the file within a second and
bounded memory, or reads exactly what the file says; never a crash. What each showed: tests/README.md.

The files are written with h5py directly in both Keras layouts (no Keras needed). The truncation and
bit-flip loops run in a child process, because a damaged file reaches the HDF5 C library, and a crash
there would take pytest with it instead of failing one test.
"""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from embjax.weights import limits
from embjax.weights.h5 import KerasWeightsError, read_keras_weights

# The bound is on CPU seconds (time.process_time): a reader that loops or expands a crafted file
# burns CPU, while waiting for a core on a loaded machine (the suite runs beside other jobs) does not.
SECOND = 1.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _default_cap(monkeypatch):
    monkeypatch.delenv(limits.ENV_MAX_BYTES, raising=False)


def legacy_layers(rng):
    return {
        "conv1": [rng.standard_normal((3, 3, 2, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "bn": [rng.standard_normal(4).astype(np.float32) for _ in range(4)],
        "dense": [rng.standard_normal((4, 3)).astype(np.float32), np.arange(3, dtype=np.float32)],
    }


def write_legacy(path, layers):
    """Keras 2's layout: `layer_names` on the root, `weight_names` on each layer group."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        for name, arrays in layers.items():
            g = f.create_group(name)
            names = [f"{name}/w{i}:0" for i in range(len(arrays))]
            g.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, arrays):
                g.create_dataset(n, data=a)


def write_keras3(path, layers):
    with h5py.File(path, "w") as f:
        for name, arrays in layers.items():
            v = f.create_group(f"layers/{name}/vars")
            for i, a in enumerate(arrays):
                v.create_dataset(str(i), data=a)


def data_regions(path):
    """{(layer, index): (first byte, end byte)} of every contiguous dataset's data in the file."""
    regions = {}
    with h5py.File(path, "r") as f:
        for layer in f.attrs["layer_names"]:
            for i, n in enumerate(f[layer].attrs["weight_names"]):
                ds = f[layer][n]
                regions[(layer, i)] = (ds.id.get_offset(), ds.id.get_offset() + ds.id.get_storage_size())
    return regions


def bounded_read(path, **kwargs):
    start = time.process_time()
    try:
        return read_keras_weights(path, **kwargs)
    finally:
        assert time.process_time() - start < SECOND


def test_round_trip_of_both_layouts(tmp_path):
    layers = legacy_layers(np.random.default_rng(0))
    for writer in (write_legacy, write_keras3):
        path = tmp_path / f"{writer.__name__}.h5"
        writer(path, layers)
        got = read_keras_weights(path)
        assert sorted(got) == sorted(layers)  # Keras 3 files list layers in natural key order
        for k in layers:
            for a, b in zip(got[k], layers[k]):
                np.testing.assert_array_equal(a, b)


# --- crafted files ------------------------------------------------------------------------------


def test_external_link_and_external_storage_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"private bytes")
    path = tmp_path / "external_storage.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"kernel"]
        g.create_dataset("kernel", shape=(13,), dtype="u1", external=[(str(secret), 0, 13)])
    with pytest.raises(KerasWeightsError, match=r"external_storage\.h5.*layer 'dense'.*outside the file"):
        bounded_read(path)
    other = tmp_path / "other.h5"
    write_legacy(other, legacy_layers(np.random.default_rng(1)))
    path = tmp_path / "external_link.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1"]
        f["conv1"] = h5py.ExternalLink(str(other), "/conv1")
    with pytest.raises(KerasWeightsError, match=r"external_link\.h5.*link to another file"):
        bounded_read(path)


def test_virtual_dataset_is_refused(tmp_path):
    other = tmp_path / "source.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(4, dtype=np.float32))
    path = tmp_path / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(other), "x", shape=(4,))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"d"]
        g = f.create_group("d")
        g.attrs["weight_names"] = [b"k"]
        g.create_virtual_dataset("k", layout)
    with pytest.raises(KerasWeightsError, match="outside the file"):
        bounded_read(path)


def test_huge_logical_size_in_a_tiny_file(tmp_path):
    path = tmp_path / "sparse.h5"  # chunked and never written: 4 TiB of fill value in a few KB
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"kernel"]
        g.create_dataset("kernel", shape=(1 << 20, 1 << 20), dtype="f4", chunks=(256, 256))
    assert path.stat().st_size < 16_384
    with pytest.raises(KerasWeightsError, match=r"sparse\.h5.*layer 'dense'.*4,398,046,773,248 bytes"):
        bounded_read(path)
    path = tmp_path / "gzip.h5"  # 64 MiB of zeros, gzip-compressed to ~64 KB; refused under a 1 MiB cap
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"kernel"]
        g.create_dataset("kernel", data=np.zeros((4096, 4096), np.float32), compression="gzip", chunks=(512, 512))
    with pytest.raises(KerasWeightsError, match="cap"):
        bounded_read(path, max_bytes=1 << 20)


def test_one_dataset_linked_from_many_layers_is_read_once(tmp_path):
    path = tmp_path / "shared.h5"
    shared = np.arange(256 * 1024, dtype=np.float32)  # 1 MiB
    with h5py.File(path, "w") as f:
        f.create_dataset("shared", data=shared)
        names = [f"layer{i}" for i in range(300)]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for n in names:
            f.create_group(n).attrs["weight_names"] = [b"/shared"]
    got = bounded_read(path, max_bytes=2 << 20)  # 300 copies would need 300 MiB
    assert len(got) == 300 and all(got[n][0] is got["layer0"][0] for n in got)
    np.testing.assert_array_equal(got["layer299"][0], shared)


def test_cycles_and_deep_nesting_of_keras3_models(tmp_path):
    path = tmp_path / "cycle.h5"
    with h5py.File(path, "w") as f:
        f.create_group("layers/inner/vars").create_dataset("0", data=np.ones(2, np.float32))
        f["layers/inner/layers"] = f["layers"]  # hard link back up: a model containing itself
    with pytest.raises(KerasWeightsError, match=r"cycle\.h5.*cycle"):
        bounded_read(path)
    path = tmp_path / "deep.h5"
    with h5py.File(path, "w") as f:
        f.create_group("/".join(["layers", "m"] * (limits.MAX_NESTING + 5)) + "/vars").create_dataset(
            "0", data=np.ones(1, np.float32))
    with pytest.raises(KerasWeightsError, match="deeper than 64"):
        bounded_read(path)


@pytest.mark.parametrize("case,match", [
    ("string_dataset", "not a numeric array"),
    ("two_d_names", "not a list of names"),
    ("missing_weight", "layer 'dense'.*no 'absent'"),
    ("layer_is_dataset", "layer 'dense' is not a group"),
])
def test_malformed_structure_names_the_layer(tmp_path, case, match):
    path = tmp_path / f"{case}.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        if case == "layer_is_dataset":
            f.create_dataset("dense", data=np.ones(2))
        else:
            g = f.create_group("dense")
            if case == "string_dataset":
                g.attrs["weight_names"] = [b"k"]
                g.create_dataset("k", data=np.array([b"abc"]))
            elif case == "two_d_names":
                g.attrs["weight_names"] = np.array([[b"a", b"b"], [b"c", b"d"]])
            else:
                g.attrs["weight_names"] = [b"absent"]
    with pytest.raises(KerasWeightsError, match=rf"{case}\.h5.*{match}"):
        bounded_read(path)


# --- seeded fuzzing, in a child process ----------------------------------------------------------

_CHILD = textwrap.dedent("""
    import hashlib, json, sys, time
    import numpy as np
    from embjax.weights.h5 import KerasWeightsError, read_keras_weights
    for line in sys.stdin:
        path = line.strip()
        print(json.dumps({"start": path}), flush=True)  # so a crash names the file it died on
        start = time.process_time()
        try:
            got = read_keras_weights(path, max_bytes=1 << 20)
            out = {"ok": {k: [hashlib.sha1(np.ascontiguousarray(a).view(np.uint8)).hexdigest()
                              + str(a.dtype) + str(a.shape) for a in v] for k, v in got.items()}}
        except KerasWeightsError as e:
            out = {"error": str(e)}
        except BaseException as e:
            out = {"other": f"{type(e).__name__}: {e}"}
        out["path"], out["seconds"] = path, time.process_time() - start
        print(json.dumps(out), flush=True)
""")


def run_child(paths):
    """Reads every path in one child process; returns {path: outcome}. A crash fails with the file named."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD], input="\n".join(map(str, paths)) + "\n",
                          capture_output=True, text=True, env=env, timeout=300)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (f"reader process died (rc {proc.returncode}) on {records[-1] if records else '?'}: "
                                  f"{proc.stderr[-2000:]}")
    outcomes = {r["path"]: r for r in records if "path" in r}
    assert len(outcomes) == len(paths)
    for path, r in outcomes.items():
        assert "other" not in r, f"{path}: {r['other']}"
        assert r["seconds"] < SECOND, f"{path}: {r['seconds']:.2f} s"
        if "error" in r:
            assert os.path.basename(path) in r["error"], r["error"]
    return outcomes


def digests(layers):
    return {k: [hashlib.sha1(np.ascontiguousarray(a).view(np.uint8)).hexdigest() + str(a.dtype) + str(a.shape)
                for a in v] for k, v in layers.items()}


@pytest.mark.parametrize("writer", [write_legacy, write_keras3])
def test_truncated_files(tmp_path, writer):
    full = tmp_path / "full.h5"
    writer(full, legacy_layers(np.random.default_rng(2)))
    data = full.read_bytes()
    # every 16th offset over the whole file, and every offset of the first 512 bytes (the superblock)
    cuts = sorted(set(range(0, len(data), 16)) | set(range(0, 512)))
    paths = []
    for keep in cuts:
        p = tmp_path / f"cut{keep}.h5"
        p.write_bytes(data[:keep])
        paths.append(p)
    outcomes = run_child(paths)
    # HDF5 records the file's end-of-allocation address in the superblock, so the library refuses any
    # file shorter than that: every cut is an error (seen: all 1,497 and 1,266 cuts of the two files).
    read = [p.name for p in paths if "ok" in outcomes[str(p)]]
    assert not read, f"truncated files read without an error: {read[:5]}"


def test_flipped_bytes(tmp_path):
    layers = legacy_layers(np.random.default_rng(3))
    full = tmp_path / "full.h5"
    write_legacy(full, layers)
    data = full.read_bytes()
    regions = data_regions(full)
    rng = np.random.default_rng(4)
    flips, paths = [], []
    for i, (offset, bit) in enumerate(zip(rng.integers(0, len(data), 300), rng.integers(0, 8, 300))):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << bit
        p = tmp_path / f"flip{i}.h5"
        p.write_bytes(bytes(flipped))
        flips.append((int(offset), int(bit)))
        paths.append(p)
    outcomes = run_child(paths)
    want = digests(layers)
    for p, (offset, bit) in zip(paths, flips):
        r = outcomes[str(p)]
        hit = [key for key, (a, b) in regions.items() if a <= offset < b]
        if hit:  # no checksum on data: exactly that byte of that array changes, nothing else
            (layer, index), = hit
            changed = [arr.copy() for arr in layers[layer]]
            raw = changed[index].view(np.uint8).reshape(-1)
            raw[offset - regions[(layer, index)][0]] ^= 1 << bit
            assert r.get("ok") == {**want, layer: digests({layer: changed})[layer]}, (offset, bit)


def test_one_layer_naming_a_dataset_over_and_over(tmp_path):
    # 200,000 copies of one name in one layer's weight_names (a 200 KB file): Keras names a layer's weights
    # uniquely, so the repeat is refused before any of the 200,000 lookups (7.9 s before).
    path = tmp_path / "repeat.h5"
    with h5py.File(path, "w", libver="latest") as f:  # dense attribute storage: no 64 KB attribute limit
        f.create_dataset("w", data=np.zeros(4, np.float32))
        f.attrs["layer_names"] = [b"layer"]
        f.create_group("layer").attrs["weight_names"] = np.array([b"/w"] * 200_000)
    with pytest.raises(KerasWeightsError, match="lists 200,000 names, more than max_entries=50,000") as info:
        bounded_read(path)
    assert "repeat.h5" in str(info.value)
    with h5py.File(path, "a") as f:  # within the limit: 40,000 copies
        f["layer"].attrs["weight_names"] = np.array([b"/w"] * 40_000)
    with pytest.raises(KerasWeightsError, match="lists '/w' more than once"):
        bounded_read(path)
    with h5py.File(path, "a") as f:  # the same names in the layer list: refused alike
        f.attrs["layer_names"] = np.array([b"layer"] * 40_000)
        f["layer"].attrs["weight_names"] = [b"/w"]
    with pytest.raises(KerasWeightsError, match="lists 'layer' more than once"):
        bounded_read(path)


def test_more_names_than_the_limit(tmp_path):
    path = tmp_path / "many.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("w", data=np.zeros(1, np.float32))
        f.attrs["layer_names"] = [b"layer"]
        f.create_group("layer").attrs["weight_names"] = np.array([b"/w%d" % i for i in range(60_000)])
    with pytest.raises(KerasWeightsError, match="max_entries=50,000"):
        bounded_read(path)
    with pytest.raises(KerasWeightsError, match="max_key_bytes"):
        with h5py.File(path, "a") as f:
            f["layer"].attrs["weight_names"] = [b"/" + b"w" * 5000]
        bounded_read(path)
    with pytest.raises(KerasWeightsError, match="no '/w' in"):  # the limit raised: read on, to the bad name
        with h5py.File(path, "a") as f:
            f["layer"].attrs["weight_names"] = [b"/w", b"/w1"]
            del f["w"]
        bounded_read(path, limits=limits.Limits(max_entries=100_000))


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "weights.h5"
    os.mkfifo(fifo)
    with pytest.raises(KerasWeightsError, match="not a regular file"):
        bounded_read(fifo)


def test_many_link_names_to_one_dataset_cost_one_lookup_each(tmp_path):
    # 20,000 distinct hard links to one dataset in one layer: read once, each further name found by one
    # low-level link lookup (building h5py's objects for each name cost 0.14 ms a name).
    path = tmp_path / "links.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("w", data=np.arange(4, dtype=np.float32))
        f.attrs["layer_names"] = [b"layer"]
        g = f.create_group("layer")
        for i in range(20_000):
            g[f"w{i}"] = f["w"]
        g.attrs["weight_names"] = np.array([b"w%d" % i for i in range(20_000)])
    got = bounded_read(path)["layer"]
    assert len(got) == 20_000 and all(a is got[0] for a in got) and got[0].tolist() == [0, 1, 2, 3]
