"""A V*-style synthetic benchmark, and V* bench's folder layout.

V* bench asks multiple-choice questions about small objects in large, crowded images: the
colour of an object, or where one object is relative to another. A VLM that sees the image
downsampled to its input size (336 px for LLaVA-1.5; 64 px for the project's small VLM) has
lost the object, which is what crop and token selection (SemCLIP, `mlx_med.vlm.semclip`) are
meant to recover. `synth_vstar` makes such a set on the fly, deterministically per seed:

* a large image (default 512 px) with a textured background (low-frequency colour noise plus
  pixel noise and grey clutter strokes) and several distractor objects (coloured shapes);
* one SMALL target object (12-24 px by default: 1.5-3 px after downsampling to 64 px), or two
  for the relative-position kind;
* a question of one of three kinds, phrased like V*'s:
    color     "What is the color of the triangle?"          (the only triangle in the image)
    shape     "What is the shape of the red object?"        (the only red object)
    position  "Is the red circle on the left, on the right, above or below the blue square?"
              (A and B unique by colour+shape; their offset is dominant along one axis)
  with 4 options. Answers are balanced: the correct value cycles over the vocabulary and the
  correct letter over A-D (each exactly equally often in every 12 examples), so a constant guess
  scores 25%.
* `boxes`: the pixel boxes (x0, y0, x1, y1), x1/y1 exclusive, of the objects the question is
  about (target first).

Example i depends only on (seed, i): `synth_vstar(10)` is the first ten of `synth_vstar(100)`.

V* bench's layout (the official release, read for the field names): one folder per category
(`direct_attributes/`, `relative_position/`), each image `<stem>.jpg` beside `<stem>.json` with
"target_object" (list of names), "bbox" (list of [x, y, w, h] in pixels, one per target),
"question" and "options", where `options[0]` is the correct answer (the official evaluation
counts a prediction correct when it picks option 0). Mapping to `VStarExample`:

* category = the sub-folder (a flat folder reads as category "" );
* boxes = [(x, y, x + w, y + h)] per bbox;
* options are shown in a deterministic shuffle so the correct answer is not always "A": the
  permutation is `option_order` when the JSON carries it (our writer's extra key: display
  option j is `options[option_order[j]]`; official readers ignore unknown keys), otherwise a
  permutation drawn from a generator seeded by crc32(stem); answer = the letter of options[0].
* `write_vstar_folder` writes the correct option first and the display order in
  `option_order`, so reading back gives the same letters (a round trip is exact for PNG
  images, within JPEG's rounding for .jpg).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)

LETTERS = "ABCDEFGH"
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35), "green": (30, 175, 60), "blue": (35, 70, 230), "yellow": (245, 220, 30),
    "purple": (150, 45, 190), "orange": (250, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS = ("on the left", "on the right", "above", "below")
KINDS = ("color", "shape", "position")
CATEGORY = {"color": "direct_attributes", "shape": "direct_attributes", "position": "relative_position"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass
class VStarExample:
  """One multiple-choice question about an image.

  image: uint8 [H, W, 3] (or None when read with `load_images=False`; then `image_path`).
  options: the choices in display order; answer: the letter of the correct one.
  boxes: pixel boxes (x0, y0, x1, y1) of the objects the question is about, target first.
  category: V*'s category ("direct_attributes" | "relative_position", or the folder name).
  kind: the synthetic question kind ("color" | "shape" | "position"; "" for read files).
  target_object: the names of the boxed objects.
  """

  image: np.ndarray | None
  question: str
  options: list[str]
  answer: str
  boxes: list[Box]
  category: str
  id: str
  kind: str = ""
  target_object: list[str] = dataclasses.field(default_factory=list)
  image_path: str | None = None

  @property
  def answer_index(self) -> int:
    return LETTERS.index(self.answer)

  @property
  def answer_text(self) -> str:
    return self.options[self.answer_index]

  def load_image(self) -> np.ndarray:
    """The image (read from `image_path` when it was not loaded)."""
    if self.image is not None:
      return self.image
    if not self.image_path:
      raise ValueError(f"example {self.id}: no image and no image_path")
    return _read_image(Path(self.image_path))

  def prompt(self) -> str:
    """The question with lettered options, as a VLM is asked it."""
    lines = [self.question] + [f"{LETTERS[j]}. {o}" for j, o in enumerate(self.options)]
    return "\n".join(lines + ["Answer with the option's letter from the given choices directly."])


# ----------------------------------------------------------------------------- synthesis


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Textured, muted background: bilinear-upsampled colour noise at two scales plus pixel noise."""
  from PIL import Image

  out = np.zeros((size, size, 3), np.float32)
  for cells, amp in ((4, 40.0), (16, 18.0)):
    grid = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
    grid = (grid * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    up = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32)
    out += (up - 127.5) / 127.5 * amp
  base = rng.uniform(95, 150, 3).astype(np.float32)
  grey = out.mean(-1, keepdims=True)
  out = base + 0.35 * out + 0.65 * grey  # mostly luminance texture: colours stay muted
  out += rng.normal(0, 6, out.shape)
  return out.clip(0, 255).astype(np.uint8)


