"""Contrastive losses against independent float64 numpy references, by hand, and across devices.

The references below loop over pairs (i, j) and share no code with `mlx_med.embed.losses`.
Tolerances: float32 JAX against float64 numpy at |logits| <= exp(3) ~ 20 within 1e-5 relative;
sharded / chunked against one device within 1e-5 relative (float32 summation order only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlx_med.embed import losses

B, E = 16, 8
RTOL = 1e-5


# ---------------------------------------------------------------- references (float64, loops)

def ref_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_positives(labels, n):
  """pos[i][j]: i == j, or both rows have a label and share one."""
  pos = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      if i == j:
        pos[i, j] = True
      elif labels is None:
        pos[i, j] = False
      elif np.ndim(labels) == 1:
        pos[i, j] = labels[i] >= 0 and labels[i] == labels[j]
      else:
        pos[i, j] = any(labels[i][k] != 0 and labels[j][k] != 0 for k in range(len(labels[i])))
  return pos


def ref_logits(img, txt, logit_scale, logit_bias=0.0):
  img, txt = ref_normalize(img), ref_normalize(txt)
  n = img.shape[0]
  out = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      out[i, j] = math.exp(logit_scale) * float(np.dot(img[i], txt[j])) + logit_bias
  return out


def ref_unicl(img, txt, labels, logit_scale):
  logits = ref_logits(img, txt, logit_scale)
  n = logits.shape[0]
  pos = ref_positives(labels, n)
  i2t = t2i = 0.0
  for i in range(n):  # image i over all texts
    lse = math.log(sum(math.exp(logits[i, j]) for j in range(n)))
    members = [j for j in range(n) if pos[i, j]]
    i2t += -sum(logits[i, j] - lse for j in members) / len(members)
  for j in range(n):  # text j over all images
    lse = math.log(sum(math.exp(logits[i, j]) for i in range(n)))
    members = [i for i in range(n) if pos[i, j]]
    t2i += -sum(logits[i, j] - lse for i in members) / len(members)
  return 0.5 * (i2t / n + t2i / n)


def ref_siglip(img, txt, labels, logit_scale, logit_bias):
  logits = ref_logits(img, txt, logit_scale, logit_bias)
  n = logits.shape[0]
  pos = ref_positives(labels, n)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if pos[i, j] else -1.0
      total += math.log1p(math.exp(-z * logits[i, j]))  # -log sigmoid(z * logit)
  return total / n


# ---------------------------------------------------------------- data

@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(B, E)).astype(np.float32) * 3.0  # not normalised: the losses normalise
  txt = img * 0.5 + rng.normal(size=(B, E)).astype(np.float32)  # correlated pairs
  ids = rng.integers(-1, 4, size=B).astype(np.int32)  # -1 = no label
  multi_hot = (rng.random((B, 5)) < 0.3).astype(np.int32)
  multi_hot[:2] = 0  # two rows without any label
  return img, txt, ids, multi_hot


def _meshes():
  types = jax.sharding.AxisType
  return {
      "auto": jax.make_mesh((8,), ("data",), axis_types=(types.Auto,)),
      "explicit": jax.make_mesh((8,), ("data",), axis_types=(types.Explicit,)),
  }


@pytest.fixture(scope="module")
def meshes():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  return _meshes()


# ---------------------------------------------------------------- positives and hand examples

def test_positive_mask_rules():
  ids = jnp.array([2, 2, -1, 0, -1])
  want = np.array([[1, 1, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 0, 1, 0, 0],   # no label: own pair only (not positive with the other -1)
                   [0, 0, 0, 1, 0],
                   [0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(losses.positive_mask(ids, 5), want)
  # Multi-hot: any shared label makes a positive; the relation need not be transitive.
  multi_hot = jnp.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 3]])
  want = np.array([[1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0],
                   [0, 1, 1, 0, 0],
                   [0, 0, 0, 1, 0],
                   [0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(losses.positive_mask(multi_hot, 5), want)
  np.testing.assert_array_equal(losses.positive_mask(None, 3), np.eye(3, dtype=bool))


def test_unicl_by_hand_3x3():
  # Unit embeddings e1, e2, e3 on both sides and exp(scale) = 2: logits = 2 I.
  # Rows 0 and 1 share a label, row 2 has none. Row 0: targets (1/2, 1/2, 0), log-softmax
  # (2 - L, -L, -L) with L = log(e^2 + 2): loss L - 1; row 1 the same; row 2: L - 2.
  # Both directions agree (symmetric logits), so the loss is L - 4/3.
  eye = np.eye(3, dtype=np.float32)
  expected = math.log(math.e ** 2 + 2.0) - 4.0 / 3.0
  assert abs(expected - 0.9062114) < 1e-6  # log(9.389056) - 1.333333
  for labels in (np.array([5, 5, -1]), np.array([[1, 0], [1, 1], [0, 0]])):
    loss, metrics = losses.unicl_loss(eye, eye, labels, math.log(2.0), return_metrics=True)
    assert abs(float(loss) - expected) < 1e-6
    assert abs(ref_unicl(eye, eye, labels, math.log(2.0)) - expected) < 1e-12
    assert float(metrics["i2t_top1"]) == 1.0 and float(metrics["t2i_top1"]) == 1.0
    assert abs(float(metrics["positives_per_row"]) - 5.0 / 3.0) < 1e-6
  # CLIP on the same example: every row is L - 2.
  assert abs(float(losses.clip_loss(eye, eye, math.log(2.0))) - (math.log(math.e ** 2 + 2.0) - 2.0)) < 1e-6


def test_siglip_by_hand_2x2():
  # Logits = exp(0) * I + (-1) = [[0, -1], [-1, 0]]; diagonal +1, off-diagonal -1:
  # 2 * (-log sigmoid(0)) + 2 * (-log sigmoid(1)), divided by B = 2.
  eye = np.eye(2, dtype=np.float32)
  expected = (2 * math.log(2.0) + 2 * math.log1p(math.exp(-1.0))) / 2
  assert abs(float(losses.siglip_loss(eye, eye, 0.0, -1.0)) - expected) < 1e-6


# ---------------------------------------------------------------- against the references

@pytest.mark.parametrize("kind", ["none", "ids", "multi_hot"])
@pytest.mark.parametrize("logit_scale", [0.0, math.log(1 / 0.07)])
def test_unicl_matches_reference(data, kind, logit_scale):
  img, txt, ids, multi_hot = data
  labels = {"none": None, "ids": ids, "multi_hot": multi_hot}[kind]
  got = float(losses.unicl_loss(img, txt, labels, logit_scale))
  want = ref_unicl(img, txt, labels, logit_scale)
  assert abs(got - want) <= RTOL * abs(want), (got, want)


def test_clip_equals_unicl_with_unique_labels(data):
  img, txt, _, _ = data
  scale = math.log(1 / 0.07)
  clip = float(losses.clip_loss(img, txt, scale))
  assert abs(clip - float(losses.unicl_loss(img, txt, np.arange(B), scale))) <= 1e-6 * clip
  assert abs(clip - float(losses.unicl_loss(img, txt, np.eye(B, dtype=np.int32), scale))) <= 1e-6 * clip
  # And CLIP's own definition: mean of the two cross-entropies with the diagonal as the class.
  logits = ref_logits(img, txt, scale)
  ce_i = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(B)])
  ce_t = np.mean([np.log(np.exp(logits[:, j]).sum()) - logits[j, j] for j in range(B)])
  assert abs(clip - 0.5 * (ce_i + ce_t)) <= RTOL * clip


def test_unicl_metrics(data):
  img, txt, ids, _ = data
  _, metrics = losses.unicl_loss(img, txt, ids, 2.0, return_metrics=True)
  logits = ref_logits(img, txt, 2.0)
  pos = ref_positives(ids, B)
  want_i2t = np.mean([pos[i, int(np.argmax(logits[i]))] for i in range(B)])
  want_t2i = np.mean([pos[int(np.argmax(logits[:, j])), j] for j in range(B)])
  assert float(metrics["i2t_top1"]) == pytest.approx(want_i2t)
  assert float(metrics["t2i_top1"]) == pytest.approx(want_t2i)
  assert float(metrics["positives_per_row"]) == pytest.approx(pos.sum() / B)
  assert float(0.5 * (metrics["loss_i2t"] + metrics["loss_t2i"])) == pytest.approx(ref_unicl(img, txt, ids, 2.0),
                                                                                   rel=RTOL)


@pytest.mark.parametrize("kind", ["none", "ids", "multi_hot"])
def test_siglip_matches_reference(data, kind):
  img, txt, ids, multi_hot = data
  labels = {"none": None, "ids": ids, "multi_hot": multi_hot}[kind]
  got = float(losses.siglip_loss(img, txt, math.log(10.0), -10.0, labels=labels))
  want = ref_siglip(img, txt, labels, math.log(10.0), -10.0)
  assert abs(got - want) <= RTOL * abs(want), (got, want)


def test_bf16_embeddings_are_computed_in_float32(data):
  img, txt, ids, _ = data
  img16, txt16 = jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16)
  loss = losses.unicl_loss(img16, txt16, ids, 2.0)
  assert loss.dtype == jnp.float32
  want = ref_unicl(np.asarray(img16, np.float32), np.asarray(txt16, np.float32), ids, 2.0)
  assert abs(float(loss) - want) <= RTOL * want


# ---------------------------------------------------------------- global batch across devices

def _rel_close(a, b, rtol=RTOL, atol=0.0):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _grad_atol(g):
  # Gradient entries near zero: compare at 1e-5 of the largest entry of the array.
  return RTOL * float(np.max(np.abs(np.asarray(g))))


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_unicl_sharded_equals_single_device(data, meshes, axis_type):
  img, txt, ids, multi_hot = data
  mesh = meshes[axis_type]
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))

  def loss_and_metrics(img, txt, labels, scale):
    return losses.unicl_loss(img, txt, labels, scale, return_metrics=True)

  value_and_grad = jax.jit(jax.value_and_grad(loss_and_metrics, argnums=(0, 1, 3), has_aux=True))
  for labels in (ids, multi_hot):
    (loss1, m1), g1 = value_and_grad(img, txt, labels, 2.5)
    (loss8, m8), g8 = value_and_grad(shard(img), shard(txt), shard(labels), 2.5)
    assert img.shape[0] == B and shard(img).sharding.spec == P("data")
    _rel_close(loss8, loss1)
    for key in m1:
      _rel_close(m8[key], m1[key])
    for a, b in zip(g8, g1):
      _rel_close(a, b, atol=_grad_atol(b))
    _rel_close(loss1, ref_unicl(img, txt, labels, 2.5))


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_siglip_chunked_equals_unchunked(data, meshes, axis_type):
  img, txt, ids, multi_hot = data
  mesh = meshes[axis_type]
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  scale, bias = math.log(10.0), -10.0
  argnums = (0, 1, 2, 3)

  plain = jax.jit(jax.value_and_grad(lambda i, t, s, b, l: losses.siglip_loss(i, t, s, b, labels=l), argnums))
  chunked = jax.jit(jax.value_and_grad(
      lambda i, t, s, b, l: losses.siglip_loss_chunked(i, t, s, b, mesh=mesh, axis_name="data", labels=l), argnums))
  for labels in (None, multi_hot):
    sharded_labels = None if labels is None else shard(labels)
    loss1, g1 = plain(img, txt, scale, bias, labels)
    loss8, g8 = chunked(shard(img), shard(txt), scale, bias, sharded_labels)
    _rel_close(loss8, loss1)
    _rel_close(loss1, ref_siglip(img, txt, labels, scale, bias))
    for a, b in zip(g8, g1):
      _rel_close(a, b, atol=_grad_atol(b))
  # The ring really is a ring: text chunks move by collective-permute, forward and backward,
  # and no device gathers the batch.
  hlo = chunked.lower(shard(img), shard(txt), scale, bias, None).compile().as_text()
  assert "collective-permute" in hlo and "all-gather" not in hlo
  # Unsharded inputs outside jit, positional mesh/axis as in the shared interface.
  _rel_close(losses.siglip_loss_chunked(img, txt, scale, bias, mesh, "data", labels=ids),
             ref_siglip(img, txt, ids, scale, bias))


def test_siglip_chunked_over_several_mesh_axes(data):
  img, txt, _, multi_hot = data
  types = jax.sharding.AxisType
  scale, bias = 1.0, -2.0
  want = ref_siglip(img, txt, multi_hot, scale, bias)
  # The trainer's layout: batch over ("data", "fsdp"); a tensor axis the batch is not split on.
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(types.Auto,) * 3)
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  fn = jax.jit(lambda i, t, l: losses.siglip_loss_chunked(i, t, scale, bias, mesh, ("data", "fsdp"), labels=l))
  got = fn(*(jax.device_put(x, sharding) for x in (img, txt, multi_hot)))
  _rel_close(got, want)
  # axis_name=None: every mesh axis is a batch axis (B / 8 rows per device).
  _rel_close(losses.siglip_loss_chunked(img, txt, scale, bias, mesh, labels=multi_hot), want)
  # One device: no ring steps, the plain loss.
  single = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(types.Explicit,))
  _rel_close(losses.siglip_loss_chunked(img, txt, scale, bias, single, "data", labels=multi_hot), want)


# ---------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(data, meshes):
  img, txt, ids, _ = data
  with pytest.raises(ValueError, match="same shape"):
    losses.unicl_loss(img, txt[:, :4], ids, 1.0)
  with pytest.raises(ValueError, match=r"\[batch, dim\]"):
    losses.clip_loss(img[0], txt[0], 1.0)
  with pytest.raises(ValueError, match="labels must be"):
    losses.unicl_loss(img, txt, ids[:3], 1.0)
  with pytest.raises(ValueError, match="logit_scale must be a scalar"):
    losses.siglip_loss(img, txt, np.ones(2), 0.0)
  with pytest.raises(ValueError, match="does not divide"):
    losses.siglip_loss_chunked(img[:12], txt[:12], 1.0, 0.0, meshes["auto"], "data")
  with pytest.raises(ValueError, match="not in the mesh"):
    losses.siglip_loss_chunked(img, txt, 1.0, 0.0, meshes["auto"], "batch")
