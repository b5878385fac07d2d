"""keras.applications ResNet50/101/152 and ResNet50V2/101V2/152V2 weights -> `embjax.models.resnet`.

Input: {layer name: [arrays]} from `embjax.weights.h5.read_keras_weights` (the downloaded
`resnet50_weights_tf_dim_ordering_tf_kernels.h5`, `resnet50v2_weights_tf_dim_ordering_tf_kernels.h5`, ...)
or `h5.layer_weights_of(keras_model)`. Output: {"params", "batch_stats"} for `resnet(depth, version)` with
the class count of the file's `predictions` layer.

Every Keras ResNet layer is explicitly named, so the map is by name: `conv{s}_block{b}_{i}_{conv|bn}`
goes to module `conv{s}_block{b}` / `{i}_{conv|bn}`, `conv1_*`, `post_bn` and `predictions` to the
top-level modules of the same names. The result is then checked against the shapes of the Flax module.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models import resnet as resnet_lib
from embjax.models.convert.framework import LayerMap, WeightMismatchError, convert_layers

KERAS_DEPTHS = (50, 101, 152)


def keras_file_name(depth: int, version: int) -> str:
    """The file keras.applications downloads for this ResNet (with the 1000-class top)."""
    return f"resnet{depth}{'v2' if version == 2 else ''}_weights_tf_dim_ordering_tf_kernels.h5"


def resnet_layer_map(depth: int, version: int) -> list[LayerMap]:
    """The explicit Keras-name -> Flax-path map of keras.applications ResNet{depth}[V2]."""
    if depth not in KERAS_DEPTHS or version not in (1, 2):
        raise ValueError(
            f"keras.applications has ResNet depths {KERAS_DEPTHS} in versions 1 and 2; "
            f"got depth={depth!r}, version={version!r}"
        )
    layers = [LayerMap("conv1_conv", ("conv1_conv",), "conv")]
    if version == 1:
        layers.append(LayerMap("conv1_bn", ("conv1_bn",), "bn"))
    for s, blocks in enumerate(resnet_lib.STAGE_SIZES[depth], start=2):
        for b in range(1, blocks + 1):
            block = f"conv{s}_block{b}"
            if version == 1:
                parts = [("1_conv", "conv"), ("1_bn", "bn"), ("2_conv", "conv"), ("2_bn", "bn"),
                         ("3_conv", "conv"), ("3_bn", "bn")]
                if b == 1:
                    parts = [("0_conv", "conv"), ("0_bn", "bn")] + parts
            else:
                parts = [("preact_bn", "bn"), ("1_conv", "conv_nobias"), ("1_bn", "bn"),
                         ("2_conv", "conv_nobias"), ("2_bn", "bn"), ("3_conv", "conv")]
                if b == 1:
                    parts.insert(1, ("0_conv", "conv"))
            layers += [LayerMap(f"{block}_{part}", (block, part), kind) for part, kind in parts]
    if version == 2:
        layers.append(LayerMap("post_bn", ("post_bn",), "bn"))
    layers.append(LayerMap("predictions", ("predictions",), "dense"))
    return layers


def convert_resnet(
    layer_weights: Mapping[str, Sequence[np.ndarray]], depth: int = 50, version: int = 1
) -> dict:
    """Flax variables for `resnet(depth, version, num_classes=<from the file>)` from Keras weights.

    Raises WeightMismatchError naming every missing, extra or mis-shaped layer or parameter; a file
    without a `predictions` layer (a `_notop` download) is reported as such.
    """
    what = f"keras ResNet{depth}{'V2' if version == 2 else ''} weights"
    if "predictions" not in layer_weights:
        raise WeightMismatchError(
            what,
            ["missing Keras layer 'predictions' (the classifier); a '_notop' file has no head: use "
             f"{keras_file_name(depth, version)!r}"],
        )
    num_classes = int(np.shape(layer_weights["predictions"][0])[-1])
    module = resnet_lib.resnet(depth, version, num_classes=num_classes)
    # Parameter shapes do not depend on the input size; 32 px is the smallest Keras accepts.
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    return convert_layers(layer_weights, resnet_layer_map(depth, version), what, expected)


__all__ = ["convert_resnet", "resnet_layer_map", "keras_file_name", "KERAS_DEPTHS"]
