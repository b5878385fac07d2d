r"""The full-network embedding study (Garcia-Gasulla et al., "An Out-of-the-box Full-network Embedding for
Convolutional Neural Networks"): does an embedding of every layer, standardized and discretized, beat the
last layer for transfer with few training images?

  python -m experiments.full_network_embedding                 # EfficientNet-Lite0 on Fashion-MNIST
  python -m experiments.full_network_embedding --config=experiments/configs/full_network_embedding.py:vgg16 \
      --config.weight_files.vgg16=/w/vgg16_weights_tf_dim_ordering_tf_kernels.h5    # the paper's VGG16

Per backbone, three passes on the engine (embjax.extract): `stats_<model>` over the training split (every
embedding layer spatially averaged by embjax.fne.pool; per-feature moments, embjax.moments, of each nested
subset, the first n images; pooled features and pre-logits to the store), `train_fne_<model>` (the stored
pooled features through an identity member: each subset's int8 embedding to the store, so one forward pass
over the training split, not two), `embed_<model>` over the test split (every subset's int8 embedding,
pooled features and pre-logits to the store; the share of zeros). Then a one-vs-rest squared-hinge linear
SVM (embjax.transfer) per embedding (EMBEDDING_TITLES) and training size. Rerun after kill -9 to resume.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments import common

EMBEDDING_TITLES = {
    "fne": "full network, discretized",  # standardized with the subset's statistics, discretized to {-1, 0, 1}
    "fne_standardized": "full network, standardized",  # the same features, not discretized
    "last_layer": "last layer",  # pre_logits as they are
    "last_layer_l2": "last layer, L2-normalized",  # pre_logits scaled to unit L2 norm
}
EMBEDDINGS = tuple(EMBEDDING_TITLES)


def parse_sizes(text, available: int) -> list[int]:
    """'100,1000,-1' -> sorted distinct sizes (-1: the whole training split), each checked against it."""
    sizes = set()
    for t in (t.strip() for t in str(text).split(",") if t.strip()):
        if not t.lstrip("-").isdigit():
            raise ValueError(f"config.train_sizes: {t!r} is not an integer")
        sizes.add(available if int(t) == -1 else int(t))
        if not 0 < max(sizes) <= available or min(sizes) < 1:
            raise ValueError(f"config.train_sizes: {t} is not in 1..{available}, the size of the training split "
                             "(use -1 for all of it, or a larger config.train_split)")
    if not sizes:
        raise ValueError("config.train_sizes must list at least one training-set size (e.g. '100,1000')")
    return sorted(sizes)


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
    kw = {k: config[k] for k in ("data_dir", "manual_dir", "image_size")} | (
        {"download": True} if config.download else {})  # tfds prepares a missing dataset (internet, once)
    splits = functools.cache(lambda: [data.get_source(config.dataset, s, **kw)
                                      for s in (config.train_split, config.test_split)])
    ms = common.members(config, zoo_data=functools.cache(lambda: data.all_rows(splits()[0])),
                        dataset_tag=f"{config.dataset}:{config.train_split}")
    train_src, test_src = splits()
    for split, src in ((config.train_split, train_src), (config.test_split, test_src)):
        if len(src) == 0:
            raise ValueError(f"split '{split}' of {config.dataset} is empty")
    sizes = parse_sizes(config.train_sizes, len(train_src))
    image_shape = getattr(train_src, "image_shape", None) or np.shape(train_src[0][0])
    plans = {m.name: embedding_plan(m, image_shape, config.activation, config.layer_set) for m in ms}
    # The training split's int8 embedding comes from its stored pooled features, through identity members.
    pooled = [members.identity(f"pooled_{m.name}", sum(plans[m.name][1])) for m in ms]
    engine = common.engine(config, workdir, ms + pooled)
    per_model, svms = {}, {}
    for m in ms:  # an SVM memo per backbone: a resumed run does not retrain the finished ones
        per_model[m.name] = model_passes(config, engine, m.name, plans[m.name], sizes, train_src, test_src)
        svms[m.name] = engine.memo(f"svm_{m.name}", functools.partial(
            train_svms, config, engine, m.name, sizes, per_model[m.name]["standardizations"]))
    return results(config, ms, sizes, per_model, svms, engine, len(train_src), len(test_src)), engine


def model_passes(config, engine, name: str, plan, sizes, train_src, test_src) -> dict:
    """One backbone's three passes (see the module docstring)."""
    import jax.numpy as jnp

    from embjax import accumulator, data, extract, fne, moments

    low, high = float(config.low), float(config.high)
    layers, widths = plan
    wanted = {name: tuple(dict.fromkeys((*layers, "pre_logits")))}
    kept = {f"{name}/pooled": "float32", f"{name}/pre_logits": "float32"}
    fne_entries = {f"{name}/fne_{_key(n)}": "int8" for n in sizes}

    def pooled(outputs, *_):
        return fne.pool(outputs[name], layers)

    def embeddings(x, aux):  # every subset's int8 embedding of the rows x
        return {k: fne.discretize(fne.standardize(x, s), low, high) for k, s in aux.items()}

    def emit_stats(outputs, batch, aux):
        return {f"{name}/pooled": pooled(outputs), f"{name}/pre_logits": outputs[name]["pre_logits"]}

    moments_of = {_key(n): moments.accumulator(sum(widths), pooled, mask=lambda batch, n=n: batch["index"] < n)
                  for n in sizes}  # moments of the first n training rows, for each subset size n
    stats = engine.run(extract.Pass(f"stats_{name}", train_src, config.train_split, wanted, dataset=config.dataset,
                                    emit=emit_stats, accumulator=moments_of, store=kept))
    standardizations = {k: fne.standardization(s, config.degenerate_rtol) for k, s in stats.items()}

    def emit_train(outputs, batch, aux):
        x = outputs[f"pooled_{name}"]["pre_logits"]
        return {f"{name}/fne_{k}": e for k, e in embeddings(x, aux).items()}

    engine.run(extract.Pass(f"train_fne_{name}", data.store_rows(engine.store(f"stats_{name}"), [f"{name}/pooled"]),
                            config.train_split, {f"pooled_{name}": ("pre_logits",)}, aux=standardizations,
                            emit=emit_train, store=fne_entries, dataset=config.dataset))

    def emit_embed(outputs, batch, aux):
        x = pooled(outputs)
        return {f"{name}/fne_{k}": e for k, e in embeddings(x, aux).items()} | {
            f"{name}/pooled": x, f"{name}/pre_logits": outputs[name]["pre_logits"]}

    def zero_fraction(outputs, batch, aux):  # per row: the share of its entries that are 0
        x = pooled(outputs)
        return {"rows": jnp.ones(x.shape[:1], jnp.float32),
                "zeros": {k: jnp.mean(e == 0, axis=1) for k, e in embeddings(x, aux).items()}}

    zeros = accumulator.sums(zero_fraction, {"rows": np.zeros((), np.float32),
                                             "zeros": {_key(n): np.zeros((), np.float32) for n in sizes}})
    embed = engine.run(extract.Pass(f"embed_{name}", test_src, config.test_split, wanted, dataset=config.dataset,
                                    accumulator=zeros, emit=emit_embed, aux=standardizations,
                                    store=fne_entries | kept))
    return dict(layers=layers, widths=widths, standardizations=standardizations, embed=embed)


