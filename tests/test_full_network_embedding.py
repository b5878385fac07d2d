"""The full-network-embedding study end to end (tiny preset: a random-weight zoo model on a few hundred
Fashion-MNIST images), and its resume after SIGKILL in the middle of a pass.

Each run is a subprocess of `python -m experiments.full_network_embedding`, as a user starts it; runs share
a persistent XLA compilation cache. Random weights: these tests check the bookkeeping and arithmetic of the
study (the stored int8 embedding, the statistics, the report), not the accuracy of pretrained features.
The kill -9 test (whole tier only) kills the run when it reports a batch of the statistics pass
(tests/study_runner.py).
"""

import os

import numpy as np
import pytest

import study_runner as runner

CONFIG = "--config=experiments/configs/full_network_embedding.py:tiny"
MODEL = "zoo_efficientnet_lite"


def _cmd(workdir, *args):
    return runner.study("full_network_embedding", workdir, CONFIG, *args)


def run_study(workdir, cache, *args):
    return runner.run(_cmd(workdir, *args), cache)


def load_results(workdir):
    results, run_dir = runner.results(workdir)
    return results, str(run_dir)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("baseline")
    # keep the feature stores after the report (the default run keeps them too; this checks their content);
    # no checkpoint inside a pass: the killed run (checkpoints every 3 batches) must match it all the same
    proc = run_study(workdir, cache, "--config.checkpoint_every=1000")
    results, run_dir = load_results(workdir)
    return results, run_dir, workdir, proc


def test_report_and_stored_embedding(baseline):
    from embjax import feature_store, fne

    results, run_dir, workdir, proc = baseline
    assert results["backbones"] == [MODEL] and results["train_sizes"] == [60, 240]
    assert results["embeddings"] == ["fne", "fne_standardized", "last_layer", "last_layer_l2"]
    acc = results["accuracy"][MODEL]
    for e in results["embeddings"]:
        for n in ("60", "240"):
            assert 0.0 <= acc[e][n] <= 1.0
    # Every convolution of the small EfficientNet-Lite (the default layer set): the stem (16), block 0's
    # depthwise and projection (16 + 16; no expansion), then per block with input c, hidden 3c, output o:
    # 3c + 3c + o (c, o = 16, 24 | 24, 24 | 24, 40 | 40, 40 | 40, 64 | 64, 64), and the head (192):
    # 16 + 32 + 120 + 168 + 184 + 280 + 304 + 448 + 192 = 1,744 features in 22 layers.
    assert results["dims"][MODEL] == {"fne": 1744, "fne_standardized": 1744, "last_layer": 192, "last_layer_l2": 192}
    convs = [f"block_{i}/{c}" for i in range(7) for c in ("expand_conv", "depthwise_conv", "project_conv")
             if (i, c) != (0, "expand_conv")]
    assert list(results["layers"][MODEL]) == ["stem", *convs, "head"]
    assert results["num_train"] == 240 and results["num_test"] == 120
    for f in ("report.md", "results.json", "accuracy.md", "embedding.md"):
        assert os.path.isfile(os.path.join(run_dir, f))
    # The tiny preset caps dual CD at 100 epochs; every SVM stopped there short of its tolerance is named.
    cells = {f"{MODEL} {e} n={n}": c for e, by_n in results["svm"][MODEL].items() for n, c in by_n.items()}
    assert len(cells) == 8 and all(1 <= c["iterations"] <= 100 for c in cells.values())
    with open(os.path.join(run_dir, "report.md")) as f:
        report = f.read()
    late = [name for name, c in cells.items() if c["gap"] > 1e-3]
    assert f"{8 - len(late)} of 8 trained to a relative duality gap" in report
    assert all(f"{name} ({cells[name]['gap']:.1e})" in report for name in late)

    # The int8 embedding the embed pass stored equals fne's arithmetic on the stored pooled features with
    # statistics recomputed in float64 from the stored training features of each subset.
    train = feature_store.open(os.path.join(workdir, "state", "store", f"stats_{MODEL}"))
    test = feature_store.open(os.path.join(workdir, "state", "store", f"embed_{MODEL}"))
    train_fne = feature_store.open(os.path.join(workdir, "state", "store", f"train_fne_{MODEL}"))
    assert np.array_equal(train_fne.labels, train.labels)
    assert np.array_equal(train.index, np.arange(240)) and np.array_equal(test.index, np.arange(120))
    for n in (60, 240):
        stored = test.array(f"{MODEL}/fne_n{n}")
        assert stored.dtype == np.int8 and stored.shape == (120, 1744)
        x = train.array(f"{MODEL}/pooled")[:n].astype(np.float64)
        mu, sd = x.mean(0), x.std(0)
        dead = sd <= 1e-4 * np.abs(mu)
        z = np.where(dead, 0.0, (test.array(f"{MODEL}/pooled") - mu) / np.where(dead, 1.0, sd))
        ref = np.where(z > fne.HIGH, 1, np.where(z < fne.LOW, -1, 0))
        # float32 statistics vs float64: z agrees to ~1e-5 (see tests/test_fne.py); only values that close
        # to a threshold may differ.
        near = np.minimum(np.abs(z - fne.HIGH), np.abs(z - fne.LOW)) < 1e-4
        assert np.array_equal(stored[~near], ref[~near])
        assert results["degenerate_features"][MODEL][str(n)]["count"] == int(dead.sum())
        # The training side, stored as int8 too: every training row under subset n's statistics.
        z_train = np.where(dead, 0.0, (train.array(f"{MODEL}/pooled") - mu) / np.where(dead, 1.0, sd))
        ref_train = np.where(z_train > fne.HIGH, 1, np.where(z_train < fne.LOW, -1, 0))
        stored_train = train_fne.array(f"{MODEL}/fne_n{n}")
        assert stored_train.dtype == np.int8 and stored_train.shape == (240, 1744)
        near = np.minimum(np.abs(z_train - fne.HIGH), np.abs(z_train - fne.LOW)) < 1e-4
        assert np.array_equal(stored_train[~near], ref_train[~near])
        np.testing.assert_allclose(results["sparsity"][MODEL][str(n)], np.mean(stored == 0), atol=1e-6)


