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


@pytest.mark.parametrize("dtype, rtol", [pytest.param(np.float64, 1e-9, marks=pytest.mark.slow), (np.float32, 2e-3)])
def test_both_eigensolvers_give_the_same_hubs(dtype, rtol):
    rng = np.random.default_rng(3)
    feats = _correlated(rng, 2000, (5, 7, 9))
    with jax.enable_x64(dtype == np.float64):
        state = _state(feats, dtype)
        dc, vals_dc = canonical.gcca(state, [3, 21])
        qr, vals_qr = canonical.gcca(state, [3, 21], eigensolver="qr")
        np.testing.assert_allclose(np.asarray(vals_qr), np.asarray(vals_dc), rtol=rtol, atol=rtol)
        for s, t in ((0, 1), (2, 0)):
            # At k = 3 the top eigenvalues are separated (a 4-dim latent): the composed maps, which do
            # not depend on the eigenvectors' signs, agree; at full rank k = D they are the direct map.
            for k in (3, 21):
                w_dc, b_dc = canonical.compose(dc[k], s, t)
                w_qr, b_qr = canonical.compose(qr[k], s, t)
                scale = np.abs(np.asarray(w_dc)).max()
                np.testing.assert_allclose(np.asarray(w_qr), np.asarray(w_dc), atol=rtol * scale)
                np.testing.assert_allclose(np.asarray(b_qr), np.asarray(b_dc), atol=rtol * 10 * scale)
    with pytest.raises(ValueError, match="eigensolver must be one of"):
        canonical.gcca(_state(feats, np.float32), [2], eigensolver="jacobi")
