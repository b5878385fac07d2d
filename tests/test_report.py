"""The report writer: every file, the JSON round trip, refusal of non-finite numbers with nothing
complete-looking left behind, cell formatting, and the thesis' cells beside ours."""
import csv
import json
import os

import numpy as np
import pytest

from embjax import affine_report, report

MODELS = ["resnet152_v1", "inception_v3", "mobilenet_v2_140", "zoo_resnet_v1"]
THESIS = ["ResNet-v1-152", "Inception-v3", "MobileNet-v2-1.4-224", None]


def make_results(n=4, seed=0, thesis=False):
    rng = np.random.default_rng(seed)
    unmapped = rng.uniform(0.6, 0.9, n)

    def family(loss):
        acc = unmapped[:, None] * (1 - loss * rng.uniform(0, 1, (n, n)))
        np.fill_diagonal(acc, unmapped)
        return {"accuracy": acc, "top5": np.minimum(acc + 0.1, 1.0), "agreement": rng.uniform(0.5, 1, (n, n)),
                "r2": rng.uniform(0, 1, (n, n)), "relative_change": acc / np.diag(acc)[:, None] - 1}

    results = {
        "models": MODELS[:n], "feature_dims": [2048, 2048, 1792, 64][:n], "dataset": "imagenet2012",
        "eval_split": "validation", "num_eval": 50_000, "num_fit": 1_281_167,
        "unmapped": {"accuracy": unmapped, "top5": np.minimum(unmapped + 0.1, 1.0)},
        "affine": family(0.1), "logit": family(0.0), "naive": family(0.99),
        "fit_statistics": {"cka": rng.uniform(0, 1, (n, n))},
        "extra_key": {"kept": [1, 2, 3]},
        "config": {"name": "unit", "ridge": 0.0, "models": MODELS[:n], "data_dir": None},
        "meta": {"command": "python -m experiments.affine_equivalence --config=x", "date": "2026-01-01T00:00:00",
                 "seconds": {"total": 12.5}, "jax": "0.10.2", "devices": ["cpu:0", "cpu:1"]},
    }
    if thesis:
        results["reference"] = {"thesis_names": THESIS[:n]}
    return results


