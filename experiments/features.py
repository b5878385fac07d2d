r"""Bring your own features: every affine map, R², CKA and mapped accuracy for features from any framework.

  python -m experiments.features --features=a=fit/a.npy,b=fit/b_shards,c=store/fit:c/pre_logits \
      [--eval_features=a=eval/a.npy,...] [--labels=fit/labels.npy] [--eval_labels=eval/labels.npy] \
      [--heads=a=heads/a.npz,b=heads/b.npz,c=heads/c.npz] [--ridge=0] [--workdir=results/features]

(`./launch.sh features ...` runs the same.) Each feature PATH is a `.npy` file, a directory of `.npy`
shards or a feature store (STORE:ENTRY); see embjax/feature_files.py. Row k of every model's features
must be the same sample; row counts (and the stores' dataset indices) are checked.

1. fit: the features of --features are streamed once in batches into the joint statistics
   (embjax.stats); every ordered pair's affine map (embjax.maps.affine_all), its R², and the pair's linear
   CKA, mean (SV)CCA and angular Procrustes distance (embjax.similarity) follow from them, without a
   second pass. Debiased CKA needs the features themselves: it is computed on the first
   --similarity_rows evaluation rows (read once more; memory bounded by those rows).
2. eval (with --eval_features or --heads): the evaluation rows (--eval_features, else the fit rows again)
   are streamed once; they give the held-out R² and CKA (with --eval_features), and with --heads (an .npz
   per model with W (d, classes) and b) Table 5.2-style top-1 / top-5 of every source's mapped features
   through every target's head, for affine, logit (from the heads alone) and naive (truncate / zero-pad)
   maps, against the labels (--eval_labels, or --labels when the fit rows are evaluated), and the
   agreement with the target's own prediction.

Output: a run directory under --workdir with the tables (Markdown and CSV), heatmaps, report.md,
results.json (every number, the command and the flags) and the maps themselves, maps/<src>__to__<dst>.npz
(affine) and maps/logit/<src>__to__<dst>.npz, each with W (d_src, d_dst) and b (d_dst,): x_dst ≈ x_src W + b.
"""

from __future__ import annotations

import os
import sys
import time
import types
import warnings

import numpy as np

from experiments import common, config_check

FAMILIES = ("affine", "logit", "naive")


def default_config() -> dict:
    return {"features": [], "eval_features": [], "labels": None, "eval_labels": None, "heads": [],
            "ridge": 0.0, "batch_size": 4096, "progress_seconds": 10.0, "similarity": True, "cca_dims": 32,
            "similarity_rows": 5000, "checkpoint_every": 50}


# --------------------------------------------------------------------------------------------------
# The engine over feature files


def _engine(names, fit_src, eval_src, cfg, workdir: str, log):
    """The engine over the feature files: the rows of every model side by side (data.RowSource), an
    identity member per model picking its columns. One batch shape per pass (the fit rows and the
    evaluation rows may want different sizes): the evaluation pass runs on a sibling engine."""
    import jax

    from embjax import data, extract, members

    fit_rows = data.RowSource(fit_src, name="--features rows")
    ms = [members.identity(m, *reversed(fit_rows.columns(k))) for k, m in enumerate(names)]
    devices = jax.device_count()

    def size(rows):  # batches no larger than the stream, a multiple of the device count
        return -(-min(int(cfg["batch_size"]), rows) // devices) * devices

    fingerprint = {k: v for k, v in cfg.items() if k not in ("progress_seconds", "checkpoint_every")}
    engine = extract.Engine(ms, workdir, batch_size=size(fit_rows.n), fingerprint=fingerprint, log=log,
                            checkpoint_every=int(cfg["checkpoint_every"]), config=cfg,
                            progress_seconds=float(cfg["progress_seconds"]))
    evaluation = None if eval_src is None else engine.sibling("eval", ms, batch_size=size(eval_src[0].rows))
    return engine, evaluation, fit_rows


# --------------------------------------------------------------------------------------------------
# The run


def _names_must_match(fit_specs, other_specs, what: str) -> None:
    want, got = [n for n, _ in fit_specs], [n for n, _ in other_specs]
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{what} must name the same models as --features ({', '.join(want)}): {'; '.join(parts)}")


def _matrix(n, cell, symmetric: bool = False) -> list[list[float | None]]:
    """[[cell(i, j)]] as floats (None where not finite); a symmetric measure is computed once per pair."""
    out = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i if symmetric else 0, n):
            v = float(cell(i, j))
            out[i][j] = v if np.isfinite(v) else None
            if symmetric:
                out[j][i] = out[i][j]
    return out


