"""embjax.maps against float64 NumPy: least squares, ridge, degenerate blocks, logit, naive, Procrustes,
reduced rank."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import head_maps, maps, stats

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def _relu_features(rng, n, dims, latent=6):
    """Post-ReLU-like correlated features: relu(z M_i + noise + offset)."""
    z = rng.standard_normal((n, latent))
    out = []
    for d in dims:
        pre = z @ rng.standard_normal((latent, d)) + 0.4 * rng.standard_normal((n, d)) + 0.5
        out.append(np.maximum(pre, 0).astype(np.float32))
    return out


def _state(feats):
    return stats.update(stats.init([f.shape[1] for f in feats]), feats)


def _lstsq(x, y, ridge_lambda=0.0, rcond=None):
    """Float64 least squares with an unpenalised intercept; the ridge as √λ·I rows on centred data."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if ridge_lambda == 0.0:
        coef = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=rcond)[0]
        return coef[:-1], coef[-1]
    mx, my = x.mean(0), y.mean(0)
    d = x.shape[1]
    xa = np.r_[x - mx, np.sqrt(ridge_lambda) * np.eye(d)]
    ya = np.r_[y - my, np.zeros((d, y.shape[1]))]
    w = np.linalg.lstsq(xa, ya, rcond=None)[0]
    return w, my - mx @ w


def _tolerance(x_src):
    """Prediction tolerance in target spreads for a float32 fit on these source features.

    The float32 centred cross-products carry a relative error δ ≈ √n·eps per entry (probabilistic
    bound for n-term sums; measured 2–3× below 10√n·eps), and a linear solve amplifies data errors by
    at most the condition number κ of the (Jacobi-scaled) C_AA, so the first-order bound is 10·√n·eps·κ.
    κ is computed here in float64 from the data.
    """
    x = x_src.astype(np.float64)
    xc = x - x.mean(0)
    c = xc.T @ xc
    d = np.sqrt(np.diag(c))
    kappa = np.linalg.cond(c / np.outer(d, d))
    return 10 * np.sqrt(len(x)) * EPS32 * kappa


def _pred_error(x_src, y, wb, ref_wb):
    """Max |prediction difference| in units of each target feature's spread."""
    x = x_src.astype(np.float64)
    pred = x @ np.asarray(wb[0], np.float64) + np.asarray(wb[1], np.float64)
    ref = x @ ref_wb[0] + ref_wb[1]
    return float(np.max(np.abs(pred - ref) / y.astype(np.float64).std(0)))


def test_affine_matches_lstsq_all_pairs():
    rng = np.random.default_rng(0)
    dims = (12, 7, 9)
    feats = _relu_features(rng, 4000, dims)
    state = _state(feats)
    fitted = maps.affine_all(state)
    assert sorted(fitted) == [(s, t) for s in range(3) for t in range(3) if s != t]
    for (s, t), (w, b) in fitted.items():
        assert w.shape == (dims[s], dims[t]) and b.shape == (dims[t],)
        ref = _lstsq(feats[s], feats[t])
        tol = _tolerance(feats[s])  # κ = 16–43 here: tol ≈ 1e-3 spreads; measured ≤ 1.3e-4
        assert _pred_error(feats[s], feats[t], (w, b), ref) < tol
        np.testing.assert_allclose(np.asarray(w), ref[0], rtol=0, atol=tol * np.abs(ref[0]).max())


