"""The open_set study: class-disjoint subsets and pair sampling in process, the library pieces it stands on
against planted answers (exact verification read off sorted scores, the grid of cells, the statistics of
nested prefixes), and the whole study as a subprocess killed with SIGKILL mid-pass and resumed to
identical results.

The subprocess runs use random-weight zoo models (`smoke` preset): they check the study's bookkeeping
and resume, not accuracy. They share a persistent XLA compilation cache. The kill is sent when the run
prints batch 5 of the fit pass (tests/study_runner.py); the subprocess test runs in the whole tier only.
"""
import numpy as np
import pytest

import study_runner as runner
import tiny_models
from embjax import cells, data, verification
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


def test_sorted_metrics_equal_the_exact_curve_bit_for_bit():
    """TAR at FAR and EER read off the sorted scores by binary search are the exact ROC's values, exactly,
    on scores full of genuine/impostor ties; AUC is the Mann-Whitney count, the trapezoid's value up to
    float64 rounding of a sum of ~#ROC-points terms (1e-12 is far above that, far below one pair: 1/(ng·ni))."""
    rng = np.random.default_rng(11)
    fars = (0.5, 0.1, 0.01, 1e-3, 0.0, 1.0, -0.5, 2.0)
    for trial in range(200):
        ng, ni = int(rng.integers(1, 40)), int(rng.integers(1, 200))
        grid = (0.25, 0.05, 0.0)[trial % 3]
        gen, imp = rng.normal(rng.uniform(-1, 1), 0.3, ng), rng.normal(0, 0.3, ni)
        if grid:
            gen, imp = np.round(gen / grid) * grid, np.round(imp / grid) * grid
        gen, imp = gen.astype(np.float32), imp.astype(np.float32)
        want = verification.exact_metrics(gen, imp, fars)
        got = verification.sorted_metrics(np.sort(gen), np.sort(imp), fars)
        np.testing.assert_array_equal(got["tar_at_far"], want["tar_at_far"])
        assert got["eer"] == want["eer"], trial
        assert abs(got["roc_auc"] - want["roc_auc"]) < 1e-12


def test_label_pairs_symmetric_cell_counts_each_ordered_pair():
    """Queries equal to the gallery: each unordered pair is scored once and counted twice, the same rates
    as every ordered pair scored (integer features: the float32 dot products are exact, so equal)."""
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 4, 70)
    x = rng.integers(-3, 4, (70, 5)).astype(np.float32) + 4 * np.eye(4, 5, dtype=np.float32)[labels]
    got = verification.label_pairs(x, x.copy(), labels, fars=(0.1, 0.01), metric="dot")
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    off, same = ~np.eye(70, dtype=bool), labels[:, None] == labels[None, :]
    want = verification.exact_metrics(s[off & same], s[off & ~same], (0.1, 0.01))
    assert (got["genuine"], got["impostor"]) == (want["genuine"], want["impostor"])
    np.testing.assert_array_equal(got["tar_at_far"], want["tar_at_far"])
    assert got["eer"] == want["eer"] and abs(got["roc_auc"] - want["roc_auc"]) < 1e-12


def test_settings_grid_is_the_direct_cells():
    """Every entry of the grid against cells computed directly: native, mapped (diagonal native), naive
    (truncate / zero-pad) and both_mapped (the mean over hub models C ∉ {A, B}), with the verification of a
    (Y, X) cell taken from its (X, Y) twin (scores are cosines of float32 rows: the two orientations agree
    to ~1e-7, so only a pair that close to a threshold could differ; none does here)."""
    rng = np.random.default_rng(13)
    n, labels = 90, np.repeat(np.arange(3), 30)
    native = [(rng.standard_normal((3, d))[labels] + rng.standard_normal((n, d))).astype(np.float32) for d in (4, 6, 5)]
    maps_ = {(i, j): rng.standard_normal((native[i].shape[1], native[j].shape[1])).astype(np.float32)
             for i in range(3) for j in range(3) if i != j}
    mapped = lambda f, i, j: native[i] if i == j else native[i] @ maps_[(i, j)]  # noqa: E731
    index, pairs = np.arange(n), cells.kfold_pairs(labels, 8, 0)
    kw = dict(bins=1 << 12, ks=(1, 5), query_block=32, fars=(0.1, 0.01))
    grid = cells.settings_grid(native, mapped, labels, index, pairs, ("affine",), kw, workers=2)

    def check(setting, i, j, ver, ret):
        got = grid[f"{setting}|affine"]
        assert got["eer"][i, j] == pytest.approx(ver["eer"], abs=1e-12), (setting, i, j)
        assert got["kfold_accuracy"][i, j] == pytest.approx(ver["kfold_accuracy"], abs=1e-12), (setting, i, j)
        assert got["retrieval/map"][i, j] == pytest.approx(ret["map"], abs=1e-12), (setting, i, j)

    for i in range(3):
        for j in range(3):
            check("native", i, j, *cells.cell_metrics(native[j], native[j], labels, index, pairs, **kw))
            check("mapped", i, j, *cells.cell_metrics(mapped("affine", i, j), native[j], labels, index, pairs, **kw))
            q = np.zeros((n, native[j].shape[1]), np.float32)
            w = min(native[i].shape[1], native[j].shape[1])
            q[:, :w] = native[i][:, :w]
            check("naive", i, j, *cells.cell_metrics(q, native[j], labels, index, pairs, **kw))
            if i != j:
                c = 3 - i - j
                ver, ret = cells.cell_metrics(mapped("affine", i, c), mapped("affine", j, c), labels, index, pairs, **kw)
                check("both_mapped", i, j, ver, ret)