def run(config: dict, log=print, workdir: str | None = None) -> tuple[dict, dict]:
    """Fits and scores every pair for `config` (see default_config); returns (results, maps to save:
    {relative path: (W, b)}). Resume state lives in `workdir` (a temporary directory if None)."""
    import shutil
    import tempfile

    temporary = workdir is None
    workdir = tempfile.mkdtemp(prefix="embjax-features-") if temporary else workdir
    try:
        results, saved, engine = _run(config, log, workdir)
        engine.finish()
        return results, saved
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


def _inputs(config: dict, log) -> types.SimpleNamespace:
    """The flags checked and the files opened: every problem is reported before anything is streamed."""
    from embjax import feature_files


    cfg = {**default_config(), **config}
    if cfg["batch_size"] < 1:
        raise ValueError(f"--batch_size must be positive, got {cfg['batch_size']}")
    if cfg["ridge"] < 0:
        raise ValueError(f"--ridge must be >= 0, got {cfg['ridge']}")
    specs = feature_files.parse_specs(cfg["features"], "--features")
    if len(specs) < 2:
        raise ValueError(f"--features needs at least two models (NAME=PATH,NAME=PATH), got {len(specs)}")
    names = [n for n, _ in specs]
    fit_src = feature_files.open_sources(specs, "--features")
    dims = [s.dim for s in fit_src]
    n_fit = fit_src[0].rows
    n = len(names)

    eval_src = None
    eval_specs = feature_files.parse_specs(cfg["eval_features"], "--eval_features")
    if eval_specs:
        _names_must_match(specs, eval_specs, "--eval_features")
        by_name = dict(eval_specs)
        eval_src = feature_files.open_sources([(m, by_name[m]) for m in names], "--eval_features")
        for s, d, m in zip(eval_src, dims, names):
            if s.dim != d:
                raise ValueError(f"--eval_features: {s.spec} has {s.dim} columns but the fit features of '{m}' have {d}")

    heads = None
    head_specs = feature_files.parse_specs(cfg["heads"], "--heads")
    if head_specs:
        _names_must_match(specs, head_specs, "--heads")
        by_name = dict(head_specs)
        heads = [feature_files.load_head(by_name[m], d, m) for m, d in zip(names, dims)]
        classes = {h[0].shape[1] for h in heads}
        if len(classes) != 1:
            listing = ", ".join(f"{m}: {h[0].shape[1]}" for m, h in zip(names, heads))
            raise ValueError(f"--heads: the heads predict different numbers of classes ({listing}); mapped accuracy "
                             "needs one label set")
    num_classes = heads[0][0].shape[1] if heads else None

    fit_labels = feature_files.load_labels(cfg["labels"], n_fit, "--labels") if cfg["labels"] else None
    if cfg["eval_labels"] and eval_src is None:
        raise ValueError("--eval_labels labels the rows of --eval_features, which was not given "
                         "(use --labels for the fit rows)")
    if eval_src is not None:
        eval_labels = (feature_files.load_labels(cfg["eval_labels"], eval_src[0].rows, "--eval_labels")
                       if cfg["eval_labels"] else None)
    else:
        eval_labels = fit_labels
    label_flag = "--eval_labels" if eval_src is not None else "--labels"
    if eval_labels is not None and num_classes is not None and eval_labels.max(initial=0) >= num_classes:
        k = int(np.argmax(eval_labels >= num_classes))
        raise ValueError(f"{label_flag}: {cfg['eval_labels'] if eval_src is not None else cfg['labels']}: row {k} "
                         f"has label {int(eval_labels[k])} but the heads predict {num_classes} classes")
    notes = []
    if heads is None and (fit_labels is not None or eval_labels is not None):
        notes.append("labels were given without --heads: mapped accuracy needs a head per model; labels only checked")
    if heads is not None and eval_labels is None:
        notes.append(f"--heads without {label_flag}: agreement with each target's own prediction is reported, "
                     "not accuracy")
    if heads is not None and fit_labels is not None and eval_src is not None:
        notes.append("--labels labels the fit rows; with --eval_features accuracy is measured on the evaluation "
                     "rows against --eval_labels, so --labels was only checked")
    for note in notes:
        log(f"[features] note: {note}")
    return types.SimpleNamespace(cfg=cfg, specs=specs, eval_specs=eval_specs, names=names, fit_src=fit_src,
                                 dims=dims, n_fit=n_fit, n=n, eval_src=eval_src, heads=heads,
                                 eval_labels=eval_labels, notes=notes)


