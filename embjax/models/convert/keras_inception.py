"""keras.applications InceptionV3 / InceptionResNetV2 weights -> Flax variables of `embjax.models.inception`.

Input: `{layer name: [that layer's weights in Keras order]}` as `embjax.weights.h5.read_keras_weights`
returns it, or as built in memory from a Keras model. Output: `{"params": ..., "batch_stats": ...}`
for `InceptionV3` / `InceptionResNetV2` with the head size found in the `predictions` layer.

Keras names most of these layers automatically (`conv2d_17`, `batch_normalization_17`), and the numbers
depend on how many layers the session built before (Keras 3) or on Keras 2's counter (downloaded files
start at 1). So auto-named layers are matched by position: sorted by their numeric suffix (natural order,
`conv2d` < `conv2d_2` < `conv2d_10`), which is the order Keras created them in, and paired with the
port's convolutions listed below in that same creation order; every shape is then checked. Explicitly
named layers (`block35_1_conv`, `conv_7b`, `conv_7b_bn`, `predictions`) are matched by name.

Layouts need no transposition: Keras Conv2D kernels are HWIO and Dense kernels (in, out), like Flax.
Every missing, extra or mis-shaped parameter is reported at once in a `WeightMismatchError`.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models import inception
from embjax.models.convert.framework import WeightMismatchError

_AUTO_CONV = re.compile(r"^conv2d(?:_(\d+))?$")
_AUTO_BN = re.compile(r"^batch_normalization(?:_(\d+))?$")
# The classifier input is at least 75 px, so shapes are derived at that size (they do not depend on it).
_SHAPE_PROBE = 75

Path = tuple[str, ...]


# ---------------------------------------------------------------------------------------------------
# The port's conv+BN layers in the order keras.applications creates them (the explicit name map for
# auto-named layers: the i-th auto-named Conv2D / BatchNormalization goes to the i-th path).


def _inception_a(prefix: str) -> list[Path]:
    return [
        (prefix, name)
        for name in (
            "branch1x1",
            "branch5x5_1",
            "branch5x5_2",
            "branch3x3dbl_1",
            "branch3x3dbl_2",
            "branch3x3dbl_3",
            "branch_pool",
        )
    ]


def _reduction_a(prefix: str) -> list[Path]:
    return [(prefix, n) for n in ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")]


_STEM = [("stem", f"conv{i}") for i in range(1, 6)]


def inception_v3_conv_order() -> list[Path]:
    """Flax paths of InceptionV3's 94 ConvBN modules in Keras' creation order."""
    order = list(_STEM)
    for i in range(3):
        order += _inception_a(f"mixed{i}")
    order += _reduction_a("mixed3")
    for i in range(4, 8):
        order += [
            (f"mixed{i}", n)
            for n in ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"]
            + [f"branch7x7dbl_{k}" for k in range(1, 6)]
            + ["branch_pool"]
        ]
    order += [
        ("mixed8", n)
        for n in ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{k}" for k in range(1, 5)]
    ]
    for i in (9, 10):
        order += [
            (f"mixed{i}", n)
            for n in (
                "branch1x1",
                "branch3x3_1",
                "branch3x3_2a",
                "branch3x3_2b",
                "branch3x3dbl_1",
                "branch3x3dbl_2",
                "branch3x3dbl_3a",
                "branch3x3dbl_3b",
                "branch_pool",
            )
        ]
    return order


def _residual_block(prefix: str, block_type: str) -> list[Path]:
    branches = {"block35": (1, 2, 3), "block17": (1, 3), "block8": (1, 3)}[block_type]
    return [(prefix, f"branch{b}_{k}") for b, n in enumerate(branches) for k in range(n)]


def inception_resnet_v2_conv_order() -> list[Path]:
    """Flax paths of InceptionResNetV2's 203 auto-named ConvBN modules in Keras' creation order.

    `conv_7b` and the residual projections `block*_*_conv` carry names in Keras and are not listed.
    """
    order = list(_STEM) + _inception_a("mixed_5b")
    for i in range(1, inception.RESIDUAL_REPEATS["block35"] + 1):
        order += _residual_block(f"block35_{i}", "block35")
    order += _reduction_a("mixed_6a")
    for i in range(1, inception.RESIDUAL_REPEATS["block17"] + 1):
        order += _residual_block(f"block17_{i}", "block17")
    order += [("mixed_7a", n) for n in ("branch0_0", "branch0_1", "branch1_0", "branch1_1")]
    order += [("mixed_7a", n) for n in ("branch2_0", "branch2_1", "branch2_2")]
    for i in range(1, inception.RESIDUAL_REPEATS["block8"] + 1):
        order += _residual_block(f"block8_{i}", "block8")
    return order


def _inception_resnet_v2_named() -> dict[str, Callable]:
    """Explicitly named Keras layers of InceptionResNetV2 -> how their weights land in the Flax tree."""
    named = {"conv_7b": _conv_no_bias(("conv_7b",)), "conv_7b_bn": _bn(("conv_7b",))}
    for block_type, repeats in inception.RESIDUAL_REPEATS.items():
        for i in range(1, repeats + 1):
            named[f"{block_type}_{i}_conv"] = _conv_with_bias((f"{block_type}_{i}", "conv"))
    return named


# ---------------------------------------------------------------------------------------------------
# Placement of one Keras layer's weights. Each returns [(collection, flax path, array)] or raises
# _WeightCountError when the layer has the wrong number of weights.


class _WeightCountError(Exception):
    pass


def _expect(weights: Sequence[np.ndarray], n: int, what: str):
    if len(weights) != n:
        raise _WeightCountError(f"has {len(weights)} weights, expected {n} ({what})")


def _conv_no_bias(module: Path):
    def place(w):
        _expect(w, 1, "Conv2D kernel, use_bias=False")
        return [("params", module + ("conv", "kernel"), w[0])]

    return place


def _conv_with_bias(module: Path):
    def place(w):
        _expect(w, 2, "Conv2D kernel and bias")
        return [("params", module + ("kernel",), w[0]), ("params", module + ("bias",), w[1])]

    return place


def _bn(module: Path):
    def place(w):
        _expect(w, 3, "BatchNormalization(scale=False): beta, moving_mean, moving_variance")
        bn = module + ("bn",)
        return [
            ("params", bn + ("bias",), w[0]),
            ("batch_stats", bn + ("mean",), w[1]),
            ("batch_stats", bn + ("var",), w[2]),
        ]

    return place


def _dense(module: Path):
    def place(w):
        _expect(w, 2, "Dense kernel and bias")
        return [("params", module + ("kernel",), w[0]), ("params", module + ("bias",), w[1])]

    return place


# ---------------------------------------------------------------------------------------------------


def _natural_key(pattern: re.Pattern, name: str) -> int:
    suffix = pattern.match(name).group(1)
    return -1 if suffix is None else int(suffix)  # Keras 3 names the first layer without a suffix


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping[Path, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@functools.lru_cache(maxsize=8)
def _expected_shapes(model_cls, num_classes: int, in_channels: int) -> dict[tuple[str, Path], tuple]:
    """(collection, path) -> shape of the port's variables; cached, as tracing the model takes seconds."""
    probe = jax.ShapeDtypeStruct((1, _SHAPE_PROBE, _SHAPE_PROBE, in_channels), jnp.float32)
    variables = jax.eval_shape(model_cls(num_classes=num_classes).init, jax.random.key(0), probe)
    return {
        (collection, path): leaf.shape
        for collection, tree in variables.items()
        for path, leaf in _flatten(tree).items()
    }


