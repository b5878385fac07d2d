"""TF-Slim checkpoint variables -> Flax variables of the embjax ports (the thesis' TensorFlow weights).

Input: {variable name: array} as `embjax.weights.tf_checkpoint.load` returns it from a TF-Slim
`model.ckpt` or a TF-Hub SavedModel. Output: {"params", "batch_stats"} for

* `convert_resnet(arrays, depth, version)`: TF-Slim `resnet_v1_{depth}` / `resnet_v2_{depth}` ->
  `embjax.models.resnet.ResNet(layout="slim")` (stride on the last unit's 3x3 conv, identity shortcuts
  where the width is kept, TF "SAME" stem pool; BatchNorm epsilon 1e-5; v1 convs without biases);
* `convert_inception_v3(arrays)`: `InceptionV3/...` -> `embjax.models.inception.InceptionV3`;
* `convert_inception_resnet_v2(arrays)`: `InceptionResnetV2/...` -> `InceptionResNetV2`;
* `convert_mobilenet_v2(arrays, alpha)`: `MobilenetV2/...` -> `embjax.models.mobilenet.MobileNetV2`;
* `convert_inception_v1(arrays)`, `convert_inception_v2(arrays)`, `convert_inception_v4(arrays)`:
  `InceptionV1/...`, `InceptionV2/...`, `InceptionV4/...` -> `embjax.models.inception_slim.SlimInception`,
  whose module paths are TF-Slim's scopes already;
* `convert_nasnet_large(arrays)`, `convert_pnasnet_large(arrays)`: TF-Slim's `nets/nasnet` names
  (`cell_stem_0/...`, `cell_5/comb_iter_0/left/separable_5x5_1/...`, `final_layer/FC`; these networks have
  no scope of their own) -> `embjax.models.nasnet.NASNet` / `PNASNet`.

The map is explicit and driven by the Flax module: every module path of the port's variable tree has one
TF-Slim scope (`name map` functions below), and each leaf one variable in it: conv `weights` (and
`biases`) -> `kernel` (`bias`); BatchNorm `gamma`/`beta` -> params `scale`/`bias`,
`moving_mean`/`moving_variance` -> batch_stats `mean`/`var`; the classifier, a 1x1 conv `weights`
(1, 1, C, K) in TF-Slim, -> Dense `kernel` (C, K); depthwise `depthwise_weights` (h, w, C, M) ->
(h, w, 1, C * M) (channel c * M + m, as Flax's grouped convolution orders them); separable convolutions'
`pointwise_weights` -> the pointwise conv's `kernel`. All problems are collected (missing variables, unexpected ones under the network's
scope, mis-shaped ones through `embjax.models.convert.framework.shape_problems`, the project's one shape check) and
raised together as one `WeightMismatchError`.

Names are found wherever the network's scope starts (a TF-Hub module may put `module/` in front); for the
unscoped NASNet / PNASNet, wherever their stem convolution `conv0/weights` is. Variables outside the
scope (`global_step`), the auxiliary heads (`AuxLogits`, NASNet's `aux_<n>/aux_logits`) and training-only copies
(`ExponentialMovingAverage`, optimizer slots such as `Momentum`, `RMSProp`, `Adam`) are ignored.

Heads: the classes come from the checkpoint's logits layer. TF-Slim's zoo heads have 1001 classes,
class 0 being "background" (ResNet-v1's, converted from Caffe, have 1000); the registry records which
(`ModelSpec.background_class`) and `registry.imagenet_logits` drops the background logit.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models import inception as inception_lib
from embjax.models import inception_slim as inception_slim_lib
from embjax.models import mobilenet as mobilenet_lib
from embjax.models import nasnet as nasnet_lib
from embjax.models import resnet as resnet_lib
from embjax.models.convert.framework import WeightMismatchError, flatten_tree, shape_problems

__all__ = [
    "convert_resnet",
    "convert_inception_v3",
    "convert_inception_resnet_v2",
    "convert_mobilenet_v2",
    "convert_inception_v1",
    "convert_inception_v2",
    "convert_inception_v4",
    "convert_nasnet_large",
    "convert_pnasnet_large",
    "convert_slim",
    "resnet_name_map",
    "inception_v3_name_map",
    "inception_resnet_v2_name_map",
    "mobilenet_v2_name_map",
    "slim_inception_name_map",
    "nasnet_name_map",
    "nasnet_large_name_map",
    "pnasnet_large_name_map",
    "logits_classes",
    "variable_name",
]

# Module kinds and, per (collection, leaf), the TF-Slim variable in the module's scope.
_LEAVES = {
    "conv": {("params", "kernel"): "weights", ("params", "bias"): "biases"},
    "bn": {
        ("params", "scale"): "gamma",
        ("params", "bias"): "beta",
        ("batch_stats", "mean"): "moving_mean",
        ("batch_stats", "var"): "moving_variance",
    },
    "dense": {("params", "kernel"): "weights", ("params", "bias"): "biases"},
    "depthwise": {("params", "kernel"): "depthwise_weights"},
    "pointwise": {("params", "kernel"): "pointwise_weights", ("params", "bias"): "biases"},
}
_IGNORED_PARTS = ("AuxLogits", "aux_logits", "global_step", "ExponentialMovingAverage", "Momentum", "RMSProp", "RMSProp_1", "Adam",
                  "Adam_1")

Path = tuple[str, ...]
NameMap = Callable[[Path], "tuple[str, str] | None"]  # Flax module path -> (TF-Slim scope, kind)


def _strip_to_scope(arrays: Mapping[str, np.ndarray], scope: str, anchor: str | None = None
                    ) -> dict[str, np.ndarray]:
    """{name from `scope/` on: array} for the variables under `scope`, wherever it starts. With no scope
    (""), the names after whatever prefix the variable named `anchor` has."""
    if not scope:
        prefixes = [name[: -len(anchor)] for name in arrays
                    if name.endswith(anchor) and (name == anchor or name[-len(anchor) - 1] == "/")]
        if len(prefixes) != 1:
            return {}
        return {name[len(prefixes[0]):]: array for name, array in arrays.items() if name.startswith(prefixes[0])}
    out = {}
    for name, array in arrays.items():
        at = name.find(scope + "/")
        if at == 0 or (at > 0 and name[at - 1] == "/"):
            out[name[at:]] = array
    return out


def _ignored(name: str) -> bool:
    return any(part in _IGNORED_PARTS for part in name.split("/"))


def logits_classes(arrays: Mapping[str, np.ndarray], logits_scope: str) -> int | None:
    """The class count of the logits layer `<logits_scope>/weights` (last axis), wherever it sits."""
    for name, array in arrays.items():
        if name.endswith(logits_scope + "/weights") and not _ignored(name):
            return int(np.shape(array)[-1])
    return None


def variable_name(name_map: NameMap, path: Path) -> str | None:
    """The TF-Slim variable name of the Flax leaf at `path` ((collection, *module path, leaf), as
    `flatten_tree` gives it), or None where the map knows none."""
    mapped = name_map(path[1:-1])
    if mapped is None:
        return None
    scope, kind = mapped
    slim_leaf = _LEAVES[kind].get((path[0], path[-1]))
    return None if slim_leaf is None else f"{scope}/{slim_leaf}"


def convert_slim(
    arrays: Mapping[str, np.ndarray], network_scope: str, name_map: NameMap, expected: Mapping, what: str,
    anchor: str | None = None,
) -> dict:
    """{"params", "batch_stats"} shaped like `expected` (a tree of leaves with `.shape`, e.g.
    `jax.eval_shape(module.init, ...)`), each leaf taken from the TF-Slim variable `name_map` names.
    An unscoped network (`network_scope` "") names `anchor`, a variable every checkpoint of it has.

    Raises one WeightMismatchError listing every problem (see the module docstring).
    """
    if not isinstance(arrays, Mapping):
        raise WeightMismatchError(what, [f"expected {{variable name: array}}, got {type(arrays).__name__}; "
                                         "read the checkpoint with embjax.weights.tf_checkpoint.load"])
    found = _strip_to_scope(arrays, network_scope, anchor)
    if not found:
        sample = ", ".join(list(arrays)[:5])
        where = f"under the TF-Slim scope {network_scope!r}" if network_scope else f"named {anchor!r} (exactly once)"
        raise WeightMismatchError(
            what, [f"no variable {where} (the checkpoint's first names: {sample or 'none'}): a checkpoint of "
                   "another network?"])
    problems: list[str] = []
    used: set[str] = set()
    variables: dict = {"params": {}, "batch_stats": {}}
    for path, leaf in flatten_tree(expected).items():
        collection, module, name = path[0], path[1:-1], path[-1]
        mapped = name_map(module)
        if mapped is None:
            problems.append(f"{'/'.join(path)}: no TF-Slim name known for this Flax module")
            continue
        scope, kind = mapped
        slim_leaf = _LEAVES[kind].get((collection, name))
        if slim_leaf is None:
            problems.append(f"{'/'.join(path)}: a {kind} module has no TF-Slim counterpart for {name!r}")
            continue
        slim_name = f"{scope}/{slim_leaf}"
        if slim_name not in found:
            problems.append(f"missing TF-Slim variable {slim_name!r} (shape {tuple(leaf.shape)}) for "
                            f"{'/'.join(path)}")
            continue
        used.add(slim_name)
        value = np.asarray(found[slim_name])
        if kind == "dense" and name == "kernel" and value.ndim == 4 and value.shape[:2] == (1, 1):
            value = value.reshape(value.shape[2:])  # the 1x1 logits conv is a dense layer
        elif kind == "depthwise" and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1], 1, value.shape[2] * value.shape[3])
        if not np.issubdtype(value.dtype, np.floating):
            problems.append(f"TF-Slim variable {slim_name!r} has dtype {value.dtype}, not floating point")
            continue
        node = variables[collection]
        for key in module:
            node = node.setdefault(key, {})
        node[name] = value.astype(np.float32, copy=False)
    for name in sorted(set(found) - used):
        if not _ignored(name):
            problems.append(f"unexpected TF-Slim variable {name!r} (shape {tuple(np.shape(found[name]))}): "
                            "the Flax port has no place for it")
    problems += [p for p in shape_problems(expected, variables) if not p.startswith("missing ")]
    if problems:
        raise WeightMismatchError(what, problems)
    return variables


def _expected(module, size: int) -> dict:
    probe = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), probe)


# ---------------------------------------------------------------------------------------------------
# ResNet v1 / v2


def resnet_name_map(version: int, scope: str) -> NameMap:
    """Flax path of `ResNet(version, layout="slim")` -> (TF-Slim scope, kind)."""
    unit_parts = {"0_conv": ("shortcut", "conv"), "1_conv": ("conv1", "conv"), "2_conv": ("conv2", "conv"),
                  "3_conv": ("conv3", "conv"), "0_bn": ("shortcut/BatchNorm", "bn"),
                  "1_bn": ("conv1/BatchNorm", "bn"), "2_bn": ("conv2/BatchNorm", "bn"),
                  "3_bn": ("conv3/BatchNorm", "bn"), "preact_bn": ("preact", "bn")}
    top = {("conv1_conv",): (f"{scope}/conv1", "conv"), ("conv1_bn",): (f"{scope}/conv1/BatchNorm", "bn"),
           ("post_bn",): (f"{scope}/postnorm", "bn"), ("predictions",): (f"{scope}/logits", "dense")}

    def name(path: Path):
        if path in top:
            return top[path]
        if len(path) == 2 and path[1] in unit_parts and path[0].startswith("conv") and "_block" in path[0]:
            stage, unit = path[0][len("conv"):].split("_block")
            part, kind = unit_parts[path[1]]
            return f"{scope}/block{int(stage) - 1}/unit_{unit}/bottleneck_v{version}/{part}", kind
        return None

    return name


def convert_resnet(arrays: Mapping[str, np.ndarray], depth: int = 152, version: int = 1, module=None) -> dict:
    """Flax variables for `embjax.models.resnet.slim_resnet(depth, version)` (or the given small `module`, a
    `ResNet(layout="slim")`) from a TF-Slim resnet_v{version}_{depth} checkpoint."""
    scope = f"resnet_v{version}_{depth}"
    what = f"TF-Slim {scope} weights"
    classes = logits_classes(arrays, f"{scope}/logits")
    if module is None:
        module = resnet_lib.slim_resnet(depth, version, num_classes=classes or 1001)
    elif classes is not None:
        module = module.clone(num_classes=classes)
    return convert_slim(arrays, scope, resnet_name_map(version, scope), _expected(module, 64), what)


# ---------------------------------------------------------------------------------------------------
# Inception-v3

_V3_STEM = {"conv1": "Conv2d_1a_3x3", "conv2": "Conv2d_2a_3x3", "conv3": "Conv2d_2b_3x3",
            "conv4": "Conv2d_3b_1x1", "conv5": "Conv2d_4a_3x3"}
_V3_BLOCKS = {f"mixed{i}": name for i, name in enumerate(
    ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
     "Mixed_7a", "Mixed_7b", "Mixed_7c"])}
_INCEPTION_A = {"branch1x1": "Branch_0/Conv2d_0a_1x1", "branch5x5_1": "Branch_1/Conv2d_0a_1x1",
                "branch5x5_2": "Branch_1/Conv2d_0b_5x5", "branch3x3dbl_1": "Branch_2/Conv2d_0a_1x1",
                "branch3x3dbl_2": "Branch_2/Conv2d_0b_3x3", "branch3x3dbl_3": "Branch_2/Conv2d_0c_3x3",
                "branch_pool": "Branch_3/Conv2d_0b_1x1"}
# TF-Slim's Mixed_5c names its 5x5 branch differently from its two siblings (as the released weights do).
_INCEPTION_A_5C = dict(_INCEPTION_A, branch5x5_1="Branch_1/Conv2d_0b_1x1", branch5x5_2="Branch_1/Conv_1_0c_5x5")
_REDUCTION_A = {"branch3x3": "Branch_0/Conv2d_1a_1x1", "branch3x3dbl_1": "Branch_1/Conv2d_0a_1x1",
                "branch3x3dbl_2": "Branch_1/Conv2d_0b_3x3", "branch3x3dbl_3": "Branch_1/Conv2d_1a_1x1"}
_INCEPTION_C = {"branch1x1": "Branch_0/Conv2d_0a_1x1", "branch7x7_1": "Branch_1/Conv2d_0a_1x1",
                "branch7x7_2": "Branch_1/Conv2d_0b_1x7", "branch7x7_3": "Branch_1/Conv2d_0c_7x1",
                "branch7x7dbl_1": "Branch_2/Conv2d_0a_1x1", "branch7x7dbl_2": "Branch_2/Conv2d_0b_7x1",
                "branch7x7dbl_3": "Branch_2/Conv2d_0c_1x7", "branch7x7dbl_4": "Branch_2/Conv2d_0d_7x1",
                "branch7x7dbl_5": "Branch_2/Conv2d_0e_1x7", "branch_pool": "Branch_3/Conv2d_0b_1x1"}
_REDUCTION_B = {"branch3x3_1": "Branch_0/Conv2d_0a_1x1", "branch3x3_2": "Branch_0/Conv2d_1a_3x3",
                "branch7x7x3_1": "Branch_1/Conv2d_0a_1x1", "branch7x7x3_2": "Branch_1/Conv2d_0b_1x7",
                "branch7x7x3_3": "Branch_1/Conv2d_0c_7x1", "branch7x7x3_4": "Branch_1/Conv2d_1a_3x3"}
_INCEPTION_E = {"branch1x1": "Branch_0/Conv2d_0a_1x1", "branch3x3_1": "Branch_1/Conv2d_0a_1x1",
                "branch3x3_2a": "Branch_1/Conv2d_0b_1x3", "branch3x3_2b": "Branch_1/Conv2d_0b_3x1",
                "branch3x3dbl_1": "Branch_2/Conv2d_0a_1x1", "branch3x3dbl_2": "Branch_2/Conv2d_0b_3x3",
                "branch3x3dbl_3a": "Branch_2/Conv2d_0c_1x3", "branch3x3dbl_3b": "Branch_2/Conv2d_0d_3x1",
                "branch_pool": "Branch_3/Conv2d_0b_1x1"}
# ... and Mixed_7c its second 3x1 (a quirk of the original code, kept by the released checkpoints).
_INCEPTION_E_7C = dict(_INCEPTION_E, branch3x3_2b="Branch_1/Conv2d_0c_3x1")
_V3_BLOCK_TABLES = {"mixed0": _INCEPTION_A, "mixed1": _INCEPTION_A_5C, "mixed2": _INCEPTION_A,
                    "mixed3": _REDUCTION_A, "mixed4": _INCEPTION_C, "mixed5": _INCEPTION_C,
                    "mixed6": _INCEPTION_C, "mixed7": _INCEPTION_C, "mixed8": _REDUCTION_B,
                    "mixed9": _INCEPTION_E, "mixed10": _INCEPTION_E_7C}


def _conv_bn(scope: str, part: str):
    """A ConvBN module's child `conv` or `bn` -> its TF-Slim scope and kind."""
    return (scope, "conv") if part == "conv" else (f"{scope}/BatchNorm", "bn") if part == "bn" else None