def _draw_shape(draw, shape: str, box: Box, fill) -> None:
  x0, y0, x1, y1 = box
  w, h = x1 - x0 - 1, y1 - y0 - 1
  cx, cy = x0 + w / 2, y0 + h / 2
  if shape == "circle":
    draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
  elif shape == "square":
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, y0), (x0 + w, y0 + h), (x0, y0 + h)], fill=fill)
  elif shape == "diamond":
    draw.polygon([(cx, y0), (x0 + w, cy), (cx, y0 + h), (x0, cy)], fill=fill)
  elif shape == "cross":
    t = max(w, h) / 3
    draw.rectangle([cx - t / 2, y0, cx + t / 2, y0 + h], fill=fill)
    draw.rectangle([x0, cy - t / 2, x0 + w, cy + t / 2], fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _overlaps(box: Box, others: Sequence[Box], gap: int) -> bool:
  x0, y0, x1, y1 = box
  return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in others)


def _place(rng, size: int, side: int, taken: list[Box], gap: int = 6, tries: int = 500) -> Box | None:
  for _ in range(tries):
    x, y = (int(v) for v in rng.integers(4, size - side - 4, 2))
    box = (x, y, x + side, y + side)
    if not _overlaps(box, taken, gap):
      return box
  return None


def _position_of(a: Box, b: Box) -> str:
  dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
  dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
  if abs(dx) >= abs(dy):
    return POSITIONS[0] if dx < 0 else POSITIONS[1]
  return POSITIONS[2] if dy < 0 else POSITIONS[3]


