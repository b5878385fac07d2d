"""The one resumable training loop of embjax: optax, data-parallel over a device mesh, orbax checkpoints.

It serves every model training of embjax: the zoo (embjax.zoo), the linear heads on frozen features
(embjax.heads) and backward-compatible training (embjax.bct's losses). It owns what they all need and
nothing model-specific: the train state (step, params, model state such as BatchNorm statistics,
optimizer state), one jitted pure train step with the batch sharded over the mesh's "data" axis
(`NamedSharding`; XLA inserts the gradient all-reduce), a batch order fixed by the seed and the epoch
alone, a checkpoint every K steps, progress lines and a non-finite-loss check at log intervals and epoch
ends (the host does not wait on the device after every step).

Resuming: the state is saved with orbax (written to a temporary directory and renamed, so a process
killed at any moment leaves a complete checkpoint) together with its step number. A restarted `fit`
restores the latest checkpoint and continues at that step; since the batch of step s depends only on
(seed, s) and the step function is deterministic, the final weights equal those of an uninterrupted
run (bit for bit on CPU). A finished run's last checkpoint is its result: calling `fit` again returns it
without training. Without a `workdir` nothing is saved and nothing resumes.

The model enters only through `loss_fn(params, model_state, batch, rng) -> (loss, (model_state,
metrics))`, e.g. `embjax.bct.make_loss`. The loop knows devices through embjax.sharding and
checkpoints through embjax.checkpoints, and nothing of the engine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embjax import checkpoints as checkpoints_lib
from embjax import sharding

# Batch orders (TrainConfig.order). Each gives every epoch's permutation of the examples from the seed
# and the epoch number alone, so a resumed run replays the same batches.
#   "seed_epoch":       a permutation drawn from a generator seeded with (seed, epoch); each batch's
#                       indices ascending (sequential reads from memory-mapped sources).
#   "stream":           one generator seeded with `seed` drawing one permutation per epoch in turn (epoch
#                       e's is its (e+1)-th draw); each batch's indices ascending. The zoo's order.
#   "stream_unsorted":  the same permutations, each batch's indices in drawn order. The linear heads' order.
ORDERS = ("seed_epoch", "stream", "stream_unsorted")
SCHEDULES = ("warmup_cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that fixes a training run's weights, and how often it checkpoints and logs."""

    epochs: int = 1
    batch_size: int = 128  # global, over all devices and processes
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    # "warmup_cosine": linear warm-up for `warmup_steps` (capped at a tenth of the run, plus one), then
    # cosine decay to 0. "constant": `learning_rate` throughout (warmup_steps unused).
    schedule: str = "warmup_cosine"
    warmup_steps: int = 100
    order: str = "seed_epoch"  # see ORDERS
    seed: int = 0
    # Train on the first `limit` examples (0: all of them).
    limit: int = 0
    # Compile the step with XLA's default CPU options rather than the engine's (sharding.compiler_options).
    # The two round convolutions differently (10 steps of zoo_resnet_v1 on 300 images end with weights up
    # to 1e-2 apart); the zoo's and the linear heads' weights have always been trained with the defaults,
    # so those trainings keep them.
    xla_cpu_defaults: bool = False
    checkpoint_every: int = 200  # steps
    # A progress line at the first step and then at most this often, and at the end of every epoch
    # (inf: at epoch ends only).
    log_seconds: float = 10.0

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"train: order must be one of {ORDERS}, got {self.order!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1:
            raise ValueError(f"train: epochs must be at least 1, got {self.epochs}")
        if self.checkpoint_every < 1:
            raise ValueError(f"train: checkpoint_every must be at least 1, got {self.checkpoint_every}")

    def fingerprint(self) -> dict:
        """The fields as a dict for checkpoint fingerprints, leaving out those added after the first
        release while they hold their defaults (so existing checkpoints keep resuming)."""
        d = dataclasses.asdict(self)
        for k in ("schedule", "order", "limit", "xla_cpu_defaults"):
            if d[k] == _DEFAULTS[k]:
                d.pop(k)
        return d


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def checkpoint_dir(root: str, label: str, fingerprint: Any) -> str:
    """`root/train/<label>-<hash of fingerprint>`: one directory per distinct training, so a changed
    config never resumes another run's checkpoints."""
    return os.path.join(root, "train", f"{label}-{checkpoints_lib.config_fingerprint(fingerprint)[:12]}")