def inception_v3_name_map(scope: str = "InceptionV3") -> NameMap:
    """Flax path of `InceptionV3` -> (TF-Slim scope, kind)."""

    def name(path: Path):
        if path == ("predictions",):
            return f"{scope}/Logits/Conv2d_1c_1x1", "dense"
        if len(path) != 3:
            return None
        block, layer, part = path
        if block == "stem" and layer in _V3_STEM:
            return _conv_bn(f"{scope}/{_V3_STEM[layer]}", part)
        table = _V3_BLOCK_TABLES.get(block, {})
        if layer in table:
            return _conv_bn(f"{scope}/{_V3_BLOCKS[block]}/{table[layer]}", part)
        return None

    return name


def convert_inception_v3(arrays: Mapping[str, np.ndarray], module=None) -> dict:
    """Flax variables for `InceptionV3` (or the given small `module`) from a TF-Slim inception_v3
    checkpoint; the auxiliary head is left out."""
    classes = logits_classes(arrays, "InceptionV3/Logits/Conv2d_1c_1x1")
    module = (module or inception_lib.InceptionV3()).clone(num_classes=classes or 1001)
    return convert_slim(arrays, "InceptionV3", inception_v3_name_map(), _expected(module, 75),
                        "TF-Slim inception_v3 weights")


