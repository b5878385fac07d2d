"""Streaming verification metrics over genuine / impostor pairs: ROC, TAR at FAR, EER, AUC, and the
10-fold accuracy of the LFW protocol.

A pair (i, j) is *genuine* when both samples share an identity (label) and *impostor* otherwise; its
score is a similarity, larger meaning "more likely the same". Pairs come either from labels (every
unordered pair i < j of a split, by sample index, so self-pairs never count) or from an explicit list
(LFW's pairs.txt).

The streaming state is two score histograms over a fixed range [lo, hi) (genuine and impostor counts
per bin, int32), so a split of N samples is folded block by block without ever holding its N(N−1)/2
scores. Scores outside the range land in the first or last bin (cosine similarity needs none: it is
in [−1, 1]). What this costs, precisely: every threshold the ROC can take is a bin edge, so the curve
is the exact ROC of the scores rounded down to their bin's lower edge. With the default 2¹⁶ bins over
[−1, 1] the edges are 3.1e-5 apart, about 500 float32 ulps of a cosine near 1; two scores closer than
that may be merged into one threshold step, nothing else changes. Counts are exact while a bin and
the cumulative totals stay below 2³¹ pairs (all pairs of about 65,000 samples).

Definitions (thresholds t run over the bin edges, a pair is accepted when its score ≥ t):
  TAR(t) = accepted genuine / genuine,  FAR(t) = accepted impostor / impostor.
  TAR at FAR = f: the TAR at the lowest threshold whose FAR is not above f, i.e. the largest FAR not
    above the target (never interpolated). Because TAR and FAR both fall as t rises, that is also the
    largest TAR among thresholds with FAR ≤ f.
  EER: FRR = 1 − TAR and FAR cross between two consecutive ROC points; the EER is the value where
    the straight segment between those points meets FAR = FRR.
  AUC: the trapezoidal area under (FAR, TAR), which counts a tie between a genuine and an impostor
    pair as one half (the Mann–Whitney statistic, as scikit-learn's roc_auc_score).

The LFW protocol (`kfold_accuracy`) runs on an explicit list of scored pairs: for each fold the
threshold is chosen on the other folds and accuracy measured on the held-out one (insightface's
protocol: 10 folds, threshold on nine, accuracy on the tenth). `sample_pairs` draws such a list
without replacement, so no unordered pair sits in two folds.

Exact metrics. `exact_metrics` builds the ROC at every distinct score (scikit-learn's
roc_curve(drop_intermediate=False)) and reads the metrics off it by the rules above; `sorted_metrics`
gives the same numbers from the two sorted score arrays by binary search, without the curve.
`label_pairs` scores a (queries, gallery) cell over every ORDERED pair (a, b) of distinct samples (query a
against gallery b and b against a are two pairs, so nothing depends on the sample order when the two
sides differ), exactly up to `exact_limit` pairs (2²⁵: about 5,800 samples, 134 MB of float32 scores),
beyond it in the 2¹⁶-bin histograms above.

TAR at FAR, the choice: the ROC point with the largest FAR not above the target, so the reported TAR is
one actually achieved at a FAR no worse than the one claimed (insightface's IJB evaluation takes the
nearest FPR, its LFW code interpolates; on a dense ROC the three differ by less than one ROC step).

Pure jax.numpy and NumPy; imports only embjax.roc (the exact curve, re-exported here).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from embjax.roc import (DEFAULT_FARS, EXACT_LIMIT, curve_auc, curve_eer, curve_tar_at_far,  # noqa: F401
                        exact_metrics, roc_exact, sorted_metrics, tar_at_fars)

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class VerificationState:
    """Histograms of genuine and impostor pair scores over [lo, hi) in `bins` equal bins."""

    genuine: jax.Array  # (bins,) int32
    impostor: jax.Array  # (bins,) int32
    lo: float = flax.struct.field(pytree_node=False)
    hi: float = flax.struct.field(pytree_node=False)


def init(bins: int = 1 << 16, lo: float = -1.0, hi: float = 1.0) -> VerificationState:
    """Empty histograms; the default suits cosine similarity. See the module docstring for what the
    bin width costs."""
    bins = int(bins)
    if bins < 2:
        raise ValueError(f"verification.init: bins must be ≥ 2, got {bins}")
    if not (float(lo) < float(hi)):
        raise ValueError(f"verification.init: need lo < hi for the score range, got lo={lo}, hi={hi}")
    zeros = jnp.zeros((bins,), jnp.int32)
    return VerificationState(genuine=zeros, impostor=zeros, lo=float(lo), hi=float(hi))


def bin_index(state: VerificationState, scores: jax.Array) -> jax.Array:
    """The bin of each score (clipped into [0, bins − 1]); NaN scores go to bin 0."""
    bins = state.genuine.shape[0]
    pos = (jnp.asarray(scores, jnp.float32) - state.lo) * (bins / (state.hi - state.lo))
    pos = jnp.where(jnp.isnan(pos), 0.0, pos)
    return jnp.clip(jnp.floor(pos), 0, bins - 1).astype(jnp.int32)


def update(state: VerificationState, scores, genuine, mask=None) -> VerificationState:
    """Fold pair scores (any shape) with a same-shaped bool `genuine`; `mask` False drops a pair."""
    scores = jnp.asarray(scores)
    genuine = jnp.asarray(genuine, bool)
    if genuine.shape != scores.shape:
        raise ValueError(f"verification.update: genuine has shape {genuine.shape}, scores {scores.shape}")
    keep = jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), scores.shape)
    idx = bin_index(state, scores).reshape(-1)
    gen = (keep & genuine).reshape(-1).astype(jnp.int32)
    imp = (keep & ~genuine).reshape(-1).astype(jnp.int32)
    return state.replace(genuine=state.genuine.at[idx].add(gen), impostor=state.impostor.at[idx].add(imp))


def update_label_pairs(state, scores, query_labels, query_index, gallery_labels, gallery_index,
                       query_mask=None, gallery_mask=None, both_directions: bool = False) -> VerificationState:
    """Fold a (queries, gallery) block of scores as pairs defined by labels.

    By default a pair counts once, when query_index < gallery_index (sample indices, not positions), so
    that folding every block of a split against every block counts each unordered pair of distinct
    samples exactly once and self-pairs never; the query side of a pair is then the sample with the
    smaller index, which makes a cell whose queries and gallery come from different embeddings depend
    on the sample order. `both_directions=True` counts every ordered pair of distinct samples instead
    (what `label_pairs` does).
    """
    scores = jnp.asarray(scores)
    q_lab, g_lab = jnp.asarray(query_labels), jnp.asarray(gallery_labels)
    q_idx, g_idx = jnp.asarray(query_index), jnp.asarray(gallery_index)
    if scores.shape != (q_lab.shape[0], g_lab.shape[0]):
        raise ValueError(f"verification.update_label_pairs: scores {scores.shape} do not match "
                         f"{q_lab.shape[0]} queries × {g_lab.shape[0]} gallery items")
    keep = (q_idx[:, None] != g_idx[None, :]) if both_directions else (q_idx[:, None] < g_idx[None, :])
    if query_mask is not None:
        keep &= jnp.asarray(query_mask, bool)[:, None]
    if gallery_mask is not None:
        keep &= jnp.asarray(gallery_mask, bool)[None, :]
    return update(state, scores, q_lab[:, None] == g_lab[None, :], keep)


def merge(a: VerificationState, b: VerificationState) -> VerificationState:
    """Histograms of the union of the pairs behind `a` and `b`."""
    if a.genuine.shape != b.genuine.shape or (a.lo, a.hi) != (b.lo, b.hi):
        raise ValueError("verification.merge: the states have different bins or score ranges")
    return a.replace(genuine=a.genuine + b.genuine, impostor=a.impostor + b.impostor)


def counts(state: VerificationState) -> tuple[jax.Array, jax.Array]:
    """(genuine pairs, impostor pairs) folded so far."""
    return jnp.sum(state.genuine), jnp.sum(state.impostor)


def roc(state: VerificationState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(far, tar, threshold), each (bins + 1,), from threshold +∞ (nothing accepted) down to the lowest
    bin edge (everything accepted); FAR and TAR are non-decreasing along the arrays."""
    bins = state.genuine.shape[0]
    gen_rev = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(state.genuine[::-1])])
    imp_rev = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(state.impostor[::-1])])
    n_gen = jnp.maximum(gen_rev[-1], 1).astype(jnp.float32)
    n_imp = jnp.maximum(imp_rev[-1], 1).astype(jnp.float32)
    edges = state.lo + (state.hi - state.lo) * jnp.arange(bins, -1, -1, dtype=jnp.float32) / bins
    threshold = edges.at[0].set(jnp.inf)  # accepting bins ≥ k means score ≥ lower edge of bin k
    return imp_rev / n_imp, gen_rev / n_gen, threshold