def test_prefix_statistics_match_float64_prefixes():
    """stats.prefix_accumulator folded batch by batch (rows in a shuffled order, padded, two partial states
    merged) gives, for every size n, the mean and covariance of the rows with index < n, as float64 NumPy
    does. Float32 sums of ~100 O(1) terms: 1e-5 relative to the features' scale."""
    import jax

    from embjax import stats

    rng = np.random.default_rng(14)
    dims, total, sizes = (3, 2), 100, (7, 30, 64)
    feats = [rng.standard_normal((total, d)) + 5.0 for d in dims]
    acc = stats.prefix_accumulator(dims, lambda out, batch, aux: out, sizes)
    update = jax.jit(acc.update)  # as the engine runs it (one compilation; eager lax.cond is slow)
    order = rng.permutation(total)
    parts = [acc.empty(), acc.empty()]
    for b, lo in enumerate(range(0, total, 16)):
        rows = order[lo:lo + 16]
        pad = 16 - rows.size
        index = np.r_[rows, np.full(pad, -1)]
        batch = {"index": index, "mask": np.r_[np.ones(rows.size, bool), np.zeros(pad, bool)]}
        out = [np.r_[f[rows], np.full((pad, f.shape[1]), np.nan)].astype(np.float32) for f in feats]
        parts[b % 2] = update(parts[b % 2], [np.nan_to_num(o) for o in out], batch, None)
    prefixes = acc.compute(acc.merge(*parts))
    x = np.concatenate(feats, axis=1)
    for n, st in zip(sizes, prefixes):
        assert int(st.count) == n
        np.testing.assert_allclose(np.asarray(st.mean), x[:n].mean(0), rtol=0, atol=1e-5 * 5)
        np.testing.assert_allclose(np.asarray(st.cross) / n, np.cov(x[:n].T, bias=True), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="ascending"):
        stats.prefix_accumulator(dims, None, (5, 5))


def test_smoke_run_in_process_against_numpy(tmp_path):
    """The study in this process on the smoke preset cut to 160 fitting images: the report's layout, and
    the native retrieval cells recomputed in float64 NumPy from the evaluation features the study stored."""
    from experiments.configs import open_set as configs

    config = configs.get_config("smoke")
    # Nothing resumes in this process: larger batches and no checkpoint inside a pass, and two random
    # stand-in backbones (tests/tiny_models.py) for the preset's zoo models (the kill test below, whole
    # tier, runs the preset as it is).
    config.update(dict(num_fit=160, batch_size=40, checkpoint_every=1000, models="tiny_a,tiny_b"))
    with tiny_models.registered(tiny_a=64, tiny_b=96):
        results, engine = open_set.run(config, str(tmp_path / "state"))
    assert results["models"] == ["tiny_a", "tiny_b"]
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
    # The hub families (smoke: rank 4, tests/test_open_set_hub.py plants their answers) in their own grid,
    # as rows of the summary beside the direct families.
    assert results["hub_maps"] == {"ranks": [4], "methods": ["gcca", "procrustes"]}
    for f in ("gcca_4", "procrustes_hub_4"):
        for s in ("mapped", "hub"):
            assert np.shape(results["retrieval"][s][f]["map"]) == (2, 2)
            assert set(results["verification"][s][f]["tar_at_far"]) == {"0.1", "0.01", "0.001", "0.0001"}
    table = open_set.summary(results)
    assert "| mapped | procrustes_hub_4 |" in table and "| hub | gcca_4 |" in table


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
