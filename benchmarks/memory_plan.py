"""Per-device memory of the thesis-scale steps, from XLA's own memory analysis, on fake CPU devices.

The thesis' run folds the features of ten ImageNet CNNs (joint width D = 21,408) into one accumulator.
This compiles, for `--devices` fake CPU devices and a global batch of `--batch` 331-px images, the
affine study's two jitted steps exactly as the engine builds them (`embjax.extract.make_step`), with
stand-in members of the thesis' feature widths (1024, 1024, 1792, 2048, 2048, 2048, 1536, 1536, 4032,
4320) whose own work is a pooled projection: their activations are negligible, so the figures are the
engine's (statistics, maps, heads, temporaries) and backbone activations are excluded (reported
separately by `--backbone NAME`, which compiles that registry model's forward at the per-device batch).

For each step it prints argument, output, aliased (donated) and temporary bytes per device, their peak
(arguments + outputs − aliased + temporaries) and the bytes all-reduced per call, read from the compiled
HLO (`all-reduce` results). The fit step is compiled twice: with per-device partial statistics (what the
engine does: `Pass.merge`) and with the replicated state XLA reduces every batch (the design it
replaced). Nothing is executed: shapes only.

    ./launch.sh bench memory_plan                      # 8 devices, batch 512
    ./launch.sh bench memory_plan --devices 4 --batch 256 --backbone resnet152_v1
    ./launch.sh bench memory_plan --canonical 1024 --only-canonical   # embjax.canonical's solves alone

The last line ends with the larger per-device peak of the two engine steps, in GiB.

The canonical-space solves (`--canonical K`) need, at the thesis' width, C plus one D × D workspace in
XLA's plan, for either method: GCCA C + 1 D × D + one block row of products (4.14 GiB at most, 3.41 GiB
while LAPACK's ?syevd decomposes the workspace in place); generalized Procrustes 3.41 GiB for its starting
eigenvectors (the same in-place machinery), then at K = 1024 at most C + 0.78 GiB (2.49 GiB) for its
sweeps (one jitted step per block row, the row read as a view of C) and maps, where its one while_loop over
C planned 5.82 GiB. Beside that plan ?syevd allocates 2D² floats of scratch (C + 3.5 D × D measured at
D = 4,096, about 7.7 GiB at the thesis' width); eigensolver="qr" (?syev, in place) and "subset" (?syevr,
in place, the top K eigenpairs only) measure C + 1 D × D and a few D × K (about 3.8 GiB at the thesis'
width), "qr" at 6–11× the default's time, "subset" at about 1.15× it (D = 4,096, K = 1,024). XLA
cannot see memory a LAPACK call allocates itself: `--measure D` runs GCCA and Procrustes (`--methods`,
`--solvers`, `--iters` sweeps) at joint width D (the thesis' widths scaled) in a fresh process and prints
the measured rise of the resident set beside XLA's plan; `--time-solvers D` times the eigendecomposition
step alone per eigensolver in alternating rounds (embjax/canonical.py's docstring has the figures).

    ./launch.sh bench memory_plan --canonical 1024 --only-canonical --measure 4096
    ./launch.sh bench memory_plan --canonical 1024 --only-canonical --time-solvers 4096 --solvers divide_and_conquer,subset
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

WIDTHS = (1024, 1024, 1792, 2048, 2048, 2048, 1536, 1536, 4032, 4320)
CLASSES = 1000
GIB = 2.0 ** 30


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=512, help="global batch")
    ap.add_argument("--image", type=int, default=331)
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--backbone", default=None, help="a registry model whose forward is compiled alone")
    ap.add_argument("--canonical", type=int, default=0, metavar="K",
                    help="also compile the canonical-space solves (embjax.canonical) at hub width K, one device")
    ap.add_argument("--only-canonical", action="store_true", help="with --canonical: skip the engine's steps")
    ap.add_argument("--measure", type=int, default=0, metavar="D",
                    help="with --canonical: also run GCCA and Procrustes at joint width D (the thesis' widths "
                         "scaled) in a fresh process and print their measured peak resident memory")
    ap.add_argument("--methods", default="gcca,procrustes", help="with --measure: the methods measured")
    ap.add_argument("--solvers", default=None,
                    help="with --measure: the eigensolvers measured, comma-separated (default: all embjax has)")
    ap.add_argument("--iters", type=int, default=3, help="with --measure: Procrustes' sweeps per measured run")
    ap.add_argument("--time-solvers", type=int, default=0, metavar="D",
                    help="with --canonical K: time the eigendecomposition step alone at joint width D, per "
                         "eigensolver (--solvers), in --rounds alternating rounds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--measure-child", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def scaled_widths(width: int) -> list[int]:
    """The thesis' ten widths scaled to sum to `width`."""
    out = [max(1, round(w * width / sum(WIDTHS))) for w in WIDTHS]
    out[-1] += width - sum(out)
    return out


