"""VGG16 port against keras.applications.VGG16 (JAX backend, random weights), its converter and .h5 files,
and the full-network embedding's 12,416 features."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax import fne  # noqa: E402
from embjax.models import layers as model_layers  # noqa: E402
from embjax.models import registry, vgg as vgg_lib  # noqa: E402
from embjax.weights import h5  # noqa: E402
from embjax.models.convert import keras_vgg  # noqa: E402
from keras_helpers import fast_keras_init, randomize, rel_err  # noqa: E402

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

# max|flax - keras| / max|keras| in float32 with "highest" matmul precision: the two differ only in
# summation order. The widest sums are 3·3·512 = 4,608 terms (convolutions) and the 2·2·512 = 2,048-term
# flatten at 64 px: ≤ √4608 · 6e-8 ≈ 4e-6 relative per layer, over 16 layers ≤ ~1e-4 at worst. A wrong
# flatten order or padding moves outputs by O(1).
RTOL = 1e-4
SIZE = 64  # Keras accepts any size with weights=None; fc1 then has 2·2·512 inputs instead of 7·7·512


def _keras_vgg16(classes=7, seed=0):
    with fast_keras_init():
        model = keras.applications.VGG16(input_shape=(SIZE, SIZE, 3), weights=None, classes=classes,
                                         classifier_activation=None)
    randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def keras_model():
    return _keras_vgg16()


def test_vgg16_matches_keras_layer_by_layer(keras_model):
    names = [f"block{b}_conv{i}" for b, n, _ in vgg_lib.VGG16_BLOCKS for i in range(1, n + 1)]
    names += [f"block{b}_pool" for b in range(1, 6)] + ["fc1", "fc2", "predictions"]
    probe = keras.Model(keras_model.input, [keras_model.get_layer(n).output for n in names])
    x = np.random.default_rng(1).normal(0.0, 50.0, (2, SIZE, SIZE, 3)).astype("float32")  # caffe-scale input
    want = dict(zip(names, (np.asarray(y) for y in probe.predict(x, verbose=0))))
    variables = keras_vgg.convert_vgg16(h5.layer_weights_of(keras_model), input_size=SIZE)
    got = jax.jit(vgg_lib.VGG16(num_classes=7).apply)(variables, jnp.asarray(x))
    for name in names:
        key = "logits" if name == "predictions" else name
        assert got[key].shape == want[name].shape, name
        err = rel_err(got[key], want[name])
        assert err < RTOL, f"{name}: relative error {err:.2e}"
    # The pre-activations are what the ReLU layers clip: relu(preact) is the Keras output exactly.
    np.testing.assert_array_equal(np.maximum(got["block3_conv2_preact"], 0), got["block3_conv2"])
    assert float(jnp.min(got["fc1_preact"])) < 0  # so "pre" really differs from "post"
    np.testing.assert_array_equal(got["pre_logits"], got["fc2"])


def test_h5_file_round_trip(keras_model, tmp_path):
    # A Keras 3 weights file written by Keras itself, read by embjax's reader, converted, same outputs.
    path = tmp_path / "vgg16.weights.h5"
    keras_model.save_weights(path)
    from_file = keras_vgg.convert_vgg16(h5.read_keras_weights(path), input_size=SIZE)
    direct = keras_vgg.convert_vgg16(h5.layer_weights_of(keras_model), input_size=SIZE)
    for a, b in zip(jax.tree.leaves(from_file), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)


def test_converter_reports_problems(keras_model):
    weights = h5.layer_weights_of(keras_model)
    # At 224 px fc1 must take 7·7·512 inputs: the 64-px weights are reported by name, not loaded.
    with pytest.raises(WeightMismatchError, match="fc1"):
        keras_vgg.convert_vgg16(weights)
    broken = {k: v for k, v in weights.items() if k != "block4_conv2"}
    with pytest.raises(WeightMismatchError, match="block4_conv2"):
        keras_vgg.convert_vgg16(broken, input_size=SIZE)
    with pytest.raises(WeightMismatchError, match="_notop"):
        keras_vgg.convert_vgg16({k: v for k, v in weights.items() if k.startswith("block")}, input_size=SIZE)


def test_registry_spec_and_the_papers_12416_features():
    spec = registry.get("vgg16")
    assert spec.family == "vgg16" and spec.keras_file == keras_vgg.KERAS_FILE
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(spec.build().apply, spec.init_shapes(), x)
    assert out["pre_logits"].shape == (1, spec.feature_dim) == (1, 4096)
    named = model_layers.named_layers(spec.build(), x)
    for activation in ("post", "pre"):
        layers = fne.embedding_layers(named, "conv", activation, keys=out.keys())
        assert len(layers) == 15  # 13 convolutions + fc6 + fc7, no pools
        # 64·2 + 128·2 + 256·3 + 512·6 + 4096·2 (Garcia-Gasulla et al.'s VGG16 embedding)
        assert sum(fne.layer_widths(out, layers)) == 12_416
    assert fne.embedding_layers(named, "conv", "pre", keys=out.keys())[0] == "block1_conv1_preact"
    assert fne.embedding_layers(named)[-2:] == ("fc1", "fc2")
    with pytest.raises(ValueError, match="multiples of 32"):
        spec.build().apply(spec.init_shapes(), jnp.zeros((1, 100, 100, 3)))
