"""The model zoo: small backbones of different families that embjax trains itself on Fashion-MNIST.

They stand in for the thesis' ten ImageNet CNNs where no ImageNet is at hand. Each is trained by
embjax.train's loop from its registry spec (`zoo_*` names), with checkpoints under the cache directory
so a killed training resumes, then saved with orbax under the cache directory, keyed by a hash of
everything that determines the weights (model, data, schedule, seed), and reused by later runs.

Models trained apart (thesis §6.1). A registry name `<zoo model>_<variant>` (embjax.models.specs.ZOO_VARIANTS)
is the same module trained the standard way but for one or two things (`VARIANTS`):
  cosine   the loss: a cosine softmax with an additive margin (CosFace; `cosine_margin_loss`), features and
           class weights normalized, scale `COSINE_SCALE`, margin `COSINE_MARGIN`; the cached weights hold
           the classifier in its inference form (unit class columns, zero bias: `cosine_head`), so the
           model's own logits, and every "target's own head" built from them, rank classes by cosine;
  half_a   the data: half A of the rows the zoo is given (the fit split: all 60,000 Fashion-MNIST training
  half_b   images), or half B, split by one fixed seeded permutation (`half_rows`, seed `HALF_SEED`); the
           half is then capped at `limit` like the standard training's rows (the first 20,000 of its 30,000
           by index), so a half model sees as many images, for as many steps, as a standard one.
  seed1    the seed: the training config's seed + 1 for the initial weights, the batch order (and the
           loss's randomness), all else standard; the control for the variants above, which start from
           their standard model's initial weights and see its batch order;
  half_b_seed1  half B with the seed + 1: disjoint data from half A and independent initial weights.
A variant's cache key adds the variant and its constants; the standard models' keys are unchanged, and so
are those of the variants that keep the seed.
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
from embjax.models import layers

# Bump when the training procedure changes in a way that changes the weights.
TRAINING_VERSION = 3

COSINE_SCALE, COSINE_MARGIN = 16.0, 0.2  # CosFace's s and m (its faces used s = 64, m = 0.35 over 10k+ classes)
HALF_SEED = 2020  # the permutation that splits the training rows into halves A and B


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a zoo variant trains: its loss ("softmax" or "cosine"), its rows (None: all; 0 / 1: half
    A / B) and the offset added to the training config's seed (initial weights and batch order)."""

    loss: str = "softmax"
    half: int | None = None
    seed_offset: int = 0

    def key(self) -> dict:
        """What the cache key adds for this variant (the constants that change its weights). An offset of 0
        adds nothing, so the variants that keep the seed keep the keys they were cached under."""
        out = dataclasses.asdict(self)
        if not self.seed_offset:
            del out["seed_offset"]
        if self.loss == "cosine":
            out.update(scale=COSINE_SCALE, margin=COSINE_MARGIN)
        if self.half is not None:
            out.update(half_seed=HALF_SEED)
        return out


VARIANTS = {"": Variant(), "cosine": Variant(loss="cosine"), "half_a": Variant(half=0), "half_b": Variant(half=1),
            "seed1": Variant(seed_offset=1), "half_b_seed1": Variant(half=1, seed_offset=1)}

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


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown zoo variant {name!r}; the variants are {sorted(v for v in VARIANTS if v)}")
    return VARIANTS[name]


