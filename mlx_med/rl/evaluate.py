"""MCQA evaluation of a policy, and the training-dynamics plot of an RL run.

Evaluation (`evaluate`) turns each example into chat messages with one of the papers' prompt
templates (`mlx_med.rl.data.build_messages`), asks a generator for completions in batches and
scores every completion with the same host-side functions the rewards use
(`mlx_med.rl.functions.response_stats`, `extract_choice_from`), so "accuracy" here is exactly the
training reward's notion of correct. Per row it records the parsed choice, correct, format_ok,
answer leak and response length; the aggregate (`EvalResult`) is

- accuracy with a 95% Wilson score interval. An accuracy is a binomial proportion, for which
  the Wilson interval is the standard closed form (good coverage down to small n, never outside
  [0, 1], no resampling noise); the project's bootstrap helper (`mlx_med.embed.evaluate`)
  resamples an AUC and is not the tool for a proportion;
- format-failure rate (1 - format_ok) and answer-leak rate (the reasoning block gives the answer
  away: Med-RLVR's reward hacking);
- mean response length in generated tokens when the generator reports them (the local model and
  most OpenAI-compatible servers do; locally the count includes the end-of-turn token that
  stopped the row, as the sampler counts), else in characters;
- the forced-exit rate (rows whose thought was cut by the think budget), when known;
- the same figures per category (MMLU-Pro category, MedMCQA subject, synthetic question type).

Generators: `local_generator` runs an `mlx_med.llm.LocalLM` in this process (a Hugging Face
directory, or `LocalLM(cfg, params, tokenizer)` for the parameters of a run; `params=` swaps in
other weights of the same shapes without recompiling), `client_generator` any
OpenAI-compatible endpoint through `mlx_med.llm.client`. Any callable `messages batch ->
completions` works (tests use hand-written completions).

Forced exit (X-Reasoner): with `think_budget=N` the local generator sets the sampler's think
budget and closing tag "</think>": a row still thinking after N generated tokens is made to emit
"</think>" and then continues on its own, so it can still write `<answer>X</answer>`. The
closing tag and the answer need room after the budget, so `max_new_tokens` must exceed
N + the tag's token count (an error otherwise; leave a few dozen tokens for the answer). The
budget counts every generated token from the start of the completion, including an opening
"<think>" the model writes itself. Endpoints cannot portably continue a cut assistant message,
so forced exit is local only.

`eval_command` is `mlx-med rl eval`: loads a model (`--model HFDIR`, a run's `<workdir>/hf`
export, or a served model at `endpoint`), the data (`FORMAT:PATH`, or `synthetic` for a run's
held-out split), evaluates, prints a short table and writes eval.json (atomically).

Training dynamics: `plot_training_dynamics` draws metrics.jsonl of an RL run (reward, accuracy
and eval/accuracy; format failure and answer leak; response length; KL; clip fraction; entropy;
a panel per key present) with the Med-RLVR stages found by `detect_stages` shaded behind
every panel.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from mlx_med.core.stats import Z_95, wilson_interval  # noqa: F401  (re-exported: rl.evaluate's public names)

HF_EXPORT = "hf"  # a run's Hugging Face export: <workdir>/hf
HELDOUT_FILE = "heldout.jsonl"  # a run's held-out split (synthetic_jsonl), written by mlx_med.rl.setup


class Response(NamedTuple):
  """One completion with what the generator knows about it (a plain str also works)."""

  text: str
  num_tokens: int | None = None  # generated tokens, None when the backend does not say
  forced: bool | None = None  # True when the think budget forced the closing tag
  finish_reason: str | None = None


Generate = Callable[[list[list[dict]]], Sequence["str | Response"]]


# ------------------------------------------------------------------------------ intervals


# ------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalResult:
  """Aggregate figures of one evaluation; `rows` holds the per-example records."""

  accuracy: float
  accuracy_ci: tuple[float, float]
  format_failure: float
  answer_leak: float
  mean_length: float
  n: int
  per_category: dict[str, dict[str, Any]]
  rows: list[dict[str, Any]]
  length_unit: str = "tokens"
  forced_exit: float | None = None  # share of rows cut by the think budget (None: unknown)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def summary(self) -> dict[str, Any]:
    """The aggregate figures (no rows), JSON-ready."""
    return {"accuracy": self.accuracy, "accuracy_ci": list(self.accuracy_ci), "format_failure": self.format_failure,
            "answer_leak": self.answer_leak, "mean_length": self.mean_length, "length_unit": self.length_unit,
            "forced_exit": self.forced_exit, "n": self.n, "per_category": self.per_category}

  def to_dict(self, *, include_rows: bool = True) -> dict[str, Any]:
    out = {**self.summary(), "meta": dict(self.meta)}
    if include_rows:
      out["rows"] = self.rows
    return out


def _as_response(out: Any) -> Response:
  if isinstance(out, Response):
    return out
  if isinstance(out, str):
    return Response(out)
  text = getattr(out, "text", None)
  if not isinstance(text, str):
    raise TypeError(f"a generator must return str or Response per conversation, got {type(out).__name__}")
  return Response(text)


def _rates(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  n = len(rows)
  correct = int(sum(r["correct"] for r in rows))
  lo, hi = wilson_interval(correct, n)
  return {"n": n, "accuracy": correct / n, "accuracy_ci": [lo, hi],
          "format_failure": sum(not r["format_ok"] for r in rows) / n, "answer_leak": sum(r["leak"] for r in rows) / n}


def evaluate(generate: Generate, examples: Sequence[Any], *, template: str | Callable[[Any], list[dict]] = "medrlvr",
             batch_size: int = 32, keep_text: bool = True, progress: Callable[[int, int], None] | None = None
             ) -> EvalResult:
  """Scores `generate`'s completions for `examples` (MCQAExample) under the prompt `template`.

  generate: a batch of conversations (lists of chat messages) -> one completion (str or
  `Response`) each. template: a name of `mlx_med.rl.data.TEMPLATES` or a function
  example -> messages. keep_text: keep each completion in its row (`rows[i]["completion"]`).
  progress(done, total) is called after each batch.
  """
  from mlx_med.rl import functions as fn

  examples = list(examples)
  if not examples:
    raise ValueError("no examples to evaluate; give at least one MCQA example")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if callable(template):
    to_messages = template
  else:
    from mlx_med.rl import data as data_lib

    def to_messages(ex: Any) -> list[dict]:
      return data_lib.build_messages(ex, template)

  rows: list[dict[str, Any]] = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    outs = list(generate([to_messages(ex) for ex in chunk]))
    if len(outs) != len(chunk):
      raise ValueError(f"the generator returned {len(outs)} completions for {len(chunk)} conversations")
    for ex, out in zip(chunk, outs):
      resp = _as_response(out)
      record = ex.to_dict() if hasattr(ex, "to_dict") else dict(ex)
      stats = fn.response_stats(resp.text, record)
      row = {"id": record.get("id", str(len(rows))), "category": record.get("category", "") or "",
             "answer": record["answer"], "choice": fn.extract_choice_from(resp.text, record),
             "correct": bool(stats["correct"]), "format_ok": bool(stats["format_ok"]), "leak": bool(stats["leak"]), "chars": len(resp.text),
             "tokens": resp.num_tokens, "forced": resp.forced, "finish_reason": resp.finish_reason}
      if keep_text:
        row["completion"] = resp.text
      rows.append(row)
    if progress is not None:
      progress(len(rows), len(examples))

  unit = "tokens" if all(r["tokens"] is not None for r in rows) else "chars"
  for r in rows:
    r["length"] = r["tokens"] if unit == "tokens" else r["chars"]
  overall = _rates(rows)
  categories = sorted({r["category"] for r in rows})
  per_category = {}
  if categories != [""]:
    for cat in categories:
      per_category[cat or "(none)"] = _rates([r for r in rows if r["category"] == cat])
  forced = None
  if all(r["forced"] is not None for r in rows):
    forced = sum(bool(r["forced"]) for r in rows) / len(rows)
  return EvalResult(accuracy=overall["accuracy"], accuracy_ci=tuple(overall["accuracy_ci"]),
                    format_failure=overall["format_failure"], answer_leak=overall["answer_leak"],
                    mean_length=float(np.mean([r["length"] for r in rows])), n=len(rows), per_category=per_category,
                    rows=rows, length_unit=unit, forced_exit=forced,
                    meta={"template": template if isinstance(template, str) else getattr(template, "__name__", "custom")})


# ------------------------------------------------------------------------------- generators


def local_generator(lm: Any, *, max_new_tokens: int, think_budget: int | None = None, temperature: float = 0.0,
                    think_close: str = "</think>", seed: int | None = 0, params: Any = None) -> Generate:
  """Completions from an in-process `mlx_med.llm.LocalLM` (greedy by default).

  think_budget: forced exit after that many generated tokens (see the module docstring);
  max_new_tokens must then exceed the budget plus the closing tag's tokens. params: evaluate
  these weights (same tree and shapes as lm.params) instead of the loaded ones, e.g. the RL
  loop's current policy, reusing the sampler's compiled functions.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if think_budget is not None:
    if think_budget < 0:
      raise ValueError(f"think_budget must be >= 0, got {think_budget}")
    if lm.tokenizer is None:
      raise ValueError("think_budget needs the model's tokenizer (to encode the closing tag)")
    n_close = len(lm.tokenizer.token_ids_of(think_close))
    if max_new_tokens <= think_budget + n_close:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the answer after a forced "
                       f"{think_close!r}: it must exceed think_budget={think_budget} + {n_close} tag token(s); "
                       f"use at least {think_budget + n_close + 16}")
  sampling = lm.sampling_params(max_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                                repetition_penalty=1.0, seed=seed, think_budget=think_budget, think_close=think_close)
  weights = lm.params if params is None else params

  def generate(conversations: list[list[dict]]) -> list[Response]:
    from mlx_med.llm.model import Generation

    prompts = [lm.encode_chat(c) for c in conversations]
    detok = lm.detokenize if lm.tokenizer is not None else None
    outs = [Generation.from_sample(o) for o in lm.sampler.generate(weights, prompts, sampling, detokenize=detok)]
    return [Response(g.text, len(g.token_ids), bool(any(g.forced)) if think_budget is not None else False,
                     g.finish_reason) for g in outs]

  return generate


