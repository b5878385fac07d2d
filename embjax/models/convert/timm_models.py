"""timm state dicts (`inception_v4`, `pnasnet5large`) -> Flax variables of `embjax.models.inception_slim`
and `embjax.models.nasnet`.

Input: {name: array} as `embjax.weights.torch_pth.load_state_dict` (a .pth/.pt/.bin file) or
`safetensors_io.load_state_dict` (the .safetensors files timm publishes) return it. Output:
{"params", "batch_stats"} for the module with the head size found in `last_linear`.

The map is explicit and runs from the Flax side: every variable the module asks for (its shapes from
`jax.eval_shape`, nothing computed) is looked up under its timm name, transposed (convolutions OIHW ->
HWIO, depthwise (C, 1, k, k) -> (k, k, 1, C), linear (out, in) -> (in, out)) and shape-checked; every
missing, mis-shaped or unused tensor is reported at once in a `WeightMismatchError`
(`num_batches_tracked` counters are ignored).

BatchNorm scale: TF-Slim's Inception-v4 has none (`batch_norm_scale=False`); timm's port keeps a
PyTorch BatchNorm weight γ (ones in the weights timm converted from TF-Slim). γ > 0 folds exactly into the
variance, since γ (x − μ) / √(σ² + ε) = (x − μ) / √((σ² + ε) / γ² ), i.e. σ'² = (σ² + ε) / γ² − ε; γ = 1
leaves σ² untouched. A γ ≤ 0 cannot be folded and is refused by name. NASNet/PNASNet BatchNorms have a
scale in both, and map one to one.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models import inception_slim, nasnet
from embjax.models.convert.framework import WeightMismatchError, flatten_tree

_IGNORED_SUFFIXES = (".num_batches_tracked",)
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _kernel(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:  # (out, in / groups, kh, kw) -> (kh, kw, in / groups, out)
        return np.transpose(w, (2, 3, 1, 0))
    if w.ndim == 2:  # nn.Linear (out, in) -> Dense (in, out)
        return w.T
    return w


def _num_classes(state_dict: Mapping, what: str) -> int:
    head = state_dict.get("last_linear.weight")
    if head is None or np.ndim(head) != 2:
        raise WeightMismatchError(what, ["missing the classifier 'last_linear.weight' (out, in); a headless "
                                         "state dict cannot be converted"])
    return int(np.shape(head)[0])


def _convert(state_dict: Mapping, module, probe_size: int, torch_module: Callable[[tuple], str],
             bn_epsilon: float, what: str) -> dict:
    """Variables for `module` from `state_dict`; `torch_module` maps a Flax module path to timm's prefix.

    Shapes come from the module at `probe_size` px: large enough that every stride-2 cell really halves
    its input, so a NAS cell's `prev` is reduced exactly where timm reduces it (PNASNet: 96 px).
    """
    if not isinstance(state_dict, Mapping):
        raise WeightMismatchError(what, [f"expected a {{name: array}} state dict, got {type(state_dict).__name__}; "
                                         "read the file with embjax.weights.torch_pth.load_state_dict first"])
    sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    probe = jax.ShapeDtypeStruct((1, probe_size, probe_size, 3), jnp.float32)
    expected = jax.eval_shape(module.init, jax.random.key(0), probe)
    flat = flatten_tree(expected)  # (collection, *modules, leaf) -> ShapeDtypeStruct
    problems: list[str] = []
    used: set[str] = set()
    values: dict[tuple, np.ndarray] = {}

    def take(key: str, path: tuple) -> np.ndarray | None:
        if key not in sd:
            problems.append(f"missing timm tensor {key!r} for {'/'.join(path)}")
            return None
        used.add(key)
        return np.asarray(sd[key], np.float32)

    # BatchNorm modules without a Flax scale: fold timm's γ into the variance.
    fold = {path[1:-1] for path in flat if path[0] == "batch_stats" and path[-1] == "var"}
    fold = {m for m in fold if ("params", *m, "scale") not in flat}

    for path, leaf in flat.items():
        collection, modules, name = path[0], path[1:-1], path[-1]
        prefix = torch_module(modules)
        if name in _BN_LEAVES:
            value = take(f"{prefix}.{_BN_LEAVES[name]}", path)
            if value is not None and name == "var" and modules in fold:
                gamma = take(f"{prefix}.weight", path)
                if gamma is not None and gamma.shape == value.shape:
                    if not np.all(gamma > 0):
                        problems.append(
                            f"timm tensor {prefix + '.weight'!r} has BatchNorm scales <= 0 "
                            f"({int(np.sum(gamma <= 0))} of {gamma.size}); {'/'.join(modules)} has no scale "
                            "(TF-Slim's batch_norm_scale=False) and only positive ones fold into the variance"
                        )
                    else:
                        var64 = (value.astype(np.float64) + bn_epsilon) / np.square(gamma.astype(np.float64))
                        value = np.where(gamma == 1.0, value, (var64 - bn_epsilon).astype(np.float32))
        elif name == "kernel":
            value = take(f"{prefix}.weight", path)
            value = None if value is None else _kernel(value)
        else:
            problems.append(f"no timm name for Flax variable {'/'.join(path)}")
            continue
        if value is None:
            continue
        if tuple(value.shape) != tuple(leaf.shape):
            problems.append(f"{'/'.join(path)}: timm tensor under {prefix!r} gives shape {value.shape}, "
                            f"expected {tuple(leaf.shape)}")
            continue
        values[path] = value
    for key in sorted(sd.keys() - used):
        problems.append(f"unexpected timm tensor {key!r} {tuple(np.shape(sd[key]))}")
    if problems:
        raise WeightMismatchError(what, problems)
    variables: dict = {}
    for path, value in values.items():
        node = variables
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return variables


# ---------------------------------------------------------------------------------------------------
# Inception-v4: timm's `features.<i>` follow the end points in order; inside a block, `branch<b>` is a
# lone convolution and `branch<b>.<j>` the j-th layer (pools counted) of a sequence. Two stem blocks
# and the C blocks name their layers differently (below).

_V4_SPECIAL = {
    "Mixed_3a": {("Branch_1", "Conv2d_0a_3x3"): "conv"},
    "Mixed_5a": {("Branch_0", "Conv2d_1a_3x3"): "conv"},
}
_V4_C = {
    ("Branch_0", "Conv2d_0a_1x1"): "branch0",
    ("Branch_1", "Conv2d_0a_1x1"): "branch1_0",
    ("Branch_1", "Conv2d_0b_1x3"): "branch1_1a",
    ("Branch_1", "Conv2d_0c_3x1"): "branch1_1b",
    ("Branch_2", "Conv2d_0a_1x1"): "branch2_0",
    ("Branch_2", "Conv2d_0b_3x1"): "branch2_1",
    ("Branch_2", "Conv2d_0c_1x3"): "branch2_2",
    ("Branch_2", "Conv2d_0d_1x3"): "branch2_3a",
    ("Branch_2", "Conv2d_0e_3x1"): "branch2_3b",
    ("Branch_3", "Conv2d_0b_1x1"): "branch3.1",
}


def inception_v4_name_map() -> dict[tuple[str, ...], str]:
    """Flax ConvBN module path (`Mixed_6b`, `Branch_2`, `Conv2d_0c_1x7`) -> timm module prefix."""
    table: dict[tuple[str, ...], str] = {}
    for i, (name, spec) in enumerate(inception_slim.INCEPTION_V4):
        if isinstance(spec[0], str):
            table[(name,)] = f"features.{i}"
            continue
        if name in _V4_SPECIAL or name.startswith("Mixed_7") and name != "Mixed_7a":
            special = _V4_SPECIAL.get(name, _V4_C)
            table.update({(name, *k): f"features.{i}.{v}" for k, v in special.items()})
            continue
        for b, branch in enumerate(spec):
            for j, layer in enumerate(branch):
                if layer[0] == "conv":
                    suffix = f"branch{b}" if len(branch) == 1 else f"branch{b}.{j}"
                    table[(name, f"Branch_{b}", layer[1])] = f"features.{i}.{suffix}"
    table[("logits",)] = "last_linear"
    return table


def convert_timm_inception_v4(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Flax variables for `inception_slim.inception_v4(num_classes=<from last_linear>)` from timm's
    `inception_v4` state dict (BatchNorm γ folded, see the module docstring)."""
    num_classes = _num_classes(state_dict, "timm inception_v4 state dict")
    return convert_timm(state_dict, inception_slim.inception_v4(num_classes=num_classes))