def _fmt(collection: str, path: Path) -> str:
    return "/".join((collection,) + path)


def _convert(
    layer_weights: Mapping[str, Sequence[np.ndarray]],
    model_cls,
    conv_order: list[Path],
    named: dict[str, Callable],
    model_name: str,
) -> dict:
    if not isinstance(layer_weights, Mapping):
        problem = f"expected {{layer name: [weights]}}, got {type(layer_weights).__name__}"
        raise WeightMismatchError(
            f"{model_name} converter (read a .h5 file with embjax.weights.h5.read_keras_weights first)", [problem])
    errors: list[str] = []
    layers = {name: [np.asarray(w) for w in ws] for name, ws in layer_weights.items() if len(ws) > 0}

    named = dict(named, predictions=_dense(("predictions",)))
    convs = sorted((n for n in layers if _AUTO_CONV.match(n)), key=lambda n: _natural_key(_AUTO_CONV, n))
    bns = sorted((n for n in layers if _AUTO_BN.match(n)), key=lambda n: _natural_key(_AUTO_BN, n))
    for name in layers:
        if name not in named and not _AUTO_CONV.match(name) and not _AUTO_BN.match(name):
            errors.append(f"extra Keras layer {name!r}: not part of keras.applications {model_name}")

    # (keras layer, placement) pairs: auto-named layers by position, named ones by name.
    plan: list[tuple[str, Callable]] = []
    for kind, names, place in (("Conv2D", convs, _conv_no_bias), ("BatchNormalization", bns, _bn)):
        for i, module in enumerate(conv_order):
            if i < len(names):
                plan.append((names[i], place(module)))
            else:
                errors.append(
                    f"missing Keras layer: auto-named {kind} #{i} (natural order) for "
                    f"{'/'.join(module)}; found only {len(names)} of {len(conv_order)}"
                )
        for name in names[len(conv_order):]:
            errors.append(
                f"extra Keras layer {name!r}: {model_name} has {len(conv_order)} auto-named {kind} layers, "
                f"found {len(names)}"
            )
    for name, place in named.items():
        if name in layers:
            plan.append((name, place))
        else:
            errors.append(f"missing Keras layer {name!r} (needed by the Flax {model_name})")

    converted: dict[tuple[str, Path], np.ndarray] = {}
    origin: dict[tuple[str, Path], str] = {}
    for name, place in plan:
        try:
            placed = place(layers[name])
        except _WeightCountError as e:
            errors.append(f"Keras layer {name!r} {e}")
            continue
        for collection, path, value in placed:
            converted[(collection, path)] = value
            origin[(collection, path)] = name

    # The target tree, from the module itself at the head size the file carries.
    num_classes = 1000
    if "predictions" in layers and layers["predictions"][0].ndim == 2:
        num_classes = layers["predictions"][0].shape[1]
    in_channels = 3
    if convs and layers[convs[0]][0].ndim == 4:
        in_channels = layers[convs[0]][0].shape[2]
    expected = _expected_shapes(model_cls, num_classes, in_channels)

    for key, shape in expected.items():
        if key not in converted:
            errors.append(f"missing parameter {_fmt(*key)} {shape}")
        elif converted[key].shape != shape:
            errors.append(
                f"mis-shaped parameter {_fmt(*key)}: Keras layer {origin[key]!r} gives "
                f"{converted[key].shape}, expected {shape}"
            )
    for key in converted:
        if key not in expected:
            errors.append(f"extra parameter {_fmt(*key)} from Keras layer {origin[key]!r}")

    if errors:
        # Weights of another architecture give hundreds of lines; `problems` keeps them all.
        raise WeightMismatchError(
            f"Keras {model_name} weights do not fit embjax.models.inception.{model_cls.__name__} (auto-named "
            "layers are matched in natural order of their numeric suffix, so one missing layer shifts every "
            "later one)", errors)

    variables: dict[str, dict] = {}
    for collection in ("params", "batch_stats"):
        flat = {path: jnp.asarray(v, jnp.float32) for (c, path), v in converted.items() if c == collection}
        variables[collection] = _unflatten(flat)
    return variables


def convert_inception_v3(layer_weights: Mapping[str, Sequence[np.ndarray]]) -> dict:
    """keras.applications.InceptionV3 weights (with the `predictions` head) -> InceptionV3 variables."""
    return _convert(layer_weights, inception.InceptionV3, inception_v3_conv_order(), {}, "InceptionV3")


def convert_inception_resnet_v2(layer_weights: Mapping[str, Sequence[np.ndarray]]) -> dict:
    """keras.applications.InceptionResNetV2 weights (with `predictions`) -> InceptionResNetV2 variables."""
    return _convert(
        layer_weights,
        inception.InceptionResNetV2,
        inception_resnet_v2_conv_order(),
        _inception_resnet_v2_named(),
        "InceptionResNetV2",
    )
