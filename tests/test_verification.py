"""embjax.verification against scikit-learn and float64 NumPy: ROC, TAR at FAR, EER, AUC, label pairs,
the LFW 10-fold protocol."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from embjax import verification

BINS = 4096


def _binned_scores(rng, n, loc, scale):
    """Scores at bin centres of the [−1, 1) grid: the histogram then loses nothing, so its ROC must be
    exactly scikit-learn's (centres sit half a bin from either edge, far beyond float32 rounding)."""
    s = np.clip(rng.normal(loc, scale, n), -1.0, 1.0 - 1e-9)
    k = np.floor((s + 1.0) * BINS / 2.0)
    return (-1.0 + (k + 0.5) * 2.0 / BINS).astype(np.float32)


def _eer_reference(fpr, tpr):
    diff = fpr - (1.0 - tpr)
    k = np.nonzero(diff < 0)[0][-1]
    frac = -diff[k] / (diff[k + 1] - diff[k])
    return fpr[k] + frac * (fpr[k + 1] - fpr[k])


def test_histogram_roc_matches_sklearn():
    rng = np.random.default_rng(0)
    gen = _binned_scores(rng, 3000, 0.5, 0.2)
    imp = _binned_scores(rng, 40000, 0.0, 0.2)  # FAR 1e-4 allows exactly 4 impostors
    scores = np.r_[gen, imp]
    same = np.r_[np.ones(gen.size, bool), np.zeros(imp.size, bool)]
    state = verification.init(BINS)
    for part in np.array_split(np.arange(scores.size), 7):  # streaming, uneven chunks
        state = verification.update(state, scores[part], same[part])
    mask = rng.random(scores.size) < 0.9  # a masked fold of the same pairs counts only mask True
    masked = verification.update(verification.init(BINS), scores, same, mask)

    fpr, tpr, _ = roc_curve(same, scores.astype(np.float64), drop_intermediate=False)
    fars = (1e-1, 1e-2, 1e-3, 1e-4)
    got = verification.compute(state, fars)
    assert int(got["genuine"]) == gen.size and int(got["impostor"]) == imp.size
    # Counts are exact integers and the ratios are one float32 division each: ~1e-7 relative.
    for f, tar in zip(fars, np.asarray(got["tar_at_far"])):
        assert tar == pytest.approx(tpr[fpr <= f].max(), abs=1e-6)
    assert float(got["roc_auc"]) == pytest.approx(roc_auc_score(same, scores), abs=1e-5)  # a float32 sum of 4k terms
    assert float(got["eer"]) == pytest.approx(_eer_reference(fpr, tpr), abs=1e-5)
    m_fpr, m_tpr, _ = roc_curve(same[mask], scores[mask].astype(np.float64), drop_intermediate=False)
    assert float(verification.auc(masked)) == pytest.approx(roc_auc_score(same[mask], scores[mask]), abs=1e-5)
    assert float(verification.eer(masked)) == pytest.approx(_eer_reference(m_fpr, m_tpr), abs=1e-5)
    assert np.asarray(verification.tar_at_far(verification.merge(state, masked), fars)).shape == (4,)


def test_threshold_rule_is_largest_far_not_above_target():
    # 10 impostors at 0.9, 0.8, …, 0.0 and 4 genuine (all + 1e-3). FAR 0.25 cannot be hit exactly: the
    # rule takes FAR 0.2, at the lowest threshold that still rejects the impostor at 0.7, so the
    # genuine pair at 0.75 is accepted too (TAR 3/4); it never interpolates towards FAR 0.3.
    imp = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], np.float32) + 1e-3
    gen = np.array([0.95, 0.85, 0.75, 0.05], np.float32) + 1e-3
    state = verification.update(verification.init(2000), np.r_[gen, imp], np.r_[np.ones(4, bool), np.zeros(10, bool)])
    tar = np.asarray(verification.tar_at_far(state, (0.25, 0.1, 0.0)))
    np.testing.assert_allclose(tar, [0.75, 0.5, 0.25])