# ---------------------------------------------------------------------------------------------------
# PNASNet-5: the Flax cells carry timm's cell names; inside a cell, module names translate one by one.

_PNASNET_RENAMES = {
    "stem_conv": "conv_0.conv",
    "stem_bn": "conv_0.bn",
    "beginning_1x1": "conv_1x1.conv",
    "beginning_bn": "conv_1x1.bn",
    "prev_1x1": "conv_prev_1x1.conv",
    "prev_bn": "conv_prev_1x1.bn",
    "prev_reduction": "conv_prev_1x1",
    "path1_conv": "path_1.conv",
    "path2_conv": "path_2.conv",
    "stack": None,  # timm's BranchSeparables holds the separable layers directly
    "depthwise": "depthwise_conv2d",
    "pointwise": "pointwise_conv2d",
    "logits": "last_linear",
}


def pnasnet_torch_name(modules: tuple[str, ...]) -> str:
    """Flax module path of `nasnet.PNASNet` -> timm `pnasnet5large` module prefix."""
    parts = [_PNASNET_RENAMES.get(m, m) for m in modules]
    return ".".join(p for p in parts if p is not None)


def convert_timm_pnasnet(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Flax variables for `nasnet.pnasnet_large(num_classes=<from last_linear>)` from timm's `pnasnet5large`."""
    num_classes = _num_classes(state_dict, "timm pnasnet5large state dict")
    return convert_timm(state_dict, nasnet.pnasnet_large(num_classes=num_classes))


def convert_timm(state_dict: Mapping[str, np.ndarray], module) -> dict:
    """Variables for a given `PNASNet` or Inception-v4 module of any size (e.g. a reduced one in a test)."""
    if isinstance(module, nasnet.PNASNet):
        return _convert(state_dict, module, 96, pnasnet_torch_name, nasnet.BN_EPSILON, "timm PNASNet state dict")
    if isinstance(module, inception_slim.SlimInception) and module.architecture == "inception_v4":
        table = inception_v4_name_map()

        def torch_module(modules: tuple) -> str:
            if modules[-1] in ("conv", "bn"):  # ConvBN's convolution / BatchNorm; timm's ConvNormAct likewise
                return f"{table.get(modules[:-1], '/'.join(modules[:-1]))}.{modules[-1]}"
            return table.get(modules, "/".join(modules))

        return _convert(state_dict, module, 299, torch_module, inception_slim.BN_EPSILON,
                        "timm inception_v4 state dict")
    raise TypeError(f"no timm name map for {type(module).__name__}; timm converters exist for PNASNet and "
                    "Inception-v4")


__all__ = ["convert_timm", "convert_timm_inception_v4", "convert_timm_pnasnet", "inception_v4_name_map",
           "pnasnet_torch_name"]
