"""SemCLIP: text-guided crop and visual-token selection for a frozen VLM.

A VLM sees a large image downsampled to its input size, so small objects vanish. SemCLIP
keeps the VLM frozen and decides, from the question, which parts of the image to show it:

1. **Crops.** `crop_grid` tiles the image at several scales with overlapping crops (scale s:
   an s x s grid whose crops overlap by `overlap` of their size and exactly cover the image;
   scale 1 is the whole image). Order: scale ascending, then row-major.
2. **Distant supervision.** No crop is ever labelled by hand: `crop_labels` marks a crop
   positive iff it contains at least `cover` (default 0.9) of the area of one of the boxes
   of the objects the question is about (the V* annotation's `bbox`). For a two-object
   question a crop holding either object is positive. The whole image contains every box, so
   the relevance model is trained on the scales > 1 (`model.scales`, default (2, 3, 4)): the
   overview is always shown to the VLM anyway (the caller counts it outside the crop budget).
3. **psi**, the relevance model: a CLIP-style dual encoder, `mlx_med.embed.model.TwoTower`
   (the project's image tower and text tower, as `mlx_med.vision.encoders` builds them, each
   with a linear projection into a shared space, and a learnable temperature) applied to the
   crops (resized to the image tower's size) and the question (a word/BPE tokenizer trained on
   the questions, `mlx_med.vision.text.train_text_tokenizer`). Its score of a crop is the
   cosine of the two embeddings.
4. **Loss** (`psi_loss`, per question b with crops n and positives P_b):
   * multi-positive InfoNCE over the crops of its own image: softmax over the image's N crops
     of exp(t) cos(q_b, c_bn); the loss is -log of the probability mass on P_b. This is
     what the selection uses (ranking the crops of one image);
   * plus `batch_weight` x a symmetric CLIP term across the batch: question b against all
     B*N crops of the batch (positives: P_b), and each positive crop against the B questions
     (target: its own). Other images' crops are extra negatives showing other targets, which
     helps the towers separate object descriptions rather than only "small coloured thing".
   Questions without a positive crop are left out (weight 0). The task is therefore
   batch-level (not decomposable) and implements the trainer's cached-feature accumulation.
5. **Selection.** `select_crops` takes the best-scored crops greedily while their summed
   token cost stays within the budget (never above it). `select_tokens` is the token-level
   variant: cosine relevance of each visual token to the query (`pallas_kernels.token_selection`),
   top-k or threshold-within-budget; `selected_token_states` runs one attention step in which
   the kept tokens attend only among the kept set (`token_selection_attention`: the Pallas
   kernel on GPU/TPU, the XLA path on CPU). The plain gather (`refine=False`) is what a frozen
   VLM should get (its projector's output, unchanged); the refined states mix context from the
   other kept tokens into each one, for a VLM (or adapter) trained with them.

Training goes through the shared trainer (`train_psi(config, workdir)`: config sections data,
model, train, mesh, seed; `default_psi_config("smoke")`); `load_psi(workdir)` returns a `Psi`
(config, parameters, tokenizer) whose `scores(crops, question)` ranks crops.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlx_med.core.task import LossOutput, Task
from mlx_med.embed import model as two_tower_lib
from mlx_med.vlm import vstar as vstar_lib

log = logging.getLogger("mlx_med.vlm.semclip")

Box = vstar_lib.Box
MODEL_FILE, TOKENIZER_FILE = "psi.json", "tokenizer.json"


# ----------------------------------------------------------------------------- crops


def _axis_starts(length: int, s: int, overlap: float) -> tuple[int, list[int]]:
  """Crop size and starts of s crops along one axis: (s-1) strides of (1-overlap) crop + one crop = length."""
  if s == 1:
    return length, [0]
  size = round(length / (s - (s - 1) * overlap))
  size = max(1, min(size, length))
  stride = (length - size) / (s - 1)
  return size, [round(k * stride) for k in range(s)]


def crop_grid(h: int, w: int, scales: Sequence[int] = (1, 2, 3), overlap: float = 0.25) -> list[Box]:
  """Multi-scale overlapping crops (x0, y0, x1, y1) covering an h x w image (see the module docstring).

  At scale s each axis holds s crops of size L / (s - (s-1) overlap) (rounded), the first at 0 and
  the last ending at L, so every pixel is in some crop of every scale. Deterministic order:
  scales as given, then rows top to bottom, columns left to right.
  """
  if h <= 0 or w <= 0:
    raise ValueError(f"image size {h}x{w} must be positive")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap={overlap} must be in [0, 1)")
  out: list[Box] = []
  for s in scales:
    if int(s) != s or s < 1:
      raise ValueError(f"scales={tuple(scales)}: each scale must be a positive integer (1 = the whole image)")
    s = int(s)
    ch, ys = _axis_starts(h, s, overlap)
    cw, xs = _axis_starts(w, s, overlap)
    out.extend((x, y, x + cw, y + ch) for y in ys for x in xs)
  return out


def crop_labels(crops: Sequence[Box], boxes: Sequence[Box], cover: float = 0.9) -> np.ndarray:
  """bool [N]: crop n is positive iff it contains >= `cover` of the area of at least one box."""
  if not 0.0 < cover <= 1.0:
    raise ValueError(f"cover={cover} must be in (0, 1]")
  c = np.asarray(crops, np.float64).reshape(-1, 4)
  out = np.zeros(len(c), bool)
  for b in boxes:
    x0, y0, x1, y1 = (float(v) for v in b)
    area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    if area <= 0:
      continue
    iw = np.clip(np.minimum(c[:, 2], x1) - np.maximum(c[:, 0], x0), 0, None)
    ih = np.clip(np.minimum(c[:, 3], y1) - np.maximum(c[:, 1], y0), 0, None)
    out |= iw * ih >= cover * area - 1e-9
  return out


def extract_crops(image: np.ndarray, crops: Sequence[Box], size: int) -> np.ndarray:
  """uint8 [N, size, size, 3]: each crop cut from `image` (uint8 [H, W, 3]) and resized (bicubic, antialiased)."""
  from PIL import Image

  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image of shape {image.shape}; expected [H, W, 3]")
  pil = Image.fromarray(image.astype(np.uint8))
  out = np.empty((len(crops), size, size, 3), np.uint8)
  for k, (x0, y0, x1, y1) in enumerate(crops):
    out[k] = np.asarray(pil.crop((int(x0), int(y0), int(x1), int(y1))).resize((size, size), Image.BICUBIC))
  return out


# ----------------------------------------------------------------------------- psi


@dataclasses.dataclass(frozen=True)
class PsiConfig:
  """psi = the two towers (`embed.model.TwoTowerConfig`) plus the crop geometry it was trained on."""

  towers: two_tower_lib.TwoTowerConfig
  scales: tuple[int, ...] = (2, 3, 4)
  overlap: float = 0.25
  cover: float = 0.9
  batch_weight: float = 0.5
  max_logit_scale: float = 100.0

  @property
  def crop_size(self) -> int:
    return self.towers.image_size

  @property
  def context_length(self) -> int:
    return self.towers.context_length

  def to_dict(self) -> dict:
    return {"towers": self.towers.to_dict(), "scales": list(self.scales), "overlap": self.overlap,
            "cover": self.cover, "batch_weight": self.batch_weight, "max_logit_scale": self.max_logit_scale}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> PsiConfig:
    values = dict(values)
    towers = two_tower_lib.TwoTowerConfig.from_dict(values.pop("towers"))
    known = {f.name for f in dataclasses.fields(cls)} - {"towers"}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"psi config: unknown keys {unknown}; known {sorted(known)}")
    if "scales" in values:
      values["scales"] = tuple(int(s) for s in values["scales"])
    return cls(towers=towers, **values)


def psi_init(cfg: PsiConfig, rng: jax.Array):
  """Boxed parameters (logical axes attached) of a fresh psi (the TwoTower tree)."""
  return two_tower_lib.init_two_tower(cfg.towers, rng)


def normalize_pixels(crops: jax.Array) -> jax.Array:
  """Pixel values in [0, 255] (any dtype) -> float32 in [-1, 1], the towers' input."""
  return crops.astype(jnp.float32) / 127.5 - 1.0


