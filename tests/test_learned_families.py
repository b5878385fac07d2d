"""Learned maps as map families: the MLP form of embjax.evaluate against float64 NumPy, and
learned_maps.fit_pairs on planted features whose heads a learned map can serve better than the closed form."""

import numpy as np
import pytest

from embjax import evaluate, learned_maps, maps, stats

DIMS = (3, 5, 4)
CLASSES = 4


def _mlp_params(rng, hidden=6):
    return {(s, t): (rng.standard_normal((DIMS[s], DIMS[t])), rng.standard_normal(DIMS[t]),
                     rng.standard_normal((DIMS[s], hidden)), rng.standard_normal(hidden),
                     rng.standard_normal((hidden, DIMS[t])))
            for s in range(len(DIMS)) for t in range(len(DIMS)) if s != t}


def test_mlp_maps_against_numpy():
    rng = np.random.default_rng(0)
    n = 37
    feats = [rng.standard_normal((n, d)) for d in DIMS]
    heads = [(rng.standard_normal((d, CLASSES)), rng.standard_normal(CLASSES)) for d in DIMS]
    labels = rng.integers(0, CLASSES, n)
    params = _mlp_params(rng)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    state = evaluate.update(evaluate.init(DIMS), [f32(f) for f in feats], [(f32(k), f32(c)) for k, c in heads],
                            evaluate.mlp_maps({k: tuple(f32(a) for a in v) for k, v in params.items()}, DIMS),
                            labels)
    top1 = np.zeros((3, 3))
    agree = np.zeros((3, 3))
    sse = np.zeros((3, 3))
    for s in range(3):
        for t in range(3):
            if s == t:
                y = feats[s]
            else:
                w, b, w1, b1, w2 = params[(s, t)]
                y = feats[s] @ w + b + np.maximum(feats[s] @ w1 + b1, 0) @ w2
            logits = y @ heads[t][0] + heads[t][1]
            own = (feats[t] @ heads[t][0] + heads[t][1]).argmax(1)
            top1[s, t] = np.sum(logits.argmax(1) == labels)
            agree[s, t] = np.sum(logits.argmax(1) == own)
            sse[s, t] = np.sum((y - feats[t]) ** 2)
    np.testing.assert_array_equal(np.asarray(state.top1), top1)
    np.testing.assert_array_equal(np.asarray(state.agreement), agree)
    # sse is a float32 sum of n * d squares of values of size ~10: relative rounding ~ n * 2^-24 per term.
    np.testing.assert_allclose(np.asarray(state.sse), sse, rtol=1e-5)


