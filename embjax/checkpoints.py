"""Checkpoints and memos: what makes every pass and every training run resumable after kill -9.

`Checkpoints` saves a state with orbax (written to a temporary directory and renamed, so a killed process
leaves the previous checkpoint or the new one), tagged with the run's fingerprint and a SHA-256 of the
state, checked on restore. `save_memo` / `load_memo` keep a between-pass host result (a pytree of dicts,
lists, tuples and arrays) in one `.npz`, written atomically, reused only under the same fingerprint.
Used by the engine (embjax.extract) and the training loop (embjax.train).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np


def config_fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able config: a checkpoint only resumes the run that made it."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CheckpointUnreadable(RuntimeError):
    """A checkpoint that cannot be restored as it was written (damaged files, or bytes that no longer hash
    to what was saved); the engine falls back to the previous one."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full or read-only disk, ...); the previous one is kept."""


def _host_copy(x) -> np.ndarray:
    """A leaf on this host; a replicated array spanning several processes is read from a local replica."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(f"cannot hash a state leaf sharded over several processes ({x.sharding})")
        x = x.addressable_shards[0].data
    return np.ascontiguousarray(np.asarray(x))


def state_hash(state) -> str:
    """SHA-256 over an accumulator's leaf paths, shapes, dtypes and bytes (on the host; every process
    computes the same one from its own replica)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        leaf = _host_copy(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|".encode())
        digest.update(leaf.view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


class Checkpoints:
    """Orbax checkpoints of the accumulators of one run, in `directory`, tagged by a fingerprint.

    Each checkpoint's meta records a SHA-256 of the state it holds, checked on restore: orbax's files
    carry checksums of their own only in part, and a resumed run must never continue from silently
    changed sums.
    """

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

    def steps(self) -> list[int]:
        """Every step with a (final-named) checkpoint, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

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
            raise CheckpointUnreadable(
                f"could not restore checkpoint {step} in {self.directory} ({type(e).__name__}: "
                f"{str(e)[:300]})") from e
        meta = restored["meta"]
        if meta.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"checkpoint {step} in {self.directory} was written by a run with a different config "
                f"(fingerprint {meta.get('fingerprint')} != {self.fingerprint}); use another workdir or "
                f"delete this one")
        if "state_sha256" in meta and state_hash(restored["state"]) != meta["state_sha256"]:
            raise CheckpointUnreadable(
                f"checkpoint {step} in {self.directory} restored to a state whose SHA-256 differs from the "
                "one recorded when it was written: its files were changed or damaged")
        return restored["state"], meta

    def save(self, step: int, state, meta: dict) -> None:
        meta = dict(meta, fingerprint=self.fingerprint, state_sha256=state_hash(state))
        previous = self.latest()
        try:
            self.manager.save(step, args=self._ocp.args.Composite(
                state=self._ocp.args.StandardSave(state), meta=self._ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # a full or read-only disk, a vanished mount ...
            kept = (f"the previous checkpoint ({previous}) is kept" if previous is not None
                    else "there is no earlier checkpoint")
            raise CheckpointWriteError(
                f"could not write checkpoint {step} into {self.directory} ({type(e).__name__}: "
                f"{str(e)[:300]}); {kept}. Free space on that disk or make it writable, then rerun the "
                "same command to resume") from e

    def delete(self, step: int) -> None:
        """Removes checkpoint `step`. Every process calls it (orbax deletes on the primary process and
        synchronizes all of them), as every process finds the same checkpoint unreadable."""
        self.manager.delete(step)

    def close(self) -> None:
        self.manager.close()


def _to_skeleton(tree, leaves: dict, prefix: str):
    if isinstance(tree, Mapping):
        return {"dict": {str(k): _to_skeleton(v, leaves, f"{prefix}/{k}") for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_to_skeleton(v, leaves, f"{prefix}/{i}") for i, v in enumerate(tree)]}
    key = f"a{len(leaves)}"
    leaves[key] = np.asarray(tree)
    return {"leaf": key}


def _from_skeleton(skel, leaves):
    if "dict" in skel:
        return {k: _from_skeleton(v, leaves) for k, v in skel["dict"].items()}
    if "list" in skel:
        return [_from_skeleton(v, leaves) for v in skel["list"]]
    if "tuple" in skel:
        return tuple(_from_skeleton(v, leaves) for v in skel["tuple"])
    return leaves[skel["leaf"]]


def load_memo(path: str, fingerprint: str):
    """The value saved at `path` under `fingerprint`, or None (absent, another run's, or unreadable: a
    damaged memo is recomputed, never trusted; the reason is in the raised warning's text)."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(str(f["__skeleton__"]))
        if header["fingerprint"] != fingerprint:
            return None
        return _from_skeleton(header["skeleton"], {k: f[k] for k in f.files})


def save_memo(path: str, fingerprint: str, value) -> None:
    """Saves `value` at `path` atomically (a temporary file renamed over it)."""
    leaves: dict[str, np.ndarray] = {}
    skeleton = _to_skeleton(value, leaves, "")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    header = json.dumps({"fingerprint": fingerprint, "skeleton": skeleton})
    np.savez(tmp, __skeleton__=np.asarray(header), **leaves)
    os.replace(tmp, path)
