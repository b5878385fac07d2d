"""Data pipelines: idx parsing, Fashion-MNIST loading, tfds sources (mock and a real array_record set
prepared here without TensorFlow), and padded, masked, sharded, resumable, prefetched batches."""
import gc
import gzip
import io
import queue
import struct
import threading
import time
import types

import numpy as np
import pytest

from embjax import data
from embjax.data import fashion_mnist
from embjax.data.sources import parse_split

# ------------------------------------------------------------------------------------------------
# idx files

_TYPE = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
         np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray, big_endian_dtype=None) -> bytes:
    """An idx file written from the format's definition (independent of the reader under test)."""
    dt = np.dtype(big_endian_dtype or array.dtype)
    head = bytes([0, 0, _TYPE[dt], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(dt).tobytes()


def write_idx(path, array, gz=True, dtype=None):
    raw = idx_bytes(array, dtype)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_every_type(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 4, 5)) * 50).astype(np.dtype(dtype).newbyteorder("="))
    path = write_idx(tmp_path / ("x.idx" + (".gz" if gz else "")), array, gz, dtype)
    out = fashion_mnist.read_idx(path)
    assert out.shape == array.shape and out.dtype.kind == array.dtype.kind
    np.testing.assert_array_equal(out, array)  # integers and exactly representable floats: bit-exact


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    good = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    cases = {
        "short.idx": good[:-7],  # data cut short
        "long.idx": good + b"\0",  # trailing garbage
        "magic.idx": b"\x1f\x8b" + good[2:],  # not an idx header
        "header.idx": good[:9],  # cut inside the dimension list
        "empty.idx": b"",
        "cut.gz": gzip.compress(good)[:-10],  # truncated gzip stream
    }
    for name, raw in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(data.CorruptDataError, match=name.replace(".", r"\.")):
            fashion_mnist.read_idx(path)
    with pytest.raises(data.DataNotFoundError, match="nope.idx"):
        fashion_mnist.read_idx(tmp_path / "nope.idx")


def make_fmnist_dir(path, n_train=50, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


def test_fashion_mnist_from_a_directory_and_slices(tmp_path, monkeypatch):
    truth = make_fmnist_dir(tmp_path)
    images, labels = fashion_mnist.load("train", tmp_path)
    assert images.shape == (50, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], truth["train"][0])
    np.testing.assert_array_equal(labels, truth["train"][1])
    for split, sl in (("train[:10%]", slice(0, 5)), ("train[10:20]", slice(10, 20)), ("test[-5:]", slice(15, 20)),
                      ("test[50%:]", slice(10, 20)), ("train[:2000]", slice(0, 50))):
        base = split.split("[")[0]
        x, y = fashion_mnist.load(split, tmp_path)
        np.testing.assert_array_equal(x[..., 0], truth[base][0][sl], err_msg=split)
        np.testing.assert_array_equal(y, truth[base][1][sl], err_msg=split)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    assert fashion_mnist.load("test")[0].shape[0] == 20
    with pytest.raises(data.EmptySplitError, match="empty"):
        fashion_mnist.load("test[:0]")
    for bad in ("validation", "train[::2]", "train+test"):
        with pytest.raises(ValueError, match="split"):
            fashion_mnist.load(bad)
    src = data.get_source("fashion_mnist", "train[:7]", data_dir=tmp_path, manual_dir=None, image_size=None)
    assert len(src) == 7 and src.image_shape == (28, 28, 1)
    with pytest.raises(ValueError, match="image_size"):
        data.get_source("fashion_mnist", "train", data_dir=tmp_path, image_size=64)


def test_parse_split_rounds_percent_like_tfds():
    # tfds rounds percent boundaries to the closest example: 33% of 10 -> 3.3 -> 3, 35% -> 3.5 -> 4 (round
    # half to even gives 4 as well).
    assert parse_split("train[:33%]", {"train": 10}) == ("train", 0, 3)
    assert parse_split("train[:35%]", {"train": 10}) == ("train", 0, 4)
    assert parse_split("train[-3:-1]", {"train": 10}) == ("train", 7, 9)


