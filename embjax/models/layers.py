"""What every family module uses: the BatchNorm-or-folded helper, the named layer outputs, and where a
model's classifier sits in its params (`classifier_path`).

BatchNorm helpers (embjax.models.folding makes the folded variables; these are the module side):

* `batchnorm(fold_bn, name, ...)`: the BatchNorm `name`, or in the folded mode nothing (`identity`: the
  BatchNorm is folded into the layer before it) or, with `keep`, a `ScaleShift` under the same name (a
  BatchNorm whose input is not a layer's output, e.g. ResNet-v2's pre-activation).
* `check_inference(module_name, fold_bn, train)`: a folded module refuses train=True by name.

Named layers. A family's top-level `__call__` is decorated with `@exposes_layers` (under `@nn.compact`),
and wherever a layer's output is formed, the family calls `tap(self, name, x, *kinds)`:

* `x` is the post-activation output of a convolution or fully connected layer ("conv", "fc": after its
  BatchNorm and the nonlinearity that belongs to it, or as it is where there is none, e.g. a linear
  bottleneck's projection), the output of a block or cell ("block"), or a pooling end point ("pool").
* The output's name is the tapping module's path below the top-level module plus `name`
  (`block_3/expand_conv`), which is also where that layer's weights live; a top-level tap is `name`.
* Every tapped output lands in the dict the top-level `__call__` returns, under its name, and the
  layers are recorded in call order, which is network order. Tapping an array that already has a name
  adds the kinds to that name instead of making a second one (a block whose output is its last
  convolution's), so no two layer names refer to the same array.

`named_layers(module, sample)` (or `traced_layers(apply, *args)`) traces the model once (jax.eval_shape:
nothing is computed) and returns its `Layer`s in network order; `embjax.fne` chooses from them. Extra
outputs cost nothing in a jitted pass: the engine returns only the keys a pass asks for and XLA drops the
rest. Called eagerly (tests), the returned dict keeps every tapped activation alive until it is dropped.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("conv", "fc", "pool", "block")


# ---------------------------------------------------------------------------------------------------
# BatchNorm, or what stands in its place in the folded inference mode


class ScaleShift(nn.Module):
    """x·scale + bias per channel (last axis): an inference BatchNorm no preceding layer can absorb."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
        return x * scale + bias


def identity(x):
    """What a folded module calls where the unfolded one applies a BatchNorm that follows a layer."""
    return x


def batchnorm(fold_bn: bool, name: str, *, train: bool = False, keep: bool = False, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, **batchnorm_kwargs):
    """What a family's module applies where it has the BatchNorm `name`: that BatchNorm (running averages
    unless `train`; `batchnorm_kwargs` are the family's momentum, epsilon, ...), or, in the folded mode,
    nothing (`identity`: folded into the layer before it) or, with `keep` (its input is not a layer's
    output), a ScaleShift under the same name."""
    if fold_bn:
        return ScaleShift(dtype, param_dtype, name=name) if keep else identity
    return nn.BatchNorm(use_running_average=not train, dtype=dtype, param_dtype=param_dtype, name=name,
                        **batchnorm_kwargs)


def check_inference(module_name: str, fold_bn: bool, train: bool) -> None:
    """A folded module has no batch statistics to use or update: refuse train=True by name."""
    if fold_bn and train:
        raise ValueError(
            f"{module_name} was built with fold_bn=True (BatchNorm folded into the convolutions, for "
            "inference only) and cannot run with train=True; train the unfolded module instead"
        )


# ---------------------------------------------------------------------------------------------------
# Named layer outputs


@dataclasses.dataclass(frozen=True)
class Layer:
    """One named output of a model: its key in the output dict, what it is, and its shape."""

    name: str
    kinds: tuple[str, ...]  # a subset of KINDS; two only where one array is both (a block's last conv)
    shape: tuple[int, ...]


class _Sink:
    """The layers tapped during one call of a top-level module, in call order."""

    def __init__(self, prefix: tuple[str, ...]):
        self.prefix = prefix
        self.names: list[str] = []
        self.kinds: dict[str, tuple[str, ...]] = {}
        self.arrays: dict[str, Any] = {}

    def add(self, name: str, x, kinds: tuple[str, ...]) -> None:
        for other, y in self.arrays.items():
            if y is x:  # the same array under a second name: one name, both kinds
                self.kinds[other] = tuple(dict.fromkeys(self.kinds[other] + kinds))
                return
        if name in self.arrays:
            raise ValueError(f"layer output {name!r} is tapped twice with different arrays; tap names must be "
                             "unique below a model")
        self.names.append(name)
        self.kinds[name] = kinds
        self.arrays[name] = x


