"""Fashion-MNIST from its idx files (Debian's dataset-fashion-mnist), with the tfds builder as fallback.

The idx files are looked for in `data_dir`, else `$EMBJAX_FASHION_MNIST_DIR`, else
/usr/share/datasets/fashion-mnist, where `apt-get install dataset-fashion-mnist` puts them (launch.sh does
that on a fresh machine). Only when none of these was set explicitly and the Debian directory is absent
does `load` fall back to an already prepared tfds `fashion_mnist` (array_record format, read without
TensorFlow). Every file is validated (magic number, dimensions, byte count) before use, so a truncated
download fails with the file's name instead of yielding garbage.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from embjax.data.sources import (ArraySource, CorruptDataError, DataNotFoundError, EmptySplitError,
                                 check_labels, parse_split)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "EMBJAX_FASHION_MNIST_DIR"
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SHAPE = (28, 28, 1)
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_FILE_PREFIX = {"train": "train", "test": "t10k"}

# idx type byte -> big-endian NumPy dtype (the format stores every multi-byte number big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_INSTALL_HINT = (
    "install the Debian package (sudo apt-get install dataset-fashion-mnist, which puts the idx files in "
    f"{DEBIAN_DIR}), or set ${ENV_VAR} / pass data_dir= pointing at a directory holding "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz (gzipped or not), or prepare tfds 'fashion_mnist' in array_record format "
    "(tfds build fashion_mnist --file_format=array_record; needs TensorFlow and internet once)")


# Deflate cannot compress better than about 1032:1, so a gzip member that claims to inflate to more than
# this many times its own size is lying (or is a decompression bomb): refused before inflating it.
_MAX_DEFLATE_RATIO = 1032


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one idx file (optionally gzipped) into an array of its native shape and dtype.

    The header is read and checked first; then exactly the bytes it declares (and one more, to catch
    trailing data) are read, so a gzip stream that inflates past what the header promises is never
    inflated whole. Every failure is a CorruptDataError (or DataNotFoundError) naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"idx file {path} does not exist")
    gz = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
                raise CorruptDataError(
                    f"idx file {path} does not start with an idx magic number (00 00 <type> <ndim>), got "
                    f"{head.hex(' ') or 'an empty file'}; it is not an idx file or it is corrupt")
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            ndim = head[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise CorruptDataError(f"idx file {path} is truncated inside its header ({4 + len(dims)} bytes)")
            shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
            header = 4 + 4 * ndim
            nbytes = 1
            for d in shape:  # Python ints: four dimensions of 2**16 must not wrap around to 0
                nbytes *= d
            nbytes *= dtype.itemsize
            stored = path.stat().st_size
            limit = stored * _MAX_DEFLATE_RATIO if gz else stored - header
            if nbytes > limit:
                raise CorruptDataError(
                    f"idx file {path}: header says shape {shape} of {dtype.name} ({header + nbytes:,} bytes in all) "
                    f"but the file holds {stored:,} bytes{' compressed' if gz else ''}; it is truncated or corrupt: "
                    "delete it and reinstall / re-download it")
            raw = f.read(nbytes + 1)
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise CorruptDataError(
            f"idx file {path} is not a readable {'gzip stream' if gz else 'file'} ({e}); the file is truncated "
            "or corrupt: delete it and reinstall / re-download it") from e
    if len(raw) != nbytes:
        raise CorruptDataError(
            f"idx file {path}: header says shape {shape} of {dtype.name} ({header + nbytes:,} bytes in all) but "
            f"the file holds {'more' if len(raw) > nbytes else header + len(raw)} bytes; it is truncated or "
            "corrupt: delete it and reinstall / re-download it")
    return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_split(directory: Path, base: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _FILE_PREFIX[base]
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise DataNotFoundError(
            f"Fashion-MNIST '{base}' files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) "
            f"not found in {directory}; {_INSTALL_HINT}")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
        raise CorruptDataError(
            f"{images_path}: expected uint8 images of shape (n, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CorruptDataError(f"{labels_path}: expected uint8 labels of shape (n,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise CorruptDataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            "the two files come from different releases or one is damaged")
    check_labels(labels, NUM_CLASSES, str(labels_path))
    return images[..., None], labels.astype(np.int32)


def _from_tfds(split: str, tfds_data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    from embjax.data import tfds_source  # tfds is a heavy import; only the fallback pays for it

    try:
        source = tfds_source.load("fashion_mnist", split, data_dir=tfds_data_dir, download=download)
    except DataNotFoundError as e:
        raise DataNotFoundError(
            f"Fashion-MNIST: no idx files in {DEBIAN_DIR} and no prepared tfds 'fashion_mnist' ({e}); "
            f"{_INSTALL_HINT}") from e
    images, labels = source.get_batch(np.arange(len(source)))
    return images, labels.astype(np.int32)


def load(split: str, data_dir: str | os.PathLike | None = None, *, tfds_data_dir: str | None = None,
         download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (n, 28, 28, 1), labels int32 (n,)) for "train", "test" or a slice of one.

    `download=True` lets the tfds fallback download and prepare the set (needs internet and TensorFlow);
    by default the fallback only reads a copy that is already prepared.
    """
    base, start, stop = parse_split(split, SPLIT_SIZES)  # validates the split before touching any file
    explicit = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or None
    directory = Path(explicit) if explicit is not None else DEBIAN_DIR
    if explicit is None and not directory.is_dir():
        images, labels = _from_tfds(split, tfds_data_dir, download)
    else:
        if not directory.is_dir():
            raise DataNotFoundError(
                f"Fashion-MNIST directory {directory} (from {'data_dir' if data_dir is not None else '$' + ENV_VAR}) "
                f"does not exist; {_INSTALL_HINT}")
        images, labels = _read_split(directory, base)
        # The slice is resolved against the files' real length (a custom directory may hold fewer examples).
        _, start, stop = parse_split(split, {base: images.shape[0]})
        images, labels = images[start:stop], labels[start:stop]
    if images.shape[0] == 0:
        raise EmptySplitError(f"Fashion-MNIST split {split!r} is empty (no examples); widen the slice")
    return images, labels


def source(split: str, data_dir: str | os.PathLike | None = None, *, manual_dir: str | None = None,
           image_size: int | None = None, **kwargs) -> ArraySource:
    """`load` wrapped as an in-memory source for `batches`.

    manual_dir and image_size exist so that one call serves every dataset (`embjax.data.get_source`); for
    Fashion-MNIST they must be unset (or image_size 28): its images all have one shape already, and the
    models resize on device.
    """
    if manual_dir is not None:
        raise ValueError(f"Fashion-MNIST takes no manual_dir (got {manual_dir!r}); use data_dir for the idx files")
    if image_size not in (None, IMAGE_SHAPE[0]):
        raise ValueError(f"Fashion-MNIST images are 28x28 and are not resized on the host (got image_size="
                         f"{image_size!r}); leave image_size unset, each model resizes on device")
    images, labels = load(split, data_dir, **kwargs)
    return ArraySource(images, labels, name=f"fashion_mnist:{split}")
