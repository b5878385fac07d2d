"""The full-scale benchmarks still run where no accelerator is: memory_plan and thesis_gpu at toy sizes."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Benchmark scripts, not library code: each run is a subprocess paying the JAX import and compilation.
pytestmark = pytest.mark.slow


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_memory_plan_at_a_toy_size_has_no_per_batch_allreduce():
    out = _run("benchmarks/memory_plan.py", "--devices", "4", "--batch", "16", "--widths", "64,96,128", "--image", "16")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| fit") or
            line.startswith("| eval")}
    # Per-device partial statistics: nothing is all-reduced by the fit or the eval step (the control that
    # a replicated state does reduce every batch is tests/test_no_allreduce.py's).
    assert rows["fit (per-device partials)"].rstrip().endswith("| 0.0 MiB |")
    assert rows["eval (3 families)"].rstrip().endswith("| 0.0 MiB |")
    assert re.search(r"\(GiB\): \d+\.\d+$", out.strip())


def test_thesis_gpu_script_runs_tiny_on_cpu():
    pytest.importorskip("torch")
    out = _run("benchmarks/thesis_gpu.py", "--tiny")
    # Same features on both sides (random weights): embjax float32 against PyTorch float32.
    row = next(line for line in out.splitlines() if line.startswith("| embjax float32"))
    assert float(row.rstrip(" |").split("|")[-1]) < 1e-3, row
    assert re.search(r"would take \d+\.\d+ h", out)


def test_memory_plan_compiles_the_canonical_solves_at_a_toy_size():
    out = _run("benchmarks/memory_plan.py", "--devices", "1", "--batch", "8", "--widths", "64,96,128",
               "--canonical", "16", "--only-canonical", "--measure", "256", "--methods", "procrustes",
               "--solvers", "subset", "--iters", "1")
    rows = [line for line in out.splitlines() if line.startswith("| GCCA") or line.startswith("| Procrustes")]
    assert len(rows) == 10, out
    assert all(line.rstrip().endswith("GiB |") for line in rows), rows
    # --measure: the method and eigensolver asked for, run in a process of its own (the rise of its resident set).
    measured = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| procrustes")]
    assert [[c.strip() for c in m] for m in measured] == [["procrustes", "subset"]], out
