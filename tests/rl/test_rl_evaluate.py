"""MCQA evaluation (hand-written completions and a tiny local model with forced exit), the
accuracy interval against scipy, eval.json, Med-RLVR stage detection and the dynamics plot."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mlx_med.rl import evaluate as ev

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ the interval


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (3, 5), (0, 20), (20, 20), (61, 100), (7, 1000)])
def test_wilson_interval_matches_scipy(k, n):
  from scipy import stats

  ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
  lo, hi = ev.wilson_interval(k, n)
  np.testing.assert_allclose([lo, hi], [ref.low, ref.high], rtol=0, atol=1e-12)


def test_wilson_interval_contains_estimate_and_shrinks_with_n():
  widths = []
  for n in (10, 100, 1000, 10000):
    k = int(0.6 * n)
    lo, hi = ev.wilson_interval(k, n)
    assert lo < k / n < hi
    widths.append(hi - lo)
  assert all(a > b for a, b in itertools.pairwise(widths))
  # roughly 1/sqrt(n): 100x the rows, a tenth of the width
  assert widths[-1] == pytest.approx(widths[1] / 10, rel=0.05)
  assert all(np.isnan(ev.wilson_interval(0, 0)))
  with pytest.raises(ValueError, match="successes"):
    ev.wilson_interval(5, 3)


# ----------------------------------------------------------------------- evaluation (fake model)


def _examples():
  from mlx_med.rl.data import MCQAExample

  opts = {"A": "asthma", "B": "pneumonia", "C": "influenza", "D": "sepsis"}
  return [MCQAExample(f"q{i}", f"question {i}?", opts, answer, category=cat)
          for i, (answer, cat) in enumerate([("A", "diagnosis"), ("B", "diagnosis"), ("C", "treatment"),
                                              ("D", "treatment"), ("A", "treatment")])]


# (completion, correct, format_ok, leak)
HAND = [
    ("<think>Wheeze and night cough point to asthma.</think><answer>A</answer>", True, True, False),
    ("<think>Fever and cough.</think><answer>C</answer>", False, True, False),
    ("<answer>C</answer>", True, False, False),  # right letter, but no reasoning block
    ("<think>The answer is D.</think><answer>D</answer>", True, True, True),  # gives it away in the thought
    ("I am not sure.", False, False, False),
]


def _fake_generate(calls):
  by_question = {f"question {i}?": HAND[i][0] for i in range(len(HAND))}

  def generate(conversations):
    calls.append(conversations)
    outs = []
    for conv in conversations:
      key = next(q for q in by_question if q in conv[-1]["content"])
      outs.append(by_question[key])
    return outs

  return generate


def test_evaluate_hand_written_completions():
  from mlx_med.rl.data import build_messages

  calls = []
  examples = _examples()
  res = ev.evaluate(_fake_generate(calls), examples, template="medrlvr", batch_size=2)
  assert [len(c) for c in calls] == [2, 2, 1]  # batched
  assert calls[0][0] == build_messages(examples[0], "medrlvr")
  assert res.n == 5
  assert res.accuracy == pytest.approx(3 / 5)
  assert res.format_failure == pytest.approx(2 / 5)
  assert res.answer_leak == pytest.approx(1 / 5)
  assert res.accuracy_ci == pytest.approx(ev.wilson_interval(3, 5))
  assert [r["correct"] for r in res.rows] == [h[1] for h in HAND]
  assert [r["format_ok"] for r in res.rows] == [h[2] for h in HAND]
  assert [r["leak"] for r in res.rows] == [h[3] for h in HAND]
  assert [r["choice"] for r in res.rows] == ["A", "C", "C", "D", None]
  # plain strings: lengths are characters
  assert res.length_unit == "chars"
  assert res.mean_length == pytest.approx(np.mean([len(h[0]) for h in HAND]))
  assert res.forced_exit is None
  # per category, exact
  diag, treat = res.per_category["diagnosis"], res.per_category["treatment"]
  assert (diag["n"], diag["accuracy"], diag["format_failure"], diag["answer_leak"]) == (2, 0.5, 0.0, 0.0)
  assert (treat["n"], treat["accuracy"]) == (3, pytest.approx(2 / 3))
  assert treat["format_failure"] == pytest.approx(2 / 3) and treat["answer_leak"] == pytest.approx(1 / 3)
  assert treat["accuracy_ci"] == pytest.approx(list(ev.wilson_interval(2, 3)))


def test_evaluate_token_lengths_and_errors():
  examples = _examples()[:2]
  res = ev.evaluate(lambda convs: [ev.Response("<think>x</think><answer>A</answer>", 7 + i, i == 1, "stop")
                                   for i in range(len(convs))], examples, template="plain")
  assert res.length_unit == "tokens" and res.mean_length == 7.5
  assert res.forced_exit == 0.5
  assert res.per_category == {"diagnosis": res.per_category["diagnosis"]}
  with pytest.raises(ValueError, match="returned 1 completions for 2"):
    ev.evaluate(lambda convs: ["x"], examples)
  with pytest.raises(ValueError, match="no examples"):
    ev.evaluate(lambda convs: [], [])
  with pytest.raises(ValueError, match="unknown template"):
    ev.evaluate(lambda convs: ["x"] * len(convs), examples, template="nope")


def test_write_report_is_json_and_atomic(tmp_path):
  res = ev.evaluate(_fake_generate([]), _examples(), batch_size=8)
  res.meta["model"] = "fake"
  path = ev.write_report(res, str(tmp_path / "out" / "eval.json"))
  got = json.loads(Path(path).read_text())
  assert got["accuracy"] == pytest.approx(0.6) and got["n"] == 5
  assert got["accuracy_ci"] == pytest.approx(list(ev.wilson_interval(3, 5)))
  assert got["format_failure"] == pytest.approx(0.4) and got["answer_leak"] == pytest.approx(0.2)
  assert set(got["per_category"]) == {"diagnosis", "treatment"}
  assert len(got["rows"]) == 5 and got["rows"][3]["completion"] == HAND[3][0]
  assert got["meta"]["model"] == "fake"
  assert os.listdir(tmp_path / "out") == ["eval.json"]  # no temporary left behind
  table = ev.format_table(res)
  assert "0.600 [" in table and "format failure" in table and "treatment" in table


# ---------------------------------------------------------------------------- stage detection


def _stage_rows(leak=True, noise=0.0, repeat=1, seed=0):
  """Four phases of 10 steps (x repeat) shaped like Med-RLVR's curves."""
  rng = np.random.default_rng(seed)
  phases = [  # format_failure, answer_leak, response_length, reward, accuracy
      (0.9, 0.0, 50, -0.8, 0.10),
      (0.1, 0.0, 60, 0.3, 0.40),  # formatted, early length level
      (0.1, 0.0, 120, 0.4, 0.45),  # verbose
      (0.05, 0.6, 20, 0.8, 0.60),  # hacking: leak and short answers
      (0.05, 0.05, 80, 0.8, 0.70),  # reintegration
  ]
  sizes = [10, 4, 6, 10, 10]
  rows = []
  step = 0
  for (ff, lk, ln, rw, acc), size in zip(phases, sizes):
    for _ in range(size * repeat):
      row = {"step": step, "format_failure": ff, "response_length": ln * (1 + noise * rng.standard_normal()),
             "reward": rw + noise * rng.standard_normal(), "accuracy": acc, "kl": 0.01 * step}
      if leak:
        row["answer_leak"] = lk
      rows.append(row)
      if step % 5 == 0:
        rows.append({"step": step, "eval/accuracy": acc, "eval/format_failure": ff})  # eval rows share a step
      step += 1
  return rows


