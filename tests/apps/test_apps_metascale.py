"""METASCALE on simulated environments with known optima (no LLM).

(a) UCB1 on a Bernoulli bandit: the best arm gets the most pulls, the pseudo-regret stays under
    UCB1's finite-time bound and grows sublinearly; (b) the GA on a OneMax landscape improves the mean
    fitness over generation 0 (and, with known fitness, never lowers it); (c) budget accounting is
    exact on a scripted client and the limits are never crossed; (d) the pairwise judge sees both
    orders: a length-preferring judge gives the expected win rate, a position-biased one gives 0.5;
    (e) run_metascale end to end on a scripted client, and the equal-budget comparison + report.
"""

import json
import math
import pathlib
import random
import re

import numpy as np
import pytest

from mlx_med.apps import instructions as ins
from mlx_med.apps import metascale as ms
from mlx_med.llm.client import Completion

# ---------------------------------------------------------------------------------------------
# (a) UCB1
# ---------------------------------------------------------------------------------------------

MEANS = [0.2, 0.35, 0.5, 0.65, 0.8]


def _run_bandit(T, seed, c=ms.UCB_C_DEFAULT):
  rng = np.random.default_rng(seed)
  b = ms.UCB1(len(MEANS), c)
  best = max(MEANS)
  regret = np.empty(T)
  acc = 0.0
  for t in range(T):
    arm = b.select()
    b.update(arm, float(rng.random() < MEANS[arm]))
    acc += best - MEANS[arm]  # pseudo-regret: expected loss of the chosen arm
    regret[t] = acc
  return b, regret


@pytest.fixture(scope="module")
def bandit_runs():
  return [_run_bandit(4000, seed) for seed in range(12)]


def test_ucb_tries_every_arm_first_and_follows_formula():
  b = ms.UCB1(3, c=1.0)
  order = []
  for r in (0.0, 1.0, 0.5):
    arm = b.select()
    order.append(arm)
    b.update(arm, r)
  assert order == [0, 1, 2]
  scores = b.scores()
  expected = [m + 1.0 * math.sqrt(math.log(3) / 1) for m in (0.0, 1.0, 0.5)]
  np.testing.assert_allclose(scores, expected, rtol=1e-12)
  assert b.select() == 1
  new = b.add_arm()
  assert b.select() == new  # an evolved arm starts untried and is tried next
  b.retire(1)
  assert math.isnan(b.scores()[1])
  with pytest.raises(ValueError, match="outside"):
    b.update(0, 1.5)


def test_ucb_finds_best_arm(bandit_runs):
  for b, _ in bandit_runs:
    assert int(np.argmax(b.pulls)) == len(MEANS) - 1
    assert b.pulls[-1] > 0.6 * b.total


def test_ucb_regret_sublinear_and_within_theory(bandit_runs):
  regret = np.mean([r for _, r in bandit_runs], axis=0)
  gaps = [max(MEANS) - m for m in MEANS if m < max(MEANS)]
  for T in (250, 1000, 4000):
    # Auer et al. (2002), Theorem 1: E[regret(T)] <= sum 8 ln T / gap + (1 + pi^2 / 3) sum gap
    bound = sum(8 * math.log(T) / g for g in gaps) + (1 + math.pi ** 2 / 3) * sum(gaps)
    assert regret[T - 1] <= bound
  per_step = [regret[T - 1] / T for T in (250, 1000, 4000)]
  assert per_step[0] > per_step[1] > per_step[2]
  # O(log T) growth gives regret(4T)/regret(T) near ln(4T)/ln(T) (1.2 at T=1000); any rate of sqrt(T) or
  # faster gives >= 2. The bar is that rate: growth strictly slower than sqrt(T).
  assert regret[3999] / regret[999] < 2.0


# ---------------------------------------------------------------------------------------------
# (b) GA on a synthetic landscape
# ---------------------------------------------------------------------------------------------

L = 24


class BitOps:
  """Deterministic stand-ins for the LLM's operators: one-point crossover, a seeded one-bit flip."""

  def __init__(self, seed):
    self.rng = random.Random(seed)

  def crossover(self, a, b):
    cut = self.rng.randrange(1, L)
    return a[:cut] + b[cut:]

  def mutate(self, a):
    i = self.rng.randrange(L)
    return a[:i] + (1 - a[i],) + a[i + 1:]


def onemax(x):
  return float(sum(x))


