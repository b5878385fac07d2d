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


# --------------------------------------------------------------------------------------------------
# The host ranking (counting, no full sort) against independent implementations of the references'
# definitions, on data with exact ties and lone queries


def _tied_set(rng, n, d, classes):
    """Rows with four entries ±0.5 (unit norm exactly) and small-integer copies for l2: every score is
    exact in float32 whatever the summation order, and equal rows / equal distances tie exactly."""
    rows = np.zeros((n, d), np.float32)
    for a in range(n):
        cols = rng.choice(d, 4, replace=False)
        rows[a, cols] = rng.choice([-0.5, 0.5], 4)
    labels = rng.integers(0, classes, n)
    labels[:3] = [100, 101, 102]  # three lone queries
    return rows, labels


def _pml_reference(s, ql, gl, eligible):
    """pytorch-metric-learning's AccuracyCalculator definitions, written out: for each query the
    eligible gallery in a stable descending sort; R = same-label items; lone queries skipped;
    precision_at_1, r_precision, mean_average_precision_at_r; plus CMC hit@k and full-ranking AP."""
    out = {"p1": [], "rp": [], "mapr": [], "ap": [], "hit5": []}
    for a in range(s.shape[0]):
        keep = np.flatnonzero(eligible[a])
        order = keep[np.argsort(-s[a, keep], kind="stable")]
        rel = gl[order] == ql[a]
        r = int(rel.sum())
        if r == 0:
            continue
        prec = np.cumsum(rel) / np.arange(1, rel.size + 1)
        out["p1"].append(float(rel[0]))
        out["rp"].append(rel[:r].sum() / r)
        out["mapr"].append((prec[:r] * rel[:r]).sum() / r)
        out["ap"].append((prec * rel).sum() / r)
        out["hit5"].append(float(rel[:5].any()))
    return {k: np.mean(v) for k, v in out.items()}, len(out["p1"])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_host_ranking_matches_reference_definitions_with_ties(metric):
    rng = np.random.default_rng(11)
    x, labels = _tied_set(rng, 260, 7, 5)
    q = x if metric == "cosine" else (2 * x).astype(np.float32)  # l2 on integers: exact too
    s = _scores64(q, q, metric)
    mask = rng.random(260) > 0.15  # some gallery rows take no part
    eligible = mask[None, :] & ~np.eye(260, dtype=bool)
    ref, counted = _pml_reference(s, labels, labels, eligible)
    assert len(np.unique(s[0])) < 60  # plenty of exact ties
    for backend in ("host", "device"):
        got = retrieval.leave_one_out(q, labels, q, labels, metric=metric, ks=(1, 5), backend=backend,
                                      query_block=37, gallery_mask=mask)
        assert int(got["with_relevant"]) == counted and int(got["queries"]) == 260
        # Exact scores and the same tie rule: only the final float division (and, on the device, a
        # float32 sum of ≤ 260 terms in [0, 1], ~3e-5 at worst) separates them.
        tol = 1e-12 if backend == "host" else 3e-5
        assert float(got["recall_at_1"]) == pytest.approx(ref["p1"], abs=tol)
        assert float(got["recall_at_5"]) == pytest.approx(ref["hit5"], abs=tol)
        assert float(got["r_precision"]) == pytest.approx(ref["rp"], abs=tol)
        assert float(got["map_at_r"]) == pytest.approx(ref["mapr"], abs=tol)
        assert float(got["map"]) == pytest.approx(ref["ap"], abs=tol)


def test_host_ranking_matches_sklearn_ap_without_ties_and_cross_gallery():
    rng = np.random.default_rng(12)
    x, labels = _clustered(rng, 400, 16, 8, spread=2.5)
    labels[5] = 77  # a lone query
    y = x @ rng.standard_normal((16, 16)).astype(np.float32)
    perm = rng.permutation(400)
    got = retrieval.leave_one_out(x[perm], labels[perm], y, labels, query_index=perm, backend="host", ks=(1, 3),
                                  query_block=64)
    recall, m_ap, map_r, sk_map, counted = _reference_metrics(x[perm], labels[perm], perm, y, labels,
                                                             np.arange(400), "cosine", (1, 3))
    assert int(got["with_relevant"]) == counted == 399
    # Float32 scores against float64: neighbours closer than ~1e-7 may swap, nothing else.
    np.testing.assert_allclose([float(got["recall_at_1"]), float(got["recall_at_3"])], recall, atol=1e-9)
    assert float(got["map"]) == pytest.approx(sk_map, abs=1e-6)  # scikit-learn's AP: ml-fct's definition
    assert float(got["map"]) == pytest.approx(m_ap, abs=1e-6)
    assert float(got["map_at_r"]) == pytest.approx(map_r, abs=1e-6)


def test_host_knn_matches_device_with_ties_and_rejects_nan():
    rng = np.random.default_rng(13)
    x, _ = _tied_set(rng, 150, 6, 3)
    mask = rng.random(150) > 0.2
    s_h, p_h = retrieval.knn(x, x, 12, backend="host", query_block=40, gallery_mask=mask)
    s_d, p_d = retrieval.knn(x, x, 12, backend="device", gallery_block=32, gallery_mask=mask)
    np.testing.assert_array_equal(p_h, np.asarray(p_d))  # same tie rule: lower gallery position first
    np.testing.assert_array_equal(s_h, np.asarray(s_d))
    ref = _scores64(x, x, "cosine")
    ref[:, ~mask] = -np.inf
    np.fill_diagonal(ref, -np.inf)
    np.testing.assert_array_equal(p_h, np.argsort(-ref, axis=1, kind="stable")[:, :12])
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        retrieval.leave_one_out(bad, np.zeros(150), x, np.zeros(150), backend="host")
