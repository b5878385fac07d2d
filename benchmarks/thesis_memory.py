"""Resident memory of the affine study's `imagenet` preset (the thesis' ten CNNs at 331 px) by phase.

Runs the preset end to end on tfds mock imagenet2012 (random weights, `--images` images per split), as
tests/test_thesis_ten_mock.py does, while a thread samples this process's resident set size every
`--interval` seconds. Each phase of the study (loading the models, the fit pass, solving the maps,
stacking them, the evaluation pass) is marked, and the table gives the resident memory at each mark and
the peak within each phase. The figures depend on the feature widths (D = 21,408 for the ten), not on
the number of images.

  ./launch.sh bench thesis_memory                       # all ten
  ./launch.sh bench thesis_memory --models inception_v1,nasnet_large_slim --limit-gb 8

`--limit-gb` stops the run (exit status 3) as soon as the resident set passes the limit, before the
kernel's out-of-memory killer would, and still prints the phases reached.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GIB = 2**30


class Sampler:
    """Resident set size every `interval` seconds, with phase marks; exits the process past `limit`."""

    def __init__(self, interval: float, limit_bytes: float | None):
        import psutil

        self.proc = psutil.Process()
        self.interval, self.limit = interval, limit_bytes
        self.start = time.perf_counter()
        self.phase, self.marks, self.peaks = "start", [], {}
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self):
        while True:
            r = self.rss()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
            if self.limit and r > self.limit:
                self.mark(f"stopped: resident {r / GIB:.2f} GB passed --limit-gb")
                print_table(self)
                os._exit(3)
            time.sleep(self.interval)

    def mark(self, phase: str):
        r = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
        self.marks.append((time.perf_counter() - self.start, phase, r))
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), r)
        print(f"[thesis_memory] {self.marks[-1][0]:7.1f} s  {phase}: resident {r / GIB:.2f} GB", flush=True)


def print_table(sampler: Sampler):
    print("\n| phase (from the mark on) | starts at | resident at its start | peak within it |")
    print("|---|---:|---:|---:|")
    for t, phase, r in sampler.marks:
        print(f"| {phase} | {t:.1f} s | {r / GIB:.2f} GB | {sampler.peaks.get(phase, r) / GIB:.2f} GB |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"\nru_maxrss {peak:.2f} GB", flush=True)


def instrument(sampler: Sampler):
    """Mark the start and end of each phase of experiments.affine_equivalence.run."""
    from embjax import evaluate, extract, maps, members

    def wrap(module, attr, label):
        fn = getattr(module, attr)

        def wrapped(*args, **kwargs):
            sampler.mark(f"{label}")
            out = fn(*args, **kwargs)
            sampler.mark(f"after {label}")
            return out

        setattr(module, attr, wrapped)

    wrap(members, "load", "load and fold the models")
    wrap(maps, "affine_all", "solve the affine maps")
    wrap(evaluate, "stack_maps", "stack the affine maps")
    run = extract.Engine.run

    def engine_run(self, p):
        sampler.mark(f"pass {p.name}")
        out = run(self, p)
        sampler.mark(f"after pass {p.name}")
        return out

    extract.Engine.run = engine_run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="", help="comma-separated registry names (default: the thesis' ten)")
    parser.add_argument("--images", type=int, default=4, help="mock images per split")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--limit-gb", type=float, default=0.0, help="stop past this resident size (0: no limit)")
    args = parser.parse_args(argv)

    sampler = Sampler(args.interval, args.limit_gb * GIB if args.limit_gb else None)
    import tensorflow_datasets as tfds

    from experiments import affine_equivalence as study
    from experiments.configs import affine_equivalence as configs

    instrument(sampler)
    config = configs.get_config("imagenet")
    config.weights = "random"
    config.batch_size = 4
    config.checkpoint_every = 1
    config.models = args.models or ",".join(configs.THESIS_NAMES)
    config.eval_split = config.fit_split  # as the test does
    print(f"[thesis_memory] {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, models {config.models}, "
          f"{args.images} mock images", flush=True)
    with tempfile.TemporaryDirectory() as workdir, tfds.testing.mock_data(num_examples=args.images):
        study.run(config, workdir)
    sampler.mark("done")
    print_table(sampler)


if __name__ == "__main__":
    main()
