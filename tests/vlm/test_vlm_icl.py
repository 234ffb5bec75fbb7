"""The multimodal ICL study: selection on a hand-computed example, perturbations, label maps, a full small run."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mlx_med.llm.client import Completion, LLMClient
from mlx_med.vlm import icl

LABEL_MODES = icl.LABEL_MODES


def decode(part: dict) -> np.ndarray:
  raw = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
  return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.float32)


def read_prompt(messages) -> tuple[list[tuple[np.ndarray, str, str]], np.ndarray]:
  """(demonstrations as (image, text, label), query image) from build_messages' single user turn."""
  parts = messages[0]["content"]
  demos, image = [], None
  for p in parts[1:]:
    if p["type"] == "image_url":
      image = decode(p)
    else:
      body = p["text"]
      if "\nAnswer: " in body:
        text, label = body.split("\nAnswer: ")
        demos.append((image, text.split(": ", 1)[1], label.strip()))
  return demos, image


def ink(img: np.ndarray) -> np.ndarray:
  """Mean colour of the saturated pixels (the drawn shape, not the grey background)."""
  px = img.reshape(-1, 3)
  sat = px.max(-1) - px.min(-1)
  return px[sat > 60].mean(0) if np.any(sat > 60) else px.mean(0)


class CopyClient(LLMClient):
  """A scripted VLM: with demonstrations it answers the label of the demo whose shape's colour is
  nearest the query's ("learns in context"); without, or when `ignores_demos`, the query's colour name."""

  def __init__(self, ignores_demos: bool = False):
    self.ignores_demos = ignores_demos
    self.prompts: list = []

  def complete(self, prompt, **kw):
    raise NotImplementedError

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None):
    self.prompts.append(messages)
    demos, query = read_prompt(messages)
    if demos and not self.ignores_demos:
      dist = [float(np.sum((ink(d[0]) - ink(query)) ** 2)) for d in demos]
      answer = demos[int(np.argmin(dist))][2]
    else:
      answer = min(icl.COLOURS, key=lambda c: float(np.sum((np.asarray(icl.COLOURS[c]) - ink(query)) ** 2)))
    return [Completion(f"The label is {answer}.", "stop", completion_tokens=5)]


# --------------------------------------------------------------------------------------- selection

TEXT_Q, TEXT_P = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
IMAGE_Q, IMAGE_P = np.array([[0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 4.0]])
# cosines by hand: text [1, 0, 1/sqrt2, -1]; image [0, 1, 1/sqrt2, 4/5]; mean [1/2, 1/2, 1/sqrt2, -1/10]
EXPECTED = {"text": [0, 2], "image": [1, 3], "both": [2, 0]}  # "both": p0 and p1 tie at 1/2, the lower index wins


def test_cosines_by_hand():
  r = 1 / np.sqrt(2)
  np.testing.assert_allclose(icl.cosine(TEXT_Q, TEXT_P)[0], [1, 0, r, -1], atol=1e-12)
  np.testing.assert_allclose(icl.cosine(IMAGE_Q, IMAGE_P)[0], [0, 1, r, 0.8], atol=1e-12)
  assert icl.cosine(np.zeros((1, 2)), TEXT_P)[0].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("strategy", ["text", "image", "both"])
def test_similarity_strategies_pick_expected(strategy):
  picked = icl.select_demonstrations(strategy, 2, text_sim=icl.cosine(TEXT_Q, TEXT_P)[0],
                                     image_sim=icl.cosine(IMAGE_Q, IMAGE_P)[0])
  assert picked == EXPECTED[strategy]


def test_random_strategy_is_seeded_and_distinct():
  a = icl.select_demonstrations("random", 3, pool_size=10, rng=np.random.default_rng(5))
  b = icl.select_demonstrations("random", 3, pool_size=10, rng=np.random.default_rng(5))
  assert a == b and len(set(a)) == 3 and all(0 <= i < 10 for i in a)
  with pytest.raises(ValueError, match="cannot pick 11 demonstrations from a pool of 10"):
    icl.select_demonstrations("random", 11, pool_size=10, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="unknown selection strategy 'clip'"):
    icl.select_demonstrations("clip", 1, pool_size=10)


def fixed_task() -> tuple[icl.ICLTask, icl.Embeddings]:
  """The hand-computed example as a task: pool image i is a constant array of value 10 * (i + 1)."""
  pool = [icl.ICLExample(f"p{i}", [np.full((4, 4, 3), 10 * (i + 1), np.uint8)], f"t{i}", "red" if i % 2 else "blue")
          for i in range(4)]
  query = icl.ICLExample("q", [np.full((4, 4, 3), 200, np.uint8)], "tq", "red")
  task = icl.ICLTask("fixed", pool, [query], ["red", "blue"])
  texts = {f"t{i}": TEXT_P[i] for i in range(4)} | {"tq": TEXT_Q[0]}
  images = {10 * (i + 1): IMAGE_P[i] for i in range(4)} | {200: IMAGE_Q[0]}
  emb = icl.Embeddings(lambda imgs: np.stack([images[int(np.asarray(x)[0, 0, 0])] for x in imgs]),
                       lambda txts: np.stack([texts[t] for t in txts]))
  return task, emb


