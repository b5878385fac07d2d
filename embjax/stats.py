"""Streaming joint statistics of N feature blocks: count, mean and centred cross-products.

This module owns the one accumulator every pairwise map is solved from. Features of N models are
concatenated row-wise, x = [f_1 … f_N] of width D = Σ d_i, and the state keeps

    count  n                      (scalar, int32)
    mean   μ = Σ x / n            (D,)
    cross  C = Σ (x − μ)ᵀ(x − μ)  (D, D), symmetric

so that every block C_ij (and the covariance C_ij / n) of every pair of models is available after one
pass. Rows are row vectors, as everywhere in embjax.

Numerics. Post-ReLU features have means far above their spread, so raw sums of x xᵀ in float32
cancel catastrophically. Each batch is instead centred on its own (masked) mean, its own centred
cross-product is formed, and batches are combined with the parallel update of Chan, Golub and LeVeque:

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  C = C_a + C_b + δᵀδ n_a n_b / n.

All matrix products use Precision.HIGHEST explicitly: on GPU the default may be TF32, on TPU bfloat16.

Only the N(N+1)/2 upper blocks of a batch's cross-product are multiplied; the lower blocks are their
transposes, which roughly halves the matmul work for N ≥ 2 models of similar width.

Everything here is a pure function of arrays and works under `jax.jit`, `jax.vmap`, `pmap` and
`shard_map`. Inside a mapped function, `allreduce` combines the per-device states exactly. Under plain
`jax.jit` with the batch sharded across devices, `update` needs nothing special: the batch sums are
global reductions that XLA partitions itself.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from embjax import moments
from embjax.accumulator import Accumulator

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class Stats:
    """Joint statistics of N feature blocks; see the module docstring for the meaning of each field."""

    count: jax.Array  # () int32: number of real (unmasked) rows seen
    mean: jax.Array  # (D,) mean of the concatenated features
    cross: jax.Array  # (D, D) centred cross-product Σ (x − μ)ᵀ(x − μ)
    dims: tuple[int, ...] = flax.struct.field(pytree_node=False)


def init(dims: Sequence[int], dtype=jnp.float32) -> Stats:
    """Empty statistics for feature blocks of widths `dims` (one entry per model)."""
    dims = tuple(int(d) for d in dims)
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"stats.init: dims must be a non-empty sequence of positive widths, got {dims}")
    width = sum(dims)
    return Stats(
        count=jnp.zeros((), jnp.int32),
        mean=jnp.zeros((width,), dtype),
        cross=jnp.zeros((width, width), dtype),
        dims=dims,
    )


def offsets(state: Stats) -> tuple[int, ...]:
    """Block boundaries: block i occupies columns offsets[i]:offsets[i + 1] (N + 1 entries)."""
    return _offsets(state.dims)


_offsets = moments.offsets


def _check_block(state: Stats, i: int, what: str = "block") -> None:
    if not 0 <= i < len(state.dims):
        raise IndexError(f"stats: {what} index {i} out of range for {len(state.dims)} blocks")


def block(state: Stats, i: int, j: int) -> jax.Array:
    """The centred cross-product block C_ij = Σ (f_i − μ_i)ᵀ(f_j − μ_j), shape (d_i, d_j)."""
    _check_block(state, i)
    _check_block(state, j)
    o = offsets(state)
    return state.cross[o[i] : o[i + 1], o[j] : o[j + 1]]


def block_mean(state: Stats, i: int) -> jax.Array:
    """The mean of block i, shape (d_i,)."""
    _check_block(state, i)
    o = offsets(state)
    return state.mean[o[i] : o[i + 1]]


def covariance(state: Stats, i: int, j: int) -> jax.Array:
    """The (biased, 1/n) covariance block between models i and j; NaN-free (zero) for an empty state."""
    return block(state, i, j) / jnp.maximum(state.count, 1).astype(state.cross.dtype)


# --------------------------------------------------------------------------------------------------
# Accumulation


def _upper_block_cross(xc: jax.Array, dims: Sequence[int]) -> jax.Array:
    """Σ xcᵀ xc for an already centred, already masked batch, computing only the upper blocks.

    Block row i is one matmul, xc_iᵀ [xc_i … xc_N]; the lower blocks are filled by transposition. The
    result is exactly symmetric off the diagonal blocks.
    """
    o = _offsets(dims)
    n_blocks = len(dims)
    if n_blocks == 1:
        return jnp.matmul(xc.T, xc, precision=_HIGHEST)
    rows = [
        jnp.matmul(xc[:, o[i] : o[i + 1]].T, xc[:, o[i] :], precision=_HIGHEST) for i in range(n_blocks)
    ]
    grid = []
    for i in range(n_blocks):
        row = []
        for j in range(n_blocks):
            if j >= i:
                row.append(rows[i][:, o[j] - o[i] : o[j + 1] - o[i]])
            else:
                row.append(rows[j][:, o[i] - o[j] : o[i + 1] - o[j]].T)
        grid.append(row)
    return jnp.block(grid)


def _batch_stats(x: jax.Array, mask: jax.Array | None, dims: Sequence[int]):
    """(n_b, μ_b, C_b) of one batch, centred on its own masked mean; padded rows contribute nothing."""
    n_b, mu_b, xc = moments.masked_batch_moments(x, mask)
    return n_b, mu_b, _upper_block_cross(xc, dims)


def _outer(delta: jax.Array) -> jax.Array:
    return delta[:, None] * delta[None, :]


def _concat(state: Stats, feats) -> jax.Array:
    if hasattr(feats, "ndim"):  # one bare array: a single block
        feats = [feats]
    feats = list(feats)
    if len(feats) != len(state.dims):
        raise ValueError(
            f"stats.update: got {len(feats)} feature blocks but the state has {len(state.dims)} "
            f"(dims {state.dims}); pass one (batch, d_i) array per model, in the order of init(dims)"
        )
    rows = {f.shape[0] for f in feats}
    for k, (f, d) in enumerate(zip(feats, state.dims)):
        if f.ndim != 2 or f.shape[1] != d:
            raise ValueError(f"stats.update: block {k} has shape {f.shape}, expected (batch, {d})")
    if len(rows) != 1:
        raise ValueError(f"stats.update: feature blocks disagree on the batch size: {sorted(rows)}")
    dtype = state.mean.dtype
    return jnp.concatenate([jnp.asarray(f, dtype) for f in feats], axis=1)


def update(state: Stats, feats, mask: jax.Array | None = None) -> Stats:
    """Fold one batch into the statistics.

    Args:
      state: the running statistics.
      feats: a list with one (batch, d_i) array per model, in the order of `init(dims)`.
      mask: optional (batch,) bool array, True for real rows of a padded batch. A batch whose mask is
        all False leaves the state exactly unchanged.
    """
    x = _concat(state, feats)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (x.shape[0],):
            raise ValueError(f"stats.update: mask has shape {mask.shape}, expected ({x.shape[0]},)")
        mask = mask.astype(bool)
    n_b, mu_b, c_b = _batch_stats(x, mask, state.dims)
    n, mu, c = moments.chan_combine(state.count, state.mean, state.cross, n_b, mu_b, c_b, _outer)
    return state.replace(count=n, mean=mu, cross=c)


def merge(a: Stats, b: Stats) -> Stats:
    """Statistics of the union of the samples behind `a` and `b` (associative and commutative up to
    rounding): for batches, devices and hosts."""
    if a.dims != b.dims:
        raise ValueError(f"stats.merge: block widths differ: {a.dims} vs {b.dims}")
    n, mu, c = moments.chan_combine(a.count, a.mean, a.cross, b.count, b.mean, b.cross, _outer)
    return a.replace(count=n, mean=mu, cross=c)


def compute(state: Stats) -> dict:
    """The statistics as plain numbers: {"count", "mean" (D,), "covariance" (D, D), 1/n}. Maps, R² and
    CKA are solved from the state itself (embjax.maps, `r2`, `cka`)."""
    n = jnp.maximum(state.count, 1).astype(state.cross.dtype)
    return {"count": state.count, "mean": state.mean, "covariance": state.cross / n}


def allreduce(state: Stats, axis_name) -> Stats:
    """Exact merge of the per-device states along a named mapped axis (inside pmap / shard_map).

    Two collectives: psum of n_k and n_k μ_k gives the global mean; then psum of
    C_k + n_k (μ_k − μ)ᵀ(μ_k − μ). No D×D matrix is gathered, only summed.
    """
    dtype = state.mean.dtype
    n = jax.lax.psum(state.count, axis_name)
    n_k = state.count.astype(dtype)
    mu = jax.lax.psum(state.mean * n_k, axis_name) / jnp.maximum(n, 1).astype(dtype)
    delta = state.mean - mu
    c = jax.lax.psum(state.cross + (delta[:, None] * delta[None, :]) * n_k, axis_name)
    return state.replace(count=n, mean=mu, cross=c)


# --------------------------------------------------------------------------------------------------
# Summaries computed from the statistics alone


def cka(state: Stats, i: int, j: int) -> jax.Array:
    """Linear CKA between models i and j: ‖C_ij‖²_F / (‖C_ii‖_F ‖C_jj‖_F), in [0, 1]."""
    # CKA is invariant to scaling either model's features, so each block is divided by its total
    # variance first (C_ij by sqrt(tr C_ii · tr C_jj)): every entry is then at most 1 in magnitude
    # (Cauchy-Schwarz) and the squared norms cannot overflow float32, however large the features or n
    # (features of 1e12, as deep random networks give, would otherwise square to inf).
    def unit(x):
        return jnp.where(x > 0, x, 1)

    t_i = unit(jnp.trace(block(state, i, i)))
    t_j = unit(jnp.trace(block(state, j, j)))
    c_ij = block(state, i, j) / jnp.sqrt(t_i) / jnp.sqrt(t_j)
    c_ii = block(state, i, i) / t_i
    c_jj = block(state, j, j) / t_j
    num = jnp.sum(c_ij * c_ij)
    den = jnp.sqrt(jnp.sum(c_ii * c_ii)) * jnp.sqrt(jnp.sum(c_jj * c_jj))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


def residual_sum_of_squares(state: Stats, src: int, dst: int, w: jax.Array, b: jax.Array) -> jax.Array:
    """Σ ‖f_dst − (f_src W + b)‖² over the samples behind `state`, from the statistics alone.

    Expanding around the means: tr(C_BB) − 2 tr(Wᵀ C_AB) + tr(Wᵀ C_AA W) + n ‖μ_B − μ_A W − b‖².
    The first three terms cancel when the fit is good, so the absolute error is about float32 eps times
    tr(C_BB) (plus the analogous terms), i.e. an R² near 1 is known to roughly 1e-6, not better.
    """
    c_aa = block(state, src, src)
    c_ab = block(state, src, dst)
    c_bb = block(state, dst, dst)
    w = jnp.asarray(w, c_aa.dtype)
    b = jnp.asarray(b, c_aa.dtype)
    if w.shape != (c_aa.shape[0], c_bb.shape[0]):
        raise ValueError(f"stats.residual_sum_of_squares: W has shape {w.shape}, expected {(c_aa.shape[0], c_bb.shape[0])}")
    cross_term = jnp.sum(w * c_ab)
    quad = jnp.sum(w * jnp.matmul(c_aa, w, precision=_HIGHEST))
    offset = block_mean(state, dst) - jnp.matmul(block_mean(state, src), w, precision=_HIGHEST) - b
    n = state.count.astype(c_aa.dtype)
    rss = jnp.trace(c_bb) - 2.0 * cross_term + quad + n * jnp.sum(offset * offset)
    return jnp.maximum(rss, 0.0)


def r2(state: Stats, src: int, dst: int, w: jax.Array, b: jax.Array) -> jax.Array:
    """R² of the map f_dst ≈ f_src W + b on the samples behind `state`:
    1 − Σ‖f_dst − f̂_dst‖² / Σ‖f_dst − μ_dst‖², from the statistics alone (see
    `residual_sum_of_squares` for its precision). NaN when the target block is constant (R² undefined)."""
    total = jnp.trace(block(state, dst, dst))
    rss = residual_sum_of_squares(state, src, dst, w, b)
    return jnp.where(total > 0, 1.0 - rss / jnp.where(total > 0, total, 1), jnp.nan)


def accumulator(dims: Sequence[int], read, dtype=jnp.float32) -> Accumulator:
    """The joint statistics as an engine accumulator: `read(outputs, batch, aux)` gives the list of
    (batch, d_i) feature blocks, in the order of `dims`; padding rows get no weight."""
    return Accumulator(empty=lambda: init(dims, dtype), merge=merge, compute=compute,
                       update=lambda s, outputs, batch, aux: update(s, read(outputs, batch, aux), batch["mask"]))


def prefix_accumulator(dims: Sequence[int], read, sizes: Sequence[int], dtype=jnp.float32) -> Accumulator:
    """The joint statistics of nested prefixes of a pass, as one accumulator: for each n of `sizes`, the
    statistics of the rows whose sample index is below n (a fit-size curve from one pass).

    Each row is folded once, into the segment [n_{k−1}, n_k) of `sizes` (ascending) that holds its index;
    rows at or past the last size are left out, and a segment with no row in a batch skips the update
    (lax.cond), so the cost is about that of one `accumulator` over the prefix of the largest size. The
    state is the list of segment statistics; `compute` gives the list of prefix statistics, segment 0..k
    merged for prefix k (Chan's update: in exact arithmetic the statistics of folding the prefix itself)."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
        raise ValueError(f"stats.prefix_accumulator: sizes must be positive and strictly ascending, got {sizes}")
    bounds = jnp.asarray(sizes)

    def fold(states, outputs, batch, aux):
        feats = read(outputs, batch, aux)
        segment = jnp.searchsorted(bounds, batch["index"], side="right")
        out = []
        for k, st in enumerate(states):
            keep = batch["mask"] & (segment == k)
            out.append(jax.lax.cond(jnp.any(keep), lambda s, keep=keep: update(s, feats, keep), lambda s: s, st))
        return out

    def prefixes(states):
        out = [states[0]]
        for st in states[1:]:
            out.append(merge(out[-1], st))
        return out

    return Accumulator(empty=lambda: [init(dims, dtype) for _ in sizes], update=fold,
                       merge=lambda a, b: [merge(x, y) for x, y in zip(a, b)], compute=prefixes)