def test_label_pairs_count_each_unordered_pair_once():
    rng = np.random.default_rng(1)
    n = 97
    labels = rng.integers(0, 6, n)
    index = rng.permutation(1000)[:n]  # sample indices unrelated to positions
    scores = np.tanh(rng.standard_normal((n, n))).astype(np.float32)
    mask = rng.random(n) < 0.85
    state = verification.init(1024)
    blocks = np.array_split(np.arange(n), 4)
    for qb in blocks:
        for gb in blocks:
            state = verification.update_label_pairs(state, scores[np.ix_(qb, gb)], labels[qb], index[qb], labels[gb],
                                                    index[gb], mask[qb], mask[gb])
    i, j = np.nonzero((index[:, None] < index[None, :]) & mask[:, None] & mask[None, :])
    ref = verification.update(verification.init(1024), scores[i, j], labels[i] == labels[j])
    np.testing.assert_array_equal(np.asarray(state.genuine), np.asarray(ref.genuine))
    np.testing.assert_array_equal(np.asarray(state.impostor), np.asarray(ref.impostor))
    assert int(np.sum(state.genuine) + np.sum(state.impostor)) == mask.sum() * (mask.sum() - 1) // 2


def _best_threshold_reference(s, y):
    """Brute force in float64 over every split of the sorted scores."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order].astype(np.float64)
    best, best_t = -1, None
    for k in range(s.size + 1):
        if 0 < k < s.size and s_sorted[k - 1] == s_sorted[k]:
            continue
        t = np.inf if k == 0 else (s_sorted[k - 1] - 1.0 if k == s.size else 0.5 * (s_sorted[k - 1] + s_sorted[k]))
        acc = np.sum((s >= t) == y)
        if acc > best:
            best, best_t = acc, t
    return best_t


def test_kfold_accuracy_matches_numpy():
    rng = np.random.default_rng(2)
    p = 600  # LFW-like: 10 folds of 30 genuine + 30 impostor, listed fold by fold
    same = np.tile(np.r_[np.ones(30, bool), np.zeros(30, bool)], 10)
    scores = np.where(same, rng.normal(0.6, 0.25, p), rng.normal(0.1, 0.25, p)).astype(np.float32)
    scores[5] = scores[6]  # a tie must stay unsplit
    per_fold, mean = verification.kfold_accuracy(scores, same, 10)
    ref = []
    for f in range(10):
        test = np.arange(p) // 60 == f
        t = _best_threshold_reference(scores[~test], same[~test])
        ref.append(np.mean((scores[test] >= t) == same[test]))
    np.testing.assert_allclose(np.asarray(per_fold), ref, atol=1e-6)
    assert float(mean) == pytest.approx(np.mean(ref), abs=1e-6)
    assert 0.8 < float(mean) < 0.95  # the two normals overlap: neither trivial nor perfect
    folds = np.arange(p) % 10  # explicit fold ids
    per_fold2, _ = verification.kfold_accuracy(scores, same, folds)
    assert per_fold2.shape == (10,)


def test_bad_input():
    with pytest.raises(ValueError, match="lo < hi"):
        verification.init(10, 1.0, -1.0)
    with pytest.raises(ValueError, match="genuine has shape"):
        verification.update(verification.init(10), np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="folds"):
        verification.kfold_accuracy(np.zeros(5), np.zeros(5, bool), 1)


# --------------------------------------------------------------------------------------------------
# Exact metrics, both directions, disjoint k-fold pairs


def test_exact_roc_matches_sklearn_with_ties():
    rng = np.random.default_rng(5)
    # Scores on a coarse grid: many genuine/impostor ties, which the exact curve must treat as sklearn does.
    gen = np.round(rng.normal(0.5, 0.2, 2500), 2).astype(np.float32)
    imp = np.round(rng.normal(0.0, 0.2, 30000), 2).astype(np.float32)
    scores = np.r_[gen, imp].astype(np.float64)
    same = np.r_[np.ones(gen.size, bool), np.zeros(imp.size, bool)]
    fpr, tpr, thr = roc_curve(same, scores, drop_intermediate=False)
    far, tar, threshold = verification.roc_exact(gen, imp)
    # Every ROC point and threshold, not a binned approximation: counts over exact float32 scores.
    np.testing.assert_allclose(far, fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tar, tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(threshold[1:], thr[1:])
    fars = (1e-1, 1e-2, 1e-3, 1e-4)
    got = verification.exact_metrics(gen, imp, fars)
    for f, t in zip(fars, got["tar_at_far"]):
        assert t == tpr[fpr <= f].max()  # the largest FAR not above the target, exactly
    assert got["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    assert got["eer"] == pytest.approx(_eer_reference(fpr, tpr), abs=1e-12)


def test_label_pairs_both_directions_and_binned_fallback():
    rng = np.random.default_rng(6)
    n, d = 90, 6
    labels = rng.integers(0, 4, n)
    x = (rng.standard_normal((4, d))[labels] + rng.standard_normal((n, d))).astype(np.float32)
    y = (x @ rng.standard_normal((d, d)) + 0.3 * rng.standard_normal((n, d))).astype(np.float32)  # "mapped" queries
    perm = rng.permutation(n)
    got = verification.label_pairs(y, x, labels, fars=(0.1, 0.01), block=17)
    # The reference: every ordered pair a ≠ b, query a from y, gallery b from x, in float64.
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = yn.astype(np.float64) @ xn.T.astype(np.float64)
    off = ~np.eye(n, dtype=bool)
    same = (labels[:, None] == labels[None, :])[off]
    fpr, tpr, _ = roc_curve(same, s[off], drop_intermediate=False)
    assert got["exact"] and got["genuine"] == same.sum() and got["impostor"] == (~same).sum()
    assert got["roc_auc"] == pytest.approx(roc_auc_score(same, s[off]), abs=1e-6)  # float32 scores vs float64
    assert got["eer"] == pytest.approx(_eer_reference(fpr, tpr), abs=2e-3)  # one ROC step: 1/#impostor pairs
    # The sample order does not matter any more (each unordered pair counts in both directions).
    shuffled = verification.label_pairs(y[perm], x[perm], labels[perm], fars=(0.1, 0.01))
    assert shuffled["roc_auc"] == pytest.approx(got["roc_auc"], abs=1e-9)
    np.testing.assert_array_equal(shuffled["tar_at_far"], got["tar_at_far"])
    # Beyond exact_limit: the histograms over the same ordered pairs, within a bin of the exact curve.
    binned = verification.label_pairs(y, x, labels, fars=(0.1, 0.01), exact_limit=10)
    assert not binned["exact"] and binned["genuine"] == got["genuine"]
    assert binned["roc_auc"] == pytest.approx(got["roc_auc"], abs=1e-3)
    assert np.all(binned["tar_at_far"] <= got["tar_at_far"] + 1e-7)
    # The streaming update counts the same ordered pairs with both_directions=True.
    st = verification.update_label_pairs(verification.init(1 << 16), s.astype(np.float32), labels, np.arange(n),
                                         labels, np.arange(n), both_directions=True)
    assert int(verification.counts(st)[0]) == got["genuine"]


def test_sample_pairs_are_disjoint_across_folds():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 12, 300)
    i, j, same, fold = verification.sample_pairs(labels, 200, 10, seed=3)
    assert i.size == 2 * 2 * 200 * 10  # genuine + impostor, each in both orders
    assert np.all(i != j) and np.array_equal(same, labels[i] == labels[j])
    unordered = {}
    for a, b, f in zip(i, j, fold):
        unordered.setdefault((min(a, b), max(a, b)), set()).add(int(f))
    assert all(len(fs) == 1 for fs in unordered.values())  # no pair in two folds
    assert len(unordered) == 2 * 200 * 10  # and none drawn twice
    # Nearly every genuine pair requested: the enumerating branch, still disjoint.
    small = np.repeat(np.arange(4), 6)  # 4 classes × 15 genuine pairs = 60
    i, j, same, fold = verification.sample_pairs(small, 5, 10, seed=0, both_orders=False)
    keys = {(min(a, b), max(a, b)) for a, b in zip(i, j)}
    assert len(keys) == i.size == 100
    with pytest.raises(ValueError, match="genuine"):
        verification.sample_pairs(small, 7, 10)
