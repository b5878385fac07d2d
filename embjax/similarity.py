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

Everything at once, fast: `statistics_matrices` (linear CKA, SVCCA, PWCCA, angular Procrustes
distance for every pair of blocks, float64 host LAPACK on one thread) and `feature_matrices`
(debiased CKA, mutual k-NN, CKNNA). Each measure's invariances and whether it is a similarity or a
distance are stated where it is defined.

Pure jax.numpy and NumPy / SciPy; imports only the pure embjax.stats, embjax.retrieval and
embjax.maps (for `lapack_threads`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg  # loaded before any lapack_threads() block, so that its OpenBLAS is limited too

from embjax import retrieval, stats
from embjax.maps import lapack_threads

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


# --------------------------------------------------------------------------------------------------
# Every measure of many models at once, on the host (float64 NumPy / LAPACK, one LAPACK thread)
#
# At 1280 dimensions the cost is decompositions: one symmetric eigendecomposition per model (SVCCA and
# PWCCA) and one symmetric eigenvalue problem per pair (the Procrustes nuclear norm). They run in
# float64 through NumPy/SciPy with the BLAS pool held at one thread (maps.lapack_threads): OpenBLAS's
# threaded tridiagonal reduction runs 8-10× slower than one thread on a busy 2-core machine (25 s
# against 3 s for one 1280² eigh at load 22).


def _top_whitener(c: np.ndarray, dims, rel_tol: float):
    """Columns P (d × kept) with Pᵀ c P = I on c's leading principal directions (at most `dims`,
    eigenvalues above rel_tol · λ_max)."""
    d = c.shape[0]
    c = 0.5 * (c + c.T)
    k = d if dims is None else min(int(dims), d)
    if k < d:  # only the top k eigenpairs (MRRR): the tridiagonal reduction and k vectors
        vals, vecs = scipy.linalg.eigh(c, subset_by_index=[d - k, d - 1], driver="evr")
    else:
        vals, vecs = np.linalg.eigh(c)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    keep = vals > rel_tol * max(float(vals[0]) if d else 0.0, np.finfo(np.float64).tiny)
    return vecs[:, keep] / np.sqrt(vals[keep])[None, :]


def statistics_matrices(state, dims: int | None = 32, rel_tol: float = 1e-6, rotations=None) -> dict:
    """Every measure from the joint statistics, for all pairs of blocks: {name: (N, N) float64}.

      cka         linear CKA ‖C_AB‖²_F / (‖C_AA‖_F ‖C_BB‖_F), a similarity in [0, 1]; invariant to
                  orthogonal maps and isotropic scaling of either side (not to general linear maps).
      svcca       mean canonical correlation after keeping each side's leading `dims` principal
                  directions (Raghu et al. 2017; dims=None: all non-degenerate ones), a similarity in
                  [0, 1]; invariant to invertible linear maps within the kept subspaces.
      pwcca       projection-weighted CCA (Morcos et al. 2018) on the same subspaces: Σ α_k ρ_k / Σ α_k,
                  α_k = Σ_j |⟨h_k, x_j⟩| the absolute projections of row side A's k-th canonical variate
                  h_k = X_A a_k on A's centred units x_j (from the statistics: the entries of C_AA a_k);
                  a similarity in [0, 1], NOT symmetric (row = the side whose units weigh).
      procrustes  angular Procrustes distance arccos(‖C_AB‖_* / √(tr C_AA tr C_BB)) (Williams et al.
                  2021), a distance in [0, π/2] radians, 0 iff one side is an orthogonal map of the other
                  up to scale and shift; ‖C_AB‖_* from the eigenvalues of the smaller Gram C_ABᵀC_AB,
                  or, when `rotations[(i, j)]` (i < j) holds the orthogonal factor R = U Vᵀ of C_ij
                  (e.g. from the Procrustes maps, maps.scaled_procrustes), as tr(Rᵀ C_ij) without a
                  decomposition.
    All in float64 from the float32 statistics, one LAPACK thread (see `lapack_threads`)."""
    n = len(state.dims)
    out = {k: np.zeros((n, n)) for k in ("cka", "svcca", "pwcca", "procrustes")}
    cross = np.asarray(state.cross)  # one device-to-host copy, sliced on the host (the host code below
    # runs under lapack_threads(1); see maps.lapack_threads for why no jax computation may be in flight)
    o = stats.offsets(state)
    scale = 1.0 / max(int(state.count), 1)

    def _host_block(i, j):
        return cross[o[i]:o[i + 1], o[j]:o[j + 1]].astype(np.float64) * scale

    rotations = {} if rotations is None else rotations
    with lapack_threads(1):
        diag = [_host_block(i, i) for i in range(n)]
        whiten = [_top_whitener(c, dims, rel_tol) for c in diag]
        frob = [np.linalg.norm(c) for c in diag]
        trace = [float(np.trace(c)) for c in diag]
        for i in range(n):
            out["svcca"][i, i] = out["pwcca"][i, i] = out["cka"][i, i] = 1.0
            for j in range(i + 1, n):
                c_ij = _host_block(i, j)
                den = frob[i] * frob[j]
                out["cka"][i, j] = out["cka"][j, i] = float(np.sum(c_ij * c_ij) / den) if den > 0 else 0.0
                p_i, p_j = whiten[i], whiten[j]
                u, rho, vt = np.linalg.svd(p_i.T @ c_ij @ p_j, full_matrices=False)
                rho = np.clip(rho, 0.0, 1.0)
                out["svcca"][i, j] = out["svcca"][j, i] = float(rho.mean()) if rho.size else 0.0
                for a, b, p, vecs in ((i, j, p_i, u), (j, i, p_j, vt.T)):
                    alpha = np.abs(diag[a] @ (p @ vecs)).sum(axis=0)  # Σ_j |⟨h_k, x_j⟩| up to a common factor
                    out["pwcca"][a, b] = float(np.sum(alpha * rho) / np.sum(alpha)) if alpha.sum() > 0 else 0.0
                if (i, j) in rotations:
                    nuclear = float(np.sum(np.asarray(rotations[(i, j)], np.float64) * c_ij))
                else:
                    small = c_ij if c_ij.shape[0] <= c_ij.shape[1] else c_ij.T
                    nuclear = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(small @ small.T), 0.0, None))))
                den = np.sqrt(trace[i] * trace[j])
                cos = nuclear / den if den > 0 else 0.0
                out["procrustes"][i, j] = out["procrustes"][j, i] = float(np.arccos(np.clip(cos, 0.0, 1.0)))
    return out


