"""The feature store: model outputs of a dataset on disk, as `.npy` shards anyone can read with NumPy.

Layout of one store (one per pass of a run, `<workdir>/store/<pass>/`):

    manifest.json              written last: what is here (see below); a store without it is incomplete
    <entry>.p<k>.npy           rows of process k for one entry ("model/layer" -> "model__layer"), in the
                               order that process read them; only real (unmasked) rows
    index.p<k>.npy             the dataset index of each of those rows (int64)
    label.p<k>.npy             their labels (int32)

`manifest.json` holds {"format": "embjax-feature-store", "version", "entries": {name: {"dtype", "shape"
(per row), "file_stem"}}, "models": {model: preprocessing}, "split", "dataset", "num_rows",
"process_count", "rows_per_process", "config"}. `open(path)` returns a `Store` whose `array(name)`
concatenates the processes' shards and sorts the rows by dataset index, so sample order is the dataset's
whatever the number of processes.

Writing is resumable: a `Writer` preallocates each shard as an `.npy` memmap sized for the process'
whole share of the split (`rows` = its real rows), writes each batch at its row offset, and is flushed
before every engine checkpoint, so a resumed run overwrites from the checkpointed batch on and nothing
before it is lost or duplicated. int8 entries store `round(clip(x, -128, 127))`: meant for values that
already are small integers (the full-network embedding's {-1, 0, 1}).
"""

from __future__ import annotations

import builtins
import json
import os
from typing import Any, Mapping

import numpy as np

FORMAT = "embjax-feature-store"
VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


class FeatureStoreError(ValueError):
    """A store that is incomplete, damaged or asked for something it does not hold."""


def file_stem(name: str) -> str:
    """The file-name stem of entry `name` ("model/layer" -> "model__layer")."""
    stem = name.replace("/", "__")
    if not stem or stem in ("index", "label") or any(c in stem for c in "\\:") or stem.startswith("."):
        raise FeatureStoreError(f"feature-store entry {name!r} cannot be used as a file name")
    return stem


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int8":
        return np.rint(np.clip(x, -128, 127)).astype(np.int8)
    return x.astype(DTYPES[dtype])


class Writer:
    """Writes one process' rows of a pass into `directory` (see the module docstring)."""

    def __init__(self, directory: str, entries: Mapping[str, tuple[str, tuple[int, ...]]], rows: int,
                 process_index: int, resume: bool):
        for name, (dtype, _) in entries.items():
            if dtype not in DTYPES:
                raise FeatureStoreError(f"feature-store entry {name!r}: dtype must be one of {sorted(DTYPES)}, "
                                        f"not {dtype!r}")
        self.directory = directory
        self.entries = {name: (dtype, tuple(shape)) for name, (dtype, shape) in entries.items()}
        self.rows = int(rows)
        self.process_index = process_index
        os.makedirs(directory, exist_ok=True)
        manifest = os.path.join(directory, "manifest.json")
        if os.path.exists(manifest):  # a finished store of an earlier run: starting over replaces it
            os.remove(manifest)
        self._arrays: dict[str, np.memmap] = {}
        specs = {name: (DTYPES[dtype], shape) for name, (dtype, shape) in self.entries.items()}
        specs["index"] = (np.int64, ())
        specs["label"] = (np.int32, ())
        for name, (dtype, shape) in specs.items():
            stem = name if name in ("index", "label") else file_stem(name)
            path = os.path.join(directory, f"{stem}.p{process_index}.npy")
            full = (self.rows, *shape)
            if resume and os.path.exists(path):
                arr = np.load(path, mmap_mode="r+")
                if arr.shape != full or arr.dtype != dtype:
                    raise FeatureStoreError(f"{path} holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} "
                                            f"{full}; delete {directory} to start this pass over")
            else:
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=full)
            self._arrays[name] = arr

    def write(self, row: int, values: Mapping[str, np.ndarray], index: np.ndarray, label: np.ndarray) -> None:
        """Rows `row : row + len(index)` (real rows only, already selected by the caller)."""
        k = len(index)
        if row + k > self.rows:
            raise FeatureStoreError(f"{self.directory}: writing rows {row}..{row + k} past the {self.rows} "
                                    "allocated for this process")
        for name, (dtype, shape) in self.entries.items():
            v = np.asarray(values[name]).reshape((k, *shape))
            self._arrays[name][row:row + k] = _cast(v, dtype)
        self._arrays["index"][row:row + k] = index
        self._arrays["label"][row:row + k] = label

    def flush(self) -> None:
        for arr in self._arrays.values():
            arr.flush()

    def close(self) -> None:
        self.flush()
        self._arrays.clear()


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    """Atomically write manifest.json (the last file of a store: its presence means complete)."""
    body = dict(manifest, format=FORMAT, version=VERSION)
    tmp = os.path.join(directory, "manifest.json.tmp")
    with builtins.open(tmp, "w") as f:
        json.dump(body, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, "manifest.json"))


class Store:
    """A finished feature store, read with NumPy (see `open`)."""

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self._order: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        return list(self.manifest["entries"])

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    def _shards(self, stem: str) -> list[np.ndarray]:
        out = []
        for k, rows in enumerate(self.manifest["rows_per_process"]):
            path = os.path.join(self.directory, f"{stem}.p{k}.npy")
            if not os.path.exists(path):
                raise FeatureStoreError(f"{path} is missing from the feature store {self.directory}")
            arr = np.load(path, mmap_mode="r")
            if arr.shape[0] != rows:
                raise FeatureStoreError(f"{path} has {arr.shape[0]} rows, the manifest says {rows}")
            out.append(arr)
        return out

    def _sorted(self, stem: str) -> np.ndarray:
        shards = self._shards(stem)
        if len(shards) == 1 and self._is_sorted():
            return shards[0]  # a memmap: nothing is read until used
        data = np.concatenate(shards)
        return data[self.order]

    def _is_sorted(self) -> bool:
        index = self._shards("index")[0]
        return bool(np.all(np.diff(index) > 0)) if len(index) > 1 else True

    @property
    def order(self) -> np.ndarray:
        """Permutation that sorts the concatenated shards by dataset index."""
        if self._order is None:
            self._order = np.argsort(np.concatenate(self._shards("index")), kind="stable")
        return self._order

    @property
    def index(self) -> np.ndarray:
        """The dataset index of every row, ascending."""
        return np.asarray(self._sorted("index"))

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._sorted("label"))

    def array(self, name: str) -> np.ndarray:
        """Entry `name`, all processes' rows in dataset order, shape (num_rows, *row shape)."""
        if name not in self.manifest["entries"]:
            raise FeatureStoreError(f"{self.directory} has no entry {name!r}; it holds {', '.join(self.names)}")
        return self._sorted(self.manifest["entries"][name]["file_stem"])


def move(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Moves a finished store (its manifest present) to `dest`, e.g. from a run's resume state into its
    report directory; returns `dest`."""
    if not os.path.isfile(os.path.join(src, "manifest.json")):
        raise FeatureStoreError(f"{src} holds no finished feature store (no manifest.json); nothing moved")
    os.rename(src, dest)
    return str(dest)


def open(directory: str | os.PathLike) -> Store:  # noqa: A001 - the natural name, as numpy's np.load
    """A finished store (FeatureStoreError if its manifest is missing: an interrupted or running pass)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(path):
        raise FeatureStoreError(
            f"{directory} is not a finished feature store (no manifest.json): the pass that writes it did "
            "not finish; run the same command again to resume it")
    with builtins.open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise FeatureStoreError(f"{path} is not an embjax feature-store manifest")
    return Store(directory, manifest)

