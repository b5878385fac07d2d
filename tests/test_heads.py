"""Linear heads on frozen features: trained by embjax.train's loop, they reproduce the heads' original
loop bit for bit (written out below), separate planted classes, and read as heads on the raw features."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from embjax import heads


def _planted(n, d=12, k=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, k))
    z = rng.normal(size=(n, d))
    # Labels linear in the standardized features (four balanced classes); the features themselves have
    # means far from 0 and unequal scales, so the head must undo the standardization.
    x = (z * np.linspace(1, 4, d) + 5).astype(np.float32)
    return x, np.argmax(z @ w, 1).astype(np.int32)


def _original_loop(feats, labels, num_classes, cfg):
    """The heads' training as it was before embjax.train served it: full batches of one shuffled stream,
    AdamW at a constant rate, the standardized problem."""
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    x, y = jnp.asarray((feats - mu) / sd), jnp.asarray(labels)
    rng = np.random.default_rng(cfg["seed"])
    tx = optax.adamw(cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"] + p["b"], yb).mean())(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt

    bs = cfg["batch_size"]
    for _ in range(cfg["epochs"]):
        perm = rng.permutation(len(x))
        for i in range(0, len(x) - bs + 1 if len(x) >= bs else 1, bs):
            params, opt = step(params, opt, x[perm[i:i + bs]], y[perm[i:i + bs]])
    w = np.asarray(params["w"]) / sd[:, None]
    return w, np.asarray(params["b"]) - mu @ w


@pytest.mark.parametrize("n", [300, 100])  # three batches of 96 (a remainder left out); one short batch
def test_head_follows_the_original_loop_and_separates_planted_classes(n):
    x, y = _planted(n)
    cfg = dict(epochs=4, batch_size=96, learning_rate=5e-2, weight_decay=1e-4, seed=3)
    lines = []
    kernel, bias = heads.train_linear_head(x, y, 4, cfg, name="planted", log=lines.append)
    assert len(lines) == 4  # a line per epoch, through the loop's logger
    want_k, want_b = _original_loop(x, y, 4, cfg)
    np.testing.assert_array_equal(kernel, want_k.astype(np.float32))
    np.testing.assert_array_equal(bias, want_b.astype(np.float32))
    # A head on the raw features: 4 epochs on planted linear classes (about a quarter each) already sort
    # most rows.
    assert np.bincount(y).max() < 0.45 * n
    assert np.mean(np.argmax(x @ kernel + bias, 1) == y) > 0.8


def test_unknown_field_is_an_error():
    x, y = _planted(50)
    with pytest.raises(ValueError, match="unknown field"):
        heads.train_linear_head(x, y, 4, {"epoch": 3})
