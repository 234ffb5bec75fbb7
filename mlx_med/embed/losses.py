"""Contrastive losses for two-tower image-text models: UniCL, CLIP and SigLIP.

All losses take the two towers' embeddings `[B, E]` (any float dtype; the loss is computed in
float32), L2-normalise them here (idempotent for inputs that already are), and read the
temperature in log space, as CLIP and SigLIP store it: `logits = exp(logit_scale) * img @ txt.T`
(+ `logit_bias` for the sigmoid loss). Clipping the scale (CLIP clips `exp` at 100) is the
model's business, not the loss's.

Positives. Pair `i` of the batch is image `i` with text `i`. With `labels`, image `i` and text `j`
are also a positive pair when they share a label, which is UniCL's image-text-label space:

* integer class ids `[B]`: positive iff `labels[i] == labels[j]`; a negative id means "no label";
* multi-hot `[B, K]` (any numeric dtype, nonzero = present): positive iff the two rows share at
  least one label (`labels[i] . labels[j] > 0`). The overlap count is not used as a weight: every
  positive of a row has the same weight, however many labels it shares;
* a row with no label (id < 0, or an all-zero multi-hot row) is positive with its own pair only;
* the diagonal is always positive.

The positive set is symmetric, so "text j is positive for image i" and "image i is positive for
text j" are the same statement.

`unicl_loss` (Yang et al., "Unified Contrastive Learning in Image-Text-Label Space", 2022): for
every image, cross-entropy between the softmax over all texts of the batch and the target
distribution that is uniform over that image's positives; the same for every text over all
images; each direction is averaged over the batch and the loss is the mean of the two directions
(the paper writes the sum; the mean keeps the scale of CLIP's loss). `clip_loss` is the same with
the diagonal as the only positives: CLIP's symmetric cross-entropy.

`siglip_loss` (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023): a binary
log-sigmoid loss on every pair with target +1 for positives (the diagonal, or shared labels when
given) and -1 elsewhere, summed over all `B^2` pairs and divided by `B`.
`siglip_loss_chunked` computes the same number without ever holding the `[B, B]` logits: under
`jax.shard_map` over the batch axes every device scores its images against the text chunk it
holds, then passes that chunk (with its labels) to the next device on a ring with
`jax.lax.ppermute`, n_devices - 1 times, and the per-device sums are added with `psum`. That is
the chunked sigmoid loss of big_vision's SigLIP trainer; each device holds `[B/n, B/n]` logits.

Batch-level losses must see the whole batch. Under `jax.jit` with batch-sharded inputs the
plain functions compute the global loss: with Auto mesh axes XLA gathers what it needs; with
Explicit axes the inputs are resharded to replicated first (an explicitly sharded operand
cannot be contracted against another one sharded on the same mesh axis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array

_EPS = 1e-6
# `jax.reshard` (newer name) or `jax.sharding.reshard`.
_reshard = getattr(jax, "reshard", None) or jax.sharding.reshard


def l2_normalize(x: Array, eps: float = _EPS) -> Array:
  """Rows scaled to unit L2 norm (in float32); rows with norm below `eps` are divided by eps."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _similarity(img: Array, txt: Array) -> Array:
  # Full float32 precision: B^2 E flops are negligible next to the towers, while TF32/bf16 passes
  # on accelerators would put ~1e-3 relative error into logits scaled by up to 100.
  return jnp.matmul(img, txt.T, precision=jax.lax.Precision.HIGHEST)


