"""A canonical space shared by N models, solved from their joint statistics alone.

Given the one-pass statistics of embjax.stats (count n, means μ, centred cross-products C of the
concatenated features x = [x_1 … x_N]), this module finds a k-dimensional "hub" variable h shared by all
N models, and for each model an encoder (d_i → k) and a decoder (k → d_i):

    encode_i(x_i) = (x_i − μ_i) E_i          E_i: least squares of h on x_i,   (d_i, k)
    decode_j(h)   = h D_j + μ_j              D_j: least squares of x_j on h,   (k, d_j)

so that any source s reaches any target t through the hub with N encoders and N decoders instead of
N(N − 1) direct maps: the composition x_s ↦ (x_s − μ_s) E_s D_t + μ_t is an affine map (W = E_s D_t,
b = μ_t − μ_s W) usable wherever a direct affine map is (`compose`, `pair_maps`). Two hubs:

* Generalized CCA (MAXVAR, `gcca`). With each block whitened, W_i = Σ_ii^{-1/2} (Σ = C / n; a relative
  ridge, or a pseudo-inverse square root beyond `cond_limit`, for singular blocks), the whitened joint
  covariance B has blocks B_ij = W_i Σ_ij W_j. Its top-k eigenvectors V (eigenvalues Λ) define the
  shared variable h = Σ_i (x_i − μ_i) W_i V_i Λ^{-1/2}, the unit-variance k-vector closest to all N
  feature spaces at once (it maximises the summed squared projections onto every model's span). From
  B V = V Λ both least-squares maps are closed form without touching C again:
      E_i = W_i V_i Λ^{1/2},      D_j = Λ^{1/2} V_jᵀ W_j^{-1},
  hence E_s D_t = W_s (V Λ Vᵀ)_st W_t^{-1}: at full rank k = D this is W_s B_st W_t^{-1} = Σ_ss^{-1} Σ_st,
  exactly the direct (ridge) least-squares map.
* Generalized Procrustes (`procrustes`). Each model's centred features scaled to unit total variance,
  y_i = (x_i − μ_i) / √tr Σ_ii, are rotated by R_i (d_i × k, orthonormal columns, or orthonormal rows
  when k > d_i) onto their common mean h = Σ_i y_i R_i / N, alternating rotations and mean. For a
  rotation update every inner product needed is a block of C: Cov(y_i, h) = Σ_j s_i s_j C_ij R_j / (nN).
  The update R_i ← polar(Cov(y_i, h)) (block by block, Gauss-Seidel) maximises, for the current h,
  the convex objective ‖Σ y_i R_i‖², so it never decreases it. Encoders and decoders are again least
  squares onto / from h (a pure rotation cannot undo a general linear distortion of the latent).

Memory, at the thesis' width (D = 21,408, float32, C = 1.71 GiB; `benchmarks/memory_plan.py --canonical
1024 --only-canonical`, XLA's own analysis, compile only). Both methods build one symmetric D × D
workspace from C and decompose it there (`_top_eigenpairs`): GCCA writes B into it block row by block
row, Procrustes the scaled joint covariance s_i s_j C_ij. On CPU, LAPACK's ?syevd runs on the workspace's
own buffer (`_lapack_rows`); jax's eigh gave LAPACK a column-major copy and copied the eigenvectors back
(XLA's plan was C + 2 D × D, 5.12 GiB). XLA now plans C + 1 D × D for the eigendecomposition (3.41 GiB) and
at most C + 1 D × D + one block row of products (4.14 GiB, the 4,320-wide block row) for any GCCA step.
Procrustes' sweeps used to run in one while_loop over C, where XLA materialised every block row of C twice
(the row-block slices of the rotation updates and of the objective, hoisted out of the loop: 3.87 GiB of
temporaries, 5.82 GiB with C at k = 1024). They now run as one jitted step per block, fed its block row
as a view of C's own buffer (`_row_block`), and take the objective and the encoders' Cov(x, h) from the
one product C q: at k = 1024 a step plans C + 0.19 GiB, the objective C + 0.32 GiB and the encoders and
decoders C + 0.78 GiB (the diagonal blocks' pseudo-inverses), so Procrustes too peaks at C + 1 D × D
(3.41 GiB, its eigendecomposition). What XLA does not see: ?syevd (divide and conquer) allocates
1 + 6D + 2D² floats of its own. Measured as the rise of the resident set beyond C (`memory_plan.py
--canonical 1024 --only-canonical --measure 4096`: D = 4,096, the thesis' widths scaled, one D × D = 64
MiB, k = 1024, so one D × k is 0.25 D × D here; each row a fresh process, compiled before measuring):

    GCCA, before the in-place eigendecomposition (jax's eigh)      4.61 D × D   (an older run)
    GCCA, "divide_and_conquer" (default)                           3.26 D × D   (XLA's plan 1.43, LAPACK's 2)
    GCCA, "qr" (host ?syev, in place, O(D) scratch)                1.84 D × D   (workspace, block row, a few D × k)
    GCCA, "subset" (host ?syevr, in place, the top k only)         1.98 D × D   (the same, and its D × k vectors)
    Procrustes, before this change (jax's eigh, one while_loop)    3.55 D × D
    Procrustes, "divide_and_conquer" (default)                     3.02 D × D
    Procrustes, "qr"                                               2.31 D × D
    Procrustes, "subset"                                           2.27 D × D

(2026-12-07 16:05–16:19 UTC, load 1–4; `--solvers qr` a run of its own; "before" is `--methods
procrustes,gcca --solvers divide_and_conquer` run on commit 869ef13, whose GCCA gave 3.35, the same path
to the run's noise; the oldest row at load 10–14. An older harness, measuring every eigensolver in one
process, gave "qr" 1.15: memory freed by the run before it was reused.) So at the thesis' width the
default needs about C + 3.5 D × D (7.7 GiB) for either method, and "qr" and "subset" C + 1 D × D and a
few D × k: 3–5 D × k here, so about C + 1.2 D × D (3.8 GiB) at k = 1024 (an estimate), the one-workspace
goal. "subset" pays only when max(ranks) ≪ D: at k = D its eigenvectors are a second D × D.
Its time: ?syevr with RANGE = 'I' bisects for the top k eigenvalues and refines their eigenvectors by
inverse iteration, reorthogonalising within clusters (MRRR only for the whole spectrum). The
eigendecomposition step alone, D = 4,096, k = 1,024, three alternating rounds (`memory_plan.py --canonical
1024 --only-canonical --time-solvers 4096 --rounds 3`, 16:09 UTC, load 1–2; the first round compiles):
GCCA's B 4.6 s against the default's 3.8–4.1 s, Procrustes' scaled C 4.4–4.5 s against 3.7–4.1 s, so
about 1.15× the default's time ("qr": GCCA 139 s and Procrustes 59 s in the runs above, against the
default's 12 s and 10 s, so 6–11×). Encoders and decoders are D × k.

Pure functions of arrays; `gcca` and `procrustes` read a Stats-like state (count, mean, cross, dims).
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from embjax import maps as maps_lib

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class Hub:
    """A k-dimensional canonical space: per model an encoder (d_i, k), a decoder (k, d_i) and a mean."""

    encoders: tuple
    decoders: tuple
    means: tuple

    @property
    def rank(self) -> int:
        return int(self.encoders[0].shape[1])


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _check(state, ranks, name: str) -> tuple[int, ...]:
    for field in ("count", "mean", "cross", "dims"):
        if not hasattr(state, field):
            raise TypeError(f"canonical.{name}: expected an embjax.stats.Stats state, got {type(state).__name__}")
    if int(state.count) < 2:
        raise ValueError(f"canonical.{name}: the statistics hold {int(state.count)} sample(s); at least 2 are needed")
    width = sum(state.dims)
    ranks = tuple(int(k) for k in ranks)
    if not ranks or any(not 1 <= k <= width for k in ranks):
        raise ValueError(f"canonical.{name}: ranks must be integers in [1, {width}] (the joint width), got {ranks}")
    return ranks


def _spectral(c_ii, ridge, cond_limit):
    """(Σ + λI)^{-1/2}, (Σ + λI)^{1/2} and (Σ + λI)^{-1} of one block, with λ = ridge · tr Σ / d, as
    pseudo-inverses: eigenvalues below λ_max / cond_limit count as zero (dead units, constant features)."""
    d = c_ii.shape[0]
    vals, vecs = jnp.linalg.eigh(c_ii)
    vals = vals + ridge * jnp.trace(c_ii) / d
    keep = vals > jnp.max(vals) / cond_limit
    safe = jnp.where(keep, vals, 1.0)
    scaled = lambda f: _mm(vecs * jnp.where(keep, f(safe), 0.0), vecs.T)  # noqa: E731
    return scaled(jax.lax.rsqrt), scaled(jnp.sqrt), scaled(lambda v: 1.0 / v)


def _block_rows(cross, dims):
    o = np.cumsum((0,) + tuple(dims))
    return [(int(o[i]), int(o[i + 1])) for i in range(len(dims))]


@functools.partial(jax.jit, static_argnames=("dims",))
def _whitening(cross, count, ridge, cond_limit, *, dims):
    """Per block (W_i, W_i^{-1}) of Σ_ii = C_ii / n (pseudo-inverse square roots)."""
    n = jnp.maximum(count, 1).astype(cross.dtype)
    return tuple(_spectral(cross[a:b, a:b] / n, ridge, cond_limit)[:2] for a, b in _block_rows(cross, dims))


@functools.partial(jax.jit, static_argnames=("dims", "i"))
def _whitened_block_row(cross, count, whiten, *, dims, i):
    """Block row i of B = W Σ W, (d_i, D)."""
    blocks = _block_rows(cross, dims)
    a, b = blocks[i]
    row = _mm(whiten[i][0], cross[a:b] / jnp.maximum(count, 1).astype(cross.dtype))
    return jnp.concatenate([_mm(row[:, c:e], w_j) for (c, e), (w_j, _) in zip(blocks, whiten)], axis=1)


@functools.partial(jax.jit, static_argnames=("dims", "i"), donate_argnums=0)
def _whitened_row(work, cross, count, whiten, *, dims, i):
    """Block row i of B = W Σ W written into `work` (donated: updated in place, no second D × D), block
    by block: beside the workspace, XLA keeps the row's d_i × d_j products (d_i × D in all) and the
    scaled blocks of C they come from."""
    blocks = _block_rows(cross, dims)
    a, b = blocks[i]
    n = jnp.maximum(count, 1).astype(cross.dtype)
    for (c, e), (w_j, _) in zip(blocks, whiten):
        work = work.at[a:b, c:e].set(_mm(_mm(whiten[i][0], cross[a:b, c:e] / n), w_j))
    return work


def _lapack_rows(work):
    """CPU: LAPACK's ?syevd straight on `work`'s own buffer. jax.lax.linalg.eigh hands LAPACK a
    column-major copy of a row-major matrix and copies the eigenvectors back (two D × D transposes
    beside the workspace); read as column-major, `work`'s row-major buffer is workᵀ, whose upper triangle
    is `work`'s lower one, so for a symmetric matrix no copy is needed, and the eigenvectors LAPACK writes
    as columns are, read row-major, the rows of the result."""
    from jax._src.lib import lapack  # the target jax's own eigh calls on CPU (registered with jaxlib)

    n = work.shape[0]
    call = jax.ffi.ffi_call(lapack.prepare_lapack_call("syevd_ffi", work.dtype),
                            (jax.ShapeDtypeStruct(work.shape, work.dtype), jax.ShapeDtypeStruct((n,), work.dtype),
                             jax.ShapeDtypeStruct((), jnp.int32)), input_output_aliases={0: 0})
    return call(work, mode=np.uint8(ord("V")), uplo=np.uint8(ord("U")))


def _xla_rows(work):
    vecs, vals = jax.lax.linalg.eigh(work, lower=True, symmetrize_input=False)
    return vecs.T, vals, jnp.zeros((), jnp.int32)


@functools.partial(jax.jit, donate_argnums=0)
def _eigh_in_place(work):
    """(eigenvectors as rows, eigenvalues, LAPACK's info), ascending, from B's lower triangle; on CPU in the
    donated buffer of `work` (no XLA temporary: `_lapack_rows`), elsewhere through jax's eigh."""
    return jax.lax.platform_dependent(work, cpu=_lapack_rows, default=_xla_rows)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_rows(vecs, vals, *, k):
    """The k eigenvectors (rows) of largest eigenvalue and all eigenvalues, descending."""
    return vecs[::-1][:k], vals[::-1]


@functools.partial(jax.jit, static_argnames=("dims",))
def _gcca_maps(top, vals, whiten, *, dims):
    """Encoders and decoders from the top eigenvectors (rows of `top`, (k, D)) and their eigenvalues."""
    lam = jnp.sqrt(jnp.maximum(vals[: top.shape[0]], 0.0))
    blocks = _block_rows(top.T, dims)
    enc = tuple(_mm(w_i, top[:, a:b].T) * lam for (a, b), (w_i, _) in zip(blocks, whiten))
    dec = tuple((_mm(sq_j, top[:, a:b].T) * lam).T for (a, b), (_, sq_j) in zip(blocks, whiten))
    return enc, dec


def _host_eigh(work, k_max, eigensolver):
    """LAPACK on a NumPy workspace's own buffer, in place: read as column-major, `work`'s row-major buffer
    is workᵀ (so LAPACK's upper triangle is `work`'s lower one). "qr": ?syev (implicit QR, all eigenpairs,
    3D − 1 floats of scratch; the eigenvectors overwrite the workspace). "subset": ?syevr with RANGE = 'I',
    only the k_max largest eigenpairs (for a part of the spectrum LAPACK bisects the tridiagonal form and
    refines the eigenvectors by inverse iteration: O(D) scratch, the eigenvectors a new D × k_max; at
    k_max = D it uses MRRR). Returns (the top k_max eigenvectors as rows, eigenvalues, both descending
    (all D, or the top k_max for "subset"), LAPACK's info)."""
    import scipy.linalg

    d = work.shape[0]
    if eigensolver == "qr":
        syev, = scipy.linalg.get_lapack_funcs(("syev",), (work,))
        vals, vecs, info = syev(work.T, compute_v=1, lower=0, overwrite_a=1)  # work.T: its column-major view
        if not np.shares_memory(vecs, work):
            raise RuntimeError("canonical: LAPACK's ?syev did not work in place (a second D × D was made)")
        return work[::-1][:k_max], vals[::-1].copy(), info
    syevr, = scipy.linalg.get_lapack_funcs(("syevr",), (work,))
    vals, vecs, m, _, info = syevr(work.T, compute_v=1, range="I", lower=0, il=d - k_max + 1, iu=d, overwrite_a=1)
    if info == 0 and m != k_max:
        raise np.linalg.LinAlgError(f"canonical: LAPACK's ?syevr found {m} of the {k_max} largest eigenpairs")
    return vecs.T[::-1], vals[:m][::-1].copy(), info


def _top_eigenpairs(workspace, block_row, dims, k_max, eigensolver, what):
    """The k_max eigenvectors of largest eigenvalue (rows, (k_max, D)) and the eigenvalues (descending: all
    D, or the top k_max for "subset") of a symmetric D × D matrix, built in one workspace and decomposed
    there; only its lower triangle is read. "divide_and_conquer": `workspace()` returns it as a jax array,
    donated to LAPACK's ?syevd on CPU (`_eigh_in_place`; ?syevd allocates 1 + 6D + 2D² floats of its
    own). "qr", "subset": a NumPy workspace filled with `block_row(i)` ((d_i, D), one at a time) and
    decomposed by `_host_eigh`. `what` names the matrix in the error raised when LAPACK fails."""
    if eigensolver == "divide_and_conquer":
        vecs, vals, info = _eigh_in_place(workspace())
        top, vals = _top_rows(vecs, vals, k=k_max)
        del vecs
    else:
        width = sum(dims)
        work = None
        for i, (a, b) in enumerate(_block_rows(None, dims)):
            row = np.asarray(block_row(i))
            if work is None:
                work = np.empty((width, width), row.dtype)
            work[a:b] = row
            del row
        top, vals, info = _host_eigh(work, k_max, eigensolver)
        top = np.ascontiguousarray(top)  # the top rows on their own, so that the workspace can go first
        del work
        top, vals = jnp.asarray(top), jnp.asarray(vals)
    if int(info) != 0:
        raise np.linalg.LinAlgError(f"{what} failed (LAPACK info {int(info)}); check the statistics for NaN or inf")
    return top, vals


def _gcca(cross, count, ridge, cond_limit, *, dims, k_max, eigensolver):
    """Encoders, decoders (at width k_max) and eigenvalues (descending). Beyond C, one D × D buffer: B is
    written into it block row by block row, then overwritten by its eigenvectors."""
    whiten = _whitening(cross, count, ridge, cond_limit, dims=dims)

    def workspace():
        work = jnp.zeros_like(cross)
        for i in range(len(dims)):
            work = _whitened_row(work, cross, count, whiten, dims=dims, i=i)
        return work

    top, vals = _top_eigenpairs(workspace, lambda i: _whitened_block_row(cross, count, whiten, dims=dims, i=i),
                                dims, k_max, eigensolver,
                                "canonical.gcca: the eigendecomposition of the whitened joint covariance")
    enc, dec = _gcca_maps(top, vals, whiten, dims=dims)
    return enc, dec, vals


def _means(state):
    return tuple(state.mean[a:b] for a, b in _block_rows(state.cross, state.dims))


EIGENSOLVERS = ("divide_and_conquer", "qr", "subset")


def gcca(state, ranks: Sequence[int], ridge: float = 0.0, cond_limit: float | None = None,
         eigensolver: str = "divide_and_conquer"):
    """Generalized CCA (MAXVAR) hubs at every rank in `ranks`, from one eigendecomposition.

    Returns ({k: Hub}, eigenvalues of the whitened joint covariance, descending (all D of them; the top
    max(ranks) with eigensolver "subset"); they lie in [0, N] and a latent shared by all N models gives an
    eigenvalue near N). `ridge` is relative (λ_i = ridge · tr Σ_ii / d_i); eigenvalues of a block below its
    largest / cond_limit (default 1e6 in float32, 1e12 in float64) are treated as zero. `eigensolver`:
    "divide_and_conquer" (LAPACK ?syevd on CPU, in the workspace, but with 2 D² floats of LAPACK scratch),
    "qr" (?syev on the host, in place, O(D) scratch: C plus one D × D in all, several times slower) or
    "subset" (?syevr on the host, in place, only the top max(ranks) eigenpairs: O(D) scratch plus the
    D × max(ranks) eigenvectors); see the module docstring.
    """
    ranks = _check(state, ranks, "gcca")
    if eigensolver not in EIGENSOLVERS:
        raise ValueError(f"canonical.gcca: eigensolver must be one of {EIGENSOLVERS}, got {eigensolver!r}")
    cond = maps_lib.default_cond_limit(state.cross.dtype) if cond_limit is None else cond_limit
    with jax.default_matmul_precision("highest"):
        enc, dec, vals = _gcca(state.cross, state.count, ridge, cond, dims=tuple(state.dims), k_max=max(ranks),
                               eigensolver=eigensolver)
    means = _means(state)
    hubs = {k: Hub(tuple(e[:, :k] for e in enc), tuple(d[:k] for d in dec), means) for k in ranks}
    return hubs, vals


def _polar(a):
    """The orthonormal factor U Vᵀ of a = U S Vᵀ: the maximiser of tr(Rᵀ a) over R with orthonormal
    columns (rows when a is wide)."""
    u, _, vt = jnp.linalg.svd(a, full_matrices=False)
    return _mm(u, vt)


@jax.jit
def _scaled(cross, scale):
    """The scaled joint covariance s_i s_j C_ij as a new D × D: the workspace of the starting eigenvectors."""
    return cross * scale[:, None] * scale[None, :]


@functools.partial(jax.jit, static_argnames=("dims", "i"))
def _scaled_block_row(cross, scale, *, dims, i):
    """Block row i of the scaled joint covariance, (d_i, D) (the host eigensolvers' workspace, row by row)."""
    a, b = _block_rows(cross, dims)[i]
    return cross[a:b] * scale[a:b, None] * scale[None, :]


def _row_block(cross, a, b):
    """Rows a:b of C as a jax array without copying C where it lives in host memory: on CPU, a NumPy view
    of C's own buffer (DLPack) handed back to jax aliased (`may_alias`); elsewhere a slice (a copy of one
    block row, freed after its step)."""
    devices = cross.devices()
    device = next(iter(devices))
    if len(devices) == 1 and device.platform == "cpu":
        return jax.device_put(np.from_dlpack(cross)[a:b], device, may_alias=True)
    return cross[a:b]


@functools.partial(jax.jit, static_argnames=("dims",))
def _gpa_start(start, scale, *, dims):
    """q = [s_i R_i] with R_i = polar(model i's rows of the starting eigenvectors); where s_i = 0, 1/s_i = 0."""
    q = jnp.concatenate([scale[a:b, None] * _polar(start[a:b]) for a, b in _block_rows(start, dims)])
    return q, jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("a",), donate_argnums=1)