def test_ga_improves_mean_fitness():
  gains = []
  for seed in range(5):
    rng = random.Random(seed)
    pop = [tuple(rng.randrange(2) for _ in range(L)) for _ in range(10)]
    ops = BitOps(seed)
    means = [np.mean([onemax(p) for p in pop])]
    for _ in range(15):
      pop = ms.evolve_population(pop, onemax, ops, n_parents=3, n_crossover=2, n_mutation=2)
      assert len(pop) == 10
      means.append(np.mean([onemax(p) for p in pop]))
    # keeping the fittest of parents + children can never lower the mean (a property of truncation)
    assert all(b >= a for a, b in zip(means, means[1:]))
    gains.append(means[-1] - means[0])
  # random 24-bit strings start near 12 ones; 15 generations of 4 children each add several ones
  assert min(gains) >= 2.0, gains


def test_select_parents_respects_min_pulls_and_activity():
  means = [0.9, 0.5, 0.8, math.nan, 0.95]
  pulls = [1, 4, 3, 0, 5]
  active = [True, True, True, True, False]
  assert ms.select_parents(means, pulls, active, 2, min_pulls=2) == [2, 1]
  assert ms.select_parents(means, pulls, active, 2, min_pulls=1) == [0, 2]


# ---------------------------------------------------------------------------------------------
# A scripted client: tokens = whitespace words, replies chosen by what the prompt asks for
# ---------------------------------------------------------------------------------------------

def _words(text):
  return len(text.split())


class ScriptedClient:
  """Answers like a model would, deterministically; records the tokens of every call."""

  def __init__(self, bad_self_composed=1):
    self.calls = []
    self.bad = bad_self_composed

  def _reply(self, messages, j):
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = messages[-1]["content"]
    if "Before anyone answers" in user:
      if j < self.bad:
        return "I cannot write that."  # unparseable: replaced by a default meta-thought
      topics = ["potassium and creatinine", "weight daily", "blood pressure"]
      return json.dumps({"mindset": f"a cardiologist ({j})", "strategy": f"Check {topics[j % 3]} first."})
    if "Merge their strengths" in user:
      got = re.findall(r"strategy: ([^\n]+)", user)
      return json.dumps({"mindset": "a merged expert", "strategy": " ".join(got)})
    if "Rewrite this meta-thought" in user:
      strategy = re.search(r"Strategy: ([^\n]+)", user).group(1)
      return f"Mindset: a revised expert\nStrategy: {strategy} Also monitor blood pressure."
    if "impartial expert judge" in system:
      resp = user.split("[Response]\n", 1)[1]
      return json.dumps({"rating": min(10, 1 + 3 * sum(k in resp for k in ("potassium", "weight", "pressure")))})
    # generation: the answer echoes the strategy it was given (so strategies decide the reward)
    strategy = re.search(r"strategy: ([^\n]+)", system)
    return "Answer: " + (strategy.group(1) if strategy else "monitor the patient.")

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None):
    prompt_tokens = sum(_words(m["content"]) for m in messages)
    outs = []
    for j in range(n):
      words = self._reply(messages, j).split()[:max_tokens]
      outs.append(Completion(text=" ".join(words), finish_reason="stop", prompt_tokens=prompt_tokens,
                             completion_tokens=len(words)))
    self.calls.append({"prompt_tokens": prompt_tokens, "completion_tokens": sum(o.completion_tokens for o in outs)})
    return outs


PROMPT = "A 68-year-old with heart failure starts furosemide. What should be monitored?"
KEYS = ["potassium", "creatinine", "weight", "blood pressure"]

SMALL = dict(samples_per_prompt=12, num_self_composed=3, num_from_instructions=2, num_instructions=24,
             evolve_every=4, pool_cap=6, max_tokens=64)


# ---------------------------------------------------------------------------------------------
# (c) budget accounting
# ---------------------------------------------------------------------------------------------

def test_budget_exact_on_scripted_client():
  client = ScriptedClient()
  judge = ms.LLMJudgeScorer(client)
  r = ms.metascale_prompt(client, PROMPT, judge, SMALL)
  u = r.usage
  assert u["calls"] == len(client.calls)
  assert u["prompt_tokens"] == sum(c["prompt_tokens"] for c in client.calls)
  assert u["completion_tokens"] == sum(c["completion_tokens"] for c in client.calls)
  assert u["estimated_calls"] == 0
  ph = u["by_phase"]
  # one self-composition call, one generation + one judgment per sample, two operators per evolution
  assert ph["init"]["calls"] == 1
  assert ph["generate"]["calls"] == ph["score"]["calls"] == r.samples == 12
  assert ph["evolve"]["calls"] == 2 * len(r.evolutions) == 4
  assert sum(p["calls"] for p in ph.values()) == u["calls"]
  assert sum(t["tokens"] for t in r.trace) == ph["generate"]["prompt_tokens"] + ph["generate"]["completion_tokens"] \
      + ph["score"]["prompt_tokens"] + ph["score"]["completion_tokens"]


