"""bct: the influence loss and its gradient against float64 NumPy, the synthesized new-class columns, the L2
baseline, and orthogonal maps in both directions on planted data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import bct, stats

EPS32 = float(np.finfo(np.float32).eps)


def _np_fit_width(x, width):
    out = np.zeros((x.shape[0], width))
    d = min(width, x.shape[1])
    out[:, :d] = x[:, :d]
    return out


def _np_influence(emb, columns, kernel, bias, mask):
    logits = _np_fit_width(emb.astype(np.float64), kernel.shape[0]) @ kernel.astype(np.float64) + bias
    m = logits.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    ce = logz - logits[np.arange(len(columns)), columns]
    w = mask.astype(np.float64)
    loss = (ce * w).sum() / w.sum()
    # d loss / d emb: (softmax − onehot) Kᵀ per row, weighted by mask / Σ mask, cut back to d_new (padding
    # columns of a narrower embedding receive nothing, the cut-off ones of a wider embedding nothing).
    p = np.exp(logits - logz[:, None])
    p[np.arange(len(columns)), columns] -= 1.0
    g_fit = (p @ kernel.astype(np.float64).T) * (w / w.sum())[:, None]
    grad = np.zeros(emb.shape)
    d = min(emb.shape[1], kernel.shape[0])
    grad[:, :d] = g_fit[:, :d]
    return loss, grad


@pytest.mark.parametrize("d_new", [5, 8, 12])  # narrower (zero-padded), equal, wider (cut) than d_old = 8
def test_influence_loss_matches_float64(d_new):
    rng = np.random.default_rng(d_new)
    b, d_old, k = 11, 8, 6
    emb = rng.normal(0, 2.0, (b, d_new)).astype(np.float32)
    kernel = rng.normal(0, 1.0, (d_old, k)).astype(np.float32)
    bias = rng.normal(0, 1.0, (k,)).astype(np.float32)
    columns = rng.integers(0, k, b).astype(np.int32)
    mask = rng.random(b) < 0.7
    mask[0] = True
    want, want_grad = _np_influence(emb, columns, kernel, bias, mask)
    loss_fn = lambda e: bct.influence_loss(e, columns, kernel, bias, mask)  # noqa: E731
    got, grad = jax.value_and_grad(loss_fn)(jnp.asarray(emb))
    # Logits are sums of ≤ 8 products with |term| ≲ 2·2·3 = 12 here, so each is off by ≲ 8·12·eps32 ≈ 1e-5
    # absolute at worst; the cross-entropy (logsumexp − one logit) by at most about twice that, and the
    # masked mean does not grow it. 5e-5 is that bound with margin; a wrong column, bias, pad/cut rule or
    # mask changes the loss by O(1).
    np.testing.assert_allclose(float(got), want, rtol=0, atol=5e-5)
    # Gradient entries: (softmax − onehot) Kᵀ / n, sums of 6 terms of magnitude ≲ 3, divided by n ≥ 1:
    # rounding ≲ 6·3·eps32·few ≈ 1e-5.
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=0, atol=2e-5)
    # The old classifier is frozen: no gradient flows into it.
    g_kernel = jax.grad(lambda kk: bct.influence_loss(jnp.asarray(emb), columns, kk, bias, mask))(jnp.asarray(kernel))
    assert not np.any(np.asarray(g_kernel))


def test_influence_loss_ignores_masked_rows_entirely():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 5)).astype(np.float32)
    bias = np.zeros(5, np.float32)
    cols = np.array([0, 1, 2, 3], np.int32)
    mask = np.array([True, True, False, False])
    poisoned = emb.copy()
    poisoned[2:] = 1e30  # padding rows may hold anything
    a = bct.influence_loss(emb[:2], cols[:2], kernel, bias)
    b = bct.influence_loss(poisoned, cols, kernel, bias, mask)
    assert float(a) == pytest.approx(float(b), abs=0)


def test_l2_compatibility_loss_matches_float64():
    rng = np.random.default_rng(1)
    new = rng.normal(size=(9, 6)).astype(np.float32)
    old = rng.normal(size=(9, 4)).astype(np.float32)
    mask = np.array([1, 1, 1, 0, 1, 0, 1, 1, 1], bool)
    diff = new[:, :4].astype(np.float64) - old
    want = (np.sum(diff ** 2, axis=1) * mask).sum() / mask.sum()
    # Each squared distance sums 4 terms ≲ 20: rounding ≲ 4·20·eps32 ≈ 1e-5 relative to a loss of ~8.
    np.testing.assert_allclose(float(bct.l2_compatibility_loss(new, old, mask)), want, rtol=1e-5)
    # A narrower new embedding is zero-padded: the old features beyond its width count in full.
    want_pad = np.mean(np.sum((_np_fit_width(old[:, :2], 4) - old) ** 2, axis=1))
    np.testing.assert_allclose(float(bct.l2_compatibility_loss(old[:, :2], old)), want_pad, rtol=1e-6)


def test_class_sums_give_class_means_across_batches_and_merges():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, 50)
    labels[:6] = np.arange(6)
    x = rng.normal(5.0, 1.0, (50, 3)).astype(np.float32)
    mask = np.ones(50, bool)
    mask[40:] = False
    a = bct.class_sums_update(bct.class_sums_init(6, 3), x[:20], labels[:20], mask[:20])
    b = bct.class_sums_update(bct.class_sums_init(6, 3), x[20:], labels[20:], mask[20:])
    got = np.asarray(bct.class_sums_compute(bct.class_sums_merge(a, b)))
    want = np.stack([x[:40][labels[:40] == c].astype(np.float64).mean(axis=0) for c in range(6)])
    # Means of ≤ 40 values near 5: the float32 sums are off by ≲ 40·5·eps32 ≈ 2e-5 before the division.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_influence_classifier_keeps_old_columns_and_appends_class_means():
    rng = np.random.default_rng(3)
    d, classes = 4, 10
    kernel = rng.normal(size=(d, classes)).astype(np.float32)
    bias = rng.normal(size=(classes,)).astype(np.float32)
    old, new = [0, 1, 2, 3, 4], [5, 7]
    means = rng.normal(3.0, 1.0, (2, d)).astype(np.float32)
    k, b, table = bct.influence_classifier(kernel, bias, old, num_labels=classes, new_classes=new,
                                           new_class_means=means)
    k, b, table = np.asarray(k), np.asarray(b), np.asarray(table)
    np.testing.assert_array_equal(k[:, :5], kernel[:, :5])
    np.testing.assert_array_equal(b[:5], bias[:5])
    np.testing.assert_array_equal(k[:, 5:], means.T)  # the paper's rule: mean old embedding as the weights
    np.testing.assert_array_equal(b[5:], 0.0)
    np.testing.assert_array_equal(table, [0, 1, 2, 3, 4, 5, -1, 6, -1, -1])

    k_unit, _, _ = bct.influence_classifier(kernel, bias, old, num_labels=classes, new_classes=new,
                                            new_class_means=means, normalize="unit")
    cols = np.asarray(k_unit)[:, 5:]
    np.testing.assert_allclose(np.linalg.norm(cols, axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cols * np.linalg.norm(means, axis=1), means.T, rtol=1e-5)
    k_old, _, _ = bct.influence_classifier(kernel, bias, old, num_labels=classes, new_classes=new,
                                           new_class_means=means, normalize="old_norm")
    target = np.linalg.norm(kernel[:, :5].astype(np.float64), axis=0).mean()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(k_old)[:, 5:], axis=0), target, rtol=1e-5)

    with pytest.raises(ValueError, match="must be distinct"):
        bct.influence_classifier(kernel, bias, [0, 1], num_labels=10, new_classes=[1], new_class_means=means[:1])
    with pytest.raises(ValueError, match="new_class_means"):
        bct.influence_classifier(kernel, bias, [0, 1], num_labels=10, new_classes=[5])
    with pytest.raises(ValueError, match="normalize"):
        bct.synthesized_columns(means, normalize="l2")


def test_bct_loss_pulls_new_class_embeddings_towards_their_synthesized_column():
    # One new-class sample whose embedding equals its class mean scores that column above the others when
    # the means are well separated, so the influence loss is lower there than for a wrong label.
    means = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]], np.float32)
    kernel = np.eye(3, 2, dtype=np.float32)  # old classes: columns 0, 1 of a 3-d space
    k, b, table = bct.influence_classifier(kernel, np.zeros(2), [0, 1], num_labels=4, new_classes=[2, 3],
                                           new_class_means=means[[0, 1]] + np.array([0, 0, 4.0], np.float32))
    emb = jnp.asarray([[4.0, 0.0, 4.0]])
    right = bct.influence_loss(emb, table[jnp.asarray([2])], k, b)
    wrong = bct.influence_loss(emb, table[jnp.asarray([3])], k, b)
    assert float(right) < float(wrong)


def _planted_stats(x_a, x_b):
    s = stats.init((x_a.shape[1], x_b.shape[1]), jnp.float32)
    return stats.update(s, [jnp.asarray(x_a), jnp.asarray(x_b)])


def test_orthogonal_map_recovers_planted_isometries_both_ways():
    rng = np.random.default_rng(4)
    n, d_a, d_b = 400, 3, 5
    q, _ = np.linalg.qr(rng.normal(size=(d_b, d_b)))
    r = q[:d_a]  # (3, 5) with r rᵀ = I: an isometry of the 3-d space into the 5-d one
    t = rng.normal(size=d_b)
    x_a = rng.normal(2.0, 1.0, (n, d_a))
    x_b = x_a @ r + t
    state = _planted_stats(x_a.astype(np.float32), x_b.astype(np.float32))
    w, b = bct.orthogonal_map(state, 0, 1)
    # float32 statistics of O(1) features: the SVD recovers r to ~1e-5; 1e-4 leaves room for the means.
    np.testing.assert_allclose(np.asarray(w), r, atol=1e-4)
    np.testing.assert_allclose(np.asarray(b), t, atol=1e-4)
    # The wide → narrow direction (d_src > d_dst): W = rᵀ, WᵀW = I, recovers x_a exactly from x_b.
    w2, b2 = bct.orthogonal_map(state, 1, 0)
    np.testing.assert_allclose(np.asarray(w2), r.T, atol=1e-4)
    np.testing.assert_allclose(x_b @ np.asarray(w2, np.float64) + np.asarray(b2), x_a, atol=1e-3)
    # A scaled copy: the least-squares scale factor is found too.
    state_s = _planted_stats(x_a.astype(np.float32), (2.5 * (x_a @ r) + t).astype(np.float32))
    w3, _ = bct.orthogonal_map(state_s, 0, 1)
    np.testing.assert_allclose(np.asarray(w3), 2.5 * r, atol=3e-4)
