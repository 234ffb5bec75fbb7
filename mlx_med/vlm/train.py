"""The small LLaVA-style VLM the project trains: word-level chat tokenizer, V*-style data, `VLMTask`, export.

SemCLIP needs a frozen VLM that *loses* fine detail when it sees only a downsampled image and *reads* it
from a crop. No pretrained VLM is available offline, so the project trains one on the synthetic V*-style
questions (`mlx_med.vlm.vstar`): a tiny CLIP-style ViT at low resolution (64 px by default), an MLP
projector and a tiny core decoder (`mlx_med.vlm.llava.Llava`), trained through the shared trainer.

Each training example is a chat turn as LLaVA-1.5 formats multiple-choice questions:

  user:      <image> (the overview: the whole image downsampled to the ViT input)
             <image> ... (`crops.slots` crop images, each a region of the large image resized to the ViT input)
             <question>\nA. <option>\nB. ...\nAnswer with the option's letter from the given choices directly.
  assistant: <the correct option's text>      (data.answer_format="option"; "letter": the letter)

Every example has the same number of images (1 + slots), so batches have static shapes and the visual
token budget is the same for every example. A crop slot holds, at random (`crops.p_target`,
`crops.p_random`, the rest the whole image): a crop of the multi-scale grid that distant supervision
labels positive (preferring crops that hold every box of a two-object question), a random crop of the
grid, or the whole image. The model thus learns to read detail from a crop when the crop shows it and
to fall back on the overview otherwise, which is what makes crop selection matter at evaluation.

Why the option's text by default and not the letter: a small model trained from scratch on letters has to
learn two steps at once (read the attribute, then find the option line that names it and copy its
letter); answering with the option's text removes the second step. The experiment then scores each
option's text by its likelihood (lmms-eval's log-likelihood way of answering a multiple-choice question);
a served VLM is asked for the letter as usual. Measured at smoke size (600 steps of 32), the answer's
loss stays near ln 4 in both formats: the model learns that the answer is one of the options, not yet
which one.

The loss is the next-token cross-entropy of the assistant's answer only (its tokens and the end-of-turn
token); prompt and image positions are masked. The loss is reported per example (summed over the
answer's tokens), and `answer_acc` is the share of examples whose answer's first token is the argmax.

The tokenizer is word-level (`tokenizers` WordLevel over a whitespace/punctuation split) with special
tokens `<pad>`, `<unk>`, `<|im_start|>`, `<|im_end|>` and `<image>`, and a ChatML template that renders
`{"type": "image"}` content parts as `<image>` (what HF VLM templates do). It is saved as tokenizer.json +
tokenizer_config.json (+ generation_config.json), read by `mlx_med.llm.tokenizer.ChatTokenizer.from_dir`
and transformers.

`train_vlm(config, workdir)` is resumable (the trainer's checkpoints; the data arrays are cached under
<workdir>/data) and exports a Hugging Face LLaVA directory <workdir>/hf: `llava.save_hf` + the tokenizer +
preprocessor_config.json (CLIP processor settings for the ViT input) + processor_config.json, which
transformers' `LlavaForConditionalGeneration`/`AutoProcessor`, `LocalVLM.from_pretrained` and
`mlx-med serve` load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlx_med.core import trainer as trainer_lib
from mlx_med.core.fileio import replace_dir, write_text_dir
from mlx_med.core.task import LossOutput, Task

log = logging.getLogger("mlx_med.vlm.train")

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START, IM_END, IMAGE_TOKEN)
LETTERS = "ABCDEFGH"
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
# CLIP's normalisation (what CLIPImageProcessor applies; the exported preprocessor_config.json says so).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_DIR, TOKENIZER_DIR, DATA_DIR = "hf", "tokenizer", "data"

# ChatML; content is a string or a list of parts ({"type": "image"} -> "<image>\n", {"type": "text"} -> text).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown chat role ' + message['role'] + '; use system, user or assistant') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# The word split of the tokenizer's pre-tokenizer (`tokenizers.pre_tokenizers.Whitespace`).
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


# ----------------------------------------------------------------------------- prompts and tokenizer


def format_question(question: str, options: Sequence[str]) -> str:
  """LLaVA-1.5's multiple-choice prompt: the question, lettered options, the answer instruction."""
  if not 2 <= len(options) <= len(LETTERS):
    raise ValueError(f"a question needs 2..{len(LETTERS)} options, got {len(options)}")
  lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [MCQ_INSTRUCTION]
  return "\n".join(lines)


