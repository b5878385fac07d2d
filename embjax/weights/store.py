"""Saving and loading converted model variables as orbax checkpoints, so a conversion runs once.

Owns the on-disk layout of a stored variables tree:

    <path>/state/          the orbax (StandardCheckpointer) checkpoint of the pytree
    <path>/embjax.json     written last: format version, the tree's leaf shapes/dtypes, a SHA-256 of
                           every leaf's bytes, user metadata

Loading checks, before anything is restored, that orbax's own metadata describes the leaves the index
records and that their total size fits the per-call byte budget (`embjax.weights.limits`); after
restoring, that every leaf's bytes hash to what was saved (orbax's chunk files carry no checksum of
their own, so a flipped byte would otherwise load as a silently different weight). Indexes written
before the hashes existed load without that last check.

Everything is written into a sibling temporary directory and renamed into place at the end, so a crash
leaves either no `<path>` at all or a complete one; a leftover `.<name>.tmp-*` directory is never mistaken
for a checkpoint. Loading returns NumPy arrays: placing them on devices is the engine's business.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np

from embjax.weights.limits import ByteBudget

__all__ = ["CorruptCheckpointError", "save_variables", "load_variables", "load_metadata", "content_hash",
           "variables_hash"]

_FORMAT = "embjax.variables/1"
_INDEX = "embjax.json"
_STATE = "state"


class CorruptCheckpointError(ValueError):
    """A stored checkpoint exists but cannot be read back as it was written."""


def _leaf_signature(tree: Any) -> dict[str, list]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(k): [list(np.shape(v)), str(np.dtype(getattr(v, "dtype", None) or
                                                                       np.asarray(v).dtype))]
            for k, v in flat}


def _leaf_hashes(tree: Any) -> dict[str, str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(k): hashlib.sha256(np.ascontiguousarray(np.asarray(v)).view(np.uint8)).hexdigest()
            for k, v in flat}


def _combined_hash(leaves: dict, hashes: dict) -> str:
    return hashlib.sha256(json.dumps([leaves, hashes], sort_keys=True).encode()).hexdigest()


def variables_hash(variables: Any) -> str:
    """One SHA-256 over a variables tree's leaf names, shapes, dtypes and bytes.

    Equal to `content_hash` of a store written from the same tree, so a resume fingerprint can name the
    weights by content whether they come from a weight file or from the store.
    """
    return _combined_hash(_leaf_signature(variables), _leaf_hashes(variables))


def content_hash(path: str | os.PathLike) -> str:
    """`variables_hash` of the variables stored at `path`, from the index alone (reads no arrays).

    Two stores with equal content hashes hold bit-identical leaves of the same names, shapes and dtypes.
    Raises CorruptCheckpointError for an index written before leaf hashes were recorded.
    """
    path = os.path.abspath(os.fspath(path))
    index = _read_index(path)
    if "sha256" not in index:
        raise CorruptCheckpointError(f"{path}: the index records no leaf hashes (written by an older embjax); "
                                     "delete the directory and convert/save again")
    return _combined_hash(index["leaves"], index["sha256"])


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: orbax start-up costs ~1 s and most callers never save
    return ocp.StandardCheckpointer()


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
    """Writes `variables` (any pytree of arrays, usually {"params": ..., "batch_stats": ...}) to `path`.

    `metadata` must be JSON-serializable; it is returned by `load_metadata`. An existing `path` is an
    error unless `overwrite=True` (then it is replaced only once the new checkpoint is complete).
    Returns the absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint already exists: {path}; pass overwrite=True to replace it")
    try:
        meta_json = json.dumps(dict(metadata or {}))
    except TypeError as e:
        raise ValueError(f"metadata for {path} is not JSON-serializable: {e}") from e
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(tmp)
        ckpt = _checkpointer()
        ckpt.save(os.path.join(tmp, _STATE), variables)
        ckpt.wait_until_finished()
        index = {"format": _FORMAT, "leaves": _leaf_signature(variables), "sha256": _leaf_hashes(variables),
                 "metadata": json.loads(meta_json)}
        with open(os.path.join(tmp, _INDEX), "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):  # overwrite=True: move the old one aside only now that the new one is whole
            old = f"{tmp}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_index(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no stored variables at {path}; convert the weights and save them first")
    index_file = os.path.join(path, _INDEX)
    try:
        with open(index_file) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{path} is not a complete embjax checkpoint ({_INDEX} unreadable: {e}); delete the directory "
            "and convert/save again") from e
    if not isinstance(index, dict) or index.get("format") != _FORMAT:
        raise CorruptCheckpointError(f"{path}: unknown checkpoint format {index.get('format')!r}; "
                                     "delete the directory and convert/save again")
    return index


