"""keras.applications NASNet weights (NASNetLarge's `NASNet-large.h5`, or any `keras.applications.nasnet.NASNet`
configuration) -> Flax variables of `embjax.models.nasnet.NASNet`.

Input: {layer name: [arrays]} from `embjax.weights.h5.read_keras_weights` or `h5.layer_weights_of(model)`.
Output: {"params", "batch_stats"}; `keras_nasnet_config` reads the configuration (cells, filters, stem
width, head size) off the weights, so a reduced NASNet built for a test converts like the real one.

Keras names every layer of NASNet explicitly after the cell's `block_id` (`stem_1`, `stem_2`, `0` …
`N-1`, `reduce_N`, `N+1` … `2N`, `reduce_2N`, `2N+1` … `3N` for N cells per stack), so the map is by
name: `{normal,reduction}_conv_1_<id>` / `_bn_1_<id>` is the cell's `beginning_1x1` / `beginning_bn`;
`adjust_conv_1|2_<id>` + `adjust_bn_<id>` the factorized reduction of `prev`, `adjust_conv_projection_<id>`
+ `adjust_bn_<id>` its 1×1 projection; `separable_conv_{1,2}[_bn]_<side>_<id>` the stacked separable
convolutions, where `<side>` names the operation's place in the cell (`normal_left1` … `reduction_left4`).

Keras' own NASNet pads the stride-2 pools of its reduction cells with zeros (see `embjax.models.nasnet`);
the weights themselves are TF-Slim's, so the registered `nasnet_large` runs them with TF's padding, and
`NASNet(pool_padding="keras")` reproduces Keras exactly.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models import nasnet as nasnet_lib
from embjax.models.convert.framework import LayerMap, WeightMismatchError, convert_layers

# Keras separable-block names -> (comb_iter index, side) in the Flax cell, per cell kind.
_NORMAL_SEPARABLES = {"normal_left1": (0, "left"), "normal_right1": (0, "right"), "normal_left2": (1, "left"),
                      "normal_right2": (1, "right"), "normal_left5": (4, "left")}
_REDUCTION_SEPARABLES = {"reduction_left1": (0, "left"), "reduction_right1": (0, "right"),
                         "reduction_right2": (1, "right"), "reduction_right3": (2, "right"),
                         "reduction_left4": (4, "left")}


def cell_names(num_blocks: int) -> list[tuple[str, str, bool]]:
    """(Keras block_id, Flax cell name, is a reduction cell) in the network's order."""
    cells = [("stem_1", "cell_stem_0", True), ("stem_2", "cell_stem_1", True)]
    cells += [(str(i), f"cell_{i}", False) for i in range(num_blocks)]
    cells.append((f"reduce_{num_blocks}", "reduction_cell_0", True))
    cells += [(str(num_blocks + 1 + i), f"cell_{num_blocks + i}", False) for i in range(num_blocks)]
    cells.append((f"reduce_{2 * num_blocks}", "reduction_cell_1", True))
    cells += [(str(2 * num_blocks + 1 + i), f"cell_{2 * num_blocks + i}", False) for i in range(num_blocks)]
    return cells


def keras_nasnet_config(layer_weights: Mapping[str, Sequence[np.ndarray]]) -> dict:
    """NASNet(...) keyword arguments that fit these Keras weights: num_classes, num_cells, num_conv_filters,
    stem_filters (WeightMismatchError when the layers that tell are missing)."""
    what = "keras NASNet weights"
    problems = []
    for name in ("stem_conv1", "predictions"):
        if name not in layer_weights or len(layer_weights[name]) < 1:
            problems.append(f"missing Keras layer {name!r}" + (
                " (a '-no-top' file has no classifier: use NASNet-large.h5)" if name == "predictions" else ""))
    if problems:
        raise WeightMismatchError(what, problems)
    num_blocks = sum(1 for name in layer_weights if re.fullmatch(r"normal_conv_1_\d+", name)) // 3
    head = np.shape(layer_weights["predictions"][0])  # (features, classes)
    return dict(
        num_classes=int(head[1]),
        num_cells=3 * num_blocks,
        num_conv_filters=int(head[0]) // 24,  # the last cell concatenates 6 states of 4 × filters
        stem_filters=int(np.shape(layer_weights["stem_conv1"][0])[-1]),
    )


def nasnet_layer_map(expected_params: Mapping, num_blocks: int) -> list[LayerMap]:
    """The explicit Keras-name -> Flax-path map; `expected_params` (the module's params tree) says which
    cells reduce `prev` by factorization and which project it."""
    layers = [LayerMap("stem_conv1", ("stem_conv",), "conv_nobias"), LayerMap("stem_bn1", ("stem_bn",), "bn")]
    for block_id, cell, reduction in cell_names(num_blocks):
        kind = "reduction" if reduction else "normal"
        tree = expected_params.get(cell, {})
        if "prev_reduction" in tree:
            layers += [
                LayerMap(f"adjust_conv_1_{block_id}", (cell, "prev_reduction", "path1_conv"), "conv_nobias"),
                LayerMap(f"adjust_conv_2_{block_id}", (cell, "prev_reduction", "path2_conv"), "conv_nobias"),
                LayerMap(f"adjust_bn_{block_id}", (cell, "prev_reduction", "final_path_bn"), "bn"),
            ]
        elif "prev_1x1" in tree:
            layers += [
                LayerMap(f"adjust_conv_projection_{block_id}", (cell, "prev_1x1"), "conv_nobias"),
                LayerMap(f"adjust_bn_{block_id}", (cell, "prev_bn"), "bn"),
            ]
        layers += [
            LayerMap(f"{kind}_conv_1_{block_id}", (cell, "beginning_1x1"), "conv_nobias"),
            LayerMap(f"{kind}_bn_1_{block_id}", (cell, "beginning_bn"), "bn"),
        ]
        for side_name, (i, side) in (_REDUCTION_SEPARABLES if reduction else _NORMAL_SEPARABLES).items():
            stack = (cell, f"comb_iter_{i}_{side}", "stack")
            for k in (1, 2):
                layers += [
                    LayerMap(f"separable_conv_{k}_{side_name}_{block_id}", stack + (f"separable_{k}",), "separable"),
                    LayerMap(f"separable_conv_{k}_bn_{side_name}_{block_id}", stack + (f"bn_sep_{k}",), "bn"),
                ]
    layers.append(LayerMap("predictions", ("logits",), "dense"))
    return layers


def convert_nasnet(layer_weights: Mapping[str, Sequence[np.ndarray]], pool_padding: str = "tf") -> dict:
    """Flax variables for `NASNet(**keras_nasnet_config(layer_weights))` from keras.applications NASNet weights.

    Raises WeightMismatchError naming every missing, extra or mis-shaped layer or parameter.
    """
    config = keras_nasnet_config(layer_weights)
    module = nasnet_lib.NASNet(**config, pool_padding=pool_padding)
    # Shapes only (nothing computed). 96 px keeps every reduction a real halving (15 px would end at 1x1,
    # where a stride-2 cell no longer changes the size and `prev` would look projected, not reduced).
    probe = jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32)
    expected = jax.eval_shape(module.init, jax.random.key(0), probe)
    layer_map = nasnet_layer_map(expected["params"], config["num_cells"] // 3)
    return convert_layers(layer_weights, layer_map, "keras NASNet weights", expected)


__all__ = ["convert_nasnet", "keras_nasnet_config", "nasnet_layer_map", "cell_names"]