def _rss(field: str) -> int:
    """VmRSS / VmHWM (the peak since the last reset) of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_child(width: int, k: int, methods=("gcca",), solvers=None, iters: int = 3) -> dict:
    """Each method (GCCA, generalized Procrustes) on statistics of joint width `width` (a low-rank-plus-
    diagonal C built on the device, so no host copy inflates the peak): a first run of each eigensolver
    compiles its steps, then each eigensolver runs measured from a reset peak (`/proc/self/clear_refs`) on
    (Procrustes with `iters` sweeps: its memory does not grow with them). Returns the bytes of C and, per
    method and eigensolver, the rise of the peak over the resident set at the start of its run (C, the
    compiled steps, the runtime): the method's own memory. (Run with an older embjax on the path, it
    measures that one's single path, as "divide_and_conquer".)"""
    import inspect

    import jax
    import jax.numpy as jnp

    from embjax import canonical, stats

    dims = tuple(scaled_widths(width))
    u = jax.random.normal(jax.random.key(0), (width, 64), jnp.float32)
    cross = jax.jit(lambda u: u @ u.T + jnp.diag(jnp.linspace(1.0, 2.0, width)))(u).block_until_ready()
    state = stats.Stats(count=jnp.asarray(1000, jnp.int32), mean=jnp.zeros((width,), jnp.float32), cross=cross,
                        dims=dims)
    out = {"width": width, "dims": list(dims), "c_bytes": width * width * 4, "k": k, "iters": iters}
    for method in methods:
        takes = "eigensolver" in inspect.signature(getattr(canonical, method)).parameters
        known = getattr(canonical, "EIGENSOLVERS", ()) if takes else ("divide_and_conquer",)
        solve = {"gcca": lambda kw, it: canonical.gcca(state, [k], **kw)[0],
                 "procrustes": lambda kw, it: canonical.procrustes(state, [k], iters=it, **kw)[0]}[method]
        measured = [solver for solver in (solvers or known) if solver in known]
        for solver in measured:  # compiles every XLA step of every path measured (compilers' memory is not theirs)
            jax.block_until_ready(solve({"eigensolver": solver} if takes else {}, iters))
        for solver in measured:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            before, start = _rss("VmRSS"), time.perf_counter()
            kw = {"eigensolver": solver} if takes else {}
            jax.block_until_ready(solve(kw, iters))
            out[f"{method} {solver}"] = {"rss_before": before, "peak_rise": _rss("VmHWM") - before,
                                         "seconds": time.perf_counter() - start}
    return out


