"""Inception ports against keras.applications, the Keras converters' error reports, the small Inception.

Parity: both named architectures are built in full by keras.applications (JAX backend, `weights=None`)
and compared end to end: InceptionV3 at 83×99 px (non-square, so every "same" padding and both spatial
axes are exercised) and InceptionResNetV2 at 75×75 (Keras' minimum; the cheapest input for the deepest
model). Every weight is redrawn, BatchNorm beta / moving mean / moving variance and the residual
projections' biases included, so BatchNorm and the converter's name map are really tested; the Flax port
must reproduce the Keras `pre_logits` (the `avg_pool` output), logits and every named block output.

Speed: Keras' own weight initialisation compiles one XLA program per kernel shape (a minute on 2 cores),
so it is replaced by zeros while building (the test overwrites every weight anyway), and both forwards
are compiled with XLA's backend optimisations off (a fraction of the compile time; results are still
float32 arithmetic, see the tolerance).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

keras = pytest.importorskip("keras")

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax.models import inception  # noqa: E402
from embjax.models import layers as model_layers  # noqa: E402
from embjax.models.convert import keras_inception  # noqa: E402
from keras_helpers import fast_keras_init  # noqa: E402

# Tolerance of the parity checks: max |flax - keras| <= RTOL * max |keras| per output. float32 rounds
# to u = 2**-24 ≈ 6e-8; an output sums up to ~4000 products (3·3·448 in mixed9/10, 1·1·2080 in the IRv2
# projections), whose rounding error grows like sqrt(n)·u ≈ 4e-6 when the two sides sum in different
# orders, and errors of ~100 stacked layers add roughly in quadrature: sqrt(100)·4e-6 ≈ 4e-5 < 1e-4.
# Measured: 6e-7 (v3), 9e-7 (IRv2). A BatchNorm epsilon of 1e-5 instead of Keras' 1e-3 moves the v3
# outputs by 4e-3 relative and average pooling that counts the padding by 0.3-0.8, far outside it.
RTOL = 1e-4

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    """jit + compile; on CPU without LLVM's expensive passes (compile time dominates these tests)."""
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(_FAST_COMPILE if jax.default_backend() == "cpu" else None)


def _build_keras(constructor, **kwargs):
    with fast_keras_init():
        return constructor(weights=None, classifier_activation=None, **kwargs)


def _randomize(model, rng):
    """He-scaled kernels and BatchNorm statistics far from the identity, so every constant matters."""
    for layer in model.layers:
        new = []
        for w in layer.weights:
            kind, shape = w.path.split("/")[-1], tuple(w.shape)
            if kind == "kernel":
                value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
            elif kind in ("beta", "moving_mean"):
                value = rng.normal(0.0, 0.2, shape)
            elif kind == "bias":
                value = rng.normal(0.0, 0.1, shape)
            elif kind == "moving_variance":
                value = rng.uniform(0.5, 2.0, shape)
            else:
                raise AssertionError(f"unexpected Keras weight {w.path}")
            new.append(value.astype(np.float32))
        if new:
            layer.set_weights(new)


def _layer_weights(model):
    return {layer.name: [np.asarray(w) for w in layer.weights] for layer in model.layers if layer.weights}


def _keras_reference(model, outputs: dict[str, str], x):
    """Keras' outputs of the named layers (and `avg_pool`, `predictions`) on x, as float64 NumPy."""
    names = dict(outputs, pre_logits="avg_pool", logits="predictions")
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names.values()])
    trainable = [v.value for v in probe.trainable_variables]
    non_trainable = [v.value for v in probe.non_trainable_variables]
    run = _compile(lambda t, n, x: probe.stateless_call(t, n, x)[0], trainable, non_trainable, x)
    return {key: np.asarray(y, np.float64) for key, y in zip(names, run(trainable, non_trainable, x))}


def _case(constructor, height, width, outputs, seed):
    model = _build_keras(constructor, input_shape=(height, width, 3), classes=17)
    rng = np.random.default_rng(seed)
    _randomize(model, rng)
    x = rng.uniform(-1.0, 1.0, (2, height, width, 3)).astype(np.float32)
    # Keras' forward pass is compiled only for the parity tests (whole tier); the converter tests of the
    # everyday tier need the weights alone.
    return {"model": model, "x": x, "weights": _layer_weights(model),
            "reference": lambda: _keras_reference(model, outputs, x)}


