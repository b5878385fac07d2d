"""Features a user brings from elsewhere, read from disk in row batches and checked on the way.

A feature source is one model's (rows, d) array, given as one of

    PATH.npy              one `.npy` file, memory-mapped (np.load(mmap_mode="r")), never loaded whole
    DIR                   a directory of `.npy` shards with the same width and dtype, concatenated in the
                          sorted order of their file names (e.g. part-000.npy, part-001.npy, ...)
    STORE[:ENTRY]         an embjax feature store (a directory with manifest.json, see
                          embjax.feature_store); ENTRY picks one of its entries ("model/layer") and may be
                          left out when the store holds exactly one

and named on the command line as NAME=SPEC. `FeatureSource.read(start, stop)` returns rows start..stop
as float32 and refuses a row holding NaN or an infinity, naming the file and the row: the check runs on
the batch being read, so the data is read once. After a batch is copied out of a memory map, its pages
are dropped from this process (madvise DONTNEED; the file stays in the page cache), so the resident size
of a stream does not grow with the file: a run over 100 GB of features holds one batch at a time.

This module reads files and checks them; it knows nothing about maps or statistics.
"""

from __future__ import annotations

import mmap
import os
import re
from typing import Sequence

import numpy as np

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class FeatureFileError(ValueError):
    """A feature, label or head file that cannot be used as it is; the message names the file."""


