"""Reading Keras weight files written by Keras itself: legacy weights-only .h5 (the keras.applications
layout), the legacy full-model .h5, and Keras 3 .weights.h5; then converting a real MobileNetV2 from
them. Broken files must fail with errors that name the file."""
import os
import warnings

import h5py
import jax
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from embjax.weights import h5  # noqa: E402
from embjax.models.convert import keras_mobilenet  # noqa: E402
from keras_helpers import fast_keras_init, randomize  # noqa: E402  (shared Keras test helpers)

# Keras' own legacy .h5 writer converts variables with np.array(variable), which NumPy 2 flags.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    # The MobileNetV2 conversion is compared with Keras' own forward pass at exact-float32 tolerances.
    pytest.mark.highest_precision,
]


def _save_legacy(model, path):
    """A weights-only legacy .h5 exactly as keras.applications' downloads are laid out."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="module")
def small_model():
    """Every layer kind the converters read, some explicitly named and some auto-named by Keras."""
    with fast_keras_init():
        inputs = keras.Input((12, 12, 3))
        x = keras.layers.Conv2D(8, 3, name="stem_conv")(inputs)
        x = keras.layers.BatchNormalization(name="stem_bn")(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.DepthwiseConv2D(3, use_bias=False, depth_multiplier=2)(x)
        x = keras.layers.Conv2D(5, 1, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(4, name="predictions")(x)
        model = keras.Model(inputs, outputs)
    randomize(model, seed=3)
    return model


def _assert_same(got, want):
    assert list(got) == list(want)
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for a, b in zip(got[name], want[name]):
            np.testing.assert_array_equal(a, b)


def test_legacy_weights_file(small_model, tmp_path):
    path = tmp_path / "small.h5"
    _save_legacy(small_model, path)
    got = h5.read_keras_weights(path)
    _assert_same(got, h5.layer_weights_of(small_model))  # names, model order and Keras' weight order
    assert [a.shape for a in got["stem_bn"]] == [(8,)] * 4


def test_legacy_full_model_file(small_model, tmp_path):
    path = tmp_path / "model.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns that .h5 is a legacy format
        small_model.save(path)
    with h5py.File(path) as f:
        assert "model_weights" in f  # the layout this test is about
    _assert_same(h5.read_keras_weights(path), h5.layer_weights_of(small_model))


def test_keras3_weights_file(small_model, tmp_path):
    path = tmp_path / "small.weights.h5"
    small_model.save_weights(path)
    want = h5.layer_weights_of(small_model)
    got = h5.read_keras_weights(path)
    assert sorted(got) == sorted(want)  # real layer names, from the `name` attribute Keras records
    _assert_same({k: got[k] for k in want}, want)


def test_keras3_weights_file_without_layer_names(small_model, tmp_path):
    """Keras 3 releases that do not record layer names: keys are class-based auto names, in natural order."""
    path = tmp_path / "old.weights.h5"
    small_model.save_weights(path)
    with h5py.File(path, "r+") as f:
        for key in f["layers"]:
            if "vars" in f["layers"][key] and "name" in f["layers"][key]["vars"].attrs:
                del f["layers"][key]["vars"].attrs["name"]
    got = h5.read_keras_weights(path)
    assert list(got) == ["batch_normalization", "batch_normalization_1", "conv2d", "conv2d_1", "dense",
                         "depthwise_conv2d"]
    np.testing.assert_array_equal(got["dense"][0], small_model.get_layer("predictions").weights[0])


def test_natural_key_orders_numbers_by_value():
    names = ["conv2d_10", "conv2d", "conv2d_2", "batch_normalization_1"]
    assert sorted(names, key=h5.natural_key) == ["batch_normalization_1", "conv2d", "conv2d_2", "conv2d_10"]


@pytest.fixture(scope="module")
def mobilenet_files(tmp_path_factory):
    with fast_keras_init():
        model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=3)
    randomize(model, seed=5)
    folder = tmp_path_factory.mktemp("mnv2")
    legacy, keras3 = folder / "mobilenet_v2.h5", folder / "mobilenet_v2.weights.h5"
    _save_legacy(model, legacy)
    model.save_weights(keras3)
    return model, legacy, keras3


def test_real_mobilenet_v2_files_convert_like_the_model(mobilenet_files):
    model, legacy, keras3 = mobilenet_files
    want = keras_mobilenet.convert_mobilenet_v2(h5.layer_weights_of(model), alpha=1.0)
    for path in (legacy, keras3):
        got = keras_mobilenet.convert_mobilenet_v2(h5.read_keras_weights(path), alpha=1.0)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert jax.tree.all(jax.tree.map(np.array_equal, got, want)), path


def test_truncated_file_names_the_file(mobilenet_files, tmp_path):
    _, legacy, _ = mobilenet_files
    data = legacy.read_bytes()
    for fraction in (0.5, 0.95):
        cut = tmp_path / f"cut{fraction}.h5"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(h5.KerasWeightsError, match=f"cut{fraction}.h5"):
            h5.read_keras_weights(cut)


def test_corrupt_header_names_the_file_and_corrupt_data_is_not_detectable(mobilenet_files, tmp_path):
    _, legacy, _ = mobilenet_files
    data = bytearray(legacy.read_bytes())
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\0" * 8 + bytes(data[8:]))  # the HDF5 signature wiped
    with pytest.raises(h5.KerasWeightsError, match="broken.h5"):
        h5.read_keras_weights(broken)
    # Keras' weight datasets carry no checksums: bytes flipped inside array data read back as other
    # numbers. Only a hash of the whole file (keras.applications publishes some) can catch that.
    start = len(data) // 2
    data[start : start + 4096] = b"\x7f" * 4096
    flipped = tmp_path / "flipped.h5"
    flipped.write_bytes(bytes(data))
    weights, original = h5.read_keras_weights(flipped), h5.read_keras_weights(legacy)
    assert list(weights) == list(original)
    assert not all(np.array_equal(a, b) for k in original for a, b in zip(weights[k], original[k]))


def test_not_a_keras_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("these are not weights")
    with pytest.raises(h5.KerasWeightsError, match="notes.h5"):
        h5.read_keras_weights(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(h5.KerasWeightsError, match="other.h5.*neither"):
        h5.read_keras_weights(other)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        h5.read_keras_weights(tmp_path / "missing.h5")
    with pytest.raises(h5.KerasWeightsError, match="directory"):
        h5.read_keras_weights(tmp_path)
    assert not os.path.exists(tmp_path / "missing.h5")