def _explicitly_sharded(x: Array) -> bool:
  typeof = getattr(jax, "typeof", None)
  axis_type = getattr(jax.sharding, "AxisType", None)
  if typeof is None or axis_type is None:
    return False
  sharding = getattr(typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(s is None for s in spec):
    return False
  return _has_explicit_axes(sharding.mesh)


def _has_explicit_axes(mesh) -> bool:
  axis_type = getattr(jax.sharding, "AxisType", None)
  return axis_type is not None and any(t == axis_type.Explicit for t in getattr(mesh, "axis_types", ()))


def _replicated(x: Array) -> Array:
  """`x` replicated when it is explicitly sharded over mesh axes; unchanged otherwise."""
  if _explicitly_sharded(x):
    mesh = jax.typeof(x).sharding.mesh
    return _reshard(x, jax.sharding.NamedSharding(mesh, P(*([None] * x.ndim))))
  return x


def _check_pair(img_emb: Array, txt_emb: Array, labels: Array | None, name: str) -> None:
  """Entry checks: clear errors for mismatched shapes and labels."""
  if img_emb.ndim != 2 or txt_emb.ndim != 2:
    raise ValueError(f"{name}: embeddings must be [batch, dim]; got image {img_emb.shape} and text {txt_emb.shape}")
  if img_emb.shape != txt_emb.shape:
    raise ValueError(f"{name}: image embeddings {img_emb.shape} and text embeddings {txt_emb.shape} must have the "
                     "same shape (one text per image, one shared embedding dimension)")
  chex.assert_equal_shape([img_emb, txt_emb])
  if labels is not None:
    if labels.ndim not in (1, 2) or labels.shape[0] != img_emb.shape[0]:
      raise ValueError(f"{name}: labels must be integer ids [batch] or multi-hot [batch, num_labels] with "
                       f"batch={img_emb.shape[0]}; got shape {labels.shape}")
    chex.assert_shape(labels, (img_emb.shape[0],) + labels.shape[1:])


def _check_scalar(value, what: str, name: str) -> Array:
  value = jnp.asarray(value, jnp.float32)
  if value.size != 1:
    raise ValueError(f"{name}: {what} must be a scalar (log-space temperature / bias); got shape {value.shape}")
  return value.reshape(())


def _has_label(labels: Array) -> Array:
  if labels.ndim == 1:
    return labels >= 0
  return jnp.any(labels != 0, axis=-1)


def _shared_label(row_labels: Array, col_labels: Array) -> Array:
  """[b_rows, b_cols] bool: row i and column j share a label (no-label rows share nothing)."""
  if row_labels.ndim == 1:
    same = row_labels[:, None] == col_labels[None, :]
    return same & _has_label(row_labels)[:, None] & _has_label(col_labels)[None, :]
  rows = (row_labels != 0).astype(jnp.float32)
  cols = (col_labels != 0).astype(jnp.float32)
  return (rows @ cols.T) > 0.5


def positive_mask(labels: Array | None, batch_size: int) -> Array:
  """[B, B] bool: image i and text j are a positive pair (the rule in the module docstring)."""
  eye = jnp.eye(batch_size, dtype=bool)
  if labels is None:
    return eye
  return eye | _shared_label(labels, labels)


def _contrastive_metrics(logits: Array, positives: Array) -> dict[str, Array]:
  i2t = jnp.take_along_axis(positives, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0]
  t2i = jnp.take_along_axis(positives, jnp.argmax(logits, axis=0)[None, :], axis=0)[0]
  return {
      "i2t_top1": jnp.mean(i2t.astype(jnp.float32)),
      "t2i_top1": jnp.mean(t2i.astype(jnp.float32)),
      "positives_per_row": jnp.mean(jnp.sum(positives, axis=1).astype(jnp.float32)),
  }


def unicl_loss(img_emb: Array, txt_emb: Array, labels: Array | None, logit_scale, *,
               return_metrics: bool = False):
  """UniCL loss over the image-text-label space of the whole batch (module docstring).

  Args:
    img_emb, txt_emb: `[B, E]` embeddings of pair i = (image i, text i); normalised here.
    labels: integer ids `[B]` (negative = none), multi-hot `[B, K]`, or None (CLIP's loss).
    logit_scale: scalar, log of the inverse temperature.
    return_metrics: also return a dict of batch means: `i2t_top1` / `t2i_top1` (the top-scored
      text / image is a positive), `positives_per_row`, `loss_i2t`, `loss_t2i`.
  Returns:
    The scalar loss (float32), or `(loss, metrics)`.
  """
  _check_pair(img_emb, txt_emb, labels, "unicl_loss")
  scale = _check_scalar(logit_scale, "logit_scale", "unicl_loss")
  img, txt = _replicated(l2_normalize(img_emb)), _replicated(l2_normalize(txt_emb))
  if labels is not None:
    labels = _replicated(labels)
  batch = img.shape[0]
  positives = positive_mask(labels, batch)
  # Image i's target over texts is row i of `positives` over its count; text j's target over
  # images is column j over its count. (With multi-hot labels two positives can have different
  # counts -- sharing is not transitive -- so the two normalisations differ.)
  pos = positives.astype(jnp.float32)
  logits = jnp.exp(scale) * _similarity(img, txt)
  targets_i2t = pos / jnp.sum(pos, axis=1, keepdims=True)
  targets_t2i = pos / jnp.sum(pos, axis=0, keepdims=True)
  loss_i2t = -jnp.mean(jnp.sum(targets_i2t * jax.nn.log_softmax(logits, axis=1), axis=1))
  loss_t2i = -jnp.mean(jnp.sum(targets_t2i * jax.nn.log_softmax(logits, axis=0), axis=0))
  loss = 0.5 * (loss_i2t + loss_t2i)
  if not return_metrics:
    return loss
  metrics = _contrastive_metrics(logits, positives)
  metrics.update(loss_i2t=loss_i2t, loss_t2i=loss_t2i)
  return loss, metrics


def clip_loss(img_emb: Array, txt_emb: Array, logit_scale, *, return_metrics: bool = False):
  """CLIP's symmetric cross-entropy: UniCL with the diagonal as the only positives."""
  return unicl_loss(img_emb, txt_emb, None, logit_scale, return_metrics=return_metrics)


def _sigmoid_block_sum(img: Array, txt: Array, scale: Array, bias: Array, positives: Array) -> Array:
  logits = jnp.exp(scale) * _similarity(img, txt) + bias
  signs = 2.0 * positives.astype(jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits))


