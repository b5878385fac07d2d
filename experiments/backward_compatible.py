r"""Backward-compatible training (Shen et al., CVPR 2020) against post-hoc maps, on one engine.

  python -m experiments.backward_compatible                      # Fashion-MNIST, zoo models (the default)
  python -m experiments.backward_compatible --config=experiments/configs/backward_compatible.py:imagenet \
      --config.manual_dir=/data/imagenet

A model update is backward compatible when new query embeddings search the old gallery better than the old
model did: M(new, old) > M(old, old) (the paper's criterion, top-1 of leave-one-out retrieval). The study:

  1. trains the old model on its data (embjax.train; resumable);
  2. pass "old_features": the old model over the new training set: per-class mean old embeddings (the
     synthesized classifier columns of classes the old model never saw) and the old embeddings themselves
     (the L2 baseline's targets), kept in the feature store;
  3. trains the new model on the new training set: independently, with BCT's influence loss through the
     old classifier (new classes' columns normalized as config.bct.normalize says, and, with
     config.bct.compare_unnormalized, once more with the paper's unnormalized columns), and with L2
     regression onto the old embeddings;
  4. pass "fit_maps": joint statistics of old and independent-new embeddings over the new training set, from
     which the post-hoc maps are solved without labels (embjax.maps): affine and orthogonal, new→old
     (queries mapped into the old gallery's space) and old→new (the gallery mapped once);
  5. pass "eval": every model's embeddings of the evaluation split, kept in the feature store, then
     leave-one-out retrieval (top-1, top-5, mAP) for old/old, new/new and new/old of every method, over
     all evaluation classes and separately over the old model's classes, the classes only the new model
     saw, and classes held out of all training.
See experiments/common.py for the flags, resume and multi-host options.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time

import numpy as np

from experiments import common

SETTINGS = ("old/old", "new/new", "new/old")
# method -> (the new model it uses, post-hoc map or None)
METHODS = {
    "independent": ("independent", None),
    "bct": ("bct", None),
    "bct, unnormalized columns": ("bct_unnormalized", None),
    "l2": ("l2", None),
    "affine new→old": ("independent", "affine_new_to_old"),
    "orthogonal new→old": ("independent", "orthogonal_new_to_old"),
    "affine old→new": ("independent", "affine_old_to_new"),
    "orthogonal old→new": ("independent", "orthogonal_old_to_new"),
}
METHOD_NOTES = {
    "independent": "new model trained alone; new/old feeds its embedding, cut/zero-padded, to the old gallery",
    "bct": "new model trained with the influence loss through the old classifier (Shen et al.); new classes' "
           "columns synthesized from mean old embeddings, normalized as config.bct.normalize says",
    "bct, unnormalized columns": "the same with the synthesized columns left unnormalized (the paper's rule "
                                 "taken literally)",
    "l2": "new model trained with ‖φ_new − φ_old‖² added (the paper's L2-regression baseline)",
    "affine new→old": "independent new model; queries mapped into the old space by least squares",
    "orthogonal new→old": "independent new model; queries mapped into the old space by a scaled partial isometry",
    "affine old→new": "independent new model; the old gallery mapped once into the new space by least squares",
    "orthogonal old→new": "independent new model; the old gallery mapped once by a scaled isometry",
}


def methods_for(config) -> dict:
    """The methods of this run: the unnormalized BCT variant only when it differs from "bct" and is asked for."""
    out = dict(METHODS)
    if not config.bct.compare_unnormalized or config.bct.normalize in (None, "none"):
        out.pop("bct, unnormalized columns")
    return out


# Wall seconds of each training in this process (a reused finished training counts its restore only),
# and under "ranking" the leave-one-out rankings' total.
TRAIN_SECONDS: dict[str, float] = {}
# Published figures (top-1 of leave-one-out retrieval) to place ours beside.
PUBLISHED = [
    ("Shen et al. 2020, ImageNet (ResNet-18 old on 50%, ResNet-50 new on 100%)", [
        ("independent", {"old/old": 39.5, "new/new": 66.3}),
        ("bct", {"old/old": 39.5, "new/new": 55.6, "new/old": 42.2}),
        ("l2", {"old/old": 39.5, "new/old": 13.0}),
    ]),
    ("BT² (Zhou et al.), CIFAR-100, BCT", [
        ("bct", {"old/old": 33.6, "new/old": 25.0}),
    ]),
    # Apple ml-fct's README (old model on 50 of CIFAR-100's classes); new/old: its learned old→new map (FCT).
    ("ml-fct (Ramanujan et al. 2022), CIFAR-100", [
        ("independent", {"old/old": 32.9, "new/new": 56.4}),
        ("FCT old→new (learned, with side information)", {"old/old": 32.9, "new/new": 56.4, "new/old": 50.6}),
    ]),
]


# --------------------------------------------------------------------------------------------------
# Data


def training_rows(config, train_src):
    """(rows of the new model's training set, rows of the old model's), as indices into the train split."""
    n = len(train_src)
    held_out = [int(c) for c in config.held_out_classes]
    if config.old_data not in ("classes", "fraction"):
        raise ValueError(f"config.old_data must be 'classes' or 'fraction', not {config.old_data!r}")
    labels = None
    if held_out or config.old_data == "classes":
        from embjax import data

        labels = data.labels_of(train_src)
    new_rows = np.arange(n) if not held_out else np.flatnonzero(~np.isin(labels, held_out))
    if config.old_data == "classes":
        old_classes = [int(c) for c in config.old_classes]
        if set(old_classes) & set(held_out):
            raise ValueError(f"config.old_classes {old_classes} and config.held_out_classes {held_out} overlap")
        old_rows = new_rows[np.isin(labels[new_rows], old_classes)]
    else:
        if not 0 < config.old_fraction <= 1:
            raise ValueError(f"config.old_fraction must be in (0, 1], got {config.old_fraction}")
        rng = np.random.default_rng(config.old_train.seed)
        k = int(round(config.old_fraction * len(new_rows)))
        old_rows = np.sort(rng.choice(new_rows, size=k, replace=False))
    if len(old_rows) == 0 or len(new_rows) == 0:
        raise ValueError(f"empty training set: {len(old_rows)} old and {len(new_rows)} new training images")
    return new_rows, old_rows


def sources(config):
    from embjax import data

    return data.sources(config, config.train_split, config.eval_split)


# --------------------------------------------------------------------------------------------------
# Training


def train_model(config, workdir, role, spec, source, tcfg, kind="independent", influence=None, weight=1.0,
                old_embeddings=None, fingerprint=None):
    """One model trained from scratch on `source` (resumable); its variables as NumPy arrays."""
    import jax.numpy as jnp

    from embjax import bct, train, zoo

    cfg = train.TrainConfig(**common.to_dict(tcfg))
    module = spec.build()
    images0, _ = source.get_batch(np.arange(min(2, len(source))))
    variables = zoo.numpy_init(module, spec.preprocess(jnp.asarray(images0)), cfg.seed)
    loss = bct.make_loss(module, spec.preprocess, kind, influence=influence, weight=weight)

    def get_batch(idx):
        images, labels = source.get_batch(idx)
        batch = {"image": np.asarray(images), "label": np.asarray(labels, np.int32)}
        if kind == "l2":
            batch["old_embedding"] = np.asarray(old_embeddings[idx], np.float32)
        return batch

    t0 = time.perf_counter()
    out = train.fit(loss, variables, get_batch, len(source), cfg,
                    workdir=train.checkpoint_dir(workdir, role.split("_")[0], fingerprint),
                    fingerprint=fingerprint, name=f"train {role} ({spec.name})")
    TRAIN_SECONDS[f"train {role}"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------------
# The study


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    from embjax import bct, data, extract, maps, members, stats
    from embjax.models import registry

    if config.old_model == config.new_model:
        raise ValueError("config.old_model and config.new_model are the same model; the study compares two")
    normalize = None if config.bct.normalize in (None, "none") else config.bct.normalize
    if normalize not in bct.NORMALIZE_CHOICES:
        raise ValueError(f"config.bct.normalize must be 'none', 'unit' or 'old_norm', not {config.bct.normalize!r}")
    old_spec, new_spec = registry.get(config.old_model), registry.get(config.new_model)
    train_src, eval_src = sources(config)
    new_rows, old_rows = training_rows(config, train_src)
    new_src = data.Subset(train_src, new_rows, f"{config.train_split} (new training set)")
    old_src = data.Subset(train_src, old_rows, f"{config.train_split} (old training set)")
    log = print
    log(f"[study] old model {config.old_model} on {len(old_rows)} images, new model {config.new_model} on "
        f"{len(new_rows)} images of {config.dataset}:{config.train_split}")

    data_fp = {k: common.to_dict(config).get(k) for k in
               ("dataset", "train_split", "data_dir", "manual_dir", "image_size", "num_classes", "held_out_classes")}
    old_fp = dict(data_fp, model=config.old_model, old_data=config.old_data, old_classes=list(config.old_classes),
                  old_fraction=config.old_fraction, train=common.to_dict(config.old_train))
    new_fp = dict(data_fp, model=config.new_model, train=common.to_dict(config.new_train))

    # 1. The old model.
    old_vars = train_model(config, workdir, "old", old_spec, old_src, config.old_train, fingerprint=old_fp)
    old = members.make_member("old", old_spec, old_vars)
    d_old = old.feature_dim

    # 2. The old model over the new training set: class means and the L2 targets.
    num_labels = int(config.num_classes)
    e1 = common.engine(config, workdir, [old])
    sums = e1.run(extract.Pass(
        "old_features", new_src, new_src.name, {"old": ("pre_logits",)},
        accumulator=bct.class_sums(num_labels, d_old, lambda out, batch, aux: out["old"]["pre_logits"]),
        dataset=config.dataset,
        store={"old/pre_logits": "float32"}))
    present = [int(c) for c in np.flatnonzero(np.asarray(sums.count) > 0)]
    old_classes = sorted(set(int(c) for c in (config.old_classes if config.old_data == "classes" else present)))
    new_classes = [c for c in present if c not in old_classes]
    means = np.asarray(bct.class_sums_compute(sums))
    new_labels = np.empty((len(new_src),), np.int32)
    store = e1.store("old_features")
    old_emb = np.empty((len(new_src), d_old), np.float32)
    old_emb[store.index] = store.array("old/pre_logits")
    new_labels[store.index] = store.labels
    variants, influences, diagnostics = influence_classifiers(config, old, normalize, old_classes, new_classes, means,
                                                             old_emb, new_labels, log)

    # 3. The new model: independently, with BCT (per variant), with L2 regression.
    trained = train_new_models(config, workdir, new_spec, new_src, variants, influences, old_emb, old_fp, new_fp)
    news = {k: members.make_member(k, new_spec, v) for k, v in trained.items()}
    d_new = new_spec.feature_dim

    # 4. Joint statistics of old and independent-new embeddings over the new training set: the post-hoc maps.
    e2 = common.engine(config, workdir, [old, *news.values()])
    fit_rows = map_fit_rows(config, len(new_src))
    fit_src = data.Subset(new_src, fit_rows, f"{new_src.name}, {len(fit_rows)} images for the maps")
    fit = e2.run(extract.Pass(
        "fit_maps", fit_src, fit_src.name, {"old": ("pre_logits",), "independent": ("pre_logits",)},
        dataset=config.dataset, accumulator=stats.accumulator(
            (d_old, d_new), lambda out, batch, aux: [out["old"]["pre_logits"], out["independent"]["pre_logits"]])))
    names = ["old", "independent"]
    posthoc = {
        "affine_new_to_old": maps.affine(fit, 1, 0, config.maps.ridge, names=names),
        "orthogonal_new_to_old": bct.orthogonal_map(fit, 1, 0),
        "affine_old_to_new": maps.affine(fit, 0, 1, config.maps.ridge, names=names),
        "orthogonal_old_to_new": bct.orthogonal_map(fit, 0, 1),
    }
    map_r2 = {k: float(stats.r2(fit, 1, 0, *wb) if "new_to_old" in k else stats.r2(fit, 0, 1, *wb))
              for k, wb in posthoc.items()}

    # 5. Every embedding the retrieval compares, native and mapped, of the evaluation split into the store.
    roles = [m.name for m in e2.members]
    e2.run(extract.Pass(
        "eval", eval_src, config.eval_split, {r: ("pre_logits",) for r in roles}, dataset=config.dataset,
        aux=posthoc, emit=functools.partial(eval_embeddings, roles=roles, d_old=d_old),
        store={e: "float32" for pair in space_entries(roles).values() for e in pair}))
    ev = e2.store("eval")
    spaces = {key: tuple(np.asarray(ev.array(e)) for e in entries) for key, entries in space_entries(roles).items()}
    labels = np.asarray(ev.labels)
    subsets = class_subsets(config, old_classes, new_classes, labels)

    def compute_retrieval():
        return retrieval_tables(config, spaces, labels, subsets)

    retrieval = e2.memo("retrieval", compute_retrieval)
    return results(config, retrieval, subsets, old_classes, new_classes, len(old_rows), len(new_rows),
                   len(fit_rows), len(labels), map_r2, {**TRAIN_SECONDS, **e1.seconds, **e2.seconds},
                   diagnostics), e2


def influence_classifiers(config, old, normalize, old_classes, new_classes, means, old_emb, new_labels, log):
    """(variants {role: normalization}, influence classifiers {role: (kernel, bias)}, their diagnostics on
    the old model's own embeddings)."""
    from embjax import bct

    # One BCT model per normalization of the synthesized columns: config.bct.normalize, and the paper's
    # literal rule (unnormalized) beside it when asked for.
    variants = {"bct": normalize}
    if "bct, unnormalized columns" in methods_for(config):
        variants["bct_unnormalized"] = None
    influences, diagnostics = {}, {}
    for role, norm in variants.items():
        influences[role] = bct.influence_classifier(
            old.head[0], old.head[1], old_classes, num_labels=int(config.num_classes), new_classes=new_classes,
            new_class_means=means[new_classes], normalize=norm)
        diagnostics[role] = influence_diagnostics(influences[role], old_emb, new_labels, old_classes)
        log(f"[study] influence classifier of {role} on the old model's own embeddings: {diagnostics[role]}")
    return variants, influences, diagnostics


def map_fit_rows(config, n: int) -> np.ndarray:
    """Rows of the new training set the post-hoc maps are fit on: all, or config.maps.fit_samples of them."""
    fit_rows = np.arange(n)
    if config.maps.fit_samples and config.maps.fit_samples < n:
        rng = np.random.default_rng(config.new_train.seed)
        fit_rows = np.sort(rng.choice(n, size=int(config.maps.fit_samples), replace=False))
    return fit_rows


def train_new_models(config, workdir, new_spec, new_src, variants, influences, old_emb, old_fp, new_fp) -> dict:
    """The new model trained independently, with BCT (one per influence-classifier variant) and with L2
    regression onto the old embeddings: {role: variables}."""
    trained = {"independent": train_model(config, workdir, "independent", new_spec, new_src, config.new_train,
                                          fingerprint=new_fp)}
    for role, norm in variants.items():
        influence_fp = dict(old=old_fp, weight=config.bct.influence_weight, normalize=norm or "none")
        trained[role] = train_model(config, workdir, role, new_spec, new_src, config.new_train, kind="bct",
                                    influence=influences[role], weight=config.bct.influence_weight,
                                    fingerprint=dict(new_fp, bct=influence_fp))
    trained["l2"] = train_model(config, workdir, "l2", new_spec, new_src, config.new_train, kind="l2",
                                weight=config.l2_weight, old_embeddings=old_emb,
                                fingerprint=dict(new_fp, l2=dict(old=old_fp, weight=config.l2_weight)))
    return trained


def class_subsets(config, old_classes, new_classes, labels) -> dict[str, list[int]]:
    """Evaluation class groups that exist: all classes, the old model's, those only the new model saw, and
    those held out of all training."""
    present = sorted(set(int(c) for c in np.unique(labels)))
    groups = {"all classes": present,
              "old classes (seen by both)": [c for c in present if c in old_classes],
              "new classes (seen by the new model only)": [c for c in present if c in new_classes],
              "held-out classes (unseen by both)": [c for c in present if c in set(config.held_out_classes)]}
    # A group equal to "all classes" or too small to rank (top-5 needs 6 images) adds nothing.
    return {k: v for k, v in groups.items()
            if k == "all classes" or (v and v != present and np.isin(labels, v).sum() > 5)}


NEW_TO_OLD, OLD_TO_NEW = ("affine_new_to_old", "orthogonal_new_to_old"), ("affine_old_to_new", "orthogonal_old_to_new")


def space_entries(roles) -> dict:
    """{(query space, gallery space): (query store entry, gallery store entry)} of every retrieval setting."""
    out = {("old", "old"): ("old/pre_logits", "old/pre_logits")}
    for role in [r for r in roles if r != "old"]:
        out[(role, role)] = (f"{role}/pre_logits", f"{role}/pre_logits")
        out[(role, "old")] = (f"{role}/as_old", "old/pre_logits")
    out.update({(k, "old"): (f"independent/{k}", "old/pre_logits") for k in NEW_TO_OLD})
    out.update({("independent", k): ("independent/pre_logits", f"old/{k}") for k in OLD_TO_NEW})
    return out


def eval_embeddings(outputs, batch, posthoc, *, roles, d_old) -> dict:
    """The eval pass's stored entries: every model's embedding, each new one cut / padded to the old
    width (the paper's rule), and the post-hoc maps' images."""
    from embjax import bct, maps

    x = {r: outputs[r]["pre_logits"] for r in roles}
    out = {f"{r}/pre_logits": v for r, v in x.items()}
    out.update({f"{r}/as_old": bct.fit_width(x[r], d_old) for r in roles if r != "old"})
    out.update({f"independent/{k}": maps.apply(x["independent"], posthoc[k]) for k in NEW_TO_OLD})
    out.update({f"old/{k}": maps.apply(x["old"], posthoc[k]) for k in OLD_TO_NEW})
    return out


def retrieval_tables(config, spaces, labels, subsets) -> dict:
    """{subset: {method: {setting: {top1, top5, map}}}} with every distinct (query, gallery) pair ranked once."""
    from embjax import retrieval

    methods = methods_for(config)

    def pair(method: str, setting: str) -> tuple[str, str]:
        trained, mapped = methods[method]
        if setting == "old/old":
            return ("old", "old")
        if setting == "new/new":
            return (trained, trained)
        if mapped is None:
            return (trained, "old")
        return (mapped, "old") if mapped.endswith("new_to_old") else ("independent", mapped)

    jobs = [(subset, key) for subset in subsets for key in spaces]

    def rank(job):
        subset, key = job
        rows = np.flatnonzero(np.isin(labels, subsets[subset]))
        query, gallery = spaces[key]
        r = retrieval.leave_one_out(query[rows], labels[rows], gallery[rows], labels[rows],
                                    metric=config.retrieval_metric, ks=(1, 5))
        return {"top1": float(r["recall_at_1"]), "top5": float(r["recall_at_5"]), "map": float(r["map"])}

    # Two rankings at a time: NumPy's sorts and searches release the GIL, so both cores rank.
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = dict(zip(jobs, pool.map(rank, jobs)))
    TRAIN_SECONDS["ranking"] = time.perf_counter() - t0
    for (subset, key), cell in done.items():
        print(f"[retrieval] {subset}: {key[0]} queries / {key[1]} gallery: top-1 {cell['top1']:.4f}  "
              f"mAP {cell['map']:.4f}", flush=True)
    return {subset: {m: {s: done[(subset, pair(m, s))] for s in SETTINGS} for m in methods} for subset in subsets}


def influence_diagnostics(influence, old_emb, labels, old_classes) -> dict:
    """How the influence classifier scores the old model's own embeddings of the new training set (the
    target BCT pulls the new model towards): accuracy and cross-entropy on old-class and new-class images."""
    kernel, bias, table = (np.asarray(a) for a in influence)
    logits = old_emb.astype(np.float64) @ kernel + bias
    cols = table[labels]
    covered = cols >= 0
    m = logits.max(axis=1, keepdims=True)
    ce = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))) - logits[np.arange(len(labels)), np.maximum(cols, 0)]
    right = logits.argmax(axis=1) == cols
    out = {}
    for group, rows in (("old classes", covered & np.isin(labels, old_classes)),
                        ("new classes", covered & ~np.isin(labels, old_classes))):
        if rows.any():
            out[group] = {"accuracy": float(right[rows].mean()), "cross_entropy": float(ce[rows].mean())}
    return out