def test_strategies_through_the_study_put_the_closest_last():
  task, emb = fixed_task()
  client = CopyClient()
  icl.run_icl_study({"m": client}, task, strategies=["text", "image", "both"], shots=[2], perturbations=["none"],
                    label_modes=["original"], embeddings=emb)
  got = [[d[1] for d in read_prompt(p)[0]] for p in client.prompts]
  assert got == [[f"t{i}" for i in reversed(EXPECTED[s])] for s in ("text", "image", "both")]


# ------------------------------------------------------------------------------------ perturbations


def demos4() -> list[icl.ICLExample]:
  return [icl.ICLExample(f"d{i}", [np.full((2, 2, 3), i, np.uint8)], f"word{i} is here now", lab)
          for i, lab in enumerate(["red", "green", "blue", "red"])]


def test_wrong_image_moves_every_image_to_another_demo():
  demos = demos4()
  out = icl.perturb(demos, "wrong_image", np.random.default_rng(0))
  values = [int(d.images[0][0, 0, 0]) for d in out]
  assert sorted(values) == [0, 1, 2, 3] and all(v != i for i, v in enumerate(values))
  assert [(d.id, d.text, d.label) for d in out] == [(d.id, d.text, d.label) for d in demos]
  assert [int(d.images[0][0, 0, 0]) for d in demos] == [0, 1, 2, 3]  # the input is untouched
  (one,) = icl.perturb(demos[:1], "wrong_image", np.random.default_rng(0), pool=demos)
  assert one.label == "red" and one.meta["image_of"] in ("d1", "d2")  # a donor with another label


def test_corrupted_text():
  demos = demos4()
  out = icl.perturb(demos, "corrupted_text", np.random.default_rng(0))
  for d, o in zip(demos, out):
    assert [len(w) for w in o.text.split()] == [len(w) for w in d.text.split()]
    assert o.text != d.text and not set(o.text.split()) & {"word0", "word1", "is", "here", "now"}
    assert o.images is d.images or np.array_equal(o.images[0], d.images[0])
    assert o.label == d.label
  shuffled = icl.corrupt_text("a b c d e", np.random.default_rng(1), "shuffle")
  assert sorted(shuffled.split()) == list("abcde") and shuffled != "a b c d e"
  assert icl.perturb(demos, "none", np.random.default_rng(0)) == demos


def test_label_maps():
  assert icl.label_mapping(["red", "green", "blue"], "flipped") == {"red": "green", "green": "blue", "blue": "red"}
  assert icl.label_mapping(["yes", "no"], "flipped") == {"yes": "no", "no": "yes"}
  assert icl.label_mapping(["yes", "no"], "arbitrary") == {"yes": "dax", "no": "wug"}
  task, _ = fixed_task()
  flipped = icl.relabel(task, "flipped")
  assert [e.label for e in flipped.pool] == ["red", "blue", "red", "blue"]
  assert flipped.queries[0].label == "blue" and flipped.queries[0].meta["original_label"] == "red"
  arb = icl.relabel(task, "arbitrary")
  assert arb.labels == ["dax", "wug"] and [e.label for e in arb.pool] == ["wug", "dax", "wug", "dax"]
  with pytest.raises(ValueError, match="unknown label mode 'random'"):
    icl.label_mapping(["a", "b"], "random")


def test_parse_label():
  assert icl.parse_label("<think>red? no</think> It is Blue.", ["red", "blue"]) == "blue"
  assert icl.parse_label("green then red", ["red", "green"]) == "green"
  assert icl.parse_label("reddish", ["red", "green"]) is None
  assert icl.parse_label("The answer is (C).", ["A", "B", "C"]) == "C"


# ------------------------------------------------------------------------------------------- study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  out = tmp_path_factory.mktemp("icl")
  task = icl.synthetic_task(18, 9, image_size=24, seed=3)
  backends = {"big": CopyClient(), "small": CopyClient(ignores_demos=True)}
  result = icl.run_icl_study(backends, task, shots=[0, 1, 4], out_dir=out, sizes={"big": 7e9, "small": 1e9})
  return result, out


