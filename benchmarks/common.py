"""Helpers shared by the benchmarks: machine description, load average, alternating timing rounds, medians.

Benchmarks on a shared machine drift (other jobs start and stop, clocks change), so contestants are timed
in alternating rounds (a, b, c, then b, c, a, ...) and compared by their medians: a slow spell then hits
every contestant about equally instead of whichever happened to run during it.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Sequence


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:
        return "n/a"


def machine_line() -> str:
    """One line naming the machine, for the header of every benchmark's output."""
    flags = cpu_flags()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs ({', '.join(isa) or 'no AVX2'}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def alternate(contestants: Sequence[tuple[str, Callable[[], object]]], rounds: int,
              log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each contestant's call, `rounds` times, rotating the order every round.

    Each callable must block until its work is done (block_until_ready / a synchronous PyTorch call).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: dict[str, list[float]] = {name: [] for name, _ in contestants}
    n = len(contestants)
    for r in range(rounds):
        order = [contestants[(i + r) % n] for i in range(n)]
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if log is not None:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{name} {times[name][-1]:.3f}s" for name, _ in contestants))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """min..max of a list of seconds, for showing how noisy a median is."""
    return f"{min(xs):.3f}..{max(xs):.3f}s"


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MB; NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """This process' peak resident size so far (VmHWM), MB."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """This process' resident size now (VmRSS), MB."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the peak-RSS counter of this process (Linux clear_refs 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
