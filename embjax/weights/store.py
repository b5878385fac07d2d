"""Saving and loading converted model variables as orbax checkpoints, so a conversion runs once.

Owns the on-disk layout of a stored variables tree:

    <path>/state/          the orbax (StandardCheckpointer) checkpoint of the pytree
    <path>/embjax.json     written last: format version, the tree's leaf shapes/dtypes, user metadata

Everything is written into a sibling temporary directory and renamed into place at the end, so a crash
leaves either no `<path>` at all or a complete one; a leftover `.<name>.tmp-*` directory is never mistaken
for a checkpoint. Loading returns NumPy arrays: placing them on devices is the engine's business.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["CorruptCheckpointError", "save_variables", "load_variables", "load_metadata"]

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
        index = {"format": _FORMAT, "leaves": _leaf_signature(variables), "metadata": json.loads(meta_json)}
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


def load_variables(path: str | os.PathLike) -> dict:
    """Reads back what `save_variables` wrote, as a pytree of NumPy arrays.

    Raises FileNotFoundError when nothing is stored at `path` and CorruptCheckpointError (a ValueError,
    naming the path and telling to delete and re-create it) when the checkpoint is incomplete or damaged,
    including leaves whose shape or dtype differ from what was recorded at save time.
    """
    path = os.path.abspath(os.fspath(path))
    index = _read_index(path)
    try:
        restored = _checkpointer().restore(os.path.join(path, _STATE))
    except Exception as e:  # orbax/tensorstore raise many types for missing or damaged chunks
        raise CorruptCheckpointError(
            f"cannot restore the checkpoint at {path} ({type(e).__name__}: {str(e)[:300]}); delete the "
            "directory and convert/save again") from e
    restored = jax.tree.map(np.asarray, restored)
    got = _leaf_signature(restored)
    if got != index["leaves"]:
        diff = sorted(k for k in got.keys() | index["leaves"].keys() if got.get(k) != index["leaves"].get(k))
        raise CorruptCheckpointError(f"{path}: restored leaves differ from those recorded at save time "
                                     f"({diff[:10]}); delete the directory and convert/save again")
    return restored