@pytest.mark.slow
def test_resume_after_sigkill_mid_pass_gives_identical_results(baseline, tmp_path, cache):
    results, _, _, _ = baseline
    workdir = tmp_path / "killed"
    name = f"stats_{MODEL}"
    # Kill -9 when the statistics pass reports batch 4 of its 10 (its first checkpoint, after batch 3, is
    # on disk by then); the rerun resumes from the newest checkpoint the killed run left.
    runner.kill_at(_cmd(workdir), rf"\[{name} .*\] batch 4/10", cache)
    assert not runner.pass_finished(workdir, name), "the pass finished before the kill: nothing was resumed"
    steps = runner.pass_checkpoints(workdir, name)
    assert steps, "no checkpoint of the statistics pass after batch 4"
    out = run_study(workdir, cache)
    assert f"[resume] pass '{name}': {steps[0]}/10 batches already done" in out.stdout
    resumed, _ = load_results(workdir)
    # Same batches folded in the same order by the same compiled steps: bit-identical numbers.
    for key in ("accuracy", "sparsity", "degenerate_features", "dims"):
        assert resumed[key] == results[key], key


def test_configs_and_errors(tmp_path):
    from experiments import full_network_embedding as study
    from experiments.configs import full_network_embedding as configs

    default = configs.get_config(None)
    assert (default.models, default.train_split, default.test_split) == ("efficientnet_lite0", "train[:1000]",
                                                                         "test[:1000]")
    assert study.parse_sizes(default.train_sizes, 1000) == [100, 300, 1000]
    three = configs.get_config("effnet_lite")
    assert three.models.split(",") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert (three.train_split, three.train_sizes) == (default.train_split, default.train_sizes)
    for dataset, (train, test, classes) in configs.TFDS_DATASETS.items():
        c = configs.get_config(f"vgg16_{dataset}")
        assert (c.models, c.dataset, c.train_split, c.test_split, c.num_classes) == ("vgg16", dataset, train, test,
                                                                                     classes)
    assert configs.get_config("vgg16").dataset == "caltech101"
    with pytest.raises(ValueError, match="unknown config"):
        configs.get_config("vgg19")
    with pytest.raises(ValueError, match="1..50"):
        study.parse_sizes("100", 50)
    assert study.parse_sizes("-1,10", 50) == [10, 50]
    for bad, match in (("", "at least one"), ("10,x", "'x' is not an integer"), ("0", "not in 1..50"),
                       ("-2", "not in 1..50")):
        with pytest.raises(ValueError, match=match):
            study.parse_sizes(bad, 50)
    # The paper's preset without the weight file names the flag to set, before any data is downloaded.
    with pytest.raises(FileNotFoundError, match="weight_files.vgg16"):
        study.run(configs.get_config("vgg16_dtd"), str(tmp_path))


@pytest.mark.parametrize("study", ["full_network_embedding", "features"])
def test_study_file_is_a_short_list_of_passes(study):
    """Issue 22's shape for these two studies: at most 250 lines, no function over 80, and no meshes,
    shardings, process indices or private attributes of other objects (the engine owns those)."""
    import ast

    path = os.path.join(runner.ROOT, "experiments", f"{study}.py")
    with open(path) as f:
        text = f.read()
    assert len(text.splitlines()) <= 250
    tree = ast.parse(text)
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80}
    assert not long, long
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    banned = {"NamedSharding", "PartitionSpec", "Mesh", "DATA_AXIS", "sync_global_devices", "process_index", "mesh"}
    assert not (names | attrs) & banned, (names | attrs) & banned
    private = {a for a in attrs if a.startswith("_") and not a.startswith("__")}
    assert not private, private
