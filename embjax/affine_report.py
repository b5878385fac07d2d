"""The affine-equivalence report: the thesis' tables for our models, on top of embjax.report's run directory.

`write(run_dir, results)` lays out, in one directory per run, Table 5.1 (unmapped accuracy and feature
dimensions), Table 5.2 (affine maps), Table 5.3 (logit maps) and the naive truncate/pad baseline, each
with rows = feature extractor (source) and columns = classifier (target), cells "71.06 (−3.2%)" (top-1
and its change against the unmapped source, the diagonal); R², agreement and top-5 matrices; a heatmap
of Table 5.2; `report.md`; and `results.json`, which is the `results` dict itself (every number,
accuracies as fractions, matrices as lists of rows, the config). When
`results["reference"]["thesis_names"]` names the thesis model behind each of ours, the thesis' own
Table 5.2/5.3 cells are printed beside ours (read from embjax/reference/). Used by the affine study;
embjax/features_report.py builds the same tables for a user's own features.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from embjax.report import ReportError, Table, _plain, pct, write_run

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
FAMILIES = ("affine", "logit", "naive")
FAMILY_TITLES = {
    "affine": "Table 5.2: affine maps (least squares on the fit split)",
    "logit": "Table 5.3: logit maps, M = C_A C_B⁺ (classifier weights only)",
    "naive": "Naive maps: features truncated or zero-padded into the target classifier (thesis §5.6)",
}
MATRIX_KEYS = ("accuracy", "top5", "agreement", "r2", "relative_change")
MINUS = "\u2212"  # the thesis prints a true minus sign


def thesis_table(n: int) -> dict:
    """The thesis' Table 5.n (n = 1, 2, 3) as fractions.

    n = 1: {"models", "reported_top1", "reported_crop", "local_top1", "local_crop", "feature_dims",
    "params_millions"}, one list entry per model. n = 2, 3: {"models", "accuracy"}, accuracy a list of
    rows (row = feature extractor, column = classifier) whose diagonal is the unmapped model.
    """
    if n not in (1, 2, 3):
        raise ValueError(f"the thesis has reference tables 5.1, 5.2 and 5.3; got table 5.{n}")
    path = REFERENCE_DIR / f"thesis_table_5_{n}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"reference table {path} is missing; reinstall embjax (it ships as package data)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], [r for r in rows[1:] if r]
    if n == 1:
        out: dict = {"models": [r[0] for r in body]}
        for k, name in enumerate(header[1:], start=1):
            values = [float(r[k]) for r in body]
            if name.endswith("top1"):
                values = [v / 100 for v in values]
            elif name in ("reported_crop", "local_crop", "feature_dims"):
                values = [int(v) for v in values]
            out[name] = values
        return out
    models = header[1:]
    if [r[0] for r in body] != models:
        raise ValueError(f"{path}: row names {[r[0] for r in body]} differ from column names {models}")
    return {"models": models, "accuracy": [[float(v) / 100 for v in r[1:]] for r in body]}


def _check_matrix(m, name: str, models: list[str], *, fraction: bool, allow_none: bool) -> None:
    n = len(models)
    if not isinstance(m, list) or len(m) != n or any(not isinstance(r, list) or len(r) != n for r in m):
        shape = (len(m), [len(r) if isinstance(r, list) else "?" for r in m]) if isinstance(m, list) else type(m)
        raise ReportError(f"matrix '{name}' must be {n} x {n} (row = source, column = target), got {shape}")
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            where = f"matrix '{name}', cell [{i}][{j}] (source '{models[i]}', target '{models[j]}')"
            if v is None and allow_none:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ReportError(f"{where} is {v!r}, not a number")
            if not math.isfinite(v):
                raise ReportError(f"{where} is {v}; refusing to report a non-finite number")
            if fraction and not 0.0 <= v <= 1.0:
                raise ReportError(f"{where} is {v}; accuracies are fractions in [0, 1], not percent")


def _check_vector(v, name: str, n: int, *, fraction: bool) -> None:
    if not isinstance(v, list) or len(v) != n:
        raise ReportError(f"'{name}' must be a list of {n} numbers (one per model), got {v!r}")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ReportError(f"'{name}'[{i}] is {x!r}, not a finite number")
        if fraction and not 0.0 <= x <= 1.0:
            raise ReportError(f"'{name}'[{i}] is {x}; accuracies are fractions in [0, 1], not percent")


def _families(results: dict) -> list[str]:
    """The three thesis families, then any other map family the run added (e.g. native_affine)."""
    extra = [k for k, v in results.items()
             if k not in FAMILIES and k != "unmapped" and isinstance(v, dict) and "accuracy" in v]
    return [*FAMILIES, *extra]


def _agreement_only(results: dict) -> list[str]:
    """Map families scored for agreement only (e.g. native_affine: ImageNet heads on another label set)."""
    return [k for k, v in results.items() if isinstance(v, dict) and "agreement" in v and "accuracy" not in v
            and k not in FAMILIES]


def _relative_from_accuracy(acc: list[list[float]]) -> list[list[float | None]]:
    return [[(acc[i][j] / acc[i][i] - 1.0) if acc[i][i] > 0 else None for j in range(len(acc))]
            for i in range(len(acc))]


def _undefined_changes_to_none(results: Mapping) -> dict:
    """A source with zero unmapped accuracy has no relative change (x / 0 - 1, NaN or inf as computed by
    evaluate.relative_change): those rows become None, the one non-finite value a report accepts."""
    out = dict(results)
    for key, block in results.items():
        if not (isinstance(block, Mapping) and "accuracy" in block and "relative_change" in block):
            continue
        try:
            acc = np.asarray(block["accuracy"], dtype=float)
            rows = [list(r) for r in block["relative_change"]]
        except (TypeError, ValueError):
            continue  # malformed: validate() names the problem
        if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or len(rows) != acc.shape[0]:
            continue
        zero = [i for i in range(acc.shape[0]) if acc[i, i] == 0]
        if zero:
            for i in zero:
                rows[i] = [None] * len(rows[i])
            out[key] = {**block, "relative_change": rows}
    return out


def validate(results: Mapping) -> dict:
    """Checks `results` and returns its JSON-ready copy; raises ReportError naming the first problem."""
    if not isinstance(results, Mapping):
        raise ReportError(f"results must be a dict, got {type(results).__name__}")
    out = _plain(_undefined_changes_to_none(results), "")
    for key in ("models", "feature_dims", "unmapped", *FAMILIES, "config"):
        if key not in out:
            raise ReportError(f"results has no '{key}'; see embjax.report.write for the expected keys")
    models = out["models"]
    if not models or not all(isinstance(m, str) for m in models) or len(set(models)) != len(models):
        raise ReportError(f"results['models'] must be a non-empty list of distinct names, got {models!r}")
    n = len(models)
    dims = out["feature_dims"]
    if not isinstance(dims, list) or len(dims) != n or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ReportError(f"results['feature_dims'] must be {n} positive ints, got {dims!r}")
    if not isinstance(out["config"], dict):
        raise ReportError("results['config'] must be a dict (the run's full config)")
    _check_vector(out["unmapped"].get("accuracy"), "unmapped.accuracy", n, fraction=True)
    if "top5" in out["unmapped"]:
        _check_vector(out["unmapped"]["top5"], "unmapped.top5", n, fraction=True)
    for family in _families(out):
        block = out[family]
        if not isinstance(block, dict) or "accuracy" not in block:
            raise ReportError(f"results['{family}'] must be a dict with at least 'accuracy'")
        for key in MATRIX_KEYS:
            if key in block:
                _check_matrix(block[key], f"{family}.{key}", models, fraction=key in ("accuracy", "top5"),
                              allow_none=key != "accuracy")
        expected = _relative_from_accuracy(block["accuracy"])
        if "relative_change" not in block:
            block["relative_change"] = expected
        else:
            for i in range(n):
                for j in range(n):
                    got, want = block["relative_change"][i][j], expected[i][j]
                    # Both are float32-derived ratios of order 1: 1e-6 is ~10 float32 ulps, far below the
                    # 0.05% the tables print, and far above a percent-vs-fraction mix-up (a factor 100).
                    if (got is None) != (want is None) or (got is not None and abs(got - want) > 1e-6):
                        raise ReportError(
                            f"matrix '{family}.relative_change', cell [{i}][{j}] (source '{models[i]}', target "
                            f"'{models[j]}') is {got}, but accuracy / diagonal - 1 = {want}; relative changes "
                            "are fractions against the row's diagonal (None where that is 0)")
    for family in _agreement_only(out):
        for key in ("agreement", "r2"):
            if key in out[family]:
                _check_matrix(out[family][key], f"{family}.{key}", models, fraction=key == "agreement",
                              allow_none=key == "r2")
    thesis_names = (out.get("reference") or {}).get("thesis_names")
    if thesis_names is not None:
        known = thesis_table(2)["models"]
        if not isinstance(thesis_names, list) or len(thesis_names) != n:
            raise ReportError(f"reference.thesis_names must list {n} entries (a thesis name or None per model)")
        for model, name in zip(models, thesis_names):
            if name is not None and name not in known:
                raise ReportError(f"reference.thesis_names gives '{name}' for '{model}'; the thesis models are "
                                  f"{', '.join(known)}")
    return out


# ---------------------------------------------------------------------------------------------------


def change_text(relative: float | None) -> str:
    """A relative change (fraction) as the thesis prints it: "−3.2%", "+0.4%", "0.0%", or "n/a"."""
    if relative is None:
        return "n/a"
    text = f"{abs(100 * relative):.1f}"
    if text == "0.0":
        return "0.0%"
    return f"{MINUS if relative < 0 else '+'}{text}%"


def cell_text(accuracy: float, relative: float | None) -> str:
    """One off-diagonal cell: "71.06 (−3.2%)"."""
    return f"{pct(accuracy)} ({change_text(relative)})"


def _thesis_by_model(results: dict) -> dict[int, str]:
    names = (results.get("reference") or {}).get("thesis_names") or []
    return {i: name for i, name in enumerate(names) if name is not None}


def table_5_1(results: dict) -> Table:
    models, n = results["models"], len(results["models"])
    unmapped = results["unmapped"]
    header = ["model", "feature dims", "top-1 (%)"]
    has_top5 = "top5" in unmapped
    if has_top5:
        header.append("top-5 (%)")
    params = results.get("params")
    if params is not None:
        header.append("params (M)")
    thesis = _thesis_by_model(results)
    if thesis:
        header += ["thesis model", "thesis feature dims", "thesis top-1 (%)"] + (
            ["thesis params (M)"] if params is not None else [])
        t1, t2 = thesis_table(1), thesis_table(2)
    rows = []
    for i in range(n):
        row = [models[i], str(results["feature_dims"][i]), pct(unmapped["accuracy"][i])]
        if has_top5:
            row.append(pct(unmapped["top5"][i]))
        if params is not None:
            row.append(f"{params[i] / 1e6:.1f}")
        if thesis:
            if i in thesis:
                k1, k2 = t1["models"].index(thesis[i]), t2["models"].index(thesis[i])
                # The thesis' Table 5.2 diagonal is its own measurement at its evaluation crop: the number
                # our unmapped accuracy should reproduce.
                row += [thesis[i], str(t1["feature_dims"][k1]), pct(t2["accuracy"][k2][k2])] + (
                    [f"{t1['params_millions'][k1]:g}"] if params is not None else [])
            else:
                row += ["", "", ""] + ([""] if params is not None else [])
        rows.append(row)
    where = f"{results.get('dataset', '?')} {results.get('eval_split', '?')}, {results.get('num_eval', '?')} images"
    return Table(f"Table 5.1: unmapped models ({where})", header, rows)


def family_table(results: dict, family: str) -> Table:
    models = results["models"]
    block = results[family]
    acc, rel = block["accuracy"], block["relative_change"]
    rows = []
    for i, model in enumerate(models):
        rows.append([model] + [pct(acc[i][j]) if i == j else cell_text(acc[i][j], rel[i][j])
                               for j in range(len(models))])
    title = FAMILY_TITLES.get(family, f"Map family '{family}'")
    note = ("Top-1 (%) of the target's classifier on the source's mapped features; in brackets the change "
            "against the source model unmapped (the diagonal).")
    return Table(title, ["feature extractor \\ classifier", *models], rows, note)


def thesis_side_by_side(results: dict, family: str) -> Table | None:
    """Our cell beside the thesis' (Table 5.2 for affine, 5.3 for logit), for models the thesis has."""
    number = {"affine": 2, "logit": 3}.get(family)
    thesis = _thesis_by_model(results)
    if number is None or len(thesis) < 2:
        return None
    ref = thesis_table(number)
    idx = sorted(thesis)
    k = {i: ref["models"].index(thesis[i]) for i in idx}
    acc, rel = results[family]["accuracy"], results[family]["relative_change"]
    rows = []
    for i in idx:
        row = [f"{results['models'][i]} ({thesis[i]})"]
        for j in idx:
            t = ref["accuracy"][k[i]][k[j]]
            t_diag = ref["accuracy"][k[i]][k[i]]
            if i == j:
                row.append(f"{pct(acc[i][i])} vs {pct(t)}")
            else:
                row.append(f"{cell_text(acc[i][j], rel[i][j])} vs {cell_text(t, t / t_diag - 1)}")
        rows.append(row)
    header = ["feature extractor \\ classifier", *(results["models"][j] for j in idx)]
    return Table(f"Ours vs thesis Table 5.{number} ({family} maps): ours first, the thesis' published cell second",
                 header, rows)


