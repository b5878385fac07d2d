"""The thesis at full scale on one GPU: ResNet-152 throughput against PyTorch, MFU, and the ten-model fit step.

Prepared to run as one command within five minutes on one GPU (H100/H200):

    EMBJAX_ACCELERATOR=cuda ./launch.sh bench thesis_gpu          # ResNet-152, 331 px, batch 128

1. ResNet-152 v1 (random weights) at 331 px, batch 128, extracting pre-logit features from uint8
   images (preprocessing included on both sides): embjax's jitted forward in float32 (float32 precision
   requested, so no TF32) and in bfloat16, against `torch.compile` with channels_last on the same GPU
   (float32 with TF32 off, and bfloat16 autocast). Timed in alternating rounds, medians reported, with
   the features of each side checked against the other. FLOPs per image from XLA's cost analysis; MFU =
   FLOP/s ÷ the device's dense bfloat16 (or float32) peak (`--peak-tflops` overrides the table below).
2. The affine study's fit step (`embjax.extract.make_step`: every model's forward, then the joint
   statistics) over the thesis models the registry holds, random weights, 331-px host images, in
   images/s, with the projected hours for the thesis' 1.33M images (1.28M fit + 50k evaluation).

Goals (issue 15): ≥ 1.0× PyTorch, ≥ 40% MFU in bfloat16, projected full thesis run < 1 hour.

`--tiny` runs the same code on the CPU at a toy size (ResNet-50 at 64 px, batch 2, PyTorch eager, two
zoo models in the fit step): what the test suite runs, so the script stays working where no GPU is.
PyTorch is a benchmark-only dependency (the `bench` extra), never a dependency of the package.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def thesis_models() -> list[str]:
    """The imagenet preset's ten models (the thesis' CNNs, TF-Slim layouts)."""
    from experiments.configs.affine_equivalence import THESIS_NAMES

    return list(THESIS_NAMES)
# Dense peak TFLOP/s (bfloat16, float32 without TF32) by device-name fragment.
PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L4": (121.0, 30.3)}
THESIS_IMAGES = 1_281_167 + 50_000


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (tests)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image", type=int, default=331)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--fit-batch", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bfloat16 peak of the device")
    ap.add_argument("--models", default=None, help="comma-separated models for the fit step")
    return ap.parse_args(argv)


def _log(msg):
    print(msg, flush=True)


def resnet(depth_stages, image, batch, seed=0):
    """(spec, module, variables) of the registry ResNet v1 with NumPy-initialized weights."""
    import jax.numpy as jnp

    from embjax import zoo
    from embjax.models import registry

    spec = registry.get({(3, 8, 36, 3): "resnet152_v1", (3, 4, 6, 3): "resnet50_v1"}[depth_stages])
    # Run at the image size itself (the thesis' 331-px crops), not resized to the registry's 224.
    spec = dataclasses.replace(spec, input_size=image)
    variables = zoo.numpy_init(spec.build(), jnp.zeros((1, image, image, 3), jnp.float32), seed=seed)
    return spec, variables


def embjax_forward(spec, variables, dtype: str):
    import jax
    import jax.numpy as jnp

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    module = spec.build(dtype=dt) if dt != jnp.float32 else spec.build()
    precision = "float32" if dtype == "float32" else None

    def forward(v, images):
        with jax.default_matmul_precision(precision) if precision else _null():
            return module.apply(v, spec.preprocess(images).astype(dt))["pre_logits"].astype(jnp.float32)

    return jax.jit(forward)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def torch_forward(stages, variables, device: str, dtype: str, compile_: bool):
    import torch

    import torch_models as tm

    model = tm.ResNetV1(stage_sizes=stages, bias=True).eval()
    starts = np.cumsum((0, *stages[:-1]))
    names = dict(
        stem_conv=("conv1_conv",), stem_bn=("conv1_bn",), fc=("predictions",),
        block=lambda i: (f"conv{int(np.searchsorted(starts, i, side='right')) + 1}_block"
                         f"{i - int(starts[np.searchsorted(starts, i, side='right') - 1]) + 1}",),
        conv=lambda j: f"{j}_conv", bn=lambda j: f"{j}_bn", shortcut_conv="0_conv", shortcut_bn="0_bn")
    model.load_state_dict(tm.resnet_state_dict_from_flax(model, variables, names), strict=True)
    model = model.to(device).to(memory_format=torch.channels_last)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(False)

    def forward(images_uint8):
        x = tm.preprocess_caffe(images_uint8).contiguous(memory_format=torch.channels_last)
        if dtype == "bfloat16":
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                return model(x)["pre_logits"].float()
        return model(x)["pre_logits"]

    fn = torch.compile(forward) if compile_ else forward
    return fn


def time_rounds(contestants: dict, rounds: int, steps: int, sync) -> dict[str, list[float]]:
    """Seconds per step of each contestant, alternating contestants within every round."""
    out = {k: [] for k in contestants}
    for r in range(rounds):
        order = list(contestants)[r % len(contestants):] + list(contestants)[:r % len(contestants)]
        for name in order:
            fn = contestants[name]
            sync(fn())
            t = time.perf_counter()
            for _ in range(steps):
                res = fn()
            sync(res)
            out[name].append((time.perf_counter() - t) / steps)
    return out


def main(argv=None) -> int:
    a = _args(argv)
    if a.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        a.batch, a.image, a.rounds, a.steps, a.fit_batch = 2, 64, 1, 1, 4
    import jax
    import torch

    import common
    from embjax import extract, members as members_lib, stats

    platform = jax.devices()[0].platform
    kind = jax.devices()[0].device_kind
    device = "cuda" if (platform == "gpu" and torch.cuda.is_available()) else "cpu"
    _log(f"thesis_gpu: {kind} ({platform}), torch on {device}; {common.machine_line()}; {common.now()}")
    stages = (3, 4, 6, 3) if a.tiny else (3, 8, 36, 3)
    spec, variables = resnet(stages, a.image, a.batch)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch, a.image, a.image, 3), dtype=np.uint8)
    x_jax = jax.device_put(images)
    x_torch = torch.from_numpy(images).to(device)

    contestants, outputs, flops = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        fwd = embjax_forward(spec, variables, dtype)
        compiled = fwd.lower(variables, x_jax).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[dtype] = float(cost.get("flops", 0.0)) / a.batch
        contestants[f"embjax {dtype}"] = lambda f=compiled: f(variables, x_jax)
        tfwd = torch_forward(stages, variables, device, dtype, compile_=not a.tiny)
        contestants[f"torch {dtype}"] = lambda f=tfwd: f(x_torch)

    def sync(res):
        if isinstance(res, torch.Tensor):
            if res.is_cuda:
                torch.cuda.synchronize()
        else:
            jax.block_until_ready(res)

    for name, fn in contestants.items():  # warm-up (compilation) and the features, once
        r = fn()
        outputs[name] = np.asarray(r.float().cpu() if isinstance(r, torch.Tensor) else r, np.float64)
    times = time_rounds(contestants, a.rounds, a.steps, sync)
    med = {k: float(np.median(v)) for k, v in times.items()}
    peak = a.peak_tflops or next((p[0] for frag, p in PEAKS.items() if frag in kind), None)
    peak32 = next((p[1] for frag, p in PEAKS.items() if frag in kind), None)
    _log(f"\nResNet-152 v1 at {a.image} px, batch {a.batch}" if not a.tiny else
         f"\n(tiny) ResNet-50 v1 at {a.image} px, batch {a.batch}")
    _log("| contestant | img/s | ms / batch | vs torch same dtype | MFU | feature max rel. diff vs torch f32 |")
    _log("|---|---:|---:|---:|---:|---:|")
    ref = outputs["torch float32"]
    for name in contestants:
        dtype = name.split()[-1]
        ips = a.batch / med[name]
        ratio = med[f"torch {dtype}"] / med[name] if name.startswith("embjax") else 1.0
        pk = peak if dtype == "bfloat16" else peak32
        mfu = f"{100 * flops[dtype] * ips / (pk * 1e12):.1f}%" if pk else "n/a (no peak for this device)"
        diff = float(np.max(np.abs(outputs[name] - ref)) / (np.max(np.abs(ref)) + 1e-30))
        _log(f"| {name} | {ips:,.1f} | {1e3 * med[name]:.1f} | {ratio:.2f} | {mfu} | {diff:.1e} |")
    _log(f"XLA FLOPs per image: {flops['float32'] / 1e9:.1f} GFLOP")

    # The ten-model fit step.
    from embjax.models import registry

    names = a.models.split(",") if a.models else (["zoo_resnet_v1", "zoo_mobilenet_v2"] if a.tiny else
                                                   [m for m in thesis_models() if m in registry.names()])
    ms = members_lib.load(names, "random")
    dims = [m.feature_dim for m in ms]
    p = extract.Pass("fit", None, "train", {m.name: ("pre_logits",) for m in ms},
                     accumulator=stats.accumulator(dims, lambda out, b, aux: [out[m.name]["pre_logits"] for m in ms]))
    mesh = extract.make_mesh()
    n_dev = mesh.devices.size
    step = extract.make_step(ms, p, mesh)
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharded = NamedSharding(mesh, P(extract.DATA_AXIS))
    state = jax.device_put(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n_dev, *np.shape(x))).copy(),
                                        stats.init(dims)), sharded)
    flags = jax.device_put(np.zeros((n_dev, len(ms)), bool), sharded)
    variables_all = extract.replicate([m.variables for m in ms], mesh)
    host = {"image": rng.integers(0, 256, (a.fit_batch, a.image, a.image, 3), dtype=np.uint8),
            "label": np.zeros(a.fit_batch, np.int32), "mask": np.ones(a.fit_batch, bool),
            "index": np.arange(a.fit_batch, dtype=np.int32)}
    batch = extract.shard_batch(host, mesh)
    state, flags, _ = step(state, flags, variables_all, None, batch)  # compile
    jax.block_until_ready(state)
    per = []
    for _ in range(max(a.rounds, 1)):
        t = time.perf_counter()
        for _ in range(a.steps):
            state, flags, _ = step(state, flags, variables_all, None, batch)
        jax.block_until_ready(state)
        per.append((time.perf_counter() - t) / a.steps)
    ips = a.fit_batch / float(np.median(per))
    hours = THESIS_IMAGES / ips / 3600
    _log(f"\nfit step over {len(ms)} models ({', '.join(names)}; D = {sum(dims)}), {a.image}-px host images, "
         f"batch {a.fit_batch}: {ips:,.1f} img/s; the thesis' {THESIS_IMAGES:,} images would take {hours:.2f} h "
         "(device compute only; the host must decode that many JPEGs a second too)")
    bf = "embjax bfloat16"
    _log(f"ResNet-152 bfloat16 embjax/torch ratio: {med['torch bfloat16'] / med[bf]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
