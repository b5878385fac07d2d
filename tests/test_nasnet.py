"""NASNet-A against keras.applications' NASNet, cell by cell, with random weights; the Keras converter's reports.

keras.applications.nasnet.NASNet takes NASNetLarge's architecture with its sizes as arguments, so the
reference here is Keras' own NASNet-A with 2 normal cells per stack (6 in NASNet-A-Large), 192
penultimate filters (4032) and a 12-filter stem (96), built offline with `weights=None` in seconds: every
cell type, both reductions, the factorized and the projected `prev`, and the head are the Large model's.
Its input is 45×58 px, so sizes go odd and even (22×28, 11×14, 6×7, 3×4, 2×2) and every asymmetric
"SAME" padding and both spatial axes are exercised.

Every weight is redrawn (BatchNorm γ, β and moving statistics included). The port with
`pool_padding="keras"` must reproduce every cell output and the logits; with TF-Slim's padding (the
registered model, the network the weights were trained as) it must not, which shows that test can see
the difference that flag makes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax.models import nasnet  # noqa: E402
from embjax.weights import h5  # noqa: E402
from embjax.models.convert import keras_nasnet  # noqa: E402
from keras_helpers import fast_keras_init, randomize  # noqa: E402

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

# Tolerance: max |flax - keras| <= RTOL * max |keras| per output. float32 rounds at u = 6e-8; an output is a
# sum of at most ~150 products (1x1 convs over 4 x 48 channels, 7x7 depthwise = 49 taps), whose rounding
# error grows like sqrt(n)·u ≈ 1e-6 when the sides sum in different orders, and ~40 stacked layers (cells
# of 2 separable convs deep, 11 cells) add errors roughly in quadrature: sqrt(40)·1e-6 ≈ 6e-6 < 1e-4.
# Measured: 3e-7. Zero-padded reduction pools (the one Keras/TF-Slim difference) move outputs by ~0.3.
RTOL = 1e-4
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
HEIGHT, WIDTH, NUM_BLOCKS = 45, 58, 2


def _compile(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(_FAST_COMPILE if jax.default_backend() == "cpu" else None)


def _keras_cell_outputs():
    """Flax output name -> Keras layer whose output it is (a cell's concatenation)."""
    names = {"stem": "stem_bn1"}
    for block_id, cell, reduction in keras_nasnet.cell_names(NUM_BLOCKS):
        names[cell] = f"{'reduction' if reduction else 'normal'}_concat_{block_id}"
    return names


@pytest.fixture(scope="module")
def keras_nasnet_case():
    from keras.src.applications.nasnet import NASNet

    with fast_keras_init():
        model = NASNet(input_shape=(HEIGHT, WIDTH, 3), penultimate_filters=192, num_blocks=NUM_BLOCKS,
                       stem_block_filters=12, weights=None, classes=9, classifier_activation=None,
                       default_size=HEIGHT)
    randomize(model, 3)
    x = np.random.default_rng(4).uniform(-1.0, 1.0, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
    names = dict(_keras_cell_outputs(), logits="predictions")
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names.values()])
    trainable = [v.value for v in probe.trainable_variables]
    non_trainable = [v.value for v in probe.non_trainable_variables]
    run = _compile(lambda t, n, x: probe.stateless_call(t, n, x)[0], trainable, non_trainable, x)
    ref = {k: np.asarray(y, np.float64) for k, y in zip(names, run(trainable, non_trainable, x))}
    return {"model": model, "x": x, "weights": h5.layer_weights_of(model), "ref": ref}


def test_nasnet_matches_keras_cell_by_cell(keras_nasnet_case):
    case = keras_nasnet_case
    config = keras_nasnet.keras_nasnet_config(case["weights"])
    assert config == dict(num_classes=9, num_cells=3 * NUM_BLOCKS, num_conv_filters=8, stem_filters=12)
    variables = keras_nasnet.convert_nasnet(case["weights"], pool_padding="keras")
    module = nasnet.NASNet(**config, pool_padding="keras")
    out = _compile(module.apply, variables, case["x"])(variables, case["x"])
    worst = (0.0, None)
    for key, ref in case["ref"].items():
        got = np.asarray(out[key], np.float64)
        assert got.shape == ref.shape, key
        scale = np.abs(ref).max()
        assert scale > 0.1, f"{key}: reference output is degenerate (max {scale})"
        err = np.abs(got - ref).max()
        assert err <= RTOL * scale, f"{key}: max error {err:.3g} > {RTOL} x {scale:.3g}"
        worst = max(worst, (err / scale, key))
    print(f"NASNet vs Keras: worst relative error {worst[0]:.2e} ({worst[1]})")  # pytest -s shows it
    assert out["pre_logits"].shape == (2, 192) and out["pre_logits"].dtype == jnp.float32
    # Keras counts BatchNorm moving statistics among its parameters.
    ours = sum(int(np.size(a)) for a in jax.tree.leaves(variables))
    assert ours == case["model"].count_params()


