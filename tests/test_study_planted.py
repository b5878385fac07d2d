"""The affine-equivalence study end to end with a planted answer: every number of its tables is known in
advance, so a swapped, transposed or otherwise wrong map fails the test.

Three toy backbones see the same 16 pixels. A's features are an affine image of the pixels (width 8),
B's an invertible, non-symmetric affine image of A's (width 8: the same width, so a swapped or
transposed map still has the right shape), C's a full-rank affine image of A's into width 11. Their
heads (7 classes) are built so all three produce the same logits, and the labels are those logits'
argmax. So, for every ordered pair:

- affine maps recover the planted relation: accuracy, top-5 and agreement 1, R² 1;
- logit maps reproduce the logits exactly (every kernel has full column rank), so accuracy 1, and their
  R² is that of projecting the target's features onto its head's column space, computed here;
- naive maps (truncate / zero-pad) give accuracies and R² computed here from their definition.

The expected values are computed in float64 NumPy from the family definitions (least squares by
`numpy.linalg.lstsq`), independently of embjax. Images whose float64 logits under any family have a
rank-1/2 or rank-5/6 gap below 1e-2 are left out of the data, so float32 rounding cannot flip a count
and the counts must match exactly.
"""
import numpy as np
import pytest

from embjax import data, extract
from experiments import affine_equivalence as study
from experiments.configs import affine_equivalence as configs

CLASSES = 7
DIMS = {"a": 8, "b": 8, "c": 11}
NAMES = list(DIMS)
GAP = 1e-2  # logits are O(10); float32 rounding through a map moves them by ~1e-4 at most


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    q1, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    q2, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    m = f32(q1 @ np.diag(np.linspace(0.7, 2.0, 8)) @ q2)  # condition number 2.9, not symmetric
    assert np.linalg.cond(m.astype(np.float64)) < 3 and np.abs(m - m.T).max() > 0.5
    c_b = f32(rng.standard_normal(8))
    n = f32(rng.standard_normal((8, 11)))
    c_c = f32(rng.standard_normal(11))
    w_a, b_a = f32(2 * rng.standard_normal((8, CLASSES))), f32(rng.standard_normal(CLASSES))
    m64, n64, w64 = (x.astype(np.float64) for x in (m, n, w_a))
    w_b = f32(np.linalg.solve(m64, w64))  # x_b W_b = x_a m m⁻¹ W_a
    w_c = f32(np.linalg.pinv(n64) @ w64)  # n n⁺ = I (full row rank)
    heads = {"a": (w_a, b_a),
             "b": (w_b, f32(b_a - c_b.astype(np.float64) @ w_b)),
             "c": (w_c, f32(b_a - c_c.astype(np.float64) @ w_c))}
    variables = {"a": {}, "b": {"m": m, "c": c_b}, "c": {"m": n, "c": c_c}}
    return variables, heads


def _features_np(images, variables):
    """float64 features of the three toy models (the float32 parameters, exactly as the models hold them)."""
    x_a = 2.0 * images.reshape(len(images), -1)[:, :8].astype(np.float64) / 255.0 - 1.0
    out = {"a": x_a}
    for k in ("b", "c"):
        out[k] = x_a @ variables[k]["m"].astype(np.float64) + variables[k]["c"].astype(np.float64)
    return out


def _members(variables, heads):
    import jax.numpy as jnp

    def make(name):
        def apply(v, images):
            x = 2.0 * images.reshape(images.shape[0], -1)[:, :8].astype(jnp.float32) / 255.0 - 1.0
            if name != "a":
                x = jnp.matmul(x, v["m"], precision="highest") + v["c"]
            kernel, bias = heads[name]
            return {"pre_logits": x, "logits": jnp.matmul(x, kernel, precision="highest") + bias}

        return extract.Member(name=name, apply=apply, variables=variables[name], feature_dim=DIMS[name],
                              head=heads[name])

    return [make(n) for n in NAMES]


def _logits(x, head):
    return x @ head[0].astype(np.float64) + head[1].astype(np.float64)


def _naive(x, d):
    return x[:, :d] if x.shape[1] >= d else np.pad(x, ((0, 0), (0, d - x.shape[1])))


def _logit_map(x_s, head_s, head_t):
    k_t = head_t[0].astype(np.float64)
    return (_logits(x_s, head_s) - head_t[1].astype(np.float64)) @ np.linalg.pinv(k_t)


def _clear(z):
    """Rows whose rank-1/2 and rank-5/6 logit gaps both exceed GAP."""
    s = np.sort(z, axis=1)[:, ::-1]
    return (s[:, 0] - s[:, 1] > GAP) & (s[:, 4] - s[:, 5] > GAP)


def _mapped(family, feats, heads, s, t, affine=None):
    if s == t:
        return feats[t]
    if family == "naive":
        return _naive(feats[s], DIMS[t])
    if family == "logit":
        return _logit_map(feats[s], heads[s], heads[t])
    w, b = affine[(s, t)]
    return feats[s] @ w + b


def _images(variables, heads, count, seed):
    """`count` random 4x4 images on which no family's logits come near a tie, and their labels."""
    rng = np.random.default_rng(seed)
    candidates = rng.integers(0, 256, (6 * count, 4, 4, 1), dtype=np.uint8)
    feats = _features_np(candidates, variables)
    keep = np.ones(len(candidates), bool)
    for s in NAMES:
        for t in NAMES:
            for family in ("naive", "logit"):
                keep &= _clear(_logits(_mapped(family, feats, heads, s, t), heads[t]))
    images = candidates[keep][:count]
    assert len(images) == count
    return images, _logits(_features_np(images, variables)["a"], heads["a"]).argmax(1)