def question_messages(n_images: int, question: str, options: Sequence[str], answer: str | None = None) -> list[dict]:
  """The chat of one question: a user turn with `n_images` image parts then the text; the answer turn if given."""
  content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": format_question(question,
                                                                                                    options)}]
  messages = [{"role": "user", "content": content}]
  if answer is not None:
    messages.append({"role": "assistant", "content": answer})
  return messages


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
  """`CHAT_TEMPLATE` in Python (tested equal to transformers' rendering of the template)."""
  out = []
  for m in messages:
    out.append(f"{IM_START}{m['role']}\n")
    content = m["content"]
    if isinstance(content, str):
      out.append(content)
    else:
      for part in content:
        if part["type"] == "image":
          out.append(IMAGE_TOKEN + "\n")
        elif part["type"] == "text":
          out.append(part["text"])
    out.append(f"{IM_END}\n")
  if add_generation_prompt:
    out.append(f"{IM_START}assistant\n")
  return "".join(out)


def words_of(texts: Iterable[str]) -> list[str]:
  """The sorted distinct words (the tokenizer's pre-tokenized pieces) of `texts`."""
  words: set[str] = set()
  for t in texts:
    words.update(_WORD_RE.findall(t))
  return sorted(words - set(SPECIAL_TOKENS))


def build_word_tokenizer(texts: Iterable[str], out_dir: str, *, model_max_length: int = 4096):
  """A word-level chat tokenizer whose vocabulary is the words of `texts` (plus the chat template's roles,
  the option letters and the instruction), written atomically to `out_dir`; returns it as a ChatTokenizer.

  Ids: the special tokens first (<pad> 0, <unk> 1, <|im_start|> 2, <|im_end|> 3, <image> 4), then the words
  in sorted order, so the same texts always give the same ids."""
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

  from mlx_med.llm.tokenizer import ChatTokenizer

  base = ["system", "user", "assistant", MCQ_INSTRUCTION, " ".join(f"{c}." for c in LETTERS)]
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for w in words_of(list(texts) + base):
    vocab[w] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": IM_END,
      "pad_token": PAD_TOKEN,
      "unk_token": UNK_TOKEN,
      "image_token": IMAGE_TOKEN,
      "add_bos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": int(model_max_length),
      "chat_template": CHAT_TEMPLATE,
  }
  generation = {"eos_token_id": vocab[IM_END], "pad_token_id": vocab[PAD_TOKEN], "bos_token_id": None}
  special = {"eos_token": IM_END, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
  _write_dir(out_dir, {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2),
                       "generation_config.json": json.dumps(generation, indent=2),
                       "special_tokens_map.json": json.dumps(special, indent=2)})
  return ChatTokenizer.from_dir(out_dir)


def _write_dir(out_dir: str, files: dict[str, str]) -> None:
  """Writes `files` (name -> text) as the directory `out_dir` (a temporary directory, then renamed)."""
  write_text_dir(out_dir, files)


class WordEncoder:
  """Fast encoding of rendered chats with the run's tokenizer.json (the `tokenizers` library, no transformers)."""

  def __init__(self, tokenizer_dir: str):
    from tokenizers import Tokenizer

    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json; build one with build_word_tokenizer")
    self.tok = Tokenizer.from_file(path)
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    ids = {t: self.tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"{path}: lacks the special tokens {missing}; rebuild it with build_word_tokenizer")
    self.pad_id, self.im_end_id, self.image_id = ids[PAD_TOKEN], ids[IM_END], ids[IMAGE_TOKEN]
    self.letter_ids = [self.tok.token_to_id(c) for c in LETTERS]

  def encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids)


