"""ResNet v1 and v2 (pre-activation) backbones in Flax, laid out like keras.applications.

One module, `ResNet`, covers both versions (`version=1|2`), basic and bottleneck blocks, any depth through
`stage_sizes`, and a width multiplier. `resnet(depth, version)` builds the standard depths
18/34/50/101/152; `small_resnet_v1` / `small_resnet_v2` are the 28x28 grayscale configurations of the zoo.

Layout choices follow keras.applications (the pretrained files we convert are Keras'):

* v1 bottleneck: the stride of a stage's first block sits on its first 1x1 conv and on the projection
  shortcut (torchvision puts it on the 3x3; `stride_in_1x1=False` gives that), every conv has a bias,
  BatchNorm epsilon 1.001e-5.
* v2: pre-activation blocks, the first block of a stage projects the shortcut, the *last* block of stages
  1-3 carries the stride (its shortcut is a strided subsample), convs followed by a BatchNorm have no bias,
  no BatchNorm in the stem, and `post_bn` + ReLU before pooling.
* Padding is explicit and symmetric (Keras: ZeroPadding2D then 'valid'); the stem max-pool pads with
  *zeros*, which matters for v2, whose stem output is not rectified.

`layout="slim"` gives TF-Slim's resnet_v1 / resnet_v2 instead (the thesis' checkpoints): in both versions
the *last* unit of stages 1-3 carries the stride, on its 3x3 conv, and a unit whose channel count does
not change keeps an identity shortcut, subsampled when strided (v1 included, where Keras projects);
strided convs pad explicitly and symmetrically (slim's `conv2d_same`, as Keras); the stem max-pool is TF
"SAME" (pads -inf, and only at the end of an even-sized side). With slim's other constants (BatchNorm
epsilon 1e-5; v1 convs without biases) set by the caller, see `embjax.models.convert.tf_slim`.

`fold_bn=True` is the inference mode without BatchNorm ops (embjax.models.folding makes its variables): a
conv that a BatchNorm follows carries the folded scale in its kernel and the shift in its bias; v2's
pre-activation `preact_bn` / `post_bn` act on the residual stream, which no conv produces alone, and
become precomputed per-channel `ScaleShift`s under the same names.

Parameter names mirror Keras layer names (`conv1_conv`, `conv2_block1` / `1_conv`, `post_bn`,
`predictions`) so the converter's name map reads as the identity it is. Returned features: `stem` (after
the max-pool), `stage1`..`stageN` (Keras' conv2..conv{N+1} outputs), `pre_logits` (global average pool,
float32) and `logits`; and every convolution's output after its BatchNorm and ReLU (where it has them),
named by its weights' path: `conv1_conv` (the stem conv, before the max-pool), `conv2_block1/0_conv`
(a projection shortcut), `conv2_block1/1_conv`, ... (the named layers of embjax.models.layers).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from embjax.models import layers

# Blocks per stage of the standard depths (He et al. 2016, Table 1) and whether they use bottlenecks.
STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
BOTTLENECK_DEPTHS = frozenset({50, 101, 152})

# He-normal initialisation keeps activations at unit scale through ReLU stacks when training from scratch.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def _pad(x, before_after):
    """Zero-pad the two spatial axes of an NHWC tensor."""
    return jnp.pad(x, ((0, 0), before_after, before_after, (0, 0)))


class _Block(nn.Module):
    """Shared fields of the four residual block kinds."""

    filters: int
    strides: int
    project: bool
    stride_in_1x1: bool
    conv_bias: bool
    epsilon: float
    bn_momentum: float
    dtype: Any
    param_dtype: Any
    fold_bn: bool = False  # inference: BatchNorm folded into the conv before it (embjax.models.folding)

    def conv(self, features, kernel, strides, name, bias):
        pad = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            use_bias=bias,
            kernel_init=_KERNEL_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def bn(self, train, name, keep=False):
        return layers.batchnorm(self.fold_bn, name, train=train, keep=keep, dtype=self.dtype,
                                 param_dtype=self.param_dtype, momentum=self.bn_momentum, epsilon=self.epsilon)

    def tap(self, name, x):
        """A convolution's output after its BatchNorm and ReLU (where it has them), named `<block>/<name>`."""
        return layers.tap(self, name, x, "conv")

    def preactivation_bn(self, train):
        """v2's BatchNorm on the residual stream: no conv to fold into, a precomputed ScaleShift instead."""
        return self.bn(train, "preact_bn", keep=True)

    @property
    def bn_conv_bias(self):
        """Whether a conv that a BatchNorm follows has a bias: folding puts BatchNorm's shift there."""
        return self.conv_bias or self.fold_bn


