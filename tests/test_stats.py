"""embjax.stats against float64 NumPy: streaming, masks, merges, the large-mean regime, summaries."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import maps, stats

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def _features(rng, n, dims, mean_scale=1.0, spread=1.0, latent=4):
    """Correlated features: a shared latent factor, per-block mixing, noise and per-feature offsets."""
    z = rng.standard_normal((n, latent))
    out = []
    for d in dims:
        mix = rng.standard_normal((latent, d))
        offset = mean_scale * rng.uniform(0.5, 1.0, size=d)
        out.append((offset + spread * (z @ mix + 0.5 * rng.standard_normal((n, d)))).astype(np.float32))
    return out


def _reference(feats):
    """Float64 count, mean and centred cross-product (two-pass) of the float32 inputs."""
    x = np.concatenate(feats, axis=1).astype(np.float64)
    mu = x.mean(axis=0)
    xc = x - mu
    return x.shape[0], mu, xc.T @ xc


def _normalised_error(cross, ref):
    """Max |ΔC_ij| / sqrt(C_ii C_jj): errors in units of the features' own spreads (correlation scale)."""
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    return float(np.max(np.abs(np.asarray(cross, np.float64) - ref) / scale))


def _stream(feats, batch, mask_every=None):
    state = stats.init([f.shape[1] for f in feats])
    step = jax.jit(stats.update)
    n = feats[0].shape[0]
    for start in range(0, n, batch):
        state = step(state, [f[start : start + batch] for f in feats])
    return state


def test_streaming_matches_float64():
    rng = np.random.default_rng(0)
    dims = (5, 7, 3)
    feats = _features(rng, 3000, dims)
    state = _stream(feats, batch=512)  # last batch is short (440 rows): a second compiled shape
    n, mu, cross = _reference(feats)
    assert int(state.count) == n
    assert state.dims == dims
    # float32 sums of B = 512 products: the probabilistic error bound is ~√B·eps = 2.7e-6 in units of
    # the spreads (Higham & Mary); 10× that leaves room for the merge terms. Means: a sum of 512 terms
    # of size ~1 divided by 512, same bound, relative to |μ| ≤ 1.5.
    tol = 10 * np.sqrt(512) * EPS32
    assert _normalised_error(state.cross, cross) < tol
    np.testing.assert_allclose(np.asarray(state.mean), mu, rtol=0, atol=tol * 1.5)
    # One batch's off-diagonal blocks are filled by transposition (folding it into the empty state adds
    # exact zeros), so they are exactly symmetric.
    o = stats.offsets(state)
    assert o == (0, 5, 12, 15)
    one = np.asarray(jax.jit(stats.update)(stats.init(dims), [f[:512] for f in feats]).cross)
    np.testing.assert_array_equal(one[o[0] : o[1], o[1] :], one[o[1] :, o[0] : o[1]].T)
    # Each merge then takes the same elementwise steps on both sides of the diagonal, which stay equal up
    # to how the compiler contracts them (a fused multiply-add on one side, two roundings on the other):
    # at most one rounding of |C| per merge and side, 5 merges here.
    c = np.asarray(state.cross)
    upper, lower = c[o[0] : o[1], o[1] :], c[o[1] :, o[0] : o[1]].T
    assert np.abs(upper - lower).max() <= 5 * 2 * EPS32 * np.abs(c).max()


def test_block_helpers():
    rng = np.random.default_rng(1)
    feats = _features(rng, 200, (2, 3))
    state = stats.update(stats.init((2, 3)), feats)
    np.testing.assert_array_equal(stats.block(state, 0, 1), np.asarray(state.cross)[:2, 2:])
    np.testing.assert_array_equal(stats.block(state, 1, 1), np.asarray(state.cross)[2:, 2:])
    np.testing.assert_array_equal(stats.block_mean(state, 1), np.asarray(state.mean)[2:])
    np.testing.assert_allclose(stats.covariance(state, 0, 0), np.asarray(state.cross)[:2, :2] / 200, rtol=1e-6)
    with pytest.raises(IndexError, match="block index 2"):
        stats.block(state, 0, 2)


