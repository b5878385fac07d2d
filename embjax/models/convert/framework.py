"""The one converter framework: how weights read from another framework's file become embjax variables.

Every converter under embjax.models.convert (Keras .h5 layer names, PyTorch / timm / insightface state
dicts, TF-Slim checkpoints) collects every problem it finds and raises one `WeightMismatchError` listing
them all, and checks its result leaf for leaf against the Flax module's shapes (`check_shapes`,
`shape_problems`, over `flatten_tree`). The readers in embjax.weights know file formats only.

Keras layers: the Keras converters (`keras_resnet`, `keras_mobilenet`, `keras_nasnet`) describe a model as a
list of `LayerMap(keras_name, flax_path, kind)`; `convert_layers` turns the weights into
{"params", "batch_stats"} and compares the result with the shapes the Flax module expects;
it collects every problem before raising one `WeightMismatchError`. Keras' layouts need no transposition:
Conv2D kernels are HWIO and Dense kernels (in, out) as in Flax; a DepthwiseConv2D kernel
(h, w, C, multiplier) becomes Flax's grouped (h, w, 1, C * multiplier); a SeparableConv2D fills the
`depthwise` and `pointwise` convolutions of one Flax module.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Sequence

import numpy as np


class WeightMismatchError(ValueError):
    """Weights that do not fit the Flax module; `problems` lists every missing, extra or mis-shaped one."""

    def __init__(self, what: str, problems: Sequence[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{what}: {len(self.problems)} mismatched parameter(s):\n  {shown}{more}")


# kind -> (number of Keras arrays, description)
_KINDS = {
    "conv": (2, "Conv2D [kernel, bias]"),
    "conv_nobias": (1, "Conv2D [kernel] (use_bias=False)"),
    "depthwise": (1, "DepthwiseConv2D [depthwise_kernel] (use_bias=False)"),
    "separable": (2, "SeparableConv2D [depthwise_kernel, pointwise_kernel] (use_bias=False)"),
    "bn": (4, "BatchNormalization [gamma, beta, moving_mean, moving_variance]"),
    "dense": (2, "Dense [kernel, bias]"),
}


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """One Keras layer and where its weights go in the Flax tree (path of module names)."""

    keras_name: str
    flax_path: tuple[str, ...]
    kind: str


def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def convert_layers(
    layer_weights: Mapping[str, Sequence[np.ndarray]],
    layer_map: Sequence[LayerMap],
    what: str,
    expected: Mapping | None = None,
    positional_fallback: bool = False,
) -> dict[str, Any]:
    """{"params", "batch_stats"} from Keras layer weights through an explicit name map.

    Raises one WeightMismatchError listing every Keras layer the map expects but the weights lack, every
    weight-carrying layer the map does not know, every layer with the wrong number or rank of arrays,
    and, when `expected` (a tree of shapes, e.g. `jax.eval_shape(module.init, ...)`) is given, every
    leaf whose shape differs from it (leaves of layers already reported are not repeated).

    `positional_fallback`: when some names of the map are absent but the weights hold exactly as many
    weight-carrying layers as the map, pair them by position instead (with a warning), as Keras itself
    loads a legacy .h5 file. Only sound for maps listed in the model's layer order with no two parallel
    branches (a chain such as MobileNetV2); the shape check then catches a wrong pairing of unequal layers.
    """
    if positional_fallback and any(m.keras_name not in layer_weights for m in layer_map):
        weighted = [name for name, arrays in layer_weights.items() if len(arrays) > 0]
        if len(weighted) == len(layer_map):
            renamed = [(old, m.keras_name) for old, m in zip(weighted, layer_map) if old != m.keras_name]
            warnings.warn(
                f"{what}: {len(renamed)} layer names differ from the expected ones (e.g. {renamed[:3]}); "
                "matching layers by position, as Keras does when it loads a legacy .h5 file",
                stacklevel=2,
            )
            layer_weights = {m.keras_name: layer_weights[old] for old, m in zip(weighted, layer_map)}
    problems = []
    reported = []  # Flax paths of layers already reported, so the shape check does not repeat them
    known = {m.keras_name for m in layer_map}
    for name in layer_weights:
        if name not in known and len(layer_weights[name]) > 0:
            problems.append(f"unexpected Keras layer {name!r} ({len(layer_weights[name])} arrays)")
    params: dict = {}
    stats: dict = {}
    for m in layer_map:
        count, description = _KINDS[m.kind]
        if m.keras_name not in layer_weights:
            problems.append(f"missing Keras layer {m.keras_name!r} ({description}) for {'/'.join(m.flax_path)}")
            reported.append(m.flax_path)
            continue
        arrays = [np.asarray(a, dtype=np.float32) for a in layer_weights[m.keras_name]]
        if len(arrays) != count:
            problems.append(
                f"Keras layer {m.keras_name!r} has {len(arrays)} arrays with shapes "
                f"{[a.shape for a in arrays]}; expected {description}"
            )
            reported.append(m.flax_path)
            continue
        if m.kind in ("conv", "conv_nobias", "depthwise", "separable") and arrays[0].ndim != 4:
            problems.append(f"Keras layer {m.keras_name!r}: kernel of shape {arrays[0].shape} is not 4-D")
            reported.append(m.flax_path)
            continue
        if m.kind == "bn":
            gamma, beta, mean, var = arrays
            if not (gamma.ndim == 1 and gamma.shape == beta.shape == mean.shape == var.shape):
                problems.append(
                    f"Keras layer {m.keras_name!r}: BatchNormalization arrays of shapes "
                    f"{[a.shape for a in arrays]} are not four vectors of one length"
                )
                reported.append(m.flax_path)
                continue
            _set(params, m.flax_path, {"scale": gamma, "bias": beta})
            _set(stats, m.flax_path, {"mean": mean, "var": var})
        elif m.kind == "depthwise":
            h, w, c, mult = arrays[0].shape
            # Keras output channel c*mult + k is Flax's group c, member k: a reshape keeps that order.
            _set(params, m.flax_path, {"kernel": arrays[0].reshape(h, w, 1, c * mult)})
        elif m.kind == "separable":
            # A Flax module with a grouped `depthwise` and a 1x1 `pointwise` conv (embjax.models.nasnet).
            depthwise, pointwise = arrays
            h, w, c, mult = depthwise.shape
            _set(params, m.flax_path + ("depthwise",), {"kernel": depthwise.reshape(h, w, 1, c * mult)})
            _set(params, m.flax_path + ("pointwise",), {"kernel": pointwise})
        elif m.kind == "conv_nobias":
            _set(params, m.flax_path, {"kernel": arrays[0]})
        else:  # conv, dense: (kernel, bias)
            _set(params, m.flax_path, {"kernel": arrays[0], "bias": arrays[1]})
    variables = {"params": params, "batch_stats": stats}
    if expected is not None:
        problems += shape_problems(expected, variables, skip=reported)
    if problems:
        raise WeightMismatchError(what, problems)
    return variables


def flatten_tree(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: leaf} of a nested mapping."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, prefix + (str(key),)))
        else:
            flat[prefix + (str(key),)] = value
    return flat


def shape_problems(expected: Mapping, variables: Mapping, skip: Sequence[tuple[str, ...]] = ()) -> list[str]:
    """Every missing, extra and mis-shaped leaf of `variables` against `expected` (leaves with `.shape`).

    Leaves under a Flax module path in `skip` (e.g. ("conv2_block1", "1_conv")) are ignored in both trees.
    """
    def skipped(path):  # path is (collection, module..., leaf)
        return any(path[1 : 1 + len(s)] == tuple(s) for s in skip)

    want = {p: v for p, v in flatten_tree(expected).items() if not skipped(p)}
    have = {p: v for p, v in flatten_tree(variables).items() if not skipped(p)}
    problems = []
    for path in sorted(want.keys() - have.keys()):
        problems.append(f"missing {'/'.join(path)} (expected shape {tuple(want[path].shape)})")
    for path in sorted(have.keys() - want.keys()):
        problems.append(f"unexpected {'/'.join(path)} (shape {tuple(np.shape(have[path]))})")
    for path in sorted(want.keys() & have.keys()):
        if tuple(np.shape(have[path])) != tuple(want[path].shape):
            problems.append(
                f"{'/'.join(path)}: shape {tuple(np.shape(have[path]))}, expected {tuple(want[path].shape)}"
            )
    return problems


def check_shapes(expected: Mapping, variables: Mapping, what: str) -> None:
    """Raise one WeightMismatchError naming every leaf of `variables` that does not match `expected`.

    `expected` is typically `jax.eval_shape(module.init, ...)`; leaves need only a `.shape`.
    """
    problems = shape_problems(expected, variables)
    if problems:
        raise WeightMismatchError(what, problems)


__all__ = ["WeightMismatchError", "LayerMap", "convert_layers", "flatten_tree", "shape_problems", "check_shapes"]
