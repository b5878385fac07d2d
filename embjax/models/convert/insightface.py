"""insightface ArcFace `backbone.pth` state dicts -> Flax variables for embjax.models.iresnet.IResNet.

The name map (PyTorch key -> Flax path) is explicit: `conv1.weight` -> params/conv1/kernel,
`bn1.{weight,bias,running_mean,running_var}` -> params/bn1/{scale,bias}, batch_stats/bn1/{mean,var},
`prelu.weight` -> params/prelu/negative_slope, `layer<s>.<b>.<name>` -> layer<s>_<b>/<name> with
`downsample.0` / `downsample.1` -> downsample_conv / downsample_bn, then `bn2`, `fc`, `features`.
Convolution kernels go OIHW -> HWIO. `fc.weight` is (embedding, C·H·W) in PyTorch's (C, H, W) flatten
order; Flax flattens (H, W, C), so its columns are permuted before transposing.

The architecture (blocks per stage, widths, embedding size) is read from the state dict itself, so one
converter serves iresnet18..200 and any smaller test configuration; the result is then checked leaf by
leaf against `jax.eval_shape` of the module, and every problem is reported at once
(embjax.models.convert.framework.WeightMismatchError). `num_batches_tracked` counters are ignored.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from embjax.models.iresnet import IResNet
from embjax.models.convert.framework import WeightMismatchError, check_shapes

_IGNORED_SUFFIXES = (".num_batches_tracked",)


def _conv(w):
    return np.transpose(w, (2, 3, 1, 0))


def architecture(state_dict: Mapping[str, Any]) -> dict:
    """IResNet fields implied by the state dict: stage_sizes, stage_widths, stem_width, num_features,
    fc_grid."""
    blocks: dict[int, int] = {}
    for key in state_dict:
        m = re.match(r"layer(\d+)\.(\d+)\.", key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    needed = ["conv1.weight", "fc.weight"] + [f"layer{s}.0.conv1.weight" for s in sorted(blocks)]
    missing = [k for k in needed if k not in state_dict]
    if not blocks or missing or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise WeightMismatchError("insightface iResNet state dict", [
            f"cannot read the architecture: stages found {sorted(blocks)}, missing {missing or 'nothing'}; "
            "expected an insightface arcface_torch backbone.pth (keys conv1.weight, layer1.0.bn1.weight, ..., "
            "fc.weight, features.weight)"])
    widths = tuple(int(np.shape(state_dict[f"layer{s}.0.conv1.weight"])[0]) for s in sorted(blocks))
    fc_out, fc_in = (int(v) for v in np.shape(state_dict["fc.weight"]))
    grid = int(round((fc_in / widths[-1]) ** 0.5))
    if grid * grid * widths[-1] != fc_in:
        raise WeightMismatchError("insightface iResNet state dict", [
            f"fc.weight has {fc_in} inputs, not a square map of the last stage's {widths[-1]} channels"])
    return dict(stage_sizes=tuple(blocks[s] for s in sorted(blocks)), stage_widths=widths,
                stem_width=int(np.shape(state_dict["conv1.weight"])[0]), num_features=fc_out, fc_grid=grid)


def _bn(torch_prefix: str, flax_path: tuple[str, ...]):
    return [(f"{torch_prefix}.weight", ("params", *flax_path, "scale"), None),
            (f"{torch_prefix}.bias", ("params", *flax_path, "bias"), None),
            (f"{torch_prefix}.running_mean", ("batch_stats", *flax_path, "mean"), None),
            (f"{torch_prefix}.running_var", ("batch_stats", *flax_path, "var"), None)]


def torch_name_map(module: IResNet) -> list[tuple[str, tuple[str, ...], Any]]:
    """(PyTorch key, Flax variable path, transform or None) for every tensor `module` needs."""
    c, g = module.stage_widths[-1], module.fc_grid

    def fc_kernel(w):  # (out, C·H·W) in (C, H, W) order -> (H·W·C, out)
        return w.reshape(w.shape[0], c, g, g).transpose(2, 3, 1, 0).reshape(g * g * c, w.shape[0])

    entries = [("conv1.weight", ("params", "conv1", "kernel"), _conv)]
    entries += _bn("bn1", ("bn1",))
    entries.append(("prelu.weight", ("params", "prelu", "negative_slope"), None))
    for s, blocks in enumerate(module.stage_sizes, start=1):
        for b in range(blocks):
            t, f = f"layer{s}.{b}", f"layer{s}_{b}"
            entries += _bn(f"{t}.bn1", (f, "bn1"))
            entries.append((f"{t}.conv1.weight", ("params", f, "conv1", "kernel"), _conv))
            entries += _bn(f"{t}.bn2", (f, "bn2"))
            entries.append((f"{t}.prelu.weight", ("params", f, "prelu", "negative_slope"), None))
            entries.append((f"{t}.conv2.weight", ("params", f, "conv2", "kernel"), _conv))
            entries += _bn(f"{t}.bn3", (f, "bn3"))
            if b == 0:
                entries.append((f"{t}.downsample.0.weight", ("params", f, "downsample_conv", "kernel"), _conv))
                entries += _bn(f"{t}.downsample.1", (f, "downsample_bn"))
    entries += _bn("bn2", ("bn2",))
    entries.append(("fc.weight", ("params", "fc", "kernel"), fc_kernel))
    entries.append(("fc.bias", ("params", "fc", "bias"), None))
    entries += _bn("features", ("features",))
    return entries


def convert_iresnet(state_dict: Mapping[str, Any], **expect) -> dict[str, Any]:
    """Flax variables {"params", "batch_stats"} (float32 NumPy) for the IResNet the state dict describes.

    `expect` (e.g. stage_sizes=(3, 4, 14, 3) for iresnet50) names fields the file must have; a file of
    another depth or width is reported rather than silently converted into a different model.
    """
    arch = architecture(state_dict)
    wrong = [f"{k}: file has {arch[k]!r}, expected {tuple(v) if isinstance(v, list) else v!r}"
             for k, v in expect.items() if arch.get(k) != (tuple(v) if isinstance(v, list) else v)]
    if wrong:
        raise WeightMismatchError("insightface iResNet state dict", wrong)
    module = IResNet(**arch)
    entries = torch_name_map(module)
    used = {k for k, _, _ in entries}
    problems = [f"missing {k} (needed for {'/'.join(p)})" for k, p, _ in entries if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    variables: dict[str, Any] = {}
    for key, path, transform in entries:
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key], np.float32)
        value = transform(value) if transform is not None else value
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value)
    if problems:
        raise WeightMismatchError("insightface iResNet state dict", problems)
    side = 16 * arch["fc_grid"]
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, side, side, 3), jnp.float32))
    check_shapes(expected, variables, f"insightface iResNet {arch['stage_sizes']}")
    return variables
