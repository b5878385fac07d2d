"""The streaming engine: the one place in embjax that knows about devices, hosts and checkpoints.

It runs several backbones on every batch in one jitted step, data-parallel over all devices of all
processes (a 1-D `jax.sharding.Mesh` named "data"; batches are sharded on their leading axis, models and
accumulators replicated, and XLA inserts the cross-device reductions of `stats.update` /
`evaluate.update`). One pass over the fit split folds features into the joint `stats` accumulator, one
pass over the evaluation split folds mapped predictions into `evaluate` accumulators.

Resumability: `Stream` checkpoints its accumulator pytree with orbax every `checkpoint_every` batches,
together with the number of batches already folded in. Orbax writes each checkpoint to a temporary
directory and renames it, so a process killed at any moment (kill -9 included) leaves either the previous
checkpoint or the new one, never a half-written one. A restarted run restores the latest checkpoint and
skips exactly the batches it already holds, so no sample is counted twice or missed, and because the fold
order is the same the result equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embjax import evaluate, stats

DATA_AXIS = "data"


# --------------------------------------------------------------------------------------------------
# Members: one backbone with its preprocessing, variables and the head used for evaluation.


@dataclasses.dataclass
class Member:
    """One backbone of a study.

    `apply(variables, images_uint8)` must return the model's output dict (with `pre_logits` and
    `logits`); it includes the model's own preprocessing so that resizing and scaling run on device
    inside the jitted step. `head` is the `(kernel (d, classes), bias (classes,))` used to score
    features against labels; `extra_heads` are further heads (e.g. the original ImageNet classifier of
    a backbone evaluated on another dataset) scored for agreement.
    """

    name: str
    apply: Callable[[Any, jax.Array], dict]
    variables: Any
    feature_dim: int
    head: tuple[Any, Any] | None = None
    extra_heads: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)


def find_head(variables, feature_dim: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The classifier `(kernel, bias)` inside a backbone's params: the one 2-D kernel of shape
    (feature_dim, num_classes) (convolution kernels are 4-D, so the match is unique in a CNN)."""
    found = []

    def visit(path, tree):
        if isinstance(tree, dict) or hasattr(tree, "items"):
            if "kernel" in tree and getattr(tree["kernel"], "shape", None) == (feature_dim, num_classes):
                found.append((path, tree))
            for k, v in tree.items():
                visit(path + (k,), v)

    visit((), variables["params"])
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one classifier kernel of shape ({feature_dim}, {num_classes}) in the "
            f"params, found {len(found)}: {['/'.join(p) for p, _ in found]}")
    path, leaf = found[0]
    if "bias" not in leaf:
        raise ValueError(f"classifier {'/'.join(path)} has no bias")
    return np.asarray(leaf["kernel"]), np.asarray(leaf["bias"])


# --------------------------------------------------------------------------------------------------
# Devices and hosts.


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    """Place a pytree fully replicated on the mesh (models, maps, heads, accumulators)."""
    sharding = NamedSharding(mesh, P())
    # Through a host copy, so that leaves sharing one buffer (e.g. zeros reused in an init) get
    # buffers of their own and can be donated.
    return jax.tree.map(lambda x: jax.device_put(np.array(x), sharding), tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded on the leading (batch) axis."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n}")


# --------------------------------------------------------------------------------------------------
# The jitted steps.

# XLA:CPU (jaxlib 0.10) hands convolutions and their elementwise neighbours to YNNPACK fusions by
# default. With those off, convolutions run on XLA's Eigen kernels and 1x1 convolutions become dots,
# which benchmarks/extract_throughput.py measured faster on this project's CPUs for every backbone it
# times (ResNet-50 and EfficientNet-Lite0; figures in benchmarks/RESULTS.md). Set
# EMBJAX_XLA_CPU_DEFAULTS=1 to compile with XLA's defaults instead.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's CPU compiler knows the options (an unknown option is a compile error)."""
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(dict(CPU_COMPILER_OPTIONS))
        return True
    except Exception:  # noqa: BLE001  (any failure means: compile with the defaults)
        return False


def compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    """The XLA options the engine's steps are compiled with on `mesh`'s platform (None: defaults)."""
    if mesh.devices.flat[0].platform != "cpu" or os.environ.get("EMBJAX_XLA_CPU_DEFAULTS", "") not in ("", "0"):
        return None
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_supported() else None


def forward(members: Sequence[Member], variables: Sequence[Any], images: jax.Array):
    """Every member on one batch: lists of pre-logit features (float32) and logits."""
    feats, logits = [], []
    for member, v in zip(members, variables):
        out = member.apply(v, images)
        feats.append(out["pre_logits"].astype(jnp.float32))
        logits.append(out["logits"].astype(jnp.float32))
    return feats, logits


def check_finite(feats: Sequence[jax.Array], mask: jax.Array) -> jax.Array:
    """Per member, whether any real (unmasked) row has a non-finite feature."""
    return jnp.stack([jnp.any(~jnp.isfinite(f) & mask[:, None]) for f in feats])


def make_fit_step(members: Sequence[Member], mesh: Mesh, keep_features: bool = False):
    """(stats_state, variables, batch) -> (stats_state, nonfinite flags[, features])."""
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P(DATA_AXIS))

    def step(state, variables, batch):
        feats, _ = forward(members, variables, batch["image"])
        bad = check_finite(feats, batch["mask"])
        # NaN features would poison the accumulator; zero them here and report them on the host.
        feats = [jnp.where(jnp.isfinite(f), f, 0.0) for f in feats]
        state = stats.update(state, feats, batch["mask"])
        if keep_features:
            return state, bad, feats
        return state, bad

    out_shardings = (replicated, replicated) + ((sharded,) if keep_features else ())
    return jax.jit(step, donate_argnums=0, out_shardings=out_shardings,
                   compiler_options=compiler_options(mesh))


def make_eval_step(members: Sequence[Member], mesh: Mesh):
    """(eval_states, variables, heads, maps, batch) -> (eval_states, nonfinite flags).

    `eval_states`, `heads` and `maps` are dicts keyed by evaluation name (e.g. "affine", "logit",
    "naive", "imagenet_affine"); each entry is scored with its own heads and maps.
    """
    replicated = NamedSharding(mesh, P())

    def step(states, variables, heads, maps, batch):
        feats, _ = forward(members, variables, batch["image"])
        bad = check_finite(feats, batch["mask"])
        feats = [jnp.where(jnp.isfinite(f), f, 0.0) for f in feats]
        new = {k: evaluate.update(states[k], feats, heads[k], maps[k], batch["label"], batch["mask"])
               for k in states}
        return new, bad

    return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated),
                   compiler_options=compiler_options(mesh))


class NonFiniteFeatures(ValueError):
    """A backbone produced NaN or inf features on real images."""


def raise_if_nonfinite(bad, members: Sequence[Member], split: str, batch_index: int) -> None:
    bad = np.asarray(bad)
    if bad.any():
        names = [m.name for m, b in zip(members, bad) if b]
        raise NonFiniteFeatures(
            f"non-finite (NaN/inf) features from {', '.join(names)} on split '{split}', batch "
            f"{batch_index}; check the weights and preprocessing of these models (a corrupted "
            f"checkpoint or a bfloat16 overflow are the usual causes)")


# --------------------------------------------------------------------------------------------------
# Checkpointed streaming.


