"""A one-vs-rest linear SVM with squared hinge loss and L2 regularization, solved full-batch with L-BFGS.

The objective is scikit-learn `LinearSVC`'s default (penalty="l2", loss="squared_hinge",
fit_intercept=True, intercept_scaling=1), one binary problem per class k with y_ik = +1 for class k and
−1 otherwise:

    f_k(w_k, b_k) = ½ (‖w_k‖² + b_k²) + C Σ_i s_i max(0, 1 − y_ik (x_i·w_k + b_k))²

(liblinear appends a constant feature for the intercept, so b_k is regularized like the weights; set
`regularize_bias=False` for the textbook form). s_i are sample weights, 0 for padding rows. All classes
are solved jointly as the sum Σ_k f_k, which is separable, so its minimizer is every f_k's minimizer.
Prediction is the argmax of the K scores, as `LinearSVC.predict` does for K ≥ 3 (for K = 2 both
columns are trained, where LinearSVC trains one; the decisions are the same).

Solver. The objective is strongly convex and continuously differentiable (the squared hinge has a
Lipschitz gradient, its Hessian jumps at the margin), which is L-BFGS's home ground: optax's `lbfgs` with
its zoom line search (strong Wolfe conditions), full batch, run in one `lax.while_loop` until the gradient
norm falls below `tol` times its value at zero, or `max_iter`. The line search sets every step's length
from the problem itself, which matters here: the same solver sees int8 embeddings in {-1, 0, 1} with
thousands of features and raw pre-logits whose scale differs by orders of magnitude, and Adam would need a
learning rate (and schedule) matched to each to reach the tight optimum the comparison with LinearSVC
asks for. On the tests' problems L-BFGS reaches ‖∇‖ ≤ 1e-5 ‖∇₀‖ in 25-150 iterations.

Scale. Each iteration costs a few passes of x @ W (n·D·K multiply-adds). Rows of x can be sharded over
devices (a `jax.sharding.NamedSharding` with the rows on a mesh axis, the caller's business): the
weights stay replicated, and XLA turns the sums over rows into all-reduces, so D = 12,416-feature,
100-class problems fit in the memory of several devices. int8 features (the full-network embedding)
are cast to float32 inside the product. Matmuls request Precision.HIGHEST (TF32 on GPU would add 1e-3
relative noise to every score).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class LinearSVM:
    """A trained model: scores = x @ weights + bias, prediction = argmax over classes."""

    weights: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)
    objective: float  # Σ_k f_k at the solution
    iterations: int
    grad_ratio: float  # ‖∇‖ at the solution / ‖∇‖ at zero: the convergence reached (≤ tol when converged)
    converged: bool


def objective(params, x, y, C, sample_weight=None, regularize_bias=True):
    """Σ_k f_k (see the module docstring) at params {"w": (D, K), "b": (K,)}; y are labels in 0..K−1."""
    k = params["w"].shape[1]
    signs = 2.0 * jax.nn.one_hot(y, k, dtype=jnp.float32) - 1.0
    s = jnp.ones(x.shape[0], jnp.float32) if sample_weight is None else jnp.asarray(sample_weight, jnp.float32)
    return _objective(params, x, signs, s, C, regularize_bias)


def _objective(params, x, signs, s, C, regularize_bias):
    scores = jnp.dot(x.astype(jnp.float32), params["w"], precision=_HIGHEST) + params["b"]
    margin = jnp.maximum(0.0, 1.0 - signs * scores)
    reg = jnp.sum(params["w"] ** 2) + (jnp.sum(params["b"] ** 2) if regularize_bias else 0.0)
    return 0.5 * reg + C * jnp.sum(s[:, None] * margin * margin)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter", "memory_size", "regularize_bias"))
def _solve(x, y, s, C, tol, *, num_classes, max_iter, memory_size, regularize_bias):
    signs = 2.0 * jax.nn.one_hot(y, num_classes, dtype=jnp.float32) - 1.0
    fun = functools.partial(_objective, x=x, signs=signs, s=s, C=C, regularize_bias=regularize_bias)
    params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
    opt = optax.lbfgs(memory_size=memory_size,
                      linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
    value_and_grad = optax.value_and_grad_from_state(fun)
    g0 = optax.tree_utils.tree_norm(jax.grad(fun)(params))
    target = tol * jnp.maximum(g0, 1e-30)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def going(carry):
        _, state = carry  # the line search leaves the gradient at the new params in the state
        count = optax.tree_utils.tree_get(state, "count")
        gnorm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (gnorm > target))

    params, state = jax.lax.while_loop(going, step, (params, opt.init(params)))
    value, grad = jax.value_and_grad(fun)(params)
    return params, value, optax.tree_utils.tree_norm(grad) / jnp.maximum(g0, 1e-30), \
        optax.tree_utils.tree_get(state, "count")


def fit(x, y, num_classes: int, C: float = 1.0, *, sample_weight=None, tol: float = 1e-4,
        max_iter: int = 1000, memory_size: int = 20, regularize_bias: bool = True) -> LinearSVM:
    """Train the one-vs-rest squared-hinge SVM on x (n, D) (float or int8; may be sharded by rows) and
    labels y (n,) in 0..num_classes−1. `sample_weight` (n,) weights rows (0: padding)."""
    if C <= 0:
        raise ValueError(f"svm.fit: C must be positive, got {C}")
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"svm.fit: x must be (n, D) and y (n,), got {x.shape} and {y.shape}")
    if num_classes < 2:
        raise ValueError(f"svm.fit: need at least 2 classes, got num_classes={num_classes}")
    s = jnp.ones(x.shape[0], jnp.float32) if sample_weight is None else jnp.asarray(sample_weight, jnp.float32)
    params, value, ratio, count = _solve(
        x, jnp.asarray(y, jnp.int32), s, jnp.float32(C), jnp.float32(tol), num_classes=int(num_classes),
        max_iter=int(max_iter), memory_size=int(memory_size), regularize_bias=bool(regularize_bias))
    ratio = float(ratio)
    return LinearSVM(np.asarray(params["w"]), np.asarray(params["b"]), float(value), int(count), ratio,
                     ratio <= tol)


def scores(model: LinearSVM, x) -> jax.Array:
    """(n, K) decision values x @ W + b."""
    return jnp.dot(jnp.asarray(x).astype(jnp.float32), jnp.asarray(model.weights), precision=_HIGHEST) + model.bias


def predict(model: LinearSVM, x) -> np.ndarray:
    return np.asarray(jnp.argmax(scores(model, x), axis=1))


def accuracy(model: LinearSVM, x, y) -> float:
    return float(np.mean(predict(model, x) == np.asarray(y)))


def l2_normalize(x, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit Euclidean norm (the L2-normalized last-layer baseline); zero rows stay zero."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), eps)


__all__ = ["LinearSVM", "objective", "fit", "scores", "predict", "accuracy", "l2_normalize"]
