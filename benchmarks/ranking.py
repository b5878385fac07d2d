"""Benchmark: exact leave-one-out retrieval and kNN, embjax.retrieval against NumPy float64 and faiss.

Data: N clustered embeddings (class centres plus Gaussian noise twice their spread, `--classes` classes), cosine,
every item a query against all the others (the query's own row removed). Contestants, timed in
alternating rounds in one process (benchmarks/common.alternate), each giving Recall@1/5, mAP, MAP@R and
R-precision of every query:

  numpy64        the plain reference: float64 block matmul, then np.argsort of every score row and the
                 metrics from the sorted relevance (what a user would write with NumPy alone);
  embjax host    retrieval.leave_one_out(backend="host"): float32 BLAS block matmul, then per query the
                 relevant scores sorted alone and the others counted in by binary search (no full sort);
  embjax device  retrieval.leave_one_out(backend="device"): the jitted block matmul + stable argsort per
                 row (the accelerator path; on XLA:CPU its sort is slow); --device to include it.

The numbers must agree: the largest absolute difference of any metric against numpy64 is printed.
Wall and CPU seconds (time.process_time, all threads of the process) are both reported: on a shared
machine the wall time depends on the other jobs, the CPU time much less.
kNN (k = --k nearest other items of every item): embjax host (argpartition), embjax device (scan of
lax.top_k) and faiss IndexFlatIP (exact inner product on normalised rows) when faiss-cpu is installed;
the returned neighbour sets are compared.

--scale N:D:Q ranks Q queries of a generated N×D set against all N (the memory of the full-size gallery
with one query block at a time) and prints the peak resident size.

    python benchmarks/ranking.py                         # 10,000 × 128, 100 classes, 2 rounds
    python benchmarks/ranking.py --device --rounds 1     # also the jitted device path on this CPU
    python benchmarks/ranking.py --scale 50000:2048:2048 # memory at 50,000 × 2,048
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from common import (alternate, load_average, machine_line, median, now, peak_rss_mb, reset_peak_rss,  # noqa: E402
                    rss_mb, spread)


def clustered(n: int, d: int, classes: int, seed: int = 0, spread_: float = 2.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = (rng.standard_normal((classes, d)) / np.sqrt(d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for lo in range(0, n, 4096):  # in float32 chunks, so that generating never doubles the memory
        hi = min(n, lo + 4096)
        x[lo:hi] = centres[labels[lo:hi]] + spread_ * rng.standard_normal((hi - lo, d), np.float32) / np.sqrt(d)
    return x, labels


def numpy64_leave_one_out(x, labels, ks=(1, 5), block=500) -> dict:
    """The reference: float64 cosine scores by blocks, a full argsort per row, metrics from the ranking."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = x.shape[0]
    hits = np.zeros(len(ks))
    ap = mapr = rprec = 0.0
    counted = 0
    for lo in range(0, n, block):
        s = x[lo:lo + block] @ x.T
        rows = np.arange(s.shape[0])
        s[rows, lo + rows] = -np.inf  # the query itself
        order = np.argsort(-s, axis=1)[:, :-1]  # drop the last: the query itself
        rel = labels[order] == labels[lo:lo + block, None]
        r = rel.sum(axis=1)
        prec = np.cumsum(rel, axis=1) / np.arange(1, n)
        for i in np.flatnonzero(r > 0):
            counted += 1
            ri = r[i]
            ap += prec[i][rel[i]].sum() / ri
            mapr += (prec[i, :ri] * rel[i, :ri]).sum() / ri
            rprec += rel[i, :ri].sum() / ri
            for t, k in enumerate(ks):
                hits[t] += rel[i, :k].any()
    out = {f"recall_at_{k}": hits[t] / counted for t, k in enumerate(ks)}
    out.update(map=ap / counted, map_at_r=mapr / counted, r_precision=rprec / counted)
    return out