# ---------------------------------------------------------------------------------------------------
# Inception-ResNet-v2

_IRV2_STEM = _V3_STEM
_IRV2_RESIDUAL = {
    "block35": {"branch0_0": "Branch_0/Conv2d_1x1", "branch1_0": "Branch_1/Conv2d_0a_1x1",
                "branch1_1": "Branch_1/Conv2d_0b_3x3", "branch2_0": "Branch_2/Conv2d_0a_1x1",
                "branch2_1": "Branch_2/Conv2d_0b_3x3", "branch2_2": "Branch_2/Conv2d_0c_3x3"},
    "block17": {"branch0_0": "Branch_0/Conv2d_1x1", "branch1_0": "Branch_1/Conv2d_0a_1x1",
                "branch1_1": "Branch_1/Conv2d_0b_1x7", "branch1_2": "Branch_1/Conv2d_0c_7x1"},
    "block8": {"branch0_0": "Branch_0/Conv2d_1x1", "branch1_0": "Branch_1/Conv2d_0a_1x1",
               "branch1_1": "Branch_1/Conv2d_0b_1x3", "branch1_2": "Branch_1/Conv2d_0c_3x1"},
}
_IRV2_REPEAT_SCOPE = {"block35": "Repeat", "block17": "Repeat_1", "block8": "Repeat_2"}
_IRV2_MIXED_5B = {"branch1x1": "Branch_0/Conv2d_1x1", "branch5x5_1": "Branch_1/Conv2d_0a_1x1",
                  "branch5x5_2": "Branch_1/Conv2d_0b_5x5", "branch3x3dbl_1": "Branch_2/Conv2d_0a_1x1",
                  "branch3x3dbl_2": "Branch_2/Conv2d_0b_3x3", "branch3x3dbl_3": "Branch_2/Conv2d_0c_3x3",
                  "branch_pool": "Branch_3/Conv2d_0b_1x1"}