def test_affine_single_pair_matches_lstsq_and_recovers_a_planted_map():
    """maps.affine on its own against float64 least squares (never against affine_all, which it calls)."""
    rng = np.random.default_rng(11)
    dims = (12, 7, 9)
    feats = _relu_features(rng, 4000, dims)
    # Block 2 is an exact affine image of block 0 plus small noise: the true map is known in advance.
    w_true = rng.standard_normal((dims[0], dims[2])) / np.sqrt(dims[0])
    b_true = rng.uniform(-2, 2, dims[2])
    noise = 1e-3 * rng.standard_normal((4000, dims[2]))
    feats[2] = (feats[0].astype(np.float64) @ w_true + b_true + noise).astype(np.float32)
    state = _state(feats)
    for s, t in [(0, 1), (1, 0), (2, 0), (0, 2)]:
        w, b = maps.affine(state, s, t)
        assert w.shape == (dims[s], dims[t]) and b.shape == (dims[t],)
        ref = _lstsq(feats[s], feats[t])
        tol = _tolerance(feats[s])  # κ = 16–43 for these blocks: tol ≈ 1e-3 target spreads
        assert _pred_error(feats[s], feats[t], (w, b), ref) < tol, (s, t)
        np.testing.assert_allclose(np.asarray(w), ref[0], rtol=0, atol=tol * np.abs(ref[0]).max())
    # The planted map. Statistically, least squares with noise 1e-3 on sources of spread ~0.5 misses W
    # by ~1e-3/(0.5·√4000) ≈ 3e-5; float32 adds at most `tol` relative to |W| ≲ 1. So W must be within
    # tol + 1e-3 (measured 5e-5), and b = μ_B − μ_A W within ‖μ_A‖₁ times that (measured 1e-4 against a
    # bound of ~0.05). A swapped pair, a transposed W or a dropped μ_A W term misses by O(1).
    w, b = maps.affine(state, 0, 2)
    w_atol = _tolerance(feats[0]) + 1e-3
    np.testing.assert_allclose(np.asarray(w, np.float64), w_true, rtol=0, atol=w_atol)
    mu_l1 = float(np.abs(feats[0].astype(np.float64).mean(0)).sum())
    np.testing.assert_allclose(np.asarray(b, np.float64), b_true, rtol=0, atol=mu_l1 * w_atol)


@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_ridge_matches_augmented_lstsq_and_is_scaled_by_trace(ridge):
    rng = np.random.default_rng(1)
    dims = (7, 5)  # the shapes of several tests here are shared, so the fit kernel compiles once
    feats = _relu_features(rng, 2000, dims)
    state = _state(feats)
    x = feats[0].astype(np.float64)
    lam = ridge * np.trace((x - x.mean(0)).T @ (x - x.mean(0))) / dims[0]  # the documented scaling
    ref = _lstsq(feats[0], feats[1], lam)
    got = maps.affine(state, 0, 1, ridge=ridge)
    # Ridge only improves conditioning, so the plain least-squares bound holds.
    assert _pred_error(feats[0], feats[1], got, ref) < _tolerance(feats[0])
    # Unit-free: scaling all features by 1000 scales W's predictions by 1000, nothing else changes.
    scaled = _state([f * 1000 for f in feats])
    w_s, b_s = maps.affine(scaled, 0, 1, ridge=ridge)
    np.testing.assert_allclose(np.asarray(w_s), np.asarray(got[0]), rtol=0, atol=_tolerance(feats[0]) * np.abs(ref[0]).max())