def matrix_table(results: dict, family: str, key: str) -> Table:
    models = results["models"]
    m = results[family][key]
    fmt = (lambda v: "n/a" if v is None else f"{v:.4f}") if key == "r2" else \
        (lambda v: "n/a" if v is None else pct(v))
    unit = "" if key == "r2" else " (%)"
    label = {"r2": "R² of the mapped features", "agreement": "agreement with the target's own prediction",
             "top5": "top-5 accuracy", "cka": "linear CKA"}.get(key, key)
    return Table(f"{family} maps: {label}{unit}", ["source \\ target", *models],
                 [[models[i], *(fmt(v) for v in row)] for i, row in enumerate(m)])


def mean_penalty(results: dict, family: str, pairs: list[tuple[int, int]] | None = None) -> dict:
    """Mean, worst and best relative change over the ordered pairs (i != j) where it is defined."""
    rel = results[family]["relative_change"]
    n = len(results["models"])
    pairs = pairs if pairs is not None else [(i, j) for i in range(n) for j in range(n) if i != j]
    values = [(rel[i][j], i, j) for i, j in pairs if rel[i][j] is not None]
    if not values:
        return {"mean": None, "worst": None, "best": None, "pairs": 0}
    return {"mean": sum(v for v, _, _ in values) / len(values), "worst": min(values), "best": max(values),
            "pairs": len(values)}


