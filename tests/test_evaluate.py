"""embjax.evaluate against a float64 NumPy loop over pairs: counts, agreement, R², masks, merges."""

import jax
import numpy as np
import pytest

from embjax import evaluate, head_maps

DIMS = (6, 9, 7)
CLASSES = 6
# Float32 logits here are sums of ≤ 9 products of a map (|W| ≲ 1) and ≤ 9 of a head, on values of
# size ~3: the worst-case rounding bound d·eps·Σ|terms| is about 9·1.2e-7·(9·3·3)·2 ≈ 1.6e-4 per logit.
# Samples whose float64 rank-1/2 or rank-5/6 gap is below TIE = 1e-3 (6× that) are masked out, so the
# float32 counts must equal the float64 counts exactly on the rest.
TIE = 1e-3


def _problem(rng, n):
    feats = [rng.standard_normal((n, d)).astype(np.float32) * 1.5 + 0.5 for d in DIMS]
    heads = [
        (rng.standard_normal((d, CLASSES)).astype(np.float32), rng.standard_normal(CLASSES).astype(np.float32))
        for d in DIMS
    ]
    fitted = {
        (s, t): (
            (rng.standard_normal((DIMS[s], DIMS[t])) / np.sqrt(DIMS[s])).astype(np.float32),
            rng.standard_normal(DIMS[t]).astype(np.float32),
        )
        for s in range(3)
        for t in range(3)
        if s != t
    }
    labels = rng.integers(0, CLASSES, n)
    return feats, heads, fitted, labels


def _mapped(feats, fitted, s, t):
    x = feats[s].astype(np.float64)
    if s == t:
        return x
    w, b = fitted[(s, t)]
    return x @ np.asarray(w, np.float64) + np.asarray(b, np.float64)


def _logits(y, head):
    return y @ np.asarray(head[0], np.float64) + np.asarray(head[1], np.float64)


def _clear_of_ties(feats, heads, fitted):
    """Rows where every pair's float64 logits have rank-1/2 and rank-5/6 gaps above TIE."""
    ok = np.ones(feats[0].shape[0], bool)
    for s in range(3):
        for t in range(3):
            z = np.sort(_logits(_mapped(feats, fitted, s, t), heads[t]), axis=1)[:, ::-1]
            ok &= z[:, 0] - z[:, 1] > TIE
            if CLASSES > 5:
                ok &= z[:, 4] - z[:, 5] > TIE
    return ok


def _reference(feats, heads, fitted, labels, keep):
    n = len(DIMS)
    top1 = np.zeros((n, n), int)
    top5 = np.zeros((n, n), int)
    agree = np.zeros((n, n), int)
    sse = np.zeros((n, n))
    for s in range(n):
        for t in range(n):
            y = _mapped(feats, fitted, s, t)[keep]
            z = _logits(y, heads[t])
            own = _logits(feats[t].astype(np.float64)[keep], heads[t]).argmax(1)
            lab = labels[keep]
            top1[s, t] = np.sum(z.argmax(1) == lab)
            top5[s, t] = np.sum(np.any(np.argsort(-z, axis=1)[:, :5] == lab[:, None], axis=1))
            agree[s, t] = np.sum(z.argmax(1) == own)
            sse[s, t] = np.sum((y - feats[t].astype(np.float64)[keep]) ** 2)
    sst = np.array([np.sum((f[keep] - f[keep].mean(0)) ** 2) for f in (f.astype(np.float64) for f in feats)])
    return top1, top5, agree, sse, sst


_step = jax.jit(evaluate.update)  # one wrapper, so tests with equal shapes share compilations


def _run(feats, heads, fitted, labels, keep, batch):
    state = evaluate.init(DIMS)
    n = len(labels)
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        state = _step(state, [f[sl] for f in feats], heads, fitted, labels[sl], keep[sl])
    return state


