"""embjax.retrieval against float64 NumPy and scikit-learn: blocked exact k-NN, leave-one-out CMC,
mAP and MAP@R, self-match removal by index."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from embjax import retrieval


def _clustered(rng, n, d, classes, spread=1.5):
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d))
    x = centres[labels] + spread * rng.standard_normal((n, d))
    return x.astype(np.float32), labels


def _scores64(q, g, metric):
    q, g = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        return q @ g.T
    return -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_blocked_knn_matches_bruteforce(metric):
    rng = np.random.default_rng(0)
    x, _ = _clustered(rng, 203, 12, 5)
    ref = _scores64(x, x, metric)
    np.fill_diagonal(ref, -np.inf)
    k = 7
    # Blocks that divide neither size exercise the padding of both sides.
    s, p = retrieval.knn(x, x, k, metric, query_block=33, gallery_block=50)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top_ref = np.take_along_axis(ref, order, axis=1)
    p = np.asarray(p)
    # Float32 scores of O(1) (cosine) or O(d·spread²) (l2) carry ~1e-7 relative error (1e-5 leaves
    # room for the d-term sums): neighbours may only swap where their float64 scores are that close,
    # so the float64 score of what came back must equal the reference top-k, and the positions must
    # match exactly wherever the gaps around them exceed the bound.
    scale = np.abs(top_ref).max()
    np.testing.assert_allclose(np.take_along_axis(ref, p, axis=1), top_ref, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(s), top_ref, rtol=0, atol=1e-5 * scale)
    gaps = -np.diff(np.take_along_axis(ref, np.argsort(-ref, axis=1)[:, : k + 1], axis=1), axis=1)
    clear = gaps.min(axis=1) > 1e-5 * scale
    assert clear.mean() > 0.5  # the exact comparison below covers most rows
    np.testing.assert_array_equal(p[clear], order[clear])
    assert not np.any(np.asarray(p) == np.arange(x.shape[0])[:, None])  # never itself


def test_knn_excludes_by_index_not_position_and_respects_mask():
    rng = np.random.default_rng(1)
    x, _ = _clustered(rng, 40, 6, 3)
    perm = rng.permutation(40)
    # Queries are the same samples in another order: the self-match sits at a different position.
    _, p = retrieval.knn(x[perm], x, 3, query_index=perm, gallery_index=np.arange(40), gallery_block=16)
    assert not np.any(np.asarray(p) == perm[:, None])
    mask = np.arange(40) % 2 == 0
    _, p = retrieval.knn(x, x, 25, gallery_mask=mask, gallery_block=16)
    p = np.asarray(p)
    assert np.all(p[:, -5:] == -1)  # at most 20 eligible items (19 for the even rows)
    assert np.all((p == -1) | (p % 2 == 0))


def _reference_metrics(q, ql, qi, g, gl, gi, metric, ks):
    s = _scores64(q, g, metric)
    hits = np.zeros(len(ks))
    aps, mapr, sk_aps = [], [], []
    counted = 0
    for a in range(q.shape[0]):
        keep = gi != qi[a]
        row, rel = s[a, keep], gl[keep] == ql[a]
        r = rel.sum()
        if r == 0:
            continue
        counted += 1
        order = np.argsort(-row, kind="stable")
        rel_sorted = rel[order]
        prec = np.cumsum(rel_sorted) / np.arange(1, rel.size + 1)
        aps.append((prec * rel_sorted).sum() / r)
        mapr.append((prec[:r] * rel_sorted[:r]).sum() / r)
        sk_aps.append(average_precision_score(rel, row))
        for t, k in enumerate(ks):
            hits[t] += rel_sorted[:k].any()
    return hits / counted, np.mean(aps), np.mean(mapr), np.mean(sk_aps), counted


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_leave_one_out_matches_numpy_and_sklearn(metric):
    rng = np.random.default_rng(2)
    x, labels = _clustered(rng, 150, 8, 6, spread=2.0)
    labels[0] = 99  # a query with no relevant item: counted as a query, left out of the averages
    got = retrieval.leave_one_out(x, labels, x, labels, metric=metric, ks=(1, 5), query_block=32)
    recall, m_ap, map_r, sk_map, counted = _reference_metrics(x, labels, np.arange(150), x, labels, np.arange(150),
                                                             metric, (1, 5))
    assert int(got["queries"]) == 150 and int(got["with_relevant"]) == counted == 149
    # Counts are exact; the averages are float32 sums of ≤150 terms in [0, 1]: 1e-5 is ~100 ulps.
    np.testing.assert_allclose([float(got["recall_at_1"]), float(got["recall_at_5"])], recall, atol=1e-6)
    assert float(got["map"]) == pytest.approx(m_ap, abs=1e-5)
    assert float(got["map"]) == pytest.approx(sk_map, abs=1e-5)  # no ties in continuous scores
    assert float(got["map_at_r"]) == pytest.approx(map_r, abs=1e-5)
    assert 0.2 < float(got["map"]) < 0.95  # overlapping clusters: neither chance nor perfect


def test_cross_gallery_queries_remove_self_by_index():
    rng = np.random.default_rng(3)
    x, labels = _clustered(rng, 120, 8, 4)
    y = x @ rng.standard_normal((8, 8)).astype(np.float32)  # "another model's" embedding of the same samples
    perm = rng.permutation(120)
    got = retrieval.leave_one_out(x[perm], labels[perm], y, labels, metric="l2", query_index=perm, ks=(1, 3))
    recall, m_ap, map_r, _, _ = _reference_metrics(x[perm], labels[perm], perm, y, labels, np.arange(120), "l2", (1, 3))
    np.testing.assert_allclose([float(got["recall_at_1"]), float(got["recall_at_3"])], recall, atol=1e-6)
    assert float(got["map"]) == pytest.approx(m_ap, abs=1e-5)
    assert float(got["map_at_r"]) == pytest.approx(map_r, abs=1e-5)


def test_perfect_and_merge():
    labels = np.repeat(np.arange(4), 5)
    x = np.eye(4, dtype=np.float32)[labels] + 0.01 * np.arange(20, dtype=np.float32)[:, None]
    got = retrieval.leave_one_out(x, labels, x, labels)
    assert float(got["recall_at_1"]) == 1.0 and float(got["map"]) == pytest.approx(1.0)
    a = retrieval.init((1,))
    with pytest.raises(ValueError, match="ks"):
        retrieval.merge(a, retrieval.init((1, 5)))
    with pytest.raises(ValueError, match="unknown metric"):
        retrieval.knn(x, x, 1, "dot")