def test_mlp_with_zero_second_layer_is_its_affine_part():
    rng = np.random.default_rng(1)
    params = {k: (*v[:4], np.zeros_like(v[4])) for k, v in _mlp_params(rng).items()}
    params = {k: tuple(np.asarray(a, np.float32) for a in v) for k, v in params.items()}
    feats = [rng.standard_normal((20, d)).astype(np.float32) for d in DIMS]
    heads = [(rng.standard_normal((d, CLASSES)).astype(np.float32), np.zeros(CLASSES, np.float32)) for d in DIMS]
    labels = rng.integers(0, CLASSES, 20)
    a = evaluate.update(evaluate.init(DIMS), feats, heads, evaluate.mlp_maps(params, DIMS), labels)
    b = evaluate.update(evaluate.init(DIMS), feats, heads, {k: v[:2] for k, v in params.items()}, labels)
    for key in ("top1", "top5", "agreement"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    np.testing.assert_array_equal(a.sse, b.sse)


def test_fit_pairs_task_loss_serves_the_target_head():
    """Planted: model 1's features are model 0's through a nonlinearity (a fold y = |x| on one axis), and
    model 1's head reads the class from that folded axis. The closed-form affine map from 0 to 1 cannot
    fold, so the target head on mapped features is near chance on that class boundary; the MLP trained
    through the head's cross-entropy must beat it clearly. The linear learned map cannot fold either, but
    it minimizes the head's cross-entropy where the closed form minimizes feature error: its held-out
    cross-entropy must be below the closed form's."""
    rng = np.random.default_rng(2)
    n = 4000
    x0 = rng.standard_normal((n, 2)).astype(np.float32)
    x1 = np.stack([np.abs(x0[:, 0]), x0[:, 1]], 1).astype(np.float32)
    labels = (x1[:, 0] > 0.6745).astype(np.int32)  # median of |N(0,1)|: two balanced classes
    head1 = (np.array([[-8.0, 8.0], [0.0, 0.0]], np.float32), np.array([8 * 0.6745, -8 * 0.6745], np.float32))
    head0 = (np.zeros((2, 2), np.float32), np.zeros(2, np.float32))
    state = stats.update(stats.init([2, 2]), [x0, x1])
    affine = {(0, 1): maps.affine(state, 0, 1), (1, 0): maps.affine(state, 1, 0)}
    feats, heads = [x0, x1], [head0, head1]
    train, test = slice(0, 3000), slice(3000, None)

    def cross_entropy(w, b):
        logits = (x0[test] @ np.asarray(w) + np.asarray(b)) @ head1[0] + head1[1]
        logits = logits - logits.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(logits)), labels[test]]))

    def accuracy(family_maps):
        ev = evaluate.update(evaluate.init([2, 2]), [f[test] for f in feats], heads, family_maps, labels[test])
        return float(evaluate.compute(ev)["accuracy"][0, 1])

    closed = accuracy(affine)
    mlp, info = learned_maps.fit_pairs([f[train] for f in feats], labels[train], heads, affine, "learned_mlp",
                                       hidden=32, epochs=10, batch_size=100, learning_rate=3e-2)
    linear, _ = learned_maps.fit_pairs([f[train] for f in feats], labels[train], heads, affine, "learned",
                                       epochs=10, batch_size=100, learning_rate=3e-2)
    learned_mlp = accuracy(evaluate.mlp_maps({k: (*learned_maps.as_affine(p), p["w1"], p["b1"], p["w2"])
                                              for k, p in mlp.items()}, [2, 2]))
    assert info["seconds"] > 0 and set(info["loss"]) == {(0, 1), (1, 0)}
    assert closed < 0.75, closed  # an affine map of x0 cannot separate |x0| > 0.67 from the rest
    assert learned_mlp > closed + 0.15, (learned_mlp, closed)
    learned, closed_ce = cross_entropy(*learned_maps.as_affine(linear[(0, 1)])), cross_entropy(*affine[(0, 1)])
    assert learned < closed_ce - 0.05, (learned, closed_ce)


@pytest.mark.slow  # six compilations (~10 CPU s); test_fit_pairs_task_loss_serves_the_target_head runs fit_pairs everyday
@pytest.mark.parametrize("family", ["learned", "learned_mlp"])
def test_fit_pairs_is_fit_per_pair_despite_the_padding(family):
    """All pairs train at once, zero-padded to the widest pair (dims 3 and 5, so 3 -> 5 is padded on its
    input side and 5 -> 3 on its output side): each pair's result must be `fit`'s on its own, unpadded,
    data. Different matmul shapes round differently in float32 (relative ~1e-7 per step); AdamW's update
    m / sqrt(v) is a ratio of those, so after 12 steps the parameters agree to ~1e-5 relative."""
    import jax

    rng = np.random.default_rng(3)
    feats = [rng.standard_normal((240, 3)).astype(np.float32), rng.standard_normal((240, 5)).astype(np.float32)]
    feats[1] += feats[0] @ rng.standard_normal((3, 5)).astype(np.float32)
    state = stats.update(stats.init([3, 5]), feats)
    affine = {(0, 1): maps.affine(state, 0, 1), (1, 0): maps.affine(state, 1, 0)}
    got, _ = learned_maps.fit_pairs(feats, None, None, affine, family, loss="regression", hidden=4, rank=2,
                                    epochs=3, batch_size=60, learning_rate=1e-2, seed=5)
    for s, t in ((0, 1), (1, 0)):
        w, b = affine[(s, t)]
        init = (learned_maps.init_linear(w, b, 2) if family == "learned" else
                learned_maps.init_mlp(w, b, 4, jax.random.fold_in(jax.random.key(5), s * 2 + t), 2))
        want, _ = learned_maps.fit(init, feats[s], feats[t], epochs=3, batch_size=60, learning_rate=1e-2, seed=5)
        assert set(got[(s, t)]) == set(want)
        for k in want:
            assert got[(s, t)][k].shape == want[k].shape, (family, s, t, k)
            np.testing.assert_allclose(got[(s, t)][k], np.asarray(want[k]), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{family} {s}->{t} {k}")
