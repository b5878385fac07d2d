"""Reports: the run directory every study writes, its tables and figures.

`new_run_dir`, `Table` (Markdown and CSV), `write_run` (an atomic run directory with tables, figures,
report.md and results.json; a directory is complete exactly when it holds results.json: everything is
written into `<run_dir>.partial`, renamed to `run_dir`, and only then does results.json get its final
name), `heatmap_matrix`, `plain` (JSON-ready results, finite numbers only), and the open-set study's
figures (`roc_figure`, `fit_size_figure`, `rank_figure`). The affine-equivalence tables (Tables 5.1-5.3,
the thesis side by side) are in embjax.affine_report, which builds on this module.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

class ReportError(ValueError):
    """The results dict cannot be reported: a missing key, a wrong shape or a non-finite number."""


# ---------------------------------------------------------------------------------------------------
# The thesis' published tables


# ---------------------------------------------------------------------------------------------------
# Validation: everything is checked before anything is written


def _plain(obj, path: str):
    """JSON-ready copy of obj (NumPy arrays and scalars, tuples, Mappings converted); non-finite → error."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), path)
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ReportError(f"results.{path} is {obj}; a report holds finite numbers only (use None for a "
                          "value that is undefined)")
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    raise ReportError(f"results.{path} has type {type(obj).__name__}, which JSON cannot hold")


# Cells and tables


def pct(fraction: float, digits: int = 2) -> str:
    return f"{100 * fraction:.{digits}f}"


