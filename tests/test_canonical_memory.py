"""embjax.canonical's GCCA in one D × D workspace: the CPU eigendecomposition works in the donated
buffer (XLA plans no temporary, where jax's own eigh plans two transposed copies), reads only B's lower
triangle, and the lean host path (LAPACK ?syev in place) gives the same hubs as the default."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import canonical, stats


def _state(feats, dtype):
    return stats.update(stats.init([f.shape[1] for f in feats], dtype), [f.astype(dtype) for f in feats])


def _correlated(rng, n, dims, latent=4, noise=0.5):
    z = rng.standard_normal((n, latent))
    return [z @ rng.standard_normal((latent, d)) + noise * rng.standard_normal((n, d)) + 3.0 for d in dims]


def test_eigh_in_place_reads_the_lower_triangle_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 300))
    b = a.T @ a / 40 + np.diag(np.linspace(0.1, 1.0, 300))  # well separated at the top: vectors comparable
    work = np.tril(b) + np.triu(np.full_like(b, 1e6), 1)  # anything above the diagonal must be ignored
    vecs, vals, info = canonical._eigh_in_place(jnp.asarray(work, jnp.float32))
    ref_vals, ref_vecs = np.linalg.eigh(b)
    assert int(info) == 0
    # float32 eigenvalues of a matrix of norm ~10: 1e-5 relative to the largest.
    np.testing.assert_allclose(np.asarray(vals), ref_vals, atol=1e-5 * ref_vals[-1])
    top = np.asarray(vecs)[-5:]  # rows are eigenvectors, ascending
    dots = np.abs(np.sum(top * ref_vecs[:, -5:].T, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-4)


def test_the_eigendecomposition_plans_no_second_workspace():
    d = 512
    shape = jax.ShapeDtypeStruct((d, d), jnp.float32)
    ours = canonical._eigh_in_place.lower(shape).compile().memory_analysis()
    assert ours.temp_size_in_bytes == 0 and ours.alias_size_in_bytes == d * d * 4

    @functools.partial(jax.jit, donate_argnums=0)
    def through_jax(work):  # what the workspace cost before: jax's eigh transposes into and out of LAPACK
        return jax.lax.linalg.eigh(work, lower=True, symmetrize_input=False)

    theirs = through_jax.lower(shape).compile().memory_analysis()
    assert theirs.temp_size_in_bytes >= d * d * 4


def _assert_same_hubs(hubs, ref, ks, pairs, rtol):
    for s, t in pairs:
        for k in ks:
            w_ref, b_ref = canonical.compose(ref[k], s, t)
            w, b = canonical.compose(hubs[k], s, t)
            scale = np.abs(np.asarray(w_ref)).max()
            np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), atol=rtol * scale)
            np.testing.assert_allclose(np.asarray(b), np.asarray(b_ref), atol=rtol * 10 * scale)


@pytest.mark.parametrize("dtype, rtol", [pytest.param(np.float64, 1e-9, marks=pytest.mark.slow), (np.float32, 2e-3)])
def test_all_eigensolvers_give_the_same_hubs(dtype, rtol):
    """GCCA's hubs agree across the eigensolvers (Procrustes': tests/test_canonical.py). At k = 3 the top eigenvalues are separated (a 4-dim latent), so the composed maps,
    which do not depend on the eigenvectors' signs, agree to rounding; at full rank k = D = 21 GCCA's is
    the direct map. "subset" at ranks [3] takes LAPACK's partial-spectrum path (bisection, inverse
    iteration); at [3, 21] its whole-spectrum one."""
    rng = np.random.default_rng(3)
    feats = _correlated(rng, 2000, (5, 7, 9))
    pairs = ((0, 1), (2, 0))
    with jax.enable_x64(dtype == np.float64):
        state = _state(feats, dtype)
        dc, vals_dc = canonical.gcca(state, [3, 21])
        for solver, ranks in (("qr", [3, 21]), ("subset", [3, 21]), ("subset", [3])):
            hubs, vals = canonical.gcca(state, ranks, eigensolver=solver)
            assert vals.shape == ((21,) if solver == "qr" else (max(ranks),))
            np.testing.assert_allclose(np.asarray(vals), np.asarray(vals_dc)[: len(vals)], rtol=rtol, atol=rtol)
            _assert_same_hubs(hubs, dc, ranks, pairs, rtol)
    for method in (canonical.gcca, canonical.procrustes):
        with pytest.raises(ValueError, match="eigensolver must be one of"):
            method(_state(feats, np.float32), [2], eigensolver="jacobi")


def test_subset_eigensolver_works_in_the_workspace_against_numpy():
    """?syevr on the workspace's own buffer (overwritten: no copy made) gives the top k eigenpairs."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 200))
    b = a.T @ a / 40 + np.diag(np.linspace(0.1, 1.0, 200))
    work = (np.tril(b) + np.triu(np.full_like(b, 1e6), 1)).astype(np.float32)  # only the lower triangle is read
    before = work.copy()
    top, vals, info = canonical._host_eigh(work, 5, "subset")
    ref_vals, ref_vecs = np.linalg.eigh(b)
    assert info == 0 and top.shape == (5, 200) and vals.shape == (5,)
    assert not np.array_equal(work, before)  # LAPACK reduced the workspace itself to tridiagonal form
    np.testing.assert_allclose(vals, ref_vals[::-1][:5], atol=1e-5 * ref_vals[-1])
    np.testing.assert_allclose(np.abs(np.sum(top * ref_vecs[:, ::-1][:, :5].T, axis=1)), 1.0, atol=1e-4)


def test_procrustes_sweeps_read_c_in_place():
    """A sweep's block step reads its block row of C as a view of C's own buffer (CPU), and no step of the
    sweeps or the maps plans a copy of C or of a block row of it. Bounds: a block step and the objective
    hold a few D × k (the product C_i· q, q's update); the maps also the diagonal blocks' pseudo-inverses
    (eigh copies a block in and out and forms V f(Λ) Vᵀ: a few d_i × d_i each)."""
    d, dims, k = 256, (32,) * 8, 8
    cross = jnp.asarray(np.random.default_rng(0).standard_normal((d, d)), jnp.float32)
    rows = canonical._row_block(cross, 64, 96)
    assert rows.shape == (32, d) and rows.unsafe_buffer_pointer() == cross.unsafe_buffer_pointer() + 64 * d * 4
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(cross)[64:96])
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    count = jax.ShapeDtypeStruct((), jnp.int32)
    d_k, blocks = d * k * 4, sum(x * x for x in dims) * 4
    with jax.default_matmul_precision("highest"):
        step = canonical._rotate_block.lower(f32(32, d), f32(d, k), f32(d), f32(d), count, a=64).compile()
        objective = canonical._objective.lower(f32(d, d), f32(d, k), count, dims=dims).compile()
        maps = canonical._gpa_maps.lower(f32(d, d), count, f32(d, k), f32(), f32(), dims=dims).compile()
    assert step.memory_analysis().temp_size_in_bytes <= 2 * d_k < 32 * d * 4  # below one block row of C
    assert objective.memory_analysis().temp_size_in_bytes <= 2 * d_k
    assert maps.memory_analysis().temp_size_in_bytes <= 4 * blocks + 2 * d_k < d * d * 4