def test_detect_stages_on_hand_made_rows():
  assert ev.detect_stages(_stage_rows(), smooth=1) == [
      (0.0, 9.0, "format failure"), (14.0, 19.0, "verbose formatting"), (20.0, 29.0, "reward hacking"),
      (30.0, 39.0, "reintegration")]
  # without the leak detector, hacking shows as the length collapsing while the reward is high
  assert ev.detect_stages(_stage_rows(leak=False), smooth=1) == [
      (0.0, 9.0, "format failure"), (14.0, 19.0, "verbose formatting"), (20.0, 29.0, "reward hacking"),
      (30.0, 39.0, "reintegration")]
  # a run that never breaks the format nor hacks: no stages but verbosity
  calm = [{"step": s, "format_failure": 0.0, "answer_leak": 0.0, "response_length": 50.0, "reward": 0.5}
          for s in range(20)]
  assert ev.detect_stages(calm) == []
  assert ev.detect_stages([]) == []
  assert ev.detect_stages([{"step": 1, "kl": 0.1}]) == []


def test_detect_stages_noisy_default_smoothing():
  expected = [(0, 99, "format failure"), (140, 199, "verbose formatting"), (200, 299, "reward hacking"),
              (300, 399, "reintegration")]
  for seed in range(3):
    stages = ev.detect_stages(_stage_rows(noise=0.1, repeat=10, seed=seed))  # 400 steps, default window 20
    assert [s[2] for s in stages] == [e[2] for e in expected], stages
    for (start, end, _), (lo, hi, _) in zip(stages, expected):  # a centred 20-step average blurs by <= 10
      assert abs(start - lo) <= 10 and abs(end - hi) <= 10, stages


