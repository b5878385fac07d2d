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
     similarity (embjax.similarity), the fit-size and rank curves, each memoized for a resumed run.
Metrics (cosine): verification over every ordered pair of distinct evaluation samples, genuine when
their labels agree (exact TAR at FAR, EER, ROC AUC), 10-fold accuracy over balanced disjoint pairs (LFW
protocol); leave-one-out retrieval (Recall@k, mAP, MAP@R, R-precision). docs/open_set.md has the details.
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np

from embjax.cells import SETTINGS
from experiments import common

FAMILIES = ("affine", "ridge", "procrustes", "reduced_rank")


# --------------------------------------------------------------------------------------------------
# Data: class-disjoint subsets of the fit and evaluation splits


def sources(config):
    """(fit source, eval source, fit class description, eval class description), class-disjoint."""
    from embjax import data

    kw = dict(data_dir=config.data_dir, manual_dir=config.manual_dir, image_size=config.image_size)
    fit_pred, fit_desc = data.class_filter(config.fit_classes, "fit_classes")
    eval_pred, eval_desc = data.class_filter(config.eval_classes, "eval_classes")
    out = []
    for split, pred, limit, what in ((config.fit_split, fit_pred, config.num_fit, "fit"),
                                     (config.eval_split, eval_pred, config.num_eval, "eval")):
        src = data.get_source(config.dataset, split, **kw)
        labels = data.labels_of(src)
        rows = np.nonzero(pred(labels))[0]
        if limit:
            rows = rows[: int(limit)]
        if len(rows) == 0:
            raise ValueError(f"no {what} images: split '{split}' of {config.dataset} has no label in "
                             f"config.{what}_classes={getattr(config, what + '_classes')!r}")
        out.append(data.Subset(src, rows, f"{config.dataset}:{split}:{what}", labels=labels[rows]))
    overlap = set(np.unique(out[0].labels)) & set(np.unique(out[1].labels))
    if overlap:
        raise ValueError(f"fit and evaluation classes overlap ({sorted(overlap)[:10]}); the study is open-set only "
                         "when config.fit_classes and config.eval_classes are disjoint")
    return out[0], out[1], fit_desc, eval_desc


# --------------------------------------------------------------------------------------------------
# Maps


def fit_maps(st, names, dims, config, families=FAMILIES, sweep_ranks=()) -> tuple[dict, list[str], dict]:
    """({family: {(i, j): (W, b)}} for every ordered pair i ≠ j, the warnings the fits raised, and
    {(i, j): [(W_k, b_k) for k in sweep_ranks]}).

    Decompositions are the slow part on a loaded CPU (a 1280² SVD took 40 s there), so each is done
    once: one SVD per unordered pair serves both Procrustes directions, and one eigendecomposition per
    ordered pair serves the reduced-rank family and the whole rank sweep."""
    from embjax import maps

    n = len(dims)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    out, sweeps = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", maps.IllConditionedWarning)
        affine = maps.affine_all(st, ridge=0.0, names=names)
        if "affine" in families:
            out["affine"] = affine
        if "ridge" in families:
            out["ridge"] = maps.affine_all(st, ridge=float(config.ridge), names=names)
        if "procrustes" in families:
            out["procrustes"] = {}
            for i, j in pairs:
                if i < j:
                    out["procrustes"][(i, j)], out["procrustes"][(j, i)] = maps.scaled_procrustes_both(st, i, j)
        if "reduced_rank" in families:
            out["reduced_rank"] = {}
            for i, j in pairs:
                width = min(dims[i], dims[j])
                ranks = [max(1, min(int(config.rank), width))] + [int(r) for r in sweep_ranks]
                maps_k = maps.truncate_ranks(st, i, j, affine[(i, j)][0], [min(r, width) for r in ranks])
                out["reduced_rank"][(i, j)] = maps_k[0]
                sweeps[(i, j)] = [(np.asarray(w), np.asarray(b)) for w, b in maps_k[1:]]
    messages = sorted({str(w.message) for w in caught})
    return {f: {k: (np.asarray(w), np.asarray(b)) for k, (w, b) in m.items()} for f, m in out.items()}, messages, sweeps


