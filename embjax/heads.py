"""Linear classifier heads on frozen features, trained by embjax.train's loop.

Used where a backbone's own classifier does not predict the study's labels (ImageNet backbones on
Fashion-MNIST): a multinomial logistic-regression head per backbone, trained on standardized features
and returned as a head `(kernel (d, classes), bias (classes,))` on the raw features.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from embjax import sharding, train

# The head's training fields (a study's `config.linear_head`) and their defaults.
DEFAULTS = dict(epochs=30, batch_size=512, learning_rate=1e-2, weight_decay=1e-4, seed=0)


def train_config(cfg: dict) -> train.TrainConfig:
    """The loop's config for a head: AdamW at a constant learning rate, the examples shuffled each epoch
    by one generator ("stream_unsorted"), XLA's default CPU options, a progress line per epoch."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"linear head config: unknown field(s) {sorted(unknown)}; the fields are "
                         f"{sorted(DEFAULTS)}")
    fields = {k: type(v)(cfg.get(k, v)) for k, v in DEFAULTS.items()}
    return train.TrainConfig(**fields, schedule="constant", order="stream_unsorted", xla_cpu_defaults=True,
                             log_seconds=math.inf)


def train_linear_head(feats: np.ndarray, labels: np.ndarray, num_classes: int, cfg: dict,
                      name: str = "", *, workdir: str | None = None,
                      log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardized features (batches of a fresh permutation each
    epoch; fewer examples than a batch make one full batch), trained with embjax.train.fit on one
    device; returned as a head on the raw features. With `workdir` the training checkpoints there and a
    rerun resumes it. `log` receives the loop's progress lines (default: none)."""
    feats = np.asarray(feats, np.float32)
    mu = feats.mean(0)
    sd = feats.std(0) + 1e-6
    x = (feats - mu) / sd
    y = np.asarray(labels, np.int32)
    d = x.shape[1]

    def loss_fn(params, model_state, batch, rng):
        del rng
        logits = batch["x"] @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), (model_state, {})

    variables = {"params": {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}}
    try:
        out = train.fit(loss_fn, variables, lambda idx: {"x": x[idx], "y": y[idx]}, len(x), train_config(cfg),
                        workdir=workdir, fingerprint={"linear_head": name, "shape": [len(x), d, num_classes]},
                        name=f"linear head {name}", mesh=sharding.make_mesh(jax.local_devices()[:1]),
                        log=log or (lambda line: None))
    except FloatingPointError as e:
        raise FloatingPointError(f"linear head of {name} diverged: {e}") from e
    w = np.asarray(out["params"]["w"]) / sd[:, None]
    b = np.asarray(out["params"]["b"]) - mu @ w
    return w.astype(np.float32), b.astype(np.float32)
