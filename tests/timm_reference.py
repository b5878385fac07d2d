"""Deterministic random timm weights and inputs, shared by the timm parity tests and the script that made
their fixtures (tests/fixtures/make_timm_fixtures.py).

timm (with the torchvision it imports) cannot be installed beside this project's CPU build of torch, so
the timm outputs are computed once, in a separate environment, and committed (tests/fixtures/timm/*.npz,
with every state-dict name and shape in a .json). The weights are not committed: both sides draw every
tensor from NumPy's legacy `RandomState`, whose streams NumPy keeps stable across versions, seeded by the
tensor's name, so the test rebuilds exactly the state dict timm ran with.
"""
import json
import zlib

import numpy as np


def tensor_for(name: str, shape, seed: int) -> np.ndarray:
    """The random value of state-dict entry `name`: He-scaled kernels, BatchNorm far from the identity."""
    rng = np.random.RandomState((zlib.crc32(name.encode()) + 7919 * seed) % 2**32)
    shape = tuple(int(s) for s in shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) in (2, 4):  # conv (out, in/groups, kh, kw) or linear (out, in)
        fan_in = int(np.prod(shape[1:]))
        value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf == "weight":  # BatchNorm γ: positive, so a scale-free BatchNorm can fold it
        value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "running_var":
        value = rng.uniform(0.5, 2.0, shape)
    elif leaf == "running_mean":
        value = rng.normal(0.0, 0.5, shape)
    elif leaf == "bias":
        value = rng.normal(0.0, 0.2, shape)
    elif leaf == "num_batches_tracked":
        return np.zeros(shape, np.int64)
    else:
        raise ValueError(f"no rule for timm tensor {name!r}")
    return value.astype(np.float32)


def state_dict(entries, seed: int) -> dict[str, np.ndarray]:
    """{name: array} for [(name, shape), ...] (the order and names of timm's state_dict())."""
    return {name: tensor_for(name, shape, seed) for name, shape in entries}


def images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    """NHWC float32 inputs in [-1, 1] (the models' scaling)."""
    return np.random.RandomState(seed).uniform(-1.0, 1.0, (batch, height, width, 3)).astype(np.float32)


def load_fixture(path_stem):
    """(meta dict, {output name: float64 array}) of a committed fixture."""
    with open(f"{path_stem}.json") as f:
        meta = json.load(f)
    with np.load(f"{path_stem}.npz") as data:
        outputs = {k: np.asarray(data[k], np.float64) for k in data.files}
    return meta, outputs