def _run(config: dict, log, workdir: str):
    from embjax import evaluate, extract, maps, stats

    i = _inputs(config, log)
    cfg, specs, eval_specs, names, fit_src, dims = i.cfg, i.specs, i.eval_specs, i.names, i.fit_src, i.dims
    n_fit, n, eval_src, heads, eval_labels, notes = i.n_fit, i.n, i.eval_src, i.heads, i.eval_labels, i.notes
    seconds = {}
    log(f"[features] {n} models ({', '.join(f'{m} {d}' for m, d in zip(names, dims))}), {n_fit:,} fit rows"
        + (f", {eval_src[0].rows:,} evaluation rows" if eval_src is not None else ""))

    # 1. Joint statistics of the fit rows.
    engine, eval_engine, fit_rows = _engine(names, fit_src, eval_src, cfg, workdir, log)
    outputs = {m: ("pre_logits",) for m in names}

    def feats(out, batch, aux):
        return [out[m]["pre_logits"] for m in names]

    fit = engine.run(extract.Pass("fit", fit_rows, "--features rows", outputs,
                                  accumulator=stats.accumulator(dims, feats)))
    seconds["fit"] = engine.seconds["fit"]

    # 2. Maps.
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        affine = maps.affine_all(fit, ridge=cfg["ridge"], names=names)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        # What the evaluation pass scores: dense affine maps; naive and logit maps in their factored
        # forms (no N² dense matrices resident); the logit maps are also saved, densified per pair.
        scored, logit = {}, {}
        if heads is not None:
            pinvs = [np.asarray(maps.head_pinv(h), np.float64) for h in heads]
            logit = {(i, j): ((np.asarray(heads[i][0], np.float64) @ pinvs[j]).astype(np.float32),
                              ((np.asarray(heads[i][1], np.float64) - heads[j][1]) @ pinvs[j]).astype(np.float32))
                     for i, j in pairs}
            scored = {"affine": evaluate.stack_maps(affine, dims),
                      "logit": evaluate.logit_maps(heads, pinvs, dims),
                      "naive": evaluate.NaiveMaps()}
    map_warnings = [str(w.message) for w in caught]
    for w in map_warnings:
        log(f"[features] warning: {w}")
    seconds["maps"] = time.perf_counter() - t0

    results = {
        "models": names, "feature_dims": dims,
        "files": {m: s for m, s in specs},
        "eval_files": dict(eval_specs) if eval_specs else None,
        "dataset": "own features", "fit_split": "--features rows",
        "eval_split": "--eval_features rows" if eval_src is not None else "--features rows",
        "num_fit": int(fit.count),
        "fit_statistics": {
            "r2": _matrix(n, lambda i, j: 1.0 if i == j else stats.r2(fit, i, j, *affine[(i, j)])),
            "cka": _matrix(n, lambda i, j: stats.cka(fit, i, j), symmetric=True),
        },
        "warnings": map_warnings, "notes": notes,
    }

    _similarity(i, fit, results, seconds)

    # 3. The evaluation rows: held-out statistics and, with heads, every pair through every head.
    if eval_src is not None or heads is not None:
        results.update(_evaluate(i, engine, eval_engine, scored, affine, outputs, feats, seconds))
    results["config"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()}
    results["meta"] = {"seconds": seconds}

    saved = {f"maps/{names[i]}__to__{names[j]}.npz": affine[(i, j)] for i, j in affine}
    saved.update({f"maps/logit/{names[i]}__to__{names[j]}.npz": logit[(i, j)] for i, j in logit})
    results["maps"] = {"affine": sorted(k for k in saved if not k.startswith("maps/logit/")),
                       "logit": sorted(k for k in saved if k.startswith("maps/logit/"))}
    return results, saved, engine


