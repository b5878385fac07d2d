"""No pass of any study reduces its accumulator across devices per batch: every study, run on 4 fake CPU
devices, compiles steps whose optimized HLO holds no all-reduce (each device folds its own rows into its
own partial state; the engine merges partials on the host at checkpoints and at the end).

Each study runs as a subprocess (`python -m experiments.<study>`, tiny configuration, random weights)
with EMBJAX_HLO_DIR set, where the engine writes every pass's compiled step as `<pass>.hlo.txt`. The
same check fails on a step that keeps a replicated state: XLA then inserts all-reduces of every
accumulator leaf (test_step_hlo_shows_a_replicated_reduction)."""

import os
import subprocess
import sys

import pytest

import study_runner as runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUDIES = {
    "affine_equivalence": [
        "--config.models=zoo_resnet_v1,zoo_mobilenet_v2", "--config.fit_split=train[:64]",
        "--config.eval_split=test[:40]", "--config.batch_size=16", "--config.weights=random",
        "--config.learned.families=()"],
    "canonical_space": [
        "--config.models=zoo_resnet_v1,zoo_mobilenet_v2", "--config.fit_split=train[:64]",
        "--config.eval_split=test[:40]", "--config.batch_size=16", "--config.weights=random"],
    "open_set": ["--config=experiments/configs/open_set.py:smoke", "--config.num_fit=64", "--config.num_eval=48"],
    "full_network_embedding": ["--config=experiments/configs/full_network_embedding.py:tiny",
                               "--config.train_split=train[:48]", "--config.test_split=test[:24]",
                               "--config.train_sizes=24,48"],
    "backward_compatible": [
        "--config.train_split=train[:192]", "--config.eval_split=test[:64]", "--config.batch_size=32",
        *[f"--config.{t}.{k}" for t in ("old_train", "new_train")
          for k in ("epochs=1", "batch_size=32", "warmup_steps=1", "log_seconds=0")],
        "--config.maps.fit_samples=96", "--config.bct.compare_unnormalized=False"],
    "extract": ["--config=experiments/configs/extract.py:zoo", "--config.weights=random",
                "--config.models=zoo_resnet_v1", "--config.split=test[:32]", "--config.batch_size=16"],
}
PASSES = {"affine_equivalence": {"fit", "eval"}, "canonical_space": {"fit", "eval"}, "open_set": {"fit", "eval"},
          "full_network_embedding": {"stats_zoo_efficientnet_lite", "embed_zoo_efficientnet_lite"},
          "backward_compatible": {"old_features", "fit_maps", "eval"}, "extract": {"features"}}


def _env(tmp, **extra):
    return runner.env(devices=4, EMBJAX_HLO_DIR=tmp / "hlo", **extra)


# One study subprocess each (four trainings for BCT): the whole tier. The everyday tier keeps the check
# on experiments.features below, whose fit and eval passes fold the affine study's own accumulators
# (stats.accumulator, evaluate.accumulator) through identity members, so no backbone is compiled.
@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_steps_have_no_cross_device_reduction(study, tmp_path):
    cmd = [sys.executable, "-m", f"experiments.{study}", f"--workdir={tmp_path / 'run'}", *STUDIES[study]]
    # Generous timeouts: on a loaded 2-core machine a study with four trainings (BCT) took over 15 minutes.
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    dumped = {f[: -len(".hlo.txt")]: (tmp_path / "hlo" / f).read_text() for f in os.listdir(tmp_path / "hlo")}
    assert PASSES[study] <= set(dumped), sorted(dumped)
    for name, text in dumped.items():
        assert "ENTRY" in text and "num_partitions=4" in text.replace(" ", ""), name  # a real 4-device program
        assert "all-reduce" not in text, f"pass '{name}' of {study} reduces across devices in its step"


def test_own_features_steps_have_no_cross_device_reduction(tmp_path):
    """experiments.features streams feature files through identity members: same check, fit and eval."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(size=(70, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a @ rng.normal(size=(4, 4)).astype(np.float32))
    for m in "ab":
        np.savez(tmp_path / f"{m}.npz", W=rng.normal(size=(4, 3)).astype(np.float32), b=np.zeros(3, np.float32))
    np.save(tmp_path / "labels.npy", rng.integers(0, 3, 70))
    cmd = [sys.executable, "-m", "experiments.features", f"--features=a={tmp_path}/a.npy,b={tmp_path}/b.npy",
           f"--heads=a={tmp_path}/a.npz,b={tmp_path}/b.npz", f"--labels={tmp_path}/labels.npy", "--batch_size=16",
           f"--workdir={tmp_path / 'run'}"]
    # Generous timeouts: on a loaded 2-core machine a study with four trainings (BCT) took over 15 minutes.
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    dumped = {f: (tmp_path / "hlo" / f).read_text() for f in os.listdir(tmp_path / "hlo")}
    assert {"fit.hlo.txt", "eval.hlo.txt"} <= set(dumped), sorted(dumped)
    for name, text in dumped.items():
        assert "num_partitions=4" in text and "all-reduce" not in text, name


def test_step_hlo_shows_a_replicated_reduction(tmp_path):
    """The check above can fail: a state replicated over 4 devices (jit with the batch sharded) compiles
    to all-reduces, while the engine's step of the same pass compiles to none."""
    script = """
import sys
sys.path.insert(0, 'tests')
import numpy as np, jax
from jax.sharding import NamedSharding, PartitionSpec as P
import engine_toy
from embjax import extract
e = engine_toy.engine(sys.argv[1])
p = engine_toy.fit_pass()
acc = p.accumulator
replicated, sharded = NamedSharding(e.mesh, P()), NamedSharding(e.mesh, P('data'))
batch = {'image': jax.ShapeDtypeStruct((16, 2, 2, 1), np.uint8, sharding=sharded),
         'label': jax.ShapeDtypeStruct((16,), np.int32, sharding=sharded),
         'mask': jax.ShapeDtypeStruct((16,), bool, sharding=sharded),
         'index': jax.ShapeDtypeStruct((16,), np.int32, sharding=sharded)}
state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), acc.empty())
def fold(state, batch):
    outputs = {m.name: {'pre_logits': m.apply(m.variables, batch['image'])['pre_logits']} for m in e.members}
    return acc.update(state, outputs, batch, None)
naive = jax.jit(fold, out_shardings=replicated).lower(state, batch).compile().as_text()
print('replicated', naive.count('all-reduce'), 'engine', e.step_hlo(p).count('all-reduce'))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w")], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    assert words[0] == "replicated" and int(words[1]) > 0 and words[2:] == ["engine", "0"], proc.stdout
