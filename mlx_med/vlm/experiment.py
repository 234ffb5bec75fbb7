"""The SemCLIP experiment: accuracy of a frozen VLM at an equal visual-token budget, by how the budget is spent.

Every condition shows the VLM the overview (the whole image, downsampled by the VLM's processor) plus
`crops.slots` more images' worth of visual tokens, so each costs exactly
`budget = (1 + slots) x tokens_per_image` visual tokens (checked for every question; a condition that
would spend another amount is an error, not a footnote):

  full_image      the slots hold the whole image again: the budget spent without looking closer (what a
                  VLM sees when the image is only downsampled; the same information as the overview);
  random_crop     the slots hold crops drawn uniformly from the crop grid (seeded per question);
  semclip_crop    the slots hold psi's best crops (`semclip.select_crops` under the crop budget);
  semclip_tokens  the token-level variant: the slots' tokens are the visual tokens, among those of psi's
                  `experiment.token_candidates` best crops, most similar (cosine, `semclip.select_tokens`,
                  the token-selection kernel's top-k) to the question's mean word embedding in the VLM's own
                  input space; the kept tokens go to the VLM as they are (`selected_token_states`,
                  refine=False: a frozen VLM takes its projector's outputs), in their original order.
                  Local backend only (a served VLM takes images, not visual tokens);
  oracle_crop     the slots hold the crop distant supervision labels best: the smallest crop of the grid
                  holding every box the question is about (else the smallest positive crop).

Backends: the trained local VLM (`mlx_med.vlm.train.TrainedVLM`: the option whose text the VLM finds most
likely after the prompt, its tokens and <|im_end|> summed, as lmms-eval scores multiple choice by
log-likelihood; with data.answer_format="letter", the letter with the highest logit), or any `mlx_med.llm.client.LLMClient`
(a served VLM: images go as PNG data URLs, `mlx_med.vlm.messages.image_part`; greedy decoding, the first
option letter in the reply). For a served model the budget is counted with
`experiment.served_tokens_per_image`.

Data: the synthetic V*-style test split (default), a V* bench folder (`data.root`, or `data=` a path), or a
list of `VStarExample`s. psi is trained (or resumed) in <workdir>/psi, the VLM in <workdir>/vlm.

Outputs (each written under a temporary name, then renamed): results.json (per condition: n, correct,
accuracy, Wilson 95% interval, visual tokens per question; per category; the goal as measured),
table.md, accuracy.png. The goal (SemCLIP's claim): SemCLIP crop clearly above full image and random crop
(Wilson intervals apart), approaching the oracle.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlx_med.vlm import train as train_lib

log = logging.getLogger("mlx_med.vlm.experiment")

CONDITIONS = ("full_image", "random_crop", "semclip_crop", "semclip_tokens", "oracle_crop")
LABELS = {"full_image": "full image", "random_crop": "random crop", "semclip_crop": "SemCLIP crop",
          "semclip_tokens": "SemCLIP tokens", "oracle_crop": "oracle crop"}
PSI_DIR, VLM_DIR = "psi", "vlm"


@dataclasses.dataclass
class Query:
  """One question under one condition: the images (uint8, raw resolution) and, for the token variant,
  the visual tokens to keep: `token_plan` = (candidate crop boxes, the question's budget of tokens)."""

  example_index: int
  condition: str
  question: str
  options: list[str]
  answer: str
  images: list[np.ndarray]
  token_plan: tuple[list, int] | None = None
  visual_tokens: int = 0


# ----------------------------------------------------------------------------- backends


class LocalBackend:
  """The trained VLM in this process: one forward per question; the answer is the best option letter."""

  supports_tokens = True

  def __init__(self, vlm: train_lib.TrainedVLM, batch_size: int = 16, answer_format: str = "option"):
    from mlx_med.core.transformer import Decoder
    from mlx_med.vlm import llava

    self.vlm, self.batch_size, self.answer_format = vlm, int(batch_size), answer_format
    cfg = vlm.cfg
    self.name = f"local:{vlm.path}"
    self.tokens_per_image = vlm.tokens_per_image
    self.params = jax.device_put(vlm.params)
    model, decoder = llava.Llava(cfg), Decoder(cfg.decoder)

    def features(params, images):
      return model.apply({"params": params}, train_lib.normalize_images(images), method=llava.Llava.image_features)

    def answer_logits(params, tokens, feats, answer_pos):
      lm = params["language_model"]
      x = decoder.apply({"params": lm}, tokens, method=Decoder.embed_tokens)
      x = llava.scatter_image_features(x, tokens, feats, cfg.image_token_id)
      logits = decoder.apply({"params": lm}, None, embeddings=x)
      return jnp.take_along_axis(logits, answer_pos[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    def sequence_logprob(params, tokens, feats, targets, mask):
      lm = params["language_model"]
      x = decoder.apply({"params": lm}, tokens, method=Decoder.embed_tokens)
      x = llava.scatter_image_features(x, tokens, feats, cfg.image_token_id)
      logp = jax.nn.log_softmax(decoder.apply({"params": lm}, None, embeddings=x).astype(jnp.float32), axis=-1)
      picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return jnp.sum(picked * mask, axis=-1)

    def embed_text(params, tokens):
      return decoder.apply({"params": params["language_model"]}, tokens, method=Decoder.embed_tokens)

    self._features = jax.jit(features)
    self._answer_logits = jax.jit(answer_logits)
    self._sequence_logprob = jax.jit(sequence_logprob)
    self._embed_text = jax.jit(embed_text)

  def image_features(self, views: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] views -> visual tokens [N, tokens_per_image, E] (in padded batches of 8)."""
    out = []
    for start in range(0, len(views), 8):
      chunk = views[start:start + 8]
      pad = 8 - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      f = np.asarray(self._features(self.params, jnp.asarray(chunk)), np.float32)
      out.append(f.reshape(8, self.tokens_per_image, -1)[:8 - pad])
    return np.concatenate(out)

  def question_embedding(self, question: str) -> np.ndarray:
    """The mean input embedding of the question's words (the query of the token-level selection)."""
    ids = self.vlm.encoder.encode(question) or [self.vlm.encoder.pad_id]
    return np.asarray(self._embed_text(self.params, jnp.asarray([ids], jnp.int32))[0], np.float32).mean(0)

  def visual_tokens(self, q: Query) -> np.ndarray:
    """[n_images x tokens_per_image, E]: the overview's tokens then the slots' (images or kept tokens)."""
    from mlx_med.vlm import semclip

    size = self.vlm.image_size
    views = np.stack([train_lib.clip_resize(im, size) for im in q.images])
    feats = self.image_features(views)
    feats = feats.reshape(-1, feats.shape[-1])
    if q.token_plan is None:
      return feats
    crops, budget = q.token_plan
    image = q.images[0]
    cand = np.stack([train_lib.crop_view(image, b, size) for b in crops])
    cand_feats = self.image_features(cand).reshape(-1, feats.shape[-1])
    idx = semclip.select_tokens(cand_feats, self.question_embedding(q.question), budget)
    if len(idx) != budget:
      raise RuntimeError(f"token selection kept {len(idx)} tokens, not the budget's {budget}")
    kept = np.asarray(semclip.selected_token_states(cand_feats, np.sort(idx), refine=False), np.float32)
    return np.concatenate([feats, kept])

  def _inputs(self, q: Query) -> tuple[list[int], int, np.ndarray]:
    """(prompt ids with images expanded, prompt length, visual tokens) of one query."""
    n_tok = self.tokens_per_image
    n_images = len(q.images) if q.token_plan is None else len(q.images) + q.token_plan[1] // n_tok
    ids, n_prompt = train_lib.encode_question(self.vlm.encoder, n_images, n_tok, q.question, q.options)
    tokens = self.visual_tokens(q)
    if tokens.shape[0] != n_images * n_tok:
      raise RuntimeError(f"{q.condition}: {tokens.shape[0]} visual tokens for {n_images * n_tok} image positions")
    return ids, n_prompt, tokens

  def answer(self, queries: Sequence[Query]) -> list[str]:
    """The predicted letters: by each option text's log-likelihood (answer_format "option", what the
    project's VLM is trained to say) or by the letters' logits at the answer position ("letter")."""
    if self.answer_format == "option":
      return self._answer_by_option_likelihood(queries)
    return self._answer_by_letter(queries)

  def _answer_by_option_likelihood(self, queries: Sequence[Query]) -> list[str]:
    enc = self.vlm.encoder
    out: list[str] = []
    n_rows = self.batch_size * 4
    rows, feats, spans = [], [], []

    def flush():
      if not rows:
        return []
      pad = n_rows - len(rows)
      r = rows + [rows[-1]] * pad
      f = feats + [feats[-1]] * pad
      s = spans + [spans[-1]] * pad
      tokens, _ = train_lib.pad_rows([x[:-1] for x in r], enc.pad_id)
      targets = np.full_like(tokens, enc.pad_id)
      mask = np.zeros(tokens.shape, np.float32)
      for i, (x, (a, b)) in enumerate(zip(r, s)):
        targets[i, :len(x) - 1] = x[1:]
        mask[i, a - 1:b - 1] = 1.0
      lp = np.asarray(self._sequence_logprob(self.params, jnp.asarray(tokens), jnp.asarray(np.concatenate(f)),
                                             jnp.asarray(targets), jnp.asarray(mask)))
      return list(lp[:len(rows)])

    scores: list[float] = []
    for q in queries:
      ids, n_prompt, visual = self._inputs(q)
      for option in q.options:
        if len(rows) == n_rows:
          scores += flush()
          rows, feats, spans = [], [], []
        full = ids + enc.encode(option) + [enc.im_end_id]
        rows.append(full)
        feats.append(visual)
        spans.append((n_prompt, len(full)))
    scores += flush()
    k = 0
    for q in queries:
      n = len(q.options)
      out.append(train_lib.LETTERS[int(np.argmax(scores[k:k + n]))])
      k += n
    return out

  def _answer_by_letter(self, queries: Sequence[Query]) -> list[str]:
    enc = self.vlm.encoder
    out: list[str] = []
    for start in range(0, len(queries), self.batch_size):
      batch = list(queries[start:start + self.batch_size])
      rows, prompt_lens, feats = [], [], []
      for q in batch:
        ids, n_prompt, tokens = self._inputs(q)
        rows.append(ids)
        prompt_lens.append(n_prompt)
        feats.append(tokens)
      pad = self.batch_size - len(batch)  # fixed batch shape: one compile
      rows += [rows[-1]] * pad
      prompt_lens += [prompt_lens[-1]] * pad
      feats += [feats[-1]] * pad
      tokens, _ = train_lib.pad_rows(rows, enc.pad_id)
      logits = np.asarray(self._answer_logits(self.params, jnp.asarray(tokens), jnp.asarray(np.concatenate(feats)),
                                              jnp.asarray(np.array(prompt_lens, np.int32) - 1)))
      for q, row in zip(batch, logits):
        letters = enc.letter_ids[:len(q.options)]
        out.append(train_lib.LETTERS[int(np.argmax(row[letters]))])
    return out


_LETTER_RE = re.compile(r"\b([A-H])\b")


def parse_letter(text: str, n_options: int) -> str | None:
  """The first option letter in a reply ("B", "B.", "(B) red", "The answer is B"), or None."""
  valid = train_lib.LETTERS[:n_options]
  stripped = text.strip()
  if stripped[:1] in valid and (len(stripped) == 1 or not stripped[1].isalpha()):
    return stripped[0]
  for m in _LETTER_RE.finditer(text):
    if m.group(1) in valid:
      return m.group(1)
  return None


class ClientBackend:
  """A served VLM through `mlx_med.llm.client`: images as PNG data URLs, greedy, the first option letter."""

  supports_tokens = False

  def __init__(self, client: Any, tokens_per_image: int, max_tokens: int = 8, name: str = "client"):
    self.client, self.tokens_per_image, self.max_tokens, self.name = client, int(tokens_per_image), max_tokens, name

  def answer(self, queries: Sequence[Query]) -> list[str]:
    from mlx_med.vlm.messages import image_part

    out = []
    for q in queries:
      content = [image_part(im) for im in q.images]
      content.append({"type": "text", "text": train_lib.format_question(q.question, q.options)})
      reply = self.client.chat([{"role": "user", "content": content}], max_tokens=self.max_tokens, temperature=0.0)
      letter = parse_letter(reply[0].text if reply else "", len(q.options))
      out.append(letter or "?")
    return out


# ----------------------------------------------------------------------------- conditions


def contains_all(grid: np.ndarray, boxes: Sequence[Sequence[float]], cover: float) -> np.ndarray:
  """bool [N]: the crop holds >= cover of EVERY box (what a two-object question needs)."""
  from mlx_med.vlm import semclip

  out = np.ones(len(grid), bool)
  for b in boxes:
    out &= np.asarray(semclip.crop_labels([tuple(g) for g in grid], [tuple(b)], cover=cover), bool)
  return out


def oracle_index(grid: np.ndarray, boxes: Sequence[Sequence[float]], cover: float) -> int:
  """The smallest crop holding every box; else the smallest crop holding one (distant supervision's
  positives); else the largest crop."""
  from mlx_med.vlm import semclip

  full = contains_all(grid, boxes, cover) if boxes else np.zeros(len(grid), bool)
  if full.any():
    return train_lib.oracle_crop_index(grid, full)
  labels = np.asarray(semclip.crop_labels([tuple(g) for g in grid], [tuple(b) for b in boxes], cover=cover), bool)
  return train_lib.oracle_crop_index(grid, labels)


def _cut(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
  x0, y0, x1, y1 = (int(v) for v in box[:4])
  return np.ascontiguousarray(image[y0:y1, x0:x1])


def build_queries(examples: Sequence[Any], psi: Any, config: ml_collections.ConfigDict, *, tokens_per_image: int,
                  conditions: Sequence[str]) -> tuple[list[Query], int]:
  """Every (example, condition) input at the same visual-token budget; returns (queries, budget)."""
  from mlx_med.vlm import semclip

  c, e = config.crops, config.experiment
  slots = int(c.slots)
  budget = (1 + slots) * tokens_per_image
  queries: list[Query] = []
  for i, ex in enumerate(examples):
    image = np.asarray(ex.image)
    h, w = image.shape[:2]
    grid, scores = psi.image_scores(image, ex.question)
    grid = np.asarray(grid, np.float64)
    boxes = train_lib.example_boxes(ex)
    rng = np.random.default_rng([int(e.seed), i])
    whole = [0, 0, w, h]
    for cond in conditions:
      plan = None
      if cond == "full_image":
        slot_boxes = [whole] * slots
      elif cond == "random_crop":
        slot_boxes = [grid[k] for k in rng.choice(len(grid), size=slots, replace=False)]
      elif cond == "semclip_crop":
        slot_boxes = semclip.select_crops(scores, [tuple(g) for g in grid], budget_tokens=budget - tokens_per_image,
                                          tokens_per_crop=tokens_per_image, k_max=slots)
        slot_boxes = list(slot_boxes) + [whole] * (slots - len(slot_boxes))  # never under budget
      elif cond == "oracle_crop":
        slot_boxes = [grid[oracle_index(grid, boxes, float(c.cover))]] * slots
      elif cond == "semclip_tokens":
        top = np.argsort(-np.asarray(scores), kind="stable")[:max(int(e.token_candidates), 1)]
        plan = ([grid[k] for k in top], slots * tokens_per_image)
        slot_boxes = []
      else:
        raise ValueError(f"unknown condition {cond!r}; choose from {CONDITIONS}")
      images = [image] + [_cut(image, b) for b in slot_boxes]
      spent = len(images) * tokens_per_image + (plan[1] if plan else 0)
      if spent != budget:
        raise AssertionError(f"{cond}: question {i} spends {spent} visual tokens, the budget is {budget}")
      queries.append(Query(i, cond, ex.question, list(ex.options), ex.answer, images, plan, spent))
  return queries, budget


# ----------------------------------------------------------------------------- reporting


def summarize(queries: Sequence[Query], predictions: Sequence[str], conditions: Sequence[str],
              categories: Sequence[str]) -> dict:
  """Per condition: n, correct, accuracy, Wilson 95% interval, visual tokens; per category too."""
  from mlx_med.core.stats import wilson_interval

  out: dict[str, Any] = {}
  for cond in conditions:
    rows = [(q, p) for q, p in zip(queries, predictions) if q.condition == cond]
    if not rows:
      continue
    correct = sum(int(p == q.answer) for q, p in rows)
    lo, hi = wilson_interval(correct, len(rows))
    per_cat = {}
    for cat in sorted(set(categories)):
      sub = [(q, p) for q, p in rows if categories[q.example_index] == cat]
      if sub:
        k = sum(int(p == q.answer) for q, p in sub)
        clo, chi = wilson_interval(k, len(sub))
        per_cat[cat] = {"n": len(sub), "correct": k, "accuracy": k / len(sub), "ci95": [clo, chi]}
    per_question = {q.example_index: int(p == q.answer) for q, p in rows}
    out[cond] = {"label": LABELS.get(cond, cond), "n": len(rows), "correct": correct, "accuracy": correct / len(rows),
                 "ci95": [lo, hi], "visual_tokens": sorted({q.visual_tokens for q, _ in rows}),
                 "correct_by_question": [per_question[i] for i in sorted(per_question)],
                 "unanswered": sum(int(p not in train_lib.LETTERS) for _, p in rows), "by_category": per_cat}
  return out


PAIRS = (("semclip_crop", "full_image"), ("semclip_crop", "random_crop"), ("oracle_crop", "semclip_crop"),
         ("semclip_tokens", "full_image"))


def paired_differences(results: dict, *, n_boot: int = 2000, seed: int = 0) -> dict:
  """Accuracy differences of condition pairs on the same questions, with paired bootstrap 95% intervals
  (`mlx_med.core.stats.paired_difference` over per-question 0/1 correctness): tighter than comparing two
  Wilson intervals, because both conditions answer the same questions."""
  from mlx_med.core.stats import paired_difference

  out = {}
  for a, b in PAIRS:
    if a in results and b in results:
      d = paired_difference(results[a]["correct_by_question"], results[b]["correct_by_question"], n_boot=n_boot,
                            seed=seed)
      out[f"{a}-{b}"] = {"a": a, "b": b, "mean": d["mean"], "lo": d["lo"], "hi": d["hi"], "n": d["n"]}
  return out


def goal(results: dict) -> dict:
  """SemCLIP's claim, as measured: crop accuracy clearly above full image and random crop (the paired
  bootstrap 95% interval of the difference on the same questions excludes 0), and the share of the
  full-image-to-oracle gap it closes."""
  def acc(k):
    return results[k]["accuracy"] if k in results else None

  out: dict[str, Any] = {"paired": paired_differences(results)}
  if "semclip_crop" in results:
    for base in ("full_image", "random_crop"):
      if base in results:
        out[f"semclip_above_{base}"] = acc("semclip_crop") > acc(base)
        out[f"semclip_clearly_above_{base}"] = out["paired"][f"semclip_crop-{base}"]["lo"] > 0
    if "oracle_crop" in results and "full_image" in results:
      gap = acc("oracle_crop") - acc("full_image")
      out["gap_closed"] = (acc("semclip_crop") - acc("full_image")) / gap if gap > 0 else None
  keys = [k for k in ("semclip_clearly_above_full_image", "semclip_clearly_above_random_crop") if k in out]
  out["met"] = bool(keys) and all(out[k] for k in keys)
  return out


def table_markdown(report: dict) -> str:
  lines = [(f"SemCLIP at an equal visual-token budget ({report['budget_tokens']} tokens = overview + "
           f"{report['slots']} crop slot(s) x {report['tokens_per_image']}; {report['n_examples']} questions; "
           f"backend {report['backend']})"), "",
           "| condition | accuracy | 95% CI (Wilson) | correct / n | visual tokens |", "|---|---|---|---|---|"]
  for r in report["conditions"].values():
    lo, hi = r["ci95"]
    lines.append(f"| {r['label']} | {100 * r['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | "
                 f"{r['correct']} / {r['n']} | {', '.join(map(str, r['visual_tokens']))} |")
  g = report["goal"]
  if "gap_closed" in g:
    closed = "n/a" if g["gap_closed"] is None else f"{100 * g['gap_closed']:.0f}%"
    lines += ["", (f"Goal (SemCLIP crop clearly above full image and random crop: paired 95% interval of the "
                  f"difference above 0): {'met' if g['met'] else 'not met'}; full-to-oracle gap closed by SemCLIP: "
                  f"{closed}.")]
  if g.get("paired"):
    lines += ["", "| difference (same questions) | accuracy points | paired bootstrap 95% CI |", "|---|---|---|"]
    for d in g["paired"].values():
      name = f"{LABELS.get(d['a'], d['a'])} - {LABELS.get(d['b'], d['b'])}"
      lines.append(f"| {name} | {100 * d['mean']:+.1f} | [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] |")
  cats = sorted({c for r in report["conditions"].values() for c in r["by_category"]})
  if len(cats) > 1:
    lines += ["", "| condition | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for r in report["conditions"].values():
      cells = [f"{100 * r['by_category'][c]['accuracy']:.1f}% (n={r['by_category'][c]['n']})"
               if c in r["by_category"] else "-" for c in cats]
      lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _atomic_text(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def plot_accuracy(report: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  conds = list(report["conditions"].values())
  acc = np.array([r["accuracy"] for r in conds]) * 100
  lo = acc - np.array([r["ci95"][0] for r in conds]) * 100
  hi = np.array([r["ci95"][1] for r in conds]) * 100 - acc
  fig, ax = plt.subplots(figsize=(7, 4))
  colors = ["#9e9e9e", "#bdbdbd", "#1f77b4", "#6baed6", "#2ca02c"][:len(conds)]
  ax.bar([r["label"] for r in conds], acc, yerr=[lo, hi], capsize=4, color=colors)
  ax.axhline(100 / 4, color="k", ls=":", lw=1, label="chance (4 options)")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"equal budget: {report['budget_tokens']} visual tokens per question (n={report['n_examples']})")
  ax.legend(loc="upper left")
  fig.tight_layout()
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run


def load_data(config: ml_collections.ConfigDict, data: Any = None) -> tuple[list, str]:
  """(examples, description): `data` (a list of examples or a V* folder path), `data.root`, or synthetic test."""
  from mlx_med.vlm import vstar

  if data is not None and not isinstance(data, (str, os.PathLike)):
    return list(data), "given examples"
  root = str(data) if data is not None else str(config.data.root)
  if root:
    if not Path(root).is_dir():
      raise FileNotFoundError(f"V* folder {root!r} does not exist; pass a folder of images + same-stem .json files")
    return vstar.read_vstar_folder(root), f"V* folder {root}"
  return train_lib.synthetic_examples(config, "test"), f"synthetic V* ({int(config.data.image_size)} px)"


def psi_run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """psi's run config with the shared seed, scene size and crop geometry."""
  psi = copy.deepcopy(config.psi)
  psi.unlock()
  psi.seed = int(config.seed)
  psi.data.image_size = int(config.data.image_size)
  psi.data.target_size = tuple(int(v) for v in config.data.get("target_size", (12, 24)))
  psi.data.num_distractors = tuple(int(v) for v in config.data.get("num_distractors", (6, 12)))
  psi.model.scales = tuple(int(s) for s in config.crops.scales)
  psi.model.overlap = float(config.crops.overlap)
  psi.model.cover = float(config.crops.cover)
  psi.lock()
  return psi


def make_backend(config: ml_collections.ConfigDict, workdir: str, backend: Any, progress: bool):
  e = config.experiment
  answer_format = str(config.data.get("answer_format", "option"))
  if backend is None and str(e.backend) == "openai":
    from mlx_med.llm.client import OpenAIClient

    if not e.base_url:
      raise ValueError("experiment.backend=openai needs experiment.base_url (the served VLM's /v1 URL)")
    backend = OpenAIClient(e.model or None, base_url=str(e.base_url))
  if backend is None:
    if str(e.backend) != "local":
      raise ValueError(f"experiment.backend={e.backend!r}: choose local or openai")
    run = train_lib.train_vlm(config, os.path.join(workdir, VLM_DIR), progress=progress)
    return LocalBackend(train_lib.TrainedVLM.load(run.hf_dir), int(e.batch_size), answer_format)
  if isinstance(backend, train_lib.TrainedVLM):
    return LocalBackend(backend, int(e.batch_size), answer_format)
  if isinstance(backend, (LocalBackend, ClientBackend)):
    return backend
  if hasattr(backend, "chat"):
    return ClientBackend(backend, int(e.served_tokens_per_image), int(e.max_tokens), name=type(backend).__name__)
  raise TypeError(f"backend {type(backend).__name__}: pass a TrainedVLM, an LLMClient or None (train the VLM)")


def run_semclip_experiment(config: ml_collections.ConfigDict, workdir: str, *, backend: Any = None, data: Any = None,
                           psi: Any = None, progress: bool = True) -> dict:
  """Trains (or resumes) psi and, without `backend`, the VLM; evaluates every condition at the same
  visual-token budget; writes results.json, table.md and accuracy.png into `workdir`, prints the table
  and returns the report. `psi`: an already loaded `semclip.Psi` (skips its training)."""
  from mlx_med.vlm import semclip

  work = Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  if psi is None:
    psi_dir = work / PSI_DIR
    semclip.train_psi(psi_run_config(config), str(psi_dir), progress=progress)
    psi = semclip.load_psi(str(psi_dir))
  t_psi = time.perf_counter() - t0
  be = make_backend(config, str(work), backend, progress)
  t_vlm = time.perf_counter() - t0 - t_psi
  examples, source = load_data(config, data)
  if int(config.experiment.max_examples) > 0:
    examples = examples[:int(config.experiment.max_examples)]
  conditions = [c for c in config.experiment.conditions if c in CONDITIONS]
  unknown = [c for c in config.experiment.conditions if c not in CONDITIONS]
  if unknown:
    raise ValueError(f"experiment.conditions has unknown {unknown}; choose from {CONDITIONS}")
  skipped = [] if be.supports_tokens else [c for c in conditions if c == "semclip_tokens"]
  conditions = [c for c in conditions if c not in skipped]
  queries, budget = build_queries(examples, psi, config, tokens_per_image=be.tokens_per_image, conditions=conditions)
  t1 = time.perf_counter()
  predictions = be.answer(queries)
  t_eval = time.perf_counter() - t1
  categories = [getattr(ex, "kind", "") or getattr(ex, "category", "") for ex in examples]
  results = summarize(queries, predictions, conditions, categories)
  report = {
      "budget_tokens": budget, "tokens_per_image": be.tokens_per_image, "slots": int(config.crops.slots),
      "n_examples": len(examples), "data": source, "backend": be.name, "conditions": results, "goal": goal(results),
      "skipped_conditions": {c: "a served VLM takes images, not visual tokens" for c in skipped},
      "seconds": {"psi": t_psi, "vlm": t_vlm, "evaluation": t_eval, "total": time.perf_counter() - t0},
  }
  _atomic_text(work / "results.json", json.dumps(report, indent=2))
  table = table_markdown(report)
  _atomic_text(work / "table.md", table)
  plot_accuracy(report, work / "accuracy.png")
  print(table, flush=True)
  return report
