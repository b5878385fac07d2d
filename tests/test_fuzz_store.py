"""Damaged orbax stores of converted variables: each load ends in CorruptCheckpointError naming the
checkpoint, or returns exactly what was saved; never another exception, a hang or a different weight.
What each showed: tests/README.md.
"""
import collections
import json
import os
import shutil
import time

import numpy as np
import pytest

from embjax.weights import limits, store
from embjax.weights.store import CorruptCheckpointError

# One orbax restore costs ~0.1-0.3 s on an idle 2-core machine (tensorstore start-up dominates); three
# seconds leaves room for a loaded CI machine and still catches a hang.
SECONDS = 3.0


@pytest.fixture(autouse=True)
def _default_cap(monkeypatch):
    monkeypatch.delenv(limits.ENV_MAX_BYTES, raising=False)


def _tree():
    rng = np.random.default_rng(0)
    return {"params": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 8)).astype(np.float32)},
                       "dense": {"kernel": rng.standard_normal((8, 5)).astype(np.float32),
                                 "bias": rng.standard_normal(5).astype(np.float32)}},
            "batch_stats": {"bn": {"mean": rng.standard_normal(8).astype(np.float32)}}}


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}/{k}") if isinstance(v, dict) else {f"{prefix}/{k}": np.asarray(v)})
    return out


def load_or_error(path):
    start = time.process_time()
    try:
        out = ("ok", store.load_variables(path))
    except CorruptCheckpointError as e:
        assert os.path.basename(path) in str(e), str(e)
        out = ("error", str(e))
    assert time.process_time() - start < SECONDS
    return out


def assert_same(got, want):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


def checkpoint_files(path):
    return sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "ckpt"
    store.save_variables(path, _tree())
    return path


def test_every_file_missing(saved, tmp_path):
    outcomes = collections.Counter()
    for name in checkpoint_files(saved):
        copy = tmp_path / "ckpt"
        shutil.copytree(saved, copy)
        os.remove(copy / name)
        outcome, got = load_or_error(copy)
        outcomes[outcome] += 1
        if outcome == "ok":  # only files orbax does not need for reading (e.g. commit markers)
            assert_same(got, _tree())
        shutil.rmtree(copy)
    assert outcomes["error"] >= 4


def test_every_file_truncated_and_flipped(saved, tmp_path):
    rng = np.random.default_rng(1)
    outcomes = collections.Counter()
    for name in checkpoint_files(saved):
        data = (saved / name).read_bytes()
        variants = [data[:len(data) // 2], data[:-1]]
        for offset in rng.integers(0, len(data), 3):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << int(rng.integers(0, 8))
            variants.append(bytes(flipped))
        for variant in variants:
            copy = tmp_path / "ckpt"
            shutil.copytree(saved, copy)
            (copy / name).write_bytes(variant)
            outcome, got = load_or_error(copy)
            outcomes[outcome] += 1
            if outcome == "ok":  # never a different weight: the recorded hashes catch changed bytes
                assert_same(got, _tree())
            shutil.rmtree(copy)
    assert outcomes["error"] > 0


def test_a_silently_changed_weight_is_caught_by_the_hashes(saved, monkeypatch):
    # In the trials above every flipped byte of orbax's files was caught by orbax itself (its chunks are
    # zstd frames with checksums). The recorded SHA-256s guard the case it would miss (a storage layer
    # or an older format without checksums): a restore that returns one weight changed by one ulp.
    real = store._checkpointer

    def silently_corrupting():
        ckpt = real()
        restore = ckpt.restore

        def changed(*args, **kwargs):
            tree = restore(*args, **kwargs)
            bias = np.array(tree["params"]["dense"]["bias"])
            bias[2] = np.nextafter(bias[2], np.float32(np.inf))
            tree["params"]["dense"]["bias"] = bias
            return tree
        ckpt.restore = changed
        return ckpt

    monkeypatch.setattr(store, "_checkpointer", silently_corrupting)
    outcome, message = load_or_error(saved)
    assert outcome == "error" and "['params']['dense']['bias']" in message and "SHA-256" in message


def test_index_lies_about_sizes(saved, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy)
    index = json.loads((copy / "embjax.json").read_text())
    key = next(iter(index["leaves"]))
    index["leaves"][key][0] = [1 << 20, 1 << 20]  # 4 TiB: refused before orbax reads anything
    (copy / "embjax.json").write_text(json.dumps(index))
    outcome, message = load_or_error(copy)
    assert outcome == "error" and "cap" in message and key in message
    index["leaves"][key][0] = [2, 2]  # small but wrong: orbax's own metadata disagrees
    (copy / "embjax.json").write_text(json.dumps(index))
    outcome, message = load_or_error(copy)
    assert outcome == "error" and "orbax's metadata" in message


def test_content_hash_names_the_weights(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    tree = _tree()
    store.save_variables(a, tree)
    store.save_variables(b, tree, metadata={"other": "metadata"})
    changed = _tree()
    changed["params"]["dense"]["bias"][2] += 1e-6
    store.save_variables(c, changed)
    assert store.content_hash(a) == store.content_hash(b) != store.content_hash(c)
    # The same hash from the tree in memory, so weights from a file and from the store compare alike.
    assert store.variables_hash(tree) == store.content_hash(a)
    assert store.variables_hash(changed) == store.content_hash(c)
