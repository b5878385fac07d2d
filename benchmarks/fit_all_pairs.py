"""Benchmark: fit every pairwise affine map between N models with embjax, against per-pair NumPy.

What a user would otherwise do is, for each ordered pair (A, B), call float64 `numpy.linalg.lstsq` on
[X_A, 1] → X_B. embjax instead streams the features once into one joint statistics accumulator
(`stats.update`, centred batch cross-products of only the N(N+1)/2 distinct blocks, Chan merges) and
solves all N(N−1) maps from it (`maps.affine_all`, one Cholesky per source). This script measures, on
synthetic correlated post-ReLU-like features (N = 5 models × 1280 dims, n = 60,000 by default):

  - the wall time of the embjax fit (accumulation + all solves, compiled beforehand) and of per-pair
    NumPy lstsq, in the same run, interleaved in rounds so a slow spell of a shared machine hits both;
  - the fit's floor: the N(N+1)/2 Gram blocks' 2·n·d² flops each at this machine's float32 matmul
    rate, probed with a 4096³ jitted matmul right before and after each fit (mean rate of 3 calls);
  - the max relative error of embjax's predictions on held-out rows against the float64 lstsq ones;
  - the peak memory (VmHWM) of the streaming embjax fit as n grows 10k → 1M, each n in a fresh
    subprocess that generates its features batch by batch and never holds them all.

The last line of the output ends with the speed-up over NumPy as a plain number.

    nice python benchmarks/fit_all_pairs.py                       # the recorded configuration
    python benchmarks/fit_all_pairs.py --dim 256 --n 20000 --numpy-pairs 4 --memory-n 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import load_average, machine_line, now, peak_rss_mb, reset_peak_rss  # noqa: E402

from embjax import maps, stats  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# --------------------------------------------------------------------------------------------------
# Synthetic features


class Features:
    """Deterministic batches of correlated post-ReLU-like features for N models.

    A shared latent z (latent dims with a power-law spectrum, like real embeddings) is mixed into each
    model's pre-activations, plus independent noise and a per-feature bias, then rectified:
    f_i = relu(z·s M_i + c_i + σ ε_i). Batch k is a pure function of (seed, k), so the same data can be
    regenerated in a subprocess without storing it.
    """

    def __init__(self, num_models: int, dim: int, latent: int = 512, noise: float = 0.3, seed: int = 0):
        self.num_models, self.dim = num_models, dim
        key = jax.random.key(seed)
        k_mix, k_bias, self._key = jax.random.split(key, 3)
        # Latent variances 1/(1+j): a power-law spectrum. Normalised so each pre-activation has unit
        # signal variance against a noise variance σ² (0.09): strongly correlated features whose
        # blocks have condition numbers in the thousands, as real embeddings do.
        scales = (1.0 + jnp.arange(latent, dtype=jnp.float32)) ** -0.5
        scales = scales / jnp.sqrt(jnp.sum(scales**2))
        mix = jax.random.normal(k_mix, (num_models, latent, dim), jnp.float32)
        self._mix = mix * scales[None, :, None]
        self._bias = 0.3 * jax.random.normal(k_bias, (num_models, dim), jnp.float32)
        self._noise = noise
        self._batch = jax.jit(self._make, static_argnums=(1,))

    def _make(self, index, size):
        k_z, k_e = jax.random.split(jax.random.fold_in(self._key, index))
        z = jax.random.normal(k_z, (size, self._mix.shape[1]), jnp.float32)
        pre = jnp.einsum("bl,mld->mbd", z, self._mix, precision="highest") + self._bias[:, None, :]
        pre = pre + self._noise * jax.random.normal(k_e, pre.shape, jnp.float32)
        return list(jnp.maximum(pre, 0.0))

    def batch(self, index: int, size: int) -> list[jax.Array]:
        """Batch `index` as a list of N (size, dim) float32 arrays."""
        return self._batch(index, size)


# --------------------------------------------------------------------------------------------------
# The two contestants and the floor probe


def embjax_fit(batches, dims, update):
    """Accumulate the joint statistics over `batches` and solve all N(N−1) maps; block until done."""
    state = stats.init(dims)
    for feats in batches:
        state = update(state, feats)
    fitted = maps.affine_all(state)
    jax.block_until_ready(fitted)
    return fitted


def numpy_pair(x_src: np.ndarray, x_dst: np.ndarray) -> np.ndarray:
    """What a user would write: float64 least squares with an intercept column, one pair at a time."""
    design = np.empty((x_src.shape[0], x_src.shape[1] + 1), np.float64)
    design[:, :-1] = x_src
    design[:, -1] = 1.0
    return np.linalg.lstsq(design, x_dst.astype(np.float64), rcond=None)[0]


class MatmulProbe:
    """This machine's float32 matmul rate: a jitted 4096³ matmul at full precision.

    `rate()` times `repeats` back-to-back calls and returns their mean flop/s, not the best call: on a
    shared machine the fit it is compared with runs through the same slow and fast spells, so the
    probe must average over them too (it is run right before and right after each fit).
    """

    def __init__(self, size: int = 4096):
        self.size = size
        self._a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
        self._f = jax.jit(lambda a: jnp.matmul(a, a, precision="highest"))
        self._f(self._a).block_until_ready()

    def rate(self, repeats: int = 3) -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            self._f(self._a).block_until_ready()
        return repeats * 2.0 * self.size**3 / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# Memory: one subprocess per n


_vm_hwm_mb = peak_rss_mb
_reset_hwm = reset_peak_rss


def memory_child(args) -> None:
    """Streaming fit of n samples generated on the fly; prints peak RSS figures as JSON."""
    gen = Features(args.models, args.dim, seed=args.seed)
    dims = (args.dim,) * args.models
    update = jax.jit(stats.update, donate_argnums=0)
    n, batch = args.memory_child, args.batch
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    # Warm-up: compile the generator, the update (full and last batch sizes) and the solves.
    warm = stats.init(dims)
    for size in sorted(set(sizes)):
        warm = update(warm, gen.batch(10**6, size))
    maps.affine_all(warm)
    jax.block_until_ready(warm)
    del warm
    baseline = _vm_hwm_mb()
    reset = _reset_hwm()
    t0 = time.perf_counter()
    state = stats.init(dims)
    for k, size in enumerate(sizes):
        state = update(state, gen.batch(k, size))
    jax.block_until_ready(maps.affine_all(state))
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "n": n,
        "peak_rss_mb": _vm_hwm_mb() if reset else None,
        "peak_rss_before_fit_mb": baseline,
        "seconds": seconds,
        "count": int(state.count),
    }))


def run_memory(args, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), "--models", str(args.models),
           "--dim", str(args.dim), "--batch", str(args.batch), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run for n={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------


def memory_scan(args, log) -> None:
    if not args.memory_n.strip():
        return
    log("")
    log("peak RSS of the streaming fit (fresh process per n, features generated per batch):")
    for n in (int(v) for v in args.memory_n.split(",")):
        m = run_memory(args, n)
        log(f"  n={n:>9,}: peak during fit {m['peak_rss_mb']:.0f} MB (process peak before the fit, incl. "
            f"compile: {m['peak_rss_before_fit_mb']:.0f} MB), fit {m['seconds']:.1f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--batch", type=int, default=10_000, help="rows per stats.update call")
    p.add_argument("--eval-rows", type=int, default=4096, help="held-out rows for the prediction error")
    p.add_argument("--numpy-pairs", type=int, default=0,
                   help="time only this many NumPy pairs (spread over sources) and extrapolate (0: all N(N-1) pairs)")
    p.add_argument("--rounds", type=int, default=4, help="rounds interleaving the fit, the probe and NumPy")
    p.add_argument("--memory-n", default="10000,100000,1000000", help="comma-separated n for the memory scan; '' skips it")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory scan (its figures do not depend on a quiet machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.memory_only:
        log(f"# fit_all_pairs --memory-only  {now()}; machine: {machine_line()}; command: {' '.join(sys.argv)}")
        memory_scan(args, log)
        return

    n_models, d = args.models, args.dim
    dims = (d,) * n_models
    # Ordered so that any prefix spreads over sources and targets: (0,1), (1,2), ..., (N-1,0), (0,2), ...
    pairs = [(s, (s + off) % n_models) for off in range(1, n_models) for s in range(n_models)]
    n_numpy = len(pairs) if args.numpy_pairs <= 0 else min(args.numpy_pairs, len(pairs))
    log(f"# fit_all_pairs  {now()}")
    log(f"# machine: {machine_line()}; load average {load_average()}")
    log(f"# jax {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}")
    log(f"# N={n_models} models x d={d}, n={args.n} rows in batches of {args.batch}, "
        f"{len(pairs)} pairs, {args.eval_rows} held-out rows; command: {' '.join(sys.argv)}")

    gen = Features(n_models, d, seed=args.seed)
    sizes = [args.batch] * (args.n // args.batch) + ([args.n % args.batch] if args.n % args.batch else [])
    t0 = time.perf_counter()
    batches = [jax.block_until_ready(gen.batch(k, size)) for k, size in enumerate(sizes)]
    eval_feats = [np.asarray(f, np.float64) for f in gen.batch(10**7, args.eval_rows)]
    host = [np.concatenate([np.asarray(b[i]) for b in batches]) for i in range(n_models)]
    active = float(np.mean([np.mean(h > 0) for h in host]))
    log(f"generated features in {time.perf_counter() - t0:.1f}s (fraction of active units {active:.2f})")

    update = jax.jit(stats.update, donate_argnums=0)
    t0 = time.perf_counter()
    warm = stats.init(dims)
    for size in sorted(set(sizes)):
        warm = update(warm, batches[sizes.index(size)])
    jax.block_until_ready(maps.affine_all(warm))
    del warm
    log(f"embjax compile + warm-up: {time.perf_counter() - t0:.1f}s (not counted below)")

    # Interleaved rounds: probe, embjax fit, probe, a share of the NumPy pairs.
    n_blocks = n_models * (n_models + 1) // 2
    floor_flops = n_blocks * 2.0 * args.n * d * d
    probe = MatmulProbe()
    fit_times, rates, ratios, numpy_times, coefs = [], [], [], {}, {}
    share = [pairs[:n_numpy][r::args.rounds] for r in range(args.rounds)]
    fitted = None
    for r in range(args.rounds):
        before = probe.rate()
        t0 = time.perf_counter()
        fitted = embjax_fit(batches, dims, update)
        fit_times.append(time.perf_counter() - t0)
        after = probe.rate()
        rates.append(0.5 * (before + after))
        ratios.append(fit_times[-1] / (floor_flops / rates[-1]))
        for s, t in share[r]:
            t0 = time.perf_counter()
            coefs[(s, t)] = numpy_pair(host[s], host[t])
            numpy_times[(s, t)] = time.perf_counter() - t0
        log(f"round {r + 1}/{args.rounds}: matmul {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s before / after, "
            f"embjax fit {fit_times[-1]:.2f}s (fit / floor {ratios[-1]:.2f}), "
            + ", ".join(f"numpy {s}->{t} {numpy_times[(s, t)]:.1f}s" for s, t in share[r])
            + f"; load {load_average()}")

    # Accuracy on held-out rows, against the float64 lstsq of every pair NumPy fitted.
    rel, rel_centred = 0.0, 0.0
    for (s, t), coef in coefs.items():
        x = eval_feats[s]
        ref = x @ coef[:-1] + coef[-1]
        w, b = (np.asarray(v, np.float64) for v in fitted[(s, t)])
        diff = np.linalg.norm(x @ w + b - ref)
        rel = max(rel, diff / np.linalg.norm(ref))
        rel_centred = max(rel_centred, diff / np.linalg.norm(ref - ref.mean(0)))

    fit = statistics.median(fit_times)
    rate = statistics.median(rates)
    floor = floor_flops / rate
    per_pair = statistics.median(numpy_times.values())
    numpy_total = sum(numpy_times.values()) * len(pairs) / n_numpy
    extrapolated = n_numpy < len(pairs)
    speedup = numpy_total / fit

    log("")
    log(f"embjax fit (accumulate + {len(pairs)} maps): median {fit:.2f}s over {len(fit_times)} rounds "
        f"({', '.join(f'{x:.2f}' for x in fit_times)})")
    log(f"floor: {n_blocks} Gram blocks x 2*n*d^2 = {floor_flops / 1e12:.2f} TFLOP at {rate / 1e9:.1f} GFLOP/s "
        f"(median of the probes around each fit) = {floor:.2f}s; fit / floor = {statistics.median(ratios):.2f} "
        f"(median of the per-round ratios {', '.join(f'{x:.2f}' for x in ratios)})")
    log(f"numpy lstsq float64: {n_numpy} pairs timed, median {per_pair:.1f}s a pair; "
        + (f"{len(pairs)} pairs EXTRAPOLATED from {n_numpy}: {numpy_total:.1f}s" if extrapolated
           else f"all {len(pairs)} pairs: {numpy_total:.1f}s"))
    log(f"max relative error of embjax predictions vs float64 lstsq on {args.eval_rows} held-out rows "
        f"({len(coefs)} pairs): {rel:.2e} (relative to the centred predictions: {rel_centred:.2e})")

    memory_scan(args, log)
    log("")
    log(f"speed-up of the embjax fit over per-pair numpy lstsq"
        f"{' (extrapolated)' if extrapolated else ''}: {speedup:.1f}")


if __name__ == "__main__":
    main()
