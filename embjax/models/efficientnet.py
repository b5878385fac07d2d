"""EfficientNet-Lite0–4 (Tan & Le 2019, the "lite" edge variants) and a small Fashion-MNIST configuration.

Owns the architecture only; pretrained weights come from `embjax.models.convert.efficientnet_lite`.

Lite differs from EfficientNet-B: no squeeze-and-excitation, ReLU6 instead of swish, and the stem (32
channels) and head (1280 channels) are not scaled by the width multiplier, nor are the repeats of the
first and last block groups scaled by the depth multiplier. The released weights were trained in
TensorFlow, whose "SAME" padding puts the odd extra pixel of a stride-2 convolution on the bottom/right;
the PyTorch port that ships them (EfficientNet-Lite-PyTorch) emulates exactly that with explicit
zero-padding, so `padding="tf_same"` (the default) is the one that matches the weights. `"symmetric"`
(k//2 on every side, what most PyTorch-native models use) is kept only to show the difference.

`__call__(x, train=False)` takes NHWC images (any size; stride-2 layers round up) and returns a dict:

    stem       (B, H/2, W/2, 32)       stem conv + BN + ReLU6 (stem_preact: before the ReLU6)
    block_<i>/expand_conv, block_<i>/depthwise_conv, block_<i>/project_conv
               every convolution of block i after its BatchNorm (and ReLU6; the projection has none):
               the full-network embedding's layers (embjax.models.layers; no expand_conv where the
               expansion ratio is 1)
    block_<i>  output of every block, i counting over all blocks (16 for Lite0); where a block has no
               residual add, its output is its project_conv's, named once as block_<i>/project_conv
    stage1..7  output of each block group (16, 24, 40, 80, 112, 192, 320 channels for Lite0; strides
               2, 4, 8, 16, 16, 32, 32 relative to the input): the group's last block_<i>
    head       (B, H/32, W/32, 1280)   1x1 head conv + BN + ReLU6 (head_preact: before the ReLU6)
    pre_logits (B, 1280)               global average pool of `head`
    logits     (B, num_classes)

Parameters are float32 (`param_dtype`); `dtype` sets the computation dtype (bfloat16 on accelerators).
BatchNorm uses the running statistics unless `train=True` (then pass `mutable=["batch_stats"]`, and an
rng named "dropout" when `dropout_rate > 0`). Drop-connect (stochastic depth) is not implemented: it is
an identity at inference, and the small configuration trains without it.

`fold_bn=True` is the inference mode without BatchNorm ops: every conv (depthwise included) carries its
BatchNorm folded into kernel and bias (embjax.models.folding makes the variables). Every named output is
after a BatchNorm (and ReLU6, or the residual add), so each keeps its meaning.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from embjax.models import layers

__all__ = [
    "StageConfig",
    "LITE_STAGES",
    "LITE_VARIANTS",
    "SMALL_STAGES",
    "round_filters",
    "round_repeats",
    "lite_stages",
    "DepthwiseConv",
    "MBConv",
    "EfficientNetLite",
    "small_efficientnet_lite",
]


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One block group: `repeats` inverted-residual blocks, the first with `stride`."""

    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int
    repeats: int


# The seven block groups of EfficientNet-B0 / Lite0 (the TF builder's 'r1_k3_s11_e1_i32_o16', ...).
LITE_STAGES: tuple[StageConfig, ...] = (
    StageConfig(3, 1, 1, 16, 1),
    StageConfig(3, 2, 6, 24, 2),
    StageConfig(5, 2, 6, 40, 2),
    StageConfig(3, 2, 6, 80, 3),
    StageConfig(5, 1, 6, 112, 3),
    StageConfig(5, 2, 6, 192, 4),
    StageConfig(3, 1, 6, 320, 1),
)

# variant -> (width multiplier, depth multiplier, native resolution, dropout before the classifier)
LITE_VARIANTS: dict[int, tuple[float, float, int, float]] = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 280, 0.3),
    4: (1.4, 1.8, 300, 0.3),
}

# Small configuration for 28x28x1 Fashion-MNIST: stem at stride 2 (14 px), two downsamplings to 4 px,
# expansion 3 instead of 6; pre_logits width 192. (A stride-1 stem kept 16-48 channels at 28 px and made
# a training epoch on 2 CPU cores take over ten minutes: memory traffic, not FLOPs, bounds it there.)
SMALL_STAGES: tuple[StageConfig, ...] = (
    StageConfig(3, 1, 1, 16, 1),   # 14 x 14
    StageConfig(3, 1, 3, 24, 2),   # 14 x 14
    StageConfig(5, 2, 3, 40, 2),   #  7 x 7
    StageConfig(3, 2, 3, 64, 2),   #  4 x 4
)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Width scaling as in the TF reference: nearest multiple of `divisor`, never more than 10% below."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def lite_stages(variant: int) -> tuple[StageConfig, ...]:
    """Block groups of EfficientNet-Lite`variant` (first and last group keep their repeats)."""
    if variant not in LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(LITE_VARIANTS)}, got {variant!r}")
    width, depth = LITE_VARIANTS[variant][:2]
    last = len(LITE_STAGES) - 1
    return tuple(
        dataclasses.replace(
            s,
            out_channels=round_filters(s.out_channels, width),
            repeats=s.repeats if i in (0, last) else round_repeats(s.repeats, depth),
        )
        for i, s in enumerate(LITE_STAGES)
    )


