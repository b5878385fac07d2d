"""Streaming first and second moments, and the one Chan et al. merge every embjax accumulator uses.

Two things live here:

- `chan_combine`, the parallel update of Chan, Golub and LeVeque for (count, mean, second moment) of two
  disjoint sets of samples. `embjax.stats` (a full centred cross-product), `embjax.evaluate` (per-model
  centred sums of squares) and the per-feature moments below all merge through it; they differ only in
  how the outer product of the mean difference δ is reduced (`outer`).
- `Moments`, a per-feature (diagonal) accumulator of count, mean and centred sum of squares: what
  standardization needs for 10k–20k features, where a D×D matrix would not fit.

Every accumulator in embjax has the same four functions, in the spirit of clu's metrics:
`init(...) -> state`, `update(state, x, mask) -> state` (padded rows, mask False, count nowhere),
`merge(a, b) -> state` (associative; the same function serves batches, devices and hosts) and
`compute(state) -> result`. This module imports nothing of embjax.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from embjax.accumulator import Accumulator


def offsets(dims: Sequence[int]) -> tuple[int, ...]:
    """Block boundaries of features concatenated in blocks of widths `dims`: block i occupies columns
    offsets[i]:offsets[i + 1] (N + 1 entries)."""
    out = [0]
    for d in dims:
        out.append(out[-1] + int(d))
    return tuple(out)


def block_sums(v: jax.Array, dims: Sequence[int]) -> jax.Array:
    """(N,) sums of `v` over each block of widths `dims`."""
    o = offsets(dims)
    return jnp.stack([jnp.sum(v[o[i]:o[i + 1]]) for i in range(len(dims))])


def chan_combine(n_a, mu_a, m_a, n_b, mu_b, m_b, outer: Callable[[jax.Array], jax.Array]):
    """(n, μ, M) of the union of two disjoint sample sets from each one's (count, mean, second moment).

        n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M = M_a + M_b + outer(δ) n_a n_b / n

    `outer(δ)` reduces δᵀδ to the shape of M: the full matrix for a cross-product, its diagonal for
    per-feature variances, block sums of the diagonal for per-model sums of squares. An empty side is an
    exact no-op (no 0/0). n_a n_b / n is formed as n_a · (n_b / n): no int32 overflow and no float32
    range problem at ImageNet sizes.
    """
    n = n_a + n_b
    dtype = mu_a.dtype
    frac_b = n_b.astype(dtype) / jnp.maximum(n, 1).astype(dtype)
    delta = mu_b - mu_a
    mu = mu_a + delta * frac_b
    m = m_a + m_b + outer(delta) * (n_a.astype(dtype) * frac_b)
    return n, mu, m


def masked_batch_moments(x: jax.Array, mask: jax.Array | None):
    """(n_b, μ_b, x − μ_b with padded rows zeroed) of one batch, centred on its own masked mean.

    `where` rather than a multiplication, so garbage (even NaN) in padded rows cannot leak in.
    """
    if mask is None:
        n_b = jnp.asarray(x.shape[0], jnp.int32)
        mu_b = jnp.mean(x, axis=0)
        return n_b, mu_b, x - mu_b
    keep = mask.reshape((-1,) + (1,) * (x.ndim - 1))
    n_b = jnp.sum(mask, dtype=jnp.int32)
    total = jnp.sum(jnp.where(keep, x, 0), axis=0)
    mu_b = total / jnp.maximum(n_b, 1).astype(x.dtype)
    return n_b, mu_b, jnp.where(keep, x - mu_b, 0)


# --------------------------------------------------------------------------------------------------
# Per-feature moments


@flax.struct.dataclass
class Moments:
    """Per-feature count, mean and centred sum of squares Σ (x − μ)² of a (batch, D) stream."""

    count: jax.Array  # () int32
    mean: jax.Array  # (D,)
    sumsq: jax.Array  # (D,)


def init(width: int, dtype=jnp.float32) -> Moments:
    """Empty moments of `width` features."""
    width = int(width)
    if width <= 0:
        raise ValueError(f"moments.init: width must be positive, got {width}")
    return Moments(count=jnp.zeros((), jnp.int32), mean=jnp.zeros((width,), dtype),
                   sumsq=jnp.zeros((width,), dtype))


def update(state: Moments, x: jax.Array, mask: jax.Array | None = None) -> Moments:
    """Fold a (batch, D) batch in; rows with mask False count nowhere."""
    x = jnp.asarray(x, state.mean.dtype)
    if x.ndim != 2 or x.shape[1] != state.mean.shape[0]:
        raise ValueError(f"moments.update: expected (batch, {state.mean.shape[0]}) features, got {x.shape}")
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
        if mask.shape != (x.shape[0],):
            raise ValueError(f"moments.update: mask has shape {mask.shape}, expected ({x.shape[0]},)")
    n_b, mu_b, xc = masked_batch_moments(x, mask)
    n, mu, m = chan_combine(state.count, state.mean, state.sumsq, n_b, mu_b, jnp.sum(xc * xc, axis=0),
                            outer=lambda d: d * d)
    return Moments(count=n, mean=mu, sumsq=m)


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of the samples behind `a` and `b`."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"moments.merge: widths differ: {a.mean.shape} vs {b.mean.shape}")
    n, mu, m = chan_combine(a.count, a.mean, a.sumsq, b.count, b.mean, b.sumsq, outer=lambda d: d * d)
    return Moments(count=n, mean=mu, sumsq=m)


def compute(state: Moments, ddof: int = 0) -> tuple[jax.Array, jax.Array]:
    """(mean, standard deviation) per feature; the deviation divides by n − ddof (0 when n ≤ ddof)."""
    denom = jnp.maximum(state.count - ddof, 1).astype(state.sumsq.dtype)
    var = jnp.where(state.count > ddof, jnp.maximum(state.sumsq, 0) / denom, 0)
    return state.mean, jnp.sqrt(var)


def accumulator(width: int, read, mask=None, dtype=jnp.float32) -> Accumulator:
    """Per-feature moments as an engine accumulator: `read(outputs, batch, aux)` gives the (batch, width)
    features; `mask(batch)`, if given, narrows the rows counted further (padding rows never count)."""

    def fold(state, outputs, batch, aux):
        keep = batch["mask"] if mask is None else batch["mask"] & mask(batch)
        return update(state, read(outputs, batch, aux), keep)

    return Accumulator(empty=lambda: init(width, dtype), update=fold, merge=merge, compute=compute)
