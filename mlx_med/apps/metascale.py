"""METASCALE: test-time scaling with evolving meta-thoughts, over any `LLMClient`.

A *meta-thought* is a cognitive mindset (who is thinking: "a clinical pharmacist who checks every
prescription for harm") plus a problem-solving strategy (how: "check dose, interactions, then
monitoring"); it is rendered into the system prompt before the model answers. For each prompt:

1. **Pool initialisation.** The model composes `num_self_composed` meta-thoughts for the task itself
   (one call, n samples, JSON; a reply that does not parse is replaced by a default meta-thought and
   counted), and `num_from_instructions` more are drawn from instruction-tuning data: the records
   most relevant to the prompt (`mlx_med.apps.instructions`), turned into a mindset + strategy
   by the LLM ("llm") or by a template from the record ("template", no calls).
2. **Selection: UCB1** (Auer, Cesa-Bianchi & Fischer 2002). Arm i's score is
   `mean_i + c * sqrt(ln N / n_i)` with N the total pulls so far and n_i the arm's pulls; arms never
   pulled are tried first (lowest index first). The exploration constant defaults to c = sqrt(2),
   UCB1's own constant, for which the expected regret after T pulls is at most
   sum_i 8 ln T / gap_i + (1 + pi^2/3) sum_i gap_i when rewards lie in [0, 1].
3. **Reward.** A pluggable scorer `score(prompt, response) -> float in [0, 1]`: an LLM judge over a
   client (1-10 rating, JSON-constrained when the client takes `response_format`), a reward model
   (any function, normalised), or a keyword scorer (deterministic, for tests and the demo).
4. **Evolution** every `evolve_every` samples: the `num_parents` best meta-thoughts by mean reward
   (with at least `evolve_min_pulls` pulls) are parents; the LLM writes `num_crossover` crossovers
   (merge two parents) and `num_mutation` mutations (rewrite one). Children join the pool untried;
   when the pool exceeds `pool_cap` the tried meta-thought with the lowest mean reward is retired.
5. **Budget** in calls and tokens (prompt + completion, for generation, scoring and evolution),
   enforced before each call: a call whose worst case (estimated prompt tokens + n * max_tokens)
   would cross the limit is not made and the run for that prompt stops. Prompt tokens are
   estimated from characters, calibrated on the tokens the backend reports (first call: one token
   per character, deliberately pessimistic).

The best response (highest reward) is returned per prompt with a trace of arm pulls, rewards and
evolutions. `compare_at_equal_budget` evaluates METASCALE against plain sampling (one sample) and
best-of-N scored by the same scorer with N set by the budget METASCALE actually spent, through an
Arena-Hard-style pairwise judge that sees each pair in both orders (position-bias control).
Prompt and response text stay out of logs and reports unless `include_text` is asked for.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Protocol

import numpy as np

from mlx_med.apps import instructions as instr_lib
from mlx_med.core.fileio import read_jsonl_objects, write_text_atomic
from mlx_med.core.stats import bootstrap_mean_ci

logger = logging.getLogger("mlx_med.apps.metascale")

UCB_C_DEFAULT = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------
# Meta-thoughts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MetaThought:
  """A cognitive mindset + a problem-solving strategy; `origin` says where it came from."""

  mindset: str
  strategy: str
  origin: str = "default"  # self | instruction | default | crossover | mutation
  parents: tuple[int, ...] = ()

  def system_prompt(self) -> str:
    mindset = self.mindset.strip().rstrip(".")
    return (f"Adopt this mindset: {mindset}.\nProblem-solving strategy: {self.strategy.strip()}\n"
            "Think the task through with this mindset and strategy, then give your answer.")

  def to_dict(self) -> dict[str, Any]:
    return {"mindset": self.mindset, "strategy": self.strategy, "origin": self.origin,
            "parents": list(self.parents)}


DEFAULT_META_THOUGHTS = (
    MetaThought("a careful physician who reasons step by step from the facts given",
                "Restate the question, list the relevant facts, reason to a conclusion, and check it for safety."),
    MetaThought("a medical educator who explains clearly and completely",
                "Cover the definition, the key mechanism, what to do, and when to seek help, in plain words."),
    MetaThought("a sceptical reviewer who looks for what could go wrong",
                "Draft an answer, look for missing risks, contraindications and exceptions, then revise it."),
    MetaThought("a specialist who structures answers for busy clinicians",
                "Lead with the bottom line, then give a short structured list of supporting points."),
)

_META_SCHEMA = {"type": "object",
                "properties": {"mindset": {"type": "string"}, "strategy": {"type": "string"}},
                "required": ["mindset", "strategy"], "additionalProperties": False}
META_THOUGHT_FORMAT = {"type": "json_schema",
                       "json_schema": {"name": "meta_thought", "schema": _META_SCHEMA, "strict": True}}


def _json_objects(text: str):
  """Every JSON object that starts at some '{' of `text`, in order."""
  decoder = json.JSONDecoder()
  for m in re.finditer(r"\{", text):
    try:
      obj, _ = decoder.raw_decode(text, m.start())
    except json.JSONDecodeError:
      continue
    if isinstance(obj, dict):
      yield obj


def parse_meta_thought(text: str, origin: str = "self") -> Optional[MetaThought]:
  """A meta-thought from a model reply: JSON {"mindset", "strategy"}, else "Mindset: ... Strategy: ..."."""
  for obj in _json_objects(text or ""):
    mindset, strategy = obj.get("mindset"), obj.get("strategy")
    if isinstance(mindset, str) and isinstance(strategy, str) and mindset.strip() and strategy.strip():
      return MetaThought(mindset.strip(), strategy.strip(), origin)
  m = re.search(r"mindset\W*[:\-]\s*(.+?)\s*(?:\n|$|strategy\W*[:\-])", text or "", re.IGNORECASE | re.DOTALL)
  s = re.search(r"strategy\W*[:\-]\s*(.+)", text or "", re.IGNORECASE | re.DOTALL)
  if m and s and m.group(1).strip() and s.group(1).strip():
    return MetaThought(m.group(1).strip(' \t"*'), s.group(1).strip(' \t\n"*'), origin)
  return None


# ---------------------------------------------------------------------------------------------
# UCB1
# ---------------------------------------------------------------------------------------------


class UCB1:
  """UCB1 over a growing set of arms: score_i = mean_i + c * sqrt(ln N / n_i); untried arms first.

  Arms can be added (evolved meta-thoughts start untried) and retired (no longer selected; their
  pulls still count in N, the total number of rounds). Rewards must lie in [0, 1].
  """

  def __init__(self, n_arms: int = 0, c: float = UCB_C_DEFAULT):
    if c < 0:
      raise ValueError(f"UCB exploration constant c={c} must be >= 0 (sqrt(2) is UCB1's)")
    self.c = float(c)
    self.pulls: list[int] = []
    self.sums: list[float] = []
    self.active: list[bool] = []
    self.total = 0
    for _ in range(n_arms):
      self.add_arm()

  def add_arm(self) -> int:
    self.pulls.append(0)
    self.sums.append(0.0)
    self.active.append(True)
    return len(self.pulls) - 1

  def retire(self, arm: int) -> None:
    self.active[arm] = False

  def mean(self, arm: int) -> float:
    return self.sums[arm] / self.pulls[arm] if self.pulls[arm] else math.nan

  def scores(self) -> list[float]:
    """UCB score per arm (inf when untried, nan when retired)."""
    out = []
    log_n = math.log(self.total) if self.total > 0 else 0.0
    for i in range(len(self.pulls)):
      if not self.active[i]:
        out.append(math.nan)
      elif self.pulls[i] == 0:
        out.append(math.inf)
      else:
        out.append(self.mean(i) + self.c * math.sqrt(log_n / self.pulls[i]))
    return out

  def select(self) -> int:
    best, best_score = -1, -math.inf
    for i, s in enumerate(self.scores()):
      if not math.isnan(s) and s > best_score:  # strict: ties keep the lowest index
        best, best_score = i, s
    if best < 0:
      raise ValueError("UCB1 has no active arm to select; add an arm first")
    return best

  def update(self, arm: int, reward: float) -> None:
    if not 0.0 <= reward <= 1.0:
      raise ValueError(f"reward {reward} is outside [0, 1]; normalise the scorer's output")
    self.pulls[arm] += 1
    self.sums[arm] += float(reward)
    self.total += 1


# ---------------------------------------------------------------------------------------------
# Budget accounting
# ---------------------------------------------------------------------------------------------


class BudgetExhausted(RuntimeError):
  """The next call could cross the budget; it was not made."""


def _message_chars(messages) -> int:
  total = 0
  for m in messages:
    content = m.get("content") if isinstance(m, Mapping) else None
    if isinstance(content, str):
      total += len(content)
    elif isinstance(content, list):
      total += sum(len(p.get("text", "")) for p in content if isinstance(p, Mapping))
  return total


class Budget:
  """Calls and tokens (prompt + completion) spent per phase, with limits checked before each call.

  `max_calls` / `max_tokens`: None or 0 = unlimited. A call's worst case is its estimated prompt
  tokens plus n * max_tokens; the estimate is characters times the largest tokens-per-character
  ratio seen so far (times 1.25, plus 16 tokens per message for the chat template), or one token per
  character (`1 / chars_per_token`) before any call reported its prompt tokens. Prompt tokens count
  once per call (as endpoints bill them), completion tokens per sample. When a backend reports no
  token counts the estimate is charged and counted in `estimated_calls`.
  """

  def __init__(self, max_calls: Optional[int] = None, max_tokens: Optional[int] = None,
               chars_per_token: float = 1.0):
    self.max_calls = int(max_calls) if max_calls else None
    self.max_tokens = int(max_tokens) if max_tokens else None
    if chars_per_token <= 0:
      raise ValueError(f"chars_per_token={chars_per_token} must be > 0")
    self.chars_per_token = float(chars_per_token)
    self.calls = 0
    self.prompt_tokens = 0
    self.completion_tokens = 0
    self.estimated_calls = 0
    self.refused = 0
    self.by_phase: dict[str, dict[str, int]] = {}
    self._ratio: Optional[float] = None
    self._lock = threading.Lock()

  @property
  def total_tokens(self) -> int:
    return self.prompt_tokens + self.completion_tokens

  def estimate_prompt_tokens(self, messages) -> int:
    chars = _message_chars(messages)
    ratio = self._ratio * 1.25 if self._ratio is not None else 1.0 / self.chars_per_token
    return int(math.ceil(chars * ratio)) + 16 * len(messages)

  def worst_case(self, messages, max_tokens: int, n: int = 1) -> int:
    return self.estimate_prompt_tokens(messages) + n * int(max_tokens)

  def can_afford(self, tokens: int, calls: int = 1) -> bool:
    with self._lock:
      if self.max_calls is not None and self.calls + calls > self.max_calls:
        return False
      if self.max_tokens is not None and self.total_tokens + tokens > self.max_tokens:
        return False
      return True

  def check(self, messages, max_tokens: int, n: int = 1) -> None:
    need = self.worst_case(messages, max_tokens, n)
    if not self.can_afford(need):
      with self._lock:
        self.refused += 1
      raise BudgetExhausted(f"budget: {self.calls}/{self.max_calls} calls, {self.total_tokens}/{self.max_tokens} "
                            f"tokens used; the next call may need {need} tokens")

  def charge(self, phase: str, messages, outs: Sequence[Any]) -> dict[str, int]:
    prompt = next((o.prompt_tokens for o in outs if getattr(o, "prompt_tokens", None) is not None), None)
    estimated = False
    if prompt is None:
      prompt, estimated = self.estimate_prompt_tokens(messages), True
    completion = 0
    for o in outs:
      if getattr(o, "completion_tokens", None) is not None:
        completion += int(o.completion_tokens)
      else:
        completion += int(math.ceil(len(getattr(o, "text", "") or "") / self.chars_per_token))
        estimated = True
    with self._lock:
      chars = _message_chars(messages)
      if not estimated and chars > 0:
        r = prompt / chars
        self._ratio = r if self._ratio is None else max(self._ratio, r)
      self.calls += 1
      self.prompt_tokens += int(prompt)
      self.completion_tokens += completion
      self.estimated_calls += int(estimated)
      ph = self.by_phase.setdefault(phase, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0})
      ph["calls"] += 1
      ph["prompt_tokens"] += int(prompt)
      ph["completion_tokens"] += completion
    return {"prompt_tokens": int(prompt), "completion_tokens": completion}

  def summary(self) -> dict[str, Any]:
    return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens, "max_calls": self.max_calls, "max_tokens": self.max_tokens,
            "refused": self.refused, "estimated_calls": self.estimated_calls,
            "by_phase": {k: dict(v) for k, v in sorted(self.by_phase.items())}}


def supports_response_format(client: Any) -> bool:
  """Whether `client.chat` takes `response_format` (clients before constrained decoding do not);
  wrappers such as LoggedClient are looked through (`structured.client_accepts`)."""
  from mlx_med.apps.structured import client_accepts

  flag = getattr(client, "supports_response_format", None)
  if isinstance(flag, bool):
    return flag
  return client_accepts(client, "response_format")


class MeteredClient:
  """Forwards `chat` to a client after checking the budget, then charges it under `phase`."""

  def __init__(self, client: Any, budget: Budget, phase: str):
    self.client, self.budget, self.phase = client, budget, phase
    self.supports_response_format = supports_response_format(client)

  def chat(self, messages, *, max_tokens: int = 256, n: int = 1, **kwargs):
    if kwargs.get("response_format") is None:
      kwargs.pop("response_format", None)
    elif not self.supports_response_format:
      kwargs.pop("response_format")
    self.budget.check(messages, max_tokens, n)
    outs = self.client.chat(messages, max_tokens=max_tokens, n=n, **kwargs)
    self.budget.charge(self.phase, messages, outs)
    return outs


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------


class Scorer(Protocol):
  def score(self, prompt: str, response: str) -> float: ...  # in [0, 1]


DEFAULT_RUBRIC = ("Rate how well the response answers the user's medical request: correct, complete, safe "
                  "(mentions when to seek care), and clear. 1 = useless or harmful, 10 = what an expert "
                  "clinician would write.")

_RATING_FORMAT = {"type": "json_schema", "json_schema": {
    "name": "rating", "strict": True,
    "schema": {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 10}},
               "required": ["rating"], "additionalProperties": False}}}


def parse_rating(text: str, low: int = 1, high: int = 10) -> Optional[float]:
  """A rating in [low, high] from a judge's reply: JSON "rating"/"score", "[[7]]", "Rating: 7", "7/10", a bare number."""
  text = text or ""
  for obj in _json_objects(text):
    for key in ("rating", "score"):
      v = obj.get(key)
      if isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high:
        return float(v)
  for pattern in (r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", r"(?:rating|score)\W{0,3}[:=]?\s*(\d+(?:\.\d+)?)",
                  r"(\d+(?:\.\d+)?)\s*/\s*10\b", r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])"):
    for m in re.finditer(pattern, text, re.IGNORECASE):
      v = float(m.group(1))
      if low <= v <= high:
        return v
  return None