def tar_at_far(state: VerificationState, fars: Sequence[float] = DEFAULT_FARS) -> jax.Array:
    """TAR at each target FAR: the TAR at the largest achieved FAR not above the target."""
    far, tar, _ = roc(state)
    targets = jnp.asarray(fars, jnp.float32)
    # far is non-decreasing; count how many ROC points have FAR ≤ target: the last of them is the one.
    last = jnp.sum(far[None, :] <= targets[:, None], axis=1) - 1
    return tar[jnp.maximum(last, 0)]


def eer(state: VerificationState) -> jax.Array:
    """Equal error rate, by linear interpolation on the ROC segment where FAR − FRR changes sign."""
    far, tar, _ = roc(state)
    diff = far - (1.0 - tar)  # −1 at the start (FAR 0, FRR 1), +1 at the end; non-decreasing
    k = jnp.clip(jnp.sum(diff < 0) - 1, 0, far.shape[0] - 2)  # last point with FAR < FRR
    d0, d1 = diff[k], diff[k + 1]
    frac = jnp.where(d1 > d0, -d0 / jnp.where(d1 > d0, d1 - d0, 1.0), 0.0)
    return far[k] + frac * (far[k + 1] - far[k])


def auc(state: VerificationState) -> jax.Array:
    """Area under the ROC by the trapezoidal rule (ties count one half)."""
    far, tar, _ = roc(state)
    return jnp.sum((far[1:] - far[:-1]) * (tar[1:] + tar[:-1]) * 0.5)