_IRV2_MIXED_6A = {"branch3x3": "Branch_0/Conv2d_1a_3x3", "branch3x3dbl_1": "Branch_1/Conv2d_0a_1x1",
                  "branch3x3dbl_2": "Branch_1/Conv2d_0b_3x3", "branch3x3dbl_3": "Branch_1/Conv2d_1a_3x3"}
_IRV2_MIXED_7A = {"branch0_0": "Branch_0/Conv2d_0a_1x1", "branch0_1": "Branch_0/Conv2d_1a_3x3",
                  "branch1_0": "Branch_1/Conv2d_0a_1x1", "branch1_1": "Branch_1/Conv2d_1a_3x3",
                  "branch2_0": "Branch_2/Conv2d_0a_1x1", "branch2_1": "Branch_2/Conv2d_0b_3x3",
                  "branch2_2": "Branch_2/Conv2d_1a_3x3"}


def inception_resnet_v2_name_map(scope: str = "InceptionResnetV2",
                                 repeats: Mapping[str, int] | None = None) -> NameMap:
    """Flax path of `InceptionResNetV2` -> (TF-Slim scope, kind).

    TF-Slim repeats blocks with `slim.repeat` (scopes `Repeat/block35_1` ...), except the last Block8,
    built apart without an activation (scope `Block8`), so the Flax `block8_10` is TF-Slim's `Block8`.
    """
    repeats = dict(inception_lib.RESIDUAL_REPEATS, **(repeats or {}))
    fixed = {"mixed_5b": ("Mixed_5b", _IRV2_MIXED_5B), "mixed_6a": ("Mixed_6a", _IRV2_MIXED_6A),
             "mixed_7a": ("Mixed_7a", _IRV2_MIXED_7A)}

    def block_scope(block: str):
        kind, _, index = block.rpartition("_")
        if kind not in _IRV2_RESIDUAL or not index.isdigit():
            return None, None
        if kind == "block8" and int(index) == repeats["block8"]:
            return kind, f"{scope}/Block8"
        return kind, f"{scope}/{_IRV2_REPEAT_SCOPE[kind]}/{kind}_{index}"

    def name(path: Path):
        if path == ("predictions",):
            return f"{scope}/Logits/Logits", "dense"
        if path[0] == "conv_7b" and len(path) == 2:
            return _conv_bn(f"{scope}/Conv2d_7b_1x1", path[1])
        if len(path) == 3 and path[0] == "stem" and path[1] in _IRV2_STEM:
            return _conv_bn(f"{scope}/{_IRV2_STEM[path[1]]}", path[2])
        if len(path) == 3 and path[0] in fixed and path[1] in fixed[path[0]][1]:
            slim_block, table = fixed[path[0]]
            return _conv_bn(f"{scope}/{slim_block}/{table[path[1]]}", path[2])
        kind, block = block_scope(path[0])
        if block is None:
            return None
        if path[1:] == ("conv",):
            return f"{block}/Conv2d_1x1", "conv"
        if len(path) == 3 and path[1] in _IRV2_RESIDUAL[kind]:
            return _conv_bn(f"{block}/{_IRV2_RESIDUAL[kind][path[1]]}", path[2])
        return None

    return name