def thesis_mean_penalty(results: dict, family: str) -> dict | None:
    number = {"affine": 2, "logit": 3}.get(family)
    thesis = _thesis_by_model(results)
    if number is None or len(thesis) < 2:
        return None
    ref = thesis_table(number)
    k = [ref["models"].index(thesis[i]) for i in sorted(thesis)]
    values = [ref["accuracy"][a][b] / ref["accuracy"][a][a] - 1 for a in k for b in k if a != b]
    return {"mean": sum(values) / len(values), "pairs": len(values)}


def _our_thesis_pairs(results: dict) -> list[tuple[int, int]]:
    idx = sorted(_thesis_by_model(results))
    return [(i, j) for i in idx for j in idx if i != j]


# ---------------------------------------------------------------------------------------------------
# Console summary


def summary_text(results: Mapping) -> str:
    """Table 5.1 and the mean change per map family, for the console at the end of a run."""
    r = validate(results)
    t = table_5_1(r)
    lines = [t.title]
    widths = [max(len(h), *(len(row[k]) for row in t.rows)) for k, h in enumerate(t.header)]
    for row in [t.header, *t.rows]:
        lines.append("  " + "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in
                                      enumerate(zip(row, widths))))
    lines.append(f"mean change of top-1 against the unmapped source (maps fit on {r.get('num_fit', '?')} "
                 "images):")
    models = r["models"]
    for family in _families(r):
        p = mean_penalty(r, family)
        if p["mean"] is None:
            lines.append(f"  {family:<14} n/a (no source with a non-zero unmapped accuracy)")
            continue
        w, b = p["worst"], p["best"]
        line = (f"  {family:<14} {change_text(p['mean']):>8} over {p['pairs']} pairs (worst "
                f"{change_text(w[0])}: {models[w[1]]} → {models[w[2]]}; best {change_text(b[0])}: "
                f"{models[b[1]]} → {models[b[2]]})")
        thesis = thesis_mean_penalty(r, family)
        if thesis is not None:
            ours = mean_penalty(r, family, _our_thesis_pairs(r))
            line += (f"; on the {thesis['pairs']} thesis pairs ours {change_text(ours['mean'])} vs thesis "
                     f"{change_text(thesis['mean'])}")
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Heatmap


