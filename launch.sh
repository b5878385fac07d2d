#!/usr/bin/env bash
# embjax launcher: sets itself up on a fresh machine, then runs one command.
#
#   ./launch.sh                    the main job: the affine-equivalence study on the offline default (zoo)
#   ./launch.sh test [pytest args] the everyday tests (pytest -m 'not slow'; minutes, under 4 GB a process)
#   ./launch.sh test all [args]    every test (what CI runs): full-size parity, 331-px thesis CNNs, kill
#                                  tests, fuzz files; needs about 16 GB of memory
#   ./launch.sh STUDY [flags]      experiments/STUDY.py with absl flags (e.g. --config=...), for any study in
#                                  experiments/ (affine_equivalence, extract, ...); `study` = affine_equivalence
#   ./launch.sh bench NAME [args]  benchmarks/NAME.py (installs the benchmark extra: PyTorch CPU, psutil)
#   ./launch.sh python [args]      the project's Python, for anything else
#
# Environment: EMBJAX_VENV (default .venv) is where the virtual environment lives; EMBJAX_PYTHON the
# interpreter that creates it (default python3); EMBJAX_ACCELERATOR=tpu|cuda installs jax for TPU VMs or
# NVIDIA GPUs (default: the CPU build). Set-up is skipped when nothing it installs has changed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${EMBJAX_VENV:-$ROOT/.venv}
PY=${EMBJAX_PYTHON:-python3}
cmd=${1:-main}
[ $# -gt 0 ] && shift

log() { echo "[launch] $*" >&2; }

ensure_venv() {  # $1: comma-separated extras
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  # Re-install only when pyproject.toml or the extras asked for change.
  local stamp="$VENV/.embjax-installed-$(echo "$extras" | tr ',' '-')"
  local want accel=${EMBJAX_ACCELERATOR:-cpu}
  want=$( (cat pyproject.toml; echo "$accel") | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing embjax[$extras] into $VENV"
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    case "$accel" in
      cpu) ;;
      tpu) "$VENV/bin/python" -m pip install -q -U "jax[tpu]" ;;
      cuda) "$VENV/bin/python" -m pip install -q -U "jax[cuda12]" ;;
      *) log "EMBJAX_ACCELERATOR must be cpu, tpu or cuda, not '$accel'"; exit 2 ;;
    esac
    echo "$want" > "$stamp"
  fi
}

ensure_fashion_mnist() {
  # Offline labelled images: Debian's dataset-fashion-mnist. Falls back to tfds 'fashion_mnist' at run time.
  local dir=/usr/share/datasets/fashion-mnist
  if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -n "${EMBJAX_FASHION_MNIST_DIR:-}" ]; then return 0; fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing Debian package dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) ||
      log "could not install dataset-fashion-mnist; the tfds 'fashion_mnist' builder will be used"
  else
    log "no $dir and no root apt-get; the tfds 'fashion_mnist' builder will be used"
  fi
}

case "$cmd" in
  main|study)
    ensure_venv "weights"
    ensure_fashion_mnist
    exec "$VENV/bin/python" -m experiments.affine_equivalence "$@"
    ;;
  test)
    ensure_venv "test,weights"
    ensure_fashion_mnist
    # Everyday tier: every test not marked slow, compiled for compile time: most of its CPU goes to
    # compiling hundreds of small one-off programs that each run a few times, so LLVM's optimisation is
    # off and XLA:CPU emits fusions with its older, faster-compiling emitters (about 40% less CPU in all;
    # README, Tests; tests/conftest.py says why the tests hold under it). A jaxlib that does not know
    # these flags would abort on them, so they are tried first. `test all` (CI): every test
    # (tests/conftest.py says which are slow), compiled as users' runs are. One worker per core; a
    # module's tests stay on one worker so its fixtures are built once, and files go out in collection
    # order, which tests/conftest.py sets to the longest files first.
    tier=(-m "not slow")
    if [ "${1:-}" = all ]; then
      tier=(); shift
    else
      fast="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
      if XLA_FLAGS="$fast" JAX_PLATFORMS=cpu "$VENV/bin/python" -c "import jax; jax.devices()" >/dev/null 2>&1; then
        export XLA_FLAGS="$fast${XLA_FLAGS:+ $XLA_FLAGS}"
      else
        log "this jaxlib does not take XLA_FLAGS=$fast; the everyday tier compiles with the defaults (slower)"
      fi
    fi
    exec "$VENV/bin/python" -m pytest -n "${EMBJAX_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder ${tier[@]+"${tier[@]}"} "$@"
    ;;
  bench)
    name=${1:?usage: ./launch.sh bench NAME [args]}
    shift
    ensure_venv "test,weights,bench"
    exec "$VENV/bin/python" "benchmarks/$name.py" "$@"
    ;;
  python)
    ensure_venv "test,weights"
    exec "$VENV/bin/python" "$@"
    ;;
  *)
    if [[ "$cmd" =~ ^[a-z_][a-z0-9_]*$ ]] && [ "$cmd" != common ] && [ -f "experiments/$cmd.py" ]; then
      ensure_venv "weights"
      ensure_fashion_mnist
      exec "$VENV/bin/python" -m "experiments.$cmd" "$@"
    fi
    studies=$(cd experiments && ls *.py | sed -e 's/\.py$//' | grep -v -e '^__init__$' -e '^common$' | tr '\n' ' ')
    echo "unknown command '$cmd'; use one of: (none), test, bench NAME, python, or a study: $studies" >&2
    exit 2
    ;;
esac
