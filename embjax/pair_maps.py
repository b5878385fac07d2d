"""Every map family for every ordered pair of models, from one set of joint statistics.

`fit_families` solves affine least squares, relative ridge, scaled orthogonal Procrustes and reduced-rank
maps (embjax.maps) for every ordered pair i ≠ j, and the reduced-rank maps of a rank sweep, collecting
the warnings the solves raise (ill-conditioned blocks get the smallest workable ridge and say so).
`hub_families` solves canonical hubs (embjax.canonical: GCCA, generalized Procrustes) at given ranks and
composes every pair's source → hub → target map, so a hub scores wherever a direct map does;
`hub_and_learned` gives the open-set study those and the learned maps (embjax.learned_maps, trained from
the affine maps) as functions of its evaluation embeddings.
Decompositions are the slow part on a CPU (a 1280² SVD took 40 s on a loaded 2-core machine), so each is
done once: one SVD per unordered pair serves both Procrustes directions, and one eigendecomposition per
ordered pair serves the reduced-rank family and the whole sweep. Statistics in, arrays out (the learned
maps also read the fit features).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from embjax import canonical, cells, maps

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


HUB_METHODS = ("gcca", "procrustes")


def hub_family(method: str, k: int) -> str:
    """The name of a hub's family: `gcca_64`, `procrustes_hub_64` (the direct family is `procrustes`)."""
    return f"{method}_{k}" if method == "gcca" else f"{method}_hub_{k}"


def hub_families(st, ranks, methods=HUB_METHODS, *, ridge: float = 0.0, iters: int = 500,
                 eigensolver: str = "divide_and_conquer"):
    """Canonical hubs (embjax.canonical) of every method at every rank, from one set of joint statistics
    (`eigensolver`: the eigendecomposition of both methods, see canonical.gcca).

    Returns ({family: {(i, j): (W, b)}}: source → hub → target composed into one affine map for every
    ordered pair i ≠ j, {family: Hub} with NumPy arrays (its encoders give the hub coordinates), and
    {method: CPU seconds of its solve}); the family names are `hub_family(method, k)`."""
    unknown = sorted(set(methods) - set(HUB_METHODS))
    if unknown:
        raise ValueError(f"pair_maps.hub_families: unknown methods {unknown}; choose from {HUB_METHODS}")
    ranks = sorted({int(k) for k in ranks})
    solvers = {"gcca": lambda: canonical.gcca(st, ranks, ridge=ridge, eigensolver=eigensolver)[0],
               "procrustes": lambda: canonical.procrustes(st, ranks, ridge=ridge, iters=iters,
                                                          eigensolver=eigensolver)[0]}
    out, hubs, cpu = {}, {}, {}
    for method in methods:
        t = time.process_time()
        solved = solvers[method]()
        for k in ranks:
            name = hub_family(method, k)
            hubs[name] = canonical.Hub(*(tuple(np.asarray(a) for a in part) for part in
                                         (solved[k].encoders, solved[k].decoders, solved[k].means)))
            out[name] = {key: (np.asarray(w), np.asarray(b)) for key, (w, b) in canonical.pair_maps(solved[k]).items()}
        cpu[method] = time.process_time() - t
    return out, hubs, cpu


def hub_and_learned(st, native, affine, *, hub_ranks=(), hub_methods=HUB_METHODS, hub_ridge=0.0,
                    procrustes_iters=500, learned=None, fit_features=None, heads=None, memo=None, log=None):
    """The open-set study's families beyond the direct maps, applied to evaluation embeddings `native` (one
    (n, d_i) array per model): canonical hubs at `hub_ranks` (clipped to the joint width; `hub_families`),
    and learned maps (`learned`: a dict of embjax.learned_maps.fit_pairs' keywords plus "families"),
    started at the closed-form `affine` maps and trained on `fit_features()` = (features per model, labels)
    with the target `heads` for the task loss (`memo`, `log`: see learned_maps.fit_families).

    Returns (mapped(family, i, j): model i's embeddings mapped to model j, {hub family: [hub coordinates
    per model]}, {family: the settings of embjax.cells.settings_grid it is scored in: "mapped" and, for a
    hub, "hub"}, {"hub_maps": ranks and methods, "learned_maps": config and final losses, "seconds": the hub
    solves' CPU seconds, the learned maps' training seconds and the closed-form affine solve's}, entries
    present only for families asked for)."""
    from embjax import learned_maps as lm

    n, apply, encoded, settings, info = len(native), {}, {}, {}, {}
    ranks = sorted({min(int(k), sum(st.dims)) for k in hub_ranks})
    if ranks:
        hub_maps, hubs, cpu = hub_families(st, ranks, hub_methods, ridge=hub_ridge, iters=procrustes_iters)
        for f, m in hub_maps.items():
            apply[f] = lambda i, j, m=m: native[i] @ m[(i, j)][0] + m[(i, j)][1]
            encoded[f] = [np.asarray(canonical.encode(hubs[f], i, native[i])) for i in range(n)]
            settings[f] = ("mapped", cells.HUB)
        info["hub_maps"] = {"ranks": ranks, "methods": list(hub_methods)}
        info["seconds"] = {"hub_solve_cpu": cpu}
    cfg = dict(learned or {})
    families = tuple(cfg.pop("families", ()))
    if families:
        if cfg.get("loss", "task") == "task" and (heads is None or any(h is None for h in heads)):
            raise ValueError("learned.loss=task needs every model's classifier head; use learned.loss=regression")
        t = time.perf_counter()
        maps.affine_all(st, ridge=0.0)  # the closed form's solve, timed beside the training
        closed_form = time.perf_counter() - t
        feats, labels = fit_features()
        params, trained = lm.fit_families(feats, labels, heads, affine, families, memo=memo, log=log, **cfg)
        for f, p in params.items():
            apply[f] = lambda i, j, p=p: np.asarray(lm.apply(p[(i, j)], native[i]))
            settings[f] = ("mapped",)
        info["learned_maps"] = {"config": {**cfg, "families": list(families)}, "final_loss": {
            f: [[v["final_loss"].get((i, j)) for j in range(n)] for i in range(n)] for f, v in trained.items()}}
        info.setdefault("seconds", {}).update({"closed_form_affine": closed_form,
                                               "learned_training": {f: v["seconds"] for f, v in trained.items()}})
    return (lambda f, i, j: apply[f](i, j)), encoded, settings, info
