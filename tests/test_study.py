"""The affine-equivalence study end to end on the zoo architectures and small slices of Fashion-MNIST.

Each run is a subprocess of `python -m experiments.affine_equivalence`, exactly as a user starts it. The
models have random weights (`--config.weights=random`): these tests check the engine's arithmetic and
bookkeeping, not accuracy, and zoo training has its own test (tests/test_zoo.py). Runs share a
persistent XLA compilation cache, so only the first run of each configuration compiles. Kills come from
outside, as a user's kill -9 would: the test reads the run's progress lines (one per batch with
`--config.progress_seconds=0`) and sends SIGKILL once the run is past a given batch (tests/study_runner.py).

Everyday tier: the baseline run (its numbers against an independent forward pass), one kill -9 resume,
bad input. The whole tier (`./launch.sh test all`) adds the linear-head path, 4 devices, 2 processes and
bfloat16: each compiles the models again under another setting, and a second kill (in the evaluation
pass of the resumed run).
"""

import os

import numpy as np
import pytest

import study_runner as runner

MODELS = "zoo_resnet_v1,zoo_mobilenet_v2"  # two families: every map family has both directions

TINY = [
    f"--config.models={MODELS}",
    "--config.fit_split=train[:512]",
    "--config.eval_split=test[:200]",  # 200 is not a multiple of 64: the last batch is padded
    "--config.batch_size=64",
    "--config.weights=random",
    "--config.checkpoint_every=2",
    "--config.learned.families=()",  # the zoo preset trains learned maps; tests/test_learned_families.py has them
]


def _cmd(workdir, *args):
    return runner.study("affine_equivalence", workdir, *TINY, *args)


def run_study(workdir, cache, *args, devices=1, check=True, **env):
    return runner.run(_cmd(workdir, *args), cache, devices, check, **env)


