"""Transfer with linear SVMs: one `embjax.svm` per embedding and training-set size, scored on a test set.

`svm_grid` trains a one-vs-rest squared-hinge SVM (LinearSVC's objective) for every (size n, embedding)
cell on the first n training rows and records the test accuracy with the solver's certificate (objective,
relative duality gap, iterations, seconds). Every training set is padded to the largest size with
zero-weight rows and int8 is widened to float32 on the host, so the solver compiles once per feature
width instead of once per (size, width, dtype) (about 10 s per avoided compilation on a 2-core CPU).
`place(x, y, weight)` may put the rows on devices (the engine's `shard_rows`: L-BFGS then splits its sums
over rows); `devices` is how many the rows must be a multiple of. Dual coordinate descent is sequential
over samples and runs on one device. `gap_line` states how many SVMs reached their tolerance.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from embjax import svm

FIELDS = ("accuracy", "objective", "gap", "iterations", "seconds")


def svm_grid(sets: Callable[[int], Mapping[str, tuple]], y_train, y_test, sizes, num_classes: int, *,
             C: float = 1.0, tol: float = 1e-3, max_iter: int = 1000, solver: str = "dual_cd",
             place: Callable | None = None, devices: int = 1, label: str = "") -> dict:
    """{field: {embedding: {str(n): value}}} for FIELDS. `sets(n)` gives {embedding: (x_train (n, d), x_test)}
    for the first n training rows; `y_train` labels the training rows (at least max(sizes)), `y_test` the
    test rows."""
    devices = devices if solver == "lbfgs" else 1
    rows = -(-max(sizes) // devices) * devices
    out = {f: {} for f in FIELDS}
    for n in sizes:
        y = np.zeros(rows, np.int32)
        y[:n] = np.asarray(y_train)[:n]
        weight = (np.arange(rows) < n).astype(np.float32)
        for e, (x_train, x_test) in sets(n).items():
            t = time.perf_counter()
            x = np.zeros((rows, x_train.shape[1]), np.float32)
            x[:n] = np.asarray(x_train, np.float32)
            xs, ys, ws = place(x, y, weight) if place is not None and devices > 1 else (x, y, weight)
            model = svm.fit(xs, ys, num_classes, C=C, tol=tol, max_iter=max_iter, sample_weight=ws, solver=solver)
            values = (svm.accuracy(model, np.asarray(x_test, np.float32), y_test), model.objective, model.gap,
                      model.iterations, time.perf_counter() - t)
            for field, v in zip(FIELDS, values):
                out[field].setdefault(e, {})[str(n)] = float(v)
            print(f"[svm] {label} {e} n={n}: accuracy {values[0]:.4f} ({model.solver}, {model.iterations} "
                  f"iterations, duality gap {model.gap:.1e}{'' if model.converged else ', NOT converged'})",
                  flush=True)
    return out


def gap_line(gaps: Mapping[str, float], tol: float, max_iter: int, solver: str) -> str:
    """One sentence on the certificates of the SVMs `gaps` ({cell name: relative duality gap})."""
    late = [f"{k} ({g:.1e})" for k, g in gaps.items() if g > tol]
    text = (f"SVMs ({solver}): {len(gaps) - len(late)} of {len(gaps)} trained to a relative duality gap "
            f"≤ {tol:g} (objective certified within that fraction of the optimum); largest gap "
            f"{max(gaps.values()):.1e}.")
    return text + (f" Stopped at max_iter={max_iter} before that: {', '.join(late)}." if late else "")


__all__ = ["FIELDS", "svm_grid", "gap_line"]
