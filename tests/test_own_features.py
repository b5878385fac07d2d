"""Bring your own features: the docs' library example and command, on planted features, and bad input.

The planted features are built so the true answer is known: model a is random with large means, models
b and c are exact affine images of a (x_b = x_a W_ab + b_ab with an invertible, well-conditioned W_ab), so
every map between them is exactly affine; the heads are built so that head_b(x_b) = head_c(x_c) =
head_a(x_a) on every row, and the labels are head a's predictions with a quarter of them changed. Every
model's own accuracy is then the same known fraction, and so must be every mapped accuracy.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import study_runner as runner
from embjax import feature_files, feature_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "own_features.md")
DIM, CLASSES = 8, 4


def doc_block(lang: str) -> str:
    with open(DOC) as f:
        text = f.read()
    blocks = re.findall(rf"```{lang}\n(.*?)```", text, re.S)
    assert len(blocks) == 1, f"docs/own_features.md should hold exactly one ```{lang} block, found {len(blocks)}"
    return blocks[0]


@pytest.mark.slow  # the docs' example at its full 20,000 rows: the whole tier (README's copy is checked below)
def test_library_example_runs(capsys):
    exec(compile(doc_block("python"), DOC, "exec"), {"__name__": "own_features_doc"})
    out = capsys.readouterr().out
    r2 = float(re.search(r"R² a→b (\S+)", out).group(1))
    cka = float(re.search(r"CKA (\S+)", out).group(1))
    # b = tanh(a M / 8) is close to linear in a: the affine fit explains most of it but not all.
    assert 0.5 < r2 < 1.0 and 0.0 < cka <= 1.0


# --------------------------------------------------------------------------------------------------
# Planted features


def _invertible(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q * rng.uniform(0.5, 2.0, size=d)  # singular values in [0.5, 2]: condition number <= 4


class Planted:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.scale = rng.uniform(1.0, 3.0, size=DIM)
        self.mean = rng.uniform(5.0, 10.0, size=DIM)  # post-ReLU-like: means well above the spread
        self.w = {m: _invertible(rng, DIM) for m in "bc"}
        self.b = {m: rng.normal(size=DIM) for m in "bc"}
        k_a, c_a = rng.normal(size=(DIM, CLASSES)), rng.normal(size=CLASSES)
        self.heads = {"a": (k_a, c_a)}
        for m in "bc":
            inv = np.linalg.inv(self.w[m])
            self.heads[m] = (inv @ k_a, c_a - self.b[m] @ inv @ k_a)

    def rows(self, n):
        """(features {model: (n, DIM) float32}, labels, the number of rows head a gets right)."""
        out = []
        while sum(len(x) for x in out) < n:
            x = self.rng.normal(size=(4 * n, DIM)) * self.scale + self.mean
            z = x @ self.heads["a"][0] + self.heads["a"][1]
            top2 = np.sort(z, axis=1)[:, -2:]
            # Keep rows whose top-1 logit leads by > 0.05: float32 maps move logits by ~1e-4 at most
            # (logits of size ~30, relative error ~1e-6 from rounding), so no prediction can flip.
            out.append(x[top2[:, 1] - top2[:, 0] > 0.05])
        x_a = np.concatenate(out)[:n]
        feats = {"a": x_a, **{m: x_a @ self.w[m] + self.b[m] for m in "bc"}}
        pred = np.argmax(x_a @ self.heads["a"][0] + self.heads["a"][1], axis=1)
        labels = pred.copy()
        flip = self.rng.random(n) < 0.25
        labels[flip] = (pred[flip] + self.rng.integers(1, CLASSES, size=flip.sum())) % CLASSES
        return {m: f.astype(np.float32) for m, f in feats.items()}, labels.astype(np.int64), int(np.sum(~flip))


def write_store(directory, name, x, index):
    writer = feature_store.Writer(directory, {name: ("float32", (x.shape[1],))}, len(x), 0, resume=False)
    writer.write(0, {name: x}, index, np.zeros(len(x), np.int32))
    writer.close()
    feature_store.write_manifest(directory, {
        "num_rows": len(x), "process_count": 1, "rows_per_process": [len(x)],
        "entries": {name: {"dtype": "float32", "shape": [x.shape[1]], "file_stem": feature_store.file_stem(name)}}})


def lay_out(tmp, planted, n_fit=700, n_eval=300):
    """The files the docs' command names, under `tmp`; returns (fit features, eval labels, true accuracy)."""
    fit, fit_labels, _ = planted.rows(n_fit)
    ev, eval_labels, acc = planted.rows(n_eval)
    for d in ("fit/b_shards", "eval", "heads", "store"):
        os.makedirs(tmp / d, exist_ok=True)
    np.save(tmp / "fit/a.npy", fit["a"])
    for k, part in enumerate(np.array_split(fit["b"], 3)):  # 3 shards, read in file-name order
        np.save(tmp / f"fit/b_shards/part-{k:03d}.npy", part)
    np.save(tmp / "eval/a.npy", ev["a"])
    np.save(tmp / "eval/b.npy", ev["b"])
    write_store(str(tmp / "store/fit"), "c/pre_logits", fit["c"], 2 * np.arange(n_fit))
    write_store(str(tmp / "store/eval"), "c/pre_logits", ev["c"], 2 * np.arange(n_eval) + 1)
    np.save(tmp / "fit/labels.npy", fit_labels)
    np.save(tmp / "eval/labels.npy", eval_labels)
    for m, (k, c) in planted.heads.items():
        np.savez(tmp / f"heads/{m}.npz", W=k, b=c)
    return fit, eval_labels, acc