def encode_question(encoder: WordEncoder, n_images: int, tokens_per_image: int, question: str,
                    options: Sequence[str], answer: str | None = None) -> tuple[list[int], int]:
  """Token ids of one question chat with every <image> expanded to `tokens_per_image` ids, and the length
  of the prompt (through the assistant header). With `answer`, the ids end with the answer and <|im_end|>."""
  prompt = render_chat(question_messages(n_images, question, options), add_generation_prompt=True)
  ids = _expand(encoder.encode(prompt), encoder.image_id, tokens_per_image)
  n_prompt = len(ids)
  if answer is not None:
    ids = ids + encoder.encode(answer) + [encoder.im_end_id]
  return ids, n_prompt


def _expand(ids: list[int], image_id: int, n: int) -> list[int]:
  out: list[int] = []
  for i in ids:
    out.extend([image_id] * n if i == image_id else [i])
  return out


# ----------------------------------------------------------------------------- images


def clip_resize(image: np.ndarray, size: int) -> np.ndarray:
  """CLIPImageProcessor's geometry on uint8 RGB: the shortest edge resized to `size` (bicubic), then a
  centre crop of size x size. Square inputs are simply resized."""
  from PIL import Image

  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  h, w = image.shape[:2]
  if h == w:
    nh = nw = size
  elif h < w:
    nh, nw = size, max(size, int(size * w / h))
  else:
    nh, nw = max(size, int(size * h / w)), size
  out = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return out[top:top + size, left:left + size]


def crop_view(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
  """The region `box` = (x0, y0, x1, y1) pixels of `image`, resized to the ViT input."""
  x0, y0, x1, y1 = (round(float(v)) for v in box[:4])
  h, w = image.shape[:2]
  x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"crop box {tuple(box)} is empty inside a {w}x{h} image")
  return clip_resize(image[y0:y1, x0:x1], size)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 RGB [..., H, W, 3] -> CLIP-normalised float32 (on the device)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def example_boxes(example: Any) -> list[tuple[float, float, float, float]]:
  """The target boxes (x0, y0, x1, y1) of a V* example."""
  boxes = getattr(example, "boxes", None)
  if boxes is None:
    boxes = getattr(example, "target_boxes", ())
  return [tuple(float(v) for v in b[:4]) for b in boxes]


def example_grid(example: Any, config: ml_collections.ConfigDict) -> np.ndarray:
  """The multi-scale crop grid of an example's image as an array [N, 4] (x0, y0, x1, y1)."""
  from mlx_med.vlm import semclip

  h, w = np.asarray(example.image).shape[:2]
  c = config.crops
  grid = semclip.crop_grid(h, w, scales=tuple(int(s) for s in c.scales), overlap=float(c.overlap))
  return np.asarray([tuple(float(v) for v in tuple(b)[:4]) for b in grid], np.float64)


