"""stats and evaluate on 4 (fake CPU) devices give the 1-device result: shard_map, pmap and plain jit.

The 4-device run happens in a subprocess, because XLA_FLAGS=--xla_force_host_platform_device_count
must be set before JAX initialises its backend and this pytest process already has one CPU device.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import study_runner as runner
from embjax import evaluate, stats

EPS32 = float(np.finfo(np.float32).eps)
DIMS = (5, 3)
CLASSES = 4
ROWS = 64  # 16 per device; the last device's 16 rows are all padding (an empty shard)

_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    jax.config.update("jax_default_matmul_precision", "highest")
    from embjax import evaluate, stats

    assert jax.device_count() == 4, jax.devices()
    data = np.load(sys.argv[1])
    dims = tuple(int(d) for d in data["dims"])
    feats = [data[f"f{i}"] for i in range(len(dims))]
    mask = data["mask"]
    labels = data["labels"]
    heads = [(data[f"k{i}"], data[f"c{i}"]) for i in range(len(dims))]
    maps = {(0, 1): (data["w01"], data["b01"]), (1, 0): (data["w10"], data["b10"])}
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    out = {}

    def save(prefix, state, fields):
        for name in fields:
            out[f"{prefix}_{name}"] = np.asarray(getattr(state, name))

    def stats_step(fs, m):
        return stats.allreduce(stats.update(stats.init(dims), fs, m), "batch")

    sharded = jax.jit(jax.shard_map(stats_step, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P()))
    save("shard_map", sharded(feats, mask), ("count", "mean", "cross"))

    per_dev = [f.reshape(4, -1, f.shape[1]) for f in feats]
    pmapped = jax.pmap(stats_step, axis_name="batch")(per_dev, mask.reshape(4, -1))
    assert np.all(np.asarray(pmapped.count) == np.asarray(pmapped.count)[0])
    save("pmap", jax.tree.map(lambda x: x[0], pmapped), ("count", "mean", "cross"))

    # Plain jit on a batch sharded over the devices: XLA partitions the batch reductions itself.
    rows = NamedSharding(mesh, P("batch"))
    fs = [jax.device_put(f, rows) for f in feats]
    m = jax.device_put(mask, rows)
    assert len(fs[0].sharding.device_set) == 4
    save("jit", jax.jit(stats.update)(stats.init(dims), fs, m), ("count", "mean", "cross"))

    def eval_step(fs, lab, m):
        state = evaluate.update(evaluate.init(dims), fs, heads, maps, lab, m)
        return evaluate.allreduce(state, "batch")

    ev = jax.jit(
        jax.shard_map(eval_step, mesh=mesh, in_specs=(P("batch"), P("batch"), P("batch")), out_specs=P())
    )(feats, labels, mask)
    save("eval", ev, ("count", "top1", "top5", "agreement", "sse", "sst", "mean"))
    ev_jit = jax.jit(evaluate.update)(
        evaluate.init(dims), fs, heads, maps, jax.device_put(labels, rows), m
    )
    save("eval_jit", ev_jit, ("count", "top1", "top5", "agreement", "sse", "sst", "mean"))
    np.savez(sys.argv[2], **out)
    """
)


def test_four_devices_match_one(tmp_path: Path):
    rng = np.random.default_rng(0)
    feats = [(rng.standard_normal((ROWS, d)) + 30.0).astype(np.float32) for d in DIMS]
    mask = np.ones(ROWS, bool)
    mask[48:] = False
    mask[[3, 20, 21]] = False  # a few padded rows on the other devices too
    for f in feats:
        f[~mask] = np.nan  # padding must not leak, whatever it holds
    labels = rng.integers(0, CLASSES, ROWS)
    heads = [(rng.standard_normal((d, CLASSES)).astype(np.float32), rng.standard_normal(CLASSES).astype(np.float32)) for d in DIMS]
    maps = {
        (0, 1): (rng.standard_normal((5, 3)).astype(np.float32) * 0.3, rng.standard_normal(3).astype(np.float32)),
        (1, 0): (rng.standard_normal((3, 5)).astype(np.float32) * 0.3, rng.standard_normal(5).astype(np.float32)),
    }
    arrays = {"dims": np.array(DIMS), "mask": mask, "labels": labels}
    for i, (f, (k, c)) in enumerate(zip(feats, heads)):
        arrays.update({f"f{i}": f, f"k{i}": k, f"c{i}": c})
    for (s, t), (w, b) in maps.items():
        arrays.update({f"w{s}{t}": w, f"b{s}{t}": b})
    data = tmp_path / "data.npz"
    result = tmp_path / "result.npz"
    np.savez(data, **arrays)

    env = runner.env(devices=4)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(data), str(result)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = np.load(result)

    one = stats.update(stats.init(DIMS), feats, mask)
    ev = evaluate.update(evaluate.init(DIMS), feats, heads, maps, labels, mask)
    scale = np.sqrt(np.outer(np.diag(one.cross), np.diag(one.cross)))
    # Only the summation order differs (per-device sums then psum vs one sum over ≤ 64 rows): the
    # cross-products agree to ~√64·eps = 1e-6 of the spreads; 10× that. Means are ~30, hence ×30.
    tol = 10 * np.sqrt(ROWS) * EPS32
    for mode in ("shard_map", "pmap", "jit"):
        assert int(got[f"{mode}_count"]) == int(one.count) == mask.sum(), mode
        assert np.all(np.isfinite(got[f"{mode}_cross"])), mode
        assert np.max(np.abs(got[f"{mode}_cross"] - np.asarray(one.cross)) / scale) < tol, mode
        np.testing.assert_allclose(got[f"{mode}_mean"], one.mean, rtol=0, atol=tol * 30, err_msg=mode)
    for mode in ("eval", "eval_jit"):
        for name in ("count", "top1", "top5", "agreement"):
            np.testing.assert_array_equal(got[f"{mode}_{name}"], getattr(ev, name), err_msg=f"{mode} {name}")
        # Sums of ≤ 45 squared residuals / centred squares in float32: same order-only bound as above.
        np.testing.assert_allclose(got[f"{mode}_sse"], ev.sse, rtol=tol)
        np.testing.assert_allclose(got[f"{mode}_sst"], ev.sst, rtol=tol)
