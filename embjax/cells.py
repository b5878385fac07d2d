"""Verification and retrieval metrics of (queries, gallery) cells, and grids of them.

A cell is a query embedding against a gallery embedding of the same samples (open-set evaluation:
model A's or a mapped embedding against model B's). `cell_metrics` gives TAR at FAR, EER, ROC AUC and
the 10-fold accuracy over `kfold_pairs` (embjax.verification) and Recall@k, mAP, MAP@R (embjax.retrieval),
exact over every ordered pair of distinct samples; `curve_metrics` the four a curve plots. `settings_grid`
evaluates the open-set grid (settings × map families × ordered model pairs), each distinct cell once and
in a pool of threads (the metrics' sorts and searches run in NumPy and XLA, which release the GIL), and
`cells_to_arrays` stores it. Pure: arrays in, numbers out.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from embjax import head_maps, retrieval, verification

CURVE_METRICS = ("recall_at_1", "map", "tar_at_far_0.01", "eer")
SETTINGS = ("native", "mapped", "both_mapped", "naive")
HUB = "hub"  # the setting of a shared space's families: both sides encoded into it (settings_grid)
ROC_FARS = np.logspace(-5, 0, 60)  # where a cell's ROC is kept (results.json, the ROC figure)

# Seconds spent ranking (leave-one-out retrieval) and scoring verification pairs in this process
# (summed over threads).
METRIC_SECONDS = {"ranking": 0.0, "verification": 0.0}
_LOCK = threading.Lock()


def _timed(what, f, *args, **kw):
    t = time.perf_counter()
    out = f(*args, **kw)
    with _LOCK:
        METRIC_SECONDS[what] += time.perf_counter() - t
    return out


def kfold_pairs(labels: np.ndarray, per_fold: int, seed: int, folds: int = 10):
    """Balanced pairs for the 10-fold protocol: each fold `per_fold` genuine + `per_fold` impostor
    pairs of distinct samples, drawn without replacement (no pair in two folds) with a fixed seed, each
    listed in both orders (embjax.verification.sample_pairs)."""
    return verification.sample_pairs(labels, per_fold, folds, seed)


@functools.partial(jax.jit, static_argnames=("n_folds",))
def _kfold_accuracy(q, g, pi, pj, same, fold, *, n_folds):
    qn, gn = retrieval.normalize(q), retrieval.normalize(g)
    return verification.kfold_accuracy(jnp.sum(qn[pi] * gn[pj], axis=1), same, fold, n_folds=n_folds)[1]


def verification_cell(q, g, labels, index, pairs=None, *, bins: int, fars, roc: bool = True,
                      auc: bool = True) -> dict:
    """{'tar_at_far': {far: TAR}, 'eer', 'roc_auc'} over every ordered pair of distinct samples
    (verification.label_pairs), with 'kfold_accuracy' over `pairs` (i, j, same, fold) when given and
    '_roc' (TAR at ROC_FARS) when `roc`; 'roc_auc' only with `auc`."""
    fars = tuple(float(f) for f in fars)
    vm = _timed("verification", verification.label_pairs, q, g, labels, index, fars=fars, bins=int(bins),
                roc_fars=ROC_FARS if roc else None, auc=auc)
    ver = {"tar_at_far": {far_key(f): float(t) for f, t in zip(fars, np.asarray(vm["tar_at_far"]))},
           "eer": float(vm["eer"])}
    if auc:
        ver["roc_auc"] = float(vm["roc_auc"])
    if pairs is not None:
        pi, pj, same, fold = pairs
        ver["kfold_accuracy"] = float(_kfold_accuracy(jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32),
                                                      pi, pj, same, fold, n_folds=int(np.max(fold)) + 1))
    if roc:
        ver["_roc"] = {"far": ROC_FARS.tolist(), "tar": np.asarray(vm["roc_tar"]).tolist()}
    return ver


def retrieval_cell(q, g, labels, index, *, ks, query_block: int) -> dict:
    """Leave-one-out retrieval of queries `q` against gallery `g` (retrieval.leave_one_out)."""
    rm = _timed("ranking", retrieval.leave_one_out, q, labels, g, labels, query_index=index, gallery_index=index,
                ks=tuple(int(k) for k in ks), query_block=int(query_block))
    return {k: float(v) for k, v in rm.items() if k not in ("queries", "with_relevant")}


def cell_metrics(q, g, labels, index, pairs, *, bins: int, ks, query_block: int, fars) -> tuple[dict, dict]:
    """(verification metrics, retrieval metrics) of queries `q` against gallery `g` (rows = samples)."""
    return (verification_cell(q, g, labels, index, pairs, bins=bins, fars=fars),
            retrieval_cell(q, g, labels, index, ks=ks, query_block=query_block))


def curve_metrics(q, g, labels, index, *, bins: int, ks, query_block: int, fars) -> dict:
    """The CURVE_METRICS of a cell (no 10-fold accuracy, ROC or AUC: a curve plots these four only)."""
    ver = verification_cell(q, g, labels, index, None, bins=bins, fars=(0.01,), roc=False, auc=False)
    ret = retrieval_cell(q, g, labels, index, ks=ks, query_block=query_block)
    return curve_values(ver, ret)


def far_key(f: float) -> str:
    return f"{f:g}"


def curve_values(ver, ret):
    return {"recall_at_1": ret["recall_at_1"], "map": ret["map"], "tar_at_far_0.01": ver["tar_at_far"]["0.01"],
            "eer": ver["eer"]}


def parallel_map(f, items, workers: int | None = None) -> list:
    """[f(x) for x in items], in a pool of `workers` threads (default: the CPU count)."""
    workers = int(workers or os.cpu_count() or 1)
    if workers <= 1 or len(items) <= 1:
        return [f(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(f, items))


def settings_grid(native, mapped, labels, index, pairs, families, metric_kw, workers=None, settings=SETTINGS,
                  encoded=None) -> dict:
    """The open-set grid: {"setting|family": cells_to_arrays(grid)} for every setting, family and ordered
    pair (A, B) of the models (row A = queries, column B = gallery); `settings` is a sequence of settings
    for every family, or {family: settings}:
      native       B's own embedding on both sides;
      mapped       queries mapped A→B (`mapped(family, A, B)`; the diagonal is A's native embedding);
      both_mapped  A→C against B→C, averaged over C ∉ {A, B} (C = B with two models);
      naive        A's embedding truncated / zero-padded to B's width (head_maps.naive) against B's native one;
      hub          A's embedding in a shared space against B's in the same space (`encoded(family, A)`, e.g.
                   a canonical hub's encoder: embjax.canonical.encode); the diagonal is B against itself.
    Each distinct (queries, gallery) cell is computed once; verification, which counts every ordered pair
    in both directions, is the same for (X, Y) and (Y, X) and is computed once for the two."""
    n = len(native)
    per_family = {f: tuple(settings[f] if isinstance(settings, Mapping) else settings) for f in families}
    unknown = sorted({s for ss in per_family.values() for s in ss} - set(SETTINGS + (HUB,)))
    if unknown:
        raise ValueError(f"cells.settings_grid: unknown settings {unknown}; choose from {SETTINGS + (HUB,)}")
    if set(families) & {"native", "naive", HUB}:
        raise ValueError(f"cells.settings_grid: a map family may not be named native, naive or {HUB}")
    if any(HUB in ss for ss in per_family.values()) and encoded is None:
        raise ValueError(f"cells.settings_grid: the {HUB!r} setting needs `encoded(family, model)`")

    def naive(i, j):
        w, b = head_maps.naive(native[i].shape[1], native[j].shape[1])
        return native[i] @ np.asarray(w) + np.asarray(b)

    def emb(key):
        kind, *ij = key
        if kind == HUB:
            return encoded(*ij)
        return native[ij[0]] if kind == "native" else naive(*ij) if kind == "naive" else mapped(kind, *ij)

    def cell_keys(s, f, i, j):
        if s == "native":
            return [(("native", j), ("native", j))]
        if s == "naive":
            return [(("naive", i, j), ("native", j))]
        if s == "mapped":
            return [((("native", i) if i == j else (f, i, j)), ("native", j))]
        if s == HUB:
            return [((HUB, f, i), (HUB, f, j))]
        return [((f, i, c), (f, j, c)) for c in ([c for c in range(n) if c not in (i, j)] or [j])]

    spec = {(s, f): [[cell_keys(s, f, i, j) for j in range(n)] for i in range(n)]
            for s in SETTINGS + (HUB,) for f in families if s in per_family[f]}
    distinct = list(dict.fromkeys(k for grid in spec.values() for row in grid for keys in row for k in keys))
    ver_keys = list(dict.fromkeys(tuple(sorted(k)) for k in distinct))
    t = time.perf_counter()
    ver = dict(zip(ver_keys, parallel_map(lambda k: verification_cell(
        emb(k[0]), emb(k[1]), labels, index, pairs, bins=metric_kw["bins"], fars=metric_kw["fars"]), ver_keys, workers)))
    ret = dict(zip(distinct, parallel_map(lambda k: retrieval_cell(
        emb(k[0]), emb(k[1]), labels, index, ks=metric_kw["ks"], query_block=metric_kw["query_block"]), distinct, workers)))
    print(f"[metrics] {len(distinct)} distinct cells ({len(ver_keys)} verifications) in {time.perf_counter() - t:.1f} s "
          f"(ranking {METRIC_SECONDS['ranking']:.1f} s, verification {METRIC_SECONDS['verification']:.1f} s, "
          "summed over threads)", flush=True)
    out = {}
    for (s, f), grid in spec.items():
        cells = [[average_cells([(ver[tuple(sorted(k))], ret[k]) for k in keys]) for keys in row] for row in grid]
        out[f"{s}|{f}"] = cells_to_arrays(cells)
    return out


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


def grid_results(grids) -> tuple[dict, dict, dict]:
    """`settings_grid`'s arrays as results.json's nested dicts: (verification, retrieval, roc), each
    {setting: {family: {metric: matrix as lists}}} (row = query model A, column = gallery model B)."""
    ver, ret, roc = {}, {}, {}
    for key, arrays in grids.items():
        s, f = key.split("|")
        v = {"tar_at_far": {k.split("/", 1)[1]: np.asarray(a).tolist() for k, a in arrays.items()
                            if k.startswith("tar_at_far/")}}
        v.update({k: np.asarray(arrays[k]).tolist() for k in ("eer", "roc_auc", "kfold_accuracy")})
        ver.setdefault(s, {})[f] = v
        ret.setdefault(s, {})[f] = {k.split("/", 1)[1]: np.asarray(a).tolist() for k, a in arrays.items()
                                   if k.startswith("retrieval/")}
        roc.setdefault(s, {})[f] = {"far": np.asarray(arrays["roc_far"]).tolist(),
                                    "tar": np.asarray(arrays["roc_tar"]).tolist()}
    return ver, ret, roc
