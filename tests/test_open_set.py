"""The open_set study: class-disjoint subsets and pair sampling in process, and the whole study as a
subprocess killed with SIGKILL mid-pass and resumed to identical results.

The subprocess runs use random-weight zoo models (`smoke` preset): they check the study's bookkeeping
and resume, not accuracy. They share a persistent XLA compilation cache. The kill is sent when the run
prints batch 5 of the fit pass (tests/study_runner.py); the subprocess test runs in the whole tier only.
"""
import numpy as np
import pytest

import study_runner as runner
from embjax import cells, data
from experiments import open_set


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


def test_smoke_run_in_process_against_numpy(tmp_path):
    """The study in this process on the smoke preset cut to 160 fitting images: the report's layout, and
    the native retrieval cells recomputed in float64 NumPy from the evaluation features the study stored."""
    from experiments.configs import open_set as configs

    config = configs.get_config("smoke")
    config.num_fit = 160
    results, engine = open_set.run(config, str(tmp_path / "state"))
    assert results["models"] == ["zoo_resnet_v1", "zoo_mobilenet_v2"]
    assert results["num_fit"] == 160 and results["num_eval"] == 120
    for key in ("cka", "cka_debiased", "cca", "pwcca", "procrustes", "mutual_knn", "cknna"):
        assert np.shape(results["similarity"][key]) == (2, 2)
    for s in open_set.SETTINGS:
        for f in open_set.FAMILIES:
            assert set(results["verification"][s][f]["tar_at_far"]) == {"0.1", "0.01", "0.001", "0.0001"}
            assert set(results["retrieval"][s][f]) >= {"recall_at_1", "recall_at_5", "map"}
    store = engine.store("eval")
    labels = np.asarray(store.labels)
    assert len(labels) == 120 and np.all(labels >= 5)  # the smoke preset evaluates on classes 5-9
    for j, name in enumerate(results["models"]):
        x = np.asarray(store.array(f"{name}/pre_logits"))
        want = runner.leave_one_out_retrieval(x, x, labels)
        for f in open_set.FAMILIES:
            cell = results["retrieval"]["native"][f]
            # The study ranks float32 cosines, ~1e-7 from these: only neighbours that close can swap. Recall
            # counts of 120 queries must match (observed: equal). mAP: one such swap moves one query's AP
            # by about 1/(rank x relevant) ~ 1e-3, the mean by ~1e-5 (observed: 8e-6 for one model);
            # 1e-4 allows a few, while a cell from the wrong features or labels is off by percents.
            assert abs(cell["recall_at_1"][0][j] - want["top1"]) < 0.5 / 120, (name, f)
            assert abs(cell["recall_at_5"][0][j] - want["top5"]) < 0.5 / 120, (name, f)
            assert abs(cell["map"][0][j] - want["map"]) < 1e-4, (name, f)


def _cmd(workdir, *extra):
    return runner.study("open_set", workdir, "--config=experiments/configs/open_set.py:smoke", *extra)


def _results(workdir):
    return runner.results(workdir, drop_meta=True)[0]


@pytest.mark.slow
def test_sigkill_mid_pass_resumes_to_identical_results(tmp_path):
    cache = tmp_path / "cache"
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    runner.run(_cmd(ref_dir), cache)
    reference = _results(ref_dir)
    assert reference["models"] == ["zoo_resnet_v1", "zoo_mobilenet_v2"] and reference["num_eval"] == 120
    for key in ("cka", "cka_debiased", "cca", "pwcca", "procrustes", "mutual_knn", "cknna"):
        assert np.shape(reference["similarity"][key]) == (2, 2)
    for s in open_set.SETTINGS:
        for f in open_set.FAMILIES:
            assert set(reference["verification"][s][f]["tar_at_far"]) == {"0.1", "0.01", "0.001", "0.0001"}
            assert set(reference["retrieval"][s][f]) >= {"recall_at_1", "recall_at_5", "map"}

    # Kill the study from outside when it reports batch 5 of the fit pass's 100 (its first checkpoint,
    # after batch 4, is written by then), i.e. in the middle of that pass, then run the same command
    # again. It resumes from the newest checkpoint the killed run left (read from the disk: the run goes on
    # for a moment after printing that line).
    runner.kill_at(_cmd(killed_dir), r"\[fit .*\] batch 5/100", cache)
    assert not runner.pass_finished(killed_dir, "fit"), "the kill landed after the fit pass ended"
    steps = runner.pass_checkpoints(killed_dir, "fit")
    assert steps, "no fit checkpoint after batch 5"
    resumed = runner.run(_cmd(killed_dir), cache)
    assert f"[resume] pass 'fit': {steps[0]}/100 batches already done" in resumed.stdout
    assert _results(killed_dir) == reference
