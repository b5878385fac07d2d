"""The open-set study's report (experiments/open_set.py): the summary table, per-pair matrices, the hub and
learned families' notes, and the run directory (embjax.report.write_run). Reads the study's results dict.
"""

from __future__ import annotations

import numpy as np

from embjax import report

FAMILIES = ("affine", "ridge", "procrustes", "reduced_rank")  # the direct families: embjax.pair_maps.FAMILIES
SETTINGS = ("native", "mapped", "both_mapped", "naive")  # embjax.cells.SETTINGS


def _mean_offdiag(m) -> float:
    m = np.asarray(m, float)
    return float(m[~np.eye(m.shape[0], dtype=bool)].mean()) if m.shape[0] > 1 else float(m[0, 0])


def extra_families(r) -> list[tuple[str, str]]:
    """(setting, family) of the families beyond the direct ones: hubs (mapped through the hub, and matched
    in it) and learned maps, in the order the summary lists them."""
    mapped = [f for f in r["verification"]["mapped"] if f not in FAMILIES]
    return [("mapped", f) for f in mapped] + [("hub", f) for f in r["verification"].get("hub", {})]


def summary_table(r):
    fars = list(r["verification"]["native"]["affine"]["tar_at_far"])
    header = ["setting", "map"] + [f"TAR@FAR={f}" for f in fars] + ["EER", "AUC", "10-fold acc", "R@1", "R@5", "mAP",
                                                                     "MAP@R"]
    rows = []
    direct = [(s, f) for s in SETTINGS for f in (FAMILIES if s in ("mapped", "both_mapped") else ("affine",))]
    for s, f in direct + extra_families(r):
        v, q = r["verification"][s][f], r["retrieval"][s][f]
        vals = [v["tar_at_far"][k] for k in fars] + [v["eer"], v["roc_auc"], v["kfold_accuracy"],
                                                     q["recall_at_1"], q["recall_at_5"], q["map"], q["map_at_r"]]
        rows.append([s, f if s not in ("native", "naive") else "—"] + [f"{_mean_offdiag(m):.4f}" for m in vals])
    note = ("Means over the ordered pairs A ≠ B (row = query model A, column = gallery model B). `native` is "
            "the gallery model's own embedding on both sides, `naive` is no map (truncate / zero-pad); neither "
            "depends on the map family.")
    if extra_families(r):
        note += (" Hub families (`gcca_k`, `procrustes_hub_k`: a k-dim canonical space from the fit statistics): "
                 "`mapped` is A → hub → B against B's native gallery, `hub` is A encoded into the hub against B "
                 "encoded into it. `learned`, `learned_mlp`: maps trained from the affine map on the fit features.")
    return report.Table("Open-set verification and retrieval, mean over model pairs", header, rows, note)


def extra_notes(r) -> list[str]:
    """What the hub solves and the learned maps cost (seconds), beside the closed-form affine solve."""
    lines, seconds = [], r.get("meta", {}).get("map_seconds", {})
    hubs = r.get("hub_maps")
    if hubs:
        lines.append(f"Hubs ({', '.join(hubs['methods'])}) at ranks {hubs['ranks']} from the fit statistics"
                     + ("; CPU seconds per method (all ranks): " + ", ".join(
                         f"{m} {s:.2f}" for m, s in seconds["hub_solve_cpu"].items()) if "hub_solve_cpu" in seconds
                        else "") + ".")
    learned = r.get("learned_maps")
    if learned:
        cfg = learned["config"]
        line = (f"Learned maps ({', '.join(cfg['families'])}): {cfg['loss']} loss, {cfg['epochs']} epochs on the "
                f"{r['num_fit']} fit features, every pair started at its affine map")
        if "learned_training" in seconds:
            line += "; training " + ", ".join(f"{f} {s:.1f} s" for f, s in seconds["learned_training"].items())
            if "closed_form_affine" in seconds:
                line += (f" against {seconds['closed_form_affine']:.2f} s for the closed-form affine maps (wall, "
                         "compilation included in each)")
        lines.append(line + ".")
    return lines


def write(run_dir: str, r: dict):
    names, meta = r["models"], r.get("meta", {})
    tables = {"summary": summary_table(r)}
    for f in list(r["verification"]["mapped"]):
        tables[f"mapped_{f}_tar_at_far_0.01"] = report.matrix_table(
            f"TAR@FAR=1e-2, queries mapped A→B ({f}), gallery native B", names,
            r["verification"]["mapped"][f]["tar_at_far"]["0.01"])
        tables[f"mapped_{f}_recall_at_1"] = report.matrix_table(
            f"Recall@1, queries mapped A→B ({f}), gallery native B", names, r["retrieval"]["mapped"][f]["recall_at_1"])
    for f in r["verification"].get("hub", {}):
        tables[f"hub_{f}_recall_at_1"] = report.matrix_table(
            f"Recall@1, queries A and gallery B both encoded into the hub ({f})", names,
            r["retrieval"]["hub"][f]["recall_at_1"])
    for k in ("cka", "cka_debiased", "cca", "pwcca", "procrustes", "mutual_knn", "cknna"):
        tables[f"similarity_{k}"] = report.matrix_table(f"similarity: {k}", names, r["similarity"][k])
    intro = [f"Maps fit on {r['num_fit']} images of classes {r['fit_classes']} ({r['dataset']} {r['fit_split']}); "
             f"every metric on {r['num_eval']} images of classes {r['eval_classes']} ({r['eval_split']}), all "
             f"pairs of distinct images (cosine similarity). Command: `{meta.get('command', '')}`"]
    seconds = ", ".join(f"{k} {v:.0f}" for k, v in meta.get("seconds", {}).items())
    inner = meta.get("metric_seconds")
    outro = ((["## Map warnings", "\n".join(f"- {w}" for w in r["map_warnings"])] if r.get("map_warnings") else [])
             + extra_notes(r)
             + [f"Seconds: {seconds}" + (f" (in the metric cells, summed over threads: ranking {inner['ranking']:.1f}, "
                                         f"verification {inner['verification']:.1f})" if inner else "") + ".\n"
                f"Evaluation features (native and mapped): `{meta.get('store', '')}`."])
    return report.write_run(run_dir, r, tables=tables, figures=report.open_set_figures(r), intro=intro, outro=outro,
                            title=f"Open-set verification and retrieval: {', '.join(names)}")


def summary(r: dict) -> str:
    return summary_table(r).markdown()