class LLMJudgeScorer:
  """An LLM rates the response 1-10 against a rubric; reward = (rating - 1) / 9.

  Constrained to {"rating": int} when the client takes `response_format`; otherwise the reply is
  parsed (`parse_rating`). An unparseable reply scores `fallback` and is counted in `stats`.
  """

  def __init__(self, client: Any, rubric: str = DEFAULT_RUBRIC, *, max_tokens: int = 32,
               temperature: float = 0.0, fallback: float = 0.0):
    self.client, self.rubric = client, rubric
    self.max_tokens, self.temperature, self.fallback = int(max_tokens), float(temperature), float(fallback)
    self.stats = {"calls": 0, "unparsed": 0}
    self._lock = threading.Lock()

  def with_client(self, client: Any) -> LLMJudgeScorer:
    other = LLMJudgeScorer(client, self.rubric, max_tokens=self.max_tokens, temperature=self.temperature,
                           fallback=self.fallback)
    other.stats, other._lock = self.stats, self._lock  # one tally across the copies
    return other

  def messages(self, prompt: str, response: str) -> list[dict]:
    return [{"role": "system", "content": "You are an impartial expert judge. " + self.rubric +
             ' Reply with JSON {"rating": <integer 1-10>}.'},
            {"role": "user", "content": f"[Request]\n{prompt}\n\n[Response]\n{response}"}]

  def score(self, prompt: str, response: str) -> float:
    kwargs = {}
    if supports_response_format(self.client):
      kwargs["response_format"] = _RATING_FORMAT
    outs = self.client.chat(self.messages(prompt, response), max_tokens=self.max_tokens,
                            temperature=self.temperature, seed=0, **kwargs)
    rating = parse_rating(outs[0].text if outs else "")
    with self._lock:
      self.stats["calls"] += 1
      self.stats["unparsed"] += int(rating is None)
    return self.fallback if rating is None else (rating - 1.0) / 9.0


