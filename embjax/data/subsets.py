"""Rows of a source: subsets, every label up front, every row in memory, class filters.

What several studies need of a split beyond streaming it: `Subset` (rows of a source, itself a source,
optionally relabelled), `labels_of` (every label without decoding an image where the source allows it),
`all_rows` (images and labels in memory, for zoo training and small splits) and `class_filter` (a
predicate on labels from "0-4,7" / "even" / "odd").
"""

from __future__ import annotations

import re

import numpy as np


class Subset:
    """Rows `rows` of `source`, re-indexed 0..n-1 (the engine's sample index is the position here).
    With `labels` (one per row) those replace the source's labels."""

    def __init__(self, source, rows, name: str = "", labels=None):
        self.source, self.rows, self.name = source, np.asarray(rows, np.int64), name
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None and self.labels.shape != self.rows.shape:
            raise ValueError(f"Subset {name!r}: {self.labels.shape[0]} labels for {self.rows.shape[0]} rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        image, label = self.source[int(self.rows[i])]
        return image, (label if self.labels is None else int(self.labels[i]))

    def get_batch(self, indices):
        idx = np.asarray(indices, np.int64)
        if hasattr(self.source, "get_batch"):
            images, labels = self.source.get_batch(self.rows[idx])
        else:
            images, labels = zip(*(self.source[int(r)] for r in self.rows[idx]))
            images, labels = np.stack(images), np.asarray(labels)
        if self.labels is not None:
            labels = self.labels[idx].astype(np.int32)
        return np.asarray(images), labels

    @property
    def image_shape(self):
        return getattr(self.source, "image_shape", None)

    def __repr__(self) -> str:
        return f"Subset({self.name or repr(self.source)}, {len(self)} rows)"


def labels_of(source) -> np.ndarray:
    """Every label of `source`, in order: its `labels` array, its `read_labels()` (tfds: no image decoded),
    else one read per sample."""
    labels = getattr(source, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    if hasattr(source, "read_labels"):
        return np.asarray(source.read_labels())
    return np.asarray([source[i][1] for i in range(len(source))], np.int32)


def all_rows(source) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of a source, in memory (zoo training and small splits only)."""
    idx = np.arange(len(source))
    if hasattr(source, "get_batch"):
        return tuple(np.asarray(a) for a in source.get_batch(idx))
    images, labels = zip(*(source[i] for i in idx))
    return np.stack(images), np.asarray(labels)


def class_filter(spec: str, what: str):
    """"0-4,7" -> (a predicate on label arrays, its description); also "even" / "odd". `what` names the
    config field in errors."""
    spec = str(spec).strip()
    if spec in ("even", "odd"):
        parity = 0 if spec == "even" else 1
        return lambda labels: np.asarray(labels) % 2 == parity, (spec,)
    ranges = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise ValueError(f"config.{what} must be ranges like '0-4' or '0-2,7', or 'even' / 'odd'; got {spec!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"config.{what}: range {part.strip()!r} is empty")
        ranges.append((lo, hi))
    return lambda labels: np.any([(np.asarray(labels) >= lo) & (np.asarray(labels) <= hi) for lo, hi in ranges],
                                 axis=0), tuple(ranges)


def class_disjoint(sides, dataset: str = "") -> list[Subset]:
    """Subsets of several splits on disjoint classes (an open-set protocol: no class on two sides).

    `sides` is a list of (source, split name, classes spec for `class_filter`, config field name, limit):
    each side keeps the rows whose label its spec accepts, the first `limit` of them in source order when
    `limit` > 0. Raises ValueError naming the field when a side is empty or two sides share a class."""
    out = []
    for source, split, spec, field, limit in sides:
        labels = labels_of(source)
        rows = np.nonzero(class_filter(spec, field)[0](labels))[0]
        rows = rows[: int(limit)] if limit else rows
        if len(rows) == 0:
            raise ValueError(f"no images for config.{field}={spec!r}: split '{split}' of {dataset or 'the dataset'} "
                             "has no label it accepts")
        out.append(Subset(source, rows, f"{dataset}:{split}:{field}", labels=labels[rows]))
    seen = {}
    for (_, _, _, field, _), sub in zip(sides, out):
        for c in np.unique(sub.labels):
            if c in seen:
                raise ValueError(f"classes of config.{seen[c]} and config.{field} overlap (class {c}); the protocol "
                                 "is open-set only when they are disjoint")
            seen[c] = field
    return out
