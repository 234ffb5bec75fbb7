"""Few-parameter adapters on frozen embeddings: a kNN classifier and a linear probe.

The standard ways to measure (and use) an embedding with labelled examples, next to zero-shot:

- `KNNClassifier`: the k nearest training embeddings (an `ExactIndex`, so search is exact,
  batched and sharded) vote for their labels. Votes are weighted "uniform", "distance"
  (1 / Euclidean distance, with an exact match taking the whole vote: scikit-learn's
  `weights="distance"` rule; for cosine the distance is that of the normalised vectors,
  sqrt(2 - 2 cos)) or "similarity" (exp(cos / temperature), the DINO-style kNN of
  self-supervised evaluations). Single-label targets [N] give class probabilities; multi-hot
  targets [N, K] give per-label scores in [0, 1] (the weighted share of neighbours carrying it).
- `LinearProbe`: L2-regularised logistic regression in JAX, fitted by L-BFGS (optax.lbfgs with its
  zoom line search) to a gradient-norm tolerance. Regularisation follows scikit-learn's `C`: the
  minimised objective is sum_i loss_i + ||W||^2 / (2 C) (the bias is not penalised), computed as
  its mean over examples for fp32 conditioning. Multi-class targets use a softmax over the
  classes (scikit-learn's multinomial form); two classes, and each label of a multi-hot target,
  use one sigmoid logit (scikit-learn's binary form), so the optimum is the one scikit-learn finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlx_med.embed.index import ExactIndex

WEIGHTS = ("uniform", "distance", "similarity")


class AdapterInputError(ValueError):
  """Bad features or labels for an adapter (one-line message)."""


def _features(x: Any, what: str, dim: int | None = None) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise AdapterInputError(f"{what} must be a non-empty [N, E] array; got shape {x.shape}")
  if dim is not None and x.shape[1] != dim:
    raise AdapterInputError(f"{what} have dimension {x.shape[1]} but the adapter was fitted on {dim}")
  if not np.all(np.isfinite(x)):
    raise AdapterInputError(f"{what} hold NaN or inf; drop or recompute those embeddings")
  return x


def _targets(y: Any, n: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(targets, classes): multi-hot [N, K] float with classes None, or class indices [N] with classes."""
  y = np.asarray(y)
  if y.shape[0] != n:
    raise AdapterInputError(f"{n} embeddings but {y.shape[0]} label rows; give one label row per embedding")
  if y.ndim == 2:
    if not np.all(np.isin(y, (0, 1))):
      raise AdapterInputError("multi-hot labels [N, K] must be 0/1")
    return y.astype(np.float32), None
  if y.ndim != 1:
    raise AdapterInputError(f"labels must be [N] class ids or [N, K] multi-hot; got shape {y.shape}")
  classes, index = np.unique(y, return_inverse=True)
  if len(classes) < 2:
    raise AdapterInputError(f"labels hold a single class ({classes[0]!r}); a classifier needs at least two")
  return index.astype(np.int32), classes


# ------------------------------------------------------------------------------------- kNN