class RewardModelScorer:
  """A reward model as a function `fn(prompt, response) -> raw reward`, normalised into [0, 1].

  With `low`/`high` the raw value is mapped linearly and clipped; without them it goes through a
  logistic (reward models output unbounded logits; sigmoid keeps their order).
  """

  def __init__(self, fn: Callable[[str, str], float], *, low: Optional[float] = None, high: Optional[float] = None):
    if (low is None) != (high is None) or (low is not None and not high > low):
      raise ValueError("RewardModelScorer needs both low < high, or neither (logistic normalisation)")
    self.fn, self.low, self.high = fn, low, high

  def score(self, prompt: str, response: str) -> float:
    raw = float(self.fn(prompt, response))
    if not math.isfinite(raw):
      raise ValueError(f"reward model returned {raw}; expected a finite number")
    if self.low is None:
      return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, raw))))
    return min(1.0, max(0.0, (raw - self.low) / (self.high - self.low)))


class KeywordScorer:
  """Deterministic: the fraction of a prompt's key points (case-insensitive substrings) the response covers.

  `key_points` maps prompt -> list of phrases (or one list for every prompt). Tests and the demo use
  it as a reward with a known optimum.
  """

  def __init__(self, key_points: Mapping[str, Sequence[str]] | Sequence[str]):
    self.key_points = key_points

  def score(self, prompt: str, response: str) -> float:
    points = self.key_points.get(prompt, ()) if isinstance(self.key_points, Mapping) else self.key_points
    if not points:
      return 0.0
    low = (response or "").lower()
    return sum(p.lower() in low for p in points) / len(points)


def _checked_reward(scorer: Any, value: Any) -> float:
  r = float(value)
  if not (0.0 <= r <= 1.0):
    raise ValueError(f"scorer {type(scorer).__name__} returned {value}; scores must lie in [0, 1] "
                     "(wrap raw rewards in RewardModelScorer to normalise them)")
  return r


# ---------------------------------------------------------------------------------------------
# Genetic evolution
# ---------------------------------------------------------------------------------------------


class GeneticOperators(Protocol):
  def crossover(self, a: Any, b: Any) -> Any: ...   # None = no child
  def mutate(self, a: Any) -> Any: ...