def config_fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able config: a checkpoint only resumes the run that made it."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Checkpoints:
    """Orbax checkpoints of the accumulators of one run, in `directory`, tagged by a fingerprint."""

    def __init__(self, directory: str, fingerprint: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.fingerprint = fingerprint
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                                 create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, step: int, like) -> tuple[Any, dict]:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        try:
            restored = self.manager.restore(step, args=self._ocp.args.Composite(
                state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises several types for a damaged checkpoint
            raise RuntimeError(
                f"could not restore checkpoint {step} in {self.directory}: {e}. Delete that step's "
                f"directory to resume from the previous checkpoint, or the whole directory to start "
                f"over") from e
        meta = restored["meta"]
        if meta.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"checkpoint {step} in {self.directory} was written by a run with a different config "
                f"(fingerprint {meta.get('fingerprint')} != {self.fingerprint}); use another workdir or "
                f"delete this one")
        return restored["state"], meta

    def save(self, step: int, state, meta: dict) -> None:
        meta = dict(meta, fingerprint=self.fingerprint)
        self.manager.save(step, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


@dataclasses.dataclass
class Progress:
    """Prints images/s and ETA for a pass, on process 0 only."""

    label: str
    total_batches: int
    batch_size: int
    every_seconds: float = 10.0
    stream: Any = sys.stdout

    def __post_init__(self):
        self._first: tuple[float, int] | None = None  # (time, batches) when timing started
        self._last = -float("inf")

    def update(self, batches_done: int, force: bool = False) -> None:
        if jax.process_index() != 0:
            return
        now = time.perf_counter()
        if self._first is None:
            # Rates are measured from the first finished batch on, so compilation does not count.
            self._first = (now, batches_done)
            print(f"[{self.label}] batch {batches_done}/{self.total_batches} (compiled)", file=self.stream,
                  flush=True)
            self._last = now
            return
        if not force and now - self._last < self.every_seconds:
            return
        self._last = now
        counted = batches_done - self._first[1]
        elapsed = now - self._first[0]
        if counted <= 0 or elapsed <= 0:
            return
        rate = counted * self.batch_size / elapsed
        eta = (self.total_batches - batches_done) * self.batch_size / rate
        print(f"[{self.label}] batch {batches_done}/{self.total_batches}  {rate:,.1f} img/s  "
              f"ETA {eta:,.0f} s", file=self.stream, flush=True)


_BATCHES_FOLDED = [0]


def run_stream(step: Callable, state, batches: Iterator[dict], *, mesh: Mesh, total_batches: int,
               start_batch: int, label: str, batch_size: int, checkpoints: Checkpoints | None = None,
               checkpoint_every: int = 0, step_offset: int = 0, meta: dict | None = None,
               on_output: Callable[[int, Any], None] | None = None,
               members: Sequence[Member] = (), split: str = "") -> Any:
    """Fold batches `start_batch .. total_batches-1` into `state` with `step(state, batch)`.

    Checkpoint step numbers are `step_offset + batches done`, so several passes of one run share a
    single increasing sequence. `on_output(batch_index, extra_outputs)` receives whatever the step
    returns beyond (state, nonfinite flags), e.g. features to write to disk.
    """
    progress = Progress(label, total_batches, batch_size)
    kill_after = int(os.environ.get("EMBJAX_TEST_KILL_AFTER_BATCHES", "0"))
    for b, batch in enumerate(batches, start=start_batch):
        # Fault injection for the resume tests: SIGKILL (as kill -9 would) after that many batches
        # folded in by this process, over all passes.
        if kill_after and _BATCHES_FOLDED[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        _BATCHES_FOLDED[0] += 1
        out = step(state, shard_batch(batch, mesh))
        state, bad = out[0], out[1]
        raise_if_nonfinite(bad, members, split, b)
        if on_output is not None:
            on_output(b, batch, out[2:])
        done = b + 1
        if checkpoints is not None and checkpoint_every and (done % checkpoint_every == 0) \
                and done < total_batches:
            checkpoints.save(step_offset + done, state, dict(meta or {}, label=label, batches_done=done))
        progress.update(done)
    if total_batches > start_batch:
        progress.update(total_batches, force=True)
    return state