@pytest.mark.parametrize("n", [1 << 16, pytest.param(1 << 20, marks=pytest.mark.slow)])  # ~10 CPU s at 2^20
def test_large_mean_many_samples_matches_lstsq(n):
    """n rows (2^16 everyday, 2^20 ≥ 10⁶ in the whole tier) streamed in 16 batches, features whose mean is
    100–1000× their spread (post-ReLU regime)."""
    rng = np.random.default_rng(2)
    dims = (8, 12, 6)
    batch = n // 16
    feats = _features(rng, n, dims, mean_scale=1000.0, spread=1.0)
    state = _stream(feats, batch)
    assert int(state.count) == n

    x64 = [f.astype(np.float64) for f in feats]
    mapped = maps.affine_all(state)
    # Raw sums Σ x xᵀ in float32 for contrast: the same batches, summed without centring.
    raw_sum = jnp.zeros((sum(dims), sum(dims)), jnp.float32)
    raw_mean = jnp.zeros((sum(dims),), jnp.float32)
    x_all = np.concatenate(feats, axis=1)
    for start in range(0, n, batch):
        xb = jnp.asarray(x_all[start : start + batch])
        raw_sum = raw_sum + jnp.matmul(xb.T, xb, precision="highest")
        raw_mean = raw_mean + xb.sum(axis=0)
    raw_mean = raw_mean / n
    naive_state = state.replace(cross=raw_sum - n * jnp.outer(raw_mean, raw_mean), mean=raw_mean)

    with warnings.catch_warnings():  # the cancelled Gram may not even be PSD: repaired with a warning
        warnings.simplefilter("ignore", maps.IllConditionedWarning)
        mapped_naive = maps.affine_all(naive_state)  # same shapes as above: no new compilation

    rows = slice(0, 20000)  # predictions are compared on a subset to keep the test fast
    worst, worst_naive = 0.0, 0.0
    for src in range(len(dims)):
        targets = [t for t in range(len(dims)) if t != src]
        design = np.c_[x64[src], np.ones(n)]
        y = np.concatenate([x64[t] for t in targets], axis=1)
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        pred64 = design[rows] @ coef
        col = 0
        for t in targets:
            ref = pred64[:, col : col + dims[t]]
            spread = x64[t][rows].std(axis=0)
            for fitted, name in ((mapped, "centred"), (mapped_naive, "raw")):
                w, b = (np.asarray(v, np.float64) for v in fitted[(src, t)])
                err = float(np.max(np.abs(x64[src][rows] @ w + b - ref) / spread))
                if name == "centred":
                    worst = max(worst, err)
                else:
                    worst_naive = max(worst_naive, err)
            col += dims[t]
    print(f"max error in target spreads: centred {worst:.3g}, raw sums {worst_naive:.3g}")
    # Errors in units of the target's spread. The inputs themselves are float32 numbers near 1000, so
    # their quantum is eps·1000 = 1.2e-4 spreads; the running mean is rounded to that quantum at each of
    # the 16 merges (random walk: √16 × 0.6e-4 ≈ 2.4e-4) and the intercept inherits it, as does the
    # product μ_A W (|W| sums to ~1 here). 2e-3 is about 4× that estimate.
    assert worst < 2e-3, worst
    # Without centring, eps·1000² = 0.12 spreads² of cancellation error per entry: unusable.
    assert worst_naive > 50 * 2e-3, worst_naive


def test_mask_ignores_padded_rows_even_nan():
    rng = np.random.default_rng(3)
    dims = (4, 3)
    real = _features(rng, 300, dims, mean_scale=50.0)
    pad = 84
    padded = [np.concatenate([f, np.full((pad, f.shape[1]), np.nan, np.float32)]) for f in real]
    mask = np.r_[np.ones(300, bool), np.zeros(pad, bool)]
    perm = rng.permutation(300 + pad)  # padded rows scattered through the batch
    got = jax.jit(stats.update)(stats.init(dims), [f[perm] for f in padded], mask[perm])
    want = stats.update(stats.init(dims), real)
    assert int(got.count) == 300
    assert np.all(np.isfinite(np.asarray(got.cross)))
    n, mu, cross = _reference(real)
    # Same bound as the streaming test with B = 384 rows: 10·√384·eps = 2.3e-5 spreads; means ~50, so
    # the mean tolerance is that times 50.
    tol = 10 * np.sqrt(384) * EPS32
    assert _normalised_error(got.cross, cross) < tol
    assert _normalised_error(want.cross, cross) < tol
    np.testing.assert_allclose(np.asarray(got.mean), mu, rtol=0, atol=tol * 50)


