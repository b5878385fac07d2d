r"""The full-network embedding study (Garcia-Gasulla et al., "An Out-of-the-box Full-network Embedding for
Convolutional Neural Networks"): does an embedding of every layer, standardized and discretized, beat the
last layer for transfer with few training images?

  python -m experiments.full_network_embedding                 # EfficientNet-Lite0/1/2 on Fashion-MNIST
  python -m experiments.full_network_embedding --config=experiments/configs/full_network_embedding.py:vgg16 \
      --config.weight_files.vgg16=/w/vgg16_weights_tf_dim_ordering_tf_kernels.h5    # the paper's VGG16

Per backbone, two passes on the engine (embjax.extract):
  1. stats_<model>: over the training split, every embedding layer spatially averaged (embjax.fne.pool),
     per-feature moments (embjax.moments, diagonal only) for each nested training subset at once (the
     first n images, masked by dataset index), and the pooled features and pre-logits kept in the
     feature store (float32);
  2. embed_<model>: over the test split, the full-network embedding of every subset's standardization
     written to the store as int8 (`<model>/fne_n<size>`), beside the pooled features and pre-logits; the
     fold counts the zeros of the discretized embedding.
The training side of the embedding is the same functions (fne.standardize, fne.discretize) applied to the
stored training features, written as int8 into the store `train_fne_<model>`: one forward pass over the
training split instead of two, which is what lets 1,200 training images fit in the CPU budget of the
default run. Then a one-vs-rest squared-hinge linear
SVM (embjax.svm, LinearSVC's objective, C = config.svm.C) per backbone × embedding × training size:

  fne               standardized with the subset's statistics, discretized to {-1, 0, 1}
  fne_standardized  the same features standardized but not discretized
  last_layer        pre_logits as they are
  last_layer_l2     pre_logits scaled to unit L2 norm

See experiments/common.py for the command-line flags, resume (run the same command again after kill -9)
and multi-host options.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from experiments import common

EMBEDDINGS = ("fne", "fne_standardized", "last_layer", "last_layer_l2")
EMBEDDING_TITLES = {
    "fne": "full network, discretized",
    "fne_standardized": "full network, standardized",
    "last_layer": "last layer",
    "last_layer_l2": "last layer, L2-normalized",
}


def sources(config):
    from embjax import data

    kw = dict(data_dir=config.data_dir, manual_dir=config.manual_dir, image_size=config.image_size)
    if config.download:
        kw["download"] = True  # tfds prepares a missing dataset (needs the internet once)
    return (data.get_source(config.dataset, config.train_split, **kw),
            data.get_source(config.dataset, config.test_split, **kw))


def parse_sizes(text, available: int) -> list[int]:
    """'100,1000,-1' -> sorted distinct sizes (-1: the whole training split), each checked against it."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("config.train_sizes must list at least one training-set size (e.g. '100,1000')")
    sizes = []
    for t in items:
        try:
            n = int(t)
        except ValueError:
            raise ValueError(f"config.train_sizes: {t!r} is not an integer") from None
        n = available if n == -1 else n
        if not 0 < n <= available:
            raise ValueError(f"config.train_sizes: {t} is not in 1..{available}, the size of the training split "
                             "(use -1 for all of it, or a larger config.train_split)")
        sizes.append(n)
    return sorted(set(sizes))


def embedding_plan(member, image_shape, activation: str, layer_set: str = "conv"):
    """(layers, widths) of `member`'s full-network embedding, from an abstract evaluation (no compute)."""
    import jax
    import jax.numpy as jnp

    from embjax import fne
    from embjax.models import layers as model_layers

    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
    named, out = model_layers.traced_layers(member.apply, member.variables, x)
    layers = fne.embedding_layers(named, layer_set, activation, keys=out.keys())
    return layers, fne.layer_widths(out, layers)


def _key(n: int) -> str:
    return f"n{n}"