def _synth_one(seed: int, i: int, image_size: int, target_size: tuple[int, int], distractor_size: tuple[int, int],
               num_distractors: tuple[int, int], kinds: Sequence[str]) -> VStarExample:
  from PIL import Image, ImageDraw

  rng = np.random.default_rng([int(seed), int(i)])
  kind = kinds[i % len(kinds)]
  j = i // len(kinds)  # index within the kind: answers cycle over values and letters
  colors, shapes = list(COLORS), list(SHAPES)
  image = _background(rng, image_size)
  pil = Image.fromarray(image)
  draw = ImageDraw.Draw(pil)
  # grey clutter strokes (not objects: no colour from the palette)
  for _ in range(int(rng.integers(6, 14))):
    x0, y0 = rng.integers(0, image_size, 2)
    x1, y1 = np.clip(np.array([x0, y0]) + rng.integers(-90, 90, 2), 0, image_size - 1)
    g = int(rng.integers(60, 200))
    draw.line([int(x0), int(y0), int(x1), int(y1)], fill=(g, g, g), width=int(rng.integers(1, 4)))

  tmin, tmax = target_size
  taken: list[Box] = []
  objects: list[tuple[str, str]] = []  # (color, shape) of the boxed objects
  if kind == "color":
    answer = colors[j % len(colors)]
    shape = shapes[int(rng.integers(len(shapes)))]
    objects = [(answer, shape)]
    question = f"What is the color of the {shape}?"
    vocab, names = colors, [shape]
  elif kind == "shape":
    answer = shapes[j % len(shapes)]
    color = colors[int(rng.integers(len(colors)))]
    objects = [(color, answer)]
    question = f"What is the shape of the {color} object?"
    vocab, names = shapes, [f"{color} object"]
  elif kind == "position":
    answer = POSITIONS[j % len(POSITIONS)]
    ca, cb = rng.choice(len(colors), 2, replace=False)
    objects = [(colors[ca], shapes[int(rng.integers(len(shapes)))]), (colors[cb], shapes[int(rng.integers(len(shapes)))])]
    question = (f"Is the {objects[0][0]} {objects[0][1]} on the left, on the right, above or below the "
                f"{objects[1][0]} {objects[1][1]}?")
    vocab, names = list(POSITIONS), [f"{c} {s}" for c, s in objects]
  else:
    raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")

  boxes: list[Box] = []
  for attempt in range(200):
    taken = []
    side = int(rng.integers(tmin, tmax + 1))
    first = _place(rng, image_size, side, taken, gap=8)
    if first is None:
      continue
    boxes = [first]
    if kind == "position":
      side_b = int(rng.integers(tmin, tmax + 1))
      # B offset from A along the answer's axis, the other axis within a third of it
      dist = int(rng.integers(max(40, image_size // 10), max(41, image_size // 3)))
      off = int(rng.integers(-dist // 3, dist // 3 + 1))
      ax, ay = (first[0] + first[2]) // 2, (first[1] + first[3]) // 2
      # the answer is where A is relative to B: B is placed on the opposite side of A
      dx, dy = {"on the left": (dist, off), "on the right": (-dist, off), "above": (off, dist),
                "below": (off, -dist)}[answer]
      bx, by = ax + dx - side_b // 2, ay + dy - side_b // 2
      second = (bx, by, bx + side_b, by + side_b)
      if bx < 4 or by < 4 or second[2] > image_size - 4 or second[3] > image_size - 4 or _overlaps(second, [first], 8):
        continue
      if _position_of(first, second) != answer:
        continue
      boxes.append(second)
    break
  else:
    raise RuntimeError(f"could not place the targets of example {i} in a {image_size} px image; "
                       "raise image_size or lower target_size")
  taken = list(boxes)
  # distractors: never the same shape as a colour question's target, never the colour of a shape
  # question's target, never the colour+shape of a position question's objects
  n_dis = int(rng.integers(num_distractors[0], num_distractors[1] + 1))
  dmin, dmax = distractor_size
  for _ in range(n_dis):
    for _ in range(50):
      c = colors[int(rng.integers(len(colors)))]
      s = shapes[int(rng.integers(len(shapes)))]
      if kind == "color" and s == objects[0][1]:
        continue
      if kind == "shape" and c == objects[0][0]:
        continue
      if kind == "position" and (c, s) in objects:
        continue
      break
    box = _place(rng, image_size, int(rng.integers(dmin, dmax + 1)), taken, gap=6, tries=100)
    if box is None:
      continue
    taken.append(box)
    _draw_shape(draw, s, box, COLORS[c])
  for (c, s), box in zip(objects, boxes):
    _draw_shape(draw, s, box, COLORS[c])

  others = [v for v in vocab if v != answer]
  distractors = [others[k] for k in rng.permutation(len(others))[:3]]
  # balanced letters: each block of 12 examples holds every letter 3 times (every kind's 4 in a row
  # cover A-D), shifted by one per block so a letter is not locked to an answer value
  slot = (i + i // 12) % 4
  options = distractors[:slot] + [answer] + distractors[slot:]
  return VStarExample(image=np.asarray(pil, np.uint8), question=question, options=options, answer=LETTERS[slot],
                      boxes=[tuple(int(v) for v in b) for b in boxes], category=CATEGORY[kind],
                      id=f"synth{int(seed)}_{i:05d}", kind=kind, target_object=names)


def synth_vstar(n: int, *, image_size: int = 512, seed: int = 0, target_size: tuple[int, int] = (12, 24),
                distractor_size: tuple[int, int] = (14, 40), num_distractors: tuple[int, int] = (6, 12),
                kinds: Sequence[str] = KINDS) -> list[VStarExample]:
  """`n` synthetic V*-style questions (see the module docstring); example i depends on (seed, i) only."""
  if n < 0:
    raise ValueError(f"n={n} must be >= 0")
  if image_size < 96:
    raise ValueError(f"image_size={image_size} is too small for a crowded scene; use >= 96 (default 512)")
  if not 4 <= target_size[0] <= target_size[1]:
    raise ValueError(f"target_size={target_size} must be (min, max) with 4 <= min <= max")
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f"unknown question kind {k!r}; choose from {KINDS}")
  return [_synth_one(seed, i, image_size, tuple(target_size), tuple(distractor_size), tuple(num_distractors),
                     tuple(kinds)) for i in range(n)]


# ----------------------------------------------------------------------------- V* folder


def display_order(stem: str, n: int) -> list[int]:
  """The deterministic option permutation of a file without `option_order` (seeded by crc32(stem))."""
  rng = np.random.default_rng(zlib.crc32(stem.encode("utf-8")))
  return [int(k) for k in rng.permutation(n)]


def _write_atomic(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_vstar_folder(examples: Sequence[VStarExample], directory: str | os.PathLike, *,
                       image_format: str = "jpg", quality: int = 95) -> Path:
  """Writes V* bench's layout: <dir>/<category>/<id>.<jpg|png> + <id>.json (correct option first).

  `image_format` "png" keeps pixels exact. Returns the directory.
  """
  import io

  from PIL import Image

  fmt = image_format.lower().lstrip(".")
  if fmt not in ("jpg", "jpeg", "png"):
    raise ValueError(f"image_format={image_format!r}: choose jpg or png")
  root = Path(directory)
  for ex in examples:
    if ex.answer not in LETTERS[:len(ex.options)]:
      raise ValueError(f"example {ex.id}: answer {ex.answer!r} is not one of the {len(ex.options)} option letters")
    folder = root / (ex.category or "")
    folder.mkdir(parents=True, exist_ok=True)
    a = ex.answer_index
    order_file = [a] + [k for k in range(len(ex.options)) if k != a]  # file index -> display index
    options_file = [ex.options[k] for k in order_file]
    option_order = [order_file.index(d) for d in range(len(ex.options))]  # display j -> file index
    names = list(ex.target_object) or [f"object {k + 1}" for k in range(len(ex.boxes))]
    record = {"target_object": names, "bbox": [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in ex.boxes],
              "question": ex.question, "options": options_file, "option_order": option_order}
    if ex.kind:
      record["kind"] = ex.kind
    buf = io.BytesIO()
    image = Image.fromarray(np.asarray(ex.load_image(), np.uint8))
    if fmt == "png":
      image.save(buf, format="PNG")
    else:
      image.save(buf, format="JPEG", quality=int(quality))
    suffix = ".png" if fmt == "png" else ".jpg"
    _write_atomic(folder / f"{ex.id}{suffix}", buf.getvalue())
    _write_atomic(folder / f"{ex.id}.json", (json.dumps(record, indent=2) + "\n").encode("utf-8"))
  return root


def _read_image(path: Path) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"{path}: not a readable image ({e.__class__.__name__}); replace or remove it") from None


def _parse_record(path: Path, image_path: Path, category: str, load_image: bool) -> VStarExample:
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                     "fix the file or remove it with its image") from None
  if not isinstance(record, dict):
    raise ValueError(f"{path}: expected a JSON object with question, options, target_object, bbox; "
                     f"got {type(record).__name__}")
  missing = [k for k in ("question", "options") if k not in record]
  if missing:
    raise ValueError(f"{path}: missing key(s) {missing}; a V* annotation has question, options (correct first), "
                     "target_object and bbox")
  question, options = record["question"], record["options"]
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"{path}: 'question' must be a non-empty string")
  if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
      or not all(isinstance(o, str) and o.strip() for o in options)):
    raise ValueError(f"{path}: 'options' must be a list of 2-{len(LETTERS)} non-empty strings, the correct one "
                     "first")
  names = record.get("target_object", [])
  if isinstance(names, str):
    names = [names]
  bboxes = record.get("bbox", [])
  if bboxes and isinstance(bboxes[0], (int, float)):
    bboxes = [bboxes]  # a single [x, y, w, h]
  if not isinstance(names, list) or not isinstance(bboxes, list):
    raise ValueError(f"{path}: 'target_object' must be a list of names and 'bbox' a list of [x, y, w, h]")
  if names and bboxes and len(names) != len(bboxes):
    raise ValueError(f"{path}: {len(names)} target_object names but {len(bboxes)} bbox entries; give one "
                     "[x, y, w, h] per target")
  boxes: list[Box] = []
  for k, b in enumerate(bboxes):
    if (not isinstance(b, list) or len(b) != 4 or not all(isinstance(v, (int, float)) for v in b)
        or b[2] <= 0 or b[3] <= 0):
      raise ValueError(f"{path}: bbox[{k}]={b!r} is not [x, y, w, h] with positive width and height")
    x, y, w, h = (float(v) for v in b)
    boxes.append((int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)), int(np.ceil(y + h))))
  n = len(options)
  order = record.get("option_order")
  if order is None:
    order = display_order(path.stem, n)
  elif not (isinstance(order, list) and all(isinstance(k, int) for k in order) and sorted(order) == list(range(n))):
    raise ValueError(f"{path}: 'option_order'={order!r} is not a permutation of 0..{n - 1}; fix or delete it")
  shown = [options[k] for k in order]
  answer = LETTERS[order.index(0)]
  image = _read_image(image_path) if load_image else None
  return VStarExample(image=image, question=question, options=shown, answer=answer, boxes=boxes, category=category,
                      id=path.stem, kind=str(record.get("kind", "")), target_object=[str(x) for x in names],
                      image_path=str(image_path))


def read_vstar_folder(directory: str | os.PathLike, *, load_images: bool = True) -> list[VStarExample]:
  """Reads a V* bench folder: category sub-folders (or one flat folder) of image + same-stem .json.

  Sorted by (category, stem). With `load_images=False` images stay on disk (`example.load_image()`).
  """
  root = Path(directory)
  if not root.is_dir():
    raise ValueError(f"{root}: not a directory; pass a V* bench folder (direct_attributes/, relative_position/ "
                     "with <stem>.jpg + <stem>.json)")
  folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
  out: list[VStarExample] = []
  for folder in folders:
    category = "" if folder == root else folder.name
    for js in sorted(folder.glob("*.json")):
      images = [js.with_suffix(s) for s in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES)]
      image = next((p for p in images if p.is_file()), None)
      if image is None:
        raise ValueError(f"{js}: no image with the same stem ({', '.join(IMAGE_SUFFIXES)}); add {js.stem}.jpg or "
                         "remove the annotation")
      out.append(_parse_record(js, image, category, load_images))
  if not out:
    raise ValueError(f"{root}: no <stem>.json annotations found (V* layout: <category>/<stem>.jpg + <stem>.json)")
  return out