def _rotate_block(rows, q, scale, unscale, count, *, a):
    """One Gauss-Seidel step: R_i ← polar(Cov(y_i, h)) ∝ polar(s_i C_i· q) for the block whose rows of C are
    `rows` (C[a:b], (d_i, D)); q (donated) gets s_i R_i in rows a:b. Also returns how far R_i moved (root
    mean square per column)."""
    b = a + rows.shape[0]
    n = jnp.maximum(count, 1).astype(rows.dtype)
    rot = _polar(_mm(rows, q) * scale[a:b, None] / n)
    step = rot - q[a:b] * unscale[a:b, None]
    return q.at[a:b].set(scale[a:b, None] * rot), jnp.sqrt(jnp.sum(step * step) / min(b - a, q.shape[1]))


@functools.partial(jax.jit, static_argnames=("dims",))
def _objective(cross, q, count, *, dims):
    """tr Cov(Σ_i y_i R_i) at rotations q, exactly: Σ_i ⟨q_i, (C q)_i⟩ / n, with C q as one product (no
    block of C is copied)."""
    p = _mm(cross, q)
    return sum(jnp.sum(q[a:b] * p[a:b]) for a, b in _block_rows(cross, dims)) / jnp.maximum(count, 1).astype(q.dtype)


@jax.jit
def _go_on(changes, new, old, it, tol, tol_objective):
    """Whether to sweep again: some rotation moved by more than tol and (in the first two sweeps, or) the
    objective rose by more than tol_objective relative."""
    change = jnp.max(jnp.stack(changes))
    return (change > tol) & ((it < 2) | (new - old > tol_objective * jnp.abs(new)))