def test_empty_batch_is_exact_noop():
    dims = (3, 2)
    rng = np.random.default_rng(4)
    feats = _features(rng, 10, dims)
    empty = np.zeros(10, bool)
    fresh = stats.update(stats.init(dims), feats, empty)
    assert int(fresh.count) == 0
    np.testing.assert_array_equal(fresh.mean, 0.0)
    np.testing.assert_array_equal(fresh.cross, 0.0)
    state = stats.update(stats.init(dims), feats)
    again = jax.jit(stats.update)(state, [np.full_like(f, np.inf) for f in feats], empty)
    np.testing.assert_array_equal(again.mean, state.mean)
    np.testing.assert_array_equal(again.cross, state.cross)
    assert int(again.count) == 10
    both_empty = stats.merge(stats.init(dims), stats.init(dims))
    assert np.all(np.isfinite(np.asarray(both_empty.mean)))


def test_merge_order_independence():
    rng = np.random.default_rng(5)
    dims = (6, 4)
    feats = _features(rng, 4000, dims, mean_scale=100.0)
    cuts = [0, 700, 1800, 1900, 4000]  # unequal parts, one tiny
    parts = [
        stats.update(stats.init(dims), [f[a:b] for f in feats]) for a, b in zip(cuts[:-1], cuts[1:])
    ]
    a, b, c, d = parts
    orders = {
        "left": stats.merge(stats.merge(stats.merge(a, b), c), d),
        "right": stats.merge(a, stats.merge(b, stats.merge(c, d))),
        "tree": stats.merge(stats.merge(a, b), stats.merge(c, d)),
        "reversed": stats.merge(d, stats.merge(c, stats.merge(b, a))),
        "jit": jax.jit(stats.merge)(stats.merge(c, a), stats.merge(d, b)),
    }
    n, mu, cross = _reference(feats)
    # Parts of ≤ 2100 rows: 10·√2100·eps = 5.5e-5 spreads; the merge's δᵀδ term adds O(eps).
    tol = 10 * np.sqrt(2100) * EPS32
    for name, state in orders.items():
        assert int(state.count) == n, name
        assert _normalised_error(state.cross, cross) < tol, name
        # Means near 100, so an absolute error of tol·100 is the same relative bound.
        np.testing.assert_allclose(np.asarray(state.mean), mu, rtol=0, atol=tol * 100, err_msg=name)


def test_allreduce_under_vmap_named_axis():
    """allreduce's collectives, exercised on one device through vmap's named axis (4 'devices')."""
    rng = np.random.default_rng(6)
    dims = (3, 5)
    feats = _features(rng, 400, dims, mean_scale=20.0)
    mask = np.ones(400, bool)
    mask[300:] = False  # the fourth shard is all padding: an empty per-device state
    shards = [f.reshape(4, 100, -1) for f in feats]

    def per_device(fs, m):
        return stats.allreduce(stats.update(stats.init(dims), list(fs), m), "devices")

    out = jax.vmap(per_device, axis_name="devices")(shards, mask.reshape(4, 100))
    n, mu, cross = _reference([f[:300] for f in feats])
    tol = 10 * np.sqrt(300) * EPS32  # as in the streaming test, B = 100 rows per shard (300 total)
    for k in range(4):  # every device holds the same, global result
        assert int(out.count[k]) == n
        assert _normalised_error(out.cross[k], cross) < tol
        np.testing.assert_allclose(np.asarray(out.mean[k]), mu, rtol=0, atol=tol * 20)


