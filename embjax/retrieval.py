"""Exact nearest neighbours in blocks and leave-one-out retrieval metrics (CMC top-k, mAP, MAP@R).

Similarity. `metric="cosine"` ranks by the cosine of the angle; `metric="l2"` by −‖q − g‖², so that
larger is always more similar (the squared distance ranks exactly as the distance does).

Nearest neighbours (`knn`). The gallery is visited in blocks of `gallery_block` rows; each query
block keeps a running top-k of (score, gallery position) and merges every gallery block's scores
into it with `lax.top_k`. Memory is (query block × gallery block) at a time, so a gallery of a
million items never materialises an N×N matrix. Ties go to the lower gallery position (the running
top-k comes first in each merge, and top_k keeps the earlier of equal values).

Leave-one-out. Every item carries a sample index. A query is never matched with a gallery item of
the same index: that is the query itself (possibly embedded by another model or mapped), removed by
index rather than by position so that queries and gallery may be different arrays in any order.

Retrieval metrics (`retrieval_update`, one block of queries at a time against the whole gallery).
For each query the gallery (self removed) is ranked by score, ties by gallery position; an item is
relevant when it has the query's label; R is the number of relevant items. Queries with R = 0 count
in `queries` but are left out of every average (no metric is defined for them):
  Recall@k (CMC top-k): 1 if a relevant item is among the top k.
  AP: mean over the relevant items of the precision at their rank; mAP is its mean over queries.
  MAP@R (Musgrave et al., "A Metric Learning Reality Check"): (1/R) Σ_{i ≤ R} P@i · rel_i.
  R-precision (Musgrave et al.): the fraction of relevant items among the top R.
These definitions are those of pytorch-metric-learning's AccuracyCalculator (precision_at_1 is
Recall@1, r_precision, mean_average_precision_at_r, with R the number of same-label gallery items and
lone queries excluded) and of Apple ml-fct (CMC top-k: the first relevant item within the top k; mAP
over the full ranking, scikit-learn's average_precision_score of one query). Ties: exactly equal
scores rank by gallery position, lower first (a stable sort). scikit-learn's AP instead gives every
item of a run of tied scores the precision at the run's end; the two agree whenever no relevant and
irrelevant item tie, which float scores of real features practically never do.

Two ways to rank, with the same numbers (`backend=`):
  "device": one (query block × gallery) score block and one stable sort per row on the device
    (jax.numpy), summed into `RetrievalState`; the right choice on an accelerator, whose sort is fast.
  "host": float32 block scores (XLA's matmul), then no argsort: each score row is sorted by value
    alone (np.sort, vectorised) and the query's R relevant scores are placed in it by binary search,
    so the rank of a relevant item is 1 + the number of items scoring strictly higher (exact ties,
    rare, are counted by gallery position); the metrics need nothing else.
    4× faster than a float64 NumPy argsort reference at 10,000 × 128 on a 2-core CPU
    (benchmarks/ranking.py, benchmarks/RESULTS.md), and far faster than XLA:CPU's sort.
  "auto" (default): "host" when JAX's default backend is the CPU, "device" otherwise.
Memory is one (query block × gallery) block at a time (its scores and their sorted copy: 2 × 256 ×
50,000 float32 = 0.1 GB at the default query_block), plus the gallery held normalised and grouped by
label; never N×N.

Pure jax.numpy and NumPy; imports nothing of embjax.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
METRICS = ("cosine", "l2")
BACKENDS = ("auto", "host", "device")


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"retrieval: unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        return "host" if jax.default_backend() == "cpu" else "device"
    return backend


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"retrieval: unknown metric {metric!r}; use one of {METRICS}")


def normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit length (a zero row stays zero)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


def scores(queries: jax.Array, gallery: jax.Array, metric: str = "cosine") -> jax.Array:
    """(queries, gallery) similarity matrix: cosine, or −squared Euclidean distance."""
    _check_metric(metric)
    if metric == "cosine":
        return jnp.matmul(normalize(queries), normalize(gallery).T, precision=_HIGHEST)
    q2 = jnp.sum(queries * queries, axis=1)[:, None]
    g2 = jnp.sum(gallery * gallery, axis=1)[None, :]
    return -(q2 + g2 - 2.0 * jnp.matmul(queries, gallery.T, precision=_HIGHEST))


def _pad_rows(x: jax.Array, multiple: int, value=0):
    n = x.shape[0]
    pad = (-n) % multiple
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


def _check_index(index, n: int, what: str):
    if index is None:
        return jnp.arange(n, dtype=jnp.int32)
    index = jnp.asarray(index)
    if index.shape != (n,):
        raise ValueError(f"retrieval: {what} has shape {index.shape}, expected ({n},)")
    return index


# --------------------------------------------------------------------------------------------------
# Blocked exact k nearest neighbours


def knn(queries, gallery, k: int, metric: str = "cosine", *, query_index=None, gallery_index=None,
        gallery_mask=None, query_block: int = 256, gallery_block: int = 4096, backend: str = "device"):
    """Exact top-k gallery items of every query: (scores (Q, k), gallery positions (Q, k)), best first.

    Items with query_index == gallery_index are excluded (leave-one-out; by default the indices are
    positions, so knn(x, x, k) excludes each item itself). Rows of the gallery with gallery_mask False
    are never returned. When fewer than k items are eligible the tail has score −inf and position −1.
    Equal scores rank by gallery position, lower first, on either backend.

    backend: "device" (default; jax arrays back) runs a scan of gallery blocks with a running
    lax.top_k; "host" (NumPy arrays back) a float32 BLAS block matmul and a per-row partition
    (np.argpartition, O(N) per query) then a sort of the k survivors; "auto" picks "host" on a CPU.
    """
    if _backend(backend) == "host":
        return _knn_host(queries, gallery, int(k), metric, query_index, gallery_index, gallery_mask,
                         max(1, int(query_block)))
    _check_metric(metric)
    queries, gallery = jnp.asarray(queries), jnp.asarray(gallery)
    n_q, n_g = queries.shape[0], gallery.shape[0]
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"retrieval.knn: queries {queries.shape} and gallery {gallery.shape} must be 2-D "
                         "with the same width")
    k = int(k)
    if not 1 <= k:
        raise ValueError(f"retrieval.knn: k must be ≥ 1, got {k}")
    q_idx = _check_index(query_index, n_q, "query_index")
    g_idx = _check_index(gallery_index, n_g, "gallery_index")
    g_mask = jnp.ones((n_g,), bool) if gallery_mask is None else jnp.asarray(gallery_mask, bool)
    qb = max(1, min(int(query_block), n_q))
    gb = max(1, min(int(gallery_block), n_g))
    return _knn(queries, gallery, q_idx, g_idx, g_mask, k=k, metric=metric, qb=qb, gb=gb)


@functools.partial(jax.jit, static_argnames=("k", "metric", "qb", "gb"))
def _knn(queries, gallery, q_idx, g_idx, g_mask, *, k, metric, qb, gb):
    n_q, n_g = queries.shape[0], gallery.shape[0]
    if metric == "cosine":
        queries, gallery = normalize(queries), normalize(gallery)
    g_pos = jnp.arange(n_g, dtype=jnp.int32)
    gal = _pad_rows(gallery, gb).reshape(-1, gb, gallery.shape[1])
    gal_idx = _pad_rows(g_idx, gb).reshape(-1, gb)
    gal_pos = _pad_rows(g_pos, gb, -1).reshape(-1, gb)
    gal_ok = _pad_rows(g_mask, gb, False).reshape(-1, gb)
    que = _pad_rows(queries, qb).reshape(-1, qb, queries.shape[1])
    que_idx = _pad_rows(q_idx, qb).reshape(-1, qb)

    def per_query_block(args):
        q, qi = args

        def step(carry, blk):
            best_s, best_p = carry
            g, gi, gp, ok = blk
            if metric == "cosine":
                s = jnp.matmul(q, g.T, precision=_HIGHEST)
            else:
                s = -(jnp.sum(q * q, 1)[:, None] + jnp.sum(g * g, 1)[None, :]
                      - 2.0 * jnp.matmul(q, g.T, precision=_HIGHEST))
            eligible = ok[None, :] & (qi[:, None] != gi[None, :])
            s = jnp.where(eligible, s, -jnp.inf)
            p = jnp.where(eligible, gp[None, :], -1)
            all_s = jnp.concatenate([best_s, s], axis=1)
            all_p = jnp.concatenate([best_p, p], axis=1)
            top_s, where = jax.lax.top_k(all_s, k)
            return (top_s, jnp.take_along_axis(all_p, where, axis=1)), None

        init = (jnp.full((qb, k), -jnp.inf, queries.dtype), jnp.full((qb, k), -1, jnp.int32))
        (best_s, best_p), _ = jax.lax.scan(step, init, (gal, gal_idx, gal_pos, gal_ok))
        return best_s, jnp.where(jnp.isfinite(best_s), best_p, -1)

    s, p = jax.lax.map(per_query_block, (que, que_idx))
    return s.reshape(-1, k)[:n_q], p.reshape(-1, k)[:n_q]


# --------------------------------------------------------------------------------------------------
# Leave-one-out retrieval metrics


@flax.struct.dataclass
class RetrievalState:
    """Sums over queries; see the module docstring for each metric."""

    queries: jax.Array  # () int32: queries seen
    with_relevant: jax.Array  # () int32: queries with R ≥ 1 (the denominator of every average)
    hits: jax.Array  # (len(ks),) int32: queries with a relevant item in the top k
    ap: jax.Array  # () float32: Σ AP
    map_at_r: jax.Array  # () float32: Σ MAP@R
    r_precision: jax.Array  # () float32: Σ R-precision
    ks: tuple[int, ...] = flax.struct.field(pytree_node=False)


def init(ks: Sequence[int] = (1, 5)) -> RetrievalState:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"retrieval.init: ks must be positive integers, got {ks}")
    zero_i = jnp.zeros((), jnp.int32)
    zero_f = jnp.zeros((), jnp.float32)
    return RetrievalState(queries=zero_i, with_relevant=zero_i, hits=jnp.zeros((len(ks),), jnp.int32),
                          ap=zero_f, map_at_r=zero_f, r_precision=zero_f, ks=ks)


def retrieval_update(state: RetrievalState, query_scores, query_labels, query_index, gallery_labels,
                     gallery_index, query_mask=None, gallery_mask=None) -> RetrievalState:
    """Fold one block of queries, given their (queries, gallery) scores against the whole gallery."""
    s = jnp.asarray(query_scores, jnp.float32)
    q_lab, g_lab = jnp.asarray(query_labels), jnp.asarray(gallery_labels)
    n_q, n_g = s.shape
    if q_lab.shape != (n_q,) or g_lab.shape != (n_g,):
        raise ValueError(f"retrieval_update: scores {s.shape} need ({n_q},) query and ({n_g},) gallery labels, "
                         f"got {q_lab.shape} and {g_lab.shape}")
    q_idx = _check_index(query_index, n_q, "query_index")
    g_idx = _check_index(gallery_index, n_g, "gallery_index")
    q_ok = jnp.ones((n_q,), bool) if query_mask is None else jnp.asarray(query_mask, bool)
    g_ok = jnp.ones((n_g,), bool) if gallery_mask is None else jnp.asarray(gallery_mask, bool)

    eligible = g_ok[None, :] & (q_idx[:, None] != g_idx[None, :])
    s = jnp.where(eligible, s, -jnp.inf)
    order = jnp.argsort(-s, axis=1, stable=True)  # best first, ties by gallery position
    relevant = jnp.take_along_axis(eligible & (q_lab[:, None] == g_lab[None, :]), order, axis=1)
    rel = relevant.astype(jnp.float32)
    r = jnp.sum(relevant, axis=1)
    ranks = jnp.arange(1, n_g + 1, dtype=jnp.float32)[None, :]
    precision = jnp.cumsum(rel, axis=1) / ranks
    r_f = jnp.maximum(r, 1).astype(jnp.float32)
    ap = jnp.sum(precision * rel, axis=1) / r_f
    within_r = ranks <= r[:, None].astype(jnp.float32)
    map_at_r = jnp.sum(precision * rel * within_r, axis=1) / r_f
    r_precision = jnp.sum(rel * within_r, axis=1) / r_f
    counted = q_ok & (r > 0)
    hits = jnp.stack([jnp.sum(counted & jnp.any(relevant[:, :k], axis=1)) for k in state.ks]).astype(jnp.int32)
    return state.replace(
        queries=state.queries + jnp.sum(q_ok, dtype=jnp.int32),
        with_relevant=state.with_relevant + jnp.sum(counted, dtype=jnp.int32),
        hits=state.hits + hits,
        ap=state.ap + jnp.sum(jnp.where(counted, ap, 0.0)),
        map_at_r=state.map_at_r + jnp.sum(jnp.where(counted, map_at_r, 0.0)),
        r_precision=state.r_precision + jnp.sum(jnp.where(counted, r_precision, 0.0)),
    )


def merge(a: RetrievalState, b: RetrievalState) -> RetrievalState:
    if a.ks != b.ks:
        raise ValueError(f"retrieval.merge: different ks {a.ks} vs {b.ks}")
    return jax.tree_util.tree_map(jnp.add, a, b)


def compute(state: RetrievalState) -> dict:
    """{'recall_at_<k>' for each k, 'map', 'map_at_r', 'r_precision', 'queries', 'with_relevant'}."""
    n = jnp.maximum(state.with_relevant, 1).astype(jnp.float32)
    out = {f"recall_at_{k}": state.hits[i] / n for i, k in enumerate(state.ks)}
    out.update(map=state.ap / n, map_at_r=state.map_at_r / n, r_precision=state.r_precision / n,
               queries=state.queries, with_relevant=state.with_relevant)
    return out


def leave_one_out(queries, query_labels, gallery, gallery_labels, *, metric: str = "cosine",
                  query_index=None, gallery_index=None, ks: Sequence[int] = (1, 5),
                  query_block: int = 256, backend: str = "auto", gallery_mask=None) -> dict:
    """Retrieval metrics of every query against the whole gallery, one query block at a time (the
    block's full score rows exist, never all N×N). Indices default to positions, so
    leave_one_out(x, y, x, y) is the usual leave-one-out over one split. `backend`: see the module
    docstring (both give the same numbers; "host" returns NumPy scalars, "device" jax ones). Gallery
    rows with gallery_mask False take no part."""
    _check_metric(metric)
    if _backend(backend) == "host":
        return _leave_one_out_host(queries, query_labels, gallery, gallery_labels, metric, query_index,
                                   gallery_index, gallery_mask, tuple(int(k) for k in ks), max(1, int(query_block)))
    queries, gallery = jnp.asarray(queries), jnp.asarray(gallery)
    q_lab, g_lab = jnp.asarray(query_labels), jnp.asarray(gallery_labels)
    n_q = queries.shape[0]
    q_idx = _check_index(query_index, n_q, "query_index")
    g_idx = _check_index(gallery_index, gallery.shape[0], "gallery_index")
    qb = max(1, min(int(query_block), n_q))
    g_ok = jnp.ones((gallery.shape[0],), bool) if gallery_mask is None else jnp.asarray(gallery_mask, bool)
    state = init(ks)
    state = _leave_one_out(state, queries, q_lab, q_idx, gallery, g_lab, g_idx, g_ok, metric=metric, qb=qb)
    return compute(state)


@functools.partial(jax.jit, static_argnames=("metric", "qb"))
def _leave_one_out(state, queries, q_lab, q_idx, gallery, g_lab, g_idx, g_ok, *, metric, qb):
    n_q = queries.shape[0]
    mask = _pad_rows(jnp.ones((n_q,), bool), qb, False).reshape(-1, qb)
    que = _pad_rows(queries, qb).reshape(-1, qb, queries.shape[1])
    lab = _pad_rows(q_lab, qb).reshape(-1, qb)
    idx = _pad_rows(q_idx, qb).reshape(-1, qb)
    if metric == "cosine":
        gallery = normalize(gallery)

    def step(st, blk):
        q, ql, qi, qm = blk
        s = scores(q, gallery, metric) if metric == "l2" else jnp.matmul(normalize(q), gallery.T, precision=_HIGHEST)
        return retrieval_update(st, s, ql, qi, g_lab, g_idx, qm, g_ok), None

    state, _ = jax.lax.scan(step, state, (que, lab, idx, mask))
    return state


# The update under the name every accumulator module uses.
update = retrieval_update


def accumulator(read, ks: Sequence[int] = (1, 5)):
    """Retrieval sums as an engine accumulator: the batch's rows are queries; `read(outputs, batch, aux)`
    gives `(scores (batch, gallery), gallery_labels, gallery_index)`; query labels, indices and mask come
    from the batch."""
    from embjax.accumulator import Accumulator

    def fold(state, outputs, batch, aux):
        scores, gallery_labels, gallery_index = read(outputs, batch, aux)
        return retrieval_update(state, scores, batch["label"], batch["index"], gallery_labels, gallery_index,
                                batch["mask"])

    return Accumulator(empty=lambda: init(ks), update=fold, merge=merge, compute=compute)


# --------------------------------------------------------------------------------------------------
# Host ranking: float32 BLAS block scores, then counting instead of a full sort per query


def _host_inputs(queries, gallery, metric, query_index, gallery_index, gallery_mask, what):
    q = np.asarray(queries, np.float32)
    g = np.asarray(gallery, np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"retrieval.{what}: queries {q.shape} and gallery {g.shape} must be 2-D with the same width")
    for name, a in (("queries", q), ("gallery", g)):
        if not np.all(np.isfinite(a)):
            bad = int(np.argmax(~np.all(np.isfinite(a), axis=1)))
            raise ValueError(f"retrieval.{what}: {name} row {bad} holds NaN or an infinity; ranking needs finite "
                             "embeddings (check the model or map that produced them)")
    q_idx = np.arange(q.shape[0]) if query_index is None else np.asarray(query_index).reshape(-1)
    g_idx = np.arange(g.shape[0]) if gallery_index is None else np.asarray(gallery_index).reshape(-1)
    if q_idx.shape != (q.shape[0],) or g_idx.shape != (g.shape[0],):
        raise ValueError(f"retrieval.{what}: query_index {q_idx.shape} / gallery_index {g_idx.shape} must have one "
                         f"entry per row ({q.shape[0]} / {g.shape[0]})")
    g_ok = np.ones(g.shape[0], bool) if gallery_mask is None else np.asarray(gallery_mask, bool).reshape(-1)
    if g_ok.shape != (g.shape[0],):
        raise ValueError(f"retrieval.{what}: gallery_mask has {g_ok.size} entries for {g.shape[0]} gallery rows")
    return q, g, q_idx, g_idx, g_ok


def _normalized_rows_inplace(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return x


def _query_blocks(q, q_idx, qb):
    """(start, rows, block, block indices) with the last block zero-padded to qb rows (one compiled
    shape), without copying the whole query array."""
    for lo in range(0, q.shape[0], qb):
        blk, idx = q[lo:lo + qb], q_idx[lo:lo + qb]
        m = blk.shape[0]
        if m < qb:
            blk = np.concatenate([blk, np.zeros((qb - m, q.shape[1]), np.float32)])
            idx = np.concatenate([idx, np.full(qb - m, -1, idx.dtype)])
        yield lo, m, blk, idx


@functools.partial(jax.jit, static_argnames=("metric",))
def _eligible_scores(q, qi, g, gi, g_ok, *, metric):
    """One block's scores (XLA's CPU matmul beats a threaded BLAS on a busy machine), −∞ where the
    gallery item is masked or is the query's own sample; −0.0 becomes +0.0 so equal scores are equal.
    For cosine the query rows are normalised here and the gallery rows must come normalised."""
    if metric == "cosine":
        q = q / jnp.maximum(jnp.sqrt(jnp.sum(q * q, axis=1, keepdims=True)), jnp.finfo(jnp.float32).tiny)
    s = jnp.matmul(q, g.T, precision=_HIGHEST)
    if metric == "l2":
        s = -((jnp.sum(q * q, axis=1)[:, None] + jnp.sum(g * g, axis=1)[None, :]) - 2.0 * s)
    ok = g_ok[None, :] & (qi[:, None] != gi[None, :])
    return jnp.where(ok, s + 0.0, -jnp.inf)


def _leave_one_out_host(queries, query_labels, gallery, gallery_labels, metric, query_index, gallery_index,
                        gallery_mask, ks, qb) -> dict:
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"retrieval.leave_one_out: ks must be positive integers, got {ks}")
    q, g, q_idx, g_idx, g_ok = _host_inputs(queries, gallery, metric, query_index, gallery_index, gallery_mask,
                                            "leave_one_out")
    q_lab = np.asarray(query_labels).reshape(-1)
    g_lab = np.asarray(gallery_labels).reshape(-1)
    if q_lab.shape != (q.shape[0],) or g_lab.shape != (g.shape[0],):
        raise ValueError(f"retrieval.leave_one_out: {q.shape[0]} queries and {g.shape[0]} gallery rows need as many "
                         f"labels, got {q_lab.shape} and {g_lab.shape}")
    # Gallery grouped by label (stable, so positions stay ordered within a group): the relevant items
    # of a query are then one contiguous slice of its score row.
    by_label = np.argsort(g_lab, kind="stable")
    g, g_idx, g_ok, g_lab = g[by_label], g_idx[by_label], g_ok[by_label], g_lab[by_label]  # g: the one copy
    if metric == "cosine":
        g = _normalized_rows_inplace(g)
    starts = np.searchsorted(g_lab, q_lab, side="left")
    ends = np.searchsorted(g_lab, q_lab, side="right")
    qb = min(qb, max(q.shape[0], 1))
    g_j, gi_j, ok_j = jnp.asarray(g), jnp.asarray(g_idx), jnp.asarray(g_ok)
    del g  # the device copy is the one used from here
    totals = dict(with_relevant=0, ap=0.0, map_at_r=0.0, r_precision=0.0, hits=np.zeros(len(ks), np.int64))
    for lo, m, q_blk, qi_blk in _query_blocks(q, q_idx, qb):
        s = np.asarray(_eligible_scores(q_blk, qi_blk, g_j, gi_j, ok_j, metric=metric))[:m]
        a, b = starts[lo:lo + m], ends[lo:lo + m]
        for start, end in set(zip(a.tolist(), b.tolist())) - {(e, e) for e in b.tolist()}:  # one label at a time
            rows = np.flatnonzero((a == start) & (b == end))
            ranks, big_r = _relevant_ranks(s[rows], start, end, by_label)
            for key, value in _rank_sums(ranks, big_r, ks).items():
                totals[key] = totals[key] + value
    n = max(totals["with_relevant"], 1)
    out = {f"recall_at_{k}": np.float64(totals["hits"][t] / n) for t, k in enumerate(ks)}
    out.update(map=np.float64(totals["ap"] / n), map_at_r=np.float64(totals["map_at_r"] / n),
               r_precision=np.float64(totals["r_precision"] / n), queries=np.int64(q.shape[0]),
               with_relevant=np.int64(totals["with_relevant"]))
    return out


def _relevant_ranks(block, start, end, positions):
    """(ranks, R): the 1-based rank of every relevant item of each row of `block` (the rows whose relevant
    items are columns start..end), as an (m, end - start) array in ascending order of score with +inf
    where the item is the query itself or masked, and the number R of relevant items per row.

    The rank of an item is 1 + the number of items scoring strictly higher (a binary search in the sorted
    row) + the number scoring exactly the same from a lower gallery position (`positions`), the latter
    counted only where such a tie exists."""
    n, width = block.shape[1], end - start
    rel = np.sort(block[:, start:end], axis=1)  # ascending; the query itself and masked items (−inf) first
    ordered = np.sort(block, axis=1)
    big_r = np.count_nonzero(rel > -np.inf, axis=1)
    ranks = np.full(rel.shape, np.inf)
    for i in np.flatnonzero(big_r):
        lo = width - big_r[i]
        vals = rel[i, lo:]
        right = ordered[i].searchsorted(vals, side="right")
        ranks[i, lo:] = n - right + 1
        tied = (right >= 2) & (ordered[i][np.maximum(right - 2, 0)] == vals)
        for v in np.unique(vals[tied]):  # equal scores: the lower gallery position ranks first
            same = np.flatnonzero(block[i] == v)
            same = same[np.argsort(positions[same], kind="stable")]
            offsets = np.flatnonzero((same >= start) & (same < end))  # relevant ones, in position order
            run = lo + np.flatnonzero(vals == v)  # their slots, ascending: the last is the best place
            ranks[i, run[::-1]] += offsets
    return ranks, big_r


def _rank_sums(ranks, big_r, ks):
    """Sums over the rows of AP, MAP@R, R-precision and hits@k from ascending-score ranks."""
    width, has, denom = ranks.shape[1], big_r > 0, np.maximum(big_r, 1)
    k = (width - np.arange(width))[None, :].astype(np.float64)  # place among the relevant items, best = 1
    prec = np.where(np.isfinite(ranks), k / ranks, 0.0)
    within, first = ranks <= big_r[:, None], ranks[:, -1]
    return dict(
        with_relevant=int(has.sum()),
        ap=float(np.sum(prec.sum(1)[has] / denom[has])),
        map_at_r=float(np.sum((prec * within).sum(1)[has] / denom[has])),
        r_precision=float(np.sum(within.sum(1)[has] / denom[has])),
        hits=np.array([int(np.sum(has & (first <= kk))) for kk in ks]))


def _knn_host(queries, gallery, k, metric, query_index, gallery_index, gallery_mask, qb):
    _check_metric(metric)
    if k < 1:
        raise ValueError(f"retrieval.knn: k must be ≥ 1, got {k}")
    q, g, q_idx, g_idx, g_ok = _host_inputs(queries, gallery, metric, query_index, gallery_index, gallery_mask, "knn")
    n_q, n_g = q.shape[0], g.shape[0]
    out_s = np.full((n_q, k), -np.inf, np.float32)
    out_p = np.full((n_q, k), -1, np.int64)
    kk = min(k, n_g)
    if n_q == 0 or kk == 0:
        return out_s, out_p.astype(np.int32)
    qb = min(qb, n_q)
    if metric == "cosine":
        g = _normalized_rows_inplace(g.copy())
    g_j, gi_j, ok_j = jnp.asarray(g), jnp.asarray(g_idx), jnp.asarray(g_ok)
    del g
    for lo, m, q_blk, qi_blk in _query_blocks(q, q_idx, qb):
        s = np.asarray(_eligible_scores(q_blk, qi_blk, g_j, gi_j, ok_j, metric=metric))[:m]
        # A partition (O(N) per row) finds the kk best; where the kk-th score is tied with one left
        # out, the row is redone with a stable sort so that the lower gallery position wins the tie.
        cols = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        vals = np.take_along_axis(s, cols, axis=1)
        kth = vals.min(axis=1)
        for r in np.flatnonzero(np.count_nonzero(s >= kth[:, None], axis=1) > kk):
            cols[r] = np.argsort(-s[r], kind="stable")[:kk]
            vals[r] = s[r, cols[r]]
        order = np.lexsort((cols, -vals), axis=1)  # score descending, then position ascending
        cols = np.take_along_axis(cols, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        out_s[lo:lo + m, :kk] = vals
        out_p[lo:lo + m, :kk] = np.where(np.isfinite(vals), cols, -1)
    return out_s, out_p.astype(np.int32)