@functools.partial(jax.jit, static_argnames=("dims",))
def _gpa_maps(cross, count, q, ridge, cond_limit, *, dims):
    """Least squares onto and from h at rotations q: E_i = Σ_ii⁺ Cov(x_i, h), D_j = Cov(h)⁺ Cov(h, x_j); and
    the objective tr Cov(Σ_i y_i R_i) = tr (qᵀ C q) / n. Cov(x, h) ∝ C q is one product (D × k)."""
    blocks = _block_rows(cross, dims)
    n = jnp.maximum(count, 1).astype(cross.dtype)
    p = _mm(cross, q) / n
    cov_xh = [p[a:b] for a, b in blocks]
    cov_h = sum(_mm(q[a:b].T, g) for (a, b), g in zip(blocks, cov_xh))
    inv_h = _spectral(cov_h, 0.0, cond_limit)[2]
    enc = tuple(_mm(_spectral(cross[a:b, a:b] / n, ridge, cond_limit)[2], g) for (a, b), g in zip(blocks, cov_xh))
    dec = tuple(_mm(inv_h, g.T) for g in cov_xh)
    return enc, dec, jnp.trace(cov_h)


def _gpa(cross, count, scale, start, ridge, cond_limit, tol, tol_objective, *, dims, iters):
    """Alternating rotations from the starting directions `start` (D, k), block by block (Gauss-Seidel),
    then encoders and decoders. The sweeps run as one jitted step per block, fed its block row of C
    without a copy (`_row_block`), so beside C they hold O(D k): q = [s_i R_i] (the consensus is
    h = x_cat q / N, centred; Cov(y_i, h) ∝ s_i C_i· q)."""
    q, unscale = _gpa_start(start, scale, dims=dims)
    obj, it, go = _objective(cross, q, count, dims=dims), 0, bool(np.inf > tol)
    while it < iters and go:
        changes = []
        for a, b in _block_rows(cross, dims):
            q, change = _rotate_block(_row_block(cross, a, b), q, scale, unscale, count, a=a)
            changes.append(change)
        new, it = _objective(cross, q, count, dims=dims), it + 1
        go, obj = bool(_go_on(tuple(changes), new, obj, it, tol, tol_objective)), new
    enc, dec, obj = _gpa_maps(cross, count, q, ridge, cond_limit, dims=dims)
    return enc, dec, obj, it


