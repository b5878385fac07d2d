"""embjax.svm against scikit-learn's LinearSVC (test-only) and float64 NumPy; sharded over 4 fake devices."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import study_runner as runner
from embjax import svm

sklearn_svm = pytest.importorskip("sklearn.svm")


def _problem(rng, n, d, k, noise=1.5, discrete=False, centres_seed=0):
    """Gaussian classes around random centres; overlapping, so the optimum has active hinge terms."""
    centres = np.random.default_rng(centres_seed).standard_normal((k, d))
    y = rng.integers(0, k, n)
    x = centres[y] + noise * rng.standard_normal((n, d))
    if discrete:  # full-network-embedding-like int8 features
        return np.where(x > 0.15, 1, np.where(x < -0.25, -1, 0)).astype(np.int8), y
    return x.astype(np.float32), y


def _objective64(w, b, x, y, C):
    signs = 2.0 * np.eye(w.shape[1])[y] - 1.0
    margin = np.maximum(0.0, 1.0 - signs * (x.astype(np.float64) @ w + b))
    return 0.5 * (np.sum(w**2) + np.sum(b**2)) + C * np.sum(margin**2)


@pytest.mark.parametrize("solver", ["dual_cd", "lbfgs"])
@pytest.mark.parametrize("n, d, k, C, discrete", [
    (300, 20, 4, 1.0, False),
    (300, 20, 4, 0.01, False),
    (400, 300, 5, 1.0, True),  # D ≈ n, int8 features in {-1, 0, 1}: separable, tiny objective
])
def test_matches_sklearn_linear_svc(n, d, k, C, discrete, solver):
    rng = np.random.default_rng(n + d + k)
    x, y = _problem(rng, n, d, k, discrete=discrete)
    x_test, y_test = _problem(np.random.default_rng(99), 500, d, k, discrete=discrete)
    tol = 1e-5
    model = svm.fit(x, y, k, C=C, tol=tol, solver=solver, max_iter=5000)
    assert model.converged and model.gap <= tol and model.solver == solver
    assert model.weights.shape == (d, k) and model.bias.shape == (k,)
    ref = sklearn_svm.LinearSVC(C=C, tol=1e-10, max_iter=200_000).fit(x.astype(np.float64), y)
    w_ref, b_ref = ref.coef_.T, ref.intercept_

    f_ours = _objective64(model.weights.astype(np.float64), model.bias.astype(np.float64), x, y, C)
    f_ref = _objective64(w_ref, b_ref, x, y, C)
    # The duality gap certifies f_ours − f* ≤ gap·f_ours. Both sides are float32 sums of ≤ n·k terms,
    # evaluated here in float64 from float32 weights: 1e-5 relative covers their rounding.
    slack = 1e-5 * f_ref
    assert f_ours - f_ref <= model.gap * f_ours + slack
    assert f_ref - f_ours <= slack  # liblinear (tol 1e-10, float64) is at the optimum
    # Strong convexity (the ½‖θ‖² term alone has modulus 1): ½‖θ − θ*‖² ≤ f(θ) − f*.
    theta_diff = np.sqrt(np.sum((model.weights - w_ref) ** 2) + np.sum((model.bias - b_ref) ** 2))
    assert theta_diff <= np.sqrt(2 * (model.gap * f_ours + slack))
    assert abs(model.objective - f_ours) <= 1e-4 * f_ours  # the reported (float32) objective
    # Same decisions, hence same accuracy, except for points whose OvR argmax is a near tie.
    ours, theirs = svm.predict(model, x_test), ref.predict(x_test.astype(np.float64))
    top2 = np.sort(np.asarray(svm.scores(model, x_test)), axis=1)[:, -2:]
    row_norm = np.sqrt(np.sum(x_test.astype(np.float64) ** 2, axis=1) + 1.0)
    tie = (top2[:, 1] - top2[:, 0]) < 2 * theta_diff * row_norm  # |Δscore| ≤ ‖Δθ‖ ‖(x, 1)‖ per class
    assert np.array_equal(ours[~tie], theirs[~tie])
    assert abs(svm.accuracy(model, x_test, y_test) - ref.score(x_test.astype(np.float64), y_test)) <= tie.mean()
    assert svm.accuracy(model, x_test, y_test) > 1.5 / k  # the classes are learnable


def test_duality_gap_bounds_the_suboptimality_anywhere():
    # Weak duality: primal − gap is a dual value, never above the optimum, at any parameters.
    rng = np.random.default_rng(4)
    x, y = _problem(rng, 200, 15, 3)
    ref = sklearn_svm.LinearSVC(C=1.0, tol=1e-10, max_iter=200_000).fit(x.astype(np.float64), y)
    f_star = _objective64(ref.coef_.T, ref.intercept_, x, y, 1.0)
    signs = 2.0 * np.eye(3)[y] - 1.0
    for scale in (0.0, 0.1, 1.0):
        params = {"w": scale * rng.standard_normal((15, 3)).astype(np.float32),
                  "b": scale * rng.standard_normal(3).astype(np.float32)}
        primal, gap = (float(v) for v in svm._gap(params, x, signs.astype(np.float32), np.ones(200, np.float32), 1.0))
        assert primal - gap <= f_star * (1 + 1e-5) and primal >= f_star * (1 - 1e-5)


def test_zero_weight_rows_are_padding():
    rng = np.random.default_rng(5)
    x, y = _problem(rng, 200, 10, 3)
    junk_x, junk_y = 100 * rng.standard_normal((56, 10)).astype(np.float32), rng.integers(0, 3, 56)
    plain = svm.fit(x, y, 3, tol=1e-6)
    padded = svm.fit(np.concatenate([x, junk_x]), np.concatenate([y, junk_y]), 3, tol=1e-6,
                     sample_weight=np.r_[np.ones(200), np.zeros(56)])
    # Both within sqrt(2 gap f) of the same optimum (strong convexity, see above); gap ≤ 1e-6 f.
    radius = np.sqrt(2 * 1e-6 * plain.objective)
    np.testing.assert_allclose(padded.weights, plain.weights, atol=2 * radius + 1e-5)
    assert abs(padded.objective - plain.objective) <= 2e-6 * plain.objective + 1e-5


def test_errors_and_l2_normalize():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="C must be positive"):
        svm.fit(x, np.zeros(4, int), 2, C=0.0)
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        svm.fit(x, np.zeros(3, int), 2)
    with pytest.raises(ValueError, match="solver"):
        svm.fit(x, np.zeros(4, int), 2, solver="sgd")
    z = np.asarray(svm.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])))
    np.testing.assert_allclose(z, [[0.6, 0.8], [0.0, 0.0]])


_SHARDED = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    jax.config.update("jax_default_matmul_precision", "highest")
    from embjax import svm

    assert jax.device_count() == 4
    data = np.load(sys.argv[1])
    x, y, s = data["x"], data["y"], data["s"]
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rows = NamedSharding(mesh, P("batch"))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch", None)))
    assert len(xs.sharding.device_set) == 4
    model = svm.fit(xs, jax.device_put(y, rows), 3, sample_weight=jax.device_put(s, rows), tol=1e-6,
                    solver="lbfgs", max_iter=5000)
    np.savez(sys.argv[2], w=model.weights, b=model.bias, converged=model.converged)
    """
)