def test_cka_matches_float64_and_invariances():
    rng = np.random.default_rng(7)
    dims = (6, 6, 5)
    feats = _features(rng, 2000, dims)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    feats[1] = (3.0 * feats[0] @ q + 7.0).astype(np.float32)  # rotated, scaled, shifted copy of block 0
    state = stats.update(stats.init(dims), feats)

    def cka64(a, b):
        a = a - a.mean(0)
        b = b - b.mean(0)
        return np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))

    x = [f.astype(np.float64) for f in feats]
    # CKA is a ratio of squared Frobenius norms of float32 blocks with ~1e-6 relative error each.
    np.testing.assert_allclose(float(stats.cka(state, 0, 2)), cka64(x[0], x[2]), rtol=1e-5)
    np.testing.assert_allclose(float(stats.cka(state, 0, 1)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(stats.cka(state, 2, 2)), 1.0, rtol=1e-6)


def test_cka_of_huge_features_stays_finite():
    # Features of ~1e11 (deep networks with random weights reach this) give cross-products of ~1e22 per
    # entry; squaring them as ‖C_ii‖² overflows float32 (max 3.4e38). CKA is scale-invariant, so the
    # statistics of the same features scaled by 1e-11 must give the same value.
    rng = np.random.default_rng(9)
    dims = (6, 5)
    feats = _features(rng, 500, dims)
    big = [(f.astype(np.float64) * 1e11).astype(np.float32) for f in feats]
    got = float(stats.cka(stats.update(stats.init(dims), big), 0, 1))
    want = float(stats.cka(stats.update(stats.init(dims), feats), 0, 1))
    assert np.isfinite(got) and float(stats.cka(stats.update(stats.init(dims), big), 0, 0)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_r2_from_statistics_matches_direct():
    rng = np.random.default_rng(8)
    dims = (5, 4)
    feats = _features(rng, 3000, dims, mean_scale=10.0)
    state = stats.update(stats.init(dims), feats)
    x0, x1 = (f.astype(np.float64) for f in feats)
    w, b = maps.affine(state, 0, 1)
    resid = x1 - (x0 @ np.asarray(w, np.float64) + np.asarray(b, np.float64))
    r2_direct = 1 - np.sum(resid**2) / np.sum((x1 - x1.mean(0)) ** 2)
    # The identity tr(C_BB) − 2tr(WᵀC_AB) + tr(WᵀC_AA W) cancels ~1/(1−R²) ≈ 2× here, on float32
    # entries with 3000-term sums (√3000·eps = 6.5e-6): 1e-4 absolute on R² is a safe margin.
    assert abs(float(stats.r2(state, 0, 1, w, b)) - r2_direct) < 1e-4
    # A deliberately bad map (zero W, wrong intercept) exercises the n‖offset‖² term.
    w0, b0 = np.zeros((5, 4), np.float32), np.zeros(4, np.float32)
    r2_bad = 1 - np.sum(x1**2) / np.sum((x1 - x1.mean(0)) ** 2)
    np.testing.assert_allclose(float(stats.r2(state, 0, 1, w0, b0)), r2_bad, rtol=1e-4)


def test_bad_input_errors():
    state = stats.init((3, 2))
    with pytest.raises(ValueError, match="2 blocks|got 1 feature blocks"):
        stats.update(state, [np.zeros((4, 3), np.float32)])
    with pytest.raises(ValueError, match=r"block 1 has shape \(4, 3\), expected \(batch, 2\)"):
        stats.update(state, [np.zeros((4, 3)), np.zeros((4, 3))])
    with pytest.raises(ValueError, match="batch size"):
        stats.update(state, [np.zeros((4, 3)), np.zeros((5, 2))])
    with pytest.raises(ValueError, match="mask has shape"):
        stats.update(state, [np.zeros((4, 3)), np.zeros((4, 2))], np.ones(3, bool))
    with pytest.raises(ValueError, match="widths differ"):
        stats.merge(state, stats.init((2, 3)))
    with pytest.raises(ValueError, match="positive widths"):
        stats.init((3, 0))