def run(config, workdir: str):
    """The study for `config`, resumable in `workdir`; returns (results, engine)."""
    from embjax import data, members

    if config.activation not in ("post", "pre"):
        raise ValueError(f"config.activation must be 'post' or 'pre', not {config.activation!r}")
    # Models first: a missing weight file is reported before any dataset is opened (or downloaded).
    splits = functools.cache(lambda: sources(config))
    ms = common.members(config, zoo_data=functools.cache(lambda: data.all_rows(splits()[0])),
                        dataset_tag=f"{config.dataset}:{config.train_split}")
    train_src, test_src = splits()
    for split, src in ((config.train_split, train_src), (config.test_split, test_src)):
        if len(src) == 0:
            raise ValueError(f"split '{split}' of {config.dataset} is empty")
    sizes = parse_sizes(config.train_sizes, len(train_src))
    image_shape = getattr(train_src, "image_shape", None) or np.shape(train_src[0][0])
    plans = {m.name: embedding_plan(m, image_shape, config.activation, config.layer_set) for m in ms}
    # The training split's int8 embedding is derived from the stored pooled features, streamed through an
    # identity member per backbone.
    pooled_members = [members.identity(f"pooled_{m.name}", sum(plans[m.name][1])) for m in ms]
    engine = common.engine(config, workdir, ms + pooled_members)
    low, high = float(config.low), float(config.high)

    per_model = {m.name: model_passes(config, engine, m.name, plans[m.name], sizes, train_src, test_src)
                 for m in ms}

    # Linear SVMs: a memo per backbone, so a resumed run does not retrain the finished ones.
    accuracy, svm_info = {}, {}
    for m in ms:
        name = m.name
        memo = engine.memo(f"svm_{name}", lambda name=name: train_svms(
            config, engine, name, sizes, per_model[name]["standardizations"], low, high))
        accuracy[name] = {e: {str(n): float(memo["accuracy"][e][_key(n)]) for n in sizes} for e in EMBEDDINGS}
        svm_info[name] = {e: {str(n): {k: float(memo[k][e][_key(n)]) for k in ("objective", "gap", "iterations",
                                                                                  "seconds")}
                              for n in sizes} for e in EMBEDDINGS}
    return results(config, ms, sizes, per_model, accuracy, svm_info, engine, len(train_src), len(test_src)), engine


def model_passes(config, engine, name: str, plan, sizes, train_src, test_src) -> dict:
    """One backbone's three passes: moments of every subset (keeping pooled and last-layer features), the
    training rows' int8 embedding from the stored pooled features, the test split's embedding."""
    import jax.numpy as jnp

    from embjax import accumulator, data, extract, fne, moments

    low, high = float(config.low), float(config.high)
    layers, widths = plan
    dim = sum(widths)

    def pooled(outputs, layers=layers, name=name):
        return fne.pool(outputs[name], layers)

    def emit_stats(outputs, batch, aux, pooled=pooled, name=name):
        return {f"{name}/pooled": pooled(outputs), f"{name}/pre_logits": outputs[name]["pre_logits"]}

    wanted = {name: tuple(dict.fromkeys((*layers, "pre_logits")))}
    stats = engine.run(extract.Pass(
        f"stats_{name}", train_src, config.train_split, wanted, dataset=config.dataset,
        emit=emit_stats, accumulator={  # moments of the first n training rows, for each subset size n
            _key(n): moments.accumulator(dim, lambda out, batch, aux, p=pooled: p(out),
                                         mask=lambda batch, n=n: batch["index"] < n) for n in sizes},
        store={f"{name}/pooled": "float32", f"{name}/pre_logits": "float32"}))
    standardizations = {k: fne.standardization(s, config.degenerate_rtol) for k, s in stats.items()}

    def emit_train(outputs, batch, aux, name=name):  # every subset size's embedding of every training row
        x = outputs[f"pooled_{name}"]["pre_logits"]
        return {f"{name}/fne_{k}": fne.discretize(fne.standardize(x, s), low, high) for k, s in aux.items()}

    engine.run(extract.Pass(
        f"train_fne_{name}", data.store_rows(engine.store(f"stats_{name}"), [f"{name}/pooled"]),
        config.train_split, {f"pooled_{name}": ("pre_logits",)}, aux=standardizations, emit=emit_train,
        store={f"{name}/fne_{_key(n)}": "int8" for n in sizes}, dataset=config.dataset))

    def emit_embed(outputs, batch, aux, pooled=pooled, name=name):
        x = pooled(outputs)
        out = {f"{name}/fne_{k}": fne.discretize(fne.standardize(x, s), low, high) for k, s in aux.items()}
        return out | {f"{name}/pooled": x, f"{name}/pre_logits": outputs[name]["pre_logits"]}

    def zero_fraction(outputs, batch, aux, pooled=pooled):  # per row: the share of its entries that are 0
        x = pooled(outputs)
        return {"rows": jnp.ones(x.shape[:1], jnp.float32),
                "zeros": {k: jnp.mean(fne.discretize(fne.standardize(x, s), low, high) == 0, axis=1)
                          for k, s in aux.items()}}

    embed = engine.run(extract.Pass(
        f"embed_{name}", test_src, config.test_split, wanted, dataset=config.dataset,
        accumulator=accumulator.sums(zero_fraction, {"rows": np.zeros((), np.float32),
                                                     "zeros": {_key(n): np.zeros((), np.float32) for n in sizes}}),
        emit=emit_embed, aux=standardizations,
        store={f"{name}/fne_{_key(n)}": "int8" for n in sizes}
        | {f"{name}/pooled": "float32", f"{name}/pre_logits": "float32"}))
    return dict(layers=layers, widths=widths, standardizations=standardizations, embed=embed)


