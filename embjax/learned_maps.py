"""Learned maps between embedding spaces (after Lenc and Vedaldi): linear and one-hidden-layer MLP,
trained with optax from the closed-form affine map.

A map takes source features (rows) to target features, x_dst ≈ f(x_src). Two families:

  linear:  f(x) = x W + b, W either dense (d_s, d_t) or low rank U V (U: (d_s, r), V: (r, d_t));
  mlp:     f(x) = x W + b + relu(x W1 + b1) W2, the affine part plus one hidden layer.

Both start at the closed-form affine map (embjax.maps.affine): the linear map is (W, b) itself (its best
rank-r factorisation for a low-rank map) and the MLP's second layer starts at zero, so before the first
step every learned map is the closed form, and training can only move away from it where the loss
improves. Two losses: `regression` (mean squared error against the target's features) and `task`
(cross-entropy of the frozen target head, kernel K and bias c, applied to the mapped features, against
labels). Everything is a pure function; `fit` runs a jitted optax loop over minibatches of in-memory
arrays.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def init_linear(w, b, rank: int | None = None) -> dict:
    """Linear-map parameters at the closed-form affine map (W, b); `rank` < min(d_s, d_t) factors W by its
    truncated SVD (the best rank-r approximation of W, not the reduced-rank regression)."""
    w, b = jnp.asarray(w), jnp.asarray(b)
    if w.ndim != 2 or b.shape != (w.shape[1],):
        raise ValueError(f"learned_maps.init_linear: W {w.shape} and b {b.shape} are not a (d_s, d_t), (d_t,) map")
    if rank is None:
        return {"w": w, "b": b}
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"learned_maps.init_linear: rank must be in [1, {min(w.shape)}], got {rank}")
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return {"u": u[:, :rank] * root, "v": root[:, None] * vt[:rank], "b": b}


def init_mlp(w, b, hidden: int, key, rank: int | None = None) -> dict:
    """MLP parameters: the affine part at (W, b) (see init_linear), a first layer with He-scaled random
    weights and zero bias, and a zero second layer, so the MLP starts as the closed-form map."""
    params = init_linear(w, b, rank)
    d_s, d_t = jnp.asarray(w).shape
    params["w1"] = jax.random.normal(key, (d_s, hidden), params["b"].dtype) * np.sqrt(2.0 / d_s)
    params["b1"] = jnp.zeros((hidden,), params["b"].dtype)
    params["w2"] = jnp.zeros((hidden, d_t), params["b"].dtype)
    return params


FAMILIES = ("learned", "learned_mlp")


def init(family: str, w, b, *, rank: int = 0, hidden: int = 256, key=None) -> dict:
    """A `family` map's parameters at the closed-form affine map (W, b): "learned" (linear, `init_linear`)
    or "learned_mlp" (`init_mlp`: a hidden layer of width `hidden`, its first layer drawn from `key`);
    `rank` > 0 factors the linear part to rank min(rank, d_s, d_t). What `fit_pairs` starts every pair at
    and embjax.bct.learned_map its one map."""
    if family not in FAMILIES:
        raise ValueError(f"learned_maps.init: family must be one of {FAMILIES}, got {family!r}")
    r = min(rank, *np.shape(w)) if rank > 0 else None
    if family == "learned":
        return init_linear(w, b, r)
    if key is None:
        raise ValueError("learned_maps.init: the learned_mlp family needs a random key for its first layer")
    return init_mlp(w, b, hidden, key, r)


def apply(params: dict, x: jax.Array) -> jax.Array:
    """The mapped features f(x) for rows x."""
    if "w" in params:
        y = _mm(x, params["w"])
    else:
        y = _mm(_mm(x, params["u"]), params["v"])
    y = y + params["b"]
    if "w1" in params:
        y = y + _mm(jax.nn.relu(_mm(x, params["w1"]) + params["b1"]), params["w2"])
    return y


def regression_loss(params, x, y, head=None, labels=None):
    """Mean over rows of the squared error ‖f(x) − y‖²."""
    return jnp.mean(jnp.sum((apply(params, x) - y) ** 2, axis=-1))


def task_loss(params, x, y, head, labels):
    """Cross-entropy of the frozen target head (kernel, bias) on f(x) against integer labels."""
    kernel, bias = head
    logits = _mm(apply(params, x), kernel) + bias
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


LOSSES = {"regression": regression_loss, "task": task_loss}


def fit(params: dict, x, y=None, *, loss: str = "regression", head=None, labels=None, epochs: int = 20,
        batch_size: int = 256, learning_rate: float = 1e-3, weight_decay: float = 0.0, seed: int = 0) -> tuple[dict, dict]:
    """Train a map with AdamW on minibatches; returns (params, {"loss": per-epoch means, "seconds"}).

    `y` (target features) is needed for the regression loss; `head` ((d_t, classes) kernel, bias) and
    `labels` for the task loss.
    """
    if loss not in LOSSES:
        raise ValueError(f"learned_maps.fit: loss must be one of {sorted(LOSSES)}, got {loss!r}")
    x = jnp.asarray(x)
    n = x.shape[0]
    if loss == "regression" and (y is None or len(y) != n):
        raise ValueError("learned_maps.fit: the regression loss needs target features y with one row per source row")
    if loss == "task" and (head is None or labels is None or len(labels) != n):
        raise ValueError("learned_maps.fit: the task loss needs the target head (kernel, bias) and one label per row")
    y = jnp.zeros((n, 0), x.dtype) if y is None else jnp.asarray(y)
    labels = jnp.zeros((n,), jnp.int32) if labels is None else jnp.asarray(labels)
    opt, step = _step(loss, float(learning_rate), float(weight_decay))
    state: Any = opt.init(params)
    rng = np.random.default_rng(seed)
    history, start = [], time.perf_counter()
    batch_size = min(batch_size, n)
    for _ in range(epochs):
        order = rng.permutation(n)
        values = []
        for i in range(0, n - batch_size + 1, batch_size):
            params, state, value = step(params, state, x, y, head, labels, jnp.asarray(order[i:i + batch_size]))
            values.append(value)
        history.append(float(np.mean(jax.device_get(values))))
    return params, {"loss": history, "seconds": time.perf_counter() - start}


@functools.cache
def _step(loss: str, learning_rate: float, weight_decay: float):
    """The optimizer and one jitted AdamW step; the data are arguments (not constants baked into the
    program), so maps of the same shapes share one compilation."""
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    loss_fn = LOSSES[loss]

    @jax.jit
    def step(params, state, x, y, head, labels, idx):
        value, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx], head, labels[idx])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return opt, step


def as_affine(params: dict) -> tuple[jax.Array, jax.Array]:
    """(W, b) of a linear map (dense or low rank); an MLP's affine part."""
    w = params["w"] if "w" in params else _mm(params["u"], params["v"])
    return w, params["b"]


