r"""Backward-compatible training (Shen et al., CVPR 2020) against post-hoc maps, on one engine.

  python -m experiments.backward_compatible                      # Fashion-MNIST, zoo models (the default)
  python -m experiments.backward_compatible --config=experiments/configs/backward_compatible.py:imagenet \
      --config.manual_dir=/data/imagenet

A model update is backward compatible when new query embeddings search the old gallery better than the old
model did: M(new, old) > M(old, old) (the paper's criterion, top-1 of leave-one-out retrieval). The study:

  1. trains the old model on its data (embjax.train; resumable);
  2. pass "old_features": the old model over the new training set: class means (the synthesized columns of
     classes the old model never saw) and, in the store, the embeddings (the L2 baseline's targets);
  3. trains the new model on the new training set: independently, with BCT's influence loss through the
     old classifier (embjax.bct), and with L2 regression onto the old embeddings;
  4. pass "fit_maps": joint statistics of old and independent-new embeddings, from which the post-hoc maps
     are solved without labels: affine and orthogonal, new→old (queries mapped) and old→new (gallery mapped);
     the pass keeps both embeddings, on which learned old→new maps (config.learned.families: linear and
     one-hidden-layer MLP, FCT's kind of transformation) train from the affine old→new map;
  5. pass "eval": every embedding the retrieval compares, native and mapped, into the store; then
     leave-one-out retrieval (CMC top-1, top-5, mAP over the full ranking) for old/old, new/new and new/old
     of every method, over all evaluation classes and each class group (embjax.bct.retrieval_cells);
     results and report by embjax.bct_report. See experiments/common.py for flags, resume, multi-host.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from experiments import common


def methods_for(config) -> dict:
    """This run's methods (bct_report.METHODS): the unnormalized BCT variant only if asked for and distinct,
    the learned maps of config.learned.families."""
    from embjax import bct_report

    return bct_report.methods(config.bct.compare_unnormalized and config.bct.normalize not in (None, "none"),
                              tuple(config.learned.families))


TRAIN_SECONDS: dict[str, float] = {}  # wall seconds of each training here (a finished one reused: its restore)


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


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    from embjax import bct, bct_report, data, extract, members
    from embjax.models import registry

    if config.old_model == config.new_model:
        raise ValueError("config.old_model and config.new_model are the same model; the study compares two")
    normalize = None if config.bct.normalize in (None, "none") else config.bct.normalize
    if normalize not in bct.NORMALIZE_CHOICES:
        raise ValueError(f"config.bct.normalize must be 'none', 'unit' or 'old_norm', not {config.bct.normalize!r}")
    old_spec, new_spec = registry.get(config.old_model), registry.get(config.new_model)
    train_src, eval_src = data.sources(config, config.train_split, config.eval_split)
    new_rows, old_rows = bct.training_rows(
        data.labels_of(train_src), held_out=config.held_out_classes, old_data=config.old_data,
        old_classes=config.old_classes, old_fraction=config.old_fraction, seed=config.old_train.seed)
    old_rows = old_rows[:config.old_train.get("limit", 0) or None]  # TrainConfig.limit: its first rows only
    new_src = data.Subset(train_src, new_rows, f"{config.train_split} (new training set)")
    old_src = data.Subset(train_src, old_rows, f"{config.train_split} (old training set)")
    print(f"[study] old model {config.old_model} on {len(old_rows)} images, new model {config.new_model} on "
          f"{len(new_rows)} images of {config.dataset}:{config.train_split}", flush=True)
    data_fp = {k: common.to_dict(config).get(k) for k in
               ("dataset", "train_split", "data_dir", "manual_dir", "image_size", "num_classes", "held_out_classes")}
    old_fp = dict(data_fp, model=config.old_model, old_data=config.old_data, old_classes=list(config.old_classes),
                  old_fraction=config.old_fraction, train=common.to_dict(config.old_train))
    new_fp = dict(data_fp, model=config.new_model, train=common.to_dict(config.new_train))

    old = members.make_member("old", old_spec, train_model(config, workdir, "old", old_spec, old_src,
                                                           config.old_train, fingerprint=old_fp))
    e1 = common.engine(config, workdir, [old])
    old_classes, new_classes, means, old_emb, new_labels = old_features(config, e1, old, new_src)
    # One BCT model per normalization of the synthesized columns (and the paper's literal rule, if asked for).
    variants = {"bct": normalize, **({"bct_unnormalized": None} if "bct, unnormalized columns" in methods_for(config)
                                     else {})}
    influences, diagnostics = bct.influence_variants(old.head, variants, old_classes, new_classes, means,
                                                     int(config.num_classes), old_emb, new_labels)
    trained = train_new_models(config, workdir, new_spec, new_src, variants, influences, old_emb, old_fp, new_fp)
    e2 = common.engine(config, workdir, [old, *(members.make_member(k, new_spec, v) for k, v in trained.items())])
    posthoc, map_r2, num_fit, closed_form_seconds = posthoc_maps(config, e2, new_src, old.feature_dim,
                                                                 new_spec.feature_dim)
    new_head = next(m.head for m in e2.members if m.name == "independent")
    learned, learned_info, learned_r2 = learned_old_to_new(config, e2, posthoc["affine_old_to_new"], new_head)
    posthoc, map_r2 = {**posthoc, **learned}, {**map_r2, **learned_r2}

    roles = [m.name for m in e2.members]
    entries = bct_report.space_entries(roles, [k for k in posthoc if not k.endswith("new_to_old")])
    e2.run(extract.Pass(
        "eval", eval_src, config.eval_split, {r: ("pre_logits",) for r in roles}, dataset=config.dataset,
        aux=posthoc, emit=functools.partial(bct.eval_embeddings, roles=roles, d_old=old.feature_dim),
        store={e: "float32" for pair in entries.values() for e in pair}))
    ev = e2.store("eval")
    spaces = {key: tuple(np.asarray(ev.array(e)) for e in pair) for key, pair in entries.items()}
    labels = np.asarray(ev.labels)
    groups = bct.class_groups(labels, old_classes, new_classes, config.held_out_classes)
    cells = e2.memo("retrieval_cells", lambda: bct.retrieval_cells(spaces, labels, groups, config.retrieval_metric))
    held_out = {k: bct.r2_score(*(spaces[(k, "old")] if k.endswith("new_to_old") else
                                  spaces[("independent", k)][::-1])) for k in posthoc}  # (mapped, target)
    out = bct_report.results(
        common.to_dict(config), methods_for(config), cells, groups, old_classes=old_classes,
        new_classes=new_classes, num_train={"old": len(old_rows), "new": len(new_rows), "map_fit": num_fit},
        num_eval=len(labels), map_r2=map_r2, seconds={**TRAIN_SECONDS, **e1.seconds, **e2.seconds},
        diagnostics=diagnostics, map_r2_held_out=held_out,
        learned={"families": learned_info, "loss": config.learned.loss, "closed_form_seconds": closed_form_seconds})
    return out, e2


def old_features(config, engine, old, new_src):
    """Pass "old_features": the old model over the new training set, its embeddings kept in the store.
    Returns (old classes, new classes, per-class mean old embeddings, old embeddings, labels), rows in
    `new_src`'s order."""
    from embjax import bct, extract

    sums = engine.run(extract.Pass(
        "old_features", new_src, new_src.name, {"old": ("pre_logits",)}, dataset=config.dataset,
        accumulator=bct.class_sums(int(config.num_classes), old.feature_dim,
                                   lambda out, batch, aux: out["old"]["pre_logits"]),
        store={"old/pre_logits": "float32"}))
    present = [int(c) for c in np.flatnonzero(np.asarray(sums.count) > 0)]
    old_classes = sorted(set(int(c) for c in (config.old_classes if config.old_data == "classes" else present)))
    new_classes = [c for c in present if c not in old_classes]
    store = engine.store("old_features")
    old_emb = np.empty((len(new_src), old.feature_dim), np.float32)
    labels = np.empty((len(new_src),), np.int32)
    old_emb[store.index] = store.array("old/pre_logits")
    labels[store.index] = store.labels
    return old_classes, new_classes, np.asarray(bct.class_sums_compute(sums)), old_emb, labels


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


