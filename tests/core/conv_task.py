"""A small non-decoder Task for the trainer tests: a conv classifier on image batches with a
decomposable (cross-entropy) or batch-level (supervised contrastive) loss."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlx_med.core import config as config_lib
from mlx_med.core.task import LossOutput, Task

IMAGE, CLASSES = 12, 4


def _logical(init, axes):
  return nn.with_logical_partitioning(init, axes)


class SmallConvNet(nn.Module):
  width: int = 16
  embed_dim: int = 32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(self.width, (3, 3), strides=2, kernel_init=_logical(nn.initializers.lecun_normal(),
                                                                   (None, None, None, "mlp")))(images)
    x = nn.gelu(x)
    x = nn.Conv(self.width, (3, 3), strides=2, kernel_init=_logical(nn.initializers.lecun_normal(),
                                                                   (None, None, "mlp", None)))(x)
    x = nn.gelu(x).mean(axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    emb = nn.Dense(self.embed_dim, kernel_init=_logical(nn.initializers.lecun_normal(), ("mlp", "embed")))(x)
    logits = nn.Dense(CLASSES, kernel_init=_logical(nn.initializers.lecun_normal(), ("embed", None)))(emb)
    return emb, logits


def supervised_contrastive(emb, labels, logit_scale):
  """Per-row loss over the whole batch: examples sharing a label are positives (UniCL-style)."""
  z = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  sim = jnp.exp(logit_scale) * z @ z.T
  b = emb.shape[0]
  eye = jnp.eye(b, dtype=bool)
  sim = jnp.where(eye, -1e9, sim)
  log_p = jax.nn.log_softmax(sim, axis=-1)
  pos = (labels[:, None] == labels[None, :]) & ~eye
  n_pos = pos.sum(-1)
  per_row = -jnp.where(pos, log_p, 0.0).sum(-1) / jnp.maximum(n_pos, 1)
  has_pos = (n_pos > 0).astype(jnp.float32)
  return per_row * has_pos, has_pos


def supervised_contrastive_numpy(emb, labels, logit_scale):
  """Independent float64 reference, one row at a time."""
  emb = np.asarray(emb, np.float64)
  z = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  sim = np.exp(logit_scale) * z @ z.T
  total, count = 0.0, 0
  for i in range(len(z)):
    others = [j for j in range(len(z)) if j != i]
    log_norm = np.log(np.sum(np.exp(sim[i, others])))
    positives = [j for j in others if labels[j] == labels[i]]
    if positives:
      total += -np.mean([sim[i, j] - log_norm for j in positives])
      count += 1
  return total, count


class ConvClassifierTask(Task):
  """Images [B, H, W, 1] and labels [B]; loss "xent" (decomposable) or "contrastive" (batch-level)."""

  def __init__(self, loss_kind: str = "contrastive", dropout: float = 0.0, feature_accumulation: bool = True):
    self.model = SmallConvNet(dropout=dropout)
    self.loss_kind = loss_kind
    self.decomposable = loss_kind == "xent"
    self._feature_accumulation = feature_accumulation

  batch_axes = {"image": ("batch", None, None, None), "label": ("batch",)}
  train_flops_per_example = 1e5  # any figure: the trainer reports MFU only where a peak is known

  def init(self, rng):
    params = self.model.init(rng, jnp.zeros((1, IMAGE, IMAGE, 1)), train=False)["params"]
    return {"net": params, "logit_scale": jnp.asarray(np.log(10.0), jnp.float32)}

  def _forward(self, params, batch, rng, train):
    return self.model.apply({"params": params["net"]}, batch["image"], train, rngs={"dropout": rng})

  def loss(self, params, batch, rng, *, rules=None, train=True):
    emb, logits = self._forward(params, batch, rng, train)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    if self.loss_kind == "xent":
      xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return LossOutput(xent.sum(), jnp.float32(xent.shape[0]), {"accuracy": correct.sum()})
    return self.loss_on_features(params, {"emb": emb, "correct": correct}, batch)

  def features(self, params, batch, rng, *, rules=None, train=True):
    emb, logits = self._forward(params, batch, rng, train)
    return {"emb": emb, "correct": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}

  def loss_on_features(self, params, features, batch, *, rules=None):
    per_row, has_pos = supervised_contrastive(features["emb"], batch["label"], params["logit_scale"])
    # The classifier head is not trained by this loss; accuracy is reported per example.
    n = has_pos.sum()
    return LossOutput(per_row.sum(), n, {"accuracy": features["correct"].sum() * n / features["correct"].shape[0]})

  @property
  def supports_feature_accumulation(self):
    return self._feature_accumulation


class ImageSource:
  """Random-access source: class c is a bright 4x4 square in quadrant c, plus noise."""

  def __init__(self, n: int, seed: int):
    rng = np.random.default_rng(seed)
    self.labels = rng.integers(0, CLASSES, n).astype(np.int32)
    self.images = rng.normal(0, 0.3, (n, IMAGE, IMAGE, 1)).astype(np.float32)
    for i, c in enumerate(self.labels):
      r, col = divmod(int(c), 2)
      self.images[i, r * 6 + 1:r * 6 + 5, col * 6 + 1:col * 6 + 5] += 1.0

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def image_batch(n=16, seed=0):
  src = ImageSource(n, seed)
  return {"image": src.images, "label": src.labels}


def image_config(**train):
  config = config_lib.ml_collections.ConfigDict()
  config.seed = 0
  config.peak_flops_per_device = 0.0
  config.train = config_lib.default_train_config()
  config.train.update({**dict(steps=10, batch_size=16, lr=3e-3, warmup_steps=2, log_every=2, eval_every=5,
                              eval_batches=2, ckpt_every=4, weight_decay=0.0, async_checkpointing=False), **train})
  config.mesh = config_lib.default_mesh_config()
  return config
