"""Benchmark: all pairwise affine maps of features on disk, embjax's streaming run against scikit-learn in memory.

The user of issue 18 has N models' features as `.npy` files, one (rows, d) array per model. What they
would otherwise write is to load the arrays and fit scikit-learn's `LinearRegression` for every ordered
pair (an intercept, least squares through scipy's LAPACK solver). embjax's answer is
`experiments.features.run` (what `./launch.sh features --features=... --nosimilarity --similarity_rows=0`
runs): the files are memory-mapped and streamed once in batches into the joint statistics, and all
N(N−1) maps, their R² and the pairs' CKA are solved from them.

Each contestant runs in its own fresh subprocess (so peaks do not mix), which reports its wall time and
its peak resident size (VmHWM, which counts everything: NumPy, XLA buffers, mapped file pages), its
resident size after imports, and for scikit-learn also tracemalloc's peak of the arrays NumPy allocated.

  1. The comparison: N = 5 models × 1280 dims × 60,000 rows (the defaults), both contestants. With
     --sklearn-pairs K < 20 only K scikit-learn pairs are timed and the total is extrapolated (K × the
     median is not used: the measured K pair times are scaled by 20/K); its peak memory is measured
     exactly either way (every pair allocates the same).
  2. Growth (--growth): peak memory as the rows grow, each point TOOL:DIM:ROWS in its own process
     (scikit-learn fits one pair there: the peak is reached in the first pair).
  3. The maps agree: max relative difference of the two contestants' predictions on 4096 rows.

Synthetic features come from fit_all_pairs.Features (correlated post-ReLU-like features with a power-law
spectrum) and are written to --data-dir batch by batch (removed at the end unless --keep-data).

    nice python benchmarks/own_features.py                                   # the comparison + default growth
    python benchmarks/own_features.py --dim 256 --n 20000 --sklearn-pairs 2 --growth embjax:256:200000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import load_average, machine_line, now, peak_rss_mb, rss_mb  # noqa: E402


def pair_order(n_models: int) -> list[tuple[int, int]]:
    """Ordered so that any prefix spreads over sources and targets: (0,1), (1,2), ..., (N-1,0), (0,2), ..."""
    return [(s, (s + off) % n_models) for off in range(1, n_models) for s in range(n_models)]


# --------------------------------------------------------------------------------------------------
# The contestants (each a fresh subprocess; each prints one JSON line on stdout)


def child_embjax(args) -> None:
    import jax  # noqa: F401  (imported before the baseline, as scikit-learn is in its child)
    import numpy as np

    from embjax import evaluate, feature_files, maps, stats  # noqa: F401
    from experiments import features

    files = args.files.split(",")
    base = rss_mb()
    spec = ",".join(f"m{i}={path}" for i, path in enumerate(files))
    t0 = time.perf_counter()
    results, saved = features.run({"features": [spec], "batch_size": args.batch, "progress_seconds": 30.0,
                                   # the maps (and their R², CKA), what scikit-learn is asked for too
                                   "similarity": False, "similarity_rows": 0},
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    if args.save_maps:
        np.savez(args.save_maps, **{f"{s}_{t}_{k}": np.asarray(v, np.float32)
                                    for s, t in pair_order(len(files))
                                    for k, v in zip("Wb", saved[f"maps/m{s}__to__m{t}.npz"])})
    print(json.dumps({"tool": "embjax", "rows": results["num_fit"], "seconds": seconds,
                      "phases": results["meta"]["seconds"], "rss_after_imports_mb": base,
                      "peak_rss_mb": peak_rss_mb()}))


def child_sklearn(args) -> None:
    import tracemalloc

    import numpy as np
    from sklearn.linear_model import LinearRegression

    files = args.files.split(",")
    pairs = pair_order(len(files))[: args.pairs]
    base = rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    feats = [np.load(path) for path in files]  # what a user writes: every model's features in memory
    load = time.perf_counter() - t0
    after_load = peak_rss_mb()
    fits, coefs = {}, {}
    for s, t in pairs:
        t1 = time.perf_counter()
        reg = LinearRegression().fit(feats[s], feats[t])
        fits[f"{s}_{t}"] = time.perf_counter() - t1
        coefs[f"{s}_{t}_W"], coefs[f"{s}_{t}_b"] = reg.coef_.T, reg.intercept_
        print(f"  sklearn pair {s}->{t}: {fits[f'{s}_{t}']:.1f}s; load {load_average()}", file=sys.stderr, flush=True)
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    if args.save_maps:
        np.savez(args.save_maps, **coefs)
    print(json.dumps({"tool": "sklearn", "rows": int(feats[0].shape[0]), "load_seconds": load, "pair_seconds": fits,
                      "rss_after_imports_mb": base, "peak_rss_after_load_mb": after_load,
                      "peak_rss_mb": peak_rss_mb(), "tracemalloc_peak_mb": traced_peak, "dtype": str(feats[0].dtype)}))


def run_child(tool: str, files: list[str], args, pairs: int = 0, save_maps: str = "") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", tool, "--files", ",".join(files),
           "--batch", str(args.batch), "--pairs", str(pairs)]
    if save_maps:
        cmd += ["--save-maps", save_maps]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT)  # stderr: live
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} on {files[0]}... failed with exit code {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0  # the whole process: imports, compile, fit
    return out


# --------------------------------------------------------------------------------------------------
# Data


def make_data(data_dir: str, n_models: int, dim: int, rows: int, seed: int, log) -> list[str]:
    """N .npy files of (rows, dim) float32 features, generated and written batch by batch (cached)."""
    import numpy as np

    from fit_all_pairs import Features

    directory = os.path.join(data_dir, f"m{n_models}_d{dim}_n{rows}_s{seed}")
    files = [os.path.join(directory, f"model{i}.npy") for i in range(n_models)]
    done = os.path.join(directory, "complete")
    if os.path.exists(done):
        return files
    os.makedirs(directory, exist_ok=True)
    t0 = time.perf_counter()
    gen = Features(n_models, dim, seed=seed)
    outs = [np.lib.format.open_memmap(f, mode="w+", dtype=np.float32, shape=(rows, dim)) for f in files]
    step = 10_000
    for k, start in enumerate(range(0, rows, step)):
        size = min(step, rows - start)
        for out, block in zip(outs, gen.batch(k, size)):
            out[start:start + size] = np.asarray(block)
    for out in outs:
        out.flush()
    del outs
    open(done, "w").close()
    log(f"wrote {n_models} x ({rows:,}, {dim}) float32 to {directory} "
        f"({n_models * rows * dim * 4 / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s")
    return files


# --------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--batch", type=int, default=4096, help="embjax rows per streamed batch (the CLI default)")
    p.add_argument("--sklearn-pairs", type=int, default=0, help="time this many scikit-learn pairs and "
                   "extrapolate to all N(N-1) (0: all)")
    p.add_argument("--growth", default="embjax:{dim}:{n10},sklearn:{dim}:{n2}",
                   help="comma-separated TOOL:DIM:ROWS peak-memory points ({dim}, {n}, {n2}, {n10} expand); '' skips")
    p.add_argument("--skip-comparison", action="store_true", help="only the growth points")
    p.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "embjax-own-features-bench"))
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--files", default="", help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--save-maps", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "embjax":
        return child_embjax(args)
    if args.child == "sklearn":
        return child_sklearn(args)

    import numpy as np

    log = lambda *a: print(*a, flush=True)  # noqa: E731
    n_models, d, n = args.models, args.dim, args.n
    all_pairs = pair_order(n_models)
    log(f"# own_features  {now()}")
    log(f"# machine: {machine_line()}; load average {load_average()}")
    log(f"# command: {' '.join(sys.argv)}")
    summary = []
    try:
        if not args.skip_comparison:
            files = make_data(args.data_dir, n_models, d, n, args.seed, log)
            k = len(all_pairs) if args.sklearn_pairs <= 0 else min(args.sklearn_pairs, len(all_pairs))
            maps_e = os.path.join(args.data_dir, "embjax_maps.npz")
            maps_s = os.path.join(args.data_dir, "sklearn_maps.npz")
            log(f"\n## comparison: {n_models} models x {d} dims x {n:,} rows ({len(all_pairs)} ordered pairs)")
            log(f"embjax (experiments.features.run, batches of {args.batch}), load {load_average()}:")
            e = run_child("embjax", files, args, save_maps=maps_e)
            log(f"  {json.dumps(e)}")
            log(f"scikit-learn LinearRegression, {k} of {len(all_pairs)} pairs timed, load {load_average()}:")
            s = run_child("sklearn", files, args, pairs=k, save_maps=maps_s)
            log(f"  {json.dumps(s)}")
            pair_times = list(s["pair_seconds"].values())
            fit_total = sum(pair_times) * len(all_pairs) / k
            sk_total = s["load_seconds"] + fit_total
            extrapolated = k < len(all_pairs)

            # Both contestants' maps on the first (up to) 4096 rows (float64 predictions).
            with np.load(maps_e) as me, np.load(maps_s) as ms:
                worst = 0.0
                for key in s["pair_seconds"]:
                    a, b = (int(v) for v in key.split("_"))
                    x = np.asarray(np.load(files[a], mmap_mode="r")[:4096], np.float64)
                    ref = x @ ms[f"{key}_W"].astype(np.float64) + ms[f"{key}_b"]
                    got = x @ me[f"{key}_W"].astype(np.float64) + me[f"{key}_b"]
                    worst = max(worst, float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(0))))
            summary += [
                f"| embjax: `./launch.sh features` (stream + {len(all_pairs)} maps), whole process | "
                f"{e['process_seconds']:.1f} s (run {e['seconds']:.1f} s: fit {e['phases']['fit']:.1f}, "
                f"maps {e['phases']['maps']:.1f}) | {e['peak_rss_mb']:.0f} MB ({e['rss_after_imports_mb']:.0f} after imports) |",
                f"| scikit-learn: np.load + LinearRegression per pair, whole process | "
                f"{s['process_seconds'] - sum(pair_times) + fit_total:.1f} s{' (extrapolated)' if extrapolated else ''} "
                f"(load {s['load_seconds']:.1f} s, fits {fit_total:.1f} s: median {statistics.median(pair_times):.1f} s a pair, "
                f"{k} of {len(all_pairs)} timed) | {s['peak_rss_mb']:.0f} MB ({s['rss_after_imports_mb']:.0f} after imports, "
                f"{s['peak_rss_after_load_mb']:.0f} after np.load; "
                f"tracemalloc peak {s['tracemalloc_peak_mb']:.0f} MB) |",
                f"| max relative difference of predictions on {min(4096, n)} rows ({k} pair{'s' if k > 1 else ''}; norm of the difference over the "
                f"norm of the centred scikit-learn predictions) | {worst:.1e} | |",
            ]
            log(f"\nspeed-up of embjax over scikit-learn{' (extrapolated)' if extrapolated else ''} (whole processes): "
                f"{(s['process_seconds'] - sum(pair_times) + fit_total) / e['process_seconds']:.1f}x; "
                f"sklearn total {sk_total:.1f} s without process start-up")

        points = [t.strip() for t in args.growth.format(dim=d, n=n, n2=2 * n, n10=10 * n).split(",") if t.strip()]
        if points:
            log("\n## peak memory as the rows grow (fresh process per point)")
        for point in points:
            tool, dim, rows = point.split(":")
            files = make_data(args.data_dir, n_models, int(dim), int(rows), args.seed, log)
            log(f"{tool} at {n_models} x {dim} x {int(rows):,}, load {load_average()}:")
            m = run_child(tool, files, args, pairs=1)
            log(f"  {json.dumps(m)}")
            what = (f"embjax, {n_models} x {dim} dims x {int(rows):,} rows (fit + maps {m['seconds']:.0f} s)"
                    if tool == "embjax" else
                    f"scikit-learn, {n_models} x {dim} dims x {int(rows):,} rows (load {m['load_seconds']:.0f} s, one pair "
                    f"{next(iter(m['pair_seconds'].values())):.0f} s)")
            after = (f", {m['peak_rss_after_load_mb']:.0f} after np.load" if tool == "sklearn" else "")
            summary.append(f"| peak RSS: {what} | | {m['peak_rss_mb']:.0f} MB ({m['rss_after_imports_mb']:.0f} after "
                           f"imports{after}) |")
    finally:
        if not args.keep_data:
            shutil.rmtree(args.data_dir, ignore_errors=True)
    log(f"\n## summary ({now()}, load average {load_average()})\n")
    log("| figure | time | peak memory |\n|---|---|---|")
    for line in summary:
        log(line)


if __name__ == "__main__":
    main()
