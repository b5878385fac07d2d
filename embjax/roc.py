"""Exact ROC metrics of genuine and impostor scores: the curve at every distinct score and what
verification reports from it (TAR at FAR, EER, AUC; definitions in embjax.verification's docstring).

`roc_exact` / `exact_metrics` build the curve (scikit-learn's roc_curve(drop_intermediate=False));
`sorted_metrics` / `tar_at_fars` give the same numbers from the two sorted score arrays by binary search,
without the curve (what embjax.verification.label_pairs uses). Pure NumPy; imports nothing of embjax.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_FARS = (1e-1, 1e-2, 1e-3, 1e-4)

EXACT_LIMIT = 1 << 25


def roc_exact(genuine, impostor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, threshold) at every distinct score, from threshold +∞ (nothing accepted) down to the
    lowest score (everything accepted): the points of scikit-learn's roc_curve(drop_intermediate=False)."""
    # Sorted in their own precision (float32 scores stay float32: half the memory, the same counts).
    dtype = np.result_type(np.asarray(genuine).dtype, np.asarray(impostor).dtype, np.float32)
    gen = np.sort(np.asarray(genuine, dtype).reshape(-1))
    imp = np.sort(np.asarray(impostor, dtype).reshape(-1))
    if gen.size == 0 or imp.size == 0:
        raise ValueError(f"verification.roc_exact: need genuine and impostor pairs, got {gen.size} and {imp.size}")
    if not (np.all(np.isfinite(gen)) and np.all(np.isfinite(imp))):
        raise ValueError("verification.roc_exact: scores hold NaN or an infinity; check the embeddings")
    thr = np.unique(np.concatenate([gen, imp]))[::-1]  # distinct scores, descending
    tp = gen.size - np.searchsorted(gen, thr, side="left")  # genuine scores ≥ threshold
    fp = imp.size - np.searchsorted(imp, thr, side="left")
    far = np.concatenate([[0.0], fp / imp.size])
    tar = np.concatenate([[0.0], tp / gen.size])
    return far, tar, np.concatenate([[np.inf], thr])


def curve_tar_at_far(far, tar, fars=DEFAULT_FARS) -> np.ndarray:
    """TAR at the largest ROC FAR not above each target (far non-decreasing)."""
    last = np.searchsorted(np.asarray(far), np.asarray(fars, np.float64), side="right") - 1
    return np.asarray(tar)[np.maximum(last, 0)]


def curve_eer(far, tar) -> float:
    """EER: where the ROC segment on which FAR − FRR changes sign meets FAR = FRR (as `eer`)."""
    far, tar = np.asarray(far, np.float64), np.asarray(tar, np.float64)
    diff = far - (1.0 - tar)
    k = int(np.clip(np.sum(diff < 0) - 1, 0, far.size - 2))
    d0, d1 = diff[k], diff[k + 1]
    frac = -d0 / (d1 - d0) if d1 > d0 else 0.0
    return float(far[k] + frac * (far[k + 1] - far[k]))


def curve_auc(far, tar) -> float:
    far, tar = np.asarray(far, np.float64), np.asarray(tar, np.float64)
    return float(np.sum((far[1:] - far[:-1]) * (tar[1:] + tar[:-1]) * 0.5))


