"""VGG16 (Simonyan & Zisserman 2015, configuration D) in Flax, laid out like keras.applications.VGG16.

Five blocks of 3x3 "same" convolutions with biases and ReLU (64, 64 | 128, 128 | 256 x3 | 512 x3 |
512 x3 channels), each block closed by a 2x2 stride-2 max-pool; then flatten (row-major over height,
width, channels, as Keras flattens NHWC), fc1 and fc2 (4096, ReLU; the paper's fc6 and fc7) and the
classifier `predictions`. There is no dropout and no BatchNorm: keras.applications' VGG16 has neither.
Parameter names are the Keras layer names, so the converter's map is the identity.

`__call__(x)` takes NHWC images whose sides are multiples of 32 (224 for the ImageNet weights: fc1's
kernel fixes the flattened size) and returns every layer by its Keras name (the convolutions, pools and
fully connected layers are its named layers, embjax.models.layers):

    block<b>_conv<i>         post-ReLU convolution output (what Keras' layer of that name outputs)
    block<b>_conv<i>_preact  the same before its ReLU
    block<b>_pool            the block's max-pool
    fc1, fc2 (+ _preact)     (B, 4096)
    pre_logits               = fc2, the last layer before the classifier
    logits                   (B, num_classes), no softmax
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from embjax.models import layers

# (block, convolutions, channels) of configuration D.
VGG16_BLOCKS: tuple[tuple[int, int, int], ...] = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


class VGG(nn.Module):
    """VGG with Keras layer names; `blocks` and `fc_width` override configuration D."""

    blocks: Sequence[tuple[int, int, int]] = VGG16_BLOCKS
    fc_width: int = 4096
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm, no dropout: the same computation either way
        if x.ndim != 4:
            raise ValueError(f"VGG expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        stride = 2 ** len(self.blocks)
        if x.shape[1] % stride or x.shape[2] % stride:
            raise ValueError(
                f"VGG's {len(self.blocks)} max-pools need image sides that are multiples of {stride}, got "
                f"{x.shape[1]}x{x.shape[2]} (the registry's preprocessing resizes to 224)"
            )
        out = {}
        x = x.astype(self.dtype)
        for block, convs, channels in self.blocks:
            for i in range(1, convs + 1):
                name = f"block{block}_conv{i}"
                x = nn.Conv(channels, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)(x)
                out[f"{name}_preact"] = x
                x = layers.tap(None, name, nn.relu(x), "conv")
            x = layers.tap(None, f"block{block}_pool", nn.max_pool(x, (2, 2), strides=(2, 2)), "pool")
        x = x.reshape(x.shape[0], -1)
        for name in ("fc1", "fc2"):
            x = out[f"{name}_preact"] = nn.Dense(self.fc_width, dtype=self.dtype, param_dtype=self.param_dtype,
                                                 name=name)(x)
            x = layers.tap(None, name, nn.relu(x), "fc")
        out["pre_logits"] = x.astype(jnp.float32)
        out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                                 name="predictions")(out["pre_logits"])
        return out


def VGG16(num_classes: int = 1000, **kwargs) -> VGG:
    return VGG(blocks=VGG16_BLOCKS, num_classes=num_classes, **kwargs)


__all__ = ["VGG", "VGG16", "VGG16_BLOCKS"]
