"""One object per streaming accumulator (the clu metric pattern): empty / update / merge / compute.

A pass of the engine (embjax.extract) folds every batch into an accumulator. The object carries the
four parts together, so a pass cannot be given a state without the merge that combines it across
devices and hosts:

    empty()                               the state before any row (a pytree of arrays)
    update(state, outputs, batch, aux)    the state with one batch folded in; pure, jitted by the engine.
                                          `outputs[member][key]` are the models' outputs, `batch` holds
                                          "image", "label", "mask" (False on padding rows, which must get
                                          no weight) and "index"; `aux` the pass's read-only arrays
    merge(a, b)                           the state of the union of the rows behind `a` and `b`
                                          (associative: batches, devices and hosts merge alike)
    compute(state)                        the numbers the state stands for

Each statistic module builds its own (`stats.accumulator`, `moments.accumulator`,
`evaluate.accumulator`, `verification.accumulator`, `retrieval.accumulator`, `bct.class_sums`), taking a
`read(outputs, batch, aux)` that picks the arrays its update needs; the module applies the batch's mask
itself. `collect` makes one accumulator of a dict of them; `count` and `sums` cover row counts and
masked sums. Pure: no device, file or model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp


def _identity(state):
    return state


@dataclasses.dataclass(frozen=True)
class Accumulator:
    """A streaming accumulator; see the module docstring. `merge` has no default on purpose."""

    empty: Callable[[], Any]
    update: Callable[[Any, Mapping, Mapping, Any], Any]
    merge: Callable[[Any, Any], Any]
    compute: Callable[[Any], Any] = _identity


def collect(accumulators: "Accumulator | Mapping[str, Accumulator]") -> Accumulator:
    """One accumulator from one or a dict of them (state, merge and compute per key)."""
    if isinstance(accumulators, Accumulator):
        return accumulators
    if not isinstance(accumulators, Mapping) or not all(isinstance(a, Accumulator) for a in accumulators.values()):
        raise TypeError("a pass's accumulator must be an embjax.accumulator.Accumulator or a dict of them, got "
                        f"{type(accumulators).__name__}")
    accs = dict(accumulators)
    return Accumulator(
        empty=lambda: {k: a.empty() for k, a in accs.items()},
        update=lambda s, outputs, batch, aux: {k: a.update(s[k], outputs, batch, aux) for k, a in accs.items()},
        merge=lambda x, y: {k: a.merge(x[k], y[k]) for k, a in accs.items()},
        compute=lambda s: {k: a.compute(s[k]) for k, a in accs.items()})


def sums(read: Callable[[Mapping, Mapping, Any], Any], like: Any) -> Accumulator:
    """Sums over real rows of per-row values: `read(outputs, batch, aux)` gives a pytree of (batch, ...)
    arrays shaped like `like` past the batch axis (e.g. zeros of the right shapes and dtypes)."""

    def update(state, outputs, batch, aux):
        mask = batch["mask"]

        def add(s, x):
            keep = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
            return s + jnp.sum(jnp.where(keep, x, 0), axis=0).astype(s.dtype)

        return jax.tree.map(add, state, read(outputs, batch, aux))

    return Accumulator(empty=lambda: jax.tree.map(jnp.asarray, like), update=update,
                       merge=lambda a, b: jax.tree.map(jnp.add, a, b))


def count() -> Accumulator:
    """The number of real (unmasked) rows."""
    return Accumulator(empty=lambda: jnp.zeros((), jnp.int32),
                       update=lambda s, outputs, batch, aux: s + jnp.sum(batch["mask"], dtype=jnp.int32),
                       merge=jnp.add)