def client_generator(client: Any, *, max_tokens: int, temperature: float = 0.0, seed: int | None = 0,
                     concurrency: int = 4, think_budget: int | None = None) -> Generate:
  """Completions from an `mlx_med.llm.client.LLMClient` (an OpenAI-compatible endpoint or LocalClient).

  Requests of a batch run on `concurrency` threads (remote endpoints batch them server-side).
  Forced exit is not available here: a chat endpoint cannot portably continue a cut assistant
  message, so a think_budget is an error (evaluate the model directory locally instead).
  """
  if think_budget is not None:
    raise ValueError("forced exit (think_budget) needs the model in this process: pass --model HFDIR "
                     "(or --workdir) instead of an endpoint")
  if concurrency < 1:
    raise ValueError(f"concurrency must be >= 1, got {concurrency}")

  def one(messages: list[dict]) -> Response:
    c = client.chat(messages, max_tokens=max_tokens, temperature=temperature, n=1, seed=seed)[0]
    return Response(c.text, c.completion_tokens, None, c.finish_reason)

  def generate(conversations: list[list[dict]]) -> list[Response]:
    if concurrency == 1 or len(conversations) == 1:
      return [one(m) for m in conversations]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(concurrency, len(conversations))) as pool:
      return list(pool.map(one, conversations))

  return generate


