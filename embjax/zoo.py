"""The model zoo: small backbones of different families that embjax trains itself on Fashion-MNIST.

They stand in for the thesis' ten ImageNet CNNs where no ImageNet is at hand. Each is trained by
embjax.train's loop from its registry spec (`zoo_*` names), with checkpoints under the cache directory
so a killed training resumes, then saved with orbax under the cache directory, keyed by a hash of
everything that determines the weights (model, data, schedule, seed), and reused by later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from embjax import sharding, train as train_lib

# Bump when the training procedure changes in a way that changes the weights.
TRAINING_VERSION = 3

# The fields of the zoo's original configuration: the cache key hashes exactly these (so models cached
# before the zoo moved onto embjax.train keep their keys); any other field that changes the weights is
# added to the key only when it differs from the zoo's default.
_KEY_FIELDS = ("epochs", "batch_size", "learning_rate", "weight_decay", "seed", "limit")
_NO_WEIGHT_EFFECT = ("checkpoint_every", "log_seconds")


def train_config(**fields) -> train_lib.TrainConfig:
    """The zoo's training configuration: embjax.train.TrainConfig with the zoo's defaults (2 epochs, the
    "stream" batch order, XLA's default CPU compiler options, a progress line per epoch); `fields` (e.g. a
    study's `config.zoo`) override them."""
    zoo = dict(epochs=2, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, seed=0, limit=0,
               order="stream", xla_cpu_defaults=True, checkpoint_every=50, log_seconds=math.inf)
    unknown = set(fields) - {f.name for f in dataclasses.fields(train_lib.TrainConfig)}
    if unknown:
        raise ValueError(f"zoo training config: unknown field(s) {sorted(unknown)}; the fields are those of "
                         "embjax.train.TrainConfig")
    return train_lib.TrainConfig(**{**zoo, **fields})


def default_cache_dir() -> str:
    return os.environ.get("EMBJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "embjax"))


def cache_key(name: str, cfg: train_lib.TrainConfig, dataset: str, num_train: int) -> str:
    fields = dataclasses.asdict(cfg)
    key = dict(name=name, cfg={k: fields[k] for k in _KEY_FIELDS}, dataset=dataset, n=num_train,
               version=TRAINING_VERSION)
    defaults = dataclasses.asdict(train_config())
    extra = {k: v for k, v in fields.items()
             if k not in _KEY_FIELDS + _NO_WEIGHT_EFFECT and v != defaults[k]}
    if extra:
        key["train"] = extra
    text = json.dumps(key, sort_keys=True)
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


def classifier_loss(module, preprocess: Callable[[jax.Array], jax.Array]) -> Callable:
    """Cross-entropy of the model's own head (mean over the batch), BatchNorm statistics updated: the
    zoo's loss for embjax.train.fit, with the batch's training accuracy as a metric."""

    def loss_fn(params, batch_stats, batch, rng):
        del rng  # the zoo's models draw no randomness
        out, updates = module.apply({"params": params, "batch_stats": batch_stats}, preprocess(batch["image"]),
                                    train=True, mutable=["batch_stats"])
        logits, labels = out["logits"], batch["label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (updates["batch_stats"], {"train acc": jnp.mean(jnp.argmax(logits, -1) == labels)})

    return loss_fn


def train(spec, images: np.ndarray, labels: np.ndarray, cfg: train_lib.TrainConfig,
          log: Callable[[str], None] = print, workdir: str | None = None) -> Any:
    """Train one zoo model from scratch with embjax.train.fit on one device (the zoo's weights do not
    depend on how many devices a run has); returns its variables ({"params", "batch_stats"}) as NumPy
    arrays. With `workdir` the training checkpoints there and a rerun resumes it."""
    if len(images) == 0:
        raise ValueError(f"no training images for zoo model {spec.name}")
    module = spec.build()
    sample = spec.preprocess(jnp.asarray(images[:2]))
    variables = numpy_init(module, sample, cfg.seed)

    def get_batch(idx):
        return {"image": images[idx], "label": labels[idx]}

    mesh = sharding.make_mesh(jax.local_devices()[:1])
    return train_lib.fit(classifier_loss(module, spec.preprocess), variables, get_batch, len(images), cfg,
                         workdir=workdir, fingerprint={"zoo": spec.name}, name=f"zoo {spec.name}",
                         mesh=mesh, log=log)


def load_or_train(spec, images: np.ndarray, labels: np.ndarray, cfg: train_lib.TrainConfig, *, dataset: str,
                  cache_dir: str | None = None, log: Callable[[str], None] = print) -> Any:
    """The cached variables of a zoo model, training and caching them when absent."""
    from embjax.weights import store

    if cfg.limit:
        images, labels = images[:cfg.limit], labels[:cfg.limit]
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(spec.name, cfg, dataset, len(images))
    path = os.path.join(cache_dir, "zoo", key)
    if os.path.isdir(path):
        log(f"[zoo] {spec.name}: reusing {path}")
        return store.load_variables(path)
    log(f"[zoo] {spec.name}: training on {len(images)} images for {cfg.epochs} epoch(s)")
    # Each process trains on its own device; the checkpoints (one process's) resume single-process runs.
    workdir = os.path.join(cache_dir, "zoo-training", key) if jax.process_count() == 1 else None
    variables = train(spec, images, labels, cfg, log=log, workdir=workdir)
    if jax.process_index() == 0:
        store.save_variables(path, variables)
        log(f"[zoo] {spec.name}: saved {path}")
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return variables