def load_metadata(path: str | os.PathLike) -> dict:
    """The `metadata` dict stored with the checkpoint at `path`."""
    return _read_index(os.path.abspath(os.fspath(path)))["metadata"]


def _nbytes(signature: list) -> int:
    shape, dtype = signature
    return int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize


def load_variables(path: str | os.PathLike, max_bytes: int | None = None) -> dict:
    """Reads back what `save_variables` wrote, as a pytree of NumPy arrays.

    Raises FileNotFoundError when nothing is stored at `path` and CorruptCheckpointError (a ValueError,
    naming the path and the leaf and telling to delete and re-create it) when the checkpoint is
    incomplete or damaged: leaves whose shape or dtype differ from what was recorded at save time
    (checked against orbax's metadata before restoring, and again after), leaves whose bytes no longer
    hash to the recorded SHA-256, or a total size over `max_bytes` (default $EMBJAX_MAX_WEIGHT_BYTES or
    8 GiB; see `embjax.weights.limits`).
    """
    path = os.path.abspath(os.fspath(path))
    index = _read_index(path)
    leaves = index.get("leaves")
    if not isinstance(leaves, dict):
        raise CorruptCheckpointError(f"{path}: the index has no leaf list; delete the directory and convert/save again")
    budget = ByteBudget(path, max_bytes, CorruptCheckpointError)
    try:
        for key, signature in leaves.items():
            budget.charge(_nbytes(signature), f"leaf {key} (shape {signature[0]}, {signature[1]})")
    except (TypeError, ValueError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{path}: malformed leaf list in {_INDEX} ({e}); delete the directory and "
                                     "convert/save again") from e
    ckpt = _checkpointer()
    state = os.path.join(path, _STATE)
    try:
        described = _leaf_signature(ckpt.metadata(state).item_metadata.tree)
    except Exception as e:  # missing or damaged _METADATA / _CHECKPOINT_METADATA
        raise CorruptCheckpointError(
            f"cannot read orbax's metadata of the checkpoint at {path} ({type(e).__name__}: {str(e)[:300]}); "
            "delete the directory and convert/save again") from e
    _compare(path, described, leaves, "orbax's metadata describes")
    try:
        restored = ckpt.restore(state)
    except Exception as e:  # orbax/tensorstore raise many types for missing or damaged chunks
        raise CorruptCheckpointError(
            f"cannot restore the checkpoint at {path} ({type(e).__name__}: {str(e)[:300]}); delete the "
            "directory and convert/save again") from e
    restored = jax.tree.map(np.asarray, restored)
    _compare(path, _leaf_signature(restored), leaves, "restored")
    if "sha256" in index:
        got = _leaf_hashes(restored)
        bad = sorted(k for k in got if got[k] != index["sha256"].get(k))
        if bad:
            raise CorruptCheckpointError(f"{path}: leaves {bad[:10]} do not hash to the SHA-256 recorded at save "
                                         "time: the stored bytes changed; delete the directory and convert/save "
                                         "again")
    return restored


def _compare(path: str, got: dict, want: dict, what: str) -> None:
    if got != want:
        diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise CorruptCheckpointError(f"{path}: {what} leaves that differ from those recorded at save time "
                                     f"({diff[:10]}); delete the directory and convert/save again")
