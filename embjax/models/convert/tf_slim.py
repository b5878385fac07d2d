"""TF-Slim checkpoint variables -> Flax variables of the embjax ports (the thesis' TensorFlow weights).

Input: {variable name: array} as `embjax.weights.tf_checkpoint.load` returns it from a TF-Slim
`model.ckpt` or a TF-Hub SavedModel. Output: {"params", "batch_stats"} for

* `convert_resnet(arrays, depth, version)`: TF-Slim `resnet_v1_{depth}` / `resnet_v2_{depth}` ->
  `embjax.models.resnet.ResNet(layout="slim")` (stride on the last unit's 3x3 conv, identity shortcuts
  where the width is kept, TF "SAME" stem pool; BatchNorm epsilon 1e-5; v1 convs without biases);
* `convert_inception_v3(arrays)`: `InceptionV3/...` -> `embjax.models.inception.InceptionV3`;
* `convert_inception_resnet_v2(arrays)`: `InceptionResnetV2/...` -> `InceptionResNetV2`;
* `convert_mobilenet_v2(arrays, alpha)`: `MobilenetV2/...` -> `embjax.models.mobilenet.MobileNetV2`.

The map is explicit and driven by the Flax module: every module path of the port's variable tree has one
TF-Slim scope (`name map` functions below), and each leaf one variable in it: conv `weights` (and
`biases`) -> `kernel` (`bias`); BatchNorm `gamma`/`beta` -> params `scale`/`bias`,
`moving_mean`/`moving_variance` -> batch_stats `mean`/`var`; the classifier, a 1x1 conv `weights`
(1, 1, C, K) in TF-Slim, -> Dense `kernel` (C, K); depthwise `depthwise_weights` (3, 3, C, 1) ->
(3, 3, 1, C). All problems are collected (missing variables, unexpected ones under the network's
scope, mis-shaped ones through `embjax.weights.h5.shape_problems`, the project's one shape check) and
raised together as one `WeightMismatchError`.

Names are found wherever the network's scope starts (a TF-Hub module may put `module/` in front).
Variables outside the scope (`global_step`), the auxiliary heads (`AuxLogits`) and training-only copies
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
from embjax.models import mobilenet as mobilenet_lib
from embjax.models import resnet as resnet_lib
from embjax.weights.h5 import WeightMismatchError, flatten_tree, shape_problems

__all__ = [
    "convert_resnet",
    "convert_inception_v3",
    "convert_inception_resnet_v2",
    "convert_mobilenet_v2",
    "convert_slim",
    "resnet_name_map",
    "inception_v3_name_map",
    "inception_resnet_v2_name_map",
    "mobilenet_v2_name_map",
    "logits_classes",
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
}
_IGNORED_PARTS = ("AuxLogits", "ExponentialMovingAverage", "Momentum", "RMSProp", "RMSProp_1", "Adam",
                  "Adam_1")

Path = tuple[str, ...]
NameMap = Callable[[Path], "tuple[str, str] | None"]  # Flax module path -> (TF-Slim scope, kind)


def _strip_to_scope(arrays: Mapping[str, np.ndarray], scope: str) -> dict[str, np.ndarray]:
    """{name from `scope/` on: array} for the variables under `scope`, wherever it starts."""
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


def convert_slim(
    arrays: Mapping[str, np.ndarray], network_scope: str, name_map: NameMap, expected: Mapping, what: str
) -> dict:
    """{"params", "batch_stats"} shaped like `expected` (a tree of leaves with `.shape`, e.g.
    `jax.eval_shape(module.init, ...)`), each leaf taken from the TF-Slim variable `name_map` names.

    Raises one WeightMismatchError listing every problem (see the module docstring).
    """
    if not isinstance(arrays, Mapping):
        raise WeightMismatchError(what, [f"expected {{variable name: array}}, got {type(arrays).__name__}; "
                                         "read the checkpoint with embjax.weights.tf_checkpoint.load"])
    found = _strip_to_scope(arrays, network_scope)
    if not found:
        sample = ", ".join(list(arrays)[:5])
        raise WeightMismatchError(
            what, [f"no variable under the TF-Slim scope {network_scope!r} (the checkpoint's first names: "
                   f"{sample or 'none'}): a checkpoint of another network?"])
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
        elif kind == "depthwise" and value.ndim == 4 and value.shape[3] == 1:
            value = value.reshape(value.shape[0], value.shape[1], 1, value.shape[2])
        if not np.issubdtype(value.dtype, np.floating):
            problems.append(f"TF-Slim variable {slim_name!r} has dtype {value.dtype}, not floating point")
            continue
        node = variables[collection]
        for key in module:
            node = node.setdefault(key, {})
        node[name] = value.astype(np.float32)
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
