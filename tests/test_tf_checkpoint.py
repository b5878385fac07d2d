"""embjax.weights.tf_checkpoint against checkpoints written by TensorFlow itself (tests/fixtures/tf/,
made by tests/fixtures/make_tf_checkpoints.py; TensorFlow is not needed here)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import time

import numpy as np
import pytest

from embjax.models import registry
from embjax.weights import tf_checkpoint
from embjax.weights.tf_checkpoint import TFCheckpointError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf")
NETWORKS = ("resnet_v1_152", "resnet_v2_152", "inception_v3", "inception_resnet_v2", "mobilenet_v2")


def _expected(name):
    return np.load(os.path.join(FIXTURES, name, "expected.npz"))


def _digest(value) -> str:
    """The digest make_tf_checkpoints.variable_digest wrote: dtype, shape and C-order bytes."""
    value = np.ascontiguousarray(value)
    header = f"{value.dtype.str}|{','.join(map(str, value.shape))}|".encode()
    return hashlib.sha256(header + value.tobytes()).hexdigest()


def test_every_dtype_comes_back_exactly_and_strings_are_left_out():
    arrays = tf_checkpoint.load(os.path.join(FIXTURES, "dtypes", "model.ckpt"))
    expected = {k[len("var/"):]: v for k, v in _expected("dtypes").items()}
    assert set(arrays) == set(expected)  # the string variable 'str/labels' is read, checked and dropped
    for name, value in expected.items():
        assert arrays[name].dtype == value.dtype, name
        assert arrays[name].shape == value.shape, name
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)


@pytest.mark.parametrize("network", NETWORKS)
def test_network_checkpoints_match_tensorflows_values_bit_for_bit(network):
    arrays = tf_checkpoint.load(os.path.join(FIXTURES, network, "model.ckpt"))
    expected = _expected(network)
    digests = {k[len("sha256/"):]: str(expected[k]) for k in expected.files if k.startswith("sha256/")}
    assert len(digests) > 50
    assert set(arrays) == set(digests)
    wrong = [name for name, digest in digests.items() if _digest(arrays[name]) != digest]
    assert not wrong, wrong[:5]


def test_saved_model_keys_are_renamed_to_the_variables_full_names():
    root = os.path.join(FIXTURES, "saved_model")
    expected = {k[len("var/"):]: v for k, v in _expected("saved_model").items()}
    for path in (root, os.path.join(root, "variables"), os.path.join(root, "variables", "variables")):
        arrays = tf_checkpoint.load(path)
        # Only the variables: the object graph and save counter bookkeeping is not a weight, but the
        # save counter is a variable too; it keeps its object path.
        assert set(expected) <= set(arrays), sorted(arrays)
        assert not [k for k in arrays if k.endswith("/.ATTRIBUTES/VARIABLE_VALUE")]
        for name, value in expected.items():
            assert arrays[name].dtype == value.dtype
            np.testing.assert_array_equal(arrays[name], value, err_msg=name)


def test_prefix_index_and_shard_paths_all_resolve_to_the_prefix():
    prefix = os.path.join(FIXTURES, "dtypes", "model.ckpt")
    for path in (prefix, prefix + ".index", prefix + ".data-00000-of-00001"):
        assert tf_checkpoint.resolve_prefix(path) == prefix
    assert tf_checkpoint.is_checkpoint_prefix(prefix)
    assert tf_checkpoint.is_saved_model(os.path.join(FIXTURES, "saved_model"))
    assert not tf_checkpoint.is_saved_model(os.path.join(FIXTURES, "dtypes"))


def _copy(tmp_path, name="dtypes"):
    target = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), target)
    return str(target / "model.ckpt")


def _load_fails(prefix, damaged_file):
    """load(prefix) raises TFCheckpointError naming `damaged_file`, within a CPU second (not wall time: the
    suite may share a loaded machine)."""
    start = time.process_time()
    with pytest.raises(TFCheckpointError) as info:
        tf_checkpoint.load(prefix)
    assert time.process_time() - start < 1.0
    assert damaged_file in str(info.value), str(info.value)
    return str(info.value)


def test_every_flipped_byte_of_the_index_is_refused(tmp_path):
    prefix = _copy(tmp_path)
    index = prefix + ".index"
    original = open(index, "rb").read()
    for offset in range(len(original)):  # 354 bytes: blocks, trailers, handles, padding, magic
        damaged = bytearray(original)
        damaged[offset] ^= 0x5A
        with open(index, "wb") as f:
            f.write(damaged)
        _load_fails(prefix, index)


def test_every_flipped_byte_of_the_data_is_refused_naming_the_tensor(tmp_path):
    prefix = _copy(tmp_path)
    data = prefix + ".data-00000-of-00001"
    original = open(data, "rb").read()
    _, entries = tf_checkpoint.read_index(prefix + ".index")
    owner = {o: e.name for e in entries.values() for o in range(e.offset, e.offset + e.size)}
    assert set(owner) == set(range(len(original)))  # every byte belongs to a tensor, strings included
    for offset in range(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        with open(data, "wb") as f:
            f.write(damaged)
        message = _load_fails(prefix, data)
        assert repr(owner[offset]) in message, (offset, message)


def test_truncated_files_are_refused_at_every_cut(tmp_path):
    prefix = _copy(tmp_path)
    for path in (prefix + ".index", prefix + ".data-00000-of-00001"):
        original = open(path, "rb").read()
        for cut in range(len(original)):
            with open(path, "wb") as f:
                f.write(original[:cut])
            _load_fails(prefix, path)
        with open(path, "wb") as f:
            f.write(original)
    assert tf_checkpoint.load(prefix)  # restored: reads again


def test_a_network_checkpoint_with_sampled_damage_is_refused(tmp_path):
    prefix = _copy(tmp_path, "resnet_v1_152")
    rng = np.random.default_rng(0)
    for path in (prefix + ".index", prefix + ".data-00000-of-00001"):
        original = open(path, "rb").read()
        for offset in rng.choice(len(original), 40, replace=False):
            damaged = bytearray(original)
            damaged[offset] ^= 0x80
            with open(path, "wb") as f:
                f.write(damaged)
            _load_fails(prefix, path)
        for cut in rng.choice(len(original), 10, replace=False):
            with open(path, "wb") as f:
                f.write(original[:cut])
            _load_fails(prefix, path)
        with open(path, "wb") as f:
            f.write(original)


def test_the_size_cap_is_checked_before_any_data_is_read(tmp_path):
    prefix = _copy(tmp_path)
    os.remove(prefix + ".data-00000-of-00001")  # reading data would raise FileNotFoundError instead
    with pytest.raises(TFCheckpointError, match="max_bytes"):
        tf_checkpoint.load(prefix, max_bytes=64)


def test_missing_files_raise_file_not_found(tmp_path):
    prefix = _copy(tmp_path)
    os.remove(prefix + ".data-00000-of-00001")
    with pytest.raises(FileNotFoundError, match="data-00000-of-00001"):
        tf_checkpoint.load(prefix)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tf_checkpoint.load(str(tmp_path / "nothing.ckpt"))
    single = tmp_path / "old.ckpt"
    single.write_bytes(b"\0" * 100)  # a file without an .index is read as V1, and this is none
    with pytest.raises(TFCheckpointError, match="old.ckpt.*V1"):
        tf_checkpoint.load(str(single))
    with pytest.raises(FileNotFoundError, match="not a SavedModel"):
        tf_checkpoint.load(str(tmp_path))


def test_masked_crc32c_of_the_standard_check_value():
    # CRC-32C("123456789") = 0xE3069283 (RFC 3720's check value); both implementations agree.
    assert tf_checkpoint.crc32c(b"123456789") == 0xE3069283
    assert tf_checkpoint._crc32c_python(b"123456789") == 0xE3069283
    crc = 0xE3069283
    assert tf_checkpoint.masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF)
                                                         + 0xA282EAD8) & 0xFFFFFFFF


def test_registry_tells_checkpoints_saved_models_and_orbax_directories_apart(tmp_path):
    from embjax.weights import store

    prefix = os.path.join(FIXTURES, "resnet_v1_152", "model.ckpt")
    assert registry.file_kind(prefix) == "tf_checkpoint"
    assert registry.file_kind(prefix + ".index") == "tf_checkpoint"
    assert registry.file_kind(prefix + ".data-00000-of-00001") == "tf_checkpoint"
    assert registry.file_kind(os.path.join(FIXTURES, "saved_model")) == "tf_saved_model"
    orbax_dir = store.save_variables(tmp_path / "converted", {"params": {"w": np.zeros(2, np.float32)}})
    assert registry.file_kind(orbax_dir) == "orbax"
    with pytest.raises(registry.WeightFormatError, match="tf_checkpoint"):
        registry.load_weights("resnet50_v1", prefix)  # a Keras-only model names what it converts


def test_v1_files_come_back_exactly_with_partitioned_variables_joined():
    arrays = tf_checkpoint.load(os.path.join(FIXTURES, "v1", "model.ckpt"))
    expected = {k[len("var/"):]: v for k, v in _expected("v1").items()}
    assert set(arrays) == set(expected)  # 'str/labels' left out; 'part/weights' joined from 3 slices
    for name, value in expected.items():
        assert arrays[name].dtype == value.dtype, name
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert registry.file_kind(os.path.join(FIXTURES, "v1", "model.ckpt")) == "tf_checkpoint"


def test_partitioned_v2_variables_are_refused_by_name():
    with pytest.raises(TFCheckpointError, match="'part/weights': a partitioned"):
        tf_checkpoint.load(os.path.join(FIXTURES, "partitioned_v2", "model.ckpt"))


def test_every_flipped_byte_and_every_cut_of_a_v1_file_is_refused(tmp_path):
    path = _copy(tmp_path, "v1")
    original = open(path, "rb").read()
    for offset in range(len(original)):  # 1.2 kB: every byte lies in a checksummed block or the footer
        damaged = bytearray(original)
        damaged[offset] ^= 0x24
        with open(path, "wb") as f:
            f.write(damaged)
        _load_fails(path, path)
    for cut in range(len(original)):
        with open(path, "wb") as f:
            f.write(original[:cut])
        _load_fails(path, path)


# ---------------------------------------------------------------------------------------------------
# Structurally wrong files whose checksums are right: written here with a minimal SSTable writer (one
# data block, no key prefix sharing), since TensorFlow never writes them and flipped bytes never reach
# the parser past the block checksums.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 5:
        return key + struct.pack("<I", payload)
    return key + _varint(len(payload)) + payload


def _shape(*dims) -> bytes:
    return b"".join(_field(2, 2, _field(1, 0, d)) for d in dims)


def _table(entries) -> bytes:
    out = bytearray()

    def block(items):
        body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in items)
        body += struct.pack("<II", 0, 1)  # one restart point, at 0
        offset = len(out)
        out.extend(body + b"\0" + struct.pack("<I", tf_checkpoint.masked_crc32c(body + b"\0")))
        return _varint(offset) + _varint(len(body))

    data = block(entries)
    meta = block([])
    index = block([(entries[-1][0], data)])
    footer = meta + index
    out.extend(footer + b"\0" * (40 - len(footer)) + struct.pack("<Q", 0xDB4775248B80FB57))
    return bytes(out)


def _write_v2(tmp_path, entries, data: bytes) -> str:
    prefix = str(tmp_path / "crafted.ckpt")
    with open(prefix + ".index", "wb") as f:
        f.write(_table([(b"", _field(1, 0, 1))] + entries))
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)
    return prefix


def _entry(dtype=1, shape=(2, 3), shard=0, offset=0, size=24, crc=None, data=b"") -> bytes:
    crc = tf_checkpoint.masked_crc32c(data[offset : offset + size]) if crc is None else crc
    return (_field(1, 0, dtype) + _field(2, 2, _shape(*shape)) + _field(3, 0, shard) + _field(4, 0, offset)
            + _field(5, 0, size) + _field(6, 5, crc))


def test_a_crafted_checkpoint_reads_back(tmp_path):
    # The positive control of the writer above: a well-formed tensor is read exactly.
    values = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    prefix = _write_v2(tmp_path, [(b"w", _entry(data=values.tobytes()))], values.tobytes())
    np.testing.assert_array_equal(tf_checkpoint.load(prefix)["w"], values)


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(size=20), "20 bytes recorded for shape (2, 3)"),
        (dict(shard=1), "shard 1 of 1"),
        (dict(offset=8), "lie past the end of the file"),
        (dict(dtype=8, size=48), "dtype complex64 is not supported"),
        (dict(crc=123), "checksum mismatch"),
    ],
)
def test_crafted_entries_are_refused_naming_the_tensor(tmp_path, entry, message):
    values = np.ones((2, 3), np.float32).tobytes()
    prefix = _write_v2(tmp_path, [(b"layer/w", _entry(**{"data": values, **entry}))], values)
    with pytest.raises(TFCheckpointError, match=re.escape(message)) as info:
        tf_checkpoint.load(prefix)
    assert "'layer/w'" in str(info.value)


def test_crafted_tables_with_bad_structure_are_refused(tmp_path):
    values = np.ones((2, 3), np.float32).tobytes()
    good = _entry(data=values)
    cases = [
        ([(b"", _field(1, 0, 1)), (b"b", good), (b"a", good)], "keys out of order"),
        ([(b"w", good)], "no bundle header"),
        ([(b"", _field(1, 0, 1)), (b"w", good[:-3])], "'w'"),  # the entry's last field cut short
    ]
    for entries, message in cases:
        prefix = str(tmp_path / "crafted.ckpt")
        with open(prefix + ".index", "wb") as f:
            f.write(_table(entries))
        with open(prefix + ".data-00000-of-00001", "wb") as f:
            f.write(values)
        with pytest.raises(TFCheckpointError, match=message):
            tf_checkpoint.load(prefix)


def test_a_v1_file_declaring_huge_tensors_is_refused_before_allocating(tmp_path):
    meta = _field(1, 2, _field(1, 2, b"huge") + _field(2, 2, _shape(1 << 17, 1 << 17)) + _field(3, 0, 1))
    path = tmp_path / "huge.ckpt"
    path.write_bytes(_table([(b"", _field(1, 2, meta))]))
    with pytest.raises(TFCheckpointError, match="declares 64.00 GiB"):
        tf_checkpoint.load(str(path))