@pytest.mark.parametrize("limits", [{"max_calls": 9}, {"max_tokens_budget": 900}])
def test_budget_limits_never_crossed(limits):
  client = ScriptedClient()
  r = ms.metascale_prompt(client, PROMPT, ms.LLMJudgeScorer(client), {**SMALL, **limits})
  assert r.stopped == "budget"
  assert r.usage["refused"] == 1
  if "max_calls" in limits:
    assert len(client.calls) <= 9
  else:
    assert sum(c["prompt_tokens"] + c["completion_tokens"] for c in client.calls) <= 900
  assert r.usage["calls"] == len(client.calls)


def test_budget_estimate_calibrates():
  b = ms.Budget(max_tokens=1000)
  msgs = [{"role": "user", "content": "x" * 100}]
  assert b.estimate_prompt_tokens(msgs) == 100 + 16  # one token per character before any report
  b.charge("generate", msgs, [Completion("a b", "stop", prompt_tokens=25, completion_tokens=2)])
  assert b.estimate_prompt_tokens(msgs) == math.ceil(100 * 0.25 * 1.25) + 16
  assert b.total_tokens == 27


# ---------------------------------------------------------------------------------------------
# (d) pairwise judge
# ---------------------------------------------------------------------------------------------

class LengthJudgeClient:
  """A judge that prefers the longer answer (and says so in Arena-Hard's [[...]] form)."""

  def __init__(self):
    self.seen = []

  def chat(self, messages, **kw):
    user = messages[-1]["content"]
    a = user.split("[Assistant A]\n", 1)[1].split("\n\n[Assistant B]\n", 1)[0]
    b = user.split("[Assistant B]\n", 1)[1]
    self.seen.append((a, b))
    v = "A>B" if len(a) > len(b) else "B>A" if len(b) > len(a) else "A=B"
    return [Completion(f"My final verdict is [[{v}]].", "stop", prompt_tokens=1, completion_tokens=1)]


class FirstPositionJudge:
  def judge(self, prompt, a, b):
    return "A>>B"


def test_pairwise_length_judge_win_rate_and_both_orders():
  client = LengthJudgeClient()
  judge = ms.PairwiseJudge(client)
  prompts = ["p1", "p2", "p3", "p4"]
  ours = ["long answer here", "short", "same", "longer one"]
  base = ["short", "much longer answer", "same", "tiny"]
  out = ms.pairwise_win_rate(judge, prompts, ours, base, n_boot=200)
  # wins on p1 and p4, loses p2, ties p3: (1 + 0 + 0.5 + 1) / 4
  assert out["win_rate"] == pytest.approx(0.625)
  assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 1)
  assert out["consistent"] == 1.0 and out["unparsed_games"] == 0
  assert client.seen[0] == ("long answer here", "short") and client.seen[1] == ("short", "long answer here")
  assert 0.0 <= out["lo"] <= out["win_rate"] <= out["hi"] <= 1.0


def test_pairwise_position_bias_cancels():
  out = ms.pairwise_win_rate(FirstPositionJudge(), ["p"] * 6, ["a"] * 6, ["b"] * 6, n_boot=100)
  assert out["win_rate"] == 0.5 and out["consistent"] == 0.0


def test_parse_verdict_and_rating():
  assert ms.parse_verdict('{"verdict": "B>>A"}') == "B>>A"
  assert ms.parse_verdict("A is better... final: [[A>B]]") == "A>B"
  assert ms.parse_verdict("[[A<B]]") == "B>A"
  assert ms.parse_verdict("no idea") is None
  assert ms.parse_rating('{"rating": 7}') == 7
  assert ms.parse_rating("Rating: [[9]]") == 9
  assert ms.parse_rating("I give it 8/10.") == 8
  assert ms.parse_rating("score 42") is None
  assert ms.parse_meta_thought('Sure! {"mindset": "a nurse", "strategy": "explain simply"}').mindset == "a nurse"
  t = ms.parse_meta_thought("**Mindset:** a pharmacist\n**Strategy:** check doses")
  assert (t.mindset, t.strategy) == ("a pharmacist", "check doses")
  assert ms.parse_meta_thought("nothing here") is None


def test_scorers_normalise():
  assert ms.RewardModelScorer(lambda p, r: 0.0).score("p", "r") == 0.5
  assert ms.RewardModelScorer(lambda p, r: 15.0, low=-10, high=10).score("p", "r") == 1.0
  assert ms.KeywordScorer({"q": ["a", "b"]}).score("q", "A only") == 0.5