def _l2(x: jax.Array) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def psi_embed(cfg: PsiConfig, params, crops: jax.Array, text_ids: jax.Array, *, rules=None, train: bool = False,
              rng: jax.Array | None = None):
  """(question embeddings [B, E], crop embeddings [B, N, E]), L2-normalised, from crops [B, N, S, S, 3] in 0..255."""
  b, n = crops.shape[:2]
  images = normalize_pixels(crops.reshape((b * n,) + crops.shape[2:]))
  rngs = {"dropout": rng} if (train and rng is not None) else {}
  img, txt = two_tower_lib.TwoTower(cfg.towers, rules).apply({"params": params}, images, text_ids, train=train,
                                                             rngs=rngs)
  return _l2(txt), _l2(img).reshape(b, n, -1)


def _lse_masked(logits: jax.Array, mask: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)


def psi_loss(q: jax.Array, c: jax.Array, labels: jax.Array, log_scale: jax.Array, batch_weight: float = 0.5):
  """Per-question losses [B] and validity [B] (see the module docstring).

  q [B, E], c [B, N, E] normalised; labels [B, N] (1 = positive crop); log_scale: log temperature.
  """
  pos = labels > 0
  valid = jnp.any(pos, axis=-1)
  scale = jnp.exp(log_scale)
  within = scale * jnp.einsum("be,bne->bn", q, c)
  loss = jax.nn.logsumexp(within, axis=-1) - _lse_masked(within, pos)
  if batch_weight:
    b, n, e = c.shape
    flat = c.reshape(b * n, e)
    cross = scale * q @ flat.T  # [B, B*N]
    own = jnp.eye(b, dtype=bool)[:, :, None] & pos[None, :, :]  # question b, crop (b', n): positive iff b' = b
    own = own.reshape(b, b * n)
    q2c = jax.nn.logsumexp(cross, axis=-1) - _lse_masked(cross, own)
    # each positive crop against the B questions; averaged over the image's positive crops
    c2q = jax.nn.logsumexp(cross, axis=0).reshape(b, n) - jnp.diagonal(cross.reshape(b, b, n)).T  # [B, N]
    c2q = jnp.sum(jnp.where(pos, c2q, 0.0), -1) / jnp.maximum(jnp.sum(pos, -1), 1)
    loss = loss + batch_weight * 0.5 * (q2c + c2q)
  return jnp.where(valid, loss, 0.0), valid


