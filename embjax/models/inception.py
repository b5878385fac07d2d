"""Inception family as Flax linen modules: Inception-v3, Inception-ResNet-v2 and a small Inception.

This module owns the architectures only; `embjax.models.convert.keras_inception` owns the mapping of
keras.applications weights onto them. The layer structure, widths, strides, paddings, the residual
scales of Inception-ResNet-v2 and the BatchNorm constants (epsilon 1e-3, no BatchNorm scale after a
convolution) follow `keras.applications.InceptionV3` / `InceptionResNetV2`, so converted Keras weights
give the same features.

Every model is NHWC, takes `train` (BatchNorm uses batch statistics and `mutable=["batch_stats"]` is
needed when True) and returns a dict of named outputs:

- `InceptionV3`: `stem` (after the five stem convolutions and two max-pools), `mixed0` … `mixed10`
  (Keras' names for the concatenated Inception blocks), `pre_logits` (batch, 2048), `logits`.
- `InceptionResNetV2`: `stem`, `mixed_5b`, `block35` (after the 10 Inception-ResNet-A blocks),
  `mixed_6a`, `block17` (after the 20 B blocks), `mixed_7a`, `block8` (after the 10 C blocks),
  `conv_7b`, `pre_logits` (batch, 1536), `logits`.
- `SmallInception` (`small_inception()`, for 28×28 grayscale Fashion-MNIST): `stem`, `mixed0`,
  `mixed1`, `mixed2`, `pre_logits` (batch, 128), `logits`.

Named layers (embjax.models.layers): every `ConvBN` after its BatchNorm and ReLU, named by its path
(`stem/conv1`, `mixed0/branch5x5_2`, `block35_3/branch2_1`, ...), the linear 1×1 `conv` of every
Inception-ResNet block before its scaled residual add (`block35_3/conv`), and the block outputs above.

`pre_logits` is the global average pool of the last feature map, the input of the classifier; it is
float32 whatever the computation dtype, since it is the embedding the studies measure.
Both ImageNet models accept any spatial size of at least 75×75 (Keras' minimum: smaller inputs shrink a
feature map to nothing) and expect inputs scaled to [-1, 1]. `dtype` is the computation dtype; parameters
stay float32. `fold_bn=True` (every module here) is the inference mode without BatchNorm ops: each
`ConvBN`'s convolution gets a bias holding the folded BatchNorm (embjax.models.folding makes the
variables); every named output is after its block's last BatchNorm + ReLU, so none changes meaning.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from embjax.models import layers

Dtype = Any

# keras.applications' Inception conv2d_bn uses BatchNormalization's default epsilon.
KERAS_INCEPTION_BN_EPSILON = 1e-3
# Below this size a stride-2 "valid" convolution in the reduction blocks gets an empty input.
MIN_INPUT_SIZE = 75


def slim_depth(width: int, multiplier: float = 1.0, min_depth: int = 16) -> int:
    """TF-Slim's width rule for Inception networks: max(int(width * multiplier), min_depth). The identity
    at multiplier 1 for every width these networks use (all >= 16)."""
    return max(int(width * multiplier), min_depth)


def _check_input(x, min_size: int, model: str):
    if x.ndim != 4:
        raise ValueError(f"{model} expects NHWC images of rank 4, got shape {x.shape}.")
    height, width = x.shape[1], x.shape[2]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{model} needs inputs of at least {min_size}x{min_size} pixels, got {height}x{width}; "
            "resize the images up (the ImageNet models were trained at 299x299)."
        )


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm without scale, optional ReLU (Keras' `conv2d_bn`)."""

    features: int
    kernel_size: Sequence[int]
    strides: int = 1
    padding: str = "SAME"
    relu: bool = True
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    momentum: float = 0.99  # Keras' default; only matters when training
    dtype: Dtype = jnp.float32
    fold_bn: bool = False  # inference: the BatchNorm folded into the conv's kernel and a bias

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(
            self.features,
            tuple(self.kernel_size),
            strides=self.strides,
            padding=self.padding,
            use_bias=self.fold_bn,
            dtype=self.dtype,
            name="conv",
        )(x)
        if not self.fold_bn:
            # The ReLU follows directly, so a BatchNorm scale would be redundant with the next conv.
            x = nn.BatchNorm(
                use_running_average=not train,
                use_scale=False,
                momentum=self.momentum,
                epsilon=self.epsilon,
                dtype=self.dtype,
                name="bn",
            )(x)
        return layers.tap(self, "", nn.relu(x) if self.relu else x, "conv")  # named by this module's path