def test_study_rows_and_effects(study):
  result, _ = study
  rows = {(r["backend"], r["label_mode"], r["strategy"], r["shots"], r["perturbation"]): r for r in result.rows}
  # 2 backends x 3 label modes x (1 zero-shot + 4 strategies x 2 shot counts x 3 perturbations)
  assert len(result.rows) == 2 * 3 * (1 + 4 * 2 * 3)
  assert rows[("big", "original", "none", 0, "none")]["accuracy"] == 1.0  # the colour is visible
  assert rows[("big", "flipped", "none", 0, "none")]["accuracy"] == 0.0  # prior contradicts the flipped task
  assert rows[("big", "arbitrary", "none", 0, "none")]["unparsed"] == 1.0
  # image similarity finds same-colour demonstrations, so the in-context learner follows flipped labels
  for mode in ("flipped", "arbitrary"):
    assert rows[("big", mode, "image", 4, "none")]["accuracy"] == 1.0
    assert rows[("small", mode, "image", 4, "none")]["accuracy"] == 0.0
    assert rows[("big", mode, "image", 4, "none")]["accuracy"] >= rows[("big", mode, "text", 4, "none")]["accuracy"]
  # mixed-label demonstrations with their images permuted mislead the image-driven learner; corrupted text,
  # which it ignores, changes nothing
  for mode in LABEL_MODES:
    key = ("big", mode, "random", 4)
    assert rows[(*key, "wrong_image")]["accuracy"] < rows[(*key, "none")]["accuracy"]
    assert rows[(*key, "corrupted_text")]["accuracy"] == rows[(*key, "none")]["accuracy"]
  r = rows[("big", "flipped", "random", 4, "none")]
  assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] and r["n"] == 9


def test_study_outputs(study):
  result, out = study
  saved = json.loads((out / "results.json").read_text())
  assert len(saved["rows"]) == len(result.rows) and saved["meta"]["n_queries"] == 9
  table = (out / "table.md").read_text()
  assert "| big | flipped | image | 4 | none | 9 | 1.000 |" in table
  for name in ("icl_shots.png", "icl_perturbations.png", "icl_model_size.png"):
    with Image.open(out / name) as im:
      assert im.size[0] > 200
  assert set(result.files) == {"results", "table", "plot_shots", "plot_perturbations", "plot_model_size"}


def test_icl_command_on_mcqa_files(tmp_path, capsys):
  from mlx_med.vlm import mcqa
  rows = []
  colours = ["red", "green", "blue"]
  for i in range(9):
    c = colours[i % 3]
    Image.fromarray(np.full((8, 8, 3), icl.COLOURS[c], np.uint8)).save(tmp_path / f"{i}.png")
    rows.append({"id": f"dev_Art_{i}", "question": "<image 1> Which colour?", "options": str(colours),
                 "answer": "ABC"[i % 3], "image_1": {"bytes": None, "path": f"{i}.png"}})
  (tmp_path / "mmmu.json").write_text(json.dumps(rows))
  assert len(mcqa.load_mcqa("mmmu", tmp_path / "mmmu.json")) == 9
  result = icl.icl_command(["big@7e9"], f"mmmu:{tmp_path / 'mmmu.json'}", strategies=["image"], shots=[0, 2],
                           perturbations=["none"], label_modes=["original"], n_queries=3, out=str(tmp_path / "o"),
                           clients={"big": CopyClient()})
  assert [r["shots"] for r in result.rows] == [0, 2]
  assert result.rows[1]["accuracy"] == 1.0  # same-colour demonstrations carry the right letter
  assert "| big | original | image | 2 | none | 3 | 1.000 |" in capsys.readouterr().out
  with pytest.raises(ValueError, match="must be FORMAT:PATH"):
    icl.icl_command(["x"], "nope", clients={"x": CopyClient()})


def test_shared_encoder_similarities_from_a_clip_directory(tmp_path):
  """`--embedder DIR`: the similarities come from the shared towers of a HF CLIP directory, equal to the
  cosines of `Embedder`'s own embeddings, and drive image/text selection."""
  from tiny_clip import tiny_clip_dir

  from mlx_med.embed.model import Embedder

  tiny_clip_dir(tmp_path)
  emb = icl.embedder_embeddings(str(tmp_path))
  task = icl.synthetic_task(6, 2, image_size=32, seed=0)
  pool_images = [ex.images[0] for ex in task.pool]
  pool_texts = [ex.text for ex in task.pool]
  got_img = emb.embed_images(pool_images)
  got_txt = emb.embed_texts(pool_texts)
  ref = Embedder.load(str(tmp_path))
  np.testing.assert_allclose(got_img, ref.embed_images(pool_images), atol=1e-6)
  np.testing.assert_allclose(got_txt, ref.embed_texts(pool_texts), atol=1e-6)
  query = task.queries[0]
  image_sim = icl.cosine(emb.embed_images([query.images[0]]), got_img)[0]
  picked = icl.select_demonstrations("image", 2, image_sim=image_sim)
  assert picked == [int(i) for i in np.argsort(-image_sim, kind="stable")[:2]]