def cknna(x, y, k: int = 10) -> float:
    """Centered kernel nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
    Hypothesis", their cknna with unbiased=True), a similarity in [−1, 1] (1 for identical neighbour
    kernels), invariant to orthogonal maps and scaling of either side's rows.

    With K = X̂X̂ᵀ and L = ŶŶᵀ the cosine kernels (rows L2-normalised, as that code's inputs are) and
    M_K(i, j) = 1 when j is among the k nearest other rows of i under K: the kernels restricted to the
    mutual neighbours, A = (M_K∘M_L)∘K and B = (M_K∘M_L)∘L, give
      CKNNA = HSIC_1(A, B) / √(HSIC_1(M_K∘K, M_K∘K) · HSIC_1(M_L∘L, M_L∘L))
    with Song et al.'s unbiased HSIC_1(A, B) = [Σ A∘Bᵀ + ΣA ΣB / ((n−1)(n−2)) − 2 · 1ᵀAB1 / (n−2)] / (n(n−3)).
    Computed on the ≤ nk non-zero entries, never an n×n matrix (n ≥ 4)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 4:
        raise ValueError(f"similarity.cknna: need two 2-D feature arrays with the same n ≥ 4 rows, got {x.shape} "
                         f"and {y.shape}")
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    yn = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    nx = np.asarray(knn_sets(xn.astype(np.float32), k, backend="host"))
    ny = np.asarray(knn_sets(yn.astype(np.float32), k, backend="host"))
    return _cknna_from_sets(xn, yn, nx, ny)


def _sparse_hsic(n, rows, cols, a, b):
    """Unbiased HSIC of two n×n matrices with the same sparsity (entries (rows, cols), zero diagonal)."""
    key = rows * n + cols
    key_t = cols * n + rows
    _, ia, ib = np.intersect1d(key, key_t, assume_unique=True, return_indices=True)
    trace_term = float(np.sum(a[ia] * b[ib]))  # Σ_ij A_ij B_ji
    col_a = np.bincount(cols, weights=a, minlength=n)  # Aᵀ1
    row_b = np.bincount(rows, weights=b, minlength=n)  # B1
    return (trace_term + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2.0 * float(col_a @ row_b) / (n - 2)) / (n * (n - 3))


def _knn_kernel(xn, sets):
    """One model's side of CKNNA: its kNN entries (rows, cols; −1 dropped), their kernel values and
    the unbiased HSIC of the kNN-masked kernel with itself."""
    n, k = sets.shape
    rows = np.repeat(np.arange(n), k)
    cols = sets.reshape(-1).astype(np.int64)
    ok = cols >= 0
    rows, cols = rows[ok], cols[ok]
    vals = np.einsum("ij,ij->i", xn[rows], xn[cols])
    return rows, cols, vals, _sparse_hsic(n, rows, cols, vals, vals)


def _cknna_from_sets(xn, yn, nx, ny, side_x=None, side_y=None) -> float:
    n = nx.shape[0]
    rx, cx, kx, h_xx = _knn_kernel(xn, nx) if side_x is None else side_x
    ry, cy, ly, h_yy = _knn_kernel(yn, ny) if side_y is None else side_y
    both, ix, iy = np.intersect1d(rx * n + cx, ry * n + cy, assume_unique=True, return_indices=True)
    h_xy = _sparse_hsic(n, both // n, both % n, kx[ix], ly[iy])
    den = np.sqrt(max(h_xx, 0.0) * max(h_yy, 0.0))
    return float(h_xy / den) if den > 0 else 0.0


@jax.jit
def _hsic_side(x):
    terms = _unbiased_hsic_terms(x)
    return terms, _unbiased_hsic(terms, terms)


@jax.jit
def _debiased_from_sides(tx, hx, ty, hy):
    den = jnp.sqrt(jnp.maximum(hx, 0.0) * jnp.maximum(hy, 0.0))
    return jnp.where(den > 0, _unbiased_hsic(tx, ty) / jnp.where(den > 0, den, 1.0), 0.0)


def feature_matrices(features, k: int = 10) -> dict:
    """Measures on evaluation features of the same n samples under N models: {name: (N, N)}:
    cka_debiased (`debiased_cka`), mutual_knn (`mutual_knn`, cosine, k neighbours) and cknna
    (`cknna`), the neighbour sets computed once per model."""
    feats = [np.asarray(f, np.float32) for f in features]
    n_models = len(feats)
    normed = [f.astype(np.float64) / np.maximum(np.linalg.norm(f.astype(np.float64), axis=1, keepdims=True),
                                                np.finfo(np.float64).tiny) for f in feats]
    sets = [np.asarray(knn_sets(f.astype(np.float32), k, backend="host")) for f in normed]
    sides = [_knn_kernel(x, st) for x, st in zip(normed, sets)]  # each model's kNN kernel, once
    hsic = [_hsic_side(jnp.asarray(f)) for f in feats]  # each model's HSIC terms and self-HSIC, once
    out = {key: np.eye(n_models) for key in ("cka_debiased", "mutual_knn", "cknna")}
    for i in range(n_models):
        for j in range(i + 1, n_models):
            values = {"cka_debiased": float(_debiased_from_sides(*hsic[i], *hsic[j])),
                      "mutual_knn": float(np.mean(np.sum((sets[i][:, :, None] == sets[j][:, None, :])
                                                         & (sets[i][:, :, None] >= 0), axis=(1, 2))) / k),
                      "cknna": _cknna_from_sets(normed[i], normed[j], sets[i], sets[j], sides[i], sides[j])}
            for key, v in values.items():
                out[key][i, j] = out[key][j, i] = v
    return out