def siglip_loss(img_emb: Array, txt_emb: Array, logit_scale, logit_bias, *,
                labels: Array | None = None) -> Array:
  """SigLIP's sigmoid loss on the whole batch: sum over all B^2 pairs of -log sigmoid(z_ij * logit_ij), / B.

  `z_ij` = +1 for positives (the diagonal; with `labels`, also pairs sharing a label, by the
  rule in the module docstring), -1 elsewhere; `logit_ij = exp(logit_scale) * cos(img_i, txt_j)
  + logit_bias`. Embeddings are normalised here.
  """
  _check_pair(img_emb, txt_emb, labels, "siglip_loss")
  scale = _check_scalar(logit_scale, "logit_scale", "siglip_loss")
  bias = _check_scalar(logit_bias, "logit_bias", "siglip_loss")
  img, txt = _replicated(l2_normalize(img_emb)), _replicated(l2_normalize(txt_emb))
  if labels is not None:
    labels = _replicated(labels)
  batch = img.shape[0]
  return _sigmoid_block_sum(img, txt, scale, bias, positive_mask(labels, batch)) / batch


def _batch_axes(mesh: Mesh, axis_name: str | Sequence[str] | None) -> tuple[str, ...]:
  if axis_name is None:
    axes = tuple(mesh.axis_names)
  elif isinstance(axis_name, str):
    axes = (axis_name,)
  else:
    axes = tuple(axis_name)
  missing = [a for a in axes if a not in mesh.shape]
  if missing or not axes:
    raise ValueError(f"siglip_loss_chunked: axis_name {axis_name!r} names no axis or axes not in the mesh "
                     f"{dict(mesh.shape)} ({missing}); pass the mesh axes the batch is sharded over")
  return axes


def siglip_loss_chunked(img_emb: Array, txt_emb: Array, logit_scale, logit_bias,
                        mesh: Mesh, axis_name: str | Sequence[str] | None = None, *,
                        labels: Array | None = None) -> Array:
  """`siglip_loss` computed on a ring of devices, never materialising the [B, B] logits.

  The batch axis is split over the mesh axes `axis_name` (a name, several names -- the chunk
  order is their row-major device order, as in a PartitionSpec -- or None for every mesh axis);
  the batch size must divide by the number of devices on those axes. Each device scores its
  `B/n` images against its own text chunk (positives on the diagonal), then n - 1 times receives
  the previous device's text chunk by `ppermute` and scores it (negatives, unless `labels` make
  some pairs positive); the per-device sums are `psum`-med and divided by the global B.
  Works inside or outside `jax.jit`, on meshes with Auto or Explicit axis types; the gradient
  is the same as that of `siglip_loss` (the transpose of `ppermute` is the reverse ring).
  """
  _check_pair(img_emb, txt_emb, labels, "siglip_loss_chunked")
  scale = _check_scalar(logit_scale, "logit_scale", "siglip_loss_chunked")
  bias = _check_scalar(logit_bias, "logit_bias", "siglip_loss_chunked")
  axes = _batch_axes(mesh, axis_name)
  n = math.prod(mesh.shape[a] for a in axes)
  batch = img_emb.shape[0]
  if batch % n:
    raise ValueError(f"siglip_loss_chunked: batch {batch} does not divide over the {n} devices of mesh axes "
                     f"{axes}; use a batch size that is a multiple of {n}")
  batch_spec = axes if len(axes) > 1 else axes[0]
  ring = [(i, (i + 1) % n) for i in range(n)]

  def local(img, txt, lab, scale, bias):
    img, txt = l2_normalize(img), l2_normalize(txt)
    b = img.shape[0]
    own = jnp.eye(b, dtype=bool)

    def positives(chunk_labels, is_own):
      pos = own if is_own else jnp.zeros((b, b), bool)
      if chunk_labels is not None:
        pos = pos | _shared_label(lab, chunk_labels)
      return pos

    total = _sigmoid_block_sum(img, txt, scale, bias, positives(lab, True))

    def step(_, carry):
      txt_chunk, lab_chunk, acc = carry
      txt_chunk = jax.lax.ppermute(txt_chunk, axes, ring)
      if lab_chunk is not None:
        lab_chunk = jax.lax.ppermute(lab_chunk, axes, ring)
      acc = acc + _sigmoid_block_sum(img, txt_chunk, scale, bias, positives(lab_chunk, False))
      return txt_chunk, lab_chunk, acc

    if n > 1:
      _, _, total = jax.lax.fori_loop(1, n, step, (txt, lab, total))
    return jax.lax.psum(total, axes) / (b * n)

  if labels is None:
    fn = lambda img, txt, scale, bias: local(img, txt, None, scale, bias)
    operands = (img_emb, txt_emb, scale, bias)
    in_specs = (P(batch_spec), P(batch_spec), P(), P())
  else:
    fn = local
    operands = (img_emb, txt_emb, labels, scale, bias)
    in_specs = (P(batch_spec), P(batch_spec), P(batch_spec), P(), P())
  if _has_explicit_axes(mesh):
    # shard_map over Explicit axes takes operands already laid out as in_specs says.
    operands = tuple(_reshard(x, jax.sharding.NamedSharding(mesh, spec))
                     for x, spec in zip(operands, in_specs))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P())(*operands)