def as_lists(obj):
    if isinstance(obj, dict):
        return {k: as_lists(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_writes_every_file_and_the_json_round_trips(tmp_path):
    results = make_results()
    run_dir = tmp_path / "run"
    written = affine_report.write(run_dir, results)
    for key, path in written.items():
        assert os.path.isfile(path), key
        assert os.path.dirname(path) == str(run_dir)
    for name in ("table_5_1", "table_5_2_affine", "table_5_3_logit", "table_naive", "affine_r2",
                 "affine_agreement", "logit_agreement", "naive_r2"):
        assert (run_dir / f"{name}.md").is_file() and (run_dir / f"{name}.csv").is_file(), name
    assert set(os.listdir(tmp_path)) == {"run"}  # no .partial left beside it
    with open(run_dir / "results.json") as f:
        loaded = json.load(f)
    # The JSON is the results dict itself (NumPy converted), nothing lost, floats bit-exact (repr round trip).
    assert loaded == json.loads(json.dumps(as_lists(results)))
    for key in ("models", "config", "meta", "extra_key"):
        assert key in loaded
    assert loaded["affine"]["accuracy"][0][1] == float(results["affine"]["accuracy"][0, 1])
    png = (run_dir / "table_5_2_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (run_dir / "report.md").read_text()
    for needle in ("Table 5.1", "Table 5.2", "Table 5.3", "Naive", "R²", "agreement", "\"ridge\": 0.0",
                   results["meta"]["command"], "table_5_2_heatmap.png"):
        assert needle in md, needle


def test_table_cells_match_an_independent_formatting(tmp_path):
    results = make_results()
    affine_report.write(tmp_path / "run", results)
    rows = read_csv(tmp_path / "run" / "table_5_2_affine.csv")
    assert rows[0][1:] == MODELS
    acc = results["affine"]["accuracy"]
    for i in range(4):
        assert rows[i + 1][0] == MODELS[i]
        for j in range(4):
            a = 100 * acc[i, j]
            if i == j:
                assert rows[i + 1][j + 1] == f"{a:.2f}"
            else:
                change = 100 * (acc[i, j] / acc[i, i] - 1)
                # Signed, except a change that rounds to zero prints "0.0%" (no "−0.0%" / "+0.0%").
                sign = "" if f"{abs(change):.1f}" == "0.0" else ("\u2212" if change < 0 else "+")
                assert rows[i + 1][j + 1] == f"{a:.2f} ({sign}{abs(change):.1f}%)"
    t51 = read_csv(tmp_path / "run" / "table_5_1.csv")
    assert t51[0][:4] == ["model", "feature dims", "top-1 (%)", "top-5 (%)"]
    assert t51[3][:3] == ["mobilenet_v2_140", "1792", f"{100 * results['unmapped']['accuracy'][2]:.2f}"]


@pytest.mark.parametrize("relative,text", [(-0.0321, "\u22123.2%"), (0.004, "+0.4%"), (0.0004, "0.0%"),
                                           (-0.0004, "0.0%"), (0.0, "0.0%"), (-1.0, "\u2212100.0%"), (None, "n/a")])
def test_change_text(relative, text):
    assert affine_report.change_text(relative) == text


def test_cell_text_like_the_thesis():
    # Thesis Table 5.2, MobileNet-v2 features into the Inception-v1 classifier: 68.17 against 74.60 unmapped.
    assert affine_report.cell_text(0.6817, 0.6817 / 0.7460 - 1) == "68.17 (\u22128.6%)"


@pytest.mark.parametrize("where,value", [(("affine", "r2", 1, 2), float("nan")),
                                         (("logit", "accuracy", 3, 0), float("inf")),
                                         (("naive", "agreement", 0, 0), float("-inf"))])
def test_non_finite_numbers_are_refused_and_nothing_is_left(tmp_path, where, value):
    results = make_results()
    family, key, i, j = where
    results[family][key] = np.array(results[family][key])
    results[family][key][i, j] = value
    with pytest.raises(report.ReportError, match=rf"{family}\.{key}.*\[{i}\]\[{j}\]"):
        affine_report.write(tmp_path / "run", results)
    assert os.listdir(tmp_path) == []


def test_non_finite_outside_matrices_is_named(tmp_path):
    results = make_results()
    results["meta"]["seconds"]["total"] = float("nan")
    with pytest.raises(report.ReportError, match=r"meta\.seconds\.total"):
        affine_report.write(tmp_path / "run", results)
    assert os.listdir(tmp_path) == []


def test_a_crash_mid_write_leaves_no_directory(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(affine_report, "heatmap", boom)  # the affine tables' module draws it
    with pytest.raises(RuntimeError, match="disk full"):
        affine_report.write(tmp_path / "run", make_results())
    assert os.listdir(tmp_path) == []


def test_a_stale_partial_is_replaced_and_an_existing_run_is_not_overwritten(tmp_path):
    stale = tmp_path / "run.partial"
    stale.mkdir()
    (stale / "junk").write_text("x")
    affine_report.write(tmp_path / "run", make_results())
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert not (tmp_path / "run" / "junk").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        affine_report.write(tmp_path / "run", make_results())


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r["affine"].__setitem__("accuracy", 100 * r["affine"]["accuracy"]), "fractions"),
    (lambda r: r["affine"].__setitem__("relative_change", 100 * r["affine"]["relative_change"]),
     "affine.relative_change"),
    (lambda r: r["logit"].__setitem__("r2", r["logit"]["r2"][:3]), "4 x 4"),
    (lambda r: r.pop("naive"), "'naive'"),
    (lambda r: r.pop("config"), "'config'"),
    (lambda r: r.__setitem__("reference", {"thesis_names": ["ResNet-v1-999", None, None, None]}), "ResNet-v1-999"),
    (lambda r: r.__setitem__("feature_dims", [1, 2]), "feature_dims"),
])
def test_bad_results_are_refused_with_a_clear_message(tmp_path, mutate, needle):
    results = make_results()
    mutate(results)
    with pytest.raises(report.ReportError, match=needle):
        affine_report.write(tmp_path / "run", results)
    assert os.listdir(tmp_path) == []


def test_zero_accuracy_source_gets_no_relative_change(tmp_path):
    """evaluate.relative_change divides by the diagonal: a source at 0% gives NaN/inf there, stored as null."""
    results = make_results()
    acc = results["affine"]["accuracy"]
    acc[2, :] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        results["affine"]["relative_change"] = acc / np.diag(acc)[:, None] - 1  # row 2: NaN (0/0)
    affine_report.write(tmp_path / "run", results)
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["affine"]["relative_change"][2] == [None] * 4
    assert read_csv(tmp_path / "run" / "table_5_2_affine.csv")[3][1] == "0.00 (n/a)"
    # Anywhere else a NaN relative change is still refused.
    results["affine"]["relative_change"][1, 3] = np.nan
    with pytest.raises(report.ReportError, match=r"affine\.relative_change.*\[1\]\[3\]"):
        affine_report.write(tmp_path / "run2", results)


def test_undefined_relative_change_prints_na(tmp_path):
    results = make_results()
    acc = results["naive"]["accuracy"]
    acc[1, :] = 0.0  # a source with zero accuracy has no relative change
    rel = [[None if i == 1 else float(acc[i, j] / acc[i, i] - 1) for j in range(4)] for i in range(4)]
    results["naive"]["relative_change"] = rel
    affine_report.write(tmp_path / "run", results)
    rows = read_csv(tmp_path / "run" / "table_naive.csv")
    assert rows[2][1] == "0.00 (n/a)"


def test_thesis_tables_read_the_published_numbers():
    t2 = affine_report.thesis_table(2)
    assert len(t2["models"]) == 10 and t2["models"][2] == "MobileNet-v2-1.4-224"
    # Thesis Table 5.2: Inception-v1 features into the MobileNet-v2 classifier, 68.17%.
    assert t2["accuracy"][0][2] == pytest.approx(0.6817, abs=1e-12)
    t3 = affine_report.thesis_table(3)
    for k, row in enumerate(t3["accuracy"]):
        assert all(v == row[k] for v in row)  # logit maps: every cell is the unmapped source
        assert row[k] == t2["accuracy"][k][k]
    t1 = affine_report.thesis_table(1)
    assert t1["feature_dims"][t1["models"].index("NASNet-Large")] == 4032
    assert t1["local_top1"][0] == pytest.approx(0.711, abs=1e-12)
    with pytest.raises(ValueError, match="5.4"):
        affine_report.thesis_table(4)


def test_thesis_cells_beside_ours(tmp_path):
    results = make_results(thesis=True)
    affine_report.write(tmp_path / "run", results)
    rows = read_csv(tmp_path / "run" / "table_5_2_affine_vs_thesis.csv")
    # Only models the thesis has: the zoo model is left out.
    assert rows[0][1:] == MODELS[:3]
    # ResNet-v1-152 features into the Inception-v3 classifier: thesis 76.47 against 78.78 unmapped.
    thesis_change = 100 * (0.7647 / 0.7878 - 1)  # -2.93%
    ours = results["affine"]["accuracy"]
    ours_cell = f"{100 * ours[0, 1]:.2f} (\u2212{abs(100 * (ours[0, 1] / ours[0, 0] - 1)):.1f}%)"
    assert rows[1][2] == f"{ours_cell} vs 76.47 (\u2212{abs(thesis_change):.1f}%)"
    assert rows[1][1] == f"{100 * ours[0, 0]:.2f} vs 78.78"
    logit = read_csv(tmp_path / "run" / "table_5_3_logit_vs_thesis.csv")
    assert logit[2][1].endswith("vs 78.88 (0.0%)")
    t51 = read_csv(tmp_path / "run" / "table_5_1.csv")
    assert t51[1][-3:] == ["ResNet-v1-152", "2048", "78.78"]
    assert t51[4][-3:] == ["", "", ""]
    summary = affine_report.summary_text(results)
    # Mean thesis penalty over the 6 ordered pairs of its three models, recomputed here from the CSV cells.
    cells = {(0, 1): 76.47, (0, 2): 76.94, (1, 0): 77.9, (1, 2): 77.91, (2, 0): 71.57, (2, 1): 70.56}
    diag = {0: 78.78, 1: 78.88, 2: 74.60}
    mean = 100 * np.mean([v / diag[i] - 1 for (i, _), v in cells.items()])
    assert f"thesis \u2212{abs(mean):.1f}%" in summary


def test_summary_text_has_table_5_1_and_mean_penalties():
    results = make_results()
    text = affine_report.summary_text(results)
    for m in MODELS:
        assert m in text
    for family in ("affine", "logit", "naive"):
        acc = results[family]["accuracy"]
        off = [acc[i, j] / acc[i, i] - 1 for i in range(4) for j in range(4) if i != j]
        assert f"{family}" in text and affine_report.change_text(float(np.mean(off))) in text
    assert "over 12 pairs" in text


def test_new_run_dir_is_unique_and_checked(tmp_path):
    first = report.new_run_dir(tmp_path, name="zoo")
    assert os.path.basename(first).startswith("zoo-") and not os.path.exists(first)
    os.makedirs(first)
    second = report.new_run_dir(tmp_path, name="zoo")
    assert second != first and second.startswith(first)
    os.makedirs(second + ".partial")
    third = report.new_run_dir(tmp_path, name="zoo")
    assert third not in (first, second)
    assert os.path.basename(report.new_run_dir(tmp_path, name="")).startswith("run-")
    with pytest.raises(ValueError, match="path separators"):
        report.new_run_dir(tmp_path, name="a/b")
