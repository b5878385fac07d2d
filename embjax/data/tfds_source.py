"""Any tfds image-classification split as a random-access source, read without TensorFlow.

Reading goes through `tfds.data_source` machinery: the dataset must be prepared in array_record format,
and tfds then decodes images with PIL in NumPy (no TensorFlow; checked with tfds 4.9.10). Preparing is a
separate, one-time step: `download=True` lets tfds download and prepare, `manual_dir` points tfds at
archives it cannot download itself (imagenet2012: the ILSVRC2012 tars). Preparing some sets needs
TensorFlow (the imagenet2012 builder reads its label files with tf.io.gfile; builders that hand tfds raw
arrays need tf.image to encode them); reading them afterwards never does.

Images of varying size (imagenet2012) are made one shape on the host: the shorter side is resized to
`image_size`, then the centre square is cropped, so every batch stacks; each model resizes on device.
Samples are read and decoded in a thread pool (PIL releases the GIL while decoding), so a batch costs
about one image's decode time per thread.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from embjax.data.sources import CorruptDataError, DataNotFoundError, EmptySplitError, UnknownDatasetError


class MissingFeatureError(KeyError):
    """The dataset has no feature of the requested name (image or label key)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0])


def resize_shorter_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes (H, W, C) uint8 so its shorter side is `size` (bilinear, antialiased), then crops the centre square."""
    height, width, channels = image.shape
    scale = size / min(height, width)
    # Rounding the longer side (not truncating) keeps the aspect ratio within half a pixel.
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    if (new_h, new_w) != (height, width):
        # PIL widens the bilinear kernel by the scale factor when shrinking, i.e. it antialiases.
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = np.asarray(pil.crop((left, top, left + size, top + size)))
    return out[..., None] if channels == 1 else out


class TfdsSource:
    """A tfds data source yielding (image uint8 (H, W, C), label int); see `load`."""

    def __init__(self, data_source, *, name: str, split: str, image_key: str, label_key: str,
                 image_size: int | None, feature_shape: tuple, num_classes: int | None,
                 num_threads: int | None = None, location: str | None = None):
        self._ds = data_source
        self.location = location  # the prepared directory, named in errors
        self.name = name
        self.split = split
        self.image_key = image_key
        self.label_key = label_key
        self.image_size = image_size
        self.num_classes = num_classes
        self._feature_shape = feature_shape
        self._num_threads = num_threads or min(8, os.cpu_count() or 1)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        where = f"tfds '{self.name}' split '{self.split}' example {int(index)}" + (
            f" (in {self.location})" if self.location else "")
        try:
            example = self._ds[int(index)]
        except IndexError:
            raise
        except Exception as e:  # a damaged shard surfaces here as whatever array_record or PIL raise
            raise CorruptDataError(f"{where}: cannot be read or decoded ({type(e).__name__}: {str(e)[:300]}); "
                                   f"the prepared files are damaged: prepare the set again") from e
        image = np.asarray(example[self.image_key])
        if image.ndim == 2:  # some builders declare grayscale images without a channel axis
            image = image[..., None]
        channels = self._feature_shape[-1] if len(self._feature_shape) == 3 else 1
        if image.dtype != np.uint8 or image.ndim != 3 or (channels is not None and image.shape[-1] != channels):
            raise CorruptDataError(
                f"{where}: image of {image.dtype} {image.shape}; the dataset declares uint8 (H, W, {channels}) "
                "images. Pass image_key= if another feature holds the pixels")
        if self.image_size is not None:
            image = resize_shorter_and_center_crop(image, self.image_size)
        return image, int(example[self.label_key])

    def read_labels(self) -> np.ndarray:
        """Every label of the split, without decoding an image. Text labels (lfw's person names) are
        numbered in sorted order, so class filters like "even" / "odd" are deterministic."""
        raw = [self._ds[i][self.label_key] for i in range(len(self))]
        if raw and isinstance(raw[0], (bytes, str, np.bytes_, np.str_)):
            text = [r.decode() if isinstance(r, bytes) else str(r) for r in raw]
            ids = {n: k for k, n in enumerate(sorted(set(text)))}
            return np.asarray([ids[t] for t in text], np.int32)
        return np.asarray(raw, np.int32)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) of every sample, or None when the images vary in size and no image_size was given."""
        channels = self._feature_shape[-1] if len(self._feature_shape) == 3 else 1
        if self.image_size is not None:
            return (self.image_size, self.image_size, channels) if channels is not None else None
        shape = tuple(self._feature_shape) if len(self._feature_shape) == 3 else (*self._feature_shape, 1)
        return shape if all(d is not None for d in shape) else None

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._num_threads, thread_name_prefix=f"embjax-decode-{self.name}")
            return self._pool

    def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        if len(indices) <= 1 or self._num_threads == 1:
            samples = [self[i] for i in indices]
        else:
            samples = list(self._executor().map(self.__getitem__, indices))
        if not samples:
            shape = self.image_shape or (0, 0, 0)
            return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
        shapes = {s[0].shape for s in samples}
        if len(shapes) > 1:
            raise ValueError(
                f"tfds '{self.name}' split '{self.split}': images of different shapes {sorted(shapes)[:4]} cannot "
                "form one batch; pass image_size= to resize the shorter side and centre-crop to a square")
        images = np.stack([s[0] for s in samples])
        if images.dtype != np.uint8:
            raise ValueError(f"tfds '{self.name}': images must be uint8, the dataset gives {images.dtype}")
        return images, np.asarray([s[1] for s in samples], np.int32)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __repr__(self) -> str:
        return (f"TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image_size={self.image_size})")


