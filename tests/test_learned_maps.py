"""embjax.learned_maps: planted maps where an MLP must beat the closed form, and where it must not."""

import numpy as np
import pytest

from embjax import learned_maps, maps, stats


def _closed_form(x, y):
    state = stats.update(stats.init([x.shape[1], y.shape[1]]), [x, y])
    return maps.affine(state, 0, 1)


def _data(rng, n, nonlinear):
    x = rng.standard_normal((n, 4)).astype(np.float32)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    clean = np.tanh(2 * x @ a) if nonlinear else x @ a
    return x, (clean + 0.05 * rng.standard_normal((n, 6))).astype(np.float32)


def _mse(params, x, y):
    return float(np.mean(np.sum((np.asarray(learned_maps.apply(params, x)) - y) ** 2, axis=1)))


def test_starts_at_the_closed_form():
    rng = np.random.default_rng(0)
    x, y = _data(rng, 500, nonlinear=True)
    w, b = _closed_form(x, y)
    ref = x @ np.asarray(w) + np.asarray(b)
    import jax
    for params in (learned_maps.init_linear(w, b), learned_maps.init_mlp(w, b, 16, jax.random.key(0))):
        np.testing.assert_allclose(np.asarray(learned_maps.apply(params, x)), ref, rtol=1e-5, atol=1e-5)
    low = learned_maps.init_linear(w, b, rank=2)
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    # The rank-2 factor is W's best rank-2 approximation: its error is the third singular value of W.
    w2 = np.asarray(low["u"]) @ np.asarray(low["v"])
    np.testing.assert_allclose(np.linalg.norm(w2 - np.asarray(w), 2), s[2], rtol=1e-4)


@pytest.mark.parametrize("nonlinear", [True, False])
def test_mlp_beats_the_closed_form_only_on_a_nonlinear_map(nonlinear):
    """Held-out mean squared error. Nonlinear truth y = tanh(2 x A) + noise: an affine map leaves the
    curvature unexplained (a large share of the variance), the MLP removes much of it: we ask for half.
    Linear truth: the closed form is already optimal up to sampling (error ≈ noise 6 · 0.05² = 0.015);
    training from it must not make held-out error better by more than sampling noise (2%), nor worse by
    more than 10%."""
    import jax

    x_all, y_all = _data(np.random.default_rng(1), 6000, nonlinear)  # one truth; 2000 rows held out
    x, y, x_test, y_test = x_all[:4000], y_all[:4000], x_all[4000:], y_all[4000:]
    w, b = _closed_form(x, y)
    closed = _mse(learned_maps.init_linear(w, b), x_test, y_test)
    mlp, info = learned_maps.fit(learned_maps.init_mlp(w, b, 64, jax.random.key(0)), x, y, epochs=40,
                                 batch_size=200, learning_rate=3e-3)
    learned = _mse(mlp, x_test, y_test)
    assert info["loss"][-1] < info["loss"][0]
    if nonlinear:
        assert learned < 0.5 * closed, (learned, closed)
    else:
        assert 0.98 * closed < learned < 1.1 * closed, (learned, closed)


def test_task_loss_through_a_frozen_head():
    import jax

    rng = np.random.default_rng(3)
    x, y = _data(rng, 3000, nonlinear=False)
    kernel = rng.standard_normal((6, 3)).astype(np.float32)
    labels = np.argmax(y @ kernel, axis=1)
    w, b = _closed_form(x, y)
    params, info = learned_maps.fit(learned_maps.init_linear(w, b, rank=3), x, loss="task",
                                    head=(kernel, np.zeros(3, np.float32)), labels=labels, epochs=10,
                                    learning_rate=1e-2)
    acc = np.mean(np.argmax(np.asarray(learned_maps.apply(params, x)) @ kernel, axis=1) == labels)
    assert info["loss"][-1] < info["loss"][0] and acc > 0.9


def test_bad_input():
    w, b = np.zeros((3, 2), np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="rank must be in"):
        learned_maps.init_linear(w, b, rank=3)
    with pytest.raises(ValueError, match="needs target features"):
        learned_maps.fit(learned_maps.init_linear(w, b), np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="loss must be one of"):
        learned_maps.fit(learned_maps.init_linear(w, b), np.zeros((5, 3), np.float32), loss="hinge")
    with pytest.raises(ValueError, match="family must be one of"):
        learned_maps.init("learned_cnn", w, b)
    with pytest.raises(ValueError, match="needs a random key"):
        learned_maps.init("learned_mlp", w, b)


def test_init_is_each_family_from_the_closed_form():
    """`init` (what fit_pairs and embjax.bct start from): the family's own initialiser, the rank clipped to
    the map's width (rank 5 of a 3 x 2 map is full rank 2, factored)."""
    import jax

    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32)
    key = jax.random.key(7)
    cases = [(learned_maps.init("learned", w, b, key=key), learned_maps.init_linear(w, b)),
             (learned_maps.init("learned", w, b, rank=5), learned_maps.init_linear(w, b, 2)),
             (learned_maps.init("learned_mlp", w, b, hidden=4, rank=1, key=key), learned_maps.init_mlp(w, b, 4, key, 1))]
    for got, want in cases:
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
