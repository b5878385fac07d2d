"""The source protocol every pipeline reads from, the in-memory source, split slicing and the data errors.

A source is anything with `__len__` and `__getitem__(i) -> (image uint8 (H, W, C), label int)`. A source
may also offer `get_batch(indices) -> (images uint8 (k, H, W, C), labels int32 (k,))`, which `batches`
prefers because it can read and decode many samples at once, and `image_shape`, the (H, W, C) every
sample has, which lets `batches` build an all-padding batch without reading anything.
"""
from __future__ import annotations

import re
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


class DataNotFoundError(FileNotFoundError):
    """The files of a dataset (or a prepared tfds copy of it) are not where they were looked for."""


class CorruptDataError(ValueError):
    """A data file exists but its content is not what its format promises (truncated, wrong header)."""


class UnknownDatasetError(ValueError):
    """No dataset by that name is known to tfds (or to embjax's local readers)."""


class EmptySplitError(ValueError):
    """The requested split (or slice of a split) holds no examples."""


@runtime_checkable
class Source(Protocol):
    """Random access to (image, label) pairs: the one thing `batches` needs from a dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class ArraySource:
    """A source over arrays already in memory: images uint8 (n, H, W, C), labels integer (n,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4:
            raise ValueError(
                f"ArraySource '{name}': images must be (n, height, width, channels), got shape {images.shape}; "
                "add a trailing channel axis to grayscale images (images[..., None])")
        if images.dtype != np.uint8:
            raise ValueError(
                f"ArraySource '{name}': images must be uint8 (raw pixels; each model preprocesses on device), "
                f"got {images.dtype}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"ArraySource '{name}': labels must be (n,) with n = {images.shape[0]} images, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"ArraySource '{name}': labels must be integers, got {labels.dtype}")
        self.images = images
        self.labels = labels.astype(np.int32, copy=False)
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        return self.images[indices], self.labels[indices]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return f"ArraySource(name={self.name!r}, n={len(self)}, image_shape={self.image_shape})"


# "train", "test[:10%]", "train[2000:]", "train[-500:]"; percent and absolute bounds, like tfds' split syntax.
_SLICE = re.compile(r"^(?P<base>[A-Za-z0-9_]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


class Prefix:
    """The first `n` samples of another source (a subset for a check pass)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for the first {self.n} samples of {self.source!r}")
        return self.source[index]

    def get_batch(self, indices):
        if hasattr(self.source, "get_batch"):
            return self.source.get_batch(indices)
        images, labels = zip(*(self.source[int(i)] for i in indices))
        return np.stack(images), np.asarray(labels)

    @property
    def image_shape(self):
        return getattr(self.source, "image_shape", None)

    def __repr__(self) -> str:
        return f"Prefix({self.source!r}, {self.n})"


def parse_split(split: str, sizes: dict[str, int]) -> tuple[str, int, int]:
    """Resolves a split expression against the split sizes: returns (base split, start, stop).

    Percent bounds round to the nearest example, as tfds does by default; negative bounds count from the
    end. Only the single-slice form is supported (no "train+test", no step).
    """
    match = _SLICE.match(split.strip())
    if match is None:
        raise ValueError(
            f"split {split!r} is not understood; use a split name ({', '.join(sizes)}) optionally followed by "
            "one slice such as [:10%], [:2000] or [1000:2000]")
    base = match["base"]
    if base not in sizes:
        raise ValueError(f"split {split!r}: unknown split {base!r}; this dataset has {', '.join(sizes)}")
    n = sizes[base]

    def bound(text: str | None, default: int) -> int:
        if text is None:
            return default
        value = round(int(text[:-1]) * n / 100) if text.endswith("%") else int(text)
        if value < 0:
            value += n
        return min(max(value, 0), n)

    return base, bound(match["start"], 0), bound(match["stop"], n)


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int, what: str) -> None:
    """Raises CorruptDataError when a label falls outside [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataError(
            f"{what}: labels must lie in [0, {num_classes}), found range [{labels.min()}, {labels.max()}]")