def convert_inception_resnet_v2(arrays: Mapping[str, np.ndarray], module=None) -> dict:
    """Flax variables for `InceptionResNetV2` (or the given small `module`) from a TF-Slim
    inception_resnet_v2 checkpoint; the auxiliary head is left out."""
    classes = logits_classes(arrays, "InceptionResnetV2/Logits/Logits")
    module = (module or inception_lib.InceptionResNetV2()).clone(num_classes=classes or 1001)
    repeats = getattr(module, "repeats", None)
    name_map = inception_resnet_v2_name_map(
        repeats=dict(zip(("block35", "block17", "block8"), repeats)) if repeats else None)
    return convert_slim(arrays, "InceptionResnetV2", name_map, _expected(module, 75),
                        "TF-Slim inception_resnet_v2 weights")


# ---------------------------------------------------------------------------------------------------
# MobileNet-v2


def mobilenet_v2_name_map(scope: str = "MobilenetV2") -> NameMap:
    """Flax path of `MobileNetV2` -> (TF-Slim scope, kind)."""
    top = {("Conv1",): (f"{scope}/Conv", "conv"), ("bn_Conv1",): (f"{scope}/Conv/BatchNorm", "bn"),
           ("Conv_1",): (f"{scope}/Conv_1", "conv"), ("Conv_1_bn",): (f"{scope}/Conv_1/BatchNorm", "bn"),
           ("predictions",): (f"{scope}/Logits/Conv2d_1c_1x1", "dense")}
    parts = {"expand": ("expand", "conv"), "expand_BN": ("expand/BatchNorm", "bn"),
             "depthwise": ("depthwise", "depthwise"), "depthwise_BN": ("depthwise/BatchNorm", "bn"),
             "project": ("project", "conv"), "project_BN": ("project/BatchNorm", "bn")}

    def name(path: Path):
        if path in top:
            return top[path]
        if len(path) == 2 and path[1] in parts:
            if path[0] == "expanded_conv":
                block = "expanded_conv"
            elif path[0].startswith("block_") and path[0][len("block_"):].isdigit():
                block = f"expanded_conv_{path[0][len('block_'):]}"
            else:
                return None
            part, kind = parts[path[1]]
            return f"{scope}/{block}/{part}", kind
        return None

    return name