def test_matches_float64_loop_with_masks_and_nan_padding():
    rng = np.random.default_rng(0)
    feats, heads, fitted, labels = _problem(rng, 1000)
    keep = _clear_of_ties(feats, heads, fitted)
    assert keep.mean() > 0.9  # the tie filter removes few rows; the comparison is not vacuous
    keep[::17] = False  # plus masked-out "padding" rows full of NaN
    for f in feats:
        f[::17] = np.nan
    state = _run(feats, heads, fitted, labels, keep, batch=250)
    top1, top5, agree, sse, sst = _reference(feats, heads, fitted, labels, keep)
    assert int(state.count) == keep.sum()
    np.testing.assert_array_equal(state.top1, top1)
    np.testing.assert_array_equal(state.top5, top5)
    np.testing.assert_array_equal(state.agreement, agree)
    # Squared residuals of size ~1–10 summed over ≤ 250·9 float32 terms per batch (√2304·eps = 6e-6
    # relative) then over 4 batches; the mapped features themselves carry ~1e-6 relative error: 1e-5.
    np.testing.assert_allclose(state.sse, sse, rtol=1e-5)
    np.testing.assert_allclose(state.sst, sst, rtol=1e-5)  # same argument, centred on the eval mean
    np.testing.assert_allclose(evaluate.r2(state), 1 - sse / sst[None, :], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.diag(np.asarray(state.sse)), 0.0)  # identity on the diagonal
    np.testing.assert_array_equal(np.diag(np.asarray(evaluate.accuracy(state, "agreement"))), 1.0)
    n = keep.sum()
    np.testing.assert_allclose(evaluate.accuracy(state, "top1"), top1 / n, rtol=1e-6)  # int/int in float32
    np.testing.assert_allclose(evaluate.accuracy(state, "top5"), top5 / n, rtol=1e-6)


def test_logit_maps_keep_source_predictions():
    """Thesis §5.5 end to end: with logit maps, head_dst(map(f_src)) predicts exactly what head_src does."""
    rng = np.random.default_rng(1)
    feats, heads, _, labels = _problem(rng, 500)
    fitted = {(s, t): head_maps.logit(heads[s], heads[t]) for s in range(3) for t in range(3) if s != t}
    keep = _clear_of_ties(feats, heads, fitted)
    assert keep.mean() > 0.9
    state = _run(feats, heads, fitted, labels, keep, batch=250)
    top1 = np.asarray(state.top1)
    top5 = np.asarray(state.top5)
    for s in range(3):
        np.testing.assert_array_equal(top1[s], top1[s, s])
        np.testing.assert_array_equal(top5[s], top5[s, s])
    # Agreement of s→t with t's own predictions equals the agreement of the two unmapped models.
    preds = [_logits(f.astype(np.float64)[keep], h).argmax(1) for f, h in zip(feats, heads)]
    for s in range(3):
        for t in range(3):
            assert int(state.agreement[s, t]) == int(np.sum(preds[s] == preds[t]))


def test_merge_stack_maps_and_empty_batches():
    rng = np.random.default_rng(2)
    feats, heads, fitted, labels = _problem(rng, 400)
    keep = np.ones(400, bool)
    whole = _step(evaluate.init(DIMS), feats, heads, fitted, labels, keep)  # maps as a dict
    stacked = evaluate.stack_maps(fitted, DIMS)  # the pre-stacked form must give the same counts
    halves = [
        _step(evaluate.init(DIMS), [f[sl] for f in feats], heads, stacked, labels[sl], keep[sl])
        for sl in (slice(0, 200), slice(200, 400))
    ]
    merged = evaluate.merge(halves[1], halves[0])
    for name in ("count", "top1", "top5", "agreement"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=name)
    # Different float32 summation order only: 1e-5 as in the reference test.
    np.testing.assert_allclose(merged.sse, whole.sse, rtol=1e-5)
    np.testing.assert_allclose(merged.sst, whole.sst, rtol=1e-5)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=0, atol=1e-5 * 3)  # |mean| ≲ 3
    empty = _step(whole, feats, heads, fitted, labels, np.zeros(400, bool))
    for name in ("count", "top1", "top5", "agreement", "sse", "mean", "sst"):
        np.testing.assert_array_equal(getattr(empty, name), getattr(whole, name), err_msg=name)
    fresh = _step(evaluate.init(DIMS), feats, heads, fitted, labels, np.zeros(400, bool))
    assert np.isnan(np.asarray(evaluate.accuracy(fresh))).all()  # no samples: undefined, not 0


def test_allreduce_under_vmap_named_axis():
    rng = np.random.default_rng(3)
    feats, heads, fitted, labels = _problem(rng, 400)
    keep = np.ones(400, bool)
    keep[300:] = False  # the last 'device' holds only padding
    whole = _step(evaluate.init(DIMS), feats, heads, fitted, labels, keep)

    def per_device(fs, lab, m):
        state = evaluate.update(evaluate.init(DIMS), list(fs), heads, fitted, lab, m)
        return evaluate.allreduce(state, "devices")

    shards = [f.reshape(4, 100, -1) for f in feats]
    out = jax.vmap(per_device, axis_name="devices")(shards, labels.reshape(4, 100), keep.reshape(4, 100))
    for k in range(4):
        np.testing.assert_array_equal(out.top1[k], whole.top1)
        np.testing.assert_array_equal(out.agreement[k], whole.agreement)
        np.testing.assert_allclose(out.sse[k], whole.sse, rtol=1e-5)  # summation order only, as above
        np.testing.assert_allclose(out.sst[k], whole.sst, rtol=1e-5)


