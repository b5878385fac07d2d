"""TF-Slim's Inception-v1 (GoogLeNet with BatchNorm), Inception-v2 (BN-Inception) and Inception-v4 as Flax modules.

This module owns the architectures only; `embjax.models.convert.timm_models` maps timm's `inception_v4` state dict
onto `InceptionV4`. Layer structure, widths, strides and paddings follow TF-Slim's `nets/inception_v1.py`,
`inception_v2.py` and `inception_v4.py`, and Flax modules carry TF-Slim's scope names
(`Mixed_4b/Branch_1/Conv2d_0b_3x3`, with `conv` and `bn` inside), so a TF-Slim checkpoint maps by name.

Constants as TF-Slim's `inception_arg_scope` defines them: every convolution has no bias and is followed
by BatchNorm with epsilon 1e-3 and *no scale* (`batch_norm_scale=False`), then ReLU; except v2's separable
stem, which that arg scope does not reach (biases and ReLU, no BatchNorm). Padding is TF "SAME"
(asymmetric for stride 2 on even sizes; Flax's "SAME" is the same rule) except where TF-Slim says "VALID"
(Inception-v4's stem and reductions). Average pools do not count padding (TF's "SAME" average pooling).

Differences from TF-Slim, on purpose: `pre_logits` is the global average of the last block whatever the
input size (TF-Slim's v1/v2 use a fixed 7×7 window, the same thing at 224 px; its v4 already pools
globally), and the classifier is a Dense layer `logits` (TF-Slim's 1×1 convolution / fully-connected
`Logits`, the same map). Dropout and the auxiliary heads are training-only and left out.

Outputs (dict): every TF-Slim end point (`Conv2d_1a_7x7`, `MaxPool_2a_3x3`, …, `Mixed_5c` for v1/v2;
`Conv2d_1a_3x3` … `Mixed_7d` for v4), `stem` (the same array as the end point before the first
Inception block: `MaxPool_3a_3x3` for v1/v2, `Mixed_5a` for v4; an alias, so not among the named layers),
`pre_logits` (float32; 1024 for v1/v2, 1536 for v4) and `logits`. Named layers (embjax.models.layers):
every convolution after its BatchNorm and ReLU (`Mixed_4b/Branch_1/Conv2d_0b_3x3`; a stem convolution
is also an end point, kinds conv and block), v2's separable stem convolution as one layer, the
max-pool end points (kind pool: never part of an embedding) and the Inception blocks (block).
NHWC inputs scaled to [-1, 1].

`fold_bn=True` is the inference mode without BatchNorm ops (embjax.models.folding makes its variables):
every BatchNorm here follows its convolution directly, so each folds into that convolution's kernel and a
bias (v2's separable stem has no BatchNorm and is unchanged).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from embjax.models import layers
from embjax.models.inception import ConvBN, slim_depth

Dtype = Any

BN_EPSILON = 1e-3  # TF-Slim inception_arg_scope
BN_MOMENTUM = 0.9997  # TF-Slim's batch_norm_decay; only matters when training

# A layer: ("conv", name, features, (kh, kw), stride, padding)
#          ("max" | "avg", name, (kh, kw), stride, padding)
#          ("sepconv", name, features, (kh, kw), stride, max_multiplier)       (v2's stem; the depthwise
#                                                                               multiplier is
#                                                                               min(features // 3, max))
#          ("split", ((name, features, (kh, kw)), (name, features, (kh, kw))))  (v4's C blocks: two convs
#                                                                               on one input, concatenated)
# An end point: (name, layer) or (name, (branch, branch, ...)) with a branch a tuple of layers, each branch
# in a `Branch_<b>` scope and the branches concatenated on channels.


def _c(name, features, kernel=1, stride=1, padding="SAME"):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return ("conv", name, features, kernel, stride, padding)


def _pool(kind, name, window=3, stride=1, padding="SAME"):
    return (kind, name, (window, window), stride, padding)


def _v1_mixed(b0, b1, b2, b3, b2_name="Conv2d_0b_3x3"):
    # TF-Slim's GoogLeNet uses 3×3 (not 5×5) in branch 2 and max-pool in branch 3.
    return (
        (_c("Conv2d_0a_1x1", b0),),
        (_c("Conv2d_0a_1x1", b1[0]), _c("Conv2d_0b_3x3", b1[1], 3)),
        (_c("Conv2d_0a_1x1", b2[0]), _c(b2_name, b2[1], 3)),
        (_pool("max", "MaxPool_0a_3x3"), _c("Conv2d_0b_1x1", b3)),
    )


INCEPTION_V1 = (
    ("Conv2d_1a_7x7", _c("Conv2d_1a_7x7", 64, 7, 2)),
    ("MaxPool_2a_3x3", _pool("max", "MaxPool_2a_3x3", 3, 2)),
    ("Conv2d_2b_1x1", _c("Conv2d_2b_1x1", 64)),
    ("Conv2d_2c_3x3", _c("Conv2d_2c_3x3", 192, 3)),
    ("MaxPool_3a_3x3", _pool("max", "MaxPool_3a_3x3", 3, 2)),
    ("Mixed_3b", _v1_mixed(64, (96, 128), (16, 32), 32)),
    ("Mixed_3c", _v1_mixed(128, (128, 192), (32, 96), 64)),
    ("MaxPool_4a_3x3", _pool("max", "MaxPool_4a_3x3", 3, 2)),
    ("Mixed_4b", _v1_mixed(192, (96, 208), (16, 48), 64)),
    ("Mixed_4c", _v1_mixed(160, (112, 224), (24, 64), 64)),
    ("Mixed_4d", _v1_mixed(128, (128, 256), (24, 64), 64)),
    ("Mixed_4e", _v1_mixed(112, (144, 288), (32, 64), 64)),
    ("Mixed_4f", _v1_mixed(256, (160, 320), (32, 128), 128)),
    ("MaxPool_5a_2x2", _pool("max", "MaxPool_5a_2x2", 2, 2)),
    # TF-Slim names this 3×3 convolution Conv2d_0a_3x3 in Mixed_5b only.
    ("Mixed_5b", _v1_mixed(256, (160, 320), (32, 128), 128, b2_name="Conv2d_0a_3x3")),
    ("Mixed_5c", _v1_mixed(384, (192, 384), (48, 128), 128)),
)


def _v2_mixed(b0, b1, b2, b3, pool="avg"):
    return (
        (_c("Conv2d_0a_1x1", b0),),
        (_c("Conv2d_0a_1x1", b1[0]), _c("Conv2d_0b_3x3", b1[1], 3)),
        (_c("Conv2d_0a_1x1", b2[0]), _c("Conv2d_0b_3x3", b2[1], 3), _c("Conv2d_0c_3x3", b2[2], 3)),
        (_pool(pool, f"{'AvgPool' if pool == 'avg' else 'MaxPool'}_0a_3x3"), _c("Conv2d_0b_1x1", b3)),
    )


def _v2_reduction(b0, b1):
    return (
        (_c("Conv2d_0a_1x1", b0[0]), _c("Conv2d_1a_3x3", b0[1], 3, 2)),
        (_c("Conv2d_0a_1x1", b1[0]), _c("Conv2d_0b_3x3", b1[1], 3), _c("Conv2d_1a_3x3", b1[2], 3, 2)),
        (_pool("max", "MaxPool_1a_3x3", 3, 2),),
    )


INCEPTION_V2 = (
    # A separable 7×7 stem: depthwise with multiplier min(int(64 / 3), 8) = 8 (24 channels), then 1×1 to 64.
    ("Conv2d_1a_7x7", ("sepconv", "Conv2d_1a_7x7", 64, (7, 7), 2, 8)),
    ("MaxPool_2a_3x3", _pool("max", "MaxPool_2a_3x3", 3, 2)),
    ("Conv2d_2b_1x1", _c("Conv2d_2b_1x1", 64)),
    ("Conv2d_2c_3x3", _c("Conv2d_2c_3x3", 192, 3)),
    ("MaxPool_3a_3x3", _pool("max", "MaxPool_3a_3x3", 3, 2)),
    ("Mixed_3b", _v2_mixed(64, (64, 64), (64, 96, 96), 32)),
    ("Mixed_3c", _v2_mixed(64, (64, 96), (64, 96, 96), 64)),
    ("Mixed_4a", _v2_reduction((128, 160), (64, 96, 96))),
    ("Mixed_4b", _v2_mixed(224, (64, 96), (96, 128, 128), 128)),
    ("Mixed_4c", _v2_mixed(192, (96, 128), (96, 128, 128), 128)),
    ("Mixed_4d", _v2_mixed(160, (128, 160), (128, 160, 160), 96)),
    ("Mixed_4e", _v2_mixed(96, (128, 192), (160, 192, 192), 96)),
    ("Mixed_5a", _v2_reduction((128, 192), (192, 256, 256))),
    ("Mixed_5b", _v2_mixed(352, (192, 320), (160, 224, 224), 128)),
    ("Mixed_5c", _v2_mixed(352, (192, 320), (192, 224, 224), 128, pool="max")),
)

_V = "VALID"
_V4_A = (
    (_c("Conv2d_0a_1x1", 96),),
    (_c("Conv2d_0a_1x1", 64), _c("Conv2d_0b_3x3", 96, 3)),
    (_c("Conv2d_0a_1x1", 64), _c("Conv2d_0b_3x3", 96, 3), _c("Conv2d_0c_3x3", 96, 3)),
    (_pool("avg", "AvgPool_0a_3x3"), _c("Conv2d_0b_1x1", 96)),
)
_V4_B = (
    (_c("Conv2d_0a_1x1", 384),),
    (_c("Conv2d_0a_1x1", 192), _c("Conv2d_0b_1x7", 224, (1, 7)), _c("Conv2d_0c_7x1", 256, (7, 1))),
    (_c("Conv2d_0a_1x1", 192), _c("Conv2d_0b_7x1", 192, (7, 1)), _c("Conv2d_0c_1x7", 224, (1, 7)),
     _c("Conv2d_0d_7x1", 224, (7, 1)), _c("Conv2d_0e_1x7", 256, (1, 7))),
    (_pool("avg", "AvgPool_0a_3x3"), _c("Conv2d_0b_1x1", 128)),
)
_V4_C = (
    (_c("Conv2d_0a_1x1", 256),),
    (_c("Conv2d_0a_1x1", 384), ("split", (("Conv2d_0b_1x3", 256, (1, 3)), ("Conv2d_0c_3x1", 256, (3, 1))))),
    (_c("Conv2d_0a_1x1", 384), _c("Conv2d_0b_3x1", 448, (3, 1)), _c("Conv2d_0c_1x3", 512, (1, 3)),
     ("split", (("Conv2d_0d_1x3", 256, (1, 3)), ("Conv2d_0e_3x1", 256, (3, 1))))),
    (_pool("avg", "AvgPool_0a_3x3"), _c("Conv2d_0b_1x1", 256)),
)
INCEPTION_V4 = (
    ("Conv2d_1a_3x3", _c("Conv2d_1a_3x3", 32, 3, 2, _V)),
    ("Conv2d_2a_3x3", _c("Conv2d_2a_3x3", 32, 3, 1, _V)),
    ("Conv2d_2b_3x3", _c("Conv2d_2b_3x3", 64, 3)),
    ("Mixed_3a", ((_pool("max", "MaxPool_0a_3x3", 3, 2, _V),), (_c("Conv2d_0a_3x3", 96, 3, 2, _V),))),
    ("Mixed_4a", (
        (_c("Conv2d_0a_1x1", 64), _c("Conv2d_1a_3x3", 96, 3, 1, _V)),
        (_c("Conv2d_0a_1x1", 64), _c("Conv2d_0b_1x7", 64, (1, 7)), _c("Conv2d_0c_7x1", 64, (7, 1)),
         _c("Conv2d_1a_3x3", 96, 3, 1, _V)),
    )),
    ("Mixed_5a", ((_c("Conv2d_1a_3x3", 192, 3, 2, _V),), (_pool("max", "MaxPool_1a_3x3", 3, 2, _V),))),
    *((f"Mixed_5{c}", _V4_A) for c in "bcde"),
    ("Mixed_6a", (
        (_c("Conv2d_1a_3x3", 384, 3, 2, _V),),
        (_c("Conv2d_0a_1x1", 192), _c("Conv2d_0b_3x3", 224, 3), _c("Conv2d_1a_3x3", 256, 3, 2, _V)),
        (_pool("max", "MaxPool_1a_3x3", 3, 2, _V),),
    )),
    *((f"Mixed_6{c}", _V4_B) for c in "bcdefgh"),
    ("Mixed_7a", (
        (_c("Conv2d_0a_1x1", 192), _c("Conv2d_1a_3x3", 192, 3, 2, _V)),
        (_c("Conv2d_0a_1x1", 256), _c("Conv2d_0b_1x7", 256, (1, 7)), _c("Conv2d_0c_7x1", 320, (7, 1)),
         _c("Conv2d_1a_3x3", 320, 3, 2, _V)),
        (_pool("max", "MaxPool_1a_3x3", 3, 2, _V),),
    )),
    *((f"Mixed_7{c}", _V4_C) for c in "bcd"),
)

ARCHITECTURES = {"inception_v1": INCEPTION_V1, "inception_v2": INCEPTION_V2, "inception_v4": INCEPTION_V4}
# Smallest input every "VALID" layer still has pixels for (v4: 75 -> 37 -> 35 -> 17 -> 15 -> 7 -> 3 -> 1).
MIN_INPUT_SIZE = {"inception_v1": 32, "inception_v2": 32, "inception_v4": 75}
# `stem` (every embjax model has one) is the end point before the first Inception block.
STEM_END = {"inception_v1": "MaxPool_3a_3x3", "inception_v2": "MaxPool_3a_3x3", "inception_v4": "Mixed_5a"}
FEATURE_DIM = {"inception_v1": 1024, "inception_v2": 1024, "inception_v4": 1536}


class SeparableConv(nn.Module):
    """TF-Slim separable_conv2d with a depth multiplier, as Inception-v2's stem calls it: depthwise k×k,
    pointwise 1×1 with biases, ReLU. No BatchNorm: TF-Slim's inception arg scope gives a normalizer to
    `conv2d` only, so the released inception_v2 checkpoint holds `Conv2d_1a_7x7/biases` and no
    `Conv2d_1a_7x7/BatchNorm` (checked against TensorFlow in tests/test_tf_slim.py)."""

    features: int
    kernel_size: Sequence[int]
    strides: int
    depth_multiplier: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        # Flax's grouped convolution orders outputs group by group: channel c*multiplier + k, as TF does.
        x = nn.Conv(c * self.depth_multiplier, tuple(self.kernel_size), strides=self.strides, padding="SAME",
                    feature_group_count=c, use_bias=False, dtype=self.dtype, name="depthwise")(x)
        x = nn.Conv(self.features, (1, 1), use_bias=True, dtype=self.dtype, name="pointwise")(x)
        return layers.tap(self, "", nn.relu(x), "conv")  # one layer (TF-Slim's), named by this module's path


def _apply_layer(layer, x, train: bool, dtype, depth=lambda w: w, parent_name: str | None = None,
                 fold_bn: bool = False):
    """Apply one layer spec; convolutions become named submodules of the calling module. `depth` maps a
    spec width to the built one (TF-Slim's depth_multiplier rule; the identity at full size)."""
    kind = layer[0]
    conv = functools.partial(ConvBN, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, dtype=dtype, fold_bn=fold_bn)
    if kind == "conv":
        _, name, features, kernel, stride, padding = layer
        return conv(depth(features), kernel, strides=stride, padding=padding, name=name)(x, train)
    if kind in ("max", "avg"):
        _, _, window, stride, padding = layer
        if kind == "max":
            return nn.max_pool(x, window, strides=(stride, stride), padding=padding)
        return nn.avg_pool(x, window, strides=(stride, stride), padding=padding, count_include_pad=False)
    if kind == "sepconv":
        _, name, features, kernel, stride, max_multiplier = layer
        # TF-Slim keeps the depthwise output (input channels x multiplier) at most the pointwise width.
        multiplier = min(int(depth(features) / 3), max_multiplier)
        return SeparableConv(depth(features), kernel, stride, multiplier, dtype, name=name)(x, train)
    if kind == "split":
        return jnp.concatenate([conv(depth(f), k, name=n)(x, train) for n, f, k in layer[1]], axis=-1)
    raise ValueError(f"unknown layer kind {kind!r} in {parent_name or 'the architecture'}")


class Branch(nn.Module):
    """One branch of an Inception block: its layers in sequence."""

    layers: Sequence[Any]
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        depth = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        for layer in self.layers:
            x = _apply_layer(layer, x, train, self.dtype, depth, self.name, self.fold_bn)
        return x


class Block(nn.Module):
    """An Inception block: branches `Branch_0`, `Branch_1`, … on one input, concatenated on channels."""

    branches: Sequence[Sequence[Any]]
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0
    min_depth: int = 16
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        outs = [Branch(b, self.dtype, self.depth_multiplier, self.min_depth, self.fold_bn, name=f"Branch_{i}")(x, train)
                for i, b in enumerate(self.branches)]
        return jnp.concatenate(outs, axis=-1)


class SlimInception(nn.Module):
    """An Inception network from one of `ARCHITECTURES` (`inception_v1`, `inception_v2`, `inception_v4`).

    `num_classes` defaults to TF-Slim's 1001 (class 0 is "background"). `depth_multiplier` and
    `min_depth` are TF-Slim's width rule (every width w becomes max(int(w * m), min_depth); the identity
    at m = 1), for the reduced networks of the tests.
    """

    architecture: str
    num_classes: int = 1001
    dtype: Dtype = jnp.float32
    depth_multiplier: float = 1.0
    min_depth: int = 16
    fold_bn: bool = False  # inference: every BatchNorm folded into its convolution (module docstring)

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        layers.check_inference("SlimInception", self.fold_bn, train)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {sorted(ARCHITECTURES)}")
        min_size = MIN_INPUT_SIZE[self.architecture]
        if x.ndim != 4:
            raise ValueError(f"{self.architecture} expects NHWC images of rank 4, got shape {x.shape}.")
        if min(x.shape[1], x.shape[2]) < min_size:
            raise ValueError(
                f"{self.architecture} needs inputs of at least {min_size}x{min_size} pixels, got "
                f"{x.shape[1]}x{x.shape[2]}; resize the images up."
            )
        depth = functools.partial(slim_depth, multiplier=self.depth_multiplier, min_depth=self.min_depth)
        out = {}
        for name, spec in ARCHITECTURES[self.architecture]:
            if isinstance(spec[0], str):  # a single layer
                x = _apply_layer(spec, x, train, self.dtype, depth, name, self.fold_bn)
                kind = "pool" if spec[0] in ("max", "avg") else "block"  # a conv end point: conv and block
            else:
                x = Block(spec, self.dtype, self.depth_multiplier, self.min_depth, self.fold_bn, name=name)(x, train)
                kind = "block"
            out[name] = layers.tap(None, name, x, kind)
        out["stem"] = out[STEM_END[self.architecture]]  # an alias of that end point, not a named layer
        out["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(out["pre_logits"])
        return out


def inception_v1(num_classes: int = 1001, dtype: Dtype = jnp.float32) -> SlimInception:
    """TF-Slim Inception-v1 (GoogLeNet with BatchNorm): 224 px, `pre_logits` width 1024."""
    return SlimInception("inception_v1", num_classes, dtype)


def inception_v2(num_classes: int = 1001, dtype: Dtype = jnp.float32) -> SlimInception:
    """TF-Slim Inception-v2 (BN-Inception, separable 7×7 stem): 224 px, `pre_logits` width 1024."""
    return SlimInception("inception_v2", num_classes, dtype)


def inception_v4(num_classes: int = 1001, dtype: Dtype = jnp.float32) -> SlimInception:
    """TF-Slim Inception-v4: 299 px, `pre_logits` width 1536."""
    return SlimInception("inception_v4", num_classes, dtype)


def param_count(module: nn.Module, size: int = 224) -> int:
    """Number of trainable parameters (BatchNorm statistics excluded), from shapes alone."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
