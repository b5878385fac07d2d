r"""The affine-equivalence study (McNeely-White 2020, Tables 5.1-5.3 and the section 5.6 check).

  python -m experiments.affine_equivalence                                   # zoo on Fashion-MNIST
  python -m experiments.affine_equivalence --config=experiments/configs/affine_equivalence.py:effnet_lite
  python -m experiments.affine_equivalence --config=experiments/configs/affine_equivalence.py:imagenet \
      --config.manual_dir=/data/imagenet --config.weight_files.resnet152_v1=/w/resnet152.h5 ...

Resume state lives in WORKDIR/state (default WORKDIR = results/<config name>); the same command resumes a
killed run. Each finished run writes its report to a new timestamped directory under WORKDIR.
Multi-host: pass --coordinator_address, --num_processes and --process_id (or run on a TPU VM, where
jax.distributed.initialize() finds them itself with --distributed).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "affine_equivalence.py")
_CONFIG = config_flags.DEFINE_config_file("config", f"{_CONFIG_FILE}:zoo", "study config (file:preset)")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default results/<config.name>)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU VM pods, "
                                 "SLURM, or with the three flags below)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process' index")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax reports every checkpoint step at INFO
    # Compiled steps are cached on disk, so a second run of the same study skips XLA compilation.
    if not jax.config.jax_compilation_cache_dir:
        from embjax.zoo import default_cache_dir

        jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    if _DISTRIBUTED.value or _COORDINATOR.value:
        kw = {}
        if _COORDINATOR.value:
            kw = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                      process_id=_PROCESS_ID.value)
        # Cross-process collectives on CPU (tests, CPU clusters) go through gloo; GPUs/TPUs ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kw)

    config = _CONFIG.value
    try:
        _run(config)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        if os.environ.get("EMBJAX_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"embjax: error: {type(e).__name__}: {msg}\n(set EMBJAX_TRACEBACK=1 for the traceback)",
              file=sys.stderr, flush=True)
        sys.exit(1)


def _run(config):
    import jax

    from embjax import report, study

    workdir = _WORKDIR.value or os.path.join("results", config.name)
    state_dir = os.path.join(workdir, "state")
    results = study.run(config, state_dir)
    results["meta"]["command"] = " ".join(["python -m experiments.affine_equivalence", *sys.argv[1:]])
    if jax.process_index() == 0:
        run_dir = report.new_run_dir(workdir, name=config.name)
        report.write(run_dir, results)
        print(report.summary_text(results), flush=True)
        print(f"\nreport: {os.path.join(run_dir, 'report.md')}", flush=True)
    study.finish(state_dir)


def run():
    try:
        app.run(main)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
