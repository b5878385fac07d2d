r"""The canonical-space study: is there a k-dimensional hub that all N models map through with little loss?

  python -m experiments.canonical_space                                   # zoo on Fashion-MNIST
  python -m experiments.canonical_space --config=experiments/configs/canonical_space.py:effnet_lite
  python -m experiments.canonical_space --config.ranks=8,16,64 --config.methods=gcca

Passes on the engine (embjax.extract), the affine study's fit pass unchanged:
  1. fit:  the joint statistics (embjax.stats) of every model's pre-logit features over the fit split;
  2. hubs: for each method (generalized CCA, generalized Procrustes; embjax.canonical) and each rank k,
           every model's encoder and decoder from the statistics; the direct affine maps beside them;
  3. eval: every ordered pair source → hub → target, and the direct maps, through the target's head
           (embjax.evaluate, as Table 5.2 scores direct maps).
The intrinsic dimension is the smallest k whose mean relative change over all ordered pairs is within
config.tolerance (1 point) of the direct affine maps'. See experiments/common.py for the flags.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from experiments import affine_equivalence as affine
from experiments import common


def fit_pass(config, workdir):
    """Engine (with its members) and the fit pass's joint statistics, exactly as the affine study's."""
    from embjax import data, extract, stats

    fit_src, eval_src = affine.sources(config)
    engine = common.engine(config, workdir, zoo_data=functools.cache(lambda: data.all_rows(fit_src)),
                           dataset_tag=f"{config.dataset}:{config.fit_split}", minimum=2)
    ms = engine.members
    names, dims = [m.name for m in ms], [m.feature_dim for m in ms]
    fit = engine.run(extract.Pass(
        "fit", fit_src, config.fit_split, {n: ("pre_logits",) for n in names}, dataset=config.dataset,
        accumulator=stats.accumulator(dims, lambda out, batch, aux: [out[n]["pre_logits"] for n in names]),
        store={f"{n}/pre_logits": "float32" for n in names} if config.heads == "linear" else {}))
    if int(fit.count) == 0:
        raise ValueError(f"no samples were folded in from split '{config.fit_split}'")
    return ms, engine, fit, eval_src


def scoring_heads(config, ms, engine):
    """The heads that score every pair: each model's own, or linear heads trained on the fit features."""
    from embjax import heads as heads_lib

    if config.heads == "native":
        return [m.head for m in ms]
    if config.heads != "linear":
        raise ValueError(f"config.heads must be 'native' or 'linear', not {config.heads!r}")

    def train():
        store = engine.store("fit")
        return [heads_lib.train_linear_head(store.array(f"{m.name}/pre_logits"), store.labels, config.num_classes,
                                            common.to_dict(config.linear_head), name=m.name) for m in ms]
    return [tuple(h) for h in engine.memo("linear_heads", train)]


