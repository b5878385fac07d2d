"""Closed-form maps between embedding spaces from their joint statistics: affine least squares,
Procrustes (plain and scaled with zero-padding), reduced rank. Maps from classifier weights alone (logit,
naive) are in embjax.head_maps.

Every map is a pair (W, b) acting on row vectors, x_dst ≈ x_src @ W + b, with W of shape
(d_src, d_dst). The statistics-based maps read a `Stats`-like state (fields `count`, `mean`, `cross`,
`dims`; see embjax.stats) and never touch raw features; this module imports nothing from embjax.

The public functions run eagerly on concrete arrays, because an ill-conditioned covariance must be
reported (warnings.warn) and repaired (a larger ridge) from outside any trace; the numerical kernels
they call are jitted. Every linear-algebra call runs under `jax.default_matmul_precision("highest")`
so that GPUs (TF32) and TPUs (bfloat16) do not silently lower the precision.

Conditioning of the affine solve, precisely:

1. Features whose spread is at the rounding level of their own mean (dead ReLU units, constants) are
   dropped from the regression: their rows of W are zero and the intercept absorbs them. They carry no
   information, and keeping them would make every post-ReLU block singular.
2. The remaining features are scaled to unit variance (Jacobi scaling) before the Cholesky
   factorisation; in exact arithmetic this changes nothing, in float32 it removes the part of the
   condition number that comes from features of different scales.
3. The condition number of the scaled, regularised matrix is estimated (power iteration for the largest
   eigenvalue, inverse iteration through the Cholesky factor for the smallest). When the factor is not
   finite or the estimate exceeds `cond_limit`, a warning names the block and the estimate, and the
   smallest relative ridge μ·diag(C_AA) with μ = λ_max / cond_limit (then 10×, 100×, ... if needed) that
   brings the estimate under the limit is added. Maps are therefore always finite.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import scipy.linalg  # noqa: F401  (loaded before any lapack_threads() block, so that its OpenBLAS is limited)

_HIGHEST = jax.lax.Precision.HIGHEST


class IllConditionedWarning(UserWarning):
    """A covariance block was singular or ill-conditioned and an extra ridge was added."""


def default_cond_limit(dtype) -> float:
    """Largest condition estimate accepted without an extra ridge: 1e6 in float32 (about 1/(16·eps):
    the worst direction of the solve still keeps a digit), 1e12 in float64."""
    return 1e6 if jnp.finfo(dtype).bits <= 32 else 1e12


# --------------------------------------------------------------------------------------------------
# Reading the statistics (duck-typed on the Stats fields, so this module imports nothing of embjax)


def _offsets(dims: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for d in dims:
        out.append(out[-1] + int(d))
    return tuple(out)


def _check_state(state, *blocks: int) -> None:
    for name in ("count", "mean", "cross", "dims"):
        if not hasattr(state, name):
            raise TypeError(f"maps: expected an embjax.stats.Stats state, got {type(state).__name__} without `{name}`")
    n_blocks = len(state.dims)
    for i in blocks:
        if not 0 <= int(i) < n_blocks:
            raise IndexError(f"maps: block index {i} out of range for a state with {n_blocks} blocks")
    if int(state.count) < 2:
        raise ValueError(
            f"maps: the statistics hold {int(state.count)} sample(s); fitting a map needs at least 2 "
            "(accumulate features with stats.update first)"
        )


def _block(state, i: int, j: int) -> jax.Array:
    o = _offsets(state.dims)
    return state.cross[o[i] : o[i + 1], o[j] : o[j + 1]]


def _mean(state, i: int) -> jax.Array:
    o = _offsets(state.dims)
    return state.mean[o[i] : o[i + 1]]


def _name(names, i: int) -> str:
    if names is None:
        return f"block {i}"
    return f"block {i} ({names[i]!r})"


# --------------------------------------------------------------------------------------------------
# The affine solve: one jitted kernel does slicing, factorisation, condition estimate and solve. The
# source block's offset is a traced value, so sources of equal width share one compilation.


def _dropped(c_aa: jax.Array, mean_a: jax.Array, count: jax.Array) -> jax.Array:
    """Features with no spread beyond the rounding of their mean (64 eps·|μ|, generous for a pairwise
    sum) or exactly none: dead units and constants."""
    eps = jnp.finfo(c_aa.dtype).eps
    var = jnp.diagonal(c_aa) / jnp.maximum(count, 1).astype(c_aa.dtype)
    return var <= (64 * eps * mean_a) ** 2


def _start_vector(d: int, dtype) -> jax.Array:
    """A fixed dense unit vector for the power iterations: irrational-frequency cosines, so it has a
    component along every eigenvector of a generic matrix (no RNG: cheaper to compile, deterministic)."""
    v = np.cos(np.arange(1, d + 1) * np.sqrt(2.0) * 2.0) + 0.5
    return jnp.asarray(v / np.linalg.norm(v), dtype)


_CHOLESKY_BLOCK = 128


def _cholesky_unblocked(a: jax.Array) -> jax.Array:
    """Left-looking column Cholesky in plain XLA ops (one matrix-vector product per column); NaN
    appears, and propagates, where `a` is not positive definite."""
    b = a.shape[0]
    rows = jnp.arange(b)

    def column(j, factor):
        # factor's columns ≥ j are still zero, so factor @ factor[j] sums over k < j only.
        v = a[:, j] - jnp.matmul(factor, factor[j], precision=_HIGHEST)
        col = v / jnp.sqrt(v[j])
        return factor.at[:, j].set(jnp.where(rows >= j, col, 0.0))

    return jax.lax.fori_loop(0, b, column, jnp.zeros_like(a))


def _cholesky(a: jax.Array) -> jax.Array:
    """Lower Cholesky factor, NaN where `a` is not positive definite (like jnp.linalg.cholesky).

    Right-looking blocked algorithm: 128-wide diagonal blocks by the column loop above, panels by
    triangular solves, trailing updates by matmuls, so nearly all of the d³/3 flops run in XLA's
    multi-threaded matmul and no LAPACK potrf is called. Why: on CPU, jaxlib's potrf is the bundled
    OpenBLAS, whose threads spin against XLA's and against other processes; on a loaded 2-core
    machine it took 0.26 s for a 256² block that it factors in 0.7 ms single-threaded, and 1.2–2.2 s
    for 1280² (under 1 GFLOP/s).
    """
    d = a.shape[0]
    factor = jnp.zeros_like(a)
    rest = a
    for k0 in range(0, d, _CHOLESKY_BLOCK):
        k1 = min(k0 + _CHOLESKY_BLOCK, d)
        diag = _cholesky_unblocked(rest[k0:k1, k0:k1])
        factor = factor.at[k0:k1, k0:k1].set(diag)
        if k1 < d:
            # Panel: L_21 = A_21 L_11⁻ᵀ; trailing block: A_22 − L_21 L_21ᵀ.
            panel = jax.lax.linalg.triangular_solve(diag, rest[k1:, k0:k1], left_side=False, lower=True, transpose_a=True)
            factor = factor.at[k1:, k0:k1].set(panel)
            rest = rest.at[k1:, k1:].add(-jnp.matmul(panel, panel.T, precision=_HIGHEST))
    return factor


@functools.partial(jax.jit, static_argnames=("d", "dims", "iters"))
def _fit_source(cross, mean, count, ridge, rel, lo, *, d, dims, iters=30):
    """Affine maps from the source block of width `d` starting at column `lo` to every block of `dims`.

    Solves s (C_AA + λI + rel·diag(C_AA + λI)) s · y = s C_A· and returns, per block t of `dims`, W_t = s y_t
    and b_t = μ_t − μ_A W_t (the source's own entry is an identity up to rounding and is discarded by
    the caller), together with (finite, λ_max, λ_min) of the scaled, regularised matrix for the
    conditioning check. λ = ridge · tr(C_AA) / d_A; s = diag(C_AA + λI)^-½ on kept features, 0 on dropped.
    """
    dtype = cross.dtype
    rows = jax.lax.dynamic_slice_in_dim(cross, lo, d, axis=0)  # C_A· : (d, D)
    c_aa = jax.lax.dynamic_slice_in_dim(rows, lo, d, axis=1)
    mean_a = jax.lax.dynamic_slice_in_dim(mean, lo, d)

    drop = _dropped(c_aa, mean_a, count)
    diag = jnp.diagonal(c_aa)
    lam = ridge * jnp.trace(c_aa) / d
    # Jacobi scaling of the regularised matrix C_AA + λI itself (its diagonal becomes 1). Scaling by
    # diag C_AA alone would put λ / var_k on the diagonal: for a nearly dead feature (variance 1e-9 of
    # the median) that is ~1e8 and dominates the condition estimate, which no extra `rel` could then
    # bring under the limit (seen on EfficientNet-Lite pre-logits with ridge 0.1).
    s = jnp.where(drop, 0.0, jax.lax.rsqrt(jnp.where(drop, 1.0, diag + lam)))
    a = c_aa * s[:, None] * s[None, :]
    # Dropped features get a unit diagonal (their rows and columns are zero): W's rows there are zero.
    a_diag = jnp.where(drop, 1.0, 1.0 + rel).astype(dtype)
    idx = jnp.arange(d)
    a = a.at[idx, idx].set(a_diag)
    chol = _cholesky(a)
    finite = jnp.all(jnp.isfinite(chol))
    safe_chol = jnp.where(finite, chol, jnp.eye(d, dtype=dtype))

    def solve(rhs):
        return jsl.cho_solve((safe_chol, True), rhs)

    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(dtype).tiny)

    v0 = _start_vector(d, dtype)
    v = jax.lax.fori_loop(0, iters, lambda _, v: unit(jnp.matmul(a, v, precision=_HIGHEST)), v0)
    lam_max = jnp.dot(v, jnp.matmul(a, v, precision=_HIGHEST), precision=_HIGHEST)
    u = jax.lax.fori_loop(0, iters, lambda _, v: unit(solve(v)), v0)
    # Rayleigh quotient of A⁻¹ at the converged vector: its inverse is an upper bound on λ_min.
    inv_quot = jnp.dot(u, solve(u), precision=_HIGHEST)
    lam_min = jnp.where(finite & (inv_quot > 0), 1.0 / inv_quot, 0.0)

    w = solve(rows * s[:, None]) * s[:, None]
    b = mean - jnp.matmul(mean_a, w, precision=_HIGHEST)
    o = _offsets(dims)
    per_block = tuple((w[:, o[t] : o[t + 1]], b[o[t] : o[t + 1]]) for t in range(len(dims)))
    return per_block, finite, lam_max, lam_min


def _affine_from(state, src: int, ridge: float, names, cond_limit):
    """Maps from `src` to every block (a tuple of (W, b)), repairing an ill-conditioned C_AA with a
    warning."""
    if not (isinstance(ridge, (int, float, np.floating, np.integer)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"maps: ridge must be a finite number ≥ 0 (relative to tr(C_AA)/d_A), got {ridge!r}")
    o = _offsets(state.dims)
    if cond_limit is None:
        cond_limit = default_cond_limit(state.cross.dtype)
    fit = functools.partial(
        _fit_source,
        state.cross,
        state.mean,
        state.count,
        float(ridge),
        lo=o[src],
        d=state.dims[src],
        dims=tuple(state.dims),
    )

    def cond_of(finite, lam_max, lam_min):
        return float(lam_max / lam_min) if bool(finite) and float(lam_min) > 0 else math.inf

    out, finite, lam_max, lam_min = fit(0.0)
    cond = cond_of(finite, lam_max, lam_min)
    if cond <= cond_limit:
        return out
    first_cond = cond
    # λ_max of the scaled matrix is at most its trace (about d_A); the power estimate is sharper.
    top = float(lam_max) if math.isfinite(float(lam_max)) and float(lam_max) > 0 else float(state.dims[src])
    rel = top / cond_limit
    for _ in range(12):
        out, finite, lam_max, lam_min = fit(rel)
        cond = cond_of(finite, lam_max, lam_min)
        if cond <= cond_limit:
            break
        rel *= 10.0
    else:  # pragma: no cover - rel has reached 1e12·λ_max/limit, far beyond diagonal dominance
        raise FloatingPointError(f"maps: could not regularise the covariance of {_name(names, src)}")
    warnings.warn(
        f"maps: the covariance of {_name(names, src)} is singular or ill-conditioned "
        f"(condition estimate {first_cond:.3g} after scaling features to unit variance, limit "
        f"{cond_limit:.3g}); added a ridge of {rel:.3g}·diag(C_AA) to keep its maps finite "
        f"(new estimate {cond:.3g}). Pass a larger `ridge` to silence this.",
        IllConditionedWarning,
        stacklevel=3,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Affine least-squares maps


def affine(state, src: int, dst: int, ridge: float = 0.0, *, names=None, cond_limit: float | None = None):
    """Least-squares affine map from block `src` to block `dst`: x_dst ≈ x_src @ W + b.

    W = (C_AA + λI)⁻¹ C_AB by Cholesky and b = μ_B − μ_A W, where C are the centred cross-products of
    the statistics. `ridge` is unit-free: λ = ridge · tr(C_AA) / d_A, i.e. a fraction of the average
    feature variance times n, so the same value means the same thing for any feature scale or sample
    count. ridge = 0 is ordinary least squares with an intercept. See the module docstring for what
    happens to constant features and ill-conditioned blocks (warning + extra ridge, never NaN).

    Args:
      state: an embjax.stats.Stats.
      src, dst: block indices.
      ridge: relative ridge, ≥ 0.
      names: optional model names, used in warnings.
      cond_limit: condition estimate above which an extra ridge is added (default: 1e6 for float32).
    Returns:
      (W (d_src, d_dst), b (d_dst,)).
    """
    _check_state(state, src, dst)
    if src == dst:
        raise ValueError(f"maps.affine: src and dst are both {src}; the map of a block to itself is the identity")
    # Solving for every block at once shares one compiled kernel with affine_all and reduced_rank;
    # the extra triangular solves cost O(d_A²·D) flops, of the order of the Cholesky factorisation
    # itself and far below the O(n·D²) of accumulating the statistics.
    return affine_all(state, ridge, names=names, cond_limit=cond_limit, sources=(src,))[(src, dst)]


def affine_all(
    state, ridge: float = 0.0, *, names=None, cond_limit: float | None = None, sources: Sequence[int] | None = None
) -> dict:
    """All N(N−1) affine maps {(src, dst): (W, b)} for src ≠ dst, factoring each source block once and
    solving for all its targets in one triangular solve. Same arguments as `affine`; `sources`
    restricts the fit to some source blocks (default: all)."""
    n_blocks = len(getattr(state, "dims", ()))
    sources = tuple(range(n_blocks)) if sources is None else tuple(int(s) for s in sources)
    _check_state(state, *sources)
    out = {}
    with jax.default_matmul_precision("highest"):
        for src in sources:
            if n_blocks < 2:
                continue
            per_block = _affine_from(state, src, ridge, names, cond_limit)
            for t in range(n_blocks):
                if t != src:
                    out[(src, t)] = per_block[t]
    return out


def apply(x: jax.Array, wb) -> jax.Array:
    """x @ W + b at full precision, for a map (W, b)."""
    w, b = wb
    return jnp.matmul(x, w, precision=_HIGHEST) + b


# --------------------------------------------------------------------------------------------------
# Constrained maps


def lapack_threads(n: int = 1):
    """Context manager holding the BLAS/LAPACK thread pools at `n` threads: NumPy's, SciPy's and
    through SciPy's the one jax's CPU eigh / SVD call. OpenBLAS's threaded tridiagonal and bidiagonal
    reductions run 8-10× slower than one thread when a 2-core machine is busy (one 1280² eigh: 25 s
    against 3 s at load 22). Only libraries loaded when the block starts are limited; a no-op without
    threadpoolctl. The setting is process-wide: enter it only from host code with no jax computation in
    flight (an asynchronously dispatched jax LAPACK call whose thread count changed mid-way could round
    differently), which is why the jax paths of this module do not use it; OPENBLAS_NUM_THREADS=1 at
    process start has the same speed effect everywhere."""
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        import contextlib

        return contextlib.nullcontext()
    return threadpoolctl.threadpool_limits(limits=int(n), user_api="blas")


def procrustes(state, src: int, dst: int, *, scale: bool = False):
    """Orthogonal (Procrustes) map: min ‖(X_A − μ_A) R − (X_B − μ_B)‖_F over R with R Rᵀ = I.

    R = U Vᵀ from the SVD C_AB = U Σ Vᵀ. Requires d_src ≤ d_dst, so that R is an isometry of the source
    space into the target space (square orthogonal when the widths match). With `scale=True`, W = s R
    with the optimal s = tr Σ / tr C_AA. b = μ_B − μ_A W in both cases.

    Where the statistics leave R free (C_AB of rank r below the width, e.g. fewer fit samples than
    dimensions), every R = U_r V_rᵀ + U_⊥ Q V_⊥ᵀ with Q orthogonal fits equally well, and the SVD
    routine's arbitrary null-space vectors would pick one. The map is R = U_r V_rᵀ (Q = 0, the
    minimum-norm member of that set's convex hull): directions outside the span of the fit data map
    to zero, and no number depends on the LAPACK build. Singular values at or below
    max(d_A, d_B) · ε · σ_max (numerically zero, NumPy's matrix_rank rule) count as null; with C_AB of
    full rank this is the usual orthogonal map.
    """
    _check_state(state, src, dst)
    d_a, d_b = state.dims[src], state.dims[dst]
    if d_a > d_b:
        raise ValueError(
            f"maps.procrustes: source block {src} is wider ({d_a}) than target block {dst} ({d_b}); an "
            "isometry needs d_src ≤ d_dst. Use reduced_rank or affine for this pair."
        )
    with jax.default_matmul_precision("highest"):
        return _procrustes(_block(state, src, src), _block(state, src, dst), _mean(state, src), _mean(state, dst), scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def _procrustes(c_aa, c_ab, mean_a, mean_b, scale):
    u, sv, vt = jnp.linalg.svd(c_ab, full_matrices=False)
    r = _span_rotation(u, sv, vt)
    if scale:
        tr = jnp.trace(c_aa)
        r = r * jnp.where(tr > 0, jnp.sum(sv) / jnp.where(tr > 0, tr, 1.0), 0.0)
    return r, mean_b - jnp.matmul(mean_a, r, precision=_HIGHEST)


def reduced_rank(state, src: int, dst: int, rank: int, ridge: float = 0.0, *, names=None, cond_limit=None):
    """Rank-`rank` least-squares affine map (classical reduced-rank regression).

    With W the full (ridge) least-squares map, the rank-k map is W P_k, where P_k = V_k V_kᵀ projects
    onto the top k eigenvectors of the fitted values' covariance Wᵀ C_AA W; b = μ_B − μ_A W P_k. For
    ridge = 0 this minimises the squared error over all maps of rank ≤ k.
    """
    _check_state(state, src, dst)
    d_a, d_b = state.dims[src], state.dims[dst]
    if not (isinstance(rank, (int, np.integer)) and 1 <= rank <= min(d_a, d_b)):
        raise ValueError(f"maps.reduced_rank: rank must be an integer in [1, {min(d_a, d_b)}], got {rank!r}")
    w, _ = affine(state, src, dst, ridge, names=names, cond_limit=cond_limit)
    return truncate_rank(state, src, dst, w, rank)


def truncate_rank(state, src: int, dst: int, w, rank: int):
    """The rank-`rank` map W P_k from an already fitted full map W (see `reduced_rank`), so that a
    sweep over ranks factors C_AA once."""
    _check_state(state, src, dst)
    d_a, d_b = state.dims[src], state.dims[dst]
    if not (isinstance(rank, (int, np.integer)) and 1 <= rank <= min(d_a, d_b)):
        raise ValueError(f"maps.truncate_rank: rank must be an integer in [1, {min(d_a, d_b)}], got {rank!r}")
    w = jnp.asarray(w, state.cross.dtype)
    if w.shape != (d_a, d_b):
        raise ValueError(f"maps.truncate_rank: W has shape {w.shape}, expected {(d_a, d_b)}")
    with jax.default_matmul_precision("highest"):
        return _project_rank(w, _block(state, src, src), _mean(state, src), _mean(state, dst), int(rank))


def truncate_ranks(state, src: int, dst: int, w, ranks: Sequence[int]) -> list:
    """`truncate_rank` for several ranks from one eigendecomposition: [(W_k, b_k) for k in ranks]."""
    _check_state(state, src, dst)
    d_a, d_b = state.dims[src], state.dims[dst]
    for rank in ranks:
        if not (isinstance(rank, (int, np.integer)) and 1 <= rank <= min(d_a, d_b)):
            raise ValueError(f"maps.truncate_ranks: ranks must be integers in [1, {min(d_a, d_b)}], got {rank!r}")
    w = jnp.asarray(w, state.cross.dtype)
    with jax.default_matmul_precision("highest"):
        vecs = _fitted_eigenvectors(w, _block(state, src, src))
        return [_project_onto(w, vecs[:, -int(k):], _mean(state, src), _mean(state, dst)) for k in ranks]


@jax.jit
def _fitted_eigenvectors(w, c_aa):
    fitted = jnp.matmul(w.T, jnp.matmul(c_aa, w, precision=_HIGHEST), precision=_HIGHEST)
    return jnp.linalg.eigh(0.5 * (fitted + fitted.T))[1]  # ascending eigenvalues


@jax.jit
def _project_onto(w, top, mean_a, mean_b):
    w_k = jnp.matmul(jnp.matmul(w, top, precision=_HIGHEST), top.T, precision=_HIGHEST)
    return w_k, mean_b - jnp.matmul(mean_a, w_k, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("rank",))
def _project_rank(w, c_aa, mean_a, mean_b, rank):
    fitted = jnp.matmul(w.T, jnp.matmul(c_aa, w, precision=_HIGHEST), precision=_HIGHEST)
    fitted = 0.5 * (fitted + fitted.T)
    _, vecs = jnp.linalg.eigh(fitted)  # ascending eigenvalues
    top = vecs[:, -rank:]
    w_k = jnp.matmul(jnp.matmul(w, top, precision=_HIGHEST), top.T, precision=_HIGHEST)
    return w_k, mean_b - jnp.matmul(mean_a, w_k, precision=_HIGHEST)



def scaled_procrustes(state, src: int, dst: int):
    """Orthogonal map after centring and scaling both sides to unit total variance, the narrower side
    zero-padded: the map of shape analysis (Williams et al. 2021) for spaces of any widths.

    With σ_A = √(tr C_AA / n), σ_B likewise, the problem is min ‖(X_A − μ_A) R / σ_A − (X_B − μ_B) / σ_B‖
    over orthogonal R of size max(d_A, d_B), the narrower features padded with zero columns. Its
    solution restricted to the real columns (d_A > d_B) or rows (d_A < d_B) is R = U Vᵀ from the thin
    SVD C_AB = U Σ Vᵀ: for d_A > d_B the padded target has C = [C_AB 0], and tr(Rᵀ C) only sees the
    first d_B columns of R, whose best value over matrices with orthonormal columns is U Vᵀ; d_A < d_B
    is the transpose. Back in B's units: W = (σ_B / σ_A) R, b = μ_B − μ_A W. Unlike `procrustes`,
    the scale is fixed by the two spreads rather than fitted, and the source may be wider (then the
    map is a projection followed by a rotation, not an isometry). Where C_AB has rank below the
    width, R = U_r V_rᵀ over its numerically non-zero singular values (see `procrustes`): the
    minimum-norm completion, so the map never depends on the SVD routine's null-space vectors.
    """
    _check_state(state, src, dst)
    with jax.default_matmul_precision("highest"):
        return _scaled_procrustes(_block(state, src, src), _block(state, src, dst), _block(state, dst, dst),
                                  _mean(state, src), _mean(state, dst))


def scaled_procrustes_both(state, a: int, b: int):
    """`scaled_procrustes` in both directions from one SVD: ((W_ab, b_ab), (W_ba, b_ba)). The SVD of
    C_BA = C_ABᵀ is V Σ Uᵀ, so R_BA = R_ABᵀ and only the spreads swap."""
    _check_state(state, a, b)
    with jax.default_matmul_precision("highest"):
        c_aa, c_bb = _block(state, a, a), _block(state, b, b)
        m_a, m_b = _mean(state, a), _mean(state, b)
        w_ab, b_ab = _scaled_procrustes(c_aa, _block(state, a, b), c_bb, m_a, m_b)
        r = w_ab * jnp.sqrt(jnp.trace(c_aa) / jnp.maximum(jnp.trace(c_bb), jnp.finfo(c_aa.dtype).tiny))
        s_ba = jnp.where(jnp.trace(c_bb) > 0, jnp.sqrt(jnp.trace(c_aa) / jnp.maximum(jnp.trace(c_bb), jnp.finfo(c_aa.dtype).tiny)), 0.0)
        w_ba = r.T * s_ba
        return (w_ab, b_ab), (w_ba, m_a - jnp.matmul(m_b, w_ba, precision=_HIGHEST))


def _span_rotation(u, sv, vt):
    """U_r V_rᵀ over the singular values above the numerical-zero level (see `procrustes`)."""
    tol = max(u.shape[0], vt.shape[1]) * jnp.finfo(sv.dtype).eps * jnp.max(sv)
    return jnp.matmul(u * (sv > tol)[None, :], vt, precision=_HIGHEST)


@jax.jit
def _scaled_procrustes(c_aa, c_ab, c_bb, mean_a, mean_b):
    u, sv, vt = jnp.linalg.svd(c_ab, full_matrices=False)
    r = _span_rotation(u, sv, vt)
    tr_a, tr_b = jnp.trace(c_aa), jnp.trace(c_bb)
    s = jnp.where(tr_a > 0, jnp.sqrt(tr_b / jnp.where(tr_a > 0, tr_a, 1.0)), 0.0)
    w = r * s
    return w, mean_b - jnp.matmul(mean_a, w, precision=_HIGHEST)