def fit_pairs(feats, labels, heads, affine: dict, family: str, *, loss: str = "task", hidden: int = 256,
              rank: int = 0, epochs: int = 3, batch_size: int = 512, learning_rate: float = 1e-3,
              weight_decay: float = 0.0, seed: int = 0, log=None) -> tuple[dict, dict]:
    """A learned map for every ordered pair (s, t), s != t, of the models whose fit features are `feats`
    (one (n, d_i) array per model, row k the same sample in every model), each started at the closed-form
    `affine[(s, t)]` = (W, b). `family`: "learned" (linear) or "learned_mlp" (affine part plus one hidden
    layer of width `hidden`); `rank` > 0 factors the linear part to rank min(rank, d_s, d_t). `loss`:
    "task" (the target's frozen head `heads[t]` = (kernel, bias) against `labels`) or "regression" (the
    target's features). Every pair sees the same minibatches (one permutation per epoch from `seed`).

    All pairs train at once: each pair's parameters are zero-padded to the largest shape of any pair and
    the AdamW step is vmapped over pairs, so one program serves every pair. The padding stays exactly zero
    (its inputs, and the head rows it meets, are zero, so its gradients are zero and AdamW leaves it) and
    each pair's map is `fit`'s update rule on its own data. Returns ({(s, t): params at their own shapes},
    {"seconds": training seconds, "loss": {(s, t): per-epoch mean loss}})."""
    if family not in FAMILIES:
        raise ValueError(f"learned_maps.fit_pairs: family must be one of {FAMILIES}, got {family!r}")
    if loss not in LOSSES:
        raise ValueError(f"learned_maps.fit_pairs: loss must be one of {sorted(LOSSES)}, got {loss!r}")
    start = time.perf_counter()
    dims = [int(f.shape[1]) for f in feats]
    n_models, d, rows = len(feats), max(dims), int(feats[0].shape[0])
    if any(int(f.shape[0]) != rows for f in feats) or (loss == "task" and len(labels) != rows):
        raise ValueError("learned_maps.fit_pairs: every model needs one feature row per sample (and one label each)")
    pairs = [(s, t) for s in range(n_models) for t in range(n_models) if s != t]
    inits = [init(family, *affine[(s, t)], rank=rank, hidden=hidden,
                  key=jax.random.fold_in(jax.random.key(seed), s * n_models + t)) for s, t in pairs]
    shapes = [jax.tree.map(np.shape, p) for p in inits]
    params = jax.tree.map(lambda *leaves: jnp.stack(_pad_all(leaves)), *inits)
    x = jnp.stack([jnp.pad(jnp.asarray(f, jnp.float32), ((0, 0), (0, d - f.shape[1]))) for f in feats])
    if loss == "task":
        kernels = jnp.stack([jnp.pad(jnp.asarray(k, jnp.float32), ((0, d - np.shape(k)[0]), (0, 0))) for k, _ in heads])
        biases = jnp.stack([jnp.asarray(c, jnp.float32) for _, c in heads])
    else:
        kernels = biases = jnp.zeros((n_models, 0), jnp.float32)
    labels = jnp.zeros((rows,), jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    src, dst = (jnp.asarray([p[k] for p in pairs]) for k in (0, 1))
    opt, step = _pairs_step(loss, float(learning_rate), float(weight_decay))
    state = jax.vmap(opt.init)(params)
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, rows)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(rows)
        values = []
        for i in range(0, rows - batch_size + 1, batch_size):
            params, state, value = step(params, state, x, labels, kernels, biases, src, dst,
                                        jnp.asarray(order[i:i + batch_size]))
            values.append(value)
        history.append(np.mean(np.asarray(jax.device_get(values)), axis=0))  # (pairs,)
        if log is not None:
            log(f"[learned] {family}: epoch {epoch + 1}/{epochs}, mean loss over {len(pairs)} pairs "
                f"{float(np.mean(history[-1])):.4f}")
    params = jax.device_get(params)
    out = {pair: jax.tree.map(lambda a, shape, k=k: a[k][tuple(slice(0, n) for n in shape)], params, shapes[k],
                              is_leaf=lambda v: isinstance(v, np.ndarray))
           for k, pair in enumerate(pairs)}
    losses = {pair: [float(h[k]) for h in history] for k, pair in enumerate(pairs)}
    return out, {"seconds": time.perf_counter() - start, "loss": losses}


