"""The engine on toy members: passes, padding, non-finite outputs, finished-pass restore, resume after a
crash, the feature store, memos, head lookup, checkpoints and compiler options."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import data, extract, feature_store, moments, stats


def _member(name, scale, d=4):
    def apply(v, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32)[:, :d] * v["s"]
        return {"pre_logits": x, "logits": x[:, :2], "grid": x.reshape(x.shape[0], 2, d // 2)}

    return extract.Member(name=name, apply=apply, variables={"s": jnp.float32(scale)}, feature_dim=d)


def _source(n, seed=0):
    rng = np.random.default_rng(seed)
    return data.ArraySource(rng.integers(0, 255, (n, 2, 2, 1), dtype=np.uint8), rng.integers(0, 10, n))


def _stats_pass(names, source, **kw):
    return extract.Pass("fit", source, "toy", {n: ("pre_logits",) for n in names},
                        accumulator=stats.accumulator([4] * len(names),
                                                      lambda out, b, aux: [out[n]["pre_logits"] for n in names]),
                        **kw)


def _per_device(tree, mesh):
    """A state with one partial per device (a leading device axis sharded over the mesh), as steps take it."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.devices.size
    return jax.device_put(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))).copy(), tree),
                          NamedSharding(mesh, P(extract.DATA_AXIS)))


def _engine(members, workdir, **kw):
    kw = dict(batch_size=8, fingerprint={"toy": 1}, checkpoint_every=2, progress_seconds=1e9) | kw
    return extract.Engine(members, str(workdir), **kw)


def test_fit_pass_matches_numpy_statistics(tmp_path):
    source = _source(37)
    members = [_member("a", 1.0), _member("b", 0.5)]
    state = _engine(members, tmp_path).run(_stats_pass(["a", "b"], source))
    x = source.images.reshape(37, -1)[:, :4].astype(np.float64)
    joint = np.concatenate([x, 0.5 * x], axis=1)
    assert int(state.count) == 37  # the 3 padded rows of the last batch count nowhere
    # float32 accumulation of 37 rows of values < 255: relative error ~1e-6.
    np.testing.assert_allclose(np.asarray(state.mean), joint.mean(0), rtol=1e-5)
    centred = joint - joint.mean(0)
    np.testing.assert_allclose(np.asarray(state.cross), centred.T @ centred, rtol=1e-4, atol=1e-2)


def test_nan_outputs_stop_the_pass_naming_the_model_and_batches(tmp_path):
    source = _source(40)
    source.images[source.images == 255] = 254
    source.images[25, 0, 0, 0] = 255  # row 25: batch 3 of 5

    def apply(v, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32)[:, :4]
        return {"pre_logits": x / (x != 255)}  # inf on the marked pixel only

    broken = extract.Member(name="broken", apply=apply, variables={}, feature_dim=4)
    # Flags are read after the first batch and at the end of the pass (no checkpoints here): the error
    # names the model and the batches since the last check.
    with pytest.raises(extract.NonFiniteFeatures, match=r"from broken on split 'toy'.*batches 1\.\.4"):
        _engine([_member("good", 1.0), broken], tmp_path, checkpoint_every=0).run(
            _stats_pass(["good", "broken"], source))
    # Nothing was saved as finished, so a fixed run starts over rather than reusing poisoned sums.
    assert not os.path.exists(tmp_path / "passes" / "fit")


def test_only_the_members_a_pass_names_run(tmp_path):
    calls = []

    def apply(v, images):
        calls.append("broken")  # traced once if it runs at all
        return {"pre_logits": images.reshape(images.shape[0], -1).astype(jnp.float32)[:, :4] * np.nan}

    broken = extract.Member(name="broken", apply=apply, variables={}, feature_dim=4)
    state = _engine([_member("a", 1.0), broken], tmp_path).run(_stats_pass(["a"], _source(16)))
    assert int(state.count) == 16 and calls == []
    with pytest.raises(ValueError, match="nope"):
        _engine([_member("a", 1.0)], tmp_path / "x").run(_stats_pass(["nope"], _source(16)))


