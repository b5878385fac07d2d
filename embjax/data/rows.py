"""Array sources: rows of feature arrays (in memory, memory-mapped, feature files, a feature store) that
the engine streams like images, through identity members (embjax.members.identity).

A `RowSource` puts one or more (n, d_i) parts side by side as one float32 row of width Σ d_i; the
engine's batch "image" then holds those rows and an identity member picks its columns. So derived stores,
bring-your-own features and curves are passes of the engine with its resume, progress and checks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class RowSource:
    """Rows of `parts` side by side (each an (n, d) array, or an object with `rows`, `dim` and
    `read(start, stop)` like embjax.feature_files.FeatureSource), with `labels` (n,) (zeros if None)."""

    dtype = np.float32

    def __init__(self, parts: Sequence, labels=None, name: str = "rows"):
        self.parts, self.name = list(parts), name
        if not self.parts:
            raise ValueError("RowSource needs at least one part")
        rows = {self._rows(p) for p in self.parts}
        if len(rows) != 1:
            raise ValueError(f"RowSource {name!r}: the parts have different row counts {sorted(rows)}")
        self.n = rows.pop()
        self.widths = [self._dim(p) for p in self.parts]
        self.offsets = np.cumsum([0] + self.widths).tolist()
        self.labels = np.zeros((self.n,), np.int32) if labels is None else np.asarray(labels, np.int32)
        if self.labels.shape != (self.n,):
            raise ValueError(f"RowSource {name!r}: {self.labels.shape} labels for {self.n} rows")

    @staticmethod
    def _rows(part) -> int:
        return int(part.rows) if hasattr(part, "read") else int(np.shape(part)[0])

    @staticmethod
    def _dim(part) -> int:
        return int(part.dim) if hasattr(part, "read") else int(np.prod(np.shape(part)[1:]))

    def columns(self, k: int) -> tuple[int, int]:
        """(offset, width) of part k in a row."""
        return self.offsets[k], self.widths[k]

    @property
    def image_shape(self) -> tuple[int]:
        return (self.offsets[-1],)

    def __len__(self) -> int:
        return self.n

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.offsets[-1]), np.float32)
        for k, part in enumerate(self.parts):
            block = part.read(start, stop) if hasattr(part, "read") else np.asarray(part[start:stop])
            out[:, self.offsets[k]:self.offsets[k + 1]] = block.reshape(stop - start, -1)
        return out

    def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        if idx.size == 0:
            return np.zeros((0, self.offsets[-1]), np.float32), np.zeros((0,), np.int32)
        lo, hi = int(idx.min()), int(idx.max()) + 1  # the engine reads contiguous runs of rows
        return self._read(lo, hi)[idx - lo], self.labels[idx]

    def __getitem__(self, i: int):
        return self._read(int(i), int(i) + 1)[0], int(self.labels[int(i)])

    def __repr__(self) -> str:
        return f"RowSource({self.name}: {self.n} rows x {self.offsets[-1]})"


def store_rows(store, entries: Sequence[str], name: str = "") -> RowSource:
    """The rows of a finished feature store's `entries`, side by side, in dataset order, with its labels."""
    return RowSource([store.array(e) for e in entries], store.labels, name or f"store {', '.join(entries)}")
