"""Shared pytest set-up: the two tiers, a private cache and home for the whole run, and "highest" matmul
precision only where a test asks for it.

Tiers: `./launch.sh test` runs the everyday tier, `pytest -m "not slow"`; `./launch.sh test all` (what CI
runs) runs every test. A test belongs to the whole tier only when it carries `pytest.mark.slow`, and every
test of a `test_fuzz_*.py` file gets that mark here: full-size parity against PyTorch, Keras and
TensorFlow, the ten thesis CNNs at 331 px, the study runs killed from outside, the fuzz files.

Compilation: `./launch.sh test` (the everyday tier) exports XLA_FLAGS="--xla_backend_optimization_level=0
--xla_cpu_use_fusion_emitters=false" (when the installed jaxlib takes them): most of the tier's CPU goes
to compiling hundreds of small programs that each run a few times, and LLVM's optimisation and XLA:CPU's
newer fusion emitters cost more compile time than they save. Both change only how the same operations
are compiled, so float32 results may differ in their last bits: the tests' tolerances come from float32
rounding and their bit-for-bit checks compare two runs compiled alike (one test that relied on one
compiler's bit pattern was corrected: tests/test_stats.py's symmetry check). `./launch.sh test all` (CI)
compiles as users' runs are.
Subprocesses inherit the flags through tests/study_runner.py.

Precision: the library's pure math requests float32 precision on its own dots (checked in
test_precision.py), so the suite runs at JAX's default precision. The parity tests of converted models
compare float32 forward passes with independent references (Keras, PyTorch) at tolerances derived for
exact float32 matmuls; on GPU (TF32) or TPU (bfloat16) the default would blow those tolerances, so they
carry `pytest.mark.highest_precision`, which runs the test under `jax.default_matmul_precision("highest")`.

Writes: every place the suite (or a library it drives) would write outside pytest's own temporary
directories is pointed into one temporary directory for the session, through the environment, so
subprocess-based tests inherit it: embjax's cache (zoo models, converted weights), HOME and XDG_CACHE_HOME
(whatever falls back to ~), Keras' home, tfds' data dir, Matplotlib's config dir and, where the user's
environment enables one, JAX's persistent compilation cache.
"""
import os
import shutil
import tempfile

_PRIVATE = tempfile.mkdtemp(prefix="embjax-tests-")
_REDIRECTS = {
    "EMBJAX_CACHE": "embjax-cache",
    "HOME": "home",
    "XDG_CACHE_HOME": "home/.cache",
    "KERAS_HOME": "keras",
    "TFDS_DATA_DIR": "tensorflow_datasets",
    "MPLCONFIGDIR": "matplotlib",
}
# JAX writes a persistent compilation cache only when asked to; if the user's environment asks, the
# suite's compilations go to the private directory instead (the experiments put theirs under
# $EMBJAX_CACHE/xla, which is redirected above).
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _REDIRECTS["JAX_COMPILATION_CACHE_DIR"] = "jax-compilation-cache"
# Before anything imports JAX, Keras or tfds: they read these at import time.
for _var, _sub in _REDIRECTS.items():
    os.environ[_var] = os.path.join(_PRIVATE, _sub)
    os.makedirs(os.environ[_var], exist_ok=True)
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "highest_precision: run under jax.default_matmul_precision('highest') (parity tests whose "
        "tolerances assume exact float32 matmuls)")


# The files that cost most CPU in the everyday tier, most first (CPU seconds per file, the tests'
# processes and their children, from the 2026-12-07 16:14 run; README's Tests section). With
# `--dist loadfile --no-loadscope-reorder` (launch.sh) xdist hands files to the two workers in collection
# order, one at a time as a worker runs dry; starting with the longest files keeps both workers busy to
# the end (longest processing time first). An outdated order costs wall time: in that run the previous
# list (its first files no longer the longest) left one worker with 356 CPU s and the other with 245. A
# file not listed runs after these, in alphabetical order; the list steers the schedule only, never what
# runs.
LONGEST_FIRST = (
    "test_study.py", "test_tf_slim.py", "test_efficientnet.py", "test_conv_matmul.py", "test_nasnet.py",
    "test_inception.py", "test_open_set.py", "test_named_layers.py", "test_full_network_embedding.py",
    "test_folding.py", "test_backward_compatible.py", "test_registry.py", "test_maps.py", "test_canonical.py",
    "test_svm.py", "test_evaluate.py", "test_stats.py", "test_verification.py", "test_similarity.py",
    "test_learned_families.py", "test_resnet.py", "test_study_planted.py", "test_mobilenet.py",
    "test_timm_parity.py", "test_no_allreduce.py", "test_zoo.py", "test_own_features.py", "test_train.py",
    "test_inception_slim.py", "test_bct.py", "test_engine_faults.py", "test_extract.py",
    "test_multidevice_core.py", "test_zoo_apart.py", "test_learned_maps.py", "test_fne.py", "test_iresnet.py",
    "test_retrieval.py", "test_vgg.py", "test_h5.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.startswith("test_fuzz_"):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: the tests of a file keep their order, and unlisted files their alphabetical order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
    shutil.rmtree(_PRIVATE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _matmul_precision(request):
    # A test that sets the global precision itself (e.g. by running a child script in-process) must not
    # change it for the tests after it: the global value is put back after every test.
    before = jax.config.jax_default_matmul_precision
    try:
        if request.node.get_closest_marker("highest_precision") is None:
            yield
        else:
            with jax.default_matmul_precision("highest"):
                yield
    finally:
        jax.config.update("jax_default_matmul_precision", before)


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_module():
    """One worker runs many modules: without this its resident memory grows with every module's compiled
    programs (a 2-worker everyday run reached 3.7 GB per worker). After a module, JAX's compilation
    caches are dropped, garbage collected, and freed heap handed back to the system."""
    yield
    import ctypes
    import gc

    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is freed, just not returned
        pass


@pytest.fixture(scope="session", autouse=True)
def private_write_locations():
    """The directory every redirected location lives in; fails the run if something reset them."""
    yield _PRIVATE
    for var, sub in _REDIRECTS.items():
        assert os.environ.get(var) == os.path.join(_PRIVATE, sub), f"${var} was changed during the test run"
