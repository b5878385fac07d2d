"""The backward-compatibility study's results and report: its results dict, its tables (the criterion,
top-1 / top-5 / mAP per class group, the published figures beside ours) and report.md, written through
`embjax.report.write_run`.

A method is (the new model it uses, the post-hoc map it applies or None); a setting is old/old, new/new
or new/old (query model / gallery model). `pair_of` turns them into the (query space, gallery space)
whose leave-one-out ranking gives the cell, so that every distinct pair is ranked once.
"""

from __future__ import annotations

from embjax import report

SETTINGS = ("old/old", "new/new", "new/old")
# method -> (the new model it uses, post-hoc map or None)
METHODS = {
    "independent": ("independent", None),
    "bct": ("bct", None),
    "bct, unnormalized columns": ("bct_unnormalized", None),
    "l2": ("l2", None),
    "affine new→old": ("independent", "affine_new_to_old"),
    "orthogonal new→old": ("independent", "orthogonal_new_to_old"),
    "affine old→new": ("independent", "affine_old_to_new"),
    "orthogonal old→new": ("independent", "orthogonal_old_to_new"),
    "learned old→new": ("independent", "learned_old_to_new"),
    "learned MLP old→new": ("independent", "learned_mlp_old_to_new"),
}
# The post-hoc maps by direction: new→old maps each query into the old space, old→new the gallery once.
NEW_TO_OLD = ("affine_new_to_old", "orthogonal_new_to_old")
OLD_TO_NEW = ("affine_old_to_new", "orthogonal_old_to_new")
LEARNED = {"learned": "learned old→new", "learned_mlp": "learned MLP old→new"}  # config.learned.families
METHOD_NOTES = {
    "independent": "new model trained alone; new/old feeds its embedding, cut/zero-padded, to the old gallery",
    "bct": "new model trained with the influence loss through the old classifier (Shen et al.); new classes' "
           "columns synthesized from mean old embeddings, normalized as config.bct.normalize says",
    "bct, unnormalized columns": "the same with the synthesized columns left unnormalized (the paper's rule "
                                 "taken literally)",
    "l2": "new model trained with ‖φ_new − φ_old‖² added (the paper's L2-regression baseline)",
    "affine new→old": "independent new model; queries mapped into the old space by least squares",
    "orthogonal new→old": "independent new model; queries mapped into the old space by a scaled partial isometry",
    "affine old→new": "independent new model; the old gallery mapped once into the new space by least squares",
    "orthogonal old→new": "independent new model; the old gallery mapped once by a scaled isometry",
    "learned old→new": "independent new model; the old gallery mapped by a linear map trained by gradient descent "
                       "from the affine old→new map (embjax.learned_maps, config.learned.loss) on the fit set",
    "learned MLP old→new": "the same with one hidden ReLU layer added (FCT's form of transformation), its second "
                           "layer starting at zero, so it starts as the affine old→new map",
}
METRICS = (("top1", "top-1"), ("top5", "top-5"), ("map", "mAP"))
# Published figures (leave-one-out retrieval, %) to place ours beside: {setting: top-1} or, where the
# source gives them, {setting: (top-1, top-5, mAP)}.
PUBLISHED = [
    ("Shen et al. 2020, ImageNet (ResNet-18 old on 50%, ResNet-50 new on 100%)", [
        ("independent", {"old/old": 39.5, "new/new": 66.3}),
        ("bct", {"old/old": 39.5, "new/new": 55.6, "new/old": 42.2}),
        ("l2", {"old/old": 39.5, "new/old": 13.0}),
    ]),
    ("BT² (Zhou et al.), CIFAR-100, BCT", [
        ("bct", {"old/old": 33.6, "new/old": 25.0}),
    ]),
    # Apple ml-fct's README (old model on 50 of CIFAR-100's classes); new/old: its learned old→new map (FCT).
    ("ml-fct (Ramanujan et al. 2022), CIFAR-100", [
        ("independent", {"old/old": (32.9, 59.3, 16.1), "new/new": (56.4, 77.5, 36.5)}),
        ("FCT old→new (learned, with side information)", {"old/old": (32.9, 59.3, 16.1), "new/old": (50.6, 74.2, 34.2)}),
    ]),
]


def methods(compare_unnormalized: bool, learned_families=()) -> dict:
    """A run's methods (of METHODS): the unnormalized BCT variant only if asked for, the learned maps of
    `learned_families` (keys of LEARNED)."""
    unknown = sorted(set(learned_families) - set(LEARNED))
    if unknown:
        raise ValueError(f"config.learned.families: unknown {unknown}; choose from {', '.join(LEARNED)}")
    drop = {LEARNED[f] for f in LEARNED if f not in learned_families}
    if not compare_unnormalized:
        drop.add("bct, unnormalized columns")
    return {m: v for m, v in METHODS.items() if m not in drop}