def _similarity(i, fit, results: dict, seconds: dict) -> None:
    """SVCCA and Procrustes distance from the fit statistics, debiased CKA on rows read once more."""
    from embjax import similarity

    cfg, n, eval_src, fit_src = i.cfg, i.n, i.eval_src, i.fit_src
    if cfg["similarity"]:
        # Measures of embjax.similarity from the same statistics: one eigendecomposition per model and one
        # eigenvalue problem per pair, float64 on one LAPACK thread (seconds at 5 × 1280 dims).
        t0 = time.perf_counter()
        sim = similarity.statistics_matrices(fit, dims=int(cfg["cca_dims"]) or None)
        results["fit_statistics"]["cca"] = sim["svcca"].tolist()
        results["fit_statistics"]["pwcca"] = sim["pwcca"].tolist()
        results["fit_statistics"]["procrustes"] = sim["procrustes"].tolist()
        seconds["similarity"] = time.perf_counter() - t0

    # Debiased CKA is no function of second moments (see embjax.similarity): it is computed from the
    # features of the first `similarity_rows` evaluation rows (the fit rows without --eval_features),
    # read once more; memory is bounded by those rows.
    k = min(int(cfg["similarity_rows"]), (eval_src or fit_src)[0].rows)
    if k >= 4:
        t0 = time.perf_counter()
        sample = [s.read(0, k) for s in (eval_src or fit_src)]
        results["feature_similarity"] = {
            "rows": k, "of": "--eval_features" if eval_src is not None else "--features",
            "cka_debiased": _matrix(n, lambda i, j: similarity.debiased_cka(sample[i], sample[j]), symmetric=True),
        }
        del sample
        seconds["debiased_cka"] = time.perf_counter() - t0


def _evaluate(i, engine, eval_engine, scored, affine, outputs, feats, seconds) -> dict:
    """The eval pass: held-out R² and CKA (with --eval_features) and every pair through every head."""
    from embjax import data, evaluate, extract, stats

    n, dims, heads, eval_src, eval_labels = i.n, i.dims, i.heads, i.eval_src, i.eval_labels
    fit_src = i.fit_src
    results = {}
    rows = data.RowSource(eval_src if eval_src is not None else fit_src, eval_labels, "evaluation rows")
    aux = {"maps": scored, "heads": [tuple(h) for h in heads] if heads is not None else None}

    def family(k):
        return evaluate.accumulator(dims, lambda out, batch, aux: (feats(out, batch, aux), aux["heads"],
                                                                   aux["maps"][k]))

    accumulators = {k: family(k) for k in scored}
    if eval_src is not None:
        accumulators["stats"] = stats.accumulator(dims, feats)
    final = (eval_engine or engine).run(extract.Pass("eval", rows, rows.name, outputs, aux=aux,
                                                     accumulator=accumulators))
    seconds["eval"] = (eval_engine or engine).seconds["eval"]
    ev_stats = final.pop("stats", None)
    if ev_stats is not None:
        results["num_eval"] = int(ev_stats.count)
        results["eval_statistics"] = {
            "r2": _matrix(n, lambda i, j: 1.0 if i == j else stats.r2(ev_stats, i, j, *affine[(i, j)])),
            "cka": _matrix(n, lambda i, j: stats.cka(ev_stats, i, j), symmetric=True),
        }
    for k, e in final.items():
        computed = {key: np.asarray(v) for key, v in evaluate.compute(e).items()}
        results["num_eval"] = int(e.count)
        if eval_labels is None:  # labels were zeros: only agreement and R² mean anything
            results[k] = {"agreement": computed["agreement"].tolist(), "r2": _nan_to_none(computed["r2"])}
        else:
            results[k] = {key: (_nan_to_none(v) if key in ("r2", "relative_change") else v.tolist())
                          for key, v in computed.items()}
    if heads is not None and eval_labels is not None:
        results["unmapped"] = {"accuracy": np.diag(np.asarray(results["affine"]["accuracy"])).tolist(),
                               "top5": np.diag(np.asarray(results["affine"]["top5"])).tolist()}
    return results


def _nan_to_none(m) -> list:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in np.asarray(m, float)]


# --------------------------------------------------------------------------------------------------
# The report