class BottleneckV1(_Block):
    """1x1 -> 3x3 -> 1x1 (x4 channels), BatchNorm after every conv, ReLU after the sum (Keras block_v1)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        b = self.bn_conv_bias
        shortcut = x[:, :: self.strides, :: self.strides, :]  # TF-Slim's strided identity (subsample)
        if self.project:
            shortcut = self.conv(4 * self.filters, 1, self.strides, "0_conv", b)(x)
            shortcut = self.tap("0_conv", self.bn(train, "0_bn")(shortcut))
        y = self.tap("1_conv", nn.relu(self.bn(train, "1_bn")(self.conv(self.filters, 1, s1, "1_conv", b)(x))))
        y = self.tap("2_conv", nn.relu(self.bn(train, "2_bn")(self.conv(self.filters, 3, s3, "2_conv", b)(y))))
        y = self.tap("3_conv", self.bn(train, "3_bn")(self.conv(4 * self.filters, 1, 1, "3_conv", b)(y)))
        return nn.relu(shortcut + y)


class BasicV1(_Block):
    """3x3 (strided) -> 3x3, BatchNorm after each, ReLU after the sum (ResNet-18/34)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b = self.bn_conv_bias
        shortcut = x
        if self.project:
            shortcut = self.tap("0_conv", self.bn(train, "0_bn")(self.conv(self.filters, 1, self.strides, "0_conv",
                                                                           b)(x)))
        y = self.tap("1_conv", nn.relu(self.bn(train, "1_bn")(self.conv(self.filters, 3, self.strides, "1_conv",
                                                                         b)(x))))
        y = self.tap("2_conv", self.bn(train, "2_bn")(self.conv(self.filters, 3, 1, "2_conv", b)(y)))
        return nn.relu(shortcut + y)


class BottleneckV2(_Block):
    """Pre-activation bottleneck (Keras block_v2): BN-ReLU, then 1x1 -> 3x3 (strided) -> 1x1 (x4).

    The projection shortcut reads the pre-activated input; the identity shortcut reads the raw input,
    subsampled when the block is strided (Keras: MaxPooling2D(1, stride), i.e. x[::s, ::s]).
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        b = self.conv_bias
        preact = nn.relu(self.preactivation_bn(train)(x))
        if self.project:
            shortcut = self.tap("0_conv", self.conv(4 * self.filters, 1, self.strides, "0_conv", b)(preact))
        else:
            shortcut = x[:, :: self.strides, :: self.strides, :]
        y = self.tap("1_conv", nn.relu(self.bn(train, "1_bn")(self.conv(self.filters, 1, 1, "1_conv",
                                                                         self.fold_bn)(preact))))
        y = self.tap("2_conv", nn.relu(self.bn(train, "2_bn")(self.conv(self.filters, 3, self.strides, "2_conv",
                                                                         self.fold_bn)(y))))
        y = self.tap("3_conv", self.conv(4 * self.filters, 1, 1, "3_conv", b)(y))
        return shortcut + y


class BasicV2(_Block):
    """Pre-activation basic block: BN-ReLU, 3x3 (strided) -> BN-ReLU -> 3x3; no Keras counterpart."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b = self.conv_bias
        preact = nn.relu(self.preactivation_bn(train)(x))
        if self.project:
            shortcut = self.tap("0_conv", self.conv(self.filters, 1, self.strides, "0_conv", b)(preact))
        else:
            shortcut = x[:, :: self.strides, :: self.strides, :]
        y = self.conv(self.filters, 3, self.strides, "1_conv", self.fold_bn)(preact)
        y = self.tap("1_conv", nn.relu(self.bn(train, "1_bn")(y)))
        y = self.tap("2_conv", self.conv(self.filters, 3, 1, "2_conv", b)(y))
        return shortcut + y