def _measure(width: int, k: int, methods: str, solvers: str | None, iters: int) -> None:
    import json
    import subprocess

    dims = scaled_widths(width)
    plan = canonical_plan(dims, k)
    gcca = {name: r for name, r in plan.items() if name.startswith("GCCA")}
    planned = max(r["peak"] for r in gcca.values()) - width * width * 4
    from embjax import canonical

    m = {}
    for method in methods.split(","):  # each method and eigensolver in a fresh process of its own
        for solver in (solvers.split(",") if solvers else getattr(canonical, "EIGENSOLVERS", ("divide_and_conquer",))):
            cmd = [sys.executable, os.path.abspath(__file__), "--measure-child", str(width), "--canonical", str(k),
                   "--methods", method, "--iters", str(iters), "--solvers", solver]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            m.update(json.loads(out.stdout.strip().splitlines()[-1]))
    unit = width * width * 4
    print(f"\nmeasured at D = {width} (the thesis' widths scaled: {dims}), k = {k}, Procrustes with {iters} "
          f"sweeps, each row in a fresh process; one D × D is {unit / 2**20:.1f} MiB. Beyond C, XLA plans "
          f"{planned / 2**20:.1f} MiB ({planned / unit:.2f} D × D) for GCCA's divide_and_conquer path; LAPACK's "
          "?syevd allocates 1 + 6D + 2D² floats of its own besides.")
    print("| method | eigensolver | resident set before (C, runtime) | peak rise beyond it | in D × D | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for key, r in m.items():
        if isinstance(r, dict):
            method, solver = key.split(" ")
            print(f"| {method} | {solver} | {r['rss_before'] / 2**20:.0f} MiB | {r['peak_rise'] / 2**20:.1f} MiB | "
                  f"{r['peak_rise'] / unit:.2f} | {r['seconds']:.1f} |", flush=True)


def time_eigensolvers(width: int, k: int, solvers, rounds: int) -> None:
    """Seconds of the eigendecomposition step alone (the workspace filled, decomposed, the top k rows out:
    canonical._top_eigenpairs) for each eigensolver, in alternating rounds, on both methods' matrices
    from the same statistics as `measure_child`: GCCA's whitened joint covariance B (a clustered spectrum:
    the whitened noise directions sit near 1) and Procrustes' scaled joint covariance (a spread one)."""
    import jax
    import jax.numpy as jnp

    from embjax import canonical

    dims = tuple(scaled_widths(width))
    u = jax.random.normal(jax.random.key(0), (width, 64), jnp.float32)
    cross = jax.jit(lambda u: u @ u.T + jnp.diag(jnp.linspace(1.0, 2.0, width)))(u).block_until_ready()
    count = jnp.asarray(1000, jnp.int32)
    with jax.default_matmul_precision("highest"):
        whiten = canonical._whitening(cross, count, 0.0, 1e6, dims=dims)
        tr = jnp.concatenate([jnp.full((b - a,), jnp.trace(cross[a:b, a:b])) for a, b in
                              canonical._block_rows(cross, dims)])
        scale = jax.lax.rsqrt(tr / count)

        def gcca_work():
            work = jnp.zeros_like(cross)
            for i in range(len(dims)):
                work = canonical._whitened_row(work, cross, count, whiten, dims=dims, i=i)
            return work

        matrices = {"gcca (whitened B)": (gcca_work, lambda i: canonical._whitened_block_row(
                        cross, count, whiten, dims=dims, i=i)),
                    "procrustes (scaled C)": (lambda: canonical._scaled(cross, scale),
                                              lambda i: canonical._scaled_block_row(cross, scale, dims=dims, i=i))}
        print(f"\neigendecomposition step alone at D = {width}, top k = {k}, {rounds} alternating rounds (seconds):")
        print("| matrix | round | " + " | ".join(solvers) + " |")
        print("|---|---:|" + "---:|" * len(solvers))
        for name, (workspace, block_row) in matrices.items():
            for r in range(rounds):
                row = []
                for solver in solvers:
                    start = time.perf_counter()
                    jax.block_until_ready(canonical._top_eigenpairs(workspace, block_row, dims, k, solver, name))
                    row.append(time.perf_counter() - start)
                print(f"| {name} | {r + 1} | " + " | ".join(f"{t:.1f}" for t in row) + " |", flush=True)


def canonical_plan(widths, k: int) -> dict:
    """The canonical-space solves of embjax.canonical at the given widths and hub width k, compiled on
    one device from shapes only: GCCA (whitening, the whitened joint covariance, its eigenvectors,
    encoders and decoders) and generalized Procrustes (the starting eigenvectors; the alternating
    rotations with encoders and decoders). The statistics C (D × D) are live throughout: in "peak" they
    are counted whether or not a step takes them as an argument."""
    import jax
    import jax.numpy as jnp

    from embjax import canonical

    dims, total = tuple(widths), sum(widths)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    count, scalar = jax.ShapeDtypeStruct((), jnp.int32), f32()
    whiten = tuple((f32(d, d), f32(d, d)) for d in dims)
    c_bytes = total * total * 4
    out = {}
    with jax.default_matmul_precision("highest"):
        # GCCA runs as four compiled steps; C stays alive through all of them (added where not an argument).
        out["GCCA 1: whitening of every block"] = analyse(canonical._whitening.lower(
            f32(total, total), count, scalar, scalar, dims=dims).compile())
        widest = max(range(len(dims)), key=lambda i: dims[i])
        out["GCCA 2: a block row of B into the workspace (widest)"] = analyse(canonical._whitened_row.lower(
            f32(total, total), f32(total, total), count, whiten, dims=dims, i=widest).compile())
        out["GCCA 3: eigenvectors in the workspace"] = analyse(
            canonical._eigh_in_place.lower(f32(total, total)).compile(), live=c_bytes)
        out[f"GCCA 4: the top {k} eigenvectors out of the workspace"] = analyse(canonical._top_rows.lower(
            f32(total, total), f32(total), k=k).compile(), live=c_bytes)
        out[f"GCCA 5: encoders, decoders, k = {k}"] = analyse(canonical._gcca_maps.lower(
            f32(k, total), f32(total), whiten, dims=dims).compile(), live=c_bytes)
        if hasattr(canonical, "_rotate_block"):  # Procrustes as one step per block row, C read in place
            out["Procrustes 1: the scaled joint covariance into the workspace"] = analyse(canonical._scaled.lower(
                f32(total, total), f32(total)).compile())
            out["Procrustes 2: eigenvectors in the workspace (as GCCA 3)"] = out["GCCA 3: eigenvectors in the workspace"]
            # The block row is a view of C on CPU (canonical._row_block): C counted once, not twice.
            d_max = max(dims)
            out[f"Procrustes 3: a sweep's block step (widest), k = {k}"] = analyse(canonical._rotate_block.lower(
                f32(d_max, total), f32(total, k), f32(total), f32(total), count, a=0).compile(),
                live=c_bytes - d_max * total * 4)
            out[f"Procrustes 4: the objective after a sweep, k = {k}"] = analyse(canonical._objective.lower(
                f32(total, total), f32(total, k), count, dims=dims).compile())
            out[f"Procrustes 5: encoders, decoders, k = {k}"] = analyse(canonical._gpa_maps.lower(
                f32(total, total), count, f32(total, k), scalar, scalar, dims=dims).compile())
        else:  # embjax before the change (one while_loop over C)
            out["Procrustes start (eigenvectors)"] = analyse(canonical._pca_start.lower(
                f32(total, total), f32(total), dims=dims, k_max=k).compile())
            out[f"Procrustes, k = {k}"] = analyse(canonical._gpa.lower(
                f32(total, total), count, f32(total), f32(total, k), scalar, scalar, scalar, scalar, dims=dims,
                iters=500).compile())
    return out


_DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1, "u8": 1, "s8": 1}


