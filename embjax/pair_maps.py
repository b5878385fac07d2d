"""Every map family for every ordered pair of models, from one set of joint statistics.

`fit_families` solves affine least squares, relative ridge, scaled orthogonal Procrustes and reduced-rank
maps (embjax.maps) for every ordered pair i ≠ j, and the reduced-rank maps of a rank sweep, collecting
the warnings the solves raise (ill-conditioned blocks get the smallest workable ridge and say so).
`hub_families` solves canonical hubs (embjax.canonical: GCCA, generalized Procrustes) at given ranks
(`solve_hubs`) and composes every pair's source → hub → target map (`hub_maps`), so a hub scores wherever a
direct map does; `hub_and_learned` gives the open-set study those and the learned maps (embjax.learned_maps,
trained from the affine maps) as functions of its evaluation embeddings, the hubs and the learned maps
through the engine's memo.
Decompositions are the slow part on a CPU (a 1280² SVD took 40 s on a loaded 2-core machine), so each is
done once: one SVD per unordered pair serves both Procrustes directions, and one eigendecomposition per
ordered pair serves the reduced-rank family and the whole sweep. Statistics in, arrays out (the learned
maps also read the fit features).
"""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np

from embjax import canonical, cells, maps

FAMILIES = ("affine", "ridge", "procrustes", "reduced_rank")


def fit_families(st, names, dims, *, ridge: float, rank: int, families=FAMILIES, sweep_ranks=()):
    """({family: {(i, j): (W, b)}} for every ordered pair i ≠ j, the sorted distinct warning messages,
    {(i, j): [(W_k, b_k) for k in sweep_ranks]} when "reduced_rank" is among `families`, and {"affine":
    wall seconds of the closed-form affine solve (every family's starting point; compilation included)})."""
    n = len(dims)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    out, sweeps = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", maps.IllConditionedWarning)
        t = time.perf_counter()
        affine = jax.block_until_ready(maps.affine_all(st, ridge=0.0, names=names))
        seconds = {"affine": time.perf_counter() - t}
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
    maps_out = {f: {k: (np.asarray(w), np.asarray(b)) for k, (w, b) in m.items()} for f, m in out.items()}
    return maps_out, messages, sweeps, seconds


HUB_METHODS = ("gcca", "procrustes")


def hub_family(method: str, k: int) -> str:
    """The name of a hub's family: `gcca_64`, `procrustes_hub_64` (the direct family is `procrustes`)."""
    return f"{method}_{k}" if method == "gcca" else f"{method}_hub_{k}"


def solve_hubs(st, ranks, methods=HUB_METHODS, *, ridge: float = 0.0, iters: int = 500,
               eigensolver: str = "divide_and_conquer"):
    """Canonical hubs (embjax.canonical) of every method at every rank, from one set of joint statistics
    (`eigensolver`: the eigendecomposition of both methods, see canonical.gcca). Returns ({family: Hub
    with NumPy arrays}, {method: CPU seconds of its solve}); the family names are `hub_family(method, k)`."""
    unknown = sorted(set(methods) - set(HUB_METHODS))
    if unknown:
        raise ValueError(f"pair_maps.hub_families: unknown methods {unknown}; choose from {HUB_METHODS}")
    ranks = sorted({int(k) for k in ranks})
    solvers = {"gcca": lambda: canonical.gcca(st, ranks, ridge=ridge, eigensolver=eigensolver)[0],
               "procrustes": lambda: canonical.procrustes(st, ranks, ridge=ridge, iters=iters,
                                                          eigensolver=eigensolver)[0]}
    hubs, cpu = {}, {}
    for method in methods:
        t = time.process_time()
        solved = solvers[method]()
        for k in ranks:
            hubs[hub_family(method, k)] = canonical.Hub(*(tuple(np.asarray(a) for a in part) for part in
                                                          (solved[k].encoders, solved[k].decoders, solved[k].means)))
        cpu[method] = time.process_time() - t
    return hubs, cpu


def hub_maps(hubs: dict) -> dict:
    """{family: {(i, j): (W, b)}}: each hub's source → hub → target maps, composed into one affine map for
    every ordered pair i ≠ j (canonical.pair_maps)."""
    return {f: {key: (np.asarray(w), np.asarray(b)) for key, (w, b) in canonical.pair_maps(hub).items()}
            for f, hub in hubs.items()}


