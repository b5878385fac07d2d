r"""The affine-equivalence study (McNeely-White 2020, Tables 5.1-5.3 and the section 5.6 check).

  python -m experiments.affine_equivalence                                   # zoo on Fashion-MNIST
  python -m experiments.affine_equivalence --config=experiments/configs/affine_equivalence.py:effnet_lite
  python -m experiments.affine_equivalence --config=experiments/configs/affine_equivalence.py:imagenet \
      --config.manual_dir=/data/imagenet --config.weight_files.resnet152_v1=/w/resnet152.h5 ...

Two passes on the engine (embjax.extract):
  1. fit:  the joint statistics (embjax.stats) of every model's pre-logit features over the fit split;
  2. maps: affine (least squares), logit (classifier weights only) and naive (truncate / zero-pad) maps
           for every ordered pair (logit and naive in factored form: no N² matrices on the devices); with
           `heads="linear"`, a linear head per backbone trained on the fit features the first pass kept in
           the feature store; with `learned.families`, learned maps (embjax.learned_maps: `learned`
           linear, `learned_mlp` one hidden layer) trained on those features from the affine maps;
  3. eval: every pair's mapped features through the target's head on the evaluation split (embjax.evaluate).
See experiments/common.py for the command-line flags, resume and multi-host options.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from experiments import common

FAMILIES = ("affine", "logit", "naive")
LEARNED = ("learned", "learned_mlp")


def sources(config):
    """The fit and evaluation splits of config.dataset."""
    from embjax import data

    return data.sources(config, config.fit_split, config.eval_split)


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    from embjax import data, evaluate, extract, head_maps, heads as heads_lib, maps, stats

    if config.heads not in ("native", "linear"):
        raise ValueError(f"config.heads must be 'native' or 'linear', not {config.heads!r}")
    fit_src, eval_src = sources(config)
    for split, src in ((config.fit_split, fit_src), (config.eval_split, eval_src)):
        if len(src) == 0:
            raise ValueError(f"split '{split}' of {config.dataset} is empty")
    engine = common.engine(config, workdir, zoo_data=functools.cache(lambda: data.all_rows(fit_src)),
                           dataset_tag=f"{config.dataset}:{config.fit_split}", minimum=2)
    ms = engine.members
    names, dims = [m.name for m in ms], [m.feature_dim for m in ms]
    linear = config.heads == "linear"
    learned_families = tuple(config.learned.families)
    if set(learned_families) - set(LEARNED):
        raise ValueError(f"config.learned.families: unknown {sorted(set(learned_families) - set(LEARNED))}; "
                         f"choose from {LEARNED}")
    features = {n: ("pre_logits",) for n in names}

    def pre_logits(outputs):
        return [outputs[n]["pre_logits"] for n in names]

    # 1. Joint statistics over the fit split (and, for linear heads, the features themselves).
    fit = engine.run(extract.Pass(
        "fit", fit_src, config.fit_split, features, dataset=config.dataset,
        accumulator=stats.accumulator(dims, lambda out, batch, aux: pre_logits(out)),
        store={f"{n}/pre_logits": "float32" for n in names} if linear or learned_families else {}))
    if int(fit.count) == 0:
        raise ValueError(f"no samples were folded in from split '{config.fit_split}'")

    # 2. Maps for every ordered pair, and the heads that score them.
    closed_form = time.perf_counter()
    affine = maps.affine_all(fit, ridge=config.ridge, names=names)
    closed_form = time.perf_counter() - closed_form
    fit_statistics = fit_summary(fit, affine)
    # From here on only the count is needed: the D×D statistics (1.8 GB at the thesis' widths) can go.
    num_fit = int(fit.count)
    del fit
    own_heads = [m.head for m in ms]
    if linear:
        def train_heads():
            store = engine.store("fit")
            return [heads_lib.train_linear_head(store.array(f"{n}/pre_logits"), store.labels,
                                                config.num_classes, common.to_dict(config.linear_head), name=n)
                    for n in names]
        scoring = [tuple(h) for h in engine.memo("linear_heads", train_heads)]
    else:
        scoring = own_heads
    learned, learned_info = learned_maps(engine, names, dims, affine, scoring, common.to_dict(config.learned))
    # Affine maps as one (d_s, D) block row per source, kept where they were computed (the engine
    # places them on the mesh without a host round trip); logit maps factored through each head's
    # pseudo-inverse and naive maps as truncation / zero-padding, so neither keeps N² matrices.
    affine_stacks = evaluate.stack_maps(affine, dims)
    del affine  # at the thesis' widths the maps and their stacked form are 1.6 + 1.8 GB: keep one
    families = {"affine": affine_stacks,
                "logit": evaluate.logit_maps(scoring, [head_maps.head_pinv(h) for h in scoring], dims),
                "naive": evaluate.NaiveMaps(), **learned}
    head_sets = {k: scoring for k in families}
    if linear:  # the backbones' own (ImageNet) heads: agreement under affine maps, no labelled accuracy
        families["native_affine"], head_sets["native_affine"] = affine_stacks, own_heads

    # 3. Every pair on the evaluation split.
    def family(k):
        return evaluate.accumulator(dims, lambda out, batch, aux: (pre_logits(out), aux["heads"][k], aux["maps"][k]))

    ev = engine.run(extract.Pass(
        "eval", eval_src, config.eval_split, features, accumulator={k: family(k) for k in families},
        dataset=config.dataset, aux={"heads": head_sets, "maps": families}))
    out = results(config, names, dims, num_fit, fit_statistics, ev, engine.seconds)
    out["params"] = [m.num_params for m in ms]
    if learned_info:
        out["learned_maps"] = {"closed_form_seconds": closed_form, "families": learned_info,
                               "config": common.to_dict(config.learned)}
    if config.dtype != "float32" and config.precision_check_images:
        out["bfloat16_vs_float32"] = precision_check(config, ms, eval_src, engine)
    return out, engine


def learned_maps(engine, names, dims, affine, heads, cfg: dict) -> tuple[dict, dict]:
    """The learned map families in `cfg["families"]` for every ordered pair, trained (embjax.learned_maps)
    on the fit features the first pass stored, each started at its closed-form affine map and scored by
    the same heads; one memo per family, so a resumed run reuses them. Returns ({family: maps in the form
    evaluate takes}, {family: {"seconds", "final_loss"}})."""
    from embjax import evaluate, learned_maps as lm

    families = cfg.pop("families")
    if not families:
        return {}, {}
    store = engine.store("fit")
    feats, labels = [store.array(f"{n}/pre_logits") for n in names], store.labels
    params, trained = lm.fit_families(feats, labels, heads, affine, families, memo=engine.memo, log=engine.log, **cfg)
    out, info = {}, {}
    for family, pairs in params.items():
        if family == "learned":
            out[family] = evaluate.stack_maps({k: lm.as_affine(p) for k, p in pairs.items()}, dims)
        else:
            out[family] = evaluate.mlp_maps({k: (*lm.as_affine(p), p["w1"], p["b1"], p["w2"])
                                             for k, p in pairs.items()}, dims)
        loss = trained[family]["final_loss"]
        info[family] = {"seconds": trained[family]["seconds"],
                        "final_loss": [[None if i == j else loss.get((i, j)) for j in range(len(names))]
                                       for i in range(len(names))]}
    return out, info


def precision_check(config, ms, eval_src, engine) -> dict:
    """A bfloat16 run against float32 on the first `precision_check_images` evaluation images: per model,
    the top-1 agreement of its own head and the relative error of its features (‖f_bf16 − f_32‖_F /
    ‖f_32‖_F). The float32 members are loaded again from the same weights."""
    from embjax import data, extract, members

    source = data.Prefix(eval_src, config.precision_check_images)
    f32 = members.load([m.name for m in ms], config.weights, weight_files=common.to_dict(config.weight_files),
                       dtype="float32", input_sizes=common.input_sizes(config), fold_batchnorm=config.fold_batchnorm,
                       zoo_config=common.to_dict(config.zoo), dataset_tag=f"{config.dataset}:{config.fit_split}",
                       zoo_data=lambda: data.all_rows(sources(config)[0]))
    outputs = {m.name: ("pre_logits", "logits") for m in ms}
    store = {f"{m.name}/{k}": "float32" for m in ms for k in ("pre_logits", "logits")}
    stores = []
    for tag, group, precision in (("bfloat16", ms, None), ("float32", f32, "float32")):
        e = engine.sibling(f"precision_{tag}", group, checkpoint_every=0, precision=precision)
        e.run(extract.Pass("precision", source, f"{config.eval_split}[:{len(source)}]", outputs, store=store,
                           dataset=config.dataset))
        stores.append(e.store("precision"))
    low, high = stores
    agreement, error = [], []
    for m in ms:
        a, b = low.array(f"{m.name}/logits"), high.array(f"{m.name}/logits")
        agreement.append(float(np.mean(a.argmax(1) == b.argmax(1))))
        fa, fb = (s.array(f"{m.name}/pre_logits").astype(np.float64) for s in (low, high))
        error.append(float(np.linalg.norm(fa - fb) / max(np.linalg.norm(fb), 1e-30)))
    return {"images": len(source), "top1_agreement": agreement, "feature_rel_error": error}


def fit_summary(fit, affine) -> dict:
    """R² of every affine map and linear CKA of every pair on the fit split, from the statistics alone."""
    from embjax import stats

    n = len(fit.dims)
    return {"r2": [[float(stats.r2(fit, i, j, *affine[(i, j)])) if i != j else 1.0 for j in range(n)]
                   for i in range(n)],
            "cka": [[float(stats.cka(fit, i, j)) for j in range(n)] for i in range(n)]}


def results(config, names, dims, num_fit, fit_statistics, ev, seconds) -> dict:
    """The results dict (embjax.report.write's layout) from the passes' final states."""
    from embjax import evaluate

    out = {"models": names, "feature_dims": dims, "dataset": config.dataset, "fit_split": config.fit_split,
           "eval_split": config.eval_split, "num_fit": num_fit, "num_eval": int(ev["affine"].count),
           "heads": config.heads}
    for k, e in ev.items():
        m = {key: np.asarray(v).tolist() for key, v in evaluate.compute(e).items()}
        if k == "native_affine":  # ImageNet heads against another dataset's labels mean nothing: agreement only
            m = {"agreement": m["agreement"], "r2": m["r2"]}
        out[k] = m
    out["unmapped"] = {"accuracy": np.diag(np.asarray(out["affine"]["accuracy"])).tolist(),
                       "top5": np.diag(np.asarray(out["affine"]["top5"])).tolist()}
    out["fit_statistics"] = fit_statistics
    thesis = common.to_dict(config.thesis_names)
    if thesis:
        out["reference"] = {"thesis_names": [thesis.get(m) for m in names]}
    out["config"] = common.to_dict(config)
    out["meta"] = {"seconds": dict(seconds)}
    return out


def write_report(run_dir: str, results: dict):
    """The affine report, and for zoo models trained apart (zoo_apart) the pairs grouped by what differs."""
    from embjax import affine_report, apart_report

    return {**affine_report.write(run_dir, results), **apart_report.write(run_dir, results)}


def summary(results: dict) -> str:
    from embjax import affine_report, apart_report

    return "\n".join(filter(None, (affine_report.summary_text(results), apart_report.summary_text(results))))


if __name__ == "__main__":
    common.main(run, write_report, "affine_equivalence.py", "zoo", "experiments.affine_equivalence", summary)
