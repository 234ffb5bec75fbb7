"""Every attention path (and the CPU dense-matmul backward) against plain jnp.

The reference is written out here, not imported: softmax(Q K^T / sqrt(d) with
masked scores replaced by the most negative float) V, grouped-query heads by
repetition. Replacing (rather than adding -inf) is the convention the `xla`
backend defines: a query with no valid key (padding) gets the uniform average
of all values and no gradient into its scores. Forward and gradients must agree
at fp32 1e-5, including packed segments, padding, GQA, blocks that do not
divide the length, and the non-causal (KV-cache) path; decoding from a KV cache
must reproduce the full forward.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core import attention as attention_lib
from mlx_med.core.layers import cpu_dense_dot_general
from mlx_med.core.params import init_params
from mlx_med.core.transformer import Decoder, DecoderConfig, init_cache

TOL = dict(rtol=1e-5, atol=1e-5)
# Backends beyond the default `xla`; each must match the reference. `jax` is the
# cudnn backend's code path (causal mode, sequence lengths or mask) with JAX's
# XLA implementation, so it runs here on CPU at fp32.
NEW_PATHS = ("cpu", "jax")


def reference_attention(q, k, v, mask):
  """Plain jnp: q [B,T,H,D], k/v [B,S,K,D], mask [B,T,S] bool -> [B,T,H,D]."""
  group = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _inputs(b, t, s, heads, kv_heads, d, seed):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)  # cotangent weights
  return q, k, v, w


def _packed_causal_mask(b, t):
  """Row 0: two packed segments and leading padding; row 1: trailing padding."""
  seg = np.ones((b, t), np.int32)
  seg[0, : t // 8] = 0
  seg[0, t // 3:] = 2
  seg[1 % b, t - t // 4:] = 0
  seg = jnp.asarray(seg)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return attention_lib.make_mask(seg, seg, slots, slots, causal=True)


def _check_forward_and_grads(backend, q, k, v, w, mask, mask_is_causal):
  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

  ours = lambda q, k, v: attention_lib.attend(q, k, v, mask, backend, mask_is_causal=mask_is_causal)
  ref = lambda q, k, v: reference_attention(q, k, v, mask)
  # One compiled function per side (forward and gradients together) keeps this fast.
  both = lambda fn: jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)))
  (out, got), (want_out, want) = both(ours)(q, k, v), both(ref)(q, k, v)
  np.testing.assert_allclose(out, want_out, **TOL)
  for name, g, r in zip("qkv", got, want):
    np.testing.assert_allclose(g, r, err_msg=f"d{name}", **TOL)


@pytest.mark.parametrize("backend,t,heads,kv_heads,block", [
    ("xla", 40, 4, 2, 16),  # the reference's conventions are those of the default backend
    *[(b, 70, 6, 2, 32) for b in NEW_PATHS],  # GQA; 70 % 32 != 0: a ragged last block
    *[(b, 40, 4, 4, 128) for b in NEW_PATHS],  # no GQA; one block longer than the sequence
])
def test_causal_self_attention_matches_reference(backend, t, heads, kv_heads, block, monkeypatch):
  monkeypatch.setattr(attention_lib, "CPU_BLOCK", block)
  q, k, v, w = _inputs(2, t, t, heads, kv_heads, 16, seed=t)
  mask = _packed_causal_mask(2, t)
  _check_forward_and_grads(backend, q, k, v, w, mask, mask_is_causal=True)


@pytest.mark.parametrize("backend", NEW_PATHS)
def test_general_mask_without_causal_promise(backend, monkeypatch):
  """A KV-cache-shaped call: 5 new queries over 48 slots, some slots empty."""
  monkeypatch.setattr(attention_lib, "CPU_BLOCK", 4)
  b, t, s = 2, 5, 48
  q, k, v, w = _inputs(b, t, s, 4, 2, 8, seed=3)
  kv_seg = np.ones((b, s), np.int32)
  kv_seg[:, 30:] = 0  # empty cache slots
  kv_seg[1, :6] = 0  # left padding
  q_seg = jnp.ones((b, t), jnp.int32).at[1, 0].set(0)  # a padding query: no valid key
  q_slots = jnp.broadcast_to(20 + jnp.arange(t, dtype=jnp.int32), (b, t))
  kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  mask = attention_lib.make_mask(q_seg, jnp.asarray(kv_seg), q_slots, kv_slots, causal=True)
  _check_forward_and_grads(backend, q, k, v, w, mask, mask_is_causal=False)


def test_causal_promise_ignored_when_lengths_differ():
  q, k, v, w = _inputs(1, 4, 12, 2, 2, 8, seed=5)
  mask = jnp.ones((1, 4, 12), bool)
  out = jax.jit(lambda q, k, v: attention_lib.attend(q, k, v, mask, "cpu", mask_is_causal=True))(q, k, v)
  np.testing.assert_allclose(out, jax.jit(reference_attention)(q, k, v, mask), **TOL)


@pytest.mark.parametrize("x_shape,w_shape,contract", [
    ((3, 7, 16), (16, 24), 1),      # tokens x features -> wider (x^T is the smaller operand)
    ((3, 7, 24), (24, 16), 1),      # -> narrower (dy^T is the smaller operand)
    ((2, 5, 16), (16, 4, 8), 1),    # q/k/v projections: features (heads, head_dim)
    ((2, 5, 4, 8), (4, 8, 16), 2),  # o_proj: contracts (heads, head_dim)
])
def test_cpu_dense_dot_general_matches_lax(x_shape, w_shape, contract):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  dims = ((tuple(range(len(x_shape) - contract, len(x_shape))), tuple(range(contract))), ((), ()))
  out_shape = x_shape[:len(x_shape) - contract] + w_shape[contract:]
  cot = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  loss = lambda fn: (lambda x, w: jnp.sum(fn(x, w, dims) * cot))
  both = lambda fn: jax.jit(lambda x, w: (fn(x, w, dims), jax.grad(loss(fn), argnums=(0, 1))(x, w)))
  (out, got), (want_out, want) = both(cpu_dense_dot_general)(x, w), both(jax.lax.dot_general)(x, w)
  np.testing.assert_allclose(out, want_out, **TOL)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, **TOL)


def test_dense_layer_params_unchanged_by_custom_dot():
  """Same parameter tree and initial values as a stock DenseGeneral."""
  x = jnp.ones((2, 3, 8))
  stock = nn.DenseGeneral((4, 2), use_bias=True).init(jax.random.key(0), x)
  ours = nn.DenseGeneral((4, 2), use_bias=True, dot_general=cpu_dense_dot_general).init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, stock, ours)


SMALL = DecoderConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                      max_seq_len=64, attention_backend="cpu")


@pytest.fixture(scope="module")
def small_params():
  return init_params(SMALL, jax.random.key(0))


def test_decoder_cpu_backend_matches_xla_backend(small_params):
  """Whole-model logits and parameter gradients: `cpu` vs the dense `xla` backend.

  One layer (the first of the two) keeps the two compiles short; the cache test
  below runs both layers.
  """
  import dataclasses
  one_layer = dataclasses.replace(SMALL, num_layers=1)
  small_params = {**small_params, "layers": jax.tree.map(lambda x: x[:1], small_params["layers"])}
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, SMALL.vocab_size, (2, 40)), jnp.int32)
  seg = jnp.ones((2, 40), jnp.int32).at[0, 25:].set(2).at[1, 33:].set(0)

  def loss(cfg):
    def fn(p):
      logits = Decoder(cfg).apply({"params": p}, tokens, segment_ids=seg)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
    return jax.jit(jax.value_and_grad(fn, has_aux=True))

  (_, got_logits), got = loss(one_layer)(small_params)
  (_, want_logits), want = loss(dataclasses.replace(one_layer, attention_backend="xla"))(small_params)
  np.testing.assert_allclose(got_logits, want_logits, **TOL)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, **TOL), got, want)


def test_cached_decode_matches_full_forward(small_params):
  """Prefill 9 tokens into a cache, then decode one at a time: same logits as one full pass."""
  rng = np.random.default_rng(2)
  b, t, prefill = 2, 16, 9
  tokens = jnp.asarray(rng.integers(0, SMALL.vocab_size, (b, t)), jnp.int32)
  model = Decoder(SMALL)
  full = jax.jit(lambda p, x: model.apply({"params": p}, x))(small_params, tokens)

  step = jax.jit(lambda p, x, cache, index: model.apply({"params": p}, x, cache=cache, cache_index=index))
  cache = init_cache(SMALL, b, 32)
  logits, cache = step(small_params, tokens[:, :prefill], cache, 0)
  np.testing.assert_allclose(logits, full[:, :prefill], **TOL)
  for i in range(prefill, t):
    logits, cache = step(small_params, tokens[:, i:i + 1], cache, i)
    np.testing.assert_allclose(logits[:, 0], full[:, i], **TOL)



def test_per_layer_layout_matches_scanned_layers(small_params):
  """scan_layers=False (per-layer params and cache, the inference layout) equals the scanned decoder.

  Same weights moved by `unstack_layers`: full-forward logits, prefill-then-decode
  logits from a per-layer cache, and `stack_layers` restores the scanned tree exactly.
  """
  import dataclasses
  from mlx_med.core.transformer import stack_layers, unstack_layers
  flat = dataclasses.replace(SMALL, attention_backend="xla", scan_layers=False)
  per_layer = unstack_layers(small_params, SMALL.num_layers)
  assert sorted(per_layer) == ["embed", "final_norm", "layers_0", "layers_1", "lm_head"]
  assert jax.tree.structure(per_layer) == jax.tree.structure(init_params(flat, jax.random.key(0)))
  jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer, SMALL.num_layers), small_params)

  tokens = jnp.asarray(np.random.default_rng(3).integers(0, SMALL.vocab_size, (2, 20)), jnp.int32)
  want = Decoder(dataclasses.replace(SMALL, attention_backend="xla")).apply({"params": small_params}, tokens)
  model = Decoder(flat)
  np.testing.assert_allclose(model.apply({"params": per_layer}, tokens), want, **TOL)
  cache = init_cache(flat, 2, 24)
  # Head-major per-layer cache: keys [B, K, D, S], values [B, K, S, D].
  assert isinstance(cache["k"], tuple) and cache["k"][0].shape == (2, SMALL.num_kv_heads, 8, 24)
  assert cache["v"][0].shape == (2, SMALL.num_kv_heads, 24, 8)
  step = jax.jit(lambda p, tok, c, i: model.apply({"params": p}, tok, cache=c, cache_index=i))
  logits, cache = step(per_layer, tokens[:, :12], cache, 0)
  np.testing.assert_allclose(logits, want[:, :12], **TOL)
  for i in range(12, 20):
    logits, cache = step(per_layer, tokens[:, i:i + 1], cache, i)
    np.testing.assert_allclose(logits[:, 0], want[:, i], **TOL)
  with pytest.raises(ValueError, match="already unstacked"):
    unstack_layers(per_layer, SMALL.num_layers)


def test_decode_attention_matches_reference():
  """Single-token attention on the head-major cache layout vs the plain-jnp reference.

  GQA (6 query heads on 2 KV heads), empty and other-segment slots masked, and one
  row whose query sees no key at all (the uniform-average convention).
  """
  b, s, heads, kv_heads, d = 3, 21, 6, 2, 16
  rng = np.random.default_rng(7)
  q = jnp.asarray(rng.normal(size=(b, 1, heads, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
  mask = np.ones((b, 1, s), bool)
  mask[0, 0, 15:] = False  # empty slots
  mask[1, 0, :4] = False  # another segment / left padding
  mask[2, 0, :] = False  # nothing visible
  mask = jnp.asarray(mask)
  got = jax.jit(attention_lib.decode_attention)(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)
  np.testing.assert_allclose(got, reference_attention(q, k, v, mask), **TOL)


def _prefix_causal_mask(b, t):
  """Unpacked rows: row 0 full, the others one sequence then trailing padding."""
  lengths = np.array([t] + [t - 3 - 5 * i for i in range(1, b)], np.int32)
  seg = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return attention_lib.make_mask(jnp.asarray(seg), jnp.asarray(seg), slots, slots, causal=True), lengths


def test_causal_prefix_lengths_recognises_unpacked_rows():
  mask, lengths = _prefix_causal_mask(3, 24)
  got, ok = jax.jit(attention_lib.causal_prefix_lengths)(mask)
  np.testing.assert_array_equal(got, lengths)
  assert bool(ok)
  # Packed segments or leading padding cannot be described by lengths.
  _, ok = attention_lib.causal_prefix_lengths(_packed_causal_mask(2, 24))
  assert not bool(ok)
  # Nor can an empty row (length 0).
  empty = mask.at[1].set(False)
  _, ok = attention_lib.causal_prefix_lengths(empty)
  assert not bool(ok)


def test_jax_backend_prefix_rows_use_sequence_lengths():
  """Unpacked rows with trailing padding: the sequence-length branch, same numbers as the reference."""
  q, k, v, w = _inputs(3, 24, 24, 4, 2, 8, seed=11)
  mask, _ = _prefix_causal_mask(3, 24)
  _check_forward_and_grads("jax", q, k, v, w, mask, mask_is_causal=True)


def test_cudnn_backend_rejects_fp32_with_a_clear_error():
  q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8, seed=0)
  mask = jnp.ones((1, 8, 8), bool)
  with pytest.raises(ValueError, match="'cudnn' needs bfloat16 or float16.*DecoderConfig.dtype='bfloat16'"):
    attention_lib.attend(q, k, v, mask, "cudnn", mask_is_causal=True)


def test_backend_registry_resolves_auto_and_rejects_unknown_names():
  reg = attention_lib.DECODER_BACKENDS
  assert reg.resolve("auto", platform="cpu") == "cpu"
  assert reg.resolve("auto", platform="gpu") == "xla"
  assert set(reg.names()) >= {"xla", "cpu", "cudnn", "jax"}
  assert attention_lib.available_backends()[0] == "auto"
  with pytest.raises(ValueError, match=r"attention backend 'flash' is unknown; choose one of \('auto', "):
    attention_lib.attend(*_inputs(1, 4, 4, 2, 2, 8, seed=0)[:3], jnp.ones((1, 4, 4), bool), "flash")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", ["prefix", "packed"])
def test_gpu_cudnn_backend_matches_reference(rows):
  """cuDNN fused attention (bf16) vs the fp32 reference, both mask branches; checks cuDNN really ran."""
  b, t, heads, kv_heads, d = 2, 256, 8, 2, 64
  q, k, v, w = (x.astype(jnp.bfloat16) for x in _inputs(b, t, t, heads, kv_heads, d, seed=21))
  mask = _prefix_causal_mask(b, t)[0] if rows == "prefix" else _packed_causal_mask(b, t)
  _, ok = attention_lib.causal_prefix_lengths(mask)
  assert bool(ok) == (rows == "prefix")

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w.astype(jnp.float32))

  ours = lambda q, k, v: attention_lib.attend(q, k, v, mask, "cudnn", mask_is_causal=True)
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: reference_attention(f32(q), f32(k), f32(v), mask)
  both = lambda fn: jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)))
  hlo = both(ours).lower(q, k, v).as_text()
  assert "__cudnn$fmha" in hlo, "the cudnn backend did not lower to cuDNN fused attention"
  (out, got), (want_out, want) = both(ours)(q, k, v), both(ref)(q, k, v)
  assert out.dtype == jnp.bfloat16
  # bf16 inputs and output, fp32 accumulation: errors relative to max(1, max|ref|).
  for name, g, r, tol in [("out", out, want_out, 3e-2)] + [(f"d{n}", g, r, 6e-2) for n, g, r in zip("qkv", got, want)]:
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    err, scale = float(np.max(np.abs(g - r))), max(1.0, float(np.max(np.abs(r))))
    assert np.all(np.isfinite(g)) and err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol} * {scale:.3g}"
