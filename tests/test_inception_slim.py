"""TF-Slim Inception-v1 / v2 / v4: sizes, parameter counts, and blocks of v1 / v2 against float64 NumPy.

Inception-v1 and v2 have no Keras or timm implementation to compare with (their TF-Slim parity, with
checkpoints written by TensorFlow, belongs to the TF-Slim converter tests). Here the layer semantics the
ports rely on are checked against an independent float64 NumPy implementation written from TF's
definitions (not from Flax's): "SAME" padding computed as TF does (out = ceil(n / s), the odd pixel of
padding after), max pooling that ignores padding, average pooling that does not count it, the separable
stem's depthwise channel order (input c, multiplier k -> channel c·m + k) and biases, and BatchNorm without scale
(epsilon 1e-3). Each NumPy block is fed the Flax network's own input to that block (float64), on a
61×75 input whose maps are odd and even along the way (31×38, 16×19, 8×10, 4×5, 2×3).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax.models import inception_slim, registry

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

# Tolerance, max |flax - numpy| <= RTOL * max |numpy| per block: the NumPy side is float64, so the error
# is Flax's float32 rounding (u = 6e-8) in sums of at most 3·3·192 = 1728 products (sqrt(n)·u ≈ 3e-6)
# through at most three convolutions of a block plus its BatchNorms: ≈ 1e-5 < 1e-4. Measured: ~5e-7.
# Padding placed before instead of after moves border outputs by O(1) (tens of percent of the maximum).
RTOL = 1e-4
EPS = 1e-3
HEIGHT, WIDTH = 61, 75
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------------------------------------------
# float64 NumPy reference of TF's operations


def _same_pads(n, k, s):
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _pad(x, kernel, stride, padding, value=0.0):
    if padding == "VALID":
        return x, (0, 0), (0, 0)
    ph, pw = _same_pads(x.shape[1], kernel[0], stride), _same_pads(x.shape[2], kernel[1], stride)
    return np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=value), ph, pw


def _windows(xp, kernel, stride):
    """Yield (di, dj, view of xp at that kernel offset for every output position)."""
    oh = (xp.shape[1] - kernel[0]) // stride + 1
    ow = (xp.shape[2] - kernel[1]) // stride + 1
    for di in range(kernel[0]):
        for dj in range(kernel[1]):
            yield di, dj, xp[:, di : di + stride * (oh - 1) + 1 : stride, dj : dj + stride * (ow - 1) + 1 : stride]


def conv(x, w, stride=1, padding="SAME"):
    """Dense convolution, w of shape (kh, kw, cin, cout)."""
    xp, _, _ = _pad(x, w.shape[:2], stride, padding)
    return sum(np.einsum("bhwc,co->bhwo", v, w[di, dj]) for di, dj, v in _windows(xp, w.shape[:2], stride))


def depthwise(x, w, multiplier, stride=1, padding="SAME"):
    """TF depthwise convolution, w of shape (kh, kw, cin, multiplier): output channel c·m + k."""
    xp, _, _ = _pad(x, w.shape[:2], stride, padding)
    out = 0.0
    for di, dj, v in _windows(xp, w.shape[:2], stride):
        out = out + (v[..., :, None] * w[di, dj][None, None, None]).reshape(v.shape[:3] + (-1,))
    return out


def max_pool(x, k, stride, padding="SAME"):
    xp, _, _ = _pad(x, (k, k), stride, padding, value=-np.inf)
    return np.max(np.stack([v for _, _, v in _windows(xp, (k, k), stride)]), axis=0)


def avg_pool(x, k, stride, padding="SAME"):
    xp, _, _ = _pad(x, (k, k), stride, padding)
    ones, _, _ = _pad(np.ones_like(x[..., :1]), (k, k), stride, padding)
    total = sum(v for _, _, v in _windows(xp, (k, k), stride))
    count = sum(v for _, _, v in _windows(ones, (k, k), stride))
    return total / count


def conv_bn(x, variables, path, stride=1, padding="SAME"):
    """TF-Slim conv2d with batch_norm(scale=False) and ReLU, weights from the Flax tree at `path`."""
    p = _get(variables["params"], path)
    s = _get(variables["batch_stats"], path)
    y = conv(x, np.asarray(p["conv"]["kernel"], np.float64), stride, padding)
    y = (y - s["bn"]["mean"]) / np.sqrt(np.asarray(s["bn"]["var"], np.float64) + EPS) + p["bn"]["bias"]
    return np.maximum(y, 0.0)


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


# The blocks, as TF-Slim's nets/inception_v1.py and inception_v2.py define them.


def v2_stem(x, v):
    # TF-Slim's separable_conv2d outside the arg scope's BatchNorm: biases and ReLU.
    p = v["params"]["Conv2d_1a_7x7"]
    dw = np.asarray(p["depthwise"]["kernel"], np.float64)  # Flax (7, 7, 1, 24) = TF (7, 7, 3, 8) flattened
    y = depthwise(x, dw.reshape(7, 7, 3, 8), 8, stride=2)
    y = conv(y, np.asarray(p["pointwise"]["kernel"], np.float64)) + p["pointwise"]["bias"]
    return np.maximum(y, 0.0)


def v2_mixed_4a(x, v):
    b0 = conv_bn(conv_bn(x, v, "Mixed_4a/Branch_0/Conv2d_0a_1x1"), v, "Mixed_4a/Branch_0/Conv2d_1a_3x3", 2)
    b1 = conv_bn(x, v, "Mixed_4a/Branch_1/Conv2d_0a_1x1")
    b1 = conv_bn(b1, v, "Mixed_4a/Branch_1/Conv2d_0b_3x3")
    b1 = conv_bn(b1, v, "Mixed_4a/Branch_1/Conv2d_1a_3x3", 2)
    return np.concatenate([b0, b1, max_pool(x, 3, 2)], axis=-1)


def v2_mixed(x, v, name, pool):
    b0 = conv_bn(x, v, f"{name}/Branch_0/Conv2d_0a_1x1")
    b1 = conv_bn(conv_bn(x, v, f"{name}/Branch_1/Conv2d_0a_1x1"), v, f"{name}/Branch_1/Conv2d_0b_3x3")
    b2 = conv_bn(x, v, f"{name}/Branch_2/Conv2d_0a_1x1")
    b2 = conv_bn(conv_bn(b2, v, f"{name}/Branch_2/Conv2d_0b_3x3"), v, f"{name}/Branch_2/Conv2d_0c_3x3")
    b3 = conv_bn(pool(x, 3, 1), v, f"{name}/Branch_3/Conv2d_0b_1x1")
    return np.concatenate([b0, b1, b2, b3], axis=-1)


def v1_mixed(x, v, name, b2_name="Conv2d_0b_3x3"):
    b0 = conv_bn(x, v, f"{name}/Branch_0/Conv2d_0a_1x1")
    b1 = conv_bn(conv_bn(x, v, f"{name}/Branch_1/Conv2d_0a_1x1"), v, f"{name}/Branch_1/Conv2d_0b_3x3")
    b2 = conv_bn(conv_bn(x, v, f"{name}/Branch_2/Conv2d_0a_1x1"), v, f"{name}/Branch_2/{b2_name}")
    b3 = conv_bn(max_pool(x, 3, 1), v, f"{name}/Branch_3/Conv2d_0b_1x1")
    return np.concatenate([b0, b1, b2, b3], axis=-1)


# ---------------------------------------------------------------------------------------------------


def _random_variables(module, x, seed):
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            fan_in = np.prod(shape[:-1])
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if name == "mean":
            return rng.normal(0.0, 0.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.2, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _flax_run(factory, seed):
    module = factory(num_classes=11)
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
    variables = _random_variables(module, x, seed)
    compiled = jax.jit(module.apply).lower(variables, x)
    compiled = compiled.compile(_FAST_COMPILE if jax.default_backend() == "cpu" else None)
    out = {k: np.asarray(v, np.float64) for k, v in compiled(variables, x).items()}
    return x.astype(np.float64), jax.tree.map(np.asarray, variables), out


def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    scale = np.abs(want).max()
    assert scale > 0.1, f"{what}: degenerate reference"
    err = np.abs(got - want).max()
    assert err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL} x {scale:.3g}"
    print(f"{what}: relative error {err / scale:.2e}")  # pytest -s shows it


def test_inception_v2_blocks_match_numpy():
    x, v, out = _flax_run(inception_slim.inception_v2, 0)
    _assert_close(out["Conv2d_1a_7x7"], v2_stem(x, v), "Conv2d_1a_7x7 (separable stem)")
    assert out["Conv2d_1a_7x7"].shape == (2, 31, 38, 64)
    _assert_close(out["Mixed_4a"], v2_mixed_4a(out["Mixed_3c"], v), "Mixed_4a (stride-2 reduction)")
    assert out["Mixed_4a"].shape == (2, 4, 5, 576)
    _assert_close(out["Mixed_4b"], v2_mixed(out["Mixed_4a"], v, "Mixed_4b", avg_pool), "Mixed_4b (average pool)")
    _assert_close(out["Mixed_5c"], v2_mixed(out["Mixed_5b"], v, "Mixed_5c", max_pool), "Mixed_5c (max pool)")
    _assert_close(out["pre_logits"], out["Mixed_5c"].mean(axis=(1, 2)), "pre_logits")
    logits = out["pre_logits"] @ v["params"]["logits"]["kernel"] + v["params"]["logits"]["bias"]
    _assert_close(out["logits"], logits, "logits")


def test_inception_v1_blocks_match_numpy():
    x, v, out = _flax_run(inception_slim.inception_v1, 1)
    stem = conv_bn(x, v, "Conv2d_1a_7x7", 2)
    _assert_close(out["Conv2d_1a_7x7"], stem, "Conv2d_1a_7x7")
    _assert_close(out["MaxPool_2a_3x3"], max_pool(stem, 3, 2), "MaxPool_2a_3x3")
    _assert_close(out["Mixed_3b"], v1_mixed(out["MaxPool_3a_3x3"], v, "Mixed_3b"), "Mixed_3b")
    # 4x5 -> 2x3: a 2x2 stride-2 "SAME" pool pads the odd width by one column after.
    _assert_close(out["MaxPool_5a_2x2"], max_pool(out["Mixed_4f"], 2, 2), "MaxPool_5a_2x2")
    assert out["MaxPool_5a_2x2"].shape == (2, 2, 3, 832)
    _assert_close(out["Mixed_5b"], v1_mixed(out["MaxPool_5a_2x2"], v, "Mixed_5b", "Conv2d_0a_3x3"), "Mixed_5b")


def test_numpy_reference_places_padding_like_tf():
    """The reference itself: TF pads the odd pixel after (4 -> 2 with k=3, s=2 pads (0, 1))."""
    assert _same_pads(4, 3, 2) == (0, 1) and _same_pads(5, 3, 2) == (1, 1) and _same_pads(5, 2, 2) == (0, 1)
    x = np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(max_pool(x, 3, 2)[0, ..., 0], [[10, 11], [14, 15]])
    np.testing.assert_array_equal(avg_pool(x, 3, 2)[0, ..., 0], [[5, 6.5], [11, 12.5]])


# Published sizes: TF-Slim's GoogLeNet about 6.6M parameters with its 1001-way head, BN-Inception 11.2M;
# Inception-v4's exact count is checked against timm in tests/test_timm_parity.py.
@pytest.mark.parametrize("name,size,low,high", [
    ("inception_v1", 224, 6.55e6, 6.65e6),
    ("inception_v2", 224, 11.15e6, 11.25e6),
    ("inception_v4", 299, 42.6e6, 42.7e6),
])
def test_registered_sizes(name, size, low, high):
    spec = registry.get(name)
    assert spec.input_size == size
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    out, variables = jax.eval_shape(spec.build().init_with_output, jax.random.key(0), x)
    assert out["pre_logits"].shape == (2, spec.feature_dim) == (2, inception_slim.FEATURE_DIM[name])
    assert out["logits"].shape == (2, spec.num_classes)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
    assert low < count < high, count
    last = {"inception_v1": (7, 7, 1024), "inception_v2": (7, 7, 1024), "inception_v4": (8, 8, 1536)}[name]
    assert out["Mixed_5c" if name != "inception_v4" else "Mixed_7d"].shape[1:] == last
    assert "stem" in out
    # BatchNorm without scale everywhere (TF-Slim's batch_norm_scale=False).
    assert not any(p[-1].key == "scale" for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0])


def test_too_small_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 75x75"):
        jax.eval_shape(inception_slim.inception_v4().init, jax.random.key(0), jnp.zeros((1, 74, 90, 3)))