def positive_crops(example: Any, grid: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """Distant-supervision labels (bool [N]) of the grid's crops for the example's target boxes."""
  from mlx_med.vlm import semclip

  boxes = example_boxes(example)
  labels = semclip.crop_labels([tuple(b) for b in grid], boxes, cover=float(config.crops.cover))
  return np.asarray(labels, bool).reshape(len(grid))


def oracle_crop_index(grid: np.ndarray, labels: np.ndarray) -> int:
  """The crop distant supervision labels best: the smallest positive crop (most detail of the targets);
  the whole image's index (the largest crop) when none is positive."""
  area = (grid[:, 2] - grid[:, 0]) * (grid[:, 3] - grid[:, 1])
  if labels.any():
    idx = np.flatnonzero(labels)
    return int(idx[np.argmin(area[idx])])
  return int(np.argmax(area))


# ----------------------------------------------------------------------------- data


def synthetic_examples(config: ml_collections.ConfigDict, split: str) -> list:
  """The synthetic V*-style examples of a split (train / eval / test): disjoint seeds per split."""
  from mlx_med.vlm import vstar

  d = config.data
  n = {"train": int(d.n_train), "eval": int(d.n_eval), "test": int(d.n_test)}[split]
  offset = {"train": 0, "eval": 1, "test": 2}[split]
  return vstar.synth_vstar(n, image_size=int(d.image_size), seed=int(d.seed) * 1000 + offset,
                           target_size=tuple(d.get("target_size", (12, 24))),
                           num_distractors=tuple(d.get("num_distractors", (6, 12))))


def _views(example: Any, config: ml_collections.ConfigDict, rng: np.random.Generator) -> np.ndarray:
  """Overview + `crops.slots` training crops of one example, uint8 [1 + slots, S, S, 3]."""
  size = int(config.model.image_size)
  image = np.asarray(example.image)
  grid = example_grid(example, config)
  labels = positive_crops(example, grid, config)
  from mlx_med.vlm import semclip

  every = np.ones(len(grid), bool)  # crops holding every box (a two-object question needs both)
  for b in example_boxes(example):
    every &= np.asarray(semclip.crop_labels([tuple(g) for g in grid], [b], cover=float(config.crops.cover)), bool)
  if every.any():
    labels = every
  h, w = image.shape[:2]
  c = config.crops
  views = [clip_resize(image, size)]
  for _ in range(int(c.slots)):
    u = rng.random()
    if u < float(c.p_target) and labels.any():
      box = grid[rng.choice(np.flatnonzero(labels))]
    elif u < float(c.p_target) + float(c.p_random):
      box = grid[rng.integers(len(grid))]
    else:
      box = np.array([0, 0, w, h], np.float64)
    views.append(crop_view(image, box, size))
  return np.stack(views)


def answer_text(example: Any, answer_format: str = "option") -> str:
  """What the assistant says: the correct option's text ("option") or its letter ("letter")."""
  if answer_format == "letter":
    return example.answer
  if answer_format != "option":
    raise ValueError(f"data.answer_format={answer_format!r}: choose option or letter")
  return example.options[LETTERS.index(example.answer)]


def make_arrays(examples: Sequence[Any], encoder: WordEncoder, config: ml_collections.ConfigDict, seq_len: int,
                tokens_per_image: int, seed: int, variants: int = 1) -> dict[str, np.ndarray]:
  """Training arrays: `variants` crop draws per example. tokens/targets/loss_mask int32 [N, seq_len]
  (targets = tokens shifted left; loss_mask marks the answer's tokens), answer_mask [N, seq_len] (the
  letter's position only), images uint8 [N, 1 + slots, S, S, 3]."""
  rng = np.random.default_rng(seed)
  n_images = 1 + int(config.crops.slots)
  rows = {"tokens": [], "targets": [], "loss_mask": [], "answer_mask": [], "images": []}
  for ex in examples:
    for _ in range(variants):
      ids, n_prompt = encode_question(encoder, n_images, tokens_per_image, ex.question, ex.options,
                                      answer_text(ex, str(config.data.get("answer_format", "option"))))
      if len(ids) > seq_len + 1:
        raise ValueError(f"example {getattr(ex, 'id', '?')}: {len(ids)} tokens exceed data.seq_len={seq_len} + 1; "
                         "raise data.seq_len")
      tokens = np.full(seq_len, encoder.pad_id, np.int32)
      targets = np.full(seq_len, encoder.pad_id, np.int32)
      loss = np.zeros(seq_len, np.int32)
      answer = np.zeros(seq_len, np.int32)
      tokens[:len(ids) - 1] = ids[:-1]
      targets[:len(ids) - 1] = ids[1:]
      loss[n_prompt - 1:len(ids) - 1] = 1  # the answer's tokens and <|im_end|>
      answer[n_prompt - 1] = 1  # the position that predicts the answer's first token
      rows["tokens"].append(tokens)
      rows["targets"].append(targets)
      rows["loss_mask"].append(loss)
      rows["answer_mask"].append(answer)
      rows["images"].append(_views(ex, config, rng))
  return {k: np.stack(v) for k, v in rows.items()}


class ArraySource:
  """A random-access source over equal-length arrays (what the trainer's grain loader reads)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays of different lengths: {lengths}")
    self.arrays = arrays
    self.n = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self.arrays.items()}


def _cached_arrays(path: Path, build) -> dict[str, np.ndarray]:
  """Arrays from `path` (an .npz) or built and saved there atomically (a resumed run reads the same data)."""
  if path.is_file():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  arrays = build()
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  return arrays


# ----------------------------------------------------------------------------- model config


def hf_config(config: ml_collections.ConfigDict, vocab_size: int, image_token_id: int, pad_token_id: int,
              eos_token_id: int) -> dict:
  """The HF LLaVA config.json (a dict) of config.model: CLIP vision tower, Llama text model."""
  m = config.model
  v, t = m.vision, m.text
  vocab = -(-int(vocab_size) // 8) * 8  # rounded up to a multiple of 8 (ids past the tokenizer's are unused)
  tokens_per_image = (int(m.image_size) // int(v.patch_size)) ** 2
  strategy = str(m.vision_feature_select_strategy)
  return {
      "model_type": "llava",
      "architectures": ["LlavaForConditionalGeneration"],
      "image_token_index": int(image_token_id),
      "projector_hidden_act": str(m.projector_hidden_act),
      "vision_feature_select_strategy": strategy,
      "vision_feature_layer": int(m.vision_feature_layer),
      "image_seq_length": tokens_per_image + (1 if strategy == "full" else 0),
      "multimodal_projector_bias": True,
      "tie_word_embeddings": False,
      "vision_config": {
          "model_type": "clip_vision_model", "hidden_size": int(v.width), "intermediate_size": int(v.mlp_dim),
          "num_hidden_layers": int(v.depth), "num_attention_heads": int(v.num_heads), "num_channels": 3,
          "image_size": int(m.image_size), "patch_size": int(v.patch_size), "hidden_act": "quick_gelu",
          "layer_norm_eps": 1e-5, "projection_dim": int(v.width)},
      "text_config": {
          "model_type": "llama", "vocab_size": vocab, "hidden_size": int(t.d_model),
          "intermediate_size": int(t.mlp_dim), "num_hidden_layers": int(t.num_layers),
          "num_attention_heads": int(t.num_heads), "num_key_value_heads": int(t.num_kv_heads),
          "max_position_embeddings": int(t.max_seq_len), "rms_norm_eps": 1e-6, "rope_theta": float(t.rope_theta),
          "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
          "pad_token_id": int(pad_token_id), "eos_token_id": int(eos_token_id), "bos_token_id": None},
  }


def model_config(config: ml_collections.ConfigDict, hf: dict):
  """LlavaConfig from the HF dict, with config.model's dtype and remat (decoder and vision tower)."""
  from mlx_med.vlm import llava

  m = config.model
  cfg = llava.LlavaConfig.from_hf(hf, dtype=str(m.dtype), param_dtype=str(m.param_dtype),
                                  max_seq_len=int(m.text.max_seq_len), remat="full" if bool(m.remat) else "none")
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, remat=bool(m.remat)))


