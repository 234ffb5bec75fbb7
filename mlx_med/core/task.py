"""What a capability hands the trainer: the model-agnostic training interface.

The trainer (`mlx_med.core.trainer`) knows nothing about decoders, images or
towers. A capability describes its model and loss with one small `Task` object:

* `init(rng)` -> the parameter pytree. Leaves may be boxed with Flax logical
  partitioning metadata (`nn.with_logical_partitioning`, `nn.LogicallyPartitioned`);
  the trainer reads the logical axes from the boxes and maps them to the mesh.
  Unboxed leaves are replicated.
* `batch_axes` -> {key: logical axes} for every array of a batch. The first axis of
  every key is the batch axis. A batch with a key not listed here, or missing one,
  is an error (nothing is dropped silently).
* `loss(params, batch, rng, *, rules, train)` -> `LossOutput(loss_sum, weight, metrics)`.
  The reported loss is `loss_sum / weight`, and every entry of `metrics` is a sum
  that is reported divided by `weight` too (token-weighted accuracy, say).
  `rng` is a fresh key per step and per micro-batch (dropout, sampling in a loss).
* `decomposable` -> whether the loss is a sum over examples. Only then may the
  trainer accumulate gradients by summing over micro-batches. A batch-level loss
  (contrastive over the whole batch) is accumulated exactly when the task also
  implements `features` + `loss_on_features` (cached-feature accumulation: features
  of all micro-batches first, the loss's gradient w.r.t. them, then one backward
  per micro-batch); otherwise `train.grad_accum > 1` is refused.
* optional: `eval_metrics(params, batch, *, rules)` (defaults to the loss at
  train=False), `train_flops_per_example` (for MFU), `throughput_unit` (the name
  and count of units in one example: tokens for a language model), and
  `activation_bytes_per_example()` (for the memory check before compiling).

`DecoderLMTask` in `mlx_med.core.lm_task` is one implementation; a short example
of a new family is in docs/DESIGN.md ("Adding a model family").
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax

LogicalAxes = tuple[str | None, ...]


class LossOutput(NamedTuple):
  """A loss as sums: the trainer divides `loss_sum` and each metric by `weight`."""

  loss_sum: jax.Array
  weight: jax.Array
  metrics: Mapping[str, jax.Array]


class Task:
  """Base class of everything the trainer can train. Subclass and fill in the abstract parts."""

  #: the loss is a sum over examples (gradients of micro-batches may be summed)
  decomposable: bool = True

  @property
  def batch_axes(self) -> Mapping[str, LogicalAxes]:
    raise NotImplementedError(f"{type(self).__name__} must define batch_axes")

  def init(self, rng: jax.Array) -> Any:
    raise NotImplementedError(f"{type(self).__name__} must define init(rng)")

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *, rules=None,
           train: bool = True) -> LossOutput:
    raise NotImplementedError(f"{type(self).__name__} must define loss(params, batch, rng, rules=, train=)")

  def eval_metrics(self, params: Any, batch: Mapping[str, jax.Array], *, rules=None) -> LossOutput:
    """Evaluation sums; by default the loss without dropout and with a fixed key."""
    return self.loss(params, batch, jax.random.key(0), rules=rules, train=False)

  # Cached-feature accumulation for losses that do not decompose over examples.
  # `features` maps a micro-batch to a pytree of per-example arrays (leading axis =
  # batch); `loss_on_features` computes the loss from the features of the WHOLE
  # batch (it may also use params, e.g. a learned temperature).
  def features(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *, rules=None,
               train: bool = True) -> Any:
    raise NotImplementedError

  def loss_on_features(self, params: Any, features: Any, batch: Mapping[str, jax.Array], *,
                       rules=None) -> LossOutput:
    raise NotImplementedError

  @property
  def supports_feature_accumulation(self) -> bool:
    cls = type(self)
    return cls.features is not Task.features and cls.loss_on_features is not Task.loss_on_features

  #: training FLOPs (forward + backward) of one example, for MFU; None = unknown
  train_flops_per_example: float | None = None

  #: (unit name, units per example) for throughput figures, e.g. ("tokens", 2048)
  throughput_unit: tuple[str, int] = ("examples", 1)

  def activation_bytes_per_example(self) -> float | None:
    """Training activation memory of one example (an estimate), for the pre-compile
    memory check (`mlx_med.core.memory`); None = unknown, only params and optimizer are checked."""
    return None

  def describe(self) -> str:
    return type(self).__name__