def parse_specs(values: Sequence[str] | str | None, what: str = "--features") -> list[tuple[str, str]]:
    """[(NAME, SPEC)] from "NAME=SPEC[,NAME=SPEC...]" (a string or a list of such strings)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[tuple[str, str]] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, spec = item.partition("=")
            name, spec = name.strip(), spec.strip()
            if not sep or not name or not spec:
                raise FeatureFileError(f"{what}: '{item}' is not NAME=PATH (e.g. {what}=resnet=feats/resnet.npy)")
            if not NAME_PATTERN.match(name) or "__to__" in name:
                raise FeatureFileError(
                    f"{what}: model name '{name}' must start with a letter or digit and hold only letters, digits "
                    "and _ . + - (it names the map files, maps/<src>__to__<dst>.npz), without '__to__'")
            out.append((name, spec))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FeatureFileError(f"{what}: model name(s) {', '.join(dup)} given more than once")
    return out


# --------------------------------------------------------------------------------------------------
# Opening


def _check_array(arr: np.ndarray, path: str) -> None:
    if arr.ndim != 2:
        raise FeatureFileError(
            f"{path}: expected a 2-D (rows, features) array, got shape {arr.shape}; reshape it to "
            "(rows, -1) before saving, one row per sample")
    kind = arr.dtype.kind
    if kind not in "fiu" or arr.dtype.fields is not None:
        raise FeatureFileError(
            f"{path}: dtype {arr.dtype} is not a real number type; features must be float or integer arrays")
    if arr.shape[1] == 0:
        raise FeatureFileError(f"{path}: the array has shape {arr.shape}: no feature columns")


# What np.load raises for a damaged, empty or crafted .npy is not one type: a bad header (ValueError, or
# SyntaxError and tokenize.TokenError from its literal parser), a cut file (EOFError), an unreadable one
# (OSError), ... Whatever it raises, the file cannot be used, and the error names it.
_NPY_ERRORS = (Exception,)


def _regular_file(path: str, where: str | None = None) -> None:
    """FeatureFileError unless `path` is a regular file: a FIFO would block the run forever, a device
    never end, and np.load cannot memory-map either. `where` names the file in messages (default: path)."""
    import stat

    where = path if where is None else where
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FeatureFileError(f"{where}: no such file") from None
    except OSError as e:
        raise FeatureFileError(f"{where}: cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise FeatureFileError(f"{where}: {kind}; features, labels and heads are read from regular files")


def _load_npy(path: str) -> np.ndarray:
    _regular_file(path)
    if os.path.getsize(path) == 0:
        raise FeatureFileError(f"{path}: an empty file (0 bytes), not an .npy array; save the features again "
                               "with np.save")
    try:
        arr = np.load(path, mmap_mode="r")
    except _NPY_ERRORS as e:  # object arrays cannot be memory-mapped; damaged or cut headers
        raise FeatureFileError(f"{path}: cannot be read as a memory-mapped .npy array ({type(e).__name__}: "
                               f"{str(e)[:200]}); features must be a numeric (rows, features) array saved "
                               "with np.save") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise FeatureFileError(f"{path}: is an .npz archive, not an .npy array; save each model's features "
                               "with np.save")
    _check_array(arr, path)
    return arr


class FeatureSource:
    """One model's features: one or more 2-D arrays (memory-mapped) read as consecutive rows."""

    def __init__(self, name: str, spec: str, parts: list[tuple[str, np.ndarray]], index: np.ndarray | None = None):
        self.name, self.spec = name, spec
        self.parts = parts
        widths = {a.shape[1] for _, a in parts}
        if len(widths) != 1:
            listing = ", ".join(f"{os.path.basename(p)} {a.shape}" for p, a in parts)
            raise FeatureFileError(f"{spec}: the shards have different widths: {listing}")
        dtypes = {a.dtype for _, a in parts}
        if len(dtypes) != 1:
            listing = ", ".join(f"{os.path.basename(p)} {a.dtype}" for p, a in parts)
            raise FeatureFileError(f"{spec}: the shards have different dtypes: {listing}")
        self.dim = widths.pop()
        self.dtype = dtypes.pop()
        self.starts = np.cumsum([0] + [a.shape[0] for _, a in parts])
        self.rows = int(self.starts[-1])
        self.index = index

    def __repr__(self) -> str:
        return f"FeatureSource({self.name}={self.spec}: {self.rows} x {self.dim} {self.dtype})"

    def locate(self, row: int) -> tuple[str, int]:
        """(file, row within that file) of global row `row`."""
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.parts[k][0], int(row - self.starts[k])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop as a float32 (stop − start, d) array; FeatureFileError on a non-finite row."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"{self.name}: rows {start}..{stop} out of range 0..{self.rows}")
        out = np.empty((stop - start, self.dim), np.float32)
        pos = start
        while pos < stop:
            k = int(np.searchsorted(self.starts, pos, side="right")) - 1
            path, arr = self.parts[k]
            lo = pos - int(self.starts[k])
            hi = min(stop, int(self.starts[k + 1])) - int(self.starts[k])
            with np.errstate(over="ignore"):  # float64 beyond float32's range: reported below, with its value
                out[pos - start: pos - start + hi - lo] = arr[lo:hi]
            _drop_pages(arr, lo, hi)
            pos += hi - lo
        if out.dtype.kind == "f":
            finite = np.isfinite(out).all(axis=1)
            if not finite.all():
                bad = int(np.argmin(finite))
                path, local = self.locate(start + bad)
                cols = np.flatnonzero(~np.isfinite(out[bad]))
                k = int(np.searchsorted(self.starts, start + bad, side="right")) - 1
                stored = self.parts[k][1][local, int(cols[0])]
                if np.isnan(stored):
                    what = "NaN"
                elif np.isinf(stored):
                    what = "an infinity"
                else:
                    what = f"{float(stored):.6g}, beyond float32's range (±3.4e38) in which features are read,"
                raise FeatureFileError(
                    f"{path}: row {local} (row {start + bad} of model '{self.name}') holds "
                    f"{what} in column {int(cols[0])}"
                    f"{f' and {len(cols) - 1} more' if len(cols) > 1 else ''}; fix or drop that row in every "
                    "model's features (rows must stay aligned)")
        # Integer features overflowing float32 cannot be non-finite; float64 ones beyond float32's range can.
        return out


