"""Forward throughput of a jitted EfficientNet-Lite (default: Lite0, 224 px, batch 32, float32, real weights).

Measures what the extraction engine pays per image: one jitted `module.apply` on a device-resident batch,
timed after warm-up over repeated calls (each ends with block_until_ready). Prints the command-line
arguments, the jax/jaxlib versions and devices, and the median images/s with its spread.

    ./launch.sh python benchmarks/forward_speed.py
    ./launch.sh python benchmarks/forward_speed.py --depthwise=xla   # XLA grouped convolution instead
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # embjax without installing

from embjax.models.efficientnet import EfficientNetLite  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", type=int, default=0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--depthwise", choices=("shifts", "xla"), default="shifts")
    parser.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                        help="pretrained: converted ImageNet weights (cached); random: NumPy-drawn ones "
                             "(for variants without weights; same speed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls")
    args = parser.parse_args(argv)

    print("args:", " ".join(f"--{k}={v}" for k, v in vars(args).items()))
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, python {platform.python_version()}, "
          f"devices {jax.devices()}, cpu count {os.cpu_count()}, "
          f"matmul precision {jax.config.jax_default_matmul_precision}")

    module = EfficientNetLite(variant=args.variant, dtype=jnp.dtype(args.dtype), depthwise_impl=args.depthwise)
    if args.weights == "pretrained":
        from embjax.models.convert.efficientnet_lite import load_pretrained
        variables = load_pretrained(args.variant)
    else:
        rng = np.random.default_rng(0)
        shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        variables = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(np.float32) + 0.5
                                 if len(s.shape) == 1 else (rng.standard_normal(s.shape) * 0.05).astype(np.float32),
                                 shapes)
    variables = jax.device_put(variables)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3), jnp.float32))

    forward = jax.jit(lambda v, x: module.apply(v, x)["pre_logits"])
    t0 = time.perf_counter()
    compiled = forward.lower(variables, x).compile()
    print(f"compile: {time.perf_counter() - t0:.1f} s")
    for _ in range(args.warmup):
        compiled(variables, x).block_until_ready()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        compiled(variables, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    rates = sorted(args.batch / t for t in times)
    q1, median, q3 = np.percentile(rates, [25, 50, 75])
    result = {"median_img_s": float(median), "q1": float(q1), "q3": float(q3), "min": rates[0], "max": rates[-1],
              "median_batch_s": statistics.median(times)}
    print(f"EfficientNet-Lite{args.variant} {args.size}px batch {args.batch} {args.dtype} ({args.depthwise}): "
          f"median {median:.1f} img/s (IQR {q1:.1f}-{q3:.1f}, min {rates[0]:.1f}, max {rates[-1]:.1f}; "
          f"{args.repeats} timed batches, median {result['median_batch_s'] * 1e3:.0f} ms/batch)")
    return result


if __name__ == "__main__":
    main()
