"""Benchmark: CPU and wall time per training image of the zoo models' training step (embjax.train).

What the backward-compatibility study's default pays for each of its new-model trainings: one jitted
AdamW step of a zoo model on random 28x28 images (the study's "independent" loss, embjax.bct.make_loss),
compiled with the engine's XLA:CPU options or XLA's defaults (TrainConfig.xla_cpu_defaults). Compilation
and the first step are timed apart; then every configuration runs in alternating rounds (two), so the
machine's other jobs weigh on all alike. CPU seconds (time.process_time, all threads) survive load better
than wall seconds.

  python benchmarks/train_step_cost.py zoo_inception:128:0,zoo_resnet_v2:128:1 --images 1536

Each configuration is MODEL:BATCH:XLA_DEFAULTS (1: XLA's default options, 0: the engine's).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from embjax import bct, sharding, train, zoo
from embjax.models import registry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", help="comma-separated MODEL:BATCH:XLA_DEFAULTS")
    parser.add_argument("--images", type=int, default=1536, help="training images per configuration and round pair")
    args = parser.parse_args()
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    steps = {}
    for item in args.configs.split(","):
        name, batch_size, defaults = item.split(":")
        key = (name, int(batch_size), bool(int(defaults)))
        spec = registry.get(name)
        module = spec.build()
        variables = zoo.numpy_init(module, spec.preprocess(jnp.zeros((2, 28, 28, 1), jnp.uint8)), 0)
        tx = train.optimizer(train.TrainConfig(batch_size=key[1]), 1000)
        state = sharding.replicate(train.init_state(variables, tx), mesh)
        step = train.make_train_step(bct.make_loss(module, spec.preprocess, "independent"), tx, mesh, 0, key[2])
        batch = sharding.shard_batch({"image": rng.integers(0, 256, (key[1], 28, 28, 1), dtype=np.uint8),
                                      "label": rng.integers(0, 10, (key[1],), dtype=np.int32)}, mesh)
        t, c = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        print(f"{item}: compilation and first step {time.perf_counter() - t:.1f} s wall, "
              f"{time.process_time() - c:.1f} s CPU", flush=True)
        steps[key] = [step, state, batch]
    totals = {k: [0.0, 0.0, 0] for k in steps}
    for _ in range(2):
        for key, entry in steps.items():
            step, state, batch = entry
            n = max(1, args.images // key[1] // 2)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(n):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            entry[1] = state
            totals[key][0] += time.perf_counter() - t
            totals[key][1] += time.process_time() - c
            totals[key][2] += n * key[1]
    print("| model | batch | XLA options | CPU ms / image | wall ms / image |\n|---|---:|---|---:|---:|")
    for (name, batch_size, defaults), (wall, cpu, n) in totals.items():
        print(f"| {name} | {batch_size} | {'defaults' if defaults else 'engine'} | {1e3 * cpu / n:.2f} | "
              f"{1e3 * wall / n:.2f} |")


if __name__ == "__main__":
    main()
