"""The affine-equivalence study, end to end: models -> fit pass -> maps -> evaluation pass -> results.

`run(config, workdir)` returns the results dict that `embjax.report.write` turns into tables, figures and
`results.json`. The passes stream through `embjax.extract`; everything lands in `workdir`, whose
`checkpoints/` subdirectory lets a killed run resume with the same command.
"""

from __future__ import annotations

import datetime
import functools
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from embjax import evaluate, extract, maps, stats


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


# --------------------------------------------------------------------------------------------------
# Models.


def _dtype(name: str):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
    except KeyError:
        raise ValueError(f"config.dtype must be 'float32' or 'bfloat16', not {name!r}") from None


def _variables_for(name: str, spec, config, fit_data: Callable[[], tuple[np.ndarray, np.ndarray]]):
    """Variables of one model from the source the config names."""
    from embjax.models import registry

    source = config.weights
    if source == "zoo":
        from embjax import zoo

        if not name.startswith("zoo_"):
            raise ValueError(f"config.weights='zoo' trains only zoo_* models; {name} is not one: set "
                             f"config.weights to 'pretrained' or give config.weight_files.{name}")
        images, labels = fit_data()
        return zoo.load_or_train(spec, images, labels, zoo.TrainConfig(**_to_dict(config.zoo)),
                                 dataset=f"{config.dataset}:{config.fit_split}", log=_log)
    if source == "pretrained":
        return registry.load_pretrained(name)
    if source == "files":
        files = _to_dict(config.weight_files)
        if name not in files:
            raise FileNotFoundError(
                f"no weight file for {name}: pass --config.weight_files.{name}=/path/to/weights "
                f"(a keras.applications .h5, a .pth, .safetensors or a converted orbax directory)")
        return registry.load_weights(name, files[name])
    if source == "random":  # smoke tests and throughput runs only: untrained weights
        from embjax import zoo

        x = jnp.zeros((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
        return zoo.numpy_init(spec.build(), x, seed=0)
    raise ValueError(f"config.weights must be 'zoo', 'pretrained', 'files' or 'random', not {source!r}")


def model_names(config) -> list[str]:
    """config.models as a list: a comma-separated string (or a list, when built in Python)."""
    models = config.models
    names = [m.strip() for m in models.split(",") if m.strip()] if isinstance(models, str) else list(models)
    if len(names) < 2:
        raise ValueError(f"the study needs at least two models in config.models, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"config.models names a model twice: {names}")
    return names


def build_members(config, fit_data) -> list[extract.Member]:
    from embjax.models import registry

    dtype = _dtype(config.dtype)
    names = model_names(config)
    specs = [registry.get(name) for name in names]  # unknown names fail here, before any loading
    members = []
    for name, spec in zip(names, specs):
        variables = _variables_for(name, spec, config, fit_data)
        module = spec.build(dtype=dtype) if dtype != jnp.float32 else spec.build()

        def apply(v, images, module=module, spec=spec):
            return module.apply(v, spec.preprocess(images).astype(dtype))

        native = extract.find_head(variables, spec.feature_dim, spec.num_classes)
        members.append(extract.Member(name=name, apply=apply, variables=variables,
                                      feature_dim=spec.feature_dim, head=native))
    return members


# --------------------------------------------------------------------------------------------------
# Linear heads on frozen features (the effnet_lite config).


def train_linear_head(feats: np.ndarray, labels: np.ndarray, num_classes: int, cfg: dict,
                      name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardized features, trained with optax (full batches
    shuffled each epoch); returned as a head on the raw features."""
    feats = np.asarray(feats, np.float32)
    mu = feats.mean(0)
    sd = feats.std(0) + 1e-6
    x = jnp.asarray((feats - mu) / sd)
    y = jnp.asarray(labels)
    d = x.shape[1]
    rng = np.random.default_rng(cfg.get("seed", 0))
    tx = optax.adamw(cfg.get("learning_rate", 1e-2), weight_decay=cfg.get("weight_decay", 1e-4))
    params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"] + p["b"], yb).mean()

        l, g = jax.value_and_grad(loss)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, l

    bs = int(cfg.get("batch_size", 512))
    for _ in range(int(cfg.get("epochs", 30))):
        perm = rng.permutation(len(x))
        for i in range(0, len(x) - bs + 1 if len(x) >= bs else 1, bs):
            idx = perm[i:i + bs]
            params, opt, l = step(params, opt, x[idx], y[idx])
    if not np.isfinite(float(l)):
        raise FloatingPointError(f"linear head of {name} diverged (loss {float(l)})")
    w = np.asarray(params["w"]) / sd[:, None]
    b = np.asarray(params["b"]) - mu @ w
    return w.astype(np.float32), b.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The run.


def _fingerprint_config(config) -> dict:
    cfg = _to_dict(config)
    for k in ("checkpoint_every", "prefetch", "save_eval_features"):  # do not change the numbers
        cfg.pop(k, None)
    cfg["process_count"] = jax.process_count()
    return cfg


def run(config, workdir: str) -> dict:
    """Run the study for `config`, checkpointing under `workdir`; returns the results dict."""
    from embjax import data

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    pc, pi = jax.process_count(), jax.process_index()
    mesh = extract.make_mesh()
    extract.check_batch_size(config.batch_size, mesh)
    if config.batch_size % pc:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {pc} processes")
    local_bs = config.batch_size // pc

    src_kw = dict(data_dir=config.data_dir, manual_dir=config.manual_dir, image_size=config.image_size)
    fit_src = data.get_source(config.dataset, config.fit_split, **src_kw)
    eval_src = data.get_source(config.dataset, config.eval_split, **src_kw)
    for split, src in ((config.fit_split, fit_src), (config.eval_split, eval_src)):
        if len(src) == 0:
            raise ValueError(f"split '{split}' of {config.dataset} is empty")

    @functools.cache
    def fit_arrays():
        idx = np.arange(len(fit_src))
        images, labels = fit_src.get_batch(idx) if hasattr(fit_src, "get_batch") else \
            map(np.stack, zip(*(fit_src[i] for i in idx)))
        return np.asarray(images), np.asarray(labels)

    t = time.perf_counter()
    members = build_members(config, fit_arrays)
    seconds["models"] = time.perf_counter() - t
    names = [m.name for m in members]
    dims = [m.feature_dim for m in members]
    variables = extract.replicate([m.variables for m in members], mesh)

    ckpt = extract.Checkpoints(os.path.join(workdir, "checkpoints"),
                               extract.config_fingerprint(_fingerprint_config(config)))
    n_fit = data.num_batches(len(fit_src), local_bs, pc)
    n_eval = data.num_batches(len(eval_src), local_bs, pc)
    latest = ckpt.latest() or 0
    if latest:
        _log(f"[resume] {workdir}: {min(latest, n_fit)}/{n_fit} fit batches and "
             f"{max(latest - n_fit, 0)}/{n_eval} evaluation batches already done")

    linear = config.heads == "linear"
    if config.heads not in ("native", "linear"):
        raise ValueError(f"config.heads must be 'native' or 'linear', not {config.heads!r}")
    feature_dir = os.path.join(workdir, "features")

    # ---- pass 1: joint statistics over the fit split --------------------------------------------
    t = time.perf_counter()
    family_names = ["affine", "logit", "naive"] + (["native_affine"] if linear else [])
    stats_state = extract.replicate(stats.init(dims), mesh)
    eval_state = extract.replicate({k: evaluate.init(dims) for k in family_names}, mesh)
    if 0 < latest <= n_fit:
        stats_state = ckpt.restore(latest, {"stats": stats_state})[0]["stats"]
    elif latest > n_fit:
        restored = ckpt.restore(latest, {"stats": stats_state, "eval": eval_state})[0]
        stats_state, eval_state = restored["stats"], restored["eval"]
    if latest < n_fit:
        fit_feats = None
        on_output = None
        if linear:
            if pc != 1:
                raise NotImplementedError("linear heads need the fit features in one process; run the "
                                          "effnet_lite config on a single host")
            os.makedirs(feature_dir, exist_ok=True)
            mode = "r+" if latest else "w+"
            fit_feats = [np.lib.format.open_memmap(os.path.join(feature_dir, f"fit_{n}.npy"), mode=mode,
                                                   dtype=np.float32, shape=(n_fit * local_bs, d))
                         for n, d in zip(names, dims)]

            def on_output(b, batch, extra):
                for mm, f in zip(fit_feats, extra[0]):
                    mm[b * local_bs:(b + 1) * local_bs] = np.asarray(jax.device_get(f))
                if (b + 1) % max(config.checkpoint_every, 1) == 0:
                    for mm in fit_feats:
                        mm.flush()

        step = extract.make_fit_step(members, mesh, keep_features=linear)
        batches = data.batches(fit_src, local_bs, process_index=pi, process_count=pc,
                               start_batch=latest, prefetch=config.prefetch)

        def fold_fit(s, b):  # checkpoints hold {"stats": ...} in both passes
            out = step(s["stats"], variables, b)
            return ({"stats": out[0]},) + tuple(out[1:])

        stats_state = extract.run_stream(
            fold_fit, {"stats": stats_state}, batches, mesh=mesh, total_batches=n_fit,
            start_batch=latest, label=f"fit {config.fit_split}", batch_size=config.batch_size,
            checkpoints=ckpt, checkpoint_every=config.checkpoint_every,
            meta={"phase": "fit"}, on_output=on_output, members=members, split=config.fit_split)["stats"]
        if fit_feats is not None:
            for mm in fit_feats:
                mm.flush()
        ckpt.save(n_fit, {"stats": stats_state}, {"phase": "fit", "batches_done": n_fit})
    seconds["fit_pass"] = time.perf_counter() - t

    # ---- maps ---------------------------------------------------------------------------------
    t = time.perf_counter()
    host_stats = jax.device_get(stats_state)
    if float(host_stats.count) == 0:
        raise ValueError(f"no samples were folded in from split '{config.fit_split}'")
    affine = maps.affine_all(host_stats, ridge=config.ridge, names=names)
    heads = [m.head for m in members]
    if linear:
        labels = fit_arrays()[1]
        heads = []
        for n, d in zip(names, dims):
            f = np.load(os.path.join(feature_dir, f"fit_{n}.npy"), mmap_mode="r")[:len(labels)]
            heads.append(train_linear_head(f, labels, config.num_classes, _to_dict(config.linear_head),
                                           name=n))
        native_heads = [m.head for m in members]
    N = len(members)
    pairs = [(i, j) for i in range(N) for j in range(N) if i != j]
    logit = {(i, j): maps.logit(heads[i], heads[j]) for i, j in pairs}
    naive = {(i, j): maps.naive(dims[i], dims[j]) for i, j in pairs}
    families = {"affine": affine, "logit": logit, "naive": naive}
    head_sets = {k: heads for k in families}
    if linear:  # agreement of the original (ImageNet) heads under affine maps
        families["native_affine"] = affine
        head_sets["native_affine"] = native_heads
    seconds["maps"] = time.perf_counter() - t

    # ---- pass 2: every pair on the evaluation split -------------------------------------------
    t = time.perf_counter()
    assert sorted(families) == sorted(family_names)
    state = {"stats": stats_state, "eval": eval_state}
    start = max(latest - n_fit, 0)
    if start < n_eval:
        step = extract.make_eval_step(members, mesh)
        dev_heads = extract.replicate(head_sets, mesh)
        dev_maps = extract.replicate({k: evaluate.stack_maps(m, dims) for k, m in families.items()}, mesh)
        batches = data.batches(eval_src, local_bs, process_index=pi, process_count=pc,
                               start_batch=start, prefetch=config.prefetch)

        def fold(s, b):
            new_eval, bad = step(s["eval"], variables, dev_heads, dev_maps, b)
            return {"stats": s["stats"], "eval": new_eval}, bad

        state = extract.run_stream(
            fold, state, batches, mesh=mesh, total_batches=n_eval, start_batch=start,
            label=f"eval {config.eval_split}", batch_size=config.batch_size, checkpoints=ckpt,
            checkpoint_every=config.checkpoint_every, step_offset=n_fit, meta={"phase": "eval"},
            members=members, split=config.eval_split)
        ckpt.save(n_fit + n_eval, state, {"phase": "eval", "batches_done": n_eval})
    seconds["eval_pass"] = time.perf_counter() - t
    ckpt.close()

    # ---- numbers --------------------------------------------------------------------------------
    ev = jax.device_get(state["eval"])
    results = {
        "models": names,
        "feature_dims": dims,
        "dataset": config.dataset,
        "fit_split": config.fit_split,
        "eval_split": config.eval_split,
        "num_fit": int(round(float(host_stats.count))),
        "num_eval": int(ev["affine"].count),
        "heads": config.heads,
    }
    for k, e in ev.items():
        acc = np.asarray(evaluate.accuracy(e, "top1"))
        results[k] = {
            "accuracy": acc.tolist(),
            "top5": np.asarray(evaluate.accuracy(e, "top5")).tolist(),
            "agreement": np.asarray(evaluate.accuracy(e, "agreement")).tolist(),
            "r2": np.asarray(evaluate.r2(e)).tolist(),
            "relative_change": np.asarray(evaluate.relative_change(acc)).tolist(),
        }
    results["unmapped"] = {"accuracy": np.diag(np.asarray(results["affine"]["accuracy"])).tolist(),
                           "top5": np.diag(np.asarray(results["affine"]["top5"])).tolist()}
    results["fit_statistics"] = {
        "r2": [[float(stats.r2(host_stats, i, j, *affine[(i, j)])) if i != j else 1.0
                for j in range(N)] for i in range(N)],
        "cka": [[float(stats.cka(host_stats, i, j)) for j in range(N)] for i in range(N)],
    }
    thesis = _to_dict(config.thesis_names)
    if thesis:
        results["reference"] = {"thesis_names": [thesis.get(n) for n in names]}
    seconds["total"] = time.perf_counter() - t_start
    results["config"] = _to_dict(config)
    results["meta"] = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": seconds,
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "process_count": pc,
        "workdir": os.path.abspath(workdir),
    }
    return results


def finish(workdir: str) -> None:
    """After the report is written, drop the resume state (the report holds every number)."""
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(workdir, "features"), ignore_errors=True)