@pytest.fixture(scope="module")
def keras_v3():
    return _case(keras.applications.InceptionV3, 83, 99, {f"mixed{i}": f"mixed{i}" for i in range(11)}, 0)


@pytest.fixture(scope="module")
def keras_irv2():
    outputs = {
        "mixed_5b": "mixed_5b",
        "block35": "block35_10_ac",
        "mixed_6a": "mixed_6a",
        "block17": "block17_20_ac",
        "mixed_7a": "mixed_7a",
        "conv_7b": "conv_7b_ac",
    }
    return _case(keras.applications.InceptionResNetV2, 75, 75, outputs, 1)


def _assert_parity(module, variables, case):
    out = _compile(module.apply, variables, case["x"])(variables, case["x"])
    for key, ref in case["reference"]().items():
        got = np.asarray(out[key], np.float64)
        assert got.shape == ref.shape, key
        scale = np.abs(ref).max()
        assert scale > 0.1, f"{key}: reference output is degenerate (max {scale})"
        err = np.abs(got - ref).max()
        assert err <= RTOL * scale, f"{key}: max error {err:.3g} > {RTOL} x {scale:.3g}"
    return out


@pytest.mark.slow  # full-size parity: the whole tier
def test_inception_v3_matches_keras(keras_v3):
    variables = keras_inception.convert_inception_v3(keras_v3["weights"])
    out = _assert_parity(inception.InceptionV3(num_classes=17), variables, keras_v3)
    assert out["pre_logits"].shape == (2, 2048) and out["logits"].shape == (2, 17)
    assert out["stem"].shape == (2, 8, 10, 192)  # 83x99 -> 41x49 -> 39x47 -> 19x23 -> 17x21 -> 8x10


@pytest.mark.slow  # full-size parity: the whole tier
def test_inception_resnet_v2_matches_keras(keras_irv2):
    variables = keras_inception.convert_inception_resnet_v2(keras_irv2["weights"])
    out = _assert_parity(inception.InceptionResNetV2(num_classes=17), variables, keras_irv2)
    assert out["pre_logits"].shape == (2, 1536) and out["block8"].shape == (2, 1, 1, 2080)
    # The last block8 has no ReLU: its output must keep negative values, which Keras' conv_7b consumes.
    assert (np.asarray(out["block8"]) < 0).any()


def test_converter_order_does_not_depend_on_absolute_layer_numbers(keras_v3):
    """Keras 2 files count from 1, a Keras 3 session continues its counter across models.

    Renumbering from 9 puts conv2d_9 after conv2d_10 lexicographically: only a natural sort keeps order.
    The dict is also reversed, as a reader might list layers in any order.
    """
    weights = keras_v3["weights"]
    reference = keras_inception.convert_inception_v3(weights)

    def renumber(name, offset):
        m = re.fullmatch(r"(conv2d|batch_normalization)(?:_(\d+))?", name)
        if not m:
            return name
        return f"{m.group(1)}_{(int(m.group(2)) if m.group(2) else 0) + offset}"

    for offset in (1, 9, 1000):
        renamed = {renumber(k, offset): v for k, v in reversed(list(weights.items()))}
        assert renamed.keys() != weights.keys()
        converted = keras_inception.convert_inception_v3(renamed)
        jax.tree.map(np.testing.assert_array_equal, converted, reference)


