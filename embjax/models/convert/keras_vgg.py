"""keras.applications VGG16 weights (`vgg16_weights_tf_dim_ordering_tf_kernels.h5`) -> `embjax.models.vgg`.

Input: {layer name: [arrays]} from `embjax.weights.h5.read_keras_weights` or `h5.layer_weights_of(model)`.
Output: {"params", "batch_stats"} (the latter empty: VGG has no BatchNorm) for `VGG16(num_classes=<from
the file>)`. Layer names map one to one (`block1_conv1` ... `block5_conv3`, `fc1`, `fc2`, `predictions`);
Keras' Conv2D kernels are HWIO and its Dense kernels (in, out), as in Flax, and fc1's rows follow Keras'
row-major flatten of the NHWC block5 pool, which is how the Flax module flattens too. Every shape is
checked against the module at `input_size` (224 for the ImageNet file; fc1's kernel depends on it).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models import vgg as vgg_lib
from embjax.models.convert.framework import LayerMap, WeightMismatchError, convert_layers

KERAS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"


def vgg16_layer_map() -> list[LayerMap]:
    """Keras name -> Flax path of every weight-carrying layer of keras.applications VGG16, in order."""
    layers = [LayerMap(f"block{b}_conv{i}", (f"block{b}_conv{i}",), "conv")
              for b, convs, _ in vgg_lib.VGG16_BLOCKS for i in range(1, convs + 1)]
    return layers + [LayerMap(n, (n,), "dense") for n in ("fc1", "fc2", "predictions")]


def convert_vgg16(layer_weights: Mapping[str, Sequence[np.ndarray]], input_size: int = 224) -> dict:
    """Flax variables for `VGG16(num_classes=<from the file>)`; WeightMismatchError lists every problem."""
    what = "keras VGG16 weights"
    if "predictions" not in layer_weights:
        raise WeightMismatchError(
            what, [f"missing the classifier layer 'predictions'; a '_notop' file has no fc1/fc2/head: use {KERAS_FILE!r}"]
        )
    num_classes = int(np.shape(layer_weights["predictions"][0])[-1])
    module = vgg_lib.VGG16(num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    expected = jax.eval_shape(module.init, jax.random.key(0), x)
    return convert_layers(layer_weights, vgg16_layer_map(), what, expected)


__all__ = ["KERAS_FILE", "convert_vgg16", "vgg16_layer_map"]