def embeddings_for(name: str, n: int, train, train_fne, test, s) -> dict:
    """{embedding: (x_train, x_test)} of the first n training rows, from the passes' stores."""
    from embjax import fne, svm

    z_train = fne.standardize(train.array(f"{name}/pooled")[:n], s)
    z_test = fne.standardize(test.array(f"{name}/pooled"), s)
    last_train, last_test = train.array(f"{name}/pre_logits")[:n], test.array(f"{name}/pre_logits")
    return {"fne": (train_fne.array(f"{name}/fne_{_key(n)}")[:n], test.array(f"{name}/fne_{_key(n)}")),
            "fne_standardized": (z_train, z_test),
            "last_layer": (last_train, last_test),
            "last_layer_l2": (svm.l2_normalize(last_train), svm.l2_normalize(last_test))}


def train_svms(config, engine, name: str, sizes, standardizations) -> dict:
    """{field: {embedding: {"<size>": value}}} (embjax.transfer.FIELDS): an SVM per embedding and size."""
    from embjax import transfer

    train, test = engine.store(f"stats_{name}"), engine.store(f"embed_{name}")
    train_fne = engine.store(f"train_fne_{name}")
    if not np.array_equal(train.index, np.arange(len(train))):
        raise RuntimeError(f"the stored training features of {name} are not rows 0..{len(train) - 1} in order")
    return transfer.svm_grid(
        lambda n: embeddings_for(name, n, train, train_fne, test, standardizations[_key(n)]), train.labels,
        test.labels, sizes, config.num_classes, C=config.svm.C, tol=config.svm.tol, max_iter=config.svm.max_iter,
        solver=config.svm.solver, place=engine.shard_rows, devices=engine.device_count, label=name)


