"""The multimodal in-context-learning study: which demonstrations, which modality, which labels.

Following "multimodal ICL" analyses (how image-text demonstrations drive a VLM's in-context
learning), one run crosses, for every backend (any `mlx_med.llm.client.LLMClient`: a local VLM,
`mlx-med serve`, an OpenAI-compatible endpoint; several model sizes in one run):

* demonstration selection — "random" (seeded), "text" (cosine similarity of the query's text
  embedding to each pool example's), "image" (the same on image embeddings), "both" (the mean
  of the two cosines). The k best are kept; ties go to the earlier pool example. In the prompt
  the demonstrations run from least to most similar, so the closest one sits next to the query.
  Embeddings come from an `Embeddings` pair of functions: by default training-free features
  (`feature_embeddings`: a colour histogram and thumbnail per image, hashed bag of words per text), or
  the shared two-tower encoders of a trained `mlx-med embed` run or a Hugging Face CLIP/SigLIP
  directory (`embedder_embeddings`, via `mlx_med.embed.model.Embedder`).
* modality perturbation of the demonstrations (the query is never touched) — "none",
  "wrong_image" (the demonstrations' images permuted among themselves so none keeps its own;
  with one demonstration its image is swapped for that of a pool example with another label),
  "corrupted_text" (each demonstration's words replaced by random letter strings of the same
  lengths, or shuffled with `text_corruption="shuffle"`).
* labels — "original", "flipped" (every label mapped to the next one in the task's label list,
  for demonstrations and ground truth alike: a binary task swaps its labels), "arbitrary" (labels
  renamed to meaningless words, ARBITRARY_WORDS). Flipped and arbitrary labels can only be
  learned from the demonstrations, which tests the inductive bias the model picks up in context.
* shots, e.g. (0, 1, 2, 4); zero shots is one condition per backend and label mode (strategy and
  perturbation "none").

Tasks: `synthetic_task` (default) draws small images of a coloured shape; the label is the
shape's colour, which only the image shows, while the text describes the shape and where it
sits — so image similarity finds same-label demonstrations and text similarity does not.
`mcqa_task` turns local MCQA files (`mlx_med.vlm.mcqa.load_mcqa`) into a task whose labels are
the option letters.

Outputs (`run_icl_study` with out_dir; all written atomically): results.json (one row per
backend x label mode x strategy x shots x perturbation: n, correct, accuracy, 95% Wilson
interval, unparsed rate), table.md, and PNGs: accuracy against shots per strategy
(icl_shots.png), per perturbation (icl_perturbations.png), and against model size
(icl_model_size.png).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

STRATEGIES = ("random", "text", "image", "both")
PERTURBATIONS = ("none", "wrong_image", "corrupted_text")
LABEL_MODES = ("original", "flipped", "arbitrary")
ARBITRARY_WORDS = ("dax", "wug", "blicket", "toma", "fep", "zorp", "kiki", "bouba", "lorp", "mib")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180)}
_WORD_RE = re.compile(r"\S+")


@dataclasses.dataclass
class ICLExample:
  """One example: its images (uint8 arrays or paths), its text and its label."""

  id: str
  images: list[Any]
  text: str
  label: str
  meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ICLTask:
  """Demonstrations are drawn from `pool`; `queries` are asked. `labels` in canonical order."""

  name: str
  pool: list[ICLExample]
  queries: list[ICLExample]
  labels: list[str]
  instruction: str = "Look at each image and its text, and answer with the label, one of: {labels}."
  text_field: str = "Text"

  def __post_init__(self) -> None:
    if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
      raise ValueError(f"task {self.name!r}: needs two or more distinct labels, got {self.labels}")
    for ex in [*self.pool, *self.queries]:
      if ex.label not in self.labels:
        raise ValueError(f"task {self.name!r}: example {ex.id!r} has label {ex.label!r}, not one of {self.labels}")
    if not self.queries:
      raise ValueError(f"task {self.name!r}: no queries")


class Embeddings(NamedTuple):
  """embed_images(list of images) -> [N, D]; embed_texts(list of str) -> [N, D']."""

  embed_images: Callable[[list[Any]], np.ndarray]
  embed_texts: Callable[[list[str]], np.ndarray]


# ---------------------------------------------------------------------------------------- tasks


def _draw(shape: str, colour: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
  from PIL import Image, ImageDraw
  base = rng.integers(215, 240)
  img = Image.new("RGB", (size, size), (int(base), int(base), int(base)))
  draw = ImageDraw.Draw(img)
  side = int(rng.integers(size // 3, size // 2 + 1))
  x0 = int(rng.integers(1, size - side - 1))
  y0 = int(rng.integers(1, size - side - 1))
  box = (x0, y0, x0 + side, y0 + side)
  fill = COLOURS[colour]
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
  cx, cy = x0 + side / 2, y0 + side / 2
  where = f"{'top' if cy < size / 2 else 'bottom'} {'left' if cx < size / 2 else 'right'}"
  return np.asarray(img), where


def synthetic_task(n_pool: int = 36, n_queries: int = 24, *, image_size: int = 32, seed: int = 0) -> ICLTask:
  """Coloured shapes; label = colour (only in the image); text = the shape and its place (see the module doc)."""
  if n_pool < 2 or n_queries < 1:
    raise ValueError(f"need n_pool >= 2 and n_queries >= 1, got {n_pool}, {n_queries}")
  if image_size < 12:
    raise ValueError(f"image_size must be >= 12, got {image_size}")
  rng = np.random.default_rng(seed)
  colours = list(COLOURS)
  out = []
  for i in range(n_pool + n_queries):
    colour = colours[i % len(colours)]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img, where = _draw(shape, colour, image_size, rng)
    out.append(ICLExample(f"syn-{i}", [img], f"a {shape} in the {where} of the picture", colour,
                          {"shape": shape, "colour": colour}))
  order = rng.permutation(len(out))
  out = [out[i] for i in order]
  return ICLTask("synthetic-colour", out[:n_pool], out[n_pool:], colours,
                 "Each picture shows a coloured shape. Answer with its label, one of: {labels}.", "Description")


def mcqa_task(items: Sequence[Any], *, n_queries: int | None = None, seed: int = 0, name: str = "mcqa") -> ICLTask:
  """Local MCQA items (`mlx_med.vlm.mcqa.MCQAItem`) as an ICL task: labels are option letters."""
  from mlx_med.rl.data import format_options
  items = list(items)
  if len(items) < 3:
    raise ValueError(f"an MCQA ICL task needs at least 3 items (pool and queries), got {len(items)}")
  n_opts = max(len(it.options) for it in items)
  labels = [chr(ord("A") + i) for i in range(n_opts)]
  exs = [ICLExample(it.id, list(it.images), f"{it.question.strip()}\n{format_options(it.option_map)}", it.answer,
                    {"subject": it.subject}) for it in items]
  order = np.random.default_rng(seed).permutation(len(exs))
  exs = [exs[i] for i in order]
  nq = n_queries if n_queries is not None else max(1, len(exs) // 3)
  if not 1 <= nq < len(exs) - 1:
    raise ValueError(f"n_queries={nq} must leave at least two items for the demonstration pool of {len(exs)}")
  return ICLTask(name, exs[nq:], exs[:nq], labels, "Answer each question with the letter of the correct option, "
                 "one of: {labels}.", "Question")


def label_mapping(labels: Sequence[str], mode: str) -> dict[str, str]:
  """original: identity; flipped: each label -> the next one (cyclic); arbitrary: -> ARBITRARY_WORDS."""
  labels = list(labels)
  if mode == "original":
    return {lab: lab for lab in labels}
  if mode == "flipped":
    return {lab: labels[(i + 1) % len(labels)] for i, lab in enumerate(labels)}
  if mode == "arbitrary":
    if len(labels) > len(ARBITRARY_WORDS):
      raise ValueError(f"arbitrary labels support up to {len(ARBITRARY_WORDS)} labels, got {len(labels)}")
    return {lab: ARBITRARY_WORDS[i] for i, lab in enumerate(labels)}
  raise ValueError(f"unknown label mode {mode!r}; choose one of {', '.join(LABEL_MODES)}")


def relabel(task: ICLTask, mode: str) -> ICLTask:
  """The task with every label (pool and queries) mapped by `label_mapping(task.labels, mode)`."""
  m = label_mapping(task.labels, mode)

  def swap(exs: list[ICLExample]) -> list[ICLExample]:
    return [dataclasses.replace(ex, label=m[ex.label], meta={**ex.meta, "original_label": ex.label}) for ex in exs]

  labels = task.labels if mode != "arbitrary" else [m[lab] for lab in task.labels]
  return dataclasses.replace(task, name=f"{task.name}/{mode}", pool=swap(task.pool), queries=swap(task.queries),
                             labels=labels)


# ----------------------------------------------------------------------------------- embeddings


def _load(image: Any) -> np.ndarray:
  if isinstance(image, (str, os.PathLike)):
    from PIL import Image
    with Image.open(image) as im:
      return np.asarray(im.convert("RGB"))
  return np.asarray(image)


def feature_embeddings(thumb: int = 4, bins: int = 4, text_dim: int = 512) -> Embeddings:
  """Training-free features. Image: the square root of its joint RGB histogram (bins^3, sums to 1: cosine
  = the Bhattacharyya coefficient of the colour distributions) beside a thumb x thumb colour thumbnail
  (layout), each part unit length, the thumbnail at half weight. Text: hashed bag of lower-case words."""
  from PIL import Image

  def images(imgs: list[Any]) -> np.ndarray:
    out = []
    for img in imgs:
      arr = _load(img)
      if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
      arr = arr.astype(np.uint8)[..., :3]
      q = (arr.reshape(-1, 3).astype(np.int64) * bins) // 256
      hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3).astype(np.float64)
      hist = np.sqrt(hist / hist.sum())
      small = np.asarray(Image.fromarray(arr).resize((thumb, thumb), Image.BILINEAR), np.float64).ravel() / 255 - 0.5
      small /= max(np.linalg.norm(small), 1e-12)
      out.append(np.concatenate([hist, 0.5 * small]).astype(np.float32))
    return np.stack(out) if out else np.zeros((0, bins ** 3 + thumb * thumb * 3), np.float32)

  def texts(txts: list[str]) -> np.ndarray:
    out = np.zeros((len(txts), text_dim), np.float32)
    for i, t in enumerate(txts):
      for w in re.findall(r"[a-z0-9]+", t.lower()):
        out[i, zlib.crc32(w.encode()) % text_dim] += 1.0
    return out

  return Embeddings(images, texts)


def embedder_embeddings(path: str | os.PathLike) -> Embeddings:
  """The shared two-tower encoders: an `mlx-med embed train` run or a HF CLIP/SigLIP directory."""
  from mlx_med.embed.model import Embedder
  emb = Embedder.load(path)
  return Embeddings(lambda imgs: emb.embed_images([_load(i) for i in imgs]), lambda txts: emb.embed_texts(list(txts)))


def cosine(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """[Q, D] x [K, D] -> [Q, K] cosine similarities (a zero vector has similarity 0)."""
  q = np.asarray(queries, np.float64)
  k = np.asarray(keys, np.float64)
  qn = np.linalg.norm(q, axis=-1, keepdims=True)
  kn = np.linalg.norm(k, axis=-1, keepdims=True)
  return (q / np.where(qn > 0, qn, 1.0)) @ (k / np.where(kn > 0, kn, 1.0)).T


# ------------------------------------------------------------------------------------ selection


def select_demonstrations(strategy: str, k: int, *, text_sim: np.ndarray | None = None,
                          image_sim: np.ndarray | None = None, pool_size: int | None = None,
                          rng: np.random.Generator | None = None) -> list[int]:
  """Pool indices of k demonstrations for one query, most similar first.

  text_sim / image_sim: the query's cosine to every pool example [P]. "both" ranks by their
  mean. Ties go to the lower index. "random" draws k distinct indices with `rng`.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
  size = pool_size if pool_size is not None else len(text_sim if text_sim is not None else image_sim)
  if not 0 <= k <= size:
    raise ValueError(f"cannot pick {k} demonstrations from a pool of {size}")
  if k == 0:
    return []
  if strategy == "random":
    if rng is None:
      raise ValueError("random selection needs an rng")
    return [int(i) for i in rng.choice(size, size=k, replace=False)]
  if strategy == "text":
    score = np.asarray(text_sim, np.float64)
  elif strategy == "image":
    score = np.asarray(image_sim, np.float64)
  else:
    score = (np.asarray(text_sim, np.float64) + np.asarray(image_sim, np.float64)) / 2.0
  order = sorted(range(size), key=lambda i: (-score[i], i))
  return order[:k]


# --------------------------------------------------------------------------------- perturbations


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
  while True:
    p = rng.permutation(n)
    if not np.any(p == np.arange(n)):
      return p


def corrupt_text(text: str, rng: np.random.Generator, mode: str = "replace") -> str:
  """"replace": every word -> a random lower-case string of its length; "shuffle": the words in a random order."""
  words = _WORD_RE.findall(text)
  if mode == "shuffle":
    if len(words) > 1:
      words = [words[i] for i in _derangement(len(words), rng)] if len(set(words)) > 1 else words
    return " ".join(words)
  if mode == "replace":
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, size=len(w))) for w in words)
  raise ValueError(f"unknown text corruption {mode!r}; use 'replace' or 'shuffle'")


def perturb(demos: list[ICLExample], perturbation: str, rng: np.random.Generator, *,
            pool: Sequence[ICLExample] = (), text_corruption: str = "replace") -> list[ICLExample]:
  """A perturbed copy of the demonstrations (see the module doc); labels and order are kept."""
  if perturbation == "none" or not demos:
    return list(demos)
  if perturbation == "wrong_image":
    if len(demos) == 1:
      others = [ex for ex in pool if ex.label != demos[0].label and ex.id != demos[0].id]
      if not others:
        raise ValueError("wrong_image with one demonstration needs a pool example with another label")
      donor = others[int(rng.integers(len(others)))]
      return [dataclasses.replace(demos[0], images=list(donor.images), meta={**demos[0].meta, "image_of": donor.id})]
    perm = _derangement(len(demos), rng)
    return [dataclasses.replace(d, images=list(demos[j].images), meta={**d.meta, "image_of": demos[j].id})
            for d, j in zip(demos, perm)]
  if perturbation == "corrupted_text":
    return [dataclasses.replace(d, text=corrupt_text(d.text, rng, text_corruption)) for d in demos]
  raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}")


# ------------------------------------------------------------------------------- prompt + parsing


def _image_part(image: Any) -> dict:
  from mlx_med.vlm.messages import image_part
  return image_part(image)


def build_messages(task: ICLTask, demos: Sequence[ICLExample], query: ICLExample) -> list[dict]:
  """One user turn: the instruction, each demonstration (images, text, "Answer: label"), then the query."""
  parts: list[dict] = [{"type": "text", "text": task.instruction.format(labels=", ".join(task.labels)) + "\n"}]
  for d in demos:
    parts.extend(_image_part(img) for img in d.images)
    parts.append({"type": "text", "text": f"{task.text_field}: {d.text}\nAnswer: {d.label}\n"})
  parts.extend(_image_part(img) for img in query.images)
  parts.append({"type": "text", "text": f"{task.text_field}: {query.text}\nAnswer:"})
  return [{"role": "user", "content": parts}]


def parse_label(text: str, labels: Sequence[str]) -> str | None:
  """The label a response gives: the first one named (whole word, any case) after any </think>.

  Single-letter labels (option letters) are read with `mlx_med.rl.functions.extract_choice`.
  None when no label is named.
  """
  close = text.rfind("</think>")
  region = text[close + len("</think>"):] if close >= 0 else text
  if all(len(lab) == 1 and lab.isupper() for lab in labels):
    from mlx_med.rl.functions import extract_choice
    return extract_choice(region, "".join(labels))
  best, where = None, len(region) + 1
  for lab in labels:
    m = re.search(rf"(?<![\w-]){re.escape(lab)}(?![\w-])", region, re.IGNORECASE)
    if m and m.start() < where:
      best, where = lab, m.start()
  return best


# ---------------------------------------------------------------------------------------- study


@dataclasses.dataclass
class ICLResult:
  rows: list[dict]
  table: str
  files: dict[str, str]


def _seed(*parts: Any) -> int:
  return zlib.crc32("|".join(map(str, parts)).encode())


def _ask(client: Any, messages: list[dict], max_tokens: int, seed: int) -> str:
  return client.chat(messages, max_tokens=max_tokens, temperature=0.0, n=1, seed=seed)[0].text


def run_icl_study(backends: Mapping[str, Any], task: ICLTask | None = None, *,
                  strategies: Sequence[str] = STRATEGIES, shots: Sequence[int] = (0, 1, 2, 4),
                  perturbations: Sequence[str] = PERTURBATIONS, label_modes: Sequence[str] = LABEL_MODES,
                  embeddings: Embeddings | None = None, sizes: Mapping[str, float] | None = None,
                  max_tokens: int = 16, seed: int = 0, text_corruption: str = "replace", concurrency: int = 1,
                  out_dir: str | os.PathLike | None = None,
                  progress: Callable[[str], None] | None = None) -> ICLResult:
  """Runs the grid (module doc) for every backend; returns rows, the markdown table and written files.

  backends: {name: LLMClient}; sizes: {name: parameter count} for the model-size plot (else the
  backends' order). embeddings: default `feature_embeddings()`.
  """
  from mlx_med.core.stats import wilson_interval
  if not backends:
    raise ValueError("no backends; give at least one {name: client}")
  for s in strategies:
    if s not in STRATEGIES:
      raise ValueError(f"unknown selection strategy {s!r}; choose from {', '.join(STRATEGIES)}")
  for p in perturbations:
    if p not in PERTURBATIONS:
      raise ValueError(f"unknown perturbation {p!r}; choose from {', '.join(PERTURBATIONS)}")
  for m in label_modes:
    label_mapping(["x", "y"], m)
  task = task if task is not None else synthetic_task(seed=seed)
  shots = sorted({int(k) for k in shots})
  if shots and (shots[0] < 0 or shots[-1] > len(task.pool)):
    raise ValueError(f"shots must be in [0, {len(task.pool)}] (the pool size), got {shots}")
  emb = embeddings or feature_embeddings()
  q_img = emb.embed_images([ex.images[0] for ex in task.queries])
  p_img = emb.embed_images([ex.images[0] for ex in task.pool])
  q_txt = emb.embed_texts([ex.text for ex in task.queries])
  p_txt = emb.embed_texts([ex.text for ex in task.pool])
  image_sim, text_sim = cosine(q_img, p_img), cosine(q_txt, p_txt)

  conditions: list[tuple[str, int, str]] = []
  for k in shots:
    if k == 0:
      conditions.append(("none", 0, "none"))
    else:
      conditions.extend((s, k, p) for s in strategies for p in perturbations)

  rows: list[dict] = []
  for mode in label_modes:
    t = relabel(task, mode)
    prompts: dict[tuple[str, int, str], list[list[dict]]] = {}
    for strategy, k, pert in conditions:
      convs = []
      for qi, query in enumerate(t.queries):
        rng = np.random.default_rng(_seed(seed, qi, k, strategy))
        picked = select_demonstrations(strategy, k, text_sim=text_sim[qi], image_sim=image_sim[qi],
                                       pool_size=len(t.pool), rng=rng) if k else []
        demos = [t.pool[i] for i in reversed(picked)]  # most similar next to the query
        demos = perturb(demos, pert, np.random.default_rng(_seed(seed, qi, k, strategy, pert)), pool=t.pool,
                        text_corruption=text_corruption)
        convs.append(build_messages(t, demos, query))
      prompts[(strategy, k, pert)] = convs
    for name, client in backends.items():
      for (strategy, k, pert), convs in prompts.items():
        def one(args: tuple[int, list[dict]], client: Any = client) -> str:
          return _ask(client, args[1], max_tokens, _seed(seed, args[0]))
        if concurrency > 1:
          from concurrent.futures import ThreadPoolExecutor
          with ThreadPoolExecutor(max_workers=concurrency) as pool:
            texts = list(pool.map(one, enumerate(convs)))
        else:
          texts = [one(a) for a in enumerate(convs)]
        preds = [parse_label(x, t.labels) for x in texts]
        correct = sum(p == q.label for p, q in zip(preds, t.queries))
        n = len(t.queries)
        lo, hi = wilson_interval(correct, n)
        rows.append({"backend": name, "size": None if sizes is None else sizes.get(name), "label_mode": mode,
                     "strategy": strategy, "shots": k, "perturbation": pert, "n": n, "correct": int(correct),
                     "accuracy": correct / n, "accuracy_ci": [lo, hi],
                     "unparsed": sum(p is None for p in preds) / n})
        if progress is not None:
          progress(f"{name} {mode} {strategy} k={k} {pert}: {correct}/{n}")
  table = format_table(rows)
  files: dict[str, str] = {}
  if out_dir is not None:
    files = write_outputs(rows, table, out_dir, meta={"task": task.name, "n_pool": len(task.pool),
                                                      "n_queries": len(task.queries), "labels": task.labels,
                                                      "seed": seed, "text_corruption": text_corruption})
  return ICLResult(rows, table, files)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: one line per backend x label mode x strategy x shots x perturbation."""
  lines = ["| backend | labels | strategy | shots | perturbation | n | accuracy | 95% CI | unparsed |",
           "|---|---|---|---:|---|---:|---:|---|---:|"]
  for r in rows:
    lo, hi = r["accuracy_ci"]
    lines.append(f"| {r['backend']} | {r['label_mode']} | {r['strategy']} | {r['shots']} | {r['perturbation']} | "
                 f"{r['n']} | {r['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['unparsed']:.3f} |")
  return "\n".join(lines) + "\n"


def _atomic_text(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def _save(fig: Any, path: Path) -> str:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  fig.savefig(tmp, format="png", dpi=100)
  os.replace(tmp, path)
  return str(path)


def write_outputs(rows: Sequence[Mapping[str, Any]], table: str, out_dir: str | os.PathLike, *,
                  meta: Mapping[str, Any] | None = None) -> dict[str, str]:
  """results.json, table.md and the three PNGs under out_dir; returns {kind: path}."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _atomic_text(out / "results.json", json.dumps({"meta": dict(meta or {}), "rows": list(rows)}, indent=2) + "\n")
  _atomic_text(out / "table.md", table)
  files = {"results": str(out / "results.json"), "table": str(out / "table.md")}
  files.update(plot_results(rows, out))
  return files


def plot_results(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> dict[str, str]:
  """icl_shots.png (accuracy vs shots per strategy, a panel per backend x label mode, no perturbation),
  icl_perturbations.png (bars per strategy x perturbation at the largest shot count),
  icl_model_size.png (accuracy vs model size per strategy at the largest shot count, no perturbation)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  out = Path(out_dir)
  backends = list(dict.fromkeys(r["backend"] for r in rows))
  modes = list(dict.fromkeys(r["label_mode"] for r in rows))
  strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
  perts = [p for p in PERTURBATIONS if any(r["perturbation"] == p and r["shots"] > 0 for r in rows)]
  kmax = max(r["shots"] for r in rows)
  files = {}

  def err(rs):
    e = [[r["accuracy"] - r["accuracy_ci"][0] for r in rs], [r["accuracy_ci"][1] - r["accuracy"] for r in rs]]
    return np.maximum(np.array(e), 0.0)  # the closed form's rounding can leave -1e-16 at 0 or 1

  fig = Figure(figsize=(4.2 * len(modes), 3.2 * len(backends)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(backends), len(modes), squeeze=False)
  for i, b in enumerate(backends):
    for j, m in enumerate(modes):
      ax = axes[i, j]
      zero = [r for r in rows if r["backend"] == b and r["label_mode"] == m and r["shots"] == 0]
      for s in strategies:
        rs = zero + sorted([r for r in rows if r["backend"] == b and r["label_mode"] == m and r["strategy"] == s
                            and r["perturbation"] == "none" and r["shots"] > 0], key=lambda r: r["shots"])
        if rs:
          ax.errorbar([r["shots"] for r in rs], [r["accuracy"] for r in rs], yerr=err(rs), marker="o", capsize=3,
                      label=s)
      ax.set_title(f"{b} / {m} labels", fontsize=9)
      ax.set_xlabel("shots")
      ax.set_ylabel("accuracy")
      ax.set_ylim(-0.02, 1.02)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  files["plot_shots"] = _save(fig, out / "icl_shots.png")

  if kmax > 0 and perts:
    fig = Figure(figsize=(4.2 * len(modes), 3.2 * len(backends)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(backends), len(modes), squeeze=False)
    width = 0.8 / len(perts)
    for i, b in enumerate(backends):
      for j, m in enumerate(modes):
        ax = axes[i, j]
        for pi, p in enumerate(perts):
          rs = [next((r for r in rows if r["backend"] == b and r["label_mode"] == m and r["strategy"] == s
                      and r["perturbation"] == p and r["shots"] == kmax), None) for s in strategies]
          xs = [si + pi * width for si, r in enumerate(rs) if r is not None]
          rs = [r for r in rs if r is not None]
          if rs:
            ax.bar(xs, [r["accuracy"] for r in rs], width, yerr=err(rs), capsize=2, label=p)
        ax.set_xticks([si + 0.4 - width / 2 for si in range(len(strategies))], strategies, fontsize=8)
        ax.set_title(f"{b} / {m} labels, {kmax} shots", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files["plot_perturbations"] = _save(fig, out / "icl_perturbations.png")

  fig = Figure(figsize=(4.2 * len(modes), 3.4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(modes), squeeze=False)[0]
  have_sizes = all(next(r["size"] for r in rows if r["backend"] == b) for b in backends)
  xpos = {b: (float(next(r["size"] for r in rows if r["backend"] == b)) if have_sizes else i)
          for i, b in enumerate(backends)}
  order = sorted(backends, key=lambda b: xpos[b])
  for ax, m in zip(axes, modes):
    for s in strategies if kmax > 0 else ["none"]:
      rs = [next((r for r in rows if r["backend"] == b and r["label_mode"] == m and r["strategy"] == s
                  and r["perturbation"] == "none" and r["shots"] == kmax), None) for b in order]
      pts = [(xpos[b], r) for b, r in zip(order, rs) if r is not None]
      if pts:
        ax.errorbar([x for x, _ in pts], [r["accuracy"] for _, r in pts], yerr=err([r for _, r in pts]), marker="o",
                    capsize=3, label=s)
    if have_sizes:
      ax.set_xscale("log")
      ax.set_xlabel("model size (parameters)")
    else:
      ax.set_xticks(range(len(order)), order, fontsize=8)
      ax.set_xlabel("backend")
    ax.set_title(f"{m} labels, {kmax} shots", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  files["plot_model_size"] = _save(fig, out / "icl_model_size.png")
  return files


# ------------------------------------------------------------------------------------------- CLI


def _parse_model(spec: str) -> tuple[str, str, float | None]:
  """"[NAME=]MODEL[@SIZE]" -> (name, model, size): MODEL a HF directory or an http(s) URL, SIZE e.g. 7e9."""
  name, eq, rest = spec.partition("=")
  if not eq or "/" in name or ":" in name:
    name, rest = "", spec
  size = None
  if "@" in rest:
    rest, _, s = rest.rpartition("@")
    try:
      size = float(s)
    except ValueError:
      raise ValueError(f"--model {spec!r}: size {s!r} after '@' is not a number (e.g. @7e9)") from None
  return name or os.path.basename(os.path.normpath(rest)) or rest, rest, size


def icl_command(models: Sequence[str], data: str = "synthetic", *, strategies: Sequence[str] = STRATEGIES,
                shots: Sequence[int] = (0, 1, 2, 4), perturbations: Sequence[str] = PERTURBATIONS,
                label_modes: Sequence[str] = LABEL_MODES, n_queries: int = 24, n_pool: int = 36, seed: int = 0,
                embedder: str | None = None, out: str = "vlm_icl", max_tokens: int = 16, concurrency: int = 1,
                clients: Mapping[str, Any] | None = None, print_fn: Callable[[str], None] | None = print) -> ICLResult:
  """`mlx-med vlm icl --model [NAME=]HFDIR|URL[@SIZE] ... [--data synthetic|FORMAT:PATH]`.

  clients: {name: client} used instead of building them from `models` (tests, library use).
  embedder: an `mlx-med embed` run or HF CLIP/SigLIP directory for the similarities.
  """
  from mlx_med.vlm import mcqa
  if data == "synthetic":
    task = synthetic_task(n_pool, n_queries, seed=seed)
  else:
    fmt, path = mcqa.parse_data(data)
    task = mcqa_task(mcqa.load_mcqa(fmt, path), n_queries=n_queries, seed=seed, name=fmt)
  sizes: dict[str, float] = {}
  if clients is None:
    if not models:
      raise ValueError("give at least one --model (a HF VLM directory or an OpenAI-compatible URL)")
    clients = {}
    for spec in models:
      name, model, size = _parse_model(spec)
      if name in clients:
        raise ValueError(f"two backends are named {name!r}; name them with NAME=MODEL")
      clients[name] = mcqa.make_client(model)
      if size is not None:
        sizes[name] = size
  else:
    for spec in models:
      name, _, size = _parse_model(spec)
      if size is not None:
        sizes[name] = size
  emb = embedder_embeddings(embedder) if embedder else None
  result = run_icl_study(clients, task, strategies=strategies, shots=shots, perturbations=perturbations,
                         label_modes=label_modes, embeddings=emb, sizes=sizes if len(sizes) == len(clients) else None,
                         max_tokens=max_tokens, seed=seed, concurrency=concurrency, out_dir=out)
  if print_fn is not None:
    print_fn(f"ICL on {task.name}: {len(task.queries)} queries, pool {len(task.pool)}, backends {', '.join(clients)}")
    print_fn(result.table.rstrip())
    print_fn(f"wrote {', '.join(result.files.values())}")
  return result