class ResNet(nn.Module):
    """ResNet v1 / v2 backbone with a linear classifier; see the module docstring for the layout.

    `__call__(x, train=False)` takes NHWC images (any size the strides allow, >= 32 px for the ImageNet
    stem) and returns {"stem", "stage1", ..., "pre_logits", "logits"}.
    """

    stage_sizes: Sequence[int] = STAGE_SIZES[50]
    version: int = 1
    bottleneck: bool = True
    width: float = 1.0  # multiplies every conv's channel count (stem and stages)
    stage_widths: Sequence[int] = (64, 128, 256, 512)  # bottleneck widths (block outputs are x4)
    stem_width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True  # 3x3 stride-2 max-pool after the stem conv
    stride_in_1x1: bool = True  # v1 bottleneck only: Keras (True) or torchvision (False) stride placement
    layout: str = "keras"  # "slim": TF-Slim's stride placement, shortcuts and stem pool (module docstring)
    conv_bias: bool = True  # Keras convs carry biases (v2: only those not followed by BatchNorm)
    num_classes: int = 1000
    epsilon: float = 1.001e-5  # keras.applications ResNet's BatchNorm epsilon
    bn_momentum: float = 0.99  # Keras' default; only matters when training
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Inference mode without BatchNorm ops: each BatchNorm folded into the conv before it, v2's
    # pre-activation ones precomputed as ScaleShift (embjax.models.folding.fold_variables makes the variables).
    fold_bn: bool = False

    def _check(self):
        if self.version not in (1, 2):
            raise ValueError(f"ResNet version must be 1 or 2, got {self.version!r}")
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError(
                f"ResNet stage_sizes {tuple(self.stage_sizes)} and stage_widths {tuple(self.stage_widths)} "
                "must have the same length (one width per stage)"
            )
        if not self.stage_sizes or min(self.stage_sizes) < 1:
            raise ValueError(f"ResNet stage_sizes must be positive block counts, got {tuple(self.stage_sizes)}")
        if self.width <= 0:
            raise ValueError(f"ResNet width multiplier must be positive, got {self.width}")
        if self.layout not in ("keras", "slim"):
            raise ValueError(f"ResNet layout must be 'keras' or 'slim', got {self.layout!r}")
        if self.layout == "slim" and not self.bottleneck:
            raise ValueError("ResNet layout 'slim' exists for bottleneck blocks only (TF-Slim has no basic blocks)")

    def _scaled(self, channels):
        return max(1, int(round(channels * self.width)))

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        self._check()
        layers.check_inference("ResNet", self.fold_bn, train)
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        v2 = self.version == 2
        slim = self.layout == "slim"
        x = x.astype(self.dtype)
        common = dict(
            stride_in_1x1=self.stride_in_1x1 and not slim,
            conv_bias=self.conv_bias,
            epsilon=self.epsilon,
            bn_momentum=self.bn_momentum,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            fold_bn=self.fold_bn,
        )
        out = {}

        pad = self.stem_kernel // 2
        x = nn.Conv(
            self._scaled(self.stem_width),
            (self.stem_kernel, self.stem_kernel),
            strides=(self.stem_stride, self.stem_stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=self.conv_bias or (self.fold_bn and not v2),
            kernel_init=_KERNEL_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1_conv",
        )(x)
        if not v2 and not self.fold_bn:
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv1_bn",
            )(x)
        if not v2:
            x = nn.relu(x)
        x = layers.tap(None, "conv1_conv", x, "conv")
        if self.stem_pool and slim:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")  # TF "SAME": -inf, at the end
        elif self.stem_pool:
            # Keras pads with zeros, not -inf: identical after a ReLU (v1), not for v2's raw stem output.
            x = nn.max_pool(_pad(x, (1, 1)), (3, 3), strides=(2, 2), padding="VALID")
        out["stem"] = layers.tap(None, "stem", x, "block")

        block_cls = {
            (1, True): BottleneckV1,
            (1, False): BasicV1,
            (2, True): BottleneckV2,
            (2, False): BasicV2,
        }[(self.version, self.bottleneck)]
        expansion = 4 if self.bottleneck else 1
        last = len(self.stage_sizes) - 1
        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            filters = self._scaled(width)
            for j in range(blocks):
                if v2 or slim:
                    # Keras v2 and TF-Slim stride the last block of every stage but the last one.
                    strides = 2 if (j == blocks - 1 and i != last) else 1
                else:
                    strides = 2 if (j == 0 and i > 0) else 1
                in_channels = x.shape[-1]
                # A projection wherever the shortcut changes shape; for Keras v1/v2 bottlenecks this is
                # exactly "the first block of each stage" (conv_shortcut=True there, False elsewhere).
                # TF-Slim projects only when the channel count changes.
                project = in_channels != expansion * filters or (strides != 1 and not (v2 or slim))
                x = block_cls(
                    filters=filters,
                    strides=strides,
                    project=project,
                    name=f"conv{i + 2}_block{j + 1}",
                    **common,
                )(x, train=train)
            out[f"stage{i + 1}"] = layers.tap(None, f"stage{i + 1}", x, "block")

        if v2 and self.fold_bn:
            x = nn.relu(layers.ScaleShift(self.dtype, self.param_dtype, name="post_bn")(x))
        elif v2:
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="post_bn",
            )(x)
            x = nn.relu(x)
        # Pool in float32: the embedding study accumulates these features, and a bfloat16 mean over
        # 49+ positions would throw away digits the statistics need.
        pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out["pre_logits"] = pre_logits
        out["logits"] = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="predictions"
        )(pre_logits)
        return out


