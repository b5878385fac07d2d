"""The open-set study's hub and learned families (embjax.pair_maps.hub_and_learned, the `hub` setting of
embjax.cells.settings_grid) on a planted case whose answer is known: three models whose features are
exact affine images of one 3-dim latent (widths 3, 5, 4: the wider ones rank-deficient).

Then, at hub rank 3, every model's encoder recovers the same hub coordinates, so
  * GCCA's hub holds the fit-whitened latent up to a rotation (its eigenvalue N is 3-fold degenerate and
    the hub has unit covariance): matching inside the hub (query from model A, gallery from model B) ranks
    exactly as the whitened latent does, which float64 NumPy and scikit-learn compute independently;
  * generalized Procrustes' hub is some invertible linear image of the latent: every (A, B) hub cell is
    the same cell;
  * source → hub → target reproduces the target's own features, so every mapped cell is the target's
    native cell;
and at rank 2 (one latent direction lost) none of this holds, which shows the checks can fail.
The hubs are solved from float64 statistics (the rank-deficient blocks' null eigenvalues are then
1e-16 of the largest, far below the pseudo-inverse's cut); the metrics run in float32 as in the study.
Both tests run in the whole tier (about 9 and 6 CPU-seconds); the everyday tier sees the hub families in
tests/test_open_set.py's smoke run, and here that a resumed run loads the hubs from the engine's memo
(stand-in solvers, calls counted: about 1.5 CPU-seconds).
"""
import time

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import study_runner as runner
from embjax import cells, maps, pair_maps, stats

KW = dict(bins=1 << 12, ks=(1, 5), query_block=64, fars=(0.1, 0.01))


def _planted(rng, dims=(3, 5, 4), latent=3):
    """Fit rows of six classes and evaluation rows of four others; features x_i = z A_i + c_i."""
    centres = 1.5 * rng.standard_normal((10, latent))
    fit_labels, eval_labels = np.repeat(np.arange(6), 50), np.repeat(np.arange(6, 10), 30)
    z_fit = centres[fit_labels] + 0.8 * rng.standard_normal((len(fit_labels), latent))
    z_eval = centres[eval_labels] + 0.8 * rng.standard_normal((len(eval_labels), latent))
    mix = [(rng.standard_normal((latent, d)), 2.0 + rng.standard_normal(d)) for d in dims]
    return z_fit, z_eval, fit_labels, eval_labels, [[z @ a + c for a, c in mix] for z in (z_fit, z_eval)]


def _whitened(z_fit, z):
    vals, vecs = np.linalg.eigh(np.cov(z_fit.T, bias=True))
    return (z - z_fit.mean(0)) @ vecs @ np.diag(vals ** -0.5) @ vecs.T