def procrustes(state, ranks: Sequence[int], ridge: float = 0.0, cond_limit: float | None = None,
               iters: int = 500, tol: float | None = None, tol_objective: float | None = None,
               eigensolver: str = "divide_and_conquer"):
    """Generalized Procrustes hubs at every rank in `ranks` (one alternating solve per rank, each started
    from the top principal directions of the scaled joint covariance).

    Returns ({k: Hub}, {k: {"objective", "iterations"}}): the objective is tr Cov(Σ_i y_i R_i) = N² tr Cov(h)
    at the final rotations; the sweeps stop when no rotation moves by more than `tol` (root mean square
    per column, default √eps of the dtype), or when a sweep raises the objective by no more than
    `tol_objective` relative (default 10 eps: rounding; directions the objective does not see can keep
    rotations moving without changing the hub), or after `iters` (tol_objective = -inf: stop on the rotations alone).
    `eigensolver`: the starting directions' eigendecomposition, as in `gcca` (the scaled joint covariance
    in one D × D workspace).
    """
    ranks = _check(state, ranks, "procrustes")
    if eigensolver not in EIGENSOLVERS:
        raise ValueError(f"canonical.procrustes: eigensolver must be one of {EIGENSOLVERS}, got {eigensolver!r}")
    dtype = state.cross.dtype
    cond = maps_lib.default_cond_limit(dtype) if cond_limit is None else cond_limit
    tol = float(np.sqrt(jnp.finfo(dtype).eps)) if tol is None else tol
    tol_objective = 10 * float(jnp.finfo(dtype).eps) if tol_objective is None else tol_objective
    dims, cross = tuple(state.dims), state.cross
    if not isinstance(cross, jax.Array):  # host statistics (NumPy): one device array for every step, aliased
        cross = jax.device_put(np.ascontiguousarray(cross), may_alias=True)
    with jax.default_matmul_precision("highest"):
        tr = jnp.concatenate([jnp.full((b - a,), jnp.trace(cross[a:b, a:b])) for a, b in _block_rows(cross, dims)])
        scale = jnp.where(tr > 0, jax.lax.rsqrt(jnp.where(tr > 0, tr / state.count, 1.0)), 0.0).astype(dtype)
        top, _ = _top_eigenpairs(lambda: _scaled(cross, scale), lambda i: _scaled_block_row(cross, scale, dims=dims, i=i),
                                 dims, max(ranks), eigensolver,
                                 "canonical.procrustes: the eigendecomposition of the scaled joint covariance")
        start = top.T  # (D, k_max): the top principal directions as columns, descending
        del top
        hubs, info = {}, {}
        for k in ranks:
            enc, dec, obj, it = _gpa(cross, state.count, scale, start[:, :k], ridge, cond, tol, tol_objective,
                                     dims=dims, iters=iters)
            hubs[k] = Hub(enc, dec, _means(state))
            info[k] = {"objective": float(obj), "iterations": int(it)}
    return hubs, info


