"""Stand-in backbones for in-process study runs: a dense layer, a BatchNorm (its statistics go through
training and inference like a zoo model's) and an embedding of a chosen width before a 10-class head, on
the zoo's Fashion-MNIST preprocessing, registered under their own names for the duration of a test.

A study's bookkeeping and arithmetic (passes, statistics, maps, retrieval, reports) are the same for any
backbone; these compile in a fraction of a zoo model's time. The zoo models themselves run in the whole
tier's study runs and in tests/test_zoo.py, tests/test_folding.py and tests/test_conv_matmul.py."""

from __future__ import annotations

import contextlib
import dataclasses


def specs(**widths: int) -> dict:
    """{name: ModelSpec} of a stand-in for each name=width."""
    import flax.linen as nn

    from embjax.models import registry

    class TinyNet(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Dense(128)(x.reshape(x.shape[0], -1))
            h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
            h = nn.Dense(self.width)(h)
            return {"pre_logits": h, "logits": nn.Dense(10)(h)}

    base = registry.get("zoo_resnet_v1")
    return {name: dataclasses.replace(base, name=name, family="tiny", feature_dim=width,
                                      build=lambda width=width, **_: TinyNet(width))
            for name, width in widths.items()}


@contextlib.contextmanager
def registered(**widths: int):
    """Within the block, `registry.get(name)` gives the stand-in of each name=width."""
    import pytest

    from embjax.models import registry

    stand_ins, get = specs(**widths), registry.get
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "get", lambda name: stand_ins[name] if name in stand_ins else get(name))
        yield stand_ins
