"""Keras test helpers shared by the parity tests (ResNet, MobileNet, Inception, the .h5 reader).

Building keras.applications models offline with `weights=None` is the independent reference every port
is checked against; these helpers make that cheap (no per-shape XLA programs for Keras' own initial
weights) and thorough (every weight, BatchNorm statistics included, redrawn at sane scales).
"""
import contextlib

import jax
import numpy as np
import pytest

keras = pytest.importorskip("keras")


@contextlib.contextmanager
def fast_keras_init():
    """Keras draws initial weights with jax.random, compiling one XLA program per weight shape (~1 s
    each on a loaded CPU). The tests overwrite every weight anyway, so draw zeros with NumPy instead."""
    from keras.src.backend.jax import random as keras_jax_random

    def zeros(shape, *args, dtype=None, **kwargs):
        return np.zeros(shape, dtype or "float32")

    with pytest.MonkeyPatch.context() as mp:
        for fn in ("uniform", "normal", "truncated_normal"):
            mp.setattr(keras_jax_random, fn, zeros)
        yield


def randomize(model, seed):
    """Random weights with sane scales; BatchNorm statistics random too so that BN is really tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.weights[0].shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, c).astype("float32"),    # gamma
                rng.normal(0.0, 0.2, c).astype("float32"),     # beta
                rng.normal(0.0, 0.5, c).astype("float32"),     # moving mean
                rng.uniform(0.5, 2.0, c).astype("float32"),    # moving variance
            ])
        else:
            new = []
            for w in layer.weights:
                shape = tuple(w.shape)
                if len(shape) >= 2:  # He scale keeps activations O(1) through the depth
                    fan_in = int(np.prod(shape[:-1])) if len(shape) == 4 else shape[0]
                    if isinstance(layer, keras.layers.DepthwiseConv2D):
                        fan_in = shape[0] * shape[1]
                    new.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype("float32"))
                else:
                    new.append(rng.normal(0.0, 0.1, shape).astype("float32"))
            layer.set_weights(new)


def keras_outputs(model, layer_names, x):
    """Named intermediate outputs of a Keras model (predict: one XLA program, faster than eager here)."""
    probe = keras.Model(model.input, [model.get_layer(n).output for n in layer_names])
    return [np.asarray(y) for y in probe.predict(x, verbose=0)]


def numpy_variables(module, x, seed=0):
    """Random variables of the module's shapes drawn with NumPy. Flax's own init compiles one XLA
    random-number program per parameter shape (seconds each on a shared CPU); NumPy costs nothing."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / np.max(np.abs(b)))