def results(config, ms, sizes, per_model, svms, engine, n_train: int, n_test: int) -> dict:
    from embjax import fne, transfer

    r = {"backbones": [m.name for m in ms], "embeddings": list(EMBEDDINGS), "train_sizes": [int(n) for n in sizes]}
    r |= {k: {} for k in ("accuracy", "svm", "dims", "sparsity", "degenerate_features", "layers", "seconds_per_image")}
    for m in ms:
        p, memo, d = per_model[m.name], svms[m.name], int(sum(per_model[m.name]["widths"]))
        r["accuracy"][m.name] = {e: {str(n): float(memo["accuracy"][e][str(n)]) for n in sizes} for e in EMBEDDINGS}
        r["svm"][m.name] = {e: {str(n): {f: float(memo[f][e][str(n)]) for f in transfer.FIELDS[1:]} for n in sizes}
                            for e in EMBEDDINGS}
        r["dims"][m.name] = {"fne": d, "fne_standardized": d} | dict.fromkeys(EMBEDDINGS[2:], int(m.feature_dim))
        r["sparsity"][m.name] = {str(n): float(p["embed"]["zeros"][_key(n)]) / float(p["embed"]["rows"])
                                 for n in sizes}
        r["degenerate_features"][m.name] = {str(n): {
            "count": int(np.sum(p["standardizations"][_key(n)].degenerate)),
            "by_layer": fne.degenerate_report(p["layers"], p["widths"], p["standardizations"][_key(n)].degenerate)}
            for n in sizes}
        r["layers"][m.name] = dict(zip(p["layers"], (int(w) for w in p["widths"])))
        passes = [f"stats_{m.name}", f"embed_{m.name}"]
        # Wall seconds of the passes (compilation included) per image; absent for passes restored on resume.
        if all(k in engine.seconds for k in passes):
            r["seconds_per_image"][m.name] = sum(engine.seconds[k] for k in passes) / (n_train + n_test)
    return r | {"dataset": config.dataset, "train_split": config.train_split, "test_split": config.test_split,
                "num_train": n_train, "num_test": n_test, "config": common.to_dict(config),
                "meta": {"seconds": dict(engine.seconds)}}


def tables(r: dict) -> dict:
    from embjax import report

    sizes = [str(n) for n in r["train_sizes"]]
    acc = report.Table(
        f"Test accuracy (%) on {r['dataset']} {r['test_split']}, one-vs-rest linear SVM (C = {r['config']['svm']['C']})",
        ["backbone", "embedding", "dims"] + [f"n = {n}" for n in sizes],
        [[b, EMBEDDING_TITLES[e], str(r["dims"][b][e])] + [report.pct(r["accuracy"][b][e][n]) for n in sizes]
         for b in r["backbones"] for e in r["embeddings"]])
    emb = report.Table(
        "The full-network embedding: width, zeros after discretization (% of the test embedding), degenerate "
        "(zero-variance) features, wall seconds per image of both passes",
        ["backbone", "dims", "layers"] + [f"zeros % (n = {n})" for n in sizes]
        + [f"degenerate (n = {n})" for n in sizes] + ["s / image"],
        [[b, str(r["dims"][b]["fne"]), str(len(r["layers"][b]))]
         + [f"{100 * r['sparsity'][b][n]:.1f}" for n in sizes]
         + [str(r["degenerate_features"][b][n]["count"]) for n in sizes]
         + [f"{r['seconds_per_image'][b]:.3f}" if b in r["seconds_per_image"] else "resumed"]
         for b in r["backbones"]])
    return {"accuracy": acc, "embedding": emb}


def write_report(run_dir: str, r: dict):
    from embjax import report, transfer

    c = r["config"]
    layers = "every convolution's and fully connected layer's" if c["layer_set"] == "conv" else "every block's"
    intro = (f"Backbones {', '.join(r['backbones'])} ({c['weights']} weights) on {r['dataset']}: training subsets "
             f"{', '.join(map(str, r['train_sizes']))} of `{r['train_split']}`, tested on `{r['test_split']}` "
             f"({r['num_test']} images). Embedding: {layers} {c['activation']}-activation output spatially "
             f"averaged, standardized with the subset's own statistics, discretized with thresholds {c['low']} / "
             f"{c['high']} (embjax.fne); classifier: one-vs-rest squared-hinge linear SVM (embjax.svm, "
             "scikit-learn LinearSVC's objective).")
    gaps = {f"{b} {e} n={n}": v["gap"] for b, es in r["svm"].items() for e, ns in es.items() for n, v in ns.items()}
    svms = transfer.gap_line(gaps, c["svm"]["tol"], c["svm"]["max_iter"], c["svm"]["solver"])
    return report.write_run(run_dir, r, tables=tables(r), title="Full-network embedding vs. the last layer",
                            intro=[intro], outro=[svms, f"Command: `{r.get('meta', {}).get('command', '')}`"])


if __name__ == "__main__":
    common.main(run, write_report, "full_network_embedding.py", "effnet_lite0", "experiments.full_network_embedding",
                lambda r: tables(r)["accuracy"].markdown())
