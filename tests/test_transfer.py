"""embjax.transfer.svm_grid against scikit-learn's LinearSVC trained on each cell's rows alone (no padding),
and its gap sentence."""

import numpy as np
import pytest

from embjax import transfer

sklearn_svm = pytest.importorskip("sklearn.svm")


def _classes(rng, n, d, k):
    centres = 2.0 * np.random.default_rng(7).standard_normal((k, d))
    y = rng.integers(0, k, n)
    return (centres[y] + 1.5 * rng.standard_normal((n, d))).astype(np.float32), y


def test_grid_matches_linear_svc_per_cell(capsys):
    rng = np.random.default_rng(0)
    k, sizes = 3, [40, 150]
    x_train, y_train = _classes(rng, 150, 12, k)
    x_test, y_test = _classes(rng, 400, 12, k)
    # Two embeddings whose widths differ (12 and 6 columns), an int8 one among them: each cell is padded
    # to 150 rows with zero-weight rows, which must not change the model.
    disc = lambda x: np.where(x > 0.15, 1, np.where(x < -0.25, -1, 0)).astype(np.int8)  # noqa: E731
    sets = lambda n: {"raw": (x_train[:n], x_test), "first6_int8": (disc(x_train[:n, :6]), disc(x_test[:, :6]))}  # noqa: E731
    grid = transfer.svm_grid(sets, y_train, y_test, sizes, k, C=1.0, tol=1e-4, max_iter=2000, label="toy")
    assert set(grid) == set(transfer.FIELDS)
    for n in sizes:
        for e, (xt, xs) in sets(n).items():
            ref = sklearn_svm.LinearSVC(C=1.0, loss="squared_hinge", tol=1e-8, max_iter=100_000)
            ref.fit(np.asarray(xt, np.float64), y_train[:n])
            ours = grid["accuracy"][e][str(n)]
            # Both reach the same optimum (relative gap <= 1e-4 here): the decisions differ at most on test
            # points within ~1e-3 of a tie; with 400 Gaussian points that is at most a couple of them.
            assert abs(ours - ref.score(np.asarray(xs, np.float64), y_test)) <= 2 / 400, (e, n)
            assert grid["gap"][e][str(n)] <= 1e-4 and grid["iterations"][e][str(n)] >= 1
    out = capsys.readouterr().out
    assert "[svm] toy raw n=40: accuracy" in out and "[svm] toy first6_int8 n=150" in out


def test_gap_line_names_the_late_ones():
    line = transfer.gap_line({"a n=1": 1e-4, "b n=2": 5e-3}, 1e-3, 7, "dual_cd")
    assert "1 of 2 trained to a relative duality gap ≤ 0.001" in line
    assert "largest gap 5.0e-03" in line and "Stopped at max_iter=7 before that: b n=2 (5.0e-03)." in line
    assert "Stopped" not in transfer.gap_line({"a": 1e-4}, 1e-3, 7, "dual_cd")