def test_relative_change_and_accuracy_arguments():
    acc = np.array([[0.8, 0.6, 0.4], [0.7, 0.5, 0.25], [0.9, 0.45, 0.9]])
    want = np.array([[0.0, -0.25, -0.5], [0.4, 0.0, -0.5], [0.0, -0.5, 0.0]])
    np.testing.assert_allclose(evaluate.relative_change(acc), want, rtol=1e-6)  # float32 division
    with pytest.raises(ValueError, match="square"):
        evaluate.relative_change(np.ones((2, 3)))
    state = evaluate.init(DIMS)
    with pytest.raises(ValueError, match="kind must be one of"):
        evaluate.accuracy(state, "top3")


def test_bad_inputs_are_named():
    rng = np.random.default_rng(4)
    feats, heads, fitted, labels = _problem(rng, 8)
    state = evaluate.init(DIMS)
    partial = {k: v for k, v in fitted.items() if k != (2, 1)}
    with pytest.raises(KeyError, match=r"pair \(2, 1\)"):
        evaluate.update(state, feats, heads, partial, labels)
    bad = dict(fitted)
    bad[(0, 1)] = (np.zeros((6, 8)), np.zeros(8))
    with pytest.raises(ValueError, match=r"map \(0, 1\) has W \(6, 8\)"):
        evaluate.update(state, feats, heads, bad, labels)
    with pytest.raises(ValueError, match="head of model 2 predicts 4 classes"):
        evaluate.update(state, feats, heads[:2] + [(np.zeros((7, 4)), np.zeros(4))], fitted, labels)
    with pytest.raises(ValueError, match="features of model 1"):
        evaluate.update(state, [feats[0], feats[0], feats[2]], heads, fitted, labels)
    with pytest.raises(ValueError, match="labels have shape"):
        evaluate.update(state, feats, heads, fitted, labels[:3])
    # Stacked maps made for other widths, and maps of no known form, are refused by name.
    other = evaluate.stack_maps({(s, t): (np.zeros((DIMS[s] + 1 if s == 0 else DIMS[s], DIMS[t] + (t == 0))),
                                          np.zeros(DIMS[t] + (t == 0)))
                                 for s in range(3) for t in range(3) if s != t},
                                [DIMS[0] + 1, *DIMS[1:]])
    with pytest.raises(ValueError, match="stacked maps have"):
        evaluate.update(state, feats, heads, other, labels)
    with pytest.raises(ValueError, match="not list"):
        evaluate.update(state, feats, heads, [1, 2, 3], labels)


@pytest.mark.parametrize("family", ["naive", "logit"])
def test_structured_families_match_their_dense_maps_in_float64(family):
    """NaiveMaps (no matrices) and LogitMaps (factored through each head's pseudo-inverse) give the
    counts and squared errors of the dense maps they stand for, against the float64 loop."""
    rng = np.random.default_rng(5)
    feats, heads, _, labels = _problem(rng, 600)
    pairs = [(s, t) for s in range(3) for t in range(3) if s != t]
    if family == "naive":
        dense = {(s, t): head_maps.naive(DIMS[s], DIMS[t]) for s, t in pairs}
        structured = evaluate.NaiveMaps()
    else:
        dense = {(s, t): head_maps.logit(heads[s], heads[t]) for s, t in pairs}
        structured = evaluate.logit_maps(heads, [head_maps.head_pinv(h) for h in heads], DIMS)
    dense64 = {k: (np.asarray(w, np.float64), np.asarray(b, np.float64)) for k, (w, b) in dense.items()}
    keep = _clear_of_ties(feats, heads, dense64)
    assert keep.mean() > 0.9
    state = _run(feats, heads, structured, labels, keep, batch=200)
    top1, top5, agree, sse, _ = _reference(feats, heads, dense64, labels, keep)
    np.testing.assert_array_equal(state.top1, top1)
    np.testing.assert_array_equal(state.top5, top5)
    np.testing.assert_array_equal(state.agreement, agree)
    # As in the dense test: float32 residual sums of ≤ 200·9 terms of size ~1–10, 1e-5 relative; the
    # factored logit path adds one more float32 product (classes = 6 terms).
    np.testing.assert_allclose(state.sse, sse, rtol=2e-5)