def hub_families(config, fit, dims):
    """Every family's maps stacked on a leading axis (evaluate.AffineMaps, (F, d_s, D) per source): first
    the direct affine maps, then source → hub → target for each method and rank; with the family names,
    the ranks, the methods and the CPU seconds of each solve."""
    import jax
    import jax.numpy as jnp

    from embjax import canonical, evaluate, maps, pair_maps

    ranks = ([int(k) for k in config.ranks.split(",")] if config.ranks
             else canonical.rank_curve(sum(dims), max(dims)))
    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(pair_maps.HUB_METHODS))
    if unknown or not methods:
        raise ValueError(f"config.methods: unknown or no methods {unknown}; choose from {list(pair_maps.HUB_METHODS)}")
    t = time.process_time()
    names, stacks = ["direct"], [evaluate.stack_maps(maps.affine_all(fit, ridge=config.ridge), dims)]
    cpu = {"direct": time.process_time() - t}
    # The open-set study's hub solver (embjax.pair_maps): each method solved once for every rank, every
    # ordered pair composed source -> hub -> target.
    hub_maps, _, solve_cpu = pair_maps.hub_families(fit, ranks, methods, ridge=config.hub_ridge,
                                                    iters=config.procrustes_iters, eigensolver=config.eigensolver)
    cpu.update(solve_cpu)
    for method in methods:
        for k in ranks:
            names.append(f"{method}/{k}")
            stacks.append(evaluate.stack_maps(hub_maps[pair_maps.hub_family(method, k)], dims))
    return names, jax.tree.map(lambda *a: jnp.stack(a), *stacks), ranks, methods, cpu


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    import jax

    from embjax import canonical, evaluate, extract
    from embjax.accumulator import Accumulator

    ms, engine, fit, eval_src = fit_pass(config, workdir)
    names, dims = [m.name for m in ms], [m.feature_dim for m in ms]
    families, stacked, ranks, methods, cpu = hub_families(config, fit, dims)
    num_fit = int(fit.count)
    del fit
    heads = scoring_heads(config, ms, engine)
    # One vmapped evaluation over the stacked families: the step compiles one family, not F of them.
    update = jax.vmap(evaluate.update, in_axes=(0, None, None, 0, None, None))
    hub_eval = Accumulator(
        empty=lambda: jax.tree.map(lambda *a: jax.numpy.stack(a), *[evaluate.init(dims)] * len(families)),
        update=lambda state, out, batch, aux: update(state, [out[n]["pre_logits"] for n in names], aux["heads"],
                                                     aux["maps"], batch["label"], batch["mask"]),
        merge=jax.vmap(evaluate.merge))
    ev = engine.run(extract.Pass(
        "eval", eval_src, config.eval_split, {n: ("pre_logits",) for n in names}, dataset=config.dataset,
        accumulator=hub_eval, aux={"maps": stacked, "heads": heads}))
    scores = {k: {key: np.asarray(v) for key, v in evaluate.compute(jax.tree.map(lambda a: a[f], ev)).items()}
              for f, k in enumerate(families)}
    off = ~np.eye(len(names), dtype=bool)

    def summary(m):
        return {"mean_relative_change": float(np.mean(m["relative_change"][off])),
                "accuracy": m["accuracy"].tolist(), "agreement": m["agreement"].tolist(), "r2": m["r2"].tolist()}

    direct = summary(scores["direct"])
    out = {"models": names, "feature_dims": dims, "dataset": config.dataset, "num_fit": num_fit,
           "num_eval": int(ev.count[0]), "heads": config.heads, "ranks": ranks,
           "unmapped": {"accuracy": np.diag(scores["direct"]["accuracy"]).tolist()}, "direct": direct,
           "canonical": {}, "intrinsic_dim": {}}
    for method in methods:
        per_rank = [summary(scores[f"{method}/{k}"]) for k in ranks]
        out["canonical"][method] = {key: [r[key] for r in per_rank] for key in per_rank[0]}
        out["intrinsic_dim"][method] = canonical.intrinsic_dim(
            ranks, out["canonical"][method]["mean_relative_change"], direct["mean_relative_change"], config.tolerance)
    out["config"] = common.to_dict(config)
    out["meta"] = {"seconds": dict(engine.seconds), "solve_cpu_seconds": cpu}
    return out, engine


def plot(results, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, curve in results["canonical"].items():
        ax.plot(results["ranks"], [100 * c for c in curve["mean_relative_change"]], marker="o", label=method)
    ax.axhline(100 * results["direct"]["mean_relative_change"], color="k", ls="--", label="direct affine")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hub width k")
    ax.set_ylabel("mean relative change of top-1 (%)")
    ax.set_title(f"source → hub → target, {len(results['models'])} models", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def summary(results: dict) -> str:
    lines = [f"mean relative change over all ordered pairs (top-1, %); direct affine maps "
             f"{100 * results['direct']['mean_relative_change']:+.2f}",
             "k      " + "".join(f"{m:>12}" for m in results["canonical"])]
    for i, k in enumerate(results["ranks"]):
        lines.append(f"{k:<7}" + "".join(f"{100 * c['mean_relative_change'][i]:>+12.2f}"
                                          for c in results["canonical"].values()))
    lines.append("intrinsic dimension (within " f"{100 * results['config']['tolerance']:g} point of direct): "
                 + ", ".join(f"{m} {k}" for m, k in results["intrinsic_dim"].items()))
    return "\n".join(lines)


def write_report(run_dir: str, results: dict):
    from embjax import report

    meta = results.get("meta", {})
    md = "\n".join([f"# Canonical space: {results['config']['name']}", "",
                    f"- command: `{meta.get('command', '')}`", f"- models: {', '.join(results['models'])}",
                    f"- seconds: {meta.get('seconds', {})}; hub solves (CPU s): {meta.get('solve_cpu_seconds', {})}",
                    "", "```", summary(results), "```", "", "![mean change against k](canonical_curve.png)", ""])
    return report.write_run(run_dir, results, figures={"canonical_curve.png": lambda p: plot(results, p)},
                            markdown=md)


if __name__ == "__main__":
    common.main(run, write_report, "canonical_space.py", "zoo", "experiments.canonical_space", summary)
