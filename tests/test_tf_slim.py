"""TF-Slim checkpoints -> embjax's Flax ports, against TensorFlow's own activations.

The fixtures (tests/fixtures/tf/, written by tests/fixtures/make_tf_checkpoints.py with TensorFlow 2.21
and tf-slim 1.1.0) hold reduced TF-Slim networks with random weights, an input batch and TensorFlow's
outputs at named end points; TensorFlow itself is not needed here.

Tolerance: both sides compute in float32 with the same weights, so they differ by summation order
only. One conv output of fan-in K carries a relative rounding error of about sqrt(K) * 2^-24 (at most
K * 2^-24); the largest fan-in here is 9 * 48 = 432 (about 21 * 6e-8 = 1.2e-6 typical), and through at
most ~25 layers, with BatchNorm gains up to 1.5 / sqrt(0.5) = 2.1, that stays below 3e-5 of the end
point's largest magnitude even when added linearly. Inception-v1/v2 (depth multiplier 0.05) are deeper,
v2 34 layers on its longest path, but narrower: fan-in at most 9 * 19 = 171 (about 13 * 6e-8 = 7.8e-7
per layer), and 34 * 7.8e-7 = 2.7e-5 is still below. Measured: at most 1e-6 of it (v1/v2: 6e-7). A port that is wrong
anywhere (a padding, a stride, a swapped branch) is off by O(1) of that magnitude, 4 orders above.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax.models import inception, inception_slim, mobilenet, registry, resnet
from embjax.weights import tf_checkpoint
from embjax.models.convert import tf_slim
from embjax.models.convert.framework import WeightMismatchError

# Parity with independent references: the tolerances assume exact float32 matmuls (see conftest.py).
pytestmark = pytest.mark.highest_precision

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf")
RELATIVE_TOLERANCE = 3e-5  # of max |TensorFlow activation|; see the module docstring

# The reduced configurations of make_tf_checkpoints.py, as embjax modules.
_RESNET_SMALL = dict(stage_sizes=(2, 2, 2, 1), stage_widths=(4, 8, 8, 16))
_V3_ENDS = ["MaxPool_5a_3x3", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
            "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
_RESNET_ENDS = [("stem", "pool1")] + [(f"stage{i}", f"block{i}") for i in range(1, 5)]
_HEAD = [("pre_logits", "pre_logits"), ("logits", "logits")]
_MOBILENET_ENDS = [(k, k) for k in ("stem", "stage1", "stage2", "stage3", "last_conv")]
# SlimInception's outputs carry TF-Slim's end point names.
_V1_ENDS = ["MaxPool_3a_3x3", "Mixed_3c", "MaxPool_4a_3x3", "Mixed_4f", "MaxPool_5a_2x2", "Mixed_5c"]
_V2_ENDS = ["MaxPool_3a_3x3", "Mixed_3c", "Mixed_4a", "Mixed_4e", "Mixed_5a", "Mixed_5c"]


def _small(network):
    """(module, converter, [(our output, TF end point)]) of one fixture network."""
    if network in ("resnet_v1_152", "resnet_v2_152"):
        version = int(network[len("resnet_v")])
        module = resnet.slim_resnet(152, version, num_classes=11, **_RESNET_SMALL)
        return module, lambda a, m: tf_slim.convert_resnet(a, 152, version, module=m), _RESNET_ENDS + _HEAD
    if network == "inception_v3":
        module = inception.InceptionV3(depth_multiplier=0.05, min_depth=8, num_classes=11)
        ends = [("stem", _V3_ENDS[0])] + [(f"mixed{i}", _V3_ENDS[i + 1]) for i in range(11)]
        return module, lambda a, m: tf_slim.convert_inception_v3(a, module=m), ends + _HEAD
    if network == "mobilenet_v2":
        module = mobilenet.MobileNetV2(alpha=1.4, blocks=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2)),
                                       last_filters=64, num_classes=11)
        return module, lambda a, m: tf_slim.convert_mobilenet_v2(a, module=m), _MOBILENET_ENDS + _HEAD
    if network == "inception_resnet_v2":
        module = inception.InceptionResNetV2(depth_multiplier=0.1, min_depth=8, repeats=(2, 2, 2), num_classes=11)
        ends = [(k, k) for k in ("stem", "mixed_5b", "block35", "mixed_6a", "block17", "mixed_7a", "block8",
                                 "conv_7b")]
        return module, lambda a, m: tf_slim.convert_inception_resnet_v2(a, module=m), ends + _HEAD
    if network in ("inception_v1", "inception_v2"):
        module = inception_slim.SlimInception(network, num_classes=11, depth_multiplier=0.05, min_depth=8)
        convert = getattr(tf_slim, f"convert_{network}")
        ends = _V1_ENDS if network == "inception_v1" else _V2_ENDS
        return module, lambda a, m: convert(a, module=m), [(k, k) for k in ends] + _HEAD
    raise ValueError(network)


def _fixture(network):
    arrays = tf_checkpoint.load(os.path.join(FIXTURES, network, "model.ckpt"))
    return arrays, np.load(os.path.join(FIXTURES, network, "expected.npz"))


def _max_relative_error(ours, theirs):
    ours = np.asarray(ours)
    theirs = np.asarray(theirs).reshape(ours.shape)  # TF keeps 1x1 spatial axes on pooled outputs
    return float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))


@pytest.mark.parametrize(  # everyday: one network per converter; v2 ResNet and Inception-v1 in the whole tier
    "network", ["resnet_v1_152", pytest.param("resnet_v2_152", marks=pytest.mark.slow),
                pytest.param("inception_v1", marks=pytest.mark.slow), "inception_v2", "inception_v3",
                "inception_resnet_v2", "mobilenet_v2"]
)
def test_converted_weights_reproduce_tensorflow_layer_by_layer(network):
    module, convert, ends = _small(network)
    arrays, expected = _fixture(network)
    variables = convert(arrays, module)
    out = jax.jit(module.apply)(variables, jnp.asarray(expected["input"]))
    errors = {ours: _max_relative_error(out[ours], expected[f"end/{theirs}"]) for ours, theirs in ends}
    assert max(errors.values()) < RELATIVE_TOLERANCE, errors
    assert np.ptp(np.asarray(out["logits"])) > 0.5  # non-trivial outputs: a test that can fail


def test_keras_layout_is_not_tf_slims():
    # Negative controls: the fixtures see the layout differences the slim flag exists for.
    arrays, expected = _fixture("resnet_v2_152")
    keras_layout = resnet.slim_resnet(152, 2, num_classes=11, layout="keras", **_RESNET_SMALL)
    variables = tf_slim.convert_resnet(arrays, 152, 2, module=keras_layout)  # same variables ...
    out = keras_layout.apply(variables, jnp.asarray(expected["input"]))
    assert _max_relative_error(out["stem"], expected["end/pool1"]) > 100 * RELATIVE_TOLERANCE  # ... not pool
    arrays, _ = _fixture("resnet_v1_152")
    with pytest.raises(WeightMismatchError, match="block3/unit_1/bottleneck_v1/shortcut/weights"):
        # Keras' v1 strides, and so projects, the first unit of a stage (block3 keeps 32 channels);
        # TF-Slim strides the last unit and projects only where the width changes.
        tf_slim.convert_resnet(arrays, 152, 1, module=resnet.slim_resnet(152, 1, layout="keras", **_RESNET_SMALL))


def test_converter_names_every_missing_unexpected_and_misshaped_variable():
    module, convert, _ = _small("resnet_v1_152")
    arrays, _ = _fixture("resnet_v1_152")
    arrays = dict(arrays)
    del arrays["resnet_v1_152/block2/unit_1/bottleneck_v1/conv2/weights"]
    arrays["resnet_v1_152/block9/unit_1/bottleneck_v1/conv1/weights"] = np.zeros((1, 1, 4, 4), np.float32)
    key = "resnet_v1_152/block3/unit_2/bottleneck_v1/conv3/BatchNorm/moving_variance"
    arrays[key] = np.ones(7, np.float32)
    with pytest.raises(WeightMismatchError) as info:
        convert(arrays, module)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 3, problems
    assert "missing TF-Slim variable 'resnet_v1_152/block2/unit_1/bottleneck_v1/conv2/weights'" in problems
    assert "unexpected TF-Slim variable 'resnet_v1_152/block9/unit_1/bottleneck_v1/conv1/weights'" in problems
    assert "batch_stats/conv4_block2/3_bn/var: shape (7,), expected (32,)" in problems
    with pytest.raises(WeightMismatchError, match="no variable under the TF-Slim scope 'InceptionV3'"):
        tf_slim.convert_inception_v3(arrays)


def test_names_behind_a_module_prefix_convert_and_training_copies_are_ignored():
    module, convert, _ = _small("mobilenet_v2")
    arrays, expected = _fixture("mobilenet_v2")
    moved = {f"module/{k}": v for k, v in arrays.items()}  # a TF-Hub module's scope in front
    moved["module/MobilenetV2/Conv/weights/ExponentialMovingAverage"] = np.zeros(3, np.float32)
    moved["module/MobilenetV2/Conv/weights/RMSProp"] = np.zeros(3, np.float32)
    variables = convert(moved, module)
    reference = convert(arrays, module)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, reference)


def test_registry_has_the_tf_slim_thesis_models():
    for name, classes in (("resnet_v1_152_slim", 1000), ("resnet_v2_152_slim", 1001),
                          ("inception_v1", 1001), ("inception_v2", 1001),
                          ("inception_v3_slim", 1001), ("inception_resnet_v2_slim", 1001),
                          ("mobilenet_v2_140_slim", 1001), ("inception_v4_slim", 1001),
                          ("nasnet_large_slim", 1001), ("pnasnet_large_slim", 1001)):
        spec = registry.get(name)
        assert spec.num_classes == classes and spec.background_class == (classes == 1001)
        assert spec.weight_formats == ("tf_checkpoint", "tf_saved_model")
    spec = registry.get("resnet_v1_152_slim")
    assert spec.channel_order == "RGB" and spec.mean == (123.68, 116.78, 103.94)  # TF-Slim vgg preprocessing
    small = spec.build(stage_sizes=(1, 1, 1, 1))
    assert small.layout == "slim" and small.epsilon == 1e-5 and not small.conv_bias
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    out = jax.eval_shape(small.apply, jax.eval_shape(small.init, jax.random.key(0), x), x)
    assert out["pre_logits"].shape == (1, spec.feature_dim) and out["logits"].shape == (1, 1000)
    mnv2 = registry.get("mobilenet_v2_140_slim")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(mnv2.build().apply, mnv2.init_shapes(), x)
    assert out["pre_logits"].shape == (1, 1792) and out["logits"].shape == (1, 1001)


def test_imagenet_logits_drop_the_background_class_only_where_there_is_one():
    logits = jnp.arange(2 * 1001, dtype=jnp.float32).reshape(2, 1001)
    dropped = registry.imagenet_logits(registry.get("inception_v3_slim"), logits)
    np.testing.assert_array_equal(dropped, logits[:, 1:])  # ImageNet class i is slim's logit i + 1
    kept = jnp.ones((2, 1000))
    assert registry.imagenet_logits(registry.get("resnet_v1_152_slim"), kept) is kept
    assert registry.imagenet_logits(registry.get("inception_v3"), kept) is kept
    with pytest.raises(ValueError, match="1001"):
        registry.imagenet_logits(registry.get("inception_v3_slim"), kept)


def test_load_weights_reads_and_converts_a_checkpoint_prefix():
    # The full-size spec against the reduced fixture: read, converted, then refused by name, which
    # shows the path runs through the reader and the TF-Slim converter.
    prefix = os.path.join(FIXTURES, "resnet_v2_152", "model.ckpt")
    with pytest.raises(WeightMismatchError) as info:
        registry.load_weights("resnet_v2_152_slim", prefix)
    assert any("resnet_v2_152/block3/unit_36/bottleneck_v2" in p for p in info.value.problems)


def test_load_weights_reads_and_converts_a_saved_model_directory():
    # The SavedModel fixture holds two InceptionV3 variables under object-graph keys: renamed, found
    # (so not reported), and every other variable of the network reported missing by name.
    with pytest.raises(WeightMismatchError) as info:
        registry.load_weights("inception_v3_slim", os.path.join(FIXTURES, "saved_model"))
    problems = "\n".join(info.value.problems)
    assert "missing TF-Slim variable 'InceptionV3/Conv2d_2a_3x3/weights'" in problems
    assert "'InceptionV3/Conv2d_1a_3x3/weights'" not in problems
    assert "'InceptionV3/Conv2d_1a_3x3/BatchNorm/beta'" not in problems


@pytest.mark.parametrize(
    "name, name_map",
    [
        ("resnet_v1_152_slim", tf_slim.resnet_name_map(1, "resnet_v1_152")),
        ("resnet_v2_152_slim", tf_slim.resnet_name_map(2, "resnet_v2_152")),
        ("inception_v3_slim", tf_slim.inception_v3_name_map()),
        ("inception_resnet_v2_slim", tf_slim.inception_resnet_v2_name_map()),
        ("mobilenet_v2_140_slim", tf_slim.mobilenet_v2_name_map()),
        ("inception_v1", tf_slim.slim_inception_name_map("inception_v1")),
        ("inception_v2", tf_slim.slim_inception_name_map("inception_v2")),
        pytest.param("inception_v4_slim", tf_slim.slim_inception_name_map("inception_v4"),  # v1 and v2 use its map
                     marks=pytest.mark.slow),
        ("nasnet_large_slim", tf_slim.nasnet_large_name_map()),
        ("pnasnet_large_slim", tf_slim.pnasnet_large_name_map()),
    ],
)
def test_full_size_name_maps_cover_every_variable_once(name, name_map):
    # The fixtures are reduced networks; this checks the full-size trees (50 ResNet units, 20 block17,
    # Block8 as block8_10, expanded_conv_16): every Flax leaf has a TF-Slim name and no two share one.
    from embjax.models.convert.framework import flatten_tree

    leaves = flatten_tree(registry.get(name).init_shapes())
    slim_names = {}
    for path in leaves:
        slim_name = tf_slim.variable_name(name_map, path)
        assert slim_name is not None, path
        slim_names.setdefault(slim_name, []).append(path)
    assert len(slim_names) == len(leaves), [paths for paths in slim_names.values() if len(paths) > 1]


# ---------------------------------------------------------------------------------------------------
# Inception-v4, NASNet-A-Large and PNASNet-5-Large: TF-Slim names only. tf_slim.nets has none of them, so
# there is no TensorFlow-written fixture: these tests check that the converters' name maps cover the
# full-size networks (every Flax variable filled from exactly one TF-Slim variable, nothing left over)
# and that names spelled out by hand from TF-Slim's nets (inception_v4.py, nasnet/nasnet.py,
# nasnet/nasnet_utils.py, nasnet/pnasnet.py) are among them, with their TF-Slim shapes. Activations
# of these three are checked against timm / keras.applications, not against TensorFlow.

_NAS_SLIM = {
    "inception_v4_slim": tf_slim.slim_inception_name_map("inception_v4"),
    "nasnet_large_slim": tf_slim.nasnet_large_name_map(),
    "pnasnet_large_slim": tf_slim.pnasnet_large_name_map(),
}

# (name, TF-Slim shape) written from TF-Slim's code, not from the name maps.
_PUBLISHED_NAMES = {
    "inception_v4_slim": [
        ("InceptionV4/Conv2d_1a_3x3/weights", (3, 3, 3, 32)),
        ("InceptionV4/Mixed_3a/Branch_1/Conv2d_0a_3x3/BatchNorm/beta", (96,)),
        ("InceptionV4/Mixed_6h/Branch_1/Conv2d_0c_7x1/BatchNorm/moving_variance", (256,)),
        ("InceptionV4/Mixed_7d/Branch_2/Conv2d_0e_3x1/weights", (3, 1, 512, 256)),
        ("InceptionV4/Logits/Logits/weights", (1536, 1001)),
        ("InceptionV4/Logits/Logits/biases", (1001,)),
    ],
    "nasnet_large_slim": [
        ("conv0/weights", (3, 3, 3, 96)),
        ("conv0_bn/gamma", (96,)),
        ("cell_stem_0/1x1/weights", (1, 1, 96, 42)),
        ("cell_stem_0/comb_iter_0/left/separable_5x5_1/depthwise_weights", (5, 5, 42, 1)),
        ("cell_stem_0/comb_iter_0/right/separable_7x7_1/depthwise_weights", (7, 7, 96, 1)),
        ("cell_stem_0/comb_iter_0/right/separable_7x7_1/pointwise_weights", (1, 1, 96, 42)),
        ("cell_stem_1/path1_conv/weights", (1, 1, 96, 42)),
        ("cell_stem_1/final_path_bn/moving_mean", (84,)),
        ("cell_0/path2_conv/weights", (1, 1, 168, 84)),  # prev: cell_stem_0, 4 states of 42
        ("cell_1/prev_1x1/weights", (1, 1, 336, 168)),  # prev: cell_stem_1, same size, 4 states of 84
        ("cell_2/prev_1x1/weights", (1, 1, 1008, 168)),  # prev: cell_0, 6 states of 168
        ("reduction_cell_0/prev_bn/beta", (336,)),
        ("cell_6/path1_conv/weights", (1, 1, 1008, 168)),
        ("cell_17/comb_iter_4/left/bn_sep_3x3_2/gamma", (672,)),
        ("final_layer/FC/weights", (4032, 1001)),
        ("final_layer/FC/biases", (1001,)),
    ],
    "pnasnet_large_slim": [
        ("conv0/weights", (3, 3, 3, 96)),
        ("cell_stem_0/comb_iter_0/right/1x1/weights", (1, 1, 96, 54)),  # max pool of the 96-wide input
        ("cell_stem_0/comb_iter_0/right/bn_1/moving_variance", (54,)),
        ("cell_stem_0/comb_iter_4/right/1x1/weights", (1, 1, 54, 54)),  # the strided identity
        ("cell_stem_1/comb_iter_1/left/separable_7x7_2/pointwise_weights", (1, 1, 108, 108)),
        ("cell_4/comb_iter_3/left/bn_sep_3x3_1/beta", (432,)),
        ("cell_11/comb_iter_0/left/separable_5x5_1/depthwise_weights", (5, 5, 864, 1)),
        ("final_layer/FC/weights", (4320, 1001)),
    ],
}


def _synthetic_checkpoint(name, prefix=""):
    """{TF-Slim name: array} for the full-size spec `name`, names and TF-Slim layouts from its name map,
    each variable the constant 1, 2, 3, ... (a zero-memory broadcast view); and {Flax path: that constant}."""
    from embjax.models.convert.framework import flatten_tree

    name_map = _NAS_SLIM[name]
    arrays, constants = {}, {}
    for i, (path, leaf) in enumerate(sorted(flatten_tree(registry.get(name).init_shapes()).items()), start=1):
        shape = tuple(leaf.shape)
        if name_map(path[1:-1])[1] == "depthwise":  # Flax (k, k, 1, C) is TF-Slim's (k, k, C, 1)
            shape = shape[:2] + (shape[3], 1)
        arrays[prefix + tf_slim.variable_name(name_map, path)] = np.broadcast_to(np.float32(i), shape)
        constants[path] = i
    return arrays, constants


@pytest.mark.slow  # full-size synthetic checkpoints: the whole tier (the name maps above are everyday)
@pytest.mark.parametrize("name", sorted(_NAS_SLIM))
def test_full_size_checkpoint_names_fill_every_variable_exactly_once(name):
    from embjax.models.convert.framework import flatten_tree

    prefix = "module/" if name != "inception_v4_slim" else ""  # a TF-Hub prefix, found for unscoped nets too
    arrays, constants = _synthetic_checkpoint(name, prefix)
    for published, shape in _PUBLISHED_NAMES[name]:
        assert arrays[prefix + published].shape == shape, published
    # Training-only and auxiliary-head variables are skipped.
    arrays[prefix + "global_step"] = np.asarray(1, np.int64)
    aux = "InceptionV4/AuxLogits/Aux_logits/weights" if name == "inception_v4_slim" else "aux_7/aux_logits/FC/weights"
    arrays[prefix + aux] = np.zeros((768, 1001), np.float32)
    variables = registry.get(name).converter(arrays)
    leaves = flatten_tree(variables)
    assert set(leaves) == set(constants)
    for path, value in leaves.items():
        assert np.all(np.asarray(value) == constants[path]), path  # its own TF-Slim variable, no other's
    registry.check_variables(name, variables)


@pytest.mark.slow  # two full-size synthetic checkpoints: the whole tier
def test_nas_converter_refuses_missing_extra_and_misshaped_variables_by_name():
    arrays, _ = _synthetic_checkpoint("pnasnet_large_slim")
    del arrays["cell_3/comb_iter_2/right/separable_3x3_2/pointwise_weights"]
    arrays["cell_3/comb_iter_9/left/1x1/weights"] = np.zeros((1, 1, 216, 216), np.float32)
    arrays["cell_7/beginning_bn/gamma"] = np.ones(7, np.float32)
    with pytest.raises(WeightMismatchError) as info:
        tf_slim.convert_pnasnet_large(arrays)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 3, problems
    assert "missing TF-Slim variable 'cell_3/comb_iter_2/right/separable_3x3_2/pointwise_weights'" in problems
    assert "unexpected TF-Slim variable 'cell_3/comb_iter_9/left/1x1/weights'" in problems
    assert "params/cell_7/beginning_bn/scale: shape (7,), expected (432,)" in problems
    # A NASNet-A checkpoint is no PNASNet-5 one: refused by name, not converted.
    nasnet_arrays, _ = _synthetic_checkpoint("nasnet_large_slim")
    with pytest.raises(WeightMismatchError) as info:
        tf_slim.convert_pnasnet_large(nasnet_arrays)
    assert any(p.startswith("unexpected TF-Slim variable 'reduction_cell_0/") for p in info.value.problems)
    with pytest.raises(WeightMismatchError, match="no variable named 'conv0/weights'"):
        tf_slim.convert_nasnet_large({"InceptionV4/Conv2d_1a_3x3/weights": np.zeros((3, 3, 3, 32), np.float32)})