def compute(state: VerificationState, fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """Every summary at once: {'tar_at_far': (len(fars),), 'eer', 'roc_auc', 'genuine', 'impostor'}."""
    n_gen, n_imp = counts(state)
    return {"tar_at_far": tar_at_far(state, fars), "eer": eer(state), "roc_auc": auc(state),
            "genuine": n_gen, "impostor": n_imp}


# --------------------------------------------------------------------------------------------------
# The LFW protocol on an explicit list of pairs


def best_threshold(scores, same, mask=None) -> tuple[jax.Array, jax.Array]:
    """(threshold, accuracy) maximising the accuracy of "same iff score ≥ threshold" over the pairs.

    Candidates: accepting the top k pairs for k = 0..n (scores sorted descending); the threshold is
    the midpoint between the k-th and (k+1)-th score (+∞ for k = 0, below the lowest for k = n). The
    smallest best k wins a tie. Pairs with equal scores cannot be split: a k inside a run of equal
    scores is not a candidate.
    """
    scores = jnp.asarray(scores, jnp.float32)
    same = jnp.asarray(same, bool)
    keep = jnp.ones(scores.shape, bool) if mask is None else jnp.asarray(mask, bool)
    s = jnp.where(keep, scores, -jnp.inf)
    order = jnp.argsort(-s, stable=True)
    s_sorted = s[order]
    same_sorted = same[order] & keep[order]
    diff_sorted = ~same[order] & keep[order]
    n_same = jnp.sum(same_sorted)
    n_real = jnp.sum(keep)
    # Accepting the top k: correct = accepted genuine + rejected impostor.
    acc_gen = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(same_sorted.astype(jnp.int32))])
    acc_imp = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(diff_sorted.astype(jnp.int32))])
    n_diff = n_real - n_same
    correct = acc_gen + (n_diff - acc_imp)
    n = scores.shape[0]
    ks = jnp.arange(n + 1)
    upper = jnp.concatenate([jnp.full((1,), jnp.inf), s_sorted])  # score of the k-th accepted pair
    lower = jnp.concatenate([s_sorted, jnp.full((1,), -jnp.inf)])  # score of the first rejected one
    valid = (upper > lower) & (ks <= n_real)
    best = jnp.argmax(jnp.where(valid, correct, -1))
    lo_b, hi_b = lower[best], upper[best]
    threshold = jnp.where(jnp.isinf(hi_b), jnp.inf,
                          jnp.where(jnp.isinf(lo_b), hi_b - 1.0, 0.5 * (lo_b + hi_b)))
    return threshold, correct[best] / jnp.maximum(n_real, 1)


