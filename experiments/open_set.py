r"""Open-set verification and retrieval through mapped embeddings ("Exploring the Interchangeability of
CNN Embedding Spaces", face-recognition part), with representation similarity from the same pass.

  python -m experiments.open_set                                     # EfficientNet-Lite0/1/2, Fashion-MNIST
  python -m experiments.open_set --config=experiments/configs/open_set.py:zoo
  python -m experiments.open_set --config=experiments/configs/open_set.py:lfw --config.data_dir=/data/tfds

Maps are fit without labels on images of some classes (identities); every metric is measured on images
of other classes, so neither the backbones' heads nor the maps have seen an evaluation identity.

Passes on the engine (embjax.extract):
  1. fit:  joint statistics (embjax.stats) of every model's pre-logit embedding over the fit split; the
           fit features are kept in the store for the fit-size curve;
  2. maps: for every ordered pair A→B and family affine / ridge / procrustes (scaled, zero-padded) /
           reduced_rank (embjax.maps);
  3. eval: the evaluation split's native embeddings and every mapped embedding, into the run's feature
           store (workdir/state/store/eval), from which every metric below is computed.
Settings, per ordered pair (A, B) — queries are embedded by A, the gallery by B:
  native       B's own embedding on both sides (the reference the other cells lose against);
  mapped       queries mapped A→B, gallery native B (diagonal: A's native embedding);
  both_mapped  both sides mapped into a third model C's space (A→C, B→C), averaged over C ∉ {A, B}
               (with two models, C = B, which is `mapped`);
  naive        queries truncated / zero-padded into B's width, no map (should sit at chance).
`native` and `naive` do not depend on the map family; they are repeated under every family's key.
Metrics (cosine similarity): verification over every ordered pair of distinct evaluation samples (query
a against gallery b and b against a), genuine when their labels agree (embjax.verification.label_pairs:
exact TAR at FAR, EER, ROC AUC), 10-fold accuracy over balanced pairs drawn without replacement, each in
both orders (LFW protocol); leave-one-out retrieval (embjax.retrieval: Recall@k, mAP, MAP@R,
R-precision). Similarity (embjax.similarity): linear CKA, SVCCA, PWCCA and Procrustes distance from the
fit statistics; debiased CKA, mutual k-NN and CKNNA on the evaluation features (debiased CKA needs
per-sample fourth-order terms the statistics do not keep).
"""

from __future__ import annotations

import functools
import re
import time
import warnings

import numpy as np

from experiments import common

FAMILIES = ("affine", "ridge", "procrustes", "reduced_rank")
SETTINGS = ("native", "mapped", "both_mapped", "naive")
CURVE_METRICS = ("recall_at_1", "map", "tar_at_far_0.01", "eer")


# --------------------------------------------------------------------------------------------------
# Data: class-disjoint subsets of the fit and evaluation splits