def results(config, retrieval, subsets, old_classes, new_classes, n_old, n_new, n_fit, n_eval, map_r2, seconds,
            diagnostics):
    METHODS = methods_for(config)  # noqa: N806 - this run's methods
    main = retrieval["all classes"]
    plain = {s: {m: {k: {q: float(v) for q, v in cell.items()} for k, cell in row.items()}
                 for m, row in table.items()} for s, table in retrieval.items()}
    base_new = main["independent"]["new/new"]
    return {
        "methods": list(METHODS),
        "method_notes": METHOD_NOTES,
        "retrieval": plain["all classes"],
        "retrieval_by_classes": {s: plain[s] for s in plain if s != "all classes"},
        "class_groups": {k: list(v) for k, v in subsets.items()},
        # The paper's criterion on top-1 (its metric), and the same on mAP.
        "compatible": {m: bool(main[m]["new/old"]["top1"] > main[m]["old/old"]["top1"]) for m in METHODS},
        "compatible_map": {m: bool(main[m]["new/old"]["map"] > main[m]["old/old"]["map"]) for m in METHODS},
        "cost_new_new": {m: {k: float(main[m]["new/new"][k] - base_new[k]) for k in ("top1", "top5", "map")}
                         for m in METHODS},
        "map_r2": map_r2,
        "influence_classifier_on_old_embeddings": diagnostics,
        "models": {"old": config.old_model, "new": config.new_model},
        "old_classes": old_classes, "new_classes": new_classes,
        "held_out_classes": [int(c) for c in config.held_out_classes],
        "num_train": {"old": n_old, "new": n_new, "map_fit": n_fit}, "num_eval": n_eval,
        "published": [{"source": src, "rows": [{"method": m, **vals} for m, vals in rows]}
                      for src, rows in PUBLISHED],
        "config": common.to_dict(config),
        "meta": {"seconds": dict(seconds)},
    }


