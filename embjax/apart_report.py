"""Models trained apart (thesis §6.1): the affine study's ordered pairs grouped by what differs.

A zoo variant (`<zoo model>_<variant>`, embjax.zoo.VARIANTS) differs from its zoo model in its loss
(softmax or cosine margin), its training rows (all, half A, half B) or its seed (initial weights and batch
order). For every ordered pair of a run's models this module says whether source and target share the
architecture, the loss, the data ("same"; "disjoint": halves A and B; "overlapping": a half and the
standard rows, which share about half of their images) and the initial weights ("shared": the same
architecture drawn from the same seed; "independent" otherwise, always so across architectures), and
tabulates per group the affine maps' change of top-1 against the unmapped source (Table 5.2's brackets),
the mapped features' R², and, where source and target have the same width, the same two for the identity
map (the source's features straight into the target's head: the naive family at equal widths), which
shows how much of a pair's alignment a shared initialization gives for free. `write(run_dir, results)`
adds `trained_apart.md` and `.csv` to a finished affine report when the run has a variant;
`summary_text` prints the same lines.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

from embjax.models.specs import ZOO_VARIANTS
from embjax.report import Table

_DATA_ORDER = {"same": 0, "disjoint": 1, "overlapping": 2}


def describe(name: str) -> tuple[str, str, str, int]:
    """(architecture, loss, rows, seed offset) of a model name: a zoo variant's base model and how it
    trained; any other model trains the standard way on all rows with the config's seed (offset 0)."""
    from embjax import zoo

    # Longest suffix first: `_half_b_seed1` must not read as `_seed1` of a model `<zoo model>_half_b`.
    for variant in sorted(ZOO_VARIANTS, key=len, reverse=True):
        if name.startswith("zoo_") and name.endswith(f"_{variant}"):
            v = zoo.VARIANTS[variant]
            return name[: -len(variant) - 1], v.loss, "all" if v.half is None else "AB"[v.half], v.seed_offset
    return name, "softmax", "all", 0


def group(source: str, target: str) -> tuple[str, str, str, str]:
    """(architecture, loss, data, initial weights) of an ordered pair: each "same" or what differs, the
    initial weights "shared" (same architecture, same seed) or "independent"."""
    (arch_s, loss_s, rows_s, seed_s), (arch_t, loss_t, rows_t, seed_t) = describe(source), describe(target)
    if rows_s == rows_t:
        data = "same"
    elif "all" in (rows_s, rows_t):
        data = "overlapping"
    else:
        data = "disjoint"
    init = "shared" if arch_s == arch_t and seed_s == seed_t else "independent"
    return ("same" if arch_s == arch_t else "different", "same" if loss_s == loss_t else "differs", data, init)


def has_variants(models) -> bool:
    return any(describe(m)[0] != m for m in models)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def apart_table(results: Mapping, family: str = "affine") -> Table:
    """Per group of ordered pairs: how many, the mean and worst change of top-1 against the unmapped
    source, the mean R² of the mapped features (evaluation split), and the identity map's mean change and
    R² where every pair of the group has equal widths and the run scored the naive family."""
    from embjax.affine_report import change_text, mean_penalty

    models, dims = list(results["models"]), list(results["feature_dims"])
    groups: dict[tuple[str, str, str, str], list[tuple[int, int]]] = {}
    for i, s in enumerate(models):
        for j, t in enumerate(models):
            if i != j:
                groups.setdefault(group(s, t), []).append((i, j))
    order = sorted(groups, key=lambda g: (g[0] == "same", g[1] != "same", _DATA_ORDER[g[2]], g[3] != "shared"))
    rows = []
    for g in order:
        pairs = groups[g]
        rel = results[family]["relative_change"]
        defined = [(i, j) for i, j in pairs if rel[i][j] is not None and math.isfinite(rel[i][j])]
        p = mean_penalty(dict(results), family, defined)
        r2 = _mean(results[family]["r2"][i][j] for i, j in pairs)
        worst = (f"{change_text(p['worst'][0])} ({models[p['worst'][1]]} → {models[p['worst'][2]]})"
                 if p["worst"] else "n/a")
        identity = ["—", "—"]  # the naive maps truncate or pad between widths: no identity there
        if "naive" in results and all(dims[i] == dims[j] for i, j in pairs):
            naive = results["naive"]
            change = _mean(naive["relative_change"][i][j] for i, j in pairs)
            r2_id = _mean(naive["r2"][i][j] for i, j in pairs)
            identity = [change_text(change), "n/a" if r2_id is None else f"{r2_id:.3f}"]
        rows.append([*g, str(len(pairs)), change_text(p["mean"]), worst, "n/a" if r2 is None else f"{r2:.3f}",
                     *identity])
    return Table(f"Trained apart: {family} maps by what differs between source and target",
                 ["architecture", "loss", "training data", "initial weights", "ordered pairs",
                  "mean change of top-1", "worst change (pair)", "mean R²", "identity map: mean change",
                  "identity map: mean R²"], rows,
                 note="Change of the target head's top-1 on the mapped source features against the source's "
                      "own (unmapped) top-1, as in Table 5.2. Data: same rows; disjoint (halves A and B); "
                      "overlapping (a half against all rows). Initial weights: shared (same architecture and "
                      "seed) or independent. Identity map: the source's features into the target's head "
                      "unmapped (the naive family; — where widths differ). Variants: embjax.zoo.VARIANTS.")


def summary_text(results: Mapping) -> str:
    """The trained-apart table as console lines ("" when the run has no zoo variant)."""
    if not has_variants(results["models"]):
        return ""
    t = apart_table(results)
    lines = [t.title]
    for row in t.rows:
        lines.append(f"  arch {row[0]:<9} loss {row[1]:<7} data {row[2]:<11} init {row[3]:<11} {row[4]:>3} pairs  "
                     f"mean {row[5]:>7}  worst {row[6]}  R² {row[7]}  identity {row[8]} (R² {row[9]})")
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
