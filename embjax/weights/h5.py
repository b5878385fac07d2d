"""Keras weight files (.h5): {layer name: [arrays]}, nothing about models.

Reading: `read_keras_weights(path)` returns {layer name: [that layer's arrays in Keras' order]} from

* legacy Keras 2 weight files, as keras.applications downloads them: a root attribute `layer_names`,
  one group per layer with a `weight_names` attribute (also the full-model variant, where all that
  sits under a `model_weights` group). The dict follows `layer_names`, i.e. the model's layer order.
* Keras 3 `.weights.h5` files (`model.save_weights`): `layers/<key>/vars/0..n-1`. Keys are Keras'
  class-based auto names (`conv2d_3`); recent Keras also records the real layer name as a `name`
  attribute on `vars`, which is used when present. The dict follows the natural order of the keys.

Layers without weights are left out. An unreadable, truncated, oversized or non-Keras file raises
`KerasWeightsError` naming the file (and the layer, where one is at fault); a missing one
`FileNotFoundError`. Reading is bounded: the arrays' logical sizes are charged to a per-call byte budget
(`embjax.weights.limits`) before they are read, a dataset linked from several layers is read once,
links to other files and datasets stored outside the file are refused, and nested models are followed
only to `limits.MAX_NESTING` levels, never around a cycle.

Converting the arrays into Flax variables is embjax.models.convert.framework's (`convert_layers`).
"""
from __future__ import annotations

import os
import re

import h5py
import numpy as np

from embjax.weights.limits import MAX_NESTING, ByteBudget, Limits, is_regular_file


class KerasWeightsError(ValueError):
    """A file that is not a readable Keras weights file (corrupt, truncated, or some other format)."""


