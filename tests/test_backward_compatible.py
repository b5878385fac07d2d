"""The backward-compatibility study end to end on a tiny Fashion-MNIST config: the report's layout and the
relations its numbers must satisfy; (slow) a run killed with SIGKILL mid-training resumes to the same
results.json numbers as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import backward_compatible as study
from experiments.configs import backward_compatible as configs

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(train_split="train[:768]", eval_split="test[:240]", batch_size=64, checkpoint_every=4)


def tiny_config():
    c = configs.get_config("fashion_mnist")
    c.update(TINY)
    for t in (c.old_train, c.new_train):
        t.update(dict(epochs=1, batch_size=64, warmup_steps=2, checkpoint_every=4, log_seconds=0.0))
    c.maps.fit_samples = 400
    c.bct.compare_unnormalized = False
    return c


def _overrides():
    args = [f"--config.{k}={v}" for k, v in TINY.items()]
    for t in ("old_train", "new_train"):
        args += [f"--config.{t}.epochs=1", f"--config.{t}.batch_size=64", f"--config.{t}.warmup_steps=2",
                 f"--config.{t}.checkpoint_every=4", f"--config.{t}.log_seconds=0"]
    return args + ["--config.maps.fit_samples=400", "--config.bct.compare_unnormalized=False"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bct_study")
    config = tiny_config()
    results, engine = study.run(config, str(work / "state"))
    run_dir = str(work / "report")
    study.write_report(run_dir, results)
    engine.finish()
    return results, run_dir


def test_report_layout_and_consistency(tiny_run):
    results, run_dir = tiny_run
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    for key in ("methods", "retrieval", "compatible", "config"):
        assert key in saved
    assert saved["methods"] == list(study.methods_for(tiny_config()))
    assert "bct" in saved["methods"] and "bct, unnormalized columns" not in saved["methods"]
    for m in saved["methods"]:
        assert set(saved["retrieval"][m]) == {"old/old", "new/new", "new/old"}
        for cell in saved["retrieval"][m].values():
            assert set(cell) == {"top1", "top5", "map"}
            assert 0.0 <= cell["top1"] <= cell["top5"] <= 1.0 and 0.0 < cell["map"] <= 1.0
        # The criterion as reported is the criterion as defined.
        r = saved["retrieval"][m]
        assert saved["compatible"][m] == (r["new/old"]["top1"] > r["old/old"]["top1"])
    r = saved["retrieval"]
    # One old model: old/old is the same cell for every method; the post-hoc maps leave the independent
    # new model untouched, so their new/new is its new/new and their cost is exactly 0.
    for m in saved["methods"]:
        assert r[m]["old/old"] == r["independent"]["old/old"]
        if m not in ("bct", "l2"):
            assert r[m]["new/new"] == r["independent"]["new/new"]
            assert saved["cost_new_new"][m]["top1"] == 0.0
    # Classes: old model on 0-4, new on 0-7 (8 and 9 held out): three class groups besides "all".
    assert saved["old_classes"] == [0, 1, 2, 3, 4] and saved["new_classes"] == [5, 6, 7]
    assert len(saved["retrieval_by_classes"]) == 3
    text = Path(run_dir, "report.md").read_text()
    assert "criterion met" in text and "Published figures" in text
    assert Path(run_dir, "compatibility.csv").exists()


def test_posthoc_maps_beat_unmapped_features(tiny_run):
    # Planted knowledge: an independently trained model's features fed to another model's gallery without
    # a map are at chance level, and a least-squares map fit on 400 images recovers much of the old
    # model's own retrieval. Chance top-1 with 10 balanced classes is ~10-15%; the map must do far better.
    results, _ = tiny_run
    r = results["retrieval"]
    assert r["affine new→old"]["new/old"]["top1"] > r["independent"]["new/old"]["top1"] + 0.15
    assert r["affine old→new"]["new/old"]["top1"] > r["independent"]["new/old"]["top1"] + 0.15


@pytest.mark.slow
def test_study_killed_mid_training_resumes_to_same_numbers(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.backward_compatible", *_overrides()]

    def results_of(workdir):
        runs = [p for p in Path(workdir).iterdir() if (p / "results.json").exists()]
        assert len(runs) == 1, runs
        with open(runs[0] / "results.json") as f:
            r = json.load(f)
        return r["retrieval"], r["retrieval_by_classes"], r["compatible"]

    ref = subprocess.run(cmd + [f"--workdir={tmp_path / 'ref'}"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    victim = subprocess.Popen(cmd + [f"--workdir={tmp_path / 'run'}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.time() + 600
    for line in victim.stdout:
        seen.append(line)
        # Kill in the BCT training, after its first checkpoint (step 4) and before it finishes.
        if line.startswith("[train bct") and " step 6/" in line:
            os.kill(victim.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(seen)

    resumed = subprocess.run(cmd + [f"--workdir={tmp_path / 'run'}"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[train bct (zoo_inception)] resuming from step 4" in resumed.stdout, resumed.stdout
    assert "reusing the finished run" in resumed.stdout  # the old and independent models are not retrained
    assert results_of(tmp_path / "run") == results_of(tmp_path / "ref")
    assert np.isfinite(results_of(tmp_path / "ref")[0]["bct"]["new/old"]["top1"])
