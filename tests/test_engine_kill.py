"""A second study on the same engine, killed with SIGKILL from outside mid-pass, resumes to identical output.

The toy study (written to a file and run as a subprocess, like any study) has two passes over
Fashion-MNIST test[:300] with two zoo backbones (random weights): per-model means and variances of the
pre-logit features (embjax.moments), and a feature-store dump of two intermediates of different shapes
(float16 and float32). It prints one progress line per batch; the test kills it once a chosen batch is
done, runs it again, and compares everything with an uninterrupted run. Whole tier only: four runs, each
paying the JAX import and compilation; the everyday tier's kill -9 resume is tests/test_study.py's.
"""

import os
import sys
import textwrap

import numpy as np
import pytest

import study_runner as runner

TOY = textwrap.dedent('''
    import sys
    import numpy as np
    from embjax import data, extract, members, moments

    workdir, out = sys.argv[1], sys.argv[2]
    ms = members.load("zoo_resnet_v1,zoo_mobilenet_v2", "random")
    names = [m.name for m in ms]
    source = data.get_source("fashion_mnist", "test[:300]")
    engine = extract.Engine(ms, workdir, batch_size=32, fingerprint={"toy": 1}, checkpoint_every=3,
                            progress_seconds=0)

    means = engine.run(extract.Pass(
        "means", source, "test[:300]", {"zoo_resnet_v1": ("pre_logits", "stem"), "zoo_mobilenet_v2": ("pre_logits", "stage1")},
        accumulator={m.name: moments.accumulator(m.feature_dim, lambda o, b, aux, n=m.name: o[n]["pre_logits"])
                     for m in ms}, dataset="fashion_mnist",
        store={"zoo_resnet_v1/stem": "float16", "zoo_mobilenet_v2/stage1": "float32"}))
    # A second pass that needs the first one's result (like maps between fit and eval).
    mu = {n: np.asarray(means[n].mean) for n in names}
    centred = engine.run(extract.Pass(
        "centred", source, "test[:300]", {n: ("pre_logits",) for n in names},
        aux=mu, accumulator={n: moments.accumulator(m.feature_dim, lambda o, b, aux, n=n: o[n]["pre_logits"] - aux[n])
                             for n, m in zip(names, ms)}))
    store = engine.store("means")
    arrays = {}
    for tag, st in (("means", means), ("centred", centred)):
        for n in names:
            for f in ("count", "mean", "sumsq"):
                arrays[f"{tag}/{n}/{f}"] = np.asarray(getattr(st[n], f))
    for name in store.names:
        arrays[f"store/{name}"] = store.array(name)
    arrays["store/index"] = store.index
    np.savez(out, **arrays)
    print("toy done", flush=True)
''')


def _run(script, workdir, out, cache, kill_at=None):
    cmd = [sys.executable, str(script), str(workdir), str(out)]
    if kill_at:
        return runner.kill_at(cmd, kill_at, cache)
    proc = runner.run(cmd, cache)
    assert "toy done" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def _newest(workdir, name):
    """The newest checkpoint the killed run left for pass `name`: where the rerun must resume (the run goes
    on for a moment after the line that triggered the kill, so this is read from the disk)."""
    assert not runner.checkpoints(workdir / "passes" / name), f"the kill landed after pass '{name}' finished"
    steps = runner.checkpoints(workdir / "checkpoints" / name)
    assert steps and steps[0] < 10, steps
    return steps[0]


@pytest.mark.slow
def test_toy_study_killed_mid_pass_resumes_to_identical_output(tmp_path):
    script = tmp_path / "toy_study.py"
    script.write_text(TOY)
    cache = tmp_path / "cache"
    _run(script, tmp_path / "whole", tmp_path / "whole.npz", cache)

    killed = tmp_path / "killed"
    # 10 batches per pass; checkpoints after 3, 6 and 9. Kill in the first pass after batch 4 (the
    # checkpoint of batch 3 holds), then in the second pass after batch 7 (checkpoint 6 holds).
    _run(script, killed, tmp_path / "k.npz", cache, kill_at=r"\[means .*\] batch 4/10")
    assert not os.path.exists(killed / "store" / "means" / "manifest.json")
    means_at = _newest(killed, "means")
    text = _run(script, killed, tmp_path / "k.npz", cache, kill_at=r"\[centred .*\] batch 7/10")
    assert f"[resume] pass 'means': {means_at}/10 batches already done" in text
    centred_at = _newest(killed, "centred")
    text = _run(script, killed, tmp_path / "killed.npz", cache)
    assert "[resume] pass 'means' finished earlier" in text
    assert f"[resume] pass 'centred': {centred_at}/10 batches already done" in text

    whole, resumed = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "killed.npz")
    assert sorted(whole.files) == sorted(resumed.files)
    for key in whole.files:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    assert int(whole["means/zoo_resnet_v1/count"]) == 300
    assert whole["store/zoo_resnet_v1/stem"].shape == (300, 14 * 14 * 16)
    assert whole["store/zoo_resnet_v1/stem"].dtype == np.float16
    np.testing.assert_array_equal(whole["store/index"], np.arange(300))
    # The second pass saw the first pass' means: its own means are ~0 (float32 rounding of values of
    # order |mean|, 300 rows).
    scale = np.abs(whole["means/zoo_mobilenet_v2/mean"]).max() + 1
    assert np.abs(whole["centred/zoo_mobilenet_v2/mean"]).max() < 1e-5 * scale