def _auc(x, labels):
    """ROC AUC over every pair of distinct samples, cosine scores in float64 (scikit-learn)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s, same = x @ x.T, labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(same), 1)
    return roc_auc_score(same[upper], s[upper])


@pytest.mark.slow  # 9 CPU s: compiling the float64 hub solves and the metric cells for five widths
def test_hub_cells_on_a_planted_latent():
    rng = np.random.default_rng(3)
    z_fit, z_eval, _, labels, (fit, native) = _planted(rng)
    native = [x.astype(np.float32) for x in native]
    with jax.enable_x64(True):
        st = stats.update(stats.init([x.shape[1] for x in fit], np.float64), fit)
        gcca = pair_maps.hub_and_learned(st, native, {}, hub_ranks=(2, 3), hub_methods=("gcca",))
        gpa = pair_maps.hub_and_learned(st, native, {}, hub_ranks=(3,), hub_methods=("procrustes",))
    assert gpa[3]["hub_maps"] == {"ranks": [3], "methods": ["procrustes"]}
    assert gcca[2] == {"gcca_2": ("mapped", "hub"), "gcca_3": ("mapped", "hub")}
    encoded = {**gcca[1], **gpa[1]}

    def mapped(f, i, j):
        return np.float32((gcca if f.startswith("gcca") else gpa)[0](f, i, j))

    families = ("gcca_2", "gcca_3", "procrustes_hub_3")
    grid = cells.settings_grid(native, mapped, labels, np.arange(len(labels)),
                               cells.kfold_pairs(labels, 10, 0), families, KW,
                               settings={f: ("native", "mapped", cells.HUB) for f in families},
                               encoded=lambda f, i: np.float32(encoded[f][i]), workers=2)
    ref = runner.leave_one_out_retrieval(*[_whitened(z_fit, z_eval)] * 2, labels)
    ref_auc = _auc(_whitened(z_fit, z_eval), labels)
    n, off = len(native), ~np.eye(len(native), dtype=bool)
    # Hub coordinates of two models agree to float32 rounding (~1e-7 relative), so only neighbours that
    # close could swap: Recall counts of 120 queries must match, and mAP within 1e-4 (one swap moves it
    # by ~1e-5; a wrong hub moves it by percents). AUC: one swapped genuine/impostor pair moves it by
    # 1/(1740 * 5400) ~ 1e-7, and fewer than 100 pairs of scores lie within 1e-6.
    hub = grid["hub|gcca_3"]
    np.testing.assert_allclose(hub["retrieval/recall_at_1"], np.full((n, n), ref["top1"]), rtol=0, atol=0.5 / 120)
    np.testing.assert_allclose(hub["retrieval/map"], np.full((n, n), ref["map"]), rtol=0, atol=1e-4)
    np.testing.assert_allclose(hub["roc_auc"], np.full((n, n), ref_auc), rtol=0, atol=1e-5)
    gpa = grid["hub|procrustes_hub_3"]
    for key in ("retrieval/recall_at_1", "retrieval/map", "eer", "roc_auc"):
        np.testing.assert_allclose(gpa[key], np.full((n, n), gpa[key][0, 0]), rtol=0, atol=1e-4, err_msg=key)
    for f in ("gcca_3", "procrustes_hub_3"):  # source → hub → target = the target's own features
        for key in ("retrieval/recall_at_1", "retrieval/map", "eer", "roc_auc"):
            np.testing.assert_allclose(grid[f"mapped|{f}"][key], grid[f"native|{f}"][key], rtol=0, atol=1e-4,
                                       err_msg=(f, key))
    # One latent direction short, neither holds: the checks above can fail.
    assert np.all(np.abs(grid["hub|gcca_2"]["retrieval/map"] - ref["map"]) > 0.01)
    assert np.all(np.abs(grid["mapped|gcca_2"]["retrieval/map"] - grid["native|gcca_2"]["retrieval/map"])[off] > 0.01)


@pytest.mark.slow  # 6 CPU s, mostly compiling the vmapped training steps
def test_learned_families_start_at_the_affine_maps(monkeypatch):
    """Learned maps start at the closed-form affine maps, exact here, and a few AdamW steps of 1e-6 move
    their weights by about 1e-6 each: every pair's mapped embeddings stay the target's own features to
    1e-3 of their scale (a pair or source mixed up is off by the features' whole scale)."""
    rng = np.random.default_rng(4)
    _, _, fit_labels, _, (fit, native) = _planted(rng, dims=(3, 3, 3))  # invertible: no ridge needed
    fit, native = [x.astype(np.float32) for x in fit], [x.astype(np.float32) for x in native]
    st = stats.update(stats.init([x.shape[1] for x in fit]), fit)
    start = time.perf_counter()
    affine = maps.affine_all(st)
    affine_seconds = time.perf_counter() - start
    learned = dict(families=("learned", "learned_mlp"), loss="regression", hidden=8, epochs=2, batch_size=100,
                   learning_rate=1e-6)

    def solve_again(*args, **kwargs):
        raise AssertionError("hub_and_learned solved the affine maps again")

    monkeypatch.setattr(maps, "affine_all", solve_again)  # they come from the caller, with their time
    mapped, encoded, settings, info = pair_maps.hub_and_learned(st, native, affine, learned=learned,
                                                                fit_features=lambda: (fit, fit_labels),
                                                                affine_seconds=affine_seconds)
    assert settings == {"learned": ("mapped",), "learned_mlp": ("mapped",)} and encoded == {}
    for f in ("learned", "learned_mlp"):
        for i in range(3):
            for j in range(3):
                if i != j:
                    scale = np.abs(native[j]).max()
                    np.testing.assert_allclose(mapped(f, i, j), native[j], rtol=0, atol=1e-3 * scale, err_msg=(f, i, j))
        loss = info["learned_maps"]["final_loss"][f]
        assert all((loss[i][j] is None) == (i == j) for i in range(3) for j in range(3))
        assert info["seconds"]["learned_training"][f] > 0
    assert info["seconds"]["closed_form_affine"] == affine_seconds  # the caller's solve, not a second one
    with pytest.raises(ValueError, match="learned.loss=task needs every model's classifier head"):
        pair_maps.hub_and_learned(st, native, affine, learned={**learned, "loss": "task"}, heads=[None] * 3,
                                  fit_features=lambda: (fit, fit_labels))


def test_a_resumed_run_loads_the_hubs_instead_of_solving_them(tmp_path, monkeypatch):
    """The hubs go through the engine's memo (memo "hubs"), like every other derived result of the study: a
    second run in the same workdir, as a resumed study, calls neither solver (calls counted) and gives
    bit-identical hub maps and coordinates, and the solves' seconds as first measured. The solvers are
    stand-ins returning fixed random hubs (the real ones are planted-answer tested above; compiling them
    would cost this everyday test seconds)."""
    from embjax import canonical, extract

    rng = np.random.default_rng(5)
    dims, calls = (3, 5, 4), []

    def solver(method):
        def solve(st, ranks, **kwargs):
            calls.append(method)
            return {k: canonical.Hub(*(tuple(rng.standard_normal(shape(d)).astype(np.float32) for d in dims)
                                       for shape in (lambda d: (d, k), lambda d: (k, d), lambda d: (d,))))
                    for k in ranks}, None
        return solve

    for method in pair_maps.HUB_METHODS:
        monkeypatch.setattr(canonical, method, solver(method))
    native = [x.astype(np.float32) for x in _planted(rng, dims=dims)[4][1]]
    st = stats.init(list(dims))  # the stand-ins read nothing of it; hub_and_learned reads its widths

    def run():
        engine = extract.Engine([], str(tmp_path), batch_size=8, fingerprint={"hubs": 1}, log=lambda line: None)
        mapped, encoded, settings, info = pair_maps.hub_and_learned(st, native, {}, hub_ranks=(2,),
                                                                    memo=engine.memo)
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
        return {f: [np.asarray(mapped(f, i, j)) for i, j in pairs] + encoded[f] for f in settings}, info

    first, first_info = run()
    assert calls == ["gcca", "procrustes"]
    second, second_info = run()
    assert calls == ["gcca", "procrustes"], "the resumed run solved the hubs again"
    assert list(first) == list(second) == ["gcca_2", "procrustes_hub_2"]
    for f in first:
        for a, b in zip(first[f], second[f], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f)
    assert second_info == first_info
