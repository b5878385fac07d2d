"""PyTorch versions of embjax's ResNet-50 v1 and EfficientNet-Lite0, used only by the benchmarks.

They are written here from the architectures' definitions (Keras' ResNet50 and the EfficientNet-Lite
release), not from embjax's Flax code, so that a benchmark comparing embjax with PyTorch also checks that
both compute the same features. The weights come from the Flax variables (`*_state_dict_from_flax`), so
both sides run exactly the same numbers. PyTorch is a benchmark-only dependency (`pip install -e .[bench]`).

Layouts: the modules take NCHW float tensors (PyTorch's convention; `.to(memory_format=torch.channels_last)`
switches the storage to NHWC without changing the indexing), and the `preprocess_*` functions turn the
benchmark's uint8 NHWC images into that, so preprocessing is timed on both sides.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CAFFE_BGR_MEAN",
    "ResNetV1",
    "EfficientNetLite0",
    "LITE0_STAGES",
    "preprocess_caffe",
    "preprocess_lite",
    "resnet_state_dict_from_flax",
    "efficientnet_lite_state_dict_from_flax",
    "count_conv_dense_flops",
]

# keras.applications.imagenet_utils "caffe" mode: RGB -> BGR, then subtract the ImageNet BGR means.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# BatchNormalization epsilon of keras.applications.ResNet50.
KERAS_RESNET_BN_EPSILON = 1.001e-5
# TF BatchNormalization default, used by the EfficientNet-Lite release.
TF_BN_EPSILON = 1e-3


def preprocess_caffe(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> float32 (B, 3, H, W) BGR minus the caffe means (ResNet v1's input)."""
    x = images.permute(0, 3, 1, 2).flip(1).to(torch.float32)
    return x - torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32).view(1, 3, 1, 1)