# --------------------------------------------------------------------------------------------------
# Using a hub


def encode(hub: Hub, i: int, x: jax.Array) -> jax.Array:
    """Model i's features (rows) in the hub: (x − μ_i) E_i."""
    return _mm(x - hub.means[i], hub.encoders[i])


def decode(hub: Hub, j: int, h: jax.Array) -> jax.Array:
    """Hub coordinates back into model j's feature space: h D_j + μ_j."""
    return _mm(h, hub.decoders[j]) + hub.means[j]


def compose(hub: Hub, src: int, dst: int):
    """source → hub → target as one affine map (W, b), x_dst ≈ x_src W + b: W = E_s D_t, b = μ_t − μ_s W."""
    w = _mm(hub.encoders[src], hub.decoders[dst])
    return w, hub.means[dst] - _mm(hub.means[src], w)


def pair_maps(hub: Hub) -> dict:
    """{(s, t): (W, b)} for every ordered pair s ≠ t, the form of maps.affine_all (one compiled call)."""
    with jax.default_matmul_precision("highest"):
        return _pair_maps(hub)


@jax.jit
def _pair_maps(hub: Hub) -> dict:
    n = len(hub.encoders)
    return {(s, t): compose(hub, s, t) for s in range(n) for t in range(n) if s != t}


def intrinsic_dim(ranks: Sequence[int], change: Sequence[float], direct: float, tolerance: float = 0.01):
    """The smallest rank whose score (e.g. mean relative change of accuracy over all ordered pairs) is
    within `tolerance` of the direct maps' score (1 point of relative change = 0.01); None if none is."""
    for k, c in sorted(zip(ranks, change)):
        if np.isfinite(c) and abs(c - direct) <= tolerance:
            return int(k)
    return None


def rank_curve(width: int, d_max: int) -> list[int]:
    """Ranks 1, 2, 4, … below the widest model, the widest model's width, then up to the joint width."""
    ks = [1 << p for p in range(int(np.log2(max(d_max, 1))) + 1) if (1 << p) < d_max]
    ks += [d_max, width]
    mids = [k for k in (2 * d_max, 4 * d_max) if k < width]
    return sorted(set(ks + mids))