def heatmap(results: dict, family: str, path: str | os.PathLike) -> None:
    """Relative change (%) of `family`'s top-1, source rows / target columns, every cell annotated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot global state
    from matplotlib.figure import Figure

    models = results["models"]
    n = len(models)
    rel = results[family]["relative_change"]
    values = np.array([[np.nan if (i == j or rel[i][j] is None) else 100 * rel[i][j] for j in range(n)]
                       for i in range(n)])
    off = values[~np.isnan(values)]
    limit = max(float(np.abs(off).max()) if off.size else 1.0, 0.1)
    fig = Figure(figsize=(2.2 + 0.95 * n, 1.6 + 0.8 * n), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # A diverging map centred on zero: losses red, gains blue; the diagonal (unmapped) is left grey.
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_facecolor("0.85")
    for i in range(n):
        for j in range(n):
            if i == j:
                text = f"unmapped\n{pct(results[family]['accuracy'][i][i], 1)}%"
            else:
                text = change_text(rel[i][j])
            strong = not np.isnan(values[i, j]) and abs(values[i, j]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if strong else "black")
    ax.set_xticks(range(n), models, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(n), models, fontsize=8)
    ax.set_xlabel("classifier (target)")
    ax.set_ylabel("feature extractor (source)")
    ax.set_title(f"{family} maps: change of top-1 against the unmapped source (%)", fontsize=9)
    fig.colorbar(image, ax=ax, label="relative change (%)")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------------
# The run directory


def learned_table(r: dict) -> Table | None:
    """Learned map families (results["learned_maps"]) against the closed-form affine maps: mean and worst
    change of top-1 over the ordered pairs, mean feature R² on the evaluation split, and fitting time."""
    learned = r.get("learned_maps")
    if not isinstance(learned, dict) or not learned.get("families"):
        return None
    n = len(r["models"])

    def row(family: str, seconds: float) -> list[str]:
        p = mean_penalty(r, family)
        r2 = [r[family]["r2"][i][j] for i in range(n) for j in range(n) if i != j and r[family]["r2"][i][j] is not None]
        return [family, change_text(p["mean"]), change_text(p["worst"][0] if p["worst"] else None),
                f"{sum(r2) / len(r2):.3f}" if r2 else "n/a", f"{seconds:.2f}"]

    rows = [row("affine", float(learned["closed_form_seconds"]))]
    rows += [row(f, float(info["seconds"])) for f, info in learned["families"].items() if f in r]
    cfg = learned.get("config", {})
    return Table("Learned maps against the closed form (evaluation split; maps fit on the fit split)",
                 ["family", "mean change of top-1", "worst change", "mean R²", "fit seconds"], rows,
                 note=f"Learned maps start at the affine map and train {cfg.get('epochs', '?')} epochs by the "
                      f"{cfg.get('loss', '?')} loss (embjax.learned_maps); fit seconds: the closed form solves "
                      "every pair from the statistics, the learned families train every pair.")


def _intro(r: dict) -> list[str]:
    """report.md's opening: data, command, devices and seconds of the run, then the console summary."""
    meta = r.get("meta", {})
    lines = [f"- dataset: {r.get('dataset', '?')}; maps fit on {r.get('num_fit', '?')} images"
             f"{' (' + r['fit_split'] + ')' if 'fit_split' in r else ''}; evaluated on {r.get('num_eval', '?')} "
             f"images ({r.get('eval_split', '?')})"]
    if "command" in meta:
        lines.append(f"- command: `{meta['command']}`")
    lines += [f"- {key}: {meta[key]}" for key in ("date", "jax") if key in meta]
    devices = meta.get("devices")
    if devices is not None:
        lines.append(f"- devices: {len(devices)} ({devices[0] if devices else ''}{', ...' if len(devices) > 1 else ''})"
                     if isinstance(devices, list) else f"- devices: {devices}")
    if "seconds" in meta:
        lines.append("- seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["seconds"].items()
                                              if isinstance(v, (int, float))))
    return ["\n".join(lines), "## Summary\n\n```\n" + summary_text(r) + "\n```"]


