"""Input pipelines: Fashion-MNIST idx files, tfds datasets, padded and masked batches."""
from __future__ import annotations

from embjax.data import fashion_mnist
from embjax.data.pipeline import BatchIterator, batches, num_batches
from embjax.data.sources import (ArraySource, CorruptDataError, DataNotFoundError, EmptySplitError, Prefix,
                                 Source, UnknownDatasetError)
from embjax.data.rows import RowSource, store_rows
from embjax.data.subsets import Subset, all_rows, class_disjoint, class_filter, labels_of

__all__ = [
    "ArraySource", "RowSource", "store_rows", "BatchIterator", "Prefix", "CorruptDataError", "DataNotFoundError", "EmptySplitError", "Source",
    "UnknownDatasetError", "Subset", "all_rows", "batches", "class_disjoint", "class_filter", "labels_of", "sources", "fashion_mnist", "get_source", "num_batches", "tfds_source",
]


def get_source(dataset: str, split: str, **kwargs):
    """A source for `batches`: "fashion_mnist" from the local idx files (tfds as fallback), anything else
    through tfds (`tfds_source.load`'s keyword arguments: data_dir, manual_dir, image_size, download, ...)."""
    if dataset == "fashion_mnist":
        return fashion_mnist.source(split, **kwargs)
    from embjax.data import tfds_source
    return tfds_source.load(dataset, split, **kwargs)


def sources(config, *splits: str) -> tuple:
    """A source per split of `config.dataset`, opened with the config's data_dir, manual_dir and image_size
    (fields a study config leaves out count as None)."""
    kw = {k: getattr(config, k, None) for k in ("data_dir", "manual_dir", "image_size")}
    return tuple(get_source(config.dataset, split, **kw) for split in splits)


def __getattr__(name: str):
    # tensorflow_datasets takes about a second to import; only code that reads tfds sets pays for it.
    if name == "tfds_source":
        import importlib
        return importlib.import_module("embjax.data.tfds_source")
    raise AttributeError(f"module 'embjax.data' has no attribute {name!r}")
