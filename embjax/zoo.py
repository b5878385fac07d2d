"""The model zoo: small backbones of different families that embjax trains itself on Fashion-MNIST.

They stand in for the thesis' ten ImageNet CNNs where no ImageNet is at hand. Each is trained with optax
from its registry spec (`zoo_*` names), saved with orbax under the cache directory, keyed by a hash of
everything that determines the weights (model, data, schedule, seed), and reused by later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Bump when the training procedure changes in a way that changes the weights.
TRAINING_VERSION = 3


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # Train on the first `limit` training images (0 = all); tests use a few hundred.
    limit: int = 0


def default_cache_dir() -> str:
    return os.environ.get("EMBJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "embjax"))


def cache_key(name: str, cfg: TrainConfig, dataset: str, num_train: int) -> str:
    text = json.dumps(dict(name=name, cfg=dataclasses.asdict(cfg), dataset=dataset, n=num_train,
                           version=TRAINING_VERSION), sort_keys=True)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def numpy_init(module, sample, seed: int) -> Any:
    """Initial variables drawn with NumPy from the shapes of `module.init` (traced, never compiled):
    flax's own init compiles one random-number program per parameter shape, about half a minute per
    model on a 2-core CPU. Kernels are He-normal (fan-in over all but the last axis), biases and BatchNorm
    shifts zero, BatchNorm scales and running variances one, running means zero."""
    shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), sample)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        collection = str(getattr(path[0], "key", path[0]))
        if collection == "batch_stats":
            value = np.ones(leaf.shape) if name == "var" else np.zeros(leaf.shape)
        elif name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), leaf.shape)
        elif name == "scale":
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(spec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig,
          log: Callable[[str], None] = print) -> Any:
    """Train one zoo model from scratch; returns its variables ({"params", "batch_stats"})."""
    if len(images) == 0:
        raise ValueError(f"no training images for zoo model {spec.name}")
    module = spec.build()
    sample = spec.preprocess(jnp.asarray(images[:2]))
    variables = numpy_init(module, sample, cfg.seed)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=min(100, total // 10 + 1), decay_steps=total)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            out, updates = module.apply({"params": p, "batch_stats": batch_stats}, spec.preprocess(x),
                                        train=True, mutable=["batch_stats"])
            return _cross_entropy(out["logits"], y), (updates["batch_stats"], out["logits"])

        (loss, (new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return params, new_stats, opt_state, loss, acc

    order_rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        perm = order_rng.permutation(len(images))
        losses, accs = [], []
        for i in range(steps_per_epoch):
            idx = np.sort(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            params, batch_stats, opt_state, loss, acc = step(
                params, batch_stats, opt_state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
            losses.append(loss)
            accs.append(acc)
        loss_v = float(np.mean(jax.device_get(losses)))
        if not np.isfinite(loss_v):
            raise FloatingPointError(f"zoo model {spec.name}: training loss became {loss_v} in epoch "
                                     f"{epoch + 1}; lower the learning rate")
        log(f"[zoo] {spec.name}: epoch {epoch + 1}/{cfg.epochs}  loss {loss_v:.4f}  "
            f"train acc {float(np.mean(jax.device_get(accs))):.4f}  ({time.perf_counter() - t0:.0f} s)")
    return {"params": params, "batch_stats": batch_stats}


def load_or_train(spec, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, *, dataset: str,
                  cache_dir: str | None = None, log: Callable[[str], None] = print) -> Any:
    """The cached variables of a zoo model, training and caching them when absent."""
    from embjax.weights import store

    if cfg.limit:
        images, labels = images[:cfg.limit], labels[:cfg.limit]
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, "zoo", cache_key(spec.name, cfg, dataset, len(images)))
    if os.path.isdir(path):
        log(f"[zoo] {spec.name}: reusing {path}")
        return store.load_variables(path)
    log(f"[zoo] {spec.name}: training on {len(images)} images for {cfg.epochs} epoch(s)")
    variables = train(spec, images, labels, cfg, log=log)
    if jax.process_index() == 0:
        store.save_variables(path, jax.device_get(variables))
        log(f"[zoo] {spec.name}: saved {path}")
    return variables