def steps_per_epoch(num_examples: int, batch_size: int, order: str = "seed_epoch") -> int:
    """Full batches per epoch: the remainder of each epoch's permutation is left out (a different
    remainder every epoch), so every step has the same shape and no padding. With the "stream" orders
    fewer examples than one batch make one batch of all of them (the zoo's and the heads' rule)."""
    if batch_size <= 0:
        raise ValueError(f"train: batch_size must be positive, got {batch_size}")
    steps = num_examples // batch_size
    if steps == 0:
        if order != "seed_epoch" and num_examples > 0:
            return 1
        raise ValueError(f"train: {num_examples} training examples do not fill one batch of {batch_size}; "
                         "lower batch_size")
    return steps


class BatchOrder:
    """Every epoch's (steps, batch) example indices under one of ORDERS. Epochs asked in increasing order
    cost one permutation each (the "stream" orders keep their generator between calls)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, order: str = "seed_epoch"):
        if order not in ORDERS:
            raise ValueError(f"train: order must be one of {ORDERS}, got {order!r}")
        self.n, self.order, self.seed = int(num_examples), order, int(seed)
        self.steps = steps_per_epoch(self.n, batch_size, order)
        self.batch = min(int(batch_size), self.n)
        self._stream, self._drawn = None, 0  # the stream generator and how many permutations it drew

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.order == "seed_epoch":
            return np.random.default_rng((self.seed, int(epoch))).permutation(self.n)
        if self._stream is None or self._drawn > epoch:
            self._stream, self._drawn = np.random.default_rng(self.seed), 0
        while True:
            perm = self._stream.permutation(self.n)
            self._drawn += 1
            if self._drawn == epoch + 1:
                return perm

    def epoch(self, epoch: int) -> np.ndarray:
        batches = self._permutation(epoch)[: self.steps * self.batch].reshape(self.steps, self.batch)
        return batches if self.order == "stream_unsorted" else np.sort(batches, axis=1)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int,
                  order: str = "seed_epoch") -> np.ndarray:
    """(steps, batch_size) example indices of one epoch, determined by (seed, epoch) alone."""
    return BatchOrder(num_examples, batch_size, seed, order).epoch(epoch)


def optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the config's schedule."""
    if cfg.schedule == "constant":
        return optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, total_steps // 10 + 1),
        decay_steps=max(total_steps, 1))
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def init_state(variables: Mapping[str, Any], tx: optax.GradientTransformation) -> dict:
    params = variables["params"]
    return {"step": np.zeros((), np.int32), "params": params,
            "model_state": variables.get("batch_stats", {}), "opt_state": tx.init(params)}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
                    xla_cpu_defaults: bool = False):
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

    options = None if xla_cpu_defaults else sharding.compiler_options(mesh)
    return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated), compiler_options=options)


def _is_local(mesh: Mesh) -> bool:
    """Whether every device of the mesh belongs to this process (each process then trains on its own)."""
    return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def _process_rows(indices: np.ndarray, mesh: Mesh) -> np.ndarray:
    """This process's contiguous share of a global batch's indices (all of them on a process-local mesh)."""
    if _is_local(mesh):
        return indices
    count, index = jax.process_count(), jax.process_index()
    return indices.reshape(count, -1)[index]


