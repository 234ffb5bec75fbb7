"""The multimodal MCQA harness: loaders on small files in each layout, prompts, forced exit, per-subject intervals."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_med.llm.client import Completion, LLMClient
from mlx_med.vlm import mcqa

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


def solid(name: str, size: int = 8) -> np.ndarray:
  return np.full((size, size, 3), COLOURS[name], np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def colour_of(url: str) -> str:
  raw = base64.b64decode(url.split(",", 1)[1])
  mean = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.float32).reshape(-1, 3).mean(0)
  return min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - mean) ** 2)))


class ColourClient(LLMClient):
  """Answers "which colour?" from the first image's pixels; thinks `think_words` words first.

  Tokens are the space-separated pieces of its completion; max_tokens cuts it (finish "length").
  A question containing "sloppy" gets an answer without tags. Records every request.
  """

  def __init__(self, think_words: int = 3):
    self.think_words = think_words
    self.calls: list[dict] = []

  def complete(self, prompt, **kw):
    raise NotImplementedError

  def _answer(self, messages) -> tuple[str, str]:
    user = messages[0]
    parts = user["content"]
    image = next(p for p in parts if p["type"] == "image_url")
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    colour = colour_of(image["image_url"]["url"])
    letter = "A"
    for line in text.splitlines():
      if len(line) > 3 and line[1:3] == ". " and line[3:].strip() == colour:
        letter = line[0]
    return letter, text

  def _tokens(self, messages) -> list[str]:
    letter, text = self._answer(messages)
    if messages[-1]["role"] == "user" and messages[-1]["content"] == mcqa.FORCED_EXIT_PROMPT:
      return [f"<answer>{letter}</answer>"]
    if "sloppy" in text:
      return ["I", "pick", letter]
    return ["<think>"] + [f"w{i}" for i in range(self.think_words)] + ["</think>", f"<answer>{letter}</answer>"]

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None):
    self.calls.append({"messages": messages, "max_tokens": max_tokens})
    toks = self._tokens(messages)
    finish = "stop"
    if len(toks) > max_tokens:
      toks, finish = toks[:max_tokens], "length"
    return [Completion(" ".join(toks), finish, completion_tokens=len(toks))]


class BudgetClient(ColourClient):
  """A client whose chat takes think_budget itself (as the in-process sampler does)."""

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None, think_budget=None):
    self.calls.append({"messages": messages, "max_tokens": max_tokens, "think_budget": think_budget})
    letter, _ = self._answer(messages)
    words = [f"w{i}" for i in range(self.think_words)]
    forced = think_budget is not None and 1 + len(words) > think_budget
    if forced:
      words = words[:think_budget - 1]
    toks = ["<think>"] + words + ["</think>", f"<answer>{letter}</answer>"]
    c = Completion(" ".join(toks), "stop", completion_tokens=len(toks))
    c.forced = forced
    return [c]


def item(i: int, colour: str, answer: str, subject: str, question: str = "Which colour is shown?") -> mcqa.MCQAItem:
  return mcqa.MCQAItem(f"q{i}", [solid(colour)], question, ["red", "green", "blue", "yellow"], answer, subject)


# ------------------------------------------------------------------------------------------ loaders


def mmmu_row(i: int, **over) -> dict:
  row = {"id": f"validation_Art_Theory_{i}", "question": "Look at <image 1>. Which colour?",
         "options": "['red', 'green', 'blue']", "explanation": "", "answer": "B", "question_type": "multiple-choice",
         "subfield": "Painting", "img_type": "['Paintings']", "topic_difficulty": "Easy"}
  for k in range(1, 8):
    row[f"image_{k}"] = None
  row["image_1"] = {"bytes": png_bytes(solid("green")), "path": None}
  row.update(over)
  return row


def write_parquet(rows: list[dict], path: Path) -> Path:
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def test_mmmu_parquet_subjects_images_and_open_questions(tmp_path):
  rows = [mmmu_row(1), mmmu_row(2, id="validation_Clinical_Medicine_7", answer="c",
                                image_2={"bytes": png_bytes(solid("red")), "path": None},
                                question="<image 2> then <image 1>?"),
          mmmu_row(3, question_type="open", options="[]", answer="42")]
  folder = tmp_path / "MMMU"
  (folder / "Art_Theory").mkdir(parents=True)
  write_parquet(rows, folder / "Art_Theory" / "validation-00000-of-00001.parquet")
  items = mcqa.load_mcqa("mmmu", folder)
  assert [it.id for it in items] == ["validation_Art_Theory_1", "validation_Clinical_Medicine_7"]
  assert [it.subject for it in items] == ["Art_Theory", "Clinical_Medicine"]
  assert items[1].answer == "C" and items[1].options == ["red", "green", "blue"]
  assert mcqa.last_skipped == {"open": 1}
  np.testing.assert_array_equal(items[1].images[0], solid("green"))
  np.testing.assert_array_equal(items[1].images[1], solid("red"))
  # placeholders become the images in place; the text around them stays in order
  parts = mcqa.build_messages(items[1])[-1]["content"]
  kinds = [p["type"] for p in parts]
  assert kinds[:3] == ["text", "image_url", "text"] and kinds.count("image_url") == 2
  assert colour_of(parts[1]["image_url"]["url"]) == "red"
  assert colour_of(next(p for p in parts[3:] if p["type"] == "image_url")["image_url"]["url"]) == "green"
  assert "<image" not in "".join(p.get("text", "") for p in parts)
  assert mcqa.parse_data("mmmu:/a:b") == ("mmmu", "/a:b")


def test_mmmu_json_with_image_paths(tmp_path):
  Image.fromarray(solid("blue")).save(tmp_path / "q1.png")
  row = mmmu_row(1, id="dev_Biology_3", options=["x", "y"], answer="A", image_1="q1.png", question="What? <image 1>")
  (tmp_path / "mmmu.json").write_text(json.dumps([row]))
  (it,) = mcqa.load_mmmu(tmp_path / "mmmu.json")
  assert it.images == [str(tmp_path / "q1.png")] and it.subject == "Biology"
  # an id without the split_Subject_N shape falls back to the subfield
  row["id"] = "custom-1"
  (tmp_path / "mmmu.json").write_text(json.dumps([row]))
  assert mcqa.load_mmmu(tmp_path / "mmmu.json")[0].subject == "Painting"


@pytest.mark.parametrize("over, needle", [
    ({"answer": "E"}, "is not a letter among 3 options"),
    ({"options": "not a list ["}, "not a list literal"),
    ({"question": "Compare <image 1> and <image 3>"}, "<image 3> is referenced but image_3 is empty"),
    ({"image_1": {"bytes": b"not a png", "path": None}}, "not an image PIL can decode"),
    ({"image_2": {"bytes": png_bytes(solid("red")), "path": None}, "image_1": None}, "numbered [2]"),
    ({"image_1": {"bytes": None, "path": "missing.png"}}, "does not exist"),
])
def test_mmmu_malformed(tmp_path, over, needle):
  path = write_parquet([mmmu_row(1), mmmu_row(2, **over)], tmp_path / "bad.parquet")
  with pytest.raises(ValueError) as e:
    mcqa.load_mcqa("mmmu", path)
  msg = str(e.value)
  assert needle in msg and str(path) in msg and "\n" not in msg


def test_mmmu_missing_field_and_bad_files(tmp_path):
  row = mmmu_row(1)
  del row["answer"]
  path = write_parquet([row], tmp_path / "a.parquet")
  with pytest.raises(ValueError, match=r"a\.parquet:1: missing field 'answer'"):
    mcqa.load_mcqa("mmmu", path)
  (tmp_path / "b.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"b\.json:1: invalid JSON"):
    mcqa.load_mmmu(tmp_path / "b.json")
  (tmp_path / "c.parquet").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="not a readable parquet file"):
    mcqa.load_mmmu(tmp_path / "c.parquet")
  with pytest.raises(ValueError, match="unknown MCQA format 'mmlu'"):
    mcqa.load_mcqa("mmlu", tmp_path)
  with pytest.raises(ValueError, match="must be FORMAT:PATH"):
    mcqa.parse_data("nope")


def omni_root(tmp_path: Path, rows: list[dict] | None = None) -> Path:
  root = tmp_path / "OmniMedVQA"
  (root / "Images" / "Chest").mkdir(parents=True)
  (root / "QA_information" / "Open-access").mkdir(parents=True)
  for name in ("red", "green"):
    Image.fromarray(solid(name)).save(root / "Images" / "Chest" / f"{name}.png")
  rows = rows if rows is not None else [
      {"dataset": "Chest", "question_id": "Chest_0", "question_type": "Modality Recognition", "question": "Colour?",
       "gt_answer": "green", "image_path": "Images/Chest/green.png", "option_A": "red", "option_B": "green",
       "option_C": "blue", "option_D": "yellow", "modality_type": "X-Ray"},
      {"dataset": "Chest", "question_id": "Chest_1", "question_type": "Modality Recognition", "question": "Colour?",
       "gt_answer": "red", "image_path": "Images/Chest/red.png", "option_A": "red", "option_B": "green",
       "modality": "X-Ray"}]
  (root / "QA_information" / "Open-access" / "Chest.json").write_text(json.dumps(rows))
  return root


def test_omnimedvqa_layout(tmp_path):
  root = omni_root(tmp_path)
  items = mcqa.load_mcqa("omnimedvqa", root)
  assert [(it.id, it.answer, len(it.options), it.subject) for it in items] == [
      ("Chest_0", "B", 4, "Chest"), ("Chest_1", "A", 2, "Chest")]
  assert items[0].images == [str(root / "Images" / "Chest" / "green.png")]
  assert items[1].meta["modality_type"] == "X-Ray"
  # one QA file alone: the image root is found above it
  again = mcqa.load_omnimedvqa(root / "QA_information" / "Open-access" / "Chest.json")
  assert [it.images for it in again] == [it.images for it in items]


@pytest.mark.parametrize("change, needle", [
    ({"gt_answer": "purple"}, "gt_answer matches 0 of the options"),
    ({"image_path": "Images/Chest/none.png"}, "does not exist"),
    ({"option_B": None}, "missing field 'option_B'"),
])
def test_omnimedvqa_malformed(tmp_path, change, needle):
  good = {"dataset": "Chest", "question_id": "Chest_0", "question": "Colour?", "gt_answer": "green",
          "image_path": "Images/Chest/green.png", "option_A": "red", "option_B": "green"}
  root = omni_root(tmp_path, [good, {**good, "question_id": "Chest_1", **change}])
  with pytest.raises(ValueError) as e:
    mcqa.load_mcqa("omnimedvqa", root)
  assert needle in str(e.value) and "Chest.json:2" in str(e.value)


def test_vstar_folder(tmp_path):
  vstar = pytest.importorskip("mlx_med.vlm.vstar")
  examples = vstar.synth_vstar(3, image_size=96, seed=1)
  vstar.write_vstar_folder(examples, tmp_path / "vstar")
  items = mcqa.load_mcqa("vstar", tmp_path / "vstar")
  assert len(items) == 3
  back = {ex.id: ex for ex in vstar.read_vstar_folder(tmp_path / "vstar")}
  for it in items:
    ex = back[it.id]
    assert (it.question, it.options, it.answer, it.subject) == (ex.question, ex.options, ex.answer, ex.category)
    assert len(it.images) == 1


# --------------------------------------------------------------------------------------- evaluation


def wilson_by_roots(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """The Wilson bounds as the roots of (k/n - p)^2 = z^2 p (1 - p) / n (the interval's definition)."""
  ph = k / n
  a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
  lo, hi = sorted(np.roots([a, b, c]).real)
  return float(lo), float(hi)


def test_per_subject_accuracy_and_intervals(tmp_path):
  items = [item(0, "red", "A", "s1"), item(1, "green", "B", "s1"), item(2, "blue", "A", "s1"),  # 2/3
           item(3, "yellow", "D", "s2", "sloppy: which colour?"), item(4, "red", "C", "s2")]  # 1/2, 1 format failure
  client = ColourClient()
  result = mcqa.evaluate_mcqa(client, items, out_dir=tmp_path / "out")
  assert result.n == 5 and result.accuracy == pytest.approx(3 / 5)
  assert result.format_failure == pytest.approx(1 / 5)
  for subject, (k, n) in {"s1": (2, 3), "s2": (1, 2)}.items():
    r = result.per_category[subject]
    assert (r["n"], r["accuracy"]) == (n, pytest.approx(k / n))
    np.testing.assert_allclose(r["accuracy_ci"], wilson_by_roots(k, n), rtol=0, atol=1e-12)
  # hand arithmetic for 2/3: centre (2/3 + z^2/6) / (1 + z^2/3), half-width z sqrt(2/27 + z^2/36) / (1 + z^2/3)
  z = 1.959963984540054
  centre, half = (2 / 3 + z * z / 6) / (1 + z * z / 3), z * np.sqrt(2 / 27 + z * z / 36) / (1 + z * z / 3)
  np.testing.assert_allclose(result.per_category["s1"]["accuracy_ci"], [centre - half, centre + half], atol=1e-12)
  np.testing.assert_allclose(result.accuracy_ci, wilson_by_roots(3, 5), atol=1e-12)
  # the X-Reasoner instruction and the image reached the client
  first = client.calls[0]["messages"][0]["content"]
  assert first[0]["type"] == "image_url" and "<answer>" in first[1]["text"]
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert report["per_category"]["s2"]["n"] == 2 and len(report["rows"]) == 5
  table = (tmp_path / "out" / "table.md").read_text()
  assert "| s1 | 3 | 0.667 |" in table and "| **all** | 5 | 0.600 |" in table


def test_forced_exit_two_pass_respects_budget():
  items = [item(0, "green", "B", "s"), item(1, "blue", "C", "s")]
  client = ColourClient(think_words=50)
  result = mcqa.evaluate_mcqa(client, items, think_budget=10, max_tokens=64)
  assert result.accuracy == 1.0 and result.format_failure == 0.0 and result.forced_exit == 1.0
  assert result.meta["forced_exit_mode"] == "two-pass"
  assert [c["max_tokens"] for c in client.calls] == [10, 54, 10, 54]
  second = client.calls[1]["messages"]
  assert second[-2]["role"] == "assistant" and second[-2]["content"].endswith("</think>")
  assert second[-1]["content"] == mcqa.FORCED_EXIT_PROMPT
  for row in result.rows:
    think = row["completion"].split("</think>")[0]
    assert len(think.split()) == 10  # "<think>" + 9 words: exactly the budget
    assert row["completion"].rstrip().endswith(f"<answer>{row['answer']}</answer>") and row["forced"]
    assert row["tokens"] == 11


def test_forced_exit_not_needed_and_native():
  items = [item(0, "green", "B", "s")]
  short = ColourClient(think_words=3)
  result = mcqa.evaluate_mcqa(short, items, think_budget=10, max_tokens=64)
  assert len(short.calls) == 1 and result.forced_exit == 0.0 and result.accuracy == 1.0
  native = BudgetClient(think_words=50)
  result = mcqa.evaluate_mcqa(native, items, think_budget=10, max_tokens=64)
  assert result.meta["forced_exit_mode"] == "native" and len(native.calls) == 1
  assert native.calls[0]["think_budget"] == 10 and native.calls[0]["max_tokens"] == 64
  assert result.forced_exit == 1.0 and result.accuracy == 1.0
  assert len(result.rows[0]["completion"].split("</think>")[0].split()) == 10
  with pytest.raises(ValueError, match="leaves no room for the answer"):
    mcqa.evaluate_mcqa(short, items, think_budget=64, max_tokens=64)


def test_eval_command_writes_report(tmp_path, capsys):
  root = omni_root(tmp_path)
  out = tmp_path / "eval"
  result = mcqa.eval_command("fake", f"omnimedvqa:{root}", think_budget=8, out=str(out), max_tokens=40,
                             client=ColourClient(think_words=20))
  assert result.accuracy == 1.0 and result.meta["data"] == f"omnimedvqa:{root}"
  assert (out / "report.json").is_file() and (out / "table.md").is_file()
  printed = capsys.readouterr().out
  assert "| Chest | 2 | 1.000 |" in printed and "think budget 8 (two-pass)" in printed
  with pytest.raises(FileNotFoundError, match="neither a directory nor an http"):
    mcqa.make_client(str(tmp_path / "no-such-model"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
  from hf_tiny import make_hf_model, save_model_dir, write_tokenizer
  from torch_peers import import_torchvision

  from mlx_med.llm.model import LocalLM

  import_torchvision()
  root = tmp_path_factory.mktemp("tiny_vlm_mcqa")
  vocab = write_tokenizer(str(root / "tok"), model_max_length=1024)
  model = make_hf_model("qwen2", vocab_size=vocab, seed=3, max_position_embeddings=1024)
  return LocalLM.from_pretrained(save_model_dir(model, str(root / "model"), tokenizer_dir=str(root / "tok")))


def test_forced_exit_in_process_matches_the_rl_generator(tiny_lm):
  """A LocalClient takes the sampler's own forced exit: the same completions as mlx_med.rl's local generator."""
  from mlx_med.llm.client import LocalClient
  from mlx_med.rl import evaluate as ev

  items = [mcqa.MCQAItem(f"t{i}", [], f"Question {i}: which one?", ["alpha", "beta", "gamma"], "ABC"[i % 3], "s")
           for i in range(4)]
  budget, max_new = 3, 10
  ours = mcqa.evaluate_mcqa(LocalClient(tiny_lm), items, think_budget=budget, max_tokens=max_new)
  ref = ev.evaluate(ev.local_generator(tiny_lm, max_new_tokens=max_new, think_budget=budget),
                    [it.to_example() for it in items], template="xreasoner", batch_size=4)
  assert ours.meta["forced_exit_mode"] == "native"
  assert [r["completion"] for r in ours.rows] == [r["completion"] for r in ref.rows]
  assert [r["forced"] for r in ours.rows] == [r["forced"] for r in ref.rows]
  assert [r["choice"] for r in ours.rows] == [r["choice"] for r in ref.rows]
  assert all(r["tokens"] <= max_new for r in ours.rows) and ours.forced_exit == ref.forced_exit > 0


def test_make_client_from_a_model_directory(tmp_path):
  """`--model HFDIR`: a VLM directory becomes a LocalClient over LocalVLM, which answers image messages."""
  from vlm_tiny import image_message, make_llava_dir, sample_image

  from mlx_med.llm.client import LocalClient
  from mlx_med.vlm import mcqa
  from mlx_med.vlm.local import LocalVLM

  make_llava_dir(str(tmp_path / "llava"))
  client = mcqa.make_client(str(tmp_path / "llava"))
  assert isinstance(client, LocalClient) and isinstance(client.lm, LocalVLM)
  out = client.chat(image_message(sample_image(0), "What is shown?"), max_tokens=3, temperature=0.0)
  assert len(out) == 1 and out[0].completion_tokens >= 1
  with pytest.raises(FileNotFoundError, match="is neither a directory nor an http"):
    mcqa.make_client(str(tmp_path / "missing"))
