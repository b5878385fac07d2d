"""Backward-compatible training (Shen et al., "Towards Backward-Compatible Representation Learning", CVPR
2020) and the baselines it is compared with.

This module owns the pieces specific to the backward-compatibility study:

- the influence loss: the new model's embedding, cut or zero-padded to the old width, scored by the old
  model's frozen classifier and trained with cross-entropy against each sample's label;
- the paper's handling of classes the old model never saw: their old-classifier columns are synthesized
  as the mean old embedding of each such class over the new training set (a streaming accumulator of
  per-class sums, `class_sums_*`), concatenated to the old classifier's columns of the old classes;
- the L2 baseline (new embeddings regressed onto old ones during training);
- an orthogonal post-hoc map for either direction of a pair (embjax.maps.procrustes needs d_src ≤ d_dst);
- the loss functions that plug these into `embjax.train.fit`;
- the study's protocol: the old and new training sets, the evaluation class groups, how the influence
  classifier scores the old model's own embeddings, and the leave-one-out retrieval cells of every
  (query, gallery) pair (`retrieval_cells`, through `embjax.retrieval`). Its tables: `embjax.bct_report`.

The math is plain jax.numpy on arrays and imports only pure modules (`maps`, `stats`); the loss builders
additionally call a Flax module's `apply`, and nothing here knows about devices or files.

Label convention: datasets label samples 0 … L−1. The influence classifier has one column per class it
covers (old classes first, in the order given, then synthesized new classes), and `label_to_column`
(length L, −1 for classes it does not cover) turns dataset labels into its column indices.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from embjax import learned_maps, maps, stats
from embjax.accumulator import Accumulator

_HIGHEST = jax.lax.Precision.HIGHEST

NORMALIZE_CHOICES = (None, "unit", "old_norm")


# --------------------------------------------------------------------------------------------------
# The influence loss


def fit_width(x: jax.Array, width: int) -> jax.Array:
    """(B, d) -> (B, width): the first `width` features when d > width, zero-padded when d < width (the
    paper's rule for feeding a new embedding of another width to the old classifier)."""
    d = x.shape[-1]
    if width <= 0:
        raise ValueError(f"bct.fit_width: width must be positive, got {width}")
    if d >= width:
        return x[..., :width]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - d)])


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    weight = mask.astype(values.dtype)
    return jnp.sum(values * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def influence_logits(embedding: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Logits of the (frozen) old classifier on the new embedding fitted to the old width."""
    z = fit_width(embedding.astype(jnp.float32), kernel.shape[0])
    return jnp.matmul(z, kernel, precision=_HIGHEST) + bias


def influence_loss(embedding: jax.Array, columns: jax.Array, kernel: jax.Array, bias: jax.Array,
                   mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of the old classifier (kernel (d_old, K), bias (K,)) on the new embedding
    (B, d_new) against `columns` (B,) int, the influence-classifier column of each sample's label.
    Rows with mask False get no weight. The classifier receives no gradient: it is the old model's."""
    kernel = jax.lax.stop_gradient(kernel)
    bias = jax.lax.stop_gradient(bias)
    ce = optax.softmax_cross_entropy_with_integer_labels(influence_logits(embedding, kernel, bias), columns)
    return _masked_mean(ce, mask)


def l2_compatibility_loss(embedding: jax.Array, old_embedding: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
    """Mean over samples of ‖fit_width(φ_new) − φ_old‖²: the L2-regression baseline of the paper."""
    diff = fit_width(embedding.astype(jnp.float32), old_embedding.shape[-1]) - old_embedding
    return _masked_mean(jnp.sum(diff * diff, axis=-1), mask)


# --------------------------------------------------------------------------------------------------
# Synthesized classifier columns for new classes


@flax.struct.dataclass
class ClassSums:
    """Per-class counts and sums of embeddings: the streaming state behind class means."""

    count: jax.Array  # (L,) float32: real rows seen per label
    total: jax.Array  # (L, d) Σ embeddings per label


def class_sums_init(num_labels: int, dim: int, dtype=jnp.float32) -> ClassSums:
    if num_labels <= 0 or dim <= 0:
        raise ValueError(f"bct.class_sums_init: num_labels and dim must be positive, got {num_labels}, {dim}")
    return ClassSums(count=jnp.zeros((num_labels,), dtype), total=jnp.zeros((num_labels, dim), dtype))


def class_sums_update(state: ClassSums, x: jax.Array, labels: jax.Array,
                      mask: jax.Array | None = None) -> ClassSums:
    """Adds a batch of embeddings (B, d) with labels (B,); rows with mask False are ignored."""
    weight = jnp.ones(labels.shape, state.total.dtype) if mask is None else mask.astype(state.total.dtype)
    # Padded rows may carry any label, and out-of-range labels must not wrap around: zero their weight.
    num_labels = state.count.shape[0]
    weight = jnp.where((labels >= 0) & (labels < num_labels), weight, 0.0)
    onehot = jax.nn.one_hot(labels, num_labels, dtype=state.total.dtype) * weight[:, None]
    x = jnp.where(weight[:, None] > 0, x.astype(state.total.dtype), 0.0)  # NaNs in padding stay out
    return ClassSums(count=state.count + jnp.sum(onehot, axis=0),
                     total=state.total + jnp.matmul(onehot.T, x, precision=_HIGHEST))


def class_sums_merge(a: ClassSums, b: ClassSums) -> ClassSums:
    return ClassSums(count=a.count + b.count, total=a.total + b.total)


def class_sums_compute(state: ClassSums) -> jax.Array:
    """(L, d) mean embedding per label (rows of labels never seen are zero)."""
    return state.total / jnp.maximum(state.count, 1.0)[:, None]


def synthesized_columns(class_means: jax.Array, *, normalize: str | None = None,
                        old_kernel: jax.Array | None = None) -> jax.Array:
    """Old-classifier columns (d, k) for k new classes from their mean old embeddings (k, d).

    normalize: None (the paper: the mean embedding itself), "unit" (each column scaled to norm 1), or
    "old_norm" (each column scaled to the mean column norm of `old_kernel`, so the new classes' logits
    have the scale of the old ones).
    """
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"bct: normalize must be one of {NORMALIZE_CHOICES}, got {normalize!r}")
    cols = jnp.asarray(class_means, jnp.float32).T
    if normalize is None:
        return cols
    norms = jnp.linalg.norm(cols, axis=0, keepdims=True)
    unit = cols / jnp.where(norms > 0, norms, 1.0)
    if normalize == "unit":
        return unit
    if old_kernel is None:
        raise ValueError("bct: normalize='old_norm' needs the old classifier's kernel (old_kernel=)")
    return unit * jnp.mean(jnp.linalg.norm(jnp.asarray(old_kernel, jnp.float32), axis=0))


def influence_classifier(kernel, bias, old_classes: Sequence[int], *, num_labels: int,
                         new_classes: Sequence[int] = (), new_class_means=None,
                         normalize: str | None = None):
    """The classifier the influence loss scores new embeddings with.

    kernel (d_old, C) and bias (C,) are the old model's head, whose column c belongs to dataset label c;
    the columns of `old_classes` (the labels the old model was trained on) are kept. For `new_classes`,
    `new_class_means` (len(new_classes), d_old) are their mean old embeddings over the new training set;
    their synthesized columns are appended with bias 0 (the paper's classifier has no bias term to copy).
    Returns (kernel (d_old, K), bias (K,), label_to_column (num_labels,) int32, −1 for labels not covered).
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    bias = jnp.asarray(bias, jnp.float32)
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise ValueError(f"bct.influence_classifier: expected kernel (d, C) and bias (C,), got {kernel.shape} "
                         f"and {bias.shape}")
    old_classes = [int(c) for c in old_classes]
    new_classes = [int(c) for c in new_classes]
    if not old_classes:
        raise ValueError("bct.influence_classifier: old_classes is empty; name the labels the old model was "
                         "trained on")
    if set(old_classes) & set(new_classes) or len(set(old_classes + new_classes)) != len(old_classes + new_classes):
        raise ValueError(f"bct.influence_classifier: old classes {old_classes} and new classes {new_classes} "
                         "must be distinct")
    bad = [c for c in old_classes if not 0 <= c < kernel.shape[1]]
    if bad:
        raise ValueError(f"bct.influence_classifier: old classes {bad} have no column in the old head "
                         f"({kernel.shape[1]} columns)")
    bad = [c for c in old_classes + new_classes if not 0 <= c < num_labels]
    if bad:
        raise ValueError(f"bct.influence_classifier: labels {bad} are outside 0..{num_labels - 1}")
    k = kernel[:, jnp.asarray(old_classes)]
    b = bias[jnp.asarray(old_classes)]
    if new_classes:
        if new_class_means is None:
            raise ValueError("bct.influence_classifier: new classes need new_class_means (their mean old "
                             "embeddings over the new training set)")
        means = jnp.asarray(new_class_means, jnp.float32)
        if means.shape != (len(new_classes), kernel.shape[0]):
            raise ValueError(f"bct.influence_classifier: new_class_means has shape {means.shape}, expected "
                             f"{(len(new_classes), kernel.shape[0])}")
        k = jnp.concatenate([k, synthesized_columns(means, normalize=normalize, old_kernel=k)], axis=1)
        b = jnp.concatenate([b, jnp.zeros((len(new_classes),), jnp.float32)])
    table = np.full((num_labels,), -1, np.int32)
    for col, label in enumerate(old_classes + new_classes):
        table[label] = col
    return k, b, jnp.asarray(table)


# --------------------------------------------------------------------------------------------------
# Post-hoc orthogonal maps in either direction


def orthogonal_map(state: stats.Stats, src: int, dst: int, *, scale: bool = True):
    """The orthogonal (Procrustes) map src → dst from joint statistics, for either order of widths.

    With C = C_src,dst = U Σ Vᵀ, W = U Vᵀ maximizes tr(Wᵀ C) over partial isometries: W Wᵀ = I when
    d_src ≤ d_dst (embjax.maps.procrustes), WᵀW = I when d_src > d_dst, obtained here as the transpose of
    maps.procrustes(dst → src), whose SVD is the same one transposed. With `scale`, W is multiplied by
    the least-squares factor s = tr(Wᵀ C) / tr(Wᵀ C_src,src W). b = μ_dst − μ_src W.
    """
    d_src, d_dst = state.dims[src], state.dims[dst]
    if d_src <= d_dst:
        w, _ = maps.procrustes(state, src, dst)
    else:
        w, _ = maps.procrustes(state, dst, src)
        w = w.T
    with jax.default_matmul_precision("highest"):
        if scale:
            c_aa = stats.block(state, src, src)
            c_ab = stats.block(state, src, dst)
            num = jnp.sum(w * c_ab)
            den = jnp.sum(w * jnp.matmul(c_aa, w, precision=_HIGHEST))
            w = w * jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
        b = stats.block_mean(state, dst) - jnp.matmul(stats.block_mean(state, src), w, precision=_HIGHEST)
    return w, b


def learned_map(x, y, labels, affine, family: str, *, head=None, loss: str = "regression", hidden: int = 256,
                rank: int = 0, epochs: int = 3, batch_size: int = 512, learning_rate: float = 1e-3,
                weight_decay: float = 0.0, seed: int = 0) -> tuple[dict, dict]:
    """A map x → y trained by gradient descent (embjax.learned_maps) from the closed-form `affine` = (W, b):
    family "learned" (linear; rank > 0 factors W) or "learned_mlp" (plus one hidden ReLU layer of width
    `hidden`, its second layer starting at zero). loss "regression" (‖f(x) − y‖², FCT's objective) or
    "task" (cross-entropy of the frozen target `head` = (kernel, bias) on f(x) against `labels`).
    Returns (params, {"seconds", "loss": per-epoch means, "fit_loss_before", "fit_loss_after": the loss
    on all of x at the closed form and after training})."""
    w, b = (jnp.asarray(a, jnp.float32) for a in affine)
    params = learned_maps.init(family, w, b, rank=rank, hidden=hidden, key=jax.random.key(seed))
    x = jnp.asarray(x, jnp.float32)
    y = None if y is None else jnp.asarray(y, jnp.float32)
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    objective = learned_maps.LOSSES[loss] if loss in learned_maps.LOSSES else None
    if objective is None:
        raise ValueError(f"bct.learned_map: loss must be one of {sorted(learned_maps.LOSSES)}, got {loss!r}")
    before = float(objective(params, x, y, head, labels))
    params, meta = learned_maps.fit(params, x, y, loss=loss, head=head, labels=labels, epochs=epochs,
                                    batch_size=batch_size, learning_rate=learning_rate,
                                    weight_decay=weight_decay, seed=seed)
    return params, {"seconds": float(meta["seconds"]), "loss": [float(v) for v in meta["loss"]],
                    "fit_loss_before": before, "fit_loss_after": float(objective(params, x, y, head, labels))}


def apply_map(m, x: jax.Array) -> jax.Array:
    """A post-hoc map applied to rows x: a closed-form (W, b) or learned parameters (embjax.learned_maps)."""
    return learned_maps.apply(m, x) if isinstance(m, dict) else maps.apply(x, m)


def r2_score(prediction, target) -> float:
    """1 − Σ‖target − prediction‖² / Σ‖target − mean(target)‖², in float64 NumPy."""
    t, p = np.asarray(target, np.float64), np.asarray(prediction, np.float64)
    return float(1.0 - np.sum((t - p) ** 2) / np.sum((t - t.mean(axis=0)) ** 2))


def eval_embeddings(outputs, batch, posthoc, *, roles, d_old) -> dict:
    """The eval pass's stored entries: every model's embedding, each new one cut / padded to the old
    width (the paper's rule), and the post-hoc maps' images: "independent/<map>" for maps named
    *_new_to_old (the independent model's queries mapped), "old/<map>" for the others (the old gallery)."""
    x = {r: outputs[r]["pre_logits"] for r in roles}
    out = {f"{r}/pre_logits": v for r, v in x.items()}
    out.update({f"{r}/as_old": fit_width(x[r], d_old) for r in roles if r != "old"})
    for name, m in posthoc.items():
        src = "independent" if name.endswith("new_to_old") else "old"
        out[f"{src}/{name}"] = apply_map(m, x[src])
    return out


# --------------------------------------------------------------------------------------------------
# Loss functions for embjax.train.fit


def _cross_entropy(logits, labels, mask):
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)


def make_loss(module, preprocess: Callable[[jax.Array], jax.Array], kind: str, *, influence=None,
              weight: float = 1.0, embedding_key: str = "pre_logits") -> Callable:
    """The training loss of one model for `embjax.train.fit`:
    (params, model_state, batch, rng) -> (loss, (model_state, metrics)).

    kind: "independent" (cross-entropy of the model's own head), "bct" (plus `weight` × the influence
    loss through `influence` = (kernel, bias, label_to_column) from `influence_classifier`) or "l2" (plus
    `weight` × `l2_compatibility_loss` against batch["old_embedding"]). Samples whose label has no
    influence column get no influence term. batch: "image" uint8, "label" int32, optional "mask" bool.
    """
    if kind not in ("independent", "bct", "l2"):
        raise ValueError(f"bct.make_loss: kind must be 'independent', 'bct' or 'l2', got {kind!r}")
    if kind == "bct" and influence is None:
        raise ValueError("bct.make_loss: kind='bct' needs influence=(kernel, bias, label_to_column)")

    def loss_fn(params, model_state, batch, rng):
        variables = {"params": params, **({"batch_stats": model_state} if model_state else {})}
        out, updates = module.apply(variables, preprocess(batch["image"]), train=True,
                                    mutable=["batch_stats"], rngs={"dropout": rng})
        labels = batch["label"]
        mask = batch.get("mask")
        logits = out["logits"].astype(jnp.float32)
        own = _cross_entropy(logits, labels, mask)
        metrics = {"ce": own, "accuracy": _masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)}
        loss = own
        if kind == "bct":
            kernel, bias, table = influence
            columns = jnp.asarray(table)[labels]
            covered = columns >= 0
            keep = covered if mask is None else covered & mask
            term = influence_loss(out[embedding_key], jnp.maximum(columns, 0), kernel, bias, keep)
            metrics["influence"] = term
            loss = loss + weight * term
        elif kind == "l2":
            term = l2_compatibility_loss(out[embedding_key], batch["old_embedding"], mask)
            metrics["l2"] = term
            loss = loss + weight * term
        return loss, (updates.get("batch_stats", model_state), metrics)

    return loss_fn


def class_sums(num_labels: int, dim: int, read, dtype=jnp.float32) -> Accumulator:
    """Per-class sums as an engine accumulator: `read(outputs, batch, aux)` gives the (batch, dim)
    embeddings; labels and mask come from the batch; `compute` gives the class means."""
    return Accumulator(
        empty=lambda: class_sums_init(num_labels, dim, dtype), merge=class_sums_merge, compute=class_sums_compute,
        update=lambda s, outputs, batch, aux: class_sums_update(s, read(outputs, batch, aux), batch["label"],
                                                               batch["mask"]))


# --------------------------------------------------------------------------------------------------
# The study's protocol: training sets, class groups, the influence classifier's diagnostics, retrieval


def training_rows(labels: np.ndarray, *, held_out: Sequence[int] = (), old_data: str = "classes",
                  old_classes: Sequence[int] = (), old_fraction: float = 0.5, seed: int = 0):
    """(rows of the new model's training set, rows of the old model's), as indices into `labels` (the
    training split's labels): the new model gets every row outside `held_out`; the old model the new
    rows of `old_classes` (old_data "classes") or a random `old_fraction` of them drawn with `seed`
    ("fraction")."""
    labels = np.asarray(labels)
    held_out = [int(c) for c in held_out]
    if old_data not in ("classes", "fraction"):
        raise ValueError(f"config.old_data must be 'classes' or 'fraction', not {old_data!r}")
    new_rows = np.flatnonzero(~np.isin(labels, held_out))
    if old_data == "classes":
        old_classes = [int(c) for c in old_classes]
        if set(old_classes) & set(held_out):
            raise ValueError(f"config.old_classes {old_classes} and config.held_out_classes {held_out} overlap")
        old_rows = new_rows[np.isin(labels[new_rows], old_classes)]
    else:
        if not 0 < old_fraction <= 1:
            raise ValueError(f"config.old_fraction must be in (0, 1], got {old_fraction}")
        k = int(round(old_fraction * len(new_rows)))
        old_rows = np.sort(np.random.default_rng(seed).choice(new_rows, size=k, replace=False))
    if len(old_rows) == 0 or len(new_rows) == 0:
        raise ValueError(f"empty training set: {len(old_rows)} old and {len(new_rows)} new training images")
    return new_rows, old_rows


def class_groups(labels: np.ndarray, old_classes, new_classes, held_out) -> dict[str, list[int]]:
    """Evaluation class groups that exist: all classes, the old model's, those only the new model saw,
    and those held out of all training. A group equal to "all classes" or too small to rank (top-5
    needs 6 images) is left out."""
    labels = np.asarray(labels)
    present = sorted(set(int(c) for c in np.unique(labels)))
    groups = {"all classes": present,
              "old classes (seen by both)": [c for c in present if c in set(old_classes)],
              "new classes (seen by the new model only)": [c for c in present if c in set(new_classes)],
              "held-out classes (unseen by both)": [c for c in present if c in set(int(h) for h in held_out)]}
    return {k: v for k, v in groups.items()
            if k == "all classes" or (v and v != present and np.isin(labels, v).sum() > 5)}


def influence_diagnostics(influence, old_emb, labels, old_classes) -> dict:
    """How the influence classifier scores the old model's own embeddings of the new training set (the
    target BCT pulls the new model towards): accuracy and cross-entropy on old-class and new-class
    images, in float64 NumPy."""
    kernel, bias, table = (np.asarray(a) for a in influence)
    logits = np.asarray(old_emb, np.float64) @ kernel + bias
    cols = table[labels]
    m = logits.max(axis=1, keepdims=True)
    ce = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))) - logits[np.arange(len(labels)), np.maximum(cols, 0)]
    right = logits.argmax(axis=1) == cols
    out = {}
    for group, rows in (("old classes", (cols >= 0) & np.isin(labels, old_classes)),
                        ("new classes", (cols >= 0) & ~np.isin(labels, old_classes))):
        if rows.any():
            out[group] = {"accuracy": float(right[rows].mean()), "cross_entropy": float(ce[rows].mean())}
    return out