def test_converter_reports_every_missing_extra_and_misshaped_parameter(keras_v3):
    weights = dict(keras_v3["weights"])
    bns = sorted((k for k in weights if k.startswith("batch_normalization")), key=lambda k: int("0" + k[20:]))
    convs = sorted((k for k in weights if k.startswith("conv2d")), key=lambda k: int("0" + k[7:]))
    del weights[bns[-1]]  # the last one, so no later layer shifts
    weights["dense_extra"] = [np.zeros((3, 3), np.float32)]
    weights[convs[5]] = [np.zeros((1, 1, 192, 65), np.float32)]  # mixed0/branch1x1 has 64 filters
    weights[convs[6]] = weights[convs[6]] + [np.zeros(48, np.float32)]  # a bias the port does not have
    with pytest.raises(WeightMismatchError) as info:
        keras_inception.convert_inception_v3(weights)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert len(info.value.problems) >= 4
    assert "auto-named BatchNormalization #93" in message
    assert "missing parameter batch_stats/mixed10/branch_pool/bn/mean" in message
    assert "extra Keras layer 'dense_extra'" in message
    assert "mis-shaped parameter params/mixed0/branch1x1/conv/kernel" in message and "(1, 1, 192, 65)" in message
    assert f"Keras layer {convs[6]!r} has 2 weights, expected 1" in message


@pytest.mark.slow  # builds Keras' full-size Inception-ResNet-v2 (the v3 converter's errors stay everyday)
def test_converter_rejects_a_batchnorm_with_scale_and_a_missing_head(keras_irv2):
    weights = dict(keras_irv2["weights"])
    gamma = np.ones_like(weights["conv_7b_bn"][0])
    weights["conv_7b_bn"] = [gamma] + weights["conv_7b_bn"]
    del weights["predictions"]
    with pytest.raises(WeightMismatchError) as info:
        keras_inception.convert_inception_resnet_v2(weights)
    message = str(info.value)
    assert "'conv_7b_bn' has 4 weights, expected 3" in message
    assert "missing Keras layer 'predictions'" in message
    assert "missing parameter params/predictions/kernel" in message


@pytest.mark.slow  # the same full-size Keras model as above
def test_converter_refuses_other_weights_and_non_dicts(keras_irv2):
    """Inception-ResNet-v2 weights offered as Inception-v3: hundreds of problems, all kept, 60 shown."""
    with pytest.raises(WeightMismatchError) as info:
        keras_inception.convert_inception_v3(keras_irv2["weights"])
    assert len(info.value.problems) > 100
    assert any(p.startswith("extra Keras layer 'block35_1_conv'") for p in info.value.problems)
    assert "more" in str(info.value).splitlines()[-1]
    with pytest.raises(WeightMismatchError, match="read_keras_weights"):
        keras_inception.convert_inception_v3("inception_v3_weights.h5")


def test_converter_reads_keras_weights_files(keras_v3, tmp_path):
    """Round trip through Keras' own .weights.h5 writer and embjax's reader."""
    h5 = pytest.importorskip("embjax.weights.h5")
    path = tmp_path / "v3.weights.h5"
    keras_v3["model"].save_weights(path)
    from_file = keras_inception.convert_inception_v3(h5.read_keras_weights(path))
    in_memory = keras_inception.convert_inception_v3(keras_v3["weights"])
    jax.tree.map(np.testing.assert_array_equal, from_file, in_memory)


def test_converter_reads_legacy_keras2_files(keras_v3, tmp_path):
    """The layout of the downloadable ImageNet files: Keras 2 names counted from 1, `layer_names` /
    `weight_names` attributes, weightless layers listed too."""
    h5 = pytest.importorskip("embjax.weights.h5")
    h5py = pytest.importorskip("h5py")
    suffix = {"beta": 0, "moving_mean": 1, "moving_variance": 2}

    def keras2_name(name):
        m = re.fullmatch(r"(conv2d|batch_normalization)(?:_(\d+))?", name)
        return f"{m.group(1)}_{int(m.group(2) or 0) + 1}" if m else name

    path = tmp_path / "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
    with h5py.File(path, "w") as f:
        names = ["input_1"]
        for name, weights in keras_v3["weights"].items():
            name = keras2_name(name)
            names += [name, f"activation_for_{name}"]
            group = f.create_group(name)
            if name.startswith("batch_normalization"):
                kinds = sorted(suffix, key=suffix.get)
            else:
                kinds = ["kernel", "bias"][: len(weights)]
            weight_names = [f"{name}/{k}:0" for k in kinds]
            for weight_name, value in zip(weight_names, weights):
                group.create_dataset(weight_name, data=value)
            group.attrs["weight_names"] = [n.encode() for n in weight_names]
        for empty in ["input_1"] + [n for n in names if n.startswith("activation_for_")]:
            f.create_group(empty).attrs["weight_names"] = []
        f.attrs["layer_names"] = [n.encode() for n in names]
    from_file = keras_inception.convert_inception_v3(h5.read_keras_weights(path))
    in_memory = keras_inception.convert_inception_v3(keras_v3["weights"])
    jax.tree.map(np.testing.assert_array_equal, from_file, in_memory)


