"""Padded, masked, deterministic batches of a source, sharded across processes and prefetched in a thread.

The split is ordered (identity, or a permutation fixed by (shuffle_seed, epoch)), then cut into
`process_count` contiguous shares whose sizes differ by at most one; process p reads share p. Every
process yields the same number of batches, `num_batches(n, batch_size, process_count)`, padding its last
ones, so collective steps on all hosts stay in lock-step; padding rows carry mask False and index -1.
Batch b of a process depends only on the arguments, never on what was read before, which is what makes
`start_batch` (resume) skip batches without reading them.

Loading and decoding run in a background thread that stays up to `prefetch` batches ahead (a bounded
queue, so host memory stays bounded), overlapping with whatever the consumer does on the devices.
"""
from __future__ import annotations

import queue
import threading
import weakref
from typing import Iterator

import numpy as np

from embjax.data.sources import CorruptDataError

Batch = dict[str, np.ndarray]


def num_batches(n: int, batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields for a split of n samples: ceil(ceil(n / process_count) / batch_size)."""
    if n < 0 or batch_size <= 0 or process_count <= 0:
        raise ValueError(f"num_batches needs n >= 0, batch_size > 0, process_count > 0; "
                         f"got n={n}, batch_size={batch_size}, process_count={process_count}")
    per_process = -(-n // process_count)
    return -(-per_process // batch_size)


def sample_order(n: int, shuffle_seed: int | None, epoch: int) -> np.ndarray:
    """Global order of the split: identity without a seed, else a permutation fixed by (seed, epoch)."""
    if shuffle_seed is None:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n).astype(np.int64)


def process_share(order: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Process `process_index`'s contiguous slice of `order`; shares differ in size by at most one."""
    n = order.shape[0]
    return order[process_index * n // process_count:(process_index + 1) * n // process_count]


def _example_shape(source) -> tuple[int, ...]:
    shape = getattr(source, "image_shape", None)
    if shape is not None:
        return tuple(shape)
    image, _ = source[0]  # one read, only for a batch made entirely of padding
    return tuple(np.shape(image))


def _read(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(source, "get_batch"):
        images, labels = source.get_batch(indices)
        return np.asarray(images), np.asarray(labels)
    samples = [source[int(i)] for i in indices]
    shapes = [np.shape(s[0]) for s in samples]
    odd = [int(i) for i, shape in zip(indices, shapes) if shape != shapes[0]]
    if odd:
        raise CorruptDataError(f"{source!r}: sample {odd[0]} has an image of shape "
                               f"{shapes[list(indices).index(odd[0])]}, sample {int(indices[0])} one of "
                               f"{shapes[0]}; samples of different shapes cannot form one batch")
    return np.stack([np.asarray(s[0]) for s in samples]), np.asarray([s[1] for s in samples])


def make_batch(source, indices: np.ndarray, batch_size: int) -> Batch:
    """Reads `indices` (at most batch_size of them) and pads the batch to batch_size rows.

    Images must be uint8 (k, H, W, C), of the source's declared `image_shape` where it has one (so every
    batch of a run has one shape), and labels integers of shape (k,); anything else is a CorruptDataError
    naming the source and the first sample of the batch.
    """
    k = indices.shape[0]
    if k:
        images, labels = _read(source, indices)
        where = f"{source!r}, batch starting at sample {int(indices[0])}"
        dtype = np.dtype(getattr(source, "dtype", np.uint8))  # array sources (data.RowSource) declare theirs
        if dtype != np.uint8:
            if images.dtype != dtype or images.shape[0] != k:
                raise CorruptDataError(f"{where}: expected {dtype} rows (k={k}, ...), got {images.dtype} "
                                       f"{images.shape}")
        elif images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != k:
            raise CorruptDataError(f"{where}: expected uint8 images (k={k}, H, W, C), got {images.dtype} "
                                   f"{images.shape}")
        declared = getattr(source, "image_shape", None)
        if declared is not None and tuple(images.shape[1:]) != tuple(declared):
            raise CorruptDataError(f"{where}: images of shape {images.shape[1:]}, the source declares "
                                   f"{tuple(declared)}")
        if labels.shape != (k,) or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise CorruptDataError(f"{where}: expected {k} integer labels, got {labels.dtype} {labels.shape}")
    else:
        images = np.zeros((0, *_example_shape(source)), getattr(source, "dtype", np.uint8))
        labels = np.zeros((0,), np.int32)
    image = np.zeros((batch_size, *images.shape[1:]), getattr(source, "dtype", np.uint8))
    image[:k] = images
    label = np.zeros((batch_size,), np.int32)
    label[:k] = labels
    index = np.full((batch_size,), -1, np.int64)
    index[:k] = indices
    mask = np.zeros((batch_size,), bool)
    mask[:k] = True
    return {"image": image, "label": label, "mask": mask, "index": index}


def _generate(source, batch_size: int, share: np.ndarray, start_batch: int, total: int) -> Iterator[Batch]:
    for b in range(start_batch, total):
        yield make_batch(source, share[b * batch_size:(b + 1) * batch_size], batch_size)


class _Done:
    pass


class _Failure:
    def __init__(self, error: BaseException, batch: int):
        self.error, self.batch = error, batch


def _produce(generator: Iterator[Batch], out: queue.Queue, stop: threading.Event, start_batch: int,
             describe: str) -> None:
    # Runs in the prefetch thread. It holds no reference to the consumer's iterator object, so dropping
    # that object lets the garbage collector finalize it, which sets `stop` and ends this thread.
    batch = start_batch
    try:
        for item in generator:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
            batch += 1
        item = _Done()
    except BaseException as e:  # noqa: BLE001 - everything is handed to the consumer, nothing is lost
        e.add_note(f"raised in the embjax prefetch thread while building batch {batch} of {describe}")
        item = _Failure(e, batch)
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _shutdown(stop: threading.Event, out: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    try:  # unblock a producer waiting on a full queue without waiting for its timeout
        while True:
            out.get_nowait()
    except queue.Empty:
        pass
    if thread is not threading.current_thread():
        thread.join(timeout=5.0)


class BatchIterator:
    """Iterator over batch dicts; a background thread keeps up to `prefetch` batches ready.

    Close it (or use it as a context manager) to stop the thread early; it also stops when the
    iterator is garbage-collected or exhausted. An exception in the thread is re-raised here, unchanged
    in type, with a note naming the batch.
    """

    def __init__(self, generator: Iterator[Batch], prefetch: int, start_batch: int, total: int,
                 describe: str):
        self.num_batches = total
        self.start_batch = start_batch
        self._generator = generator
        self._finished = False
        self._thread = None
        if prefetch > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce, args=(generator, self._queue, self._stop, start_batch, describe),
                name="embjax-prefetch", daemon=True)
            self._generator = None  # the thread owns it now
            self._thread.start()
            self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._queue, self._thread)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            try:
                return next(self._generator)
            except StopIteration:
                self._finished = True
                raise
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():  # died without reporting (should not happen); do not hang
                    self.close()
                    raise RuntimeError("embjax prefetch thread ended without a result")
        if isinstance(item, _Done):
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        self._finished = True
        if self._thread is not None:
            self._finalizer()
        elif self._generator is not None:
            self._generator.close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


def batches(source, batch_size: int, *, shuffle_seed: int | None = None, epoch: int = 0,
            process_index: int = 0, process_count: int = 1, start_batch: int = 0,
            prefetch: int = 2) -> BatchIterator:
    """Yields {"image" uint8 (B, H, W, C), "label" int32 (B,), "mask" bool (B,), "index" int64 (B,)}.

    `index` is the sample's position in the source (-1 on padding). Batches start_batch, start_batch+1, ...,
    num_batches(len(source), batch_size, process_count) - 1 of this process are produced; prefetch=0 reads
    synchronously in the caller's thread.
    """
    n = len(source)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, process_count={process_count}), got {process_index}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0 (0 = no background thread), got {prefetch}")
    total = num_batches(n, batch_size, process_count)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must lie in [0, {total}] (this split has {total} batches of {batch_size} "
                         f"per process), got {start_batch}")
    share = process_share(sample_order(n, shuffle_seed, epoch), process_index, process_count)
    describe = (f"{total} (process {process_index} of {process_count}, batch_size {batch_size}) from {source!r}")
    return BatchIterator(_generate(source, batch_size, share, start_batch, total), prefetch, start_batch, total,
                         describe)
