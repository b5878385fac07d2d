"""Streaming all-pairs evaluation of mapped features through the target models' own heads.

For N models and every ordered pair (src, dst), this module accumulates, over an evaluation split, the
sufficient statistics of

  - top-1 / top-5 correct:  head_dst(map_{src→dst}(f_src)) against the labels,
  - agreement:              argmax of that against argmax head_dst(f_dst), the target's own prediction,
  - feature-space R²:       1 − Σ‖f_dst − map(f_src)‖² / Σ‖f_dst − μ_dst‖²,

where the diagonal (i, i) is model i unmapped (its own accuracy, agreement n, R² 1). Counts are exact
integers; the R² denominator is accumulated exactly in the streaming sense: each batch is centred on its
own mean and batches are merged with Chan et al.'s update, so μ_dst is the evaluation split's mean, not
a training mean. States merge across batches, devices (`allreduce`) and hosts (`merge`), like
embjax.stats. This module imports only embjax.moments (pure).

Shapes and vectorisation. Maps of different pairs have different shapes (d_src, d_dst). `stack_maps`
concatenates the maps of each source to all N targets along the output axis, with the identity block
at the source's own target: one (d_src, D) matrix per source, D = Σ d_i, so the N² maps of the ten
thesis CNNs take D² floats (1.8 GB at D = 21,408) and nothing is padded. A batch's mapped features,
(batch, D) per source, are then cut per target and zero-padded to (batch, d_max), the target heads'
kernels to (d_max, C) and the target features to (batch, d_max); the per-pair computation is
`jax.vmap`-ed over targets. Only these batch-sized arrays are padded; padding is exact: the padded
columns of a mapped feature are 0 and meet zero rows of the padded kernel. Sources are a Python loop
(unrolled under jit).

Every head applies as z = x K + c with K of shape (d, classes), row vectors. All models must share the
label set (same number of classes). Matmuls run at Precision.HIGHEST.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from embjax import moments
from embjax.accumulator import Accumulator

_HIGHEST = jax.lax.Precision.HIGHEST
KINDS = ("top1", "top5", "agreement")


@flax.struct.dataclass
class EvalState:
    """Sufficient statistics of the all-pairs evaluation; rows are sources, columns targets."""

    count: jax.Array  # () int32: real samples seen
    top1: jax.Array  # (N, N) int32: top-1 correct of head_dst(map(f_src))
    top5: jax.Array  # (N, N) int32: top-5 correct (top-min(5, classes))
    agreement: jax.Array  # (N, N) int32: argmax equal to head_dst(f_dst)'s argmax
    sse: jax.Array  # (N, N) float: Σ ‖f_dst − map(f_src)‖²
    mean: jax.Array  # (D,) concatenated per-model means of the evaluation features
    sst: jax.Array  # (N,) float: Σ ‖f_t − μ_t‖², centred on the evaluation mean
    dims: tuple[int, ...] = flax.struct.field(pytree_node=False)


def init(dims: Sequence[int], dtype=jnp.float32) -> EvalState:
    """Empty evaluation state for N models with feature widths `dims`."""
    dims = tuple(int(d) for d in dims)
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"evaluate.init: dims must be a non-empty sequence of positive widths, got {dims}")
    n = len(dims)
    zeros_i = jnp.zeros((n, n), jnp.int32)
    return EvalState(
        count=jnp.zeros((), jnp.int32),
        top1=zeros_i,
        top5=zeros_i,
        agreement=zeros_i,
        sse=jnp.zeros((n, n), dtype),
        mean=jnp.zeros((sum(dims),), dtype),
        sst=jnp.zeros((n,), dtype),
        dims=dims,
    )


_offsets = moments.offsets


@flax.struct.dataclass
class AffineMaps:
    """Dense maps of every ordered pair, one block row per source: weights[s] is (d_s, D), the maps
    from source s to targets 0..N−1 side by side in target order (the identity at target s, the
    unmapped model), and biases[s] the (D,) biases alike; D = Σ d_i. Made by `stack_maps`."""

    weights: tuple
    biases: tuple


def stack_maps(maps: Mapping, dims: Sequence[int], dtype=jnp.float32) -> AffineMaps:
    """The form of a dict of dense maps that `update` consumes (see `AffineMaps`): D² floats in all.

    `maps` is a dict {(src, dst): (W, b)} covering every src ≠ dst; entries (i, i) are ignored. Passing
    the dict to `update` stacks it inside the step; stacking once here saves that copy per batch. The
    dict may be deleted afterwards: the result holds copies.
    """
    dims = tuple(int(d) for d in dims)
    weights, biases = [], []
    for s, d_s in enumerate(dims):
        ws, bs = [], []
        for t, d_t in enumerate(dims):
            if t == s:
                w = jnp.eye(d_s, d_t, dtype=dtype)
                b = jnp.zeros((d_t,), dtype)
            else:
                if (s, t) not in maps:
                    raise KeyError(
                        f"evaluate: no map for pair ({s}, {t}); pass a dict covering every src ≠ dst "
                        "(e.g. maps.affine_all(state))"
                    )
                w, b = maps[(s, t)]
                if tuple(w.shape) != (d_s, d_t) or tuple(b.shape) != (d_t,):
                    raise ValueError(
                        f"evaluate: map ({s}, {t}) has W {tuple(w.shape)} and b {tuple(b.shape)}; "
                        f"expected ({d_s}, {d_t}) and ({d_t},)"
                    )
            ws.append(jnp.asarray(w, dtype))
            bs.append(jnp.asarray(b, dtype))
        weights.append(jnp.concatenate(ws, axis=1))
        biases.append(jnp.concatenate(bs))
    return AffineMaps(weights=tuple(weights), biases=tuple(biases))


@flax.struct.dataclass
class NaiveMaps:
    """The naive family (thesis §5.6) without matrices: the source features truncated or zero-padded to
    each target's width. Pass `NaiveMaps()` as `maps`."""