def _check_shards(name: str, split: str, builder) -> None:
    """Every shard file the split's metadata lists exists and is not empty, before anything is read."""
    from etils import epath

    try:
        instructions = builder.info.splits[split].file_instructions
    except Exception:  # metadata too old or odd to list its files: reading will tell
        return
    bad = []
    for instruction in instructions:
        path = epath.Path(instruction.filename)
        if not path.exists():
            bad.append(f"{path} (missing)")
        elif path.stat().length == 0:
            bad.append(f"{path} (empty)")
    if bad:
        raise CorruptDataError(
            f"tfds '{name}' split {split!r} in {builder.data_dir}: {len(bad)} of its {len(instructions)} shard "
            f"file(s) unusable: {', '.join(bad[:5])}; the preparation was interrupted or files were removed: "
            "delete the directory and prepare the set again")


def load(name: str, split: str, data_dir: str | None = None, manual_dir: str | None = None,
         image_size: int | None = None, *, download: bool = False, image_key: str | None = None,
         label_key: str | None = None, num_threads: int | None = None) -> TfdsSource:
    """Opens split `split` (tfds syntax, slices allowed) of tfds dataset `name` as a source.

    image_key/label_key default to the dataset's supervised keys, else "image"/"label". A dataset that is
    not prepared is prepared only when `download` is true or `manual_dir` is given; otherwise the error says
    how to prepare it.
    """
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise ValueError(f"image_size must be a positive int (pixels), got {image_size!r}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise UnknownDatasetError(
            f"tfds has no dataset named {name!r} (tfds {tfds.__version__}); check the spelling against "
            "tfds.list_builders() or https://www.tensorflow.org/datasets/catalog") from e

    if not builder.is_prepared() and (download or manual_dir is not None):
        config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir is not None else None
        try:
            builder.download_and_prepare(download_config=config, file_format="array_record")
        except ModuleNotFoundError as e:
            raise DataNotFoundError(
                f"preparing tfds '{name}' needs {e.name} ({e}); install it for the one-time preparation "
                "(pip install tensorflow-cpu), or prepare the set on another machine and pass its data_dir; "
                "reading a prepared set needs no TensorFlow") from e
        except AssertionError as e:  # tfds asserts when manual files are missing
            raise DataNotFoundError(f"preparing tfds '{name}' from manual_dir={manual_dir!r} failed: {e}") from e

    prepared = builder.is_prepared()
    if prepared:
        # The split's size is known from the metadata: bad and empty splits fail here, with clear words,
        # instead of deep inside the array_record reader.
        try:
            num_examples = builder.info.splits[split].num_examples
        except (KeyError, ValueError, AssertionError) as e:
            known = ", ".join(builder.info.splits.keys()) or "none recorded"
            raise ValueError(f"tfds '{name}': cannot open split {split!r} ({e}); its splits are {known}") from e
        if num_examples == 0:
            raise EmptySplitError(f"tfds '{name}' split {split!r} is empty (no examples); pick another split or slice")
        _check_shards(name, split, builder)
    try:
        data_source = builder.as_data_source(split=split)
    except Exception as e:
        if not prepared:
            raise DataNotFoundError(
                f"tfds '{name}' is not prepared in {builder.data_dir}; pass download=True (needs internet), "
                "manual_dir= for sets tfds cannot download (imagenet2012: the directory holding "
                "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar), or data_dir= where it is prepared") from e
        if isinstance(e, NotImplementedError):
            raise DataNotFoundError(
                f"tfds '{name}' in {builder.data_dir} is prepared in a format without random access; "
                f"re-prepare it with file_format=array_record (tfds build {name} --file_format=array_record)") from e
        raise
    # An unprepared builder that still serves a data source is tfds.testing.mock_data at work: use it.

    features = builder.info.features
    supervised = builder.info.supervised_keys or ("image", "label")
    image_key = image_key or (supervised[0] if isinstance(supervised[0], str) else "image")
    label_key = label_key or (supervised[1] if isinstance(supervised[1], str) else "label")
    for role, key in (("image", image_key), ("label", label_key)):
        if key not in features:
            raise MissingFeatureError(
                f"tfds '{name}' has no feature {key!r} for the {role}; its features are {', '.join(features)}; "
                f"pass {role}_key=")
    feature_shape = tuple(features[image_key].shape)
    if image_size is None and any(d is None for d in feature_shape[:2]):
        raise ValueError(
            f"tfds '{name}' images vary in size (feature shape {feature_shape}); pass image_size= so the host "
            "resizes the shorter side and centre-crops every image to one square shape")
    label_feature = features[label_key]
    num_classes = getattr(label_feature, "num_classes", None)

    if len(data_source) == 0:
        raise EmptySplitError(f"tfds '{name}' split {split!r} is empty (no examples); pick another split or slice")
    return TfdsSource(data_source, name=name, split=split, image_key=image_key, label_key=label_key,
                      image_size=image_size, feature_shape=feature_shape, num_classes=num_classes,
                      num_threads=num_threads, location=str(builder.data_dir) if prepared else None)