def _pad_all(leaves):
    """The arrays zero-padded at the end of every axis to the largest shape among them."""
    target = np.max([np.shape(a) for a in leaves], axis=0)
    return [jnp.pad(jnp.asarray(a), [(0, int(m) - n) for n, m in zip(np.shape(a), target)]) for a in leaves]


@functools.cache
def _pairs_step(loss: str, learning_rate: float, weight_decay: float):
    """The optimizer and one jitted AdamW step of every pair at once (vmapped over pairs): pair p reads
    the rows `idx` of source src[p]'s padded features and of target dst[p]'s features or head."""
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    loss_fn = LOSSES[loss]

    def one(params, state, x, labels, kernels, biases, s, t, idx):
        head = (kernels[t], biases[t]) if loss == "task" else None
        y = x[t][idx] if loss == "regression" else None
        value, grads = jax.value_and_grad(loss_fn)(params, x[s][idx], y, head, labels[idx])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    pairs = jax.vmap(one, in_axes=(0, 0, None, None, None, None, 0, 0, None))
    return opt, jax.jit(pairs)


def fit_families(feats, labels, heads, affine: dict, families, *, memo=None, log=None, **cfg) -> tuple[dict, dict]:
    """`fit_pairs` for each family in `families` (keyword arguments `cfg` as fit_pairs takes them), each
    through `memo(name, compute)` when given (the engine's memo: a resumed run reuses the trained maps).
    Returns ({family: {(s, t): params}}, {family: {"seconds": training seconds, "final_loss": {(s, t):
    last epoch's mean loss}}})."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"learned_maps.fit_families: unknown families {unknown}; choose from {FAMILIES}")
    params, info = {}, {}
    for family in families:
        def train(family=family):
            p, meta = fit_pairs(feats, labels, heads, affine, family, log=log, **cfg)
            return {"params": {f"{s}_{t}": v for (s, t), v in p.items()}, "seconds": meta["seconds"],
                    "final_loss": {f"{s}_{t}": v[-1] for (s, t), v in meta["loss"].items() if v}}

        value = memo(f"learned_{family}", train) if memo is not None else train()
        pair = lambda key: tuple(int(i) for i in key.split("_"))  # noqa: E731
        params[family] = {pair(k): v for k, v in value["params"].items()}
        info[family] = {"seconds": float(value["seconds"]),
                        "final_loss": {pair(k): float(v) for k, v in value["final_loss"].items()}}
    return params, info
