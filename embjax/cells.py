"""Verification and retrieval metrics of one (queries, gallery) cell, and their bookkeeping.

A cell is a query embedding against a gallery embedding of the same samples (open-set evaluation:
model A's or a mapped embedding against model B's). `cell_metrics` gives TAR at FAR, EER, ROC AUC and
the 10-fold accuracy over `kfold_pairs` (embjax.verification) and Recall@k, mAP, MAP@R (embjax.retrieval)
from one blocked pass over all pairs of distinct samples; `average_cells` and `cells_to_arrays` combine
and store them. Pure: arrays in, numbers out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from embjax import retrieval, verification

CURVE_METRICS = ("recall_at_1", "map", "tar_at_far_0.01", "eer")


@functools.partial(jax.jit, static_argnames=("bins", "ks", "qb"))
def cell_states(q, g, labels, index, *, bins, ks, qb):
    """(verification histograms, retrieval sums) of every pair of distinct samples, queries `q` against
    gallery `g` (cosine), in blocks of `qb` queries."""
    n = q.shape[0]
    qn = retrieval.normalize(q)
    gn = retrieval.normalize(g)
    pad = (-n) % qb
    blocks = (jnp.pad(qn, ((0, pad), (0, 0))).reshape(-1, qb, q.shape[1]),
              jnp.pad(labels, (0, pad)).reshape(-1, qb), jnp.pad(index, (0, pad)).reshape(-1, qb),
              jnp.pad(jnp.ones((n,), bool), (0, pad)).reshape(-1, qb))

    def step(carry, blk):
        v, r = carry
        qq, ql, qi, qm = blk
        s = jnp.matmul(qq, gn.T, precision=jax.lax.Precision.HIGHEST)
        v = verification.update_label_pairs(v, s, ql, qi, labels, index, qm, None)
        r = retrieval.retrieval_update(r, s, ql, qi, labels, index, qm, None)
        return (v, r), None

    (v, r), _ = jax.lax.scan(step, (verification.init(bins), retrieval.init(ks)), blocks)
    return v, r

def kfold_pairs(labels: np.ndarray, per_fold: int, seed: int, folds: int = 10):
    """Balanced pairs (i ≠ j) for the 10-fold protocol: each fold `per_fold` genuine + `per_fold`
    impostor pairs, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    by_label = {l: np.nonzero(labels == l)[0] for l in np.unique(labels)}
    multi = [l for l, rows in by_label.items() if len(rows) > 1]
    if not multi or len(by_label) < 2:
        raise ValueError("the 10-fold protocol needs ≥ 2 evaluation classes and a class with ≥ 2 images")
    pi, pj, same, fold = [], [], [], []
    for f in range(folds):
        for _ in range(per_fold):
            l = multi[rng.integers(len(multi))]
            a, b = rng.choice(by_label[l], 2, replace=False)
            pi.append(a), pj.append(b), same.append(True), fold.append(f)
        for _ in range(per_fold):
            while True:
                a, b = rng.integers(n, size=2)
                if labels[a] != labels[b]:
                    break
            pi.append(a), pj.append(b), same.append(False), fold.append(f)
    return np.asarray(pi), np.asarray(pj), np.asarray(same), np.asarray(fold)

def cell_metrics(q, g, labels, index, pairs, *, bins: int, ks, query_block: int, fars) -> tuple[dict, dict]:
    """(verification metrics, retrieval metrics) of queries `q` against gallery `g` (rows = samples)."""
    v, r = cell_states(jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32), jnp.asarray(labels, jnp.int32),
                       jnp.asarray(index, jnp.int32), bins=int(bins), ks=tuple(int(k) for k in ks), qb=int(query_block))
    fars = tuple(float(f) for f in fars)
    vm = verification.compute(v, fars)
    pi, pj, same, fold = pairs
    qn, gn = retrieval.normalize(jnp.asarray(q, jnp.float32)), retrieval.normalize(jnp.asarray(g, jnp.float32))
    scores = jnp.sum(qn[pi] * gn[pj], axis=1)
    _, acc = verification.kfold_accuracy(scores, same, fold)
    ver = {"tar_at_far": {far_key(f): float(t) for f, t in zip(fars, np.asarray(vm["tar_at_far"]))},
           "eer": float(vm["eer"]), "roc_auc": float(vm["roc_auc"]), "kfold_accuracy": float(acc)}
    far, tar, _ = verification.roc(v)
    ver["_roc"] = roc_points(np.asarray(far), np.asarray(tar))
    rm = retrieval.compute(r)
    ret = {k: float(v_) for k, v_ in rm.items() if k not in ("queries", "with_relevant")}
    return ver, ret

def far_key(f: float) -> str:
    return f"{f:g}"

def roc_points(far: np.ndarray, tar: np.ndarray, points: int = 60) -> dict:
    """TAR at log-spaced FARs (the TAR@FAR rule), compact enough for results.json and a plot."""
    grid = np.logspace(-5, 0, points)
    last = np.searchsorted(far, grid, side="right") - 1
    return {"far": grid.tolist(), "tar": tar[np.maximum(last, 0)].tolist()}

def curve_values(ver, ret):
    return {"recall_at_1": ret["recall_at_1"], "map": ret["map"], "tar_at_far_0.01": ver["tar_at_far"]["0.01"],
            "eer": ver["eer"]}

def average_cells(cells):
    """Mean of several cells' metrics (both_mapped over hub models); ROC points averaged pointwise."""
    if len(cells) == 1:
        return cells[0]
    ver = {"tar_at_far": {k: float(np.mean([c[0]["tar_at_far"][k] for c in cells])) for k in cells[0][0]["tar_at_far"]}}
    for k in ("eer", "roc_auc", "kfold_accuracy"):
        ver[k] = float(np.mean([c[0][k] for c in cells]))
    ver["_roc"] = {"far": cells[0][0]["_roc"]["far"],
                   "tar": np.mean([c[0]["_roc"]["tar"] for c in cells], axis=0).tolist()}
    ret = {k: float(np.mean([c[1][k] for c in cells])) for k in cells[0][1]}
    return ver, ret

def cells_to_arrays(grid):
    """A grid of (ver, ret) cells -> {metric: (n, n) array} (memo-friendly: arrays only)."""
    n = len(grid)
    first_v, first_r = grid[0][0]
    out = {}
    for k in first_v["tar_at_far"]:
        out[f"tar_at_far/{k}"] = np.array([[grid[i][j][0]["tar_at_far"][k] for j in range(n)] for i in range(n)])
    for k in ("eer", "roc_auc", "kfold_accuracy"):
        out[k] = np.array([[grid[i][j][0][k] for j in range(n)] for i in range(n)])
    for k in first_r:
        out[f"retrieval/{k}"] = np.array([[grid[i][j][1][k] for j in range(n)] for i in range(n)])
    out["roc_far"] = np.asarray(first_v["_roc"]["far"])
    out["roc_tar"] = np.array([[grid[i][j][0]["_roc"]["tar"] for j in range(n)] for i in range(n)])
    return out
