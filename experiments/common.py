"""What every study's entry point shares: absl flags, jax.distributed set-up, error printing, the run directory.

A study module defines `run(config, workdir) -> (results, engine_or_None)` and a `report(run_dir,
results)` writer, and ends with `common.main(run, write_report, "configs/<study>.py", default_preset)`.
Its command line is then

    python -m experiments.<study> [--config=experiments/configs/<study>.py:PRESET] [--config.FIELD=...]
        [--workdir=DIR] [--distributed | --coordinator_address=H:P --num_processes=N --process_id=I]

The command line is checked before any work (experiments/config_check.py): a bad preset, field, value
or work directory is one line on stderr and exit status 2.

Resume state lives in WORKDIR/state (default WORKDIR = results/<study>); running the same command
again resumes a killed run. Each finished run writes its report into a new directory
WORKDIR/<config.name>-<time> and prints its path. `engine(config, workdir)` builds a study's members and
engine from the config fields every study shares (experiments/configs/base.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
# Errors a user can fix (bad config, missing file, unknown model, damaged checkpoint): one line, exit 1.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError, NotImplementedError)


def exit_with_user_error(e: BaseException) -> None:
    """A user-fixable error as one line on stderr and exit status 1 (re-raised with EMBJAX_TRACEBACK=1).
    Call it inside the `except` block."""
    if os.environ.get("EMBJAX_TRACEBACK"):
        raise e
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"embjax: error: {type(e).__name__}: {msg} (EMBJAX_TRACEBACK=1 shows the traceback)",
          file=sys.stderr, flush=True)
    sys.exit(1)


def define_flags(config_file: str, default_preset: str):
    path = os.path.join(HERE, "configs", config_file)
    flags_ = dict(
        config=config_flags.DEFINE_config_file("config", f"{path}:{default_preset}", "study config (file:preset)"),
        workdir=flags.DEFINE_string("workdir", None, "run directory (default results/<config.name>)"),
        distributed=flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU VM pods, "
                                      "SLURM, or with the three flags below)"),
        coordinator=flags.DEFINE_string("coordinator_address", None, "host:port of process 0"),
        num_processes=flags.DEFINE_integer("num_processes", None, "number of processes"),
        process_id=flags.DEFINE_integer("process_id", None, "this process' index"),
    )
    return flags_


def setup_jax(f) -> None:
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax reports every checkpoint step at INFO
    # Compiled steps are cached on disk, so a second run of the same study skips XLA compilation.
    if not jax.config.jax_compilation_cache_dir:
        from embjax.zoo import default_cache_dir

        jax.config.update("jax_compilation_cache_dir", os.path.join(default_cache_dir(), "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if f["distributed"].value or f["coordinator"].value:
        kw = {}
        if f["coordinator"].value:
            kw = dict(coordinator_address=f["coordinator"].value, num_processes=f["num_processes"].value,
                      process_id=f["process_id"].value)
        # Cross-process collectives on CPU (tests, CPU clusters) go through gloo; GPUs/TPUs ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kw)


def run_meta(config, seconds: dict, module: str) -> dict:
    """results["meta"]: the command as typed, date, jax version, devices, processes, timings."""
    import datetime

    import jax

    from embjax import sharding

    return {
        "command": " ".join([f"python -m {module}", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": dict(seconds),
        "jax": jax.__version__,
        **sharding.topology(),
    }


def to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def fingerprint(config, ignore=("checkpoint_every", "prefetch", "progress_seconds")) -> dict:
    """The config fields that change a run's numbers (what a checkpoint must match to be resumed)."""
    cfg = to_dict(config)
    for k in ignore:
        cfg.pop(k, None)
    return cfg


def input_sizes(config) -> dict | None:
    """members.load's input_sizes from config.input_size and config.native_size_models (None: every model
    at its registry size)."""
    if not config.get("input_size"):
        return None
    native = [m.strip() for m in config.get("native_size_models", "").split(",") if m.strip()]
    return {"*": config.input_size, **{m: 0 for m in native}}


def members(config, **load) -> list:
    """The study's models (embjax.members.load) from config.models, weights, weight_files, dtype, input
    sizes, fold_batchnorm and zoo; `load` adds zoo_data, dataset_tag, minimum."""
    from embjax import members as members_lib

    return members_lib.load(config.models, config.weights, weight_files=to_dict(config.weight_files),
                            dtype=config.dtype, zoo_config=to_dict(config.zoo), input_sizes=input_sizes(config),
                            fold_batchnorm=config.get("fold_batchnorm", True), **load)


def engine(config, workdir: str, members_=None, **load):
    """The engine of a study from its config in one call: over `members_` (else `members(config, **load)`),
    with the config's batch size, checkpoint interval, prefetch, progress and precision (float32 matmuls
    for dtype float32, XLA's default for bfloat16)."""
    from embjax import extract

    ms = list(members_) if members_ is not None else members(config, **load)
    dtype = config.get("dtype", "float32")
    return extract.Engine(ms, workdir, batch_size=config.batch_size, fingerprint=fingerprint(config),
                          checkpoint_every=config.checkpoint_every, prefetch=config.prefetch,
                          progress_seconds=config.progress_seconds, config=to_dict(config),
                          precision="float32" if dtype == "float32" else None)


def main(run: Callable[[Any, str], tuple[dict, Any]], write_report: Callable[[str, dict], Any],
         config_file: str, default_preset: str, module: str, summary: Callable[[dict], str] | None = None):
    """Define the flags and run the study `run` under absl (see the module docstring)."""
    from experiments import config_check

    study = module.rsplit(".", 1)[-1]
    default_config = f"{os.path.join(HERE, 'configs', config_file)}:{default_preset}"
    # Presets and --config.FIELD names first: config_flags reads sys.argv when the flag is defined.
    config_check.check_argv_or_exit(study, sys.argv, default_config)
    command_line = list(sys.argv)
    sys.argv[:], map_entries = config_check.pop_map_entries(sys.argv)  # --config.weight_files.NAME=PATH
    f = define_flags(config_file, default_preset)

    def _main(argv):
        config = f["config"].value
        config_check.apply_map_entries(config, map_entries)
        sys.argv[:] = command_line  # parsed: the command as typed again, for run_meta
        workdir = f["workdir"].value or os.path.join("results", study)
        config_check.check_or_exit(study, config, workdir)  # before any model, data or zoo training
        from embjax import report, sharding

        setup_jax(f)
        try:
            results, engine = run(config, os.path.join(workdir, "state"))
            results.setdefault("meta", {}).update(run_meta(config, results.get("meta", {}).get("seconds", {}),
                                                           module))
            results["meta"]["workdir"] = os.path.abspath(workdir)
            if sharding.is_primary():
                run_dir = report.new_run_dir(workdir, name=config.name)
                write_report(run_dir, results)
                if summary is not None:
                    print(summary(results), flush=True)
                print(f"\nreport: {os.path.join(run_dir, 'report.md')}", flush=True)
            if engine is not None:
                engine.finish()
        except USER_ERRORS as e:
            exit_with_user_error(e)

    try:
        app.run(_main, flags_parser=config_check.flags_parser(study))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
