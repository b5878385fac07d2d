"""Zoo training: a small model learns Fashion-MNIST through embjax.train's loop, a training interrupted
mid-run resumes from its checkpoint, and a second call reuses the cached weights."""

import numpy as np
import jax
import pytest

from embjax import zoo
from embjax.data import fashion_mnist
from embjax.models import registry


class _Stop(Exception):
    pass


def test_train_resume_then_reuse(tmp_path, monkeypatch):
    images, labels = fashion_mnist.load("train[:1024]")
    spec = registry.get("zoo_resnet_v1")
    # 16 steps an epoch, a checkpoint at the end of each.
    cfg = zoo.train_config(epochs=3, batch_size=64, learning_rate=3e-3, limit=1024, checkpoint_every=16)
    lines = []

    def stop_after_epoch_2(line):  # the loop logs each epoch's line after that epoch's checkpoint
        lines.append(line)
        if "epoch 2/3" in line:
            raise _Stop

    with pytest.raises(_Stop):
        zoo.load_or_train(spec, images, labels, cfg, dataset="fmnist-test", cache_dir=str(tmp_path),
                          log=stop_after_epoch_2)
    variables = zoo.load_or_train(spec, images, labels, cfg, dataset="fmnist-test", cache_dir=str(tmp_path),
                                  log=lines.append)
    assert any("resuming from step 32/48" in line for line in lines), lines
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines if "loss " in line]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], lines
    assert not (tmp_path / "zoo-training").exists() or not any((tmp_path / "zoo-training").iterdir())
    # The trained model beats chance (10%) on held-out images by a wide margin: 3 epochs on 1024 images
    # reach about 70% here; 40% leaves room for platform differences but not for a broken pipeline.
    test_x, test_y = fashion_mnist.load("test[:500]")
    out = spec.build().apply(variables, spec.preprocess(test_x))
    assert np.mean(np.argmax(np.asarray(out["logits"]), -1) == test_y) > 0.4

    def no_training(*a, **k):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(zoo, "train", no_training)
    again = zoo.load_or_train(spec, images, labels, cfg, dataset="fmnist-test", cache_dir=str(tmp_path),
                              log=lines.append)
    assert "reusing" in lines[-1]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), again)


def test_cache_key_is_the_zoo_s_original_one():
    """The key hashes the zoo's original six fields (models cached before the zoo moved onto
    embjax.train keep theirs: the affine study's default cache key of zoo_resnet_v1 is pinned); fields
    that change the weights enter it only when they leave the zoo's defaults, and the checkpoint and log
    cadence never do."""
    cfg = zoo.train_config(epochs=1, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, seed=0, limit=20000)
    assert zoo.cache_key("zoo_resnet_v1", cfg, "fashion_mnist:train", 20000) == "zoo_resnet_v1-b92bc44f5d2e"
    key = zoo.cache_key("zoo_resnet_v1", cfg, "fashion_mnist:train", 20000)
    assert zoo.cache_key("zoo_resnet_v1", zoo.train_config(**{**cfg.__dict__, "checkpoint_every": 7}),
                         "fashion_mnist:train", 20000) == key
    for change in ({"order": "seed_epoch"}, {"xla_cpu_defaults": False}, {"warmup_steps": 5}):
        assert zoo.cache_key("zoo_resnet_v1", zoo.train_config(**{**cfg.__dict__, **change}),
                             "fashion_mnist:train", 20000) != key, change
    with pytest.raises(ValueError, match="unknown field"):
        zoo.train_config(epoch=1)
