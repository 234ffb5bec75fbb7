"""Continuous batching, device side: the decoder's per-row cache index, the token bitmask,
and slot prefill/decode against the static sampler (mlx_med.core.continuous)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY_GENERATE, tiny_params

from mlx_med.core import continuous as cont
from mlx_med.core.sampler import RowParams, Sampler, SamplingParams
from mlx_med.core.transformer import Decoder, init_cache, unstack_layers

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12, 13]]


@pytest.fixture(scope="module", params=[False, True], ids=["per_layer", "stacked"])
def model(request):
  cfg = dataclasses.replace(TINY_GENERATE, scan_layers=request.param)
  params = tiny_params(TINY_GENERATE)
  if not request.param:
    params = unstack_layers(params, cfg.num_layers)
  return cfg, params


def _prefill_alone(cfg, params, prompt, length):
  """One prompt in a batch-1 cache (scalar cache_index): the reference for per-row writes."""
  cache = init_cache(cfg, 1, length)
  tokens = jnp.asarray([prompt], jnp.int32)
  _, cache = Decoder(cfg).apply({"params": params}, tokens, cache=cache, cache_index=0)
  return cache


def _stack(caches):
  cat = lambda *xs: jnp.concatenate(xs, axis=1 if xs[0].ndim == 5 else 0)
  return jax.tree.map(cat, *caches)


def test_per_row_cache_index_equals_each_row_alone(model):
  cfg, params = model
  length = 16
  caches = [_prefill_alone(cfg, params, p, length) for p in PROMPTS]
  nxt = [40, 41, 42]
  apply = jax.jit(lambda c, t, i: Decoder(cfg).apply({"params": params}, t, cache=c, cache_index=i))
  stacked = _stack(caches)
  tokens = jnp.asarray([[t] for t in nxt], jnp.int32)
  # Reference for row b: the same [3, ...] batch with the scalar index len(prompt b), so
  # both sides run the same shapes (a batch-1 call differs by GEMM blocking, ~1e-6).
  alone = [apply(stacked, tokens, jnp.asarray(len(p), jnp.int32)) for p in PROMPTS]
  index = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
  logits, cache = apply(stacked, tokens, index)
  for b, (ref_logits, ref_cache) in enumerate(alone):
    np.testing.assert_allclose(logits[b], ref_logits[b], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(cache["segment_ids"][b], ref_cache["segment_ids"][b])
    row = jax.tree.map(lambda x: x[:, b] if x.ndim == 5 else x[b], {"k": cache["k"], "v": cache["v"]})
    ref = jax.tree.map(lambda x: x[:, b] if x.ndim == 5 else x[b], {"k": ref_cache["k"], "v": ref_cache["v"]})
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-6, rtol=1e-6), row, ref)


def test_equal_per_row_indices_equal_the_scalar_path(model):
  cfg, params = model
  cache = _stack([_prefill_alone(cfg, params, [1, 2, 3, 4], 12)] * 3)
  tokens = jnp.asarray([[7, 8], [9, 10], [11, 12]], jnp.int32)
  apply = lambda i: Decoder(cfg).apply({"params": params}, tokens, cache=cache, cache_index=i)
  scalar_logits, scalar_cache = apply(jnp.asarray(4, jnp.int32))
  vector_logits, vector_cache = apply(jnp.full((3,), 4, jnp.int32))
  np.testing.assert_allclose(vector_logits, scalar_logits, atol=1e-6, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), vector_cache, scalar_cache)


def test_unpack_bitmask_matches_numpy():
  rng = np.random.default_rng(0)
  vocab = 70
  allowed = rng.random((3, vocab)) < 0.4
  words = np.zeros((3, cont.mask_words(vocab)), np.uint32)
  for b, t in zip(*np.nonzero(allowed)):
    words[b, t // 32] |= np.uint32(1) << np.uint32(t % 32)
  got = cont.unpack_bitmask(jnp.asarray(words.view(np.int32)), vocab)
  np.testing.assert_array_equal(np.asarray(got), allowed)
  assert np.asarray(cont.unpack_bitmask(jnp.asarray(cont.all_allowed(2, vocab)), vocab)).all()


def _rows(sampling, lens):
  rows = cont.empty_rows(len(sampling), n_stop=4, n_close=4)
  for i, (sp, n) in enumerate(zip(sampling, lens)):
    rows["prompt_lens"][i] = rows["next_position"][i] = n
    rows["temperature"][i] = sp.temperature
    rows["seeds"][i] = sp.seed or 0
    rows["max_new"][i] = sp.max_new_tokens
  return RowParams(**{k: jnp.asarray(v) for k, v in rows.items()})


@pytest.mark.parametrize("window", [0, 16], ids=["whole_rows", "window16"])
def test_slots_decode_like_the_static_sampler_and_replace_stale_rows(model, window):
  """Also with the decode chunk attending over a 16-entry window of the 24-entry rows (every sequence
  here stays within 13 entries): the same tokens, and the window is written back."""
  cfg, params = model
  sampling = [SamplingParams(max_new_tokens=6, temperature=0.0), SamplingParams(max_new_tokens=6, temperature=1.0,
                                                                                seed=3)]
  prompts = PROMPTS[:2]
  ref = Sampler(cfg).generate(params, prompts, sampling)
  state = cont.init_slots(cfg=cfg, num_slots=3, max_len=24, n_stop=4, n_close=4)

  def admit(state, slots):
    block = np.zeros((2, 8), np.int32)
    for i, p in enumerate(prompts):
      block[i, :len(p)] = p
    return cont.prefill_into_slots(params, state, jnp.asarray(block), jnp.asarray(slots, jnp.int32),
                                   _rows(sampling, [len(p) for p in prompts]), jnp.asarray(cont.all_allowed(2, 128)),
                                   cfg=cfg, mode="sample")

  def run(state, slots):
    state, first = admit(state, slots)
    got = [[int(first.tokens[i, 0])] for i in range(2)]
    for _ in range(5):
      state, out = cont.decode_chunk(params, state, jnp.asarray(cont.all_allowed(3, 128)), jnp.zeros(3, bool),
                                     jnp.asarray(1, jnp.int32), cfg=cfg, width=2, mode="sample", window=window)
      for i, s in enumerate(slots):
        if int(out.num[s]) > len(got[i]):
          got[i].append(int(out.tokens[s, 0]))
    return state, got

  state, got = run(state, [2, 0])
  assert got == [r.tokens for r in ref]
  # The same rows admitted again into slots the other row used (stale entries there).
  state, again = run(state, [0, 2])
  assert again == got
  segments = np.asarray(state.cache["segment_ids"])
  assert segments[0, :len(prompts[0]) + 5].all() and not segments[0, len(prompts[0]) + 5:].any()