class LLMOperators:
  """Crossover and mutation written by the LLM (JSON meta-thoughts); failures are counted.

  A crossover reply that does not parse falls back to the first parent's mindset with the second
  parent's strategy (a one-point crossover on the two fields); a failed mutation yields no child.
  """

  def __init__(self, client: Any, task: str = "", *, max_tokens: int = 160, temperature: float = 0.8, seed: int = 0):
    self.client, self.task = client, task
    self.max_tokens, self.temperature = int(max_tokens), float(temperature)
    self.seed = seed
    self.stats = {"crossover": 0, "mutation": 0, "fallbacks": 0}

  def _ask(self, instruction: str) -> Optional[MetaThought]:
    kwargs = {"response_format": META_THOUGHT_FORMAT} if supports_response_format(self.client) else {}
    self.seed += 1
    content = (f"{instruction}\n\nTask the meta-thought is for:\n{self.task}\n\n"
               'Reply with JSON {"mindset": "...", "strategy": "..."}.')
    outs = self.client.chat([{"role": "user", "content": content}], max_tokens=self.max_tokens,
                            temperature=self.temperature, seed=self.seed, **kwargs)
    return parse_meta_thought(outs[0].text if outs else "")

  def crossover(self, a: MetaThought, b: MetaThought) -> Optional[MetaThought]:
    self.stats["crossover"] += 1
    child = self._ask("Two meta-thoughts (a mindset and a problem-solving strategy) both worked well. Merge "
                      "their strengths into one new meta-thought.\n"
                      f"First: mindset: {a.mindset}; strategy: {a.strategy}\n"
                      f"Second: mindset: {b.mindset}; strategy: {b.strategy}")
    if child is None:
      self.stats["fallbacks"] += 1
      child = MetaThought(a.mindset, b.strategy)
    child.origin = "crossover"
    return child

  def mutate(self, a: MetaThought) -> Optional[MetaThought]:
    self.stats["mutation"] += 1
    child = self._ask("Rewrite this meta-thought (a mindset and a problem-solving strategy) into a variant that "
                      "could answer the task better: change the role or a step, keep what works.\n"
                      f"Mindset: {a.mindset}\nStrategy: {a.strategy}")
    if child is None:
      self.stats["fallbacks"] += 1
      return None
    child.origin = "mutation"
    return child


def select_parents(means: Sequence[float], pulls: Sequence[int], active: Sequence[bool], k: int,
                   min_pulls: int = 1) -> list[int]:
  """Indices of the `k` best active members by mean reward among those with >= `min_pulls` pulls.

  Ties go to more pulls (a better-supported mean), then the lower index.
  """
  eligible = [i for i in range(len(means)) if active[i] and pulls[i] >= min_pulls and not math.isnan(means[i])]
  eligible.sort(key=lambda i: (-means[i], -pulls[i], i))
  return eligible[:max(0, k)]


def make_children(population: Sequence[Any], parents: Sequence[int], operators: GeneticOperators,
                  n_crossover: int, n_mutation: int) -> list[tuple[Any, tuple[int, ...]]]:
  """(child, parent indices) pairs: crossovers of consecutive parent pairs, then mutations, cycling."""
  children = []
  if len(parents) >= 2:
    for j in range(n_crossover):
      a, b = parents[j % len(parents)], parents[(j + 1) % len(parents)]
      child = operators.crossover(population[a], population[b])
      if child is not None:
        children.append((child, (a, b)))
  if parents:
    for j in range(n_mutation):
      a = parents[j % len(parents)]
      child = operators.mutate(population[a])
      if child is not None:
        children.append((child, (a,)))
  return children