# --------------------------------------------------------------------------------------- plot


def _write_jsonl(path, rows):
  Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_plot_training_dynamics(tmp_path):
  rows = _stage_rows()
  for r in rows:
    if "reward" in r:
      r.update(clip_frac=0.1, entropy=1.0)
  metrics = _write_jsonl(tmp_path / "metrics.jsonl", rows)
  out = ev.plot_training_dynamics(metrics, str(tmp_path / "plots" / "dynamics.png"))
  data = Path(out).read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 10_000
  assert sorted(os.listdir(tmp_path / "plots")) == ["dynamics.png"]
  # missing keys skip panels; a file with only a reward still plots
  only = _write_jsonl(tmp_path / "only.jsonl", [{"step": s, "reward": 0.1 * s} for s in range(5)])
  assert Path(ev.plot_training_dynamics(only, str(tmp_path / "only.png"))).read_bytes().startswith(PNG_MAGIC)
  empty = _write_jsonl(tmp_path / "empty.jsonl", [{"step": 1, "lr": 1e-3}])
  with pytest.raises(ValueError, match="no plottable metrics"):
    ev.plot_training_dynamics(empty, str(tmp_path / "x.png"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ev.plot_training_dynamics(str(tmp_path / "missing.jsonl"), str(tmp_path / "x.png"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"step": 1, "reward": 0.1}\n{oops\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    ev.plot_training_dynamics(str(bad), str(tmp_path / "x.png"))


# ------------------------------------------------------------------- a tiny local model, forced exit


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  from hf_tiny import make_hf_model, save_model_dir, write_tokenizer
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' model classes import torchvision, CUDA-linked on PyPI (see torch_peers)
  root = tmp_path_factory.mktemp("tiny_rl_eval")
  vocab = write_tokenizer(str(root / "tok"), model_max_length=1024)
  model = make_hf_model("qwen2", vocab_size=vocab, seed=3, max_position_embeddings=1024)
  return save_model_dir(model, str(root / "model"), tokenizer_dir=str(root / "tok"))


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
  from mlx_med.llm.model import LocalLM

  return LocalLM.from_pretrained(tiny_model_dir)


def test_local_generator_forced_exit(tiny_lm):
  examples = _examples()[:4]
  budget, max_new = 3, 10
  with_budget = ev.evaluate(ev.local_generator(tiny_lm, max_new_tokens=max_new, think_budget=budget), examples,
                            template="medrlvr", batch_size=4)
  free = ev.evaluate(ev.local_generator(tiny_lm, max_new_tokens=max_new), examples, template="medrlvr", batch_size=4)
  assert with_budget.length_unit == "tokens" and with_budget.n == 4
  assert all(1 <= r["tokens"] <= max_new for r in with_budget.rows)
  past = [r for r in with_budget.rows if r["tokens"] > budget]
  assert past, "no row ran past the think budget; lengthen max_new_tokens"
  for r, f in zip(with_budget.rows, free.rows):
    if r["tokens"] > budget and "</think>" not in f["completion"]:
      # the model would not close its thought; the budget forced the tag in
      assert r["completion"].count("</think>") == 1 and r["forced"], (r["completion"], f["completion"])
      # greedy decoding: identical to the free run until the budget is spent
      assert f["completion"].startswith(r["completion"].split("</think>")[0])
  assert with_budget.forced_exit == pytest.approx(np.mean([bool(r["forced"]) for r in with_budget.rows]))
  assert with_budget.forced_exit > 0 and free.forced_exit == 0.0
  with pytest.raises(ValueError, match="leaves no room for the answer"):
    ev.local_generator(tiny_lm, max_new_tokens=budget + 1, think_budget=budget)


def test_eval_command_end_to_end(tiny_model_dir, tmp_path, capsys):
  from mlx_med.rl.data import write_jsonl

  data = write_jsonl(_examples(), str(tmp_path / "medqa.jsonl"))
  out = tmp_path / "report.json"
  res = ev.eval_command(model=tiny_model_dir, data=f"medqa:{data}", think_budget=2, max_new_tokens=8, batch_size=8,
                        out=str(out))
  printed = capsys.readouterr().out
  assert "accuracy" in printed and "format failure" in printed and "answer leak" in printed
  assert "forced exit" in printed and f"wrote {out}" in printed
  got = json.loads(out.read_text())
  assert got["n"] == res.n == 5 and got["meta"]["think_budget"] == 2
  assert got["accuracy"] == res.accuracy and len(got["rows"]) == 5
  lo, hi = got["accuracy_ci"]
  assert lo <= got["accuracy"] <= hi

  with pytest.raises(ValueError, match="unknown data format 'medqaa'"):
    ev.eval_command(model=tiny_model_dir, data=f"medqaa:{data}")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ev.eval_command(model=tiny_model_dir, data=f"medqa:{tmp_path / 'nope.jsonl'}")
  with pytest.raises(ValueError, match="FORMAT:PATH"):
    ev.eval_command(model=tiny_model_dir, data="medqa")
  with pytest.raises(ValueError, match="needs --workdir"):
    ev.eval_command(model=tiny_model_dir, data="synthetic")
  with pytest.raises(FileNotFoundError, match="no held-out split"):
    ev.eval_command(workdir=str(tmp_path), data="synthetic")
  write_jsonl(_examples(), str(tmp_path / "heldout.jsonl"))  # what a synthetic run writes
  with pytest.raises(FileNotFoundError, match="no Hugging Face export"):
    ev.eval_command(workdir=str(tmp_path), data="synthetic")


class _FakeClient:
  """An LLMClient stand-in: answers from a table, reports token counts, records calls."""

  def __init__(self):
    self.calls = []

  def chat(self, messages, *, max_tokens=256, temperature=None, n=1, seed=None, **_):
    from mlx_med.llm.client import Completion

    self.calls.append((max_tokens, temperature, n))
    i = next(i for i in range(len(HAND)) if f"question {i}?" in messages[-1]["content"])
    return [Completion(text=HAND[i][0], finish_reason="stop", completion_tokens=10 + i)]


def test_client_generator_and_endpoint_command(tmp_path, monkeypatch, capsys):
  from mlx_med.llm import client as client_lib
  from mlx_med.rl.data import write_jsonl

  fake = _FakeClient()
  res = ev.evaluate(ev.client_generator(fake, max_tokens=64, concurrency=3), _examples(), batch_size=4)
  assert [r["completion"] for r in res.rows] == [h[0] for h in HAND]  # order kept across threads
  assert res.accuracy == pytest.approx(0.6) and res.length_unit == "tokens" and res.mean_length == 12.0
  assert fake.calls[0] == (64, 0.0, 1) and res.forced_exit is None
  with pytest.raises(ValueError, match="needs the model in this process"):
    ev.client_generator(fake, max_tokens=8, think_budget=4)

  seen = {}

  def make_client(cfg):
    seen.update(cfg)
    return _FakeClient()

  monkeypatch.setattr(client_lib, "make_client", make_client)
  monkeypatch.delenv(client_lib.ENV_MODEL, raising=False)
  data = write_jsonl(_examples(), str(tmp_path / "q.jsonl"))
  with pytest.raises(ValueError, match="--model-name"):
    ev.eval_command(endpoint="http://127.0.0.1:8000/v1", data=f"synthetic_jsonl:{data}")
  res = ev.eval_command(endpoint="http://127.0.0.1:8000/v1", model_name="served", data=f"synthetic_jsonl:{data}",
                        out=str(tmp_path), limit=4)
  assert seen == {"backend": "openai", "model": "served", "base_url": "http://127.0.0.1:8000/v1"}
  assert res.n == 4 and res.accuracy == pytest.approx(0.75)
  assert json.loads((tmp_path / "eval.json").read_text())["meta"]["model"] == "served @ http://127.0.0.1:8000/v1"
  assert "served @ http://127.0.0.1:8000/v1" in capsys.readouterr().out


def test_local_generator_other_params_and_local_client(tiny_lm):
  import jax

  from mlx_med.llm.client import LocalClient

  examples = _examples()[:2]
  base = ev.evaluate(ev.local_generator(tiny_lm, max_new_tokens=6), examples, template="plain")
  same = ev.evaluate(ev.local_generator(tiny_lm, max_new_tokens=6, params=tiny_lm.params), examples, template="plain")
  assert [r["completion"] for r in same.rows] == [r["completion"] for r in base.rows]
  scaled = jax.tree.map(lambda x: -x, tiny_lm.params)
  other = ev.evaluate(ev.local_generator(tiny_lm, max_new_tokens=6, params=scaled), examples, template="plain")
  assert [r["completion"] for r in other.rows] != [r["completion"] for r in base.rows]
  # the same model behind the client interface: same greedy completions and token counts
  via_client = ev.evaluate(ev.client_generator(LocalClient(tiny_lm), max_tokens=6, concurrency=1), examples,
                           template="plain")
  assert [(r["completion"], r["tokens"]) for r in via_client.rows] == [(r["completion"], r["tokens"]) for r in base.rows]
