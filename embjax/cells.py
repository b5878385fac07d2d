"""Verification and retrieval metrics of one (queries, gallery) cell, and their bookkeeping.

A cell is a query embedding against a gallery embedding of the same samples (open-set evaluation:
model A's or a mapped embedding against model B's). `cell_metrics` gives TAR at FAR, EER, ROC AUC and
the 10-fold accuracy over `kfold_pairs` (embjax.verification) and Recall@k, mAP, MAP@R (embjax.retrieval)
(exact over every ordered pair of distinct samples); `average_cells` and `cells_to_arrays` combine
and store them. Pure: arrays in, numbers out.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from embjax import retrieval, verification

CURVE_METRICS = ("recall_at_1", "map", "tar_at_far_0.01", "eer")


# Seconds spent ranking (leave-one-out retrieval) and scoring verification pairs in this process.
METRIC_SECONDS = {"ranking": 0.0, "verification": 0.0}


def kfold_pairs(labels: np.ndarray, per_fold: int, seed: int, folds: int = 10):
    """Balanced pairs for the 10-fold protocol: each fold `per_fold` genuine + `per_fold` impostor
    pairs of distinct samples, drawn without replacement (no pair in two folds) with a fixed seed, each
    listed in both orders (embjax.verification.sample_pairs)."""
    return verification.sample_pairs(labels, per_fold, folds, seed)


def cell_metrics(q, g, labels, index, pairs, *, bins: int, ks, query_block: int, fars) -> tuple[dict, dict]:
    """(verification metrics, retrieval metrics) of queries `q` against gallery `g` (rows = samples):
    exact verification over every ordered pair of distinct samples (binned beyond
    verification.EXACT_LIMIT pairs), leave-one-out retrieval, and the 10-fold accuracy over `pairs`."""
    fars = tuple(float(f) for f in fars)
    t0 = time.perf_counter()
    vm = verification.label_pairs(q, g, labels, index, fars=fars, bins=int(bins))
    t1 = time.perf_counter()
    rm = retrieval.leave_one_out(q, labels, g, labels, query_index=index, gallery_index=index,
                                 ks=tuple(int(k) for k in ks), query_block=int(query_block))
    METRIC_SECONDS["verification"] += t1 - t0
    METRIC_SECONDS["ranking"] += time.perf_counter() - t1
    pi, pj, same, fold = pairs
    qn, gn = retrieval.normalize(jnp.asarray(q, jnp.float32)), retrieval.normalize(jnp.asarray(g, jnp.float32))
    scores = jnp.sum(qn[pi] * gn[pj], axis=1)
    _, acc = verification.kfold_accuracy(scores, same, fold)
    ver = {"tar_at_far": {far_key(f): float(t) for f, t in zip(fars, np.asarray(vm["tar_at_far"]))},
           "eer": float(vm["eer"]), "roc_auc": float(vm["roc_auc"]), "kfold_accuracy": float(acc)}
    ver["_roc"] = roc_points(np.asarray(vm["far"]), np.asarray(vm["tar"]))
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