class _Crash(Exception):
    pass


class _CrashingSource:
    """A source whose reads fail from sample `after` on: a run dying mid-pass, injected from the test."""

    def __init__(self, source, after):
        self.source, self.after = source, after

    def __len__(self):
        return len(self.source)

    def get_batch(self, idx):
        if np.max(idx) >= self.after:
            raise _Crash(f"injected failure reading {idx.min()}..{idx.max()}")
        return self.source.get_batch(idx)

    @property
    def image_shape(self):
        return self.source.image_shape


def _moments_pass(source, store=None):
    """A second kind of pass: per-model feature means (diagonal moments) plus two stored outputs."""
    return extract.Pass("means", source, "toy", {"a": ("pre_logits", "grid"), "b": ("pre_logits",)},
                        accumulator={n: moments.accumulator(4, lambda out, b, aux, n=n: out[n]["pre_logits"])
                                     for n in ("a", "b")},
                        store=store if store is not None else {"a/grid": "float16", "b/pre_logits": "float32"})


def test_resume_after_a_crash_mid_pass_gives_identical_state_and_store(tmp_path):
    source = _source(53, seed=4)
    members = [_member("a", 1.0), _member("b", -0.25)]
    whole = _engine(members, tmp_path / "whole").run(_moments_pass(source))

    workdir = tmp_path / "crashed"
    with pytest.raises(_Crash):  # dies while reading batch 5 (checkpoints after batches 2 and 4)
        _engine(members, workdir).run(_moments_pass(_CrashingSource(source, after=41)))
    assert not os.path.exists(workdir / "store" / "means" / "manifest.json")  # incomplete, and says so
    with pytest.raises(feature_store.FeatureStoreError, match="did not finish"):
        feature_store.open(workdir / "store" / "means")
    resumed = _engine(members, workdir).run(_moments_pass(source))
    for n in ("a", "b"):  # same fold order from the checkpoint on: bit-identical
        for field in ("count", "mean", "sumsq"):
            np.testing.assert_array_equal(getattr(resumed[n], field), getattr(whole[n], field))
    a = feature_store.open(tmp_path / "whole" / "store" / "means")
    b = feature_store.open(workdir / "store" / "means")
    for name in a.names:
        np.testing.assert_array_equal(a.array(name), b.array(name))
    np.testing.assert_array_equal(b.index, np.arange(53))
    np.testing.assert_array_equal(b.labels, source.labels)

    # A finished pass is restored, not recomputed: reading the source again would crash.
    again = _engine(members, workdir).run(_moments_pass(_CrashingSource(source, after=0)))
    np.testing.assert_array_equal(again["a"].mean, whole["a"].mean)


def test_feature_store_holds_each_output_in_dataset_order(tmp_path):
    source = _source(21, seed=2)
    members = [_member("a", 1.0), _member("b", -0.25)]
    engine = _engine(members, tmp_path, config={"what": "toy"})
    engine.run(_moments_pass(source, store={"a/grid": "float16", "b/pre_logits": "float32", "a/pre_logits": "int8"}))
    store = engine.store("means")
    x = source.images.reshape(21, -1)[:, :4].astype(np.float32)
    np.testing.assert_array_equal(store.array("b/pre_logits"), -0.25 * x)
    np.testing.assert_array_equal(store.array("a/grid"), x.astype(np.float16))  # (21, 2, 2) flattened
    assert store.array("a/grid").dtype == np.float16
    np.testing.assert_array_equal(store.array("a/pre_logits"), np.clip(x, -128, 127).astype(np.int8))
    manifest = json.load(open(tmp_path / "store" / "means" / "manifest.json"))
    assert manifest["num_rows"] == 21 and manifest["split"] == "toy"
    assert manifest["entries"]["a/grid"] == {"dtype": "float16", "shape": [4], "file_stem": "a__grid"}
    assert manifest["config"] == {"what": "toy"}
    # Readable with plain NumPy.
    raw = np.load(tmp_path / "store" / "means" / "b__pre_logits.p0.npy")
    np.testing.assert_array_equal(raw, -0.25 * x)