def kfold_accuracy(scores, same, folds, n_folds: int | None = None) -> tuple[jax.Array, jax.Array]:
    """LFW-protocol accuracy: for each fold f, the threshold of `best_threshold` on the pairs of the
    other folds, accuracy on the pairs of fold f. Returns (per-fold accuracies, their mean).

    Args:
      scores: (P,) similarity of each pair.
      same: (P,) bool, True for a genuine pair.
      folds: (P,) int fold id of each pair in [0, n_folds), or an int n_folds meaning consecutive
        equal slices (LFW's pairs.txt lists its 10 folds one after the other).
      n_folds: the number of folds of a `folds` array, when known (required under jax.jit, where it
        cannot be read from the traced ids).
    """
    scores = jnp.asarray(scores, jnp.float32)
    same = jnp.asarray(same, bool)
    if scores.ndim != 1 or same.shape != scores.shape:
        raise ValueError(f"verification.kfold_accuracy: scores {scores.shape} and same {same.shape} "
                         "must be matching 1-D arrays of pairs")
    p = scores.shape[0]
    if isinstance(folds, int):
        if not 2 <= folds <= p:
            raise ValueError(f"verification.kfold_accuracy: need 2 ≤ folds ≤ {p} pairs, got {folds}")
        n_folds = folds
        fold_of = (jnp.arange(p) * n_folds) // p
    else:
        fold_of = jnp.asarray(folds, jnp.int32)
        if fold_of.shape != scores.shape:
            raise ValueError(f"verification.kfold_accuracy: folds {fold_of.shape} must match scores {scores.shape}")
        n_folds = int(jnp.max(fold_of)) + 1 if n_folds is None else int(n_folds)

    def one(f):
        threshold, _ = best_threshold(scores, same, fold_of != f)
        test = fold_of == f
        correct = jnp.sum(test & ((scores >= threshold) == same))
        return correct / jnp.maximum(jnp.sum(test), 1)

    per_fold = jax.vmap(one)(jnp.arange(n_folds))
    return per_fold, jnp.mean(per_fold)


def accumulator(read, bins: int = 1 << 16, lo: float = -1.0, hi: float = 1.0):
    """Score histograms as an engine accumulator: `read(outputs, batch, aux)` gives `(scores, genuine)`
    with the batch's rows on their leading axis (e.g. each row's scores against a gallery in `aux`);
    padding rows count nowhere."""
    from embjax.accumulator import Accumulator

    def fold(state, outputs, batch, aux):
        scores, genuine = read(outputs, batch, aux)
        keep = batch["mask"].reshape(batch["mask"].shape + (1,) * (jnp.ndim(scores) - 1))
        return update(state, scores, genuine, keep)

    return Accumulator(empty=lambda: init(bins, lo, hi), update=fold, merge=merge, compute=compute)


