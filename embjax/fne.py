"""The full-network embedding (Garcia-Gasulla et al., "An Out-of-the-box Full-network Embedding for
Convolutional Neural Networks"): every layer pooled, standardized on the target training split, and
discretized to {-1, 0, 1}.

This module owns the method's arithmetic, and nothing else (no model, file or device code):

1. `embedding_layers(layers, layer_set, activation)`: which named layers of a model make up the
   embedding, in network order (the paper's: every convolution and fully connected layer, each
   spatially averaged; or, as an option, the block outputs).
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

from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from embjax import moments

# Discretization thresholds of the paper.
LOW, HIGH = -0.25, 0.15
DEGENERATE_RTOL = 1e-4  # see "Degenerate features" in the module docstring

PREACT_SUFFIX = "_preact"  # a module's pre-activation output of layer k is named k + PREACT_SUFFIX

# Which named layers (embjax.models.layers: name, kinds, shape, in network order) make up the embedding.
# "conv" is the paper's: every convolution and fully connected layer. "block" is the smaller one: the
# block (stage, cell, Inception block) outputs, plus the stem and head convolutions where a family
# names them as blocks too.
LAYER_SETS = {"conv": ("conv", "fc"), "block": ("block",)}


def embedding_layers(layers, layer_set: str = "conv", activation: str = "post", keys=()) -> tuple[str, ...]:
    """Output keys whose pooled values make up the full-network embedding, in network order.

    `layers`: the model's named layers in network order, objects with `name`, `kinds` and `shape`
    (`embjax.models.layers.named_layers`). `layer_set` "conv" (default, the paper's: every convolution
    and fully connected layer; pooling layers, block outputs and the classifier are not layers of it)
    or "block" (block outputs: fewer, wider-spaced layers, for memory). A 2-D output is taken as it is
    only if it is a fully connected layer's; a flattened map is never taken for one. `activation`:
    "post" (default, see the module docstring) or "pre", which reads `<name>_preact` where `keys` (the
    model's output keys) has one and the name itself where it does not (a layer with no nonlinearity).
    """
    if activation not in ("post", "pre"):
        raise ValueError(f"fne: activation must be 'post' or 'pre', got {activation!r}")
    if layer_set not in LAYER_SETS:
        raise ValueError(f"fne: layer_set must be one of {sorted(LAYER_SETS)}, got {layer_set!r}")
    layers = list(layers)
    chosen = [layer for layer in layers if set(layer.kinds) & set(LAYER_SETS[layer_set])]
    if not chosen:
        raise ValueError(f"fne: the model names no {layer_set} layers (its layers: "
                         f"{sorted({k for layer in layers for k in layer.kinds})} kinds)")
    names = [layer.name for layer in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"fne: layer names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    flat = [layer.name for layer in chosen if len(layer.shape) == 2 and "fc" not in layer.kinds]
    bad = [layer.name for layer in chosen if len(layer.shape) not in (2, 4)]
    if flat or bad:
        raise ValueError(f"fne: only (batch, h, w, c) maps and fully connected (batch, c) outputs are pooled; "
                         f"{flat + bad} are neither")
    if activation == "post":
        return tuple(names)
    keys = set(keys)
    pre = tuple(n + PREACT_SUFFIX if n + PREACT_SUFFIX in keys else n for n in names)
    if pre == tuple(names):
        raise ValueError("fne: the model returns no pre-activation output for any of these layers; use "
                         "activation='post'")
    return pre


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
    "LAYER_SETS",
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
