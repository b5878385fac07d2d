"""ResNet v1/v2 port against keras.applications (JAX backend, random weights, randomized BatchNorm).

Full numerical parity: ResNet50 and ResNet50V2 (stem, every stage, pre_logits, logits). ResNet101/152 and
their V2 variants share every block with the 50-layer ones and differ only in block counts, so for them
the Keras models are built and only the converter's name map and every shape are checked (no forward
pass). ResNet18/34 have no Keras counterpart: shape and behaviour tests only.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

keras = pytest.importorskip("keras")

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax.models import resnet as resnet_lib  # noqa: E402
from embjax.weights import h5  # noqa: E402
from embjax.models.convert import keras_resnet  # noqa: E402
from keras_helpers import fast_keras_init, keras_outputs, numpy_variables, randomize, rel_err  # noqa: E402

SIZE = 64  # smallest size at which stage 4 is still 2x2 after the 32x downsampling
# Relative tolerance, max|flax - keras| / max|keras|. Both sides compute in float32 with matmul precision
# "highest" and differ only in summation order. One output sums <= 4608 products (3x3x512): rounding
# ~ sqrt(4608) * 6e-8 ~ 4e-6 relative per layer in the worst case, and BatchNorm keeps the scale so the
# errors of ~50 layers add: <= ~2e-4 worst case, ~1e-6 typical (random-walk); measured 1.6e-6. 1e-4 sits
# between what rounding can produce and what any real mistake (a wrong epsilon: ~1e-3 and up) gives.
RTOL = 1e-4


def _parity(keras_fn, depth, version, keras_names, seed):
    with fast_keras_init():
        model = keras_fn(weights=None, input_shape=(SIZE, SIZE, 3), classes=7, classifier_activation=None)
    randomize(model, seed)
    x = np.random.default_rng(seed + 1).normal(0.0, 1.0, (2, SIZE, SIZE, 3)).astype("float32")
    want = keras_outputs(model, list(keras_names.values()), x)
    variables = keras_resnet.convert_resnet(h5.layer_weights_of(model), depth=depth, version=version)
    module = resnet_lib.resnet(depth, version, num_classes=7)
    got = module.apply(variables, jnp.asarray(x))
    for (ours, theirs), ref in zip(keras_names.items(), want):
        assert got[ours].shape == ref.shape, ours
        err = rel_err(got[ours], ref)
        assert err < RTOL, f"{ours} ({theirs}): relative error {err:.2e}"


@pytest.mark.slow  # full-size parity: the whole tier
def test_resnet50_v1_matches_keras():
    names = {
        "stem": "pool1_pool",
        "stage1": "conv2_block3_out",
        "stage2": "conv3_block4_out",
        "stage3": "conv4_block6_out",
        "stage4": "conv5_block3_out",
        "pre_logits": "avg_pool",
        "logits": "predictions",
    }
    _parity(keras.applications.ResNet50, 50, 1, names, seed=0)


@pytest.mark.slow  # full-size parity: the whole tier
def test_resnet50_v2_matches_keras():
    names = {
        "stem": "pool1_pool",
        "stage1": "conv2_block3_out",
        "stage2": "conv3_block4_out",
        "stage3": "conv4_block6_out",
        "stage4": "conv5_block3_out",
        "pre_logits": "avg_pool",
        "logits": "predictions",
    }
    _parity(keras.applications.ResNet50V2, 50, 2, names, seed=10)


@pytest.mark.parametrize(
    "keras_fn,depth,version",
    [
        ("ResNet101", 101, 1),
        pytest.param("ResNet152", 152, 1, marks=pytest.mark.slow),  # 101's code path, deeper: whole tier
        ("ResNet101V2", 101, 2),
        pytest.param("ResNet152V2", 152, 2, marks=pytest.mark.slow),
    ],
)
def test_deep_resnets_convert_with_every_shape(keras_fn, depth, version):
    """Name map and every parameter shape of the deeper Keras ResNets (no forward pass: see docstring)."""
    with fast_keras_init():
        model = getattr(keras.applications, keras_fn)(weights=None, input_shape=(32, 32, 3))
    layer_weights = h5.layer_weights_of(model)
    variables = keras_resnet.convert_resnet(layer_weights, depth=depth, version=version)
    # Every Keras array went somewhere: counts agree, and the head kept its 1000 classes.
    n_keras = sum(len(ws) for ws in layer_weights.values())
    assert len(jax.tree.leaves(variables)) == n_keras
    assert variables["params"]["predictions"]["kernel"].shape == (2048, 1000)


def _tiny_keras_like_weights():
    """ResNet50 layer weights built from the Flax module itself (no Keras), for error-path tests."""
    module = resnet_lib.resnet(50, 1, num_classes=3)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    weights = {}
    for m in keras_resnet.resnet_layer_map(50, 1):
        p = shapes["params"]
        for k in m.flax_path:
            p = p[k]
        if m.kind == "bn":
            c = p["scale"].shape
            weights[m.keras_name] = [np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)]
        else:
            weights[m.keras_name] = [np.zeros(p["kernel"].shape), np.zeros(p["bias"].shape)]
    return weights


def test_converter_reports_every_mismatch():
    weights = _tiny_keras_like_weights()
    keras_resnet.convert_resnet(weights, depth=50, version=1)  # the intact tree converts
    del weights["conv3_block2_1_bn"]
    weights["conv4_block1_2_conv"][0] = np.zeros((3, 3, 256, 99))
    weights["unrelated_dense"] = [np.zeros((4, 4))]
    with pytest.raises(WeightMismatchError) as info:
        keras_resnet.convert_resnet(weights, depth=50, version=1)
    message = str(info.value)
    assert "conv3_block2_1_bn" in message and "unrelated_dense" in message
    assert "conv4_block1/2_conv/kernel: shape (3, 3, 256, 99)" in message
    assert len(info.value.problems) == 3


def test_converter_names_a_notop_file():
    weights = _tiny_keras_like_weights()
    del weights["predictions"]
    with pytest.raises(WeightMismatchError, match="resnet50_weights_tf_dim_ordering_tf_kernels.h5"):
        keras_resnet.convert_resnet(weights, depth=50, version=1)


def test_converter_rejects_depths_keras_does_not_ship():
    with pytest.raises(ValueError, match="depth=34"):
        keras_resnet.resnet_layer_map(34, 1)


@pytest.mark.parametrize("depth,version,dim", [(18, 1, 512), (34, 1, 512), (18, 2, 512), (50, 1, 2048)])
def test_standard_depths_shapes_and_odd_input(depth, version, dim):
    module = resnet_lib.resnet(depth, version, num_classes=5)
    x = jnp.zeros((2, 45, 37, 3))  # odd, non-square: every padding and stride rule must cope
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(module.apply, shapes, x)
    assert out["pre_logits"].shape == (2, dim)
    assert out["logits"].shape == (2, 5)
    assert out["stem"].shape == (2, 12, 10, 64)  # 45 -> 23 (7x7/2, pad 3) -> 12 (3x3/2 max-pool, pad 1)
    # v1 strides the first block of stages 2-4, v2 the last block of stages 1-3.
    spatial = [(12, 10), (6, 5), (3, 3), (2, 2)] if version == 1 else [(6, 5), (3, 3), (2, 2), (2, 2)]
    assert [out[f"stage{i}"].shape[1:3] for i in range(1, 5)] == spatial


def test_resnet18_parameter_count_matches_the_paper():
    # torchvision's bias-free ResNet-18 has 11,689,512 parameters (He et al. report 11.7M); ours with
    # conv_bias=False and the torchvision stride placement is the same network.
    module = resnet_lib.resnet(18, 1, conv_bias=False, stride_in_1x1=False)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"])) == 11_689_512


def test_width_multiplier_scales_channels():
    module = resnet_lib.resnet(50, 1, width=0.5, num_classes=4)
    out = jax.eval_shape(
        module.apply, jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))),
        jnp.zeros((1, 64, 64, 3)),
    )
    assert out["stem"].shape[-1] == 32 and out["pre_logits"].shape == (1, 1024)


def test_bfloat16_compute_tracks_float32():
    module32 = resnet_lib.small_resnet_v2(stage_sizes=(1, 1, 1))
    module16 = resnet_lib.small_resnet_v2(stage_sizes=(1, 1, 1), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 28, 28, 1)), jnp.float32)
    variables = numpy_variables(module32, x)
    out32 = jax.jit(module32.apply)(variables, x)
    out16 = jax.jit(module16.apply)(variables, x)
    assert out16["stage3"].dtype == jnp.bfloat16
    assert out16["pre_logits"].dtype == jnp.float32  # pooled in float32 by design
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3); over the ~10 conv/BN layers the
    # rounding errors random-walk to ~sqrt(10) * 3.9e-3 ~ 1.2e-2 relative; 5e-2 leaves room without
    # hiding a wrong layer (which would be O(1)).
    assert rel_err(out16["pre_logits"], out32["pre_logits"]) < 5e-2


def test_bad_config_errors():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="version"):
        resnet_lib.ResNet(version=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="same length"):
        resnet_lib.ResNet(stage_sizes=(1, 1)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="NHWC"):
        resnet_lib.ResNet().init(jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="depth"):
        resnet_lib.resnet(20)


@pytest.mark.parametrize("factory,dim", [(resnet_lib.small_resnet_v1, 64), (resnet_lib.small_resnet_v2, 96)])
def test_small_configs_widths_and_cost(factory, dim):
    """28x28x1 zoo configs: distinct pre_logits widths and within the zoo's compute budget."""
    module = factory(num_classes=10)
    x = jnp.zeros((1, 28, 28, 1))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(module.apply, variables, x)
    assert out["pre_logits"].shape == (1, dim) and out["logits"].shape == (1, 10)
    flops = jax.jit(module.apply).lower(variables, x).cost_analysis()["flops"]
    assert flops < 10e6, flops  # the zoo's budget: <= 10 MFLOPs per image


@pytest.mark.slow  # a training step's compile (~10 CPU s); the everyday tier trains the zoo ResNet-v1 (tests/test_zoo.py)
def test_small_config_trains():
    """A few optax steps on a fixed batch: every parameter gets a gradient, the running statistics move
    and the loss falls (v2: the one with pre-activation and strided identity shortcuts). One jit compile
    of a training step costs ~10-20 s on the shared CPU, so v1 is not trained here (the zoo trains both)."""
    module = resnet_lib.small_resnet_v2(num_classes=10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32)
    y = jnp.arange(16) % 10
    variables = numpy_variables(module, x)

    tx = optax.adam(3e-3)
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt):
        def loss_fn(p):
            o, new = module.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(o["logits"], y).mean(), new
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), new["batch_stats"], opt, loss, grads

    losses = []
    for i in range(12):
        params, new_stats, opt, loss, grads = step(params, stats, opt)
        if i == 0:  # every parameter takes part in the loss, and training moves the running statistics
            assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
            assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(stats)))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
