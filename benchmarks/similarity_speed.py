"""Benchmark: every similarity measure of N models × D dims, from the joint statistics and evaluation features.

What the open-set study computes for its similarity tables, timed on synthetic correlated features
(a shared latent factor plus noise, one linear readout per model): from the fit statistics linear CKA,
SVCCA (--cca-dims), PWCCA and the angular Procrustes distance for every pair
(similarity.statistics_matrices: float64 LAPACK on one thread), and as the open-set study runs it, with
each pair's Procrustes rotation taken from its Procrustes map (one SVD per pair, which the study needs
for the maps anyway) instead of an eigenvalue problem; from --eval evaluation rows debiased CKA,
mutual k-NN and CKNNA (similarity.feature_matrices). --old also times what the study ran before:
similarity.mean_cca_matrix (a jnp eigh per model) and procrustes_distance (a jnp SVD per pair) with
the default BLAS threads.

    python benchmarks/similarity_speed.py                  # 5 models × 1280 dims, 4,000 fit rows, 800 eval rows
    python benchmarks/similarity_speed.py --old
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

from common import load_average, machine_line, now  # noqa: E402


def features(n, models, dim, latent, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent)).astype(np.float32)
    readouts = [rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent) for _ in range(models)]
    return [np.maximum(z @ w + 0.5 * rng.standard_normal((n, dim)).astype(np.float32), 0.0) for w in readouts]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--fit", type=int, default=4000)
    p.add_argument("--eval", type=int, default=800)
    p.add_argument("--latent", type=int, default=256)
    p.add_argument("--cca-dims", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--old", action="store_true")
    args = p.parse_args()

    import jax

    from embjax import similarity, stats

    print(f"# similarity benchmark, {now()}, {machine_line()}, jax {jax.__version__}")
    print(f"# load average at start: {load_average()}")
    fit = features(args.fit, args.models, args.dim, args.latent, 0)
    st = stats.init([args.dim] * args.models)
    for lo in range(0, args.fit, 1000):
        st = stats.update(st, [f[lo:lo + 1000] for f in fit])
    jax.block_until_ready(st.cross)
    ev = features(args.eval, args.models, args.dim, args.latent, 1)
    print(f"# {args.models} models × {args.dim} dims; statistics of {args.fit} rows; {args.eval} evaluation rows")
    rows = []
    m1, w1, c1 = timed(lambda: similarity.statistics_matrices(st, dims=args.cca_dims))
    rows.append(("statistics_matrices: CKA, SVCCA, PWCCA, Procrustes", w1, c1))
    m2, w2, c2 = timed(lambda: similarity.feature_matrices(ev, k=args.k))
    rows.append((f"feature_matrices: debiased CKA, mutual {args.k}-NN, CKNNA", w2, c2))
    rows.append(("total", w1 + w2, c1 + c2))

    def study_path():  # what the open-set study runs: the Procrustes maps give each pair's rotation
        from embjax import maps

        tr = [float(np.trace(np.asarray(stats.block(st, i, i)))) for i in range(args.models)]
        rot = {}
        for i in range(args.models):
            for j in range(i + 1, args.models):
                (w, _), _ = maps.scaled_procrustes_both(st, i, j)
                rot[(i, j)] = np.asarray(w) / np.sqrt(tr[j] / tr[i])
        return similarity.statistics_matrices(st, dims=args.cca_dims, rotations=rot)
    m3, w3, c3 = timed(study_path)
    rows.append(("study path: 10 Procrustes maps (one SVD each) + statistics_matrices with their rotations",
                 w3, c3))
    rows.append(("study path total (with feature_matrices)", w3 + w2, c3 + c2))
    print(f"# Procrustes distance from the maps' rotations against the eigenvalue route: max |Δ| "
          f"{np.abs(m3['procrustes'] - m1['procrustes']).max():.1e}")
    if args.old:
        def old():
            cca = np.asarray(similarity.mean_cca_matrix(st, dims=args.cca_dims))
            pro = [[float(similarity.procrustes_distance(st, i, j)) for j in range(args.models)]
                   for i in range(args.models)]
            return cca, np.asarray(pro)
        (cca_old, pro_old), w4, c4 = timed(old)
        rows.append(("before: mean_cca_matrix + procrustes_distance (jnp, default threads)", w4, c4))
        print(f"# agreement with before: SVCCA max |Δ| {np.abs(cca_old - m1['svcca']).max():.1e}, "
              f"Procrustes max |Δ| {np.abs(pro_old - m1['procrustes']).max():.1e}")
    print("\n| measures | wall s | CPU s |\n|---|---:|---:|")
    for name, w, c in rows:
        print(f"| {name} | {w:.1f} | {c:.1f} |")
    off = ~np.eye(args.models, dtype=bool)
    print("\nmean off-diagonal: " + ", ".join(f"{k} {v[off].mean():.4f}" for k, v in {**m1, **m2}.items()))
    print(f"# load average at end: {load_average()}")


if __name__ == "__main__":
    main()