class KNNClassifier:
  """k-nearest-neighbour votes over an exact index of training embeddings.

  Args:
    k: neighbours per query.
    weights: "uniform" | "distance" | "similarity" (see the module docstring).
    metric: "cosine" (embeddings normalised) or "l2" (raw Euclidean).
    temperature: for "similarity" weights, exp(cos / temperature).
  """

  def __init__(self, k: int = 10, *, weights: str = "distance", metric: str = "cosine", temperature: float = 0.07,
               devices: Sequence[jax.Device] | None = None):
    if weights not in WEIGHTS:
      raise AdapterInputError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if metric not in ("cosine", "l2"):
      raise AdapterInputError(f"unknown metric {metric!r}; choose 'cosine' or 'l2'")
    if weights == "similarity" and metric != "cosine":
      raise AdapterInputError("weights='similarity' needs metric='cosine'")
    self.k, self.weights, self.metric, self.temperature, self.devices = k, weights, metric, temperature, devices
    self.index: ExactIndex | None = None

  def fit(self, embeddings: Any, labels: Any, ids: Sequence[str] | None = None) -> KNNClassifier:
    x = _features(embeddings, "training embeddings")
    if x.shape[0] < self.k:
      raise AdapterInputError(f"k={self.k} neighbours but only {x.shape[0]} training embeddings; lower k")
    self.targets, self.classes_ = _targets(labels, x.shape[0])
    self.index = ExactIndex(x, ids, metric=self.metric, devices=self.devices)
    return self

  @property
  def multi_label(self) -> bool:
    return self.classes_ is None

  def kneighbors(self, embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
    """(Euclidean distances [Q, k] (of normalised vectors for cosine), indices [Q, k]), nearest first."""
    if self.index is None:
      raise AdapterInputError("the kNN classifier is not fitted; call fit(embeddings, labels) first")
    scores, idx = self.index.search(_features(embeddings, "query embeddings", self.index.dim), self.k)
    squared = 2.0 - 2.0 * scores if self.metric == "cosine" else scores
    return np.sqrt(np.maximum(squared, 0.0)), idx

  def _vote_weights(self, dist: np.ndarray) -> np.ndarray:
    if self.weights == "uniform":
      return np.ones_like(dist)
    if self.weights == "similarity":
      cos = 1.0 - 0.5 * dist ** 2
      return np.exp((cos - 1.0) / self.temperature)  # shifted by the max possible cosine: same ratios
    exact = dist == 0
    with np.errstate(divide="ignore"):
      inverse = 1.0 / dist
    return np.where(exact.any(axis=1, keepdims=True), exact.astype(dist.dtype), inverse)

  def predict_proba(self, embeddings: Any) -> np.ndarray:
    """[Q, C] class probabilities (columns in `classes_` order) or [Q, K] per-label scores."""
    dist, idx = self.kneighbors(embeddings)
    w = self._vote_weights(dist.astype(np.float64))
    if self.multi_label:
      votes = self.targets[idx]  # [Q, k, K]
    else:
      votes = np.eye(len(self.classes_))[self.targets[idx]]  # [Q, k, C]
    return (np.einsum("qk,qkc->qc", w, votes) / w.sum(axis=1, keepdims=True)).astype(np.float32)

  def predict_scores(self, embeddings: Any) -> np.ndarray:
    """Per-label (or per-class) scores [Q, K] for ROC evaluation: the same as predict_proba."""
    return self.predict_proba(embeddings)

  def predict(self, embeddings: Any) -> np.ndarray:
    proba = self.predict_proba(embeddings)
    return (proba >= 0.5).astype(np.int32) if self.multi_label else self.classes_[np.argmax(proba, axis=1)]


# ---------------------------------------------------------------------------------- probe


def _logits(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  return x @ params["w"] + params["b"]


def _loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, penalty: float, softmax: bool) -> jax.Array:
  logits = _logits(params, x)
  if softmax:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  else:
    per_example = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y), axis=-1)
  return jnp.mean(per_example) + 0.5 * penalty * jnp.sum(jnp.square(params["w"]))


def _fit_lbfgs(x: jax.Array, y: jax.Array, penalty: jax.Array, init: dict[str, jax.Array], *, softmax: bool,
               max_iter: int, tol: float):
  fun = lambda p: _loss(p, x, y, penalty, softmax)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(keep_going, step, (init, solver.init(init)))
  return params, optax.tree.get(state, "count"), optax.tree.norm(optax.tree.get(state, "grad")), fun(params)


_fit_jit = jax.jit(_fit_lbfgs, static_argnames=("softmax", "max_iter", "tol"))