# ---------------------------------------------------------------------------------------------------
# Reading


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def natural_key(name: str):
    """Sort key that orders embedded numbers by value: conv2d < conv2d_2 < conv2d_10."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


class _Reader:
    """One read of one file: its byte budget and limits, and the datasets already read (hard links share
    one)."""

    def __init__(self, path: str, max_bytes: int | None, limits: Limits | None = None):
        self.path = path
        self.budget = ByteBudget(path, max_bytes, KerasWeightsError)
        self.limits = Limits.resolve(limits)
        self.count = 0  # weight arrays named so far, against limits.max_entries
        self._arrays: dict = {}  # h5py ObjectID (equal for two links to one object) -> array
        self._by_address: dict = {}  # the same arrays by their object header's address in the file

    def node(self, group: h5py.Group, name: str, what: str):
        """`group[name]` following only links inside the file (an external link could open any file)."""
        node = group.file if name.startswith("/") else group
        for part in (p for p in name.split("/") if p):
            if not isinstance(node, h5py.Group):
                raise KerasWeightsError(f"{self.path}: {what}: {part!r} is looked up in a dataset")
            link = node.get(part, getlink=True)
            if link is None:
                raise KerasWeightsError(f"{self.path}: {what}: no {name!r} in {node.name!r}")
            if isinstance(link, h5py.ExternalLink):
                raise KerasWeightsError(f"{self.path}: {what}: {name!r} is a link to another file "
                                        f"({link.filename!r}); weight files are read on their own")
            node = node[part]
        return node

    def _cached(self, group: h5py.Group, name: str):
        """The array already read for `group[name]` when `name` is a hard link in `group` to a dataset read
        before, else None. One low-level call: building h5py's Group/Dataset objects costs ~0.1 ms a
        name, which a file naming one dataset under 50,000 link names would multiply."""
        if not self._by_address or "/" in name:
            return None
        try:
            info = group.id.links.get_info(name.encode("utf8"))
        except (KeyError, ValueError, TypeError, RuntimeError, OSError, UnicodeError):
            return None  # the slow path names the problem
        return self._by_address.get(info.u) if info.type == h5py.h5l.TYPE_HARD else None

    def array(self, group: h5py.Group, name: str, what: str) -> np.ndarray:
        cached = self._cached(group, name)
        if cached is not None:
            return cached
        ds = self.node(group, name, what)
        if not isinstance(ds, h5py.Dataset):
            raise KerasWeightsError(f"{self.path}: {what}: {name!r} is not a dataset")
        if ds.id in self._arrays:
            return self._arrays[ds.id]
        if ds.external or ds.is_virtual:  # raw bytes or datasets of other files, named by this one
            raise KerasWeightsError(f"{self.path}: {what}: {name!r} stores its data outside the file; weight "
                                    "files are read on their own")
        if ds.dtype.kind not in "fiub" or ds.ndim > self.limits.max_rank:
            raise KerasWeightsError(f"{self.path}: {what}: {name!r} is not a numeric array (dtype {ds.dtype}, "
                                    f"{ds.ndim} dimensions)")
        itemsize = ds.dtype.itemsize
        # The logical size (a chunked, compressed or never-written dataset can be huge in a tiny file),
        # plus the one chunk HDF5 decompresses at a time, which may exceed the dataset's extent.
        nbytes = int(np.prod(ds.shape, dtype=object)) * itemsize
        chunk = int(np.prod(ds.chunks, dtype=object)) * itemsize if ds.chunks else 0
        self.budget.charge(nbytes + chunk, f"{what}: dataset {ds.name!r} (shape {ds.shape}, {ds.dtype})")
        try:
            out = np.asarray(ds[()])
        except Exception as e:  # HDF5 reports damaged chunks and filters as OSError, RuntimeError ...
            raise KerasWeightsError(f"{self.path}: {what}: cannot read dataset {ds.name!r} ({type(e).__name__}: "
                                    f"{str(e)[:200]}); the file is corrupt") from e
        self._arrays[ds.id] = out
        self._by_address[h5py.h5o.get_info(ds.id).addr] = out
        return out

    def names(self, obj, attr: str, what: str) -> list[str]:
        """The names an attribute lists, each once (Keras names layers and a layer's weights uniquely: a
        name listed twice is a damaged or crafted file, refused before anything is looked up)."""
        value = obj.attrs.get(attr, [])
        limit = self.limits.max_entries
        if np.ndim(value) > 1:
            raise KerasWeightsError(f"{self.path}: {what}: attribute {attr!r} of shape {np.shape(value)} is not "
                                    "a list of names")
        if np.size(value) > limit:
            raise KerasWeightsError(f"{self.path}: {what}: attribute {attr!r} lists {np.size(value):,} names, more "
                                    f"than max_entries={limit:,}; {Limits.hint('max_entries')}")
        names = [_text(n) for n in np.atleast_1d(value)] if np.size(value) else []
        if len(set(names)) != len(names):
            seen = set()
            dup = next(n for n in names if n in seen or seen.add(n))
            raise KerasWeightsError(f"{self.path}: {what}: attribute {attr!r} lists {dup!r} more than once")
        long = next((n for n in names if len(n.encode("utf8", "surrogateescape")) > self.limits.max_key_bytes), None)
        if long is not None:
            raise KerasWeightsError(f"{self.path}: {what}: a name of {len(long):,} characters in {attr!r}, more "
                                    f"than max_key_bytes={self.limits.max_key_bytes:,}; {Limits.hint('max_key_bytes')}")
        return names

    def count_arrays(self, n: int, what: str) -> None:
        self.count += n
        if self.count > self.limits.max_entries:
            raise KerasWeightsError(f"{self.path}: {what}: more than max_entries={self.limits.max_entries:,} weight "
                                    f"arrays; {Limits.hint('max_entries')}")


def _read_legacy(reader: _Reader, root: h5py.Group) -> dict[str, list[np.ndarray]]:
    layers = {}
    for layer in reader.names(root, "layer_names", "the layer list"):
        what = f"layer {layer!r}"
        group = reader.node(root, layer, what)
        if not isinstance(group, h5py.Group):
            raise KerasWeightsError(f"{reader.path}: {what} is not a group")
        names = reader.names(group, "weight_names", what)
        reader.count_arrays(len(names), what)
        if names:
            layers[layer] = [reader.array(group, n, f"{what}, weight {n!r}") for n in names]
    return layers


def _read_keras3(reader: _Reader, group: h5py.Group, prefix: str, layers: dict, open_groups: tuple = ()) -> None:
    if len(open_groups) > MAX_NESTING or group.id in open_groups:
        raise KerasWeightsError(f"{reader.path}: models nested in models deeper than {MAX_NESTING} levels or "
                                f"in a cycle at {group.name!r}")
    open_groups = open_groups + (group.id,)
    for key in sorted(group.keys(), key=natural_key):
        child = reader.node(group, key, f"layer {prefix}{key!r}")
        if not isinstance(child, h5py.Group):
            continue
        name = key
        if "vars" in child:
            variables = reader.node(child, "vars", f"layer {prefix}{key!r}")
            name = _text(variables.attrs.get("name", key))
            what = f"layer {prefix + name!r}"
            indices = sorted((k for k in variables.keys() if k.isdigit()), key=int)
            reader.count_arrays(len(indices), what)
            if indices:
                layers[prefix + name] = [reader.array(variables, k, f"{what}, variable {k}") for k in indices]
        if "layers" in child:  # a model nested in the model: its layers are named under it
            _read_keras3(reader, reader.node(child, "layers", f"layer {prefix}{key!r}"), f"{prefix}{name}/",
                         layers, open_groups)


def read_keras_weights(path: str | os.PathLike, max_bytes: int | None = None,
                       limits: Limits | None = None) -> dict[str, list[np.ndarray]]:
    """{layer name: [arrays in Keras' weight order]} from a legacy Keras .h5 or a Keras 3 .weights.h5.

    Keras' order: Conv2D [kernel, bias?], BatchNormalization [gamma, beta, moving_mean,
    moving_variance], Dense [kernel, bias], DepthwiseConv2D [depthwise_kernel, bias?].

    `max_bytes` caps the total size of the arrays read (default $EMBJAX_MAX_WEIGHT_BYTES or 8 GiB; see
    `embjax.weights.limits`), `limits` the number of names and arrays, name lengths and ranks; links and
    dataset storage outside the file are refused; every failure is a KerasWeightsError naming the file
    and the layer.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Keras weights file {path!r} does not exist")
    if os.path.isdir(path):
        raise KerasWeightsError(f"{path!r} is a directory, not a Keras .h5 weights file")
    if not is_regular_file(path):
        raise KerasWeightsError(f"{path!r} is not a regular file (a FIFO, device or socket); weight files are "
                                "read from regular files only")
    reader = _Reader(path, max_bytes, limits)
    try:
        handle = h5py.File(path, "r")
    except Exception as err:  # OSError for most damage; h5py lets a few others through
        raise KerasWeightsError(
            f"cannot read {path!r} as HDF5 ({err}); the file is truncated, corrupt or not a Keras .h5 "
            "weights file; download it again"
        ) from err
    with handle:
        try:
            if "model_weights" in handle and "layer_names" in handle["model_weights"].attrs:
                layers = _read_legacy(reader, reader.node(handle, "model_weights", "the model weights"))
            elif "layer_names" in handle.attrs:
                layers = _read_legacy(reader, handle)
            elif "layers" in handle:
                layers = {}
                _read_keras3(reader, reader.node(handle, "layers", "the layers"), "", layers)
            else:
                raise KerasWeightsError(
                    f"{path!r} is HDF5 but not a Keras weights file: it has neither a 'layer_names' "
                    "attribute (legacy Keras .h5) nor a 'layers' group (Keras 3 .weights.h5)"
                )
        except KerasWeightsError:
            raise
        except Exception as err:  # OSError, KeyError, RuntimeError, ValueError, UnicodeDecodeError ...
            raise KerasWeightsError(f"cannot read the weights in {path!r} ({type(err).__name__}: "
                                    f"{str(err)[:200]}); the file is corrupt") from err
    if not layers:
        raise KerasWeightsError(f"{path!r} holds no layer weights")
    return layers


def layer_weights_of(model) -> dict[str, list[np.ndarray]]:
    """The same dict from an in-memory Keras model (its layers in order, weightless ones left out)."""
    def value(w):  # a Keras variable's backend array; np.asarray(variable) itself warns under NumPy 2
        return np.asarray(getattr(w, "value", w))

    return {layer.name: [value(w) for w in layer.weights] for layer in model.layers if layer.weights}


__all__ = [
    "KerasWeightsError",
    "read_keras_weights",
    "layer_weights_of",
    "natural_key",
]