def _avg_pool_same(x):
    # Keras/TF "same" average pooling divides by the number of real pixels under the window, not 9.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionStem(nn.Module):
    """The stem shared by Inception-v3 and Inception-ResNet-v2: 299 px -> 35×35×192."""

    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0  # TF-Slim's: every width w becomes max(int(w * m), min_depth)
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(ConvBN, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn)
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        x = conv(d(32), (3, 3), strides=2, padding="VALID", name="conv1")(x, train)
        x = conv(d(32), (3, 3), padding="VALID", name="conv2")(x, train)
        x = conv(d(64), (3, 3), name="conv3")(x, train)
        x = _max_pool_valid(x)
        x = conv(d(80), (1, 1), padding="VALID", name="conv4")(x, train)
        x = conv(d(192), (3, 3), padding="VALID", name="conv5")(x, train)
        return _max_pool_valid(x)


class InceptionA(nn.Module):
    """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1 (v3 mixed0-2, IRv2 mixed_5b)."""

    branch1x1: int = 64
    pool_features: int = 32
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0  # TF-Slim's: every width w becomes max(int(w * m), min_depth)
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(ConvBN, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn)
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        b1 = conv(d(self.branch1x1), (1, 1), name="branch1x1")(x, train)
        b5 = conv(d(48), (1, 1), name="branch5x5_1")(x, train)
        b5 = conv(d(64), (5, 5), name="branch5x5_2")(b5, train)
        b3 = conv(d(64), (1, 1), name="branch3x3dbl_1")(x, train)
        b3 = conv(d(96), (3, 3), name="branch3x3dbl_2")(b3, train)
        b3 = conv(d(96), (3, 3), name="branch3x3dbl_3")(b3, train)
        bp = conv(d(self.pool_features), (1, 1), name="branch_pool")(_avg_pool_same(x), train)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class ReductionA(nn.Module):
    """35→17 reduction: 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2 (v3 mixed3, IRv2 mixed_6a)."""

    branch3x3: int = 384
    dbl: Sequence[int] = (64, 96, 96)
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0  # TF-Slim's: every width w becomes max(int(w * m), min_depth)
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(ConvBN, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn)
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        b3 = conv(d(self.branch3x3), (3, 3), strides=2, padding="VALID", name="branch3x3")(x, train)
        bd = conv(d(self.dbl[0]), (1, 1), name="branch3x3dbl_1")(x, train)
        bd = conv(d(self.dbl[1]), (3, 3), name="branch3x3dbl_2")(bd, train)
        bd = conv(d(self.dbl[2]), (3, 3), strides=2, padding="VALID", name="branch3x3dbl_3")(bd, train)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """17×17 block with factorized 7×7 convolutions (v3 mixed4-7)."""

    channels_7x7: int
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0  # TF-Slim's: every width w becomes max(int(w * m), min_depth)
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(ConvBN, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn)
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        c7 = self.channels_7x7
        b1 = conv(d(192), (1, 1), name="branch1x1")(x, train)
        b7 = conv(d(c7), (1, 1), name="branch7x7_1")(x, train)
        b7 = conv(d(c7), (1, 7), name="branch7x7_2")(b7, train)
        b7 = conv(d(192), (7, 1), name="branch7x7_3")(b7, train)
        bd = conv(d(c7), (1, 1), name="branch7x7dbl_1")(x, train)
        bd = conv(d(c7), (7, 1), name="branch7x7dbl_2")(bd, train)
        bd = conv(d(c7), (1, 7), name="branch7x7dbl_3")(bd, train)
        bd = conv(d(c7), (7, 1), name="branch7x7dbl_4")(bd, train)
        bd = conv(d(192), (1, 7), name="branch7x7dbl_5")(bd, train)
        bp = conv(d(192), (1, 1), name="branch_pool")(_avg_pool_same(x), train)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class ReductionB(nn.Module):
    """17→8 reduction of Inception-v3 (mixed8)."""

    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0  # TF-Slim's: every width w becomes max(int(w * m), min_depth)
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(ConvBN, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn)
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        b3 = conv(d(192), (1, 1), name="branch3x3_1")(x, train)
        b3 = conv(d(320), (3, 3), strides=2, padding="VALID", name="branch3x3_2")(b3, train)
        b7 = conv(d(192), (1, 1), name="branch7x7x3_1")(x, train)
        b7 = conv(d(192), (1, 7), name="branch7x7x3_2")(b7, train)
        b7 = conv(d(192), (7, 1), name="branch7x7x3_3")(b7, train)
        b7 = conv(d(192), (3, 3), strides=2, padding="VALID", name="branch7x7x3_4")(b7, train)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs (v3 mixed9, mixed10)."""

    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0  # TF-Slim's: every width w becomes max(int(w * m), min_depth)
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(ConvBN, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn)
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        b1 = conv(d(320), (1, 1), name="branch1x1")(x, train)
        b3 = conv(d(384), (1, 1), name="branch3x3_1")(x, train)
        b3 = jnp.concatenate(
            [
                conv(d(384), (1, 3), name="branch3x3_2a")(b3, train),
                conv(d(384), (3, 1), name="branch3x3_2b")(b3, train),
            ],
            axis=-1,
        )
        bd = conv(d(448), (1, 1), name="branch3x3dbl_1")(x, train)
        bd = conv(d(384), (3, 3), name="branch3x3dbl_2")(bd, train)
        bd = jnp.concatenate(
            [
                conv(d(384), (1, 3), name="branch3x3dbl_3a")(bd, train),
                conv(d(384), (3, 1), name="branch3x3dbl_3b")(bd, train),
            ],
            axis=-1,
        )
        bp = conv(d(192), (1, 1), name="branch_pool")(_avg_pool_same(x), train)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _block(out: dict, name: str, x):
    """out[name] = x, a block output among the named layers (embjax.models.layers)."""
    out[name] = layers.tap(None, name, x, "block")
    return x


def _classifier(x, num_classes: int, dtype: Dtype, out: dict) -> dict:
    # Global average pooling in float32 whatever the computation dtype: it is the embedding we measure.
    out["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out["logits"] = nn.Dense(num_classes, dtype=dtype, name="predictions")(out["pre_logits"])
    return out


class InceptionV3(nn.Module):
    """Inception-v3 (Szegedy et al., 2016) as built by keras.applications.InceptionV3.

    `depth_multiplier` / `min_depth` scale every width as TF-Slim's inception_v3 does (small test
    configurations; the defaults change nothing).
    """

    num_classes: int = 1000
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        _check_input(x, MIN_INPUT_SIZE, "InceptionV3")
        layers.check_inference("InceptionV3", self.fold_bn, train)
        kw = dict(epsilon=self.epsilon, dtype=self.dtype, depth_multiplier=self.depth_multiplier,
                  min_depth=self.min_depth, fold_bn=self.fold_bn)
        out = {}
        x = _block(out, "stem", InceptionStem(**kw, name="stem")(x, train))
        for i, pool_features in enumerate((32, 64, 64)):
            block = InceptionA(pool_features=pool_features, **kw, name=f"mixed{i}")
            x = _block(out, f"mixed{i}", block(x, train))
        x = _block(out, "mixed3", ReductionA(**kw, name="mixed3")(x, train))
        for i, c7 in zip(range(4, 8), (128, 160, 160, 192)):
            x = _block(out, f"mixed{i}", InceptionC(channels_7x7=c7, **kw, name=f"mixed{i}")(x, train))
        x = _block(out, "mixed8", ReductionB(**kw, name="mixed8")(x, train))
        for i in (9, 10):
            x = _block(out, f"mixed{i}", InceptionE(**kw, name=f"mixed{i}")(x, train))
        return _classifier(x, self.num_classes, self.dtype, out)


# Inception-ResNet-v2 residual branches: per block type, the branches as lists of (features, kernel),
# and the residual scale Keras uses for the first blocks of that type.
_RESIDUAL_BRANCHES = {
    "block35": (((32, (1, 1)),), ((32, (1, 1)), (32, (3, 3))), ((32, (1, 1)), (48, (3, 3)), (64, (3, 3)))),
    "block17": (((192, (1, 1)),), ((128, (1, 1)), (160, (1, 7)), (192, (7, 1)))),
    "block8": (((192, (1, 1)),), ((192, (1, 1)), (224, (1, 3)), (256, (3, 1)))),
}
RESIDUAL_SCALES = {"block35": 0.17, "block17": 0.1, "block8": 0.2}
RESIDUAL_REPEATS = {"block35": 10, "block17": 20, "block8": 10}


class InceptionResNetBlock(nn.Module):
    """x + scale · conv1x1(concat(branches(x))), then ReLU unless `relu=False` (the last block8).

    Branch convolutions are named `branch{b}_{k}` (branch b, k-th conv in it, both from 0); the 1×1
    projection back to the input width is `conv`, a plain convolution with bias and no BatchNorm.
    """

    block_type: str
    scale: float
    relu: bool = True
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0  # TF-Slim's width rule (slim_depth); 1.0 changes nothing
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block_type not in _RESIDUAL_BRANCHES:
            raise ValueError(
                f"Unknown Inception-ResNet block type {self.block_type!r}; "
                f"expected one of {sorted(_RESIDUAL_BRANCHES)}."
            )
        branches = []
        for b, convs in enumerate(_RESIDUAL_BRANCHES[self.block_type]):
            h = x
            for k, (features, kernel) in enumerate(convs):
                width = slim_depth(features, self.depth_multiplier, self.min_depth)
                h = ConvBN(width, kernel, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn,
                           name=f"branch{b}_{k}")(
                    h, train
                )
            branches.append(h)
        up = nn.Conv(x.shape[-1], (1, 1), use_bias=True, dtype=self.dtype, name="conv")(
            jnp.concatenate(branches, axis=-1)
        )
        up = layers.tap(self, "conv", up, "conv")  # linear: no BatchNorm, no activation before the scaled add
        x = x + up * self.scale
        return nn.relu(x) if self.relu else x


class Reduction7a(nn.Module):
    """17→8 reduction of Inception-ResNet-v2 (mixed_7a)."""

    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(ConvBN, epsilon=self.epsilon, dtype=self.dtype, fold_bn=self.fold_bn)
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        b0 = conv(d(256), (1, 1), name="branch0_0")(x, train)
        b0 = conv(d(384), (3, 3), strides=2, padding="VALID", name="branch0_1")(b0, train)
        b1 = conv(d(256), (1, 1), name="branch1_0")(x, train)
        b1 = conv(d(288), (3, 3), strides=2, padding="VALID", name="branch1_1")(b1, train)
        b2 = conv(d(256), (1, 1), name="branch2_0")(x, train)
        b2 = conv(d(288), (3, 3), name="branch2_1")(b2, train)
        b2 = conv(d(320), (3, 3), strides=2, padding="VALID", name="branch2_2")(b2, train)
        return jnp.concatenate([b0, b1, b2, _max_pool_valid(x)], axis=-1)


class InceptionResNetV2(nn.Module):
    """Inception-ResNet-v2 (Szegedy et al., 2017) as built by keras.applications.InceptionResNetV2.

    Residual blocks are top-level submodules named like Keras' layers: `block35_1` … `block35_10`,
    `block17_1` … `block17_20`, `block8_1` … `block8_10` (the last one with scale 1 and no ReLU).
    `depth_multiplier` / `min_depth` (TF-Slim's width rule, `slim_depth`) and `repeats` (blocks of each
    type) give small test configurations; the defaults are the real network.
    """

    num_classes: int = 1000
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0
    min_depth: int = 16
    fold_bn: bool = False
    repeats: Sequence[int] = (10, 20, 10)  # block35, block17, block8 (the last block8 included)

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        _check_input(x, MIN_INPUT_SIZE, "InceptionResNetV2")
        layers.check_inference("InceptionResNetV2", self.fold_bn, train)
        kw = dict(epsilon=self.epsilon, dtype=self.dtype, depth_multiplier=self.depth_multiplier,
                  min_depth=self.min_depth, fold_bn=self.fold_bn)
        out = {}
        repeats = dict(zip(("block35", "block17", "block8"), self.repeats))

        def residual_group(x, block_type):
            n = repeats[block_type]
            for i in range(1, n + 1):
                last_block8 = block_type == "block8" and i == n
                x = InceptionResNetBlock(
                    block_type,
                    scale=1.0 if last_block8 else RESIDUAL_SCALES[block_type],
                    relu=not last_block8,
                    **kw,
                    name=f"{block_type}_{i}",
                )(x, train)
            return _block(out, block_type, x)

        x = _block(out, "stem", InceptionStem(**kw, name="stem")(x, train))
        x = _block(out, "mixed_5b", InceptionA(branch1x1=96, pool_features=64, **kw, name="mixed_5b")(x, train))
        x = residual_group(x, "block35")
        reduction = ReductionA(branch3x3=384, dbl=(256, 256, 384), **kw, name="mixed_6a")
        x = _block(out, "mixed_6a", reduction(x, train))
        x = residual_group(x, "block17")
        x = _block(out, "mixed_7a", Reduction7a(**kw, name="mixed_7a")(x, train))
        x = residual_group(x, "block8")
        d = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        x = _block(out, "conv_7b", ConvBN(d(1536), (1, 1), epsilon=self.epsilon, dtype=self.dtype,
                                          fold_bn=self.fold_bn, name="conv_7b")(x, train))
        return _classifier(x, self.num_classes, self.dtype, out)


class SmallInception(nn.Module):
    """A reduced Inception for 28×28 grayscale images (the Fashion-MNIST zoo), pre_logits width 128.

    28×28 stem conv + 3×3/2 max-pool -> 14×14×24; `mixed0`: Inception-A block at 14×14 (64 channels);
    `mixed1`: reduction to 7×7 (conv 3×3/2, 1×1→3×3→3×3/2, max-pool; 128 channels); `mixed2`: an
    Inception-E style block with split 1×3 / 3×1 convolutions at 7×7 (128 channels). About 9.3 MFLOPs
    per image by XLA's cost analysis (tests/test_inception.py checks it stays under 10 M).
    """

    num_classes: int = 10
    epsilon: float = KERAS_INCEPTION_BN_EPSILON
    # The zoo trains for about 150 steps: running statistics with momentum 0.99 would still be mostly
    # their initial values (0.99^150 = 0.22), and the model would be scored with the wrong BatchNorm.
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        _check_input(x, 8, "SmallInception")
        layers.check_inference("SmallInception", self.fold_bn, train)
        conv = functools.partial(ConvBN, epsilon=self.epsilon, momentum=self.bn_momentum, dtype=self.dtype,
                                 fold_bn=self.fold_bn)
        out = {}
        x = conv(24, (3, 3), name="stem_conv")(x, train)
        x = _block(out, "stem", nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME"))

        b1 = conv(16, (1, 1), name="mixed0_branch1x1")(x, train)
        b3 = conv(12, (1, 1), name="mixed0_branch3x3_1")(x, train)
        b3 = conv(16, (3, 3), name="mixed0_branch3x3_2")(b3, train)
        bd = conv(12, (1, 1), name="mixed0_branch3x3dbl_1")(x, train)
        bd = conv(16, (3, 3), name="mixed0_branch3x3dbl_2")(bd, train)
        bd = conv(16, (3, 3), name="mixed0_branch3x3dbl_3")(bd, train)
        bp = conv(16, (1, 1), name="mixed0_branch_pool")(_avg_pool_same(x), train)
        x = _block(out, "mixed0", jnp.concatenate([b1, b3, bd, bp], axis=-1))

        # SAME padding on the stride-2 paths keeps 14 -> 7 exactly (VALID would give 6).
        b3 = conv(40, (3, 3), strides=2, name="mixed1_branch3x3")(x, train)
        bd = conv(16, (1, 1), name="mixed1_branch3x3dbl_1")(x, train)
        bd = conv(24, (3, 3), name="mixed1_branch3x3dbl_2")(bd, train)
        bd = conv(24, (3, 3), strides=2, name="mixed1_branch3x3dbl_3")(bd, train)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        x = _block(out, "mixed1", jnp.concatenate([b3, bd, bp], axis=-1))

        b1 = conv(32, (1, 1), name="mixed2_branch1x1")(x, train)
        b3 = conv(32, (1, 1), name="mixed2_branch3x3_1")(x, train)
        b3a = conv(24, (1, 3), name="mixed2_branch3x3_2a")(b3, train)
        b3b = conv(24, (3, 1), name="mixed2_branch3x3_2b")(b3, train)
        bp = conv(48, (1, 1), name="mixed2_branch_pool")(_avg_pool_same(x), train)
        x = _block(out, "mixed2", jnp.concatenate([b1, b3a, b3b, bp], axis=-1))
        return _classifier(x, self.num_classes, self.dtype, out)


def small_inception(num_classes: int = 10, dtype: Dtype = jnp.float32) -> SmallInception:
    """The Inception of the Fashion-MNIST zoo: 28×28×1 inputs, `pre_logits` width 128."""
    return SmallInception(num_classes=num_classes, dtype=dtype)