# --------------------------------------------------------------------------------------------------
# The study


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    import jax.numpy as jnp

    from embjax import cells, extract, stats

    fit_src, eval_src, fit_desc, eval_desc = sources(config)
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
    fit_state = engine.run(extract.Pass("fit", fit_src, config.fit_split, features, dataset=config.dataset,
                                        accumulator=acc))
    fit = fit_state["all"]
    by_size = (acc["prefixes"].compute(fit_state["prefixes"]) if len(sizes) > 1 else []) + [fit]

    # 2. Maps for every ordered pair (and the rank sweep's maps, from the same eigendecompositions).
    ranks = sorted({int(r) for r in config.curve_ranks if 1 <= int(r) < min(dims)} | {min(dims)})
    all_maps, map_warnings, rank_sweep = fit_maps(fit, names, dims, config, sweep_ranks=ranks)
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

    def naive(i, j):
        from embjax import maps

        w, b = maps.naive(dims[i], dims[j])
        return native[i] @ np.asarray(w) + np.asarray(b)

    metric_kw = dict(bins=config.verification_bins, ks=config.recall_ks, query_block=config.query_block,
                     fars=config.fars)
    pairs = cells.kfold_pairs(labels, int(config.kfold_pairs_per_fold), int(config.kfold_seed))

    # 4. The grid, similarity and the curves, each memoized so a resumed run does not recompute them.
    grids = engine.memo("cells", lambda: cells.settings_grid(native, mapped, naive, labels, index, pairs, FAMILIES,
                                                             metric_kw))
    sim = engine.memo("similarity", functools.partial(similarity_matrices, config, fit, native,
                                                      all_maps["procrustes"]))
    curve = engine.memo("curves", functools.partial(curves, config, by_size, sizes, names, dims, native, labels,
                                                    index, metric_kw, ranks, rank_sweep))
    results = assemble(config, names, dims, fit, len(labels), grids, sim, curve, map_warnings, fit_desc, eval_desc)
    results["map_warnings"] += [str(w) for w in np.asarray(curve["fit_size"].get("warnings", []))]
    results["meta"] = {"seconds": dict(engine.seconds), "metric_seconds": dict(cells.METRIC_SECONDS),
                       "store": engine.store_dir("eval")}
    return results, engine


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
    from embjax import cells

    n, families = len(names), tuple(config.curve_families)
    pairs_ij = [(i, j) for i in range(n) for j in range(n) if i != j]
    curve_warnings, tasks = [], []  # small fit sizes are ridge-regularised by maps.affine: said, never silent
    for size, st in zip(sizes, by_size):
        fam_maps, size_warnings, _ = fit_maps(st, names, dims, config, families=families)
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


def assemble(config, names, dims, fit, num_eval, grids, sim, curve, map_warnings, fit_desc, eval_desc) -> dict:
    """results.json's layout (see the issue): matrices are lists of rows, row = query model A, column = B."""
    ver, ret, roc = {}, {}, {}
    for key, arrays in grids.items():
        s, f = key.split("|")
        v = {"tar_at_far": {k.split("/", 1)[1]: np.asarray(a).tolist() for k, a in arrays.items()
                            if k.startswith("tar_at_far/")}}
        for k in ("eer", "roc_auc", "kfold_accuracy"):
            v[k] = np.asarray(arrays[k]).tolist()
        ver.setdefault(s, {})[f] = v
        ret.setdefault(s, {})[f] = {k.split("/", 1)[1]: np.asarray(a).tolist() for k, a in arrays.items()
                                   if k.startswith("retrieval/")}
        roc.setdefault(s, {})[f] = {"far": np.asarray(arrays["roc_far"]).tolist(),
                                    "tar": np.asarray(arrays["roc_tar"]).tolist()}
    return {
        "models": names, "feature_dims": list(dims), "dataset": config.dataset,
        "fit_split": config.fit_split, "eval_split": config.eval_split,
        "fit_classes": config.fit_classes, "eval_classes": config.eval_classes,
        "num_fit": int(fit.count), "num_eval": int(num_eval),
        "similarity": {k: np.asarray(v).tolist() for k, v in sim.items()},
        "verification": ver, "retrieval": ret, "roc": roc,
        "curves": _plain_tree(curve), "map_warnings": list(map_warnings),
        "config": common.to_dict(config),
    }


def _plain_tree(tree):
    if isinstance(tree, dict):
        return {k: _plain_tree(v) for k, v in tree.items()}
    return np.asarray(tree).tolist()


# --------------------------------------------------------------------------------------------------
# Report


def _mean_offdiag(m) -> float:
    m = np.asarray(m, float)
    n = m.shape[0]
    return float(m[~np.eye(n, dtype=bool)].mean()) if n > 1 else float(m[0, 0])


