"""The batched KV-cache sampler against a cache-free reference, plus its controls.

The shared tiny generation decoder keeps compiles cheap; most tests share one
batch/prompt/new bucket (4, 16, 16) so the jitted prefill/decode compile once for the
module (and `test_buckets_bound_retraces` holds the sampler to that).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.core import params as params_lib
from mlx_med.core import sampler as sampler_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.core.sampler import RowParams, Sampler, SamplingParams
from mlx_med.core.transformer import Decoder
from tiny import TINY_GENERATE as CFG
from tiny import tiny_params

PROMPTS = [[5, 17, 3, 88, 41], [9, 2, 60, 33, 71, 12, 50, 8, 19, 44, 6], [70, 71]]


@pytest.fixture(scope="module")
def params():
  return tiny_params(CFG)


@pytest.fixture(scope="module")
def sampler():
  return Sampler(CFG, pad_id=0)


@pytest.fixture(scope="module")
def forward():
  """Cache-free reference: full forward over right-padded [B, 32] blocks (one compile)."""
  fn = jax.jit(lambda p, t, s: Decoder(CFG).apply({"params": p}, t, segment_ids=s))

  def last_logits(params, seqs):
    tokens = np.zeros((len(seqs), 32), np.int32)
    segments = np.zeros_like(tokens)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
      segments[i, :len(s)] = 1
    out = np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(segments)))
    return np.stack([out[i, len(s) - 1] for i, s in enumerate(seqs)])

  return last_logits


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_and_logprobs_match_cache_free_reference(params, sampler, forward):
  outs = sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
  seqs = [list(p) for p in PROMPTS]
  for step in range(12):
    logp = _log_softmax(forward(params, seqs))
    for i, out in enumerate(outs):
      expected = int(np.argmax(logp[i]))
      assert out.tokens[step] == expected, (i, step)
      np.testing.assert_allclose(out.logprobs[step], logp[i, expected], atol=2e-5)
      seqs[i].append(expected)
  assert all(o.finish_reason == "length" and len(o.tokens) == 12 for o in outs)


def test_seeded_row_is_independent_of_batch(params, sampler):
  sp = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=123)
  batched = sampler.generate(params, PROMPTS, [sp, SamplingParams(max_new_tokens=10, seed=7), sp])
  alone = sampler.generate(params, [PROMPTS[0]], sp)[0]
  again = sampler.generate(params, PROMPTS, [sp, SamplingParams(max_new_tokens=10, seed=7), sp])
  assert batched[0].tokens == alone.tokens
  np.testing.assert_allclose(batched[0].logprobs, alone.logprobs, atol=1e-5)
  assert [o.tokens for o in batched] == [o.tokens for o in again]
  other_seed = sampler.generate(params, [PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95,
                                                                    top_k=40, seed=124))
  assert other_seed[0].tokens != alone.tokens


def _rows(n, **values):
  base = dict(prompt_lens=np.ones(n, np.int32), temperature=np.ones(n, np.float32), top_k=np.zeros(n, np.int32),
              top_p=np.ones(n, np.float32), min_p=np.zeros(n, np.float32), seeds=np.arange(n, dtype=np.uint32),
              max_new=np.ones(n, np.int32), stop_ids=np.full((n, 1), -1, np.int32),
              think_budget=np.full(n, -1, np.int32), think_close=np.full((n, 1), -1, np.int32),
              think_close_len=np.zeros(n, np.int32), presence=np.zeros(n, np.float32),
              frequency=np.zeros(n, np.float32), repetition=np.ones(n, np.float32),
              next_position=np.ones(n, np.int32))
  for k, v in values.items():
    base[k] = np.broadcast_to(np.asarray(v, base[k].dtype), base[k].shape).copy()
  return RowParams(**{k: jnp.asarray(v) for k, v in base.items()})


class SampleTokensTest(chex.TestCase):
  """The truncation rules hold whether `_sample_tokens` runs under jit or op by op."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_truncation_keeps_exactly_the_allowed_tokens(self):
    _check_truncation(self.variant(functools.partial(sampler_lib._sample_tokens, mode="sorted")))


def _check_truncation(sample_fn):
  n = 4000
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  logits = jnp.asarray(np.broadcast_to(np.log(probs), (n, 4)))
  step = jnp.int32(3)

  def freq(**kw):
    tokens = sample_fn(logits, _rows(n, **kw), step)
    chex.assert_shape(tokens, (n,))
    chex.assert_type(tokens, jnp.int32)
    return np.bincount(np.asarray(tokens), minlength=4) / n

  plain = freq()
  np.testing.assert_allclose(plain, probs, atol=0.03)
  top_k = freq(top_k=2)
  assert top_k[2:].sum() == 0
  np.testing.assert_allclose(top_k[:2], probs[:2] / probs[:2].sum(), atol=0.03)
  top_p = freq(top_p=0.7)  # mass before token 1 is 0.5 < 0.7, before token 2 is 0.8 -> keep {0, 1}
  assert top_p[2:].sum() == 0 and top_p[1] > 0.3
  min_p = freq(min_p=0.5)  # keep p >= 0.25 -> {0, 1}
  assert min_p[2:].sum() == 0 and min_p[1] > 0.3
  top_p_after_k = freq(top_k=3, top_p=0.9)  # renormalised over 3: [.526, .316, .158] -> keep {0, 1, 2}
  assert top_p_after_k[3] == 0 and top_p_after_k[2] > 0.1
  cold = freq(temperature=0.25)  # p^4 renormalised: token 0 ~0.88
  assert cold[0] > 0.8
  greedy = freq(temperature=0.0)
  assert greedy[0] == 1.0
  mixed_t = np.where(np.arange(n) % 2 == 0, 0.0, 1.0)
  mixed = np.asarray(sample_fn(logits, _rows(n, temperature=mixed_t), step))
  assert (mixed[::2] == 0).all() and (mixed[1::2] != 0).any()


