"""The report of the own-features command (experiments/features.py): its run directory from tables, figures
and sections through `embjax.report.write_run`.

The tables are the affine study's where they are the same (Table 5.1, the Table 5.2-style family tables
and the model x model matrices of embjax.affine_report); the fit and held-out R², CKA, SVCCA, Procrustes
and debiased-CKA matrices are model x model tables of the same kind; the maps are written beside them as
`maps/<source>__to__<target>.npz` (affine) and `maps/logit/...` (logit), arrays W (d_source, d_target)
and b (d_target,): x_target ≈ x_source @ W + b.
"""
from __future__ import annotations

import json
import os

import numpy as np

from embjax import affine_report, report

FAMILIES = ("affine", "logit", "naive")


def square(models, matrix, title: str, percent: bool = False) -> report.Table:
    """A model x model table (row = source, column = target; None shown as n/a)."""
    key = "agreement" if percent else "r2"
    table = affine_report.matrix_table({"models": models, "m": {key: matrix}}, "m", key)
    table.title = title
    return table


def _heatmap(matrix, models, title):
    return lambda path: report.heatmap_matrix(matrix, models, title, path, fmt="{:.3f}", vmin=0.0, vmax=1.0)


def tables_and_figures(r: dict) -> tuple[dict, dict]:
    models, fit = r["models"], r["fit_statistics"]
    tables = {"models": report.Table(
        f"Models: {r['num_fit']:,} fit rows" + (f", {r['num_eval']:,} evaluation rows" if "num_eval" in r else ""),
        ["model", "fit features", "evaluation features", "dims"],
        [[m, r["files"][m], (r.get("eval_files") or {}).get(m, ""), str(d)] for m, d in zip(models, r["feature_dims"])])}
    tables["fit_r2"] = square(models, fit["r2"], "R² of the affine maps on the fit rows (from the statistics)")
    tables["fit_cka"] = square(models, fit["cka"], "Linear CKA on the fit rows")
    figures = {"fit_r2_heatmap.png": _heatmap(fit["r2"], models, "affine maps: R² on the fit rows"),
               "fit_cka_heatmap.png": _heatmap(fit["cka"], models, "linear CKA on the fit rows")}
    if "cca" in fit:
        dims = r["config"]["cca_dims"]
        kind = f"SVCCA, {dims} leading principal dims" if dims else "CCA, all dims"
        tables["fit_cca"] = square(models, fit["cca"], f"Mean canonical correlation on the fit rows ({kind})")
        tables["fit_procrustes"] = square(models, fit["procrustes"], "Angular Procrustes distance on the fit rows "
                                          "(radians, 0 = same shape, π/2 = unrelated)")
    if "feature_similarity" in r:
        fs = r["feature_similarity"]
        tables["cka_debiased"] = square(models, fs["cka_debiased"],
                                        f"Debiased linear CKA on the first {fs['rows']:,} rows of {fs['of']}")
    if "eval_statistics" in r:
        ev = r["eval_statistics"]
        tables["eval_r2"] = square(models, ev["r2"], "R² of the affine maps on the evaluation rows (held out)")
        tables["eval_cka"] = square(models, ev["cka"], "Linear CKA on the evaluation rows")
        figures["eval_r2_heatmap.png"] = _heatmap(ev["r2"], models, "affine maps: R² on the evaluation rows")
    if "unmapped" in r:
        tables["table_5_1"] = affine_report.table_5_1(r)
        tables["table_5_1"].title = f"Table 5.1: unmapped models ({r['num_eval']:,} evaluation rows)"
        for family, key in (("affine", "table_5_2_affine"), ("logit", "table_5_3_logit"), ("naive", "table_naive")):
            tables[key] = affine_report.family_table(r, family)
        figures["table_5_2_heatmap.png"] = lambda p: affine_report.heatmap(r, "affine", p)
    for family in FAMILIES:
        if family in r:
            tables[f"{family}_agreement"] = square(
                models, r[family]["agreement"], f"{family} maps: agreement with the target head's own prediction (%)",
                percent=True)
    return tables, figures


def _save_map(wb):
    def write(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        w, b = (np.asarray(v, np.float32) for v in wb)
        np.savez(path, W=w, b=b)
    return write


def write(run_dir: str, results: dict, saved: dict) -> dict[str, str]:
    """Tables, heatmaps, report.md, results.json and the map files `saved` ({relative path: (W, b)}),
    written atomically (report.write_run)."""
    r = affine_report.validate(results) if "unmapped" in results else report.plain(results)
    tables, figures = tables_and_figures(r)
    meta = r.get("meta", {})
    facts = [f"- {k}: `{meta[k]}`" if k == "command" else f"- {k}: {meta[k]}" for k in ("command", "date", "jax")
             if k in meta]
    if "seconds" in meta:
        facts.append("- seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["seconds"].items()))
    facts.append(f"- maps: `maps/<source>__to__<target>.npz` (affine"
                 f"{', and maps/logit/ for logit maps' if r['maps']['logit'] else ''}), arrays `W` (d_source, "
                 "d_target) and `b` (d_target,): x_target ≈ x_source @ W + b")
    facts += [f"- warning: {w}" for w in r.get("warnings", [])] + [f"- note: {n}" for n in r.get("notes", [])]
    flags = "## Flags\n\n```json\n" + json.dumps(r["config"], indent=2, sort_keys=True) + "\n```"
    figures |= {path: _save_map(wb) for path, wb in saved.items()}
    title = "Own features: maps, R², CKA" + (" and mapped accuracy" if "unmapped" in r else "")
    return report.write_run(run_dir, r, tables=tables, figures=figures, title=title, intro=["\n".join(facts)],
                            outro=[flags])


__all__ = ["FAMILIES", "square", "tables_and_figures", "write"]