def posthoc_maps(config, engine, new_src, d_old: int, d_new: int):
    """Pass "fit_maps": joint statistics of the old and the independent new embeddings over the new training
    set (or config.maps.fit_samples of it), both embeddings kept in the store, and the post-hoc maps solved
    from the statistics without labels. Returns (maps {name: (W, b)}, their R² on the fit set, the number
    of fit images, the seconds the four solves took)."""
    import jax

    from embjax import bct, bct_report, data, extract, maps, stats

    fit_rows = np.arange(len(new_src))
    if config.maps.fit_samples and config.maps.fit_samples < len(new_src):
        rng = np.random.default_rng(config.new_train.seed)
        fit_rows = np.sort(rng.choice(len(new_src), size=int(config.maps.fit_samples), replace=False))
    fit_src = data.Subset(new_src, fit_rows, f"{new_src.name}, {len(fit_rows)} images for the maps")
    fit = engine.run(extract.Pass(
        "fit_maps", fit_src, fit_src.name, {"old": ("pre_logits",), "independent": ("pre_logits",)},
        dataset=config.dataset, accumulator=stats.accumulator(
            (d_old, d_new), lambda out, batch, aux: [out["old"]["pre_logits"], out["independent"]["pre_logits"]]),
        store={"old/pre_logits": "float32", "independent/pre_logits": "float32"}))
    names, t0 = ["old", "independent"], time.perf_counter()
    posthoc = {"affine_new_to_old": maps.affine(fit, 1, 0, config.maps.ridge, names=names),
               "orthogonal_new_to_old": bct.orthogonal_map(fit, 1, 0),
               "affine_old_to_new": maps.affine(fit, 0, 1, config.maps.ridge, names=names),
               "orthogonal_old_to_new": bct.orthogonal_map(fit, 0, 1)}
    jax.block_until_ready(posthoc)
    seconds = time.perf_counter() - t0
    r2 = {k: float(stats.r2(fit, 1, 0, *wb) if k in bct_report.NEW_TO_OLD else stats.r2(fit, 0, 1, *wb))
          for k, wb in posthoc.items()}
    return posthoc, r2, len(fit_rows), seconds