def embeddings_for(name: str, n: int, train, test, s, low: float, high: float, train_fne=None) -> dict:
    """{embedding: (x_train, x_test)} for the first n training rows (see the module docstring)."""
    from embjax import fne, svm

    pooled_train = train.array(f"{name}/pooled")[:n]
    z_train, z_test = fne.standardize(pooled_train, s), fne.standardize(test.array(f"{name}/pooled"), s)
    last_train, last_test = train.array(f"{name}/pre_logits")[:n], test.array(f"{name}/pre_logits")
    fne_train = (fne.discretize(z_train, low, high) if train_fne is None
                 else train_fne.array(f"{name}/fne_{_key(n)}")[:n])
    return {
        "fne": (fne_train, test.array(f"{name}/fne_{_key(n)}")),
        "fne_standardized": (z_train, z_test),
        "last_layer": (last_train, last_test),
        "last_layer_l2": (svm.l2_normalize(last_train), svm.l2_normalize(last_test)),
    }


def train_svms(config, engine, name: str, sizes, standardizations, low: float, high: float) -> dict:
    from embjax import svm

    train, test = engine.store(f"stats_{name}"), engine.store(f"embed_{name}")
    train_fne = engine.store(f"train_fne_{name}")
    if not np.array_equal(train.index, np.arange(len(train))):
        raise RuntimeError(f"the stored training features of {name} are not rows 0..{len(train) - 1} in order")
    out = {k: {e: {} for e in EMBEDDINGS} for k in ("accuracy", "objective", "gap", "iterations", "seconds")}
    # Every training set is padded to the largest one with zero-weight rows, and int8 is widened to float32
    # on the host: the SVM solver then compiles once per feature width instead of once per (size, width,
    # dtype), which on this CPU is ~10 s saved per avoided compilation.
    # The L-BFGS solver with several devices shards the rows over the engine's mesh (weights replicated,
    # sums over rows all-reduced), padded to a multiple of the device count; dual coordinate descent is
    # sequential over samples and runs on one device.
    devices = engine.device_count if config.svm.solver == "lbfgs" else 1
    rows = -(-max(sizes) // devices) * devices
    for n in sizes:
        y_train = np.zeros(rows, np.int32)
        y_train[:n] = train.labels[:n]
        weight = (np.arange(rows) < n).astype(np.float32)
        for e, (x_train, x_test) in embeddings_for(name, n, train, test, standardizations[_key(n)],
                                                    low, high, train_fne).items():
            t = time.perf_counter()
            x = np.zeros((rows, x_train.shape[1]), np.float32)
            x[:n] = np.asarray(x_train, np.float32)
            xs, ys, ws = x, y_train, weight
            if devices > 1:
                xs, ys, ws = engine.shard_rows(x, y_train, weight)
            model = svm.fit(xs, ys, config.num_classes, C=config.svm.C, tol=config.svm.tol,
                            max_iter=config.svm.max_iter, sample_weight=ws, solver=config.svm.solver)
            k = _key(n)
            out["accuracy"][e][k] = np.float64(svm.accuracy(model, np.asarray(x_test, np.float32), test.labels))
            out["objective"][e][k] = np.float64(model.objective)
            out["iterations"][e][k] = np.float64(model.iterations)
            out["gap"][e][k] = np.float64(model.gap)
            out["seconds"][e][k] = np.float64(time.perf_counter() - t)
            print(f"[svm] {name} {e} n={n}: accuracy {float(out['accuracy'][e][k]):.4f} ({model.solver}, "
                  f"{model.iterations} iterations, duality gap {model.gap:.1e}"
                  f"{'' if model.converged else ', NOT converged'})", flush=True)
    return out


def results(config, ms, sizes, per_model, accuracy, svm_info, engine, n_train: int, n_test: int) -> dict:
    from embjax import fne

    names = [m.name for m in ms]
    dims, sparsity, degenerate, layers, seconds_per_image = {}, {}, {}, {}, {}
    for m in ms:
        p = per_model[m.name]
        dims[m.name] = {"fne": int(sum(p["widths"])), "fne_standardized": int(sum(p["widths"])),
                        "last_layer": int(m.feature_dim), "last_layer_l2": int(m.feature_dim)}
        rows = float(p["embed"]["rows"])
        sparsity[m.name] = {str(n): float(p["embed"]["zeros"][_key(n)]) / rows for n in sizes}
        degenerate[m.name] = {
            str(n): {"count": int(np.sum(p["standardizations"][_key(n)].degenerate)),
                     "by_layer": fne.degenerate_report(p["layers"], p["widths"],
                                                       p["standardizations"][_key(n)].degenerate)}
            for n in sizes}
        layers[m.name] = dict(zip(p["layers"], (int(w) for w in p["widths"])))
        passes = [f"stats_{m.name}", f"embed_{m.name}"]
        # Wall seconds of the passes (compilation included) per image; absent for passes restored on resume.
        if all(k in engine.seconds for k in passes):
            seconds_per_image[m.name] = sum(engine.seconds[k] for k in passes) / (n_train + n_test)
    return {
        "backbones": names,
        "embeddings": list(EMBEDDINGS),
        "train_sizes": [int(n) for n in sizes],
        "accuracy": accuracy,
        "dims": dims,
        "sparsity": sparsity,
        "degenerate_features": degenerate,
        "layers": layers,
        "seconds_per_image": seconds_per_image,
        "svm": svm_info,
        "dataset": config.dataset,
        "train_split": config.train_split,
        "test_split": config.test_split,
        "num_train": n_train,
        "num_test": n_test,
        "config": common.to_dict(config),
        "meta": {"seconds": dict(engine.seconds)},
    }


def tables(results: dict) -> dict:
    from embjax import report

    sizes = [str(n) for n in results["train_sizes"]]
    rows = []
    for b in results["backbones"]:
        for e in results["embeddings"]:
            rows.append([b, EMBEDDING_TITLES[e], str(results["dims"][b][e])]
                        + [report.pct(results["accuracy"][b][e][n]) for n in sizes])
    acc = report.Table(f"Test accuracy (%) on {results['dataset']} {results['test_split']}, one-vs-rest linear SVM "
                       f"(C = {results['config']['svm']['C']})", ["backbone", "embedding", "dims"]
                       + [f"n = {n}" for n in sizes], rows)
    rows = []
    for b in results["backbones"]:
        deg = results["degenerate_features"][b]
        rows.append([b, str(results["dims"][b]["fne"]), str(len(results["layers"][b]))]
                    + [f"{100 * results['sparsity'][b][n]:.1f}" for n in sizes]
                    + [str(deg[n]["count"]) for n in sizes]
                    + [f"{results['seconds_per_image'][b]:.3f}" if b in results["seconds_per_image"] else "resumed"])
    emb = report.Table("The full-network embedding: width, zeros after discretization (% of the test embedding), "
                       "degenerate (zero-variance) features, wall seconds per image of both passes",
                       ["backbone", "dims", "layers"] + [f"zeros % (n = {n})" for n in sizes]
                       + [f"degenerate (n = {n})" for n in sizes] + ["s / image"], rows)
    return {"accuracy": acc, "embedding": emb}


def markdown(results: dict, tabs: dict) -> str:
    c = results["config"]
    lines = [
        "# Full-network embedding vs. the last layer",
        "",
        f"Backbones {', '.join(results['backbones'])} ({c['weights']} weights) on {results['dataset']}: "
        f"training subsets {', '.join(map(str, results['train_sizes']))} of `{results['train_split']}`, "
        f"tested on `{results['test_split']}` ({results['num_test']} images). Embedding: "
        + ("every convolution's and fully connected layer's" if c.get("layer_set", "conv") == "conv"
           else "every block's")
        + f" {c['activation']}-activation output spatially averaged, standardized with the subset's own "
        f"statistics, discretized with thresholds {c['low']} / {c['high']} (embjax.fne); classifier: "
        "one-vs-rest squared-hinge linear SVM (embjax.svm, scikit-learn LinearSVC's objective).",
        "",
        f"## {tabs['accuracy'].title}",
        "",
        tabs["accuracy"].markdown(),
        "",
        f"## {tabs['embedding'].title}",
        "",
        tabs["embedding"].markdown(),
        "",
        svm_line(results),
        "",
        f"Command: `{results.get('meta', {}).get('command', '')}`",
        "",
    ]
    return "\n".join(lines)


def svm_line(results: dict) -> str:
    c = results["config"]["svm"]
    gaps = [(b, e, n, v["gap"]) for b, es in results["svm"].items() for e, ns in es.items() for n, v in ns.items()]
    late = [f"{b} {e} n={n} ({g:.1e})" for b, e, n, g in gaps if g > c["tol"]]
    text = (f"SVMs ({c['solver']}): {len(gaps) - len(late)} of {len(gaps)} trained to a relative duality gap "
            f"≤ {c['tol']:g} (objective certified within that fraction of the optimum); largest gap "
            f"{max(g for *_, g in gaps):.1e}.")
    return text + (f" Stopped at max_iter={c['max_iter']} before that: {', '.join(late)}." if late else "")


def write_report(run_dir: str, results: dict):
    from embjax import report

    tabs = tables(results)
    return report.write_run(run_dir, results, tables=tabs, markdown=markdown(results, tabs))


def summary(results: dict) -> str:
    return tables(results)["accuracy"].markdown()


if __name__ == "__main__":
    common.main(run, write_report, "full_network_embedding.py", "effnet_lite", "experiments.full_network_embedding",
                summary)