class RawScorer:
  def score(self, prompt, response):
    return 3.0  # an unnormalised reward


def test_unnormalised_scorer_is_an_error():
  with pytest.raises(ValueError, match=r"RawScorer returned 3.0; scores must lie in \[0, 1\]"):
    ms.metascale_prompt(ScriptedClient(), PROMPT, RawScorer(), SMALL)


# ---------------------------------------------------------------------------------------------
# (e) end to end
# ---------------------------------------------------------------------------------------------

def test_run_metascale_end_to_end():
  client = ScriptedClient()
  res = ms.run_metascale(client, [PROMPT, PROMPT], ms.KeywordScorer(KEYS), SMALL)
  assert len(res.results) == 2
  r = res.results[0]
  assert r.init["self_composed"] == 2 and r.init["self_fallbacks"] == 1 and r.init["from_instructions"] == 2
  assert [t["arm"] for t in r.trace[:5]] == [0, 1, 2, 3, 4]  # every initial arm once, in order
  assert r.samples == 12 and r.stopped == "samples"
  assert len(r.evolutions) == 2
  ev = r.evolutions[0]
  assert len(ev["children"]) == 2 and ev["parents"]
  assert sum(p["active"] for p in r.pool) <= SMALL["pool_cap"]
  # the best response is the one with the highest reward, and the bandit's best arm was pulled most
  assert r.best_reward == max(t["reward"] for t in r.trace)
  assert ms.KeywordScorer(KEYS).score(PROMPT, r.best_response) == r.best_reward
  assert r.best_reward >= 0.5  # an evolved child combining strategies covers more key points
  d = res.to_dict()
  assert "prompt" not in d["prompts"][0] and "mindset" not in d["prompts"][0]["pool"][0]
  json.dumps(d)


def test_instructions_roundtrip_and_errors(tmp_path):
  path = tmp_path / "ins.jsonl"
  assert ins.write_instructions(path, 30, seed=3) == 30
  rows = ins.load_instructions(path)
  assert rows == ins.generate_instructions(30, seed=3)
  assert {r["category"] for r in rows} == set(ins.CATEGORIES)
  top = ins.most_relevant(rows, "Is warfarin safe for a patient with heart failure?", 3)
  assert len(top) == 3 and any("safe" in r["instruction"] for r in top)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"instruction": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'response'"):
    ins.load_instructions(bad)


def test_config_rejects_unknown_key():
  with pytest.raises(ValueError, match="unknown keys"):
    ms.MetaScaleConfig.from_mapping({"samples": 3})


def test_compare_at_equal_budget_and_report(tmp_path):
  client = ScriptedClient()
  judge = ms.PairwiseJudge(LengthJudgeClient())
  prompts = [PROMPT, "Explain atrial fibrillation and why anticoagulation is offered."]
  scorer = ms.LLMJudgeScorer(client)
  rows = [ms.compare_at_equal_budget(client, prompts, scorer, judge, {**SMALL, "samples_per_prompt": s},
                                     n_boot=100) for s in (4, 8)]
  for row in rows:
    ms_use, bon_use = row["metascale"]["usage"], row["best_of_n"]["usage"]
    assert bon_use["calls"] <= ms_use["calls"] and bon_use["total_tokens"] <= ms_use["total_tokens"]
    assert row["best_of_n"]["mean_n"] >= 1
    assert set(row["win_rate"]) == {"metascale_vs_plain", "best_of_n_vs_plain", "metascale_vs_best_of_n"}
  paths = ms.write_report(tmp_path / "rep", rows)
  assert set(paths) == {"json", "markdown", "png"}
  data = json.loads(pathlib.Path(paths["json"]).read_text())
  assert len(data["comparisons"]) == 2
  assert "| 8 |" in pathlib.Path(paths["markdown"]).read_text()


def test_config_variants_and_experiment(tmp_path):
  from configs.apps.metascale import get_config

  for variant in ("paper", "smoke"):
    cfg = get_config(variant)
    ms.MetaScaleConfig.from_mapping(cfg.metascale)  # every key is a MetaScaleConfig field
  cfg = get_config("smoke")
  cfg.eval.n_prompts = 2
  cfg.eval.budgets = [2, 4]
  cfg.eval.n_boot = 50
  paths = ms.run_experiment(cfg, tmp_path / "exp", client=ScriptedClient(),
                            judge_client=LengthJudgeClient())
  data = json.loads(pathlib.Path(paths["json"]).read_text())
  assert [c["samples_per_prompt"] for c in data["comparisons"]] == [2, 4]
  with pytest.raises(ValueError, match="unknown variant"):
    get_config("huge")