# ---------------------------------------------------------------------------------- reports


def _json_ready(x: Any) -> Any:
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {str(k): _json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_ready(v) for v in x]
  if isinstance(x, np.generic):
    return _json_ready(x.item())
  return x


def write_report(result: EvalResult, path: str, *, include_rows: bool = True) -> str:
  """Writes the result as JSON (temporary file, then rename); returns the path."""
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_json_ready(result.to_dict(include_rows=include_rows)), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
  return path


def format_table(result: EvalResult) -> str:
  """The short table `mlx-med rl eval` prints."""
  lo, hi = result.accuracy_ci
  lines = [f"{'accuracy':<16}{result.accuracy:.3f} [{lo:.3f}, {hi:.3f}]",
           f"{'format failure':<16}{result.format_failure:.3f}",
           f"{'answer leak':<16}{result.answer_leak:.3f}",
           f"{'mean length':<16}{result.mean_length:.1f} {result.length_unit}"]
  if result.forced_exit is not None and result.meta.get("think_budget") is not None:
    lines.append(f"{'forced exit':<16}{result.forced_exit:.3f}")
  lines.append(f"{'n':<16}{result.n}")
  if result.per_category:
    width = max(len(c) for c in result.per_category) + 2
    lines.append("per category:")
    for cat, r in result.per_category.items():
      lines.append(f"  {cat:<{width}}{r['accuracy']:.3f} [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]"
                   f"  n={r['n']}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ the command


def load_eval_data(data: str, workdir: str | None = None, *, limit: int | None = None) -> list[Any]:
  """`FORMAT:PATH` (a format of mlx_med.rl.data.FORMATS) or `synthetic` (the run's held-out split)."""
  from mlx_med.rl import data as data_lib

  if data == "synthetic":
    if not workdir:
      raise ValueError("--data synthetic evaluates a run's held-out split and needs --workdir; "
                       "otherwise pass --data FORMAT:PATH")
    path = os.path.join(workdir, HELDOUT_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{workdir} has no held-out split ({HELDOUT_FILE}; a synthetic run writes it); "
                              "pass --data FORMAT:PATH")
    examples = data_lib.load_mcqa("synthetic_jsonl", path)
  else:
    fmt, sep, path = data.partition(":")
    if not sep or not path:
      raise ValueError(f"--data {data!r} must be FORMAT:PATH with FORMAT one of {', '.join(data_lib.FORMATS)} "
                       "(or 'synthetic' with --workdir)")
    if fmt not in data_lib.FORMATS:
      raise ValueError(f"unknown data format {fmt!r} in --data {data!r}; use one of {', '.join(data_lib.FORMATS)}")
    if not os.path.exists(path):
      raise FileNotFoundError(f"data file {path} does not exist (from --data {data!r})")
    examples = data_lib.load_mcqa(fmt, path)
  if limit is not None and int(limit) > 0:
    examples = examples[:int(limit)]
  return examples


def eval_command(model: str | None = None, workdir: str | None = None, data: str = "synthetic",
                 think_budget: int | None = None, max_new_tokens: int = 512, batch_size: int = 16,
                 out: str | None = None, *, endpoint: str | None = None, model_name: str | None = None,
                 template: str = "medrlvr", temperature: float = 0.0, limit: int | None = None,
                 dtype: str = "float32", print_fn: Callable[[str], None] | None = print) -> EvalResult:
  """`mlx-med rl eval`: evaluate, print the table, write JSON; returns the result.

  model: a Hugging Face directory. workdir: an RL run; its `hf/` export is the model when
  `model` is not given, its held-out split (heldout.jsonl) the data for `data="synthetic"`,
  and `<workdir>/eval.json` the default output. endpoint: an OpenAI-compatible base URL
  (instead of a local model) serving `model_name` (default: $MLX_MED_LLM_MODEL). limit: the
  first N questions only (None or 0: all). out: the JSON path (default `<workdir>/eval.json`,
  else ./eval.json; a directory gets eval.json inside).
  """
  if not (model or workdir or endpoint):
    raise ValueError("give --model HFDIR, --workdir RUN or --endpoint URL")
  if workdir and not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir} does not exist")
  examples = load_eval_data(data, workdir, limit=limit)

  if endpoint:
    from mlx_med.llm.client import ENV_MODEL, make_client
    name = model_name or os.environ.get(ENV_MODEL)
    if not name:
      raise ValueError(f"--endpoint needs --model-name (the model the endpoint serves) or {ENV_MODEL}")
    client = make_client({"backend": "openai", "model": name, "base_url": endpoint})
    generate = client_generator(client, max_tokens=max_new_tokens, temperature=temperature,
                                think_budget=think_budget)
    source = f"{name} @ {endpoint}"
  else:
    model_dir = model
    if not model_dir:
      model_dir = os.path.join(workdir, HF_EXPORT)
      if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{workdir} has no Hugging Face export ({model_dir}/config.json); finish the run "
                                "or pass --model HFDIR")
    elif not os.path.isdir(model_dir):
      raise FileNotFoundError(f"--model {model_dir} is not a directory (a Hugging Face model directory)")
    from mlx_med.llm.model import LocalLM
    lm = LocalLM.from_pretrained(model_dir, dtype=dtype)
    generate = local_generator(lm, max_new_tokens=max_new_tokens, think_budget=think_budget,
                               temperature=temperature)
    source = model_dir

  result = evaluate(generate, examples, template=template, batch_size=batch_size)
  result.meta.update({"model": source, "data": data, "think_budget": think_budget, "max_new_tokens": max_new_tokens,
                      "temperature": temperature})
  if out is None:
    out = os.path.join(workdir, "eval.json") if workdir else "eval.json"
  elif os.path.isdir(out):
    out = os.path.join(out, "eval.json")
  write_report(result, out)
  if print_fn is not None:
    budget = f", think budget {think_budget}" if think_budget is not None else ""
    print_fn(f"{source} on {data} (template {template}{budget})")
    print_fn(format_table(result))
    print_fn(f"wrote {out}")
  return result