def test_memo_is_computed_once_per_fingerprint(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"w": [np.arange(3.0), (np.ones((2, 2)), 4)], "name": np.asarray("x")}

    first = _engine([_member("a", 1.0)], tmp_path).memo("heads", compute)
    second = _engine([_member("a", 1.0)], tmp_path).memo("heads", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(second["w"][0], first["w"][0])
    assert isinstance(second["w"][1], tuple) and int(second["w"][1][1]) == 4
    _engine([_member("a", 1.0)], tmp_path, fingerprint={"toy": 2}).memo("heads", compute)
    assert len(calls) == 2  # another config never reuses it


def test_find_head_is_unique_and_checked():
    params = {"conv": {"kernel": np.zeros((3, 3, 1, 8))}, "head": {"kernel": np.ones((8, 10)),
                                                                    "bias": np.arange(10.0)}}
    k, b = extract.find_head({"params": params}, 8, 10)
    assert k.shape == (8, 10) and b[3] == 3
    with pytest.raises(ValueError, match="exactly one classifier"):
        extract.find_head({"params": params}, 8, 1000)
    # The one search behind find_head and the zoo's cosine head: a path, also over abstract leaves.
    from embjax.models import layers

    nested = {"backbone": params, "other": {"kernel": np.zeros((8, 3))}}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nested)
    assert layers.classifier_path(shapes, 8, 10) == ("backbone", "head")
    assert layers.subtree(nested, ("backbone", "head"))["bias"][3] == 3
    with pytest.raises(ValueError, match="has no bias"):
        extract.find_head({"params": {"head": {"kernel": np.ones((8, 10))}}}, 8, 10)


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
        return {"pre_logits": jnp.maximum(x, 0.0).mean(axis=(1, 2))}

    member = extract.Member(name="conv", apply=apply, variables={"k": kernel}, feature_dim=6)
    p = extract.Pass("fit", None, "toy", {"conv": ("pre_logits",)},
                     accumulator=stats.accumulator([6], lambda out, b, aux: [out["conv"]["pre_logits"]]))
    batch = {"image": rng.integers(0, 255, (8, 9, 9, 3), dtype=np.uint8), "mask": np.ones(8, bool),
             "label": np.zeros(8, np.int32), "index": np.arange(8)}
    results = []
    for defaults in ("0", "1"):
        monkeypatch.setenv("EMBJAX_XLA_CPU_DEFAULTS", defaults)
        step = extract.make_step([member], p, mesh)
        state, bad, _ = step(_per_device(stats.init([6]), mesh), _per_device(np.zeros(1, bool), mesh),
                             extract.replicate([member.variables], mesh), None, extract.shard_batch(batch, mesh))
        assert not bool(np.any(bad))
        results.append(np.asarray(state.cross, np.float64).sum(0))
    assert extract.compiler_options(mesh) is None  # EMBJAX_XLA_CPU_DEFAULTS=1
    # Same float32 arithmetic in another summation order: a 27-term conv sum and 8x8 row products
    # round at ~1e-6 relative of the largest entry.
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-5 * np.abs(results[1]).max())