def _drop_pages(arr: np.ndarray, lo: int, hi: int) -> None:
    """Release the pages of rows lo..hi of a memory-mapped array from this process (best effort).

    They stay in the page cache; only this process' mapping lets go, so its resident size stays at one
    batch whatever the file size. Uses np.memmap's mapping object (`_mmap`, mapped from the file offset
    rounded down to ALLOCATIONGRANULARITY, the array starting `offset % ALLOCATIONGRANULARITY` into it).
    """
    mapping = getattr(arr, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not arr.flags.c_contiguous:
        return
    row_bytes = arr.strides[0] if arr.ndim else arr.itemsize
    base = int(getattr(arr, "offset", 0)) % mmap.ALLOCATIONGRANULARITY
    first = base + lo * row_bytes
    last = base + hi * row_bytes
    first -= first % mmap.PAGESIZE
    last -= last % mmap.PAGESIZE  # the partial last page may hold the next batch's first rows
    if last > first:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):
            pass


def _split_store_spec(spec: str) -> tuple[str, str | None] | None:
    """(store dir, entry or None) if `spec` is STORE or STORE:ENTRY for a feature store, else None."""
    if os.path.isfile(os.path.join(spec, "manifest.json")):
        return spec, None
    for pos in (m.start() for m in re.finditer(":", spec)):
        if os.path.isfile(os.path.join(spec[:pos], "manifest.json")):
            return spec[:pos], spec[pos + 1:]
    return None


def open_source(name: str, spec: str) -> FeatureSource:
    """The features behind NAME=SPEC (see the module docstring for the forms of SPEC)."""
    from embjax import feature_store

    store_spec = _split_store_spec(spec)
    if store_spec is not None:
        directory, entry = store_spec
        try:
            store = feature_store.open(directory)
        except feature_store.FeatureStoreError as e:
            raise FeatureFileError(str(e)) from None
        if entry is None:
            if len(store.names) != 1:
                raise FeatureFileError(
                    f"{directory}: the feature store holds {len(store.names)} entries ({', '.join(store.names)}); "
                    f"pick one as {name}={directory}:ENTRY")
            entry = store.names[0]
        if entry not in store.names:
            raise FeatureFileError(f"{directory}: the feature store has no entry '{entry}'; it holds "
                                   f"{', '.join(store.names)}")
        try:
            arr = store.array(entry)
        except (feature_store.FeatureStoreError, OSError, ValueError) as e:
            raise FeatureFileError(f"{directory}:{entry}: {e}") from None
        where = f"{directory}:{entry}"
        _check_array(arr, where)
        return FeatureSource(name, spec, [(where, arr)], index=np.asarray(store.index))
    if os.path.isdir(spec):
        files = sorted(f for f in os.listdir(spec) if f.endswith(".npy"))
        if not files:
            raise FeatureFileError(f"{spec}: a directory without .npy shards (and without a feature-store "
                                   "manifest.json)")
        return FeatureSource(name, spec, [(os.path.join(spec, f), _load_npy(os.path.join(spec, f))) for f in files])
    if not os.path.exists(spec):
        store_like = spec.partition(":")[0]
        hint = (f" ({store_like} exists but has no manifest.json: not a finished feature store)"
                if ":" in spec and os.path.isdir(store_like) else "")
        raise FeatureFileError(f"{spec}: no such file or directory{hint}")
    if not spec.endswith(".npy"):
        raise FeatureFileError(f"{spec}: expected a .npy file, a directory of .npy shards or a feature store")
    return FeatureSource(name, spec, [(spec, _load_npy(spec))])


def open_sources(specs: Sequence[tuple[str, str]], what: str = "--features") -> list[FeatureSource]:
    """Every NAME=SPEC opened, and checked to be row-aligned: the same number of rows and, for those
    from feature stores, the same dataset index (sample order)."""
    sources = [open_source(name, spec) for name, spec in specs]
    check_aligned(sources, what)
    return sources


