r"""Bring your own features: every affine map, R², CKA and mapped accuracy for features from any framework.

  python -m experiments.features --features=a=fit/a.npy,b=fit/b_shards,c=store/fit:c/pre_logits \
      [--eval_features=a=eval/a.npy,...] [--labels=fit/labels.npy] [--eval_labels=eval/labels.npy] \
      [--heads=a=heads/a.npz,b=heads/b.npz,c=heads/c.npz] [--ridge=0] [--workdir=results/features]

(`./launch.sh features ...` runs the same; the flags are FLAGS below.) Each PATH is a `.npy` file, a
directory of `.npy` shards or a feature store (STORE:ENTRY), see embjax/feature_files.py; row k of every
model is the same sample. Passes on the engine over the files' rows: `fit`, the joint statistics
(embjax.stats), from which every ordered pair's affine map, R², linear CKA, (SV)CCA and Procrustes
distance follow (debiased CKA from the first --similarity_rows rows, read once more); `eval` (with
--eval_features or --heads), held-out R² and CKA and, with heads, Table 5.2-style top-1 / top-5 of every
source mapped through every target's head (affine, logit and naive maps) and the agreement with the
target's own prediction. The run directory (embjax.features_report) holds tables, heatmaps, report.md,
results.json and the maps, maps/<src>__to__<dst>.npz and maps/logit/..., W (d_src, d_dst) and b (d_dst,).
"""

from __future__ import annotations

import os
import sys
import time
import types
import warnings

import numpy as np

from experiments import common, config_check

# The command's flags: name -> (default, help). A list default makes a repeatable flag (NAME=PATH,...).
FLAGS = {
    "features": ([], "NAME=PATH[,NAME=PATH...]: fit features, one (rows, d) array per model (.npy, directory of "
                     ".npy shards, or STORE[:ENTRY] of a feature store)"),
    "eval_features": ([], "NAME=PATH[,...]: evaluation features of the same models"),
    "labels": (None, "integer labels of the fit rows (.npy, or a feature store directory)"),
    "eval_labels": (None, "integer labels of the evaluation rows"),
    "heads": ([], "NAME=PATH[,...]: a linear head per model, .npz with W (d, classes) and b"),
    "ridge": (0.0, "relative ridge of the affine maps (lambda = ridge * tr(C_AA) / d_A)"),
    "batch_size": (4096, "rows per streamed batch"),
    "progress_seconds": (10.0, "a progress line at most this often (0: every batch)"),
    "similarity": (True, "mean SVCCA, PWCCA and Procrustes distance from the fit statistics (--nosimilarity skips)"),
    "cca_dims": (32, "SVCCA: leading principal directions of each side kept before CCA (0: all)"),
    "similarity_rows": (5000, "rows (of the evaluation features, else the fit features) that debiased CKA is "
                              "computed on (0: skip it)"),
    "checkpoint_every": (50, "batches between checkpoints (a killed run resumes from the last)"),
}


def default_config() -> dict:
    return {k: default for k, (default, _) in FLAGS.items()}