class LinearProbe:
  """L2-regularised logistic regression (softmax or per-label sigmoid) fitted by L-BFGS in JAX.

  Args:
    C: inverse regularisation strength, as scikit-learn's LogisticRegression.
    multi_label: None = from the targets ([N, K] multi-hot: one sigmoid per label; [N] class ids:
      softmax); True = one sigmoid per label, class ids being turned into one-hot columns
      (one-vs-rest); False = class ids required.
    max_iter: L-BFGS iterations at most.
    tol: stop when the gradient norm of the mean objective falls below this.
  After `fit`: `w` [E, O], `b` [O], `n_iter`, `grad_norm`, `converged`.
  """

  def __init__(self, C: float = 1.0, *, multi_label: bool | None = None, max_iter: int = 1000, tol: float = 1e-6):
    if C <= 0:
      raise AdapterInputError(f"C must be positive; got {C}")
    self.C, self.max_iter, self.tol = float(C), int(max_iter), float(tol)
    self._multi_label_option = multi_label
    self.w: np.ndarray | None = None

  def fit(self, embeddings: Any, labels: Any) -> LinearProbe:
    x = _features(embeddings, "training embeddings")
    targets, self.classes_ = _targets(labels, x.shape[0])
    if self._multi_label_option is False and self.classes_ is None:
      raise AdapterInputError("multi_label=False needs class ids [N]; got multi-hot labels [N, K]")
    if self._multi_label_option and self.classes_ is not None:
      targets = np.eye(len(self.classes_), dtype=np.float32)[targets]  # one-vs-rest columns, in classes_ order
      self.label_classes_, self.classes_ = self.classes_, None
    self._softmax = self.classes_ is not None and len(self.classes_) > 2
    if self.classes_ is None:
      constant = np.flatnonzero(np.all(targets == targets[:1], axis=0))
      if constant.size:
        # The unpenalised bias of such a label would run off to +-infinity.
        raise AdapterInputError(f"label column {int(constant[0])} has a single class in the training rows; "
                                "drop it or add examples of both classes")
      y = jnp.asarray(targets)
      outputs = targets.shape[1]
    elif self._softmax:
      y = jnp.asarray(targets)
      outputs = len(self.classes_)
    else:  # two classes: one logit for the second class, as scikit-learn's binary model
      y = jnp.asarray(targets[:, None].astype(np.float32))
      outputs = 1
    init = {"w": jnp.zeros((x.shape[1], outputs), jnp.float32), "b": jnp.zeros((outputs,), jnp.float32)}
    penalty = jnp.float32(1.0 / (self.C * x.shape[0]))
    params, n_iter, grad_norm, value = _fit_jit(jnp.asarray(x), y, penalty, init, softmax=self._softmax,
                                                max_iter=self.max_iter, tol=self.tol)
    self.w, self.b = np.asarray(params["w"]), np.asarray(params["b"])
    self.n_iter, self.grad_norm, self.objective = int(n_iter), float(grad_norm), float(value)
    self.converged = self.grad_norm < self.tol
    return self

  @property
  def multi_label(self) -> bool:
    return self.classes_ is None

  def decision_function(self, embeddings: Any) -> np.ndarray:
    if self.w is None:
      raise AdapterInputError("the linear probe is not fitted; call fit(embeddings, labels) first")
    x = _features(embeddings, "embeddings", self.w.shape[0])
    return x.astype(np.float64) @ self.w + self.b

  def predict_proba(self, embeddings: Any) -> np.ndarray:
    """[Q, C] class probabilities (`classes_` order) or [Q, K] per-label probabilities."""
    z = self.decision_function(embeddings)
    if self._softmax:
      z = np.exp(z - z.max(axis=1, keepdims=True))
      return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-z))
    return (p if self.multi_label else np.concatenate([1 - p, p], axis=1)).astype(np.float32)

  def predict_scores(self, embeddings: Any) -> np.ndarray:
    """Per-label (or per-class) scores [Q, K] for ROC evaluation: the same as predict_proba."""
    return self.predict_proba(embeddings)

  def predict(self, embeddings: Any) -> np.ndarray:
    proba = self.predict_proba(embeddings)
    return (proba >= 0.5).astype(np.int32) if self.multi_label else self.classes_[np.argmax(proba, axis=1)]
