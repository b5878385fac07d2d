"""The open_set study: class-disjoint subsets and pair sampling in process, and the whole study as a
subprocess killed with SIGKILL mid-pass and resumed to identical results.

The subprocess runs use random-weight zoo models (`smoke` preset): they check the study's bookkeeping
and resume, not accuracy. They share a persistent XLA compilation cache.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from embjax import cells, data
from experiments import open_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_class_specs_and_disjoint_subsets():
    pred, desc = data.class_filter("0-2,7", "fit_classes")
    np.testing.assert_array_equal(pred(np.arange(10)), [1, 1, 1, 0, 0, 0, 0, 1, 0, 0])
    even, _ = data.class_filter("even", "fit_classes")
    np.testing.assert_array_equal(even(np.arange(4)), [1, 0, 1, 0])
    with pytest.raises(ValueError, match="config.eval_classes"):
        data.class_filter("3-1", "eval_classes")
    with pytest.raises(ValueError, match="config.fit_classes must be ranges"):
        data.class_filter("cats", "fit_classes")


def test_kfold_pairs_are_balanced_valid_and_disjoint():
    labels = np.repeat(np.arange(5), 12)  # 330 genuine pairs for the 300 asked
    pi, pj, same, fold = cells.kfold_pairs(labels, 30, seed=0)
    # 10 folds × (30 genuine + 30 impostor) unordered pairs, each listed in both orders.
    assert len(pi) == 1200 and np.all(np.bincount(fold) == 120)
    assert np.all(pi != pj)
    np.testing.assert_array_equal(labels[pi] == labels[pj], same)
    assert same.sum() == 600
    folds_of = {}
    for a, b, f in zip(pi, pj, fold):
        folds_of.setdefault((min(a, b), max(a, b)), set()).add(int(f))
    assert len(folds_of) == 600 and all(len(v) == 1 for v in folds_of.values())


def _env(cache):
    env = dict(os.environ, EMBJAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
    env.pop("EMBJAX_TRACEBACK", None)
    return env


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "experiments.open_set", "--config=experiments/configs/open_set.py:smoke",
            f"--workdir={workdir}", *extra]


def _results(workdir):
    runs = sorted(d for d in os.listdir(workdir) if os.path.isfile(os.path.join(workdir, d, "results.json")))
    assert runs, os.listdir(workdir)
    with open(os.path.join(workdir, runs[-1], "results.json")) as f:
        r = json.load(f)
    r.pop("meta")
    return r


def test_sigkill_mid_pass_resumes_to_identical_results(tmp_path):
    cache = tmp_path / "cache"
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    proc = subprocess.run(_cmd(ref_dir), cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _results(ref_dir)
    assert reference["models"] == ["zoo_resnet_v1", "zoo_mobilenet_v2"] and reference["num_eval"] == 120
    for key in ("cka", "cka_debiased", "cca", "pwcca", "procrustes", "mutual_knn", "cknna"):
        assert np.shape(reference["similarity"][key]) == (2, 2)
    for s in open_set.SETTINGS:
        for f in open_set.FAMILIES:
            assert set(reference["verification"][s][f]["tar_at_far"]) == {"0.1", "0.01", "0.001", "0.0001"}
            assert set(reference["retrieval"][s][f]) >= {"recall_at_1", "recall_at_5", "map"}

    # Kill the study from outside as soon as the fit pass has written its first checkpoint (batch 4 of
    # 100), i.e. in the middle of that pass, then run the same command again.
    ckpt = killed_dir / "state" / "checkpoints" / "fit"
    victim = subprocess.Popen(_cmd(killed_dir), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the study ended before its first fit checkpoint"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    finished = killed_dir / "state" / "passes" / "fit"  # the engine saves a finished pass's state here
    assert not (finished.is_dir() and any(p.name.isdigit() for p in finished.iterdir())), \
        "the kill landed after the fit pass ended"
    resumed = subprocess.run(_cmd(killed_dir), cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] pass 'fit':" in resumed.stdout
    assert _results(killed_dir) == reference
