"""Convolutions as matmuls on XLA:CPU: a Flax method interceptor that runs chosen `nn.Conv` layers as dot_general.

XLA:CPU compiles each convolution to its own kernel (Eigen's spatial convolution with the engine's
options); a convolution is also a matmul over channels, which XLA:CPU sends to its dot kernel:

  "dot"      a 1x1 convolution: the (strided) pixels times the (C_in, C_out) kernel;
  "patches"  a k x k convolution as im2col: the k*k shifted (strided) views of the padded input
             concatenated along channels, times the (k*k*C_in, C_out) kernel, one matmul;
  "shifts"   a k x k convolution as k*k matmuls of the shifted views, accumulated;
  "xla"      left to XLA's convolution.

`RULE` says which each kind of layer gets; it is what `benchmarks/extract_throughput.py --layers` measured
on this project's CPU (figures in benchmarks/RESULTS.md), not a guess. The rewrite applies in the inference
path only (`on_cpu()`, entered where members apply their modules), only when JAX's default backend is
the CPU (GPUs and TPUs keep XLA's convolutions), and only to plain 2-D convolutions: grouped/depthwise,
dilated, masked, unshared or circular-padded convolutions and any layer during `init` run unchanged.

float32 stays float32: every dot of a float32 layer runs at precision HIGHEST; lower-precision layers
(bfloat16 runs) keep the layer's own precision (XLA's default unless the module sets one).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("xla", "dot", "patches", "shifts")


@dataclasses.dataclass(frozen=True)
class Rule:
    """The method per kind of convolution: 1x1 (stride 1 or strided) and k x k with k > 1 (stride 1 or
    strided). "dot" applies to 1x1 layers only."""

    pointwise: str = "xla"
    pointwise_strided: str = "xla"
    spatial: str = "xla"
    spatial_strided: str = "xla"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            allowed = ("xla", "dot") if field.name.startswith("pointwise") else ("xla", "patches", "shifts")
            if value not in allowed:
                raise ValueError(f"Rule.{field.name} must be one of {allowed}, not {value!r}")

    def method(self, kernel_hw: Sequence[int], strides: Sequence[int]) -> str:
        pointwise = tuple(kernel_hw) == (1, 1)
        strided = any(s != 1 for s in strides)
        if pointwise:
            return self.pointwise_strided if strided else self.pointwise
        return self.spatial_strided if strided else self.spatial


XLA_ONLY = Rule()
# What `benchmarks/extract_throughput.py --layers` backs (benchmarks/RESULTS.md, "Convolutions as
# matmuls"; batch 32, 224 px, every distinct layer of ResNet-50 and EfficientNet-Lite0, count-weighted,
# measured under heavy load): k x k layers as im2col or shifted matmuls were 2.3-2.6x slower than XLA's
# convolution (the patches go through memory; Eigen's convolution packs them in cache), so they stay with
# XLA. A stride-1 1x1 convolution XLA:CPU already compiles to the same dot (identical program), so it is
# left alone. Strided 1x1 layers (ResNet's projections and stage-entry 1x1s) as a strided slice and a dot
# measured 5% faster in total than XLA's convolution kernel, at the edge of that run's noise.
RULE = Rule(pointwise="xla", pointwise_strided="dot", spatial="xla", spatial_strided="xla")


# --------------------------------------------------------------------------------------------------
# The arithmetic: plain functions of NHWC inputs and HWIO kernels.


def shifted_views(x, kernel_hw, strides, pads):
    """The kh*kw shifted, strided views of the padded input, each (N, H_out, W_out, C), row-major taps."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    n, h, w, c = x.shape
    out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a {kh}x{kw} convolution with padding {pads} needs a larger input than {x.shape}")
    return [lax.slice(x, (0, i, j, 0), (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _dot(x, kernel_2d, precision):
    return lax.dot_general(x, kernel_2d, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def conv_dot(x, kernel, strides, pads, precision=None):
    """A 1x1 convolution (kernel (1, 1, C_in, C_out)) as the strided pixels times the kernel matrix."""
    if kernel.shape[:2] != (1, 1):
        raise ValueError(f"conv_dot takes 1x1 kernels, got {kernel.shape}")
    (view,) = shifted_views(x, (1, 1), strides, pads)
    return _dot(view, kernel[0, 0], precision)


def conv_patches(x, kernel, strides, pads, precision=None):
    """A k x k convolution as one matmul of the im2col patches (N, H_out, W_out, kh*kw*C_in) and the kernel."""
    kh, kw, cin, cout = kernel.shape
    views = shifted_views(x, (kh, kw), strides, pads)
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return _dot(patches, kernel.reshape(kh * kw * cin, cout), precision)


def conv_shifts(x, kernel, strides, pads, precision=None):
    """A k x k convolution as kh*kw matmuls of the shifted views, summed in tap order."""
    kh, kw = kernel.shape[:2]
    out = None
    for t, view in enumerate(shifted_views(x, (kh, kw), strides, pads)):
        y = _dot(view, kernel[t // kw, t % kw], precision)
        out = y if out is None else out + y
    return out


IMPLS = {"dot": conv_dot, "patches": conv_patches, "shifts": conv_shifts}


def conv(x, kernel, strides, pads, method: str, precision=None):
    """`lax.conv_general_dilated(x, kernel, strides, pads, ("NHWC", "HWIO", "NHWC"))` by `method`."""
    if method == "xla":
        return lax.conv_general_dilated(x, kernel, tuple(strides), tuple(map(tuple, pads)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    if method not in IMPLS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    return IMPLS[method](x, kernel, tuple(strides), tuple(map(tuple, pads)), precision)


# --------------------------------------------------------------------------------------------------
# The interceptor.


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """What the rule sees of one plain 2-D `nn.Conv` call (strides and explicit pads resolved)."""

    input_shape: tuple[int, ...]  # (N, H, W, C_in)
    kernel_shape: tuple[int, ...]  # (kh, kw, C_in, C_out)
    strides: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return (1, 1)
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return value if len(value) == 2 else None


def plain_conv(module, x) -> ConvLayer | None:
    """The call as a `ConvLayer` when it is one this transform handles, else None (left unchanged)."""
    if type(module) is not nn.Conv or getattr(x, "ndim", 0) != 4 or module.is_initializing():
        return None
    if (module.feature_group_count != 1 or module.mask is not None or module.conv_general_dilated is not None
            or module.conv_general_dilated_cls is not None or _pair(module.input_dilation) != (1, 1)
            or _pair(module.kernel_dilation) != (1, 1) or not module.has_variable("params", "kernel")):
        return None
    kernel_hw, strides = _pair(module.kernel_size), _pair(module.strides)
    if kernel_hw is None or strides is None:
        return None
    padding = module.padding
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            return None  # CIRCULAR, REFLECT, CAUSAL: flax pads by hand; left to it
        pads = lax.padtype_to_pads(x.shape[1:3], kernel_hw, strides, padding.upper())
    elif isinstance(padding, int):
        pads = ((padding, padding),) * 2
    else:
        pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
        if len(pads) != 2 or any(len(p) != 2 for p in pads):
            return None
    kernel = module.get_variable("params", "kernel")
    if kernel.shape[:3] != (*kernel_hw, x.shape[-1]):
        return None
    return ConvLayer(tuple(x.shape), tuple(kernel.shape), strides, tuple((int(a), int(b)) for a, b in pads))


def interceptor(rule: Rule | None = None):
    """A `flax.linen.intercept_methods` interceptor running `nn.Conv` calls by `rule` (default: `RULE`)."""
    rule = RULE if rule is None else rule

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or len(args) != 1 or kwargs:
            return next_fun(*args, **kwargs)
        module, x = context.module, args[0]
        layer = plain_conv(module, x)
        method = rule.method(layer.kernel_shape[:2], layer.strides) if layer is not None else "xla"
        if method == "xla":
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        bias = module.get_variable("params", "bias") if module.use_bias else None
        x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
        precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else module.precision
        y = conv(x, kernel, layer.strides, layer.pads, method, precision)
        return y + bias if bias is not None else y

    return intercept


def use_matmuls(backend: str | None = None) -> bool:
    """Whether convolutions are rewritten on `backend` (default: JAX's default backend): the CPU only."""
    return (backend or jax.default_backend()) == "cpu"


@contextlib.contextmanager
def on_cpu(rule: Rule | None = None) -> Iterator[None]:
    """Within: `nn.Conv` layers run by `rule` (default: `RULE`) when JAX's default backend is the CPU;
    unchanged elsewhere."""
    rule = RULE if rule is None else rule
    if not use_matmuls() or rule == XLA_ONLY:
        yield
        return
    with nn.intercept_methods(interceptor(rule)):
        yield


def conv_layers(module, variables, x) -> list[ConvLayer]:
    """Every plain 2-D convolution `module.apply(variables, x)` calls, in call order (shapes only: traced
    with jax.eval_shape, nothing is computed). `x` may be a ShapeDtypeStruct."""
    seen: list[ConvLayer] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and len(args) == 1 and not kwargs:
            layer = plain_conv(context.module, args[0])
            if layer is not None:
                seen.append(layer)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(module.apply, variables, x)
    return seen
