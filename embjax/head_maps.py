"""Maps between embedding spaces that need no statistics: the logit map from two classifier heads
(thesis §5.5) and the naive truncate / zero-pad baseline (thesis §5.6).

Like embjax.maps, every map is a pair (W, b) on row vectors, x_dst ≈ x_src @ W + b; heads are (kernel
(d, classes), bias (classes,)) with logits z = x K + c. Linear algebra runs at Precision.HIGHEST.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from embjax.maps import IllConditionedWarning

_HIGHEST = jax.lax.Precision.HIGHEST



def _check_head(head, what: str):
    if not (isinstance(head, (tuple, list)) and len(head) == 2):
        raise ValueError(f"maps.logit: {what} must be a (kernel (d, classes), bias (classes,)) pair")
    kernel, bias = jnp.asarray(head[0]), jnp.asarray(head[1])
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise ValueError(
            f"maps.logit: {what} has kernel {kernel.shape} and bias {bias.shape}; expected (d, classes) and (classes,)"
        )
    return kernel, bias


def logit(head_src, head_dst):
    """The map that makes the target head reproduce the source head's logits (thesis §5.5).

    With heads z = x K + c, the map is x_dst = (x_src K_src + c_src − c_dst) K_dst⁺, i.e.
    W = K_src K_dst⁺ and b = (c_src − c_dst) K_dst⁺. When K_dst has full column rank (d_dst ≥ classes),
    K_dst⁺ K_dst = I and the target head returns exactly the source logits. Otherwise the logits are
    only reproduced in the least-squares sense, and a warning says so.
    """
    k_a, c_a = _check_head(head_src, "head_src")
    k_b, c_b = _check_head(head_dst, "head_dst")
    if k_a.shape[1] != k_b.shape[1]:
        raise ValueError(
            f"maps.logit: the heads predict different numbers of classes ({k_a.shape[1]} vs {k_b.shape[1]})"
        )
    dtype = jnp.result_type(k_a.dtype, k_b.dtype, jnp.float32)
    with jax.default_matmul_precision("highest"):
        w, b, rank = _logit(k_a.astype(dtype), c_a.astype(dtype), k_b.astype(dtype), c_b.astype(dtype))
    classes = k_b.shape[1]
    if int(rank) < classes:
        warnings.warn(
            f"maps.logit: the target kernel {k_b.shape} has rank {int(rank)} < {classes} classes, so the "
            "target head cannot reproduce the source logits exactly (least-squares logit map returned)",
            IllConditionedWarning,
            stacklevel=2,
        )
    return w, b


def _pinv(k):
    u, sv, vt = jnp.linalg.svd(k, full_matrices=False)  # k = u diag(sv) vt, u (d, r)
    cutoff = jnp.finfo(k.dtype).eps * max(k.shape) * sv[0]
    keep = sv > cutoff
    inv = jnp.where(keep, 1.0 / jnp.where(keep, sv, 1.0), 0.0)
    return jnp.matmul(vt.T * inv[None, :], u.T, precision=_HIGHEST), jnp.sum(keep)  # (classes, d)


@jax.jit
def _logit(k_a, c_a, k_b, c_b):
    pinv, rank = _pinv(k_b)
    w = jnp.matmul(k_a, pinv, precision=_HIGHEST)
    b = jnp.matmul(c_a - c_b, pinv, precision=_HIGHEST)
    return w, b, rank


def head_pinv(head):
    """The pseudo-inverse K⁺ (classes, d) of a head's kernel K (d, classes), the factor every logit map
    into this head shares: logit(src, dst) = (K_src K_dst⁺, (c_src − c_dst) K_dst⁺). Warns as `logit`
    does when K is rank-deficient."""
    k, _ = _check_head(head, "head")
    with jax.default_matmul_precision("highest"):
        pinv, rank = jax.jit(_pinv)(k.astype(jnp.result_type(k.dtype, jnp.float32)))
    if int(rank) < k.shape[1]:
        warnings.warn(f"maps.head_pinv: the kernel {k.shape} has rank {int(rank)} < {k.shape[1]} classes, so "
                      "logit maps into this head reproduce the source logits only in the least-squares sense",
                      IllConditionedWarning, stacklevel=2)
    return pinv


def naive(d_src: int, d_dst: int, dtype=jnp.float32):
    """The "no map" baseline of thesis §5.6: feed the source features to the target head as they are,
    truncated (d_src > d_dst) or zero-padded (d_src < d_dst). W is the (d_src, d_dst) identity, b = 0."""
    d_src, d_dst = int(d_src), int(d_dst)
    if d_src <= 0 or d_dst <= 0:
        raise ValueError(f"maps.naive: dimensions must be positive, got {d_src} and {d_dst}")
    return jnp.eye(d_src, d_dst, dtype=dtype), jnp.zeros((d_dst,), dtype)