def test_penalties_match_reference(params, sampler, forward):
  knobs = [dict(repetition_penalty=1.5), dict(presence_penalty=1.0, frequency_penalty=0.7), dict()]
  outs = sampler.generate(params, PROMPTS, [SamplingParams(max_new_tokens=10, temperature=0.0, **k) for k in knobs])
  seqs = [list(p) for p in PROMPTS]
  for step in range(10):
    logits = forward(params, seqs)
    for i, k in enumerate(knobs):
      row = logits[i].copy()
      generated = seqs[i][len(PROMPTS[i]):]
      seen = np.zeros(CFG.vocab_size, bool)
      seen[seqs[i]] = True
      r = k.get("repetition_penalty", 1.0)
      row = np.where(seen, np.where(row > 0, row / r, row * r), row)
      counts = np.bincount(generated, minlength=CFG.vocab_size)
      row = row - k.get("presence_penalty", 0.0) * (counts > 0) - k.get("frequency_penalty", 0.0) * counts
      expected = int(np.argmax(row))
      assert outs[i].tokens[step] == expected, (i, step)
      seqs[i].append(expected)
  plain = sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
  assert outs[2].tokens == plain[2].tokens and outs[0].tokens != plain[0].tokens


def test_stop_tokens_and_per_row_max_new(params, sampler):
  free = sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
  stop = free[0].tokens[3]
  first = free[0].tokens.index(stop)
  outs = sampler.generate(params, PROMPTS, [SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,)),
                                            SamplingParams(max_new_tokens=5, temperature=0.0),
                                            SamplingParams(max_new_tokens=12, temperature=0.0)])
  assert outs[0].tokens == free[0].tokens[:first + 1]
  assert (outs[0].finish_reason, outs[0].stop_reason) == ("stop", stop)
  assert outs[1].tokens == free[1].tokens[:5] and outs[1].finish_reason == "length"
  assert outs[2].tokens == free[2].tokens


def _letters(ids):
  return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_text_and_tokens(params, sampler):
  free = sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0), detokenize=_letters)
  text = free[0].text
  stop = text[5:7]
  cut = text.find(stop)
  outs = sampler.generate(params, PROMPTS, [SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=(stop,)),
                                            SamplingParams(max_new_tokens=12, temperature=0.0),
                                            SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=(stop,),
                                                           include_stop_str_in_output=True)],
                          detokenize=_letters)
  assert outs[0].text == text[:cut] and outs[0].finish_reason == "stop" and outs[0].stop_reason == stop
  assert outs[0].tokens == free[0].tokens[:cut + 2]  # up to the token that completed the stop string
  assert outs[1].text == free[1].text
  if stop in free[2].text:
    assert outs[2].text.endswith(stop)


def test_streaming_in_chunks_equals_one_shot(params, sampler):
  sp = SamplingParams(max_new_tokens=11, temperature=0.8, top_p=0.99, seed=5)
  one_shot = sampler.generate(params, PROMPTS, sp)
  pieces = [[] for _ in PROMPTS]
  finished = {}
  for updates in sampler.stream(params, PROMPTS, sp, chunk_size=3):
    for u in updates:
      pieces[u.index] += u.new_tokens
      if u.finished:
        finished[u.index] = u.output
  assert pieces == [o.tokens for o in one_shot]
  assert [finished[i].tokens for i in range(3)] == [o.tokens for o in one_shot]


def test_think_budget_forces_the_closing_tag(params, sampler):
  close = (90, 91)
  sp = SamplingParams(max_new_tokens=12, temperature=0.0, think_budget=4, think_close_ids=close)
  free = sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
  out = sampler.generate(params, PROMPTS, [sp, sp, sp])
  for o, f in zip(out, free, strict=True):
    assert o.tokens[:4] == f.tokens[:4]
    assert tuple(o.tokens[4:6]) == close
    assert o.forced == [False] * 4 + [True, True] + [False] * 6
  # A tag the model writes by itself (here: its own greedy tokens 1..2) is never forced again.
  own = tuple(free[0].tokens[1:3])
  natural = sampler.generate(params, PROMPTS,
                             SamplingParams(max_new_tokens=12, temperature=0.0, think_budget=5, think_close_ids=own))
  assert natural[0].tokens == free[0].tokens and not any(natural[0].forced)


