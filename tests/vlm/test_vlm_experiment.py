"""The SemCLIP experiment end to end at a tiny size: every condition, equal visual-token budgets, reports.

psi is a stand-in here (scores from the question's boxes, so the selected crop is known); its training is
tested in test_vlm_semclip.py. The VLM is a random tiny LLaVA (the experiment's logic, not its accuracy)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from configs.vlm.semclip import get_config
from mlx_med.vlm import experiment as exp_lib
from mlx_med.vlm import llava, semclip, vstar
from mlx_med.vlm import train as train_lib


def tiny_config():
  c = get_config("smoke")
  c.data.update({"image_size": 96, "n_test": 4, "target_size": (12, 24), "num_distractors": (6, 12)})
  c.crops.update({"scales": (2, 3), "slots": 1})
  c.vlm.model.update({"image_size": 32})
  c.vlm.model.vision.update({"patch_size": 16, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64})
  c.vlm.model.text.update({"d_model": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64,
                           "max_seq_len": 128})
  c.experiment.update({"batch_size": 4, "token_candidates": 2})
  return c


class BoxPsi:
  """Scores the crop the oracle picks 1 and every other 0, so SemCLIP's pick is known."""

  def __init__(self, examples, config):
    self.by_question = {ex.question: ex for ex in examples}
    self.config = config

  def image_scores(self, image, question):
    h, w = image.shape[:2]
    grid = semclip.crop_grid(h, w, tuple(self.config.crops.scales), float(self.config.crops.overlap))
    ex = self.by_question[question]
    scores = np.zeros(len(grid))
    scores[exp_lib.oracle_index(np.asarray(grid, np.float64), train_lib.example_boxes(ex),
                                float(self.config.crops.cover))] = 1.0
    return grid, scores


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  c = tiny_config()
  examples = vstar.synth_vstar(4, image_size=96, seed=3)
  tok_dir = str(tmp_path_factory.mktemp("tok"))
  train_lib.build_word_tokenizer([train_lib.format_question(e.question, e.options) for e in examples], tok_dir)
  enc = train_lib.WordEncoder(tok_dir)
  run = train_lib.run_config(c)
  hf = train_lib.hf_config(run, enc.vocab_size, enc.image_id, enc.pad_id, enc.im_end_id)
  cfg = train_lib.model_config(run, hf)
  vlm = train_lib.TrainedVLM(cfg, llava.init_params(cfg, jax.random.key(0)), enc, "random")
  return c, examples, vlm


def test_every_condition_at_the_same_budget(setup):
  c, examples, vlm = setup
  psi = BoxPsi(examples, c)
  queries, budget = exp_lib.build_queries(examples, psi, c, tokens_per_image=vlm.tokens_per_image,
                                          conditions=exp_lib.CONDITIONS)
  assert budget == 2 * vlm.tokens_per_image == 8
  assert len(queries) == len(examples) * len(exp_lib.CONDITIONS)
  for q in queries:
    ex = examples[q.example_index]
    assert q.visual_tokens == budget
    assert q.images[0] is ex.image or np.array_equal(q.images[0], ex.image)  # the overview, always
    n_slot_tokens = (len(q.images) - 1) * vlm.tokens_per_image + (q.token_plan[1] if q.token_plan else 0)
    assert n_slot_tokens == budget - vlm.tokens_per_image
    if q.condition == "full_image":
      assert np.array_equal(q.images[1], ex.image)
    if q.condition in ("semclip_crop", "oracle_crop"):
      # the stand-in psi ranks the oracle's crop first, so both show the same region
      other = next(o for o in queries if o.example_index == q.example_index and o.condition != q.condition
                   and o.condition in ("semclip_crop", "oracle_crop"))
      assert np.array_equal(q.images[1], other.images[1])
      h, w = q.images[1].shape[:2]
      assert h < ex.image.shape[0] and w < ex.image.shape[1]
    if q.condition == "semclip_tokens":
      assert len(q.images) == 1 and len(q.token_plan[0]) == 2
  # the local backend feeds exactly budget visual tokens per question
  backend = exp_lib.LocalBackend(vlm, batch_size=4)
  for q in queries[:len(exp_lib.CONDITIONS)]:
    assert backend.visual_tokens(q).shape == (budget, vlm.cfg.decoder.d_model)


