"""ContinuousEngine: requests joining mid-generation get exactly their tokens alone, slots
are reused, stop strings / max_tokens / token constraints / errors behave per row."""

import threading
import types

import numpy as np
import pytest
from tiny import TINY_GENERATE, tiny_params

from mlx_med.core.continuous import mask_words
from mlx_med.core.sampler import Sampler, SamplingParams
from mlx_med.core.transformer import unstack_layers
from mlx_med.llm.engine import ContinuousEngine, Job

CFG = TINY_GENERATE.__class__(**{**TINY_GENERATE.__dict__, "scan_layers": False})
VOCAB = CFG.vocab_size


def _detokenize(ids):
  return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.fixture(scope="module")
def lm():
  params = unstack_layers(tiny_params(TINY_GENERATE), CFG.num_layers)
  sampler = Sampler(CFG)
  return types.SimpleNamespace(
      cfg=CFG, params=params, sampler=sampler, rules=None, tokenizer=object(), detokenize=_detokenize,
      sampling_params=lambda max_tokens=16, **k: SamplingParams(max_new_tokens=max_tokens, temperature=0.0))


@pytest.fixture(scope="module")
def engine(lm):
  eng = ContinuousEngine(lm, max_num_seqs=4, chunk_size=2)
  yield eng
  eng.stop()


class Collector:
  def __init__(self, rows):
    self.outputs = [None] * rows
    self.updates = [[] for _ in range(rows)]
    self.ended = threading.Event()
    self.error = None

  def __call__(self, item):
    if item[0] == "update":
      self.updates[item[1]].append(item[2])
      if item[2].finished:
        self.outputs[item[1]] = item[2].output
    elif item[0] == "error":
      self.error = item[1]
      self.ended.set()
    else:
      self.ended.set()


def _submit(engine, prompts, sampling, constraints=None):
  c = Collector(len(prompts))
  engine.submit(Job([list(p) for p in prompts], list(sampling), c, constraints=constraints))
  return c


def _run(engine, *collectors, limit=500):
  for _ in range(limit):
    if all(c.ended.is_set() for c in collectors):
      return
    engine.step()
  raise AssertionError("the engine did not finish the jobs")


def _alone(engine, prompt, sp):
  c = _submit(engine, [prompt], [sp])
  _run(engine, c)
  return c.outputs[0]


GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def test_requests_arriving_mid_generation_get_their_tokens_alone(engine, lm):
  a = _submit(engine, [[1, 2, 3, 4, 5]], [SamplingParams(max_new_tokens=20, temperature=0.0)])
  engine.step()
  engine.step()
  assert engine.stats["running"] == 1 and not a.ended.is_set()  # A is decoding
  b = _submit(engine, [[9, 8, 7], [40]], [GREEDY, SamplingParams(max_new_tokens=7, temperature=0.0)])
  engine.step()
  assert engine.stats["running"] == 3 and not a.ended.is_set()  # B joined the running batch
  _run(engine, a, b)
  static = lm.sampler.generate(lm.params, [[9, 8, 7], [40], [1, 2, 3, 4, 5]],
                               [GREEDY, SamplingParams(max_new_tokens=7, temperature=0.0),
                                SamplingParams(max_new_tokens=20, temperature=0.0)], detokenize=_detokenize)
  assert [o.tokens for o in b.outputs] == [static[0].tokens, static[1].tokens]
  assert a.outputs[0].tokens == static[2].tokens
  assert b.outputs[0].tokens == _alone(engine, [9, 8, 7], GREEDY).tokens
  assert a.outputs[0].finish_reason == "length" and len(a.outputs[0].tokens) == 20
  # Streamed updates add up to the final output.
  assert sum((u.new_tokens for u in b.updates[0]), []) == b.outputs[0].tokens


def test_seeded_sampling_equals_alone(engine, lm):
  sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
  alone = _alone(engine, [3, 1, 4, 1, 5], sp)
  other = _submit(engine, [[2, 7, 1, 8]], [SamplingParams(max_new_tokens=16, temperature=0.7, seed=5)])
  engine.step()
  engine.step()
  mid = _submit(engine, [[3, 1, 4, 1, 5]], [sp])
  _run(engine, other, mid)
  assert mid.outputs[0].tokens == alone.tokens
  static = lm.sampler.generate(lm.params, [[3, 1, 4, 1, 5]], [sp])
  assert alone.tokens == static[0].tokens


def test_more_jobs_than_slots_queue_and_reuse_slots(lm):
  eng = ContinuousEngine(lm, max_num_seqs=2, chunk_size=2)
  jobs = [_submit(eng, [[10 + i, 3]], [SamplingParams(max_new_tokens=3 + i, temperature=0.0)]) for i in range(5)]
  eng.step()  # admits two; the first (3 tokens: prefill + one 2-step chunk) ends and frees its slot
  assert eng.stats["max_running"] == 2 and eng.stats["waiting"] == 3
  assert jobs[0].ended.is_set() and eng.stats["running"] == 1
  eng.step()
  assert eng.stats["waiting"] == 2 and eng.stats["slot_reuses"] == 1
  _run(eng, *jobs)
  assert all(j.outputs[0] is not None and len(j.outputs[0].tokens) == 3 + i for i, j in enumerate(jobs))
  assert eng.stats["slot_reuses"] == 3 and eng.stats["max_running"] == 2 and eng.stats["finished"] == 5
  for i, j in enumerate(jobs):
    assert j.outputs[0].tokens == _alone(eng, [10 + i, 3], SamplingParams(max_new_tokens=3 + i,
                                                                            temperature=0.0)).tokens