METRIC_KEYS = ("recall_at_1", "recall_at_5", "map", "map_at_r", "r_precision")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", action="store_true", help="also time the jitted device path (slow on XLA:CPU)")
    p.add_argument("--scale", default="", help="N:D:Q: memory and time of Q queries against an N×D gallery")
    p.add_argument("--spread", type=float, default=2.0, help="noise / centre spread of the clusters")
    args = p.parse_args()

    import jax

    from embjax import retrieval

    print(f"# ranking benchmark, {now()}, {machine_line()}, jax {jax.__version__} ({jax.default_backend()})")
    print(f"# load average at start: {load_average()}")

    if args.scale:
        n, d, q = (int(v) for v in args.scale.split(":"))
        x, labels = clustered(n, d, args.classes, spread_=args.spread)
        reset = reset_peak_rss()
        print(f"# scale: {q} queries against {n} × {d} (gallery {x.nbytes / 2**30:.2f} GiB float32), "
              f"resident before ranking {rss_mb():.0f} MB (peak counter reset: {reset})")
        t0 = time.perf_counter()
        got = retrieval.leave_one_out(x[:q], labels[:q], x, labels, backend="host")
        sec = time.perf_counter() - t0
        print(f"embjax host: {sec:.1f} s ({sec / q * 1e3:.2f} ms per query against {n}); peak RSS "
              f"{peak_rss_mb():.0f} MB; " + ", ".join(f"{k} {float(got[k]):.4f}" for k in METRIC_KEYS))
        print(f"# load average at end: {load_average()}")
        return

    x, labels = clustered(args.n, args.dim, args.classes)
    print(f"# data: {args.n} × {args.dim} float32, {args.classes} classes, cosine, leave-one-out")
    results = {}

    cpu = {}

    def run(name, fn):
        def call():
            t0 = time.process_time()
            results[name] = fn()
            cpu.setdefault(name, []).append(time.process_time() - t0)
        return call

    contestants = [
        ("numpy64", run("numpy64", lambda: numpy64_leave_one_out(x, labels))),
        ("embjax host", run("embjax host", lambda: retrieval.leave_one_out(x, labels, x, labels, backend="host",
                                                                           query_block=512))),
    ]
    if args.device:
        dev = lambda: {k: float(v) for k, v in retrieval.leave_one_out(  # noqa: E731
            x, labels, x, labels, backend="device").items()}
        t0 = time.perf_counter()
        dev()
        print(f"# device path compiled and ran once in {time.perf_counter() - t0:.1f} s")
        contestants.append(("embjax device", run("embjax device", dev)))
    times = alternate(contestants, args.rounds, log=print)
    ref = results["numpy64"]
    print("\n| leave-one-out | median wall s | min..max | × numpy64 (wall) | median CPU s | × numpy64 (CPU) "
          "| max |Δ| vs numpy64 | R@1 | R@5 | mAP | MAP@R | R-prec |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _ in contestants:
        got = results[name]
        diff = max(abs(float(got[k]) - float(ref[k])) for k in METRIC_KEYS)
        print(f"| {name} | {median(times[name]):.2f} | {spread(times[name])} | "
              f"{median(times['numpy64']) / median(times[name]):.2f} | {median(cpu[name]):.2f} | "
              f"{median(cpu['numpy64']) / median(cpu[name]):.2f} | {diff:.1e} | "
              + " | ".join(f"{float(got[k]):.6f}" for k in METRIC_KEYS) + " |")

    # kNN
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    knn_results = {}
    knn_contestants = [("embjax host", lambda: knn_results.__setitem__(
        "embjax host", retrieval.knn(x, x, args.k, backend="host", query_block=512)[1]))]
    if args.device:
        def dev_knn():
            knn_results["embjax device"] = np.asarray(retrieval.knn(x, x, args.k, backend="device")[1])
        dev_knn()
        knn_contestants.append(("embjax device", dev_knn))
    try:
        import faiss

        def faiss_knn():
            index = faiss.IndexFlatIP(xn.shape[1])
            index.add(xn)
            _, nb = index.search(xn, args.k + 1)
            out = np.empty((xn.shape[0], args.k), np.int64)
            for i in range(xn.shape[0]):  # drop the query itself wherever it landed
                row = nb[i][nb[i] != i]
                out[i] = row[: args.k]
            knn_results["faiss IndexFlatIP"] = out
        knn_contestants.append(("faiss IndexFlatIP", faiss_knn))
        print(f"# faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    except ImportError:
        print("# faiss not installed (pip install faiss-cpu): kNN compared without it")
    times = alternate(knn_contestants, args.rounds, log=print)
    base = knn_results["embjax host"]
    print(f"\n| kNN, k = {args.k} | median s | min..max | same neighbour sets as embjax host |")
    print("|---|---:|---|---:|")
    for name, _ in knn_contestants:
        same = np.mean([set(a) == set(b) for a, b in zip(np.asarray(knn_results[name]), base)])
        print(f"| {name} | {median(times[name]):.2f} | {spread(times[name])} | {same:.4f} |")
    print(f"# load average at end: {load_average()}")


if __name__ == "__main__":
    main()
