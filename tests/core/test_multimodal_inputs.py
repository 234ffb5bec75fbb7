"""The decoder's and sampler's multimodal inputs: input embeddings and M-RoPE positions.

A vision-language model feeds the decoder embeddings (text embeddings with image
features spliced in) and, for Qwen2-VL-style models, three rotary positions per token.
These tests pin the contracts the VLMs build on, against independent computations:
embeddings equal to the token lookup change nothing; M-RoPE with equal components is
ordinary rotary; M-RoPE sections rotate by the right component (a hand-built rotation);
the sampler's prompt embeddings/positions match a cache-free forward, and generated
tokens continue from the largest prompt position + 1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core.layers import apply_rope, rope_inverse_frequencies
from mlx_med.core.sampler import Sampler, SamplingParams
from mlx_med.core.transformer import Decoder
from tiny import TINY_GENERATE, tiny_params

MROPE = dataclasses.replace(TINY_GENERATE, mrope_section=(1, 1, 2))  # head_dim 8 -> 4 frequencies


def _embed(cfg, params, tokens):
  return Decoder(cfg).apply({"params": params}, jnp.asarray(tokens), method=Decoder.embed_tokens)


def test_embeddings_equal_to_lookup_give_the_same_logits():
  params = tiny_params(TINY_GENERATE)
  tokens = jnp.asarray([[5, 17, 3, 88, 41, 9]])
  ref = Decoder(TINY_GENERATE).apply({"params": params}, tokens)
  emb = _embed(TINY_GENERATE, params, tokens)
  out = Decoder(TINY_GENERATE).apply({"params": params}, None, embeddings=emb)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


def test_mrope_with_equal_components_is_ordinary_rope():
  params = tiny_params(MROPE)  # same parameter tree as TINY_GENERATE
  tokens = jnp.asarray([[5, 17, 3, 88, 41, 9]])
  pos = jnp.arange(6)[None] + 3
  plain = Decoder(TINY_GENERATE).apply({"params": params}, tokens, positions=pos)
  three = Decoder(MROPE).apply({"params": params}, tokens, positions=jnp.stack([pos] * 3, -1))
  implicit = Decoder(MROPE).apply({"params": params}, tokens, positions=pos)
  np.testing.assert_allclose(np.asarray(three), np.asarray(plain), atol=1e-5)
  np.testing.assert_allclose(np.asarray(implicit), np.asarray(plain), atol=1e-5)


def test_mrope_sections_rotate_by_their_component():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 2, 1, 8)).astype(np.float32)
  pos = np.asarray([[[2, 5, 7], [4, 1, 3]]])
  inv = np.asarray(rope_inverse_frequencies(8, 10000.0))
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(inv), (1, 1, 2)))
  comp = [0, 1, 2, 2]  # frequency j reads component comp[j]
  for t in range(2):
    for j in range(4):
      a = pos[0, t, comp[j]] * inv[j]
      x1, x2 = x[0, t, 0, j], x[0, t, 0, j + 4]
      np.testing.assert_allclose(out[0, t, 0, j], x1 * np.cos(a) - x2 * np.sin(a), atol=1e-5)
      np.testing.assert_allclose(out[0, t, 0, j + 4], x2 * np.cos(a) + x1 * np.sin(a), atol=1e-5)
  with pytest.raises(ValueError, match="sum to"):
    apply_rope(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(inv), (1, 1, 1))
  with pytest.raises(ValueError, match="mrope_section"):
    dataclasses.replace(TINY_GENERATE, mrope_section=(1, 1, 1))


def test_sampler_prompt_embeddings_and_positions_match_cache_free_forward():
  """Greedy tokens from (embeddings, M-RoPE positions) prompts equal a cache-free argmax loop
  whose generated tokens take position max(prompt positions) + 1, + 2, ..."""
  cfg = MROPE
  params = tiny_params(cfg)
  prompts = [[5, 17, 3, 88, 41], [9, 2, 60]]
  rng = np.random.default_rng(1)
  embeds, positions = [], []
  for p in prompts:
    e = np.array(_embed(cfg, params, [p]))[0]
    e[1] += rng.normal(size=e.shape[1]).astype(np.float32)  # a "visual" token that is no vocabulary row
    embeds.append(e)
    pos = np.stack([np.arange(len(p))] * 3, -1)
    pos[1] = [1, 4, 6]  # an image token's (t, h, w)
    pos[2:] += 6  # text after the image continues from its largest position
    positions.append(pos)
  sampler = Sampler(cfg)
  outs = sampler.generate(params, prompts, SamplingParams(max_new_tokens=6, temperature=0.0),
                          prompt_embeds=embeds, prompt_positions=positions)
  fwd = jax.jit(lambda p, e, pos: Decoder(cfg).apply({"params": p}, None, positions=pos, embeddings=e))
  for i, p in enumerate(prompts):
    e, pos = embeds[i], positions[i]
    for step in range(6):
      logits = np.asarray(fwd(params, jnp.asarray(e[None]), jnp.asarray(pos[None])))[0, -1]
      tok = int(np.argmax(logits))
      assert outs[i].tokens[step] == tok, (i, step)
      e = np.concatenate([e, np.asarray(_embed(cfg, params, [[tok]]))[0]])
      nxt = int(pos.max()) + 1
      pos = np.concatenate([pos, [[nxt] * 3]])
  with pytest.raises(ValueError, match="embeddings have shape"):
    sampler.generate(params, prompts, SamplingParams(max_new_tokens=2), prompt_embeds=[embeds[0], embeds[0]])