# --------------------------------------------------------------------------------------------------
# Report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main_table(results: dict):
    from embjax import report

    rows = []
    r = results["retrieval"]
    for m in results["methods"]:
        cost = results["cost_new_new"][m]["top1"]
        rows.append([m, _pct(r[m]["old/old"]["top1"]), _pct(r[m]["new/new"]["top1"]), _pct(r[m]["new/old"]["top1"]),
                     "yes" if results["compatible"][m] else "no", f"{100 * cost:+.1f}"])
    return report.Table(
        "Leave-one-out retrieval, top-1 (%), all evaluation classes",
        ["method", "old/old", "new/new", "new/old", "criterion met (new/old > old/old)", "cost to new/new"],
        rows, note="Criterion: M(new query, old gallery) > M(old, old), top-1. Cost: new/new minus the "
                   "independently trained new model's new/new (percentage points).")


def detail_table(results: dict, subset: str | None):
    from embjax import report

    r = results["retrieval"] if subset is None else results["retrieval_by_classes"][subset]
    header = ["method"] + [f"{s} {k}" for s in SETTINGS for k in ("top-1", "top-5", "mAP")]
    rows = [[m] + [_pct(r[m][s][k]) for s in SETTINGS for k in ("top1", "top5", "map")] for m in results["methods"]]
    title = "all evaluation classes" if subset is None else subset
    classes = results["class_groups"].get(subset or "all classes", [])
    return report.Table(f"Top-1, top-5 and mAP (%): {title}", header, rows, note=f"classes {classes}")