def learned_old_to_new(config, engine, affine, new_head):
    """The learned old→new maps of config.learned.families (embjax.bct.learned_map), trained on the
    embeddings pass "fit_maps" stored, each from the closed-form `affine` old→new map; one memo each, so a
    resumed run reuses them. Returns ({name: params}, {family: training record}, {name: R² on the fit set})."""
    from embjax import bct

    cfg = common.to_dict(config.learned)
    families = tuple(cfg.pop("families"))
    if not families:
        return {}, {}, {}
    store = engine.store("fit_maps")
    x, y = (np.asarray(store.array(f"{m}/pre_logits")) for m in ("old", "independent"))
    labels = np.asarray(store.labels)
    params, info, r2 = {}, {}, {}
    for family in families:
        name = f"{family}_old_to_new"
        value = engine.memo(name, lambda family=family: dict(zip(("params", "info"), bct.learned_map(
            x, y, labels, affine, family, head=new_head, **cfg))))
        params[name] = value["params"]
        info[family] = {k: (float(v) if np.ndim(v) == 0 else [float(a) for a in v]) for k, v in value["info"].items()}
        r2[name] = bct.r2_score(bct.apply_map(params[name], x), y)
        engine.log(f"[learned] {family} old→new: {info[family]['seconds']:.2f} s; {cfg['loss']} loss on the fit set "
                   f"{info[family]['fit_loss_before']:.4f} (closed form) → {info[family]['fit_loss_after']:.4f}")
    return params, info, r2


def write_report(run_dir: str, results: dict):
    from embjax import bct_report

    return bct_report.write(run_dir, results)


def summary(results: dict) -> str:
    from embjax import bct_report

    return bct_report.summary(results)


if __name__ == "__main__":
    common.main(run, write_report, "backward_compatible.py", "fashion_mnist", "experiments.backward_compatible",
                summary)