def parse_classes(spec: str, what: str):
    """"0-4,7" -> a predicate on label arrays; also "even" / "odd"."""
    spec = str(spec).strip()
    if spec in ("even", "odd"):
        parity = 0 if spec == "even" else 1
        return lambda labels: np.asarray(labels) % 2 == parity, (spec,)
    ranges = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise ValueError(f"config.{what} must be ranges like '0-4' or '0-2,7', or 'even' / 'odd'; got {spec!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"config.{what}: range {part.strip()!r} is empty")
        ranges.append((lo, hi))
    return lambda labels: np.any([(np.asarray(labels) >= lo) & (np.asarray(labels) <= hi) for lo, hi in ranges],
                                 axis=0), tuple(ranges)


class Subset:
    """Rows `indices` of a source, re-indexed 0..n-1 (the engine's sample index is the position here)."""

    def __init__(self, source, indices: np.ndarray, labels: np.ndarray, name: str):
        self.source, self.indices, self.labels, self.name = source, np.asarray(indices), np.asarray(labels), name

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, _ = self.source[int(self.indices[i])]
        return image, int(self.labels[i])

    def get_batch(self, idx):
        idx = np.asarray(idx, np.int64)
        if hasattr(self.source, "get_batch"):
            images, _ = self.source.get_batch(self.indices[idx])
        else:
            images = np.stack([self.source[int(self.indices[i])][0] for i in idx])
        return np.asarray(images), self.labels[idx].astype(np.int32)

    @property
    def image_shape(self):
        shape = getattr(self.source, "image_shape", None)
        return shape if shape is not None else tuple(np.shape(self[0][0]))


def _labels_of(source) -> np.ndarray:
    labels = getattr(source, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    ds, key = getattr(source, "_ds", None), getattr(source, "label_key", None)
    if ds is not None and key is not None:  # a tfds source: read labels without decoding through it
        raw = [ds[i][key] for i in range(len(source))]
        if raw and isinstance(raw[0], (bytes, str, np.bytes_, np.str_)):
            # lfw labels are person names: number them in sorted order, so "even"/"odd" is deterministic.
            names = sorted({r.decode() if isinstance(r, bytes) else str(r) for r in raw})
            ids = {n: k for k, n in enumerate(names)}
            return np.asarray([ids[r.decode() if isinstance(r, bytes) else str(r)] for r in raw], np.int32)
        return np.asarray(raw, np.int32)
    return np.asarray([source[i][1] for i in range(len(source))], np.int32)


def sources(config):
    """(fit source, eval source, fit class description, eval class description), class-disjoint."""
    from embjax import data

    kw = dict(data_dir=config.data_dir, manual_dir=config.manual_dir, image_size=config.image_size)
    fit_pred, fit_desc = parse_classes(config.fit_classes, "fit_classes")
    eval_pred, eval_desc = parse_classes(config.eval_classes, "eval_classes")
    out = []
    for split, pred, limit, what in ((config.fit_split, fit_pred, config.num_fit, "fit"),
                                     (config.eval_split, eval_pred, config.num_eval, "eval")):
        src = data.get_source(config.dataset, split, **kw)
        labels = _labels_of(src)
        rows = np.nonzero(pred(labels))[0]
        if limit:
            rows = rows[: int(limit)]
        if len(rows) == 0:
            raise ValueError(f"no {what} images: split '{split}' of {config.dataset} has no label in "
                             f"config.{what}_classes={getattr(config, what + '_classes')!r}")
        out.append(Subset(src, rows, labels[rows], f"{config.dataset}:{split}:{what}"))
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
# Metrics of one (queries, gallery) cell


def kfold_pairs(labels: np.ndarray, per_fold: int, seed: int, folds: int = 10):
    """Balanced pairs for the 10-fold protocol: each fold `per_fold` genuine + `per_fold` impostor
    pairs of distinct samples, drawn without replacement (no pair in two folds) with a fixed seed, each
    listed in both orders (embjax.verification.sample_pairs)."""
    from embjax import verification

    return verification.sample_pairs(labels, per_fold, folds, seed)


# Seconds spent ranking (leave-one-out retrieval) and scoring verification pairs in this process.
METRIC_SECONDS = {"ranking": 0.0, "verification": 0.0}


def cell_metrics(q, g, labels, index, config, pairs) -> tuple[dict, dict]:
    """(verification metrics, retrieval metrics) of queries `q` against gallery `g` (rows = samples)."""
    import jax.numpy as jnp

    from embjax import retrieval, verification

    fars = tuple(float(f) for f in config.fars)
    t0 = time.perf_counter()
    vm = verification.label_pairs(q, g, labels, index, fars=fars, bins=int(config.verification_bins))
    t1 = time.perf_counter()
    rm = retrieval.leave_one_out(q, labels, g, labels, query_index=index, gallery_index=index,
                                 ks=tuple(int(k) for k in config.recall_ks), query_block=int(config.query_block))
    METRIC_SECONDS["verification"] += t1 - t0
    METRIC_SECONDS["ranking"] += time.perf_counter() - t1
    pi, pj, same, fold = pairs
    qn, gn = retrieval.normalize(jnp.asarray(q, jnp.float32)), retrieval.normalize(jnp.asarray(g, jnp.float32))
    scores = jnp.sum(qn[pi] * gn[pj], axis=1)
    _, acc = verification.kfold_accuracy(scores, same, fold)
    ver = {"tar_at_far": {_far_key(f): float(t) for f, t in zip(fars, np.asarray(vm["tar_at_far"]))},
           "eer": float(vm["eer"]), "roc_auc": float(vm["roc_auc"]), "kfold_accuracy": float(acc)}
    ver["_roc"] = _roc_points(np.asarray(vm["far"]), np.asarray(vm["tar"]))
    ret = {k: float(v_) for k, v_ in rm.items() if k not in ("queries", "with_relevant")}
    return ver, ret


def _far_key(f: float) -> str:
    return f"{f:g}"


def _roc_points(far: np.ndarray, tar: np.ndarray, points: int = 60) -> dict:
    """TAR at log-spaced FARs (the TAR@FAR rule), compact enough for results.json and a plot."""
    grid = np.logspace(-5, 0, points)
    last = np.searchsorted(far, grid, side="right") - 1
    return {"far": grid.tolist(), "tar": tar[np.maximum(last, 0)].tolist()}


# --------------------------------------------------------------------------------------------------
# The study


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    import jax.numpy as jnp

    from embjax import extract, members, similarity, stats

    fit_src, eval_src, fit_desc, eval_desc = sources(config)
    zoo_classes = config.zoo_classes or config.fit_classes

    def zoo_data():
        from embjax import data

        src = data.get_source(config.dataset, config.fit_split, data_dir=config.data_dir,
                              manual_dir=config.manual_dir, image_size=config.image_size)
        labels = _labels_of(src)
        rows = np.nonzero(parse_classes(zoo_classes, "zoo_classes")[0](labels))[0]
        images, _ = Subset(src, rows, labels[rows], "zoo").get_batch(np.arange(len(rows)))
        return images, labels[rows].astype(np.int32)

    ms = members.load(config.models, config.weights, weight_files=common.to_dict(config.weight_files),
                      dtype=config.dtype, zoo_data=functools.cache(zoo_data), zoo_config=common.to_dict(config.zoo),
                      dataset_tag=f"{config.dataset}:{config.fit_split}:classes={zoo_classes}", minimum=2)
    engine = extract.Engine(ms, workdir, batch_size=config.batch_size, fingerprint=common.fingerprint(config),
                            checkpoint_every=config.checkpoint_every, prefetch=config.prefetch,
                            progress_seconds=config.progress_seconds, config=common.to_dict(config))
    names, dims = [m.name for m in ms], [m.feature_dim for m in ms]
    n = len(names)
    features = {m: ("pre_logits",) for m in names}

    # 1. Joint statistics over the fit split; the fit features stay in the store for the fit-size curve.
    fit = engine.run(extract.Pass(
        "fit", fit_src, config.fit_split, features, init=stats.init(dims), dataset=config.dataset,
        fold=lambda s, out, batch, aux: stats.update(s, [out[m]["pre_logits"] for m in names], batch["mask"]),
        store={f"{m}/pre_logits": "float32" for m in names}))

    # 2. Maps for every ordered pair (and the rank sweep's maps, from the same eigendecompositions).
    width = min(dims)
    ranks = sorted({int(r) for r in config.curve_ranks if 1 <= int(r) < width} | {width})
    all_maps, map_warnings, rank_sweep = fit_maps(fit, names, dims, config, sweep_ranks=ranks)
    for w in map_warnings:
        print(f"[warning] {w}", flush=True)

    # 3. Evaluation embeddings, native and mapped, into the store.
    def entry(family, i, j):
        return f"{names[i]}/to_{names[j]}_{family}"

    aux = {f: {f"{i}_{j}": wb for (i, j), wb in m.items()} for f, m in all_maps.items()}

    def emit(outputs, batch, aux):
        out = {f"{m}/pre_logits": outputs[m]["pre_logits"] for m in names}
        for f, per_pair in aux.items():
            for key, (w, b) in per_pair.items():
                i, j = (int(t) for t in key.split("_"))
                x = outputs[names[i]]["pre_logits"]
                out[entry(f, i, j)] = jnp.matmul(x, w, precision="highest") + b
        return out

    store_entries = {f"{m}/pre_logits": "float32" for m in names}
    store_entries.update({entry(f, i, j): "float32" for f, m in all_maps.items() for (i, j) in m})
    engine.run(extract.Pass("eval", eval_src, config.eval_split, features, init={"rows": jnp.zeros((), jnp.int32)},
                            fold=lambda s, out, batch, aux: {"rows": s["rows"] + jnp.sum(batch["mask"], dtype=jnp.int32)},
                            aux=aux, store=store_entries, emit=emit, dataset=config.dataset))
    store = engine.store("eval")
    labels, index = np.asarray(store.labels), np.asarray(store.index)
    native = [np.asarray(store.array(f"{m}/pre_logits"), np.float32) for m in names]

    def mapped(family, i, j):
        return native[i] if i == j else np.asarray(store.array(entry(family, i, j)), np.float32)

    pairs = kfold_pairs(labels, int(config.kfold_pairs_per_fold), int(config.kfold_seed))

    # 4. Every setting × family × ordered pair, memoized so a resumed run does not recompute them.
    def evaluate_cells():
        t = time.perf_counter()
        cache = {}

        def cell(q_key, q, g_key, g):
            key = (q_key, g_key)
            if key not in cache:
                cache[key] = cell_metrics(q, g, labels, index, config, pairs)
            return cache[key]

        from embjax import maps as maps_lib

        out = {}
        for s in SETTINGS:
            for f in FAMILIES:
                grid = [[None] * n for _ in range(n)]
                for i in range(n):
                    for j in range(n):
                        if s == "native":
                            grid[i][j] = cell(("native", j), native[j], ("native", j), native[j])
                        elif s == "mapped":
                            q_key = ("native", i) if i == j else (f, i, j)
                            grid[i][j] = cell(q_key, mapped(f, i, j), ("native", j), native[j])
                        elif s == "naive":
                            w, b = maps_lib.naive(dims[i], dims[j])
                            q = native[i] @ np.asarray(w) + np.asarray(b)
                            grid[i][j] = cell(("naive", i, j), q, ("native", j), native[j])
                        else:
                            hubs = [c for c in range(n) if c not in (i, j)] or [j]
                            cells = [cell((f, i, c), mapped(f, i, c), (f, j, c), mapped(f, j, c)) for c in hubs]
                            grid[i][j] = _average_cells(cells)
                out[(s, f)] = grid
        print(f"[metrics] {len(cache)} distinct cells in {time.perf_counter() - t:.1f} s (ranking "
              f"{METRIC_SECONDS['ranking']:.1f} s, verification pairs {METRIC_SECONDS['verification']:.1f} s)", flush=True)
        return {f"{s}|{f}": _cells_to_arrays(grid) for (s, f), grid in out.items()}

    cells = engine.memo("cells", evaluate_cells)

    # 5. Similarity: from the fit statistics, and on the evaluation features.
    def similarity_matrices():
        # The orthogonal factor of each C_ij comes with the Procrustes maps: no second SVD for the distance.
        tr = [float(np.trace(stats.block(fit, i, i))) for i in range(n)]
        rotations = {(i, j): w / np.sqrt(tr[j] / tr[i]) for (i, j), (w, _) in all_maps["procrustes"].items()
                     if i < j and tr[i] > 0 and tr[j] > 0}
        mat = similarity.statistics_matrices(fit, dims=int(config.cca_dims) or None, rotations=rotations)
        mat["cca"] = mat.pop("svcca")
        mat.update(similarity.feature_matrices(native, k=int(config.mutual_knn_k)))
        return mat

    sim = engine.memo("similarity", similarity_matrices)

    # 6. Curves: metric against the number of fitting samples, and against the rank of the map.
    def curves():
        fit_store = engine.store("fit")
        fit_feats = [np.asarray(fit_store.array(f"{m}/pre_logits"), np.float32) for m in names]
        total = fit_feats[0].shape[0]
        sizes = sorted({int(s) for s in config.curve_fit_sizes if 2 <= int(s) < total} | {total})
        pairs_ij = [(i, j) for i in range(n) for j in range(n) if i != j]
        families = tuple(config.curve_families)
        by_size = {f: {k: [] for k in CURVE_METRICS} for f in families}
        curve_warnings = []
        for size in sizes:
            st = stats.init(dims)
            for lo in range(0, size, 512):
                st = stats.update(st, [x[lo:min(size, lo + 512)] for x in fit_feats])
            fam_maps, size_warnings, _ = fit_maps(st, names, dims, config, families=families)
            curve_warnings.extend(f"fit-size curve, {size} samples: {w}" for w in size_warnings)
            for f in families:
                vals = [_curve_values(*cell_metrics(native[i] @ fam_maps[f][(i, j)][0] + fam_maps[f][(i, j)][1],
                                                    native[j], labels, index, config, pairs)) for i, j in pairs_ij]
                for k in CURVE_METRICS:
                    by_size[f][k].append(float(np.mean([v[k] for v in vals])))
        by_rank = {k: [] for k in CURVE_METRICS}
        for r_pos, r in enumerate(ranks):
            vals = []
            for i, j in pairs_ij:
                w, b = rank_sweep[(i, j)][r_pos]
                vals.append(_curve_values(*cell_metrics(native[i] @ w + b, native[j], labels, index, config, pairs)))
            for k in CURVE_METRICS:
                by_rank[k].append(float(np.mean([v[k] for v in vals])))
        for w in curve_warnings:
            print(f"[warning] {w}", flush=True)
        return {"fit_size": {"sizes": np.asarray(sizes), "warnings": np.asarray(curve_warnings, dtype=str),
                             **{f: {k: np.asarray(v) for k, v in d.items()} for f, d in by_size.items()}},
                "rank": {"ranks": np.asarray(ranks), **{k: np.asarray(v) for k, v in by_rank.items()}}}

    curve = engine.memo("curves", curves)

    results = assemble(config, names, dims, fit, len(labels), cells, sim, curve, map_warnings, fit_desc, eval_desc)
    results["map_warnings"] = list(map_warnings) + [str(w) for w in np.asarray(curve["fit_size"].get("warnings", []))]
    results["meta"] = {"seconds": dict(engine.seconds), "metric_seconds": dict(METRIC_SECONDS),
                       "store": engine.store_dir("eval")}
    return results, engine


def _curve_values(ver, ret):
    return {"recall_at_1": ret["recall_at_1"], "map": ret["map"], "tar_at_far_0.01": ver["tar_at_far"]["0.01"],
            "eer": ver["eer"]}


def _average_cells(cells):
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


def _cells_to_arrays(grid):
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


def assemble(config, names, dims, fit, num_eval, cells, sim, curve, map_warnings, fit_desc, eval_desc) -> dict:
    """results.json's layout (see the issue): matrices are lists of rows, row = query model A, column = B."""
    ver, ret, roc = {}, {}, {}
    for key, arrays in cells.items():
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
        "roc.png": functools.partial(_plot_roc, r),
        "curve_fit_size.png": functools.partial(_plot_fit_size, r),
        "curve_rank.png": functools.partial(_plot_rank, r),
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
    md = [f"# Open-set verification and retrieval: {', '.join(names)}", "",
          f"Maps fit on {r['num_fit']} images of classes {r['fit_classes']} ({r['dataset']} {r['fit_split']}); every "
          f"metric on {r['num_eval']} images of classes {r['eval_classes']} ({r['eval_split']}), all pairs of "
          "distinct images (cosine similarity). Command: `" + r.get("meta", {}).get("command", "") + "`", ""]
    for key in ["summary"] + [k for k in tables if k != "summary"]:
        t = tables[key]
        md += [f"## {t.title}", ""] + ([t.note, ""] if t.note else []) + [t.markdown(), ""]
    md += ["## Figures", "", "![ROC](roc.png)", "![fit size](curve_fit_size.png)", "![rank](curve_rank.png)"]
    md += [f"![{k}](similarity_{k}.png)" for k in ("cka", "cka_debiased", "cca", "pwcca", "procrustes", "mutual_knn",
                                                   "cknna")]
    if r.get("map_warnings"):
        md += ["", "## Map warnings", ""] + [f"- {w}" for w in r["map_warnings"]]
    secs = r.get("meta", {}).get("seconds", {})
    metric_secs = r.get("meta", {}).get("metric_seconds", {})
    md += ["", f"Seconds: {', '.join(f'{k} {v:.0f}' for k, v in secs.items())}"
           + (f" (in the metric cells: ranking {metric_secs['ranking']:.1f}, verification pairs "
              f"{metric_secs['verification']:.1f})" if metric_secs else "") + ".",
           f"Evaluation features (native and mapped): `{r.get('meta', {}).get('store', '')}`."]
    return report.write_run(run_dir, r, tables=tables, figures=figures, markdown="\n".join(md) + "\n")


def _figure(width=6.4, height=4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_roc(r, path):
    fig = _figure()
    ax = fig.add_subplot()
    names = r["models"]
    native = r["roc"]["native"]["affine"]
    for j, m in enumerate(names):
        ax.plot(native["far"], native["tar"][j][j], lw=2, label=f"{m} native")
    mapped = r["roc"]["mapped"]["affine"]
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j:
                ax.plot(mapped["far"], mapped["tar"][i][j], lw=1, ls="--", label=f"{names[i]}→{names[j]} affine")
    ax.set_xscale("log")
    ax.set_xlabel("FAR")
    ax.set_ylabel("TAR")
    ax.set_title("ROC on evaluation classes")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def _plot_fit_size(r, path):
    c = r["curves"]["fit_size"]
    fig = _figure(9, 3.6)
    for k, metric in enumerate(("recall_at_1", "tar_at_far_0.01")):
        ax = fig.add_subplot(1, 2, k + 1)
        for f in r["config"]["curve_families"]:
            ax.plot(c["sizes"], c[f][metric], marker="o", label=f)
        ax.set_xscale("log")
        ax.set_xlabel("fitting samples")
        ax.set_ylabel(f"{metric}, mapped A→B (mean over pairs)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plot_rank(r, path):
    c = r["curves"]["rank"]
    fig = _figure(9, 3.6)
    for k, metric in enumerate(("recall_at_1", "tar_at_far_0.01")):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(c["ranks"], c[metric], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank k of the map")
        ax.set_ylabel(f"{metric}, mapped A→B (mean over pairs)")
    fig.tight_layout()
    fig.savefig(path)


def summary(r: dict) -> str:
    return summary_table(r).markdown()


if __name__ == "__main__":
    common.main(run, write_report, "open_set.py", "effnet_lite", "experiments.open_set", summary)