def preprocess_lite(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> float32 (B, 3, H, W) as (x - 127) / 128 (the EfficientNet-Lite release)."""
    return (images.permute(0, 3, 1, 2).to(torch.float32) - 127.0) / 128.0


# --------------------------------------------------------------------------------------------------
# ResNet v1 as in keras.applications.ResNet50: the stride of a stage sits on the first 1x1 convolution
# of its first block (not on the 3x3 as in torchvision's "v1.5"), convolutions have biases, BN epsilon
# 1.001e-5, and a projection shortcut (1x1 conv + BN) opens every stage.


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int, project: bool, bias: bool, eps: float):
        super().__init__()
        out = 4 * width
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=bias),
                                      nn.BatchNorm2d(out, eps=eps)) if project else None
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride, bias=bias)
        self.bn1 = nn.BatchNorm2d(width, eps=eps)
        self.conv2 = nn.Conv2d(width, width, 3, 1, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(width, eps=eps)
        self.conv3 = nn.Conv2d(width, out, 1, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(out, eps=eps)

    def forward(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + residual)


class ResNetV1(nn.Module):
    """ResNet v1 (Keras layout); `stage_sizes=(3, 4, 6, 3)` is ResNet-50. forward -> {pre_logits, logits}."""

    def __init__(self, stage_sizes=(3, 4, 6, 3), num_classes: int = 1000, bias: bool = True,
                 eps: float = KERAS_RESNET_BN_EPSILON, stem_width: int = 64):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, stem_width, 7, 2, padding=3, bias=bias)
        self.stem_bn = nn.BatchNorm2d(stem_width, eps=eps)
        blocks = []
        in_channels = stem_width
        for stage, repeats in enumerate(stage_sizes):
            width = stem_width * 2 ** stage
            for r in range(repeats):
                stride = 2 if (stage > 0 and r == 0) else 1
                blocks.append(Bottleneck(in_channels, width, stride, project=(r == 0), bias=bias, eps=eps))
                in_channels = 4 * width
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x) -> dict[str, torch.Tensor]:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        # Keras zero-pads by 1 before a 'valid' 3x3/2 max-pool; after the ReLU that equals -inf padding.
        x = F.max_pool2d(x, 3, 2, padding=1)
        for block in self.blocks:
            x = block(x)
        pre_logits = x.mean(dim=(2, 3))
        return {"pre_logits": pre_logits, "logits": self.fc(pre_logits)}


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0: MBConv blocks without squeeze-and-excitation, ReLU6, TF "SAME" padding (the odd
# extra pixel of a stride-2 convolution goes to the bottom/right, which the trained weights expect).

# (kernel, stride, expand ratio, out channels, repeats): the seven block groups of Lite0 = B0.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding, computed from the input size at call time."""

    def forward(self, x):
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int, eps: float):
        super().__init__()
        hidden = in_channels * expand
        self.expand = None
        if expand != 1:
            self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False),
                                        nn.BatchNorm2d(hidden, eps=eps), nn.ReLU6())
        self.depthwise = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden, eps=eps)
        self.project = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels, eps=eps)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        h = x if self.expand is None else self.expand(x)
        h = F.relu6(self.depthwise_bn(self.depthwise(h)))
        h = self.project_bn(self.project(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (stem 32, head 1280 channels). forward -> {pre_logits, logits}."""

    def __init__(self, num_classes: int = 1000, eps: float = TF_BN_EPSILON, stages=LITE0_STAGES):
        super().__init__()
        self.stem_conv = SameConv2d(3, 32, 3, 2, bias=False)
        self.stem_bn = nn.BatchNorm2d(32, eps=eps)
        blocks = []
        in_channels = 32
        for kernel, stride, expand, out_channels, repeats in stages:
            for r in range(repeats):
                blocks.append(MBConv(in_channels, out_channels, kernel, stride if r == 0 else 1, expand, eps))
                in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head_conv = nn.Conv2d(in_channels, 1280, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(1280, eps=eps)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x) -> dict[str, torch.Tensor]:
        x = F.relu6(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        x = F.relu6(self.head_bn(self.head_conv(x)))
        pre_logits = x.mean(dim=(2, 3))
        return {"pre_logits": pre_logits, "logits": self.fc(pre_logits)}


# --------------------------------------------------------------------------------------------------
# Flax variables -> state dicts. Every converter goes through `_fill`, which insists that each tensor
# of the PyTorch module is filled exactly once with a tensor of its shape, and that every Flax variable
# is used, so a name or layout slip fails loudly instead of benchmarking a half-random model.


class FlaxToTorchMismatch(KeyError):
    """The Flax variables do not fit the PyTorch module (names or shapes)."""

    def __str__(self):  # KeyError would print the message with quotes
        return str(self.args[0])


def _leaf(variables: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
    node: Any = variables
    for p in path:
        if p not in node:
            raise FlaxToTorchMismatch(f"Flax variable {'/'.join(path)} not found (no '{p}' under "
                                      f"{'/'.join(path[:path.index(p)]) or 'the root'}; it has {sorted(node)})")
        node = node[p]
    return np.asarray(node, dtype=np.float32)


def _conv(kernel: np.ndarray) -> np.ndarray:
    # Flax HWIO (depthwise: H, W, 1, C) -> PyTorch OIHW (depthwise: C, 1, H, W).
    return np.transpose(kernel, (3, 2, 0, 1))


def _all_paths(tree: Mapping[str, Any], prefix=()) -> set[tuple[str, ...]]:
    out = set()
    for k, v in tree.items():
        if hasattr(v, "items"):
            out |= _all_paths(v, prefix + (k,))
        else:
            out.add(prefix + (k,))
    return out


def _fill(module: nn.Module, variables: Mapping[str, Any],
          entries: list[tuple[str, tuple[str, ...], Callable | None]]) -> dict[str, torch.Tensor]:
    target = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    out, problems, used = {}, [], set()
    for key, path, transform in entries:
        if key not in target:
            problems.append(f"PyTorch module has no '{key}' (for {'/'.join(path)})")
            continue
        value = _leaf(variables, path)
        value = transform(value) if transform is not None else value
        if tuple(value.shape) != tuple(target[key].shape):
            problems.append(f"{'/'.join(path)} -> {key}: shape {value.shape} != {tuple(target[key].shape)}")
            continue
        out[key] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))  # a writable copy
        used.add(path)
    problems += [f"PyTorch tensor '{k}' has no Flax source" for k in target if k not in out and
                 not any(k == e[0] for e in entries)]
    unused = sorted("/".join(p) for p in _all_paths(variables) - used)
    problems += [f"Flax variable {p} is not used" for p in unused]
    if problems:
        raise FlaxToTorchMismatch(f"Flax variables do not fit {type(module).__name__}: " + "; ".join(problems[:20])
                                  + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))
    return out


def _bn(torch_prefix: str, flax_path: tuple[str, ...]):
    return [(f"{torch_prefix}.weight", ("params", *flax_path, "scale"), None),
            (f"{torch_prefix}.bias", ("params", *flax_path, "bias"), None),
            (f"{torch_prefix}.running_mean", ("batch_stats", *flax_path, "mean"), None),
            (f"{torch_prefix}.running_var", ("batch_stats", *flax_path, "var"), None)]


def efficientnet_lite_state_dict_from_flax(module: EfficientNetLite0, variables) -> dict[str, torch.Tensor]:
    """State dict for `EfficientNetLite0` from `embjax.models.efficientnet.EfficientNetLite(variant=0)`
    variables (names stem_conv/stem_bn, block_<i>/{expand,depthwise,project}_{conv,bn}, head_*, classifier)."""
    entries = [("stem_conv.weight", ("params", "stem_conv", "kernel"), _conv)] + _bn("stem_bn", ("stem_bn",))
    for i, block in enumerate(module.blocks):
        t, f = f"blocks.{i}", f"block_{i}"
        if block.expand is not None:
            entries.append((f"{t}.expand.0.weight", ("params", f, "expand_conv", "kernel"), _conv))
            entries += _bn(f"{t}.expand.1", (f, "expand_bn"))
        entries.append((f"{t}.depthwise.weight", ("params", f, "depthwise_conv", "kernel"), _conv))
        entries += _bn(f"{t}.depthwise_bn", (f, "depthwise_bn"))
        entries.append((f"{t}.project.weight", ("params", f, "project_conv", "kernel"), _conv))
        entries += _bn(f"{t}.project_bn", (f, "project_bn"))
    entries.append(("head_conv.weight", ("params", "head_conv", "kernel"), _conv))
    entries += _bn("head_bn", ("head_bn",))
    entries += [("fc.weight", ("params", "classifier", "kernel"), np.transpose),
                ("fc.bias", ("params", "classifier", "bias"), None)]
    return _fill(module, variables, entries)


def resnet_state_dict_from_flax(module: ResNetV1, variables, names: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """State dict for `ResNetV1` from Flax ResNet variables.

    `names` describes the Flax naming, so this file need not hard-code another module's private layout:
    `stem_conv`, `stem_bn`, `fc` are paths (tuples); `block(i)` gives the path prefix of the i-th
    bottleneck over all stages; `conv(j)`, `bn(j)` (j = 1, 2, 3) and `shortcut_conv`, `shortcut_bn` are
    names inside a block.
    """
    def conv_entries(torch_prefix, flax_path):
        out = [(f"{torch_prefix}.weight", ("params", *flax_path, "kernel"), _conv)]
        if module.stem_conv.bias is not None:
            out.append((f"{torch_prefix}.bias", ("params", *flax_path, "bias"), None))
        return out

    entries = conv_entries("stem_conv", names["stem_conv"]) + _bn("stem_bn", names["stem_bn"])
    for i, block in enumerate(module.blocks):
        t, f = f"blocks.{i}", tuple(names["block"](i))
        if block.shortcut is not None:
            entries += conv_entries(f"{t}.shortcut.0", f + (names["shortcut_conv"],))
            entries += _bn(f"{t}.shortcut.1", f + (names["shortcut_bn"],))
        for j in (1, 2, 3):
            entries += conv_entries(f"{t}.conv{j}", f + (names["conv"](j),))
            entries += _bn(f"{t}.bn{j}", f + (names["bn"](j),))
    entries += [("fc.weight", ("params", *names["fc"], "kernel"), np.transpose),
                ("fc.bias", ("params", *names["fc"], "bias"), None)]
    return _fill(module, variables, entries)


# --------------------------------------------------------------------------------------------------


def count_conv_dense_flops(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-add FLOPs (2 per MAC) of every Conv2d and Linear for one forward pass of `example`.

    Counted from the layers' output shapes with hooks: an independent check of XLA's cost analysis.
    Elementwise work (BN, ReLU, adds, pooling) is left out; it is under 1% of a ResNet-50's FLOPs.
    """
    total = [0]

    def hook(layer, inputs, output):
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            macs = output.numel() * (layer.in_channels // layer.groups) * kh * kw
        else:
            macs = output.numel() * layer.in_features
        total[0] += 2 * macs

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return total[0]