@flax.struct.dataclass
class LogitMaps:
    """The logit family in factored form: x ↦ (x K_s + c_s − c_t) K_t⁺ costs one (d_s, classes) and one
    (classes, d_t) product per pair instead of a (d_s, d_t) matrix; what it keeps resident is one kernel,
    bias and pseudo-inverse per model (N·classes·(d + d_max) floats) rather than N² dense maps.

    kernels: tuple of (d_i, classes) source kernels; biases: (N, classes); pinvs: (N, classes, d_max), the
    target kernels' pseudo-inverses zero-padded to d_max columns (see `logit_maps`)."""

    kernels: tuple
    biases: jax.Array
    pinvs: jax.Array


def logit_maps(heads, pinvs, dims: Sequence[int], dtype=jnp.float32) -> LogitMaps:
    """LogitMaps from each model's head (kernel (d_i, C), bias (C,)) and its kernel's pseudo-inverse
    (C, d_i) (embjax.head_maps.head_pinv)."""
    d_max = max(int(d) for d in dims)
    return LogitMaps(kernels=tuple(jnp.asarray(k, dtype) for k, _ in heads),
                     biases=jnp.stack([jnp.asarray(c, dtype) for _, c in heads]),
                     pinvs=jnp.stack([jnp.pad(jnp.asarray(p, dtype), ((0, 0), (0, d_max - p.shape[1]))) for p in pinvs]))


@flax.struct.dataclass
class MlpMaps:
    """Maps with one hidden layer (embjax.learned_maps' `learned_mlp` family), f(x) = x W + b +
    relu(x W1 + b1) W2, for every ordered pair: the affine parts as `AffineMaps`, and per source s the
    first layers of its maps to all N targets side by side, w1[s] (d_s, N·h) and b1[s] (N·h,), and the
    second layers w2[s] (N, h, d_max), zero beyond each target's width and at target s (the unmapped
    model). Made by `mlp_maps`."""

    affine: AffineMaps
    w1: tuple
    b1: tuple
    w2: tuple


def mlp_maps(maps: Mapping, dims: Sequence[int], dtype=jnp.float32) -> MlpMaps:
    """MlpMaps from a dict {(src, dst): (W, b, W1, b1, W2)} covering every src ≠ dst, one hidden width h
    for all pairs."""
    dims = tuple(int(d) for d in dims)
    n, d_max = len(dims), max(dims)
    hidden = {int(v[2].shape[1]) for k, v in maps.items() if k[0] != k[1]}
    if len(hidden) != 1:
        raise ValueError(f"evaluate.mlp_maps: every pair needs the same hidden width, got {sorted(hidden)}")
    (h,) = hidden
    w1, b1, w2 = [], [], []
    for s, d_s in enumerate(dims):
        cols, bias, second = [], [], []
        for t, d_t in enumerate(dims):
            if t == s:
                cols.append(jnp.zeros((d_s, h), dtype))
                bias.append(jnp.zeros((h,), dtype))
                second.append(jnp.zeros((h, d_max), dtype))
                continue
            _, _, a, c, e = maps[(s, t)]
            if tuple(a.shape) != (d_s, h) or tuple(c.shape) != (h,) or tuple(e.shape) != (h, d_t):
                raise ValueError(f"evaluate.mlp_maps: map ({s}, {t}) has W1 {tuple(a.shape)}, b1 {tuple(c.shape)}, "
                                 f"W2 {tuple(e.shape)}; expected ({d_s}, {h}), ({h},), ({h}, {d_t})")
            cols.append(jnp.asarray(a, dtype))
            bias.append(jnp.asarray(c, dtype))
            second.append(jnp.pad(jnp.asarray(e, dtype), ((0, 0), (0, d_max - d_t))))
        w1.append(jnp.concatenate(cols, axis=1))
        b1.append(jnp.concatenate(bias))
        w2.append(jnp.stack(second))
    affine = stack_maps({k: v[:2] for k, v in maps.items()}, dims, dtype)
    return MlpMaps(affine=affine, w1=tuple(w1), b1=tuple(b1), w2=tuple(w2))


