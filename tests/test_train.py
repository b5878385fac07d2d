"""train: the one training loop (zoo, linear heads, BCT) follows a hand-written reference loop bit for bit
in each batch order and schedule; batch order fixed by (seed, epoch); an interrupted run resumes to
bit-identical weights; a run killed with SIGKILL from outside resumes to bit-identical weights; the
data-parallel step on 2 (fake CPU) devices follows the 1-device run.

The run that is killed and resumed, and the 2-device run, are subprocesses: the kill must hit a separate
process, and 2 devices need XLA_FLAGS=--xla_force_host_platform_device_count set before JAX starts. The
uninterrupted reference runs in this process (one interpreter start-up less). Whole tier only (three
child processes); the everyday tier's kill -9 resume is tests/test_study.py's.
"""

import dataclasses
import runpy
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import optax
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


# --------------------------------------------------------------------------------------------------
# The loop against a reference written out by hand, as the zoo, the heads and BCT each had their own loop


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Dense(8)(x.reshape(x.shape[0], -1) / 255.0)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = nn.relu(h)
        return {"pre_logits": h, "logits": nn.Dense(3)(h)}


def _toy(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = np.clip(rng.normal(80, 30, (n, 4, 4, 1)) + 60 * labels[:, None, None, None], 0, 255).astype(np.uint8)
    return images, labels


def _toy_loss(net):
    # Uses the rng (dropout-like noise on the logits) so that the step's key must follow the step number.
    def loss_fn(params, model_state, batch, rng):
        out, updates = net.apply({"params": params, "batch_stats": model_state}, batch["image"], train=True,
                                 mutable=["batch_stats"])
        logits = out["logits"] + 0.01 * jax.random.normal(rng, out["logits"].shape)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (updates["batch_stats"], {})

    return loss_fn


def _reference_indices(n, bs, seed, epochs, order):
    """Each step's example indices, written out as the three original loops drew them."""
    steps = max(1, n // bs) if order != "seed_epoch" else n // bs
    stream = np.random.default_rng(seed)
    out = []
    for epoch in range(epochs):
        perm = (np.random.default_rng((seed, epoch)) if order == "seed_epoch" else stream).permutation(n)
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            out.append(idx if order == "stream_unsorted" else np.sort(idx))
    return out


def _reference_fit(loss_fn, variables, images, labels, cfg):
    """A plain training loop: jit, a Python for loop, AdamW with the config's schedule."""
    steps = len(_reference_indices(len(images), cfg.batch_size, cfg.seed, 1, cfg.order))
    total = steps * cfg.epochs
    lr = cfg.learning_rate if cfg.schedule == "constant" else optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, total // 10 + 1), decay_steps=total)
    tx = optax.adamw(lr, weight_decay=cfg.weight_decay)
    params, model_state = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, model_state, opt_state, batch, k):
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), k)
        (_, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state

    for k, idx in enumerate(_reference_indices(len(images), cfg.batch_size, cfg.seed, cfg.epochs, cfg.order)):
        params, model_state, opt_state = step(params, model_state, opt_state,
                                              {"image": images[idx], "label": labels[idx]}, k)
    return jax.device_get({"params": params, "batch_stats": model_state})


_CASES = [("seed_epoch", 100, "warmup_cosine"),  # BCT
          ("stream", 100, "warmup_cosine"),  # the zoo
          ("stream", 20, "warmup_cosine"),  # the zoo, fewer examples than one batch
          ("stream_unsorted", 100, "constant")]  # the linear heads


def _toy_config(order, schedule="warmup_cosine", **kw):
    return train.TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2, warmup_steps=3, order=order,
                             schedule=schedule, seed=5, xla_cpu_defaults=True, log_seconds=np.inf, **kw)


