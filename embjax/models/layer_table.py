"""Each registered model's named layers as the full-network embedding sees them: the number of layers and
features of the "conv" set (every convolution and fully connected layer, the paper's) and of the "block"
set (block outputs), and the pooling end points left out. Traced, nothing computed.

    python -m embjax.models.layer_table                # every registered model
    python -m embjax.models.layer_table vgg16 efficientnet_lite0
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from embjax.models import layers, registry


def counts(name: str) -> dict[str, tuple[int, int]]:
    """{set or kind: (layers, features)} of registry model `name` at its input size."""
    spec = registry.get(name)
    x = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    named = layers.named_layers(spec.build(), x)
    out = {}
    for key, kinds in (("conv", {"conv", "fc"}), ("block", {"block"}), ("pool", {"pool"})):
        chosen = [layer for layer in named if kinds & set(layer.kinds)]
        out[key] = (len(chosen), sum(layer.shape[-1] for layer in chosen))
    return out


def main(argv: list[str]) -> None:
    names = argv or registry.names()
    print("| model | family | conv + fc layers | features (default set) | block layers | features (block set) "
          "| pooling end points (never embedded) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in names:
        c = counts(name)
        print(f"| {name} | {registry.get(name).family} | {c['conv'][0]} | {c['conv'][1]:,} | {c['block'][0]} | "
              f"{c['block'][1]:,} | {c['pool'][0]} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
