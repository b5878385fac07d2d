"""The engine's building blocks on toy members: sharded steps, NaN detection, head lookup, checkpoints."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from embjax import extract, stats


def _member(name, scale, d=4):
    def apply(v, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32)[:, :d] * v["s"]
        return {"pre_logits": x, "logits": x[:, :2]}

    return extract.Member(name=name, apply=apply, variables={"s": jnp.float32(scale)}, feature_dim=d)


def _batches(images, bs):
    for i in range(0, len(images), bs):
        chunk = images[i:i + bs]
        pad = bs - len(chunk)
        yield {"image": np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]),
               "mask": np.arange(bs) < len(chunk)}


def test_fit_step_matches_numpy_statistics():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (37, 2, 2, 1), dtype=np.uint8)
    members = [_member("a", 1.0), _member("b", 0.5)]
    mesh = extract.make_mesh()
    step = extract.make_fit_step(members, mesh)
    variables = extract.replicate([m.variables for m in members], mesh)
    state = extract.replicate(stats.init([4, 4]), mesh)
    state = extract.run_stream(lambda s, b: step(s, variables, b), state, _batches(images, 8), mesh=mesh,
                               total_batches=5, start_batch=0, label="t", batch_size=8, members=members)
    x = images.reshape(37, -1)[:, :4].astype(np.float64)
    joint = np.concatenate([x, 0.5 * x], axis=1)
    assert float(state.count) == 37  # the 3 padded rows of the last batch count nowhere
    # float32 accumulation of 37 rows of values < 255: relative error ~1e-6.
    np.testing.assert_allclose(np.asarray(state.mean), joint.mean(0), rtol=1e-5)
    centred = joint - joint.mean(0)
    np.testing.assert_allclose(np.asarray(state.cross), centred.T @ centred, rtol=1e-4, atol=1e-2)


def test_nan_features_are_an_error_naming_the_model():
    images = np.ones((8, 2, 2, 1), np.uint8)
    members = [_member("good", 1.0), _member("broken", np.nan)]
    mesh = extract.make_mesh()
    step = extract.make_fit_step(members, mesh)
    variables = extract.replicate([m.variables for m in members], mesh)
    state = extract.replicate(stats.init([4, 4]), mesh)
    with pytest.raises(extract.NonFiniteFeatures, match="broken"):
        extract.run_stream(lambda s, b: step(s, variables, b), state, _batches(images, 8), mesh=mesh,
                           total_batches=1, start_batch=0, label="t", batch_size=8, members=members,
                           split="test")


def test_find_head_is_unique_and_checked():
    params = {"conv": {"kernel": np.zeros((3, 3, 1, 8))}, "head": {"kernel": np.ones((8, 10)),
                                                                    "bias": np.arange(10.0)}}
    k, b = extract.find_head({"params": params}, 8, 10)
    assert k.shape == (8, 10) and b[3] == 3
    with pytest.raises(ValueError, match="exactly one classifier"):
        extract.find_head({"params": params}, 8, 1000)


def test_batch_size_must_divide_over_devices():
    mesh = extract.make_mesh()
    extract.check_batch_size(mesh.devices.size * 3, mesh)
    if mesh.devices.size > 1:
        with pytest.raises(ValueError, match="divisible"):
            extract.check_batch_size(mesh.devices.size + 1, mesh)


def test_checkpoint_round_trip_and_fingerprint(tmp_path):
    state = {"stats": stats.init([2, 3])}
    state["stats"] = stats.update(state["stats"], [jnp.ones((4, 2)), jnp.arange(12.0).reshape(4, 3)])
    ck = extract.Checkpoints(str(tmp_path / "ck"), "abc")
    ck.save(3, state, {"phase": "fit"})
    assert ck.latest() == 3
    restored, meta = ck.restore(3, state)
    assert meta["phase"] == "fit"
    np.testing.assert_array_equal(np.asarray(restored["stats"].cross), np.asarray(state["stats"].cross))
    ck.close()
    other = extract.Checkpoints(str(tmp_path / "ck"), "different")
    with pytest.raises(RuntimeError, match="different config"):
        other.restore(3, state)


def test_cpu_compiler_options_switch_and_agree(monkeypatch):
    """On CPU the steps are compiled with YNNPACK fusions off (Eigen convolutions); the switch back to
    XLA's defaults works, and both compilations give the same statistics for a convolutional member."""
    mesh = extract.make_mesh()
    if jax.default_backend() == "cpu":
        assert extract.compiler_options(mesh) == extract.CPU_COMPILER_OPTIONS
    else:
        assert extract.compiler_options(mesh) is None
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(0, 0.1, (3, 3, 3, 6)), jnp.float32)

    def apply(v, images):
        x = jax.lax.conv_general_dilated(images.astype(jnp.float32) / 255.0, v["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        x = jnp.maximum(x, 0.0).mean(axis=(1, 2))
        return {"pre_logits": x, "logits": x[:, :2]}

    member = extract.Member(name="conv", apply=apply, variables={"k": kernel}, feature_dim=6)
    batch = {"image": rng.integers(0, 255, (8, 9, 9, 3), dtype=np.uint8), "mask": np.ones(8, bool)}
    results = []
    for defaults in ("0", "1"):
        monkeypatch.setenv("EMBJAX_XLA_CPU_DEFAULTS", defaults)
        step = extract.make_fit_step([member], mesh)
        variables = extract.replicate([member.variables], mesh)
        state, bad = step(extract.replicate(stats.init([6]), mesh), variables, extract.shard_batch(batch, mesh))
        assert not bool(np.any(bad))
        results.append(np.asarray(state.cross, np.float64))
    assert extract.compiler_options(mesh) is None  # EMBJAX_XLA_CPU_DEFAULTS=1
    # Same float32 arithmetic in another summation order: a 27-term conv sum and 8x8 row products
    # round at ~1e-6 relative of the largest entry.
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-5 * np.abs(results[1]).max())
