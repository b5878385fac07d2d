"""Orbax store of converted variables: exact round trip, atomic writes, clear errors for bad checkpoints."""
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from embjax.weights import store
from embjax.weights.store import CorruptCheckpointError


def _tree():
    rng = np.random.default_rng(0)
    return {
        "params": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
                   "dense": {"kernel": jnp.asarray(rng.standard_normal((4, 5)), jnp.bfloat16),
                             "bias": np.zeros(5, np.float32)}},
        "batch_stats": {"bn": {"mean": rng.standard_normal(4).astype(np.float32),
                               "var": rng.uniform(0.5, 2, 4).astype(np.float32)}},
        "step": np.array(17, np.int32),
    }


def _assert_tree_equal(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, dict):
            _assert_tree_equal(got[k], v)
        else:
            assert isinstance(got[k], np.ndarray), k  # NumPy, never committed to a device
            assert got[k].dtype == np.asarray(v).dtype and got[k].shape == np.shape(v), k
            np.testing.assert_array_equal(got[k], np.asarray(v), err_msg=k)  # bit-exact: no conversion


def test_round_trip_with_metadata(tmp_path):
    tree = _tree()
    path = store.save_variables(tmp_path / "ckpt", tree, metadata={"variant": 0, "source": "x.pth"})
    assert path == str(tmp_path / "ckpt")
    got = store.load_variables(path)
    _assert_tree_equal(got, tree)
    assert got["params"]["dense"]["kernel"].dtype == ml_dtypes.bfloat16
    assert store.load_metadata(path) == {"variant": 0, "source": "x.pth"}
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left behind


def test_existing_checkpoint_needs_overwrite(tmp_path):
    path = tmp_path / "ckpt"
    store.save_variables(path, {"a": np.zeros(2, np.float32)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        store.save_variables(path, {"a": np.ones(2, np.float32)})
    store.save_variables(path, {"a": np.ones(2, np.float32)}, overwrite=True)
    np.testing.assert_array_equal(store.load_variables(path)["a"], [1, 1])
    assert os.listdir(tmp_path) == ["ckpt"]


def test_crash_during_save_leaves_nothing(tmp_path, monkeypatch):
    class Boom(RuntimeError):
        pass

    real = store._checkpointer

    def failing_checkpointer():
        ckpt = real()

        def save(*args, **kwargs):
            raise Boom("disk full")
        ckpt.save = save
        return ckpt

    monkeypatch.setattr(store, "_checkpointer", failing_checkpointer)
    with pytest.raises(Boom):
        store.save_variables(tmp_path / "ckpt", _tree())
    assert os.listdir(tmp_path) == []  # neither a half-written ckpt nor a stale temporary directory


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        store.load_variables(tmp_path / "nothing_here")


def test_incomplete_checkpoint_is_not_mistaken_for_one(tmp_path):
    path = tmp_path / "ckpt"
    store.save_variables(path, _tree())
    os.remove(path / "embjax.json")  # what a directory looks like when the index was never written
    with pytest.raises(CorruptCheckpointError, match=r"ckpt.*delete") as e:
        store.load_variables(path)
    assert isinstance(e.value, ValueError)


def test_corrupt_array_data(tmp_path):
    path = tmp_path / "ckpt"
    store.save_variables(path, _tree())
    # Remove every data file orbax wrote (ocdbt chunks): the index is intact, the arrays are gone.
    removed = 0
    for root, _, files in os.walk(path / "state"):
        if os.path.basename(root) == "d":
            for f in files:
                os.remove(os.path.join(root, f))
                removed += 1
    assert removed > 0
    with pytest.raises(CorruptCheckpointError, match=r"ckpt.*delete"):
        store.load_variables(path)


def test_restored_leaves_must_match_the_index(tmp_path):
    # A checkpoint whose state was swapped for another tree (e.g. a botched manual copy) is refused.
    a, b = tmp_path / "a", tmp_path / "b"
    store.save_variables(a, {"w": np.zeros((2, 3), np.float32)})
    store.save_variables(b, {"w": np.zeros((3, 2), np.float32)})
    shutil.rmtree(a / "state")
    shutil.copytree(b / "state", a / "state")
    with pytest.raises(CorruptCheckpointError, match=r"\['w'\]"):
        store.load_variables(a)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        store.save_variables(tmp_path / "ckpt", {"a": np.zeros(1)}, metadata={"bad": object()})
    assert not (tmp_path / "ckpt").exists()