def test_ridge_with_nearly_dead_feature_is_well_conditioned():
    """A feature with variance 1e-10 of the others (alive, so not dropped) and more features than
    samples: with ridge 0.1 the regularised matrix has condition ≤ 1 + d/ridge, and the fit must neither
    warn nor fail (scaling by diag C_AA alone once put λ/1e-10 on the diagonal and made it fail)."""
    rng = np.random.default_rng(12)
    n, d_a, d_b = 40, 60, 5
    x = rng.standard_normal((n, d_a))
    x[:, 3] = 1e-5 * rng.standard_normal(n)
    y = x[:, :d_b] @ rng.standard_normal((d_b, d_b)) + 0.1 * rng.standard_normal((n, d_b))
    feats = [x.astype(np.float32), y.astype(np.float32)]
    state = _state(feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error", maps.IllConditionedWarning)
        got = maps.affine(state, 0, 1, ridge=0.1)
    x64 = feats[0].astype(np.float64)
    xc = x64 - x64.mean(0)
    lam = 0.1 * np.trace(xc.T @ xc) / d_a
    ref = _lstsq(feats[0], feats[1], lam)
    # κ(C + λI) ≤ 1 + d/ridge = 601: float32 solve error ≲ 601 · 1e-7 · a few; 1e-3 of the target spread.
    assert _pred_error(feats[0], feats[1], got, ref) < 1e-3


def test_dead_units_are_dropped_without_warning():
    rng = np.random.default_rng(2)
    feats = _relu_features(rng, 1500, (7, 5))
    feats[0][:, [2, 5]] = 0.0  # dead ReLU units
    feats[0][:, 6] = 3.25  # a constant feature
    state = _state(feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error", maps.IllConditionedWarning)
        w, b = maps.affine(state, 0, 1)
    np.testing.assert_array_equal(np.asarray(w)[[2, 5, 6]], 0.0)
    ref = _lstsq(feats[0], feats[1])  # min-norm lstsq gives the same predictions
    live = np.delete(feats[0], [2, 5, 6], axis=1)  # κ of the features that carry information
    assert _pred_error(feats[0], feats[1], (w, b), ref) < _tolerance(live)


@pytest.mark.parametrize("kind", ["duplicate", "collinear", "all_equal"])
def test_rank_deficient_source_warns_and_stays_finite(kind):
    rng = np.random.default_rng(3)
    feats = _relu_features(rng, 1500, (6, 5))
    x = feats[0]
    tol = 2 * _tolerance(x)  # the well-posed problem's bound; 2× for the automatic ridge, see below
    if kind == "duplicate":
        x = np.c_[x, x[:, 4]]
    elif kind == "collinear":
        x = np.c_[x, 2.0 * x[:, 1] - 0.5 * x[:, 3] + 1.0]
    else:
        x = np.repeat(x[:, :1], 7, axis=1)
    feats[0] = x.astype(np.float32)
    state = _state(feats)
    with pytest.warns(maps.IllConditionedWarning, match=r"block 0 \('resnet'\).*condition estimate"):
        w, b = maps.affine(state, 0, 1, names=["resnet", "vit"])
    assert np.all(np.isfinite(np.asarray(w))) and np.all(np.isfinite(np.asarray(b)))
    # The predictions of a rank-deficient least-squares problem are unique (only W is not). The float32
    # copy of a derived column is collinear only up to rounding (1e-7 relative), so the float64
    # reference must treat singular values below 1e-5·σ_max as zero (rcond), or it fits that rounding
    # with coefficients ~1e5. The automatic ridge is λ_max/1e6 on eigenvalues of the scaled matrix, so
    # it shifts predictions by ≲ κ·1e-6 spreads, well inside the well-posed bound.
    ref = _lstsq(feats[0], feats[1], rcond=1e-5)
    assert _pred_error(feats[0], feats[1], (w, b), ref) < tol
    with pytest.warns(maps.IllConditionedWarning, match="block 0 "):
        both = maps.affine_all(state)
    assert all(np.all(np.isfinite(np.asarray(v))) for wb in both.values() for v in wb)


def test_explicit_ridge_silences_warning():
    rng = np.random.default_rng(4)
    feats = _relu_features(rng, 800, (6, 5))
    feats[0] = np.c_[feats[0], feats[0][:, :1]].astype(np.float32)
    state = _state(feats)
    with warnings.catch_warnings():
        warnings.simplefilter("error", maps.IllConditionedWarning)
        w, _ = maps.affine(state, 0, 1, ridge=1e-3)  # cond of the ridged, scaled matrix ≤ ~7/1e-3
    assert np.all(np.isfinite(np.asarray(w)))


def test_logit_map_reproduces_source_logits_exactly():
    rng = np.random.default_rng(5)
    classes = 10
    d_a, d_b = 24, 16  # target narrower than source but ≥ classes: still exact
    head_a = (rng.standard_normal((d_a, classes)).astype(np.float32), rng.standard_normal(classes).astype(np.float32))
    head_b = (rng.standard_normal((d_b, classes)).astype(np.float32), rng.standard_normal(classes).astype(np.float32))
    x = rng.standard_normal((5000, d_a)).astype(np.float32)
    w, b = head_maps.logit(head_a, head_b)
    assert w.shape == (d_a, d_b) and b.shape == (d_b,)
    x64 = x.astype(np.float64)
    src_logits = x64 @ head_a[0] + head_a[1]
    mapped = (x64 @ np.asarray(w, np.float64) + np.asarray(b, np.float64)) @ head_b[0] + head_b[1]
    # W = K_A K_B⁺ carries a relative error ≈ κ(K_B)·eps (κ ≈ 7 for a 16×10 Gaussian kernel), which
    # reaches the logits scaled by their size: 10·κ·eps·max|z| ≈ 2e-4 here (measured 1e-5).
    tol = 10 * np.linalg.cond(head_b[0]) * EPS32 * np.abs(src_logits).max()
    np.testing.assert_allclose(mapped, src_logits, rtol=0, atol=tol)
    # Identical argmax on every sample that is not a near-tie: a flip needs a float64 top-2 gap < 2·tol.
    # Near-ties are rare (checked, so the check is not vacuous) and no map can promise them in float32.
    top2 = np.sort(src_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(mapped.argmax(1)[clear], src_logits.argmax(1)[clear])


def test_logit_map_warns_when_target_cannot_reproduce():
    rng = np.random.default_rng(6)
    head_a = (rng.standard_normal((8, 10)), rng.standard_normal(10))
    head_b = (rng.standard_normal((6, 10)), rng.standard_normal(10))  # rank 6 < 10 classes
    with pytest.warns(maps.IllConditionedWarning, match="rank 6 < 10 classes"):
        w, b = head_maps.logit(head_a, head_b)
    assert np.all(np.isfinite(np.asarray(w)))
    with pytest.raises(ValueError, match="different numbers of classes"):
        head_maps.logit(head_a, (rng.standard_normal((6, 9)), rng.standard_normal(9)))
    with pytest.raises(ValueError, match="kernel"):
        head_maps.logit(head_a, (rng.standard_normal((6, 10)), rng.standard_normal(9)))


def test_naive_truncates_or_pads():
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    w, b = head_maps.naive(6, 4)
    np.testing.assert_array_equal(x @ np.asarray(w) + np.asarray(b), x[:, :4])
    w, b = head_maps.naive(6, 8)
    np.testing.assert_array_equal(x @ np.asarray(w) + np.asarray(b), np.c_[x, np.zeros((2, 2))])
    with pytest.raises(ValueError, match="positive"):
        head_maps.naive(0, 3)


def test_procrustes_recovers_rotation_and_matches_svd_reference():
    rng = np.random.default_rng(7)
    n, d = 3000, 6
    x = rng.standard_normal((n, d)) * np.linspace(0.5, 2.0, d) + 4.0
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    t = rng.standard_normal(d)
    y_exact = x @ q + t
    y_noisy = 2.0 * y_exact + 0.3 * rng.standard_normal((n, d))
    wide = np.c_[y_exact, rng.standard_normal((n, 3))]
    feats = [a.astype(np.float32) for a in (x, y_exact, y_noisy, wide)]
    state = _state(feats)
    w, b = maps.procrustes(state, 0, 1)
    # Float32 data and an SVD of a well-conditioned 6×6 block: ~1e-6 relative; 1e-4 leaves margin
    # for the float32 rounding of the inputs themselves (eps·4 = 5e-7 relative to spread 1).
    np.testing.assert_allclose(np.asarray(w), q, atol=1e-4)
    np.testing.assert_allclose(np.asarray(b), t, atol=1e-4 * 4 * d)
    # Noisy, scaled target: compare with a float64 SVD Procrustes computed from the raw data.
    xc = x - x.mean(0)
    yc = feats[2].astype(np.float64) - feats[2].astype(np.float64).mean(0)
    u, sv, vt = np.linalg.svd(xc.T @ yc)
    r = u @ vt
    s = sv.sum() / np.trace(xc.T @ xc)
    w_s, _ = maps.procrustes(state, 0, 2, scale=True)
    np.testing.assert_allclose(np.asarray(w_s), s * r, atol=1e-4 * s)  # same bound, scaled
    w_w, _ = maps.procrustes(state, 0, 3)  # into a wider space: an isometry (orthonormal rows)
    np.testing.assert_allclose(np.asarray(w_w) @ np.asarray(w_w).T, np.eye(d), atol=1e-5)
    with pytest.raises(ValueError, match="wider"):
        maps.procrustes(state, 3, 0)


def test_reduced_rank_matches_float64_reference():
    rng = np.random.default_rng(8)
    dims = (7, 5)
    feats = _relu_features(rng, 3000, dims)
    state = _state(feats)
    x = feats[0].astype(np.float64)
    y = feats[1].astype(np.float64)
    w_full, b_full = _lstsq(feats[0], feats[1])
    tol = _tolerance(feats[0])
    fitted = (x - x.mean(0)) @ w_full
    _, sv, vt = np.linalg.svd(fitted, full_matrices=False)  # top right singular vectors of the fit
    gaps = (sv[:-1] ** 2 - sv[1:] ** 2) / sv[0] ** 2
    assert gaps[0] > 0.1 and gaps[2] > 0.1  # the spectral gaps the tolerance below relies on
    for rank in (1, 3):
        v = vt[:rank].T
        w_ref = w_full @ v @ v.T
        b_ref = y.mean(0) - x.mean(0) @ w_ref
        got = maps.reduced_rank(state, 0, 1, rank)
        assert np.linalg.matrix_rank(np.asarray(got[0], np.float64), tol=1e-4) == rank
        # The full map's bound; the top eigenvectors of the fitted covariance move by
        # O(‖ΔM‖/gap) under its perturbation, and the spectral gaps here are ≥ 10% of λ_1.
        assert _pred_error(feats[0], feats[1], got, (w_ref, b_ref)) < 2 * tol
    sweep = maps.truncate_ranks(state, 0, 1, maps.affine(state, 0, 1)[0], [1, 3])
    for (w_k, b_k), rank in zip(sweep, (1, 3)):  # one eigendecomposition, the same maps
        w_ref, b_ref = maps.reduced_rank(state, 0, 1, rank)
        np.testing.assert_allclose(np.asarray(w_k), np.asarray(w_ref), atol=1e-6 * np.abs(np.asarray(w_ref)).max())
    full_rank = maps.reduced_rank(state, 0, 1, 5)
    assert _pred_error(feats[0], feats[1], full_rank, (w_full, b_full)) < tol
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 5\]"):
        maps.reduced_rank(state, 0, 1, 6)


def test_bad_arguments():
    rng = np.random.default_rng(9)
    state = _state(_relu_features(rng, 50, (7, 5)))
    with pytest.raises(ValueError, match="ridge must be"):
        maps.affine(state, 0, 1, ridge=-1.0)
    with pytest.raises(IndexError, match="block index 2"):
        maps.affine(state, 0, 2)
    with pytest.raises(ValueError, match="0 sample"):
        maps.affine_all(stats.init((7, 5)))
    with pytest.raises(ValueError, match="identity"):
        maps.affine(state, 1, 1)
    with pytest.raises(TypeError, match="Stats"):
        maps.affine(jnp.zeros(3), 0, 1)


def test_blocked_cholesky_matches_float64():
    """The fit's own Cholesky (128-wide blocks; 300 = 128 + 128 + 44 exercises a partial block)."""
    rng = np.random.default_rng(10)
    d = 300
    x = rng.standard_normal((2 * d, d))
    a = (x.T @ x / (2 * d)).astype(np.float32)  # Wishart with 2d samples: κ ≈ (1+√½)²/(1−√½)² ≈ 34
    got = np.asarray(jax.jit(maps._cholesky)(a), np.float64)
    ref = np.linalg.cholesky(a.astype(np.float64))
    assert np.all(np.triu(got, 1) == 0.0)
    # Backward error of Cholesky is ≲ d·eps·‖A‖ (Higham, Thm 10.3, constant taken as 1); the forward
    # error of the factor is at most κ(A) times that: 34 · 300 · 1.2e-7 = 1.2e-3 relative, loose on
    # purpose (measured ~3e-7), while a wrong block update would give O(1).
    np.testing.assert_allclose(got @ got.T, a, rtol=0, atol=d * EPS32 * np.abs(a).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=34 * d * EPS32 * np.abs(ref).max())
    bad = a.copy()
    bad[200, 200] = -1.0  # not positive definite, in the second block
    assert np.isnan(np.asarray(jax.jit(maps._cholesky)(bad))).any()


@pytest.mark.parametrize("widths", [(6, 4), (4, 6), (5, 5)])
def test_scaled_procrustes_matches_zero_padded_reference(widths):
    d_a, d_b = widths
    rng = np.random.default_rng(11)
    n = 2000
    z = rng.standard_normal((n, 5))
    x = z @ rng.standard_normal((5, d_a)) + 0.3 * rng.standard_normal((n, d_a)) + 2.0
    y = 3.0 * z @ rng.standard_normal((5, d_b)) + 0.3 * rng.standard_normal((n, d_b)) - 1.0
    state = _state([x.astype(np.float32), y.astype(np.float32)])
    w, b = maps.scaled_procrustes(state, 0, 1)
    # Reference: centre, scale to unit Frobenius norm, pad the narrower side with zeros to a square
    # problem, solve it by a full SVD, and read the mapped features off the first d_b columns.
    d = max(d_a, d_b)
    xc, yc = x - x.mean(0), y - y.mean(0)
    xs, ys = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    xp = np.c_[xs, np.zeros((n, d - d_a))]
    yp = np.c_[ys, np.zeros((n, d - d_b))]
    u, _, vt = np.linalg.svd(xp.T @ yp)
    pred_ref = (xp @ (u @ vt))[:, :d_b] * np.linalg.norm(yc) + y.mean(0)
    pred = x @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    # A float32 SVD of a well-separated 6×6 cross-product: ~1e-6 relative on W, times |x| ≈ 4 of the
    # inputs, against a target spread of ~3: 1e-4 leaves an order of magnitude.
    assert np.max(np.abs(pred - pred_ref)) / y.std() < 1e-4
    if d_a != d_b:  # both directions from one SVD equal two separate fits
        (w_ab, b_ab), (w_ba, b_ba) = maps.scaled_procrustes_both(state, 0, 1)
        w_rev, b_rev = maps.scaled_procrustes(state, 1, 0)
        np.testing.assert_allclose(np.asarray(w_ab), np.asarray(w), atol=1e-6 * np.abs(np.asarray(w)).max())
        # Same SVD bound as above, on the reverse map's coefficients.
        np.testing.assert_allclose(np.asarray(w_ba), np.asarray(w_rev), atol=1e-4 * np.abs(np.asarray(w_rev)).max())
        np.testing.assert_allclose(np.asarray(b_ba), np.asarray(b_rev), atol=1e-4 * (1 + np.abs(np.asarray(b_rev)).max()))


def test_procrustes_with_fewer_samples_than_dims_is_the_minimum_norm_completion():
    # 20 samples of 48 dims: C_AB has rank ≤ 19, and U Vᵀ over the full thin SVD would carry ~29
    # arbitrary null-space directions. The map must be U_r V_rᵀ over the non-zero singular values,
    # whatever SVD routine computed it: compared with a float64 NumPy reference.
    rng = np.random.default_rng(21)
    x = rng.standard_normal((20, 48))
    y = x @ np.linalg.qr(rng.standard_normal((48, 48)))[0] + 0.1 * rng.standard_normal((20, 48))
    state = _state([x, y])
    xc, yc = x - x.mean(0), y - y.mean(0)
    u, s, vt = np.linalg.svd(xc.T @ yc)
    r = int(np.sum(s > 48 * np.finfo(np.float32).eps * s[0]))
    assert r == 19
    ref = u[:, :r] @ vt[:r]
    scale = np.sqrt(np.trace(yc.T @ yc) / np.trace(xc.T @ xc))
    w, _ = maps.scaled_procrustes(state, 0, 1)
    # float32 statistics, singular values well separated from the null space (σ_19 / σ_1 ≈ 1e-2 ≫ 48 ε):
    # the kept vectors carry ~1e-5 error.
    np.testing.assert_allclose(np.asarray(w) / scale, ref, atol=2e-4)
    w_p, _ = maps.procrustes(state, 0, 1)
    np.testing.assert_allclose(np.asarray(w_p), ref, atol=2e-4)
    assert np.linalg.matrix_rank(np.asarray(w_p), tol=1e-3) == r  # not completed to an orthogonal matrix
    # On the fit data's span it is the orthogonal map: the fitted values agree with any completion's.
    np.testing.assert_allclose(xc @ np.asarray(w_p), xc @ (u @ vt), atol=2e-3 * np.abs(xc @ (u @ vt)).max())