def space_entries(roles, old_to_new=OLD_TO_NEW) -> dict:
    """{(query space, gallery space): (query store entry, gallery store entry)} of every retrieval setting
    of the trained `roles` and the post-hoc maps (NEW_TO_OLD maps the independent model's queries,
    `old_to_new` the old gallery), as the eval pass stores them (embjax.bct.eval_embeddings)."""
    out = {("old", "old"): ("old/pre_logits", "old/pre_logits")}
    for role in [r for r in roles if r != "old"]:
        out[(role, role)] = (f"{role}/pre_logits", f"{role}/pre_logits")
        out[(role, "old")] = (f"{role}/as_old", "old/pre_logits")
    out.update({(k, "old"): (f"independent/{k}", "old/pre_logits") for k in NEW_TO_OLD})
    out.update({("independent", k): ("independent/pre_logits", f"old/{k}") for k in old_to_new})
    return out


def pair_of(methods: dict, method: str, setting: str) -> tuple[str, str]:
    """(query space, gallery space) of `method` in `setting`: spaces are trained roles ("old",
    "independent", "bct", ...) or post-hoc maps ("affine_new_to_old" maps the queries, "..._old_to_new"
    the gallery)."""
    trained, mapped = methods[method]
    if setting == "old/old":
        return ("old", "old")
    if setting == "new/new":
        return (trained, trained)
    if mapped is None:
        return (trained, "old")
    return (mapped, "old") if mapped.endswith("new_to_old") else ("independent", mapped)


def results(config: dict, methods: dict, cells: dict, groups: dict, *, old_classes, new_classes,
            num_train: dict, num_eval: int, map_r2: dict, seconds: dict, diagnostics: dict,
            map_r2_held_out: dict | None = None, learned: dict | None = None) -> dict:
    """The study's results dict from its ranked cells ({group: {"query | gallery": {top1, top5, map}}},
    embjax.bct.retrieval_cells). `map_r2`: each post-hoc map's R² on its fit set; `map_r2_held_out`: on
    the evaluation split; `learned`: the learned maps' training ({family: {"seconds", "loss"}}) and the
    closed-form maps' solve time ("closed_form_seconds")."""
    tables = {g: {m: {s: {k: float(v) for k, v in cells[g][" | ".join(pair_of(methods, m, s))].items()}
                      for s in SETTINGS} for m in methods} for g in groups}
    main = tables["all classes"]
    base = main["independent"]["new/new"]
    return {
        "methods": list(methods), "method_notes": {m: METHOD_NOTES[m] for m in methods},
        "retrieval": main,
        "retrieval_by_classes": {g: t for g, t in tables.items() if g != "all classes"},
        "class_groups": {k: list(v) for k, v in groups.items()},
        # The paper's criterion on top-1 (its metric), and the same on mAP.
        "compatible": {m: bool(main[m]["new/old"]["top1"] > main[m]["old/old"]["top1"]) for m in methods},
        "compatible_map": {m: bool(main[m]["new/old"]["map"] > main[m]["old/old"]["map"]) for m in methods},
        "cost_new_new": {m: {k: float(main[m]["new/new"][k] - base[k]) for k, _ in METRICS} for m in methods},
        "map_r2": map_r2,
        "map_r2_held_out": dict(map_r2_held_out or {}),
        "learned_maps": dict(learned or {}),
        "influence_classifier_on_old_embeddings": diagnostics,
        "models": {"old": config["old_model"], "new": config["new_model"]},
        "old_classes": list(old_classes), "new_classes": list(new_classes),
        "held_out_classes": [int(c) for c in config["held_out_classes"]],
        "num_train": num_train, "num_eval": num_eval,
        "published": [{"source": src, "rows": [{"method": m, **vals} for m, vals in rows]} for src, rows in PUBLISHED],
        "config": config,
        "meta": {"seconds": dict(seconds)},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main_table(r: dict) -> report.Table:
    t = r["retrieval"]
    rows = [[m, _pct(t[m]["old/old"]["top1"]), _pct(t[m]["new/new"]["top1"]), _pct(t[m]["new/old"]["top1"]),
             "yes" if r["compatible"][m] else "no", f"{100 * r['cost_new_new'][m]['top1']:+.1f}"] for m in r["methods"]]
    return report.Table(
        "Leave-one-out retrieval, top-1 (%), all evaluation classes",
        ["method", "old/old", "new/new", "new/old", "criterion met (new/old > old/old)", "cost to new/new"],
        rows, note="Criterion: M(new query, old gallery) > M(old, old), top-1. Cost: new/new minus the "
                   "independently trained new model's new/new (percentage points).")


def detail_table(r: dict, group: str) -> report.Table:
    t = r["retrieval"] if group == "all classes" else r["retrieval_by_classes"][group]
    header = ["method"] + [f"{s} {label}" for s in SETTINGS for _, label in METRICS]
    rows = [[m] + [_pct(t[m][s][k]) for s in SETTINGS for k, _ in METRICS] for m in r["methods"]]
    title = "all evaluation classes" if group == "all classes" else group
    return report.Table(f"Top-1, top-5 and mAP (%): {title}", header, rows,
                        note=f"classes {r['class_groups'][group]}; top-1 and top-5 are CMC, mAP is over the full "
                             "ranking (ml-fct's metrics)")


def published_table(r: dict) -> report.Table:
    def cell(v) -> str:
        return "–" if v is None else (" / ".join(f"{x:.1f}" for x in v) if isinstance(v, (list, tuple)) else f"{v:.1f}")

    rows = [[e["source"], row["method"]] + [cell(row.get(s)) for s in SETTINGS] for e in r["published"]
            for row in e["rows"]]
    return report.Table("Published figures (top-1 %, or top-1 / top-5 / mAP where given)",
                        ["source", "method", *SETTINGS], rows)


def _intro(r: dict) -> list[str]:
    cfg, meta = r["config"], r.get("meta", {})
    lines = [f"- old model {r['models']['old']} trained on {r['num_train']['old']} images (classes "
             f"{r['old_classes']}); new model {r['models']['new']} on {r['num_train']['new']} images (classes "
             f"{sorted(r['old_classes'] + r['new_classes'])}); held out of all training: {r['held_out_classes'] or 'none'}",
             f"- post-hoc maps fit without labels on {r['num_train']['map_fit']} new-training images; retrieval "
             f"leave-one-out over {r['num_eval']} images of {cfg.get('dataset')}:{cfg.get('eval_split')} "
             f"({cfg.get('retrieval_metric')} similarity)"]
    if "command" in meta:
        lines.append(f"- command: `{meta['command']}`")
    lines += [f"- {k}: {meta[k]}" for k in ("date", "jax") if k in meta]
    if meta.get("seconds"):
        lines.append("- seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items()
                                              if isinstance(v, (int, float))))
    return ["\n".join(lines)]