def published_table(results: dict):
    from embjax import report

    rows = []
    for entry in results["published"]:
        for row in entry["rows"]:
            rows.append([entry["source"], row["method"]] + [f"{row[s]:.1f}" if s in row else "–" for s in SETTINGS])
    return report.Table("Published figures (top-1 %)", ["source", "method", *SETTINGS], rows)


def markdown(results: dict, tables: dict) -> str:
    cfg, meta = results["config"], results.get("meta", {})
    out = [f"# Backward-compatible training against post-hoc maps: {cfg.get('name', '')}", ""]
    out += [f"- old model {results['models']['old']} trained on {results['num_train']['old']} images "
            f"(classes {results['old_classes']}); new model {results['models']['new']} on "
            f"{results['num_train']['new']} images (classes {sorted(results['old_classes'] + results['new_classes'])}); "
            f"held out of all training: {results['held_out_classes'] or 'none'}",
            f"- post-hoc maps fit without labels on {results['num_train']['map_fit']} new-training images; "
            f"retrieval leave-one-out over {results['num_eval']} images of {cfg.get('dataset')}:{cfg.get('eval_split')} "
            f"({cfg.get('retrieval_metric')} similarity)"]
    if "command" in meta:
        out.append(f"- command: `{meta['command']}`")
    for key in ("date", "jax"):
        if key in meta:
            out.append(f"- {key}: {meta[key]}")
    if meta.get("seconds"):
        out.append("- seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items()
                                            if isinstance(v, (int, float))))
    out.append("")
    for key, table in tables.items():
        out += [f"## {table.title}", ""]
        if table.note:
            out += [table.note, ""]
        out += [table.markdown(), ""]
    out += ["## Methods", ""] + [f"- **{m}**: {results['method_notes'][m]}" for m in results["methods"]]
    diag = results.get("influence_classifier_on_old_embeddings", {})
    if diag:
        out += ["", "Influence classifier (old head on old classes + synthesized columns on new classes) scoring "
                "the old model's own embeddings of the new training set, i.e. the target BCT pulls towards:", ""]
        for role, groups in diag.items():
            out.append(f"- {role}: " + "; ".join(f"{g}: accuracy {100 * v['accuracy']:.1f}%, cross-entropy "
                                                 f"{v['cross_entropy']:.2f}" for g, v in groups.items()))
    out += ["", "Map fit R² (statistics of the fit set): " +
            ", ".join(f"{k} {v:.3f}" for k, v in results["map_r2"].items()), ""]
    return "\n".join(out)


def write_report(run_dir: str, results: dict):
    from embjax import report

    tables = {"compatibility": main_table(results), "retrieval_all": detail_table(results, None)}
    for i, subset in enumerate(results["retrieval_by_classes"]):
        tables[f"retrieval_group{i + 1}"] = detail_table(results, subset)
    tables["published"] = published_table(results)
    return report.write_run(run_dir, results, tables=tables, markdown=markdown(results, tables))


def summary(results: dict) -> str:
    return main_table(results).markdown()


if __name__ == "__main__":
    common.main(run, write_report, "backward_compatible.py", "fashion_mnist", "experiments.backward_compatible",
                summary)