def _mapped(maps, s: int, x: jax.Array, dims: Sequence[int], d_max: int) -> jax.Array:
    """(N, batch, d_max): source s's features mapped into every target's space (zero beyond its width);
    target s is the unmapped source."""
    n = len(dims)
    x_pad = jnp.pad(x, ((0, 0), (0, d_max - x.shape[1])))
    width = jnp.asarray(dims)[:, None]  # (N, 1)
    cols = jnp.arange(d_max)[None, :]
    if isinstance(maps, NaiveMaps):
        return jnp.where((cols < width)[:, None, :], x_pad[None], 0)
    if isinstance(maps, MlpMaps):
        hidden = jax.nn.relu(jnp.matmul(x, maps.w1[s], precision=_HIGHEST) + maps.b1[s])
        hidden = hidden.reshape(x.shape[0], n, -1)  # (batch, N, h)
        return (_mapped(maps.affine, s, x, dims, d_max)
                + jnp.einsum("bnh,nhd->nbd", hidden, maps.w2[s], precision=_HIGHEST))
    if isinstance(maps, LogitMaps):
        z = jnp.matmul(x, maps.kernels[s], precision=_HIGHEST) + maps.biases[s]  # source logits
        y = jnp.einsum("tbc,tcd->tbd", z[None] - maps.biases[:, None, :], maps.pinvs, precision=_HIGHEST)
        return y.at[s].set(x_pad)
    y = jnp.matmul(x, maps.weights[s], precision=_HIGHEST) + maps.biases[s]  # (batch, D)
    o = _offsets(dims)
    return jnp.stack([jnp.pad(y[:, o[t]:o[t + 1]], ((0, 0), (0, d_max - dims[t]))) for t in range(n)])


def _check_inputs(state: EvalState, feats, heads, labels, mask):
    n = len(state.dims)
    feats = list(feats)
    heads = list(heads)
    if len(feats) != n or len(heads) != n:
        raise ValueError(
            f"evaluate.update: the state has {n} models but got {len(feats)} feature blocks and "
            f"{len(heads)} heads; pass one of each per model, in the order of init(dims)"
        )
    batch = feats[0].shape[0]
    classes = None
    for i, (f, (k, c), d) in enumerate(zip(feats, heads, state.dims)):
        if f.shape != (batch, d):
            raise ValueError(f"evaluate.update: features of model {i} have shape {f.shape}, expected ({batch}, {d})")
        if k.ndim != 2 or k.shape[0] != d or c.shape != (k.shape[1],):
            raise ValueError(
                f"evaluate.update: head of model {i} has kernel {k.shape} and bias {c.shape}; expected ({d}, classes) and (classes,)"
            )
        if classes is None:
            classes = k.shape[1]
        elif k.shape[1] != classes:
            raise ValueError(f"evaluate.update: head of model {i} predicts {k.shape[1]} classes, model 0 predicts {classes}")
    if labels.shape != (batch,):
        raise ValueError(f"evaluate.update: labels have shape {labels.shape}, expected ({batch},)")
    if mask is not None and mask.shape != (batch,):
        raise ValueError(f"evaluate.update: mask has shape {mask.shape}, expected ({batch},)")
    return feats, heads, batch, classes


def _pair_stats(y, kernel, bias, f_dst, own_pred, labels, keep, k):
    """Counts and squared error of one (src, dst) pair from the mapped features y; vmapped over targets."""
    logits = jnp.matmul(y, kernel, precision=_HIGHEST) + bias
    pred = jnp.argmax(logits, axis=-1)
    _, top = jax.lax.top_k(logits, k)
    top1 = jnp.sum(keep & (pred == labels), dtype=jnp.int32)
    top5 = jnp.sum(keep & jnp.any(top == labels[:, None], axis=-1), dtype=jnp.int32)
    agree = jnp.sum(keep & (pred == own_pred), dtype=jnp.int32)
    err = jnp.where(keep[:, None], y - f_dst, 0)
    return top1, top5, agree, jnp.sum(err * err)


