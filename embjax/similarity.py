"""Representation similarity of two models: from the joint fit statistics, and on evaluation features.

From the statistics of one pass (a `Stats`-like state: `count`, `mean`, `cross`, `dims`; see
embjax.stats), with C the centred cross-products:
  linear CKA        ‖C_AB‖²_F / (‖C_AA‖_F ‖C_BB‖_F)  (embjax.stats.cka; biased HSIC estimator)
  mean CCA          mean canonical correlation: the singular values of Ĉ_AA^-½ Ĉ_AB Ĉ_BB^-½, each
                    side first restricted to its leading `dims` principal directions (the SVCCA
                    recipe of Raghu et al.; all non-degenerate directions when dims is None)
  Procrustes        the angular shape distance of Williams et al. (2021):
                    arccos(‖C_AB‖_* / √(tr C_AA · tr C_BB)) in [0, π/2], after centring and scaling
                    each side to unit total variance. The narrower side is zero-padded, which leaves
                    the nuclear norm unchanged, so widths may differ.

Debiased CKA (Song et al. 2012's unbiased HSIC, used for CKA by Nguyen et al. 2021) is not a function
of second moments: its estimator removes the diagonal of each Gram matrix, and Σ_i K_ii L_ii =
Σ_i ‖x_i‖²‖y_i‖² and 1ᵀK̃L̃1 involve fourth-order per-sample products that the fit statistics do
not keep. This module therefore computes it from features (`debiased_cka`), without forming the n×n
Gram matrices: with K = X Xᵀ and L = Y Yᵀ (features centred first, which only helps rounding),
  tr(K̃L̃)   = ‖XᵀY‖²_F − Σ_i a_i b_i,             a_i = ‖x_i‖², b_i = ‖y_i‖²
  1ᵀK̃1     = ‖Σ_i x_i‖² − Σ_i a_i
  1ᵀK̃L̃1   = Σ_i (x_i·Σx − a_i)(y_i·Σy − b_i)
  HSIC_1    = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2 · 1ᵀK̃L̃1 / (n−2)] / (n(n−3)).
The open_set study applies it to the stored evaluation features.

Mutual k-NN alignment (Huh et al. 2024, "The Platonic Representation Hypothesis"): for each sample,
the overlap of its k nearest neighbours (cosine, itself excluded) under A and under B, divided by k,
averaged over samples; from features, through embjax.retrieval.knn.

Pure jax.numpy; imports only the pure embjax.stats and embjax.retrieval.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from embjax import retrieval, stats

_HIGHEST = jax.lax.Precision.HIGHEST


def _blocks(state, i: int, j: int):
    scale = 1.0 / jnp.maximum(state.count, 1).astype(state.cross.dtype)
    return stats.block(state, i, i) * scale, stats.block(state, i, j) * scale, stats.block(state, j, j) * scale


def linear_cka(state, i: int, j: int) -> jax.Array:
    """Linear CKA from the statistics (the biased HSIC estimator)."""
    return stats.cka(state, i, j)


def _principal_whitener(cov: jax.Array, dims: int | None, rel_tol: float):
    """Columns P with Pᵀ cov P = I on the leading `dims` principal directions of cov (those with
    eigenvalue above rel_tol · λ_max; at most dims of them). Returns (P, kept mask)."""
    vals, vecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
    vals, vecs = vals[::-1], vecs[:, ::-1]  # descending
    keep = vals > rel_tol * jnp.maximum(vals[0], jnp.finfo(cov.dtype).tiny)
    if dims is not None:
        keep &= jnp.arange(vals.shape[0]) < dims
    inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, vals, 1.0)), 0.0)
    return vecs * inv_sqrt[None, :], keep


def cca_correlations(state, i: int, j: int, dims: int | None = None, rel_tol: float = 1e-6) -> tuple:
    """(canonical correlations, descending, padded with 0; number of valid ones) between blocks i, j.

    Each side is whitened on its leading `dims` principal directions (eigenvalues below rel_tol·λ_max
    are treated as degenerate and dropped in any case); the correlations are the singular values of
    the whitened cross-covariance, and there are min(kept_i, kept_j) of them.
    """
    with jax.default_matmul_precision("highest"):
        return _cca(state.cross, state.mean, state.count, stats.offsets(state), i, j, dims, rel_tol)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _cca(cross, mean, count, offsets, i, j, dims, rel_tol):
    scale = 1.0 / jnp.maximum(count, 1).astype(cross.dtype)
    c_ii = cross[offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]] * scale
    c_ij = cross[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]] * scale
    c_jj = cross[offsets[j]:offsets[j + 1], offsets[j]:offsets[j + 1]] * scale
    p_i, keep_i = _principal_whitener(c_ii, dims, rel_tol)
    p_j, keep_j = _principal_whitener(c_jj, dims, rel_tol)
    m = jnp.matmul(jnp.matmul(p_i.T, c_ij, precision=_HIGHEST), p_j, precision=_HIGHEST)
    rho = jnp.linalg.svd(m, compute_uv=False)
    valid = jnp.minimum(jnp.sum(keep_i), jnp.sum(keep_j))
    rho = jnp.where(jnp.arange(rho.shape[0]) < valid, jnp.clip(rho, 0.0, 1.0), 0.0)
    return rho, valid


def mean_cca_matrix(state, dims: int | None = None, rel_tol: float = 1e-6) -> jax.Array:
    """`mean_cca` of every pair of blocks, (N, N), with one eigendecomposition per block."""
    n = len(state.dims)
    o = stats.offsets(state)
    scale = 1.0 / jnp.maximum(state.count, 1).astype(state.cross.dtype)
    with jax.default_matmul_precision("highest"):
        whiten = [_principal_whitener(stats.block(state, k, k) * scale, dims, rel_tol) for k in range(n)]
        out = [[None] * n for _ in range(n)]
        for i in range(n):
            for j in range(i, n):
                p_i, keep_i = whiten[i]
                p_j, keep_j = whiten[j]
                m = p_i.T @ (state.cross[o[i]:o[i + 1], o[j]:o[j + 1]] * scale) @ p_j
                rho = jnp.linalg.svd(m, compute_uv=False)
                valid = jnp.minimum(jnp.sum(keep_i), jnp.sum(keep_j))
                rho = jnp.where(jnp.arange(rho.shape[0]) < valid, jnp.clip(rho, 0.0, 1.0), 0.0)
                out[i][j] = out[j][i] = jnp.sum(rho) / jnp.maximum(valid, 1)
    return jnp.asarray(out)


def mean_cca(state, i: int, j: int, dims: int | None = None, rel_tol: float = 1e-6) -> jax.Array:
    """Mean of the valid canonical correlations (see `cca_correlations`), in [0, 1].

    Beware the sample size: with n samples and d_i + d_j ≳ n, canonical correlations approach 1 for
    any pair of representations; `dims` (SVCCA) keeps the estimate meaningful.
    """
    rho, valid = cca_correlations(state, i, j, dims, rel_tol)
    return jnp.sum(rho) / jnp.maximum(valid, 1)


def procrustes_distance(state, i: int, j: int, rotation=None) -> jax.Array:
    """Angular Procrustes distance arccos(‖C_ij‖_* / √(tr C_ii tr C_jj)) in radians, in [0, π/2].

    The nuclear norm needs an SVD of C_ij unless `rotation`, the orthogonal factor U Vᵀ of C_ij = U Σ Vᵀ
    (e.g. from maps.scaled_procrustes), is given: then ‖C_ij‖_* = tr(Rᵀ C_ij). For i = j it is tr C_ii
    (C_ii is positive semi-definite), and the distance 0, without any decomposition."""
    c_ii, c_ij, c_jj = _blocks(state, i, j)
    if i == j:
        nuclear = jnp.trace(c_ii)
    elif rotation is not None:
        nuclear = jnp.sum(jnp.asarray(rotation, c_ij.dtype) * c_ij)
    else:
        nuclear = jnp.sum(jnp.linalg.svd(c_ij, compute_uv=False))
    den = jnp.sqrt(jnp.trace(c_ii) * jnp.trace(c_jj))
    cos = jnp.where(den > 0, nuclear / jnp.where(den > 0, den, 1.0), 0.0)
    return jnp.arccos(jnp.clip(cos, 0.0, 1.0))


# --------------------------------------------------------------------------------------------------
# From features


def _unbiased_hsic_terms(x: jax.Array):
    """Per-representation pieces of the unbiased HSIC: (centred X, a_i = ‖x_i‖², K̃1 = X Σx − a)."""
    x = x - jnp.mean(x, axis=0)
    a = jnp.sum(x * x, axis=1)
    k1 = jnp.matmul(x, jnp.sum(x, axis=0), precision=_HIGHEST) - a
    return x, a, k1


def _unbiased_hsic(tx, ty) -> jax.Array:
    x, a, k1 = tx
    y, b, l1 = ty
    n = x.shape[0]
    xty = jnp.matmul(x.T, y, precision=_HIGHEST)
    tr_kl = jnp.sum(xty * xty) - jnp.sum(a * b)
    sum_k = jnp.sum(k1)  # 1ᵀK̃1
    sum_l = jnp.sum(l1)
    return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * jnp.sum(k1 * l1) / (n - 2)) / (n * (n - 3))


def unbiased_hsic(x, y) -> jax.Array:
    """Song et al.'s unbiased HSIC estimator with linear kernels, from (n, d_x) and (n, d_y) features."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 4:
        raise ValueError(f"similarity.unbiased_hsic: need two 2-D feature arrays with the same n ≥ 4 rows, "
                         f"got {x.shape} and {y.shape}")
    return _unbiased_hsic(_unbiased_hsic_terms(x), _unbiased_hsic_terms(y))