def test_run_end_to_end_writes_reports(setup, tmp_path, capsys):
  c, examples, vlm = setup
  report = exp_lib.run_semclip_experiment(c, str(tmp_path), backend=vlm, data=examples, psi=BoxPsi(examples, c),
                                          progress=False)
  assert list(report["conditions"]) == list(exp_lib.CONDITIONS)
  for r in report["conditions"].values():
    assert r["n"] == 4 and r["visual_tokens"] == [report["budget_tokens"]]
    assert 0.0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1.0
    assert r["unanswered"] == 0
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["conditions"].keys() == report["conditions"].keys()
  assert (tmp_path / "accuracy.png").stat().st_size > 1000
  table = (tmp_path / "table.md").read_text()
  assert "SemCLIP crop" in table and "oracle crop" in table
  assert "| SemCLIP tokens |" in capsys.readouterr().out
  assert not list(tmp_path.glob("*.tmp*"))


def test_served_backend_gets_images_and_skips_tokens(setup, tmp_path):
  c, examples, _ = setup
  seen = []

  class Client:
    def chat(self, messages, **kw):
      parts = messages[0]["content"]
      seen.append([p["image_url"]["url"][:22] for p in parts if p["type"] == "image_url"])
      return [SimpleNamespace(text="(B) because")]

  report = exp_lib.run_semclip_experiment(c, str(tmp_path), backend=Client(), data=examples,
                                          psi=BoxPsi(examples, c), progress=False)
  assert "semclip_tokens" not in report["conditions"] and "semclip_tokens" in report["skipped_conditions"]
  assert report["budget_tokens"] == 2 * 576
  assert all(urls == ["data:image/png;base64,"] * 2 for urls in seen) and len(seen) == 4 * 4
  want = sum(ex.answer == "B" for ex in examples) / 4
  assert all(r["accuracy"] == want for r in report["conditions"].values())


def test_parse_letter_and_bad_inputs(setup, tmp_path):
  assert exp_lib.parse_letter("B", 4) == "B"
  assert exp_lib.parse_letter("(C) red", 4) == "C"
  assert exp_lib.parse_letter("The answer is D.", 4) == "D"
  assert exp_lib.parse_letter("E", 4) is None
  assert exp_lib.parse_letter("Blue", 4) is None
  c, examples, vlm = setup
  c2 = tiny_config()
  c2.experiment.conditions = ("full_image", "best_crop")
  with pytest.raises(ValueError, match="best_crop"):
    exp_lib.run_semclip_experiment(c2, str(tmp_path), backend=vlm, data=examples, psi=BoxPsi(examples, c2))
  with pytest.raises(FileNotFoundError, match="V\\* folder"):
    exp_lib.run_semclip_experiment(c, str(tmp_path), backend=vlm, data=str(tmp_path / "nope"), psi=BoxPsi(examples, c))
  assert Path(tmp_path).is_dir()


def test_goal_uses_paired_differences_on_the_same_questions():
  """Two conditions whose Wilson intervals overlap but which differ on the same questions in one direction
  only: the paired interval excludes 0 (goal met); a shuffled pairing with the same accuracies does not."""
  from mlx_med.core.stats import paired_difference
  from mlx_med.vlm import experiment as E

  n = 120
  full = np.zeros(n, int)
  full[:36] = 1  # 30%
  crop = full.copy()
  crop[36:54] = 1  # 45%: right on 18 more questions, wrong on none of full's
  rand = np.zeros(n, int)
  rand[18:54] = 1  # 30%, another subset of crop's right answers
  results = {}
  for name, v in (("full_image", full), ("random_crop", rand), ("semclip_crop", crop),
                  ("oracle_crop", crop)):
    results[name] = {"accuracy": v.mean(), "correct_by_question": list(v), "ci95": [0.0, 1.0]}
  g = E.goal(results)
  d = g["paired"]["semclip_crop-full_image"]
  np.testing.assert_allclose(d["mean"], 0.15)
  assert d["lo"] > 0 and g["semclip_clearly_above_full_image"]
  assert g["semclip_clearly_above_random_crop"] and g["met"] and g["gap_closed"] == 1.0
  # against reversed correctness (crop right on 54 questions, the other on 36 others) the same +15 points
  # are not clearly above 0 on 120 questions
  swapped = dict(results, random_crop={"accuracy": 0.3, "correct_by_question": list(full[::-1]), "ci95": [0, 1]})
  g2 = E.goal(swapped)
  np.testing.assert_allclose(g2["paired"]["semclip_crop-random_crop"]["mean"], 0.15)
  assert g2["paired"]["semclip_crop-random_crop"]["lo"] < d["lo"]
  # the same accuracies, paired differently (crop right where full is wrong and vice versa): not supported
  other = paired_difference(np.roll(crop, 60), full, n_boot=2000, seed=0)
  np.testing.assert_allclose(other["mean"], 0.15)
  assert other["lo"] < d["lo"]
  assert g["paired"]["oracle_crop-semclip_crop"]["mean"] == 0.0