def _outro(r: dict) -> list[str]:
    out = ["## Methods\n\n" + "\n".join(f"- **{m}**: {r['method_notes'][m]}" for m in r["methods"])]
    diag = r.get("influence_classifier_on_old_embeddings", {})
    if diag:
        out.append("Influence classifier (old head on old classes + synthesized columns on new classes) scoring the "
                   "old model's own embeddings of the new training set, i.e. the target BCT pulls towards:\n\n" +
                   "\n".join(f"- {role}: " + "; ".join(f"{g}: accuracy {100 * v['accuracy']:.1f}%, cross-entropy "
                                                       f"{v['cross_entropy']:.2f}" for g, v in groups.items())
                             for role, groups in diag.items()))
    out.append("Map R² on the fit set: " + ", ".join(f"{k} {v:.3f}" for k, v in r["map_r2"].items()))
    if r.get("map_r2_held_out"):
        out.append("Map R² on the evaluation split (held out): " +
                   ", ".join(f"{k} {v:.3f}" for k, v in r["map_r2_held_out"].items()))
    learned = r.get("learned_maps") or {}
    if learned.get("families"):
        out.append(f"Learned maps ({learned.get('loss')} loss): " + "; ".join(
            f"{f} trained in {v['seconds']:.2f} s, loss {v['loss'][0]:.4g} → {v['loss'][-1]:.4g} over "
            f"{len(v['loss'])} epochs" for f, v in learned["families"].items()) +
            f"; the closed-form maps were solved in {learned['closed_form_seconds']:.3f} s from the statistics")
    return out


def write(run_dir: str, r: dict) -> dict:
    """The run directory: every table as .md / .csv, report.md and results.json (embjax.report.write_run)."""
    tables = {"compatibility": main_table(r), "retrieval_all": detail_table(r, "all classes")}
    for i, group in enumerate(r["retrieval_by_classes"]):
        tables[f"retrieval_group{i + 1}"] = detail_table(r, group)
    tables["published"] = published_table(r)
    return report.write_run(run_dir, r, tables=tables, intro=_intro(r), outro=_outro(r),
                            title=f"Backward-compatible training against post-hoc maps: {r['config'].get('name', '')}")


def summary(r: dict) -> str:
    return main_table(r).markdown()