@pytest.mark.parametrize("model", [inception.InceptionV3(), inception.InceptionResNetV2()])
def test_too_small_inputs_are_refused(model):
    with pytest.raises(ValueError, match="at least 75x75"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 74, 90, 3)))


@pytest.fixture(scope="module")
def small_variables():
    model = inception.small_inception(num_classes=10)
    x = jnp.zeros((1, 28, 28, 1))
    return _compile(model.init, jax.random.key(0), x)(jax.random.key(0), x)


def test_small_inception_shapes_and_cost(small_variables):
    model = inception.small_inception(num_classes=10)
    x = jnp.zeros((3, 28, 28, 1))
    out = _compile(model.apply, small_variables, x)(small_variables, x)
    expected = {
        "stem": (3, 14, 14, 24),
        "mixed0": (3, 14, 14, 64),
        "mixed1": (3, 7, 7, 128),
        "mixed2": (3, 7, 7, 128),
        "pre_logits": (3, 128),
        "logits": (3, 10),
    }
    # Besides the blocks, every ConvBN's output is a named layer (embjax.models.layers): 17 convolutions.
    convs = {layer.name: layer.shape for layer in model_layers.named_layers(model, x) if "conv" in layer.kinds}
    assert len(convs) == 17 and all(n.startswith(("stem_conv", "mixed")) for n in convs)
    assert {k: v.shape for k, v in out.items()} == {**expected, **convs}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(small_variables))
    cost = jax.jit(model.apply).lower(small_variables, x[:1]).cost_analysis()
    assert 2e6 < cost["flops"] <= 10e6  # the zoo's budget per image; 9.3 MFLOPs when written


@pytest.mark.slow  # a training step's compile (~7 CPU s); the everyday tier trains a zoo model in tests/test_zoo.py
def test_small_inception_trains(small_variables):
    """Loss falls on a fixed random batch with optax (train=True, batch statistics updated)."""
    model = inception.small_inception(num_classes=10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16))
    params, batch_stats = small_variables["params"], small_variables["batch_stats"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean()
        return loss, updates["batch_stats"]

    def step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    step = _compile(step, params, batch_stats, opt_state)
    losses = []
    for _ in range(8):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    # Random labels start near ln 10 ≈ 2.3; 8 Adam steps memorise much of 16 samples (0.4 when written).
    assert losses[-1] < 0.7 * losses[0], losses
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), batch_stats, small_variables["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow  # a second compilation of the network (tests/test_resnet.py keeps bfloat16 everyday)
def test_small_inception_bfloat16_tracks_float32(small_variables):
    """bfloat16 computation with float32 parameters stays close to the float32 forward.

    bfloat16 keeps 8 significant bits (u = 2**-9 ≈ 2e-3); each of the ~8 stacked layers rounds its inputs
    and outputs, so errors of order sqrt(2·8)·2e-3 ≈ 8e-3 of the output scale are expected; 3e-2 leaves
    a margin while a wrong layer would be off by O(1).
    """
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 28, 28, 1)), jnp.float32)
    f32, bf16 = inception.small_inception(), inception.small_inception(dtype=jnp.bfloat16)
    ref = _compile(f32.apply, small_variables, x)(small_variables, x)
    out = _compile(bf16.apply, small_variables, x)(small_variables, x)
    assert out["logits"].dtype == jnp.bfloat16 and out["mixed2"].dtype == jnp.bfloat16
    for key in ("mixed2", "pre_logits", "logits"):
        got, want = np.asarray(out[key], np.float64), np.asarray(ref[key], np.float64)
        assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max(), key
