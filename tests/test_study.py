"""The affine-equivalence study end to end on the zoo architectures and small slices of Fashion-MNIST.

Each run is a subprocess of `python -m experiments.affine_equivalence`, exactly as a user starts it. The
models have random weights (`--config.weights=random`): these tests check the engine's arithmetic and
bookkeeping, not accuracy, and zoo training has its own test (tests/test_zoo.py). Runs share a
persistent XLA compilation cache, so only the first run of each configuration compiles. Kills come from
outside, as a user's kill -9 would: the test reads the run's progress lines (one per batch with
`--config.progress_seconds=0`) and sends SIGKILL once the run is past a given batch.
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = "zoo_resnet_v1,zoo_mobilenet_v2,zoo_inception"

TINY = [
    f"--config.models={MODELS}",
    "--config.fit_split=train[:512]",
    "--config.eval_split=test[:200]",  # 200 is not a multiple of 64: the last batch is padded
    "--config.batch_size=64",
    "--config.weights=random",
    "--config.checkpoint_every=2",
]


def _env(cache, devices=1, **extra):
    env = dict(os.environ)
    env["EMBJAX_CACHE"] = str(cache)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("EMBJAX_TRACEBACK", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_study(workdir, cache, *args, devices=1, check=True, **env):
    cmd = [sys.executable, "-m", "experiments.affine_equivalence", f"--workdir={workdir}", *TINY, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache, devices, **env), capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"study failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load_results(workdir):
    runs = sorted(d for d in os.listdir(workdir) if d != "state" and
                  os.path.isfile(os.path.join(workdir, d, "results.json")))
    assert runs, f"no finished report under {workdir}: {os.listdir(workdir)}"
    with open(os.path.join(workdir, runs[-1], "results.json")) as f:
        return json.load(f), os.path.join(workdir, runs[-1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("baseline")
    proc = run_study(workdir, cache)
    results, run_dir = load_results(workdir)
    return results, run_dir, proc


def test_report_contents(baseline):
    results, run_dir, proc = baseline
    names = MODELS.split(",")
    assert results["models"] == names
    assert results["num_fit"] == 512 and results["num_eval"] == 200
    n = len(names)
    for family in ("affine", "logit", "naive"):
        acc = np.asarray(results[family]["accuracy"])
        assert acc.shape == (n, n)
        assert np.all((acc >= 0) & (acc <= 1))
        # The diagonal is the unmapped model in every family.
        np.testing.assert_array_equal(np.diag(acc), results["unmapped"]["accuracy"])
    # Logit maps reproduce the source logits through the target head, so every cell of a row equals the
    # source's unmapped accuracy: exact up to argmax ties, which 200 float32 samples do not produce.
    logit = np.asarray(results["logit"]["accuracy"])
    np.testing.assert_array_equal(logit, np.repeat(np.diag(logit)[:, None], n, axis=1))
    assert "config" in results and results["config"]["batch_size"] == 64
    for f in ("report.md", "results.json"):
        assert os.path.isfile(os.path.join(run_dir, f))
    assert "report:" in proc.stdout
    # The resume state is gone once the report exists.
    assert not os.path.exists(os.path.join(os.path.dirname(run_dir), "state", "checkpoints"))


def kill_when(workdir, cache, pattern, *args):
    """Start the study and SIGKILL it as soon as a stdout line matches `pattern`; returns the output."""
    cmd = [sys.executable, "-m", "experiments.affine_equivalence", f"--workdir={workdir}", *TINY,
           "--config.progress_seconds=0", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    return "".join(seen)


def test_resume_after_kill_gives_identical_results(baseline, tmp_path, cache):
    results, _, _ = baseline
    workdir = tmp_path / "killed"
    # Killed in the fit pass once batch 5 of 8 is done (checkpoints after batches 2 and 4 exist).
    kill_when(workdir, cache, r"\[fit .*\] batch 5/8")
    assert not any(os.path.isfile(os.path.join(workdir, d, "results.json")) for d in os.listdir(workdir))
    # Killed again in the evaluation pass of the resumed run, after its batch 3 of 4.
    out = kill_when(workdir, cache, r"\[eval .*\] batch 3/4")
    assert "[resume] pass 'fit': 4/8 batches already done" in out
    proc = run_study(workdir, cache)
    assert "[resume] pass 'fit' finished earlier" in proc.stdout
    assert "[resume] pass 'eval': 2/4 batches already done" in proc.stdout
    resumed, _ = load_results(workdir)
    # Same fold order, same jitted steps on the same device: bit-identical numbers.
    for family in ("affine", "logit", "naive"):
        for key in ("accuracy", "top5", "agreement", "r2"):
            assert resumed[family][key] == results[family][key], (family, key)
    assert resumed["fit_statistics"] == results["fit_statistics"]
    assert resumed["num_fit"] == 512 and resumed["num_eval"] == 200


def test_linear_heads_resume_mid_fit(tmp_path, cache):
    """heads="linear" (the effnet_lite path): fit features go to the feature store, heads are trained on
    them between the passes; a kill in the middle of the fit pass resumes to the same numbers."""
    args = ["--config.heads=linear", "--config.linear_head.epochs=3"]
    whole_dir = tmp_path / "whole"
    run_study(whole_dir, cache, *args)
    whole, _ = load_results(whole_dir)
    killed_dir = tmp_path / "killed"
    kill_when(killed_dir, cache, r"\[fit .*\] batch 3/8", *args)
    proc = run_study(killed_dir, cache, *args)
    assert "[resume] pass 'fit': 2/8 batches already done" in proc.stdout
    resumed, _ = load_results(killed_dir)
    for family in ("affine", "logit", "naive"):
        for key in ("accuracy", "top5", "agreement", "r2"):
            assert resumed[family][key] == whole[family][key], (family, key)
    # The backbones' own heads are scored for agreement only (they do not predict this run's labels
    # in general); the linear heads give the labelled accuracies.
    assert set(whole["native_affine"]) == {"agreement", "r2"}
    assert whole["heads"] == "linear"
    # Trained linear heads predict the labels of their own backbone far better than chance (10%): 512
    # random-feature rows, 3 epochs. A head that ignored its inputs would sit near 10%.
    assert min(whole["unmapped"]["accuracy"]) > 0.2, whole["unmapped"]["accuracy"]


def test_four_devices_give_the_same_tables(baseline, tmp_path, cache):
    results, _, _ = baseline
    workdir = tmp_path / "four"
    run_study(workdir, cache, devices=4)
    four, _ = load_results(workdir)
    assert four["meta"]["devices"] and len(four["meta"]["devices"]) == 4
    for family in ("affine", "logit", "naive"):
        # Counts are integers; a different reduction order over 4 devices can move a float32 logit by a
        # few ulps, which could flip an exact argmax tie only: none occur here, so the tables are equal.
        assert four[family]["accuracy"] == results[family]["accuracy"], family
        assert four[family]["agreement"] == results[family]["agreement"], family
        # R² sums squares over 200 x d values in float32, in another order: agreement to 1e-4 absolute
        # is ~1000x the float32 rounding of such sums.
        np.testing.assert_allclose(four[family]["r2"], results[family]["r2"], atol=1e-4)


def _tiny_config(**overrides):
    from experiments.configs import affine_equivalence as configs

    config = configs.get_config("zoo")
    for arg in TINY:
        key, value = arg[len("--config."):].split("=", 1)
        config[key] = type(config[key])(value)
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("overrides,needle", [
    (dict(models="zoo_resnet_v1,no_such_model"), "no_such_model"),
    (dict(weights="files"), "weight_files"),
    (dict(weights="zoo", models="zoo_resnet_v1,resnet50_v1"), "resnet50_v1"),
    (dict(data_dir="/nonexistent/fmnist"), "/nonexistent/fmnist"),
    (dict(eval_split="test[:0]"), "empty"),
])
def test_bad_input_raises_a_clear_error(tmp_path, overrides, needle):
    from experiments import affine_equivalence as study

    workdir = tmp_path / "bad"
    with pytest.raises((ValueError, KeyError, FileNotFoundError)) as err:
        study.run(_tiny_config(**overrides), str(workdir / "state"))
    assert needle in str(err.value)
    assert not (workdir.exists() and any(p.name == "results.json" for p in workdir.rglob("*")))


def test_bad_input_exits_nonzero_with_the_message(tmp_path, cache):
    """What a user sees on the command line: one line naming the problem, exit status 2 (a command line
    the study refuses, checked before any work: experiments/config_check.py)."""
    workdir = tmp_path / "bad"
    proc = run_study(workdir, cache, "--config.models=zoo_resnet_v1,no_such_model", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "embjax: error:" in proc.stderr and "no_such_model" in proc.stderr, proc.stderr[-3000:]
    assert not any(os.path.isfile(os.path.join(workdir, d, "results.json")) for d in os.listdir(workdir)) \
        if os.path.isdir(workdir) else True


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_maps_and_tables(baseline, tmp_path, cache):
    """Two processes on loopback (jax.distributed, gloo collectives), each reading its half of every
    split, produce the same tables as one process."""
    results, _, _ = baseline
    workdir = tmp_path / "multi"
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "experiments.affine_equivalence", f"--workdir={workdir}", *TINY,
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    multi, _ = load_results(workdir)
    assert multi["meta"]["process_count"] == 2
    assert multi["num_fit"] == 512 and multi["num_eval"] == 200
    for family in ("affine", "logit", "naive"):
        # Same integer counts (see the 4-device test for why float32 reordering cannot change them here).
        assert multi[family]["accuracy"] == results[family]["accuracy"], family
        np.testing.assert_allclose(multi[family]["r2"], results[family]["r2"], atol=1e-4)


def test_bfloat16_run_reports_agreement_with_float32(tmp_path, cache):
    workdir = tmp_path / "bf16"
    run_study(workdir, cache, "--config.dtype=bfloat16", "--config.precision_check_images=64")
    results, run_dir = load_results(workdir)
    check = results["bfloat16_vs_float32"]
    assert check["images"] == 64
    # Random-weight zoo models in bfloat16 (8-bit mantissa: 2^-9 relative rounding per operation, a few
    # hundred operations deep): features within a few percent of float32, and most own-head predictions
    # unchanged. A check that compared float32 with itself would give exactly 0 and 1.
    for agreement, error in zip(check["top1_agreement"], check["feature_rel_error"]):
        assert 0.5 < agreement <= 1.0
        assert 0 < error < 0.1
    assert os.path.isfile(os.path.join(run_dir, "bfloat16_vs_float32.md"))