def exact_metrics(genuine, impostor, fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """{'tar_at_far', 'eer', 'roc_auc', 'genuine', 'impostor', 'far', 'tar'} from the exact ROC."""
    far, tar, _ = roc_exact(genuine, impostor)
    return {"tar_at_far": curve_tar_at_far(far, tar, fars), "eer": curve_eer(far, tar), "roc_auc": curve_auc(far, tar),
            "genuine": int(np.size(genuine)), "impostor": int(np.size(impostor)), "far": far, "tar": tar}


def sorted_metrics(genuine_sorted, impostor_sorted, fars: Sequence[float] = DEFAULT_FARS, auc: bool = True) -> dict:
    """`exact_metrics`' numbers from the genuine and impostor scores sorted ascending (finite), without
    building the ROC: every ROC point the metrics need is a count, found by binary search.

    TAR at FAR f: with K the largest impostor count whose FAR K/impostor is not above f, the accepted
    thresholds are those above the (K+1)-th largest impostor score x, and the lowest of them accepts the
    genuine scores > x. EER: the last ROC point with FAR < FRR is the smallest distinct score t with
    FAR(t) − FRR(t) < 0 (a monotone function of t: a binary search in each sorted array), the next point
    is the largest score below t; the same segment and float64 arithmetic as `curve_eer`, so TAR at FAR
    and EER equal `exact_metrics`' bit for bit. AUC: the Mann–Whitney statistic in integer counts (ties
    one half), which the trapezoid over the exact ROC computes up to float64 rounding (~1e-15); `auc`
    False leaves it out (two searches of every genuine score: the costliest part)."""
    gen, imp = np.asarray(genuine_sorted), np.asarray(impostor_sorted)
    ng, ni = gen.size, imp.size
    if ng == 0 or ni == 0:
        raise ValueError(f"verification.sorted_metrics: need genuine and impostor pairs, got {ng} and {ni}")
    if not (np.isfinite(gen[0]) and np.isfinite(gen[-1]) and np.isfinite(imp[0]) and np.isfinite(imp[-1])):
        raise ValueError("verification.sorted_metrics: scores hold NaN or an infinity; check the embeddings")

    def rates(t):  # (FAR, TAR) of accepting scores ≥ t, as exact_metrics computes them
        return (ni - int(np.searchsorted(imp, t, "left"))) / ni, (ng - int(np.searchsorted(gen, t, "left"))) / ng

    out = {"tar_at_far": tar_at_fars(gen, imp, fars), "genuine": int(ng), "impostor": int(ni)}
    below = lambda t: (lambda fr, tr: fr - (1.0 - tr) < 0)(*rates(t))  # noqa: E731

    def first_below(a):  # smallest index i with below(a[i]) (a suffix of the sorted array), or a.size
        lo, hi = 0, a.size
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if below(a[mid]) else (mid + 1, hi)
        return lo
    cands = [a[i] for a in (gen, imp) for i in (first_below(a),) if i < a.size]
    if cands:  # the last point with FAR < FRR is at threshold min(cands); the next is the score below it
        t0 = min(cands)
        prev = [a[k - 1] for a in (gen, imp) for k in (int(np.searchsorted(a, t0, "left")),) if k > 0]
        (f0, r0), (f1, r1) = rates(t0), rates(max(prev))
    else:  # not even the highest score has FAR < FRR: the segment from "nothing accepted" to it
        (f0, r0), (f1, r1) = (0.0, 0.0), rates(max(gen[-1], imp[-1]))
    d0, d1 = f0 - (1.0 - r0), f1 - (1.0 - r1)
    frac = -d0 / (d1 - d0) if d1 > d0 else 0.0
    out["eer"] = float(f0 + frac * (f1 - f0))
    if not auc:
        return out
    # Integer keys in the floats' order search faster than the floats (−0.0 and +0.0 tie as floats do).
    gen_k, imp_k = (_order_keys(a) for a in (gen, imp))
    twice_u = int(np.searchsorted(imp_k, gen_k, "left").sum()) + int(np.searchsorted(imp_k, gen_k, "right").sum())
    out["roc_auc"] = twice_u / (2 * ng * ni)
    return out


def _order_keys(x) -> np.ndarray:
    """int32 (float32 scores) or int64 keys in the order of the values, with −0.0 equal to +0.0."""
    x = np.asarray(x)
    x = x.astype(np.float32 if x.dtype == np.float32 else np.float64) + 0.0  # −0.0 + 0.0 is +0.0
    bits = x.view(np.int32 if x.dtype == np.float32 else np.int64)
    return bits ^ ((bits >> (bits.itemsize * 8 - 1)) & np.iinfo(bits.dtype).max)


def tar_at_fars(genuine_sorted, impostor_sorted, fars) -> np.ndarray:
    """TAR at each target FAR (the largest ROC FAR not above it) from sorted scores (`sorted_metrics`)."""
    gen, imp = np.asarray(genuine_sorted), np.asarray(impostor_sorted)
    ng, ni = gen.size, imp.size
    out = np.zeros(len(fars))
    for n, f in enumerate(np.asarray(fars, np.float64).reshape(-1)):
        if f < 0:
            continue  # no ROC point has a FAR below 0: the first one (nothing accepted, TAR 0), as exact_metrics
        k = min(int(np.floor(f * ni)), ni)
        while k < ni and (k + 1) / ni <= f:
            k += 1
        while k > 0 and k / ni > f:
            k -= 1
        out[n] = 1.0 if k >= ni else (ng - int(np.searchsorted(gen, imp[ni - 1 - k], "right"))) / ng
    return out
