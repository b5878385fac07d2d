"""The backward-compatibility study: its protocol pieces on planted answers (training sets, class groups,
which ranking feeds which table cell, the criterion), one tiny in-process run whose retrieval cells are
checked against a float64 NumPy ranking of the embeddings it stored, and (whole tier) a run killed with
SIGKILL mid-training that resumes to the same results.json numbers as an uninterrupted run. The learned
old→new maps: against float64 least squares on a planted nonlinear map, and end to end in the tiny run."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import study_runner as runner
import tiny_models
from embjax import bct, bct_report
from experiments import backward_compatible as study
from experiments.configs import backward_compatible as configs

TINY = dict(train_split="train[:640]", eval_split="test[:200]", batch_size=64, checkpoint_every=4)


def tiny_config(checkpoint_every: int = 4):
    """The tiny run; the in-process one checkpoints only at the end of each training and pass (nothing
    resumes in it: the kill test, with checkpoints every 4 steps, runs the preset's zoo models from the
    command line) and trains stand-in backbones (tests/tiny_models.py) instead of zoo models."""
    c = configs.get_config("fashion_mnist")
    c.update(dict(TINY, checkpoint_every=checkpoint_every))
    for t in (c.old_train, c.new_train):
        t.update(dict(epochs=1, batch_size=64, warmup_steps=2, checkpoint_every=checkpoint_every, log_seconds=0.0))
    c.maps.fit_samples = 400
    return c


def _overrides():
    args = [f"--config.{k}={v}" for k, v in TINY.items()]
    for t in ("old_train", "new_train"):
        args += [f"--config.{t}.epochs=1", f"--config.{t}.batch_size=64", f"--config.{t}.warmup_steps=2",
                 f"--config.{t}.checkpoint_every=4", f"--config.{t}.log_seconds=0"]
    return args + ["--config.maps.fit_samples=400"]


def test_training_rows_and_class_groups():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    new, old = bct.training_rows(labels, held_out=(8, 9), old_classes=(0, 1, 2, 3, 4))
    assert list(new) == [i for i in range(30) if i % 10 < 8] and list(old) == [i for i in range(30) if i % 10 < 5]
    new, old = bct.training_rows(labels, old_data="fraction", old_fraction=0.5, seed=3)
    assert list(new) == list(range(30)) and len(old) == 15 and len(set(old)) == 15
    with pytest.raises(ValueError, match="overlap"):
        bct.training_rows(labels, held_out=(4,), old_classes=(0, 4))
    groups = bct.class_groups(labels, [0, 1, 2, 3, 4], [5, 6, 7], (8, 9))
    assert groups == {"all classes": list(range(10)), "old classes (seen by both)": [0, 1, 2, 3, 4],
                      "new classes (seen by the new model only)": [5, 6, 7],
                      "held-out classes (unseen by both)": [8, 9]}


def test_cells_reach_the_right_table_entries_and_the_criterion():
    # Planted spaces, one answer each: "old" overlapping clusters (imperfect, ranked again by the float64
    # reference), tight clusters 4 apart for the bct-vs-old cell and the independent model's own cell
    # (every query's nearest neighbours are its class: top-1 = top-5 = mAP = 1), noise for the l2
    # queries (chance, about 1/4), and the old space for every post-hoc map's cell.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = 4 * np.eye(8)[:4]
    old = (centres[labels] + 2.5 * rng.standard_normal((120, 8))).astype(np.float32)
    exact = centres[labels].astype(np.float32) + 1e-3 * rng.standard_normal((120, 8)).astype(np.float32)
    noise = rng.standard_normal((120, 8)).astype(np.float32)
    spaces = {("old", "old"): (old, old), ("bct", "old"): (exact, exact), ("l2", "old"): (noise, old),
              ("independent", "independent"): (exact, exact)}
    for key in [("bct", "bct"), ("l2", "l2"), ("independent", "old")]:
        spaces[key] = (noise, noise)
    old_to_new = bct_report.OLD_TO_NEW + tuple(f"{f}_old_to_new" for f in bct_report.LEARNED)
    for key in [(k, "old") for k in bct_report.NEW_TO_OLD] + [("independent", k) for k in old_to_new]:
        spaces[key] = (old, old)
    assert set(spaces) == set(bct_report.space_entries(["old", "independent", "bct", "l2"], old_to_new))
    groups = {"all classes": [0, 1, 2, 3], "old classes (seen by both)": [0, 1]}
    cells = bct.retrieval_cells(spaces, labels, groups, log=lambda line: None)
    want = runner.leave_one_out_retrieval(old, old, labels)
    assert cells["all classes"]["old | old"] == pytest.approx(want, abs=1e-9)
    methods = bct_report.methods(False, tuple(bct_report.LEARNED))
    assert list(methods) == [m for m in bct_report.METHODS if m != "bct, unnormalized columns"]
    assert "learned old→new" not in bct_report.methods(True, ("learned_mlp",))
    r = bct_report.results(dict(old_model="a", new_model="b", held_out_classes=()), methods, cells, groups,
                           old_classes=[0, 1], new_classes=[2, 3], num_train={}, num_eval=120, map_r2={},
                           seconds={}, diagnostics={})
    t = r["retrieval"]
    assert t["bct"]["new/old"] == {"top1": 1.0, "top5": 1.0, "map": 1.0}
    assert t["independent"]["new/new"] == {"top1": 1.0, "top5": 1.0, "map": 1.0}
    assert t["l2"]["new/old"]["top1"] < want["top1"] - 0.2  # chance: about 1/4
    for m in methods:
        assert t[m]["old/old"] == pytest.approx(want, abs=1e-9)
    assert t["affine new→old"]["new/old"] == t["affine old→new"]["new/old"] == pytest.approx(want, abs=1e-9)
    assert t["learned MLP old→new"]["new/old"] == pytest.approx(want, abs=1e-9)
    assert r["compatible"]["bct"] and not r["compatible"]["l2"] and not r["compatible"]["affine old→new"]
    assert r["cost_new_new"]["bct"]["top1"] < -0.2 and r["cost_new_new"]["affine new→old"]["top1"] == 0.0
    assert set(r["retrieval_by_classes"]) == {"old classes (seen by both)"}


def test_learned_maps_against_the_closed_form_on_a_planted_map():
    # Planted: y = x A + 2 relu(x B) C + noise, 2,000 fit rows and 1,000 held out. The closed form is float64
    # NumPy least squares (the independent reference). A linear map trained on the squared error from it
    # starts at its objective's optimum: it starts at exactly the closed form's fit loss, and its held-out
    # R² stays within Adam's jitter of the closed form's; the MLP (FCT's form), started at the same map,
    # must capture the planted ReLU part that no affine map can, and beat it on held-out rows.
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 6)).astype(np.float32)
    a, b, c = rng.standard_normal((6, 5)), rng.standard_normal((6, 4)), rng.standard_normal((4, 5))
    y = (x @ a + 2 * np.maximum(x @ b, 0) @ c + 0.1 * rng.standard_normal((3000, 5))).astype(np.float32)
    fit, held = slice(0, 2000), slice(2000, None)
    coef = np.linalg.lstsq(np.c_[x[fit], np.ones(2000)].astype(np.float64), y[fit].astype(np.float64), rcond=None)[0]
    affine = (coef[:-1].astype(np.float32), coef[-1].astype(np.float32))
    closed = r2_score(y[held], x[held] @ coef[:-1] + coef[-1], multioutput="variance_weighted")
    assert bct.r2_score(bct.apply_map(affine, x[held]), y[held]) == pytest.approx(closed, abs=1e-5)
    mse = np.mean(np.sum((x[fit] @ coef[:-1] + coef[-1] - y[fit]) ** 2, axis=1))
    r2 = {}
    for family in ("learned", "learned_mlp"):
        params, info = bct.learned_map(x[fit], y[fit], None, affine, family, hidden=64, epochs=20, batch_size=100,
                                       learning_rate=3e-3)
        assert info["fit_loss_before"] == pytest.approx(mse, rel=1e-5) and len(info["loss"]) == 20
        r2[family] = bct.r2_score(bct.apply_map(params, x[held]), y[held])
    assert abs(r2["learned"] - closed) < 0.01, (r2, closed)
    assert r2["learned_mlp"] > closed + 0.05, (r2, closed)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bct_study")
    config = tiny_config(checkpoint_every=1000)
    config.update(dict(old_model="tiny_old", new_model="tiny_new"))
    with tiny_models.registered(tiny_old=64, tiny_new=96):
        results, engine = study.run(config, str(work / "state"))
    run_dir = str(work / "report")
    study.write_report(run_dir, results)
    engine.finish()  # keeps the feature stores
    stored = engine.store("eval")
    embeddings = {m.name: np.asarray(stored.array(f"{m.name}/pre_logits")) for m in engine.members}
    for k in ("affine", "learned", "learned_mlp"):
        embeddings[k] = np.asarray(stored.array(f"old/{k}_old_to_new"))
    fit = engine.store("fit_maps")
    embeddings.update({f"fit {m}": np.asarray(fit.array(f"{m}/pre_logits")) for m in ("old", "independent")})
    return results, run_dir, embeddings, np.asarray(stored.labels)


def test_tiny_run_report_and_retrieval_against_numpy(tiny_run):
    results, run_dir, embeddings, labels = tiny_run
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved["methods"] == list(study.methods_for(tiny_config()))
    assert "bct" in saved["methods"] and "bct, unnormalized columns" not in saved["methods"]
    # The old model saw classes 0-4 of the first 640 training images, the new model all of them.
    from embjax import data

    train_labels = data.labels_of(data.get_source("fashion_mnist", "train[:640]"))
    assert saved["num_train"] == {"old": int(np.sum(train_labels < 5)), "new": 640, "map_fit": 400}
    assert saved["old_classes"] == [0, 1, 2, 3, 4] and saved["new_classes"] == [5, 6, 7, 8, 9]
    # Every cell whose queries and gallery are stored embeddings as they are (old/old, each trained new
    # model against itself and, cut to the old width, against the old model) ranked again in float64
    # NumPy: 200 queries, so top-1 / top-5 are counts / 200. The study ranks float32 cosines, ~1e-7 from
    # these: only candidates that close can swap, which these 200 do not have at the top-1 / top-5
    # boundaries. A swap deeper down moves one query's AP by ~1/(rank x relevant) ~ 1e-3 and mAP by ~1e-5;
    # 1e-4 allows a few, while a cell from the wrong embeddings is off by percents.
    old = embeddings["old"]
    r = saved["retrieval"]
    for m in ("independent", "bct", "l2"):
        new = embeddings[m]
        pairs = {"old/old": (old, old), "new/new": (new, new), "new/old": (new[:, :old.shape[1]], old)}
        for setting, (query, gallery) in pairs.items():
            want, got = runner.leave_one_out_retrieval(query, gallery, labels), r[m][setting]
            assert abs(got["top1"] - want["top1"]) < 0.5 / len(labels), (m, setting, got, want)
            assert abs(got["top5"] - want["top5"]) < 0.5 / len(labels), (m, setting, got, want)
            assert abs(got["map"] - want["map"]) < 1e-4, (m, setting, got, want)
    # Planted knowledge: an independently trained model's features fed to another model's gallery
    # without a map are near chance (10 classes: ~10-20%); least-squares maps fit on 400 images recover
    # much of the old model's retrieval.
    assert r["affine new→old"]["new/old"]["top1"] > r["independent"]["new/old"]["top1"] + 0.15
    assert r["affine old→new"]["new/old"]["top1"] > r["independent"]["new/old"]["top1"] + 0.15
    assert len(saved["retrieval_by_classes"]) == 2
    # The old→new maps end to end against float64 NumPy: the affine map solved again by least squares on
    # the fit set's stored embeddings (400 x 64 -> 96, well conditioned: the study's float32 Cholesky
    # solve agrees to ~1e-5 relative), and the learned maps' cells ranked again from their stored gallery.
    x_fit, y_fit = embeddings["fit old"], embeddings["fit independent"]
    design = np.c_[x_fit, np.ones(len(x_fit))].astype(np.float64)
    coef = np.linalg.lstsq(design, y_fit.astype(np.float64), rcond=None)[0]
    mapped = old.astype(np.float64) @ coef[:-1] + coef[-1]
    assert np.abs(embeddings["affine"] - mapped).max() < 1e-3 * np.abs(mapped).max()
    new = embeddings["independent"]
    for m, k in (("affine old→new", "affine"), ("learned old→new", "learned"),
                 ("learned MLP old→new", "learned_mlp")):
        want, got = runner.leave_one_out_retrieval(new, embeddings[k], labels), r[m]["new/old"]
        assert abs(got["top1"] - want["top1"]) < 0.5 / len(labels), (m, got, want)
        assert abs(got["map"] - want["map"]) < 1e-4, (m, got, want)
        assert saved["map_r2_held_out"][f"{k}_old_to_new"] == pytest.approx(
            1 - np.sum((new - embeddings[k]) ** 2) / np.sum((new - new.mean(0)) ** 2), abs=1e-6)
    learned = saved["learned_maps"]
    assert set(learned["families"]) == {"learned", "learned_mlp"} and learned["loss"] == "regression"
    assert all(len(v["loss"]) == 3 and v["seconds"] > 0 for v in learned["families"].values())
    text = Path(run_dir, "report.md").read_text()
    assert "criterion met" in text and "Published figures" in text and "ml-fct" in text
    assert Path(run_dir, "compatibility.csv").exists()


@pytest.mark.slow
def test_study_killed_mid_training_resumes_to_same_numbers(tmp_path):
    def cmd(workdir):
        return runner.study("backward_compatible", workdir, *_overrides())

    def results_of(workdir):
        runs = runner.finished(workdir)
        assert len(runs) == 1, runs
        with open(runs[0] / "results.json") as f:
            r = json.load(f)
        return r["retrieval"], r["retrieval_by_classes"], r["compatible"]

    runner.run(cmd(tmp_path / "ref"))
    # Kill in the BCT training when it reports step 5, after its first checkpoint (step 4); it resumes
    # from the newest checkpoint the killed run left (read from the disk: it runs on for a moment).
    runner.kill_at(cmd(tmp_path / "run"), r"^\[train bct .* step 5/")
    (train_dir,) = (tmp_path / "run" / "state" / "train").glob("bct-*")
    steps = runner.checkpoints(train_dir)
    assert steps, "no checkpoint of the BCT training after step 5"
    resumed = runner.run(cmd(tmp_path / "run"))
    assert f"[train bct (zoo_resnet_v2)] resuming from step {steps[0]}/" in resumed.stdout, resumed.stdout
    assert "reusing the finished run" in resumed.stdout  # the old and independent models are not retrained
    assert results_of(tmp_path / "run") == results_of(tmp_path / "ref")
    assert np.isfinite(results_of(tmp_path / "ref")[0]["bct"]["new/old"]["top1"])