def convert_mobilenet_v2(arrays: Mapping[str, np.ndarray], alpha: float = 1.4, module=None) -> dict:
    """Flax variables for `MobileNetV2(alpha)` (or the given small `module`) from a TF-Slim
    mobilenet_v2 checkpoint (e.g. mobilenet_v2_1.4_224)."""
    classes = logits_classes(arrays, "MobilenetV2/Logits/Conv2d_1c_1x1")
    module = (module or mobilenet_lib.MobileNetV2(alpha=alpha)).clone(num_classes=classes or 1001)
    return convert_slim(arrays, "MobilenetV2", mobilenet_v2_name_map(), _expected(module, 32),
                        f"TF-Slim mobilenet_v2 (depth multiplier {module.alpha}) weights")


# ---------------------------------------------------------------------------------------------------
# Inception-v1 / v2 / v4 (embjax.models.inception_slim): Flax module paths are TF-Slim's scopes.

# TF-Slim scope of each network and of its classifier (a 1x1 conv for v1/v2, fully connected for v4).
SLIM_INCEPTION_SCOPES = {
    "inception_v1": ("InceptionV1", "Logits/Conv2d_0c_1x1"),
    "inception_v2": ("InceptionV2", "Logits/Conv2d_1c_1x1"),
    "inception_v4": ("InceptionV4", "Logits/Logits"),
}
# A ConvBN's `conv` / `bn`, a SeparableConv's `depthwise` / `pointwise`, inside the layer's scope.
_LAYER_PARTS = {"conv": ("", "conv"), "bn": ("/BatchNorm", "bn"), "depthwise": ("", "depthwise"),
                "pointwise": ("", "pointwise")}