def _engine(names, fit_src, eval_src, cfg, workdir: str, log):
    """The engine over the files: every model's rows side by side (data.RowSource), an identity member per
    model picking its columns; the evaluation pass (another batch shape) runs on a sibling engine."""
    import jax

    from embjax import data, extract, members

    fit_rows = data.RowSource(fit_src, name="--features rows")
    ms = [members.identity(m, *reversed(fit_rows.columns(k))) for k, m in enumerate(names)]
    devices = jax.device_count()
    size = lambda rows: -(-min(int(cfg["batch_size"]), rows) // devices) * devices  # noqa: E731 (of the devices)
    fingerprint = {k: v for k, v in cfg.items() if k not in ("progress_seconds", "checkpoint_every")}
    engine = extract.Engine(ms, workdir, batch_size=size(fit_rows.n), fingerprint=fingerprint, log=log,
                            checkpoint_every=int(cfg["checkpoint_every"]), config=cfg,
                            progress_seconds=float(cfg["progress_seconds"]))
    evaluation = None if eval_src is None else engine.sibling("eval", ms, batch_size=size(eval_src[0].rows))
    return engine, evaluation, fit_rows


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


def _r2_cka(statistics, affine, n: int) -> dict:  # every affine map's R², every pair's CKA, from statistics
    from embjax import stats

    return {"r2": _matrix(n, lambda a, b: 1.0 if a == b else stats.r2(statistics, a, b, *affine[(a, b)])),
            "cka": _matrix(n, lambda a, b: stats.cka(statistics, a, b), symmetric=True)}


def run(config: dict, log=print, workdir: str | None = None) -> tuple[dict, dict]:
    """Fits and scores every pair for `config` (see FLAGS); returns (results, maps to save: {relative path:
    (W, b)}). Resume state lives in `workdir` (a temporary directory, removed after, if None)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="embjax-features-") as scratch:
        results, saved, engine = _run(config, log, workdir or scratch)
        engine.finish()
        return results, saved


def _run(config: dict, log, workdir: str):
    from embjax import extract, feature_files, stats

    i = feature_files.open_inputs({**default_config(), **config})  # flags and files checked before streaming
    names, dims, n, eval_src = i.names, i.dims, i.n, i.eval_src
    for note in i.notes:
        log(f"[features] note: {note}")
    log(f"[features] {n} models ({', '.join(f'{m} {d}' for m, d in zip(names, dims))}), {i.n_fit:,} fit rows"
        + (f", {eval_src[0].rows:,} evaluation rows" if eval_src is not None else ""))
    engine, eval_engine, fit_rows = _engine(names, i.fit_src, eval_src, i.cfg, workdir, log)
    outputs = {m: ("pre_logits",) for m in names}
    feats = lambda out, batch, aux: [out[m]["pre_logits"] for m in names]  # noqa: E731
    # 1. Joint statistics of the fit rows; 2. every pair's maps from them.
    fit = engine.run(extract.Pass("fit", fit_rows, "--features rows", outputs, accumulator=stats.accumulator(dims, feats)))
    seconds, t0 = {"fit": engine.seconds["fit"]}, time.perf_counter()
    affine, scored, logit, map_warnings = _maps(i, fit)
    for w in map_warnings:
        log(f"[features] warning: {w}")
    seconds["maps"] = time.perf_counter() - t0
    results = {
        "models": names, "feature_dims": dims, "files": dict(i.specs),
        "eval_files": dict(i.eval_specs) if i.eval_specs else None, "dataset": "own features",
        "fit_split": "--features rows", "eval_split": "--eval_features rows" if eval_src is not None else "--features rows",
        "num_fit": int(fit.count), "warnings": map_warnings, "notes": i.notes,
        "fit_statistics": _r2_cka(fit, affine, n)}
    _similarity(i, fit, results, seconds)
    # 3. The evaluation rows: held-out statistics and, with heads, every pair through every head.
    if eval_src is not None or i.heads is not None:
        results.update(_evaluate(i, engine, eval_engine, scored, affine, outputs, feats, seconds))
    results |= {"config": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in i.cfg.items()},
                "meta": {"seconds": seconds}}
    saved = {f"maps/{names[a]}__to__{names[b]}.npz": wb for (a, b), wb in affine.items()}
    saved |= {f"maps/logit/{names[a]}__to__{names[b]}.npz": wb for (a, b), wb in logit.items()}
    results["maps"] = {k: sorted(p for p in saved if p.startswith("maps/logit/") == (k == "logit"))
                       for k in ("affine", "logit")}
    return results, saved, engine


def _maps(i, fit):
    """(affine maps, what the eval pass scores: dense affine, factored logit and naive maps (no N² dense
    matrices resident), the logit maps densified per pair to save, warnings)."""
    from embjax import evaluate, head_maps, maps

    heads, n = i.heads, i.n
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        affine = maps.affine_all(fit, ridge=i.cfg["ridge"], names=i.names)
        scored, logit = {}, {}
        if heads is not None:
            pinvs = [np.asarray(head_maps.head_pinv(h), np.float64) for h in heads]
            logit = {(a, b): ((np.asarray(heads[a][0], np.float64) @ pinvs[b]).astype(np.float32),
                              ((np.asarray(heads[a][1], np.float64) - heads[b][1]) @ pinvs[b]).astype(np.float32))
                     for a in range(n) for b in range(n) if a != b}
            scored = {"affine": evaluate.stack_maps(affine, i.dims), "logit": evaluate.logit_maps(heads, pinvs, i.dims),
                      "naive": evaluate.NaiveMaps()}
    return affine, scored, logit, [str(w.message) for w in caught]


def _similarity(i, fit, results: dict, seconds: dict) -> None:
    """SVCCA, PWCCA and Procrustes distance from the fit statistics (embjax.similarity: one eigenproblem per
    model and per pair, float64); debiased CKA, no function of second moments, from the features of the
    first `similarity_rows` evaluation rows (the fit rows without --eval_features), read once more."""
    from embjax import similarity

    if i.cfg["similarity"]:
        t0 = time.perf_counter()
        sim = similarity.statistics_matrices(fit, dims=int(i.cfg["cca_dims"]) or None)
        results["fit_statistics"] |= {"cca": sim["svcca"].tolist(), "pwcca": sim["pwcca"].tolist(),
                                      "procrustes": sim["procrustes"].tolist()}
        seconds["similarity"] = time.perf_counter() - t0
    src = i.eval_src or i.fit_src
    k = min(int(i.cfg["similarity_rows"]), src[0].rows)
    if k >= 4:
        t0 = time.perf_counter()
        sample = [s.read(0, k) for s in src]
        results["feature_similarity"] = {
            "rows": k, "of": "--eval_features" if i.eval_src is not None else "--features",
            "cka_debiased": _matrix(i.n, lambda a, b: similarity.debiased_cka(sample[a], sample[b]), symmetric=True)}
        seconds["debiased_cka"] = time.perf_counter() - t0


def _evaluate(i, engine, eval_engine, scored, affine, outputs, feats, seconds) -> dict:
    """The eval pass: held-out R² and CKA (with --eval_features) and every pair through every head."""
    from embjax import data, evaluate, extract, stats

    rows = data.RowSource(i.eval_src if i.eval_src is not None else i.fit_src, i.eval_labels, "evaluation rows")
    aux = {"maps": scored, "heads": [tuple(h) for h in i.heads] if i.heads is not None else None}
    accumulators = {k: evaluate.accumulator(i.dims, lambda out, batch, aux, k=k: (feats(out, batch, aux),
                                                                                  aux["heads"], aux["maps"][k]))
                    for k in scored}
    if i.eval_src is not None:
        accumulators["stats"] = stats.accumulator(i.dims, feats)
    runner = eval_engine or engine
    final = runner.run(extract.Pass("eval", rows, rows.name, outputs, aux=aux, accumulator=accumulators))
    seconds["eval"] = runner.seconds["eval"]
    results, ev = {}, final.pop("stats", None)
    if ev is not None:
        results["num_eval"] = int(ev.count)
        results["eval_statistics"] = _r2_cka(ev, affine, i.n)
    for k, e in final.items():
        computed = {key: np.asarray(v) for key, v in evaluate.compute(e).items()}
        results["num_eval"] = int(e.count)
        if i.eval_labels is None:  # labels were zeros: only agreement and R² mean anything
            computed = {key: computed[key] for key in ("agreement", "r2")}
        results[k] = {key: (_matrix(len(v), lambda a, b, v=v: v[a][b]) if key in ("r2", "relative_change") else v.tolist())
                      for key, v in computed.items()}
    if i.heads is not None and i.eval_labels is not None:
        results["unmapped"] = {key: np.diag(np.asarray(results["affine"][key])).tolist() for key in ("accuracy", "top5")}
    return results


def main() -> None:
    from absl import app, flags

    from embjax import feature_files, features_report, report

    for name, (default, text) in FLAGS.items():
        define = {list: flags.DEFINE_multi_string, bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float}.get(type(default), flags.DEFINE_string)
        define(name, None if isinstance(default, list) else default, text)
    flags.DEFINE_string("workdir", os.path.join("results", "features"), "where the run directory is created")
    flags.DEFINE_string("name", "features", "run directory name prefix")
    flags.mark_flag_as_required("features")
    f = flags.FLAGS

    def _main(argv):
        config = {k: [] if isinstance(d, list) and getattr(f, k) is None else getattr(f, k) for k, (d, _) in FLAGS.items()}
        config_check.check_or_exit("features", {**config, "name": f.name}, f.workdir)  # before any reading
        common.setup_jax(dict.fromkeys(("distributed", "coordinator"), types.SimpleNamespace(value=None)))
        try:
            results, saved = run(config, log=lambda s: print(s, flush=True), workdir=os.path.join(f.workdir, "state"))
            results["meta"].update(common.run_meta(config, results["meta"]["seconds"], "experiments.features"))
            results["meta"]["workdir"] = os.path.abspath(f.workdir)
            run_dir = report.new_run_dir(f.workdir, name=f.name)
            features_report.write(run_dir, results, saved)  # tables, heatmaps, report.md, maps; atomically
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