def allreduce_bytes(hlo: str) -> int:
    """Bytes produced by every all-reduce in a compiled HLO module (its result shapes)."""
    total = 0
    for line in hlo.splitlines():
        if " all-reduce(" not in line and " all-reduce-start(" not in line:
            continue
        lhs = line.split("=", 1)[1] if "=" in line else line
        head = lhs.split("all-reduce", 1)[0]
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", head):
            if dtype in _DTYPE_BYTES:
                n = 1
                for d in filter(None, dims.split(",")):
                    n *= int(d)
                total += n * _DTYPE_BYTES[dtype]
    return total


def analyse(compiled, live: int = 0) -> dict:
    """XLA's memory analysis of a compiled step; `live`: bytes the caller holds that are not arguments."""
    m = compiled.memory_analysis()
    args, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                              m.temp_size_in_bytes)
    return {"arguments": args, "outputs": out, "aliased": alias, "temporaries": temp,
            "peak": args + out - alias + temp + live, "allreduce": allreduce_bytes(compiled.as_text())}


def _print_canonical(widths, k: int) -> None:
    total = sum(widths)
    print(f"\ncanonical-space solves, one device, D = {total} (statistics C: {total * total * 4 / GIB:.2f} GiB)")
    print("| solve | arguments | outputs | aliased | temporaries | peak (with C) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in canonical_plan(widths, k).items():
        print(f"| {name} | " + " | ".join(f"{r[key] / GIB:.2f} GiB" for key in
                                          ("arguments", "outputs", "aliased", "temporaries", "peak")) + " |",
              flush=True)


def main(argv=None) -> int:
    a = _args(argv)
    if a.measure_child:
        import json

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        solvers = a.solvers.split(",") if a.solvers else None
        print(json.dumps(measure_child(a.measure_child, a.canonical, a.methods.split(","), solvers, a.iters)),
              flush=True)
        return 0
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import common
    from embjax import evaluate, extract, stats

    widths = [int(w) for w in a.widths.split(",")]
    n_dev, n = a.devices, len(widths)
    if a.batch % n_dev:
        raise SystemExit(f"--batch {a.batch} must be a multiple of --devices {n_dev}")
    print(f"memory_plan: {common.machine_line()}; {common.now()}", flush=True)
    print(f"{n} members of widths {widths} (D = {sum(widths)}), {CLASSES} classes, {n_dev} devices, "
          f"global batch {a.batch} of {a.image}x{a.image} px", flush=True)
    mesh = extract.make_mesh(jax.devices()[:n_dev])
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(extract.DATA_AXIS))

    def member(i, d):
        def apply(v, images):
            x = images.astype(jnp.float32).mean(axis=(1, 2))  # (B, 3): a stand-in with no activations
            feats = jax.nn.relu(x @ v["proj"])
            return {"pre_logits": feats, "logits": feats @ v["head"]["kernel"] + v["head"]["bias"]}
        variables = {"proj": jax.ShapeDtypeStruct((3, d), jnp.float32),
                     "head": {"kernel": jax.ShapeDtypeStruct((d, CLASSES), jnp.float32),
                              "bias": jax.ShapeDtypeStruct((CLASSES,), jnp.float32)}}
        return extract.Member(name=f"m{i}", apply=apply, variables=variables, feature_dim=d)

    members = [member(i, d) for i, d in enumerate(widths)]
    names = [m.name for m in members]

    def abstract(tree, sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    def stacked(tree):  # per-device partial states: a leading device axis, sharded
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n_dev, *x.shape), x.dtype, sharding=shard), tree)

    batch = {"image": jax.ShapeDtypeStruct((a.batch, a.image, a.image, 3), jnp.uint8, sharding=shard),
             "label": jax.ShapeDtypeStruct((a.batch,), jnp.int32, sharding=shard),
             "mask": jax.ShapeDtypeStruct((a.batch,), jnp.bool_, sharding=shard),
             "index": jax.ShapeDtypeStruct((a.batch,), jnp.int32, sharding=shard)}
    variables = abstract([m.variables for m in members], rep)
    feats = {nm: ("pre_logits",) for nm in names}
    init = jax.eval_shape(lambda: stats.init(widths))
    fit_acc = stats.accumulator(widths, lambda out, b, aux: [out[nm]["pre_logits"] for nm in names])

    if a.canonical and a.only_canonical:
        _print_canonical(widths, a.canonical)
        if a.measure:
            _measure(a.measure, a.canonical, a.methods, a.solvers, a.iters)
        if a.time_solvers:
            time_eigensolvers(a.time_solvers, a.canonical, (a.solvers or "divide_and_conquer,subset").split(","),
                              a.rounds)
        return 0
    results = {}
    fit = extract.Pass("fit", None, "train", feats, accumulator=fit_acc)
    step = extract.make_step(members, fit, mesh)
    results["fit (per-device partials)"] = analyse(step.lower(
        stacked(init), jax.ShapeDtypeStruct((n_dev, n), jnp.bool_, sharding=shard), variables, None, batch).compile())
    # The engine has no replicated mode any more (every accumulator carries its merge); the per-batch
    # reduction a replicated state would cost is shown by tests/test_no_allreduce.py's control.

    # Evaluation: the three thesis families as the affine study holds them (affine dense, one (d, D)
    # block row per source; logit factored; naive as slices) and every model's head.
    d_max = max(widths)
    heads = [(jax.ShapeDtypeStruct((d, CLASSES), jnp.float32), jax.ShapeDtypeStruct((CLASSES,), jnp.float32))
             for d in widths]
    total = sum(widths)
    affine = evaluate.AffineMaps(weights=tuple(jax.ShapeDtypeStruct((d, total), jnp.float32) for d in widths),
                                 biases=tuple(jax.ShapeDtypeStruct((total,), jnp.float32) for d in widths))
    logit = evaluate.LogitMaps(kernels=tuple(h[0] for h in heads),
                               biases=jax.ShapeDtypeStruct((n, CLASSES), jnp.float32),
                               pinvs=jax.ShapeDtypeStruct((n, CLASSES, d_max), jnp.float32))
    families = {"affine": affine, "logit": logit, "naive": evaluate.NaiveMaps()}
    aux = abstract({"heads": {k: heads for k in families}, "maps": families}, rep)
    ev_init = jax.eval_shape(lambda: {k: evaluate.init(widths) for k in families})

    def family(k):
        return evaluate.accumulator(widths, lambda out, b, aux: ([out[nm]["pre_logits"] for nm in names],
                                                                 aux["heads"][k], aux["maps"][k]))

    ev = extract.Pass("eval", None, "validation", feats, accumulator={k: family(k) for k in families})
    results["eval (3 families)"] = analyse(extract.make_step(members, ev, mesh).lower(
        stacked(ev_init), jax.ShapeDtypeStruct((n_dev, n), jnp.bool_, sharding=shard), variables, aux,
        batch).compile())

    print("\n| step | arguments | outputs | aliased | temporaries | peak per device | all-reduced per call |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k] / GIB:.2f} GiB" for k in
                                          ("arguments", "outputs", "aliased", "temporaries", "peak"))
              + f" | {r['allreduce'] / 2**20:.1f} MiB |", flush=True)

    if a.canonical:
        _print_canonical(widths, a.canonical)

    if a.backbone:
        from embjax.models import registry

        spec = registry.get(a.backbone)
        module = spec.build()
        local = a.batch // n_dev
        x = jax.ShapeDtypeStruct((local, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
        shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
        fwd = jax.jit(lambda v, x: module.apply(v, x)["pre_logits"]).lower(shapes, x).compile()
        r = analyse(fwd)
        print(f"\nbackbone {a.backbone}, forward of {local} images at {spec.input_size} px on one device: "
              f"parameters {r['arguments'] / GIB:.2f} GiB (with the images), activations (temporaries) "
              f"{r['temporaries'] / GIB:.2f} GiB", flush=True)

    engine_peak = max(results["fit (per-device partials)"]["peak"], results["eval (3 families)"]["peak"])
    print(f"\nlarger per-device peak of the engine's fit and eval steps (GiB): {engine_peak / GIB:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