@pytest.mark.highest_precision  # the in-process fit matches the child script's precision
@pytest.mark.slow  # a child process with 4 fake devices: the whole tier
def test_sharded_over_four_devices_matches_one(tmp_path):
    rng = np.random.default_rng(7)
    x, y = _problem(rng, 250, 12, 3)
    # 250 rows padded to 256 = 4 x 64 with zero-weight rows, as a study pads to the device count.
    xp = np.concatenate([x, np.zeros((6, 12), np.float32)])
    yp, s = np.r_[y, np.zeros(6, int)], np.r_[np.ones(250), np.zeros(6)]
    np.savez(tmp_path / "in.npz", x=xp, y=yp, s=s)
    env = runner.env(devices=4)
    subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True, env=env, timeout=300)
    out = np.load(tmp_path / "out.npz")
    one = svm.fit(x, y, 3, tol=1e-6, solver="lbfgs", max_iter=5000)
    assert bool(out["converged"])
    radius = np.sqrt(2 * 1e-6 * one.objective)  # both within sqrt(2 gap f) of θ* (strong convexity)
    np.testing.assert_allclose(out["w"], one.weights, atol=2 * radius + 1e-5)
    np.testing.assert_allclose(out["b"], one.bias, atol=2 * radius + 1e-5)