def _pad_amounts(size: int, kernel_size: int, stride: int, mode: str) -> tuple[int, int]:
    """(before, after) zero padding of one spatial axis; tf_same gives ceil(size / stride) outputs with
    the odd pixel after (TF's SAME, what lax's "SAME" does too), symmetric gives k//2 on both sides."""
    if mode == "symmetric":
        return kernel_size // 2, kernel_size // 2
    if mode != "tf_same":
        raise ValueError(f"padding must be 'tf_same' or 'symmetric', got {mode!r}")
    total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution without bias; kernel (k, k, 1, C) as nn.Conv with feature groups.

    `impl="shifts"` (default) sums k*k strided slices of the padded input times per-channel weights:
    the same arithmetic as a grouped convolution, but XLA:CPU runs it 5-20x faster forward and 5-15x
    faster backward than its grouped-convolution kernel (measured on this project's 2-core machine, e.g.
    (32, 112, 112, 96), k3 s2: 0.37 s vs 1.7 s forward, 1.7 s vs 25 s for the gradient). `impl="xla"`
    uses lax.conv_general_dilated with feature_group_count, which accelerators handle well.
    """

    kernel_size: int
    stride: int = 1
    padding: str = "tf_same"
    impl: str = "shifts"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    use_bias: bool = False  # True in the folded inference mode: the BatchNorm's shift

    bn_foldable = True  # output = input ∗ kernel (+ bias), channel on the kernel's last axis

    @nn.compact
    def __call__(self, x):
        k, s, c = self.kernel_size, self.stride, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        pads = tuple(_pad_amounts(n, k, s, self.padding) for n in x.shape[1:3])
        if self.impl == "xla":
            y = lax.conv_general_dilated(x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=c)
        elif self.impl == "shifts":
            y = _depthwise_by_shifts(x, kernel, s, tuple(pads))
        else:
            raise ValueError(f"depthwise impl must be 'shifts' or 'xla', got {self.impl!r}")
        return _add_bias(self, y)


def _add_bias(layer: nn.Module, y):
    """y + the layer's per-channel "bias" parameter, when it has one (`use_bias`); y unchanged otherwise."""
    if not layer.use_bias:
        return y
    bias = layer.param("bias", nn.initializers.zeros, (y.shape[-1],), layer.param_dtype)
    y, bias = nn.dtypes.promote_dtype(y, bias, dtype=layer.dtype)
    return y + bias