def test_top_logprobs_are_the_most_likely_tokens(params, sampler, forward):
  out = sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=3, temperature=0.0, num_top_logprobs=3))[0]
  logp = _log_softmax(forward(params, [PROMPTS[0]]))[0]
  ids = [i for i, _ in out.top_logprobs[0]]
  assert ids == list(np.argsort(-logp)[:3])
  np.testing.assert_allclose([v for _, v in out.top_logprobs[0]], np.sort(logp)[::-1][:3], atol=2e-5)


def test_buckets_bound_retraces(params, monkeypatch):
  """One trace of prefill and of decode per entry of the sampler's `compiled_shapes`.

  Fresh jits of the same functions (with the sampler's own jit options) count their
  traces; prompt lengths, batch sizes and max_new inside one bucket, chunked streaming,
  and new seeds or truncation knobs within one sampling mode must reuse the program.
  """
  chex.clear_trace_counter()
  expected_shapes = 2  # (4, 16, 16, 0, greedy, False) and (4, 16, 16, 0, sorted, False)
  monkeypatch.setattr(sampler_lib, "_prefill", jax.jit(
      chex.assert_max_traces(sampler_lib._prefill.__wrapped__, n=expected_shapes),
      static_argnames=("cfg", "rules", "max_new", "num_top", "mode", "penalties", "cache_dtype")))
  monkeypatch.setattr(sampler_lib, "_decode", jax.jit(
      chex.assert_max_traces(sampler_lib._decode.__wrapped__, n=expected_shapes),
      static_argnames=("cfg", "rules", "num_top", "mode"), donate_argnums=(1,)))
  sampler = Sampler(CFG, pad_id=0)
  greedy = sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
  # Different prompt lengths (<= 16), batch (<= 4) and max_new (<= 16): same buckets.
  sampler.generate(params, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [4], [7, 7], [8]],
                   SamplingParams(max_new_tokens=7, temperature=0.0))
  streamed = [u for updates in sampler.stream(params, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0),
                                              chunk_size=3) for u in updates if u.finished]
  assert sorted((u.index, u.output.tokens) for u in streamed) == [(i, o.tokens) for i, o in enumerate(greedy)]
  for seed, knobs in ((1, dict(top_p=0.9)), (2, dict(top_k=5)), (3, dict(top_k=7, top_p=0.5))):
    sampler.generate(params, PROMPTS, SamplingParams(max_new_tokens=9, temperature=0.8, seed=seed, **knobs))
  assert len(sampler.compiled_shapes) == expected_shapes, sampler.compiled_shapes


def test_bad_requests_are_clear_errors(params, sampler):
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="think_close_ids"):
    SamplingParams(think_budget=3)
  with pytest.raises(ValueError, match="context"):
    sampler.generate(params, [[1] * 100], SamplingParams(max_new_tokens=40))
  with pytest.raises(ValueError, match="empty"):
    sampler.generate(params, [[]], SamplingParams())
  with pytest.raises(ValueError, match="detokenize"):
    sampler.generate(params, [[1]], SamplingParams(stop_strings=("x",)))
  # Per-row knobs for fewer rows than the prompt batch fail at trace time, not by broadcasting.
  tokens, rows, max_new, num_top, mode, *_ = sampler._prepare(PROMPTS, [SamplingParams(temperature=0.0)] * 3)
  with pytest.raises(AssertionError, match="shape prefix"):
    sampler_lib._prefill(params, tokens, jax.tree.map(lambda x: x[:1], rows), cfg=CFG, rules=None,
                         max_new=max_new, num_top=num_top, mode=mode)


def test_sharded_sampling_equals_unsharded(params, sampler):
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding_lib.ShardingRules(mesh)
  sharded_params = jax.device_put(params, params_lib.param_shardings(CFG, rules))
  sharded = Sampler(CFG, rules, pad_id=0)
  sampling = [SamplingParams(max_new_tokens=10, temperature=0.0),
              SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3),
              SamplingParams(max_new_tokens=10, temperature=0.7, top_k=5, seed=4)]
  ours = sharded.generate(sharded_params, PROMPTS, sampling)
  ref = sampler.generate(params, PROMPTS, sampling)
  for a, b in zip(ours, ref, strict=True):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
  # The KV cache really is split: batch over data*fsdp, kv heads over tensor.
  tokens, rows, max_new, num_top, mode, *_ = sharded._prepare(PROMPTS, sampling)
  state = sampler_lib._prefill(sharded_params, tokens, rows, cfg=CFG, rules=rules, max_new=max_new, num_top=num_top,
                               mode=mode)
  layers, batch, length, kv_heads, head_dim = state.cache["k"].shape  # stacked layout: [L, B, S, K, D]
  chex.assert_shape(state.cache["k"].addressable_shards[0].data, (layers, batch // 4, length, kv_heads // 2, head_dim))