def doc_command():
    """The docs' bash command as an argv running this checkout's experiments.features."""
    argv = shlex.split(doc_block("bash").replace("\\\n", " "))
    assert argv[:2] == ["./launch.sh", "features"], argv[:2]
    argv = [sys.executable, "-m", "experiments.features", *argv[2:], "--batch_size=128", "--progress_seconds=0"]
    return argv


def run_cli(argv, cwd):
    return subprocess.run(argv, cwd=cwd, env=runner.env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def documented_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    planted = Planted()
    fit, eval_labels, acc = lay_out(tmp, planted)
    proc = run_cli(doc_command(), tmp)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    runs = [d for d in os.listdir(tmp / "results/features") if (tmp / "results/features" / d / "results.json").exists()]
    assert len(runs) == 1, runs
    run_dir = tmp / "results/features" / runs[0]
    with open(run_dir / "results.json") as f:
        return json.load(f), run_dir, planted, acc, proc


def test_command_recovers_planted_maps(documented_run):
    results, run_dir, planted, _, proc = documented_run
    assert results["models"] == ["a", "b", "c"] and results["num_fit"] == 700 and results["num_eval"] == 300
    # progress lines of the engine: 700 fit rows in batches of 128, 300 evaluation rows
    assert "[fit --features rows] batch 6/6" in proc.stdout and "[eval evaluation rows] batch 3/3" in proc.stdout
    assert results["meta"]["command"].startswith("python -m experiments.features --features=")
    assert results["config"]["heads"] and results["config"]["ridge"] == 0.0
    w_true = {("a", m): (planted.w[m], planted.b[m]) for m in "bc"}
    inv_b = np.linalg.inv(planted.w["b"])
    w_true[("b", "a")] = (inv_b, -planted.b["b"] @ inv_b)
    w_true[("b", "c")] = (inv_b @ planted.w["c"], planted.b["c"] - planted.b["b"] @ inv_b @ planted.w["c"])
    for (src, dst), (w, b) in w_true.items():
        with np.load(run_dir / f"maps/{src}__to__{dst}.npz") as f:
            assert f["W"].shape == (DIM, DIM) and f["b"].shape == (DIM,)
            # Float32 statistics of well-conditioned blocks (condition <= 4 per map, <= 9 for the feature
            # scales, after centring away the means of 5-10): the solve loses at most a few digits of
            # float32's 7, so 1e-3 absolute on entries of size ~1 (b: ~10) is far from both sides.
            np.testing.assert_allclose(f["W"], w, atol=1e-3)
            np.testing.assert_allclose(f["b"], b, atol=1e-2)
    assert len(os.listdir(run_dir / "maps")) == 6 + 1  # 6 affine maps and the logit/ folder
    assert len(os.listdir(run_dir / "maps/logit")) == 6
    for key in ("fit_statistics", "eval_statistics"):
        r2 = np.array(results[key]["r2"])
        # Exact maps: R² is 1 up to the ~1e-6 the statistics-based residual resolves (stats.r2).
        assert np.all(r2 > 1 - 1e-4), r2
        assert np.all(np.array(results[key]["cka"]) > 0.0)
    # An invertible affine map keeps every canonical correlation at 1 (SVCCA's 32 dims cover all 8 here);
    # float32 whitening of condition <= ~100 covariances leaves ~1e-5, 1e-3 is far from the <= 0.9 of
    # any pair that is not affinely related.
    np.testing.assert_allclose(results["fit_statistics"]["cca"], np.ones((3, 3)), atol=1e-3)
    procrustes = np.array(results["fit_statistics"]["procrustes"])
    assert np.all(np.diag(procrustes) == 0) and np.all((procrustes >= 0) & (procrustes <= np.pi / 2))
    fs = results["feature_similarity"]
    assert fs["rows"] == 300 and fs["of"] == "--eval_features"
    np.testing.assert_allclose(np.diag(fs["cka_debiased"]), 1.0, atol=1e-5)


def test_command_mapped_accuracy_equals_source(documented_run):
    results, run_dir, _, correct, _ = documented_run
    n = results["num_eval"]

    def counts(fractions):  # accuracies are float32 count / n: back to exact counts
        return np.rint(np.asarray(fractions) * n).astype(int)

    # Every head gives head a's logits on its own model's rows: all models are right on the same rows.
    np.testing.assert_array_equal(counts(results["unmapped"]["accuracy"]), [correct] * 3)
    for family in ("affine", "logit"):
        # Exact maps keep every prediction (the margin of every row is > 0.05, see Planted.rows).
        np.testing.assert_array_equal(counts(results[family]["accuracy"]), np.full((3, 3), correct))
        np.testing.assert_array_equal(np.array(results[family]["agreement"]), np.ones((3, 3)))
    for name in ("report.md", "table_5_2_affine.md", "fit_r2.csv", "fit_cka.csv", "eval_r2.csv", "fit_cca.csv",
                 "fit_procrustes.csv", "cka_debiased.csv",
                 "fit_r2_heatmap.png", "table_5_2_heatmap.png"):
        assert (run_dir / name).exists(), name
    assert "Table 5.2" in (run_dir / "report.md").read_text()


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file, nothing written


def _run(config):
    from experiments import features

    return features.run(config, log=lambda s: None)


@pytest.fixture()
def two(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", x @ rng.normal(size=(4, 3)).astype(np.float32))
    return tmp_path


def test_mismatched_rows(two):
    np.save(two / "short.npy", np.zeros((49, 3), np.float32))
    with pytest.raises(feature_files.FeatureFileError, match=r"different numbers of rows.*x\.npy: 50 rows.*short\.npy: 49"):
        _run({"features": [f"x={two}/x.npy,y={two}/short.npy"]})


@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, "an infinity")])
def test_non_finite_row_named(two, value, what):
    y = np.load(two / "y.npy")
    y[37, 2] = value
    for k, part in enumerate(np.array_split(y, 2)):  # row 37 is row 12 of the second shard (25 + 12)
        os.makedirs(two / "y_shards", exist_ok=True)
        np.save(two / f"y_shards/{k}.npy", part)
    with pytest.raises(feature_files.FeatureFileError,
                       match=rf"y_shards/1\.npy: row 12 \(row 37 of model 'y'\) holds {what} in column 2"):
        _run({"features": [f"x={two}/x.npy,y={two}/y_shards"], "batch_size": 16})


