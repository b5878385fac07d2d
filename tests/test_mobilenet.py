"""MobileNetV2 port against keras.applications (JAX backend, random weights, randomized BatchNorm).

Full numerical parity for alpha 1.0 at an odd input size (67 px: odd and even sides through the
stride-2 layers exercise both branches of Keras' asymmetric `correct_pad`) and alpha 1.4 at 64 px
(the widened channels and the 1792-wide last conv).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax.models import mobilenet as mobilenet_lib  # noqa: E402
from embjax.weights import h5  # noqa: E402
from embjax.models.convert import keras_mobilenet  # noqa: E402
# Keras test helpers shared with the ResNet tests (fast Keras init, weight randomization, error metric).
from keras_helpers import fast_keras_init, numpy_variables, randomize, rel_err  # noqa: E402

# max|flax - keras| / max|keras| in float32 with matmul precision "highest": the two differ only in
# summation order. The widest sum is 960 (1x1 project at alpha 1.0) or 1344 terms (alpha 1.4), rounding
# <= sqrt(1344) * 6e-8 ~ 2e-6 relative per layer, ~53 conv layers with BatchNorm holding the scale:
# <= ~1e-4 in the worst case. A wrong BatchNorm epsilon or padding moves outputs by 1e-3 and more.
RTOL = 1e-4

STAGE_OUTPUTS = {
    "stem": "Conv1_relu",
    "stage1": "expanded_conv_project_BN",
    "stage2": "block_2_add",
    "stage3": "block_5_add",
    "stage4": "block_9_add",
    "stage5": "block_12_add",
    "stage6": "block_15_add",
    "stage7": "block_16_project_BN",
    "last_conv": "out_relu",
    "pre_logits": -2,  # the unnamed GlobalAveragePooling2D
    "logits": "predictions",
}


def _keras_mobilenet(alpha, size, classes=5, seed=0):
    with fast_keras_init():
        model = keras.applications.MobileNetV2(
            input_shape=(size, size, 3), alpha=alpha, weights=None, classes=classes, classifier_activation=None
        )
    randomize(model, seed)
    return model


@pytest.mark.parametrize("alpha,size", [(1.0, 67), pytest.param(1.4, 64, marks=pytest.mark.slow)])
def test_mobilenet_v2_matches_keras(alpha, size):
    model = _keras_mobilenet(alpha, size)
    layers = [model.layers[n] if isinstance(n, int) else model.get_layer(n) for n in STAGE_OUTPUTS.values()]
    probe = keras.Model(model.input, [layer.output for layer in layers])
    x = np.random.default_rng(1).normal(0.0, 1.0, (2, size, size, 3)).astype("float32")
    want = [np.asarray(y) for y in probe.predict(x, verbose=0)]
    variables = keras_mobilenet.convert_mobilenet_v2(h5.layer_weights_of(model), alpha=alpha)
    module = mobilenet_lib.MobileNetV2(alpha=alpha, num_classes=5)
    got = jax.jit(module.apply)(variables, jnp.asarray(x))
    for key, ref in zip(STAGE_OUTPUTS, want):
        assert got[key].shape == ref.shape, key
        err = rel_err(got[key], ref)
        assert err < RTOL, f"{key}: relative error {err:.2e}"
    assert got["pre_logits"].shape[-1] == {1.0: 1280, 1.4: 1792}[alpha] == module.feature_dim


@pytest.fixture(scope="module")
def keras_weights_alpha1():
    """Layer weights of a Keras MobileNetV2(alpha=1.0) (shapes only matter: no randomization)."""
    with fast_keras_init():
        model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=6)
    return h5.layer_weights_of(model)


def test_renamed_layers_pair_by_position(keras_weights_alpha1):
    """A file whose layer names differ (older Keras releases) converts by position, as Keras loads it."""
    renamed = {f"layer{i}": w for i, w in enumerate(keras_weights_alpha1.values())}
    with pytest.warns(UserWarning, match="by position"):
        variables = keras_mobilenet.convert_mobilenet_v2(renamed, alpha=1.0)
    reference = keras_mobilenet.convert_mobilenet_v2(keras_weights_alpha1, alpha=1.0)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, reference))


def test_wrong_alpha_and_missing_layers_are_named(keras_weights_alpha1):
    with pytest.raises(WeightMismatchError, match="alpha 1.4") as info:
        keras_mobilenet.convert_mobilenet_v2(keras_weights_alpha1, alpha=1.4)
    assert "params/Conv1/kernel: shape (3, 3, 3, 32), expected (3, 3, 3, 48)" in info.value.problems
    broken = dict(keras_weights_alpha1)
    del broken["block_7_depthwise_BN"]
    broken["block_3_expand"] = [np.zeros((1, 1, 24, 7), np.float32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one layer short: no positional pairing may be attempted
        with pytest.raises(WeightMismatchError) as info:
            keras_mobilenet.convert_mobilenet_v2(broken, alpha=1.0)
    message = str(info.value)
    assert "block_7_depthwise_BN" in message and "block_3/expand/kernel: shape (1, 1, 24, 7)" in message
    notop = {k: v for k, v in keras_weights_alpha1.items() if k != "predictions"}
    with pytest.raises(WeightMismatchError, match="no_top"):
        keras_mobilenet.convert_mobilenet_v2(notop, alpha=1.0)


def test_make_divisible_and_padding_follow_keras():
    from keras.src.applications import imagenet_utils, mobilenet_v2

    for v in [4.2, 11.2, 16, 22.4, 33.6, 44.8, 134.4, 1792.0, 1280 * 1.4]:
        assert mobilenet_lib.make_divisible(v) == mobilenet_v2._make_divisible(v, 8)
    for size in range(5, 12):
        keras_pad = imagenet_utils.correct_pad(keras.KerasTensor((1, size, size, 3)), 3)[0]
        assert mobilenet_lib.same_pad(size, 3, 2) == keras_pad


def test_small_config_widths_cost_and_training_mode():
    module = mobilenet_lib.small_mobilenet_v2(num_classes=10)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)), jnp.float32)
    variables = numpy_variables(module, x)
    out = jax.eval_shape(module.apply, variables, x)
    assert out["pre_logits"].shape == (8, 160) and out["logits"].shape == (8, 10)
    assert [out[f"stage{i}"].shape[1:] for i in range(1, 5)] == [(14, 14, 16), (7, 7, 24), (4, 4, 32), (4, 4, 48)]
    flops = jax.jit(module.apply).lower(variables, x[:1]).cost_analysis()["flops"]
    assert flops < 10e6, flops  # the zoo's budget: <= 10 MFLOPs per image
    # Training mode normalizes with batch statistics and updates the running ones.
    _, new = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), new["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(moved))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="alpha"):
        mobilenet_lib.MobileNetV2(alpha=0.0).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        mobilenet_lib.MobileNetV2().init(jax.random.key(0), jnp.zeros((32, 32, 3)))
