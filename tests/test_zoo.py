"""Zoo training: a small model learns Fashion-MNIST, and a second call reuses the cached weights."""

import numpy as np
import jax

from embjax import zoo
from embjax.data import fashion_mnist
from embjax.models import registry


def test_train_then_reuse(tmp_path, monkeypatch):
    images, labels = fashion_mnist.load("train[:1024]")
    spec = registry.get("zoo_resnet_v1")
    cfg = zoo.TrainConfig(epochs=3, batch_size=64, learning_rate=3e-3, limit=1024)
    lines = []
    variables = zoo.load_or_train(spec, images, labels, cfg, dataset="fmnist-test",
                                  cache_dir=str(tmp_path), log=lines.append)
    losses = [float(line.split("loss ")[1].split()[0]) for line in lines if "loss " in line]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], lines
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