def hub_families(st, ranks, methods=HUB_METHODS, *, ridge: float = 0.0, iters: int = 500,
                 eigensolver: str = "divide_and_conquer"):
    """`solve_hubs` and `hub_maps`: ({family: {(i, j): (W, b)}}, {family: Hub} with NumPy arrays (its
    encoders give the hub coordinates), {method: CPU seconds of its solve})."""
    hubs, cpu = solve_hubs(st, ranks, methods, ridge=ridge, iters=iters, eigensolver=eigensolver)
    return hub_maps(hubs), hubs, cpu


def _memo_hubs(memo, solve):
    """`solve()` = ({family: Hub}, {method: seconds}) through `memo` (the engine's: a resumed run loads
    the hubs instead of solving them again), or solved here when there is no memo."""
    if memo is None:
        return solve()

    def saved():
        hubs, cpu = solve()
        return {"hubs": {f: {"encoders": h.encoders, "decoders": h.decoders, "means": h.means}
                         for f, h in hubs.items()}, "cpu": cpu}

    value = memo("hubs", saved)
    return ({f: canonical.Hub(**parts) for f, parts in value["hubs"].items()},
            {m: float(s) for m, s in value["cpu"].items()})


def hub_and_learned(st, native, affine, *, hub_ranks=(), hub_methods=HUB_METHODS, hub_ridge=0.0,
                    procrustes_iters=500, learned=None, fit_features=None, heads=None, affine_seconds=None,
                    memo=None, log=None):
    """The open-set study's families beyond the direct maps, applied to evaluation embeddings `native` (one
    (n, d_i) array per model): canonical hubs at `hub_ranks` (clipped to the joint width; `hub_families`),
    and learned maps (`learned`: a dict of embjax.learned_maps.fit_pairs' keywords plus "families"),
    started at the closed-form `affine` maps and trained on `fit_features()` = (features per model, labels)
    with the target `heads` for the task loss (`log`: see learned_maps.fit_families). `memo`: the engine's
    memo, through which the hubs (memo "hubs") and the learned maps go, so a resumed run solves neither again.
    `affine_seconds`: what the caller's solve of `affine` took (`fit_families`' seconds["affine"]), reported
    beside the training time (no map is solved twice for it).

    Returns (mapped(family, i, j): model i's embeddings mapped to model j, {hub family: [hub coordinates
    per model]}, {family: the settings of embjax.cells.settings_grid it is scored in: "mapped" and, for a
    hub, "hub"}, {"hub_maps": ranks and methods, "learned_maps": config and final losses, "seconds": the hub
    solves' CPU seconds, the learned maps' training seconds and the closed-form affine solve's}, entries
    present only for families asked for)."""
    from embjax import learned_maps as lm

    n, apply, encoded, settings, info = len(native), {}, {}, {}, {}
    ranks = sorted({min(int(k), sum(st.dims)) for k in hub_ranks})
    if ranks:
        hubs, cpu = _memo_hubs(memo, lambda: solve_hubs(st, ranks, hub_methods, ridge=hub_ridge,
                                                        iters=procrustes_iters))
        for f, m in hub_maps(hubs).items():
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
        feats, labels = fit_features()
        params, trained = lm.fit_families(feats, labels, heads, affine, families, memo=memo, log=log, **cfg)
        for f, p in params.items():
            apply[f] = lambda i, j, p=p: np.asarray(lm.apply(p[(i, j)], native[i]))
            settings[f] = ("mapped",)
        info["learned_maps"] = {"config": {**cfg, "families": list(families)}, "final_loss": {
            f: [[v["final_loss"].get((i, j)) for j in range(n)] for i in range(n)] for f, v in trained.items()}}
        seconds = info.setdefault("seconds", {})
        if affine_seconds is not None:
            seconds["closed_form_affine"] = float(affine_seconds)
        seconds["learned_training"] = {f: v["seconds"] for f, v in trained.items()}
    return (lambda f, i, j: apply[f](i, j)), encoded, settings, info