def tokens_per_image(cfg) -> int:
  """Visual tokens one image costs in the decoder (LLaVA's image_seq_length)."""
  return int(cfg.num_image_tokens)


# ----------------------------------------------------------------------------- task


class VLMTask(Task):
  """Answer-only next-token loss of a LLaVA model for the shared trainer.

  Batch: tokens / targets / loss_mask / answer_mask int32 [B, T] (see `make_arrays`), images uint8
  [B, n_images, S, S, 3] (normalised on the device). Each example's images fill its <image> runs in
  order. The loss sums the answer tokens' cross-entropy per example; weight = the number of examples
  with an answer; `answer_acc` counts examples whose answer letter is the argmax."""

  decomposable = True

  def __init__(self, cfg, seq_len: int | None = None):
    self.cfg = cfg
    self.seq_len = seq_len

  @property
  def batch_axes(self):
    return {"tokens": ("batch", "length"), "targets": ("batch", "length"), "loss_mask": ("batch", "length"),
            "answer_mask": ("batch", "length"), "images": ("batch", None, None, None, None)}

  def init(self, rng):
    from mlx_med.vlm import llava

    return llava.init_params(self.cfg, rng)

  def logits(self, params, tokens: jax.Array, images: jax.Array, rules=None) -> jax.Array:
    from mlx_med.vlm import llava

    b, n = images.shape[:2]
    pixels = normalize_images(images.reshape((b * n,) + images.shape[2:]))
    return llava.Llava(self.cfg, rules).apply({"params": params}, tokens, pixels)

  def loss(self, params, batch, rng, *, rules=None, train=True) -> LossOutput:
    del rng, train  # no dropout
    logits = self.logits(params, batch["tokens"], batch["images"], rules).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    answer = batch["answer_mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    has_answer = (jnp.sum(answer, axis=-1) > 0).astype(jnp.float32)
    metrics = {"answer_acc": jnp.sum(correct * answer), "answer_nll": jnp.sum(losses * answer)}
    return LossOutput(jnp.sum(losses * mask), jnp.sum(has_answer), metrics)

  @property
  def throughput_unit(self) -> tuple[str, int]:
    return ("examples", 1)

  def describe(self) -> str:
    v, d = self.cfg.vision, self.cfg.decoder
    return (f"LLaVA(ViT {v.image_size}px/{v.patch_size} width {v.width} depth {v.depth}; decoder d{d.d_model} "
            f"x{d.num_layers}, vocab {d.vocab_size})")


# ----------------------------------------------------------------------------- run


def run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The VLM's own run config: a SemCLIP config's `vlm` section with the shared `seed`, `data` and `crops`
  (a config that already is one, with `model` at the top, is returned as is)."""
  if "model" in config and "crops" in config:
    return config
  if "vlm" not in config:
    raise ValueError("the config has neither a `vlm` section nor `model`/`crops`/`train` at the top; use "
                     "configs/vlm/semclip.py")
  v = config.vlm
  out = ml_collections.ConfigDict({"task": "vlm", "seed": int(config.seed), "data": config.data.to_dict(),
                                   "model": v.model.to_dict(), "crops": config.crops.to_dict(), "train": v.train.to_dict(),
                                   "mesh": v.mesh.to_dict(), "peak_flops_per_device": 0.0})
  out.lock()
  return out


@dataclasses.dataclass
class VLMRun:
  workdir: str
  hf_dir: str
  tokenizer_dir: str
  result: Any = None
  seconds: float = 0.0


def prepare(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True):
  """(task, train source, eval source, hf config dict) of a run: tokenizer, data arrays, model config."""
  work = Path(workdir)
  tok_dir = work / TOKENIZER_DIR
  train_examples = synthetic_examples(config, "train")
  eval_examples = synthetic_examples(config, "eval") if int(config.data.n_eval) else []
  if not (tok_dir / "tokenizer.json").is_file() and jax.process_index() == 0:
    texts = [format_question(ex.question, ex.options) + " " + ex.answer for ex in train_examples + eval_examples]
    build_word_tokenizer(texts, str(tok_dir), model_max_length=int(config.model.text.max_seq_len))
  encoder = WordEncoder(str(tok_dir))
  hf = hf_config(config, encoder.vocab_size, encoder.image_id, encoder.pad_id, encoder.im_end_id)
  cfg = model_config(config, hf)
  per_image = tokens_per_image(cfg)
  seq_len = int(config.data.seq_len)
  t0 = time.perf_counter()
  train = _cached_arrays(work / DATA_DIR / "train.npz", lambda: make_arrays(
      train_examples, encoder, config, seq_len, per_image, seed=int(config.seed), variants=int(config.crops.variants)))
  evals = (_cached_arrays(work / DATA_DIR / "eval.npz", lambda: make_arrays(
      eval_examples, encoder, config, seq_len, per_image, seed=int(config.seed) + 1)) if eval_examples else None)
  log.info("VLM data: %d train / %d eval rows (%.1f s)", len(train["tokens"]),
           0 if evals is None else len(evals["tokens"]), time.perf_counter() - t0)
  task = VLMTask(cfg, seq_len)
  return task, ArraySource(train), (ArraySource(evals) if evals is not None else None), hf


def train_vlm(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
              allow_config_change: bool = False) -> VLMRun:
  """Trains (or resumes) the small VLM in `workdir` and exports <workdir>/hf. `config`: a SemCLIP config
  (configs/vlm/semclip.py; its `vlm` section is used) or a VLM run config."""
  config = run_config(config)
  trainer_lib.claim_workdir(config, workdir, allow_config_change)
  task, train_source, eval_source, hf = prepare(config, workdir, progress=progress)
  log.info("training %s on %d rows", task.describe(), len(train_source))
  start = time.perf_counter()
  trainer = trainer_lib.Trainer(config, workdir, task, train_source, eval_source, progress=progress,
                                allow_config_change=allow_config_change)
  result = trainer.run()
  seconds = time.perf_counter() - start
  work = Path(workdir)
  if jax.process_index() == 0:
    params = jax.device_get(trainer.eval_params())
    export_hf(str(work / HF_DIR), task.cfg, params, hf, str(work / TOKENIZER_DIR))
    prev = json.loads((work / "train_time.json").read_text()) if (work / "train_time.json").is_file() else {}
    _write_json(work / "train_time.json", {"seconds": float(prev.get("seconds", 0.0)) + seconds,
                                                "step": int(result.final_step)})
  return VLMRun(str(work), str(work / HF_DIR), str(work / TOKENIZER_DIR), result, seconds)


def _write_json(path: Path, value: Any) -> None:
  """Atomic JSON write."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2))
  os.replace(tmp, path)


def preprocessor_config(image_size: int) -> dict:
  """CLIPImageProcessor settings for the ViT input (what transformers and mlx_med.vlm.processing read)."""
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": int(image_size)},
          "resample": 3, "do_center_crop": True, "crop_size": {"height": int(image_size), "width": int(image_size)},
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
          "image_std": list(CLIP_STD), "do_convert_rgb": True}


