"""Passes and their jitted step: what the engine (embjax.extract) runs for one batch, and the host merge of
per-device partial states. A `Pass` names its split, the outputs it needs and its accumulator; `make_step`
compiles one data-parallel step in which every device folds its own rows into its own partial state."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embjax import accumulator as accumulator_lib
from embjax.members import Member
from embjax.sharding import DATA_AXIS, compiler_options


# --------------------------------------------------------------------------------------------------
# Progress.


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

    def due(self) -> bool:
        """Whether the next `update` would print (the engine checks its flags then): on process 0 only."""
        if jax.process_index() != 0:
            return False
        return self._first is None or time.perf_counter() - self._last >= self.every_seconds

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


# --------------------------------------------------------------------------------------------------
# Passes and their jitted step.


@dataclasses.dataclass(frozen=True)
class Pass:
    """One streaming pass over a split (see the module docstring).

    outputs: member name -> output keys the pass needs (keys of the member's output dict).
    accumulator: an `embjax.accumulator.Accumulator` (or a dict of them) every batch is folded into; None
      for a pass that only fills the feature store. `outputs[member][key]` reach its update as float32
      with a leading batch axis, non-finite values replaced by 0; `batch` holds "image", "label", "mask"
      (False on padding rows) and "index". Every device folds its own shard of each batch into its own
      partial state (no cross-device reduction per batch); the partials are merged on the host in float64
      with the accumulator's merge only at checkpoints and at the end of the pass.
    aux: arrays the update reads (maps, heads, standardization), passed to the jitted step as an argument.
    store: feature-store entries to keep, name -> dtype ("float32", "float16", "int8"). An entry
      "member/key" is that output flattened to (batch, -1) unless `emit` computes it.
    emit: optional `(outputs, batch, aux) -> {entry: (batch, ...) array}` for derived entries.
    dataset: the dataset's name, for the store's manifest.
    """

    name: str
    source: Any
    split: str
    outputs: Mapping[str, Sequence[str]]
    accumulator: Any = None
    aux: Any = None
    store: Mapping[str, str] = dataclasses.field(default_factory=dict)
    emit: Callable[[dict, dict, Any], dict] | None = None
    dataset: str = ""


# The accumulator of a pass that only fills the feature store: nothing to fold.
_NOTHING = accumulator_lib.Accumulator(empty=dict, update=lambda s, outputs, batch, aux: s, merge=lambda a, b: a)


def _accumulator(p: Pass) -> accumulator_lib.Accumulator:
    return _NOTHING if p.accumulator is None else accumulator_lib.collect(p.accumulator)


class NonFiniteFeatures(ValueError):
    """A backbone produced NaN or inf outputs on real images."""


def _needed(members: Sequence[Member], p: Pass) -> list[Member]:
    known = {m.name for m in members}
    unknown = [n for n in p.outputs if n not in known]
    if unknown:
        raise ValueError(f"pass '{p.name}' asks for outputs of {unknown}, which are not members of this run "
                         f"({', '.join(sorted(known))})")
    return [m for m in members if m.name in p.outputs]


def _emit_default(p: Pass) -> Callable[[dict, dict, Any], dict]:
    def emit(outputs, batch, aux):
        out = {}
        for entry in p.store:
            member, _, key = entry.partition("/")
            if member not in outputs or key not in outputs[member]:
                raise ValueError(f"pass '{p.name}': store entry '{entry}' is not 'member/key' of an output "
                                 f"the pass asks for ({ {m: list(k) for m, k in p.outputs.items()} })")
            x = outputs[member][key]
            out[entry] = x.reshape(x.shape[0], -1)
        return out

    return emit


def make_step(members: Sequence[Member], p: Pass, mesh: Mesh, precision: str | None = "float32"):
    """The jitted `(state, flags, variables, aux, batch) -> (state, flags, emitted)` of pass `p`.

    `variables` are those of the members the pass needs, in member order. `state` and `flags` carry a
    leading device axis sharded over the mesh: each device folds only its own rows into its own partial
    state and flags (whether any real row had a non-finite output, per member), so the step has no
    cross-device reduction. `precision` is the matmul and convolution precision every dot of the step is
    traced with: "float32" means float32 arithmetic on every backend (not TF32 on NVIDIA GPUs, nor
    one-pass bfloat16 on TPUs); None leaves XLA's default (bfloat16 runs).
    """
    needed = _needed(members, p)
    emit = p.emit or (_emit_default(p) if p.store else None)
    acc = _accumulator(p)
    sharded = NamedSharding(mesh, P(DATA_AXIS))

    def body(state, flags, variables, aux, batch):
        mask = batch["mask"]
        outputs, bad = {}, []
        for member, v in zip(needed, variables):
            out = member.apply(v, batch["image"])
            chosen, member_bad = {}, jnp.zeros((), bool)
            for key in p.outputs[member.name]:
                if key not in out:
                    raise KeyError(f"{member.name} has no output '{key}' (pass '{p.name}'); it returns "
                                   f"{', '.join(sorted(out))}")
                x = out[key].astype(jnp.float32)
                finite = jnp.isfinite(x)
                row_ok = jnp.all(finite.reshape(x.shape[0], -1), axis=1)
                member_bad = member_bad | jnp.any(~row_ok & mask)
                chosen[key] = jnp.where(finite, x, 0.0)
            outputs[member.name] = chosen
            bad.append(member_bad)
        state = acc.update(state, outputs, batch, aux)
        emitted = emit(outputs, batch, aux) if emit is not None else {}
        return state, flags | jnp.stack(bad), emitted

    def local(state, flags, variables, aux, batch):  # one device: its partial state and its rows
        squeeze = functools.partial(jax.tree.map, lambda x: x[0])
        if precision is None:
            state, flag, emitted = body(squeeze(state), flags[0], variables, aux, batch)
        else:
            with jax.default_matmul_precision(precision):
                state, flag, emitted = body(squeeze(state), flags[0], variables, aux, batch)
        return jax.tree.map(lambda x: x[None], state), flag[None], emitted

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P(), P(DATA_AXIS)),
                           out_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)), check_vma=False)
    return jax.jit(mapped, donate_argnums=0, out_shardings=(sharded, sharded, sharded),
                   compiler_options=compiler_options(mesh))


def merge_partials(states: Sequence[Any], merge: Callable[[Any, Any], Any]) -> Any:
    """Merge partial accumulators pairwise (a balanced tree: log2(k) merges deep) in float64 on the
    host CPU, returned in the dtypes of the first state. Floating leaves are merged in float64 whatever
    their dtype, so thousands of merges of float32 partials lose no more than one float32 rounding."""
    states = list(states)
    if not states:
        raise ValueError("merge_partials needs at least one state")
    dtypes = jax.tree.map(lambda x: np.asarray(x).dtype, states[0])
    if len(states) == 1:
        return jax.tree.map(np.asarray, states[0])
    wide = [jax.tree.map(lambda x: np.asarray(x, np.float64) if np.issubdtype(np.asarray(x).dtype, np.floating)
                         else np.asarray(x), s) for s in states]
    with jax.enable_x64(True), jax.default_device(jax.local_devices(backend="cpu")[0]):
        merge64 = jax.jit(merge)
        while len(wide) > 1:
            nxt = [merge64(wide[i], wide[i + 1]) for i in range(0, len(wide) - 1, 2)]
            if len(wide) % 2:
                nxt.append(wide[-1])
            wide = nxt
        merged = jax.device_get(wide[0])
    return jax.tree.map(lambda x, dt: np.asarray(x).astype(dt), merged, dtypes)


# --------------------------------------------------------------------------------------------------
# The engine.
