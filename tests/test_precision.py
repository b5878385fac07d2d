"""The library's own dots request the precision they rely on, in the program itself.

The test suite no longer forces "highest" matmul precision globally (only the parity tests of
converted models do, through the `highest_precision` marker), so the pure math must carry
`precision=HIGHEST` on its own dots: on GPU the default is TF32 (10 mantissa bits) and on TPU one-pass
bfloat16 (8 bits), either of which would ruin the centred statistics and the solves. A dot without an
explicit precision shows `precision=None` in the jaxpr whatever context it is later compiled in, so
walking every jaxpr (nested jit, loops, conditionals, custom derivatives) finds each one.
"""
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

from embjax import evaluate, head_maps, maps, stats

HIGHEST = jax.lax.Precision.HIGHEST


def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def dot_precisions(jaxpr):
    """[(primitive, precision param)] of every dot_general in `jaxpr` and everything nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                found += dot_precisions(sub)
    return found


def make_jaxpr(fn, *args):
    """The jaxpr of fn(*args) traced with no default precision in force, so that only the precision a
    dot requests itself shows (a global or surrounding "highest" would otherwise be written into every
    dot and hide a missing one)."""
    with jax.default_matmul_precision(None):
        return jax.make_jaxpr(fn)(*args)


def assert_all_highest(closed, what):
    precisions = dot_precisions(closed.jaxpr)
    assert precisions, f"{what}: no dot_general found; the walk is not seeing the program"
    bad = [p for p in precisions if p not in ((HIGHEST, HIGHEST), HIGHEST)]
    assert not bad, f"{what}: {len(bad)} of {len(precisions)} dots without precision=HIGHEST: {bad[:5]}"
    return len(precisions)


def test_the_walk_sees_a_dot_without_precision():
    # The check itself can fail: a plain matmul inside a jitted loop is found and flagged.
    def sloppy(x):
        return jax.jit(lambda y: jax.lax.fori_loop(0, 2, lambda _, z: z @ z, y))(x)

    with jax.default_matmul_precision("highest"):  # a surrounding setting must not hide it
        closed = make_jaxpr(sloppy, jnp.eye(3))
    assert dot_precisions(closed.jaxpr) == [None]
    with pytest.raises(AssertionError, match="1 of 1 dots"):
        assert_all_highest(closed, "sloppy")


def _state():
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((16, d)).astype(np.float32) for d in (5, 3)]
    return feats, stats.update(stats.init((5, 3)), feats)


def test_stats_dots_are_highest():
    feats, state = _state()
    assert_all_highest(make_jaxpr(stats.update, stats.init((5, 3)), feats), "stats.update")
    w, b = jnp.ones((5, 3)), jnp.zeros(3)
    assert_all_highest(make_jaxpr(lambda s: stats.r2(s, 0, 1, w, b), state), "stats.r2")


def test_maps_dots_are_highest():
    _, state = _state()
    # The affine kernel: Cholesky (blocked and unblocked), power iterations and the solve.
    fit = make_jaxpr(lambda c, m, n: maps._fit_source(c, m, n, 0.0, 0.0, 0, d=5, dims=(5, 3)),
                     state.cross, state.mean, state.count)
    assert_all_highest(fit, "maps._fit_source")
    big = jnp.eye(300, dtype=jnp.float32) * 2.0  # wide enough for the blocked Cholesky's trailing update
    assert_all_highest(make_jaxpr(maps._cholesky, big), "maps._cholesky")
    rng = np.random.default_rng(1)
    k_a, k_b = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    c = np.zeros(4, np.float32)
    assert_all_highest(make_jaxpr(head_maps._logit, k_a, c, k_b, c), "head_maps._logit")
    c_ab = rng.standard_normal((3, 3)).astype(np.float32)
    m = np.zeros(3, np.float32)
    assert_all_highest(make_jaxpr(lambda *a: maps._procrustes(*a, False), c_ab @ c_ab.T, c_ab, m, m),
                       "maps._procrustes")
    assert_all_highest(make_jaxpr(lambda *a: maps._project_rank(*a, 2), jnp.ones((3, 3)), c_ab @ c_ab.T, m, m),
                       "maps._project_rank")
    assert_all_highest(make_jaxpr(maps.apply, jnp.ones((2, 3)), (jnp.ones((3, 3)), m)), "maps.apply")


def test_evaluate_dots_are_highest():
    rng = np.random.default_rng(2)
    dims = (5, 3)
    feats = [rng.standard_normal((8, d)).astype(np.float32) for d in dims]
    heads = [(rng.standard_normal((d, 4)).astype(np.float32), np.zeros(4, np.float32)) for d in dims]
    fitted = {(0, 1): (np.ones((5, 3), np.float32), np.zeros(3, np.float32)),
              (1, 0): (np.ones((3, 5), np.float32), np.zeros(5, np.float32))}
    labels = rng.integers(0, 4, 8)
    closed = make_jaxpr(lambda f: evaluate.update(evaluate.init(dims), f, heads, fitted, labels), feats)
    assert_all_highest(closed, "evaluate.update")
