r"""Open-set verification and retrieval through mapped embeddings ("Exploring the Interchangeability of
CNN Embedding Spaces", face-recognition part), with representation similarity from the same pass.

  python -m experiments.open_set                                     # the five zoo models, Fashion-MNIST
  python -m experiments.open_set --config=experiments/configs/open_set.py:effnet_lite
  python -m experiments.open_set --config=experiments/configs/open_set.py:lfw --config.data_dir=/data/tfds

Maps are fit without labels on images of some classes (identities); every metric is measured on images
of other classes, so neither the backbones' heads nor the maps have seen an evaluation identity.

Passes on the engine (embjax.extract), then the metrics (embjax.cells):
  1. fit:  joint statistics (embjax.stats) of every model's pre-logit embedding over the fit split, and
           of its nested prefixes for the fit-size curve (stats.prefix_accumulator: one pass);
  2. maps: every ordered pair A→B and family affine / ridge / procrustes / reduced_rank (embjax.maps);
  3. eval: native and mapped evaluation embeddings into the run's feature store (workdir/state/store/eval);
  4. the grid of settings × families × pairs (cells.settings_grid: native, mapped, both_mapped, naive),
     canonical hubs (GCCA, generalized Procrustes from the fit statistics: mapped A → hub → B, and both
     sides matched inside the hub) and learned maps (trained on the fit features) in a grid of their own
     (pair_maps.hub_and_learned), similarity (embjax.similarity), the fit-size and rank curves, each
     memoized for a resumed run.
Metrics (cosine): verification over every ordered pair of distinct evaluation samples, genuine when
their labels agree (exact TAR at FAR, EER, ROC AUC), 10-fold accuracy over balanced disjoint pairs (LFW
protocol); leave-one-out retrieval (Recall@k, mAP, MAP@R, R-precision). docs/open_set.md has the details.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments import common

FAMILIES = ("affine", "ridge", "procrustes", "reduced_rank")  # embjax.pair_maps.FAMILIES
SETTINGS = ("native", "mapped", "both_mapped", "naive")  # embjax.cells.SETTINGS


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    import jax.numpy as jnp

    from embjax import cells, data, extract, pair_maps, stats

    fit_src, eval_src = data.class_disjoint(
        [(src, split, spec, f"{side}_classes", n) for src, split, spec, side, n in zip(
            data.sources(config, config.fit_split, config.eval_split), (config.fit_split, config.eval_split),
            (config.fit_classes, config.eval_classes), ("fit", "eval"), (config.num_fit, config.num_eval))],
        config.dataset)
    zoo_classes = config.zoo_classes or config.fit_classes
    engine = common.engine(config, workdir, zoo_data=functools.cache(functools.partial(_zoo_data, config, zoo_classes)),
                           minimum=2, dataset_tag=f"{config.dataset}:{config.fit_split}:classes={zoo_classes}")
    names, dims = [m.name for m in engine.members], [m.feature_dim for m in engine.members]
    features = {m: ("pre_logits",) for m in names}

    # 1. Joint statistics over the fit split, and over its nested prefixes for the fit-size curve.
    sizes = sorted({int(s) for s in config.curve_fit_sizes if 2 <= int(s) < len(fit_src)} | {len(fit_src)})
    read = lambda out, batch, aux: [out[m]["pre_logits"] for m in names]  # noqa: E731
    acc = {"all": stats.accumulator(dims, read)}
    if len(sizes) > 1:
        acc["prefixes"] = stats.prefix_accumulator(dims, read, sizes[:-1])
    keep = {f"{m}/pre_logits": "float32" for m in names} if config.learned.families else {}  # learned maps' data
    fit_state = engine.run(extract.Pass("fit", fit_src, config.fit_split, features, dataset=config.dataset,
                                        accumulator=acc, store=keep))
    fit = fit_state["all"]
    by_size = (acc["prefixes"].compute(fit_state["prefixes"]) if len(sizes) > 1 else []) + [fit]

    # 2. Maps for every ordered pair (and the rank sweep's maps, from the same eigendecompositions).
    ranks = sorted({int(r) for r in config.curve_ranks if 1 <= int(r) < min(dims)} | {min(dims)})
    all_maps, map_warnings, rank_sweep, map_seconds = pair_maps.fit_families(fit, names, dims, ridge=config.ridge,
                                                                             rank=config.rank, sweep_ranks=ranks)
    for w in map_warnings:
        print(f"[warning] {w}", flush=True)

    # 3. Evaluation embeddings, native and mapped, into the store.
    def entry(family, i, j):
        return f"{names[i]}/to_{names[j]}_{family}"

    def emit(outputs, batch, aux):
        out = {f"{m}/pre_logits": outputs[m]["pre_logits"] for m in names}
        for f, per_pair in aux.items():
            for key, (w, b) in per_pair.items():
                i, j = (int(t) for t in key.split("_"))
                out[entry(f, i, j)] = jnp.matmul(outputs[names[i]]["pre_logits"], w, precision="highest") + b
        return out

    store_entries = {f"{m}/pre_logits": "float32" for m in names}
    store_entries.update({entry(f, i, j): "float32" for f, m in all_maps.items() for (i, j) in m})
    engine.run(extract.Pass("eval", eval_src, config.eval_split, features, emit=emit, dataset=config.dataset,
                            aux={f: {f"{i}_{j}": wb for (i, j), wb in m.items()} for f, m in all_maps.items()},
                            store=store_entries))
    store = engine.store("eval")
    labels, index = np.asarray(store.labels), np.asarray(store.index)
    native = [np.asarray(store.array(f"{m}/pre_logits"), np.float32) for m in names]

    def mapped(family, i, j):
        return native[i] if i == j else np.asarray(store.array(entry(family, i, j)), np.float32)

    metric_kw = dict(bins=config.verification_bins, ks=config.recall_ks, query_block=config.query_block,
                     fars=config.fars)
    pairs = cells.kfold_pairs(labels, int(config.kfold_pairs_per_fold), int(config.kfold_seed))

    # 4. The grids (direct; hub and learned), similarity and the curves, each memoized for a resumed run.
    grids = engine.memo("cells", lambda: cells.settings_grid(native, mapped, labels, index, pairs, FAMILIES,
                                                             metric_kw))
    extra_grids, extra_info = hub_and_learned_grid(config, engine, fit, names, native, all_maps["affine"],
                                                   map_seconds["affine"], labels, index, pairs, metric_kw)
    sim = engine.memo("similarity", functools.partial(similarity_matrices, config, fit, native,
                                                      all_maps["procrustes"]))
    curve = engine.memo("curves", functools.partial(curves, config, by_size, sizes, names, dims, native, labels,
                                                    index, metric_kw, ranks, rank_sweep))
    results = assemble(config, names, dims, fit, len(labels), {**grids, **extra_grids}, sim, curve, map_warnings)
    results["map_warnings"] += [str(w) for w in np.asarray(curve["fit_size"].get("warnings", []))]
    results["meta"] = {"seconds": dict(engine.seconds), "metric_seconds": dict(cells.METRIC_SECONDS),
                       "store": engine.store_dir("eval"), "map_seconds": extra_info.pop("seconds", {})}
    results.update(extra_info)
    return results, engine


def hub_and_learned_grid(config, engine, fit, names, native, affine, affine_seconds, labels, index, pairs,
                         metric_kw):
    """The grid of the hub and learned families (embjax.pair_maps.hub_and_learned; memoized) and their
    results entries: ({"setting|family": cells}, {"hub_maps": ..., "learned_maps": ...}); `affine_seconds`:
    the solve of the `affine` maps the learned maps start from."""
    from embjax import cells, pair_maps

    def fit_features():  # the learned maps' training data, stored by the fit pass
        st = engine.store("fit")
        return [np.asarray(st.array(f"{m}/pre_logits"), np.float32) for m in names], np.asarray(st.labels)

    mapped, encoded, settings, info = pair_maps.hub_and_learned(
        fit, native, affine, hub_ranks=config.hub_ranks, hub_methods=tuple(config.hub_methods),
        hub_ridge=config.hub_ridge, procrustes_iters=config.procrustes_iters, learned=common.to_dict(config.learned),
        fit_features=fit_features, heads=[m.head for m in engine.members], affine_seconds=affine_seconds,
        memo=engine.memo, log=engine.log)
    if not settings:
        return {}, info
    return engine.memo("extra_cells", lambda: cells.settings_grid(
        native, mapped, labels, index, pairs, tuple(settings), metric_kw, settings=settings,
        encoded=lambda f, i: encoded[f][i])), info


def _zoo_data(config, zoo_classes):
    """Images and labels of the zoo's training classes (weights=zoo only)."""
    from embjax import data

    src = data.get_source(config.dataset, config.fit_split, data_dir=config.data_dir,
                          manual_dir=config.manual_dir, image_size=config.image_size)
    labels = data.labels_of(src)
    rows = np.nonzero(data.class_filter(zoo_classes, "zoo_classes")[0](labels))[0]
    images, _ = data.Subset(src, rows, "zoo", labels=labels[rows]).get_batch(np.arange(len(rows)))
    return images, labels[rows].astype(np.int32)