def check_aligned(sources: Sequence[FeatureSource], what: str = "--features") -> int:
    """The common row count; FeatureFileError naming every file when they differ."""
    if not sources:
        raise FeatureFileError(f"{what}: no features given")
    rows = {s.rows for s in sources}
    if len(rows) != 1:
        listing = "; ".join(f"{s.name}={s.spec}: {s.rows} rows" for s in sources)
        raise FeatureFileError(f"{what}: the models' features have different numbers of rows ({listing}); row k "
                               "of every file must be the same sample")
    if not min(rows):
        raise FeatureFileError(f"{what}: the features have no rows ({sources[0].spec})")
    indexed = [s for s in sources if s.index is not None]
    for s in indexed[1:]:
        if not np.array_equal(s.index, indexed[0].index):
            k = int(np.argmax(s.index != indexed[0].index))
            raise FeatureFileError(
                f"{what}: the feature stores behind {indexed[0].spec} and {s.spec} hold different samples: their "
                f"row {k} is dataset index {int(indexed[0].index[k])} vs {int(s.index[k])}")
    return rows.pop()


# --------------------------------------------------------------------------------------------------
# Labels and heads


def load_labels(spec: str, rows: int, what: str = "--labels") -> np.ndarray:
    """(rows,) int32 labels from a 1-D integer .npy file or a feature store's labels."""
    if os.path.isfile(os.path.join(spec, "manifest.json")):
        from embjax import feature_store

        try:
            labels = np.asarray(feature_store.open(spec).labels)
        except feature_store.FeatureStoreError as e:
            raise FeatureFileError(str(e)) from None
    else:
        _regular_file(spec, f"{what}: {spec}")
        if os.path.getsize(spec) == 0:
            raise FeatureFileError(f"{what}: {spec}: an empty file (0 bytes), not an .npy array")
        try:
            labels = np.load(spec, mmap_mode="r")
        except _NPY_ERRORS as e:
            raise FeatureFileError(f"{what}: {spec}: cannot be read as an .npy array ({type(e).__name__}: "
                                   f"{str(e)[:200]})") from None
        if not isinstance(labels, np.ndarray):
            raise FeatureFileError(f"{what}: {spec}: an .npz archive, not an .npy array")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise FeatureFileError(f"{what}: {spec}: expected a 1-D integer array of class indices, got "
                               f"{labels.dtype} {labels.shape}")
    if labels.shape[0] != rows:
        raise FeatureFileError(f"{what}: {spec} has {labels.shape[0]} labels for {rows} feature rows")
    labels = np.asarray(labels, np.int64)
    if labels.size and labels.min() < 0:
        k = int(np.argmin(labels))
        raise FeatureFileError(f"{what}: {spec}: row {k} has the negative label {int(labels[k])}")
    return labels.astype(np.int32)


