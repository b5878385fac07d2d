"""train: batch order fixed by (seed, epoch); a run killed with SIGKILL from outside resumes to bit-identical
weights; the data-parallel step on 2 (fake CPU) devices follows the 1-device run.

The run that is killed and resumed, and the 2-device run, are subprocesses: the kill must hit a separate
process, and 2 devices need XLA_FLAGS=--xla_force_host_platform_device_count set before JAX starts. The
uninterrupted reference runs in this process (one interpreter start-up less). Whole tier only (three
child processes); the everyday tier's kill -9 resume is tests/test_study.py's.
"""

import runpy
import sys
import textwrap

import numpy as np
import pytest

import study_runner as runner
from embjax import train

# A small BatchNorm network trained through bct.make_loss (the BCT variant, so the influence path is
# exercised too) on random data whose labels a linear head can predict. The test owns the data source:
# asked for a batch number `block_at` (counted from 1), it waits on its stdin, which the test holds open
# and never writes, so the run stops there until the test, which saw the step line before it, kills it
# (fault injection from the test, nothing in train.py knows about it; no clock involved).
_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    import flax.linen as nn
    from embjax import bct, train

    jax.config.update("jax_default_matmul_precision", "highest")  # as the in-process reference run
    workdir, out_path, devices, block_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    assert jax.device_count() == devices, jax.devices()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Dense(8)(x.reshape(x.shape[0], -1) / 255.0)
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
            h = nn.relu(h)
            return {"pre_logits": h, "logits": nn.Dense(3)(h)}

    rng = np.random.default_rng(0)
    n = 256
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = np.clip(rng.normal(80, 30, (n, 4, 4, 1)) + 60 * labels[:, None, None, None], 0, 255).astype(np.uint8)
    net = Net()
    variables = jax.tree.map(np.asarray, net.init(jax.random.PRNGKey(0), images[:2].astype(np.float32)))
    kernel = rng.normal(size=(6, 2)).astype(np.float32)  # an "old" head 6 wide: the 8-d embedding is cut
    influence = bct.influence_classifier(kernel, np.zeros(2, np.float32), [0, 1], num_labels=3,
                                         new_classes=[2], new_class_means=np.ones((1, 6), np.float32))
    loss = bct.make_loss(net, lambda x: x.astype(np.float32), "bct", influence=influence, weight=0.5)

    fetched = 0

    def get_batch(idx):
        global fetched
        fetched += 1
        if fetched == block_at:
            sys.stdin.readline()  # blocks until the test kills this process (or closes the pipe)
        return {"image": images[idx], "label": labels[idx]}

    cfg = train.TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2, checkpoint_every=4, log_seconds=0.0)
    out = train.fit(loss, variables, get_batch, n, cfg, workdir=workdir, fingerprint={"test": 1},
                    name="toy")
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(out)[0]}
    np.savez(out_path, **flat)
    """
)
TOTAL_STEPS = 3 * (256 // 32)


def _cmd(tmp_path, workdir, out, devices=1, block_at=0):
    script = tmp_path / "train_toy.py"
    script.write_text(_SCRIPT)
    return [sys.executable, str(script), str(workdir), str(out), str(devices), str(block_at)]


def _run(tmp_path, workdir, out, devices=1):
    return runner.run(_cmd(tmp_path, workdir, out, devices), devices=devices).stdout


def _run_here(tmp_path, workdir, out, capsys):
    """The same script in this (1-device) process: no interpreter start-up or JAX import to pay."""
    script = tmp_path / "train_toy.py"
    script.write_text(_SCRIPT)
    argv = sys.argv
    sys.argv = [str(script), str(workdir), str(out), "1", "0"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_epoch_batches_depend_only_on_seed_and_epoch():
    a = train.epoch_batches(100, 32, seed=3, epoch=1)
    assert a.shape == (3, 32)
    np.testing.assert_array_equal(a, train.epoch_batches(100, 32, seed=3, epoch=1))
    assert len(np.unique(a)) == 96  # each example at most once per epoch
    assert not np.array_equal(a, train.epoch_batches(100, 32, seed=3, epoch=2))
    assert not np.array_equal(a, train.epoch_batches(100, 32, seed=4, epoch=1))
    with pytest.raises(ValueError, match="do not fill one batch"):
        train.epoch_batches(10, 32, seed=0, epoch=0)


@pytest.mark.slow
@pytest.mark.highest_precision  # the in-process reference matches the child scripts' precision
def test_sigkill_mid_run_resumes_to_identical_weights(tmp_path, capsys):
    one_device_log = _run_here(tmp_path, tmp_path / "ref", tmp_path / "ref.npz", capsys)

    # Step lines read "[toy] epoch e/3  step s/24 ..."; checkpoints every 4 steps. The run waits when it
    # asks for batch 11, so it can finish step 10 at most; the test kills it when step 10 is reported.
    # The newest checkpoint is then 8, whatever the machine's speed.
    runner.kill_at(_cmd(tmp_path, tmp_path / "run", tmp_path / "run.npz", block_at=11), r"step 10/24 ")
    assert not (tmp_path / "run.npz").exists()
    assert runner.checkpoints(tmp_path / "run") == [8, 4]

    log = _run(tmp_path, tmp_path / "run", tmp_path / "run.npz")
    assert "resuming from step 8/24" in log, log
    want, got = _load(tmp_path / "ref.npz"), _load(tmp_path / "run.npz")
    assert want.keys() == got.keys() and any("batch_stats" in k for k in got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # A finished run is its own result: a third call trains nothing and returns the same weights.
    again = _run_here(tmp_path, tmp_path / "run", tmp_path / "again.npz", capsys)
    assert "reusing the finished run" in again
    for k, v in _load(tmp_path / "again.npz").items():
        np.testing.assert_array_equal(v, want[k])

    # Data parallel: the same run on 2 (fake CPU) devices follows the 1-device one.
    two_device_log = _run(tmp_path, tmp_path / "two", tmp_path / "two.npz", devices=2)
    _check_two_devices_follow_one(one_device_log, two_device_log)


def _check_two_devices_follow_one(one, two):
    def losses(log):
        return np.array([float(line.split(" loss ")[1].split()[0]) for line in log.splitlines()
                         if " loss " in line])

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == TOTAL_STEPS
    # Same global batches, same initial weights: the 2-device step differs only in the order of the
    # batch reductions (BatchNorm moments, gradient all-reduce), i.e. float32 rounding ~1e-6 relative.
    # Adam can turn such a difference into a different update only for parameters whose gradient is at
    # the eps level, and those move the loss by (gradient × update) ≈ 0. 1e-4 relative is that margin; a
    # step that failed to combine the two halves of the batch (e.g. one device's gradients only) moves
    # the losses by percent.
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    assert abs(l1[-1]) < abs(l1[0])