@jax.jit
def debiased_cka(x, y) -> jax.Array:
    """Debiased linear CKA: HSIC_1(K, L) / √(HSIC_1(K, K) HSIC_1(L, L)); near 0 (either sign) for
    independent features, 1 for identical ones."""
    tx, ty = _unbiased_hsic_terms(x), _unbiased_hsic_terms(y)
    hxy = _unbiased_hsic(tx, ty)
    den = jnp.sqrt(jnp.maximum(_unbiased_hsic(tx, tx), 0.0) * jnp.maximum(_unbiased_hsic(ty, ty), 0.0))
    return jnp.where(den > 0, hxy / jnp.where(den > 0, den, 1.0), 0.0)


@jax.jit
def feature_cka(x, y) -> jax.Array:
    """Linear CKA (biased estimator) from features; equals stats.cka on the same samples."""
    x = x - jnp.mean(x, axis=0)
    y = y - jnp.mean(y, axis=0)
    xy = jnp.sum(jnp.matmul(x.T, y, precision=_HIGHEST) ** 2)
    xx = jnp.sqrt(jnp.sum(jnp.matmul(x.T, x, precision=_HIGHEST) ** 2))
    yy = jnp.sqrt(jnp.sum(jnp.matmul(y.T, y, precision=_HIGHEST) ** 2))
    return jnp.where(xx * yy > 0, xy / jnp.where(xx * yy > 0, xx * yy, 1.0), 0.0)


def knn_sets(x, k: int, **kwargs) -> jax.Array:
    """Positions of each row's k nearest other rows (cosine), (n, k)."""
    return retrieval.knn(x, x, k, "cosine", **kwargs)[1]


def mutual_knn(x=None, y=None, k: int = 10, *, neighbours_x=None, neighbours_y=None, **kwargs) -> jax.Array:
    """Mutual k-NN alignment of two representations of the same n samples, in [0, 1].

    Pass features (x, y) or precomputed neighbour sets from `knn_sets` (to reuse one model's sets
    across many pairs)."""
    nx = knn_sets(x, k, **kwargs) if neighbours_x is None else jnp.asarray(neighbours_x)
    ny = knn_sets(y, k, **kwargs) if neighbours_y is None else jnp.asarray(neighbours_y)
    if nx.shape != ny.shape:
        raise ValueError(f"similarity.mutual_knn: neighbour sets differ in shape: {nx.shape} vs {ny.shape}")
    return _overlap(nx, ny)


@jax.jit
def _overlap(nx, ny):
    k = nx.shape[1]
    common = jnp.sum((nx[:, :, None] == ny[:, None, :]) & (nx[:, :, None] >= 0), axis=(1, 2))
    return jnp.mean(common / k)
