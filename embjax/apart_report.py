"""Models trained apart (thesis §6.1): the affine study's ordered pairs grouped by what differs.

A zoo variant (`<zoo model>_<variant>`, embjax.zoo.VARIANTS) differs from its zoo model in its loss
(softmax or cosine margin) or its training rows (all, half A, half B). For every ordered pair of a run's
models this module says whether source and target share the architecture, the loss and the data
("same"; "disjoint": halves A and B; "overlapping": a half and the standard rows, which share about half
of their images), and tabulates the affine maps' change of top-1 against the unmapped source (Table 5.2's
brackets) and the mapped features' R², per group. `write(run_dir, results)` adds `trained_apart.md` and
`.csv` to a finished affine report when the run has a variant; `summary_text` prints the same lines.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

from embjax.models.specs import ZOO_VARIANTS
from embjax.report import Table


def describe(name: str) -> tuple[str, str, str]:
    """(architecture, loss, rows) of a model name: a zoo variant's base model and how it trained; any
    other model trains the standard way on all rows."""
    from embjax import zoo

    for variant in ZOO_VARIANTS:
        if name.startswith("zoo_") and name.endswith(f"_{variant}"):
            v = zoo.VARIANTS[variant]
            return name[: -len(variant) - 1], v.loss, "all" if v.half is None else "AB"[v.half]
    return name, "softmax", "all"


def group(source: str, target: str) -> tuple[str, str, str]:
    """(architecture, loss, data) of an ordered pair, each "same" or what differs."""
    (arch_s, loss_s, rows_s), (arch_t, loss_t, rows_t) = describe(source), describe(target)
    if rows_s == rows_t:
        data = "same"
    elif "all" in (rows_s, rows_t):
        data = "overlapping"
    else:
        data = "disjoint"
    return ("same" if arch_s == arch_t else "different", "same" if loss_s == loss_t else "differs", data)


def has_variants(models) -> bool:
    return any(describe(m)[0] != m for m in models)


def apart_table(results: Mapping, family: str = "affine") -> Table:
    """Per group of ordered pairs: how many, the mean and worst change of top-1 against the unmapped
    source, and the mean R² of the mapped features (evaluation split)."""
    from embjax.affine_report import change_text, mean_penalty

    models = list(results["models"])
    groups: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    for i, s in enumerate(models):
        for j, t in enumerate(models):
            if i != j:
                groups.setdefault(group(s, t), []).append((i, j))
    order = sorted(groups, key=lambda g: (g[0] == "same", g[1] != "same", g[2] != "same", g))
    rows = []
    for g in order:
        pairs = groups[g]
        rel = results[family]["relative_change"]
        defined = [(i, j) for i, j in pairs if rel[i][j] is not None and math.isfinite(rel[i][j])]
        p = mean_penalty(dict(results), family, defined)
        r2 = [v for v in (results[family]["r2"][i][j] for i, j in pairs) if v is not None and math.isfinite(v)]
        worst = (f"{change_text(p['worst'][0])} ({models[p['worst'][1]]} → {models[p['worst'][2]]})"
                 if p["worst"] else "n/a")
        rows.append([*g, str(len(pairs)), change_text(p["mean"]), worst,
                     f"{sum(r2) / len(r2):.3f}" if r2 else "n/a"])
    return Table(f"Trained apart: {family} maps by what differs between source and target",
                 ["architecture", "loss", "training data", "ordered pairs", "mean change of top-1",
                  "worst change (pair)", "mean R²"], rows,
                 note="Change of the target head's top-1 on the mapped source features against the source's "
                      "own (unmapped) top-1, as in Table 5.2. Data: same rows; disjoint (halves A and B); "
                      "overlapping (a half against all rows). Variants: embjax.zoo.VARIANTS.")


def summary_text(results: Mapping) -> str:
    """The trained-apart table as console lines ("" when the run has no zoo variant)."""
    if not has_variants(results["models"]):
        return ""
    t = apart_table(results)
    lines = [t.title]
    for row in t.rows:
        lines.append(f"  arch {row[0]:<9} loss {row[1]:<7} data {row[2]:<11} {row[3]:>3} pairs  "
                     f"mean {row[4]:>7}  worst {row[5]}  R² {row[6]}")
    return "\n".join(lines)


def write(run_dir: str | os.PathLike, results: Mapping) -> dict[str, str]:
    """`trained_apart.md` and `.csv` in a written report's directory; {} when no model is a variant."""
    if not has_variants(results["models"]):
        return {}
    t = apart_table(results)
    paths = {"trained_apart.md": os.path.join(run_dir, "trained_apart.md"),
             "trained_apart.csv": os.path.join(run_dir, "trained_apart.csv")}
    with open(paths["trained_apart.md"], "w") as f:
        f.write(f"# {t.title}\n\n{t.markdown()}\n\n{t.note}\n")
    with open(paths["trained_apart.csv"], "w") as f:
        f.write(t.csv())
    return paths