def similarity_matrices(config, fit, native, procrustes):
    """Linear CKA, SVCCA, PWCCA, angular Procrustes distance (fit statistics); debiased CKA, mutual k-NN
    and CKNNA (evaluation features). embjax.similarity states each measure's invariances."""
    from embjax import similarity, stats

    n = len(native)
    # The orthogonal factor of each C_ij comes with the Procrustes maps: no second SVD for the distance.
    tr = [float(np.trace(stats.block(fit, i, i))) for i in range(n)]
    rotations = {(i, j): w / np.sqrt(tr[j] / tr[i]) for (i, j), (w, _) in procrustes.items()
                 if i < j and tr[i] > 0 and tr[j] > 0}
    mat = similarity.statistics_matrices(fit, dims=int(config.cca_dims) or None, rotations=rotations)
    mat["cca"] = mat.pop("svcca")
    mat.update(similarity.feature_matrices(native, k=int(config.mutual_knn_k)))
    return mat


def curves(config, by_size, sizes, names, dims, native, labels, index, metric_kw, ranks, rank_sweep):
    """Mean curve metrics over the ordered pairs (embjax.cells.curve_metrics) against the number of fitting
    samples (maps from the statistics of each prefix of the fit split) and against the rank of the map."""
    from embjax import cells, pair_maps

    n, families = len(names), tuple(config.curve_families)
    pairs_ij = [(i, j) for i in range(n) for j in range(n) if i != j]
    curve_warnings, tasks = [], []  # small fit sizes are ridge-regularised by maps.affine: said, never silent
    for size, st in zip(sizes, by_size):
        fam_maps, size_warnings, _, _ = pair_maps.fit_families(st, names, dims, ridge=config.ridge,
                                                               rank=config.rank, families=families)
        curve_warnings.extend(f"fit-size curve, {size} samples: {w}" for w in size_warnings)
        tasks += [(("size", f, size), i, j, fam_maps[f][(i, j)]) for f in families for i, j in pairs_ij]
    tasks += [(("rank", r), i, j, rank_sweep[(i, j)][k]) for k, r in enumerate(ranks) for i, j in pairs_ij]
    values = cells.parallel_map(lambda t: cells.curve_metrics(native[t[1]] @ t[3][0] + t[3][1], native[t[2]], labels,
                                                              index, **metric_kw), tasks)
    mean = {}
    for (point, *_), v in zip(tasks, values):
        mean.setdefault(point, []).append(v)
    mean = {p: {k: float(np.mean([v[k] for v in vs])) for k in cells.CURVE_METRICS} for p, vs in mean.items()}
    for w in curve_warnings:
        print(f"[warning] {w}", flush=True)
    fit_size = {f: {k: np.asarray([mean[("size", f, s)][k] for s in sizes]) for k in cells.CURVE_METRICS}
                for f in families}
    return {"fit_size": {"sizes": np.asarray(sizes), "warnings": np.asarray(curve_warnings, dtype=str), **fit_size},
            "rank": {"ranks": np.asarray(ranks),
                     **{k: np.asarray([mean[("rank", r)][k] for r in ranks]) for k in cells.CURVE_METRICS}}}


def assemble(config, names, dims, fit, num_eval, grids, sim, curve, map_warnings) -> dict:
    """results.json's layout: matrices are lists of rows, row = query model A, column = gallery model B."""
    from embjax import cells, report

    ver, ret, roc = cells.grid_results(grids)
    return {"models": names, "feature_dims": list(dims), "dataset": config.dataset, "fit_split": config.fit_split,
            "eval_split": config.eval_split, "fit_classes": config.fit_classes, "eval_classes": config.eval_classes,
            "num_fit": int(fit.count), "num_eval": int(num_eval), "similarity": report.plain(sim),
            "verification": ver, "retrieval": ret, "roc": roc, "curves": report.plain(curve),
            "map_warnings": list(map_warnings), "config": common.to_dict(config)}


def write_report(run_dir: str, r: dict):
    from embjax import open_set_report

    return open_set_report.write(run_dir, r)


def summary(r: dict) -> str:
    from embjax import open_set_report

    return open_set_report.summary(r)


if __name__ == "__main__":
    common.main(run, write_report, "open_set.py", "zoo", "experiments.open_set", summary)