def test_fashion_mnist_bad_directories(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="/nonexistent/fmnist"):
        fashion_mnist.load("train", "/nonexistent/fmnist")
    with pytest.raises(data.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load("train", tmp_path)  # exists but holds no files
    truth = make_fmnist_dir(tmp_path)
    bad = truth["train"][1].copy()
    bad[3] = 10
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", bad)
    with pytest.raises(data.CorruptDataError, match=r"\[0, 10\)"):
        fashion_mnist.load("train", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", truth["train"][1][:-1])
    with pytest.raises(data.CorruptDataError, match="49 labels"):
        fashion_mnist.load("train", tmp_path)
    raw = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.CorruptDataError, match="t10k-images-idx3-ubyte.gz"):
        fashion_mnist.load("test", tmp_path)


@pytest.mark.skipif(not (fashion_mnist.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files(monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    images, labels = fashion_mnist.load("test")
    assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.shape == (10_000,)
    # The published test set is balanced: 1000 images of each of the 10 classes.
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))
    train_images, train_labels = fashion_mnist.load("train")
    assert train_images.shape == (60_000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), np.full(10, 6000))
    # The widely quoted training-set pixel mean is 0.2860 (of 255); it has 4 digits, so agree to 1e-4.
    assert abs(train_images.mean() / 255 - 0.2860) < 1e-4


def test_fashion_mnist_falls_back_to_tfds(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    # Not prepared (an empty tfds data_dir) and no download allowed: the error says what to install.
    with pytest.raises(data.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load("test", tfds_data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=6):
        images, labels = fashion_mnist.load("test")
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10


# ------------------------------------------------------------------------------------------------
# Batching


def coded_source(n, shape=(2, 3, 1)):
    """Image i is filled with i % 251 and labelled i % 7, so every row of a batch says where it came from."""
    images = np.stack([np.full(shape, i % 251, np.uint8) for i in range(n)]) if n else np.zeros((0, *shape), np.uint8)
    return data.ArraySource(images, np.arange(n) % 7)


class PlainSource:
    """Only __len__ and __getitem__ (no get_batch, no image_shape); records what it read."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at, self.read = n, fail_at, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyError(f"sample {i} is unreadable")
        self.read.append(i)
        return np.full((2, 2, 3), i % 251, np.uint8), i % 5


def check_batch(batch, batch_size):
    assert batch["image"].dtype == np.uint8 and batch["image"].shape[0] == batch_size
    assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool and batch["index"].dtype == np.int64
    idx, mask = batch["index"], batch["mask"]
    np.testing.assert_array_equal(mask, idx >= 0)
    real = idx[mask]
    np.testing.assert_array_equal(batch["image"][mask].reshape(len(real), -1 if len(real) else 0).max(1, initial=0), real % 251)
    np.testing.assert_array_equal(batch["label"][mask], real % 7)
    assert not batch["image"][~mask].any() and not batch["label"][~mask].any()
    # Padding only at the end of a batch.
    assert mask.tolist() == sorted(mask.tolist(), reverse=True)


@pytest.mark.parametrize("n,batch_size,processes", [(23, 4, 3), (24, 4, 3), (5, 2, 4), (2, 3, 4), (1, 1, 1),
                                                    (100, 7, 2)])
@pytest.mark.parametrize("seed", [None, 3])
def test_shards_are_disjoint_equal_in_count_and_cover_the_split(n, batch_size, processes, seed):
    src = coded_source(n)
    expected_batches = -(-(-(-n // processes)) // batch_size)  # ceil(ceil(n / P) / B), written out
    assert data.num_batches(n, batch_size, processes) == expected_batches
    seen = []
    for p in range(processes):
        out = list(data.batches(src, batch_size, shuffle_seed=seed, process_index=p, process_count=processes))
        assert len(out) == expected_batches
        for b in out:
            check_batch(b, batch_size)
            seen.extend(b["index"][b["mask"]].tolist())
        # Every batch of a process but its last ones is full: padding only where the share ran out.
        counts = [int(b["mask"].sum()) for b in out]
        assert counts == sorted(counts, reverse=True)
    assert sorted(seen) == list(range(n))  # each sample exactly once over all processes


def test_order_is_deterministic_and_seeded():
    src = coded_source(50)
    run = lambda **kw: np.concatenate([b["index"] for b in data.batches(src, 8, **kw)])  # noqa: E731
    np.testing.assert_array_equal(run(), np.r_[np.arange(50), -np.ones(6, int)])
    a, b = run(shuffle_seed=1, epoch=0), run(shuffle_seed=1, epoch=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(shuffle_seed=1, epoch=1))
    assert not np.array_equal(a, run(shuffle_seed=2, epoch=0))
    assert sorted(a[a >= 0]) == list(range(50))


def test_start_batch_resumes_without_reading_skipped_batches():
    full = list(data.batches(coded_source(30), 4, shuffle_seed=5, prefetch=0))
    src = PlainSource(30)
    resumed = list(data.batches(src, 4, shuffle_seed=5, start_batch=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        np.testing.assert_array_equal(a["index"], b["index"])
    skipped = {i for b in full[:3] for i in b["index"].tolist()}
    assert not skipped & set(src.read)
    assert list(data.batches(src, 4, start_batch=len(full))) == []
    with pytest.raises(ValueError, match="start_batch"):
        data.batches(src, 4, start_batch=len(full) + 1)


def test_plain_source_and_all_padding_batches():
    src = PlainSource(2)
    # Shares are [p n / P, (p + 1) n / P): with n = 2, P = 4 process 0 gets [0, 0), nothing.
    out = list(data.batches(src, 2, process_index=0, process_count=4))
    assert len(out) == 1 and not out[0]["mask"].any()
    assert out[0]["image"].shape == (2, 2, 2, 3) and (out[0]["index"] == -1).all()


def test_prefetch_gives_the_same_batches_as_synchronous_reading():
    src = coded_source(37)
    a = list(data.batches(src, 5, shuffle_seed=0, prefetch=0))
    b = list(data.batches(src, 5, shuffle_seed=0, prefetch=3))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_prefetch_reraises_the_worker_error_with_the_batch_named():
    it = data.batches(PlainSource(20, fail_at=13), 4, prefetch=2)
    got = [next(it), next(it), next(it)]  # batches 0-2 hold samples 0-11
    assert len(got) == 3
    with pytest.raises(KeyError, match="sample 13 is unreadable") as info:
        next(it)
    assert any("batch 3 of 5" in note for note in info.value.__notes__)
    with pytest.raises(StopIteration):
        next(it)
    assert not it._thread.is_alive()


def test_prefetch_is_bounded_and_stops_on_close_and_on_garbage_collection(monkeypatch):
    # The prefetch thread's queue reports every put that finds it full, with the samples read and the
    # batches the consumer had taken by then. While that put waits the thread reads nothing more, so the
    # bound is checked at moments the test knows, not after a guessed wait: t batches taken, two queued
    # and one built and waiting to be queued is (t + 3) x 10 samples. An unbounded queue is never full:
    # the wait below then fails.
    from embjax.data import pipeline

    src = PlainSource(1000)
    events, taken, seen = [], [0], threading.Condition()

    class WatchedQueue(queue.Queue):
        def put(self, item, block=True, timeout=None):
            if self.full():
                with seen:
                    events.append((taken[0], len(src.read)))
                    seen.notify_all()
            return super().put(item, block, timeout)

        def get(self, block=True, timeout=None):
            item = super().get(block, timeout)
            with seen:
                taken[0] += 1
            return item

    monkeypatch.setattr(pipeline, "queue", types.SimpleNamespace(Queue=WatchedQueue, Full=queue.Full,
                                                                 Empty=queue.Empty))
    it = data.batches(src, 10, prefetch=2)
    next(it)
    with seen:  # the timeout only keeps a broken bound from hanging the suite
        assert seen.wait_for(lambda: any(t == 1 for t, _ in events), timeout=120), events
        assert all(read <= (t + 3) * 10 for t, read in events), events
        assert len(src.read) == 40, events  # one taken, the thread waiting to queue the fourth batch
    thread = it._thread
    it.close()
    assert not thread.is_alive()

    it = data.batches(PlainSource(1000), 10, prefetch=2)
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert not any(t.name == "embjax-prefetch" and t is thread for t in threading.enumerate())


def test_bad_batch_arguments():
    src = coded_source(4)
    for kwargs, needle in (({"process_index": 2, "process_count": 2}, "process_index"),
                           ({"prefetch": -1}, "prefetch")):
        with pytest.raises(ValueError, match=needle):
            data.batches(src, 2, **kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(src, 0)
    with pytest.raises(ValueError, match="uint8"):
        data.ArraySource(np.zeros((2, 3, 3, 1), np.float32), np.zeros(2, int))
    with pytest.raises(ValueError, match="channel"):
        data.ArraySource(np.zeros((2, 3, 3), np.uint8), np.zeros(2, int))


# ------------------------------------------------------------------------------------------------
# tfds sources


def test_tfds_mock_imagenet_through_the_loader_and_batches():
    import tensorflow_datasets as tfds

    from embjax.data import tfds_source

    with tfds.testing.mock_data(num_examples=9):
        src = tfds_source.load("imagenet2012", "train", image_size=24)
        assert len(src) == 9 and src.image_shape == (24, 24, 3) and src.num_classes == 1000
        out = list(data.batches(src, 4))
        assert len(out) == 3 and out[-1]["mask"].tolist() == [True, False, False, False]
        for b in out:
            assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.uint8
            assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
        with pytest.raises(ValueError, match="image_size"):
            tfds_source.load("imagenet2012", "validation")  # variable-size images need a host size
        mnist = data.get_source("mnist", "test")
        assert mnist.image_shape == (28, 28, 1) and mnist.get_batch([0, 1])[0].shape == (2, 28, 28, 1)
    with tfds.testing.mock_data(num_examples=0):
        with pytest.raises(data.EmptySplitError, match="imagenet2012"):
            tfds_source.load("imagenet2012", "validation", image_size=8)


def test_tfds_unknown_and_unprepared(tmp_path):
    from embjax.data import tfds_source

    with pytest.raises(data.UnknownDatasetError, match="no_such_dataset"):
        tfds_source.load("no_such_dataset", "train")
    with pytest.raises(data.DataNotFoundError, match="manual_dir"):
        tfds_source.load("imagenet2012", "validation", data_dir=str(tmp_path), image_size=8)


def test_resize_shorter_side_and_centre_crop_geometry():
    from embjax.data.tfds_source import resize_shorter_and_center_crop

    # No resize needed: the crop alone must take the exact centre columns.
    wide = np.tile(np.arange(30, dtype=np.uint8)[None, :, None], (10, 1, 3))
    np.testing.assert_array_equal(resize_shorter_and_center_crop(wide, 10), wide[:, 10:20])
    # A horizontal ramp v = 4x (x = input pixel centre) shrunk 2x: an antialiased bilinear filter is
    # symmetric and sums to one, so it reproduces a linear function exactly away from the borders; output
    # column c sits at input x = 2c + 0.5, i.e. value 8c + 2. Pixels are rounded to uint8: allow 1.
    ramp = np.tile((4 * np.arange(60)).astype(np.uint8)[None, :, None], (20, 1, 1))
    out = resize_shorter_and_center_crop(ramp, 10)
    assert out.shape == (10, 10, 1)
    expected = 8 * (np.arange(10) + 10) + 2  # the crop keeps columns 10..19 of the 30-wide resize
    assert np.abs(out[5, :, 0].astype(int) - expected).max() <= 1
    tall = np.zeros((31, 9, 3), np.uint8)
    assert resize_shorter_and_center_crop(tall, 16).shape == (16, 16, 3)


@pytest.fixture(scope="module")
def prepared_tfds(tmp_path_factory):
    """A real array_record tfds dataset of variable-size JPEGs, prepared here without TensorFlow."""
    import tensorflow_datasets as tfds
    from PIL import Image

    rng = np.random.default_rng(0)
    truth = []
    for i in range(11):
        h, w = rng.integers(12, 40, 2)
        # Smooth content survives JPEG nearly unchanged, so decoded pixels can be compared with the source.
        yy, xx = np.mgrid[:h, :w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), np.full((h, w), 40 * (i % 6))], -1).astype(np.uint8)
        truth.append((img, i % 4))

    class EmbjaxTestImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=4)}), supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (img, label) in enumerate(truth):
                buf = io.BytesIO()
                # Encoded by PIL here: tfds would need TensorFlow to encode NumPy arrays itself.
                Image.fromarray(img).save(buf, format="JPEG", quality=95)
                buf.seek(0)
                yield i, {"image": buf, "label": label}

    data_dir = tmp_path_factory.mktemp("tfds")
    EmbjaxTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir), truth


def test_real_array_record_dataset_without_tensorflow(prepared_tfds):
    import importlib.util

    from embjax.data import tfds_source

    data_dir, truth = prepared_tfds
    assert importlib.util.find_spec("tensorflow") is None  # the point of the test
    with pytest.raises(ValueError, match="image_size"):
        tfds_source.load("embjax_test_images", "train", data_dir=data_dir)
    src = tfds_source.load("embjax_test_images", "train", data_dir=data_dir, image_size=12)
    assert len(src) == 11 and src.num_classes == 4
    # tfds shuffles examples when it writes them: match each decoded sample to its source by content.
    sizes = {(img.shape[0], img.shape[1]) for img, _ in truth}
    seen_labels = []
    for i in range(len(src)):
        example = src._ds[i]
        img = example["image"]
        assert (img.shape[0], img.shape[1]) in sizes
        match = [t for t in truth if t[0].shape == img.shape and
                 np.abs(t[0].astype(int) - img).mean() < 3]  # JPEG q95 on smooth ramps: mean error ~1
        assert len(match) >= 1
        assert int(example["label"]) == match[0][1]
        seen_labels.append(int(example["label"]))
    assert sorted(seen_labels) == sorted(t[1] for t in truth)
    serial = tfds_source.load("embjax_test_images", "train", data_dir=data_dir, image_size=12, num_threads=1)
    a, la = src.get_batch(np.arange(11))
    b, lb = serial.get_batch(np.arange(11))
    assert a.shape == (11, 12, 12, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    sliced = tfds_source.load("embjax_test_images", "train[2:5]", data_dir=data_dir, image_size=12)
    np.testing.assert_array_equal(sliced.get_batch([0, 1, 2])[0], a[2:5])
    with pytest.raises(data.EmptySplitError, match="empty"):
        tfds_source.load("embjax_test_images", "train[11:]", data_dir=data_dir, image_size=12)
    with pytest.raises(ValueError, match="its splits are train"):
        tfds_source.load("embjax_test_images", "validation", data_dir=data_dir, image_size=12)
    with pytest.raises(KeyError, match="features are image, label"):
        tfds_source.load("embjax_test_images", "train", data_dir=data_dir, image_size=12, label_key="fine_label")


# ------------------------------------------------------------------------------------------------
# Broken data files: each ends in a clear error naming the file (listed in tests/README.md)


def test_idx_truncated_at_every_offset_and_flipped(tmp_path):
    rng = np.random.default_rng(7)
    array = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    raw = idx_bytes(array)
    for gz in (False, True):
        blob = gzip.compress(raw) if gz else raw
        path = tmp_path / ("cut.idx.gz" if gz else "cut.idx")
        for keep in range(len(blob)):
            path.write_bytes(blob[:keep])
            with pytest.raises(data.CorruptDataError, match=path.name.replace(".", r"\.")):
                fashion_mnist.read_idx(path)
    # A gzip stream carries a CRC: every flipped bit of it is an error or (in the gzip header's
    # timestamp/flags, which do not touch the data) the original array, never a different one.
    blob = gzip.compress(raw)
    path = tmp_path / "flip.idx.gz"
    for offset in range(len(blob)):
        flipped = bytearray(blob)
        flipped[offset] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(flipped))
        try:
            got = fashion_mnist.read_idx(path)
        except data.CorruptDataError as e:
            assert "flip.idx.gz" in str(e)
        else:
            np.testing.assert_array_equal(got, array, err_msg=f"flip at byte {offset}")


def test_idx_sizes_that_lie(tmp_path):
    import tracemalloc
    # Four dimensions of 2**16: 2**64 elements, which wraps to 0 in int64 arithmetic.
    path = tmp_path / "wrap.idx"
    path.write_bytes(bytes([0, 0, 0x08, 4]) + struct.pack(">4I", *(1 << 16,) * 4))
    with pytest.raises(data.CorruptDataError, match=r"wrap\.idx.*\(65536, 65536, 65536, 65536\)"):
        fashion_mnist.read_idx(path)
    # A gzip file declaring more than deflate could ever produce from its size.
    path = tmp_path / "claims.idx.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 1 << 30) + b"\0" * 64))
    with pytest.raises(data.CorruptDataError, match=r"claims\.idx\.gz.*compressed"):
        fashion_mnist.read_idx(path)
    # A decompression bomb: the header declares 10 bytes, the stream inflates to 64 MiB of zeros.
    path = tmp_path / "bomb.idx.gz"
    bomb = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + bytes(64 << 20)
    path.write_bytes(gzip.compress(bomb, compresslevel=9))
    del bomb
    tracemalloc.start()
    start = time.process_time()
    with pytest.raises(data.CorruptDataError, match=r"bomb\.idx\.gz.*holds more"):
        fashion_mnist.read_idx(path)
    elapsed = time.process_time() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < (1 << 20), (elapsed, peak)  # 11 bytes read, never 64 MiB


def test_fashion_mnist_images_of_unexpected_shape_or_dtype(tmp_path):
    make_fmnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((20, 32, 32), np.uint8))
    with pytest.raises(data.CorruptDataError, match=r"t10k-images-idx3-ubyte\.gz.*\(20, 32, 32\)"):
        fashion_mnist.load("test", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.float32), dtype=">f4")
    with pytest.raises(data.CorruptDataError, match=r"t10k-images-idx3-ubyte\.gz.*float32"):
        fashion_mnist.load("test", tmp_path)


def _damaged_copy(prepared_tfds, tmp_path):
    import shutil

    data_dir, _ = prepared_tfds
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    (shard,) = list(copy.glob("embjax_test_images/1.0.0/*.array_record-*"))
    return str(copy), shard


def test_tfds_missing_or_empty_shard_names_the_file(prepared_tfds, tmp_path):
    from embjax.data import tfds_source

    copy, shard = _damaged_copy(prepared_tfds, tmp_path)
    shard.unlink()
    with pytest.raises(data.CorruptDataError, match=rf"{shard.name} \(missing\).*prepare the set again"):
        tfds_source.load("embjax_test_images", "train", data_dir=copy, image_size=12)
    shard.write_bytes(b"")
    with pytest.raises(data.CorruptDataError, match=rf"{shard.name} \(empty\)"):
        tfds_source.load("embjax_test_images", "train[2:5]", data_dir=copy, image_size=12)


def test_tfds_truncated_shard_names_the_example_and_directory(prepared_tfds, tmp_path):
    from embjax.data import tfds_source

    copy, shard = _damaged_copy(prepared_tfds, tmp_path)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    src = tfds_source.load("embjax_test_images", "train", data_dir=copy, image_size=12, num_threads=1)
    with pytest.raises(data.CorruptDataError, match=rf"embjax_test_images.*example \d+ \(in {copy}"):
        src.get_batch(np.arange(len(src)))


@pytest.mark.parametrize("image,match", [
    (np.zeros((5, 5, 3), np.float32), "float32"),
    (np.zeros((5, 5, 4), np.uint8), r"\(5, 5, 4\)"),
    (np.zeros((2, 5, 5, 3), np.uint8), r"\(2, 5, 5, 3\)"),
])
def test_tfds_images_of_unexpected_shape_or_dtype(image, match):
    from embjax.data import tfds_source

    src = tfds_source.TfdsSource([{"image": image, "label": 1}], name="fake", split="train", image_key="image",
                                 label_key="label", image_size=None, feature_shape=(5, 5, 3), num_classes=2,
                                 location="/data/fake")
    with pytest.raises(data.CorruptDataError, match=rf"tfds 'fake' split 'train' example 0 \(in /data/fake\).*{match}"):
        src[0]


class OddSource:
    """A plain source whose sample `odd` differs from the others (shape or label)."""

    def __init__(self, n, odd, image=None, label=None, image_shape=None):
        self.n, self.odd, self.odd_image, self.odd_label = n, odd, image, label
        if image_shape is not None:
            self.image_shape = image_shape

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image, label = np.zeros((4, 4, 3), np.uint8), 1
        if i == self.odd:
            image = self.odd_image if self.odd_image is not None else image
            label = self.odd_label if self.odd_label is not None else label
        return image, label

    def __repr__(self):
        return "OddSource"


@pytest.mark.parametrize("kwargs,match", [
    ({"image": np.zeros((5, 4, 3), np.uint8)}, r"sample 6 has an image of shape \(5, 4, 3\)"),
    ({"image": np.zeros((4, 4, 3), np.float32)}, "expected uint8 images.*float32"),
    ({"label": 1.5}, "expected 4 integer labels, got float64"),
    ({"image_shape": (8, 8, 3)}, r"images of shape \(4, 4, 3\), the source declares \(8, 8, 3\)"),
])
def test_batches_with_unexpected_images_or_labels_name_the_source_and_batch(kwargs, match):
    it = data.batches(OddSource(10, odd=6, **kwargs), 4, prefetch=0)
    with pytest.raises(data.CorruptDataError, match=rf"OddSource.*{match}" if "sample 6" in match else
                       rf"OddSource, batch starting at sample \d+: {match}"):
        list(it)