def test_shapes_dtypes_missing(two):
    np.save(two / "cube.npy", np.zeros((50, 2, 2), np.float32))
    np.save(two / "text.npy", np.array([["a"] * 3] * 50))
    np.save(two / "obj.npy", np.array([[object()] * 3] * 50, dtype=object))
    cases = {"cube.npy": r"cube\.npy: expected a 2-D \(rows, features\) array, got shape \(50, 2, 2\)",
             "text.npy": r"text\.npy: dtype <U1 is not a real number type",
             "obj.npy": r"obj\.npy: cannot be read as a memory-mapped \.npy array",
             "nowhere.npy": r"nowhere\.npy: no such file"}
    for name, pattern in cases.items():
        with pytest.raises(feature_files.FeatureFileError, match=pattern):
            _run({"features": [f"x={two}/x.npy,y={two}/{name}"]})
    with pytest.raises(feature_files.FeatureFileError, match=r"heads/x\.npz \(head of 'x'\): no such file"):
        _run({"features": [f"x={two}/x.npy,y={two}/y.npy"], "heads": [f"x={two}/heads/x.npz,y={two}/heads/y.npz"]})


def test_store_entry_and_order_checked(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    write_store(str(tmp_path / "s1"), "m/pre_logits", x, np.arange(10))
    write_store(str(tmp_path / "s2"), "m/pre_logits", x[:, :3], np.arange(10) + 1)  # other samples
    with pytest.raises(feature_files.FeatureFileError, match=r"s1: the feature store has no entry 'nope'"):
        feature_files.open_source("a", f"{tmp_path}/s1:nope")
    src = feature_files.open_source("a", f"{tmp_path}/s1")  # one entry: ENTRY may be left out
    np.testing.assert_array_equal(src.read(0, 10), x)
    with pytest.raises(feature_files.FeatureFileError, match=r"hold different samples: their row 0 is dataset index 0 vs 1"):
        feature_files.open_sources([("a", f"{tmp_path}/s1:m/pre_logits"), ("b", f"{tmp_path}/s2")])


@pytest.mark.slow  # a subprocess of the command; test_non_finite_row_named checks the message in-process
def test_cli_error_leaves_nothing(two):
    y = np.load(two / "y.npy")
    y[45] = np.nan  # in the last batch: the fit stream has already run most of the file
    np.save(two / "y_bad.npy", y)
    proc = run_cli([sys.executable, "-m", "experiments.features", "--features=x=x.npy,y=y_bad.npy",
                    "--batch_size=16", "--workdir=out"], two)
    assert proc.returncode == 1, proc.stderr
    assert "embjax: error: FeatureFileError: y_bad.npy: row 45 (row 45 of model 'y') holds NaN" in proc.stderr
    assert not os.path.exists(two / "out") or not any(
        os.path.exists(os.path.join(two / "out", d, "results.json")) for d in os.listdir(two / "out"))


def test_heads_must_name_the_models(tmp_path):
    """Checked with the files, before anything is streamed."""
    lay_out(tmp_path, Planted(seed=2), n_fit=30, n_eval=20)
    fit = [f"a={tmp_path}/fit/a.npy,b={tmp_path}/fit/b_shards"]
    with pytest.raises(ValueError, match=r"--heads must name the same models as --features \(a, b\): missing b"):
        _run({"features": fit, "heads": [f"a={tmp_path}/heads/a.npz"]})


@pytest.mark.slow  # two runs in-process (two compilations of each pass): the whole tier
def test_without_heads_and_without_labels(tmp_path):
    """Held-out R² and CKA need no heads; heads without labels give agreement, not accuracy."""
    planted = Planted(seed=2)
    lay_out(tmp_path, planted, n_fit=300, n_eval=200)
    fit = [f"a={tmp_path}/fit/a.npy,b={tmp_path}/fit/b_shards"]
    ev = [f"a={tmp_path}/eval/a.npy,b={tmp_path}/eval/b.npy"]
    results, saved = _run({"features": fit, "eval_features": ev, "batch_size": 64})
    assert sorted(saved) == ["maps/a__to__b.npz", "maps/b__to__a.npz"]
    assert "affine" not in results and "unmapped" not in results and results["num_eval"] == 200
    assert np.all(np.array(results["eval_statistics"]["r2"]) > 1 - 1e-4)
    results, saved = _run({"features": fit, "heads": [f"a={tmp_path}/heads/a.npz,b={tmp_path}/heads/b.npz"],
                           "batch_size": 64})
    assert "unmapped" not in results and "accuracy" not in results["affine"] and results["num_eval"] == 300
    np.testing.assert_array_equal(results["affine"]["agreement"], np.ones((2, 2)))
    assert any("agreement" in note for note in results["notes"])


@pytest.mark.slow  # a benchmark script in a subprocess: the whole tier
def test_benchmark_runs_at_a_toy_size(tmp_path):
    """benchmarks/own_features.py end to end (both contestants, a growth point each), in seconds."""
    pytest.importorskip("sklearn")
    proc = subprocess.run(
        [sys.executable, "benchmarks/own_features.py", "--models", "3", "--dim", "16", "--n", "3000",
         "--batch", "512", "--sklearn-pairs", "2", "--growth", "embjax:16:6000,sklearn:16:6000",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env=runner.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diff = re.search(r"max relative difference of predictions on 3000 rows \(2 pairs;[^|]*\| (\S+) \|", proc.stdout)
    # Both solve the same least-squares problem; float32 features of 16 well-conditioned dims: the two
    # solutions' predictions agree to ~1e-6, 1e-4 still tells a wrong map (an O(1) difference) apart.
    assert diff and float(diff.group(1)) < 1e-4, proc.stdout[-2000:]
    assert "peak RSS: embjax, 3 x 16 dims x 6,000 rows" in proc.stdout
    assert "peak RSS: scikit-learn, 3 x 16 dims x 6,000 rows" in proc.stdout
    assert not os.path.exists(tmp_path / "data")  # generated features removed without --keep-data


def test_readme_shows_the_tested_example_and_command():
    """README's "Use embjax on your own features" section carries the same code the tests above run."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Use embjax on your own features"):]
    section = section[:section.index("\n## ", 3)]
    for lang in ("python", "bash"):
        assert f"```{lang}\n{doc_block(lang)}```" in section, lang


@pytest.mark.slow  # three runs of the command in subprocesses: the whole tier
def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    """The command streams through the engine: killed with SIGKILL mid-fit (after batch 7 of 44, the
    checkpoint of batch 5 holds), the same command resumes and ends with the uninterrupted run's numbers."""
    import signal

    planted = Planted()
    lay_out(tmp_path, planted)
    argv = doc_command() + ["--batch_size=16", "--checkpoint_every=5"]
    whole = run_cli(argv + ["--workdir=whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    victim = subprocess.Popen(argv + ["--workdir=killed"], cwd=tmp_path, env=runner.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    for line in victim.stdout:
        if re.search(r"\[fit .*\] batch 7/44", line):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=600)
    assert victim.returncode == -signal.SIGKILL
    resumed = run_cli(argv + ["--workdir=killed"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] pass 'fit': 5/44 batches already done" in resumed.stdout

    def numbers(workdir):
        (run,) = [d for d in os.listdir(tmp_path / workdir) if (tmp_path / workdir / d / "results.json").exists()]
        with open(tmp_path / workdir / run / "results.json") as f:
            r = json.load(f)
        return {k: v for k, v in r.items() if k not in ("meta",)}

    assert numbers("killed") == numbers("whole")