def test_stop_strings_and_max_tokens_match_the_static_sampler(engine, lm):
  full = _alone(engine, [6, 6, 6], GREEDY)
  stop = _detokenize(full.tokens[3:5])
  sampling = [SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=(stop,)),
              SamplingParams(max_new_tokens=4, temperature=0.0),
              SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(full.tokens[2],))]
  got = _submit(engine, [[6, 6, 6]] * 3, sampling)
  _run(engine, got)
  want = lm.sampler.generate(lm.params, [[6, 6, 6]] * 3, sampling, detokenize=_detokenize)
  for g, w in zip(got.outputs, want):
    assert (g.tokens, g.text, g.finish_reason, g.stop_reason) == (w.tokens, w.text, w.finish_reason, w.stop_reason)
  assert got.outputs[0].finish_reason == "stop" and got.outputs[0].stop_reason == stop
  assert got.outputs[1].finish_reason == "length" and len(got.outputs[1].tokens) == 4
  assert got.outputs[2].stop_reason == full.tokens[2]
  # The streamed text never showed the stop string.
  assert all(stop not in (u.text or "") for u in got.updates[0])


class Only:
  """A fake grammar: allows a fixed token sequence (then is finished), or any token in `pool`."""

  def __init__(self, sequence=None, pool=None):
    self.sequence, self.pool, self.seen = sequence, pool, []

  def _allowed(self):
    if self.sequence is not None:
      return [self.sequence[len(self.seen)]]
    return self.pool

  def fill_bitmask(self, out):
    out[:] = 0
    for t in self._allowed():
      out[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    assert out.shape == (mask_words(VOCAB),)

  def advance(self, token):
    if token not in self._allowed():
      raise ValueError(f"token {token} not allowed")
    self.seen.append(token)

  def is_finished(self):
    return self.sequence is not None and len(self.seen) == len(self.sequence)


class Broken(Only):
  def fill_bitmask(self, out):
    if len(self.seen) >= 2:
      raise RuntimeError("grammar failure")
    super().fill_bitmask(out)


def test_token_constraints_are_honoured_and_end_the_row(engine):
  evens = Only(pool=list(range(0, VOCAB, 2)))
  fixed = Only(sequence=[10, 20, 30, 31])
  free = _submit(engine, [[5, 4, 3]], [GREEDY])
  got = _submit(engine, [[1, 2], [1, 2]], [SamplingParams(max_new_tokens=12, temperature=1.0, seed=1),
                                           SamplingParams(max_new_tokens=12, temperature=0.0)],
                constraints=[evens, fixed])
  _run(engine, free, got)
  assert all(t % 2 == 0 for t in got.outputs[0].tokens) and len(got.outputs[0].tokens) == 12
  assert got.outputs[1].tokens == [10, 20, 30, 31]
  assert (got.outputs[1].finish_reason, got.outputs[1].stop_reason) == ("stop", None)
  assert evens.seen == got.outputs[0].tokens
  # Logprobs stay the raw model's: the unconstrained row is untouched by its neighbours' masks.
  assert free.outputs[0].tokens == _alone(engine, [5, 4, 3], GREEDY).tokens


def test_an_error_in_one_job_does_not_stop_the_others(engine):
  bad = _submit(engine, [[7, 7]], [GREEDY], constraints=[Broken(pool=list(range(VOCAB)))])
  good = _submit(engine, [[7, 7]], [GREEDY])
  _run(engine, bad, good)
  assert isinstance(bad.error, RuntimeError) and good.error is None
  assert good.outputs[0].tokens == _alone(engine, [7, 7], GREEDY).tokens
  assert engine.stats["running"] == 0


def test_requests_that_can_never_run_are_refused(engine):
  with pytest.raises(ValueError, match="max_model_len"):
    engine.submit(Job([[1] * 100], [SamplingParams(max_new_tokens=40)], lambda item: None))
  with pytest.raises(ValueError, match="max_num_seqs"):
    engine.submit(Job([[1]] * 5, [GREEDY] * 5, lambda item: None))


def test_generate_is_thread_safe_and_shares_the_batch(lm):
  eng = ContinuousEngine(lm, max_num_seqs=4, chunk_size=2)
  prompts = [[20 + i, 5, 6] for i in range(6)]
  want = lm.sampler.generate(lm.params, prompts, GREEDY, detokenize=_detokenize)
  results = [None] * 6

  def one(i):
    results[i] = eng.generate([prompts[i]], GREEDY)[0]

  threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=120)
  finally:
    eng.stop()
  assert [r.tokens for r in results] == [w.tokens for w in want]
  assert eng.stats["finished"] == 6