def test_two_thousand_partial_merges_match_float64():
    """The host merge of per-device partials (float64, pairwise) at ImageNet scale: 2,048 partial
    statistics of features whose mean is 1e4 times their spread, against float64 NumPy on all rows."""
    rng = np.random.default_rng(7)
    dims, k, rows = (3, 2), 2048, 16
    mean = 1e4 * rng.uniform(0.5, 1.5, sum(dims))
    x = (mean + rng.normal(size=(k * rows, sum(dims))) @ rng.normal(size=(sum(dims), sum(dims)))).astype(np.float32)
    # The 2,048 partials in one vmapped call (one dispatch instead of 2,048), then split on the host.
    stacked = jax.device_get(jax.vmap(lambda a, b: stats.update(stats.init(dims), [a, b]))(
        x[:, :3].reshape(k, rows, 3), x[:, 3:].reshape(k, rows, 2)))
    partials = [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(k)]
    merged = extract.merge_partials(jax.device_get(partials), stats.merge)
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(0)
    assert int(merged.count) == k * rows and merged.cross.dtype == np.float32
    # Each partial's own cross-product is float32 over 16 rows centred on their own mean (relative
    # error ~1e-6 of the spread); the merges add nothing beyond one final rounding to float32. A float32
    # merge of raw sums would lose every digit here (mean² / spread² = 1e8 > 1 / eps32).
    np.testing.assert_allclose(merged.mean, x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(merged.cross, centred.T @ centred, rtol=1e-4,
                               atol=1e-5 * np.abs(centred.T @ centred).max())


def test_per_device_partials_resume_to_the_same_numbers(tmp_path):
    """Each device folds its own rows and partials meet only at checkpoints and the end: the merged
    statistics match float64 NumPy, and a checkpointed resume gives the same numbers."""
    source = _source(45, seed=9)
    members = [_member("a", 1.0), _member("b", 0.5)]
    partial = _engine(members, tmp_path / "p").run(_stats_pass(["a", "b"], source))
    assert int(partial.count) == 45
    x = source.images.reshape(45, -1)[:, :4].astype(np.float64)
    joint = np.concatenate([x, 0.5 * x], axis=1)
    np.testing.assert_allclose(partial.mean, joint.mean(0), rtol=1e-5)  # float32 sums of values < 255
    centred = joint - joint.mean(0)
    np.testing.assert_allclose(partial.cross, centred.T @ centred, rtol=1e-4, atol=1e-2)
    with pytest.raises(_Crash):
        _engine(members, tmp_path / "c").run(_stats_pass(["a", "b"], _CrashingSource(source, after=40)))
    resumed = _engine(members, tmp_path / "c").run(_stats_pass(["a", "b"], source))
    np.testing.assert_array_equal(resumed.cross, partial.cross)


def test_float32_steps_trace_every_dot_at_highest_precision():
    """A float32 run asks for float32 arithmetic in every matmul and convolution of the step (TF32 on
    GPUs and one-pass bfloat16 on TPUs are XLA's defaults otherwise), with no global setting."""
    rng = np.random.default_rng(0)

    def apply(v, images):
        x = jax.lax.conv_general_dilated(images.astype(jnp.float32), v["k"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return {"pre_logits": x.mean(axis=(1, 2)) @ v["w"]}

    member = extract.Member(name="m", apply=apply, variables={"k": rng.normal(size=(3, 3, 1, 4)).astype(np.float32),
                                                              "w": np.eye(4, dtype=np.float32)}, feature_dim=4)
    p = _stats_pass(["m"], None)
    mesh = extract.make_mesh()
    batch = {"image": np.zeros((8, 5, 5, 1), np.uint8), "mask": np.ones(8, bool), "label": np.zeros(8, np.int32),
             "index": np.arange(8, dtype=np.int32)}
    n_dev = mesh.devices.size
    args = (jax.tree.map(lambda x: np.broadcast_to(x, (n_dev, *np.shape(x))), stats.init([4])),
            np.zeros((n_dev, 1), bool), [member.variables], None, batch)
    with jax.default_matmul_precision(None):  # whatever the test suite sets globally
        high = str(extract.make_step([member], p, mesh, "float32").trace(*args).jaxpr)
        low = str(extract.make_step([member], p, mesh, None).trace(*args).jaxpr)
    for text in (high, low):
        assert "conv_general_dilated" in text and "dot_general" in text
    assert "precision=None" not in high and "DEFAULT" not in high and "HIGHEST" in high
    assert "precision=None" in low  # the backbone's own dots, left to XLA in bfloat16 runs
