"""The full-network embedding (Garcia-Gasulla et al., "An Out-of-the-box Full-network Embedding for
Convolutional Neural Networks"): every layer pooled, standardized on the target training split, and
discretized to {-1, 0, 1}.

This module owns the method's arithmetic, and nothing else (no model, file or device code):

1. `embedding_layers(family, keys, activation)`: which named outputs of a registry model make up the
   embedding (every convolutional block in network order; VGG16's fixed list in `EMBEDDING_LAYERS`).
2. `pool(outputs, layers)`: spatial average pooling of each (B, H, W, C) output, fully connected (B, C)
   outputs as they are, concatenated in the listed order into (B, D) float32.
3. Per-feature mean and standard deviation streamed over the training split: `embjax.moments`
   (init / update under a mask / merge / compute; only the diagonal, D numbers and never D x D, with the
   Chan merge, so post-ReLU features whose means sit far above their spread keep their digits).
4. `standardization(moments_state)` -> `Standardization` (mean, std, and which features are degenerate),
   `standardize(x, s)` -> z = (x − μ) / σ.
5. `discretize(z, low=-0.25, high=0.15)` -> int8 in {-1, 0, 1}, and `embed` = 2 ∘ 4 ∘ 5.

Boundary rule of the discretization: z < low -> -1, z > high -> +1, low ≤ z ≤ high -> 0 (the zero band is
closed: a value exactly on a threshold is 0). NaN never reaches it (the engine zeroes non-finite features;
`discretize` maps NaN to 0 because both comparisons are false).

Degenerate features. A feature whose standard deviation on the training split is at most
`rtol · |mean|` (default rtol 1e-4) carries nothing the split can scale: dead ReLU channels are exactly 0
everywhere, saturated ReLU6 channels are 6 everywhere. Their float32 streamed spread is rounding noise
(a constant c streamed in batches gets a batch mean off by a few ulps of c, hence σ ~ 1e-7 |c|), which
(x − μ)/σ would blow up into ±1 noise after discretization. Such features are standardized to exactly 0
(discretized 0) and counted, per layer, by `degenerate_report`. 1e-4 sits three orders of magnitude above
float32 accumulation noise (eps = 1.2e-7 times the ≤ ~100x growth of batched sums) and far below the
spread of any image feature a classifier could use.

Pre- or post-activation. A module that offers both returns a layer's pre-activation value as
`<key>_preact` beside `<key>` (VGG16; EfficientNet-Lite's stem and head). The default is "post": a
layer's output as the next layer reads it, which is also what reading a layer by name gives in Keras
(VGG16's convolutions carry their ReLU inside the layer) and in Caffe (whose ReLUs overwrite the
convolution's output blob in place). With post-activation features the dead-on-this-data channels are
exactly 0 and are reported as degenerate, and a rectified feature's negative z-values only say "below
its mean". "pre" reads the convolution (plus BatchNorm) before its nonlinearity: nothing is clipped,
so fewer features are degenerate, at the price of reading values the network itself never propagates.
Layers with no nonlinearity at their end (EfficientNet's linear-bottleneck blocks) have no `_preact`
key and are read as they are either way.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from embjax import moments

# Discretization thresholds of the paper.
LOW, HIGH = -0.25, 0.15
DEGENERATE_RTOL = 1e-4  # see "Degenerate features" in the module docstring

_VGG16_CONVS = (
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)
PREACT_SUFFIX = "_preact"  # a module's pre-activation output of layer k is named k + PREACT_SUFFIX

# family -> the post-activation keys of the embedding, in network order, where the family fixes them.
# VGG16: 13 convolutions + fc6 + fc7 = 64·2 + 128·2 + 256·3 + 512·6 + 4096·2 = 12,416 features.
EMBEDDING_LAYERS: dict[str, tuple[str, ...]] = {"vgg16": (*_VGG16_CONVS, "fc1", "fc2")}
# Outputs that are never part of the embedding: the classifier (the paper stops at fc7) and pre_logits,
# which is the pooled last feature map of every family but VGG (where it is fc2 itself).
_NOT_EMBEDDED = ("logits", "pre_logits")


def _natural_key(name: str):
    """'stem' < 'block_2' < 'block_10' < 'head': numbers compared as numbers, stem first, head last."""
    rank = {"stem": 0, "head": 2, "last_conv": 2}.get(name, 1)
    return rank, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def embedding_layers(family: str, keys, activation: str = "post") -> tuple[str, ...]:
    """Output keys whose pooled values make up the full-network embedding of a model of `family`.

    `keys`: the names of the outputs the model returns (e.g. `jax.eval_shape` of its apply). VGG16's
    layers are fixed (`EMBEDDING_LAYERS`); every other family embeds every intermediate its module
    returns, in network order: EfficientNet-Lite its stem, every block and its head (its stage outputs
    are the groups' last blocks, so they are not counted twice); ResNet, Inception and
    MobileNet the stem and the stage (or mixed) outputs, which is every block they return. `activation` is
    "post" (default, see the module docstring) or "pre"; "pre" reads `<key>_preact` where the module
    returns one and the key itself where it does not (a layer with no nonlinearity at its end).
    """
    if activation not in ("post", "pre"):
        raise ValueError(f"fne: activation must be 'post' or 'pre', got {activation!r}")
    keys = list(keys)
    if family in EMBEDDING_LAYERS:
        post = EMBEDDING_LAYERS[family]
        missing = [k for k in post if k not in keys]
        if missing:
            raise KeyError(f"fne: a {family} model should return {missing}; it returns {sorted(keys)}")
    else:
        skip = set(_NOT_EMBEDDED)
        if any(re.fullmatch(r"block_\d+", k) for k in keys):
            skip |= {k for k in keys if re.fullmatch(r"stage\d+", k)}  # aliases of each group's last block
        post = tuple(sorted((k for k in keys if k not in skip and not k.endswith(PREACT_SUFFIX)),
                            key=_natural_key))
        if not post:
            raise ValueError(f"fne: a {family} model returns no intermediate to embed (only {sorted(keys)})")
    if activation == "post":
        return tuple(post)
    if family in ("resnet_v1", "resnet_v2", "inception_v3", "inception_resnet_v2", "mobilenet_v2"):
        raise ValueError(f"fne: the {family} modules return no pre-activation outputs; use activation='post'")
    return tuple(k + PREACT_SUFFIX if k + PREACT_SUFFIX in keys else k for k in post)


def layer_widths(outputs: Mapping[str, jax.Array], layers: Sequence[str]) -> tuple[int, ...]:
    """Channel count of every listed output (the width each contributes to the embedding)."""
    _check_layers(outputs, layers)
    return tuple(int(outputs[k].shape[-1]) for k in layers)


def _check_layers(outputs: Mapping[str, jax.Array], layers: Sequence[str]) -> None:
    missing = [k for k in layers if k not in outputs]
    if missing:
        raise KeyError(
            f"fne: the model returned no output named {missing}; it returns {sorted(outputs)}"
        )
    bad = {k: tuple(outputs[k].shape) for k in layers if outputs[k].ndim not in (2, 4)}
    if bad:
        raise ValueError(
            f"fne: outputs to pool must be (batch, channels) or (batch, height, width, channels); got {bad}"
        )


def pool(outputs: Mapping[str, jax.Array], layers: Sequence[str]) -> jax.Array:
    """(B, D) float32: each listed output spatially averaged (4-D) or taken as is (2-D), concatenated."""
    _check_layers(outputs, layers)
    parts = []
    for k in layers:
        x = outputs[k].astype(jnp.float32)  # float32 accumulation: bfloat16 sums over 3136 positions lose digits
        parts.append(jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x)
    return jnp.concatenate(parts, axis=1)


# ---------------------------------------------------------------------------------------------------
# Standardization and discretization


@flax.struct.dataclass
class Standardization:
    mean: jax.Array  # (D,)
    std: jax.Array  # (D,) population standard deviation on the training split
    degenerate: jax.Array  # (D,) bool: standardized to 0 (see the module docstring)


def standardization(state: moments.Moments, rtol: float = DEGENERATE_RTOL) -> Standardization:
    """Mean, population standard deviation and degenerate-feature mask from streamed `embjax.moments`."""
    mean, std = moments.compute(state)
    return Standardization(mean, std, std <= rtol * jnp.abs(mean))


def standardize(x: jax.Array, s: Standardization) -> jax.Array:
    """z = (x − μ) / σ per feature, float32; exactly 0 on degenerate features."""
    x = jnp.asarray(x, jnp.float32)
    safe_std = jnp.where(s.degenerate, 1.0, s.std)
    return jnp.where(s.degenerate, 0.0, (x - s.mean) / safe_std)


def discretize(z: jax.Array, low: float = LOW, high: float = HIGH) -> jax.Array:
    """int8 in {-1, 0, 1}: z < low -> -1, z > high -> 1, low ≤ z ≤ high -> 0 (and NaN -> 0)."""
    if not low <= high:
        raise ValueError(f"fne.discretize: thresholds must satisfy low <= high, got low={low}, high={high}")
    z = jnp.asarray(z)
    return ((z > high).astype(jnp.int8) - (z < low).astype(jnp.int8)).astype(jnp.int8)


def embed(outputs: Mapping[str, jax.Array], layers: Sequence[str], s: Standardization,
          low: float = LOW, high: float = HIGH) -> jax.Array:
    """The full-network embedding (B, D) int8 of a batch of model outputs."""
    return discretize(standardize(pool(outputs, layers), s), low, high)


def degenerate_report(layers: Sequence[str], widths: Sequence[int], degenerate) -> dict[str, int]:
    """{layer: number of its degenerate features} for the layers that have any (host-side, for reports)."""
    degenerate = np.asarray(degenerate, bool)
    if degenerate.shape != (sum(widths),):
        raise ValueError(f"fne.degenerate_report: mask of {degenerate.shape} for widths summing to {sum(widths)}")
    out, start = {}, 0
    for name, w in zip(layers, widths):
        k = int(degenerate[start : start + w].sum())
        if k:
            out[name] = k
        start += w
    return out


__all__ = [
    "LOW",
    "HIGH",
    "DEGENERATE_RTOL",
    "EMBEDDING_LAYERS",
    "PREACT_SUFFIX",
    "embedding_layers",
    "layer_widths",
    "pool",
    "Standardization",
    "standardization",
    "standardize",
    "discretize",
    "embed",
    "degenerate_report",
]