def sample_pairs(labels, per_fold: int, folds: int = 10, seed: int = 0, both_orders: bool = True):
    """Pairs for the k-fold protocol: each fold `per_fold` genuine and `per_fold` impostor pairs of
    distinct samples, drawn uniformly WITHOUT replacement over the unordered pairs, so that no pair is
    in two folds (a pair in the training folds and the test fold would leak its threshold). With
    `both_orders` every drawn pair {a, b} is listed as (a, b) and (b, a) in its fold, so a cell whose
    two sides come from different embeddings scores it in both directions.

    Returns (i, j, same, fold) arrays. Raises ValueError when the labels hold too few pairs."""
    labels = np.asarray(labels).reshape(-1)
    per_fold, folds = int(per_fold), int(folds)
    if per_fold < 1 or folds < 2:
        raise ValueError(f"verification.sample_pairs: need per_fold ≥ 1 and folds ≥ 2, got {per_fold}, {folds}")
    want = per_fold * folds
    rng = np.random.default_rng(seed)
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    n = labels.size
    n_gen = int(np.sum(sizes * (sizes - 1) // 2))
    n_imp = n * (n - 1) // 2 - n_gen
    if n_gen < want or n_imp < want:
        raise ValueError(f"verification.sample_pairs: {folds} folds of {per_fold} genuine and {per_fold} impostor "
                         f"pairs need {want} of each, but the {n} labelled samples hold {n_gen} genuine and {n_imp} "
                         "impostor pairs; lower the pairs per fold or use more samples")

    def draw(pick, total):
        if want > total // 2:  # near exhaustion: enumerate, then choose without replacement
            every = [p for p in _all_pairs(labels, pick is _pick_genuine)]
            chosen = rng.choice(len(every), want, replace=False)
            return [every[c] for c in chosen]
        seen, out = set(), []
        while len(out) < want:
            a, b = pick()
            key = (min(a, b), max(a, b))
            if a != b and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    weights = (sizes * (sizes - 1) / 2) / max(n_gen, 1)

    def _pick_genuine():
        c = rng.choice(len(members), p=weights)
        a, b = rng.choice(members[c], 2, replace=False)
        return int(a), int(b)

    def _pick_impostor():
        while True:
            a, b = rng.integers(n, size=2)
            if inverse[a] != inverse[b]:
                return int(a), int(b)

    def _all_pairs(lab, genuine):
        for a in range(n):
            for b in range(a + 1, n):
                if (lab[a] == lab[b]) == genuine:
                    yield a, b

    gen = draw(_pick_genuine, n_gen)
    imp = draw(_pick_impostor, n_imp)
    pi, pj, same, fold = [], [], [], []
    for f in range(folds):
        for group, is_same in ((gen, True), (imp, False)):
            for a, b in group[f * per_fold:(f + 1) * per_fold]:
                orders = ((a, b), (b, a)) if both_orders else ((a, b),)
                for x, y in orders:
                    pi.append(x), pj.append(y), same.append(is_same), fold.append(f)
    return np.asarray(pi), np.asarray(pj), np.asarray(same), np.asarray(fold)


# --------------------------------------------------------------------------------------------------
# Exact metrics of a (queries, gallery) cell (the curve itself: embjax.roc)

def label_pairs(queries, gallery, labels, index=None, *, fars: Sequence[float] = DEFAULT_FARS,
                metric: str = "cosine", exact_limit: int = EXACT_LIMIT, bins: int = 1 << 16,
                block: int = 1024, roc_fars=None, auc: bool = True) -> dict:
    """Verification of a (queries, gallery) cell over every ordered pair (a, b) of distinct samples:
    row a of `queries` against row b of `gallery` (row k of both is sample index[k], labels[k]).

    Exact (`sorted_metrics`: TAR at FAR and EER as `exact_metrics`) up to `exact_limit` pairs, else the
    binned histograms over [−1, 1] (cosine only). When queries and gallery are equal arrays, the pairs
    (a, b) and (b, a) have one score, so each unordered pair is scored once and counted twice (every
    rate as over the ordered pairs, half the work). Returns {'tar_at_far', 'eer', 'roc_auc', 'genuine',
    'impostor', 'exact'} ('roc_auc' only with `auc`), and 'roc_tar' (the TAR at each of `roc_fars`) when
    `roc_fars` is given."""
    q = np.asarray(queries, np.float32)
    g = np.asarray(gallery, np.float32)
    labels = np.asarray(labels).reshape(-1)
    n = labels.size
    if q.ndim != 2 or g.shape != (n, q.shape[1]) or q.shape[0] != n:
        raise ValueError(f"verification.label_pairs: queries {q.shape} and gallery {g.shape} must be (samples, dim) "
                         f"for the same {n} labelled samples")
    index = np.arange(n) if index is None else np.asarray(index).reshape(-1)
    symmetric = q is g or np.array_equal(q, g)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        g = q if symmetric else g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    elif metric != "dot":
        raise ValueError(f"verification.label_pairs: metric must be 'cosine' or 'dot', got {metric!r}")
    pairs = n * (n - 1)
    exact = pairs <= int(exact_limit)
    if not exact and metric != "cosine":
        raise ValueError("verification.label_pairs: beyond exact_limit the histograms need cosine scores in [−1, 1]")
    gen_parts, imp_parts = [], []
    hist_g = hist_i = None
    if not exact:
        hist_g, hist_i = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        s = q[lo:hi] @ g.T
        other = (index[lo:hi, None] < index[None, :]) if symmetric else (index[lo:hi, None] != index[None, :])
        same = labels[lo:hi, None] == labels[None, :]
        if exact:
            gen_parts.append(s[other & same])
            imp_parts.append(s[other & ~same])
        else:
            pos = np.clip(np.floor((s + 1.0) * (bins / 2.0)), 0, bins - 1).astype(np.int64)
            hist_g += np.bincount(pos[other & same], minlength=bins)
            hist_i += np.bincount(pos[other & ~same], minlength=bins)
    times = 2 if symmetric else 1
    if exact:
        gen, imp = np.sort(np.concatenate(gen_parts)), np.sort(np.concatenate(imp_parts))
        out = sorted_metrics(gen, imp, fars, auc=auc)
        out["genuine"], out["impostor"] = times * gen.size, times * imp.size
        if roc_fars is not None:
            out["roc_tar"] = tar_at_fars(gen, imp, roc_fars)
    else:
        state = VerificationState(genuine=jnp.asarray(times * hist_g, jnp.int32),
                                  impostor=jnp.asarray(times * hist_i, jnp.int32), lo=-1.0, hi=1.0)
        m = compute(state, fars)
        out = {"tar_at_far": np.asarray(m["tar_at_far"]), "eer": float(m["eer"]), "roc_auc": float(m["roc_auc"]),
               "genuine": int(times * hist_g.sum()), "impostor": int(times * hist_i.sum())}
        if roc_fars is not None:
            out["roc_tar"] = np.asarray(tar_at_far(state, roc_fars))
    out["exact"] = exact
    return out