class PsiTask(Task):
  """psi for the shared trainer. Batches: crops uint8 [B, N, S, S, 3], text_ids int32 [B, L], labels int32 [B, N]."""

  decomposable = False

  def __init__(self, cfg: PsiConfig):
    self.cfg = cfg

  @property
  def batch_axes(self):
    return {"crops": ("batch", None, None, None, None), "text_ids": ("batch", "length"), "labels": ("batch", None)}

  def init(self, rng):
    return psi_init(self.cfg, rng)

  def log_scale(self, params) -> jax.Array:
    scale = params["logit_scale"].astype(jnp.float32)
    return jnp.minimum(scale, math.log(self.cfg.max_logit_scale)) if self.cfg.max_logit_scale > 0 else scale

  def features(self, params, batch, rng, *, rules=None, train=True):
    q, c = psi_embed(self.cfg, params, batch["crops"], batch["text_ids"], rules=rules, train=train, rng=rng)
    return {"question": q, "crops": c}

  def loss_on_features(self, params, features, batch, *, rules=None):
    q, c, labels = features["question"], features["crops"], batch["labels"]
    losses, valid = psi_loss(q, c, labels, self.log_scale(params), self.cfg.batch_weight)
    scores = jnp.einsum("be,bne->bn", q, c)
    top = jnp.argmax(scores, axis=-1)
    pos = (labels > 0).astype(jnp.float32)
    hit = jnp.take_along_axis(pos, top[:, None], axis=1)[:, 0]
    validf = valid.astype(jnp.float32)
    chance = jnp.sum(pos, -1) / pos.shape[-1]
    metrics = {"recall_at_1": jnp.sum(hit * validf), "chance_at_1": jnp.sum(chance * validf),
               "logit_scale": jnp.exp(self.log_scale(params)) * jnp.sum(validf)}
    return LossOutput(jnp.sum(losses), jnp.sum(validf), metrics)

  def loss(self, params, batch, rng, *, rules=None, train=True):
    return self.loss_on_features(params, self.features(params, batch, rng, rules=rules, train=train), batch,
                                 rules=rules)

  throughput_unit = ("questions", 1)

  def describe(self) -> str:
    t = self.cfg.towers
    return (f"psi (ViT {t.image.width}x{t.image.depth} at {t.image_size} px crops; text {t.text.width}x"
            f"{t.text.depth}; embed {t.embed_dim}; scales {list(self.cfg.scales)})"
            if t.image_kind == "vit" else f"psi ({t.image_kind} image tower; embed {t.embed_dim})")


