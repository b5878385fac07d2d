"""embjax.canonical against float64 NumPy on raw features, and the planted canonical space."""

import jax
import numpy as np
import pytest

from embjax import canonical, maps, stats


def _state(feats, dtype=np.float32):
    return stats.update(stats.init([f.shape[1] for f in feats], dtype), [f.astype(dtype) for f in feats])


def _correlated(rng, n, dims, latent=4, noise=0.5):
    z = rng.standard_normal((n, latent))
    return [z @ rng.standard_normal((latent, d)) + noise * rng.standard_normal((n, d)) + 3.0 for d in dims]


def _lstsq(x, y):
    """Float64 least squares with an intercept: (W, b)."""
    coef = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    return coef[:-1], coef[-1]


def _numpy_gcca(feats, k):
    """MAXVAR on the raw features: G = top-k left singular vectors of the whitened concatenation."""
    ys = []
    for x in feats:
        xc = x - x.mean(0)
        vals, vecs = np.linalg.eigh(xc.T @ xc / len(x))
        ys.append(xc @ vecs @ np.diag(vals ** -0.5) @ vecs.T)
    u, s, _ = np.linalg.svd(np.concatenate(ys, axis=1), full_matrices=False)
    return u[:, :k] * np.sqrt(len(u)), (s ** 2 / len(u))


def _numpy_gpa(feats, k, sweeps=5000):
    """Generalized Procrustes on the raw features: rotations of the unit-variance centred features onto
    their mean, block by block, started from the top principal directions of the scaled concatenation."""
    ys = [(x - x.mean(0)) / np.sqrt(np.sum((x - x.mean(0)) ** 2) / len(x)) for x in feats]
    cat = np.concatenate(ys, axis=1)
    start = np.linalg.eigh(cat.T @ cat)[1][:, ::-1][:, :k]
    o = np.cumsum([0] + [y.shape[1] for y in ys])

    def polar(a):
        u, _, vt = np.linalg.svd(a, full_matrices=False)
        return u @ vt

    rot = [polar(start[o[i]:o[i + 1]]) for i in range(len(ys))]
    grams = [[yi.T @ yj for yj in ys] for yi in ys]  # the sweeps on d × d blocks, not on n rows
    for _ in range(sweeps):
        old = [r.copy() for r in rot]
        for i in range(len(ys)):
            rot[i] = polar(sum(g @ r for g, r in zip(grams[i], rot)))
        if max(np.abs(r - o).max() for r, o in zip(rot, old)) < 1e-13:
            break
    return sum(y @ r for y, r in zip(ys, rot)) / len(ys)


def _cos_angles(a, b):
    """Cosines of the principal angles between the column spans of a and b (centred), ascending."""
    qa = np.linalg.qr(a - a.mean(0))[0]
    qb = np.linalg.qr(b - b.mean(0))[0]
    return np.sort(np.linalg.svd(qa.T @ qb, compute_uv=False))


def _hub_composition(h, feats, s, t):
    """source → h → target by float64 least squares on raw features (h centred)."""
    w_sh, _ = _lstsq(feats[s], h)
    w_ht, _ = _lstsq(h, feats[t])
    w = w_sh @ w_ht
    return w, feats[t].mean(0) - feats[s].mean(0) @ w


def test_gcca_against_numpy_float64():
    rng = np.random.default_rng(0)
    feats = _correlated(rng, 3000, (5, 7, 9))
    with jax.enable_x64(True):
        hubs, vals = canonical.gcca(_state(feats, np.float64), [2, 6])
        for k in (2, 6):
            g, ref_vals = _numpy_gcca(feats, k)
            np.testing.assert_allclose(np.asarray(vals), ref_vals, rtol=1e-9, atol=1e-12)
            for s, t in ((0, 1), (2, 0), (1, 2)):
                w, b = canonical.compose(hubs[k], s, t)
                w_ref, b_ref = _hub_composition(g, feats, s, t)
                np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-7, atol=1e-9)
                np.testing.assert_allclose(np.asarray(b), b_ref, rtol=1e-7, atol=1e-8)
            # The hub variable itself: model i's encoding is the regression of G on x_i.
            # (G's columns are eigenvectors: each is defined up to its sign.)
            w_g, b_g = _lstsq(feats[1], g)
            ref = feats[1] @ w_g + b_g
            ours = np.asarray(canonical.encode(hubs[k], 1, feats[1]))
            ref = ref * np.sign(np.sum(ref * ours, axis=0))
            np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-8)