def update(state: EvalState, feats, heads, maps, labels, mask=None) -> EvalState:
    """Fold one batch into the all-pairs evaluation.

    Args:
      state: from `init(dims)`.
      feats: list of (batch, d_i) features, one per model.
      heads: list of (kernel (d_i, classes), bias (classes,)), one per model, same classes for all.
      maps: dict {(src, dst): (W (d_src, d_dst), b (d_dst,))} for every src ≠ dst (the diagonal means the
        unmapped model and is ignored), `stack_maps(maps, dims)` of such a dict (AffineMaps), `NaiveMaps()` (truncate /
        zero-pad, no matrices), `logit_maps(heads, pinvs, dims)` (the logit family, factored) or
        `mlp_maps(...)` (learned maps with one hidden layer).
      labels: (batch,) integer class labels.
      mask: optional (batch,) bool, True for real rows of a padded batch; padded rows count nowhere,
        whatever their contents.
    Works under `jax.jit` (jit it with the state, features, heads and maps as arguments).
    """
    labels = jnp.asarray(labels)
    mask = None if mask is None else jnp.asarray(mask).astype(bool)
    feats, heads, batch, classes = _check_inputs(state, feats, heads, labels, mask)
    dims = state.dims
    n = len(dims)
    d_max = max(dims)
    dtype = state.sse.dtype
    if isinstance(maps, Mapping):
        maps = stack_maps(maps, dims, dtype)
    elif not isinstance(maps, (NaiveMaps, LogitMaps, AffineMaps, MlpMaps)):
        raise ValueError(f"evaluate.update: `maps` must be a dict of (W, b) pairs, stack_maps(...), NaiveMaps(), "
                         f"logit_maps(...) or mlp_maps(...), not {type(maps).__name__}")
    if isinstance(maps, (AffineMaps, MlpMaps)):
        stacked = maps.affine if isinstance(maps, MlpMaps) else maps
        shapes = [(tuple(w.shape), tuple(b.shape)) for w, b in zip(stacked.weights, stacked.biases)]
        want = [((d, sum(dims)), (sum(dims),)) for d in dims]
        if shapes != want:
            raise ValueError(f"evaluate.update: stacked maps have (W, b) shapes {shapes}; for dims {tuple(dims)} "
                             f"expected {want} (stack_maps(maps, dims) with the same dims)")
    keep = jnp.ones((batch,), bool) if mask is None else mask
    feats = [jnp.asarray(f, dtype) for f in feats]
    # Padded rows may hold anything (even NaN): zero them once so no product can leak them.
    feats = [jnp.where(keep[:, None], f, 0) for f in feats]
    k = min(5, classes)

    f_pad = jnp.stack([jnp.pad(f, ((0, 0), (0, d_max - f.shape[1]))) for f in feats])  # (N, batch, d_max)
    kernels = jnp.stack([jnp.pad(jnp.asarray(kk, dtype), ((0, d_max - kk.shape[0]), (0, 0))) for kk, _ in heads])
    biases = jnp.stack([jnp.asarray(c, dtype) for _, c in heads])
    own_logits = jnp.einsum("tbd,tdc->tbc", f_pad, kernels, precision=_HIGHEST) + biases[:, None, :]
    own_pred = jnp.argmax(own_logits, axis=-1)  # (N, batch)

    pair = jax.vmap(_pair_stats, in_axes=(0, 0, 0, 0, 0, None, None, None))
    rows = [pair(_mapped(maps, s, feats[s], dims, d_max), kernels, biases, f_pad, own_pred, labels, keep, k)
            for s in range(n)]
    top1, top5, agree, sse = (jnp.stack(col) for col in zip(*rows))

    # Evaluation-split mean and centred total sum of squares per model (Chan et al. merge).
    n_b = jnp.sum(keep, dtype=jnp.int32)
    n_bf = jnp.maximum(n_b, 1).astype(dtype)
    x = jnp.concatenate(feats, axis=1)
    mu_b = jnp.sum(x, axis=0) / n_bf
    xc = jnp.where(keep[:, None], x - mu_b, 0)
    sq = jnp.sum(xc * xc, axis=0)
    o = _offsets(dims)
    sst_b = jnp.stack([jnp.sum(sq[o[i] : o[i + 1]]) for i in range(n)])
    count, mean, sst = _combine_moments(state.count, state.mean, state.sst, n_b, mu_b, sst_b, dims)
    return state.replace(
        count=count,
        top1=state.top1 + top1,
        top5=state.top5 + top5,
        agreement=state.agreement + agree,
        sse=state.sse + sse,
        mean=mean,
        sst=sst,
    )


