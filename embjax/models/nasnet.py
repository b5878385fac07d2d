"""NASNet-A and PNASNet-5 as Flax linen modules: the architecture-search family of TF-Slim's `nets/nasnet`.

This module owns the architectures only; `embjax.models.convert.keras_nasnet` maps keras.applications NASNetLarge
weights onto `NASNet`, `embjax.models.convert.timm_models` maps timm's `pnasnet5large` onto `PNASNet`.

Both networks are stacks of cells described the way TF-Slim describes them: a cell starts from two hidden
states, `h` (the previous cell's output after ReLU, a 1×1 convolution and BatchNorm) and `prev` (the output
two cells back, brought to the same size and width), then builds five new states, each the sum of two
operations on earlier states (separable convolutions stacked twice, 3×3 pooling, identity), and
concatenates the states its `used` mask leaves out. `NASNet` uses NASNet-A's normal and reduction cells
(Zoph et al., 2018); `PNASNet` uses one PNASNet-5 cell for both, strided where it reduces (Liu et al., 2018).

Constants as the references define them: BatchNorm epsilon 1e-3 with a scale (TF-Slim's NASNet arg scope,
keras.applications and timm alike); TF "SAME" padding everywhere (asymmetric for stride 2 on even sizes,
which Flax's "SAME" reproduces); the stem is a 3×3/2 "VALID" convolution and BatchNorm without ReLU.

`pool_padding` is the one place the references disagree. TF-Slim (where the ImageNet weights were trained,
and timm, which follows it) pads the stride-2 pools of a reduction cell the "SAME" way: max pooling ignores
the padding, average pooling does not count it. keras.applications' NASNet instead pads `h` with zeros and
pools "VALID", so border maxima see zeros and border averages divide by 9. "tf" (the default) is the
trained network; "keras" reproduces keras.applications bit for bit and exists for the parity test.

Outputs (dict): `stem` (the stem convolution after BatchNorm), `cell_stem_0`, `cell_stem_1`, every cell
under its TF-Slim name (`cell_0` … and, for NASNet, `reduction_cell_0`, `reduction_cell_1`), `pre_logits`
(global average of the ReLU of the last cell, float32; 4032 for NASNet-A-Large, 4320 for PNASNet-5-Large)
and `logits`. Named layers (embjax.models.layers): the cells (block) and every convolution after its
BatchNorm, in these networks' ReLU → conv → BatchNorm order the output the next layer rectifies: each
separable convolution of a stack as one layer (`cell_0/comb_iter_0_left/stack/separable_1`), the 1×1
projections (`cell_0/beginning_1x1`, `cell_0/prev_1x1`, `.../comb_iter_1_right/conv`) and the two paths of a
factorized reduction (`cell_0/prev_reduction/path1_conv`, each its half of `final_path_bn`). NHWC inputs
scaled to [-1, 1]; any size of at least 32×32; the ImageNet models run at 331.

`fold_bn=True` is the inference mode without BatchNorm ops (embjax.models.folding makes its variables):
every BatchNorm that follows a convolution (the stem's, each separable stack's after its pointwise
convolution, the 1×1 projections') folds into that convolution's kernel and a bias. The one BatchNorm
after a concatenation, `final_path_bn` of a factorized reduction, stays as a precomputed `ScaleShift`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from embjax.models import layers

Dtype = Any

BN_EPSILON = 1e-3  # TF-Slim nasnet_large_arg_scope / keras.applications / timm
BN_MOMENTUM = 0.9997  # TF-Slim's decay; only matters when training
MIN_INPUT_SIZE = 32  # keras.applications' minimum for NASNet

# TF-Slim's cell descriptions: operations and their input state indices in pairs (one pair per new
# state), and which hidden states are left out of the final concatenation (1 = left out).
NASNET_A_NORMAL = dict(
    operations=("separable_5x5_2", "separable_3x3_2", "separable_5x5_2", "separable_3x3_2", "avg_pool_3x3",
                "none", "avg_pool_3x3", "avg_pool_3x3", "separable_3x3_2", "none"),
    hiddenstate_indices=(0, 1, 1, 1, 0, 1, 1, 1, 0, 0),
    used_hiddenstates=(1, 0, 0, 0, 0, 0, 0),
)
NASNET_A_REDUCTION = dict(
    operations=("separable_5x5_2", "separable_7x7_2", "max_pool_3x3", "separable_7x7_2", "avg_pool_3x3",
                "separable_5x5_2", "none", "avg_pool_3x3", "separable_3x3_2", "max_pool_3x3"),
    hiddenstate_indices=(0, 1, 0, 1, 0, 1, 3, 2, 2, 0),
    used_hiddenstates=(1, 1, 1, 0, 0, 0, 0),
)
PNASNET_5 = dict(
    operations=("separable_5x5_2", "max_pool_3x3", "separable_7x7_2", "max_pool_3x3", "separable_5x5_2",
                "separable_3x3_2", "separable_3x3_2", "max_pool_3x3", "separable_3x3_2", "none"),
    hiddenstate_indices=(1, 1, 0, 0, 0, 0, 4, 0, 1, 0),
    used_hiddenstates=(1, 1, 0, 0, 0, 0, 0),
)


def _bn(train: bool, dtype, name: str, fold_bn: bool = False, keep: bool = False):
    """The BatchNorm called `name` (layers.batchnorm with this family's constants); `keep` where no
    single conv precedes it."""
    return layers.batchnorm(fold_bn, name, train=train, keep=keep, dtype=dtype, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON)


def _conv1x1(features: int, dtype, name: str, strides: int = 1, bias: bool = False):
    return nn.Conv(features, (1, 1), strides=strides, padding="VALID", use_bias=bias, dtype=dtype, name=name)


class SeparableConv(nn.Module):
    """Depthwise k×k convolution (stride on it) then pointwise 1×1, neither with a bias (TF's separable_conv2d)."""

    features: int
    kernel: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    bias: bool = False  # on the pointwise conv: the folded BatchNorm's shift

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(x.shape[-1], (self.kernel, self.kernel), strides=self.strides, padding="SAME",
                    feature_group_count=x.shape[-1], use_bias=False, dtype=self.dtype, name="depthwise")(x)
        return nn.Conv(self.features, (1, 1), use_bias=self.bias, dtype=self.dtype, name="pointwise")(x)


class StackedSeparable(nn.Module):
    """TF-Slim's `separable_KxK_2`: twice ReLU → separable conv → BatchNorm; the stride on the first only."""

    features: int
    kernel: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, strides in enumerate((self.strides, 1), start=1):
            x = nn.relu(x)
            x = SeparableConv(self.features, self.kernel, strides, self.dtype, self.fold_bn,
                              name=f"separable_{i}")(x)
            x = layers.tap(self, f"separable_{i}", _bn(train, self.dtype, f"bn_sep_{i}", self.fold_bn)(x), "conv")
        return x


def _keras_pool(x, kind: str):
    """keras.applications NASNet's stride-2 pool: zero padding as TF "SAME" would place it, then VALID."""
    # TF "SAME" for a 3×3 window at stride 2 pads 1 pixel after on even sizes, 1 on both sides on odd ones.
    pads = [(0, 1) if size % 2 == 0 else (1, 1) for size in x.shape[1:3]]
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    pool = nn.max_pool if kind == "max" else nn.avg_pool
    return pool(x, (3, 3), strides=(2, 2), padding="VALID")


class CellOperation(nn.Module):
    """One operation of a cell (TF-Slim's `_apply_conv_operation`): separable stack, pooling or identity.

    Pooling and identity bring their input to `features` channels with a 1×1 convolution and BatchNorm
    when its width differs (identity also when strided, after a ReLU), as TF-Slim does.
    """

    operation: str
    features: int
    strides: int = 1
    pool_padding: str = "tf"
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        op, width, fold_bn = self.operation, x.shape[-1], self.fold_bn
        if op.startswith("separable"):
            kernel = int(op.split("_")[1].split("x")[0])
            return StackedSeparable(self.features, kernel, self.strides, self.dtype, fold_bn, name="stack")(x, train)
        if op == "none":
            if self.strides > 1 or width != self.features:
                x = nn.relu(x)
                x = _conv1x1(self.features, self.dtype, "conv", self.strides, bias=fold_bn)(x)
                x = layers.tap(self, "conv", _bn(train, self.dtype, "bn", fold_bn)(x), "conv")
            return x
        kind = op.split("_")[0]
        if kind not in ("max", "avg") or not op.endswith("_pool_3x3"):
            raise ValueError(f"unknown NAS cell operation {op!r}")
        if self.strides == 2 and self.pool_padding == "keras":
            x = _keras_pool(x, kind)
        elif kind == "max":
            x = nn.max_pool(x, (3, 3), strides=(self.strides,) * 2, padding="SAME")
        else:
            x = nn.avg_pool(x, (3, 3), strides=(self.strides,) * 2, padding="SAME", count_include_pad=False)
        if width != self.features:
            x = _conv1x1(self.features, self.dtype, "conv", bias=fold_bn)(x)
            x = layers.tap(self, "conv", _bn(train, self.dtype, "bn", fold_bn)(x), "conv")
        return x


class FactorizedReduction(nn.Module):
    """Halve the size of `prev` without losing pixels: two 1×1 convolutions on the even and the odd-shifted
    grid, each to `features // 2` channels, concatenated and batch-normalized (after a ReLU)."""

    features: int
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(x)
        path1 = x[:, ::2, ::2, :]  # a 1×1 stride-2 "VALID" average pool is a subsampling
        shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:, :]
        path2 = shifted[:, ::2, ::2, :]
        half = self.features // 2
        path1 = _conv1x1(half, self.dtype, "path1_conv")(path1)
        path2 = _conv1x1(self.features - half, self.dtype, "path2_conv")(path2)
        concatenated = jnp.concatenate([path1, path2], axis=-1)
        y = _bn(train, self.dtype, "final_path_bn", self.fold_bn, keep=True)(concatenated)
        # Each path's output after its half of the shared BatchNorm (per channel, so the halves are its own).
        layers.tap(self, "path1_conv", y[..., :half], "conv")
        layers.tap(self, "path2_conv", y[..., half:], "conv")
        return y


class Cell(nn.Module):
    """A NAS cell: (x, prev) -> concatenation of the unused hidden states (TF-Slim's `BaseCell.__call__`)."""

    features: int
    operations: Sequence[str]
    hiddenstate_indices: Sequence[int]
    used_hiddenstates: Sequence[int]
    strides: int = 1
    pool_padding: str = "tf"
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, prev, train: bool = False):
        fold_bn = self.fold_bn
        # prev is None for the first stem cell: it then starts from x itself, unprojected.
        if prev is None:
            prev = x
        elif prev.shape[2] != x.shape[2]:
            prev = FactorizedReduction(self.features, self.dtype, fold_bn, name="prev_reduction")(prev, train)
        elif prev.shape[-1] != self.features:
            prev = _conv1x1(self.features, self.dtype, "prev_1x1", bias=fold_bn)(nn.relu(prev))
            prev = layers.tap(self, "prev_1x1", _bn(train, self.dtype, "prev_bn", fold_bn)(prev), "conv")
        h = _conv1x1(self.features, self.dtype, "beginning_1x1", bias=fold_bn)(nn.relu(x))
        h = layers.tap(self, "beginning_1x1", _bn(train, self.dtype, "beginning_bn", fold_bn)(h), "conv")

        states = [h, prev]
        for i in range(len(self.operations) // 2):
            pair = []
            for side, k in (("left", 2 * i), ("right", 2 * i + 1)):
                index = self.hiddenstate_indices[k]
                # Only operations on the cell's two inputs are strided; later states are already reduced.
                op = CellOperation(self.operations[k], self.features, self.strides if index < 2 else 1,
                                   self.pool_padding, self.dtype, fold_bn, name=f"comb_iter_{i}_{side}")
                pair.append(op(states[index], train))
            states.append(pair[0] + pair[1])
        out = [s for s, used in zip(states, self.used_hiddenstates) if not used]
        shapes = {s.shape[1:] for s in out}
        if len(shapes) != 1:
            # TF-Slim would reduce mismatched unused states here; no NASNet-A / PNASNet-5 cell has any.
            raise ValueError(f"cell states to concatenate differ in shape: {sorted(shapes)}")
        return jnp.concatenate(out, axis=-1)


def reduction_indices(num_cells: int, num_reduction_layers: int = 2) -> list[int]:
    """TF-Slim's `_calculate_reduction_indices`: where the network halves its size among `num_cells`."""
    return [int(k / (num_reduction_layers + 1) * num_cells) for k in range(1, num_reduction_layers + 1)]


def _check_input(x, model: str):
    if x.ndim != 4:
        raise ValueError(f"{model} expects NHWC images of rank 4, got shape {x.shape}.")
    if min(x.shape[1], x.shape[2]) < MIN_INPUT_SIZE:
        raise ValueError(
            f"{model} needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got "
            f"{x.shape[1]}x{x.shape[2]}; resize the images up (the ImageNet models were trained at 331x331)."
        )


def _stem(x, stem_filters: int, train: bool, dtype, out: dict, fold_bn: bool):
    x = nn.Conv(stem_filters, (3, 3), strides=2, padding="VALID", use_bias=fold_bn, dtype=dtype, name="stem_conv")(x)
    x = out["stem"] = layers.tap(None, "stem", _bn(train, dtype, "stem_bn", fold_bn)(x), "conv", "block")
    return x


def _head(x, num_classes: int, dtype, out: dict) -> dict:
    out["pre_logits"] = jnp.mean(nn.relu(x).astype(jnp.float32), axis=(1, 2))
    out["logits"] = nn.Dense(num_classes, dtype=dtype, name="logits")(out["pre_logits"])
    return out


class NASNet(nn.Module):
    """NASNet-A (TF-Slim `build_nasnet_large` and keras.applications `NASNet`): `num_cells` normal cells in
    three stacks of `num_cells // 3`, a reduction cell before the second and third stack.

    Defaults are NASNet-A-Large (6@4032): `num_conv_filters` 168 (= penultimate filters / 24), stem 96
    filters. A cell of the last stack outputs 6 × 4 × `num_conv_filters` channels.
    """

    num_classes: int = 1000
    num_cells: int = 18
    num_conv_filters: int = 168
    stem_filters: int = 96
    pool_padding: str = "tf"
    dtype: Dtype = jnp.float32
    fold_bn: bool = False  # inference: BatchNorm folded into the convolutions (see the module docstring)

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        layers.check_inference("NASNet", self.fold_bn, train)
        _check_input(x, "NASNet")
        if self.pool_padding not in ("tf", "keras"):
            raise ValueError(f"pool_padding must be 'tf' or 'keras', not {self.pool_padding!r}")
        out: dict = {}
        cell = dict(pool_padding=self.pool_padding, dtype=self.dtype, fold_bn=self.fold_bn)
        x = _stem(x, self.stem_filters, train, self.dtype, out, self.fold_bn)
        outputs = [None, x]
        scaling = 0.25  # two stem cells, each doubling
        for i in range(2):
            x = Cell(int(self.num_conv_filters * scaling), **NASNET_A_REDUCTION, strides=2, **cell,
                     name=f"cell_stem_{i}")(x, outputs[-2], train)
            out[f"cell_stem_{i}"] = layers.tap(None, f"cell_stem_{i}", x, "block")
            outputs.append(x)
            scaling *= 2
        scaling = 1.0
        reductions = reduction_indices(self.num_cells)
        for cell_num in range(self.num_cells):
            # skip_reduction_layer_input: a normal cell after a reduction takes the pre-reduction state.
            prev = outputs[-2]
            if cell_num in reductions:
                scaling *= 2
                r = reductions.index(cell_num)
                x = Cell(int(self.num_conv_filters * scaling), **NASNET_A_REDUCTION, strides=2, **cell,
                         name=f"reduction_cell_{r}")(x, outputs[-2], train)
                out[f"reduction_cell_{r}"] = layers.tap(None, f"reduction_cell_{r}", x, "block")
                outputs.append(x)
            x = Cell(int(self.num_conv_filters * scaling), **NASNET_A_NORMAL, **cell,
                     name=f"cell_{cell_num}")(x, prev, train)
            out[f"cell_{cell_num}"] = layers.tap(None, f"cell_{cell_num}", x, "block")
            outputs.append(x)
        return _head(x, self.num_classes, self.dtype, out)


class PNASNet(nn.Module):
    """PNASNet-5 (TF-Slim `build_pnasnet_large`, timm `pnasnet5large`): `num_cells` PNASNet-5 cells, the
    ones at TF-Slim's reduction indices strided, after two strided stem cells.

    Defaults are PNASNet-5-Large: `num_conv_filters` 216, stem 96 filters; a cell of the last stack
    outputs 5 × 4 × `num_conv_filters` = 4320 channels.
    """

    num_classes: int = 1000
    num_cells: int = 12
    num_conv_filters: int = 216
    stem_filters: int = 96
    dtype: Dtype = jnp.float32
    fold_bn: bool = False  # inference: BatchNorm folded into the convolutions (see the module docstring)

    @nn.compact
    @layers.exposes_layers
    def __call__(self, x, train: bool = False):
        layers.check_inference("PNASNet", self.fold_bn, train)
        _check_input(x, "PNASNet")
        out: dict = {}
        x = _stem(x, self.stem_filters, train, self.dtype, out, self.fold_bn)
        outputs = [None, x]
        scaling = 0.25
        for i in range(2):
            x = Cell(int(self.num_conv_filters * scaling), **PNASNET_5, strides=2, dtype=self.dtype,
                     fold_bn=self.fold_bn, name=f"cell_stem_{i}")(x, outputs[-2], train)
            out[f"cell_stem_{i}"] = layers.tap(None, f"cell_stem_{i}", x, "block")
            outputs.append(x)
            scaling *= 2
        scaling = 1.0
        reductions = reduction_indices(self.num_cells)
        for cell_num in range(self.num_cells):
            strides = 1
            if cell_num in reductions:
                scaling *= 2
                strides = 2
            x = Cell(int(self.num_conv_filters * scaling), **PNASNET_5, strides=strides, dtype=self.dtype,
                     fold_bn=self.fold_bn, name=f"cell_{cell_num}")(x, outputs[-2], train)
            out[f"cell_{cell_num}"] = layers.tap(None, f"cell_{cell_num}", x, "block")
            outputs.append(x)
        return _head(x, self.num_classes, self.dtype, out)


def nasnet_large(num_classes: int = 1000, **kwargs) -> NASNet:
    """NASNet-A-Large (6@4032), 331 px, `pre_logits` width 4032."""
    return NASNet(num_classes=num_classes, **kwargs)


def pnasnet_large(num_classes: int = 1000, **kwargs) -> PNASNet:
    """PNASNet-5-Large, 331 px, `pre_logits` width 4320."""
    return PNASNet(num_classes=num_classes, **kwargs)


def param_count(module: nn.Module, size: int = 331) -> int:
    """Number of trainable parameters (BatchNorm statistics excluded), from shapes alone."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