def evolve_population(population: Sequence[Any], fitness: Callable[[Any], float], operators: GeneticOperators, *,
                      n_parents: int = 2, n_crossover: int = 1, n_mutation: int = 1,
                      cap: Optional[int] = None) -> list[Any]:
  """One generation with a known fitness: the best `n_parents` breed, children join, the weakest retire.

  The same selection and operators as METASCALE's pool evolution, for settings where fitness is
  known (synthetic landscapes). Keeps the `cap` fittest of parents' generation + children (default
  cap: the population size), so the mean fitness never decreases.
  """
  population = list(population)
  cap = len(population) if cap is None else cap
  fit = [float(fitness(p)) for p in population]
  parents = select_parents(fit, [1] * len(fit), [True] * len(fit), n_parents, 1)
  children = [c for c, _ in make_children(population, parents, operators, n_crossover, n_mutation)]
  pool = population + children
  pool_fit = fit + [float(fitness(c)) for c in children]
  order = sorted(range(len(pool)), key=lambda i: (-pool_fit[i], i))[:cap]
  return [pool[i] for i in sorted(order)]


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MetaScaleConfig:
  """Knobs of one METASCALE run (configs/apps/metascale.py holds the paper and smoke variants)."""

  samples_per_prompt: int = 16      # generation budget in samples (one generation + one score each)
  max_calls: int = 0                # per prompt, all phases; 0 = unlimited
  max_tokens_budget: int = 0        # per prompt, prompt + completion tokens of all phases; 0 = unlimited
  num_self_composed: int = 4
  num_from_instructions: int = 4
  instructions_path: str = ""       # JSONL with instruction/response; empty: the generated synthetic set
  num_instructions: int = 120       # size of the generated set
  instruction_strategy: str = "template"  # template | llm: how a record becomes a meta-thought
  ucb_c: float = UCB_C_DEFAULT
  evolve_every: int = 4             # samples between evolutions; 0 = never
  evolve_min_pulls: int = 1
  num_parents: int = 2
  num_crossover: int = 1
  num_mutation: int = 1
  pool_cap: int = 12
  max_tokens: int = 384             # per generated response
  temperature: float = 0.7
  top_p: float = 1.0
  init_max_tokens: int = 160        # per composed / evolved meta-thought
  init_temperature: float = 1.0
  chars_per_token: float = 1.0      # prompt-token estimate before the backend reported any
  seed: int = 0
  max_workers: int = 1              # prompts run in parallel threads

  @classmethod
  def from_mapping(cls, config: Any = None) -> MetaScaleConfig:
    if config is None:
      return cls()
    if isinstance(config, cls):
      return config
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"metascale config has unknown keys {unknown}; known: {sorted(known)}")
    out = cls(**values)
    out.validate()
    return out

  def validate(self) -> None:
    if self.samples_per_prompt < 1:
      raise ValueError(f"samples_per_prompt={self.samples_per_prompt}; give at least 1")
    if self.instruction_strategy not in ("template", "llm"):
      raise ValueError(f"instruction_strategy={self.instruction_strategy!r}; choose 'template' or 'llm'")
    if self.num_self_composed + self.num_from_instructions < 1:
      raise ValueError("the pool starts empty: set num_self_composed or num_from_instructions >= 1")
    if self.evolve_every and self.pool_cap < self.num_crossover + self.num_mutation + 1:
      raise ValueError(f"pool_cap={self.pool_cap} cannot hold {self.num_crossover + self.num_mutation} children "
                       "and a parent; raise pool_cap")
    if self.ucb_c < 0:
      raise ValueError(f"ucb_c={self.ucb_c} must be >= 0")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _sha(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class PromptResult:
  """METASCALE on one prompt: the best response and how it was found."""

  prompt: str
  best_response: Optional[str]
  best_reward: float
  best_thought: Optional[MetaThought]
  samples: int
  stopped: str                                   # samples | budget
  pool: list[dict]                               # meta-thought + pulls + mean reward + active
  trace: list[dict]                              # per sample: t, arm, reward, tokens
  evolutions: list[dict]
  init: dict
  usage: dict

  def to_dict(self, include_text: bool = False) -> dict[str, Any]:
    out = {"prompt_sha256": _sha(self.prompt), "prompt_chars": len(self.prompt),
           "best_reward": self.best_reward, "samples": self.samples, "stopped": self.stopped,
           "best_response_chars": len(self.best_response or ""),
           "trace": self.trace, "evolutions": self.evolutions, "init": self.init, "usage": self.usage,
           "pool": [{k: v for k, v in p.items() if include_text or k not in ("mindset", "strategy")}
                    for p in self.pool]}
    if include_text:
      out.update(prompt=self.prompt, best_response=self.best_response,
                 best_thought=self.best_thought.to_dict() if self.best_thought else None)
    return out


@dataclasses.dataclass
class MetaScaleResult:
  results: list[PromptResult]
  config: dict

  @property
  def best_responses(self) -> list[str]:
    return [r.best_response or "" for r in self.results]

  def usage(self) -> dict[str, Any]:
    keys = ("calls", "prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum(r.usage[k] for r in self.results) for k in keys}

  def to_dict(self, include_text: bool = False) -> dict[str, Any]:
    return {"config": self.config, "usage": self.usage(),
            "mean_best_reward": float(np.mean([r.best_reward for r in self.results])) if self.results else math.nan,
            "prompts": [r.to_dict(include_text) for r in self.results]}


def _self_composed(client: MeteredClient, prompt: str, k: int, cfg: MetaScaleConfig, seed: int) -> list[Optional[MetaThought]]:
  if k <= 0:
    return []
  content = ("Before anyone answers the task below, decide how an expert should think about it. Write a "
             "meta-thought: a mindset (the expert role and attitude to adopt) and a strategy (the concrete "
             "steps to solve the task). Do not answer the task itself.\n\n"
             f"Task:\n{prompt}\n\nReply with JSON {{\"mindset\": \"...\", \"strategy\": \"...\"}}.")
  kwargs = {"response_format": META_THOUGHT_FORMAT} if client.supports_response_format else {}
  outs = client.chat([{"role": "user", "content": content}], max_tokens=cfg.init_max_tokens, n=k,
                     temperature=cfg.init_temperature, seed=seed, **kwargs)
  parsed = [parse_meta_thought(o.text, "self") for o in outs]
  return parsed + [None] * (k - len(parsed))


def _template_thought(row: Mapping[str, str]) -> MetaThought:
  cat = row.get("category") or ""
  spec = instr_lib.CATEGORIES.get(cat)
  if spec:
    return MetaThought(spec["role"], spec["approach"][:1].upper() + spec["approach"][1:] + ".", "instruction")
  response = " ".join(row["response"].split())
  return MetaThought("an expert who has answered requests like: " + " ".join(row["instruction"].split())[:160],
                     "Organise the answer the way this reference answer is organised: " + response[:240],
                     "instruction")


def _instruction_thought(client: MeteredClient, row: Mapping[str, str], cfg: MetaScaleConfig, seed: int,
                         stats: dict) -> MetaThought:
  if cfg.instruction_strategy == "template":
    return _template_thought(row)
  content = ("Here is a request and an expert's answer. Describe the meta-thought behind the answer: the "
             "mindset (expert role and attitude) and the strategy (the steps it follows), general enough "
             f"to reuse on other tasks.\n\n[Request]\n{row['instruction']}\n\n[Answer]\n{row['response']}\n\n"
             'Reply with JSON {"mindset": "...", "strategy": "..."}.')
  kwargs = {"response_format": META_THOUGHT_FORMAT} if client.supports_response_format else {}
  outs = client.chat([{"role": "user", "content": content}], max_tokens=cfg.init_max_tokens,
                     temperature=0.0, seed=seed, **kwargs)
  thought = parse_meta_thought(outs[0].text if outs else "", "instruction")
  if thought is None:
    stats["instruction_fallbacks"] += 1
    return _template_thought(row)
  return thought


def _load_instruction_rows(cfg: MetaScaleConfig) -> list[dict]:
  if cfg.num_from_instructions <= 0:
    return []
  if cfg.instructions_path:
    return instr_lib.load_instructions(cfg.instructions_path)
  return instr_lib.generate_instructions(cfg.num_instructions, seed=cfg.seed)


def metascale_prompt(client: Any, prompt: str, scorer: Any, config: Any = None, *, index: int = 0,
                     operators: Optional[GeneticOperators] = None,
                     instruction_rows: Optional[list[dict]] = None) -> PromptResult:
  """METASCALE on one prompt (see the module docstring); `operators` replaces the LLM's crossover/mutation."""
  cfg = MetaScaleConfig.from_mapping(config)
  budget = Budget(cfg.max_calls, cfg.max_tokens_budget, cfg.chars_per_token)
  gen = MeteredClient(client, budget, "generate")
  init_client = MeteredClient(client, budget, "init")
  judge = scorer.with_client(MeteredClient(scorer.client, budget, "score")) \
      if hasattr(scorer, "with_client") and hasattr(scorer, "client") else scorer
  ops = operators if operators is not None else LLMOperators(MeteredClient(client, budget, "evolve"), prompt,
                                                             max_tokens=cfg.init_max_tokens,
                                                             temperature=cfg.init_temperature,
                                                             seed=cfg.seed + 7919 * index)
  base_seed = cfg.seed + 100003 * index
  init = {"self_composed": 0, "self_fallbacks": 0, "from_instructions": 0, "instruction_fallbacks": 0}
  pool: list[MetaThought] = []
  stopped = "samples"
  try:
    for i, t in enumerate(_self_composed(init_client, prompt, cfg.num_self_composed, cfg, base_seed)):
      if t is None:
        init["self_fallbacks"] += 1
        d = DEFAULT_META_THOUGHTS[i % len(DEFAULT_META_THOUGHTS)]
        t = MetaThought(d.mindset, d.strategy, "default")
      else:
        init["self_composed"] += 1
      pool.append(t)
    rows = instruction_rows if instruction_rows is not None else _load_instruction_rows(cfg)
    for j, row in enumerate(instr_lib.most_relevant(rows, prompt, cfg.num_from_instructions, seed=base_seed)):
      pool.append(_instruction_thought(init_client, row, cfg, base_seed + j, init))
      init["from_instructions"] += 1
  except BudgetExhausted:
    stopped = "budget"
  if not pool:  # the budget did not even cover initialisation: answer with the defaults
    pool = [dataclasses.replace(d) for d in DEFAULT_META_THOUGHTS[:max(1, cfg.num_self_composed)]]

  bandit = UCB1(len(pool), cfg.ucb_c)
  trace: list[dict] = []
  evolutions: list[dict] = []
  best = (-1.0, None, None)
  samples = 0
  while stopped == "samples" and samples < cfg.samples_per_prompt:
    arm = bandit.select()
    thought = pool[arm]
    messages = [{"role": "system", "content": thought.system_prompt()}, {"role": "user", "content": prompt}]
    try:
      before = budget.total_tokens
      outs = gen.chat(messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      seed=base_seed + 1 + samples)
      response = outs[0].text if outs else ""
      reward = _checked_reward(scorer, judge.score(prompt, response))
    except BudgetExhausted:
      stopped = "budget"
      break
    bandit.update(arm, reward)
    samples += 1
    trace.append({"t": samples, "arm": arm, "reward": reward, "tokens": budget.total_tokens - before})
    if reward > best[0]:
      best = (reward, response, thought)
    if cfg.evolve_every and samples % cfg.evolve_every == 0 and samples < cfg.samples_per_prompt:
      try:
        evolutions.append(_evolve(pool, bandit, ops, cfg, samples))
      except BudgetExhausted:
        stopped = "budget"

  pool_rows = []
  for i, t in enumerate(pool):
    pool_rows.append({**t.to_dict(), "arm": i, "pulls": bandit.pulls[i],
                      "mean_reward": None if bandit.pulls[i] == 0 else bandit.mean(i), "active": bandit.active[i]})
  return PromptResult(prompt=prompt, best_response=best[1], best_reward=best[0] if best[1] is not None else math.nan,
                      best_thought=best[2], samples=samples, stopped=stopped, pool=pool_rows,
                      trace=trace, evolutions=evolutions, init=init, usage=budget.summary())


def _evolve(pool: list, bandit: UCB1, ops: GeneticOperators, cfg: MetaScaleConfig, t: int) -> dict:
  means = [bandit.mean(i) for i in range(len(pool))]
  parents = select_parents(means, bandit.pulls, bandit.active, cfg.num_parents, cfg.evolve_min_pulls)
  children = []
  try:
    for child, par in make_children(pool, parents, ops, cfg.num_crossover, cfg.num_mutation):
      child.parents = par
      pool.append(child)
      children.append(bandit.add_arm())
  finally:
    retired = []
    while sum(bandit.active) > cfg.pool_cap:
      tried = [i for i in range(len(pool)) if bandit.active[i] and bandit.pulls[i] > 0]
      if not tried:
        break
      weakest = min(tried, key=lambda i: (bandit.mean(i), bandit.pulls[i], -i))
      bandit.retire(weakest)
      retired.append(weakest)
  return {"t": t, "parents": parents, "parent_means": [means[i] for i in parents], "children": children,
          "retired": retired}


def run_metascale(client: Any, prompts: str | Sequence[str], scorer: Any, config: Any = None, *,
                  operators: Optional[GeneticOperators] = None) -> MetaScaleResult:
  """METASCALE on each prompt (its own pool, bandit and budget); results in prompt order."""
  cfg = MetaScaleConfig.from_mapping(config)
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  rows = _load_instruction_rows(cfg)

  def one(i: int) -> PromptResult:
    return metascale_prompt(client, prompts[i], scorer, cfg, index=i, operators=operators, instruction_rows=rows)

  if cfg.max_workers > 1 and len(prompts) > 1:
    with concurrent.futures.ThreadPoolExecutor(cfg.max_workers) as pool:
      results = list(pool.map(one, range(len(prompts))))
  else:
    results = [one(i) for i in range(len(prompts))]
  for r in results:
    logger.info("metascale prompt %s: %d samples, best reward %.3f, %d calls, %d tokens (%s)",
                _sha(r.prompt)[:12], r.samples, r.best_reward, r.usage["calls"], r.usage["total_tokens"], r.stopped)
  return MetaScaleResult(results, dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------------------------
# Baselines at equal budget
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BaselineResult:
  prompt: str
  response: Optional[str]
  reward: float          # best score (nan for plain sampling, which is not scored)
  samples: int
  usage: dict


def plain_sampling(client: Any, prompts: Sequence[str], config: Any = None) -> list[BaselineResult]:
  """One sample per prompt, no meta-thought (the paper's standard-inference baseline)."""
  cfg = MetaScaleConfig.from_mapping(config)
  out = []
  for i, prompt in enumerate(prompts):
    budget = Budget(chars_per_token=cfg.chars_per_token)
    outs = MeteredClient(client, budget, "generate").chat(
        [{"role": "user", "content": prompt}], max_tokens=cfg.max_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, seed=cfg.seed + 100003 * i + 1)
    out.append(BaselineResult(prompt, outs[0].text if outs else "", math.nan, 1, budget.summary()))
  return out


def best_of_n(client: Any, prompt: str, scorer: Any, config: Any = None, *, n: Optional[int] = None,
              max_calls: Optional[int] = None, max_tokens_budget: Optional[int] = None,
              index: int = 0) -> BaselineResult:
  """Samples (no meta-thought) scored by `scorer` until `n` samples or the budget; the best is kept.

  Given METASCALE's spent calls/tokens as the budget, N is whatever fits in it: equal budget.
  """
  cfg = MetaScaleConfig.from_mapping(config)
  if n is None and not max_calls and not max_tokens_budget:
    raise ValueError("best_of_n needs n or a budget (max_calls / max_tokens_budget)")
  budget = Budget(max_calls, max_tokens_budget, cfg.chars_per_token)
  gen = MeteredClient(client, budget, "generate")
  judge = scorer.with_client(MeteredClient(scorer.client, budget, "score")) \
      if hasattr(scorer, "with_client") and hasattr(scorer, "client") else scorer
  best, best_reward, samples = None, -1.0, 0
  base_seed = cfg.seed + 100003 * index
  while n is None or samples < n:
    try:
      outs = gen.chat([{"role": "user", "content": prompt}], max_tokens=cfg.max_tokens,
                      temperature=cfg.temperature, top_p=cfg.top_p, seed=base_seed + 1 + samples)
      response = outs[0].text if outs else ""
      reward = _checked_reward(scorer, judge.score(prompt, response))
    except BudgetExhausted:
      break
    samples += 1
    if reward > best_reward:
      best, best_reward = response, reward
  return BaselineResult(prompt, best, best_reward if best is not None else math.nan, samples, budget.summary())


# ---------------------------------------------------------------------------------------------
# Arena-Hard-style pairwise evaluation
# ---------------------------------------------------------------------------------------------

VERDICTS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
# Score of the answer shown as A. Arena-Hard's win rate counts a clear and a slight win alike as a
# win and a tie as half; the strength is kept in `verdict_counts`.
VERDICT_SCORE = {"A>>B": 1.0, "A>B": 1.0, "A=B": 0.5, "B>A": 0.0, "B>>A": 0.0}
_VERDICT_FORMAT = {"type": "json_schema", "json_schema": {
    "name": "verdict", "strict": True,
    "schema": {"type": "object", "properties": {"verdict": {"type": "string", "enum": list(VERDICTS)}},
               "required": ["verdict"], "additionalProperties": False}}}


def parse_verdict(text: str) -> Optional[str]:
  """"A>>B" ... "B>>A" from a judge reply: JSON {"verdict"}, else the last [[...]] label, else a bare label."""
  text = text or ""
  for obj in _json_objects(text):
    v = str(obj.get("verdict", "")).replace(" ", "").strip("[]")
    if v in VERDICTS:
      return v
  labels = re.findall(r"\[\[\s*([AB]\s*(?:>>|>|=|<<|<)\s*[AB])\s*\]\]", text)
  if not labels:
    labels = re.findall(r"(?<![\w>=<])([AB]\s*(?:>>|>|=)\s*[AB])(?![\w>=<])", text)
  for raw in reversed(labels):
    v = raw.replace(" ", "")
    if v in ("A<B", "A<<B", "B<A", "B<<A"):  # written the other way round
      v = {"A<B": "B>A", "A<<B": "B>>A", "B<A": "A>B", "B<<A": "A>>B"}[v]
    if v in VERDICTS:
      return v
    if v == "B=A":
      return "A=B"
  return None


class PairwiseJudge:
  """An LLM compares answers A and B to a request and gives one of A>>B, A>B, A=B, B>A, B>>A."""

  SYSTEM = ("You are an impartial judge of answers to medical requests. Compare assistant A's and assistant "
            "B's answers for correctness, completeness, safety and clarity; do not let the order or the "
            "length of the answers decide. Give your verdict as one label: A>>B (A much better), A>B, "
            'A=B (tie), B>A, B>>A (B much better), as JSON {"verdict": "<label>"}.')

  def __init__(self, client: Any, *, max_tokens: int = 16, temperature: float = 0.0):
    self.client, self.max_tokens, self.temperature = client, int(max_tokens), float(temperature)

  def messages(self, prompt: str, a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": self.SYSTEM},
            {"role": "user", "content": f"[Request]\n{prompt}\n\n[Assistant A]\n{a}\n\n[Assistant B]\n{b}"}]

  def judge(self, prompt: str, a: str, b: str) -> Optional[str]:
    kwargs = {"response_format": _VERDICT_FORMAT} if supports_response_format(self.client) else {}
    outs = self.client.chat(self.messages(prompt, a, b), max_tokens=self.max_tokens,
                            temperature=self.temperature, seed=0, **kwargs)
    return parse_verdict(outs[0].text if outs else "")


def pairwise_win_rate(judge: Any, prompts: Sequence[str], answers: Sequence[str], baseline: Sequence[str], *,
                      n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Win rate of `answers` over `baseline`, each pair judged in both orders (position-bias control).

  Game 1 shows the answer as A, game 2 as B; each game scores 1 / 0.5 / 0 for the answer
  (VERDICT_SCORE, read from the answer's side); a prompt's score is the mean of its parsed games
  (a game the judge's reply does not parse is dropped and counted). Win rate = mean over prompts,
  ties count half, with a percentile bootstrap interval over prompts (mlx_med.core.stats).
  `consistent` = fraction of prompts where both orders agree on the winner (or both tie).
  """
  if not (len(prompts) == len(answers) == len(baseline)):
    raise ValueError(f"pairwise_win_rate needs one answer and one baseline per prompt; got {len(prompts)} prompts, "
                     f"{len(answers)} answers, {len(baseline)} baseline answers")
  per_prompt, counts, unparsed, consistent, both = [], {v: 0 for v in VERDICTS}, 0, 0, 0
  for prompt, ans, base in zip(prompts, answers, baseline):
    v1 = judge.judge(prompt, ans or "", base or "")      # the answer is A
    v2 = judge.judge(prompt, base or "", ans or "")      # the answer is B
    scores = []
    if v1 is not None:
      counts[v1] += 1
      scores.append(VERDICT_SCORE[v1])
    if v2 is not None:
      counts[v2] += 1
      scores.append(1.0 - VERDICT_SCORE[v2])
    unparsed += (v1 is None) + (v2 is None)
    if len(scores) == 2:
      both += 1
      consistent += int(scores[0] == scores[1])
    per_prompt.append(float(np.mean(scores)) if scores else math.nan)
  ci = bootstrap_mean_ci(per_prompt, n_boot=n_boot, seed=seed)
  arr = np.asarray(per_prompt, np.float64)
  ok = arr[np.isfinite(arr)]
  return {"win_rate": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "n": ci["n"], "games": 2 * len(prompts),
          "unparsed_games": unparsed, "consistent": consistent / both if both else math.nan,
          "wins": int((ok > 0.5).sum()), "ties": int((ok == 0.5).sum()), "losses": int((ok < 0.5).sum()),
          "verdict_counts": counts, "per_prompt": per_prompt}


def compare_at_equal_budget(client: Any, prompts: Sequence[str], scorer: Any, judge: Any, config: Any = None, *,
                            operators: Optional[GeneticOperators] = None, n_boot: int = 1000) -> dict[str, Any]:
  """METASCALE vs plain sampling vs best-of-N at METASCALE's spent budget, by pairwise win rate.

  Best-of-N on each prompt gets exactly the calls and tokens METASCALE spent on it; N is how many
  scored samples fit. Win rates are against plain sampling (Arena-Hard's fixed-baseline setting) and
  METASCALE against best-of-N directly. `judge` is a PairwiseJudge (or anything with `judge()`).
  """
  cfg = MetaScaleConfig.from_mapping(config)
  prompts = list(prompts)
  ms = run_metascale(client, prompts, scorer, cfg, operators=operators)
  plain = plain_sampling(client, prompts, cfg)
  bon = [best_of_n(client, p, scorer, cfg, max_calls=r.usage["calls"], max_tokens_budget=r.usage["total_tokens"],
                   index=i) for i, (p, r) in enumerate(zip(prompts, ms.results))]
  ms_answers = ms.best_responses
  plain_answers = [b.response or "" for b in plain]
  bon_answers = [b.response or "" for b in bon]

  def usage(rows):
    return {k: int(sum(r[k] for r in rows)) for k in ("calls", "prompt_tokens", "completion_tokens", "total_tokens")}

  return {
      "n_prompts": len(prompts),
      "samples_per_prompt": cfg.samples_per_prompt,
      "metascale": {"usage": ms.usage(), "mean_reward": float(np.nanmean([r.best_reward for r in ms.results])),
                    "mean_samples": float(np.mean([r.samples for r in ms.results])),
                    "evolutions": int(sum(len(r.evolutions) for r in ms.results)),
                    "init_fallbacks": int(sum(r.init["self_fallbacks"] for r in ms.results))},
      "best_of_n": {"usage": usage([b.usage for b in bon]), "mean_reward": float(np.nanmean([b.reward for b in bon])),
                    "mean_n": float(np.mean([b.samples for b in bon]))},
      "plain": {"usage": usage([b.usage for b in plain])},
      "win_rate": {
          "metascale_vs_plain": pairwise_win_rate(judge, prompts, ms_answers, plain_answers, n_boot=n_boot),
          "best_of_n_vs_plain": pairwise_win_rate(judge, prompts, bon_answers, plain_answers, n_boot=n_boot),
          "metascale_vs_best_of_n": pairwise_win_rate(judge, prompts, ms_answers, bon_answers, n_boot=n_boot)},
      "metascale_run": ms.to_dict(include_text=False),
  }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return _json_safe(obj.item())
  return obj


def _fmt_wr(w: Mapping[str, Any]) -> str:
  if w.get("win_rate") is None or not math.isfinite(w["win_rate"]):
    return "n/a"
  return f"{100 * w['win_rate']:.1f}% [{100 * w['lo']:.1f}, {100 * w['hi']:.1f}]"


def write_report(out_dir: str | os.PathLike, comparisons: dict[str, Any] | Sequence[dict[str, Any]]) -> dict[str, str]:
  """report.json, report.md and (with two or more budgets and matplotlib) win_rate_vs_budget.png.

  `comparisons`: one `compare_at_equal_budget` result or a list of them at increasing budgets.
  Returns {kind: path}. Holds hashes, sizes, counts and rates only (no prompt or response text).
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  rows = [comparisons] if isinstance(comparisons, Mapping) else list(comparisons)
  paths = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md")}
  write_text_atomic(paths["json"], json.dumps(_json_safe({"comparisons": rows}), indent=2))
  lines = ["# METASCALE at equal budget", "",
           "Win rates by a pairwise judge, each pair judged in both orders; ties count half; 95% bootstrap "
           "interval over prompts. Best-of-N gets the calls and tokens METASCALE spent on each prompt.", "",
           "| samples/prompt | prompts | METASCALE tokens | best-of-N mean N | METASCALE vs plain | "
           "best-of-N vs plain | METASCALE vs best-of-N | METASCALE reward | best-of-N reward |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    w = r["win_rate"]
    lines.append(f"| {r['samples_per_prompt']} | {r['n_prompts']} | {r['metascale']['usage']['total_tokens']} | "
                 f"{r['best_of_n']['mean_n']:.1f} | {_fmt_wr(w['metascale_vs_plain'])} | "
                 f"{_fmt_wr(w['best_of_n_vs_plain'])} | {_fmt_wr(w['metascale_vs_best_of_n'])} | "
                 f"{r['metascale']['mean_reward']:.3f} | {r['best_of_n']['mean_reward']:.3f} |")
  write_text_atomic(paths["markdown"], "\n".join(lines) + "\n")
  if len(rows) >= 2:
    try:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt
    except ImportError:
      return paths
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [r["metascale"]["usage"]["total_tokens"] / max(1, r["n_prompts"]) for r in rows]
    for key, label in (("metascale_vs_plain", "METASCALE"), ("best_of_n_vs_plain", "best-of-N")):
      y = [100 * (r["win_rate"][key]["win_rate"] or 0) for r in rows]
      lo = [100 * (r["win_rate"][key]["lo"] or 0) for r in rows]
      hi = [100 * (r["win_rate"][key]["hi"] or 0) for r in rows]
      ax.plot(x, y, marker="o", label=label)
      ax.fill_between(x, lo, hi, alpha=0.15)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("tokens per prompt (equal budget)")
    ax.set_ylabel("win rate vs plain sampling (%)")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "win_rate_vs_budget.png")
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    paths["png"] = png
  return paths


# ---------------------------------------------------------------------------------------------
# Experiment driver (configs/apps/metascale.py)
# ---------------------------------------------------------------------------------------------


def load_eval_prompts(source: str = "synthetic", n: int = 0) -> list[dict[str, Any]]:
  """{"prompt", "key_points"} rows: the synthetic set, or a JSONL file with "prompt" (and optional "key_points")."""
  if source == "synthetic":
    return instr_lib.eval_prompts(n or None)
  if not os.path.isfile(source):
    raise FileNotFoundError(f"eval prompts file {source} does not exist; give a JSONL with a 'prompt' field per line "
                            "or 'synthetic'")
  rows = []
  for where, row in read_jsonl_objects(source, "a JSON object with a string 'prompt'"):
    if not isinstance(row.get("prompt"), str):
      raise ValueError(f"{where}: needs a string 'prompt' field")
    rows.append({"prompt": row["prompt"], "key_points": list(row.get("key_points") or [])})
  if not rows:
    raise ValueError(f"{source}: no prompts")
  return rows[:n] if n else rows


def run_experiment(config: Any, out_dir: str | os.PathLike, *, client: Any = None,
                   judge_client: Any = None) -> dict[str, str]:
  """The config's comparison at each budget in `eval.budgets`, then `write_report`; returns the report paths.

  `client` / `judge_client` override the config's client sections (the demo passes its own).
  """
  from mlx_med.llm.client import make_client

  if client is None:
    client = make_client(config.client.to_dict() if hasattr(config.client, "to_dict") else dict(config.client))
  if judge_client is None:
    section = dict(config.judge_client.to_dict() if hasattr(config.judge_client, "to_dict") else config.judge_client)
    judge_client = client if not section.get("backend") else make_client(section)
  ev = config.eval
  rows = load_eval_prompts(ev.prompts, int(ev.n_prompts))
  prompts = [r["prompt"] for r in rows]
  if ev.scorer == "keyword":
    if not all(r["key_points"] for r in rows):
      raise ValueError("eval.scorer='keyword' needs 'key_points' for every prompt; use eval.scorer='llm_judge'")
    scorer: Any = KeywordScorer({r["prompt"]: r["key_points"] for r in rows})
  elif ev.scorer == "llm_judge":
    scorer = LLMJudgeScorer(judge_client)
  else:
    raise ValueError(f"eval.scorer={ev.scorer!r}; choose 'keyword' or 'llm_judge'")
  judge = PairwiseJudge(judge_client)
  base = dict(config.metascale.to_dict() if hasattr(config.metascale, "to_dict") else config.metascale)
  comparisons = []
  for b in ev.budgets:
    comparisons.append(compare_at_equal_budget(client, prompts, scorer, judge, {**base, "samples_per_prompt": int(b)},
                                               n_boot=int(ev.n_boot)))
    w = comparisons[-1]["win_rate"]
    logger.info("metascale budget %d: vs plain %s, best-of-N vs plain %s, vs best-of-N %s", b,
                _fmt_wr(w["metascale_vs_plain"]), _fmt_wr(w["best_of_n_vs_plain"]), _fmt_wr(w["metascale_vs_best_of_n"]))
  return write_report(out_dir, comparisons)