def influence_variants(old_head, variants: dict, old_classes, new_classes, class_means, num_labels: int,
                       old_emb, labels, log=lambda line: print(line, flush=True)) -> tuple[dict, dict]:
    """One influence classifier per entry of `variants` ({role: normalization of the synthesized columns})
    from the old head and the per-label mean old embeddings, and how each scores the old model's own
    embeddings `old_emb` (labels `labels`): ({role: (kernel, bias, label_to_column)}, {role: diagnostics})."""
    influences, diagnostics = {}, {}
    for role, norm in variants.items():
        influences[role] = influence_classifier(
            old_head[0], old_head[1], old_classes, num_labels=num_labels, new_classes=new_classes,
            new_class_means=np.asarray(class_means)[list(new_classes)], normalize=norm)
        diagnostics[role] = influence_diagnostics(influences[role], old_emb, labels, old_classes)
        log(f"[study] influence classifier of {role} on the old model's own embeddings: {diagnostics[role]}")
    return influences, diagnostics


def retrieval_cells(spaces: dict, labels: np.ndarray, groups: dict, metric: str = "cosine", threads: int = 2,
                    log=lambda line: print(line, flush=True)) -> dict:
    """Leave-one-out top-1 / top-5 (CMC) and mAP over the full ranking of every (query, gallery) pair of
    `spaces` ({(query name, gallery name): (query rows, gallery rows)}, row i of both the same sample)
    within every class group: {group: {"query name | gallery name": {top1, top5, map}}}. `threads`
    rankings at a time (NumPy's sorts and searches release the GIL)."""
    import concurrent.futures

    from embjax import retrieval

    labels = np.asarray(labels)
    jobs = [(g, key) for g in groups for key in spaces]

    def rank(job):
        rows = np.flatnonzero(np.isin(labels, groups[job[0]]))
        query, gallery = spaces[job[1]]
        r = retrieval.leave_one_out(query[rows], labels[rows], gallery[rows], labels[rows], metric=metric, ks=(1, 5))
        return {"top1": float(r["recall_at_1"]), "top5": float(r["recall_at_5"]), "map": float(r["map"])}

    with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
        done = dict(zip(jobs, pool.map(rank, jobs)))
    for (g, key), cell in done.items():
        log(f"[retrieval] {g}: {key[0]} queries / {key[1]} gallery: top-1 {cell['top1']:.4f}  mAP {cell['map']:.4f}")
    return {g: {" | ".join(key): done[(g, key)] for key in spaces} for g in groups}
