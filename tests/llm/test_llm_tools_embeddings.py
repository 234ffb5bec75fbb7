"""Embeddings (`LocalLM.embed`, POST /v1/embeddings), constrained response_format and tool
calls through the served endpoint and the clients.

`LocalLM.embed` is checked against two independent means of the final hidden states: our
own Decoder run on each prompt alone (no padding, no buckets), and transformers'
`last_hidden_state` of the same tiny Qwen2 checkpoint.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

PROMPTS = [[5, 6, 7], [9] * 40, list(range(3, 60)), [17]]


def _reference_means(lm, prompts, normalize=True):
  """Each prompt alone through the Decoder, mean taken in float64 numpy."""
  import jax

  from mlx_med.core.transformer import Decoder

  hidden_of = jax.jit(lambda p, t: Decoder(lm.cfg).apply({"params": p}, t, return_hidden=True)[1])
  out = []
  for p in prompts:
    mean = np.asarray(hidden_of(lm.params, jnp.asarray([p], jnp.int32)), np.float64)[0].mean(axis=0)
    out.append(mean / np.linalg.norm(mean) if normalize else mean)
  return np.stack(out)


def test_embed_is_the_mean_of_the_final_hidden_states(local_lm):
  got = local_lm.embed(PROMPTS)
  assert got.shape == (len(PROMPTS), local_lm.cfg.d_model) and got.dtype == np.float32
  reference = _reference_means(local_lm, PROMPTS, normalize=False)
  np.testing.assert_allclose(got, reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=2e-6, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  raw = local_lm.embed(PROMPTS, normalize=False)
  np.testing.assert_allclose(raw, reference, atol=1e-5, rtol=1e-5)
  # Alone or batched with longer prompts (more padding), a prompt's embedding is the same.
  np.testing.assert_allclose(local_lm.embed([PROMPTS[0]]), got[:1], atol=2e-6, rtol=0)
  # More rows than one model call takes.
  np.testing.assert_allclose(local_lm.embed(PROMPTS * 3, max_batch=4), np.concatenate([got] * 3), atol=2e-6)
  assert local_lm.embed([]).shape == (0, local_lm.cfg.d_model)


def test_embed_matches_transformers_last_hidden_state(local_lm, qwen2_dir):
  import torch
  from torch_peers import import_torchvision

  import_torchvision()
  import transformers

  model = transformers.AutoModel.from_pretrained(qwen2_dir, local_files_only=True).eval()
  expected = []
  with torch.no_grad():
    for p in PROMPTS:
      hidden = model(input_ids=torch.tensor([p])).last_hidden_state[0].double().numpy()
      mean = hidden.mean(axis=0)
      expected.append(mean / np.linalg.norm(mean))
  np.testing.assert_allclose(local_lm.embed(PROMPTS), np.stack(expected), atol=1e-4, rtol=0)


def test_embed_refuses_bad_prompts(local_lm):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    local_lm.embed([[1], []])
  with pytest.raises(ValueError, match="more than the model's context"):
    local_lm.embed([[1] * (local_lm.cfg.max_seq_len + 1)])
  with pytest.raises(ValueError, match="outside"):
    local_lm.embed([[local_lm.cfg.vocab_size]])