def resnet(depth: int, version: int = 1, num_classes: int = 1000, **overrides) -> ResNet:
    """The standard ResNet of `depth` (18, 34, 50, 101, 152), version 1 or 2, ImageNet stem."""
    if depth not in STAGE_SIZES:
        raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {depth!r}")
    fields = dict(
        stage_sizes=STAGE_SIZES[depth],
        version=version,
        bottleneck=depth in BOTTLENECK_DEPTHS,
        num_classes=num_classes,
    )
    fields.update(overrides)
    return ResNet(**fields)


def slim_resnet(depth: int = 152, version: int = 1, num_classes: int = 1001, **overrides) -> ResNet:
    """TF-Slim's resnet_v{version}_{depth}: `layout="slim"` with the constants of slim's resnet_arg_scope
    (BatchNorm epsilon 1e-5; v1 convs carry no biases, v2's unnormalized ones do)."""
    fields = dict(layout="slim", epsilon=1e-5, conv_bias=version == 2, num_classes=num_classes)
    fields.update(overrides)
    return resnet(depth, version, **fields)


def small_resnet_v1(num_classes: int = 10, **overrides) -> ResNet:
    """Zoo ResNet-v1 for 28x28x1: 3x3 stride-2 stem (28->14 px), three basic-block stages 16/32/64.

    14 -> 7 -> 4 px through the stages; pre_logits width 64; 4.3 MFLOPs per image (XLA cost analysis),
    78k parameters.
    """
    fields = dict(
        stage_sizes=(1, 1, 1),
        version=1,
        bottleneck=False,
        stage_widths=(16, 32, 64),
        stem_width=16,
        stem_kernel=3,
        stem_stride=2,
        stem_pool=False,
        num_classes=num_classes,
        bn_momentum=0.9,  # a short training run needs running statistics that settle within an epoch
    )
    fields.update(overrides)
    return ResNet(**fields)


def small_resnet_v2(num_classes: int = 10, **overrides) -> ResNet:
    """Zoo ResNet-v2 for 28x28x1: 3x3 stride-2 stem, three pre-activation bottleneck stages.

    Bottleneck widths 16/24/24 (outputs 64/96/96), two blocks each, Keras v2 stride placement
    (14 -> 7 -> 4 px); pre_logits width 96; 5.1 MFLOPs per image (XLA cost analysis), 57k parameters.
    """
    fields = dict(
        stage_sizes=(2, 2, 2),
        version=2,
        bottleneck=True,
        stage_widths=(16, 24, 24),
        stem_width=16,
        stem_kernel=3,
        stem_stride=2,
        stem_pool=False,
        num_classes=num_classes,
        bn_momentum=0.9,
    )
    fields.update(overrides)
    return ResNet(**fields)


__all__ = [
    "ResNet",
    "BottleneckV1",
    "BasicV1",
    "BottleneckV2",
    "BasicV2",
    "STAGE_SIZES",
    "resnet",
    "slim_resnet",
    "small_resnet_v1",
    "small_resnet_v2",
]
