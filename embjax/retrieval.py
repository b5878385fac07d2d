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
This needs the full ranking of one query block at a time: (query block × gallery) scores and one sort
per row, never N×N. The state holds sums, so blocks, devices and hosts merge by addition.

Pure jax.numpy; imports nothing of embjax.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
METRICS = ("cosine", "l2")


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
        gallery_mask=None, query_block: int = 256, gallery_block: int = 4096):
    """Exact top-k gallery items of every query: (scores (Q, k), gallery positions (Q, k)), best first.

    Items with query_index == gallery_index are excluded (leave-one-out; by default the indices are
    positions, so knn(x, x, k) excludes each item itself). Rows of the gallery with gallery_mask False
    are never returned. When fewer than k items are eligible the tail has score −inf and position −1.
    """
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
    ks: tuple[int, ...] = flax.struct.field(pytree_node=False)


def init(ks: Sequence[int] = (1, 5)) -> RetrievalState:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"retrieval.init: ks must be positive integers, got {ks}")
    zero_i = jnp.zeros((), jnp.int32)
    zero_f = jnp.zeros((), jnp.float32)
    return RetrievalState(queries=zero_i, with_relevant=zero_i, hits=jnp.zeros((len(ks),), jnp.int32),
                          ap=zero_f, map_at_r=zero_f, ks=ks)


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
    counted = q_ok & (r > 0)
    hits = jnp.stack([jnp.sum(counted & jnp.any(relevant[:, :k], axis=1)) for k in state.ks]).astype(jnp.int32)
    return state.replace(
        queries=state.queries + jnp.sum(q_ok, dtype=jnp.int32),
        with_relevant=state.with_relevant + jnp.sum(counted, dtype=jnp.int32),
        hits=state.hits + hits,
        ap=state.ap + jnp.sum(jnp.where(counted, ap, 0.0)),
        map_at_r=state.map_at_r + jnp.sum(jnp.where(counted, map_at_r, 0.0)),
    )


def merge(a: RetrievalState, b: RetrievalState) -> RetrievalState:
    if a.ks != b.ks:
        raise ValueError(f"retrieval.merge: different ks {a.ks} vs {b.ks}")
    return jax.tree_util.tree_map(jnp.add, a, b)


def compute(state: RetrievalState) -> dict:
    """{'recall_at_<k>' for each k, 'map', 'map_at_r', 'queries', 'with_relevant'}."""
    n = jnp.maximum(state.with_relevant, 1).astype(jnp.float32)
    out = {f"recall_at_{k}": state.hits[i] / n for i, k in enumerate(state.ks)}
    out.update(map=state.ap / n, map_at_r=state.map_at_r / n, queries=state.queries,
               with_relevant=state.with_relevant)
    return out


def leave_one_out(queries, query_labels, gallery, gallery_labels, *, metric: str = "cosine",
                  query_index=None, gallery_index=None, ks: Sequence[int] = (1, 5),
                  query_block: int = 256) -> dict:
    """Retrieval metrics of every query against the whole gallery, one query block at a time (the
    block's full score rows exist, never all N×N). Indices default to positions, so
    leave_one_out(x, y, x, y) is the usual leave-one-out over one split."""
    _check_metric(metric)
    queries, gallery = jnp.asarray(queries), jnp.asarray(gallery)
    q_lab, g_lab = jnp.asarray(query_labels), jnp.asarray(gallery_labels)
    n_q = queries.shape[0]
    q_idx = _check_index(query_index, n_q, "query_index")
    g_idx = _check_index(gallery_index, gallery.shape[0], "gallery_index")
    qb = max(1, min(int(query_block), n_q))
    state = init(ks)
    state = _leave_one_out(state, queries, q_lab, q_idx, gallery, g_lab, g_idx, metric=metric, qb=qb)
    return compute(state)


@functools.partial(jax.jit, static_argnames=("metric", "qb"))
def _leave_one_out(state, queries, q_lab, q_idx, gallery, g_lab, g_idx, *, metric, qb):
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
        return retrieval_update(st, s, ql, qi, g_lab, g_idx, qm), None

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
