"""MobileNet-v2 backbone in Flax, laid out like keras.applications.MobileNetV2 (any width multiplier).

`MobileNetV2(alpha=...)` is the ImageNet network (alpha 1.0 and 1.4 have Keras weights);
`small_mobilenet_v2` is the 28x28 grayscale configuration of the zoo.

Layout choices follow Keras (the pretrained files we convert are Keras'):

* channel counts: the stem has `make_divisible(32 * alpha)`, block outputs
  `make_divisible(int(c * alpha))`, the last 1x1 conv 1280, or `make_divisible(1280 * alpha)` when
  alpha > 1 (1792 for 1.4); an expansion conv widens to `t * input channels`.
* block 0 (`expanded_conv`) has no expansion conv; every later block has one, even with t = 1.
* stride-2 3x3 convs pad asymmetrically, Keras' `correct_pad` / TF "SAME": (0, 1) on an even side,
  (1, 1) on an odd one; stride-1 3x3 convs pad (1, 1). ReLU6 everywhere, none after the projection.
* a residual add where the block keeps both stride 1 and its channel count.
* BatchNorm epsilon 1e-3 (momentum 0.999 as in Keras; only matters when training).

Parameter names mirror Keras layer names (`Conv1`, `bn_Conv1`, `expanded_conv` / `depthwise`,
`block_3` / `expand_BN`, `Conv_1`, `Conv_1_bn`, `predictions`). Returned features: `stem`, `stage1`..
`stage7` (the outputs of the seven bottleneck groups of the paper's Table 2), `last_conv` (after
`Conv_1` + BN + ReLU6), `pre_logits` (global average pool, float32) and `logits`; and every
convolution of every block after its BatchNorm (and ReLU6; the projection has none), named by its weights'
path (`expanded_conv/depthwise`, `block_1/expand`, ...; the named layers of embjax.models.layers). A group
whose last block has no residual add (stage1, stage7) ends in that block's projection, so its stage
output is named once among the layers, as the projection.

`fold_bn=True` is the inference mode without BatchNorm ops: every conv (depthwise included) carries its
BatchNorm folded into kernel and bias (embjax.models.folding makes the variables). Every named output is
after a BatchNorm (and ReLU6, or the residual add), so each keeps its meaning.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from embjax.models import layers

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2 (Sandler et al., Table 2).
IMAGENET_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# He-normal suits ReLU6 networks trained from scratch (the zoo); converted weights replace it anyway.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Keras' `_make_divisible`: round to a multiple of `divisor`, never more than 10% below `value`."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial side (more at the end); for k=3, s=2 it equals Keras' correct_pad."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def relu6(x):
    return jnp.clip(x, 0, 6)


class Depthwise(nn.Module):
    """3x3 depthwise convolution without bias, kernel (3, 3, 1, C) as nn.Conv with feature groups (the
    Keras converter's layout). `impl="shifts"` sums 9 strided slices (the same arithmetic; XLA:CPU runs
    it several times faster than its grouped convolution, see embjax.models.efficientnet.DepthwiseConv);
    `impl="xla"` is the grouped convolution, for accelerators."""

    strides: int
    padding: tuple
    impl: str = "shifts"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    use_bias: bool = False  # True in the folded inference mode: the BatchNorm's shift

    bn_foldable = True  # output = input ∗ kernel (+ bias), channel on the kernel's last axis

    @nn.compact
    def __call__(self, x):
        from embjax.models.efficientnet import _depthwise_by_shifts, _add_bias

        c = x.shape[-1]
        kernel = self.param("kernel", _KERNEL_INIT, (3, 3, 1, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        pads = tuple(tuple(int(p) for p in pad) for pad in self.padding)
        if self.impl == "xla":
            y = lax.conv_general_dilated(x, kernel, (self.strides,) * 2, pads,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        elif self.impl == "shifts":
            y = _depthwise_by_shifts(x, kernel, self.strides, pads)
        else:
            raise ValueError(f"depthwise impl must be 'shifts' or 'xla', got {self.impl!r}")
        return _add_bias(self, y)


class InvertedResidual(nn.Module):
    """Expand (1x1, ReLU6) -> depthwise 3x3 (ReLU6) -> project (1x1, linear) [+ input]."""

    expansion: int
    filters: int
    strides: int
    expand: bool  # False only for Keras' block 0
    epsilon: float
    bn_momentum: float
    dtype: Any
    param_dtype: Any
    depthwise_impl: str = "shifts"
    fold_bn: bool = False  # inference: each BatchNorm folded into the conv before it

    def bn(self, train, name):
        return layers.batchnorm(self.fold_bn, name, train=train, dtype=self.dtype, param_dtype=self.param_dtype,
                                 momentum=self.bn_momentum, epsilon=self.epsilon)

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_channels = x.shape[-1]
        conv = dict(use_bias=self.fold_bn, kernel_init=_KERNEL_INIT, dtype=self.dtype,
                    param_dtype=self.param_dtype)
        y = x
        if self.expand:
            y = nn.Conv(self.expansion * in_channels, (1, 1), name="expand", **conv)(y)
            y = layers.tap(self, "expand", relu6(self.bn(train, "expand_BN")(y)), "conv")
        channels = y.shape[-1]
        if self.strides == 1:
            padding = ((1, 1), (1, 1))
        else:
            padding = (same_pad(y.shape[1], 3, self.strides), same_pad(y.shape[2], 3, self.strides))
        y = Depthwise(self.strides, padding, self.depthwise_impl, self.dtype, self.param_dtype,
                      use_bias=self.fold_bn, name="depthwise")(y)
        y = layers.tap(self, "depthwise", relu6(self.bn(train, "depthwise_BN")(y)), "conv")
        y = nn.Conv(self.filters, (1, 1), name="project", **conv)(y)
        y = layers.tap(self, "project", self.bn(train, "project_BN")(y), "conv")  # linear: no activation
        if self.strides == 1 and in_channels == self.filters:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNet-v2 with a linear classifier; see the module docstring for the layout.

    `__call__(x, train=False)` takes NHWC images (>= 32 px for the ImageNet configuration) and returns
    {"stem", "stage1", ..., "last_conv", "pre_logits", "logits"}.
    """

    alpha: float = 1.0
    blocks: Sequence[tuple[int, int, int, int]] = IMAGENET_BLOCKS  # (t, c, n, s) per bottleneck group
    stem_filters: int = 32  # before the width multiplier
    last_filters: int = 1280  # before the width multiplier (which only ever widens it)
    num_classes: int = 1000
    epsilon: float = 1e-3  # Keras MobileNetV2's BatchNorm epsilon
    bn_momentum: float = 0.999
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depthwise_impl: str = "shifts"  # "xla" (grouped convolution) for accelerators; see Depthwise
    fold_bn: bool = False  # inference mode without BatchNorm ops (see the module docstring)

    @property
    def feature_dim(self) -> int:
        """Width of `pre_logits`: Keras keeps 1280 for alpha <= 1 and widens it for alpha > 1."""
        return make_divisible(self.last_filters * self.alpha) if self.alpha > 1.0 else self.last_filters

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        if self.alpha <= 0:
            raise ValueError(f"MobileNetV2 alpha (width multiplier) must be positive, got {self.alpha}")
        if x.ndim != 4:
            raise ValueError(
                f"MobileNetV2 expects NHWC images (batch, height, width, channels), got shape {x.shape}"
            )
        layers.check_inference("MobileNetV2", self.fold_bn, train)
        bn = dict(
            momentum=self.bn_momentum, epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype
        )
        conv = dict(use_bias=self.fold_bn, kernel_init=_KERNEL_INIT, dtype=self.dtype,
                    param_dtype=self.param_dtype)
        bn_or_folded = lambda name: layers.batchnorm(self.fold_bn, name, train=train, **bn)
        x = x.astype(self.dtype)
        out = {}
        x = nn.Conv(
            make_divisible(self.stem_filters * self.alpha),
            (3, 3),
            strides=(2, 2),
            padding=(same_pad(x.shape[1], 3, 2), same_pad(x.shape[2], 3, 2)),
            name="Conv1",
            **conv,
        )(x)
        x = relu6(bn_or_folded("bn_Conv1")(x))
        out["stem"] = layers.tap(None, "stem", x, "conv", "block")

        block_id = 0
        for group, (t, c, n, s) in enumerate(self.blocks):
            filters = make_divisible(int(c * self.alpha))
            for i in range(n):
                x = InvertedResidual(
                    expansion=t,
                    filters=filters,
                    strides=s if i == 0 else 1,
                    expand=block_id > 0,
                    epsilon=self.epsilon,
                    bn_momentum=self.bn_momentum,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    depthwise_impl=self.depthwise_impl,
                    fold_bn=self.fold_bn,
                    name="expanded_conv" if block_id == 0 else f"block_{block_id}",
                )(x, train=train)
                block_id += 1
            out[f"stage{group + 1}"] = layers.tap(None, f"stage{group + 1}", x, "block")

        x = nn.Conv(self.feature_dim, (1, 1), name="Conv_1", **conv)(x)
        x = relu6(bn_or_folded("Conv_1_bn")(x))
        out["last_conv"] = layers.tap(None, "last_conv", x, "conv", "block")
        # Pool in float32: the embedding statistics need the digits a bfloat16 mean would lose.
        pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out["pre_logits"] = pre_logits
        out["logits"] = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="predictions"
        )(pre_logits)
        return out


def small_mobilenet_v2(num_classes: int = 10, **overrides) -> MobileNetV2:
    """Zoo MobileNet-v2 for 28x28x1: 16-channel stride-2 stem (28 -> 14 px), six inverted residual blocks
    (14 -> 7 -> 4 px), last 1x1 conv 160 wide (= pre_logits width); 4.0 MFLOPs per image (XLA cost
    analysis), 67k parameters."""
    fields = dict(
        blocks=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 48, 1, 1)),
        stem_filters=16,
        last_filters=160,
        num_classes=num_classes,
        bn_momentum=0.9,  # running statistics must settle within the zoo's one or two epochs
    )
    fields.update(overrides)
    return MobileNetV2(**fields)


__all__ = [
    "MobileNetV2",
    "InvertedResidual",
    "IMAGENET_BLOCKS",
    "make_divisible",
    "same_pad",
    "relu6",
    "small_mobilenet_v2",
]