# -------------------------------------------------------------------------- training dynamics

STAGES = ("format failure", "verbose formatting", "reward hacking", "reintegration")
_STAGE_COLORS = {"format failure": "#d62728", "verbose formatting": "#ff7f0e", "reward hacking": "#9467bd",
                 "reintegration": "#2ca02c"}
# (panel title, [(metric key, label)])
PANELS = (
    ("reward / accuracy", [("reward", "reward"), ("accuracy", "train accuracy"), ("eval/accuracy", "eval accuracy")]),
    ("format failure / answer leak", [("format_failure", "format failure"), ("answer_leak", "answer leak"),
                                      ("eval/format_failure", "eval format failure"),
                                      ("eval/answer_leak", "eval answer leak")]),
    ("mean response length", [("response_length", "tokens")]),
    ("KL to reference", [("kl", "kl")]),
    ("clip fraction", [("clip_frac", "clip fraction")]),
    ("entropy", [("entropy", "entropy")]),
)


def _number(x: Any) -> float | None:
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def _series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(float(r["step"]), _number(r.get(key))) for r in rows if _number(r.get("step")) is not None]
  pts = [(s, v) for s, v in pts if v is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pts)
  return np.asarray(steps), np.asarray(values)


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average over `window` rows (no lag; the ends average the rows that exist)."""
  if window <= 1 or x.size == 0:
    return x
  c = np.cumsum(np.concatenate([[0.0], x]))
  i = np.arange(x.size)
  lo = np.maximum(0, i - window // 2)
  hi = np.minimum(x.size, i - window // 2 + window)
  return (c[hi] - c[lo]) / (hi - lo)


def _high(x: np.ndarray, frac: float) -> np.ndarray:
  lo, hi = float(np.min(x)), float(np.max(x))
  return x >= lo + frac * (hi - lo) - 1e-12


def detect_stages(rows: Sequence[Mapping[str, Any]], *, smooth: int | None = None, format_threshold: float = 0.5,
                  leak_threshold: float = 0.3, verbose_rise: float = 1.2, collapse: float = 0.5,
                  high: float = 0.7) -> list[tuple[float, float, str]]:
  """Labels Med-RLVR's training stages from the per-step curves; [(start_step, end_step, name)].

  Rows are merged by step (eval rows add keys to their step) and each curve is smoothed by a
  centred moving average of `smooth` rows (default max(1, steps // 20)). Each step gets the
  first label whose rule holds (a rule needing a missing key is skipped):

  1. "format failure": format_failure > format_threshold (0.5).
  2. "reward hacking": answer_leak > leak_threshold (the thought gives the answer away), or the
     response length collapses below `collapse` (0.5) x its running peak over well-formatted
     steps while the reward is high.
  3. "reintegration": some earlier step was reward hacking, and the leak has fallen back (rule 2
     no longer holds) with accuracy (reward when accuracy is absent) high.
  4. "verbose formatting": length above `verbose_rise` (1.2) x its early level = the mean length of
     the first max(1, steps // 10) well-formatted steps.

  "High" means in the top (1 - high) = 30% of the run's smoothed range. Consecutive steps with
  one label make a stage; unlabelled steps separate stages.
  """
  by_step: dict[float, dict[str, Any]] = {}
  for r in rows:
    step = _number(r.get("step"))
    if step is not None:
      by_step.setdefault(step, {}).update({k: v for k, v in r.items() if _number(v) is not None})
  steps = np.asarray(sorted(by_step))
  if steps.size == 0:
    return []
  merged = [by_step[s] for s in steps]
  window = max(1, steps.size // 20) if smooth is None else max(1, int(smooth))

  def curve(key: str) -> np.ndarray | None:
    values = np.asarray([_number(r.get(key)) if _number(r.get(key)) is not None else np.nan for r in merged])
    if np.all(np.isnan(values)):
      return None
    # Carry the last known value over steps that lack the key (e.g. eval-only rows).
    idx = np.where(~np.isnan(values), np.arange(values.size), 0)
    np.maximum.accumulate(idx, out=idx)
    values = values[idx]
    values = np.where(np.isnan(values), values[~np.isnan(values)][0], values)
    return _smooth(values, window)

  fmt, leak, length, reward, acc = (curve(k) for k in
                                    ("format_failure", "answer_leak", "response_length", "reward", "accuracy"))
  n = steps.size
  formatted = fmt <= format_threshold if fmt is not None else np.ones(n, bool)
  labels: list[str | None] = [None] * n
  good = acc if acc is not None else reward
  good_high = _high(good, high) if good is not None else None
  reward_high = _high(reward, high) if reward is not None else good_high
  early = None
  if length is not None and formatted.any():
    first = np.flatnonzero(formatted)[:max(1, n // 10)]
    early = float(np.mean(length[first]))
  peak = -np.inf
  hacked = False
  for t in range(n):
    if fmt is not None and fmt[t] > format_threshold:
      labels[t] = "format failure"
      continue
    if length is not None:
      peak = max(peak, float(length[t]))
    leaking = leak is not None and leak[t] > leak_threshold
    collapsed = (length is not None and reward_high is not None and bool(reward_high[t])
                 and length[t] < collapse * peak)
    if leaking or collapsed:
      labels[t] = "reward hacking"
      hacked = True
    elif hacked and good_high is not None and good_high[t]:
      labels[t] = "reintegration"
    elif early is not None and length[t] > verbose_rise * early:
      labels[t] = "verbose formatting"

  stages: list[tuple[float, float, str]] = []
  for t, name in enumerate(labels):
    if name is None:
      continue
    if stages and stages[-1][2] == name and labels[t - 1] == name:
      stages[-1] = (stages[-1][0], float(steps[t]), name)
    else:
      stages.append((float(steps[t]), float(steps[t]), name))
  return stages


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"metrics file {path} does not exist (an RL run writes <workdir>/metrics.jsonl)")
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
      if isinstance(row, dict):
        rows.append(row)
  return rows


def plot_training_dynamics(metrics_jsonl: str, out_png: str, *, stages: bool = True, title: str | None = None) -> str:
  """A multi-panel PNG of an RL run's curves with the Med-RLVR stages shaded; returns out_png.

  One panel per group in PANELS whose keys occur in the file (missing keys: panel skipped);
  "eval/..." keys are drawn as points on the panel of their training twin. Written atomically.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  rows = _read_jsonl(metrics_jsonl)
  panels = []
  for name, keys in PANELS:
    series = [(key, label, *_series(rows, key)) for key, label in keys]
    series = [s for s in series if s[2].size]
    if series:
      panels.append((name, series))
  if not panels:
    known = ", ".join(k for _, keys in PANELS for k, _ in keys)
    raise ValueError(f"{metrics_jsonl} has no plottable metrics (rows with 'step' and one of: {known})")
  found = detect_stages(rows) if stages else []
  all_steps = sorted({s for _, series in panels for _, _, st, _ in series for s in st})
  gap = float(np.median(np.diff(all_steps))) if len(all_steps) > 1 else 1.0

  cols = 2 if len(panels) > 1 else 1
  nrows = (len(panels) + cols - 1) // cols
  fig = Figure(figsize=(6.0 * cols, 3.0 * nrows + 0.6))
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, cols, squeeze=False)
  for ax, (name, series) in zip(axes.ravel(), panels):
    for start, end, stage in found:
      ax.axvspan(start - gap / 2, end + gap / 2, color=_STAGE_COLORS[stage], alpha=0.13, lw=0)
    for key, label, st, values in series:
      if key.startswith("eval/"):
        ax.plot(st, values, "o--", ms=4, label=label)
      else:
        ax.plot(st, values, lw=1.2, label=label)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend(fontsize=8)
  for ax in axes.ravel()[len(panels):]:
    ax.set_visible(False)
  if found:
    names = [s for s in STAGES if any(f[2] == s for f in found)]
    fig.legend([Patch(color=_STAGE_COLORS[s], alpha=0.35) for s in names], names, loc="lower center",
               ncol=len(names), fontsize=9, frameon=False)
  fig.suptitle(title or f"training dynamics: {os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl)))}",
               fontsize=11)
  fig.tight_layout(rect=(0, 0.05 if found else 0, 1, 1))
  out_png = os.fspath(out_png)
  parent = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out_png)}.tmp-{os.getpid()}")
  fig.savefig(tmp, format="png", dpi=110)
  os.replace(tmp, out_png)
  return out_png