# ----------------------------------------------------------------------------- data


class PsiSource:
  """Random-access training records from V* examples: the crops of each image at psi's size, the
  tokenized question, and the distant labels. Crops are cut once, held as uint8."""

  def __init__(self, examples: Sequence[vstar_lib.VStarExample], cfg: PsiConfig, tokenizer, progress: bool = False):
    if not examples:
      raise ValueError("no examples to train psi on")
    n = None
    crops, labels = [], []
    items = examples
    if progress:
      from tqdm.auto import tqdm
      items = tqdm(examples, desc="cutting crops", unit="img", leave=False)
    for ex in items:
      image = ex.load_image()
      grid = crop_grid(image.shape[0], image.shape[1], cfg.scales, cfg.overlap)
      n = n or len(grid)
      if len(grid) != n:
        raise ValueError(f"example {ex.id}: {len(grid)} crops, others {n}")
      crops.append(extract_crops(image, grid, cfg.crop_size))
      labels.append(crop_labels(grid, ex.boxes, cfg.cover).astype(np.int32))
    self.crops = np.stack(crops)
    self.labels = np.stack(labels)
    self.text_ids = np.asarray(tokenizer.encode([ex.question for ex in examples]), np.int32)

  def __len__(self) -> int:
    return len(self.crops)

  def __getitem__(self, i):
    return {"crops": self.crops[i], "text_ids": self.text_ids[i], "labels": self.labels[i]}


# ----------------------------------------------------------------------------- config + training


