"""Inference-mode backbones: every BatchNorm folded into the layer that produces its input.

At inference a BatchNorm is a fixed per-channel affine map, y = s·x + t with s = γ / sqrt(var + ε) and
t = β − μ·s. When x comes straight out of a convolution or dense layer, x = K∗u + b, the map folds into
that layer: K' = K·s (scaling the kernel's output-channel axis, its last) and b' = s·(b − μ) + β, and the
BatchNorm disappears from the program. A pure transform of (module, variables): `fold_module(module)` is
the module with `fold_bn=True` (each family's module has that field: a conv that a BatchNorm follows gets
a bias, the BatchNorm is gone) and `fold_variables(module, variables, sample)` the folded variables,
`{"params": ...}` with no `batch_stats`. The folded module returns the same dict of named outputs as the
unfolded one: every named intermediate is taken after its BatchNorm (or has none), and a folded layer's
output *is* that BatchNorm's output.

A BatchNorm whose input is not a linear layer's output cannot be folded that way. In this registry that is
ResNet-v2's pre-activation BatchNorm (`preact_bn` of every block, and `post_bn`): its input is the residual
stream x, which also flows on raw through the identity shortcut, into the named `stage*` outputs and, for
the stem, through a max-pool; and a ReLU separates it from the convolutions that read it, so it cannot be
pushed forward into them either. Such a BatchNorm becomes `ScaleShift`, the same affine map with s and t
precomputed (embjax.models.layers.ScaleShift): one multiply-add per element that XLA fuses into the ReLU
after it, instead of BatchNorm's subtract, rsqrt and two multiplies.

The zoo's ResNet-v2 shows why the module, not the transform, decides which BatchNorms stay: its stem has
no max-pool, so the first `preact_bn` reads the stem convolution's output directly, yet that output is
also the named `stem` output and must stay raw. A family's `fold_bn` mode places a `ScaleShift` (named
like the BatchNorm it replaces) wherever a BatchNorm cannot be folded; every other BatchNorm is folded.

Which layer a BatchNorm folds into is not read from parameter names: `batchnorm_sites` traces the
unfolded module once (shapes only, nothing computed) and records, for every BatchNorm call, the layer
whose output is the very array it receives, and which BatchNorms the folded module keeps as ScaleShift.
Folding is computed in float64 on the host and cast to float32. The folded tree is checked leaf for leaf
against the folded module's own shapes, so a family whose `fold_bn` mode and the trace disagree fails
loudly instead of running with wrong weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from embjax.models.convert.framework import check_shapes
from embjax.models.layers import ScaleShift


class FoldingError(ValueError):
    """Variables or a module that BatchNorm folding cannot handle; the message says which and why."""


def _is_linear_layer(module) -> bool:
    # Layers whose output is (input ∗ kernel) + bias with the output channel on the kernel's last axis.
    # Modules of the families mark themselves with a `bn_foldable = True` class attribute (depthwise).
    return isinstance(module, (nn.Conv, nn.Dense)) or getattr(type(module), "bn_foldable", False)


@dataclasses.dataclass(frozen=True)
class BatchNormSite:
    """One BatchNorm of a module: where its variables live, its ε, and the layer that produced its input."""

    path: tuple[str, ...]
    epsilon: float
    use_scale: bool
    use_bias: bool
    producer: tuple[str, ...] | None  # the conv / dense layer whose output it normalizes, if one did


def batchnorm_sites(module, sample) -> tuple[list[BatchNormSite], Any]:
    """Every BatchNorm of `module` applied to `sample` at inference, in call order, with its producer; and
    the shapes of the module's variables.

    Traced with jax.eval_shape: no computation, no compilation.
    """
    produced: dict[int, tuple[tuple[str, ...], Any]] = {}  # id(output array) -> (layer path, the array)
    sites: list[BatchNormSite] = []

    def interceptor(next_fun, args, kwargs, context):
        layer = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(layer, nn.BatchNorm):
            if layer.axis not in (-1, args[0].ndim - 1) or layer.axis_name is not None:
                raise FoldingError(f"BatchNorm {'/'.join(layer.scope.path)} normalizes axis {layer.axis} "
                                   f"(axis_name {layer.axis_name!r}); folding handles the last axis only")
            entry = produced.get(id(args[0]))
            sites.append(BatchNormSite(tuple(layer.scope.path), float(layer.epsilon), bool(layer.use_scale),
                                       bool(layer.use_bias), entry[0] if entry else None))
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        if _is_linear_layer(layer):
            produced[id(out)] = (tuple(layer.scope.path), out)  # the array is kept so its id stays unique
        return out

    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), sample)
    return sites, shapes


def scale_shift_paths(folded_module, sample) -> tuple[set[tuple[str, ...]], Any]:
    """Paths of the ScaleShift layers `folded_module` applies to `sample`, and the shapes of its variables
    (traced, nothing computed)."""
    paths = set()

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, ScaleShift) and context.method_name == "__call__":
            paths.add(tuple(context.module.scope.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(folded_module.init, jax.random.key(0), sample)
    return paths, shapes


def _get(tree: Mapping, path: tuple[str, ...], what: str) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise FoldingError(f"{what}: no entry {'/'.join(path)} in the variables (missing {key!r}); "
                               "pass the unfolded module's variables ({'params', 'batch_stats'})")
        node = node[key]
    return node


def _to_plain(tree):
    """Nested dicts (mutable copies) with the leaves as they are."""
    if isinstance(tree, Mapping):
        return {k: _to_plain(v) for k, v in tree.items()}
    return tree


def _remove(tree: dict, path: tuple[str, ...]) -> None:
    """Delete path from nested dicts, and any dict left empty above it."""
    parents = [tree]
    for key in path[:-1]:
        parents.append(parents[-1][key])
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):
        if not parents[depth]:
            parents[depth - 1].pop(path[depth - 1])


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def fold_variables(module, variables: Mapping, sample) -> dict:
    """The inference variables of `fold_module(module)`, from the unfolded module's `variables`.

    `sample` is an input (array or jax.ShapeDtypeStruct) of a size the module accepts; only its shape
    matters. Returns {"params": ...}: each BatchNorm folded into its producer's kernel and bias, or
    turned into a ScaleShift's scale and bias where the folded module keeps one (see the module docstring),
    checked against the folded module's shapes (WeightMismatchError naming every leaf that does not fit).
    """
    from embjax.models.convert.framework import check_shapes

    if getattr(module, "fold_bn", False):
        raise FoldingError(f"{type(module).__name__}: fold_variables takes the unfolded module and its variables; "
                           "this module is already folded (fold_bn=True)")
    if "params" not in variables:
        raise FoldingError("fold_variables needs the module's variables {'params', 'batch_stats'}; got keys "
                           f"{sorted(variables)}")
    sample = jax.ShapeDtypeStruct(np.shape(sample), jnp.result_type(sample))
    sites, unfolded_shapes = batchnorm_sites(module, sample)
    check_shapes(unfolded_shapes, variables, f"variables of {type(module).__name__} to fold")
    kept, expected = scale_shift_paths(fold_module(module), sample)
    unfoldable = [s for s in sites if s.producer is None and s.path not in kept]
    if unfoldable:
        raise FoldingError(
            f"{type(module).__name__}: BatchNorms {['/'.join(s.path) for s in unfoldable]} do not follow a conv "
            "or dense layer, and the fold_bn module has no ScaleShift in their place"
        )
    sites = [dataclasses.replace(s, producer=None) if s.path in kept else s for s in sites]
    producers = [s.producer for s in sites if s.producer is not None]
    twice = {p for p in producers if producers.count(p) > 1}
    if twice:
        raise FoldingError(f"layers {sorted('/'.join(p) for p in twice)} feed more than one BatchNorm; "
                           "each could fold only one of them")
    params = _to_plain(variables["params"])
    stats = variables.get("batch_stats", {})
    for site in sites:
        name = "/".join(site.path)
        bn_stats = _get(stats, site.path, f"BatchNorm {name}'s statistics")
        mean = np.asarray(bn_stats["mean"], np.float64)
        var = np.asarray(bn_stats["var"], np.float64)
        bn_params = _get(params, site.path, f"BatchNorm {name}") if (site.use_scale or site.use_bias) else {}
        gamma = np.asarray(bn_params["scale"], np.float64) if site.use_scale else 1.0
        beta = np.asarray(bn_params["bias"], np.float64) if site.use_bias else 0.0
        scale = gamma / np.sqrt(var + site.epsilon)
        if site.use_scale or site.use_bias:
            _remove(params, site.path)
        if site.producer is None:
            _set(params, site.path, {"scale": (scale * np.ones_like(mean)).astype(np.float32),
                                     "bias": (beta - mean * scale).astype(np.float32)})
            continue
        layer = dict(_get(params, site.producer, f"the layer before BatchNorm {name}"))
        kernel = np.asarray(layer["kernel"], np.float64)
        if kernel.shape[-1] != mean.shape[-1]:
            raise FoldingError(f"BatchNorm {name} has {mean.shape[-1]} channels but the kernel of "
                               f"{'/'.join(site.producer)} produces {kernel.shape[-1]}")
        bias = np.asarray(layer["bias"], np.float64) if "bias" in layer else 0.0
        layer["kernel"] = (kernel * scale).astype(np.float32)
        layer["bias"] = ((bias - mean) * scale + beta).astype(np.float32)
        _set(params, site.producer, layer)
    folded = {"params": params}
    check_shapes(expected, folded, f"folded variables of {type(module).__name__}")
    return folded


def fold_module(module):
    """`module` in its inference mode without BatchNorm ops (`fold_bn=True`)."""
    if "fold_bn" not in {f.name for f in dataclasses.fields(module)}:
        raise FoldingError(
            f"{type(module).__name__} has no fold_bn field: its family does not implement BatchNorm folding "
            "yet (add the field as embjax/models/resnet.py does), or load the model with folding off"
        )
    return module.clone(fold_bn=True)


__all__ = ["BatchNormSite", "FoldingError", "batchnorm_sites", "scale_shift_paths", "fold_variables", "fold_module"]