def slim_inception_name_map(architecture: str) -> NameMap:
    """Flax path of `SlimInception(architecture)` -> (TF-Slim scope, kind): `Mixed_4b/Branch_1/
    Conv2d_0b_3x3/conv` is `<Net>/Mixed_4b/Branch_1/Conv2d_0b_3x3`, its `bn` that scope's `BatchNorm`;
    v2's separable stem keeps `depthwise_weights`, `pointwise_weights` and `biases` in one scope."""
    scope, logits = SLIM_INCEPTION_SCOPES[architecture]

    def name(path: Path):
        if path == ("logits",):
            return f"{scope}/{logits}", "dense"
        if len(path) < 2:
            return None
        layer = "/".join((scope,) + path[:-1])
        if path[-1] in _LAYER_PARTS:
            suffix, kind = _LAYER_PARTS[path[-1]]
            return layer + suffix, kind
        return None

    return name


def _convert_slim_inception(arrays: Mapping[str, np.ndarray], architecture: str, module=None) -> dict:
    scope, logits = SLIM_INCEPTION_SCOPES[architecture]
    classes = logits_classes(arrays, f"{scope}/{logits}")
    module = (module or inception_slim_lib.SlimInception(architecture)).clone(num_classes=classes or 1001)
    size = inception_slim_lib.MIN_INPUT_SIZE[architecture]
    return convert_slim(arrays, scope, slim_inception_name_map(architecture), _expected(module, size),
                        f"TF-Slim {architecture} weights")


def convert_inception_v1(arrays: Mapping[str, np.ndarray], module=None) -> dict:
    """Flax variables for `inception_slim.inception_v1()` (or the given small `module`, a
    `SlimInception("inception_v1", depth_multiplier=...)`) from a TF-Slim inception_v1 checkpoint."""
    return _convert_slim_inception(arrays, "inception_v1", module)


def convert_inception_v2(arrays: Mapping[str, np.ndarray], module=None) -> dict:
    """Flax variables for `inception_slim.inception_v2()` (or the given small `module`) from a TF-Slim
    inception_v2 checkpoint."""
    return _convert_slim_inception(arrays, "inception_v2", module)


def convert_inception_v4(arrays: Mapping[str, np.ndarray], module=None) -> dict:
    """Flax variables for `inception_slim.inception_v4()` (or the given `module`) from a TF-Slim
    inception_v4 checkpoint; the auxiliary head is left out."""
    return _convert_slim_inception(arrays, "inception_v4", module)


# ---------------------------------------------------------------------------------------------------
# NASNet-A and PNASNet-5 (embjax.models.nasnet): no network scope; cells named as in the Flax port.

# Flax names inside a Cell -> TF-Slim's (`nets/nasnet/nasnet_utils.py`): the prev state's factorized
# reduction and 1x1 projection sit directly in the cell's scope, its input projection is `1x1`.
_CELL_PARTS = {
    ("prev_reduction", "path1_conv"): ("path1_conv", "conv"),
    ("prev_reduction", "path2_conv"): ("path2_conv", "conv"),
    ("prev_reduction", "final_path_bn"): ("final_path_bn", "bn"),
    ("prev_1x1",): ("prev_1x1", "conv"),
    ("prev_bn",): ("prev_bn", "bn"),
    ("beginning_1x1",): ("1x1", "conv"),
    ("beginning_bn",): ("beginning_bn", "bn"),
}
NASNET_STEM = {("stem_conv",): ("conv0", "conv"), ("stem_bn",): ("conv0_bn", "bn"),
               ("logits",): ("final_layer/FC", "dense")}