def half_rows(num_rows: int, half: int, seed: int = HALF_SEED) -> np.ndarray:
    """Row indices of half `half` (0: A, 1: B) of `num_rows` rows, ascending: A is the first ⌊n/2⌋ of
    one permutation drawn from `seed`, B the rest, so the halves are disjoint and cover every row."""
    if half not in (0, 1):
        raise ValueError(f"zoo: half must be 0 (A) or 1 (B), got {half!r}")
    perm = np.random.default_rng(seed).permutation(int(num_rows))
    return np.sort(perm[: num_rows // 2] if half == 0 else perm[num_rows // 2:])


def cosine_logits(features: jax.Array, kernel: jax.Array, eps: float = 1e-12) -> jax.Array:
    """cos θ_bj between feature row b and class column j of `kernel` (d, classes); a zero row or column
    gives 0."""
    f = features * jax.lax.rsqrt(jnp.maximum(jnp.sum(features * features, -1, keepdims=True), eps))
    w = kernel * jax.lax.rsqrt(jnp.maximum(jnp.sum(kernel * kernel, 0, keepdims=True), eps))
    return jnp.matmul(f, w, precision=jax.lax.Precision.HIGHEST)


def cosine_margin_loss(features: jax.Array, kernel: jax.Array, labels: jax.Array, scale: float = COSINE_SCALE,
                       margin: float = COSINE_MARGIN) -> jax.Array:
    """CosFace's large-margin cosine loss, the mean over the batch of the cross-entropy of the logits
    s · (cos θ_j − m · [j = y]): the true class must win by a cosine margin m."""
    cos = cosine_logits(features, kernel)
    logits = scale * (cos - margin * jax.nn.one_hot(labels, kernel.shape[-1], dtype=cos.dtype))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _classifier_path(module, variables, sample) -> tuple[str, ...]:
    """The params path of the classifier (embjax.models.layers.classifier_path), its shape (pre_logits
    width, classes) read off the model's outputs."""
    out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, sample)
    return layers.classifier_path(variables["params"], out["pre_logits"].shape[-1], out["logits"].shape[-1])


def cosine_head(variables, path: tuple[str, ...]) -> dict:
    """`variables` with the classifier at `path` in its inference form: unit-length class columns, zero
    bias. Its logits x Ŵ = ‖x‖ cos θ rank the classes as the cosine classifier does (top-1, top-5)."""
    def replace(tree, depth):
        tree = dict(tree)
        if depth == len(path):
            kernel = np.asarray(tree["kernel"], np.float64)
            norm = np.sqrt(np.sum(kernel * kernel, axis=0, keepdims=True))
            tree["kernel"] = (kernel / np.maximum(norm, 1e-30)).astype(np.asarray(tree["kernel"]).dtype)
            tree["bias"] = np.zeros_like(np.asarray(tree["bias"]))
            return tree
        tree[path[depth]] = replace(tree[path[depth]], depth + 1)
        return tree

    return {**variables, "params": replace(variables["params"], 0)}


def default_cache_dir() -> str:
    return os.environ.get("EMBJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "embjax"))


def cache_key(name: str, cfg: train_lib.TrainConfig, dataset: str, num_train: int, variant: str = "") -> str:
    fields = dataclasses.asdict(cfg)
    key = dict(name=name, cfg={k: fields[k] for k in _KEY_FIELDS}, dataset=dataset, n=num_train,
               version=TRAINING_VERSION)
    if variant:  # absent for the standard training: its keys stay those of every model cached before
        key["variant"] = {"name": variant, **_variant(variant).key()}
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


def cosine_classifier_loss(module, preprocess: Callable[[jax.Array], jax.Array], path: tuple[str, ...]) -> Callable:
    """`classifier_loss` with CosFace's loss on the pre-logit features and the classifier kernel at `path`
    (its bias unused); the training accuracy is the cosine classifier's."""

    def loss_fn(params, batch_stats, batch, rng):
        del rng
        out, updates = module.apply({"params": params, "batch_stats": batch_stats}, preprocess(batch["image"]),
                                    train=True, mutable=["batch_stats"])
        kernel, labels = layers.subtree(params, path)["kernel"], batch["label"]
        loss = cosine_margin_loss(out["pre_logits"], kernel, labels)
        pred = jnp.argmax(cosine_logits(out["pre_logits"], kernel), -1)
        return loss, (updates["batch_stats"], {"train acc": jnp.mean(pred == labels)})

    return loss_fn


def train(spec, images: np.ndarray, labels: np.ndarray, cfg: train_lib.TrainConfig,
          log: Callable[[str], None] = print, workdir: str | None = None) -> Any:
    """Train one zoo model from scratch with embjax.train.fit on one device (the zoo's weights do not
    depend on how many devices a run has); returns its variables ({"params", "batch_stats"}) as NumPy
    arrays. With `workdir` the training checkpoints there and a rerun resumes it. The loss and the seed
    (`cfg.seed` plus its offset) are the variant's (`spec.zoo_variant`; the rows are the caller's)."""
    if len(images) == 0:
        raise ValueError(f"no training images for zoo model {spec.name}")
    variant = _variant(getattr(spec, "zoo_variant", ""))
    if variant.seed_offset:
        cfg = dataclasses.replace(cfg, seed=cfg.seed + variant.seed_offset)
    module = spec.build()
    sample = spec.preprocess(jnp.asarray(images[:2]))
    variables = numpy_init(module, sample, cfg.seed)
    if variant.loss == "cosine":
        path = _classifier_path(module, variables, sample)
        loss = cosine_classifier_loss(module, spec.preprocess, path)
    else:
        loss = classifier_loss(module, spec.preprocess)

    def get_batch(idx):
        return {"image": images[idx], "label": labels[idx]}

    mesh = sharding.make_mesh(jax.local_devices()[:1])
    trained = train_lib.fit(loss, variables, get_batch, len(images), cfg, workdir=workdir,
                            fingerprint={"zoo": spec.name}, name=f"zoo {spec.name}", mesh=mesh, log=log)
    return cosine_head(trained, path) if variant.loss == "cosine" else trained


def training_rows(images: np.ndarray, labels: np.ndarray, variant: str, limit: int):
    """The rows a zoo model trains on: the variant's half (if any) of the given rows, then the first
    `limit` of them (0: all)."""
    half = _variant(variant).half
    if half is not None:
        rows = half_rows(len(images), half)
        images, labels = images[rows], labels[rows]
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def load_or_train(spec, images: np.ndarray, labels: np.ndarray, cfg: train_lib.TrainConfig, *, dataset: str,
                  cache_dir: str | None = None, log: Callable[[str], None] = print) -> Any:
    """The cached variables of a zoo model, training and caching them when absent."""
    from embjax.weights import store

    variant = getattr(spec, "zoo_variant", "")
    images, labels = training_rows(images, labels, variant, cfg.limit)
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(spec.name, cfg, dataset, len(images), variant)
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