def export_hf(out_dir: str, cfg, params: Any, hf: dict, tokenizer_dir: str) -> str:
  """A Hugging Face LLaVA directory: llava.save_hf + tokenizer files + preprocessor/processor configs,
  written under a temporary name and renamed."""
  from mlx_med.vlm import llava

  out = os.path.abspath(out_dir)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
  try:
    model_dir = os.path.join(tmp, "model")
    llava.save_hf(model_dir, cfg, params, hf_config=hf)
    for name in os.listdir(model_dir):
      os.replace(os.path.join(model_dir, name), os.path.join(tmp, name))
    os.rmdir(model_dir)
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(tmp, name))
    size = int(hf["vision_config"]["image_size"])
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
      json.dump(preprocessor_config(size), f, indent=2)
    processor = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN,
                 "patch_size": int(hf["vision_config"]["patch_size"]),
                 "vision_feature_select_strategy": hf["vision_feature_select_strategy"],
                 "num_additional_image_tokens": 1}
    with open(os.path.join(tmp, "processor_config.json"), "w") as f:
      json.dump(processor, f, indent=2)
    with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
      f.write(CHAT_TEMPLATE)
    replace_dir(tmp, out)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return out


# ----------------------------------------------------------------------------- inference on the trained model


@dataclasses.dataclass
class TrainedVLM:
  """A LLaVA model with the word tokenizer: what the SemCLIP experiment's local backend runs."""

  cfg: Any
  params: Any
  encoder: WordEncoder
  path: str

  @property
  def image_size(self) -> int:
    return int(self.cfg.vision.image_size)

  @property
  def tokens_per_image(self) -> int:
    return tokens_per_image(self.cfg)

  @classmethod
  def load(cls, path: str) -> TrainedVLM:
    """From an exported HF directory, or a training workdir (its hf/ subdirectory)."""
    from mlx_med.vlm import llava

    p = Path(path)
    if (p / HF_DIR / "config.json").is_file():  # a training workdir (its own config.json is the run's)
      p = p / HF_DIR
    if not (p / "config.json").is_file():
      raise FileNotFoundError(f"{path}: no config.json (expected an exported VLM directory or a VLM workdir "
                              "with hf/); train one with mlx_med.vlm.train.train_vlm")
    cfg, params = llava.load_hf(str(p))
    return cls(cfg, params, WordEncoder(str(p)), str(p))


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded int32 [B, T] (T rounded up to `multiple`, fewer compiled shapes) and the lengths."""
  lengths = np.array([len(r) for r in rows], np.int32)
  t = int(-(-lengths.max() // multiple) * multiple)
  out = np.full((len(rows), t), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, lengths