class Table:
    """A titled grid of strings with Markdown and CSV renderings."""

    def __init__(self, title: str, header: list[str], rows: list[list[str]], note: str = ""):
        self.title, self.header, self.rows, self.note = title, header, rows, note

    def markdown(self) -> str:
        def esc(s: str) -> str:
            return str(s).replace("|", "\\|")
        lines = ["| " + " | ".join(esc(h) for h in self.header) + " |",
                 "|" + "|".join("---" if k == 0 else "---:" for k in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buf.getvalue()


def new_run_dir(root: str | os.PathLike = "results", name: str = "run") -> str:
    """root/<name>-<UTC timestamp>, with -2, -3, ... appended if that directory (or its .partial) exists."""
    name = name or "run"
    if os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise ValueError(f"run name {name!r} must be a plain directory name (no path separators)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(os.fspath(root), f"{name}-{stamp}")
    candidate, k = base, 1
    while os.path.exists(candidate) or os.path.exists(candidate + ".partial"):
        k += 1
        candidate = f"{base}-{k}"
    return candidate


def plain(results: Mapping) -> dict:
    """JSON-ready copy of any study's results (NumPy converted); ReportError on a non-finite number."""
    if not isinstance(results, Mapping):
        raise ReportError(f"results must be a dict, got {type(results).__name__}")
    return _plain(results, "")


def document(title: str, intro=(), tables: Mapping[str, Table] = {}, figures=(), outro=()) -> str:
    """A report.md: "# title", the `intro` paragraphs, a "## <title>" section per table (its note, then the
    table), the `figures` (PNG file names) as images, then the `outro` paragraphs."""
    out = [f"# {title}", ""]
    for text in intro:
        out += [text, ""]
    for table in tables.values():
        out += [f"## {table.title}", ""] + ([table.note, ""] if table.note else []) + [table.markdown(), ""]
    if figures:
        out += ["## Figures", ""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures] + [""]
    for text in outro:
        out += [text, ""]
    return "\n".join(out)


def write_run(run_dir: str | os.PathLike, results: Mapping, *, tables: Mapping[str, Table] = {},
              figures: Mapping[str, Any] = {}, markdown: str = "", title: str = "", intro=(),
              outro=()) -> dict[str, str]:
    """Write any study's run directory atomically; returns {what: path} of every file.

    Every table as `<key>.md` and `<key>.csv`, every figure by calling `figures[filename](path)`,
    `report.md` (`markdown`, else `document(title, intro, tables, the .png figures, outro)`) and `results.json` (`results`, which must be JSON-able with finite numbers:
    None for undefined values). Everything is written into `<run_dir>.partial`, renamed to `run_dir`, and
    only then does results.json get its final name: a directory is complete exactly when it holds
    results.json. A failure leaves no run directory behind.
    """
    if not markdown and title:
        markdown = document(title, intro, tables, [f for f in figures if f.endswith(".png")], outro)
    r = plain(results)
    final = Path(run_dir)
    if final.exists():
        raise FileExistsError(f"run directory {final} already exists; pick a new one (report.new_run_dir)")
    partial = final.with_name(final.name + ".partial")
    if partial.exists():  # left by a write of this very directory that crashed; it never counts as a run
        shutil.rmtree(partial)
    written: dict[str, str] = {}
    partial.mkdir(parents=True)
    try:
        for key, table in tables.items():
            (partial / f"{key}.csv").write_text(table.csv())
            (partial / f"{key}.md").write_text(f"# {table.title}\n\n{table.note + chr(10) * 2 if table.note else ''}"
                                               f"{table.markdown()}\n")
            written[f"{key}_csv"] = str(final / f"{key}.csv")
            written[f"{key}_md"] = str(final / f"{key}.md")
        for filename, draw in figures.items():
            draw(partial / filename)
            written[filename] = str(final / filename)
        (partial / "report.md").write_text(markdown)
        written["report_md"] = str(final / "report.md")
        # results.json keeps a temporary name until the directory has its final one (see the docstring).
        with open(partial / "results.json.tmp", "w") as f:
            json.dump(r, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.rename(final / "results.json.tmp", final / "results.json")
    written["results_json"] = str(final / "results.json")
    return written


def heatmap_matrix(matrix, labels: list[str], title: str, path: str | os.PathLike, *, fmt: str = "{:.2f}",
                   cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                   xlabel: str = "target", ylabel: str = "source") -> None:
    """A labelled heatmap of any square model x model matrix (None / NaN cells left grey), every cell
    annotated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix])
    n = len(labels)
    fig = Figure(figsize=(2.2 + 0.95 * n, 1.6 + 0.8 * n), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_facecolor("0.85")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(values.shape[1]), labels[:values.shape[1]], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]), labels[:values.shape[0]], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)


# Figures of the open-set study


def _figure(width=6.4, height=4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def roc_figure(r, path):
    """ROC curves of an open-set run's results (`r["roc"]`): each model native, every pair mapped (affine)."""
    fig = _figure()
    ax = fig.add_subplot()
    names = r["models"]
    native = r["roc"]["native"]["affine"]
    for j, m in enumerate(names):
        ax.plot(native["far"], native["tar"][j][j], lw=2, label=f"{m} native")
    mapped = r["roc"]["mapped"]["affine"]
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j:
                ax.plot(mapped["far"], mapped["tar"][i][j], lw=1, ls="--", label=f"{names[i]}→{names[j]} affine")
    ax.set_xscale("log")
    ax.set_xlabel("FAR")
    ax.set_ylabel("TAR")
    ax.set_title("ROC on evaluation classes")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def fit_size_figure(r, path):
    """Recall@1 and TAR@FAR=1e-2 against the number of fitting samples (`r["curves"]["fit_size"]`)."""
    c = r["curves"]["fit_size"]
    fig = _figure(9, 3.6)
    for k, metric in enumerate(("recall_at_1", "tar_at_far_0.01")):
        ax = fig.add_subplot(1, 2, k + 1)
        for f in r["config"]["curve_families"]:
            ax.plot(c["sizes"], c[f][metric], marker="o", label=f)
        ax.set_xscale("log")
        ax.set_xlabel("fitting samples")
        ax.set_ylabel(f"{metric}, mapped A→B (mean over pairs)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def rank_figure(r, path):
    """Recall@1 and TAR@FAR=1e-2 against the rank of the map (`r["curves"]["rank"]`)."""
    c = r["curves"]["rank"]
    fig = _figure(9, 3.6)
    for k, metric in enumerate(("recall_at_1", "tar_at_far_0.01")):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(c["ranks"], c[metric], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank k of the map")
        ax.set_ylabel(f"{metric}, mapped A→B (mean over pairs)")
    fig.tight_layout()
    fig.savefig(path)


def matrix_table(title: str, names: list[str], matrix, fmt: str = "{:.4f}", note: str = "") -> Table:
    """A model × model matrix as a Table (row = A, column = B)."""
    rows = [[names[i]] + [fmt.format(v) for v in row] for i, row in enumerate(matrix)]
    return Table(title, ["A \\ B"] + list(names), rows, note)


def open_set_figures(r) -> dict:
    """{file name: draw(path)} of an open-set run's figures: ROC, the fit-size and rank curves, and a heatmap
    per similarity measure."""
    import functools

    cfg = r["config"]
    figures = {"roc.png": functools.partial(roc_figure, r), "curve_fit_size.png": functools.partial(fit_size_figure, r),
               "curve_rank.png": functools.partial(rank_figure, r)}
    for k, title, lim in (("cka", "linear CKA (fit statistics)", (0, 1)),
                          ("cka_debiased", "debiased CKA (evaluation features)", (None, 1)),
                          ("cca", f"mean SVCCA ({cfg['cca_dims']} dims, fit statistics)", (0, 1)),
                          ("pwcca", f"PWCCA ({cfg['cca_dims']} dims, row A's weights, fit statistics)", (0, 1)),
                          ("cknna", f"CKNNA, k = {cfg['mutual_knn_k']} (evaluation)", (None, 1)),
                          ("procrustes", "angular Procrustes distance (rad, fit statistics)", (0, None)),
                          ("mutual_knn", f"mutual {cfg['mutual_knn_k']}-NN alignment (evaluation)", (0, 1))):
        figures[f"similarity_{k}.png"] = functools.partial(heatmap_matrix, r["similarity"][k], r["models"], title,
                                                          vmin=lim[0], vmax=lim[1], xlabel="B", ylabel="A")
    return figures
