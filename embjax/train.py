"""A small resumable training loop: optax, data-parallel over a device mesh, orbax checkpoints.

It owns what every model training in embjax needs and nothing model-specific: the train state
(step, params, model state such as BatchNorm statistics, optimizer state), one jitted pure train step
with the batch sharded over the mesh's "data" axis (`NamedSharding`; XLA inserts the gradient
all-reduce), a batch order fixed by (seed, epoch) alone, a checkpoint every K steps, progress lines and
a non-finite-loss check at log intervals (the host does not wait on the device after every step).

Resuming: the state is saved with orbax (written to a temporary directory and renamed, so a process
killed at any moment leaves a complete checkpoint) together with its step number. A restarted `fit`
restores the latest checkpoint and continues at that step; since the batch of step s depends only on
(seed, s) and the step function is deterministic, the final weights equal those of an uninterrupted
run (bit for bit on CPU). A finished run's last checkpoint is its result: calling `fit` again returns it
without training.

The model enters only through `loss_fn(params, model_state, batch, rng) -> (loss, (model_state,
metrics))`, e.g. `embjax.bct.make_loss`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embjax import checkpoints as checkpoints_lib
from embjax import sharding


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    # Linear warm-up steps, capped at a tenth of the run (plus one), then cosine decay to 0.
    warmup_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 200  # steps
    log_seconds: float = 10.0


def checkpoint_dir(root: str, label: str, fingerprint: Any) -> str:
    """`root/train/<label>-<hash of fingerprint>`: one directory per distinct training, so a changed
    config never resumes another run's checkpoints."""
    import os

    return os.path.join(root, "train", f"{label}-{checkpoints_lib.config_fingerprint(fingerprint)[:12]}")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch: the remainder of each epoch's permutation is left out (a different
    remainder every epoch), so every step has the same shape and no padding."""
    if batch_size <= 0:
        raise ValueError(f"train: batch_size must be positive, got {batch_size}")
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"train: {num_examples} training examples do not fill one batch of {batch_size}; "
                         "lower batch_size")
    return steps


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, batch_size) example indices of one epoch, determined by (seed, epoch) alone; each batch's
    indices ascending (sequential reads from memory-mapped sources)."""
    steps = steps_per_epoch(num_examples, batch_size)
    perm = np.random.default_rng((int(seed), int(epoch))).permutation(num_examples)
    return np.sort(perm[: steps * batch_size].reshape(steps, batch_size), axis=1)


def optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay (the zoo's schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, total_steps // 10 + 1),
        decay_steps=max(total_steps, 1))
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def init_state(variables: Mapping[str, Any], tx: optax.GradientTransformation) -> dict:
    params = variables["params"]
    return {"step": np.zeros((), np.int32), "params": params,
            "model_state": variables.get("batch_stats", {}), "opt_state": tx.init(params)}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh, seed: int):
    """(state, batch) -> (state, metrics), jitted: state replicated, batch sharded on its leading axis.
    The loss sees rng = fold_in(key(seed), step), so a resumed step draws the same randomness."""
    replicated = NamedSharding(mesh, P())
    base = jax.random.PRNGKey(seed)

    def step(state, batch):
        rng = jax.random.fold_in(base, state["step"])
        (loss, (model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["model_state"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "model_state": model_state, "opt_state": opt_state}
        return new, dict(metrics, loss=loss)

    return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated),
                   compiler_options=sharding.compiler_options(mesh))


def _process_rows(indices: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch's indices."""
    count, index = jax.process_count(), jax.process_index()
    return indices.reshape(count, -1)[index]


def fit(loss_fn: Callable, variables: Mapping[str, Any], get_batch: Callable[[np.ndarray], dict],
        num_examples: int, cfg: TrainConfig, *, workdir: str, fingerprint: Any, name: str = "train",
        mesh: Mesh | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train from `variables` ({"params", optional "batch_stats"}) and return the trained variables as
    NumPy arrays.

    `get_batch(indices)` returns a dict of arrays with leading axis len(indices) (this process's rows
    of the step's batch; at least what `loss_fn` reads). Checkpoints go to `workdir`; `fingerprint`
    (JSON-able, e.g. the study config of this model) keeps a checkpoint from resuming another run.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()
    log = log or (lambda line: print(line, file=sys.stdout, flush=True))
    sharding.check_batch_size(cfg.batch_size, mesh)
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"train: batch_size {cfg.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    per_epoch = steps_per_epoch(num_examples, cfg.batch_size)
    total = per_epoch * cfg.epochs
    tx = optimizer(cfg, total)
    state = sharding.replicate(init_state(variables, tx), mesh)
    checkpoints = checkpoints_lib.Checkpoints(workdir, checkpoints_lib.config_fingerprint(
        {"fingerprint": fingerprint, "train": dataclasses.asdict(cfg), "num_examples": num_examples}))
    start = checkpoints.latest() or 0
    if start:
        state, _ = checkpoints.restore(start, state)
        if start < total:
            log(f"[{name}] resuming from step {start}/{total} ({workdir})")
    if start >= total:
        if start > total:
            raise RuntimeError(f"[{name}] checkpoint step {start} in {workdir} is past this run's {total} steps; "
                               "use another workdir")
        log(f"[{name}] reusing the finished run in {workdir}")
        checkpoints.close()
        return _variables(state)

    step_fn = make_train_step(loss_fn, tx, mesh, cfg.seed)
    pending: list[dict] = []
    t_start, s_timed, last_log = time.perf_counter(), None, -float("inf")
    order, order_epoch = None, -1
    for s in range(start, total):
        epoch, i = divmod(s, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_batches(num_examples, cfg.batch_size, cfg.seed, epoch), epoch
        batch = sharding.shard_batch(get_batch(_process_rows(order[i])), mesh)
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        # Bound how far the host runs ahead of the devices (batches queued in memory), without a sync
        # on the step just dispatched.
        if len(pending) > 2:
            jax.block_until_ready(pending[-3])
        done = s + 1
        if done % cfg.checkpoint_every == 0 or done == total:
            checkpoints.save(done, state, {"step": done, "name": name})
        now = time.perf_counter()
        if done == total or now - last_log >= cfg.log_seconds:
            values = {k: float(np.mean(v)) for k, v in
                      jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(pending)).items()}
            since, pending = done - len(pending), []
            if not all(np.isfinite(v) for v in values.values()):
                checkpoints.close()
                raise FloatingPointError(
                    f"[{name}] non-finite training metrics {values} between steps {since} and "
                    f"{done}; lower the learning rate or check the inputs")
            now = time.perf_counter()  # after the device caught up: rates count finished steps
            if s_timed is None:
                s_timed, t_timed = done, now  # rates from the first logged step on: compilation excluded
                rate = ""
            else:
                per_step = (now - t_timed) / max(done - s_timed, 1)
                rate = f"  {cfg.batch_size / per_step:,.0f} img/s  ETA {(total - done) * per_step:,.0f} s"
            text = "  ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
            log(f"[{name}] epoch {epoch + 1}/{cfg.epochs}  step {done}/{total}  {text}{rate}  "
                f"({now - t_start:.0f} s)")
            last_log = now
    checkpoints.close()
    return _variables(state)


def _variables(state) -> dict:
    host = jax.device_get({"params": state["params"], "batch_stats": state["model_state"]})
    if not jax.tree.leaves(host["batch_stats"]):
        host.pop("batch_stats")
    return host
