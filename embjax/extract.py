"""The streaming engine: runs a study's passes over its members, resumably, on every device and host.

A study is a short list of passes. A `Pass` names its data split, the model outputs it needs (any named
intermediate of any member) and an accumulator (embjax.accumulator: empty / update / merge / compute,
or a dict of them; none for a pass that only fills the feature store). `Engine.run(pass)` streams the
split through every member it needs in one jitted step per batch, data-parallel over all devices of all
processes (embjax.sharding: batches sharded on their leading axis, models and `aux` replicated). Each
device folds its own rows into its own partial state, so no step reduces anything across devices; the
partials are merged on the host in float64 with the accumulator's merge at checkpoints and at the end,
and `run` returns the merged state. Between passes the study computes what the next pass needs (maps,
heads, standardization), optionally memoized with `Engine.memo`.

The engine owns everything else:

- Resume. Every `checkpoint_every` batches the accumulator is saved with orbax into
  `workdir/checkpoints/<pass>/`, tagged with the run's fingerprint and the pass. Orbax writes into a
  temporary directory and renames it, so a process killed at any moment (kill -9 included) leaves the
  previous checkpoint or the new one, never a half-written one. A finished pass saves its final state
  into `workdir/passes/<pass>/`, so a rerun of the same command skips finished passes, resumes the
  interrupted one at its last checkpoint (skipping exactly the batches it holds: nothing counted twice
  or missed) and, because the fold order is the same, ends with the numbers of an uninterrupted run.
  The fingerprint covers the config and a SHA-256 of every member's weights (changed weights in the
  same file never resume an old run); each checkpoint records a SHA-256 of its state, and a checkpoint
  that cannot be restored or no longer hashes the same is deleted with a warning and the previous one is
  used. A checkpoint that cannot be written (full or read-only disk) stops the run with a
  `CheckpointWriteError` naming the directory; the previous checkpoint stays for the rerun.
- Non-finite outputs. A NaN or inf in a real row is replaced by 0 before the fold (so it cannot poison
  the accumulator) and flagged per member on device; the flags are read only at progress lines,
  checkpoints and the end of the pass (no host sync per batch), and a flagged pass stops with
  `NonFiniteFeatures` naming the models and the batch range, before any checkpoint holds those rows.
- Feature store. A pass can keep chosen outputs (float32, float16 or int8) in
  `workdir/store/<pass>/` (embjax.feature_store): one shard set per process, flushed at checkpoints,
  manifest written last.
- Progress: images/s (compilation excluded) and ETA every `progress_seconds`, on process 0.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from embjax import feature_store
from embjax.passes import (NonFiniteFeatures, Pass, Progress, _accumulator, _needed,  # noqa: F401
                            make_step, merge_partials)
from embjax.checkpoints import (CheckpointUnreadable, Checkpoints, CheckpointWriteError,  # noqa: F401 (re-exported)
                                config_fingerprint, load_memo, save_memo, state_hash)
from embjax.members import Member, find_head  # noqa: F401 (re-exported)
from embjax.sharding import (CPU_COMPILER_OPTIONS, DATA_AXIS, check_batch_size, compiler_options,  # noqa: F401
                             local_rows, make_mesh, replicate, shard_batch)


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _saved(state, batches_done: int) -> dict:
    """What a checkpoint holds: the accumulator and its batch count (never an empty tree, which orbax
    refuses: a pass that only fills the feature store has an empty accumulator)."""
    return {"accumulator": state, "batches_done": np.int32(batches_done)}


class Engine:
    """Runs a study's passes over `members` with checkpoints, resume, progress and a feature store.

    `fingerprint` is the JSON-able config of the run: checkpoints only resume a run whose config hashes
    the same (fields that do not change the numbers, like checkpoint_every or prefetch, should be left
    out by the caller). `precision` is the dot/convolution precision of every step (see `make_step`):
    "float32" for float32 runs, None for bfloat16 runs.
    """

    def __init__(self, members: Sequence[Member], workdir: str, *, batch_size: int, fingerprint: Any,
                 checkpoint_every: int = 50, prefetch: int = 2, progress_seconds: float = 10.0,
                 mesh: Mesh | None = None, log: Callable[[str], None] | None = None, config: Any = None,
                 precision: str | None = "float32"):
        self.members = list(members)
        self.workdir = os.path.abspath(workdir)
        self.mesh = mesh or make_mesh()
        self.batch_size = int(batch_size)
        check_batch_size(self.batch_size, self.mesh)
        self.process_count, self.process_index = jax.process_count(), jax.process_index()
        if self.batch_size % self.process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {self.process_count} processes")
        self.local_batch = self.batch_size // self.process_count
        # The weights by content, not by the file they came from: changed weights never resume an old run.
        from embjax.weights.store import variables_hash

        self.fingerprint = config_fingerprint({"config": fingerprint, "processes": self.process_count,
                                               "weights": {m.name: variables_hash(m.variables) for m in self.members}})
        self.checkpoint_every = int(checkpoint_every)
        self.prefetch = int(prefetch)
        self.progress_seconds = float(progress_seconds)
        self.config = config
        self.precision = precision
        self._settings = dict(batch_size=batch_size, fingerprint=fingerprint, checkpoint_every=checkpoint_every,
                              prefetch=prefetch, progress_seconds=progress_seconds, mesh=mesh, log=log,
                              config=config)
        self.seconds: dict[str, float] = {}
        self._log = log or (lambda msg: print(msg, flush=True) if self.process_index == 0 else None)
        self._variables = replicate([m.variables for m in self.members], self.mesh, donatable=False)
        # The members then hold the placed weights, so the host copies can be released (2.9 GB for the
        # thesis' ten CNNs). Where the mesh spans several processes the placed arrays are not readable
        # from one host (the weights hash needs that), and the members keep their host copies.
        if all(x.is_fully_addressable for x in jax.tree.leaves(self._variables)):
            for member, placed in zip(self.members, self._variables):
                member.variables = placed
        self._step_offset = 0  # batches of the passes run before this one: one step sequence per run

    @property
    def device_count(self) -> int:
        """Devices of the engine's mesh (all processes)."""
        return self.mesh.devices.size

    def shard_rows(self, *arrays) -> tuple:
        """`arrays` placed with their rows sharded over the engine's devices (row counts a multiple of
        `device_count`), for a solver that reduces over rows itself (embjax.svm's L-BFGS)."""
        return tuple(jax.device_put(a, NamedSharding(self.mesh, P(DATA_AXIS, *[None] * (np.ndim(a) - 1))))
                     for a in arrays)

    def log(self, msg: str) -> None:
        """Prints `msg` where the engine prints its progress (process 0)."""
        self._log(msg)

    def sibling(self, name: str, members: Sequence[Member], **overrides) -> "Engine":
        """An engine over other members (the same models at another precision, say) with this engine's
        settings but `overrides`, keeping its state in `<workdir>/engines/<name>` (removed by `finish`)."""
        return Engine(members, self._dir("engines", name), **(self._settings | {"precision": self.precision} | overrides))

    # ---- paths --------------------------------------------------------------------------------------

    def _dir(self, kind: str, name: str) -> str:
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"pass/memo name {name!r} must be a plain name")
        return os.path.join(self.workdir, kind, name)

    def store_dir(self, pass_name: str) -> str:
        return self._dir("store", pass_name)

    def store(self, pass_name: str) -> feature_store.Store:
        """The finished feature store of pass `pass_name`."""
        return feature_store.open(self.store_dir(pass_name))

    # ---- memo ---------------------------------------------------------------------------------------

    def memo(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()` (a pytree of dicts, lists, tuples and arrays) saved once under the run's fingerprint
        and reused by a resumed run. `compute` must give the same result on every process."""
        path = self._dir("memo", name) + ".npz"
        try:
            value = load_memo(path, self.fingerprint)
        except Exception as e:  # noqa: BLE001 - a damaged memo is recomputed, never trusted
            self._log(f"[warning] {path} is unreadable ({type(e).__name__}: {e}); recomputing {name}")
            value = None
        if value is not None:
            self._log(f"[resume] {name}: reusing {path}")
            return value
        t = time.perf_counter()
        value = compute()
        self.seconds[name] = time.perf_counter() - t
        if self.process_index == 0:
            save_memo(path, self.fingerprint, value)
        return value

    # ---- passes -------------------------------------------------------------------------------------

    def _checkpoints(self, kind: str, name: str, keep: int) -> Checkpoints:
        return Checkpoints(self._dir(kind, name), config_fingerprint([self.fingerprint, name]), keep=keep)

    def run(self, p: Pass) -> Any:
        """Run (or resume, or restore) pass `p`; returns its final accumulator as a host pytree."""
        from embjax import data

        n = len(p.source)
        if n == 0:
            raise ValueError(f"split '{p.split}' of {p.dataset or 'the dataset'} is empty (pass '{p.name}')")
        needed = _needed(self.members, p)
        total = data.num_batches(n, self.local_batch, self.process_count)
        offset, self._step_offset = self._step_offset, self._step_offset + total
        # The accumulator's shapes, dtypes and placement: what a checkpoint is restored into. Abstract, so
        # that a large accumulator (D² statistics: 1.8 GB at the thesis' widths) is not held twice.
        replicated = NamedSharding(self.mesh, P())
        acc = _accumulator(p)
        empty = acc.empty()
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=replicated), empty)

        if os.path.isdir(self._dir("passes", p.name)):
            done = self._checkpoints("passes", p.name, keep=1)
            try:
                if done.latest() == total:
                    state = done.restore(total, _saved(like, total))[0]["accumulator"]
                    self._log(f"[resume] pass '{p.name}' finished earlier: restored")
                    return jax.device_get(state)
            except CheckpointUnreadable as e:
                self._log(f"[warning] {e}; running pass '{p.name}' again")
                done.delete(total)
            finally:
                done.close()

        t0 = time.perf_counter()
        ckpt = self._checkpoints("checkpoints", p.name, keep=2)
        start, state = 0, None
        for step in ckpt.steps():  # newest first; a damaged one falls back to the one before
            if step >= total:
                raise RuntimeError(f"checkpoint {step} in {ckpt.directory} is past the {total} batches of "
                                   f"pass '{p.name}'; delete that directory to start the pass over")
            try:
                state = ckpt.restore(step, _saved(like, step))[0]["accumulator"]
            except CheckpointUnreadable as e:
                self._log(f"[warning] {e}; deleting it and falling back to the previous checkpoint")
                ckpt.delete(step)
                continue
            start = step
            self._log(f"[resume] pass '{p.name}': {start}/{total} batches already done")
            break

        writer = None
        if p.store:
            writer = self._writer(p, needed, n, resume=start > 0)
        share = data.pipeline.process_share(np.arange(n), self.process_index, self.process_count).shape[0]

        step = make_step(self.members, p, self.mesh, self.precision)
        if os.environ.get("EMBJAX_HLO_DIR") and self.process_index == 0:  # for tests: the compiled step
            os.makedirs(os.environ["EMBJAX_HLO_DIR"], exist_ok=True)
            with open(os.path.join(os.environ["EMBJAX_HLO_DIR"], f"{p.name}.hlo.txt"), "w") as f:
                f.write(self.step_hlo(p))
        variables = [v for m, v in zip(self.members, self._variables) if any(m is k for k in needed)]
        aux = replicate(p.aux, self.mesh, donatable=False) if p.aux is not None else None
        # Device 0 starts from the (restored) state, the others from empty partials.
        state = self._spread(empty if state is None else state, empty)
        flags = jax.device_put(np.zeros((self.mesh.devices.size, len(needed)), bool),
                               NamedSharding(self.mesh, P(DATA_AXIS)))
        progress = Progress(f"{p.name} {p.split}", total, self.batch_size, self.progress_seconds)
        checked = start  # batches [start, checked) were verified finite
        pending = None  # (emitted, host batch, batch index): written one step late, so transfers overlap
        in_flight = []  # flags of the last steps: bounds how far the host runs ahead of the devices
        batches = data.batches(p.source, self.local_batch, process_index=self.process_index,
                               process_count=self.process_count, start_batch=start, prefetch=self.prefetch)

        def check(upto: int, everywhere: bool) -> None:
            # At checkpoints and at the end every process checks every device's flags (a collective, so
            # all processes raise together); at progress lines, whose timing differs per process, each
            # checks only its own devices' flags, with no collective.
            nonlocal checked
            bad = self._any_flags(flags, everywhere)
            if bad.any():
                names = [m.name for m, b in zip(needed, bad) if b]
                raise NonFiniteFeatures(
                    f"non-finite (NaN/inf) outputs from {', '.join(names)} on split '{p.split}' (pass "
                    f"'{p.name}'), batches {checked}..{upto - 1}; check these models' weights and "
                    "preprocessing (a corrupted weight file or a bfloat16 overflow are the usual causes)")
            checked = upto

        def write(pending_item) -> None:
            emitted, host, b = pending_item
            k = int(host["mask"].sum())
            row = min(b * self.local_batch, share)
            values = {name: local_rows(x)[:k] for name, x in emitted.items()}
            writer.write(row, values, host["index"][:k], host["label"][:k])

        try:
            for b, host in enumerate(batches, start=start):
                state, flags, emitted = step(state, flags, variables, aux, shard_batch(host, self.mesh))
                if writer is not None:
                    if pending is not None:
                        write(pending)
                    pending = (emitted, host, b)
                in_flight.append(flags)
                if len(in_flight) > 2:
                    in_flight.pop(0).block_until_ready()
                done_b = b + 1
                save = self.checkpoint_every and done_b % self.checkpoint_every == 0 and done_b < total
                if save or progress.due():
                    check(done_b, everywhere=bool(save))
                if save:
                    if writer is not None:
                        write(pending)
                        pending = None
                        writer.flush()
                    merged = self._merged(state, acc.merge)
                    ckpt.save(done_b, _saved(merged, done_b), {"pass": p.name, "batches_done": done_b,
                                                               "step": offset + done_b})
                    state = self._spread(merged, empty)  # go on from the merged state, as a resumed run would
                progress.update(done_b)
            if writer is not None and pending is not None:
                write(pending)
            check(total, everywhere=True)
        finally:
            batches.close()
            ckpt.close()
        if total > start:
            progress.update(total, force=True)

        if writer is not None:
            writer.close()
            self._finish_store(p, needed, n, {name: shape for name, (_, shape) in writer.entries.items()})
        state = self._merged(state, acc.merge)
        done = self._checkpoints("passes", p.name, keep=1)
        done.save(total, _saved(state, total), {"pass": p.name, "batches_done": total, "step": offset + total})
        done.close()
        if self.process_index == 0:
            shutil.rmtree(self._dir("checkpoints", p.name), ignore_errors=True)
        self.seconds[p.name] = time.perf_counter() - t0
        return jax.device_get(state)

    def _spread(self, state, init):
        """Per-device partial states: `state` on device 0, `init` (empty) on every other device. Neither
        input is modified; the result has buffers of its own (the step donates it)."""
        n_dev = self.mesh.devices.size

        def spread(s, e):
            return jax.tree.map(lambda a, b: jnp.concatenate([a[None], jnp.broadcast_to(b, (n_dev - 1, *b.shape))]),
                                s, e)

        state, init = (replicate(t, self.mesh, donatable=False) for t in (state, init))
        return jax.jit(spread, out_shardings=NamedSharding(self.mesh, P(DATA_AXIS)))(state, init)

    def _local_partials(self, state) -> list:
        leaves, treedef = jax.tree.flatten(state)
        per_leaf = [local_rows(x) for x in leaves]
        return [jax.tree.unflatten(treedef, [leaf[k] for leaf in per_leaf]) for k in range(per_leaf[0].shape[0])]

    def _merged(self, state, merge):
        """The merge of every device's partial state (float64 on the host), replicated on the mesh."""
        if not jax.tree.leaves(state):  # a store-only pass: nothing to merge
            return state
        merged = merge_partials(self._local_partials(state), merge)
        if self.process_count > 1:
            from jax.experimental import multihost_utils

            gathered = multihost_utils.process_allgather(merged)  # a leading process axis on every leaf
            leaves, treedef = jax.tree.flatten(gathered)
            merged = merge_partials([jax.tree.unflatten(treedef, [np.asarray(x)[k] for x in leaves])
                                     for k in range(self.process_count)], merge)
        return replicate(merged, self.mesh, donatable=False)

    def _any_flags(self, flags, everywhere: bool) -> np.ndarray:
        local = local_rows(flags).any(axis=0)
        if everywhere and self.process_count > 1:
            from jax.experimental import multihost_utils

            local = np.asarray(multihost_utils.process_allgather(local)).any(axis=0)
        return local

    def _writer(self, p: Pass, needed, n: int, resume: bool) -> feature_store.Writer:
        from embjax import data

        # Row shapes from an abstract evaluation of the step's outputs: nothing is computed.
        shapes = self._emitted_shapes(p, needed)
        rows = data.pipeline.process_share(np.arange(n), self.process_index, self.process_count).shape[0]
        entries = {name: (dtype, shapes[name]) for name, dtype in p.store.items()}
        return feature_store.Writer(self.store_dir(p.name), entries, rows, self.process_index, resume)

    def step_hlo(self, p: Pass) -> str:
        """The compiled (optimized) HLO text of pass `p`'s step on this engine's mesh: what tests inspect
        to see that no batch is reduced across devices. Compiles the step; runs nothing."""
        needed = _needed(self.members, p)
        n_dev = self.mesh.devices.size
        sharded, replicated = NamedSharding(self.mesh, P(DATA_AXIS)), NamedSharding(self.mesh, P())
        image_shape = getattr(p.source, "image_shape", None) or np.shape(p.source[0][0])
        b = self.batch_size
        batch = {"image": jax.ShapeDtypeStruct((b, *image_shape), getattr(p.source, "dtype", jnp.uint8), sharding=sharded),
                 "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded),
                 "mask": jax.ShapeDtypeStruct((b,), bool, sharding=sharded),
                 "index": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n_dev, *np.shape(x)), _dtype(x), sharding=sharded),
                             _accumulator(p).empty())
        flags = jax.ShapeDtypeStruct((n_dev, len(needed)), bool, sharding=sharded)
        variables = [v for m, v in zip(self.members, self._variables) if any(m is k for k in needed)]
        aux = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=replicated), p.aux)
        step = make_step(self.members, p, self.mesh, self.precision)
        return step.lower(state, flags, variables, aux, batch).compile().as_text()

    def _emitted_shapes(self, p: Pass, needed) -> dict[str, tuple[int, ...]]:
        image_shape = getattr(p.source, "image_shape", None) or np.shape(p.source[0][0])
        b, n_dev = self.batch_size, self.mesh.devices.size
        batch = {"image": jax.ShapeDtypeStruct((b, *image_shape), getattr(p.source, "dtype", jnp.uint8)),
                 "label": jax.ShapeDtypeStruct((b,), jnp.int32), "mask": jax.ShapeDtypeStruct((b,), bool),
                 "index": jax.ShapeDtypeStruct((b,), jnp.int32)}
        step = make_step(self.members, p, self.mesh, self.precision)
        variables = [m.variables for m in needed]
        flags = jax.ShapeDtypeStruct((n_dev, len(needed)), bool)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n_dev, *np.shape(x)), _dtype(x)), _accumulator(p).empty())
        out = jax.eval_shape(step, state, flags, variables, p.aux, batch)
        return {name: tuple(x.shape[1:]) for name, x in out[2].items()}

    def _finish_store(self, p: Pass, needed, n: int, shapes: dict[str, tuple[int, ...]]) -> None:
        from embjax import data

        if self.process_count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"embjax store {p.name}")
        if self.process_index != 0:
            return
        rows = [data.pipeline.process_share(np.arange(n), k, self.process_count).shape[0]
                for k in range(self.process_count)]
        models = {}
        for m in needed:
            spec = m.spec
            models[m.name] = {"outputs": list(p.outputs[m.name])} | (
                {k: getattr(spec, k) for k in ("family", "input_size", "scaling", "mean", "std", "channel_order",
                                               "crop_fraction", "resize_method")} if spec is not None else {})
        feature_store.write_manifest(self.store_dir(p.name), {
            "pass": p.name, "dataset": p.dataset, "split": p.split, "num_rows": n,
            "process_count": self.process_count, "rows_per_process": rows,
            "sample_order": "rows sorted by dataset index ('index' files); each process read a contiguous "
                            "share of the split in order",
            "entries": {name: {"dtype": dtype, "shape": list(shapes[name]),
                               "file_stem": feature_store.file_stem(name)} for name, dtype in p.store.items()},
            "models": models, "config": self.config, "fingerprint": self.fingerprint})

    def finish(self, keep_store: bool = True) -> None:
        """After the report is written: drop the resume state (checkpoints, finished passes, memos)."""
        if self.process_index != 0:
            return
        for kind in ("checkpoints", "passes", "memo", "engines") + (() if keep_store else ("store",)):
            shutil.rmtree(os.path.join(self.workdir, kind), ignore_errors=True)