def fit(loss_fn: Callable, variables: Mapping[str, Any], get_batch: Callable[[np.ndarray], dict],
        num_examples: int, cfg: TrainConfig, *, workdir: str | None = None, fingerprint: Any = None,
        name: str = "train", mesh: Mesh | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train from `variables` ({"params", optional "batch_stats"}) and return the trained variables as
    NumPy arrays.

    `get_batch(indices)` returns a dict of arrays with leading axis len(indices) (this process's rows
    of the step's batch; at least what `loss_fn` reads). Checkpoints go to `workdir` (None: none, and
    no resume); `fingerprint` (JSON-able, e.g. the study config of this model) keeps a checkpoint from
    resuming another run. `mesh` defaults to every device of every process; a mesh of this process's
    devices only trains on this process alone (every process then reads whole batches).
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()
    log = log or (lambda line: print(line, file=sys.stdout, flush=True))
    if cfg.limit:
        num_examples = min(num_examples, cfg.limit)
    order = BatchOrder(num_examples, cfg.batch_size, cfg.seed, cfg.order)
    sharding.check_batch_size(order.batch, mesh)
    if not _is_local(mesh) and order.batch % jax.process_count():
        raise ValueError(f"train: batch_size {order.batch} is not divisible by the "
                         f"{jax.process_count()} processes")
    per_epoch = order.steps
    total = per_epoch * cfg.epochs
    tx = optimizer(cfg, total)
    state = sharding.replicate(init_state(variables, tx), mesh)
    checkpoints = None
    start = 0
    if workdir is not None:
        checkpoints = checkpoints_lib.Checkpoints(workdir, checkpoints_lib.config_fingerprint(
            {"fingerprint": fingerprint, "train": cfg.fingerprint(), "num_examples": num_examples}))
        start = checkpoints.latest() or 0
    try:
        if start:
            state, _ = checkpoints.restore(start, state)
            if start > total:
                raise RuntimeError(f"[{name}] checkpoint step {start} in {workdir} is past this run's {total} "
                                   "steps; use another workdir")
            log(f"[{name}] reusing the finished run in {workdir}" if start == total else
                f"[{name}] resuming from step {start}/{total} ({workdir})")
        if start < total:
            step_fn = make_train_step(loss_fn, tx, mesh, cfg.seed, cfg.xla_cpu_defaults)
            state = _steps(step_fn, state, range(start, total), order, get_batch, mesh, cfg, checkpoints, name, log)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    return _variables(state)


def _steps(step_fn, state, steps: range, order: BatchOrder, get_batch, mesh: Mesh, cfg: TrainConfig,
           checkpoints, name: str, log: Callable[[str], None]):
    """Runs `steps` of the loop from `state`: checkpoints, progress lines and the non-finite check."""
    total = steps.stop
    pending: list[dict] = []
    t_start, s_timed, last_log = time.perf_counter(), None, -math.inf
    for s in steps:
        epoch, i = divmod(s, order.steps)
        if i == 0 or s == steps.start:
            batches = order.epoch(epoch)
        batch = sharding.shard_batch(get_batch(_process_rows(batches[i], mesh)), mesh)
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        # Bound how far the host runs ahead of the devices (batches queued in memory), without a sync
        # on the step just dispatched.
        if len(pending) > 2:
            jax.block_until_ready(pending[-3])
        done = s + 1
        if checkpoints is not None and (done % cfg.checkpoint_every == 0 or done == total):
            checkpoints.save(done, state, {"step": done, "name": name})
        now = time.perf_counter()
        if done % order.steps == 0 or (math.isfinite(cfg.log_seconds) and now - last_log >= cfg.log_seconds):
            values = {k: float(np.mean(v)) for k, v in
                      jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(pending)).items()}
            since, pending = done - len(pending), []
            if not all(np.isfinite(v) for v in values.values()):
                raise FloatingPointError(
                    f"[{name}] non-finite training metrics {values} between steps {since} and "
                    f"{done}; lower the learning rate or check the inputs")
            now = time.perf_counter()  # after the device caught up: rates count finished steps
            if s_timed is None:
                s_timed, t_timed = done, now  # rates from the first logged step on: compilation excluded
                rate = ""
            else:
                per_step = (now - t_timed) / max(done - s_timed, 1)
                rate = f"  {order.batch / per_step:,.0f} img/s  ETA {(total - done) * per_step:,.0f} s"
            text = "  ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
            log(f"[{name}] epoch {epoch + 1}/{cfg.epochs}  step {done}/{total}  {text}{rate}  "
                f"({now - t_start:.0f} s)")
            last_log = now
    return state


def _variables(state) -> dict:
    host = jax.device_get({"params": state["params"], "batch_stats": state["model_state"]})
    if not jax.tree.leaves(host["batch_stats"]):
        host.pop("batch_stats")
    return host
