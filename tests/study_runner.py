"""Studies (and other scripts) run as a user starts them: one process per run, its environment, its results,
and a kill -9 at an event the run itself reports.

Kills: the child's stdout and stderr come back through one pipe, read line by line; the first line that
matches a pattern (a progress line such as "[fit train[:512]] batch 3/8", a training step, a "[resume]"
line) makes the test send SIGKILL at once. Nothing here sleeps or reads the clock. The child keeps
computing between printing that line and receiving the signal, so a test must not assume the kill landed
on that exact batch: it reads what the killed run left on disk (`checkpoints`) and asserts that the rerun
resumes from exactly that, and it picks a line with several batches still to go in the pass, so that
"killed mid-pass" holds whatever the machine's load.

The timeouts below only stop a hung child from hanging the suite; no assertion depends on them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HUNG = 1800  # seconds after which a child is taken to be hung (a failure, never a condition of a test)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a child with `devices` fake CPU devices: this process' own flags (e.g. the everyday
    tier's compile options, set by launch.sh) with the device count replaced."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def env(cache=None, devices: int = 1, **extra) -> dict:
    """The child's environment: this checkout first on the path, CPU only, `devices` fake CPU devices,
    user errors as one line (no EMBJAX_TRACEBACK), and `cache` as EMBJAX_CACHE when given (otherwise the
    suite's private one, which conftest.py set in os.environ)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    e["JAX_PLATFORMS"] = "cpu"
    e["XLA_FLAGS"] = xla_flags(devices)
    e.pop("EMBJAX_TRACEBACK", None)
    if cache is not None:
        e["EMBJAX_CACHE"] = str(cache)
    # Every compiled program into the cache's persistent XLA cache, however short its compilation (a
    # study caches only those over a second on its own): a test's second and third runs of one
    # configuration (killed, resumed) load them instead of compiling again.
    e["JAX_COMPILATION_CACHE_DIR"] = os.path.join(e["EMBJAX_CACHE"], "xla")
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def study(name: str, workdir, *args) -> list[str]:
    """The command line of `python -m experiments.<name> --workdir=WORKDIR ARGS...`."""
    return [sys.executable, "-m", f"experiments.{name}", f"--workdir={workdir}", *map(str, args)]


def run(cmd, cache=None, devices: int = 1, check: bool = True, **extra) -> subprocess.CompletedProcess:
    """Run `cmd` to its end; with `check`, a non-zero exit fails the test with the tail of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env(cache, devices, **extra), capture_output=True, text=True,
                          timeout=HUNG)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd[1:4]))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(cmd, cache=None, devices: int = 1, **extra) -> subprocess.Popen:
    """Start `cmd` with its stdout and stderr merged into one pipe, read as text lines. Its stdin is a pipe
    the test holds open and never writes: a test's own child script may read it to wait, at a point of
    its choosing, for the kill (tests/test_train.py); EOF comes when the test closes it."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env(cache, devices, **extra), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_at(cmd, pattern: str, cache=None, devices: int = 1, **extra) -> str:
    """Start `cmd` and SIGKILL it at the first output line matching `pattern` (a regular expression);
    returns the output up to and including that line. Fails if the run ends without printing one."""
    proc = start(cmd, cache, devices, **extra)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(pattern, line):
                proc.send_signal(signal.SIGKILL)
                break
    except BaseException:  # the test itself failed while reading: leave nothing running
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        proc.wait(timeout=HUNG)
        proc.stdin.close()
    text = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, \
        f"the run ended ({proc.returncode}) without printing a line matching {pattern!r}:\n{text[-3000:]}"
    return text


def finished(workdir) -> list[Path]:
    """The run directories under `workdir` that hold a results.json (a finished run), oldest first."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        return []
    return sorted(p for p in workdir.iterdir() if (p / "results.json").is_file())


def results(workdir, drop_meta: bool = False) -> tuple[dict, Path]:
    """The newest finished run's results.json under `workdir` and its directory; `drop_meta` removes
    the run's "meta" (date, timings, command line), which differs between otherwise equal runs."""
    runs = finished(workdir)
    assert runs, f"no finished run (results.json) under {workdir}"
    with open(runs[-1] / "results.json") as f:
        r = json.load(f)
    if drop_meta:
        r.pop("meta", None)
    return r, runs[-1]


def checkpoints(directory) -> list[int]:
    """The batch (or step) counts of the complete checkpoints in a checkpoint directory, newest first.
    A checkpoint is complete once its directory carries its number (it is written under a temporary name
    and renamed last); an absent directory has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)


def pass_checkpoints(workdir, name: str) -> list[int]:
    """`checkpoints` of the engine pass `name` of a study run in `workdir` (its resume state)."""
    return checkpoints(Path(workdir) / "state" / "checkpoints" / name)


def pass_finished(workdir, name: str) -> bool:
    """Whether the engine pass `name` of a study run in `workdir` has saved its final state."""
    return bool(checkpoints(Path(workdir) / "state" / "passes" / name))


def leave_one_out_retrieval(query, gallery, labels) -> dict:
    """The independent reference for a study's retrieval cells: leave-one-out ranking of row i of `query`
    against every row of `gallery` but i, by cosine similarity in float64. top1 / top5: a same-label row
    among the 1 / 5 nearest; map: mean average precision over the queries."""
    q = np.asarray(query, np.float64)
    g = np.asarray(gallery, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    scores = q @ g.T
    np.fill_diagonal(scores, -np.inf)  # a row never retrieves itself
    order = np.argsort(-scores, axis=1, kind="stable")[:, :-1]
    hits = np.asarray(labels)[order] == np.asarray(labels)[:, None]
    ranks = np.arange(1, hits.shape[1] + 1)
    ap = [np.mean(np.cumsum(h)[h] / ranks[h]) for h in hits if h.any()]
    return {"top1": hits[:, 0].mean(), "top5": hits[:, :5].any(axis=1).mean(), "map": np.mean(ap)}
