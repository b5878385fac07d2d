"""embjax.similarity against float64 NumPy: CKA (biased, debiased), mean CCA, Procrustes distance,
mutual k-NN, and their sanity properties."""
import numpy as np
import pytest

from embjax import similarity, stats


def _state(feats):
    st = stats.init([f.shape[1] for f in feats])
    return stats.update(st, [f.astype(np.float32) for f in feats])


def _rotation(rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def _latent_pair(rng, n=2000, dx=12, dy=9, latent=5, noise=0.5):
    z = rng.standard_normal((n, latent))
    x = z @ rng.standard_normal((latent, dx)) + noise * rng.standard_normal((n, dx)) + 3.0
    y = np.tanh(z @ rng.standard_normal((latent, dy))) + noise * rng.standard_normal((n, dy)) - 1.0
    return x, y


def _debiased_reference(x, y):
    """Song et al.'s formula with explicit n×n Gram matrices, float64."""
    def hsic(k, l):
        n = k.shape[0]
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_cka_properties_from_statistics():
    rng = np.random.default_rng(0)
    x, y = _latent_pair(rng)
    q = _rotation(rng, x.shape[1])
    st = _state([x, 2.5 * x @ q + 7.0, y, 0.3 * y @ _rotation(rng, y.shape[1])])
    # float32 statistics of O(10)-sized features: CKA is a ratio of sums, ~1e-6 relative.
    assert float(similarity.linear_cka(st, 0, 0)) == pytest.approx(1.0, abs=1e-5)
    assert float(similarity.linear_cka(st, 0, 1)) == pytest.approx(1.0, abs=1e-5)  # rotation + scale + shift
    base = float(similarity.linear_cka(st, 0, 2))
    assert 0.05 < base < 0.95
    assert float(similarity.linear_cka(st, 1, 3)) == pytest.approx(base, abs=1e-5)
    x64, y64 = x - x.mean(0), y - y.mean(0)
    ref = np.sum((x64.T @ y64) ** 2) / (np.linalg.norm(x64.T @ x64) * np.linalg.norm(y64.T @ y64))
    assert base == pytest.approx(ref, abs=1e-5)
    assert float(similarity.feature_cka(x.astype(np.float32), y.astype(np.float32))) == pytest.approx(ref, abs=1e-5)


def test_debiased_cka_matches_gram_formula_and_is_invariant():
    rng = np.random.default_rng(1)
    x, y = _latent_pair(rng, n=80)
    ref = _debiased_reference(x - x.mean(0), y - y.mean(0))
    got = float(similarity.debiased_cka(x.astype(np.float32), y.astype(np.float32)))
    # Float32 features with |mean| 3 and spread ~2: the centred products carry ~1e-6 relative error.
    assert got == pytest.approx(ref, abs=1e-4)
    # The uncentred Gram formula gives the same value: the unbiased estimator is translation invariant.
    assert _debiased_reference(x, y) == pytest.approx(ref, abs=1e-9)
    q = _rotation(rng, x.shape[1])
    moved = (4.0 * x @ q - 2.0).astype(np.float32)
    assert float(similarity.debiased_cka(moved, y.astype(np.float32))) == pytest.approx(ref, abs=1e-4)
    assert float(similarity.debiased_cka(x.astype(np.float32), x.astype(np.float32))) == pytest.approx(1.0, abs=1e-5)


def test_debiased_cka_near_zero_for_independent_features():
    rng = np.random.default_rng(2)
    n, d = 2000, 50
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.standard_normal((n, d)).astype(np.float32)
    # Under independence HSIC_1 has mean 0 and, for isotropic Gaussians, standard deviation about
    # √2·‖Σx‖_F‖Σy‖_F / n, i.e. √2/n ≈ 7e-4 after normalisation; allow 5 standard deviations.
    bound = 5 * np.sqrt(2) / n
    assert abs(float(similarity.debiased_cka(x, y))) < bound
    # The biased estimator is pulled up by about √(d_x d_y)/n = 0.025 here, 7 times that bound.
    assert float(similarity.feature_cka(x, y)) > 5 * bound


def _cca_reference(x, y):
    """Canonical correlations by QR (Björck & Golub): singular values of Q_xᵀ Q_y, float64."""
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def test_mean_cca_matches_qr_reference():
    rng = np.random.default_rng(3)
    x, y = _latent_pair(rng, n=3000, dx=8, dy=6)
    st = _state([x, y, x @ rng.standard_normal((8, 8)) + 1.0])
    rho, valid = similarity.cca_correlations(st, 0, 1)
    ref = _cca_reference(x, y)
    assert int(valid) == 6
    # Whitening squares the condition number of each block (here ≲ 1e2) before the float32 SVD:
    # ~1e-7 · 1e2 · a few ≲ 1e-4.
    np.testing.assert_allclose(np.asarray(rho)[:6], ref, atol=1e-4)
    assert float(similarity.mean_cca(st, 0, 1)) == pytest.approx(ref.mean(), abs=1e-4)
    assert float(similarity.mean_cca(st, 0, 2)) == pytest.approx(1.0, abs=1e-4)  # an invertible linear map
    # SVCCA: keep the top 3 principal directions of each side, then CCA.
    def top_pcs(a, k):
        a = a - a.mean(0)
        _, _, vt = np.linalg.svd(a, full_matrices=False)
        return a @ vt[:k].T
    ref3 = _cca_reference(top_pcs(x, 3), top_pcs(y, 3))
    assert float(similarity.mean_cca(st, 0, 1, dims=3)) == pytest.approx(ref3.mean(), abs=1e-4)
    matrix = np.asarray(similarity.mean_cca_matrix(st, dims=3))
    assert matrix[0, 1] == matrix[1, 0] == pytest.approx(ref3.mean(), abs=1e-4)


def test_procrustes_distance():
    rng = np.random.default_rng(4)
    x, y = _latent_pair(rng, dx=10, dy=6)
    st = _state([x, 3.0 * x @ _rotation(rng, 10) - 5.0, y])
    assert float(similarity.procrustes_distance(st, 0, 1)) == pytest.approx(0.0, abs=2e-3)  # arccos near 1: √(2·1e-6)
    xc, yc = x - x.mean(0), y - y.mean(0)
    # Zero-padding y to 10 columns leaves the nuclear norm of the cross-product unchanged.
    yp = np.c_[yc, np.zeros((yc.shape[0], 4))]
    ref = np.arccos(np.linalg.svd(xc.T @ yp, compute_uv=False).sum() / (np.linalg.norm(xc) * np.linalg.norm(yc)))
    assert 0.2 < ref < 1.4
    assert float(similarity.procrustes_distance(st, 0, 2)) == pytest.approx(ref, abs=1e-5)
    assert float(similarity.procrustes_distance(st, 2, 0)) == pytest.approx(ref, abs=1e-5)
    from embjax import maps
    w, _ = maps.scaled_procrustes(st, 0, 2)  # its orthogonal factor gives the same nuclear norm
    rot = np.asarray(w) / np.sqrt(np.trace(yc.T @ yc) / np.trace(xc.T @ xc))
    assert float(similarity.procrustes_distance(st, 0, 2, rotation=rot)) == pytest.approx(ref, abs=1e-4)
    assert float(similarity.procrustes_distance(st, 2, 2)) == 0.0


def test_mutual_knn_matches_bruteforce():
    rng = np.random.default_rng(5)
    x, y = _latent_pair(rng, n=300, noise=1.0)
    x, y = x.astype(np.float32), y.astype(np.float32)
    k = 10

    def sets(a):
        a = a.astype(np.float64) / np.linalg.norm(a, axis=1, keepdims=True)
        s = a @ a.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]
    sx, sy = sets(x), sets(y)
    ref = np.mean([len(set(sx[i]) & set(sy[i])) / k for i in range(len(x))])
    got = float(similarity.mutual_knn(x, y, k, gallery_block=64))
    # A neighbour can differ from the float64 set only at a near-tie of the k-th score: at most a few
    # of the 3000 memberships, i.e. ~1e-3 of the mean.
    assert got == pytest.approx(ref, abs=2e-3)
    assert 0.05 < ref < 0.9
    assert float(similarity.mutual_knn(x, 2.0 * x, k)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# All measures at once (statistics_matrices, feature_matrices) against float64 NumPy


def _pwcca_reference(x, y, dims):
    """Morcos et al.'s projection weighting, written out on the samples: CCA between the leading `dims`
    principal components of each side (QR form), canonical variates h_k of x's side, weights
    Σ_j |⟨h_k, x_j⟩| over x's centred units."""
    xc, yc = x - x.mean(0), y - y.mean(0)

    def top(a):
        _, _, vt = np.linalg.svd(a, full_matrices=False)
        return a @ vt[:dims].T
    px, py = top(xc), top(yc)
    qx, rx = np.linalg.qr(px)
    qy, _ = np.linalg.qr(py)
    u, rho, _ = np.linalg.svd(qx.T @ qy)
    h = qx @ u[:, :rho.size]  # canonical variates of x's side (orthonormal columns)
    alpha = np.abs(h.T @ xc).sum(axis=1)
    return rho.mean(), (alpha * rho).sum() / alpha.sum()


def test_statistics_matrices_match_numpy():
    rng = np.random.default_rng(8)
    x, y = _latent_pair(rng, n=4000, dx=12, dy=9)
    z = 2.0 * x @ _rotation(rng, 12) + 1.0
    st = _state([x, y, z])
    got = similarity.statistics_matrices(st, dims=4)
    svcca_ref, pwcca_ref = _pwcca_reference(x, y, 4)
    _, pwcca_ref_yx = _pwcca_reference(y, x, 4)
    # float32 statistics of O(10) features from 4,000 samples: ~1e-6 relative in C, whitening squares a
    # condition number ≲ 1e2: 1e-4 covers it.
    assert got["svcca"][0, 1] == got["svcca"][1, 0] == pytest.approx(svcca_ref, abs=1e-4)
    assert got["pwcca"][0, 1] == pytest.approx(pwcca_ref, abs=1e-4)
    assert got["pwcca"][1, 0] == pytest.approx(pwcca_ref_yx, abs=1e-4)
    assert got["pwcca"][0, 1] != pytest.approx(got["pwcca"][1, 0], abs=1e-3)  # PWCCA is not symmetric
    xc, yc = x - x.mean(0), y - y.mean(0)
    cka_ref = np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert got["cka"][0, 1] == pytest.approx(cka_ref, abs=1e-5)
    nuc = np.linalg.svd(xc.T @ yc, compute_uv=False).sum()
    assert got["procrustes"][0, 1] == pytest.approx(np.arccos(nuc / (np.linalg.norm(xc) * np.linalg.norm(yc))), abs=1e-5)
    # Invariances: z is a rotated, scaled, shifted x.
    assert got["procrustes"][0, 2] == pytest.approx(0.0, abs=2e-3)  # arccos near 1: √(2·1e-6)
    assert got["cka"][0, 2] == pytest.approx(1.0, abs=1e-5)
    assert got["svcca"][0, 2] == pytest.approx(1.0, abs=1e-4) and got["pwcca"][2, 0] == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(np.diag(got["svcca"]), 1.0) and np.allclose(np.diag(got["procrustes"]), 0.0)


def _cknna_reference(x, y, k):
    """The Platonic Representation code's definition with dense n×n matrices: cosine kernels, top-k
    masks with the diagonal excluded, unbiased HSIC of the masked kernels."""
    def kernel(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return a @ a.T

    def mask(kern):
        kk = kern.copy()
        np.fill_diagonal(kk, -np.inf)
        top = np.argsort(-kk, axis=1, kind="stable")[:, :k]
        m = np.zeros_like(kern)
        np.put_along_axis(m, top, 1.0, axis=1)
        return m

    def hsic(a, b):
        n = a.shape[0]
        a, b = a.copy(), b.copy()
        np.fill_diagonal(a, 0)
        np.fill_diagonal(b, 0)
        return (np.sum(a * b.T) + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * np.sum(a @ b) / (n - 2)) / (n * (n - 3))
    kx, ky = kernel(x), kernel(y)
    mx, my = mask(kx), mask(ky)
    m = mx * my
    return hsic(m * kx, m * ky) / np.sqrt(hsic(mx * kx, mx * kx) * hsic(my * ky, my * ky))


def test_cknna_and_feature_matrices_match_dense_reference():
    rng = np.random.default_rng(9)
    x, y = _latent_pair(rng, n=250, noise=0.8)
    x, y = x.astype(np.float32), y.astype(np.float32)
    ref = _cknna_reference(x.astype(np.float64), y.astype(np.float64), 10)
    # Neighbour sets from float32 scores may differ from float64 only at near-ties of the k-th score.
    assert similarity.cknna(x, y, 10) == pytest.approx(ref, abs=2e-3)
    assert 0.05 < ref < 0.95
    assert similarity.cknna(x, 3.0 * x @ _rotation(rng, x.shape[1]).astype(np.float32), 10) == pytest.approx(1.0, abs=1e-6)
    got = similarity.feature_matrices([x, y], k=10)
    assert got["cknna"][0, 1] == got["cknna"][1, 0] == pytest.approx(ref, abs=2e-3)
    # The same neighbour sets; mutual_knn averages in float32 (~1e-8 here), feature_matrices in float64.
    assert got["mutual_knn"][0, 1] == pytest.approx(float(similarity.mutual_knn(x, y, 10)), abs=1e-6)
    assert got["cka_debiased"][0, 1] == pytest.approx(_debiased_reference(x - x.mean(0), y - y.mean(0)), abs=1e-4)