def load_results(workdir):
    results, run_dir = runner.results(workdir)
    return results, str(run_dir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("baseline")
    # No checkpoint inside a pass: every run compared with this one (killed, resumed, checkpointed every 2
    # batches) must match it, whatever its checkpoints.
    proc = run_study(workdir, cache, "--config.checkpoint_every=1000")
    results, run_dir = load_results(workdir)
    return results, run_dir, proc


def test_report_contents(baseline):
    results, run_dir, proc = baseline
    names = MODELS.split(",")
    assert results["models"] == names
    assert results["num_fit"] == 512 and results["num_eval"] == 200
    n = len(names)
    for family in ("affine", "logit", "naive"):
        assert np.shape(results[family]["accuracy"]) == (n, n)
    # The unmapped accuracies against an independent forward pass: the same random-weight models applied
    # in this process, batch by batch outside the engine, scored in NumPy on the 200 labels (the study
    # reports count / 200 in float32, hence the rounding to a count). Equal counts:
    # only the batch composition differs (the engine pads the last batch), which moves a logit by float32
    # rounding and could flip an exact argmax tie only; 200 images of 10 random-head logits have none.
    import jax

    from embjax import members
    from embjax.data import fashion_mnist

    images, labels = fashion_mnist.load("test[:200]")
    for name, acc in zip(names, results["unmapped"]["accuracy"]):
        (member,) = members.load(name, "random", log=lambda _: None)
        apply = jax.jit(member.apply)
        logits = np.concatenate([np.asarray(apply(member.variables, images[i:i + 50])["logits"])
                                 for i in range(0, 200, 50)])
        assert round(acc * 200) == np.sum(np.argmax(logits, -1) == labels), (name, acc)
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
    """Start the study and SIGKILL it as soon as an output line matches `pattern`; returns the output."""
    return runner.kill_at(_cmd(workdir, "--config.progress_seconds=0", *args), pattern, cache)


def killed_mid_pass(workdir, name, total):
    """The checkpoint a killed run left for pass `name` (of `total` batches): the one a rerun must resume
    from. The child runs on for a moment after the line that triggered the kill, so this is read from the
    disk, not assumed; the pass must not have finished (the kill lines leave several batches to go)."""
    assert not runner.pass_finished(workdir, name), f"the kill landed after pass '{name}' finished"
    steps = runner.pass_checkpoints(workdir, name)
    assert steps and 0 < steps[0] < total, steps
    return steps[0]


def _assert_same_tables(resumed, results):
    # Same fold order, same jitted steps on the same device: bit-identical numbers.
    for family in ("affine", "logit", "naive"):
        for key in ("accuracy", "top5", "agreement", "r2"):
            assert resumed[family][key] == results[family][key], (family, key)
    assert resumed["fit_statistics"] == results["fit_statistics"]
    assert resumed["num_fit"] == 512 and resumed["num_eval"] == 200


def test_resume_after_kill_gives_identical_results(baseline, tmp_path, cache):
    """The everyday tier's kill -9 of a real pass: killed mid-fit, rerun with the same command."""
    results, _, _ = baseline
    workdir = tmp_path / "killed"
    # Killed in the fit pass once batch 3 of 8 is done (the checkpoint after batch 2 exists; later ones
    # may, if the run got further before the signal landed).
    kill_when(workdir, cache, r"\[fit .*\] batch 3/8")
    assert not runner.finished(workdir)
    fit_at = killed_mid_pass(workdir, "fit", 8)
    proc = run_study(workdir, cache)
    assert f"[resume] pass 'fit': {fit_at}/8 batches already done" in proc.stdout
    assert "[resume] pass 'eval'" not in proc.stdout
    resumed, _ = load_results(workdir)
    _assert_same_tables(resumed, results)


@pytest.mark.slow  # two more study runs: the whole tier (the kill in the fit pass above is everyday)
def test_killed_in_fit_then_in_eval_resumes_both_passes(baseline, tmp_path, cache):
    results, _, _ = baseline
    workdir = tmp_path / "killed"
    kill_when(workdir, cache, r"\[fit .*\] batch 3/8")
    assert not runner.finished(workdir)
    fit_at = killed_mid_pass(workdir, "fit", 8)
    # Killed again in the evaluation pass of the resumed run, as soon as it starts: the checkpoint after
    # batch 2 of 4 may or may not exist, and the rerun resumes from whichever is on disk.
    out = kill_when(workdir, cache, r"\[eval .*\] batch 1/4")
    assert f"[resume] pass 'fit': {fit_at}/8 batches already done" in out
    assert runner.pass_finished(workdir, "fit") and not runner.finished(workdir)
    eval_at = (runner.pass_checkpoints(workdir, "eval") or [0])[0]
    proc = run_study(workdir, cache)
    assert "[resume] pass 'fit' finished earlier" in proc.stdout
    if eval_at:
        assert f"[resume] pass 'eval': {eval_at}/4 batches already done" in proc.stdout
    else:
        assert "[resume] pass 'eval'" not in proc.stdout
    resumed, _ = load_results(workdir)
    _assert_same_tables(resumed, results)


@pytest.mark.slow
def test_linear_heads_resume_mid_fit(tmp_path, cache):
    """heads="linear" (the effnet_lite path): fit features go to the feature store, heads are trained on
    them between the passes; a kill in the middle of the fit pass resumes to the same numbers."""
    args = ["--config.heads=linear", "--config.linear_head.epochs=3"]
    whole_dir = tmp_path / "whole"
    run_study(whole_dir, cache, *args)
    whole, _ = load_results(whole_dir)
    killed_dir = tmp_path / "killed"
    kill_when(killed_dir, cache, r"\[fit .*\] batch 3/8", *args)
    fit_at = killed_mid_pass(killed_dir, "fit", 8)
    proc = run_study(killed_dir, cache, *args)
    assert f"[resume] pass 'fit': {fit_at}/8 batches already done" in proc.stdout
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


@pytest.mark.slow
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
        if key == "learned.families":
            config.learned.families = ()
            continue
        config[key] = type(config[key])(value)
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("overrides,needle", [
    (dict(models="zoo_resnet_v1,no_such_model"), "no_such_model"),
    (dict(weights="files"), "weight_files"),
    (dict(weights="zoo", models="resnet50_v1,zoo_resnet_v1"), "resnet50_v1"),  # fails before training any
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
    assert not runner.finished(workdir)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_maps_and_tables(baseline, tmp_path, cache):
    """Two processes on loopback (jax.distributed, gloo collectives), each reading its half of every
    split, produce the same tables as one process."""
    results, _, _ = baseline
    workdir = tmp_path / "multi"
    port = _free_port()
    procs = []
    for pid in range(2):
        procs.append(runner.start(_cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                       f"--process_id={pid}"), cache))
    outs = [p.communicate(timeout=runner.HUNG)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    multi, _ = load_results(workdir)
    assert multi["meta"]["process_count"] == 2
    assert multi["num_fit"] == 512 and multi["num_eval"] == 200
    for family in ("affine", "logit", "naive"):
        # Same integer counts (see the 4-device test for why float32 reordering cannot change them here).
        assert multi[family]["accuracy"] == results[family]["accuracy"], family
        np.testing.assert_allclose(multi[family]["r2"], results[family]["r2"], atol=1e-4)


@pytest.mark.slow
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