@pytest.mark.parametrize("order,n", sorted({(o, n) for o, n, _ in _CASES}))
def test_batch_order_is_the_original_loops(order, n):
    want = _reference_indices(n, 32, 5, 3, order)
    got = [row for e in range(3) for row in train.epoch_batches(n, 32, 5, e, order)]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("order,n,schedule", [
    _CASES[0], _CASES[2],
    # The zoo's full batches are the resume test's, the heads' order and schedule test_heads.py's.
    pytest.param(*_CASES[1], marks=pytest.mark.slow), pytest.param(*_CASES[3], marks=pytest.mark.slow)])
def test_fit_follows_a_hand_written_loop(order, n, schedule):
    images, labels = _toy(n)
    net = _Net()
    variables = jax.device_get(net.init(jax.random.PRNGKey(0), images[:2].astype(np.float32)))
    cfg = _toy_config(order, schedule)
    lines = []
    got = train.fit(_toy_loss(net), variables, lambda i: {"image": images[i], "label": labels[i]}, n, cfg,
                    log=lines.append)
    assert len(lines) == 3 and all(f"epoch {e + 1}/3" in line for e, line in enumerate(lines)), lines
    want = _reference_fit(_toy_loss(net), variables, images, labels, cfg)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # The training moved the weights (a loop that skipped its updates would match a skipping reference).
    assert not np.array_equal(got["params"]["Dense_1"]["kernel"], variables["params"]["Dense_1"]["kernel"])


def test_interrupted_run_resumes_to_the_hand_written_loop_s_weights(tmp_path):
    """An exception mid-epoch (in-process stand-in for a kill; the SIGKILL test is in the whole tier)
    leaves the checkpoints; the rerun resumes from the newest and ends on the weights of the hand-written
    loop, uninterrupted, in the zoo's "stream" order, whose permutations depend on all the epochs before."""
    images, labels = _toy(100)
    net = _Net()
    variables = jax.device_get(net.init(jax.random.PRNGKey(0), images[:2].astype(np.float32)))
    cfg = _toy_config("stream", checkpoint_every=2)
    calls = []

    def get_batch(idx):
        calls.append(len(idx))
        if len(calls) == 8:  # step 8 of 9: epoch 3
            raise KeyboardInterrupt
        return {"image": images[idx], "label": labels[idx]}

    with pytest.raises(KeyboardInterrupt):
        train.fit(_toy_loss(net), variables, get_batch, 100, cfg, workdir=str(tmp_path / "run"),
                  fingerprint={"toy": 1})
    lines = []
    got = train.fit(_toy_loss(net), variables, get_batch, 100, cfg, workdir=str(tmp_path / "run"),
                    fingerprint={"toy": 1}, log=lines.append)
    assert "resuming from step 6/9" in lines[0], lines
    want = _reference_fit(_toy_loss(net), variables, images, labels, cfg)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # Another config never resumes these checkpoints.
    with pytest.raises(RuntimeError, match="different config"):
        train.fit(_toy_loss(net), variables, get_batch, 100, dataclasses.replace(cfg, seed=1),
                  workdir=str(tmp_path / "run"), fingerprint={"toy": 1})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="order must be one of"):
        train.TrainConfig(order="random")
    with pytest.raises(ValueError, match="schedule must be one of"):
        train.TrainConfig(schedule="linear")
    # Checkpoints of runs from before the order/schedule/limit fields keep their fingerprint.
    assert set(train.TrainConfig().fingerprint()) == {"epochs", "batch_size", "learning_rate", "weight_decay",
                                                      "warmup_steps", "seed", "checkpoint_every", "log_seconds"}


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


def test_the_loop_and_its_users_know_nothing_of_the_engine():
    """train.py imports only sharding and checkpoints from embjax; the zoo and the heads reach devices and
    checkpoints through it (and sharding), never through the engine."""
    import ast
    import pathlib

    root = pathlib.Path(train.__file__).parent

    def embjax_imports(name):
        found = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("embjax"):
                found |= {f"{node.module}.{a.name}" if node.module == "embjax" else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("embjax")}
        return found

    assert embjax_imports("train") == {"embjax.checkpoints", "embjax.sharding"}
    for name in ("zoo", "heads"):
        assert not {m for m in embjax_imports(name) if m.split(".")[1] in ("extract", "passes", "members")}, name