def _save_map(wb):
    def write(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        w, b = (np.asarray(v, np.float32) for v in wb)
        np.savez(path, W=w, b=b)
    return write


def write_report(run_dir: str, results: dict, saved: dict):
    """Tables, heatmaps, report.md, results.json and the map files, written atomically (report.write_run)."""
    from embjax import affine_report, report

    labelled = "unmapped" in results
    r = affine_report.validate(results) if labelled else report.plain(results)
    models = r["models"]
    n = len(models)
    tables = {}
    files_rows = [[m, r["files"][m], (r.get("eval_files") or {}).get(m, ""), str(d)] for m, d in
                  zip(models, r["feature_dims"])]
    tables["models"] = report.Table(f"Models: {r['num_fit']:,} fit rows"
                                    + (f", {r['num_eval']:,} evaluation rows" if "num_eval" in r else ""),
                                    ["model", "fit features", "evaluation features", "dims"], files_rows)

    def square(title, m, fmt):
        return report.Table(title, ["source \\ target", *models],
                            [[models[i], *("n/a" if v is None else fmt(v) for v in row)] for i, row in enumerate(m)])

    four = lambda v: f"{v:.4f}"  # noqa: E731
    tables["fit_r2"] = square("R² of the affine maps on the fit rows (from the statistics)", r["fit_statistics"]["r2"], four)
    tables["fit_cka"] = square("Linear CKA on the fit rows", r["fit_statistics"]["cka"], four)
    if "cca" in r["fit_statistics"]:
        cca_dims = r["config"]["cca_dims"]
        kind = f"SVCCA, {cca_dims} leading principal dims" if cca_dims else "CCA, all dims"
        tables["fit_cca"] = square(f"Mean canonical correlation on the fit rows ({kind})", r["fit_statistics"]["cca"],
                                   four)
        tables["fit_procrustes"] = square("Angular Procrustes distance on the fit rows (radians, 0 = same shape, "
                                          "π/2 = unrelated)", r["fit_statistics"]["procrustes"], four)
    if "feature_similarity" in r:
        fs = r["feature_similarity"]
        tables["cka_debiased"] = square(f"Debiased linear CKA on the first {fs['rows']:,} rows of {fs['of']}",
                                        fs["cka_debiased"], four)
    figures = {
        "fit_r2_heatmap.png": lambda p: report.heatmap_matrix(r["fit_statistics"]["r2"], models,
                                                              "affine maps: R² on the fit rows", p, fmt="{:.3f}",
                                                              vmin=0.0, vmax=1.0),
        "fit_cka_heatmap.png": lambda p: report.heatmap_matrix(r["fit_statistics"]["cka"], models,
                                                               "linear CKA on the fit rows", p, fmt="{:.3f}",
                                                               vmin=0.0, vmax=1.0),
    }
    if "eval_statistics" in r:
        tables["eval_r2"] = square("R² of the affine maps on the evaluation rows (held out)",
                                   r["eval_statistics"]["r2"], four)
        tables["eval_cka"] = square("Linear CKA on the evaluation rows", r["eval_statistics"]["cka"], four)
        figures["eval_r2_heatmap.png"] = lambda p: report.heatmap_matrix(
            r["eval_statistics"]["r2"], models, "affine maps: R² on the evaluation rows", p, fmt="{:.3f}",
            vmin=0.0, vmax=1.0)
    if labelled:
        tables["table_5_1"] = affine_report.table_5_1(r)
        tables["table_5_1"].title = f"Table 5.1: unmapped models ({r['num_eval']:,} evaluation rows)"
        for family, key in (("affine", "table_5_2_affine"), ("logit", "table_5_3_logit"), ("naive", "table_naive")):
            tables[key] = affine_report.family_table(r, family)
        figures["table_5_2_heatmap.png"] = lambda p: affine_report.heatmap(r, "affine", p)
    for family in FAMILIES:
        if family in r:
            tables[f"{family}_agreement"] = square(
                f"{family} maps: agreement with the target head's own prediction (%)",
                r[family]["agreement"], report.pct)
    for path, wb in saved.items():
        figures[path] = _save_map(wb)
    return report.write_run(run_dir, r, tables=tables, figures=figures, markdown=_markdown(r, tables))


def _markdown(r: dict, tables: dict) -> str:
    meta = r.get("meta", {})
    out = ["# Own features: maps, R², CKA" + (" and mapped accuracy" if "unmapped" in r else ""), ""]
    if "command" in meta:
        out.append(f"- command: `{meta['command']}`")
    for key in ("date", "jax"):
        if key in meta:
            out.append(f"- {key}: {meta[key]}")
    if "seconds" in meta:
        out.append("- seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["seconds"].items()))
    out.append(f"- maps: `maps/<source>__to__<target>.npz` (affine{', and maps/logit/ for logit maps' if r['maps']['logit'] else ''}), "
               "arrays `W` (d_source, d_target) and `b` (d_target,): x_target ≈ x_source @ W + b")
    for w in r.get("warnings", []):
        out.append(f"- warning: {w}")
    for note in r.get("notes", []):
        out.append(f"- note: {note}")
    out.append("")
    for key, table in tables.items():
        out += [f"## {table.title}", ""]
        if table.note:
            out += [table.note, ""]
        out += [table.markdown(), "", f"Files: `{key}.md`, `{key}.csv`", ""]
        if key == "fit_r2":
            out += ["![R² on the fit rows](fit_r2_heatmap.png)", ""]
        if key == "fit_cka":
            out += ["![CKA on the fit rows](fit_cka_heatmap.png)", ""]
        if key == "eval_r2":
            out += ["![R² on the evaluation rows](eval_r2_heatmap.png)", ""]
        if key == "table_5_2_affine":
            out += ["![relative change of affine maps](table_5_2_heatmap.png)", ""]
    import json

    out += ["## Flags", "", "```json", json.dumps(r["config"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Command line


def main() -> None:
    from absl import app, flags

    from embjax import feature_files, report

    flags.DEFINE_multi_string("features", None, "NAME=PATH[,NAME=PATH...]: fit features, one (rows, d) array per "
                              "model (.npy, directory of .npy shards, or STORE[:ENTRY] of a feature store)")
    flags.DEFINE_multi_string("eval_features", None, "NAME=PATH[,...]: evaluation features of the same models")
    flags.DEFINE_string("labels", None, "integer labels of the fit rows (.npy, or a feature store directory)")
    flags.DEFINE_string("eval_labels", None, "integer labels of the evaluation rows")
    flags.DEFINE_multi_string("heads", None, "NAME=PATH[,...]: a linear head per model, .npz with W (d, classes) and b")
    flags.DEFINE_float("ridge", 0.0, "relative ridge of the affine maps (lambda = ridge * tr(C_AA) / d_A)")
    flags.DEFINE_integer("batch_size", 4096, "rows per streamed batch")
    flags.DEFINE_float("progress_seconds", 10.0, "a progress line at most this often (0: every batch)")
    flags.DEFINE_integer("checkpoint_every", 50, "batches between checkpoints (a killed run resumes from the last)")
    flags.DEFINE_bool("similarity", True, "mean SVCCA, PWCCA and Procrustes distance from the fit statistics "
                      "(--nosimilarity skips them)")
    flags.DEFINE_integer("cca_dims", 32, "SVCCA: leading principal directions of each side kept before CCA (0: all)")
    flags.DEFINE_integer("similarity_rows", 5000, "rows (of the evaluation features, else the fit features) "
                         "that debiased CKA is computed on (0: skip it)")
    flags.DEFINE_string("workdir", os.path.join("results", "features"), "where the run directory is created")
    flags.DEFINE_string("name", "features", "run directory name prefix")
    flags.mark_flag_as_required("features")
    f = flags.FLAGS

    def _main(argv):
        config = {k: getattr(f, k) for k in default_config()}
        config = {k: ([] if v is None else v) if k in ("features", "eval_features", "heads") else v
                  for k, v in config.items()}
        config_check.check_or_exit("features", {**config, "name": f.name}, f.workdir)  # before any reading
        off = types.SimpleNamespace(value=None)
        common.setup_jax({"distributed": off, "coordinator": off})
        try:
            results, saved = run(config, log=lambda s: print(s, flush=True), workdir=os.path.join(f.workdir, "state"))
            results["meta"].update(common.run_meta(config, results["meta"]["seconds"], "experiments.features"))
            results["meta"]["workdir"] = os.path.abspath(f.workdir)
            run_dir = report.new_run_dir(f.workdir, name=f.name)
            write_report(run_dir, results, saved)
            print(f"\nreport: {os.path.join(run_dir, 'report.md')}\nmaps:   {os.path.join(run_dir, 'maps')}",
                  flush=True)
        except (*common.USER_ERRORS, feature_files.FeatureFileError) as e:
            common.exit_with_user_error(e)

    try:
        app.run(_main, flags_parser=config_check.flags_parser("features"))
    except KeyboardInterrupt:
        print("interrupted; nothing was written (run the command again)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
