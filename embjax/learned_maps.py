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
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    loss_fn = LOSSES[loss]

    @jax.jit
    def step(params, state, idx):
        value, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx], head, labels[idx])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state: Any = opt.init(params)
    rng = np.random.default_rng(seed)
    history, start = [], time.perf_counter()
    batch_size = min(batch_size, n)
    for _ in range(epochs):
        order = rng.permutation(n)
        values = []
        for i in range(0, n - batch_size + 1, batch_size):
            params, state, value = step(params, state, jnp.asarray(order[i:i + batch_size]))
            values.append(value)
        history.append(float(np.mean(jax.device_get(values))))
    return params, {"loss": history, "seconds": time.perf_counter() - start}