@pytest.mark.slow  # a second compilation of the network: the whole tier
def test_tf_slim_pooling_is_another_network_at_the_borders(keras_nasnet_case):
    # TF-Slim's "SAME" pooling in the reduction cells (the default) is a different network at the borders.
    case = keras_nasnet_case
    config = keras_nasnet.keras_nasnet_config(case["weights"])
    variables = keras_nasnet.convert_nasnet(case["weights"], pool_padding="keras")
    tf_module = nasnet.NASNet(**config)
    tf_out = _compile(tf_module.apply, variables, case["x"])(variables, case["x"])
    first_reduction = case["ref"]["cell_stem_0"]
    diff = np.abs(np.asarray(tf_out["cell_stem_0"]) - first_reduction).max() / np.abs(first_reduction).max()
    assert diff > 100 * RTOL


def test_nasnet_large_sizes():
    """NASNet-A-Large: 4032-d pre-logits at 331 px (11×11 last map), and Keras' published parameter count
    of NASNetLarge, 88,949,818, which includes the BatchNorm moving statistics."""
    module = nasnet.nasnet_large()
    x = jax.ShapeDtypeStruct((1, 331, 331, 3), jnp.float32)
    out, variables = jax.eval_shape(module.init_with_output, jax.random.key(0), x)
    assert out["pre_logits"].shape == (1, 4032) and out["logits"].shape == (1, 1000)
    assert out["cell_17"].shape == (1, 11, 11, 4032) and out["cell_stem_1"].shape == (1, 42, 42, 336)
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables)) == 88_949_818


def test_converter_reports_missing_extra_and_misshaped_layers(keras_nasnet_case):
    weights = dict(keras_nasnet_case["weights"])
    del weights["separable_conv_2_bn_normal_left5_3"]
    weights["dense_extra"] = [np.zeros((3, 3), np.float32)]
    dw, pw = weights["separable_conv_1_reduction_right1_stem_1"]
    weights["separable_conv_1_reduction_right1_stem_1"] = [dw, pw[..., :-1]]
    with pytest.raises(WeightMismatchError) as info:
        keras_nasnet.convert_nasnet(weights)
    message = str(info.value)
    assert "missing Keras layer 'separable_conv_2_bn_normal_left5_3'" in message
    assert "cell_2/comb_iter_4_left/stack/bn_sep_2" in message  # Keras block 3: the first of stack 2
    assert "unexpected Keras layer 'dense_extra'" in message
    assert "params/cell_stem_0/comb_iter_0_right/stack/separable_1/pointwise/kernel" in message
    assert len(info.value.problems) == 3


def test_converter_refuses_a_headless_file(keras_nasnet_case):
    weights = dict(keras_nasnet_case["weights"])
    del weights["predictions"]
    with pytest.raises(WeightMismatchError, match="no-top"):
        keras_nasnet.convert_nasnet(weights)


def test_too_small_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 32x32"):
        jax.eval_shape(nasnet.nasnet_large().init, jax.random.key(0), jnp.zeros((1, 31, 64, 3)))


@pytest.mark.slow  # the same round trip as tests/test_inception.py's, on a larger network
def test_converter_reads_keras_weights_files(keras_nasnet_case, tmp_path):
    """Round trip through Keras' own .weights.h5 writer and embjax's reader (SeparableConv2D included)."""
    path = tmp_path / "nasnet.weights.h5"
    keras_nasnet_case["model"].save_weights(path)
    from_file = keras_nasnet.convert_nasnet(h5.read_keras_weights(path))
    in_memory = keras_nasnet.convert_nasnet(keras_nasnet_case["weights"])
    jax.tree.map(np.testing.assert_array_equal, from_file, in_memory)


@pytest.mark.slow
def test_nasnet_large_matches_keras_nasnetlarge():
    """The full keras.applications NASNetLarge (6 cells per stack, 4032 filters) at 64×78 px, logits and
    the last cell of each stack (Keras' NASNetLarge only takes 331 px with its head, so the generic
    NASNet builder is called with NASNetLarge's arguments)."""
    from keras.src.applications.nasnet import NASNet

    with fast_keras_init():
        model = NASNet(input_shape=(64, 78, 3), penultimate_filters=4032, num_blocks=6, stem_block_filters=96,
                       weights=None, classes=1000, classifier_activation=None, default_size=64)
    randomize(model, 5)
    x = np.random.default_rng(6).uniform(-1.0, 1.0, (1, 64, 78, 3)).astype(np.float32)
    names = {"cell_5": "normal_concat_5", "cell_11": "normal_concat_12", "cell_17": "normal_concat_18",
             "logits": "predictions"}
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names.values()])
    ref = dict(zip(names, (np.asarray(y, np.float64) for y in probe.predict(x, verbose=0))))
    weights = h5.layer_weights_of(model)
    assert keras_nasnet.keras_nasnet_config(weights) == dict(num_classes=1000, num_cells=18, num_conv_filters=168,
                                                              stem_filters=96)
    variables = keras_nasnet.convert_nasnet(weights, pool_padding="keras")
    module = nasnet.nasnet_large(pool_padding="keras")
    out = _compile(module.apply, variables, x)(variables, x)
    worst = 0.0
    for key, want in ref.items():
        scale = np.abs(want).max()
        err = np.abs(np.asarray(out[key], np.float64) - want).max()
        assert err <= RTOL * scale, f"{key}: max error {err:.3g} > {RTOL} x {scale:.3g}"
        worst = max(worst, err / scale)
    print(f"NASNetLarge vs Keras: worst relative error {worst:.2e}")  # pytest -s shows it