def write(run_dir: str | os.PathLike, results: Mapping) -> dict[str, str]:
    """Writes the run's report into run_dir (which must not exist); returns {what: path} of every file.

    `results` (accuracies as fractions, matrices as lists of rows, row = source, column = target):
    {"models", "feature_dims", "dataset", "eval_split", "num_eval", "num_fit",
     "unmapped": {"accuracy", "top5"}, "affine"|"logit"|"naive": {"accuracy", "top5", "agreement", "r2",
     "relative_change"}, "reference": {"thesis_names"} (optional), "config", "meta"}; other keys are kept.
    Non-finite numbers are refused (ReportError naming the matrix and cell) before anything is written,
    except the relative changes of a source whose unmapped accuracy is 0: undefined, they are stored as null.
    """
    r = validate(results)
    tables: dict[str, Table] = {"table_5_1": table_5_1(r)}
    for family in _families(r):
        key = {"affine": "table_5_2_affine", "logit": "table_5_3_logit", "naive": "table_naive"}.get(
            family, f"table_{family}")
        tables[key] = family_table(r, family)
        side = thesis_side_by_side(r, family)
        if side is not None:
            tables[f"{key}_vs_thesis"] = side
    for family in _families(r) + _agreement_only(r):
        for key in ("agreement", "r2", "top5"):
            if key in r[family]:
                tables[f"{family}_{key}"] = matrix_table(r, family, key)
    learned = learned_table(r)
    if learned is not None:
        tables["learned_vs_closed_form"] = learned
    check = r.get("bfloat16_vs_float32")
    if isinstance(check, dict):
        tables["bfloat16_vs_float32"] = Table(
            f"bfloat16 against float32 on {check['images']} evaluation images",
            ["model", "top-1 agreement of its own head (%)", "feature error ‖f_bf16 − f_32‖ / ‖f_32‖"],
            [[m, pct(a), f"{e:.2e}"] for m, a, e in zip(r["models"], check["top1_agreement"],
                                                         check["feature_rel_error"])])
    fit_stats = r.get("fit_statistics")
    if isinstance(fit_stats, dict):
        for key, m in fit_stats.items():
            try:
                _check_matrix(m, f"fit_statistics.{key}", r["models"], fraction=False, allow_none=True)
            except ReportError:
                continue  # not a model x model matrix: it stays in results.json only
            tables[f"fit_statistics_{key}"] = matrix_table({"models": r["models"], "fit": {key: m}}, "fit", key)
            tables[f"fit_statistics_{key}"].title = f"fit split statistics: {key}"

    figures = {"table_5_2_heatmap.png": lambda path: heatmap(r, "affine", path)}
    title = f"Affine equivalence: {r.get('config', {}).get('name') or r.get('dataset', '')}"
    config = "## Config\n\n```json\n" + json.dumps(r["config"], indent=2, sort_keys=True) + "\n```"
    return write_run(run_dir, r, tables=tables, figures=figures, title=title, intro=_intro(r), outro=[config])
