"""The V*-style synthetic set and the V* bench folder layout (mlx_med.vlm.vstar)."""

import collections
import json

import numpy as np
import pytest
from PIL import Image

from mlx_med.vlm import vstar


@pytest.fixture(scope="module")
def examples():
  return vstar.synth_vstar(24, image_size=256, seed=3)


def test_synth_is_deterministic_and_prefix_stable(examples):
  again = vstar.synth_vstar(6, image_size=256, seed=3)
  for a, b in zip(examples[:6], again):
    assert a.id == b.id and a.question == b.question and a.options == b.options and a.answer == b.answer
    assert a.boxes == b.boxes
    np.testing.assert_array_equal(a.image, b.image)
  other = vstar.synth_vstar(6, image_size=256, seed=4)
  assert any(not np.array_equal(a.image, b.image) for a, b in zip(again, other))


def test_synth_questions_answers_and_balance(examples):
  kinds = collections.Counter(e.kind for e in examples)
  assert kinds == {"color": 8, "shape": 8, "position": 8}
  letters = collections.Counter(e.answer for e in examples)
  assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1
  for e in examples:
    assert e.image.shape == (256, 256, 3) and e.image.dtype == np.uint8
    assert len(e.options) == 4 and len(set(e.options)) == 4
    if e.kind == "color":
      assert e.question.startswith("What is the color of the ") and e.answer_text in vstar.COLORS
      assert e.category == "direct_attributes" and len(e.boxes) == 1
    elif e.kind == "shape":
      assert e.question.startswith("What is the shape of the ") and e.answer_text in vstar.SHAPES
      assert len(e.boxes) == 1
    else:
      assert e.category == "relative_position" and len(e.boxes) == 2
      assert vstar._position_of(e.boxes[0], e.boxes[1]) == e.answer_text
  # answer values cycle: every colour is the answer of some colour question
  assert {e.answer_text for e in examples if e.kind == "color"} == set(vstar.COLORS)


def test_target_is_small_and_drawn_in_its_colour(examples):
  for e in examples:
    x0, y0, x1, y1 = e.boxes[0]
    assert 12 <= x1 - x0 <= 24 and 12 <= y1 - y0 <= 24  # lost at 64 px: 3-6 px at 256
    patch = e.image[y0:y1, x0:x1].reshape(-1, 3).astype(int)
    if e.kind == "color":
      want = np.array(vstar.COLORS[e.answer_text])
      # the shape fills the middle of its box: the centre pixel is exactly the target colour
      centre = e.image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
      assert np.abs(centre - want).max() <= 1
      assert (np.abs(patch - want).max(-1) <= 1).mean() > 0.25


def test_folder_round_trip_png(tmp_path, examples):
  root = vstar.write_vstar_folder(examples, tmp_path / "vstar", image_format="png")
  assert sorted(p.name for p in root.iterdir()) == ["direct_attributes", "relative_position"]
  one = examples[2]
  record = json.loads((root / one.category / f"{one.id}.json").read_text())
  assert record["options"][0] == one.answer_text  # the official layout: the correct option first
  x0, y0, x1, y1 = one.boxes[0]
  assert record["bbox"][0] == [x0, y0, x1 - x0, y1 - y0]
  assert set(record) >= {"target_object", "bbox", "question", "options"}
  back = {e.id: e for e in vstar.read_vstar_folder(root)}
  assert len(back) == len(examples)
  for e in examples:
    r = back[e.id]
    assert (r.question, r.options, r.answer, r.boxes, r.category, r.kind) == \
        (e.question, e.options, e.answer, e.boxes, e.category, e.kind)
    np.testing.assert_array_equal(r.image, e.image)


def test_folder_round_trip_jpg_and_lazy(tmp_path, examples):
  root = vstar.write_vstar_folder(examples[:3], tmp_path / "v", image_format="jpg")
  lazy = vstar.read_vstar_folder(root, load_images=False)
  assert all(e.image is None and e.image_path.endswith(".jpg") for e in lazy)
  byid = {e.id: e for e in examples}
  for e in lazy:
    # JPEG (quality 95, 4:2:0 chroma) drops the background's per-pixel noise (sigma 6): compare 8x8 block
    # means, where the noise averages out and only the compression's bias is left
    blocks = lambda im: im.astype(float).reshape(32, 8, 32, 8, 3).mean((1, 3))
    assert np.abs(blocks(e.load_image()) - blocks(byid[e.id].image)).mean() < 1.5


def test_official_file_without_option_order(tmp_path):
  """A file as V* bench ships it: the correct option first, shown under a stem-seeded permutation."""
  folder = tmp_path / "relative_position"
  folder.mkdir()
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(folder / "sa_1234.jpg")
  (folder / "sa_1234.json").write_text(json.dumps({
      "target_object": ["cup", "dog"], "bbox": [[1.5, 2, 10, 5], [30, 4, 8, 8]],
      "question": "Is the cup on the left or right side of the dog?",
      "options": ["The cup is on the left side of the dog.", "The cup is on the right side of the dog."]}))
  [ex] = vstar.read_vstar_folder(tmp_path)
  order = vstar.display_order("sa_1234", 2)
  assert ex.options == [["The cup is on the left side of the dog.", "The cup is on the right side of the dog."][k]
                        for k in order]
  assert ex.answer_text == "The cup is on the left side of the dog." and ex.category == "relative_position"
  assert ex.boxes == [(1, 2, 12, 7), (30, 4, 38, 12)] and ex.target_object == ["cup", "dog"]
  assert vstar.read_vstar_folder(tmp_path)[0].answer == ex.answer  # deterministic


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"question": "q?"}), "missing key(s) ['options']"),
    (json.dumps({"question": "q?", "options": ["only one"]}), "'options' must be a list"),
    (json.dumps({"question": "q?", "options": ["a", "b"], "target_object": ["x", "y"], "bbox": [[0, 0, 2, 2]]}),
     "2 target_object names but 1 bbox"),
    (json.dumps({"question": "q?", "options": ["a", "b"], "target_object": ["x"], "bbox": [[0, 0, -2, 2]]}),
     "is not [x, y, w, h]"),
    (json.dumps({"question": "q?", "options": ["a", "b"], "option_order": [0, 0]}), "not a permutation"),
])
def test_malformed_annotation_is_one_line_error_naming_the_file(tmp_path, content, message):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x1.jpg")
  (tmp_path / "x1.json").write_text(content)
  with pytest.raises(ValueError) as err:
    vstar.read_vstar_folder(tmp_path)
  text = str(err.value)
  assert message in text and "x1.json" in text and "\n" not in text


def test_missing_image_empty_folder_and_bad_image(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    vstar.read_vstar_folder(tmp_path / "nope")
  with pytest.raises(ValueError, match="no <stem>.json annotations"):
    vstar.read_vstar_folder(tmp_path)
  (tmp_path / "a.json").write_text(json.dumps({"question": "q?", "options": ["a", "b"]}))
  with pytest.raises(ValueError, match=r"a\.json: no image with the same stem"):
    vstar.read_vstar_folder(tmp_path)
  (tmp_path / "a.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match=r"a\.png: not a readable image"):
    vstar.read_vstar_folder(tmp_path)


def test_bad_synth_arguments():
  with pytest.raises(ValueError, match="image_size"):
    vstar.synth_vstar(1, image_size=32)
  with pytest.raises(ValueError, match="question kind"):
    vstar.synth_vstar(1, kinds=("count",))