@functools.partial(jax.jit, static_argnames=("stride", "pads"))
def _depthwise_by_shifts(x, kernel, stride, pads):
    # Jitted on its own so that eager calls (flax's init runs the model eagerly) compile one program
    # per layer shape instead of k*k separate slice ops; inside an outer jit it is simply inlined.
    k, s, c = kernel.shape[0], stride, x.shape[-1]
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (xp.shape[1] - k) // s + 1
    out_w = (xp.shape[2] - k) // s + 1
    out = None
    for i in range(k):
        for j in range(k):
            tap = lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (out_h - 1) * s + 1, j + (out_w - 1) * s + 1, c),
                            (1, s, s, 1)) * kernel[i, j, 0]
            out = tap if out is None else out + tap
    return out


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation: [1x1 expand] -> depthwise -> 1x1 project."""

    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    epsilon: float = 1e-3
    momentum: float = 0.99
    padding: str = "tf_same"
    depthwise_impl: str = "shifts"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    fold_bn: bool = False  # inference: each BatchNorm folded into the conv before it

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = lambda *a, **k: nn.Conv(*a, use_bias=self.fold_bn, dtype=self.dtype, param_dtype=self.param_dtype,
                                       **k)
        bn = lambda name: layers.batchnorm(self.fold_bn, name, train=train, dtype=self.dtype,
                                           param_dtype=self.param_dtype, momentum=self.momentum,
                                           epsilon=self.epsilon)
        in_channels = x.shape[-1]
        hidden = in_channels * self.expand_ratio
        h = x
        if self.expand_ratio != 1:
            h = conv(hidden, (1, 1), name="expand_conv")(h)
            h = layers.tap(self, "expand_conv", nn.relu6(bn("expand_bn")(h)), "conv")
        h = DepthwiseConv(self.kernel_size, self.stride, self.padding, self.depthwise_impl, dtype=self.dtype,
                          param_dtype=self.param_dtype, use_bias=self.fold_bn, name="depthwise_conv")(h)
        h = layers.tap(self, "depthwise_conv", nn.relu6(bn("depthwise_bn")(h)), "conv")
        h = conv(self.out_channels, (1, 1), name="project_conv")(h)
        h = layers.tap(self, "project_conv", bn("project_bn")(h), "conv")  # linear bottleneck: no activation
        if self.stride == 1 and in_channels == self.out_channels:
            h = h + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite`variant` (0–4); `stages`/`stem_*`/`head_channels` override it for other sizes.

    Block submodules are named `block_<i>` with i counting over all blocks (the `_blocks.<i>` index of
    the PyTorch port), so the weight converter's name map is a simple loop.
    """

    variant: int = 0
    num_classes: int = 1000
    stages: Sequence[StageConfig] | None = None
    stem_channels: int = 32
    stem_stride: int = 2
    head_channels: int = 1280
    dropout_rate: float | None = None
    epsilon: float = 1e-3  # TF BatchNormalization epsilon the weights were trained with
    momentum: float = 0.99  # TF convention (= PyTorch momentum 0.01)
    padding: str = "tf_same"
    depthwise_impl: str = "shifts"  # see DepthwiseConv
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    fold_bn: bool = False  # inference mode without BatchNorm ops (see the module docstring)

    def block_configs(self) -> list[StageConfig]:
        """One StageConfig per block (repeats=1), with the stage's stride only on its first block."""
        stages = lite_stages(self.variant) if self.stages is None else tuple(self.stages)
        out = []
        for s in stages:
            for r in range(s.repeats):
                out.append(dataclasses.replace(s, stride=s.stride if r == 0 else 1, repeats=1))
        return out

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"EfficientNetLite expects NHWC images, got shape {x.shape}")
        layers.check_inference("EfficientNetLite", self.fold_bn, train)
        stages = lite_stages(self.variant) if self.stages is None else tuple(self.stages)
        dropout = LITE_VARIANTS.get(self.variant, (0, 0, 0, 0.0))[3] if self.dropout_rate is None \
            else self.dropout_rate
        bn = lambda name: layers.batchnorm(self.fold_bn, name, train=train, dtype=self.dtype,
                                           param_dtype=self.param_dtype, momentum=self.momentum,
                                           epsilon=self.epsilon)
        out = {}
        x = x.astype(self.dtype)
        stem_pads = [_pad_amounts(n, 3, self.stem_stride, self.padding) for n in x.shape[1:3]]
        x = nn.Conv(self.stem_channels, (3, 3), strides=(self.stem_stride,) * 2, padding=stem_pads,
                    use_bias=self.fold_bn, dtype=self.dtype, param_dtype=self.param_dtype, name="stem_conv")(x)
        x = bn("stem_bn")(x)
        out["stem_preact"] = x
        x = nn.relu6(x)
        out["stem"] = layers.tap(None, "stem", x, "conv", "block")
        index = 0
        for stage_number, s in enumerate(stages, start=1):
            for r in range(s.repeats):
                x = MBConv(s.out_channels, s.kernel_size, s.stride if r == 0 else 1, s.expand_ratio,
                           epsilon=self.epsilon, momentum=self.momentum, padding=self.padding,
                           depthwise_impl=self.depthwise_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                           fold_bn=self.fold_bn, name=f"block_{index}")(x, train)
                out[f"block_{index}"] = layers.tap(None, f"block_{index}", x, "block")
                index += 1
            out[f"stage{stage_number}"] = x
        x = nn.Conv(self.head_channels, (1, 1), use_bias=self.fold_bn, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="head_conv")(x)
        x = bn("head_bn")(x)
        out["head_preact"] = x
        x = nn.relu6(x)
        out["head"] = layers.tap(None, "head", x, "conv", "block")
        # Pool with float32 accumulation: a bfloat16 sum over 49+ positions would lose ~2 digits.
        pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        out["pre_logits"] = pre_logits
        h = nn.Dropout(dropout, deterministic=not train)(pre_logits) if dropout > 0 else pre_logits
        out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="classifier")(h)
        return out


def small_efficientnet_lite(num_classes: int = 10, **kwargs) -> EfficientNetLite:
    """EfficientNet-Lite-style network for 28x28x1 inputs: 7.7 MFLOPs/image (XLA's count), pre_logits 192.

    No dropout, so `train=True` needs no rng. Keyword arguments override any EfficientNetLite field.
    """
    # momentum 0.9: the zoo's short training run needs BatchNorm running statistics that settle in it.
    config = dict(variant=None, num_classes=num_classes, stages=SMALL_STAGES, stem_channels=16, stem_stride=2,
                  head_channels=192, dropout_rate=0.0, momentum=0.9)
    config.update(kwargs)
    return EfficientNetLite(**config)
