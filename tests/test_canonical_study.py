"""The canonical-space study end to end on tiny slices of Fashion-MNIST (random-weight zoo models: this
checks the bookkeeping and the full-width identity, not accuracy)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a study subprocess (zoo models, both hubs at three ranks): the whole tier
def test_tiny_study_writes_every_key_and_full_width_gcca_matches_direct(tmp_path):
    cmd = [sys.executable, "-m", "experiments.canonical_space", f"--workdir={tmp_path}",
           "--config.models=zoo_resnet_v1,zoo_resnet_v2", "--config.fit_split=train[:512]",
           "--config.eval_split=test[:200]", "--config.batch_size=64", "--config.weights=random",
           "--config.ranks=2,8,160"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = next(d for d in os.listdir(tmp_path) if d != "state")
    with open(tmp_path / run / "results.json") as f:
        r = json.load(f)
    assert r["ranks"] == [2, 8, 160] and set(r["canonical"]) == {"gcca", "procrustes"}
    assert os.path.isfile(tmp_path / run / "canonical_curve.png")
    for method in ("gcca", "procrustes"):
        curve = r["canonical"][method]
        assert len(curve["mean_relative_change"]) == 3 and np.shape(curve["accuracy"]) == (3, 2, 2)
    # At the joint width (64 + 96) the GCCA composition is the direct least-squares map: the same
    # predictions up to float32 rounding, i.e. at most a few of the 200 images may flip.
    gcca = np.asarray(r["canonical"]["gcca"]["accuracy"][-1])
    np.testing.assert_allclose(gcca, np.asarray(r["direct"]["accuracy"]), atol=3 / 200)
    assert set(r["intrinsic_dim"]) == {"gcca", "procrustes"}
