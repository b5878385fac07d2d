"""iResNet face-embedding backbones in Flax: the architecture of insightface's ArcFace models.

Layout (Deng et al., ArcFace; Duta et al.'s "improved" residual unit as insightface implements it):

* stem: 3×3 conv (stride 1, no bias) → BatchNorm → PReLU (one slope per channel), at 112×112;
* four stages of `IBasicBlock`s, widths 64/128/256/512; the first block of every stage has stride 2
  (on its second conv) and a projection shortcut (1×1 conv with the stride → BatchNorm);
* a block is BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, added to the shortcut, with no
  activation after the sum;
* head: BN over the 7×7×512 map → flatten → (dropout, the identity at inference) → fully connected to
  the embedding width → BatchNorm1d ("features"). That BatchNorm's output is the embedding.

All convolutions pad symmetrically by 1 (PyTorch's padding=1) and carry no bias; every BatchNorm has
epsilon 1e-5. The fully connected layer reads the flattened map in (H, W, C) order here, PyTorch's in
(C, H, W); the converter in embjax.models.convert.insightface permutes its rows.

There is no classifier: ArcFace's margin head is a training-only loss, so the registry lists these
models with num_classes None. Returned features: `stem`, `stage1`..`stage4`, `pre_fc` (the flattened
map after the final BN: 25,088 values of an unpooled 7×7×512 map, not a layer of its own, so not among
the named layers) and `pre_logits` (the embedding, float32; among the named layers as `fc`, the fully
connected layer after its BatchNorm); and every convolution's output after its BatchNorm (and PReLU,
where one follows), named by its weights' path (`layer1_0/conv1`, `layer1_0/downsample_conv`, ...; the
named layers of embjax.models.layers). Module and parameter names mirror
insightface's state-dict names (`conv1`, `bn1`, `prelu`, `layer1_0/bn1`, `layer1_0/downsample_conv`,
`bn2`, `fc`, `features`).

`fold_bn=True` is the inference mode without BatchNorm ops (embjax.models.folding makes its variables):
every BatchNorm that follows a convolution (`bn2`, `bn3`, `downsample_bn` of a block, the stem's `bn1`)
and the embedding's `features` after `fc` fold into that layer's kernel and a bias. A block's `bn1` reads
the residual stream, which also flows on raw through the shortcut and into the named `stage*` outputs,
and the head's `bn2` reads `stage4`: those two stay, as precomputed `ScaleShift`s under the same names.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from embjax.models import layers

STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
EPSILON = 1e-5
_PAD1 = ((1, 1), (1, 1))


class PReLU(nn.Module):
    """max(0, x) + a·min(0, x) with one slope a per channel (PyTorch nn.PReLU(num_parameters=C))."""

    init_slope: float = 0.25
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        slope = self.param("negative_slope", nn.initializers.constant(self.init_slope), (x.shape[-1],),
                           self.param_dtype)
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class IBasicBlock(nn.Module):
    planes: int
    strides: int
    project: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(name, keep=False):
            return layers.batchnorm(self.fold_bn, name, train=train, keep=keep, dtype=self.dtype,
                                     param_dtype=self.param_dtype, momentum=0.9, epsilon=EPSILON)

        def conv(features, kernel, strides, padding, name):
            return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                           use_bias=self.fold_bn, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        y = bn("bn1", keep=True)(x)
        y = conv(self.planes, 3, 1, _PAD1, "conv1")(y)
        y = bn("bn2")(y)
        y = layers.tap(self, "conv1", PReLU(param_dtype=self.param_dtype, name="prelu")(y), "conv")
        y = conv(self.planes, 3, self.strides, _PAD1, "conv2")(y)
        y = layers.tap(self, "conv2", bn("bn3")(y), "conv")  # no activation before the residual add
        shortcut = x
        if self.project:
            shortcut = conv(self.planes, 1, self.strides, "VALID", "downsample_conv")(x)
            shortcut = layers.tap(self, "downsample_conv", bn("downsample_bn")(shortcut), "conv")
        return y + shortcut


class IResNet(nn.Module):
    """iResNet backbone returning {"stem", "stage1".., "pre_fc", "pre_logits"}; see the module docstring.

    `__call__(x, train=False)` takes NHWC images whose side is 16 × `fc_grid` (112 for the ArcFace
    models), already scaled as (x − 127.5) / 127.5.
    """

    stage_sizes: Sequence[int] = STAGE_SIZES[50]
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    num_features: int = 512
    fc_grid: int = 7  # spatial side of the last stage's map: input 112 / 2⁴
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    fold_bn: bool = False  # inference: BatchNorm folded into the layer before it (see the module docstring)

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        layers.check_inference("IResNet", self.fold_bn, train)
        if x.ndim != 4:
            raise ValueError(f"IResNet expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        side = 16 * self.fc_grid
        if x.shape[1:3] != (side, side):
            raise ValueError(f"IResNet with fc_grid {self.fc_grid} needs {side}×{side} inputs (its fully connected "
                             f"layer reads a {self.fc_grid}×{self.fc_grid} map), got {x.shape[1]}×{x.shape[2]}")
        if len(self.stage_sizes) != len(self.stage_widths) or min(self.stage_sizes) < 1:
            raise ValueError(f"IResNet stage_sizes {tuple(self.stage_sizes)} must be positive and match "
                             f"stage_widths {tuple(self.stage_widths)}")

        def bn(name, keep=False, dtype=self.dtype):
            return layers.batchnorm(self.fold_bn, name, train=train, keep=keep, dtype=dtype,
                                     param_dtype=self.param_dtype, momentum=0.9, epsilon=EPSILON)

        out = {}
        x = x.astype(self.dtype)
        x = nn.Conv(self.stem_width, (3, 3), padding=_PAD1, use_bias=self.fold_bn, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv1")(x)
        x = PReLU(param_dtype=self.param_dtype, name="prelu")(bn("bn1")(x))
        out["stem"] = layers.tap(None, "stem", x, "conv", "block")
        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for j in range(blocks):
                strides = 2 if j == 0 else 1
                project = j == 0  # stride 2 in every stage's first block, so it always projects
                x = IBasicBlock(width, strides, project, dtype=self.dtype, param_dtype=self.param_dtype,
                                fold_bn=self.fold_bn, name=f"layer{i + 1}_{j}")(x, train=train)
            out[f"stage{i + 1}"] = layers.tap(None, f"stage{i + 1}", x, "block")
        x = bn("bn2", keep=True)(x)
        # Flatten and the fully connected layer in float32: the embedding is what the studies accumulate.
        x = x.astype(jnp.float32).reshape(x.shape[0], -1)
        out["pre_fc"] = x
        x = nn.Dense(self.num_features, dtype=jnp.float32, param_dtype=self.param_dtype, name="fc")(x)
        x = bn("features", dtype=jnp.float32)(x)
        out["pre_logits"] = layers.tap(None, "fc", x, "fc", "block")  # the embedding: fc + its BatchNorm
        return out


def iresnet(depth: int, **overrides) -> IResNet:
    """The insightface iResNet of `depth` (18, 34, 50, 100, 200) with a 512-d embedding."""
    if depth not in STAGE_SIZES:
        raise ValueError(f"iResNet depth must be one of {sorted(STAGE_SIZES)}, got {depth!r}")
    return IResNet(**{"stage_sizes": STAGE_SIZES[depth], **overrides})