def load_head(spec: str, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A linear classifier z = x W + b from an .npz file with W (dim, classes) and b (classes,)."""
    _regular_file(spec, f"--heads: {spec} (head of '{name}')")
    try:
        with np.load(spec) as f:
            if not {"W", "b"} <= set(f.files):
                raise FeatureFileError(f"--heads: {spec} (head of '{name}') holds {sorted(f.files)}; expected arrays "
                                       "'W' (features, classes) and 'b' (classes,)")
            w, b = np.asarray(f["W"]), np.asarray(f["b"])
    except _NPY_ERRORS as e:
        if isinstance(e, FeatureFileError):
            raise
        raise FeatureFileError(f"--heads: {spec} (head of '{name}'): cannot be read as an .npz archive ({e})") from None
    if w.ndim != 2 or b.shape != (w.shape[1],) or w.dtype.kind not in "fiu" or b.dtype.kind not in "fiu":
        raise FeatureFileError(f"--heads: {spec} (head of '{name}'): W is {w.dtype} {w.shape} and b {b.dtype} "
                               f"{b.shape}; expected real W (features, classes) and b (classes,)")
    if w.shape[0] != dim:
        raise FeatureFileError(f"--heads: {spec} (head of '{name}'): W has {w.shape[0]} rows but the features of "
                               f"'{name}' have {dim} columns")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise FeatureFileError(f"--heads: {spec} (head of '{name}'): W or b holds NaN or an infinity")
    return w.astype(np.float32), b.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The inputs of the own-features command (experiments/features.py), checked before anything is streamed


def _names_must_match(fit_specs, other_specs, what: str) -> None:
    want, got = [n for n, _ in fit_specs], [n for n, _ in other_specs]
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{what} must name the same models as --features ({', '.join(want)}): {'; '.join(parts)}")


def _heads(cfg: dict, specs, names, dims):
    head_specs = parse_specs(cfg["heads"], "--heads")
    if not head_specs:
        return None
    _names_must_match(specs, head_specs, "--heads")
    by_name = dict(head_specs)
    heads = [load_head(by_name[m], d, m) for m, d in zip(names, dims)]
    if len({h[0].shape[1] for h in heads}) != 1:
        listing = ", ".join(f"{m}: {h[0].shape[1]}" for m, h in zip(names, heads))
        raise ValueError(f"--heads: the heads predict different numbers of classes ({listing}); mapped accuracy "
                         "needs one label set")
    return heads


def open_inputs(cfg: dict):
    """The own-features command's flags `cfg` (features, eval_features, labels, eval_labels, heads,
    batch_size, ridge) checked and its files opened, every problem reported before anything is streamed.
    Returns a namespace: cfg, specs, eval_specs, names, fit_src, dims, n_fit, n, eval_src (None without
    --eval_features), heads (None without --heads), eval_labels (None when there are none) and notes."""
    import types

    if cfg["batch_size"] < 1:
        raise ValueError(f"--batch_size must be positive, got {cfg['batch_size']}")
    if cfg["ridge"] < 0:
        raise ValueError(f"--ridge must be >= 0, got {cfg['ridge']}")
    specs = parse_specs(cfg["features"], "--features")
    if len(specs) < 2:
        raise ValueError(f"--features needs at least two models (NAME=PATH,NAME=PATH), got {len(specs)}")
    names = [n for n, _ in specs]
    fit_src = open_sources(specs, "--features")
    dims, n_fit = [s.dim for s in fit_src], fit_src[0].rows
    eval_src, eval_specs = None, parse_specs(cfg["eval_features"], "--eval_features")
    if eval_specs:
        _names_must_match(specs, eval_specs, "--eval_features")
        eval_src = open_sources([(m, dict(eval_specs)[m]) for m in names], "--eval_features")
        for s, d, m in zip(eval_src, dims, names):
            if s.dim != d:
                raise ValueError(f"--eval_features: {s.spec} has {s.dim} columns but the fit features of '{m}' have {d}")
    heads = _heads(cfg, specs, names, dims)
    num_classes = heads[0][0].shape[1] if heads else None
    fit_labels = load_labels(cfg["labels"], n_fit, "--labels") if cfg["labels"] else None
    if cfg["eval_labels"] and eval_src is None:
        raise ValueError("--eval_labels labels the rows of --eval_features, which was not given "
                         "(use --labels for the fit rows)")
    eval_labels = fit_labels
    if eval_src is not None:
        eval_labels = (load_labels(cfg["eval_labels"], eval_src[0].rows, "--eval_labels") if cfg["eval_labels"]
                       else None)
    label_flag = "--eval_labels" if eval_src is not None else "--labels"
    if eval_labels is not None and num_classes is not None and eval_labels.max(initial=0) >= num_classes:
        k = int(np.argmax(eval_labels >= num_classes))
        raise ValueError(f"{label_flag}: {cfg['eval_labels'] if eval_src is not None else cfg['labels']}: row {k} "
                         f"has label {int(eval_labels[k])} but the heads predict {num_classes} classes")
    notes = []
    if heads is None and (fit_labels is not None or eval_labels is not None):
        notes.append("labels were given without --heads: mapped accuracy needs a head per model; labels only checked")
    if heads is not None and eval_labels is None:
        notes.append(f"--heads without {label_flag}: agreement with each target's own prediction is reported, "
                     "not accuracy")
    if heads is not None and fit_labels is not None and eval_src is not None:
        notes.append("--labels labels the fit rows; with --eval_features accuracy is measured on the evaluation "
                     "rows against --eval_labels, so --labels was only checked")
    return types.SimpleNamespace(cfg=cfg, specs=specs, eval_specs=eval_specs, names=names, fit_src=fit_src, dims=dims,
                                 n_fit=n_fit, n=len(names), eval_src=eval_src, heads=heads, eval_labels=eval_labels,
                                 notes=notes)