def _expected(variables, heads, fit_images, eval_images, labels):
    fit = _features_np(fit_images, variables)
    ev = _features_np(eval_images, variables)
    affine = {}
    for s in NAMES:  # float64 least squares with an intercept on the fit split
        for t in NAMES:
            if s != t:
                coef = np.linalg.lstsq(np.c_[fit[s], np.ones(len(fit[s]))], fit[t], rcond=None)[0]
                affine[(s, t)] = (coef[:-1], coef[-1])
    out = {}
    for family in ("affine", "logit", "naive"):
        table = {k: np.zeros((3, 3)) for k in ("accuracy", "top5", "agreement", "r2")}
        for i, s in enumerate(NAMES):
            for j, t in enumerate(NAMES):
                y = _mapped(family, ev, heads, s, t, affine)
                z = _logits(y, heads[t])
                own = _logits(ev[t], heads[t]).argmax(1)
                table["accuracy"][i, j] = np.mean(z.argmax(1) == labels)
                table["top5"][i, j] = np.mean(np.any(np.argsort(-z, 1)[:, :5] == labels[:, None], 1))
                table["agreement"][i, j] = np.mean(z.argmax(1) == own)
                table["r2"][i, j] = 1 - np.sum((y - ev[t]) ** 2) / np.sum((ev[t] - ev[t].mean(0)) ** 2)
                if family == "affine":  # the planted relation, sanity-checked in float64
                    assert table["r2"][i, j] > 1 - 1e-9
        out[family] = table
    return out


def check(results, expected):
    """Counts exactly (no near-ties by construction); R² within 1e-4: the float32 sums of squared
    residuals and spreads over 256 x 11 values carry ~1e-6 relative error, and a float32 affine fit of
    an exact relation with condition number ~3 leaves residuals ~1e-5 of the spread."""
    n_eval = results["num_eval"]
    for family, table in expected.items():
        for key in ("accuracy", "top5", "agreement"):
            got = np.rint(np.asarray(results[family][key]) * n_eval)
            np.testing.assert_array_equal(got, np.rint(table[key] * n_eval), err_msg=f"{family} {key}")
        np.testing.assert_allclose(results[family]["r2"], table["r2"], rtol=0, atol=1e-4,
                                   err_msg=f"{family} r2")
    np.testing.assert_allclose(results["fit_statistics"]["r2"], np.ones((3, 3)), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def planted():
    variables, heads = _planted()
    fit_images, fit_labels = _images(variables, heads, 512, seed=1)
    eval_images, eval_labels = _images(variables, heads, 256, seed=2)
    expected = _expected(variables, heads, fit_images, eval_images, eval_labels)
    # The planted tables are not trivial: naive maps lose accuracy and R² off the diagonal, logit maps
    # keep accuracy but not R² (the head's column space drops a direction of each 8-wide space).
    assert expected["naive"]["accuracy"][0, 1] < 0.9 and expected["naive"]["r2"][1, 0] < 0.5
    assert expected["logit"]["r2"][0, 1] < 0.99 and (expected["logit"]["accuracy"] == 1).all()
    return variables, heads, (fit_images, fit_labels), (eval_images, eval_labels), expected


def _run(planted, tmp_path, monkeypatch, corrupt=None):
    from embjax import maps, members

    variables, heads, fit, ev, _ = planted
    monkeypatch.setattr(members, "load", lambda *a, **k: _members(variables, heads))
    monkeypatch.setattr(study, "sources", lambda config: (data.ArraySource(*fit, name="planted-fit"),
                                                          data.ArraySource(*ev, name="planted-eval")))
    if corrupt is not None:
        real = maps.affine_all
        monkeypatch.setattr(maps, "affine_all", lambda *a, **k: corrupt(real(*a, **k)))
    config = configs.get_config("zoo")
    config.models, config.weights, config.num_classes = ",".join(NAMES), "random", CLASSES
    config.fit_split, config.eval_split = "planted-fit", "planted-eval"
    config.batch_size, config.checkpoint_every, config.progress_seconds = 64, 0, 1e9
    results, _ = study.run(config, str(tmp_path / "state"))
    assert results["models"] == NAMES and results["num_fit"] == 512 and results["num_eval"] == 256
    return results


def test_every_number_of_the_study_is_the_planted_one(planted, tmp_path, monkeypatch):
    check(_run(planted, tmp_path, monkeypatch), planted[-1])


def _swap(fitted):
    fitted = dict(fitted)
    fitted[(0, 1)], fitted[(1, 0)] = fitted[(1, 0)], fitted[(0, 1)]
    return fitted


def _transpose(fitted):
    fitted = dict(fitted)
    w, b = fitted[(0, 1)]
    fitted[(0, 1)] = (w.T, b)
    return fitted


@pytest.mark.parametrize("corrupt", [_swap, pytest.param(_transpose, marks=pytest.mark.slow)],  # one study run
                         ids=["swapped", "transposed"])                                        # each (~4 CPU s)
def test_a_wrong_map_of_the_right_shape_fails_the_check(planted, tmp_path, monkeypatch, corrupt):
    results = _run(planted, tmp_path, monkeypatch, corrupt)
    with pytest.raises(AssertionError, match="affine"):
        check(results, planted[-1])