def test_procrustes_against_numpy_float64():
    rng = np.random.default_rng(1)
    feats = _correlated(rng, 2000, (4, 6, 8), latent=3, noise=0.3)
    with jax.enable_x64(True):
        hubs, info = canonical.procrustes(_state(feats, np.float64), [2, 5], tol=1e-13, tol_objective=-np.inf,
                                          iters=5000)  # stop on the rotations alone
        for k in (2, 5):
            h = _numpy_gpa(feats, k)
            assert info[k]["iterations"] < 5000
            n = len(h)
            np.testing.assert_allclose(info[k]["objective"], 9 * np.sum(h * h) / n, rtol=1e-9)
            for s, t in ((0, 2), (2, 1)):
                w, b = canonical.compose(hubs[k], s, t)
                w_ref, b_ref = _hub_composition(h, feats, s, t)
                np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6, atol=1e-8)
                np.testing.assert_allclose(np.asarray(b), b_ref, rtol=1e-6, atol=1e-7)


def test_full_rank_gcca_is_the_direct_affine_map():
    """At k = D the GCCA hub spans every model's features, so source → hub → target is the direct
    least-squares map (exact in float64, up to the conditioning of the blocks). (Not so for Procrustes:
    its consensus overlaps the models' correlated directions, so its rank stays below D.)"""
    method = "gcca"
    rng = np.random.default_rng(2)
    feats = _correlated(rng, 1500, (3, 5, 6), noise=0.4)
    with jax.enable_x64(True):
        state = _state(feats, np.float64)
        hubs, _ = getattr(canonical, method)(state, [14])
        for s in range(3):
            for t in range(3):
                if s != t:
                    w, b = canonical.compose(hubs[14], s, t)
                    w_ref, b_ref = _lstsq(feats[s], feats[t])
                    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-8, atol=1e-10)
                    np.testing.assert_allclose(np.asarray(b), b_ref, rtol=1e-8, atol=1e-9)


def _planted(rng, n, dims, k, noise):
    z = rng.standard_normal((n, k))
    mix = [(rng.standard_normal((k, d)) / np.sqrt(k), 5 * rng.standard_normal(d)) for d in dims]
    return z, [z @ a + c + noise * rng.standard_normal((n, a.shape[1])) for a, c in mix], mix