def _combine_moments(n_a, mu_a, sst_a, n_b, mu_b, sst_b, dims):
    return moments.chan_combine(n_a, mu_a, sst_a, n_b, mu_b, sst_b,
                                lambda delta: moments.block_sums(delta * delta, dims))


def merge(a: EvalState, b: EvalState) -> EvalState:
    """Evaluation state of the union of the samples behind `a` and `b`."""
    if a.dims != b.dims:
        raise ValueError(f"evaluate.merge: feature widths differ: {a.dims} vs {b.dims}")
    count, mean, sst = _combine_moments(a.count, a.mean, a.sst, b.count, b.mean, b.sst, a.dims)
    return a.replace(
        count=count,
        top1=a.top1 + b.top1,
        top5=a.top5 + b.top5,
        agreement=a.agreement + b.agreement,
        sse=a.sse + b.sse,
        mean=mean,
        sst=sst,
    )


def allreduce(state: EvalState, axis_name) -> EvalState:
    """Exact merge of per-device states along a named mapped axis (inside pmap / shard_map)."""
    dtype = state.mean.dtype
    psum = lambda v: jax.lax.psum(v, axis_name)  # noqa: E731
    n = psum(state.count)
    n_k = state.count.astype(dtype)
    mu = psum(state.mean * n_k) / jnp.maximum(n, 1).astype(dtype)
    delta = state.mean - mu
    sst = psum(state.sst + moments.block_sums(delta * delta, state.dims) * n_k)
    return state.replace(
        count=n,
        top1=psum(state.top1),
        top5=psum(state.top5),
        agreement=psum(state.agreement),
        sse=psum(state.sse),
        mean=mu,
        sst=sst,
    )


# --------------------------------------------------------------------------------------------------
# Turning counts into tables


def accuracy(state: EvalState, kind: str = "top1") -> jax.Array:
    """(N, N) fraction of samples: row = source, column = target head; the diagonal is each model's
    own (unmapped) accuracy. `kind` is "top1", "top5" or "agreement". NaN if no sample was seen."""
    if kind not in KINDS:
        raise ValueError(f"evaluate.accuracy: kind must be one of {KINDS}, got {kind!r}")
    counts = getattr(state, kind)
    total = state.count.astype(jnp.float32)
    return jnp.where(total > 0, counts.astype(jnp.float32) / jnp.maximum(total, 1.0), jnp.nan)


def r2(state: EvalState) -> jax.Array:
    """(N, N) feature-space R² of map(f_src) against f_dst on the evaluation split (diagonal 1). NaN for
    a target whose evaluation features are constant."""
    sst = state.sst[None, :]
    return jnp.where(sst > 0, 1.0 - state.sse / jnp.where(sst > 0, sst, 1.0), jnp.nan)


def compute(state: EvalState) -> dict:
    """Every (N, N) matrix of the evaluation: top-1, top-5, agreement (fractions), R², and the relative
    change of top-1 against the row's unmapped source."""
    top1 = accuracy(state, "top1")
    return {"accuracy": top1, "top5": accuracy(state, "top5"), "agreement": accuracy(state, "agreement"),
            "r2": r2(state), "relative_change": relative_change(top1)}


def relative_change(acc: jax.Array) -> jax.Array:
    """The thesis' relative change of a mapped accuracy: cell / (unmapped accuracy of its row's source) − 1.
    Works on any (N, N) matrix from `accuracy` (and on NumPy arrays)."""
    acc = jnp.asarray(acc)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1]:
        raise ValueError(f"evaluate.relative_change: expected a square (N, N) matrix, got shape {acc.shape}")
    return acc / jnp.diagonal(acc)[:, None] - 1.0


def accumulator(dims: Sequence[int], read, dtype=jnp.float32) -> Accumulator:
    """All-pairs evaluation as an engine accumulator: `read(outputs, batch, aux)` gives
    `(feats, heads, maps)` as `update` takes them; labels and mask come from the batch."""
    return Accumulator(
        empty=lambda: init(dims, dtype), merge=merge, compute=compute,
        update=lambda s, outputs, batch, aux: update(s, *read(outputs, batch, aux), batch["label"], batch["mask"]))
