"""embjax.fne against float64 NumPy: pooling, streamed moments, degenerate features, discretization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import fne, moments

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def _outputs(rng, batch=6):
    return {
        "stem": rng.standard_normal((batch, 8, 6, 3)).astype(np.float32),
        "block_0": rng.standard_normal((batch, 4, 3, 5)).astype(np.float32),
        "fc": rng.standard_normal((batch, 7)).astype(np.float32),
        "logits": rng.standard_normal((batch, 2)).astype(np.float32),
    }


def test_pool_matches_numpy():
    rng = np.random.default_rng(0)
    out = _outputs(rng)
    got = np.asarray(fne.pool(out, ["stem", "block_0", "fc"]))
    ref = np.concatenate([out["stem"].astype(np.float64).mean(axis=(1, 2)),
                          out["block_0"].astype(np.float64).mean(axis=(1, 2)), out["fc"]], axis=1)
    assert got.shape == (6, 3 + 5 + 7) and got.dtype == np.float32
    # a float32 mean of ≤ 48 unit-scale terms: error ≲ 48 eps in absolute terms.
    np.testing.assert_allclose(got, ref, rtol=0, atol=48 * EPS32)
    assert fne.layer_widths(out, ["stem", "fc"]) == (3, 7)


def test_pool_errors_name_the_layer():
    out = _outputs(np.random.default_rng(0))
    with pytest.raises(KeyError, match="block_9"):
        fne.pool(out, ["stem", "block_9"])
    with pytest.raises(ValueError, match="weird"):
        fne.pool({"weird": np.zeros((2, 3, 4))}, ["weird"])


def _stream(x, mask, batch):
    state = moments.init(x.shape[1])
    step = jax.jit(moments.update)
    for s in range(0, len(x), batch):
        state = step(state, x[s : s + batch], mask[s : s + batch])
    return state


def test_streamed_standardization_statistics_match_float64_with_large_means():
    # Post-ReLU-like regime: means 1e3 x the spread. Raw sums of squares in float32 would lose every digit
    # of the variance (1e6 · eps = 0.1 relative error per term); centred batches keep it.
    rng = np.random.default_rng(1)
    n, d = 4000, 9
    x = (1e3 * rng.uniform(0.5, 1.0, d) + rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d))
    x = x.astype(np.float32)
    mask = rng.random(n) > 0.3  # padded / other-subset rows get no weight, whatever their values
    x_garbage = x.copy()
    x_garbage[~mask] = 1e30  # masked rows must not even multiply into the sums
    ref = x[mask].astype(np.float64)
    mu, var = ref.mean(axis=0), ref.var(axis=0)

    whole = _stream(x_garbage, mask, batch=256)
    # Four "devices" each streaming a quarter, merged in a tree: the order-free property the engine needs.
    parts = [_stream(x_garbage[i::4], mask[i::4], batch=128) for i in range(4)]
    tree = moments.merge(moments.merge(parts[0], parts[1]), moments.merge(parts[2], parts[3]))
    for state in (whole, tree):
        m, sd = (np.asarray(a, np.float64) for a in moments.compute(state))
        v = sd**2
        assert float(state.count) == mask.sum()
        # Mean: float32 rounding of values ~1e3 is 1e3·eps/2 = 6e-5 per term, and the weighted merges
        # add a few roundings of the same size: 10·1e3·eps = 1.2e-3 absolute, i.e. 1e-6 relative.
        np.testing.assert_allclose(m, mu, rtol=0, atol=10 * 1e3 * EPS32)
        # Variance: each centred batch term carries the input's own rounding (|x| eps ≈ 1e3 eps relative to
        # a spread of ~1, i.e. 1.2e-4 per deviation) and the mean's error above: relative error of var
        # ≲ 2 · 10 · 1e3 · eps / std_min (0.5) = 1e-2 worst case; the errors average out, observed ~1e-4.
        np.testing.assert_allclose(v, var, rtol=1e-2)
    # And far tighter than that where the data are not offset (the digits lost above are the input's).
    y = rng.standard_normal((n, d)).astype(np.float32)
    m, sd = moments.compute(_stream(y, np.ones(n, bool), batch=256))
    np.testing.assert_allclose(np.asarray(m), y.astype(np.float64).mean(0), atol=20 * EPS32)
    np.testing.assert_allclose(np.asarray(sd) ** 2, y.astype(np.float64).var(0), rtol=20 * np.sqrt(256) * EPS32)


def test_degenerate_features_are_zeroed_and_reported():
    rng = np.random.default_rng(2)
    n = 1000
    x = rng.standard_normal((n, 6)).astype(np.float32)
    x[:, 1] = 0.0  # dead ReLU channel
    x[:, 2] = 6.0  # saturated ReLU6 channel
    x[:, 3] = np.float32(0.1)  # constant whose float32 batch means are not exact: noise std ~1e-8
    x[:, 4] = 5.0 + 1e-2 * x[:, 0]  # small but real spread (cv 2e-3): must be kept
    s = fne.standardization(_stream(x, np.ones(n, bool), batch=64))
    assert np.asarray(s.degenerate).tolist() == [False, True, True, True, False, False]
    z = np.asarray(fne.standardize(x, s))
    assert np.all(z[:, 1:4] == 0) and np.all(np.isfinite(z))
    ref = (x[:, 4] - x[:, 4].astype(np.float64).mean()) / x[:, 4].astype(np.float64).std()
    # z of a feature of mean 5 and spread 1e-2: float32 rounding of x (5 eps/2 absolute) is 3e-5 in z units.
    np.testing.assert_allclose(z[:, 4], ref, atol=1e-3)
    assert np.all(np.asarray(fne.discretize(z[:, 1:4])) == 0)
    layers, widths = ["a", "b", "c"], [2, 3, 1]
    assert fne.degenerate_report(layers, widths, s.degenerate) == {"a": 1, "b": 2}


def test_discretize_boundaries_and_dtype():
    low, high = fne.LOW, fne.HIGH
    below, above = np.nextafter(np.float32(low), -1), np.nextafter(np.float32(high), 1)
    z = np.array([-3.0, below, low, -0.1, 0.0, high, above, 2.0, np.nan], np.float32)
    got = fne.discretize(z)
    assert got.dtype == jnp.int8
    # The rule: z < low -> -1, z > high -> 1, the closed band [low, high] -> 0; NaN -> 0.
    assert np.asarray(got).tolist() == [-1, -1, 0, 0, 0, 0, 1, 1, 0]
    assert np.asarray(fne.discretize(z, -1.0, 1.0)).tolist() == [-1, 0, 0, 0, 0, 0, 0, 1, 0]
    assert np.asarray(fne.discretize(z, 0.0, 0.0)).tolist() == [-1, -1, -1, -1, 0, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="low <= high"):
        fne.discretize(z, 0.5, 0.1)


def test_embed_matches_float64_pipeline():
    rng = np.random.default_rng(3)
    batches = [_outputs(rng, batch=16) for _ in range(5)]
    for b in batches:  # post-ReLU-like layers: offsets, exact zeros, a dead channel
        b["stem"] = np.maximum(b["stem"] + 2.0, 0.0)
        b["block_0"][..., 0] = 0.0
    layers = ["stem", "block_0", "fc"]
    state = moments.init(15)
    for b in batches:
        state = moments.update(state, fne.pool(b, layers), jnp.ones(16, bool))
    s = fne.standardization(state)
    got = np.concatenate([np.asarray(fne.embed(b, layers, s)) for b in batches])

    pooled = np.concatenate([np.concatenate([b["stem"].astype(np.float64).mean((1, 2)),
                                             b["block_0"].astype(np.float64).mean((1, 2)), b["fc"]], 1)
                             for b in batches])
    mu, sd = pooled.mean(0), pooled.std(0)
    dead = sd == 0
    z = np.where(dead, 0.0, (pooled - mu) / np.where(dead, 1.0, sd))
    ref = np.where(z > fne.HIGH, 1, np.where(z < fne.LOW, -1, 0))
    assert got.dtype == np.int8 and got.shape == ref.shape
    assert np.asarray(s.degenerate).tolist() == dead.tolist() and dead.sum() == 1
    # float32 z differs from float64 z by ~1e-6; only a value that close to a threshold may flip.
    near = np.minimum(np.abs(z - fne.HIGH), np.abs(z - fne.LOW)) < 1e-5
    assert np.array_equal(got[~near], ref[~near])
    assert {-1, 0, 1} == set(np.unique(got).tolist())


def test_embedding_layers_efficientnet_lite():
    from embjax.models import layers as model_layers
    from embjax.models.efficientnet import EfficientNetLite, lite_stages

    for variant in (0, 1, 2):
        module = EfficientNetLite(variant=variant)
        x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
        named = model_layers.named_layers(module, x)
        out = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], x)
        blocks = sum(g.repeats for g in lite_stages(variant))
        post = fne.embedding_layers(named)
        # stem, then per block [expand,] depthwise, project (block 0 has no expansion), then head.
        convs = [f"block_{i}/{c}" for i in range(blocks) for c in ("expand_conv", "depthwise_conv", "project_conv")
                 if (i, c) != (0, "expand_conv")]
        assert post == ("stem", *convs, "head")
        widths = fne.layer_widths(out, post)
        # Lite0, by hand: stem 32; block 0: 32 + 16; per later block with input c, hidden 6c, output o:
        # 6c + 6c + o; head 1280. 32 + 48 + (96+96+24) + (144+144+24) + (144+144+40) + (240+240+40)
        # + (240+240+80) + 2·(480+480+80) + (480+480+112) + 2·(672+672+112) + (672+672+192)
        # + 3·(1152+1152+192) + (1152+1152+320) + 1280 = 21,008.
        assert variant != 0 or sum(widths) == 21_008
        # The block set is the former one: stem, every block, head (Lite0: 32 + 16 + 24·2 + 40·2 + 80·3
        # + 112·3 + 192·4 + 320 + 1280 = 3,120; Lite1 repeats one more block in each middle group
        # (+24 + 40 + 80 + 112 + 192); Lite2 also widens them (48, 88, 120, 208, 352): 3,768).
        block = fne.embedding_layers(named, "block")
        assert sum(fne.layer_widths(out, block)) == {0: 3120, 1: 3568, 2: 3768}[variant]
        assert block[0] == "stem" and block[-1] == "head" and len(block) == blocks + 2
        pre = fne.embedding_layers(named, activation="pre", keys=out.keys())
        assert pre == ("stem_preact", *convs, "head_preact")
    with pytest.raises(ValueError, match="post"):
        fne.embedding_layers([model_layers.Layer("stage1", ("block",), (1, 4, 4, 8))], "block", activation="pre",
                             keys=["stage1"])
    with pytest.raises(ValueError, match="activation"):
        fne.embedding_layers(named, activation="both")
    with pytest.raises(ValueError, match="layer_set"):
        fne.embedding_layers(named, "every")
    # A flattened map is never taken as a fully connected output; only kind fc is.
    flat = [model_layers.Layer("pre_fc", ("conv",), (1, 25088))]
    with pytest.raises(ValueError, match="pre_fc"):
        fne.embedding_layers(flat)