def default_psi_config(variant: str = "smoke") -> ml_collections.ConfigDict:
  """Config of a psi run: `smoke` (a ~100k-parameter model on 256 synthetic images; CPU, minutes)
  or `base` (a 6-layer, 192-wide ViT on 64 px crops and a 4-layer text tower; GPU)."""
  from mlx_med.core.config import default_mesh_config, default_train_config

  if variant not in ("smoke", "base"):
    raise ValueError(f"psi variant {variant!r}: choose smoke or base")
  smoke = variant == "smoke"
  crop = 32 if smoke else 64
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict({
      "folder": "",  # a V* bench folder; empty: synthetic questions (synth_vstar)
      "eval_folder": "",
      "n_train": 256 if smoke else 4096,
      "n_eval": 64 if smoke else 512,
      "image_size": 256 if smoke else 512,
      "target_size": (12, 24),
      "num_distractors": (6, 12),  # coloured distractor shapes per synthetic scene (min, max)
      "synth_seed": 0,  # eval examples use synth_seed + 1
      "tokenizer_vocab_size": 256,
  })
  config.model = ml_collections.ConfigDict({
      "image": {"kind": "vit", "image_size": crop, "patch_size": 8, "width": 48 if smoke else 192,
                "depth": 2 if smoke else 6, "num_heads": 4, "mlp_dim": 96 if smoke else 768, "style": "clip",
                "act": "gelu", "pool": "gap", "dtype": "float32", "remat": False},
      "text": {"vocab_size": 0, "context_length": 24, "width": 48 if smoke else 192, "depth": 1 if smoke else 4,
               "num_heads": 4, "mlp_dim": 96 if smoke else 768, "style": "clip", "act": "gelu",
               "eos_token_id": -1, "pad_token_id": -1, "dtype": "float32", "remat": False},
      "embed_dim": 32 if smoke else 128,
      "loss": "unicl",  # the two-tower config's name for the clamped CLIP temperature
      "logit_scale_init": math.log(1 / 0.07),
      "scales": (2, 3, 4),
      "overlap": 0.25,
      "cover": 0.9,
      "batch_weight": 0.5,
      "max_logit_scale": 100.0,
  })
  config.train = default_train_config()
  config.train.update({"steps": 150 if smoke else 5000, "batch_size": 16 if smoke else 64, "lr": 2e-3 if smoke else 5e-4,
                       "warmup_steps": 15 if smoke else 200, "weight_decay": 0.01, "log_every": 10,
                       "eval_every": 0 if smoke else 1000, "eval_batches": 0, "ckpt_every": 1000,
                       "async_checkpointing": False, "check_memory": False})
  config.mesh = default_mesh_config()
  return config


def psi_config_from(config: ml_collections.ConfigDict, tokenizer=None) -> PsiConfig:
  """PsiConfig from a run config's `model` section (text vocab/eos/pad of 0/-1 come from `tokenizer`)."""
  m = config.model
  towers_section = {k: (m[k].to_dict() if hasattr(m[k], "to_dict") else m[k])
                    for k in ("image", "text", "embed_dim", "loss", "logit_scale_init")}
  towers = two_tower_lib.two_tower_config(towers_section, tokenizer)
  return PsiConfig(towers=towers, scales=tuple(int(s) for s in m.scales), overlap=float(m.overlap),
                   cover=float(m.cover), batch_weight=float(m.batch_weight),
                   max_logit_scale=float(m.max_logit_scale))


def _examples(config, train: bool) -> list[vstar_lib.VStarExample]:
  d = config.data
  folder = d.folder if train else d.eval_folder
  if folder:
    return vstar_lib.read_vstar_folder(folder)
  if not train and d.folder:
    return []  # a real folder without an eval folder: no evaluation
  n = int(d.n_train if train else d.n_eval)
  if n <= 0:
    return []
  return vstar_lib.synth_vstar(n, image_size=int(d.image_size), seed=int(d.synth_seed) + (0 if train else 1),
                               target_size=tuple(d.target_size),
                               num_distractors=tuple(d.get("num_distractors", (6, 12))))