def summary_table(r):
    from embjax import report

    fars = list(r["verification"]["native"]["affine"]["tar_at_far"])
    header = ["setting", "map"] + [f"TAR@FAR={f}" for f in fars] + ["EER", "AUC", "10-fold acc", "R@1", "R@5", "mAP",
                                                                     "MAP@R"]
    rows = []
    for s in SETTINGS:
        for f in (FAMILIES if s in ("mapped", "both_mapped") else ("affine",)):
            v, q = r["verification"][s][f], r["retrieval"][s][f]
            vals = [v["tar_at_far"][k] for k in fars] + [v["eer"], v["roc_auc"], v["kfold_accuracy"],
                                                         q["recall_at_1"], q["recall_at_5"], q["map"], q["map_at_r"]]
            rows.append([s, f if s in ("mapped", "both_mapped") else "—"] + [f"{_mean_offdiag(m):.4f}" for m in vals])
    note = ("Means over the ordered pairs A ≠ B (row = query model A, column = gallery model B). `native` is "
            "the gallery model's own embedding on both sides, `naive` is no map (truncate / zero-pad); neither "
            "depends on the map family.")
    return report.Table("Open-set verification and retrieval, mean over model pairs", header, rows, note)


def matrix_table(r, title, matrix, fmt="{:.4f}"):
    from embjax import report

    names = r["models"]
    rows = [[names[i]] + [fmt.format(v) for v in row] for i, row in enumerate(matrix)]
    return report.Table(title, ["A \\ B"] + names, rows)


def write_report(run_dir: str, r: dict):
    from embjax import report

    names = r["models"]
    tables = {"summary": summary_table(r)}
    for f in FAMILIES:
        tables[f"mapped_{f}_tar_at_far_0.01"] = matrix_table(
            r, f"TAR@FAR=1e-2, queries mapped A→B ({f}), gallery native B", r["verification"]["mapped"][f]["tar_at_far"]["0.01"])
        tables[f"mapped_{f}_recall_at_1"] = matrix_table(
            r, f"Recall@1, queries mapped A→B ({f}), gallery native B", r["retrieval"]["mapped"][f]["recall_at_1"])
    for k in ("cka", "cka_debiased", "cca", "pwcca", "procrustes", "mutual_knn", "cknna"):
        tables[f"similarity_{k}"] = matrix_table(r, f"similarity: {k}", r["similarity"][k])
    figures = {
        "roc.png": functools.partial(report.roc_figure, r),
        "curve_fit_size.png": functools.partial(report.fit_size_figure, r),
        "curve_rank.png": functools.partial(report.rank_figure, r),
    }
    for k, title, lim in (("cka", "linear CKA (fit statistics)", (0, 1)),
                          ("cka_debiased", "debiased CKA (evaluation features)", (None, 1)),
                          ("cca", f"mean SVCCA ({r['config']['cca_dims']} dims, fit statistics)", (0, 1)),
                          ("pwcca", f"PWCCA ({r['config']['cca_dims']} dims, row A's weights, fit statistics)", (0, 1)),
                          ("cknna", f"CKNNA, k = {r['config']['mutual_knn_k']} (evaluation)", (None, 1)),
                          ("procrustes", "angular Procrustes distance (rad, fit statistics)", (0, None)),
                          ("mutual_knn", f"mutual {r['config']['mutual_knn_k']}-NN alignment (evaluation)", (0, 1))):
        figures[f"similarity_{k}.png"] = functools.partial(report.heatmap_matrix, r["similarity"][k], names, title,
                                                          vmin=lim[0], vmax=lim[1], xlabel="B", ylabel="A")
    intro = [f"Maps fit on {r['num_fit']} images of classes {r['fit_classes']} ({r['dataset']} {r['fit_split']}); "
             f"every metric on {r['num_eval']} images of classes {r['eval_classes']} ({r['eval_split']}), all "
             "pairs of distinct images (cosine similarity). Command: `" + r.get("meta", {}).get("command", "") + "`"]
    outro = ((["## Map warnings", "\n".join(f"- {w}" for w in r["map_warnings"])] if r.get("map_warnings") else [])
             + [f"Seconds: {', '.join(f'{k} {v:.0f}' for k, v in r.get('meta', {}).get('seconds', {}).items())}"
                + (" (in the metric cells: ranking {ranking:.1f}, verification pairs {verification:.1f})".format(
                    **r["meta"]["metric_seconds"]) if r.get("meta", {}).get("metric_seconds") else "") + ".\n"
                f"Evaluation features (native and mapped): `{r.get('meta', {}).get('store', '')}`."])
    return report.write_run(run_dir, r, tables=tables, figures=figures, intro=intro, outro=outro,
                            title=f"Open-set verification and retrieval: {', '.join(names)}")


def summary(r: dict) -> str:
    return summary_table(r).markdown()


if __name__ == "__main__":
    common.main(run, write_report, "open_set.py", "zoo", "experiments.open_set", summary)