_SINK: contextvars.ContextVar[_Sink | None] = contextvars.ContextVar("embjax_layer_sink", default=None)
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("embjax_layer_recorder", default=None)


def tap(module: nn.Module | None, name: str, x, *kinds: str):
    """Name `x` as a layer output of kinds `kinds` (see the module docstring) and return it unchanged.

    `module` is the module whose scope the name is relative to (None: the top-level module). Outside a
    top-level `@exposes_layers` call (a block applied on its own) this does nothing."""
    sink = _SINK.get()
    if sink is None:
        return x
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"tap {name!r}: kinds must be among {KINDS}, got {kinds}")
    path = () if module is None else tuple(module.scope.path)
    if path[: len(sink.prefix)] != sink.prefix:
        raise ValueError(f"tap {name!r} from {'/'.join(path)}, outside the model at {'/'.join(sink.prefix)}")
    key = "/".join((*path[len(sink.prefix):], name)) if name else "/".join(path[len(sink.prefix):])
    sink.add(key, x, kinds)
    return x


def exposes_layers(call):
    """Decorator of a family's top-level `__call__` (returning a dict of outputs): every `tap` made during
    the call is added to that dict, and recorded for `named_layers`."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        sink = _Sink(tuple(self.scope.path))
        token = _SINK.set(sink)
        try:
            out = call(self, *args, **kwargs)
        finally:
            _SINK.reset(token)
        for name in sink.names:
            if name in out and out[name] is not sink.arrays[name]:
                raise ValueError(f"{type(self).__name__}: output {name!r} is both returned and tapped as a "
                                 "different array")
            out[name] = sink.arrays[name]
        recorder = _RECORDER.get()
        if recorder is not None:
            recorder.append(tuple(Layer(n, sink.kinds[n], tuple(sink.arrays[n].shape)) for n in sink.names))
        return out

    return wrapper


def traced_layers(fun, *args) -> tuple[tuple[Layer, ...], Any]:
    """(named layers, output shapes) of `fun(*args)`, a function that applies one model (a module's apply
    or the engine's member apply, preprocessing included). Traced with jax.eval_shape: nothing is
    computed; a fresh function each call, so no cached trace skips the recording."""
    recorded: list = []
    token = _RECORDER.set(recorded)
    try:
        shapes = jax.eval_shape(lambda *a: fun(*a), *args)
    finally:
        _RECORDER.reset(token)
    if not recorded:
        raise ValueError(f"{getattr(fun, '__qualname__', fun)} names no layers: the model's __call__ is not "
                         "decorated with embjax.models.layers.exposes_layers")
    return recorded[-1], shapes  # the outermost model finishes last


def named_layers(module: nn.Module, sample) -> tuple[Layer, ...]:
    """The named layer outputs of `module` applied to `sample` (an array or jax.ShapeDtypeStruct; only its
    shape matters), in network order."""
    sample = jax.ShapeDtypeStruct(jnp.shape(sample), jnp.result_type(sample))
    return traced_layers(lambda x: module.init(jax.random.key(0), x), sample)[0]


# ---------------------------------------------------------------------------------------------------
# The classifier inside a params tree


def classifier_path(params, feature_dim: int, num_classes: int) -> tuple[str, ...]:
    """The path (module names from the top) of the classifier in a params tree: the one module whose
    `kernel` has shape (feature_dim, num_classes) (convolution kernels are 4-D, so the match is unique in
    a CNN). The leaves may be arrays or jax.ShapeDtypeStructs; the one search behind
    embjax.members.find_head and the zoo's cosine classifier."""
    shape = (int(feature_dim), int(num_classes))
    found = [tuple(str(getattr(k, "key", k)) for k in path[:-1])
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if path and str(getattr(path[-1], "key", "")) == "kernel" and tuple(np.shape(leaf)) == shape]
    if len(found) != 1:
        raise ValueError(f"expected exactly one classifier kernel of shape {shape} in the params, found "
                         f"{len(found)}: {['/'.join(p) for p in found]}")
    return found[0]


def subtree(tree, path: tuple[str, ...]):
    """tree[path[0]][path[1]]...: the module at `path` (e.g. classifier_path's) in a params tree."""
    for key in path:
        tree = tree[key]
    return tree


__all__ = ["KINDS", "ScaleShift", "identity", "batchnorm", "check_inference", "Layer", "tap", "exposes_layers",
           "traced_layers", "named_layers", "classifier_path", "subtree"]