def _write_json(path: Path, value: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  os.replace(tmp, path)


def train_psi(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool = False,
              allow_config_change: bool = False):
  """Trains (or resumes) psi in `workdir` through the shared trainer; returns its `TrainResult`.

  Writes <workdir>/psi.json (the model), tokenizer.json (BPE on the training questions), checkpoints/,
  metrics.jsonl. Rerunning the same command resumes from the newest checkpoint.
  """
  from mlx_med.core import trainer as trainer_lib
  from mlx_med.vision.text import TextTokenizer, train_text_tokenizer

  workdir = str(workdir)
  trainer_lib.claim_workdir(config, workdir, allow_config_change)
  train_examples = _examples(config, True)
  eval_examples = _examples(config, False)
  style = str(config.model.text.get("style", "clip"))
  context = int(config.model.text.context_length)
  tok_path = Path(workdir) / TOKENIZER_FILE
  if not tok_path.is_file():
    train_text_tokenizer([ex.question for ex in train_examples], int(config.data.tokenizer_vocab_size), tok_path,
                         style=style, context_length=context)
  tokenizer = TextTokenizer.from_file(tok_path, context_length=context, style=style)
  cfg = psi_config_from(config, tokenizer)
  _write_json(Path(workdir) / MODEL_FILE, cfg.to_dict())
  train_source = PsiSource(train_examples, cfg, tokenizer, progress=progress)
  eval_source = PsiSource(eval_examples, cfg, tokenizer) if eval_examples else None
  log.info("psi: %d train / %d eval questions, %d crops each; %s", len(train_source),
           len(eval_source) if eval_source else 0, train_source.crops.shape[1], PsiTask(cfg).describe())
  return trainer_lib.train(config, workdir, PsiTask(cfg), train_source, eval_source, progress=progress,
                           allow_config_change=allow_config_change)


# ----------------------------------------------------------------------------- loaded psi


class Psi:
  """A psi ready to score crops: `scores(crops uint8 [N,S,S,3] or an image, question) -> [N]` cosines."""

  def __init__(self, cfg: PsiConfig, params, tokenizer=None, *, source: str = "", step: int | None = None):
    self.cfg, self.tokenizer, self.source, self.step = cfg, tokenizer, source, step
    self.params = jax.device_put(jax.tree.map(jnp.asarray, nn.unbox(params)))
    model = two_tower_lib.TwoTower(cfg.towers)
    self._image_fn = jax.jit(lambda p, x: _l2(model.apply({"params": p}, normalize_pixels(x),
                                                          method=two_tower_lib.TwoTower.encode_image)))
    self._text_fn = jax.jit(lambda p, t: _l2(model.apply({"params": p}, t,
                                                         method=two_tower_lib.TwoTower.encode_text)))

  @property
  def crop_size(self) -> int:
    return self.cfg.crop_size

  def question_ids(self, question: str | Sequence[str]) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError(f"{self.source or 'psi'}: no tokenizer; pass token ids instead of text")
    return np.asarray(self.tokenizer.encode(question), np.int32)

  def embed_questions(self, question) -> np.ndarray:
    """str, list of str, or token ids [B, L] -> normalised [B, E]."""
    ids = question if isinstance(question, np.ndarray) and question.dtype.kind in "iu" else self.question_ids(question)
    ids = np.atleast_2d(ids)
    return np.asarray(self._text_fn(self.params, ids), np.float32)

  def embed_crops(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Crops [N, S, S, 3] in 0..255 -> normalised [N, E] (fixed-size padded batches: few compiles)."""
    crops = np.asarray(crops)
    s = self.crop_size
    if crops.ndim != 4 or crops.shape[1:] != (s, s, 3):
      raise ValueError(f"crops of shape {crops.shape}; psi takes [N, {s}, {s}, 3] (extract_crops(image, boxes, {s}))")
    out = []
    for start in range(0, len(crops), batch_size):
      chunk = crops[start:start + batch_size]
      size = min(batch_size, 1 << max(len(chunk) - 1, 0).bit_length())
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)]) if len(chunk) < size else chunk
      out.append(np.asarray(self._image_fn(self.params, padded), np.float32)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.cfg.towers.embed_dim), np.float32)

  def scores(self, crops: np.ndarray, question) -> np.ndarray:
    """Cosine relevance [N] of each crop to the question (text or token ids [L])."""
    q = self.embed_questions(question)[0]
    return self.embed_crops(crops) @ q

  def image_scores(self, image: np.ndarray, question, crops: Sequence[Box] | None = None) -> tuple[list[Box], np.ndarray]:
    """(crop boxes, scores) for an image: the grid psi was trained on unless `crops` is given."""
    image = np.asarray(image)
    boxes = list(crops) if crops is not None else crop_grid(image.shape[0], image.shape[1], self.cfg.scales,
                                                           self.cfg.overlap)
    return boxes, self.scores(extract_crops(image, boxes, self.crop_size), question)


def psi_scores(psi_or_params, crops: np.ndarray, question, *, cfg: PsiConfig | None = None) -> np.ndarray:
  """Scores [N] of crops [N, S, S, 3] (0..255) for one question (text, or token ids [L]).

  `psi_or_params`: a `Psi` (from `load_psi`), or a parameter tree with `cfg` (then `question` must be ids).
  """
  if isinstance(psi_or_params, Psi):
    return psi_or_params.scores(crops, question)
  if cfg is None:
    raise ValueError("psi_scores(params, ...) needs cfg=PsiConfig (or pass a Psi from load_psi)")
  return Psi(cfg, psi_or_params).scores(crops, np.asarray(question, np.int32))


def load_psi(workdir: str | os.PathLike) -> Psi:
  """The newest checkpoint of a `train_psi` run (psi.json, tokenizer.json, checkpoints/)."""
  from mlx_med.core import checkpoint as checkpoint_lib
  from mlx_med.vision.text import TextTokenizer

  path = Path(workdir)
  model_file = path / MODEL_FILE
  if not model_file.is_file():
    raise ValueError(f"{path}: no {MODEL_FILE}; pass the workdir of train_psi (train psi there first)")
  try:
    cfg = PsiConfig.from_dict(json.loads(model_file.read_text()))
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{model_file}: not a psi model file ({e}); retrain or restore it") from None
  tokenizer = None
  if (path / TOKENIZER_FILE).is_file():
    tokenizer = TextTokenizer.from_file(path / TOKENIZER_FILE, context_length=cfg.context_length,
                                        style=cfg.towers.text.style)
  ckpt_dir = (path / "checkpoints").absolute()
  restored = checkpoint_lib.restore_latest_state(ckpt_dir)
  if restored is None:
    raise ValueError(f"{ckpt_dir}: no checkpoint; train psi first (train_psi(config, {str(path)!r}))")
  state, step = restored
  params = state.get("ema_params", state["params"])
  expected = jax.eval_shape(lambda: nn.unbox(psi_init(cfg, jax.random.key(0))))
  two_tower_lib.check_same_structure(expected, params, str(ckpt_dir))
  return Psi(cfg, params, tokenizer, source=str(path), step=int(step))


# ----------------------------------------------------------------------------- selection


def select_crops(scores: Sequence[float], crops: Sequence[Box], *, budget_tokens: int,
                 tokens_per_crop: int | Sequence[int], k_max: int | None = None,
                 return_indices: bool = False):
  """The best-scored crops whose summed token cost stays within `budget_tokens` (the overview image's
  tokens are the caller's, outside this budget).

  Greedy over crops by descending score (ties: lower index first): a crop is taken when it still fits;
  with a per-crop cost a cheaper, lower-scored crop may fill what a costly one could not. At most
  `k_max` crops. Returns the boxes in selection order (and their indices with return_indices=True).
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(scores) != len(crops):
    raise ValueError(f"{len(scores)} scores for {len(crops)} crops")
  costs = (np.full(len(crops), int(tokens_per_crop)) if np.ndim(tokens_per_crop) == 0
           else np.asarray(tokens_per_crop, np.int64).reshape(-1))
  if len(costs) != len(crops):
    raise ValueError(f"{len(costs)} crop costs for {len(crops)} crops")
  if np.any(costs <= 0):
    raise ValueError("tokens_per_crop must be positive")
  if budget_tokens < 0:
    raise ValueError(f"budget_tokens={budget_tokens} must be >= 0")
  order = np.argsort(-scores, kind="stable")
  chosen, spent = [], 0
  for idx in order:
    if k_max is not None and len(chosen) >= k_max:
      break
    if spent + costs[idx] <= budget_tokens:
      chosen.append(int(idx))
      spent += int(costs[idx])
  boxes = [tuple(crops[i]) for i in chosen]
  return (boxes, chosen) if return_indices else boxes


def select_tokens(token_embeddings, query_embedding, budget: int, *, threshold: float | None = None,
                  min_tokens: int = 1) -> np.ndarray:
  """Indices (ascending, int32 [k]) of the visual tokens most relevant to the query.

  Relevance = cosine(query, token) (`pallas_kernels.token_selection.cosine_relevance`). Without a
  threshold: the top `budget` tokens (`select_top_k`); with one: the tokens at or above it, at most
  `budget`, at least `min_tokens` (`select_by_budget`).
  """
  from pallas_kernels import token_selection as ts

  tokens = jnp.asarray(token_embeddings, jnp.float32)
  query = jnp.asarray(query_embedding, jnp.float32)
  if tokens.ndim != 2 or query.ndim != 1 or tokens.shape[1] != query.shape[0]:
    raise ValueError(f"token_embeddings [N, E] and query_embedding [E] expected; got {tokens.shape} and {query.shape}")
  n = tokens.shape[0]
  budget = int(budget)
  if not 1 <= budget:
    raise ValueError(f"budget={budget} must be >= 1")
  budget = min(budget, n)
  rel = ts.cosine_relevance(query[None], tokens[None])
  if threshold is None:
    idx, counts = ts.select_top_k(rel, budget)
  else:
    idx, counts = ts.select_by_budget(rel, max_tokens=budget, threshold=float(threshold), min_tokens=min_tokens)
  idx, counts = np.asarray(idx)[0, 0], int(np.asarray(counts)[0, 0])
  return idx[:counts].astype(np.int32)


def _attention_backend(backend: str) -> str:
  if backend != "auto":
    if backend not in ("xla", "pallas", "interpret", "reference"):
      raise ValueError(f"backend={backend!r}: choose auto, xla, pallas, interpret or reference")
    return backend
  return "xla" if jax.default_backend() == "cpu" else "pallas"


def selected_token_states(token_embeddings, indices, *, refine: bool = True, num_heads: int = 1,
                          backend: str = "auto") -> jax.Array:
  """The kept visual tokens' representations [K, E] (or [B, K, E] for [B, N, E] input, indices [B, K]).

  refine=False: the kept tokens themselves (what a frozen VLM takes). refine=True: each kept token
  attends only among the kept set (parameter-free, `num_heads` heads over slices of E, queries/keys
  /values the tokens themselves, scaled by 1/sqrt(E/heads)) and adds the result to itself: x_i +
  Attn_{j in kept}(x_i, x_j). The attention is `token_selection_attention` (Pallas on GPU/TPU,
  `token_selection_attention_xla` on CPU; "interpret" runs the kernel in interpret mode,
  "reference" the dense masked definition).
  """
  from pallas_kernels import token_selection as ts

  x = jnp.asarray(token_embeddings)
  idx = jnp.asarray(indices, jnp.int32)
  single = x.ndim == 2
  if single:
    x, idx = x[None], idx[None]
  if x.ndim != 3 or idx.ndim != 2 or idx.shape[0] != x.shape[0]:
    raise ValueError(f"token_embeddings [B, N, E] with indices [B, K] expected; got {x.shape} and {idx.shape}")
  kept = jnp.take_along_axis(x, idx[:, :, None], axis=1)  # [B, K, E]
  if refine:
    b, _, e = x.shape
    if e % num_heads:
      raise ValueError(f"embedding width {e} is not divisible by num_heads={num_heads}")
    heads = lambda t: t.reshape(b, t.shape[1], num_heads, e // num_heads).transpose(0, 2, 1, 3)
    q, kv = heads(kept), heads(x)
    sel = idx[:, None, :]  # one selection shared by every head
    kind = _attention_backend(backend)
    if kind == "xla":
      out = ts.token_selection_attention_xla(q, kv, kv, sel)
    elif kind == "reference":
      out = ts.token_selection_attention_reference(q, kv, kv, sel)
    else:
      out = ts.token_selection_attention(q, kv, kv, sel, interpret=kind == "interpret")
    kept = kept + out.transpose(0, 2, 1, 3).reshape(b, -1, e).astype(kept.dtype)
  return kept[0] if single else kept
