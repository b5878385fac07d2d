"""Every map family for every ordered pair of models, from one set of joint statistics.

`fit_families` solves affine least squares, relative ridge, scaled orthogonal Procrustes and reduced-rank
maps (embjax.maps) for every ordered pair i ≠ j, and the reduced-rank maps of a rank sweep, collecting
the warnings the solves raise (ill-conditioned blocks get the smallest workable ridge and say so).
Decompositions are the slow part on a CPU (a 1280² SVD took 40 s on a loaded 2-core machine), so each is
done once: one SVD per unordered pair serves both Procrustes directions, and one eigendecomposition per
ordered pair serves the reduced-rank family and the whole sweep. Pure: statistics in, arrays out.
"""

from __future__ import annotations

import warnings

import numpy as np

from embjax import maps

FAMILIES = ("affine", "ridge", "procrustes", "reduced_rank")


def fit_families(st, names, dims, *, ridge: float, rank: int, families=FAMILIES, sweep_ranks=()):
    """({family: {(i, j): (W, b)}} for every ordered pair i ≠ j, the sorted distinct warning messages, and
    {(i, j): [(W_k, b_k) for k in sweep_ranks]} when "reduced_rank" is among `families`)."""
    n = len(dims)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    out, sweeps = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", maps.IllConditionedWarning)
        affine = maps.affine_all(st, ridge=0.0, names=names)
        if "affine" in families:
            out["affine"] = affine
        if "ridge" in families:
            out["ridge"] = maps.affine_all(st, ridge=float(ridge), names=names)
        if "procrustes" in families:
            out["procrustes"] = {}
            for i, j in pairs:
                if i < j:
                    out["procrustes"][(i, j)], out["procrustes"][(j, i)] = maps.scaled_procrustes_both(st, i, j)
        if "reduced_rank" in families:
            out["reduced_rank"] = {}
            for i, j in pairs:
                width = min(dims[i], dims[j])
                ranks = [max(1, min(int(rank), width))] + [int(r) for r in sweep_ranks]
                maps_k = maps.truncate_ranks(st, i, j, affine[(i, j)][0], [min(r, width) for r in ranks])
                out["reduced_rank"][(i, j)] = maps_k[0]
                sweeps[(i, j)] = [(np.asarray(w), np.asarray(b)) for w, b in maps_k[1:]]
    messages = sorted({str(w.message) for w in caught})
    return {f: {k: (np.asarray(w), np.asarray(b)) for k, (w, b) in m.items()} for f, m in out.items()}, messages, sweeps