@pytest.mark.slow  # minutes of compilation over the rank curve on a 2-core CPU: the whole tier
@pytest.mark.parametrize("method", ["gcca", "procrustes"])
def test_planted_canonical_space(method):
    """N = 4 models whose features are random affine images of one k = 4 latent plus noise of std 0.01.

    Recovery: each model's encoding spans the latent. An encoding is the latent times a k × k matrix plus
    noise of relative size about σ = 0.01, so the principal angles are O(σ); sin θ ≤ 0.05 leaves a 5x
    margin. Intrinsic dimension: the mean R² (held-out data) over all 12 ordered pairs of source → hub →
    target. At rank k − 1 one latent direction is lost, about 1/k of each target's variance: R² falls by
    ~0.25 ≫ 0.01. At rank k the loss is noise: 1 − R² ≈ σ² · (d_s/‖A‖²) ~ 1e-3 for direct and hub
    maps alike. So the smallest rank within 0.01 of the direct maps is k."""
    rng = np.random.default_rng(3)
    k, dims = 4, (6, 9, 12, 16)
    z, feats, mix = _planted(rng, 6000, dims, k, 0.01)
    state = _state(feats)
    ranks = [1, 2, 3, 4, 5, 8]
    hubs = getattr(canonical, method)(state, ranks)[0]
    for i in range(len(dims)):
        cos = _cos_angles(np.asarray(canonical.encode(hubs[k], i, feats[i].astype(np.float32)), np.float64), z)
        assert np.sqrt(1 - cos[0] ** 2) < 0.05, (i, cos)
    # Held-out data from the same affine images.
    z2 = rng.standard_normal((4000, k))
    held = [z2 @ a + c + 0.01 * rng.standard_normal((4000, a.shape[1])) for a, c in mix]

    def mean_r2(pair_maps):  # float64 R² of each map on the held-out features
        r2 = []
        for (s, t), (w, b) in pair_maps.items():
            err = held[t] - held[s] @ np.asarray(w, np.float64) - np.asarray(b, np.float64)
            r2.append(1 - np.sum(err ** 2) / np.sum((held[t] - held[t].mean(0)) ** 2))
        return np.mean(r2)

    curve = [mean_r2(canonical.pair_maps(hubs[r])) for r in ranks]
    print(method, dict(zip(ranks, np.round(curve, 5))))
    direct = mean_r2(maps.affine_all(state))
    assert direct > 0.99
    assert canonical.intrinsic_dim(ranks, curve, direct) == k
    assert curve[k - 2] < direct - 0.1  # rank k − 1 loses a latent direction


def test_bad_input():
    state = _state([np.ones((3, 2)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match="ranks must be integers in"):
        canonical.gcca(state, [0])
    with pytest.raises(ValueError, match="ranks must be integers in"):
        canonical.procrustes(state, [6])
    with pytest.raises(ValueError, match="at least 2"):
        canonical.gcca(stats.init([2, 3]), [1])


def test_constant_and_dead_features_give_finite_hubs():
    rng = np.random.default_rng(4)
    feats = _correlated(rng, 500, (4, 6))
    feats[1][:, 2] = 7.0  # a dead unit
    for method in (canonical.gcca, canonical.procrustes):
        hub = method(_state(feats), [3, 10])[0][10]
        for s, t in ((0, 1), (1, 0)):
            w, b = canonical.compose(hub, s, t)
            assert np.all(np.isfinite(w)) and np.all(np.isfinite(b))


def test_procrustes_is_the_same_from_every_eigensolver():
    """The starting directions come from canonical.EIGENSOLVERS alike (to rounding; "subset" takes LAPACK's
    partial-spectrum path at k = 3 < D); the rotations then converge to the same consensus. float32:
    the composed maps (which do not depend on the eigenvectors' signs) agree to 2e-3 of their largest
    entry, the same rounding margin as tests/test_canonical_memory.py's GCCA comparison."""
    rng = np.random.default_rng(5)
    state = _state(_correlated(rng, 500, (4, 6), latent=3, noise=0.3))  # the shapes of the test above
    ref, info_ref = canonical.procrustes(state, [3])
    for solver in ("qr", "subset"):
        hubs, info = canonical.procrustes(state, [3], eigensolver=solver)
        np.testing.assert_allclose(info[3]["objective"], info_ref[3]["objective"], rtol=1e-5)
        for s, t in ((0, 1), (1, 0)):
            (w, b), (w_ref, b_ref) = canonical.compose(hubs[3], s, t), canonical.compose(ref[3], s, t)
            scale = np.abs(np.asarray(w_ref)).max()
            np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), atol=2e-3 * scale)
            np.testing.assert_allclose(np.asarray(b), np.asarray(b_ref), atol=2e-2 * scale)
    with pytest.raises(ValueError, match="eigensolver must be one of"):
        canonical.procrustes(state, [3], eigensolver="jacobi")


def test_rank_curve_and_intrinsic_dim():
    assert canonical.rank_curve(640, 192) == [1, 2, 4, 8, 16, 32, 64, 128, 192, 384, 640]
    assert canonical.intrinsic_dim([1, 4, 16], [-0.5, -0.03, -0.021], -0.02) == 4
    assert canonical.intrinsic_dim([1, 4], [-0.5, -0.3], -0.02) is None
