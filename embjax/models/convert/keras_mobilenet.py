"""keras.applications MobileNetV2 weights (any alpha; 1.0 and 1.4 are the ones used) -> `embjax.models.mobilenet`.

Input: {layer name: [arrays]} from `embjax.weights.h5.read_keras_weights` (the downloaded
`mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}.h5`) or `h5.layer_weights_of(model)`.
Output: {"params", "batch_stats"} for `MobileNetV2(alpha, num_classes=<from the file>)`.

The map is by Keras layer name: `Conv1`/`bn_Conv1`, `expanded_conv_{depthwise,project}[_BN]`,
`block_{i}_{expand,depthwise,project}[_BN]`, `Conv_1`/`Conv_1_bn`, `predictions`. MobileNetV2 is a chain,
so when a file names its layers differently (the original keras-applications release named the head
`Logits`, for instance) but holds exactly the expected number of layers, they are paired by position,
as Keras' own legacy loader does, and every shape is checked against the Flax module.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models import mobilenet as mobilenet_lib
from embjax.models.convert.framework import LayerMap, WeightMismatchError, convert_layers

# The head is 'predictions' in Keras >= 2.3 and 'Logits' in the original keras-applications code.
_HEAD_NAMES = ("predictions", "Logits")


def keras_file_name(alpha: float, size: int = 224) -> str:
    """The file keras.applications downloads for MobileNetV2(alpha) with the 1000-class top."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{size}.h5"


def mobilenet_v2_layer_map(num_blocks: int = 17) -> list[LayerMap]:
    """The explicit Keras-name -> Flax-path map of keras.applications MobileNetV2, in layer order."""
    layers = [LayerMap("Conv1", ("Conv1",), "conv_nobias"), LayerMap("bn_Conv1", ("bn_Conv1",), "bn")]
    for block_id in range(num_blocks):
        prefix = "expanded_conv" if block_id == 0 else f"block_{block_id}"
        parts = [("depthwise", "depthwise"), ("depthwise_BN", "bn"), ("project", "conv_nobias"),
                 ("project_BN", "bn")]
        if block_id > 0:
            parts = [("expand", "conv_nobias"), ("expand_BN", "bn")] + parts
        layers += [LayerMap(f"{prefix}_{part}", (prefix, part), kind) for part, kind in parts]
    layers += [
        LayerMap("Conv_1", ("Conv_1",), "conv_nobias"),
        LayerMap("Conv_1_bn", ("Conv_1_bn",), "bn"),
        LayerMap("predictions", ("predictions",), "dense"),
    ]
    return layers


def convert_mobilenet_v2(layer_weights: Mapping[str, Sequence[np.ndarray]], alpha: float = 1.0) -> dict:
    """Flax variables for `MobileNetV2(alpha, num_classes=<from the file>)` from Keras weights.

    Raises WeightMismatchError naming every missing, extra or mis-shaped layer or parameter (a file for
    another alpha shows up as mis-shaped channels); a `_no_top` file is reported as such.
    """
    what = f"keras MobileNetV2 (alpha {alpha}) weights"
    head = next((n for n in _HEAD_NAMES if n in layer_weights), None)
    if head is None and layer_weights:
        # Renamed layers (see the module docstring): the head is the last layer, a Dense [kernel, bias].
        last = [n for n, arrays in layer_weights.items() if len(arrays) > 0][-1]
        if len(layer_weights[last]) == 2 and np.ndim(layer_weights[last][0]) == 2:
            head = last
    if head is None:
        raise WeightMismatchError(
            what,
            ["missing the classifier layer 'predictions'; a '_no_top' file has no head: use "
             f"{keras_file_name(alpha)!r}"],
        )
    num_classes = int(np.shape(layer_weights[head][0])[-1])  # Dense kernel (features, classes)
    module = mobilenet_lib.MobileNetV2(alpha=alpha, num_classes=num_classes)
    # Parameter shapes do not depend on the input size; 32 px is the smallest Keras accepts.
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    num_blocks = sum(n for _, _, n, _ in module.blocks)
    return convert_layers(
        layer_weights, mobilenet_v2_layer_map(num_blocks), what, expected, positional_fallback=True
    )


__all__ = ["convert_mobilenet_v2", "mobilenet_v2_layer_map", "keras_file_name"]
