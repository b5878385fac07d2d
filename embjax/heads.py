"""Linear classifier heads on frozen features, trained with optax.

Used where a backbone's own classifier does not predict the study's labels (ImageNet backbones on
Fashion-MNIST): a multinomial logistic-regression head per backbone, trained on standardized features
and returned as a head `(kernel (d, classes), bias (classes,))` on the raw features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