def nasnet_name_map(cell_operations: Callable[[str], "tuple[str, ...] | None"]) -> NameMap:
    """Flax path of `NASNet` / `PNASNet` -> (TF-Slim scope, kind). `cell_operations(cell name)` gives the
    cell's operation list, whose separable kernel sizes TF-Slim writes into its scope names
    (`comb_iter_1/right/separable_7x7_2`, `bn_sep_7x7_2`); a pooling or identity operation's 1x1
    projection is `<side>/1x1` with BatchNorm `<side>/bn_1`."""

    def name(path: Path):
        if path in NASNET_STEM:
            return NASNET_STEM[path]
        if len(path) < 2:
            return None
        cell, rest = path[0], path[1:]
        operations = cell_operations(cell)
        if operations is None:
            return None
        if rest in _CELL_PARTS:
            scope, kind = _CELL_PARTS[rest]
            return f"{cell}/{scope}", kind
        head, _, side = rest[0].rpartition("_")
        if not head.startswith("comb_iter_") or side not in ("left", "right"):
            return None
        iteration = int(head[len("comb_iter_"):])
        operation = operations[2 * iteration + (side == "right")]
        scope = f"{cell}/comb_iter_{iteration}/{side}"
        if rest[1:] == ("conv",):
            return f"{scope}/1x1", "conv"
        if rest[1:] == ("bn",):
            return f"{scope}/bn_1", "bn"
        if len(rest) >= 3 and rest[1] == "stack" and operation.startswith("separable"):
            k = int(operation.split("_")[1].split("x")[0])
            layer = rest[2]
            if layer.startswith("separable_") and len(rest) == 4 and rest[3] in ("depthwise", "pointwise"):
                return f"{scope}/separable_{k}x{k}_{layer[len('separable_'):]}", rest[3]
            if layer.startswith("bn_sep_") and len(rest) == 3:
                return f"{scope}/bn_sep_{k}x{k}_{layer[len('bn_sep_'):]}", "bn"
        return None

    return name


def _nasnet_cells(cell: str):
    if cell.startswith(("cell_stem_", "reduction_cell_")):
        return nasnet_lib.NASNET_A_REDUCTION["operations"]
    return nasnet_lib.NASNET_A_NORMAL["operations"] if cell.startswith("cell_") else None


def _pnasnet_cells(cell: str):
    return nasnet_lib.PNASNET_5["operations"] if cell.startswith("cell_") else None


def nasnet_large_name_map() -> NameMap:
    """Flax path of `NASNet` -> (TF-Slim scope, kind): stem and reduction cells NASNet-A's reduction cell,
    `cell_<n>` its normal cell."""
    return nasnet_name_map(_nasnet_cells)


def pnasnet_large_name_map() -> NameMap:
    """Flax path of `PNASNet` -> (TF-Slim scope, kind): every cell PNASNet-5's."""
    return nasnet_name_map(_pnasnet_cells)


# Shapes are taken at 331 px, the networks' own size: every stride-2 cell then really halves its input,
# so a cell's `prev` is reduced exactly where TF-Slim reduces it (at 1x1 maps it would not be).
_NAS_PROBE_SIZE = 331


def convert_nasnet_large(arrays: Mapping[str, np.ndarray], module=None) -> dict:
    """Flax variables for `nasnet.nasnet_large()` (or the given `module`, a `NASNet` with TF-Slim's
    pooling) from TF-Slim's NASNet-A-Large checkpoint (nasnet-a_large); the auxiliary head is left out."""
    classes = logits_classes(arrays, "final_layer/FC")
    module = (module or nasnet_lib.nasnet_large()).clone(num_classes=classes or 1001)
    if module.pool_padding != "tf":
        raise ValueError("TF-Slim's NASNet pools 'SAME' (pool_padding='tf'); the 'keras' variant is "
                         "keras.applications' network")
    return convert_slim(arrays, "", nasnet_large_name_map(), _expected(module, _NAS_PROBE_SIZE),
                        "TF-Slim nasnet_large weights", anchor="conv0/weights")


def convert_pnasnet_large(arrays: Mapping[str, np.ndarray], module=None) -> dict:
    """Flax variables for `nasnet.pnasnet_large()` (or the given `module`) from TF-Slim's
    PNASNet-5-Large checkpoint (pnasnet-5_large); the auxiliary head is left out."""
    classes = logits_classes(arrays, "final_layer/FC")
    module = (module or nasnet_lib.pnasnet_large()).clone(num_classes=classes or 1001)
    return convert_slim(arrays, "", pnasnet_large_name_map(), _expected(module, _NAS_PROBE_SIZE),
                        "TF-Slim pnasnet_large weights", anchor="conv0/weights")
